"""The chat backend's auth sessions, as presence binding asks after them (sessions.py): the
read it makes when the mirror cannot vouch for a session."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

from .connection import TruthBase

_LIVE_SESSIONS = """
SELECT id, mitra_id, expires_at, now() AS now FROM auth_sessions
WHERE id = ANY($1::uuid[]) AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
"""


class AuthSessions(TruthBase):
    async def live_sessions(
        self, session_ids: Sequence[UUID]
    ) -> tuple[dict[UUID, tuple[UUID, datetime | None]], datetime | None]:
        """Of these sessions, those live (not revoked, not expired): id -> (mitra, expiry);
        and the database's clock (None when none is live)."""
        async with self._connection() as conn:
            rows = await conn.fetch(_LIVE_SESSIONS, list(session_ids))
        live = {r["id"]: (r["mitra_id"], r["expires_at"]) for r in rows}
        return live, rows[0]["now"] if rows else None
