"""Presence binding's cache of auth sessions (sessions.py decides; this only remembers).

A session Postgres found live for a mitra is cached under its own key until it expires, its
value naming the mitra, the epoch of that mitra's sessions and the mirror's marker. A change
to a mitra's sessions in Postgres (a revocation, a deactivation, a delete: the change table
notes it) moves the epoch on, which voids every cached session of that mitra at once; a new
seed (a new marker) voids them all. A fill carries the epoch its check read and is dropped
if it moved, so a revocation racing a check is never covered up by the check's late write.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import redis.asyncio as redis

from ..settings import Settings
from .base import MirrorBase

_MIRROR_KEYS = 22
"""How many keys the prelude names (keys.all()); the scripts' own keys follow them."""

ALL_SESSIONS = "*"

CACHE_AT_MOST_MS = 86_400_000
"""A session without an expiry is looked up again in Postgres once a day."""


class SessionCheck:
    """What a check found: per pair whether the cache vouches for it, and what a fill of
    the pairs it did not must present."""

    __slots__ = ("epochs", "found", "marker")

    def __init__(self, found: list[bool], epochs: list[str], marker: str) -> None:
        self.found, self.epochs, self.marker = found, epochs, marker


class SessionsMixin(MirrorBase):
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        super().__init__(client, settings)
        assert len(self._all_keys) == _MIRROR_KEYS, "the session scripts index KEYS past these"
        self._check_sessions = self._register("sessions")
        self._cache_sessions = self._register("cache_sessions")
        self._forget_sessions = self._register("forget_sessions")

    async def check_sessions(self, pairs: Sequence[tuple[str, str]]) -> SessionCheck | None:
        """(mitra id, session id) pairs: which the cache vouches for; None while the mirror
        is unseeded (then Postgres alone answers)."""
        keys = [self.keys.session_epochs, *(self.keys.session(s) for _, s in pairs)]
        reply = await self._run_with(self._check_sessions, keys, [m for m, _ in pairs])
        if len(reply) == 1:
            return None
        n = len(pairs)
        return SessionCheck(
            [bool(int(v)) for v in reply[:n]],
            [_text(v) for v in reply[n : 2 * n]],
            _text(reply[2 * n]),
        )

    async def cache_sessions(
        self,
        check: SessionCheck,
        entries: Sequence[tuple[int, str, str, datetime | None]],
        now: datetime,
    ) -> int:
        """Cache live sessions: (index of the pair in the check, mitra, session, expiry)."""
        keys = [self.keys.session_epochs]
        args: list[object] = [check.marker]
        horizon = now.timestamp() * 1000 + CACHE_AT_MOST_MS
        for index, mitra, session, expires in entries:
            until = horizon if expires is None else min(horizon, expires.timestamp() * 1000)
            if until <= now.timestamp() * 1000 + 1000:
                continue  # about to expire: not worth caching
            keys.append(self.keys.session(session))
            args += [mitra, check.epochs[index], int(until)]
        if len(keys) == 1:
            return 0
        return int(await self._run_with(self._cache_sessions, keys, args))

    async def forget_sessions(self, mitra_ids: Sequence[str]) -> None:
        """These mitras' sessions changed in Postgres: none of theirs is vouched for now.
        ALL_SESSIONS (`*`): nobody's (changes may have been missed)."""
        if mitra_ids:
            await self._run_with(self._forget_sessions, [self.keys.session_epochs], mitra_ids)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
