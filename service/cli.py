"""The ``codex-lb-trio`` command.

Exit codes: 0 ok, 1 a runtime failure (explained in one line), 2 bad configuration
or usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import trio

from service.config import Config, ConfigError, load_config, with_overrides

log = logging.getLogger("codex_lb_trio")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130


class CommandError(Exception):
    """A failure to report as one line with exit code 1."""


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request line at INFO; keep ours readable.
    for noisy in ("httpx", "httpcore", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codex-lb-trio",
        description="A local account pool for Codex CLI and OpenAI-compatible clients.",
    )
    parser.add_argument("--config", help="config file (default: $CODEX_LB_TRIO_CONFIG, "
                        "else ~/.codex-lb-trio/config.toml if present)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 2455)")
    serve.set_defaults(run=cmd_serve)
    return parser


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from service.server import serve

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if overrides:
        config = with_overrides(config, server=overrides)
    trio.run(serve, config)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace, Config], int] = args.run
    try:
        config = load_config(args.config)
        setup_logging(config.server.log_level)
        return run(args, config)
    except ConfigError as exc:
        print(f"codex-lb-trio: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseExceptionGroup as group:
        return _report_group(group)
    except CommandError as exc:
        print(f"codex-lb-trio: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _report_group(group: BaseExceptionGroup) -> int:
    """Turn the engine's exception group into one line (the traceback went to the log)."""
    from actors.supervisor import CrashLoop

    config_errors, rest = group.split(ConfigError)
    if config_errors is not None:
        print(f"codex-lb-trio: {_leaf(config_errors)}", file=sys.stderr)
        return EXIT_CONFIG
    crash, rest = (rest.split(CrashLoop) if rest is not None else (None, None))
    if crash is not None:
        print(f"codex-lb-trio: {_leaf(crash)}", file=sys.stderr)
        return EXIT_FAILURE
    if rest is not None and rest.split(KeyboardInterrupt)[1] is None:
        return EXIT_INTERRUPTED
    assert rest is not None
    leaf = _leaf(rest)
    log.error("stopped by an unexpected error", exc_info=leaf)
    print(f"codex-lb-trio: stopped by an unexpected error: {type(leaf).__name__}: {leaf}",
          file=sys.stderr)
    return EXIT_FAILURE


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())
