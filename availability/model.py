"""The domain's values, shared by the stores and the services."""

from __future__ import annotations

import enum
import math
from dataclasses import astuple, dataclass
from datetime import datetime
from uuid import UUID

LOAD_STATUSES = ("active", "pending_payment")


class Source(enum.Enum):
    """Which store answered a read."""

    CACHE = "cache"
    DATABASE = "database"


AUTO_OFFLINE = "auto_offline"
HEARTBEAT_FLUSH = "heartbeat_flush"
RECONCILE = "reconcile"
SWEEPS = (AUTO_OFFLINE, HEARTBEAT_FLUSH, RECONCILE)
"""The sweeps, by the names their leases and records carry in Valkey."""


@dataclass(frozen=True, slots=True)
class MitraState:
    """Everything the mirror holds about one mitra, as read from the truth."""

    mitra_id: UUID
    display_name: str
    active: bool
    max_concurrent_sessions: int
    online: bool
    last_heartbeat_at: datetime | None
    version: int
    load: int
    read_at: datetime
    """When Postgres read it (statement start): orders two reads of the same mitra."""


@dataclass(frozen=True, slots=True)
class Drift:
    """What one mirror write changed, by kind; for a reconcile, the drift it healed."""

    online: int = 0
    deactivated: int = 0
    load: int = 0
    profile: int = 0
    heartbeat: int = 0
    ready: int = 0
    forgotten: int = 0

    def __add__(self, other: Drift) -> Drift:
        return Drift(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def total(self) -> int:
        return sum(astuple(self))


@dataclass(frozen=True, slots=True)
class MitraStatus:
    mitra_id: UUID
    display_name: str
    online: bool
    active: bool
    fresh: bool
    load: int
    max_concurrent_sessions: int
    last_heartbeat_at: datetime | None
    source: Source

    @property
    def reachable(self) -> bool:
        return self.online and self.active and self.fresh

    @property
    def available(self) -> bool:
        return self.reachable and self.load < self.max_concurrent_sessions


@dataclass(frozen=True, slots=True)
class AvailableMitra:
    mitra_id: UUID
    display_name: str
    load: int
    max_concurrent_sessions: int


@dataclass(frozen=True, slots=True)
class AvailabilityCount:
    available: int
    online: int
    as_of: datetime
    source: Source


@dataclass(frozen=True, slots=True)
class MitraLoad:
    mitra_id: UUID
    display_name: str
    load: int


@dataclass(frozen=True, slots=True)
class SessionCounts:
    """The dashboard's counts over chat_sessions, as the original dashboard meant them."""

    active_chats: int
    pending_requests: int
    sensitive_total: int
    last_30d_total: int
    last_30d_sensitive: int

    @property
    def last_30d_percent(self) -> float:
        """One decimal, halves rounded up, as the original dashboard's Math.round did
        (Python's round() would take 6.25 to 6.2)."""
        if not self.last_30d_total:
            return 0.0
        return math.floor((self.last_30d_sensitive / self.last_30d_total) * 1000 + 0.5) / 10


@dataclass(frozen=True, slots=True)
class DashboardStats:
    counts: SessionCounts
    online_mitras: int
    customers_per_mitra: tuple[MitraLoad, ...]
    as_of: datetime
    source: Source

    def same_numbers(self, other: DashboardStats | None) -> bool:
        return (
            other is not None
            and self.counts == other.counts
            and self.online_mitras == other.online_mitras
            and self.customers_per_mitra == other.customers_per_mitra
        )


class Beat(enum.Enum):
    """What became of one heartbeat (the label of the heartbeats metric)."""

    RECORDED = "recorded"
    OFFLINE = "offline"
    DEACTIVATED = "deactivated"
    NOT_FOUND = "not_found"
    SESSION_REFUSED = "session_refused"
    """Not recorded: the caller acts for mitras and sent no live session of this one."""


class ChangeKind(enum.Enum):
    AVAILABLE = "available"
    UNAVAILABLE = "unavailable"
    LOAD_CHANGED = "load_changed"


class UnavailableReason(enum.Enum):
    OFFLINE = "offline"
    STALE = "stale"
    DEACTIVATED = "deactivated"
    FULL = "full"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class AvailabilityChange:
    """One mitra's availability changed; revisions increase by one per change, cluster-wide."""

    revision: int
    kind: ChangeKind
    mitra: AvailableMitra
    """As it is now; for UNAVAILABLE, as it was last known."""
    reason: UnavailableReason | None = None


@dataclass(frozen=True, slots=True)
class AvailabilitySnapshot:
    """Every available mitra as of a revision, least loaded first."""

    revision: int
    mitras: tuple[AvailableMitra, ...]


@dataclass(frozen=True, slots=True)
class Audit:
    """Who makes a change that is audited (availability_audit), written with the change."""

    caller: str
    request_id: str | None
    action: str
    """set_active, set_online or set_offline."""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audited change, as `availability audit` shows it."""

    at: datetime
    caller: str
    request_id: str | None
    action: str
    mitra_id: UUID
    active_before: bool
    active_after: bool
    online_before: bool
    online_after: bool
    revoked_auth_sessions: int
