"""The contract's reads and writes: mitras' states, SetOnline, SetOffline and SetMitraActive
(each one statement, its audit row included), and what Postgres answers when Valkey cannot:
heartbeats, finds and counts; with the sweeps' writes, auto-offline and the heartbeat flush."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from ..errors import AuditUnwritten, MitraDeactivated, MitraNotFound
from ..model import Audit, AvailabilityCount, AvailableMitra, Beat, MitraState, Source
from .audit import Auditing
from .connection import log

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

# Each write is one statement, so one round trip, its audit row included (the function of
# migration 0014, which fails the statement with AVAUD when the row cannot be written). `m`
# locks the mitras row, which orders the write with a deactivation; `was` locks the mitra's
# status row, so what it read is what the write changed: the event's and the audit's
# "before". The upsert reads `was`, so `was` runs first (a row this very statement had
# already updated would be invisible to its lock). The answer is the state after the write.
# Its read time, which fences the mirror write (an older read never overwrites a newer one),
# is taken once the locks are held: clock_timestamp() in the final select, not the
# statement's start, or a resync that read the old row while this one waited for its lock
# would count as newer and keep the old state in the mirror (a deactivated mitra served).
_WAS = """
was AS (
    SELECT s.is_online, s.last_heartbeat_at, s.version FROM mitra_online_status s
    WHERE s.mitra_id = $1 AND EXISTS (SELECT FROM m)
    FOR UPDATE
)"""

_WRITTEN = f"""
SELECT m.id, coalesce(m.display_name, '') AS display_name, m.is_active,
    m.max_concurrent_sessions,
    coalesce(up.is_online, was.is_online, false) AS is_online,
    coalesce(up.last_heartbeat_at, was.last_heartbeat_at) AS last_heartbeat_at,
    coalesce(up.version, was.version, 0) AS version,
    (SELECT count(*) FROM chat_sessions c WHERE c.mitra_id = m.id AND {_LOAD})::int AS load,
    clock_timestamp() AS read_at, now() AS now,
    coalesce(was.is_online, false) AS was_online,
    (SELECT count(*) FROM audited) AS audited
FROM m LEFT JOIN was ON true LEFT JOIN up ON true
"""

_AUDITED = """
audited AS (
    SELECT availability_audit_row($2::text, $3::text, {action}::text, m.id, {active_before},
        m.is_active,
        coalesce(was.is_online, false), coalesce(up.is_online, was.is_online, false),
        {revoked})
    FROM m LEFT JOIN was ON true LEFT JOIN up ON true
    WHERE $2::text IS NOT NULL {also}
)"""

_SET_ONLINE = f"""
WITH m AS (
    SELECT id, display_name, is_active, max_concurrent_sessions FROM mitras
    WHERE id = $1 FOR UPDATE
),
{_WAS},
up AS (
    INSERT INTO mitra_online_status AS s
        (mitra_id, is_online, last_heartbeat_at, updated_at, version)
    SELECT id, true, now(), now(), 1 FROM m WHERE is_active AND (SELECT count(*) FROM was) >= 0
    ON CONFLICT (mitra_id) DO UPDATE
        SET is_online = true, last_heartbeat_at = now(), updated_at = now(),
            version = s.version + 1
    RETURNING s.is_online, s.last_heartbeat_at, s.version
),
{
    _AUDITED.format(
        action="'set_online'", active_before="m.is_active", revoked="0", also="AND m.is_active"
    )
}
{_WRITTEN}
"""

# Offline, or (SetMitraActive) active or not: online stays only while active.
_UPSERT_OFFLINE = """
up AS (
    INSERT INTO mitra_online_status AS s (mitra_id, is_online, updated_at, version)
    SELECT id, false, now(), 1 FROM m WHERE (SELECT count(*) FROM was) >= 0
    ON CONFLICT (mitra_id) DO UPDATE
        SET is_online = s.is_online AND {keep}, updated_at = now(), version = s.version + 1
    RETURNING s.is_online, s.last_heartbeat_at, s.version
)"""

_SET_OFFLINE = f"""
WITH m AS (
    SELECT id, display_name, is_active, max_concurrent_sessions FROM mitras
    WHERE id = $1 FOR UPDATE
),
{_WAS},
{_UPSERT_OFFLINE.format(keep="false")},
{_AUDITED.format(action="'set_offline'", active_before="m.is_active", revoked="0", also="")}
{_WRITTEN}
"""

# `before` locks the row first (the audit's active_before); the deactivation revokes the
# mitra's live auth sessions in the same statement.
_SET_ACTIVE = f"""
WITH before AS (SELECT id, is_active FROM mitras WHERE id = $1 FOR UPDATE),
m AS (
    UPDATE mitras SET is_active = $4 FROM before WHERE mitras.id = before.id
    RETURNING mitras.id, mitras.display_name, mitras.is_active,
        mitras.max_concurrent_sessions, before.is_active AS was_active
),
{_WAS},
revoked AS (
    UPDATE auth_sessions SET revoked_at = now()
    WHERE mitra_id = $1 AND NOT $4 AND EXISTS (SELECT FROM m) AND revoked_at IS NULL
      AND (expires_at IS NULL OR expires_at > now())
    RETURNING 1
),
{_UPSERT_OFFLINE.format(keep="$4")},
{
    _AUDITED.format(
        action="'set_active'",
        active_before="m.was_active",
        revoked="(SELECT count(*) FROM revoked)::int",
        also="",
    )
}
{_WRITTEN.replace("AS audited", "AS audited, (SELECT count(*) FROM revoked)::int AS revoked")}
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
        row = await self._write(_SET_ONLINE, mitra_id, audit)
        if not row["is_active"]:
            raise MitraDeactivated(mitra_id)
        return _written(row)

    async def set_offline(self, mitra_id: UUID, audit: Audit | None = None) -> Written:
        return _written(await self._write(_SET_OFFLINE, mitra_id, audit))

    async def set_active(self, mitra_id: UUID, active: bool, audit: Audit | None = None) -> Written:
        """Activation; a deactivation revokes the mitra's auth sessions and takes it
        offline, in the same statement."""
        row = await self._write(_SET_ACTIVE, mitra_id, audit, active)
        return _written(row, row["revoked"])

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
        self, statement: str, mitra_id: UUID, audit: Audit | None, *more: object
    ) -> asyncpg.Record:
        """One write, one statement (one round trip), with its audit row when audited."""
        caller, request_id = (audit.caller, audit.request_id) if audit else (None, None)
        try:
            async with self._connection() as conn:
                row = await conn.fetchrow(statement, mitra_id, caller, request_id, *more)
        except asyncpg.PostgresError as exc:
            if exc.sqlstate != _AUDIT_UNWRITTEN or audit is None:
                raise
            log.error(
                "%s of mitra %s by %s refused: its audit row could not be written (%s)",
                audit.action,
                mitra_id,
                audit.caller,
                exc,
            )
            raise AuditUnwritten(exc) from exc
        if row is None:
            raise MitraNotFound(mitra_id)
        return row


def _written(row: asyncpg.Record, revoked: int = 0) -> Written:
    return Written(_state(row), row["now"], revoked, row["was_online"])


_AUDIT_UNWRITTEN = "AVAUD"
"""The SQLSTATE availability_audit_row (migration 0014) fails a write with."""


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
