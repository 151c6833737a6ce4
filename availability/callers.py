"""Named callers (AUTH_CALLERS_FILE): who may call which RPCs, how often, and with which
credentials. The file holds SHA-256 digests of bearer tokens, never tokens, and is reloaded
while the server runs (SIGHUP, or when its content changes), so tokens rotate without a
restart; a file that does not parse keeps the last good one."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
import re
import stat
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .v1 import availability_pb2 as pb
from .v1 import dashboard_pb2 as dashboard_pb

log = logging.getLogger(__name__)

_AVAILABILITY = pb.DESCRIPTOR.services_by_name["AvailabilityService"]
_DASHBOARD = dashboard_pb.DESCRIPTOR.services_by_name["DashboardService"]

ALL = "*"
SCOPE_METHODS: dict[str, frozenset[str]] = {
    "presence": frozenset({"SetOnline", "SetOffline", "Heartbeat", "BatchHeartbeat"}),
    "read": frozenset(
        {
            "GetMitraStatus",
            "IsMitraReachable",
            "FindAvailableMitras",
            "CountAvailableMitras",
            "WatchAvailableMitras",
        }
    ),
    "load": frozenset({"RecomputeLoad"}),
    "admin": frozenset({"SetMitraActive"}),
}
"""AvailabilityService's RPCs by scope. `dashboard` is every DashboardService RPC, `*` every
RPC; an RPC named by no scope (one added later) needs `*` until it is given one."""
SCOPES = frozenset({*SCOPE_METHODS, "dashboard", ALL})
ADMIN = "admin"


def scope_of(method: str) -> str:
    """The scope that grants a full method name (`/package.Service/Method`)."""
    service, _, name = method.lstrip("/").rpartition("/")
    if service == _DASHBOARD.full_name:
        return "dashboard"
    if service == _AVAILABILITY.full_name:
        for scope, names in SCOPE_METHODS.items():
            if name in names:
                return scope
    return ALL


OPEN_METHODS = ("/grpc.health.v1.Health/",)
"""Load balancers and orchestrators probe health without credentials."""
ANY_CALLER_METHODS = ("/grpc.reflection.",)
"""Reflection (what grpcurl lists and describes) needs a known caller, of any scope."""

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_CALLER_KEYS = frozenset(
    {
        "token_sha256",
        "tls_identities",
        "scopes",
        "max_in_flight",
        "max_calls_per_second",
        "burst",
        "bind_presence",
    }
)
BIND_AUTH_SESSION = "auth_session"
"""bind_presence's one value: the caller's presence calls carry the mitra's auth session."""
RETRY_IN_FLIGHT_MS = 50
"""The retry hint past max_in_flight: a slot frees when one of the caller's calls ends."""


class CallersError(ValueError):
    """AUTH_CALLERS_FILE cannot be used; the message names the file, the caller and the key,
    and never repeats a value (a misplaced token must not reach a log)."""


def hash_token(token: str) -> str:
    """The hex digest a caller's `token_sha256` lists for this bearer token."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Limits:
    """Per caller, per server process: calls running at once, and a token bucket of calls a
    second (`burst` calls at once, refilled at `max_calls_per_second`)."""

    max_in_flight: int | None = None
    max_calls_per_second: float | None = None
    burst: float = 1.0


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    scopes: frozenset[str]
    token_digests: tuple[bytes, ...] = ()
    tls_identities: frozenset[str] = frozenset()
    limits: Limits = field(default_factory=Limits)
    bind_presence: bool = False
    """Its presence calls act for a mitra: each carries one of that mitra's live auth
    sessions (sessions.py), so its token alone cannot move any other mitra."""

    def allows(self, method: str) -> bool:
        if ALL in self.scopes or method.startswith(ANY_CALLER_METHODS):
            return True
        return scope_of(method) in self.scopes

    @property
    def admin(self) -> bool:
        return ADMIN in self.scopes or ALL in self.scopes


@dataclass(frozen=True, slots=True)
class Roster:
    """One good reading of the file."""

    callers: tuple[Caller, ...]
    source: bytes = b""

    def by_token(self, token: bytes) -> Caller | None:
        """The caller whose digest the token hashes to. Every digest of every caller is
        compared, in constant time, so timing tells nothing about which nearly matched."""
        presented = hashlib.sha256(token).digest()
        found: Caller | None = None
        for caller in self.callers:
            for digest in caller.token_digests:
                if hmac.compare_digest(presented, digest):
                    found = caller
        return found

    def by_identity(self, names: Iterable[str]) -> Caller | None:
        wanted = set(names)
        for caller in self.callers:
            if caller.tls_identities & wanted:
                return caller
        return None


def parse(text: bytes, where: str = "AUTH_CALLERS_FILE") -> Roster:
    """The roster a file's content describes; CallersError naming what is wrong."""
    try:
        document = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CallersError(f"{where}: not valid TOML ({exc})") from None
    unknown = set(document) - {"callers"}
    if unknown:
        raise CallersError(
            f"{where}: unknown top-level key(s) {sorted(unknown)}; only [callers.NAME]"
        )
    table = document.get("callers")
    if not isinstance(table, dict) or not table:
        raise CallersError(f"{where}: no callers; add at least one [callers.NAME] table")
    callers = tuple(_caller(where, name, spec) for name, spec in table.items())
    _unique(where, callers, "token_sha256", lambda c: [d.hex() for d in c.token_digests])
    _unique(where, callers, "tls_identities", lambda c: sorted(c.tls_identities))
    return Roster(callers, text)


def read(path: str) -> bytes:
    """The file's content. Refused when group or others may write it, as OpenSSH refuses
    such an authorized_keys and libpq a .pgpass others may read: whoever can write it can
    make themselves any caller (a Kubernetes Secret volume, 0644 by default, passes)."""
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if mode & 0o022:
                who = " and ".join(
                    w for w, bit in (("group", 0o020), ("others", 0o002)) if mode & bit
                )
                raise CallersError(
                    f"AUTH_CALLERS_FILE {path} is writable by {who} "
                    f"(mode {stat.S_IMODE(mode):04o}); chmod go-w it"
                )
            return file.read()
    except OSError as exc:
        raise CallersError(f"AUTH_CALLERS_FILE: cannot read {path} ({exc.strerror})") from None


def load(path: str) -> Roster:
    return parse(read(path), f"AUTH_CALLERS_FILE {path}")


def _caller(where: str, name: str, spec: Any) -> Caller:
    at = f"{where}: callers.{name}"
    if not _NAME.fullmatch(name):
        raise CallersError(
            f"{where}: caller name {name[:64]!r} must be 1-64 letters, digits, '_', '.' or '-'"
        )
    if not isinstance(spec, dict):
        raise CallersError(f"{at} must be a table")
    unknown = set(spec) - _CALLER_KEYS
    if unknown:
        raise CallersError(f"{at}: unknown key(s) {sorted(unknown)}; known: {sorted(_CALLER_KEYS)}")
    digests = _strings(at, spec, "token_sha256")
    for index, digest in enumerate(digests):
        if not _DIGEST.fullmatch(digest):
            # The value is not repeated: it may be a token pasted where its digest belongs.
            raise CallersError(
                f"{at}.token_sha256[{index}] is not a SHA-256 digest (64 hex characters); "
                "list `availability hash-token` output there, never the token itself"
            )
    identities = _strings(at, spec, "tls_identities")
    if not digests and not identities:
        raise CallersError(f"{at} needs token_sha256 or tls_identities")
    scopes = _strings(at, spec, "scopes")
    if not scopes:
        raise CallersError(f"{at}.scopes is required: some of {sorted(SCOPES)}")
    for scope in scopes:
        if scope not in SCOPES:
            raise CallersError(
                f"{at}.scopes: unknown scope {scope[:32]!r}; known: {sorted(SCOPES)}"
            )
    bind = spec.get("bind_presence")
    if bind is not None and bind != BIND_AUTH_SESSION:
        raise CallersError(f"{at}.bind_presence must be {BIND_AUTH_SESSION!r} (or absent)")
    return Caller(
        name=name,
        scopes=frozenset(scopes),
        token_digests=tuple(bytes.fromhex(d) for d in digests),
        tls_identities=frozenset(identities),
        limits=_limits(at, spec),
        bind_presence=bind is not None,
    )


def _strings(at: str, spec: Mapping[str, Any], key: str) -> list[str]:
    value = spec.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise CallersError(f"{at}.{key} must be a list of non-empty strings")
    return [v.strip() for v in value]


def _limits(at: str, spec: Mapping[str, Any]) -> Limits:
    in_flight = spec.get("max_in_flight")
    rate = spec.get("max_calls_per_second")
    burst = spec.get("burst")
    if in_flight is not None and (
        isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < 1
    ):
        raise CallersError(f"{at}.max_in_flight must be an integer >= 1")
    for key, value in (("max_calls_per_second", rate), ("burst", burst)):
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise CallersError(f"{at}.{key} must be a number > 0")
    if burst is not None and rate is None:
        raise CallersError(f"{at}.burst needs max_calls_per_second")
    return Limits(
        max_in_flight=in_flight,
        max_calls_per_second=None if rate is None else float(rate),
        burst=float(burst) if burst is not None else max(1.0, float(rate or 1)),
    )


def _unique(where: str, callers: Iterable[Caller], key: str, values: Any) -> None:
    seen: dict[str, str] = {}
    for caller in callers:
        for value in values(caller):
            if value in seen:
                shown = "a digest" if key == "token_sha256" else repr(value)
                raise CallersError(
                    f"{where}: {shown} is listed under {key} of both callers.{seen[value]} "
                    f"and callers.{caller.name}"
                )
            seen[value] = caller.name


class _Budget:
    __slots__ = ("in_flight", "stamp", "tokens")

    def __init__(self, burst: float) -> None:
        self.in_flight = 0
        self.tokens = burst
        self.stamp = time.monotonic()


class Limiter:
    """Each caller's in-flight calls and call rate in this process. Budgets are kept by name,
    so a reload that changes a limit applies it to the calls already counted."""

    def __init__(self) -> None:
        self._budgets: dict[str, _Budget] = {}

    def admit(self, caller: Caller) -> int:
        """0 when the call may start (end it with `release`); else the retry hint in ms."""
        limits = caller.limits
        if limits.max_in_flight is None and limits.max_calls_per_second is None:
            return 0
        budget = self._budgets.get(caller.name)
        if budget is None:
            budget = self._budgets[caller.name] = _Budget(limits.burst)
        if limits.max_in_flight is not None and budget.in_flight >= limits.max_in_flight:
            return RETRY_IN_FLIGHT_MS
        rate = limits.max_calls_per_second
        if rate is not None:
            now = time.monotonic()
            budget.tokens = min(limits.burst, budget.tokens + (now - budget.stamp) * rate)
            budget.stamp = now
            if budget.tokens < 1.0:
                return max(1, math.ceil((1.0 - budget.tokens) / rate * 1000))
            budget.tokens -= 1.0
        budget.in_flight += 1
        return 0

    def release(self, caller: Caller) -> None:
        budget = self._budgets.get(caller.name)
        if budget is not None and budget.in_flight > 0:
            budget.in_flight -= 1


class Callers:
    """The current roster of AUTH_CALLERS_FILE, reloaded on `reload()` (SIGHUP) and by `watch`
    when the file's content changes. A reading that fails is logged and the last good roster
    stays in force."""

    def __init__(self, path: str, roster: Roster | None = None) -> None:
        self.path = path
        self.roster = roster if roster is not None else load(path)
        self.limiter = Limiter()
        self.reloads = 0
        self.failed_reloads = 0
        self._failed_source: bytes | None = None
        self._reloaded = asyncio.Event()

    async def next_reload(self) -> Roster:
        """Wait for the next roster put in force; it."""
        await self._reloaded.wait()
        return self.roster

    @property
    def failing(self) -> bool:
        """The file's last reading failed: the roster in force is older than the file."""
        return self._failed_source is not None

    def reload(self, *, forced: bool = True) -> bool:
        """Read the file again; True when a new roster is in force. Unchanged content is not
        parsed again, and the error of a bad file is logged once per content (or on each
        forced reload, SIGHUP), not every poll."""
        try:
            text = read(self.path)
        except CallersError as exc:
            if forced or self._failed_source != b"":
                log.error("%s; keeping the %d callers loaded", exc, len(self.roster.callers))
                self.failed_reloads += 1
            self._failed_source = b""
            return False
        if text == self.roster.source or (text == self._failed_source and not forced):
            return False
        try:
            roster = parse(text, f"AUTH_CALLERS_FILE {self.path}")
        except CallersError as exc:
            self._failed_source = text
            self.failed_reloads += 1
            log.error("%s; keeping the %d callers loaded before", exc, len(self.roster.callers))
            return False
        self._failed_source = None
        self.roster = roster
        self.reloads += 1
        self._reloaded.set()
        self._reloaded = asyncio.Event()
        log.info(
            "AUTH_CALLERS_FILE %s reloaded: %d callers (%s)",
            self.path,
            len(roster.callers),
            ", ".join(c.name for c in roster.callers),
        )
        return True

    async def watch(self, every: float) -> None:
        """Poll the file's content (cheap: a small file), so a change lands within `every`
        seconds however it was made: edited in place, renamed over, a symlink swapped."""
        while True:
            await asyncio.sleep(every)
            self.reload(forced=False)
