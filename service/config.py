"""Configuration: config.toml plus environment → one frozen Config.

The file is named by ``--config``, else by ``CODEX_LB_TRIO_CONFIG``, else
``<home>/config.toml`` if it exists, else defaults apply. Every key is documented in
config.example.toml. A wrong key or type raises ConfigError whose message is one line
naming the key and what it expects; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable
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
    # Bodies larger than large_body_bytes take one of large_body_slots while they are read,
    # so a few big requests at once cannot exhaust memory (the others wait their turn).
    large_body_bytes: int = 1024 * 1024
    large_body_slots: int = 2
    # A request body that stops arriving for this long is answered 408 (slow or dead client).
    body_idle_timeout: float = 60.0
    # Host names (besides loopback) this server answers to; see README "Security".
    allowed_hosts: tuple[str, ...] = ()
    # Browser origins (scheme://host[:port]) allowed besides our own same-origin pages.
    allowed_origins: tuple[str, ...] = ()
    # Behind a reverse proxy that rewrites Host: skip the Host check (needs [auth] api_keys).
    trust_any_host: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    base_url: str = "https://chatgpt.com/backend-api"
    auth_base_url: str = "https://auth.openai.com"
    client_version: str = "0.169.0"
    connect_timeout: float = 8.0
    header_timeout: float = 15.0
    compact_header_timeout: float = 300.0
    token_header_timeout: float = 60.0
    stream_idle_timeout: float = 240.0
    dead_path_silence: float = 3.0
    write_timeout: float = 30.0
    hedge_after: float = 2.0
    hedge_factor: float = 3.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    rotation_cooldown: float = 1.0
    drain_timeout: float = 900.0
    shutdown_grace: float = 10.0
    keepalive_idle: int = 5
    keepalive_interval: int = 2
    keepalive_count: int = 3
    user_timeout: float = 15.0
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
    def api_key_digests(self) -> frozenset[bytes]:
        """The SHA-256 digests of the configured keys (a configured digest is taken as is)."""
        return frozenset(stored_key_digest(k) for k in self.auth.api_keys)


def is_loopback(host: str) -> bool:
    """``localhost`` or an address in 127.0.0.0/8 or ::1 (brackets allowed)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


API_KEY_MIN_LENGTH = 16
_DIGEST_KEY = re.compile(r"sha256:[0-9a-fA-F]{64}")


def stored_key_digest(key: str) -> bytes:
    """A configured key as kept in memory: its SHA-256 digest (``sha256:<hex>`` is one already)."""
    if key.startswith("sha256:"):
        return bytes.fromhex(key.removeprefix("sha256:"))
    return hashlib.sha256(key.encode("utf-8")).digest()


def presented_key_digest(key: str) -> bytes:
    """The digest of a key a client sent. Always hashed: a digest is never accepted as a key."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def hash_api_key(key: str) -> str:
    """``sha256:<hex>`` for a plain key: the form to put in config.toml instead of the key."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


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
    shown = "a value that is not shown" if key.startswith("auth.") else _shown(value)
    raise ConfigError(f"config key {key}: expected {_type_name(tp)}, got {shown}")


def _build_section(name: str, cls: type[Any], raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config key [{name}]: expected a table like [{name}]")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in hints:
            known = ", ".join(hints)
            raise ConfigError(
                f"config key {name}.{_name(key)}: unknown key; known keys are {known}")
        values[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**values)


# --- validation ------------------------------------------------------------------------
# One rule per key, looked up by "section.key". A numeric key without a rule of its own must
# be finite and not negative (DEFAULT_NUMBER); give a new key its own rule when it has a
# tighter range. A rule returns None when the value is fine, else what the key expects.

Rule = Callable[[Any], str | None]


def number(low: float, high: float, *, low_open: bool = False) -> Rule:
    """A finite number in [low, high] (or (low, high] when ``low_open``)."""

    def check(value: Any) -> str | None:
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > high:
            lower = f"more than {low:g}" if low_open else f"at least {low:g}"
            return f"a finite number {lower} and at most {high:g}"
        return None

    return check


def choice(*allowed: str) -> Rule:
    def check(value: Any) -> str | None:
        return None if value in allowed else "one of " + ", ".join(allowed)

    return check


def each(rule: Rule, *, secret: bool = False) -> Rule:
    """A rule applied to every item of a list (a secret item is counted, never shown)."""

    def check(values: Any) -> str | None:
        for index, item in enumerate(values):
            problem = rule(item)
            if problem is not None:
                which = f"item {index + 1}" if secret else f"item {_shown(item)}"
                return f"{problem}; bad {which}"
        return None

    return check


def _http_url(value: Any) -> str | None:
    if re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value) is None:
        return "an http(s) URL like https://host/path"
    return None


_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")


def _host_name(value: Any) -> str | None:
    if _HOST_NAME.fullmatch(value) is None:
        return "host names like proxy.lan or 192.168.1.5 (no scheme, no port)"
    return None


def _origin(value: Any) -> str | None:
    if re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", value) is None:
        return "origins like https://proxy.example.com (scheme and host, optional port, no path)"
    return None


def _api_key(value: Any) -> str | None:
    if value.startswith("sha256:"):
        if _DIGEST_KEY.fullmatch(value) is None:
            return "sha256: followed by 64 hex digits"
        return None
    if len(value) < API_KEY_MIN_LENGTH or not value.isprintable() or not value.isascii() or (
        any(c.isspace() for c in value)
    ):
        return (f"keys of at least {API_KEY_MIN_LENGTH} printable ASCII characters without "
                "spaces (e.g. from `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return None


DEFAULT_NUMBER: Rule = number(0, 1e12)

RULES: dict[str, Rule] = {
    "server.port": number(0, 65535),
    "server.max_body_bytes": number(1024, 2**31),
    "server.drain_seconds": number(0, 3600),
    "server.log_level": choice("debug", "info", "warning", "error", "critical"),
    "server.large_body_bytes": number(1024, 2**31),
    "server.large_body_slots": number(1, 64),
    "server.body_idle_timeout": number(0.1, 3600),
    "server.allowed_hosts": each(_host_name),
    "server.allowed_origins": each(_origin),
    "upstream.base_url": _http_url,
    "upstream.auth_base_url": _http_url,
    "upstream.connect_timeout": number(0, 3600, low_open=True),
    "upstream.header_timeout": number(0, 3600, low_open=True),
    "upstream.stream_idle_timeout": number(0, 86400, low_open=True),
    "upstream.dead_path_silence": number(0, 3600, low_open=True),
    "upstream.write_timeout": number(0, 3600, low_open=True),
    "upstream.compact_header_timeout": number(0, 3600, low_open=True),
    "upstream.hedge_after": number(0, 3600, low_open=True),
    "upstream.hedge_factor": number(0, 100),
    "client.user_timeout": number(0, 3600),
    "client.rotation_cooldown": number(0, 3600),
    "client.drain_timeout": number(0, 86400, low_open=True),
    "client.shutdown_grace": number(0, 3600),
    "client.keepalive_idle": number(1, 32767),
    "client.keepalive_interval": number(1, 32767),
    "client.keepalive_count": number(1, 127),
    "client.max_connections": number(1, 100_000),
    "client.watch_interval": number(0, 3600, low_open=True),
    "client.wake_threshold": number(0, 86400, low_open=True),
    "refresh.token_margin": number(0, 86400),
    "refresh.token_spacing": number(0, 3600),
    "refresh.token_jitter": number(0, 3600),
    "refresh.models_interval": number(1, 86400),
    "refresh.usage_interval": number(1, 86400),
    "refresh.usage_concurrency": number(1, 64),
    "routing.max_attempts": number(1, 100),
    "routing.default_cooldown": number(0, 7 * 86400),
    "auth.api_keys": each(_api_key, secret=True),
    "storage.request_log_days": number(0, 36_500),
}


def _shown(value: Any) -> str:
    """A value for an error line: never a whole key, never a control character."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _name(key: str) -> str:
    """A key from the file as it may be printed: odd characters escaped."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key) else _shown(key)


def _validate(config: Config) -> None:
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for item in dataclasses.fields(values):
            key = f"{section.name}.{item.name}"
            value = getattr(values, item.name)
            rule = RULES.get(key)
            if rule is None and isinstance(value, int | float) and not isinstance(value, bool):
                rule = DEFAULT_NUMBER
            problem = rule(value) if rule is not None else None
            if problem is not None:
                got = "" if key == "auth.api_keys" else f", got {_shown(value)}"
                raise ConfigError(f"config key {key}: expected {problem}{got}")
    if config.server.trust_any_host and not config.auth.api_keys:
        raise ConfigError("config key server.trust_any_host: needs [auth] api_keys = [\"...\"] "
                          "(any page could reach the pool otherwise); or list the names in "
                          "server.allowed_hosts instead")


def parse_config(data: dict[str, Any]) -> Config:
    """Build a Config from parsed TOML, raising ConfigError on the first problem."""
    sections: dict[str, Any] = {}
    for name, raw in data.items():
        if name not in _SECTIONS:
            known = ", ".join(f"[{s}]" for s in _SECTIONS)
            raise ConfigError(
                f"config key [{_name(name)}]: unknown section; known sections are {known}")
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
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text (is it a TOML file?)") from None
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found; create it or fix the path") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({_one_line(str(exc))})") from None
    return parse_config(data)


def _one_line(text: str) -> str:
    return " ".join(text.encode("ascii", "backslashreplace").decode().split())[:200]


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
