"""End-to-end tests: real clients (Codex CLI, the OpenAI Python SDK) against the whole proxy."""
