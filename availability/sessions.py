"""Presence bound to mitras. A caller whose entry says `bind_presence = "auth_session"`
acts for mitras, not over them: each SetOnline, SetOffline and Heartbeat it makes carries
the mitra's auth session (metadata x-mitra-session), and each BatchHeartbeat one per id
(mitra_sessions), so a token taken from that backend cannot move a mitra whose session it
does not also hold.

A session counts when it is that mitra's, not revoked and not expired in auth_sessions. The
mirror vouches for the sessions Postgres found live (mirror/sessions.py), so a mitra's
heartbeats reach Postgres once a session, not once a beat; a revocation or a deactivation
(which revokes the sessions) voids the mitra's cached sessions through the change table
within the change feed's delay, and a deactivation also refuses at once on its own. When
Valkey cannot answer, Postgres does: never a pass without a check."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from uuid import UUID

from .mirror import MIRROR_ERRORS, Mirror
from .truth import Truth

log = logging.getLogger(__name__)

SESSION_HEADER = "x-mitra-session"
"""The metadata key a bound caller's unary presence calls carry the auth session in."""


class SessionGate:
    def __init__(self, mirror: Mirror, truth: Truth) -> None:
        self._mirror = mirror
        self._truth = truth
        self.checked: dict[str, int] = {}
        """Sessions checked, by who answered: cache, database, or refused."""

    async def refused(self, pairs: Sequence[tuple[UUID, str]]) -> list[bool]:
        """(mitra, session sent) pairs: True where the session is not a live session of that
        mitra (missing, malformed, another mitra's, revoked or expired)."""
        sessions = [_uuid(s) for _, s in pairs]
        asked = [i for i, s in enumerate(sessions) if s is not None]
        ok = [False] * len(pairs)
        check = None
        if asked:
            try:
                check = await self._mirror.check_sessions(
                    [(str(pairs[i][0]), str(sessions[i])) for i in asked]
                )
            except MIRROR_ERRORS as exc:
                log.debug("session check falls back to Postgres (%r)", exc)
        unvouched = []
        for at, i in enumerate(asked):
            if check is not None and check.found[at]:
                ok[i] = True
            else:
                unvouched.append((at, i))
        self._count("cache", len(asked) - len(unvouched))
        if unvouched:
            live, now = await self._truth.live_sessions(
                list({s for _, i in unvouched if (s := sessions[i]) is not None})
            )
            fill = []
            for at, i in unvouched:
                mitra, session = pairs[i][0], sessions[i]
                found = live.get(session) if session is not None else None
                if found is not None and found[0] == mitra:
                    ok[i] = True
                    fill.append((at, str(mitra), str(session), found[1]))
            self._count("database", len(fill))
            if fill and check is not None and now is not None:
                try:
                    await self._mirror.cache_sessions(check, fill, now)
                except MIRROR_ERRORS as exc:
                    log.debug("live sessions not cached (%r)", exc)
        refused = [not o for o in ok]
        self._count("refused", sum(refused))
        return refused

    def _count(self, outcome: str, count: int) -> None:
        if count:
            self.checked[outcome] = self.checked.get(outcome, 0) + count


def _uuid(value: str) -> UUID | None:
    try:
        return UUID(value) if value else None
    except ValueError:
        return None
