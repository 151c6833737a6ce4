"""The domain's values, shared by the stores and the services."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

LOAD_STATUSES = ("active", "pending_payment")


class Source(enum.Enum):
    """Which store answered a read."""

    CACHE = "cache"
    DATABASE = "database"


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
