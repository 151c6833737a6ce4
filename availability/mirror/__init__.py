"""The Valkey mirror: its key schema and scripts. Nobody else spells a key.

To its callers the mirror is one object over one client, one breaker and one set of keys;
it is built from one part a concern, each in its own module with the scripts it runs
(lua/): keys, connection (the client and its breaker), trust (may the mirror be read, and
seeding), mitras (what the RPCs read, and the truth's writes), heartbeats, changes (the
stream the watch follows), deployment (leases, sweeps, instances) and sessions (presence
binding's cache of auth sessions).
"""

from __future__ import annotations

from collections.abc import Iterable

from redis.asyncio.connection import Connection

from .changes import WATCH_BLOCK_SECONDS, ChangesMixin
from .connection import (
    MIRROR_ERRORS,
    Breaker,
    MirrorDown,
    MirrorMiss,
    MirrorUntrusted,
    connect_valkey,
    untrusted,
)
from .deployment import Deployment, DeploymentMixin
from .heartbeats import HeartbeatMixin, HeartbeatOutcome
from .keys import Keys
from .mitras import MitraMixin
from .sessions import SessionCheck, SessionsMixin
from .trust import LAYOUT_LIVE_SECONDS, Trust, TrustCheck

__all__ = [
    "LAYOUT_LIVE_SECONDS",
    "MIRROR_ERRORS",
    "WATCH_BLOCK_SECONDS",
    "Breaker",
    "Deployment",
    "HeartbeatOutcome",
    "Keys",
    "Mirror",
    "MirrorDown",
    "MirrorMiss",
    "MirrorUntrusted",
    "SessionCheck",
    "Trust",
    "TrustCheck",
    "connect_valkey",
    "untrusted",
]


class Mirror(MitraMixin, HeartbeatMixin, DeploymentMixin, ChangesMixin, SessionsMixin):
    """Reads and writes of the availability mirror; each call is one round trip."""

    def connections(self) -> dict[str, int]:
        """Open connections to Valkey, by state: in_use (the heartbeat's own connection
        always) and idle, over both clients' pools. Read from the metrics thread."""
        in_use = int(self._beat_connection is not None and self._beat_connection.is_connected)
        idle = 0
        for client in (self.client, self._reader):
            pool = client.connection_pool
            in_use += _connected(getattr(pool, "_in_use_connections", ()))
            idle += _connected(getattr(pool, "_available_connections", ()))
        return {"in_use": in_use, "idle": idle}

    async def close(self) -> None:
        if self._beat_connection is not None:
            await self._beat_connection.disconnect()
        await self.close_sessions()
        await self.client.aclose()
        await self._reader.aclose()


def _connected(connections: Iterable[Connection]) -> int:
    """How many are connected; a set the event loop changes while this copies it is copied
    again (as asyncio.all_tasks does)."""
    for _ in range(100):
        try:
            return sum(c.is_connected for c in list(connections))
        except RuntimeError:
            continue
    return 0
