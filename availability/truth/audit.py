"""The audit: a row for every audited change, written in the change's own transaction so a
change whose row cannot be written does not happen; and `availability audit`'s reads."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import asyncpg

from ..errors import AuditUnwritten
from ..model import Audit, AuditRecord, MitraState
from .connection import _UNREACHABLE, TruthBase, _Connectionish, log

# An audited change reads the state before under the mitras row lock every write of it takes
# first (SetOnline, SetMitraActive), so no other write slips between "before" and the change.
_AUDIT_BEFORE = """
SELECT m.is_active, coalesce(s.is_online, false) AS is_online
FROM mitras m LEFT JOIN mitra_online_status s ON s.mitra_id = m.id
WHERE m.id = $1
FOR UPDATE OF m
"""

_AUDIT = """
INSERT INTO availability_audit (caller, request_id, action, mitra_id, active_before,
    active_after, online_before, online_after, revoked_auth_sessions)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
"""

_AUDIT_RECORDS = """
SELECT * FROM (
    SELECT id, at, caller, request_id, action, mitra_id, active_before, active_after,
        online_before, online_after, revoked_auth_sessions
    FROM availability_audit
    WHERE ($1::uuid IS NULL OR mitra_id = $1) AND ($2::timestamptz IS NULL OR at >= $2)
    ORDER BY at DESC, id DESC
    LIMIT $3
) newest ORDER BY at, id
"""


class Auditing(TruthBase):
    async def audit_records(
        self, mitra_id: UUID | None, since: datetime | None, limit: int
    ) -> list[AuditRecord]:
        """The newest `limit` audited changes (of one mitra, since a time), oldest first."""
        async with self._connection() as conn:
            rows = await conn.fetch(_AUDIT_RECORDS, mitra_id, since, limit)
        return [
            AuditRecord(
                at=r["at"],
                caller=r["caller"],
                request_id=r["request_id"],
                action=r["action"],
                mitra_id=r["mitra_id"],
                active_before=r["active_before"],
                active_after=r["active_after"],
                online_before=r["online_before"],
                online_after=r["online_after"],
                revoked_auth_sessions=r["revoked_auth_sessions"],
            )
            for r in rows
        ]

    @staticmethod
    async def _audit(
        conn: _Connectionish,
        audit: Audit,
        mitra_id: UUID,
        before: asyncpg.Record,
        after: MitraState,
        revoked: int,
    ) -> None:
        try:
            await conn.execute(
                _AUDIT,
                audit.caller,
                audit.request_id,
                audit.action,
                mitra_id,
                before["is_active"],
                after.active,
                before["is_online"],
                after.online,
                revoked,
            )
        except _UNREACHABLE:
            raise
        except asyncpg.PostgresError as exc:
            log.error(
                "%s of mitra %s by %s refused: its audit row could not be written (%s: %s)",
                audit.action,
                mitra_id,
                audit.caller,
                type(exc).__name__,
                exc,
            )
            raise AuditUnwritten(exc) from exc
