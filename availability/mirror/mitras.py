"""What the RPCs read from the mirror, one round trip each, and how the truth's states are
written into it. apply.lua fences each write by the version and read time Postgres gave it,
so write-through, resync and reconcile may all write at once and a late writer undoes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from uuid import UUID

import redis.asyncio as redis

from ..model import (
    AvailabilityCount,
    AvailableMitra,
    Drift,
    MitraLoad,
    MitraState,
    MitraStatus,
    Source,
)
from ..settings import Settings
from .connection import MirrorMiss
from .trust import TrustMixin

_APPLY_BATCH = 1000
_FIELD = "\x1f"  # ASCII unit separator: cannot occur in ids or numbers; names are cleaned of it


def _us(when: datetime) -> str:
    return str(int(when.timestamp() * 1_000_000))


def _ms(when: datetime | None) -> str:
    return "" if when is None else str(int(when.timestamp() * 1000))


def _time(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _distinct_batches(states: Sequence[MitraState], size: int) -> list[list[MitraState]]:
    """Batches in order, none naming a mitra twice (apply.lua reads a batch's state once)."""
    batches: list[list[MitraState]] = []
    batch: list[MitraState] = []
    seen: set[UUID] = set()
    for state in states:
        if len(batch) == size or state.mitra_id in seen:
            batches.append(batch)
            batch, seen = [], set()
        batch.append(state)
        seen.add(state.mitra_id)
    if batch:
        batches.append(batch)
    return batches


class MitraMixin(TrustMixin):
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        super().__init__(client, settings)
        self.deferred = 0
        """Mitras whose mirror write this instance left to another layout's owner."""
        self._apply = self._register("apply")
        self._status = self._register("status")
        self._find = self._register("find")
        self._count = self._register("count")
        self._dashboard = self._register("dashboard")
        self._forget = self._register("forget")

    async def apply(self, states: Sequence[MitraState]) -> Drift:
        """Mirror states read from the truth (write-through, resync and reconcile all use this);
        returns what changed."""
        changed = Drift()
        if self.guest:
            await self.request_resync([s.mitra_id for s in states])
            self.deferred += len(states)
            return changed
        for batch in _distinct_batches(states, _APPLY_BATCH):
            args: list[object] = [self._stale_ms, self._retain, self._credit_ms]
            args += [
                _FIELD.join(
                    (
                        str(s.mitra_id),
                        s.display_name.replace(_FIELD, " "),
                        str(s.max_concurrent_sessions),
                        "1" if s.active else "0",
                        "1" if s.online else "0",
                        str(s.version),
                        str(s.load),
                        _ms(s.last_heartbeat_at),
                        _us(s.read_at),
                    )
                )
                for s in batch
            ]
            counts = await self._run(self._apply, *args)
            if counts[0] < 0:  # another layout's marker: apply.lua asked its owner to resync
                self.deferred += len(batch)
                continue
            changed += Drift(*counts)
        return changed

    async def status(self, mitra_id: UUID) -> MitraStatus:
        reply = await self._run(self._status, str(mitra_id))
        if not reply:
            raise MirrorMiss(mitra_id)
        online, deactivated, capacity, load, heartbeat, now, name = reply
        heartbeat_ms = None if heartbeat is None else float(heartbeat)
        return MitraStatus(
            mitra_id=mitra_id,
            display_name=name.decode(),
            online=bool(online),
            active=not deactivated,
            fresh=heartbeat_ms is not None and heartbeat_ms >= now - self._stale_ms,
            load=int(load),
            max_concurrent_sessions=int(capacity),
            last_heartbeat_at=None if heartbeat_ms is None else _time(heartbeat_ms),
            source=Source.CACHE,
        )

    async def find_available(self, limit: int, exclude: Sequence[UUID]) -> list[AvailableMitra]:
        reply = await self._run(self._find, self._stale_ms, limit, *map(str, exclude))
        return [
            AvailableMitra(
                UUID(reply[i].decode()), reply[i + 3].decode(), reply[i + 1], reply[i + 2]
            )
            for i in range(0, len(reply), 4)
        ]

    async def count_available(self) -> AvailabilityCount:
        reply = await self._run(self._count, self._stale_ms, self._beacon_ttl_ms)
        available, online, as_of = reply.decode().split(":")
        return AvailabilityCount(int(available), int(online), _time(float(as_of)), Source.CACHE)

    async def busiest(self, limit: int) -> tuple[int, list[MitraLoad]]:
        """(online count, the `limit` busiest online mitras), one round trip."""
        reply = await self._run(self._dashboard, limit)
        return int(reply[0]), [
            MitraLoad(UUID(reply[i].decode()), reply[i + 2].decode(), int(reply[i + 1]))
            for i in range(1, len(reply), 3)
        ]

    async def unknown_members(
        self, known: set[str], serving: int, deactivated: int, ready: int, batch: int = 5000
    ) -> set[str]:
        """Members of any reader-facing structure that are not in known (garbage included,
        as text), right after a reconcile wrote every known mitra. serving, deactivated and
        ready are how many members the truth gives each structure; one that holds no more
        cannot hold a stranger (every member it should have was just written), so only
        larger ones are scanned: a reconcile without drift reads no members at all."""
        k = self.keys
        expected = {
            k.capacity: len(known),
            k.online: serving,
            k.deactivated: deactivated,
            k.heartbeats: serving,
            k.ready: ready,
            k.busy: serving,
            k.published: ready,
        }
        pipe = self.client.pipeline(transaction=False)
        pipe.hlen(k.capacity)
        for name in (k.online, k.deactivated):
            pipe.scard(name)
        for name in (k.heartbeats, k.ready, k.busy):
            pipe.zcard(name)
        pipe.hlen(k.published)
        sizes = dict(zip(expected, await pipe.execute(), strict=True))
        found: set[str] = set()

        def add(member: bytes) -> None:
            if (text := member.decode()) not in known:
                found.add(text)

        larger = {name for name in expected if sizes[name] > expected[name]}
        for name in larger & {k.capacity, k.published}:
            async for key, _value in self.client.hscan_iter(name, count=batch):
                add(key)
        for name in larger & {k.online, k.deactivated}:
            async for member in self.client.sscan_iter(name, count=batch):
                add(member)
        for name in larger & {k.heartbeats, k.ready, k.busy}:
            async for member, _score in self.client.zscan_iter(name, count=batch):
                add(member)
        return found

    async def forget(self, members: Sequence[str], snapshot: datetime) -> int:
        """Drop members the truth does not have, unless synced since the snapshot."""
        forgotten = 0
        ids = list(members)
        for first in range(0, len(ids), _APPLY_BATCH):
            chunk = ids[first : first + _APPLY_BATCH]
            forgotten += int(
                await self._run(self._forget, self._stale_ms, self._retain, _us(snapshot), *chunk)
            )
        return forgotten

    async def clear(self) -> int:
        """Delete every key of this prefix (the demo's reset); the next start seeds again."""
        # The prefix has no glob characters (settings.py checks it).
        match = f"{self.keys.prefix}*"
        keys = [key async for key in self.client.scan_iter(match=match, count=1000)]
        for start in range(0, len(keys), 1000):
            await self.client.delete(*keys[start : start + 1000])
        return len(keys)

    async def beacon_computations(self) -> int:
        """How many times any instance computed the beacon (for stampede checks)."""
        return int(await self.client.get(self.keys.beacon_computed) or 0)
