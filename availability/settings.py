"""One settings object, read once from the environment and passed in."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .callers import CallersError
from .callers import load as load_callers

T = TypeVar("T")

MIRROR_LAYOUT = 2
"""The version of the mirror's layout in Valkey that this code speaks (see mirror/trust.py)."""


class SettingsError(ValueError):
    """A setting has a value the service cannot run with; the message names it."""


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str
    valkey_url: str
    grpc_address: str = "127.0.0.1:50051"
    heartbeat_stale_seconds: float = 90.0
    mitra_auto_offline_sweep_seconds: float = 30.0
    heartbeat_mirror_interval_seconds: float = 60.0
    valkey_online_mirror_sweep_seconds: float = 300.0
    valkey_cluster: bool = False
    valkey_sentinels: tuple[str, ...] = ()
    valkey_sentinel_master: str = ""
    valkey_sentinel_password: str = field(default="", repr=False)
    valkey_key_prefix: str = "availability"
    default_max_concurrent_sessions: int = 3
    beacon_ttl_seconds: float = 10.0
    auto_offline_batch: int = 10_000
    mass_stale_share: float = 0.5
    mass_stale_min: int = 20
    mass_stale_max_per_sweep: int = 100
    database_pool_size: int = 10
    watch_retained_changes: int = 10_000
    watch_buffer_events: int = 1_000
    watch_max_streams: int = 5_000
    grpc_max_message_bytes: int = 4 * 1024 * 1024
    grpc_max_concurrent_rpcs: int = 10_000
    grpc_max_connection_age_seconds: float = 0.0
    grpc_max_connection_age_grace_seconds: float = 30.0
    database_timeout_seconds: float = 5.0
    valkey_timeout_seconds: float = 0.25
    valkey_breaker_failures: int = 3
    valkey_breaker_seconds: float = 1.0
    valkey_slow_seconds: float = 0.05
    postgres_slow_seconds: float = 0.5
    allow_insecure_network: bool = False
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)
    auth_callers_file: str = ""
    auth_callers_poll_seconds: float = 1.0
    auth_refusals_per_peer_per_second: float = 20.0
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    grpc_reflection: bool = True
    metrics_address: str = "127.0.0.1:9464"
    migrate_on_start: bool = True
    chat_session_triggers: bool = True
    change_poll_seconds: float = 0.02
    load_poll_seconds: float = 0.0
    log_level: str = "INFO"
    log_format: str = "auto"
    log_slow_rpc_seconds: float = 0.5
    startup_timeout_seconds: float = 300.0
    mirror_layout: int = MIRROR_LAYOUT

    @property
    def truth_freshness_seconds(self) -> float:
        """Freshness window for heartbeat times read from Postgres.

        Postgres learns heartbeat times only at each flush, so a mitra that is fresh in
        Valkey may look up to one flush interval older there.
        """
        return self.heartbeat_stale_seconds + self.heartbeat_mirror_interval_seconds

    @property
    def beacon_local_seconds(self) -> float:
        """How long an instance reuses the beacon it fetched before asking Valkey again."""
        return min(1.0, self.beacon_ttl_seconds / 2)

    @property
    def beacon_shared_seconds(self) -> float:
        """TTL of the shared snapshot: with local reuse, never older than BEACON_TTL_SECONDS."""
        return self.beacon_ttl_seconds - self.beacon_local_seconds

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build and validate settings; raises SettingsError naming the first bad one."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for spec in fields(cls):
            name = spec.name.upper()
            raw = env.get(name)
            if raw == "" and spec.name in _EMPTY_MEANS_OFF:
                values[spec.name] = ""
                continue
            if raw is None or raw == "":
                if spec.default is MISSING:
                    raise SettingsError(f"{name} is required")
                continue
            values[spec.name] = _parse(name, raw, _PARSERS.get(spec.name, str))
        settings = cls(**values)
        settings._validate()
        return settings

    def _validate(self) -> None:
        for name in (
            "heartbeat_stale_seconds",
            "mitra_auto_offline_sweep_seconds",
            "heartbeat_mirror_interval_seconds",
            "valkey_online_mirror_sweep_seconds",
            "beacon_ttl_seconds",
            "database_timeout_seconds",
            "valkey_timeout_seconds",
            "valkey_breaker_seconds",
            "valkey_slow_seconds",
            "postgres_slow_seconds",
            "log_slow_rpc_seconds",
            "startup_timeout_seconds",
            "change_poll_seconds",
            "auth_callers_poll_seconds",
        ):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name.upper()} must be > 0, got {getattr(self, name)}")
        if not 0 < self.mass_stale_share <= 1:
            raise SettingsError(f"MASS_STALE_SHARE must be in (0, 1], got {self.mass_stale_share}")
        if self.auth_refusals_per_peer_per_second < 0:
            raise SettingsError(
                "AUTH_REFUSALS_PER_PEER_PER_SECOND must be >= 0 (0: no limit), got "
                f"{self.auth_refusals_per_peer_per_second}"
            )
        if self.mass_stale_min < 0:
            raise SettingsError(f"MASS_STALE_MIN must be >= 0, got {self.mass_stale_min}")
        for name in ("grpc_max_connection_age_seconds", "grpc_max_connection_age_grace_seconds"):
            if getattr(self, name) < 0:
                raise SettingsError(
                    f"{name.upper()} must be >= 0 (0: off), got {getattr(self, name)}"
                )
        if self.load_poll_seconds < 0:
            raise SettingsError(
                f"LOAD_POLL_SECONDS must be >= 0 (0: off), got {self.load_poll_seconds}"
            )
        for name in (
            "default_max_concurrent_sessions",
            "database_pool_size",
            "auto_offline_batch",
            "mass_stale_max_per_sweep",
            "watch_retained_changes",
            "watch_buffer_events",
            "valkey_breaker_failures",
            "watch_max_streams",
            "grpc_max_message_bytes",
            "grpc_max_concurrent_rpcs",
            "mirror_layout",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name.upper()} must be >= 1, got {getattr(self, name)}")
        if not self.database_url.startswith(("postgres://", "postgresql://")):
            raise SettingsError("DATABASE_URL must be a postgresql:// URL")
        if not self.valkey_url.startswith(("redis://", "valkey://", "rediss://", "valkeys://")):
            raise SettingsError("VALKEY_URL must be a redis:// or valkey:// URL")
        if bool(self.valkey_sentinels) != bool(self.valkey_sentinel_master):
            missing = "VALKEY_SENTINEL_MASTER" if self.valkey_sentinels else "VALKEY_SENTINELS"
            raise SettingsError(f"{missing} is required with the other Sentinel setting")
        if self.valkey_sentinels and self.valkey_cluster:
            raise SettingsError("VALKEY_SENTINELS and VALKEY_CLUSTER cannot be used together")
        for sentinel in self.valkey_sentinels:
            _split_address(sentinel, "VALKEY_SENTINELS")
        if self.valkey_cluster and urlsplit(self.valkey_url).path not in ("", "/", "/0"):
            raise SettingsError("VALKEY_URL must name database 0 (or none) with VALKEY_CLUSTER")
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", self.valkey_key_prefix):
            raise SettingsError(
                "VALKEY_KEY_PREFIX must be 1-64 characters of letters, digits, '_', '.', ':' or '-'"
            )
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError("LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
        if self.log_format not in ("auto", "json", "text"):
            raise SettingsError("LOG_FORMAT must be auto, json or text")
        if self.metrics_address:
            _split_address(self.metrics_address, "METRICS_ADDRESS")
        self._validate_security()

    @property
    def mutual_tls(self) -> bool:
        return bool(self.tls_client_ca_file)

    def _validate_security(self) -> None:
        for token in self.auth_tokens:
            if any(c.isspace() for c in token):
                raise SettingsError("AUTH_TOKENS: a token cannot contain whitespace")
        if self.auth_tokens and self.auth_callers_file:
            raise SettingsError(
                "AUTH_TOKENS and AUTH_CALLERS_FILE cannot be used together: AUTH_TOKENS gives "
                "every token access to everything, AUTH_CALLERS_FILE names each caller and its "
                "scopes; move the tokens into the file as callers (availability hash-token)"
            )
        if self.auth_callers_file:
            try:
                load_callers(self.auth_callers_file)
            except CallersError as exc:
                raise SettingsError(str(exc)) from None
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            missing = "TLS_KEY_FILE" if self.tls_cert_file else "TLS_CERT_FILE"
            raise SettingsError(f"{missing} is required with the other TLS file")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise SettingsError("TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise SettingsError(f"{name.upper()}: cannot read {path}")
        host = _split_address(self.grpc_address)
        protected = bool(self.auth_tokens or self.auth_callers_file) or self.mutual_tls
        if not _is_loopback(host) and not protected and not self.allow_insecure_network:
            raise SettingsError(
                f"GRPC_ADDRESS {self.grpc_address} is beyond loopback without AUTH_TOKENS, "
                "AUTH_CALLERS_FILE or mutual TLS (TLS_CLIENT_CA_FILE); set one, or "
                "ALLOW_INSECURE_NETWORK=true to "
                "serve it unauthenticated"
            )


_EMPTY_MEANS_OFF = frozenset({"metrics_address"})


def _parse(name: str, raw: str, parser: Callable[[str], T]) -> T:
    try:
        return parser(raw.strip())
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _tokens(raw: str) -> tuple[str, ...]:
    tokens = tuple(t.strip() for t in raw.split(",") if t.strip())
    if not tokens:
        raise ValueError("expected comma-separated tokens, got none")
    return tokens


def _float(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {raw!r}") from None


def _int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"expected an integer, got {raw!r}") from None


_BY_TYPE: dict[type, Callable[[str], Any]] = {
    bool: _bool,
    int: _int,
    float: _float,
    tuple: _tokens,
    str: str,
}
"""A setting is parsed by the type of its default (every setting with one); the rest by name."""

_PARSERS: dict[str, Callable[[str], Any]] = {
    spec.name: _BY_TYPE[type(spec.default)]
    for spec in fields(Settings)
    if spec.default is not MISSING
}
_PARSERS["log_format"] = str.lower


def _split_address(address: str, name: str = "GRPC_ADDRESS") -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SettingsError(f"{name} must be host:port, got {address!r}")
    return host.strip("[]")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
