"""The contract's reads and writes: mitras' states, SetOnline, SetOffline and SetMitraActive
(each in one transaction with its audit row), and what Postgres answers when Valkey cannot:
heartbeats, finds and counts; with the sweeps' writes, auto-offline and the heartbeat flush."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from ..errors import MitraDeactivated, MitraNotFound
from ..model import Audit, AvailabilityCount, AvailableMitra, Beat, MitraState, Source
from .audit import _AUDIT_BEFORE, Auditing
from .connection import _Connectionish

_LOAD = "c.status IN ('active', 'pending_payment')"

# Every column of a MitraState but load and read time, which each query derives its own way.
_STATE_COLUMNS = """
    m.id, coalesce(m.display_name, '') AS display_name, m.is_active,
    m.max_concurrent_sessions, coalesce(s.is_online, false) AS is_online,
    s.last_heartbeat_at, coalesce(s.version, 0) AS version
"""

_STATES_BY_ID = f"""
SELECT {_STATE_COLUMNS},
    (SELECT count(*) FROM chat_sessions c WHERE c.mitra_id = m.id AND {_LOAD})::int AS load,
    statement_timestamp() AS read_at
FROM mitras m LEFT JOIN mitra_online_status s ON s.mitra_id = m.id
WHERE m.id = ANY($1::uuid[])
"""

_ALL_STATES = f"""
SELECT {_STATE_COLUMNS}, coalesce(l.load, 0)::int AS load, now() AS read_at
FROM mitras m
LEFT JOIN mitra_online_status s ON s.mitra_id = m.id
LEFT JOIN (
    SELECT mitra_id, count(*) AS load FROM chat_sessions
    WHERE status IN ('active', 'pending_payment') AND mitra_id IS NOT NULL
    GROUP BY mitra_id
) l ON l.mitra_id = m.id
"""

# `was` locks the mitra's status row, so what it read is what the change changed (the
# attributable event's "before"), as the audit's before is. The upsert reads it, so it runs
# first: a row this very statement had already updated would be invisible to its lock.
_SET_ONLINE = """
WITH m AS (SELECT id, is_active FROM mitras WHERE id = $1 FOR UPDATE),
was AS (
    SELECT s.is_online FROM mitra_online_status s
    WHERE s.mitra_id = $1 AND EXISTS (SELECT FROM m)
    FOR UPDATE
),
up AS (
    INSERT INTO mitra_online_status AS s
        (mitra_id, is_online, last_heartbeat_at, updated_at, version)
    SELECT id, true, now(), now(), 1 FROM m WHERE is_active AND (SELECT count(*) FROM was) >= 0
    ON CONFLICT (mitra_id) DO UPDATE
        SET is_online = true, last_heartbeat_at = now(), updated_at = now(),
            version = s.version + 1
    RETURNING 1
)
SELECT m.is_active, (SELECT count(*) FROM up) AS written,
    coalesce((SELECT is_online FROM was), false) AS was_online
FROM m
"""

_UPSERT_STATUS = """
WITH was AS (SELECT is_online FROM mitra_online_status WHERE mitra_id = $1 FOR UPDATE),
up AS (
    INSERT INTO mitra_online_status AS s (mitra_id, is_online, updated_at, version)
    SELECT $1, false, now(), 1 WHERE (SELECT count(*) FROM was) >= 0
    ON CONFLICT (mitra_id) DO UPDATE
        SET is_online = s.is_online AND $2, updated_at = now(), version = s.version + 1
    RETURNING 1
)
SELECT coalesce((SELECT is_online FROM was), false) AS was_online, (SELECT count(*) FROM up)
"""

_REVOKE_AUTH_SESSIONS = """
UPDATE auth_sessions SET revoked_at = now()
WHERE mitra_id = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
"""

# The heartbeats Valkey cannot take, guarded and recorded in one statement. The rows are
# locked in id order, so two batches that share mitras cannot deadlock.
_RECORD_HEARTBEATS = """
WITH m AS (
    SELECT m.id, m.is_active FROM mitras m WHERE m.id = ANY($1::uuid[])
),
locked AS (
    SELECT s.mitra_id FROM mitra_online_status s JOIN m ON m.id = s.mitra_id
    WHERE m.is_active AND s.is_online
    ORDER BY s.mitra_id
    FOR UPDATE OF s
),
hb AS (
    UPDATE mitra_online_status s SET last_heartbeat_at = now()
    FROM locked WHERE s.mitra_id = locked.mitra_id AND s.is_online
    RETURNING s.mitra_id
)
SELECT m.id, m.is_active, hb.mitra_id IS NOT NULL AS online
FROM m LEFT JOIN hb ON hb.mitra_id = m.id
"""

_AVAILABLE_FROM = f"""
FROM mitra_online_status s
JOIN mitras m ON m.id = s.mitra_id
CROSS JOIN LATERAL (
    SELECT count(*)::int AS load FROM chat_sessions c WHERE c.mitra_id = m.id AND {_LOAD}
) l
WHERE s.is_online
"""

_IS_AVAILABLE = """
m.is_active AND s.last_heartbeat_at >= now() - make_interval(secs => $1)
AND l.load < m.max_concurrent_sessions
"""

_FIND_AVAILABLE = f"""
SELECT m.id, coalesce(m.display_name, '') AS display_name, l.load, m.max_concurrent_sessions
{_AVAILABLE_FROM} AND {_IS_AVAILABLE} AND m.id <> ALL($2::uuid[])
ORDER BY l.load, m.id
LIMIT $3
"""

_COUNT_AVAILABLE = f"""
SELECT count(*) FILTER (WHERE {_IS_AVAILABLE})::int AS available,
       count(*)::int AS online, now() AS as_of
{_AVAILABLE_FROM}
"""

_NOW = "SELECT now()"

_TAKE_OFFLINE = """
WITH fence AS (
    INSERT INTO sweep_fences AS f (name, epoch) VALUES ($2, $3)
    ON CONFLICT (name) DO UPDATE SET epoch = greatest(f.epoch, excluded.epoch)
    RETURNING epoch
)
UPDATE mitra_online_status s
SET is_online = false, updated_at = now(), version = s.version + 1
FROM fence
WHERE fence.epoch = $3 AND s.mitra_id = ANY($1::uuid[]) AND s.is_online
  AND (s.last_heartbeat_at IS NULL OR s.last_heartbeat_at < now() - make_interval(secs => $4))
RETURNING s.mitra_id
"""

_FLUSH_HEARTBEATS = """
UPDATE mitra_online_status s
SET last_heartbeat_at = v.at
FROM (
    SELECT mitra_id, 'epoch'::timestamptz + ms * interval '1 millisecond' AS at
    FROM unnest($1::uuid[], $2::bigint[]) AS u (mitra_id, ms)
) v
WHERE s.mitra_id = v.mitra_id
  AND (s.last_heartbeat_at IS NULL OR s.last_heartbeat_at < v.at)
"""


def _state(row: asyncpg.Record) -> MitraState:
    return MitraState(
        mitra_id=row["id"],
        display_name=row["display_name"],
        active=row["is_active"],
        max_concurrent_sessions=row["max_concurrent_sessions"],
        online=row["is_online"],
        last_heartbeat_at=row["last_heartbeat_at"],
        version=row["version"],
        load=row["load"],
        read_at=row["read_at"],
    )


class Contract(Auditing):
    """On Auditing: an audited write adds its audit row inside its own transaction."""

    async def states(self, mitra_ids: Sequence[UUID]) -> list[MitraState]:
        async with self._connection() as conn:
            return [_state(r) for r in await conn.fetch(_STATES_BY_ID, list(mitra_ids))]

    async def state(self, mitra_id: UUID) -> tuple[MitraState, datetime]:
        """One mitra's state and the database's clock, for answers built from the truth."""
        async with self._connection() as conn, conn.transaction(readonly=True):
            rows = await conn.fetch(_STATES_BY_ID, [mitra_id])
            now = await conn.fetchval(_NOW)
        if not rows:
            raise MitraNotFound(mitra_id)
        return _state(rows[0]), now

    async def all_states(self, batch: int = 5000) -> AsyncIterator[list[MitraState]]:
        """Every mitra's state in batches, from one consistent snapshot."""
        async with (
            self._connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            cursor = await conn.cursor(_ALL_STATES)
            while rows := await cursor.fetch(batch):
                yield [_state(r) for r in rows]

    async def set_online(self, mitra_id: UUID, audit: Audit | None = None) -> Written:
        """Online, and counted as a heartbeat; the mitras row lock orders it with deactivation."""

        async def change(conn: _Connectionish) -> tuple[int, bool]:
            row = await conn.fetchrow(_SET_ONLINE, mitra_id)
            if row is None:
                raise MitraNotFound(mitra_id)
            if not row["is_active"]:
                raise MitraDeactivated(mitra_id)
            return 0, row["was_online"]

        return await self._write(mitra_id, change, audit)

    async def set_offline(self, mitra_id: UUID, audit: Audit | None = None) -> Written:
        async def change(conn: _Connectionish) -> tuple[int, bool]:
            if not await conn.fetchval("SELECT true FROM mitras WHERE id = $1", mitra_id):
                raise MitraNotFound(mitra_id)
            return 0, await conn.fetchval(_UPSERT_STATUS, mitra_id, False)

        return await self._write(mitra_id, change, audit)

    async def set_active(self, mitra_id: UUID, active: bool, audit: Audit | None = None) -> Written:
        async def change(conn: _Connectionish) -> tuple[int, bool]:
            found = await conn.fetchval(
                "UPDATE mitras SET is_active = $2 WHERE id = $1 RETURNING true", mitra_id, active
            )
            if not found:
                raise MitraNotFound(mitra_id)
            revoked = 0
            if not active:
                revoked = _row_count(await conn.execute(_REVOKE_AUTH_SESSIONS, mitra_id))
            return revoked, await conn.fetchval(_UPSERT_STATUS, mitra_id, active)

        return await self._write(mitra_id, change, audit)

    async def take_offline(self, mitra_ids: Sequence[UUID], fence: str, epoch: int) -> list[UUID]:
        """The auto-offline sweep's write, refused when a newer lease epoch has written. A
        mitra whose heartbeat Postgres itself recorded as fresh stays online: its app reached
        an instance that could not write the mirror (an outage, a reseed, another version
        during a rolling upgrade). Flushed times lag the mirror's, so they never save one."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                _TAKE_OFFLINE,
                list(mitra_ids),
                fence,
                epoch,
                self._settings.heartbeat_stale_seconds,
            )
        return [r["mitra_id"] for r in rows]

    async def flush_heartbeats(self, heartbeats: Mapping[str, int]) -> int:
        """Mitra id (text: asyncpg encodes it to binary without a Python UUID) -> Valkey ms.
        One statement for the whole batch; it never moves a time backwards, so running it
        twice, late, or from two instances changes nothing more."""
        async with self._connection() as conn:
            status = await conn.execute(
                _FLUSH_HEARTBEATS, list(heartbeats.keys()), list(heartbeats.values())
            )
        return _row_count(status)

    async def record_heartbeats(self, mitra_ids: Sequence[UUID]) -> list[Beat]:
        """The heartbeats when Valkey cannot take them: one beat an id, in order."""
        async with self._connection() as conn:
            rows = await conn.fetch(_RECORD_HEARTBEATS, mitra_ids)
        found = {
            r["id"]: Beat.DEACTIVATED
            if not r["is_active"]
            else Beat.RECORDED
            if r["online"]
            else Beat.OFFLINE
            for r in rows
        }
        return [found.get(i, Beat.NOT_FOUND) for i in mitra_ids]

    async def find_available(self, limit: int, exclude: Sequence[UUID]) -> list[AvailableMitra]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                _FIND_AVAILABLE, self._settings.truth_freshness_seconds, list(exclude), limit
            )
        return [
            AvailableMitra(r["id"], r["display_name"], r["load"], r["max_concurrent_sessions"])
            for r in rows
        ]

    async def count_available(self) -> AvailabilityCount:
        async with self._connection() as conn:
            row = await conn.fetchrow(_COUNT_AVAILABLE, self._settings.truth_freshness_seconds)
        assert row is not None
        return AvailabilityCount(row["available"], row["online"], row["as_of"], Source.DATABASE)

    async def _write(
        self,
        mitra_id: UUID,
        change: Callable[[_Connectionish], Awaitable[tuple[int, bool]]],
        audit: Audit | None = None,
    ) -> Written:
        """One write in one transaction, with its audit row when audited; `change` returns
        the auth sessions it revoked and whether the mitra was online before."""
        async with self._connection() as conn, conn.transaction():
            before = await conn.fetchrow(_AUDIT_BEFORE, mitra_id) if audit else None
            revoked, was_online = await change(conn)
            rows = await conn.fetch(_STATES_BY_ID, [mitra_id])
            now = await conn.fetchval(_NOW)
            if audit is not None and before is not None and rows:
                await self._audit(conn, audit, mitra_id, before, _state(rows[0]), revoked)
        if not rows:
            raise MitraNotFound(mitra_id)
        return Written(_state(rows[0]), now, revoked, was_online)


@dataclass(frozen=True, slots=True)
class Written:
    """What a write of a mitra's state left: the state, the database's clock, the auth
    sessions it revoked, and whether the mitra was online before it (its event's before)."""

    state: MitraState
    now: datetime
    revoked: int
    was_online: bool


def _row_count(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])
