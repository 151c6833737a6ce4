"""How long a replaced Valkey is trusted, and how long until it is trusted again, with a
city-scale fleet. `make bench` puts its rows in bench/RESULTS.md, their one home;
`python -m bench.trust [--mitras 100000]` prints the same table alone, to try a change.

For each fault, a server (in this process) serves a fleet from its own throwaway Valkey while a
probe reads one mitra's status every millisecond, as IsMitraReachable does, and a watch polls
the seed marker. Measured from the moment the fault is complete (the restarted Valkey answers,
FLUSHALL returned, the eviction happened, the endpoint moved, Sentinel named the new master,
the other version started):
  - untrusted after: until no marker of the replaced data set is left (0 when the fault took
    it along), and how many probe reads the cache answered in between (must be 0);
  - trusted again after: until the probe is answered from the cache again (a reseed ran).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import asyncpg
import redis.asyncio as redis

from availability import local_stores
from availability.mirror import Keys
from availability.model import Source
from availability.server import Server, running
from availability.settings import Settings
from availability.truth import Truth

from .common import Row, online_fleet, progress, stores


class Endpoint:
    """One address in front of whichever Valkey is primary, as a managed service's endpoint
    or a virtual IP is: moving it closes the connections it carried."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._carry, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def move(self, target: int) -> None:
        self.target = target
        for writer in list(self._writers):
            writer.close()

    async def stop(self) -> None:
        self.move(0)
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))


@dataclass
class Probe:
    """One mitra's status every millisecond through the domain (the path of IsMitraReachable),
    and the seed marker as Valkey holds it, both timestamped."""

    server: Server
    mitra: uuid.UUID
    marker_port: int
    reads: list[tuple[float, Source]] = field(default_factory=list)
    markers: list[tuple[float, str]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(self._read(stop), self._watch(stop))

    async def _read(self, stop: asyncio.Event) -> None:
        assert self.server.availability is not None
        while not stop.is_set():
            status = await self.server.availability.status(self.mitra)
            self.reads.append((time.monotonic(), status.source))
            await asyncio.sleep(0.001)

    async def _watch(self, stop: asyncio.Event) -> None:
        keys = Keys.for_prefix(self.server.settings.valkey_key_prefix)
        client: redis.Redis | None = None
        port = self.marker_port
        while not stop.is_set():
            if port != self.marker_port and client is not None:
                await client.aclose()
                client, port = None, self.marker_port
            try:
                client = client or redis.Redis(port=port, socket_timeout=0.5)
                marker = (await client.get(keys.seeded) or b"").decode()
            except (redis.RedisError, OSError):
                marker = "?"
                if client is not None:
                    await client.aclose()
                client = None
            if not self.markers or self.markers[-1][1] != marker:
                self.markers.append((time.monotonic(), marker))
            await asyncio.sleep(0.001)
        if client is not None:
            await client.aclose()

    def untrusted_after(self, fault: float, replaced: str) -> tuple[float, int]:
        """(ms from the fault until the replaced marker was gone for good, cache reads in
        between). The watch records changes only: a marker holds until the next entry."""
        gone = fault
        for (_at, marker), (until, _next) in zip(
            self.markers, [*self.markers[1:], (time.monotonic(), "")], strict=True
        ):
            if marker == replaced and until >= fault:
                gone = max(gone, until)
        cached = sum(1 for at, s in self.reads if fault <= at < gone and s is Source.CACHE)
        return (gone - fault) * 1000, cached

    def trusted_after(self, fault: float) -> float:
        """Seconds from the fault until the cache answered again, after a Postgres answer."""
        fell_back = next(
            (at for at, s in self.reads if at >= fault and s is Source.DATABASE), fault
        )
        back = next((at for at, s in self.reads if at >= fell_back and s is Source.CACHE), None)
        if back is None:
            raise AssertionError(f"not answered from the cache again: {self.transitions(fault)}")
        return back - fault

    def transitions(self, since: float) -> list[tuple[float, str]]:
        """(ms after since, source) each time the answering store changed."""
        changes: list[tuple[float, str]] = []
        for at, source in self.reads:
            if at >= since and (not changes or changes[-1][1] != source.value):
                changes.append((round((at - since) * 1000, 1), source.value))
        return changes


@dataclass
class Timing:
    fault: str
    untrusted_ms: float
    cache_reads_meanwhile: int
    trusted_s: float
    note: str = ""
    checked_each_second: bool = False
    """Seen by the once-a-second check rather than on a new connection (an eviction)."""
    same_data_set: bool = False
    """Not a replaced data set (a layout change): its reads until the drop were correct."""


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _fleet(admin_dsn: str, mitras: int) -> AsyncIterator[tuple[str, uuid.UUID]]:

    database = f"availability_bench_trust_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{database}"')
    dsn = admin_dsn.rpartition("/")[0] + f"/{database}"
    truth = await Truth.connect(Settings(database_url=dsn, valkey_url="redis://unused"))
    await truth.migrate()
    await truth.close()
    db = await asyncpg.connect(dsn)
    probed = (await online_fleet(db, mitras))[0]
    await db.close()
    try:
        yield dsn, probed
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


def _settings(dsn: str, valkey_url: str) -> Settings:
    return Settings(
        database_url=dsn,
        valkey_url=valkey_url,
        grpc_address="127.0.0.1:0",
        metrics_address="",
        migrate_on_start=False,
        valkey_key_prefix="trust",
        valkey_timeout_seconds=2.0,
    )


@contextlib.asynccontextmanager
async def _served(
    settings: Settings, mitra: uuid.UUID, marker_port: int
) -> AsyncIterator[tuple[Server, Probe]]:
    async with running(settings) as server:
        probe = Probe(server, mitra, marker_port)
        stop = asyncio.Event()
        task = asyncio.create_task(probe.run(stop))
        await _until(lambda: _cached(probe))
        try:
            yield server, probe
        finally:
            stop.set()
            await task


async def _cached(probe: Probe) -> bool:
    return bool(probe.reads) and probe.reads[-1][1] is Source.CACHE


async def _trusted_again(probe: Probe, fault: float) -> None:
    async def back() -> bool:
        fell_back = next(
            (at for at, s in probe.reads if at >= fault and s is Source.DATABASE), None
        )
        return fell_back is not None and probe.reads[-1][1] is Source.CACHE

    await _until(back)


async def _single_node_faults(folder: Path, dsn: str, mitra: uuid.UUID) -> list[Timing]:
    valkey = local_stores.start_valkey(folder / "valkey")
    timings = []
    try:
        async with _served(_settings(dsn, valkey.url), mitra, valkey.port) as (server, probe):
            direct = redis.Redis(port=valkey.port)

            async def marker() -> str:
                keys = Keys.for_prefix(server.settings.valkey_key_prefix)
                return (await direct.get(keys.seeded) or b"").decode()

            async def fault(
                name: str,
                act: Callable[[], Awaitable[float | None]],
                note: str,
                *,
                each_second: bool = False,
            ) -> None:
                nonlocal direct
                progress(f"trust: {name}")
                await _until(lambda: _cached(probe))
                await asyncio.sleep(1.0)
                replaced = await marker()
                at = await act() or time.monotonic()
                await _trusted_again(probe, at)
                untrusted, cached = probe.untrusted_after(at, replaced)
                timings.append(
                    Timing(name, untrusted, cached, probe.trusted_after(at), note, each_second)
                )
                await direct.aclose()
                direct = redis.Redis(port=valkey.port)

            async def restart_empty() -> float | None:
                (valkey.data_dir / "dump.rdb").unlink(missing_ok=True)
                await asyncio.to_thread(valkey.kill)
                await asyncio.to_thread(valkey.start)
                return None

            async def restart_from_snapshot() -> float | None:
                await direct.save()
                await asyncio.sleep(1.0)
                await asyncio.to_thread(valkey.kill)
                await asyncio.to_thread(valkey.start)
                return None

            async def flushall() -> float | None:
                await direct.flushall()
                return None

            async def evict() -> float:
                used = int((await direct.info("memory"))["used_memory"])
                await direct.config_set("maxmemory-policy", "allkeys-lru")
                await direct.config_set("maxmemory", str(used + 1_000_000))
                evicted = int((await direct.info("stats"))["evicted_keys"])
                i = 0
                while int((await direct.info("stats"))["evicted_keys"]) == evicted:
                    await direct.set(f"other-tenant:{i}", b"x" * 100_000)
                    i += 1
                evicted_at = time.monotonic()
                await direct.config_set("maxmemory", "0")
                await direct.config_set("maxmemory-policy", "noeviction")
                await direct.delete(*(f"other-tenant:{j}" for j in range(i)))
                return evicted_at

            await fault("restarted without persistence (empty)", restart_empty, "")
            await fault(
                "restarted from an older RDB snapshot (or AOF)",
                restart_from_snapshot,
                "the data set comes back with the old marker inside it",
            )
            await fault("FLUSHALL", flushall, "the marker goes with it")
            await fault(
                "keys evicted (allkeys-lru, maxmemory reached)",
                evict,
                "seen by the once-a-second check (INFO evicted_keys): reads in between may "
                "come from the evicted data set, which is why noeviction is required",
                each_second=True,
            )
            timings += await _layout_bump(server, probe)
            await direct.aclose()
    finally:
        valkey.stop()
    return timings


async def _layout_bump(server: Server, probe: Probe) -> list[Timing]:
    progress("trust: a newer layout starts beside this one, then is rolled back")
    await asyncio.sleep(1.0)
    newer = replace(server.settings, mirror_layout=server.settings.mirror_layout + 1)
    replaced = probe.markers[-1][1]
    at = time.monotonic()
    async with running(newer) as other:
        assert other.availability is not None
        await _until(lambda: _guest(server))
        dropped_ms, cached = probe.untrusted_after(at, replaced)
        mitra = probe.mitra

        async def newer_cached() -> bool:
            assert other.availability is not None
            return (await other.availability.status(mitra)).source is Source.CACHE

        await _until(newer_cached)
        newer_s = time.monotonic() - at
        await asyncio.sleep(1.0)
        stopped_at = time.monotonic()
    await _trusted_again(probe, stopped_at)
    return [
        Timing(
            "layout bump: a newer version starts beside this one",
            dropped_ms,
            cached,
            newer_s,
            "from the newer version's start (its connect included) until this version's marker "
            "is dropped; trusted again: the newer version's mirror, after its start-up seed; "
            "this version answers from Postgres from then on",
            same_data_set=True,
        ),
        Timing(
            "layout rollback: the newer version stops",
            0.0,
            0,
            probe.trusted_after(stopped_at),
            "this version takes the mirror back once the newer layout is not live (10 s)",
        ),
    ]


async def _guest(server: Server) -> bool:
    assert server.availability is not None
    return server.availability.mirror.guest


async def _sentinel_failover(folder: Path, dsn: str, mitra: uuid.UUID) -> list[Timing]:
    start = getattr(local_stores, "start_valkey_sentinel", None)
    if start is None:
        return []
    progress("trust: Sentinel failover")
    sentinel = start(folder / "sentinel")
    try:
        master = sentinel.master()
        settings = replace(
            _settings(dsn, master.url),
            valkey_sentinels=tuple(sentinel.sentinels),
            valkey_sentinel_master=sentinel.master_name,
        )
        async with _served(settings, mitra, master.port) as (_server, probe):
            await asyncio.sleep(1.0)
            replaced = probe.markers[-1][1]
            await asyncio.to_thread(master.kill)
            await asyncio.to_thread(sentinel.wait_failover, master, 60.0)
            at = time.monotonic()
            probe.marker_port = sentinel.master().port
            await _trusted_again(probe, at)
            untrusted, cached = probe.untrusted_after(at, replaced)
            return [
                Timing(
                    "Sentinel failover (primary killed, replica promoted)",
                    untrusted,
                    cached,
                    probe.trusted_after(at),
                    "from the promotion; the replica holds the old primary's marker",
                )
            ]
    finally:
        sentinel.stop()


async def bench_trust(admin_dsn: str, mitras: int) -> list[Row]:
    folder = Path(tempfile.mkdtemp(prefix="availability-trust-"))
    async with _fleet(admin_dsn, mitras) as (dsn, mitra):
        timings = await _single_node_faults(folder, dsn, mitra)
        timings += await _sentinel_failover(folder, dsn, mitra)
    return [_row(t, mitras) for t in timings]


def _row(t: Timing, mitras: int) -> Row:
    row = Row(
        f"{t.fault}, {mitras:,} mitras",
        f"untrusted after {t.untrusted_ms:.0f} ms; trusted again after {t.trusted_s:.2f} s",
        comparison=f"{t.cache_reads_meanwhile} reads from the replaced data set",
        target="0 reads from it",
        met=t.cache_reads_meanwhile == 0,
        note=t.note,
    )
    if t.checked_each_second:
        row = replace(row, target="untrusted within 1.1 s", met=t.untrusted_ms <= 1100)
    if t.same_data_set:
        row = replace(
            row,
            comparison=f"{t.cache_reads_meanwhile} reads from the older layout's own mirror "
            "before its marker was dropped (correct: the same data set)",
            target="",
            met=None,
        )
    return row


def trust_table(rows: list[Row], mitras: int) -> str:
    lines = [
        f"`python -m bench.trust --mitras {mitras}` ({time.strftime('%Y-%m-%d %H:%M')} UTC). "
        "See the module's docstring for what is measured.",
        "",
        "| fault | figure | replaced data set served | note |",
        "| --- | --- | --- | --- |",
        *(f"| {r.case} | {r.figure} | {r.comparison} | {r.note} |" for r in rows),
    ]
    return "\n".join(lines)


async def main(mitras: int) -> None:

    async with stores() as base:
        rows = await bench_trust(base.admin_dsn, mitras)
    print(trust_table(rows, mitras))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mitras", type=int, default=100_000)
    asyncio.run(main(parser.parse_args().mitras))
