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
_SESSION_CHARS = 64
"""Longer than any spelling of a UUID: not a session, and not worth a lookup."""
"""The metadata key a bound caller's unary presence calls carry the auth session in."""


class SessionGate:
    def __init__(self, mirror: Mirror, truth: Truth) -> None:
        self._mirror = mirror
        self._truth = truth
        self.checked: dict[str, int] = {}
        """Sessions checked, by who answered: cache, database, or refused."""

    async def refused(self, pairs: Sequence[tuple[UUID, str]]) -> list[bool]:
        """(mitra, session sent) pairs: True where the session is not a live session of that
        mitra (missing, malformed, another mitra's, revoked or expired). The mirror is asked
        with the sessions as sent (the cache is keyed by them), Postgres only about those it
        does not vouch for."""
        asked = [i for i, (_, s) in enumerate(pairs) if 0 < len(s) <= _SESSION_CHARS]
        refused = [True] * len(pairs)
        check = None
        if asked:
            try:
                check = await self._mirror.check_sessions(
                    [(str(pairs[i][0]), pairs[i][1]) for i in asked]
                )
            except MIRROR_ERRORS as exc:
                log.debug("session check falls back to Postgres (%r)", exc)
        unvouched = range(len(asked)) if check is None else sorted(check.unvouched)
        for at in range(len(asked)) if check is not None else ():
            refused[asked[at]] = False
        for at in unvouched:
            refused[asked[at]] = True
        self._count("cache", len(asked) - len(unvouched))
        parsed = {at: session for at in unvouched if (session := _uuid(pairs[asked[at]][1]))}
        if parsed:
            live, now = await self._truth.live_sessions(list(set(parsed.values())))
            fill = []
            for at, session in parsed.items():
                mitra = pairs[asked[at]][0]
                found = live.get(session)
                if found is not None and found[0] == mitra:
                    refused[asked[at]] = False
                    fill.append((at, str(mitra), pairs[asked[at]][1], found[1]))
            self._count("database", len(fill))
            if fill and check is not None and now is not None:
                try:
                    await self._mirror.cache_sessions(check, fill, now)
                except MIRROR_ERRORS as exc:
                    log.debug("live sessions not cached (%r)", exc)
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
