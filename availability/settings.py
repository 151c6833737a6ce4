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
    """Postgres DSN (`postgresql://...`)"""
    valkey_url: str
    """`redis://` or `valkey://` URL of one node, `rediss://` or `valkeys://` for TLS (with
    `VALKEY_CLUSTER`, any node of the cluster; with Sentinel, only its scheme, credentials and
    database are used)"""
    grpc_address: str = "127.0.0.1:50051"
    """listen address; beyond loopback needs `AUTH_CALLERS_FILE`, `AUTH_TOKENS`, mutual TLS or
    `ALLOW_INSECURE_NETWORK=true`"""
    heartbeat_stale_seconds: float = 90.0
    """a heartbeat older than this is stale"""
    mitra_auto_offline_sweep_seconds: float = 30.0
    """cadence of the auto-offline sweep"""
    heartbeat_mirror_interval_seconds: float = 60.0
    """cadence of the heartbeat flush to Postgres"""
    valkey_online_mirror_sweep_seconds: float = 300.0
    """cadence of the reconcile (mirror rebuilt from Postgres)"""
    valkey_cluster: bool = False
    """`true`: `VALKEY_URL` is a seed node of a Valkey (or Redis) Cluster (see
    docs/deployment.md)"""
    valkey_sentinels: tuple[str, ...] = ()
    """comma-separated sentinel `host:port` list: Sentinel mode (see docs/deployment.md); not with
    `VALKEY_CLUSTER`"""
    valkey_sentinel_master: str = ""
    """the name the sentinels monitor the master by; required with `VALKEY_SENTINELS`"""
    valkey_sentinel_password: str = field(default="", repr=False)
    """the sentinels' own password, if they have one (the data nodes' is in `VALKEY_URL`)"""
    valkey_key_prefix: str = "availability"
    """the keys' hash tag; deployments sharing a Valkey use different ones"""
    default_max_concurrent_sessions: int = 3
    """default of `mitras.max_concurrent_sessions` (applied by migrate)"""
    beacon_ttl_seconds: float = 10.0
    """age limit of the shared `CountAvailableMitras` snapshot"""
    auto_offline_batch: int = 10_000
    """most stale mitras one sweep looks at"""
    mass_stale_share: float = 0.5
    """the guard trips above this share of online mitras stale at once..."""
    mass_stale_min: int = 20
    """...and above this many"""
    mass_stale_max_per_sweep: int = 100
    """at most this many go offline per sweep while it is tripped"""
    database_pool_size: int = 10
    """Postgres connections per process"""
    watch_retained_changes: int = 10_000
    """changes kept for `WatchAvailableMitras` resumes (in the Valkey stream and in each
    instance's memory); an older `resume_revision` gets a fresh snapshot"""
    watch_buffer_events: int = 1_000
    """changes one watcher may fall behind; beyond that its backlog is dropped and it gets a
    fresh snapshot instead"""
    watch_max_streams: int = 5_000
    """watches one instance serves at once; past it a new watch gets `RESOURCE_EXHAUSTED`"""
    grpc_max_message_bytes: int = 4 * 1024 * 1024
    """largest request accepted; larger ones get `RESOURCE_EXHAUSTED`"""
    grpc_max_concurrent_rpcs: int = 10_000
    """calls (watches included) one process runs at once; past it `RESOURCE_EXHAUSTED` at once
    rather than an unbounded queue"""
    grpc_max_connection_age_seconds: float = 0.0
    """a client connection older than this (+-10 % jitter) is sent a GOAWAY: the client
    reconnects and resolves the name again, so long-lived clients of a headless Service
    reach instances added since; `300` in the Kubernetes overlay"""
    grpc_max_connection_age_grace_seconds: float = 30.0
    """after that GOAWAY, how long calls in flight (watches included) may go on before the
    connection is closed; a watch then resumes by revision"""
    database_timeout_seconds: float = 5.0
    """bound on a Postgres connect, acquire or statement"""
    valkey_timeout_seconds: float = 0.25
    """a Valkey call slower than this fails over to Postgres"""
    valkey_breaker_failures: int = 3
    """after this many Valkey calls in a row fail (refused, reset, timed out), the breaker
    opens: calls go to Postgres at once instead of each waiting out the timeout"""
    valkey_breaker_seconds: float = 1.0
    """how long it stays open before one call probes Valkey again; any answer closes it"""
    valkey_slow_seconds: float = 0.05
    """`availability status` names Valkey slow when an instance's p99 of Valkey operations over
    its last 10 s (10 operations or more) is above this (see docs/runbook.md: Valkey slow)"""
    postgres_slow_seconds: float = 0.5
    """the same for Postgres operations, the wait for a pooled connection included (see
    Runbook: Postgres slow)"""
    allow_insecure_network: bool = False
    """serve a non-loopback `GRPC_ADDRESS` with neither tokens, callers nor mutual TLS"""
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)
    """the simple mode: comma-separated bearer tokens; every call must send `authorization:
    Bearer <token>` with one of them, else `UNAUTHENTICATED`, and any of them may call
    everything. Several at once for rotation: add the new one, move the callers, drop the
    old one. Compared in constant time, every token every time; never logged. Not with
    `AUTH_CALLERS_FILE` (start-up refuses both)"""
    auth_callers_file: str = ""
    """TOML file of named callers: `[callers.NAME]` with `token_sha256`, `tls_identities`,
    `scopes` (`presence`, `read`, `load`, `admin`, `dashboard`, `*`) and limits
    (`max_in_flight`, `max_calls_per_second`, `burst`); reloaded on change and on `SIGHUP`;
    not with `AUTH_TOKENS` (see docs/security.md)"""
    auth_callers_poll_seconds: float = 1.0
    """how often each process checks the file's content for a change (SIGHUP reloads at once)"""
    auth_refusals_per_peer_per_second: float = 20.0
    """past this many calls a second with missing or unknown credentials from one peer address,
    such calls get `RESOURCE_EXHAUSTED` with `retry-after-ms` instead of `UNAUTHENTICATED`;
    known callers on the same host are never held back; `0`: no limit"""
    tls_cert_file: str = ""
    """serve TLS with this certificate chain (PEM) and `TLS_KEY_FILE`; plaintext is then
    refused"""
    tls_key_file: str = ""
    """the key of `TLS_CERT_FILE` (PEM)"""
    tls_client_ca_file: str = ""
    """mutual TLS: clients must present a certificate this CA signed; with `AUTH_CALLERS_FILE`,
    the certificate may also name the caller (`tls_identities`)"""
    grpc_reflection: bool = True
    """server reflection (what grpcurl needs to list and describe); `false` turns it off"""
    metrics_address: str = "127.0.0.1:9464"
    """where Prometheus metrics are served; empty: off (see docs/observability.md)"""
    migrate_on_start: bool = True
    """`serve` applies pending migrations first"""
    chat_session_triggers: bool = True
    """`false`: `migrate` drops every trigger of ours on `chat_sessions`, for a chat backend
    that calls `RecomputeLoad` itself (see docs/decisions/0002-trigger-and-poll-modes.md:
    what is then lost); `true` puts them back and recounts. Set it alike on every instance"""
    change_poll_seconds: float = 0.02
    """how often each instance takes the changes the triggers noted (`availability_changes`);
    load converges within about this plus a resync"""
    load_poll_seconds: float = 0.0
    """with `CHAT_SESSION_TRIGGERS=false` only: how often one instance (whoever holds an
    advisory lock; another takes over when it goes) reads every loaded mitra's load from the
    load index and resyncs those that moved, so loads still follow a backend that never
    calls `RecomputeLoad`, at a fixed cost per poll instead of one per write (see
    docs/decisions/0002-trigger-and-poll-modes.md). `0`: not at all"""
    log_level: str = "INFO"
    """`DEBUG` (a line for every call), `INFO`, `WARNING` or `ERROR`"""
    log_format: str = "auto"
    """`json` (one object a line), `text`, or `auto`: text at a terminal, JSON otherwise (see
    Logs and traces)"""
    log_slow_rpc_seconds: float = 0.5
    """a unary call slower than this is logged as a warning"""
    startup_timeout_seconds: float = 300.0
    """how long `serve` and `migrate` wait for Postgres at start-up before exiting with code 1
    (see docs/deployment.md: start in any order)"""
    mirror_layout: int = MIRROR_LAYOUT
    """the mirror's layout version, an integer (`2`); leave it unset (tests and `make chaos`
    set it to play a newer release, see docs/deployment.md: Valkey in production, rolling
    upgrades)"""

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
