"""Following Postgres between reads: the change table the triggers fill, heartbeat flushes,
and without triggers the load poll. What one instance takes or flushes it announces, so the
instances on other mirrors catch up too. The listener (listener.py) works mostly on a
dedicated connection, whose loss is how it learns that Postgres went away."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from uuid import UUID

import asyncpg

from ..errors import TruthUnavailable
from .connection import _UNREACHABLE, TruthBase, _Connectionish

_CLOSE_SESSION_DAYS = "SELECT availability_close_session_days()"

# Following chat_sessions without triggers (CHAT_SESSION_TRIGGERS=false, LOAD_POLL_SECONDS):
# every loaded mitra's load, an index-only scan of chat_sessions_load_idx, diffed poll by poll.
_LOADS = """
SELECT mitra_id, count(*)::int FROM chat_sessions
WHERE status IN ('active', 'pending_payment') AND mitra_id IS NOT NULL
GROUP BY mitra_id
"""

# One instance polls loads: whoever holds this session-level advisory lock on its listener
# connection, until that connection goes (then another takes it on its next poll).
_LEAD_LOAD_POLL = "SELECT pg_try_advisory_lock(hashtext('availability: load poll'))"

CHANGES_TAKEN = "availability_changes_taken"
"""The channel on which an instance says which changes it took, and on which mirror it
resynced them (listener.py); only the service's own connections notify on it."""

HEARTBEATS_FLUSHED = "availability_heartbeats_flushed"
"""The channel on which the instance that flushed heartbeats to Postgres says from which
mirror, and from which time on: instances on another mirror take those times in (listener.py)."""

_HEARTBEATS_SINCE = """
SELECT mitra_id FROM mitra_online_status
WHERE is_online AND last_heartbeat_at >= 'epoch'::timestamptz + $1 * interval '1 millisecond'
"""

_ANNOUNCED_IDS = 180
"""Ids a notification: a payload stays under Postgres's 8,000 bytes with any mirror name."""

# Mitras whose availability may have changed, noted by the triggers (one row per mitra).
# SKIP LOCKED: instances draining together take disjoint rows, and a row a writer is still
# noting (locked until it commits) waits for the next poll instead of being read too early.
# By ctid (a TID scan) whatever the statistics say: a plan that seq-scanned the table once per
# taken row held the rows' locks for seconds and stalled the writers behind them.
_TAKE_CHANGES = """
DELETE FROM availability_changes
WHERE ctid = ANY(ARRAY(SELECT ctid FROM availability_changes LIMIT $1 FOR UPDATE SKIP LOCKED))
RETURNING mitra_id, sessions
"""


class Following(TruthBase):
    async def close_session_days(self, conn: _Connectionish) -> bool:
        """Move the day counters' line on to two days ago (see dashboard.py's _SESSION_COUNTS);
        False when the chat backend's writes held chat_sessions too long to try now."""
        return bool(await conn.fetchval(_CLOSE_SESSION_DAYS))

    async def lead_load_poll(self, conn: _Connectionish) -> bool:
        """True when this connection polls loads for every instance (see _LEAD_LOAD_POLL)."""
        return bool(await conn.fetchval(_LEAD_LOAD_POLL))

    async def loads(self, conn: _Connectionish) -> dict[UUID, int]:
        """Every mitra with a load above zero, and that load."""
        return {r[0]: r[1] for r in await conn.fetch(_LOADS)}

    async def take_changes(self, limit: int, conn: _Connectionish | None = None) -> list[UUID]:
        """Up to `limit` mitras the triggers noted as changed, removed as they are taken: the
        caller resyncs them (a resync is idempotent and fenced by read time, so a change
        taken twice, or by two instances, does no harm)."""
        return (await self.take_noted(limit, conn))[0]

    async def take_noted(
        self, limit: int, conn: _Connectionish | None = None
    ) -> tuple[list[UUID], list[UUID]]:
        """take_changes, and which of those mitras' auth sessions changed (0013)."""
        if conn is not None:
            rows = await conn.fetch(_TAKE_CHANGES, limit)
        else:
            async with self._connection() as pooled:
                rows = await pooled.fetch(_TAKE_CHANGES, limit)
        return [r[0] for r in rows], [r[0] for r in rows if r[1]]

    async def announce_flush(self, mirror: str, since_ms: int) -> None:
        """After a heartbeat flush: its earliest time, for the instances on other mirrors."""
        async with self._connection() as conn:
            await conn.execute(
                "SELECT pg_notify($1, $2)", HEARTBEATS_FLUSHED, f"{mirror}\n{since_ms}"
            )

    async def heartbeats_since(self, conn: _Connectionish, since_ms: int) -> list[UUID]:
        """Online mitras whose heartbeat Postgres holds from since_ms (Valkey ms) on."""
        return [r[0] for r in await conn.fetch(_HEARTBEATS_SINCE, since_ms)]

    async def announce_changes(
        self,
        conn: _Connectionish,
        mirror: str,
        mitra_ids: Sequence[UUID],
        sessions: Sequence[UUID] = (),
    ) -> None:
        """Tell every instance which changes this one took (CHANGES_TAKEN), so those on
        another mirror resync them too; an id whose auth sessions changed is marked `!`.
        From the service's own connection: the chat backend's transactions never notify."""
        voided = set(sessions)
        ids = [f"!{i}" if i in voided else str(i) for i in mitra_ids]
        for at in range(0, len(ids), _ANNOUNCED_IDS):
            await conn.execute(
                "SELECT pg_notify($1, $2)",
                CHANGES_TAKEN,
                f"{mirror}\n{','.join(ids[at : at + _ANNOUNCED_IDS])}",
            )

    @asynccontextmanager
    async def dedicated(self) -> AsyncIterator[_Connectionish]:
        """A connection outside the pool. Losing it is how the change listener learns that
        Postgres restarted or failed over (and so reconciles)."""
        try:
            conn = await asyncpg.connect(
                self._settings.database_url, timeout=self._settings.database_timeout_seconds
            )
        except _UNREACHABLE as exc:
            raise TruthUnavailable(exc) from exc
        try:
            yield conn
        finally:
            conn.terminate()
