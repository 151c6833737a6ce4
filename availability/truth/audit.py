"""The audit: a row for every audited change, written in the change's own transaction so a
change whose row cannot be written does not happen; and `availability audit`'s reads."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from ..model import AuditRecord
from .connection import TruthBase

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
