"""Issue 7: mixed load on `availability serve` while its stores fail; then checks that nothing
acknowledged was lost, and that no read ever served a mitra whose deactivation was
acknowledged.

    python -m bench.chaos [--seconds-per-phase 12] [--mitras 300] [--cluster | --sentinel]

Own throwaway Postgres and Valkey on free ports (never the shared ones), a server process,
and in this process: heartbeats, finds, the pairing reads (IsMitraReachable of recently
deactivated mitras, then FindAvailableMitras of the whole fleet), writes (SetOnline,
SetOffline, SetMitraActive), dashboard reads and live watchers.

Phases on one Valkey: steady (at its end Valkey saves a snapshot, set aside), Valkey killed,
Valkey back (empty), Valkey restored (killed and started again from that older snapshot, the
seed's marker inside it), FLUSHALL, layout bump (a second server with the next
MIRROR_LAYOUT beside the first, load alternating between them: a rolling upgrade), layout
rollback (the second server stopped; the first takes the mirror back), Postgres restarting,
recovery.

With --cluster, Valkey is a local Valkey Cluster (3 masters, 3 replicas): "valkey killed"
kills the master serving the mirror's slot and waits for a replica to take over, "valkey
back" restarts the old master (it rejoins as a replica). With --sentinel, the service runs in
Sentinel mode on a local primary, replica and three sentinels: "valkey killed" kills the
primary and waits for Sentinel to promote the replica, "valkey back" restarts the old primary
(Sentinel makes it a replica). Both then restart Postgres and recover, and report to
bench/CHAOS-cluster.md or bench/CHAOS-sentinel.md instead of bench/CHAOS.md.

It prints requests by phase, RPC and status code, and fails (exit 1) when:
  - any call answered a code other than the domain's (PERMISSION_DENIED for a deactivated
    mitra's heartbeat, FAILED_PRECONDITION for its SetOnline) or, while Postgres restarts,
    UNAVAILABLE;
  - the invariant broke in any read: once a deactivation was acknowledged, the mitra was
    reachable (IsMitraReachable) or offered (FindAvailableMitras), or its heartbeat was
    taken, in a call that started after the acknowledgement and before a reactivation of it
    was sent (an in-sync watcher's set counts too, a grace period after the acknowledgement,
    since the stream is asynchronous);
  - after recovery: a write the service acknowledged is not what Postgres holds (a write that
    failed leaves its mitra unchecked until the next acknowledged one), the mirror differs
    from Postgres (online and deactivated sets) or is not this layout's, or a watcher is out of
    sync with FindAvailableMitras;
  - a server logged an ERROR (an exception no caller saw). The server logs are kept as
    $TMPDIR/availability-chaos-<mode>-<time>-<pid>-server*.log.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import grpc
import redis
import redis.asyncio as aredis

from availability import local_stores
from availability.client import AvailabilityClient, LiveAvailability, service_config
from availability.mirror import Keys
from availability.model import AvailabilitySnapshot
from availability.settings import MIRROR_LAYOUT
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

HERE = Path(__file__).parent
PREFIX = "chaos"
MODES = ("single", "cluster", "sentinel")
PHASES = {
    "single": (
        "steady",
        "valkey killed",
        "valkey back",
        "valkey restored",
        "flushall",
        "layout bump",
        "layout rollback",
        "postgres restarting",
        "recovery",
    ),
    "cluster": ("steady", "valkey killed", "valkey back", "postgres restarting", "recovery"),
    "sentinel": ("steady", "valkey killed", "valkey back", "postgres restarting", "recovery"),
}
ALLOWED = {"Heartbeat": {"PERMISSION_DENIED"}, "SetOnline": {"FAILED_PRECONDITION"}}
"""Error codes the domain gives (a deactivated mitra); UNAVAILABLE too while Postgres restarts."""
WATCH_GRACE_SECONDS = 5.0
"""A watcher may hold a mitra this long after its deactivation was acknowledged: the stream is
asynchronous, and a hub notices a distrusted mirror (and ends its watches) within about two
seconds (its marker check each second, its blocking read of a second), more on a busy machine.
Longer is a watcher stuck on an old set."""
DEADLINE_SECONDS = 5.0
"""Each call's deadline: well beyond the service's own (DATABASE_TIMEOUT_SECONDS 2), so a
DEADLINE_EXCEEDED says the service hung, not that the machine was busy."""
DOUBT_SECONDS = 10.0
"""A reactivation that failed may still commit on the server for a while (a deadline passes on
the client, not in Postgres): deactivations acknowledged this soon after it arm no check."""


@dataclass
class Tally:
    """Requests by phase, RPC and status code; the checked reads by phase, RPC and source."""

    counts: dict[tuple[str, str, str], int] = field(
        default_factory=lambda: collections.defaultdict(int)
    )
    sources: dict[tuple[str, str, str], int] = field(
        default_factory=lambda: collections.defaultdict(int)
    )
    phase: str = "steady"

    def add(self, rpc: str, code: str) -> None:
        self.counts[(self.phase, rpc, code)] += 1


@dataclass
class Expected:
    """Per mitra, the state its last acknowledged write left (None: unknown since a failure)."""

    online: dict[UUID, bool | None] = field(default_factory=dict)
    active: dict[UUID, bool | None] = field(default_factory=dict)


@dataclass
class Invariant:
    """Once a deactivation was acknowledged, the mitra is neither reachable nor available, nor
    its heartbeat taken, in any call that started after the acknowledgement, until a
    reactivation of it was sent. A call that started earlier may rightly see it active."""

    since: dict[UUID, float] = field(default_factory=dict)
    """Mitras under the check: when (time.monotonic) their deactivation was acknowledged."""
    by: dict[UUID, str] = field(default_factory=dict)
    """Which server acknowledged it (the layout bump runs two versions)."""
    recent: collections.deque[UUID] = field(default_factory=lambda: collections.deque(maxlen=32))
    doubtful_until: dict[UUID, float] = field(default_factory=dict)
    reads: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    """Reads (IsMitraReachable, FindAvailableMitras) checked, by phase."""
    pairs: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    """(read, mitra under the check) pairs, by phase."""
    heartbeats: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    samples: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    """Watcher sets checked, by phase."""
    violations: dict[tuple[str, str], int] = field(
        default_factory=lambda: collections.defaultdict(int)
    )
    """Answers (or watcher sets) that served a mitra under the check, by phase and what
    served it (an RPC, or "watcher")."""
    mitras: dict[tuple[str, str], set[UUID]] = field(
        default_factory=lambda: collections.defaultdict(set)
    )
    """The mitras they served."""
    examples: dict[tuple[str, str], list[str]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    """The first few of each kind, by phase."""

    def deactivated(self, mitra: UUID, by: str) -> None:
        now = time.monotonic()
        if now < self.doubtful_until.get(mitra, 0.0):
            return
        self.since[mitra], self.by[mitra] = now, by
        self.recent.append(mitra)

    def reactivating(self, mitra: UUID) -> None:
        self.since.pop(mitra, None)

    def reactivation_failed(self, mitra: UUID) -> None:
        self.doubtful_until[mitra] = time.monotonic() + DOUBT_SECONDS

    def pick(self, rng: random.Random) -> UUID | None:
        """A recently deactivated mitra still under the check: often the latest."""
        candidates = [m for m in self.recent if m in self.since]
        if not candidates:
            return None
        return candidates[-1] if rng.random() < 0.5 else rng.choice(candidates)

    def _armed(self, started: float) -> set[UUID]:
        return {m for m, acknowledged in self.since.items() if acknowledged <= started}

    def reachable(
        self, phase: str, started: float, mitra: UUID, reachable: bool, source: str, server: str
    ) -> None:
        """An IsMitraReachable answer."""
        if mitra not in self._armed(started):
            return
        self.reads[phase] += 1
        self.pairs[phase] += 1
        if reachable:
            self._broken(phase, "IsMitraReachable", {mitra}, started, f"reachable on {server}")

    def offered(
        self, phase: str, started: float, mitras: Iterable[UUID], source: str, server: str
    ) -> None:
        """A FindAvailableMitras answer."""
        armed = self._armed(started)
        if not armed:
            return
        self.reads[phase] += 1
        self.pairs[phase] += len(armed)
        if wrong := armed.intersection(mitras):
            how = f"offered by {server} from {source}"
            self._broken(phase, "FindAvailableMitras", wrong, started, how)

    def heartbeat(
        self, phase: str, started: float, mitra: UUID, accepted: bool, server: str
    ) -> None:
        if mitra not in self._armed(started):
            return
        self.heartbeats[phase] += 1
        if accepted:
            self._broken(phase, "Heartbeat", {mitra}, started, f"heartbeat taken by {server}")

    def watched(self, phase: str, watcher: Watcher) -> None:
        if not watcher.live.in_sync:
            return
        now = time.monotonic()
        self.samples[phase] += 1
        if wrong := self._armed(now - WATCH_GRACE_SECONDS).intersection(watcher.live.mitras):
            how = f"in the set of a watcher of {watcher.server}"
            self._broken(phase, "watcher", wrong, now, how, watcher.history)

    def _broken(
        self,
        phase: str,
        what: str,
        wrong: set[UUID],
        started: float,
        how: str,
        history: Callable[[UUID], str] | None = None,
    ) -> None:
        """One answer (or watcher set) that served mitras under the check."""
        self.violations[(phase, what)] += 1
        self.mitras[(phase, what)] |= wrong
        if len(examples := self.examples[(phase, what)]) < 3:
            mitra = min(wrong, key=lambda m: self.since[m])
            age = started - self.since[mitra]
            seen = f" ({history(mitra)})" if history is not None else ""
            more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
            examples.append(
                f"{datetime.now(UTC).isoformat(timespec='milliseconds')} {phase}: {what}:"
                f" {mitra}{more} {how}{seen}, in a call or sample that started"
                f" {age * 1000:.0f} ms after {self.by[mitra]} acknowledged its deactivation"
            )

    @property
    def total(self) -> int:
        return sum(self.violations.values())

    def count(self, *whats: str) -> tuple[int, int]:
        """(answers or watcher sets, distinct mitras) that served a mitra under the check."""
        found = [(n, self.mitras[key]) for key, n in self.violations.items() if key[1] in whats]
        return sum(n for n, _ in found), len(set().union(*(m for _, m in found)))

    def summary(self) -> str:
        reads, mitras = self.count("IsMitraReachable", "FindAvailableMitras")
        taken, _ = self.count("Heartbeat")
        stale, held = self.count("watcher")
        return (
            f"{reads:,} of {sum(self.reads.values()):,} reads checked served a deactivated mitra"
            f" ({mitras} mitras), {taken:,} of {sum(self.heartbeats.values()):,} heartbeats"
            f" checked were taken, {stale:,} of {sum(self.samples.values()):,} watcher sets"
            f" checked held one beyond {WATCH_GRACE_SECONDS:g} s ({held} mitras)"
        )


class Watcher:
    """A live set of available mitras, as the pairing service keeps one, and per mitra the
    last event that put it in or took it out (what a violation names)."""

    def __init__(self, live: LiveAvailability, server: str) -> None:
        self.live = live
        self.server = server
        self._last: dict[UUID, str] = {}

    async def follow(self) -> None:
        async for event in self.live:
            at = datetime.now(UTC).isoformat(timespec="milliseconds")
            if isinstance(event, AvailabilitySnapshot):
                for mitra in event.mitras:
                    self._last[mitra.mitra_id] = f"snapshot r{event.revision} at {at}"
            else:
                what = f"{event.kind.value} r{event.revision} at {at}"
                self._last[event.mitra.mitra_id] = what

    def history(self, mitra: UUID) -> str:
        last = self._last.get(mitra, "no event")
        return f"last: {last}; now r{self.live.revision}, {self.live.reconnects} reconnects"


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


class Target:
    """One server as the load sees it: the typed client, and a stub for the reads whose
    source (cache or database) the run reports."""

    def __init__(self, address: str, name: str) -> None:
        self.address = address
        self.name = name
        """The server's layout, as the report names it (v2)."""
        self.client = AvailabilityClient(address, timeout=DEADLINE_SECONDS, attempts=2)
        config = service_config(DEADLINE_SECONDS, 2)
        options = [("grpc.service_config", config), ("grpc.enable_retries", 1)]
        self._channel = grpc.aio.insecure_channel(address, options=options)
        self.stub = pb_grpc.AvailabilityServiceStub(self._channel)

    async def close(self) -> None:
        await self.client.close()
        await self._channel.close(grace=None)


class _Node:
    """One Valkey: also saves a snapshot (set aside, so a restart comes back empty) and
    restores it, as a Valkey with RDB persistence or a managed service's restore does."""

    def __init__(self, node: local_stores.LocalValkey) -> None:
        self.node = node
        self._snapshot = node.data_dir / "snapshot.rdb"

    def url(self) -> str:
        return self.node.url

    def _client(self) -> redis.Redis:
        return redis.Redis(port=self.node.port, decode_responses=True, socket_timeout=5)

    def kill(self) -> None:
        self.node.kill()

    def start(self) -> None:
        self.node.start()

    def save(self) -> str:
        """SAVE, then the dump set aside; returns the seed marker it holds."""
        marker = self.marker()
        with self._client() as valkey:
            valkey.save()
            folder, name = valkey.config_get("dir")["dir"], valkey.config_get("dbfilename")
        (Path(folder) / name["dbfilename"]).replace(self._snapshot)
        return marker

    def restore(self) -> str:
        """Kill, then start on the snapshot; returns the marker it came back with (unless the
        service dropped it first)."""
        self.node.kill()
        dump = self.node.data_dir / "dump.rdb"
        shutil.copyfile(self._snapshot, dump)
        self.node.start()
        dump.unlink()
        return self.marker()

    def flushall(self) -> None:
        with self._client() as valkey:
            valkey.flushall()

    def marker(self) -> str:
        with self._client() as valkey:
            return str(valkey.get(Keys.for_prefix(PREFIX).seeded) or "")

    def stop(self) -> None:
        self.node.stop()


class _SlotMaster:
    """A Valkey Cluster driven like one Valkey: kill() kills the master of the mirror's slot
    and returns once a replica serves it; start() brings the old master back as a replica."""

    def __init__(self, cluster: local_stores.LocalValkeyCluster) -> None:
        self.cluster = cluster
        self._key = Keys.for_prefix(PREFIX).online
        self._killed: local_stores.LocalValkey | None = None

    def url(self) -> str:
        return self.cluster.url

    def kill(self) -> None:
        self._killed = self.cluster.master_of(self._key)
        self._killed.kill()
        self.cluster.wait_failover(self._key, self._killed, 30.0)

    def start(self) -> None:
        if self._killed is not None:
            self._killed.start()
            self.cluster.wait_ok(30.0)

    def marker(self) -> str:
        with redis.RedisCluster.from_url(self.cluster.url, decode_responses=True) as valkey:
            return str(valkey.get(Keys.for_prefix(PREFIX).seeded) or "")

    def stop(self) -> None:
        self.cluster.stop()


class _SentinelMaster:
    """Valkey behind Sentinel driven like one Valkey: kill() kills the primary and returns
    once the sentinels promoted the replica; start() brings the old primary back, and returns
    once the sentinels made it a replica of the new one."""

    def __init__(self, group: local_stores.LocalValkeySentinel) -> None:
        self.group = group
        self._killed: local_stores.LocalValkey | None = None

    def url(self) -> str:
        return self.group.master().url

    def kill(self) -> None:
        self._killed = self.group.master()
        self._killed.kill()
        self.group.wait_failover(self._killed, 30.0)

    def start(self) -> None:
        if self._killed is not None:
            self._killed.start()
            self.group.wait_ok(30.0)

    def marker(self) -> str:
        with redis.Redis(port=self.group.master().port, decode_responses=True) as valkey:
            return str(valkey.get(Keys.for_prefix(PREFIX).seeded) or "")

    def stop(self) -> None:
        self.group.stop()


def _keeper(commands: Connection, folder: Path, mode: str) -> None:
    """Owns the throwaway servers, in a process without gRPC's threads: starting a server
    forks, and a fork beside gRPC's threads can crash the child before it runs anything."""
    valkey: _Node | _SlotMaster | _SentinelMaster
    if mode == "cluster":
        valkey = _SlotMaster(local_stores.start_valkey_cluster(folder / "cluster"))
    elif mode == "sentinel":
        valkey = _SentinelMaster(
            local_stores.start_valkey_sentinel(folder / "sentinel", master_name=PREFIX)
        )
    else:
        valkey = _Node(local_stores.start_valkey(folder / "valkey"))
    postgres = local_stores.start_postgres(folder / "postgres")
    stores: dict[str, Any] = {"postgres": postgres, "valkey": valkey}
    sentinels = valkey.group.sentinels if isinstance(valkey, _SentinelMaster) else []
    commands.send((postgres.dsn, valkey.url(), sentinels))
    while True:
        command = commands.recv()
        if command == "quit":
            for store in stores.values():
                store.stop()
            commands.send(("ok", None))
            return
        name, action = command.split()
        try:
            commands.send(("ok", getattr(stores[name], action)()))
        except Exception as exc:
            commands.send(("failed", f"{name} {action} failed: {exc}"))


class Stores:
    """Tells the keeper process what to do with the servers: `await stores.do("valkey kill")`
    (returns what the action returns: `valkey marker` the seed marker, `valkey url` where the
    mirror's master is now)."""

    def __init__(self, folder: Path, mode: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self.mode = mode
        self._process = context.Process(target=_keeper, args=(child, folder, mode), daemon=True)
        self._process.start()
        self.dsn, self.valkey_url, self.sentinels = self._pipe.recv()

    async def do(self, command: str) -> str | None:
        def send() -> tuple[str, str | None]:
            self._pipe.send(command)
            answer: tuple[str, str | None] = self._pipe.recv()
            return answer

        outcome, value = await asyncio.to_thread(send)
        if outcome != "ok":
            raise RuntimeError(value)
        return value

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.do("quit")
        self._process.join(30)


@dataclass
class Run:
    """What one run found: requests by phase, RPC and code; the invariant; the problems
    (none: nothing was lost and nothing deactivated was served); notes on the faults."""

    tally: Tally
    invariant: Invariant
    problems: list[str]
    notes: dict[str, str] = field(default_factory=dict)


async def run(
    seconds_per_phase: float, mitras: int, report: Path | None, *, mode: str = "single"
) -> Run:
    """The whole run, on throwaway stores; the server logs are kept in the temp folder."""
    with tempfile.TemporaryDirectory(prefix="availability-chaos-") as tmp:
        folder = Path(tmp)
        stores = Stores(folder, mode)
        try:
            return await _run(stores, folder, seconds_per_phase, mitras, report)
        finally:
            await stores.close()
            run_id = f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            for log in await asyncio.to_thread(_server_logs, folder):
                kept = Path(tempfile.gettempdir()) / f"availability-chaos-{run_id}-{log.name}"
                await asyncio.to_thread(shutil.copyfile, log, kept)
                print(f"[chaos] server log: {kept}", file=sys.stderr, flush=True)


def _server_logs(folder: Path) -> list[Path]:
    return sorted(folder.glob("server*.log"))


async def _run(
    stores: Stores,
    folder: Path,
    seconds: float,
    fleet_size: int,
    report: Path | None,
) -> Run:
    env = {
        **os.environ,
        "DATABASE_URL": stores.dsn,
        "VALKEY_URL": stores.valkey_url,
        "VALKEY_CLUSTER": str(stores.mode == "cluster").lower(),
        "VALKEY_KEY_PREFIX": PREFIX,
        "LOG_LEVEL": "WARNING",
        "METRICS_ADDRESS": "",
        "MIRROR_LAYOUT": str(MIRROR_LAYOUT),
        "DATABASE_TIMEOUT_SECONDS": "2",
        "MITRA_AUTO_OFFLINE_SWEEP_SECONDS": "2",
        "HEARTBEAT_MIRROR_INTERVAL_SECONDS": "2",
        "VALKEY_ONLINE_MIRROR_SWEEP_SECONDS": "5",
    }
    if stores.sentinels:
        env |= {"VALKEY_SENTINELS": ",".join(stores.sentinels), "VALKEY_SENTINEL_MASTER": PREFIX}
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
    outcome = Run(Tally(), Invariant(), [])
    tally, invariant = outcome.tally, outcome.invariant
    expected = Expected()
    rng = random.Random(7)
    stop = asyncio.Event()
    async with _server(env, folder / "server.log") as address:
        async with AvailabilityClient(address, timeout=30.0) as setup:  # not under test yet
            for mitra in ids:
                await setup.set_online(mitra)
                expected.online[mitra], expected.active[mitra] = True, True
        first = Target(address, f"v{MIRROR_LAYOUT}")
        targets = [first]  # a call goes to the next one: the layout bump adds a second server
        turn = itertools.count()

        def target() -> Target:
            return targets[next(turn) % len(targets)]

        async def heartbeat() -> None:
            mitra, to = rng.choice(ids), target()
            phase, started = tally.phase, time.monotonic()
            try:
                await to.client.heartbeat(mitra)
            except grpc.aio.AioRpcError as exc:
                tally.add("Heartbeat", exc.code().name)
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    invariant.heartbeat(phase, started, mitra, False, to.name)
                return
            tally.add("Heartbeat", "OK")
            invariant.heartbeat(phase, started, mitra, True, to.name)

        async def find(limit: int) -> None:
            to, phase, started = target(), tally.phase, time.monotonic()
            try:
                reply = await to.stub.FindAvailableMitras(
                    pb.FindAvailableMitrasRequest(limit=limit)
                )
            except grpc.aio.AioRpcError as exc:
                tally.add("FindAvailableMitras", exc.code().name)
                return
            tally.add("FindAvailableMitras", "OK")
            source = pb.Source.Name(reply.source)
            tally.sources[(phase, "FindAvailableMitras", source)] += 1
            found = (UUID(m.mitra_id) for m in reply.mitras)
            invariant.offered(phase, started, found, source, to.name)

        async def reachable() -> None:
            mitra, to = invariant.pick(rng) or rng.choice(ids), target()
            phase, started = tally.phase, time.monotonic()
            try:
                reply = await to.stub.IsMitraReachable(
                    pb.IsMitraReachableRequest(mitra_id=str(mitra))
                )
            except grpc.aio.AioRpcError as exc:
                tally.add("IsMitraReachable", exc.code().name)
                return
            tally.add("IsMitraReachable", "OK")
            source = pb.Source.Name(reply.source)
            tally.sources[(phase, "IsMitraReachable", source)] += 1
            invariant.reachable(phase, started, mitra, reply.reachable, source, to.name)

        async def pairing() -> None:
            """What the pairing service does before a blast: is this one reachable, who is."""
            await reachable()
            await find(len(ids))

        async def dashboard() -> None:
            await _call(tally, "GetDashboardStats", target().client.get_dashboard_stats(50))

        async def watch() -> None:
            for watcher in watchers:
                invariant.watched(tally.phase, watcher)

        writers = [ids[i::4] for i in range(4)]  # each mitra has one writer: writes are ordered

        def writer(own: list[UUID]) -> Callable[[], Awaitable[None]]:
            async def write() -> None:
                mitra = rng.choice(own)
                kind = rng.random()
                to = target()
                client = to.client
                if kind < 0.45:
                    rpc, call, online, active = "SetOnline", client.set_online(mitra), True, None
                elif kind < 0.9:
                    rpc, call, online, active = "SetOffline", client.set_offline(mitra), False, None
                else:
                    flip = not expected.active.get(mitra, True)
                    if flip:
                        invariant.reactivating(mitra)
                    rpc, call = "SetMitraActive", client.set_mitra_active(mitra, flip)
                    online, active = (False if not flip else None), flip
                try:
                    await call
                except grpc.aio.AioRpcError as exc:
                    tally.add(rpc, exc.code().name)
                    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        return  # a deactivated mitra refused SetOnline: nothing changed
                    expected.online[mitra] = expected.active[mitra] = None
                    if active:
                        invariant.reactivation_failed(mitra)
                    return
                tally.add(rpc, "OK")
                if online is not None:
                    expected.online[mitra] = online
                if active is not None:
                    expected.active[mitra] = active
                if active is False:
                    invariant.deactivated(mitra, to.name)

            return write

        watchers = [Watcher(first.client.watch_available(), first.name) for _ in range(3)]
        tasks = [asyncio.create_task(_forever(heartbeat, 0.002, stop)) for _ in range(4)]
        tasks += [asyncio.create_task(_forever(lambda: find(20), 0.01, stop))]
        tasks += [asyncio.create_task(_forever(pairing, 0.005, stop)) for _ in range(2)]
        tasks += [asyncio.create_task(_forever(dashboard, 0.1, stop))]
        tasks += [asyncio.create_task(_forever(watch, 0.05, stop))]
        tasks += [asyncio.create_task(_forever(writer(w), 0.01, stop)) for w in writers]
        async with contextlib.AsyncExitStack() as stack:
            for watcher in watchers:
                stack.push_async_callback(_cancel, asyncio.create_task(watcher.follow()))
            faults = Faults(stores, env, folder, seconds, targets, outcome)
            stack.push_async_callback(faults.close)
            for phase in PHASES[stores.mode]:
                tally.phase = phase
                print(f"[chaos] {phase}", file=sys.stderr, flush=True)
                await faults.begin(phase)
                await asyncio.sleep(seconds)
                await faults.end(phase)
            stop.set()
            await asyncio.gather(*tasks)
            lives = [w.live for w in watchers]
            outcome.problems += await _check(stores, first.client, lives, expected)
        await first.close()
    outcome.problems += _unexpected(tally)
    errors = await asyncio.to_thread(_logged_errors, folder)
    if errors:
        outcome.problems.append(f"the server logged {len(errors)} errors, e.g. {errors[0]}")
    if invariant.total:
        # What the servers warned of says why: a mirror write that failed, a distrust.
        warned = [
            line
            for line in await asyncio.to_thread(_logged, folder, ("WARNING",))
            if any(word in line for word in ("write failed", "layout", "distrust", "breaker"))
        ]
        outcome.problems.append(
            f"the invariant broke: {invariant.summary()} (e.g."
            f" {next(iter(invariant.examples.values()))[0]}); the servers warned"
            f" {len(warned)} times of mirror writes, layouts or trust: {'; '.join(warned[:20])}"
        )
    if not sum(invariant.reads.values()):
        outcome.problems.append("no read was checked against the invariant")
    lines = _report(outcome, seconds, fleet_size, stores.mode)
    print("\n".join(lines))
    if report is not None:
        await asyncio.to_thread(report.write_text, "\n".join(lines) + "\n")
    return outcome


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Faults:
    """What each phase does to the stores and servers: at its start, and at the end of
    steady (the snapshot "valkey restored" brings back). Notes what it saw for the report."""

    def __init__(
        self,
        stores: Stores,
        env: dict[str, str],
        folder: Path,
        seconds: float,
        targets: list[Target],
        outcome: Run,
    ) -> None:
        self._stores = stores
        self._env = env
        self._folder = folder
        self._seconds = seconds
        self._targets = targets
        self._outcome = outcome
        self._newer = contextlib.AsyncExitStack()
        self._saved_at = 0.0

    async def begin(self, phase: str) -> None:
        stores, notes = self._stores, self._outcome.notes
        if phase == "valkey killed":
            await stores.do("valkey kill")
        elif phase == "valkey back":
            await stores.do("valkey start")
        elif phase == "valkey restored":
            since = self._outcome.invariant.since.values()
            newer = sum(at > self._saved_at for at in since)
            marker = await stores.do("valkey restore")
            notes[phase] = (
                f"{newer} mitras deactivated since the snapshot are active in it; it came back"
                f" with the marker {(marker or '')[:20]!r}..."
            )
        elif phase == "flushall":
            await stores.do("valkey flushall")
        elif phase == "layout bump":
            started = time.monotonic()
            self._targets.append(await self._start_newer())
            notes[phase] = f"v{MIRROR_LAYOUT + 1} served {time.monotonic() - started:.1f} s after"
            notes[phase] += " its start"
        elif phase == "layout rollback":
            del self._targets[1:]
            await asyncio.sleep(0.5)  # the calls already sent to it finish
            await self._newer.aclose()
            notes[phase] = await self._taken_back()
        elif phase == "postgres restarting":
            await stores.do("postgres stop")
            await asyncio.sleep(min(3.0, self._seconds / 2))
            await stores.do("postgres start")

    async def end(self, phase: str) -> None:
        if phase == "steady" and "valkey restored" in PHASES[self._stores.mode]:
            if not await self._stores.do("valkey save"):
                self._outcome.problems.append("no seed marker in the snapshot after steady")
            self._saved_at = time.monotonic()

    async def close(self) -> None:
        await self._newer.aclose()

    async def _start_newer(self) -> Target:
        """A server of the next layout on the same stores: a rolling upgrade's first step."""
        layout = MIRROR_LAYOUT + 1
        env = {**self._env, "MIRROR_LAYOUT": str(layout)}
        log = self._folder / f"server-v{layout}.log"
        target = Target(await self._newer.enter_async_context(_server(env, log)), f"v{layout}")
        self._newer.push_async_callback(target.close)
        return target

    async def _taken_back(self, timeout: float = 60.0) -> str:
        """Waits until this layout's seed marks the mirror again; says how long that took."""
        stopped = time.monotonic()
        ours = f"v{MIRROR_LAYOUT} "
        while not (await self._stores.do("valkey marker") or "").startswith(ours):
            if time.monotonic() - stopped > timeout:
                raise RuntimeError(f"v{MIRROR_LAYOUT} did not take the mirror back in {timeout:g}s")
            await asyncio.sleep(0.1)
        took = time.monotonic() - stopped
        return f"v{MIRROR_LAYOUT} reseeded the mirror {took:.1f} s after the stop"


def _logged_errors(folder: Path) -> list[str]:
    """ERROR lines of the server logs (an exception no caller saw is still a bug)."""
    return _logged(folder, ("ERROR", "CRITICAL"))


def _logged(folder: Path, levels: tuple[str, ...]) -> list[str]:
    found = []
    for log in _server_logs(folder):
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = {"level": "ERROR" if "Traceback" in line else "", "message": line}
            if record.get("level") in levels:
                message = str(record.get("message", "")).splitlines()[0]
                found.append(f"{log.name}: {record.get('time', '')} {message}")
    return found


def _unexpected(tally: Tally) -> list[str]:
    """Codes no caller should see: any but the domain's, and UNAVAILABLE outside the Postgres
    restart."""
    found = [
        f"{phase}: {rpc} {code} {n}"
        for (phase, rpc, code), n in sorted(tally.counts.items())
        if code != "OK"
        and code not in ALLOWED.get(rpc, set())
        and not (code == "UNAVAILABLE" and phase == "postgres restarting")
    ]
    if not found:
        return []
    return [f"calls answered codes a caller should not see (see the server log): {found}"]


async def _check(
    stores: Stores,
    client: AvailabilityClient,
    watchers: list[LiveAvailability],
    expected: Expected,
) -> list[str]:
    """After recovery: acknowledged writes in Postgres, mirror = Postgres (and this layout's),
    watchers in sync."""
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
    url = await stores.do("valkey url") or stores.valkey_url
    mirror: aredis.Redis = (
        aredis.RedisCluster.from_url(url, decode_responses=True)  # type: ignore[assignment]
        if stores.mode == "cluster"
        else aredis.Redis.from_url(url, decode_responses=True)
    )

    async def mirrored() -> list[str]:
        online = await mirror.smembers(keys.online)
        deactivated = await mirror.smembers(keys.deactivated)
        marker = str(await mirror.get(keys.seeded) or "")
        want_online = {str(m) for m, (o, a) in truth.items() if o and a}
        want_deactivated = {str(m) for m, (_, a) in truth.items() if not a}
        found = []
        if online != want_online:
            found.append(f"mirror online differs from Postgres by {len(online ^ want_online)}")
        if deactivated != want_deactivated:
            found.append("mirror deactivated differs from Postgres")
        if not marker.startswith(f"v{MIRROR_LAYOUT} "):
            found.append(f"the mirror is not trusted by layout v{MIRROR_LAYOUT}: {marker!r}")
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
        fresh = client.watch_available()
        async with fresh:
            await asyncio.wait_for(fresh.wait_in_sync(), 10)
        problems.append(
            f"{len(out)} of {len(watchers)} watchers not in sync with Find ("
            + "; ".join(
                f"in sync {w.in_sync} at revision {w.revision} after {w.reconnects} reconnects,"
                f" {len(set(w.mitras) - found)} extra and {len(found - set(w.mitras))} missing"
                for w in out
            )
            + f"; a new watcher starts at revision {fresh.revision})"
        )
    return problems


_DOES = {
    "steady": "no fault; at its end Valkey saves a snapshot (SAVE), set aside",
    "valkey restored": "Valkey killed and started again from the snapshot of the end of steady:"
    " an older data set, the seed's marker inside it",
    "flushall": "FLUSHALL on the live Valkey",
    "layout bump": f"a second server with MIRROR_LAYOUT={MIRROR_LAYOUT + 1} starts on the same"
    " stores (the phase's time starts once it serves); every call alternates between the two",
    "layout rollback": f"calls go to v{MIRROR_LAYOUT} alone again, the v{MIRROR_LAYOUT + 1} server"
    f" is stopped; the phase lasts until v{MIRROR_LAYOUT} reseeded the mirror, then its time",
    "postgres restarting": "Postgres stopped, and started a few seconds later",
    "recovery": "no fault",
}
_DOES_BY_MODE = {
    "single": {
        "valkey killed": "Valkey SIGKILLed",
        "valkey back": "Valkey restarted, empty",
    },
    "cluster": {
        "steady": "no fault",
        "valkey killed": "the master serving the mirror's slot SIGKILLed; the phase's time starts"
        " once a replica took over",
        "valkey back": "the old master restarted; it rejoins as a replica",
    },
    "sentinel": {
        "steady": "no fault",
        "valkey killed": "the primary SIGKILLed; the phase's time starts once the sentinels"
        " promoted the replica",
        "valkey back": "the old primary restarted; the sentinels make it a replica",
    },
}
_TITLES = {
    "single": ("", "`python -m bench.chaos`", "one Valkey"),
    "cluster": (
        " on a Valkey Cluster",
        "`python -m bench.chaos --cluster`",
        "a local Valkey Cluster of 3 masters and 3 replicas",
    ),
    "sentinel": (
        " on Valkey Sentinel",
        "`python -m bench.chaos --sentinel`",
        "a local Valkey primary and replica watched by three sentinels (quorum 2), the service"
        " in Sentinel mode",
    ),
}


def _report(outcome: Run, seconds: float, mitras: int, mode: str) -> list[str]:
    tally, invariant = outcome.tally, outcome.invariant
    phases = PHASES[mode]
    rpcs = sorted({rpc for _, rpc, _ in tally.counts})
    title, command, stores = _TITLES[mode]
    lines = [
        f"# Chaos run{title}",
        "",
        f"{command} on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {mitras} mitras, {seconds:g} s a"
        f" phase, on {stores}.",
        "",
        "| phase | fault |",
        "| --- | --- |",
    ]
    for phase in phases:
        does = _DOES_BY_MODE[mode].get(phase) or _DOES[phase]
        note = f" ({outcome.notes[phase]})" if phase in outcome.notes else ""
        lines.append(f"| {phase} | {does}{note} |")
    lines += [
        "",
        "Requests by phase and RPC: `OK` and the error codes seen. Heartbeats go to random",
        "mitras, deactivated ones included: their PERMISSION_DENIED is the guard working, as is",
        "FAILED_PRECONDITION for SetOnline of a deactivated mitra.",
        "",
        "| phase | " + " | ".join(rpcs) + " |",
        "| --- | " + " | ".join("---" for _ in rpcs) + " |",
    ]
    for phase in phases:
        cells = []
        for rpc in rpcs:
            codes = {c: n for (p, r, c), n in tally.counts.items() if p == phase and r == rpc}
            cells.append(", ".join(f"{c} {n:,}" for c, n in sorted(codes.items())) or "-")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    reads = sum(invariant.reads.values())
    lines += [
        "",
        "## No deactivated mitra served",
        "",
        "Once a deactivation (SetMitraActive active=false) was acknowledged, the mitra must not",
        "be reachable (IsMitraReachable) or offered (FindAvailableMitras, whose answers are",
        "checked against every mitra under the check), nor its heartbeat taken, in a call that",
        "started after the acknowledgement, until a reactivation of it was sent. An in-sync",
        f"watcher's set may hold it for {WATCH_GRACE_SECONDS:g} s (the stream is asynchronous).",
        f"Reads checked: {reads:,} ({sum(invariant.pairs.values()):,} read-mitra pairs)."
        f" Violations: {invariant.total:,}: {invariant.summary()}.",
        "",
        "| phase | reads checked | from cache | from database | heartbeats checked"
        " | watcher sets checked | violations |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for phase in phases:
        by_source = collections.Counter[str]()
        for (p, _, source), n in tally.sources.items():
            if p == phase:
                by_source[source] += n
        broken = ", ".join(
            f"{what} {n:,} ({len(invariant.mitras[(p, what)])} mitras)"
            for (p, what), n in sorted(invariant.violations.items())
            if p == phase
        )
        lines.append(
            f"| {phase} | {invariant.reads[phase]:,} | {by_source['SOURCE_CACHE']:,}"
            f" | {by_source['SOURCE_DATABASE']:,} | {invariant.heartbeats[phase]:,}"
            f" | {invariant.samples[phase]:,} | {broken or 0} |"
        )
    lines += ["", "(sources: every FindAvailableMitras and IsMitraReachable answer of the phase)"]
    if invariant.examples:
        lines += ["", "The first violations of each kind, by phase:", ""]
        lines += [f"- {e}" for examples in invariant.examples.values() for e in examples]
    lines += [
        "",
        "Checks after recovery, and of the codes callers saw: "
        + ("; ".join(outcome.problems) if outcome.problems else "all passed"),
        "(every acknowledged write is in Postgres, the mirror equals Postgres under this",
        "layout's seed, every watcher is in sync and equals FindAvailableMitras, and no call",
        "answered a code other than the domain's, or UNAVAILABLE while Postgres restarted)",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds-per-phase", type=float, default=12.0)
    parser.add_argument("--mitras", type=int, default=300)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cluster", action="store_true", help="on a local Valkey Cluster")
    where.add_argument("--sentinel", action="store_true", help="on a local Valkey Sentinel")
    args = parser.parse_args()
    mode = "cluster" if args.cluster else "sentinel" if args.sentinel else "single"
    report = HERE / ("CHAOS.md" if mode == "single" else f"CHAOS-{mode}.md")
    outcome = asyncio.run(run(args.seconds_per_phase, args.mitras, report, mode=mode))
    sys.exit(1 if outcome.problems else 0)


if __name__ == "__main__":
    main()
