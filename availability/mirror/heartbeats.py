"""Heartbeats are the one write every mitra makes all the time, so they are recorded in
Valkey alone, many to a script call, and reach Postgres in batches: the flush sweep takes
what was recorded since the last flush, and the auto-offline sweep asks which went stale.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Sequence
from uuid import UUID

import redis.asyncio as redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from ..settings import Settings
from .base import MirrorBase

_HEARTBEAT_BATCH = 500


class HeartbeatOutcome(enum.Enum):
    RECORDED = 1
    OFFLINE = 0
    DEACTIVATED = -1
    UNKNOWN = -2
    UNSEEDED = -3


def _bulk(part: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(part), part)


class HeartbeatMixin(MirrorBase):
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        super().__init__(client, settings)
        self._beats: deque[tuple[list[str], asyncio.Future[list[int]]]] = deque()
        self._beating = False
        self._sender: asyncio.Task[None] | None = None
        self._beat_connection: Connection | None = None
        self.heartbeat_calls = 0
        """Script calls that carried heartbeats (fewer than heartbeats under load)."""
        self._heartbeat = self._register("heartbeat")
        self._stale = self._register("stale")
        self._take_dirty = self._register("take_dirty")
        self._release_dirty = self._register("release_dirty")
        self._beat_seconds = self.seconds.op("heartbeat")
        self._beat_head = [
            _bulk(part)
            for part in (
                b"EVALSHA",
                self._heartbeat.sha.encode(),
                str(len(self._all_keys)).encode(),
                *(key.encode() for key in self._all_keys),
                str(self._stale_ms).encode(),
                str(self._retain).encode(),
            )
        ]

    async def heartbeats(self, mitra_ids: Sequence[UUID]) -> list[HeartbeatOutcome]:
        """One outcome an id, in order. Group commit: while one script call is in flight, the
        heartbeats that arrive (single ones and batches) wait and go together in the next.
        Alone, they go at once; under load the Redis client's cost per call (a third of a
        single heartbeat's CPU) is shared by the batch. No script call carries more than
        _HEARTBEAT_BATCH ids, so no call holds Valkey's one thread for long."""
        ids = [str(i) for i in mitra_ids]
        if len(ids) <= _HEARTBEAT_BATCH:
            return await self._group_beat(ids)
        parts = await asyncio.gather(
            *(
                self._group_beat(ids[at : at + _HEARTBEAT_BATCH])
                for at in range(0, len(ids), _HEARTBEAT_BATCH)
            )
        )
        return [outcome for part in parts for outcome in part]

    async def _group_beat(self, ids: list[str]) -> list[HeartbeatOutcome]:
        if self._beating:
            future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
            self._beats.append((ids, future))
            return [HeartbeatOutcome(o) for o in await future]
        # Nothing in flight: these go at once, in this task, without a future.
        self._beating = True
        try:
            outcomes = await self._beat(ids)
        finally:
            if self._beats:
                self._sender = asyncio.create_task(self._send_heartbeats())
            else:
                self._beating = False
        return [HeartbeatOutcome(int(o)) for o in outcomes]

    async def _send_heartbeats(self) -> None:
        beats = self._beats
        try:
            while beats:
                batch = [beats.popleft()]
                size = len(batch[0][0])
                while beats and size + len(beats[0][0]) <= _HEARTBEAT_BATCH:
                    batch.append(beats.popleft())
                    size += len(batch[-1][0])
                try:
                    outcomes = await self._beat([i for ids, _ in batch for i in ids])
                except BaseException as exc:
                    for _, future in batch:
                        if future.done():
                            continue
                        if isinstance(exc, Exception):
                            future.set_exception(exc)
                        else:
                            future.cancel()
                    if not isinstance(exc, Exception):
                        raise
                    continue
                at = 0
                for ids, future in batch:
                    if not future.done():
                        future.set_result(outcomes[at : at + len(ids)])
                    at += len(ids)
        finally:
            self._beating = False
            for _, future in beats:
                future.cancel()
            beats.clear()

    async def _beat(self, ids: list[str]) -> list[int]:
        """One heartbeat script call, on a connection of its own with the command packed by
        hand: heartbeats go one call at a time (the group commit above), and the client's
        pool and packing cost more than the rest of a heartbeat's Redis work. A connection
        found closed (Valkey restarted, or dropped it while idle) is replaced once at once:
        the script is safe to run twice, and the heartbeats must not go to Postgres for it."""
        self.heartbeat_calls += 1
        self.breaker.check()
        packed = [b"*%d\r\n" % (len(self._beat_head) + len(ids)), *self._beat_head]
        packed += [b"$%d\r\n%s\r\n" % (len(i), i.encode()) for i in ids]
        command = b"".join(packed)
        started = time.perf_counter()
        for attempt in (1, 2):
            reused = self._beat_connection is not None
            try:
                connection = self._beat_connection
                if connection is None:
                    pool = self.client.connection_pool
                    connection = pool.make_connection()  # type: ignore[no-untyped-call]
                    await pool.ensure_connection(connection)
                    self._beat_connection = connection
                await connection.send_packed_command(command, check_health=False)
                reply: list[int] = await connection.read_response()
            except NoScriptError:
                # Valkey lost its scripts (restarted): the regular path loads it again.
                self.breaker.succeeded()
                return list(await self._run(self._heartbeat, self._stale_ms, self._retain, *ids))
            except BaseException as exc:
                if self._beat_connection is not None:
                    await self._beat_connection.disconnect()
                    self._beat_connection = None
                if attempt == 1 and reused and isinstance(exc, RedisConnectionError):
                    continue
                self._beat_seconds.observe(time.perf_counter() - started)
                self.breaker.judge(exc)
                raise
            self._beat_seconds.observe(time.perf_counter() - started)
            self.breaker.succeeded()
            return reply
        raise AssertionError("unreachable")

    async def stale(self, limit: int) -> tuple[int, int, list[UUID]]:
        """(online count, stale count, up to limit stale ids), by Valkey's clock."""
        reply = await self._run(self._stale, self._stale_ms, limit)
        return int(reply[0]), int(reply[1]), [UUID(i.decode()) for i in reply[2:]]

    async def take_dirty_heartbeats(self, epoch: int, batch: int = 10_000) -> dict[str, int]:
        """The heartbeats recorded since the last flush (id -> Valkey ms), set aside for this
        flush; heartbeats arriving meanwhile wait for the next one. Scanned, never one
        blocking HGETALL, since all 100,000 can be there at once."""
        if not await self._run(self._take_dirty, epoch):
            return {}
        found: dict[str, int] = {}
        async for key, value in self.client.hscan_iter(self.keys.flushing, count=batch):
            found[key.decode()] = int(value)
        found.pop("__epoch", None)
        return found

    async def release_flushed(self, epoch: int) -> bool:
        """Drop what this flush (epoch) wrote to Postgres; False if a newer flush took it."""
        return bool(await self._run(self._release_dirty, epoch))
