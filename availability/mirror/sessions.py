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
from typing import Any

import redis.asyncio as redis
from redis.asyncio.connection import Connection
from redis.exceptions import NoScriptError

from ..settings import Settings
from .base import MirrorBase

_MIRROR_KEYS = 22
"""How many keys the prelude names (keys.all()); the scripts' own keys follow them."""

ALL_SESSIONS = "*"

_IDLE_CONNECTIONS = 4

CACHE_AT_MOST_MS = 86_400_000
"""A session without an expiry is looked up again in Postgres once a day."""


class SessionCheck:
    """What a check found: the pairs the cache does not vouch for (by position) with the
    epoch each one's mitra is at, and the mirror's marker digest: what a fill must present."""

    __slots__ = ("marker", "unvouched")

    def __init__(self, unvouched: dict[int, str], marker: str) -> None:
        self.unvouched, self.marker = unvouched, marker


class SessionsMixin(MirrorBase):
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        super().__init__(client, settings)
        assert len(self._all_keys) == _MIRROR_KEYS, "the session scripts index KEYS past these"
        self._check_sessions = self._register("sessions")
        self._idle: list[Connection] = []
        """Connections the check packs its command on by hand (as heartbeats do): the
        client's packing costs more than the check's work, a thousand arguments a batch."""
        self._check_keys = [
            *(k.encode() for k in self._all_keys),
            self.keys.session_epochs.encode(),
        ]
        self._session_prefix = self.keys.session("").encode()
        self._cache_sessions = self._register("cache_sessions")
        self._forget_sessions = self._register("forget_sessions")

    async def check_sessions(self, pairs: Sequence[tuple[str, str]]) -> SessionCheck | None:
        """(mitra id, session id) pairs: which the cache does not vouch for; None while the
        mirror is unseeded (then Postgres alone answers)."""
        reply = await self._packed_check(pairs)
        if reply[0] in (b"unseeded", "unseeded"):
            return None
        unvouched = {int(reply[at]) - 1: _text(reply[at + 1]) for at in range(1, len(reply), 2)}
        return SessionCheck(unvouched, _text(reply[0]))

    async def cache_sessions(
        self,
        check: SessionCheck,
        entries: Sequence[tuple[int, str, str, datetime | None]],
        now: datetime,
    ) -> int:
        """Cache live sessions: (position of the pair in the check, mitra, session, expiry)."""
        keys = [self.keys.session_epochs]
        args: list[object] = [check.marker]
        horizon = now.timestamp() * 1000 + CACHE_AT_MOST_MS
        for index, mitra, session, expires in entries:
            until = horizon if expires is None else min(horizon, expires.timestamp() * 1000)
            if until <= now.timestamp() * 1000 + 1000:
                continue  # about to expire: not worth caching
            keys.append(self.keys.session(session))
            args += [mitra, check.unvouched[index], int(until)]
        if len(keys) == 1:
            return 0
        return int(await self._run_with(self._cache_sessions, keys, args))

    async def _packed_check(self, pairs: Sequence[tuple[str, str]]) -> list[Any]:
        """The check's script call, its command packed by hand, on a connection of its own
        (taken from an idle list, made when none is idle, dropped on any error)."""
        self.breaker.check()
        fixed, prefix = self._check_keys, self._session_prefix
        parts = [
            b"EVALSHA",
            self._check_sessions.sha.encode(),
            b"%d" % (len(fixed) + len(pairs)),
            *fixed,
            *[prefix + s.encode() for _, s in pairs],
            *[m.encode() for m, _ in pairs],
        ]
        packed = b"*%d\r\n" % len(parts) + b"".join([b"$%d\r\n%s\r\n" % (len(p), p) for p in parts])
        connection = self._idle.pop() if self._idle else None
        try:
            if connection is None:
                pool = self.client.connection_pool
                connection = pool.make_connection()  # type: ignore[no-untyped-call]
                await pool.ensure_connection(connection)
            await connection.send_packed_command(packed, check_health=False)
            reply: list[Any] = await connection.read_response()
        except NoScriptError:
            # Valkey lost its scripts (restarted): the regular path loads it again.
            self.breaker.succeeded()
            if connection is not None:
                self._idle.append(connection)
            keys = [self.keys.session_epochs, *[self.keys.session(s) for _, s in pairs]]
            return list(await self._run_with(self._check_sessions, keys, [m for m, _ in pairs]))
        except BaseException as exc:
            if connection is not None:
                await connection.disconnect()
            self.breaker.judge(exc)
            raise
        self.breaker.succeeded()
        if len(self._idle) < _IDLE_CONNECTIONS:
            self._idle.append(connection)
        else:
            await connection.disconnect()
        return reply

    async def close_sessions(self) -> None:
        while self._idle:
            await self._idle.pop().disconnect()

    async def forget_sessions(self, mitra_ids: Sequence[str]) -> None:
        """These mitras' sessions changed in Postgres: none of theirs is vouched for now.
        ALL_SESSIONS (`*`): nobody's (changes may have been missed)."""
        if mitra_ids:
            await self._run_with(self._forget_sessions, [self.keys.session_epochs], mitra_ids)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
