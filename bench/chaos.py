"""Issue 7: mixed load on `availability serve` while Valkey is killed and restarted and
Postgres is restarted; then checks that nothing acknowledged was lost.

    python -m bench.chaos [--seconds-per-phase 12] [--mitras 300] [--cluster]

Own throwaway Postgres and Valkey on free ports (never the shared ones), a server process,
and in this process: heartbeats, finds, writes (SetOnline/SetOffline/SetMitraActive),
dashboard reads and live watchers. Phases: steady, Valkey killed, Valkey back (empty),
Postgres restarting, recovery. It prints requests by RPC and status code per phase, writes
bench/CHAOS.md, and fails (exit 1) unless, after recovery:
  - every write the service acknowledged is what Postgres holds (a write that failed leaves
    its mitra unchecked until the next acknowledged one: it may or may not have committed);
  - the mirror equals Postgres (online and deactivated sets);
  - every watcher is in sync and its set equals FindAvailableMitras.

With --cluster, Valkey is a local Valkey Cluster (3 masters, 3 replicas): "valkey killed"
kills the master serving the mirror's slot and waits for a replica to take over, "valkey
back" restarts the old master (it rejoins as a replica), and the report goes to
bench/CHAOS-cluster.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from uuid import UUID

import asyncpg
import grpc
import redis.asyncio as redis

from availability import local_stores
from availability.client import AvailabilityClient, LiveAvailability
from availability.mirror import Keys

HERE = Path(__file__).parent
PREFIX = "chaos"
PHASES = ("steady", "valkey killed", "valkey back", "postgres restarting", "recovery")


@dataclass
class Tally:
    """Requests by phase, RPC and status code."""

    counts: dict[tuple[str, str, str], int] = field(
        default_factory=lambda: collections.defaultdict(int)
    )
    phase: str = PHASES[0]

    def add(self, rpc: str, code: str) -> None:
        self.counts[(self.phase, rpc, code)] += 1


@dataclass
class Expected:
    """Per mitra, the state its last acknowledged write left (None: unknown since a failure)."""

    online: dict[UUID, bool | None] = field(default_factory=dict)
    active: dict[UUID, bool | None] = field(default_factory=dict)


async def _call(tally: Tally, rpc: str, call: Awaitable[object]) -> bool:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        tally.add(rpc, exc.code().name)
        return False
    tally.add(rpc, "OK")
    return True


async def _forever(
    step: Callable[[], Awaitable[object]], pause: float, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        await step()
        await asyncio.sleep(pause)


@contextlib.asynccontextmanager
async def _server(env: dict[str, str], log: Path) -> AsyncIterator[str]:
    port = local_stores.free_port()
    address = f"127.0.0.1:{port}"
    with log.open("w") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "availability",
            "serve",
            env={**env, "GRPC_ADDRESS": address},
            stdout=sink,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        async with AvailabilityClient(address, timeout=2.0) as probe:
            deadline = time.monotonic() + 60
            while True:
                try:
                    await probe.count_available_mitras()
                    break
                except grpc.aio.AioRpcError:
                    if time.monotonic() > deadline or process.returncode is not None:
                        text = await asyncio.to_thread(log.read_text)
                        raise RuntimeError(f"server did not start:\n{text}") from None
                    await asyncio.sleep(0.2)
        yield address
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()


class _SlotMaster:
    """A Valkey Cluster driven like one Valkey: kill() kills the master of the mirror's slot
    and returns once a replica serves it; start() brings the old master back as a replica."""

    def __init__(self, cluster: local_stores.LocalValkeyCluster) -> None:
        self.cluster = cluster
        self.url = cluster.url
        self._key = Keys.for_prefix(PREFIX).online
        self._killed: local_stores.LocalValkey | None = None

    def kill(self) -> None:
        self._killed = self.cluster.master_of(self._key)
        self._killed.kill()
        self.cluster.wait_failover(self._key, self._killed, 30.0)

    def start(self) -> None:
        if self._killed is not None:
            self._killed.start()
            self.cluster.wait_ok(30.0)

    def stop(self) -> None:
        self.cluster.stop()


def _keeper(commands: Connection, folder: Path, cluster: bool) -> None:
    """Owns the throwaway servers, in a process without gRPC's threads: starting a server
    forks, and a fork beside gRPC's threads can crash the child before it runs anything."""
    stores: dict[str, local_stores.LocalPostgres | local_stores.LocalValkey | _SlotMaster] = {
        "postgres": local_stores.start_postgres(folder / "postgres"),
        "valkey": (
            _SlotMaster(local_stores.start_valkey_cluster(folder / "cluster"))
            if cluster
            else local_stores.start_valkey(folder / "valkey")
        ),
    }
    commands.send((stores["postgres"].dsn, stores["valkey"].url))  # type: ignore[union-attr]
    while True:
        command = commands.recv()
        if command == "quit":
            for store in stores.values():
                store.stop()
            commands.send("ok")
            return
        name, action = command.split()
        try:
            getattr(stores[name], action)()
            commands.send("ok")
        except Exception as exc:
            commands.send(f"{name} {action} failed: {exc}")


class Stores:
    """Tells the keeper process what to do with the servers: `await stores.do("valkey kill")`."""

    def __init__(self, folder: Path, cluster: bool) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self.cluster = cluster
        self._process = context.Process(target=_keeper, args=(child, folder, cluster), daemon=True)
        self._process.start()
        self.dsn, self.valkey_url = self._pipe.recv()

    async def do(self, command: str) -> None:
        def send() -> str:
            self._pipe.send(command)
            answer: str = self._pipe.recv()
            return answer

        answer = await asyncio.to_thread(send)
        if answer != "ok":
            raise RuntimeError(answer)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.do("quit")
        self._process.join(30)


async def run(
    seconds_per_phase: float, mitras: int, report: Path | None, *, cluster: bool = False
) -> tuple[Tally, list[str]]:
    """The whole run; returns the requests by phase and the problems found (none: nothing
    was lost)."""
    with tempfile.TemporaryDirectory(prefix="availability-chaos-") as tmp:
        folder = Path(tmp)
        stores = Stores(folder, cluster)
        try:
            return await _run(stores, folder, seconds_per_phase, mitras, report)
        finally:
            await stores.close()
            log = folder / "server.log"
            if await asyncio.to_thread(log.exists):
                kept = Path(tempfile.gettempdir()) / "availability-chaos-server.log"
                await asyncio.to_thread(shutil.copyfile, log, kept)
                print(f"[chaos] server log: {kept}", file=sys.stderr, flush=True)


async def _run(
    stores: Stores,
    folder: Path,
    seconds: float,
    fleet_size: int,
    report: Path | None,
) -> tuple[Tally, list[str]]:
    env = {
        **os.environ,
        "DATABASE_URL": stores.dsn,
        "VALKEY_URL": stores.valkey_url,
        "VALKEY_CLUSTER": str(stores.cluster).lower(),
        "VALKEY_KEY_PREFIX": PREFIX,
        "LOG_LEVEL": "WARNING",
        "DATABASE_TIMEOUT_SECONDS": "2",
        "MITRA_AUTO_OFFLINE_SWEEP_SECONDS": "2",
        "HEARTBEAT_MIRROR_INTERVAL_SECONDS": "2",
        "VALKEY_ONLINE_MIRROR_SWEEP_SECONDS": "5",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "availability", "migrate", env=env
    )
    if await process.wait() != 0:
        raise RuntimeError("availability migrate failed")
    db = await asyncpg.connect(stores.dsn)
    ids: list[UUID] = [
        r["id"]
        for r in await db.fetch(
            "INSERT INTO mitras (display_name) SELECT 'Mitra ' || g FROM generate_series(1, $1) g"
            " RETURNING id",
            fleet_size,
        )
    ]
    await db.close()
    tally = Tally()
    expected = Expected()
    rng = random.Random(7)
    stop = asyncio.Event()
    async with _server(env, folder / "server.log") as address:
        async with AvailabilityClient(address, timeout=30.0) as setup:  # not under test yet
            for mitra in ids:
                await setup.set_online(mitra)
                expected.online[mitra], expected.active[mitra] = True, True
        client = AvailabilityClient(address, timeout=2.0, attempts=2)

        async def heartbeat() -> None:
            await _call(tally, "Heartbeat", client.heartbeat(rng.choice(ids)))

        async def find() -> None:
            await _call(tally, "FindAvailableMitras", client.find_available_mitras(20))

        async def dashboard() -> None:
            await _call(tally, "GetDashboardStats", client.get_dashboard_stats(50))

        writers = [ids[i::4] for i in range(4)]  # each mitra has one writer: writes are ordered

        def writer(own: list[UUID]) -> Callable[[], Awaitable[None]]:
            async def write() -> None:
                mitra = rng.choice(own)
                kind = rng.random()
                if kind < 0.45:
                    rpc, call, online, active = "SetOnline", client.set_online(mitra), True, None
                elif kind < 0.9:
                    rpc, call, online, active = "SetOffline", client.set_offline(mitra), False, None
                else:
                    flip = not expected.active.get(mitra, True)
                    rpc, call = "SetMitraActive", client.set_mitra_active(mitra, flip)
                    online, active = (False if not flip else None), flip
                try:
                    await call
                except grpc.aio.AioRpcError as exc:
                    tally.add(rpc, exc.code().name)
                    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        return  # a deactivated mitra refused SetOnline: nothing changed
                    expected.online[mitra] = expected.active[mitra] = None
                    return
                tally.add(rpc, "OK")
                if online is not None:
                    expected.online[mitra] = online
                if active is not None:
                    expected.active[mitra] = active

            return write

        watchers = [client.watch_available() for _ in range(3)]
        tasks = [asyncio.create_task(_forever(heartbeat, 0.002, stop)) for _ in range(4)]
        tasks += [asyncio.create_task(_forever(find, 0.01, stop))]
        tasks += [asyncio.create_task(_forever(dashboard, 0.1, stop))]
        tasks += [asyncio.create_task(_forever(writer(w), 0.01, stop)) for w in writers]
        async with contextlib.AsyncExitStack() as stack:
            for live in watchers:
                await stack.enter_async_context(live)
            for phase in PHASES:
                tally.phase = phase
                print(f"[chaos] {phase}", file=sys.stderr, flush=True)
                if phase == "valkey killed":
                    await stores.do("valkey kill")
                elif phase == "valkey back":
                    await stores.do("valkey start")
                elif phase == "postgres restarting":
                    await stores.do("postgres stop")
                    await asyncio.sleep(min(3.0, seconds / 2))
                    await stores.do("postgres start")
                await asyncio.sleep(seconds)
            stop.set()
            await asyncio.gather(*tasks)
            problems = await _check(stores, client, watchers, expected)
        await client.close()
    internal = sum(n for (_, _, code), n in tally.counts.items() if code in ("INTERNAL", "UNKNOWN"))
    if internal:
        problems.append(f"{internal} calls answered INTERNAL or UNKNOWN (see the server log)")
    lines = _report(tally, problems, seconds, fleet_size, stores.cluster)
    print("\n".join(lines))
    if report is not None:
        await asyncio.to_thread(report.write_text, "\n".join(lines) + "\n")
    return tally, problems


async def _check(
    stores: Stores,
    client: AvailabilityClient,
    watchers: list[LiveAvailability],
    expected: Expected,
) -> list[str]:
    """After recovery: acknowledged writes in Postgres, mirror = Postgres, watchers in sync."""
    problems: list[str] = []
    db = await asyncpg.connect(stores.dsn)
    rows = await db.fetch(
        "SELECT m.id, m.is_active, coalesce(s.is_online, false) AS online"
        " FROM mitras m LEFT JOIN mitra_online_status s ON s.mitra_id = m.id"
    )
    await db.close()
    truth = {r["id"]: (r["online"], r["is_active"]) for r in rows}
    lost = [
        m for m, online in expected.online.items() if online is not None and truth[m][0] != online
    ]
    lost += [
        m for m, active in expected.active.items() if active is not None and truth[m][1] != active
    ]
    if lost:
        problems.append(f"{len(lost)} acknowledged writes not in Postgres, e.g. {lost[0]}")
    keys = Keys.for_prefix(PREFIX)
    mirror: redis.Redis = (
        redis.RedisCluster.from_url(stores.valkey_url, decode_responses=True)  # type: ignore[assignment]
        if stores.cluster
        else redis.Redis.from_url(stores.valkey_url, decode_responses=True)
    )

    async def mirrored() -> list[str]:
        online = await mirror.smembers(keys.online)
        deactivated = await mirror.smembers(keys.deactivated)
        want_online = {str(m) for m, (o, a) in truth.items() if o and a}
        want_deactivated = {str(m) for m, (_, a) in truth.items() if not a}
        found = []
        if online != want_online:
            found.append(f"mirror online differs from Postgres by {len(online ^ want_online)}")
        if deactivated != want_deactivated:
            found.append("mirror deactivated differs from Postgres")
        return found

    # The mirror heals by the reconcile sweep (5 s here); give it two rounds.
    deadline = time.monotonic() + 15
    while (differences := await mirrored()) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    await mirror.aclose()
    problems += differences
    deadline = time.monotonic() + 15
    while True:
        found = {m.mitra_id for m in await client.find_available_mitras(10_000)}
        out = [w for w in watchers if not w.in_sync or set(w.mitras) != found]
        if not out or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    if out:
        problems.append(f"{len(out)} of {len(watchers)} watchers not in sync with Find")
    return problems


def _report(
    tally: Tally, problems: list[str], seconds: float, mitras: int, cluster: bool
) -> list[str]:
    rpcs = sorted({rpc for _, rpc, _ in tally.counts})
    valkey = (
        [
            f"`python -m bench.chaos --cluster`: {mitras} mitras, {seconds:g} s a phase, on a",
            "local Valkey Cluster of 3 masters and 3 replicas. The master serving the mirror's",
            "slot is killed at the start of the second phase (whose time starts once a replica",
            "took over) and restarted at the third, when it rejoins as a replica; Postgres is",
            "stopped and started at the fourth.",
        ]
        if cluster
        else [
            f"`python -m bench.chaos`: {mitras} mitras, {seconds:g} s a phase; Valkey is killed at",
            "the start of the second phase and restarted empty at the third; Postgres is stopped",
            "and started at the fourth.",
        ]
    )
    lines = [
        "# Chaos run" + (" on a Valkey Cluster" if cluster else ""),
        "",
        *valkey,
        "Requests by phase and RPC: `OK` and the error codes seen.",
        "Heartbeats go to random mitras, deactivated ones included: their PERMISSION_DENIED is",
        "the guard working.",
        "",
        "| phase | " + " | ".join(rpcs) + " |",
        "| --- | " + " | ".join("---" for _ in rpcs) + " |",
    ]
    for phase in PHASES:
        cells = []
        for rpc in rpcs:
            codes = {c: n for (p, r, c), n in tally.counts.items() if p == phase and r == rpc}
            cells.append(", ".join(f"{c} {n:,}" for c, n in sorted(codes.items())) or "-")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines += ["", "Checks after recovery: " + ("; ".join(problems) if problems else "all passed")]
    lines += [
        "(every acknowledged write is in Postgres, the mirror equals Postgres, every watcher",
        "is in sync and equals FindAvailableMitras)",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds-per-phase", type=float, default=12.0)
    parser.add_argument("--mitras", type=int, default=300)
    parser.add_argument("--cluster", action="store_true", help="on a local Valkey Cluster")
    args = parser.parse_args()
    report = HERE / ("CHAOS-cluster.md" if args.cluster else "CHAOS.md")
    _, problems = asyncio.run(
        run(args.seconds_per_phase, args.mitras, report, cluster=args.cluster)
    )
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
