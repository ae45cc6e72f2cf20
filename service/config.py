"""Configuration: config.toml plus environment → one frozen Config.

The file is named by ``--config``, else by ``CODEX_LB_TRIO_CONFIG``, else
``<home>/config.toml`` if it exists, else defaults apply. Every key is documented in
config.example.toml. A wrong key or type raises ConfigError whose message is one line
naming the key and what it expects; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_ENV = "CODEX_LB_TRIO_CONFIG"
HOME_ENV = "CODEX_LB_TRIO_HOME"
DEFAULT_HOME = "~/.codex-lb-trio"


class ConfigError(Exception):
    """A configuration problem, explained in one line."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 2455
    max_body_bytes: int = 32 * 1024 * 1024
    drain_seconds: float = 30.0
    log_level: str = "info"


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    base_url: str = "https://chatgpt.com/backend-api"
    auth_base_url: str = "https://auth.openai.com"
    client_version: str = "0.169.0"
    connect_timeout: float = 8.0
    header_timeout: float = 15.0
    token_header_timeout: float = 60.0
    stream_idle_timeout: float = 240.0
    dead_path_silence: float = 3.0
    write_timeout: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    rotation_cooldown: float = 1.0
    drain_timeout: float = 900.0
    shutdown_grace: float = 10.0
    keepalive_idle: int = 15
    keepalive_interval: int = 5
    keepalive_count: int = 3
    max_connections: int = 200
    watch_interval: float = 1.0
    wake_threshold: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshConfig:
    token_margin: float = 600.0
    token_spacing: float = 2.0
    token_jitter: float = 30.0
    models_interval: float = 300.0
    usage_interval: float = 60.0
    usage_concurrency: int = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingConfig:
    max_attempts: int = 4
    default_cooldown: float = 60.0
    sticky: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageConfig:
    home: str = ""  # empty: $CODEX_LB_TRIO_HOME, else ~/.codex-lb-trio
    request_log_days: float = 30.0  # request log retention; 0 keeps rows forever


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    # Plain keys or "sha256:<hex>" digests; only digests are kept in memory.
    api_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)

    @property
    def home(self) -> Path:
        """The data directory (store.db, the key file)."""
        raw = self.storage.home or os.environ.get(HOME_ENV) or DEFAULT_HOME
        return Path(raw).expanduser()

    @property
    def api_key_digests(self) -> frozenset[str]:
        return frozenset(hash_api_key(k) for k in self.auth.api_keys)


def hash_api_key(key: str) -> str:
    """A key as kept in memory: its SHA-256 hex digest (already-hashed keys pass through)."""
    if key.startswith("sha256:"):
        return key.removeprefix("sha256:").lower()
    return hashlib.sha256(key.encode()).hexdigest()


_SECTIONS: dict[str, type[Any]] = {
    f.name: f.type if isinstance(f.type, type) else globals()[str(f.type)]
    for f in dataclasses.fields(Config)
}


def _type_name(tp: Any) -> str:
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    return "a list of strings"


def _coerce(key: str, value: Any, tp: Any) -> Any:
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return tuple(value)
    raise ConfigError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")


def _build_section(name: str, cls: type[Any], raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config key [{name}]: expected a table like [{name}]")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in hints:
            known = ", ".join(hints)
            raise ConfigError(f"config key {name}.{key}: unknown key; known keys are {known}")
        values[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**values)


def _validate(config: Config) -> None:
    positive = [
        ("server.port", config.server.port, 0, 65535),
        ("upstream.connect_timeout", config.upstream.connect_timeout, 0, None),
        ("upstream.header_timeout", config.upstream.header_timeout, 0, None),
        ("upstream.stream_idle_timeout", config.upstream.stream_idle_timeout, 0, None),
        ("upstream.dead_path_silence", config.upstream.dead_path_silence, 0, None),
        ("client.drain_timeout", config.client.drain_timeout, 0, None),
        ("client.shutdown_grace", config.client.shutdown_grace, 0, None),
        ("client.watch_interval", config.client.watch_interval, 0, None),
        ("routing.max_attempts", config.routing.max_attempts, 1, None),
        ("server.max_body_bytes", config.server.max_body_bytes, 1, None),
        ("storage.request_log_days", config.storage.request_log_days, 0, None),
    ]
    for key, value, low, high in positive:
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"config key {key}: expected a value {bound}, got {value!r}")
    for key, url in (
        ("upstream.base_url", config.upstream.base_url),
        ("upstream.auth_base_url", config.upstream.auth_base_url),
    ):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"config key {key}: expected an http(s) URL, got {url!r}")


def parse_config(data: dict[str, Any]) -> Config:
    """Build a Config from parsed TOML, raising ConfigError on the first problem."""
    sections: dict[str, Any] = {}
    for name, raw in data.items():
        if name not in _SECTIONS:
            known = ", ".join(f"[{s}]" for s in _SECTIONS)
            raise ConfigError(f"config key [{name}]: unknown section; known sections are {known}")
        sections[name] = _build_section(name, _SECTIONS[name], raw)
    config = Config(**sections)
    _validate(config)
    return config


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """Which file to read: --config, else $CODEX_LB_TRIO_CONFIG, else <home>/config.toml."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    home = Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()
    candidate = home / "config.toml"
    return candidate if candidate.is_file() else None


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the config file (or defaults if there is none)."""
    path = config_path(explicit)
    if path is None:
        return Config()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found; create it or fix the path") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    return parse_config(data)


def with_overrides(config: Config, **sections: dict[str, Any]) -> Config:
    """A copy of config with some keys replaced, e.g. server={"port": 0}."""
    changes = {
        name: dataclasses.replace(getattr(config, name), **values)
        for name, values in sections.items()
    }
    return dataclasses.replace(config, **changes)


__all__ = [
    "AuthConfig",
    "ClientConfig",
    "Config",
    "ConfigError",
    "RefreshConfig",
    "RoutingConfig",
    "ServerConfig",
    "StorageConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
    "with_overrides",
]
