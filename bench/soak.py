"""Issue 33: `availability serve` under realistic mixed load for a long time, with a store
fault every few minutes; every minute, what the process and the stores hold. Writes
bench/SOAK.md and bench/soak.png.

    python -m bench.soak [--minutes 60] [--fault-every 240] [--sample 60] [--mitras 2000]

(`make soak`: SOAK_MINUTES, SOAK_FAULT_EVERY, SOAK_SAMPLE_SECONDS, SOAK_MITRAS.)

Own throwaway Postgres and Valkey (bench.chaos's keeper), each behind a fault proxy
(tests/fault_proxy.py, in a thread of its own) that the server reaches them through. The load,
from this process:

- the demo fleet's apps and chats (availability.demo_traffic: heartbeats alone, online and
  offline churn, quiet spells, deactivations, the chat backend's own SQL on chat_sessions,
  straight to Postgres as that backend's is);
- a gateway fleet heartbeating in batches (BatchHeartbeat of 100, each mitra every 15 s);
- the pairing service: IsMitraReachable of recently deactivated mitras, FindAvailableMitras of
  the whole fleet, watchers (WatchAvailableMitras) that come and go;
- the dashboard: GetDashboardStats, and WatchDashboardStats streams that come and go;
- bench.chaos's writers on a fleet of their own (SetOnline, SetOffline, SetMitraActive), whose
  acknowledged deactivations arm its invariant: no read, heartbeat or in-sync watcher serves
  such a mitra afterwards.

The faults, in turn, one each --fault-every seconds after a warm-up of that length: Valkey
restarted (killed, started empty), Valkey slow, Postgres slow (the proxy delays each chunk
towards the server), Postgres restarted. During a slow store, `availability status` must name it.

It fails (exit 1) when: the invariant broke; a call answered a code no caller should see
(UNAVAILABLE and DEADLINE_EXCEEDED are expected while Postgres is slow or restarting); a slow
store was not named by `availability status`; after recovery the stores differ or a watcher is
out of sync (bench.chaos's check); a resource grew by more than --growth over the last half
of the run (30 minutes at most); an RPC's p99 in the last minute before each next fault was
not back near its warm-up baseline; the server logged an ERROR.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg
import grpc
import redis.asyncio as aredis
from prometheus_client.parser import text_string_to_metric_families

from availability import local_stores
from availability.client import AvailabilityClient
from availability.demo_traffic import DemoTraffic
from availability.settings import MIRROR_LAYOUT, Settings
from availability.status import gather
from availability.timing import BUCKETS, quantile
from availability.v1 import availability_pb2 as pb
from bench import chaos
from tests.fault_proxy import FaultProxy

HERE = Path(__file__).parent
_DEFAULTS = {f.name: f.default for f in fields(Settings)}

FAULTS = ("valkey restart", "valkey slow", "postgres slow", "postgres restart")
FAULT_SECONDS = 30.0
"""How long a slow store stays slow, and how long after a restart began its phase lasts."""
VALKEY_DELAY = 0.08
POSTGRES_DELAY = 0.6
"""Seconds the proxy holds each chunk towards the server: above VALKEY_SLOW_SECONDS (0.05)
and POSTGRES_SLOW_SECONDS (0.5); a write is one round trip, so its time is about the delay."""
RECOVERED_SECONDS = 60.0
"""The p99 after a fault: over this long just before the next one (the baseline: the same
length at the end of the warm-up)."""
BACK_FACTOR, BACK_SLACK = 2.0, 0.010
"""p99 is back when at most BACK_FACTOR x baseline + BACK_SLACK (a shared 2-core machine)."""
CHECKED_METHODS = (
    "Heartbeat",
    "BatchHeartbeat",
    "FindAvailableMitras",
    "IsMitraReachable",
    "SetOnline",
    "SetOffline",
    "GetDashboardStats",
)
RESOURCES = {
    "rss_mb": "server RSS (MB)",
    "fds": "server open fds",
    "tasks": "server asyncio tasks",
    "valkey_pool": "server's Valkey connections",
    "postgres_pool": "server's Postgres pool",
    "valkey_clients": "Valkey clients (all)",
    "postgres_connections": "Postgres connections (all)",
    "valkey_memory_mb": "Valkey used memory (MB)",
}
UNEXPECTED_OK_IN = ("postgres slow", "postgres restart")
"""Phases where UNAVAILABLE and DEADLINE_EXCEEDED are the service's right answer."""


@dataclass
class Sample:
    at: float
    """Seconds since the load started."""
    phase: str
    resources: dict[str, float]
    p99: dict[str, float]
    """Per method, over the interval since the sample before."""


@dataclass
class Fault:
    kind: str
    started: float
    ended: float = 0.0
    named: bool | None = None
    """Slow store: whether `availability status` named it while it lasted."""
    p99_after: dict[str, float] = field(default_factory=dict)


@dataclass
class Soak:
    samples: list[Sample] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    baseline: dict[str, float] = field(default_factory=dict)
    growth: dict[str, float] = field(default_factory=dict)
    tally: chaos.Tally = field(default_factory=chaos.Tally)
    invariant: chaos.Invariant = field(default_factory=chaos.Invariant)
    problems: list[str] = field(default_factory=list)
    demo: str = ""
    fault_seconds: float = FAULT_SECONDS
    recovered_seconds: float = RECOVERED_SECONDS
    back_factor: float = BACK_FACTOR
    back_slack: float = BACK_SLACK


class _Proxies:
    """The two fault proxies, on an event loop in a thread of their own, so this process's
    load never delays the bytes they carry."""

    def __init__(self, valkey_port: int, postgres_port: int) -> None:
        self._started = threading.Event()
        self.valkey = FaultProxy(valkey_port)
        self.postgres = FaultProxy(postgres_port)
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        self._started.wait(10)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with self.valkey, self.postgres:
            self._started.set()
            await self._stop.wait()

    def call(self, proxy: FaultProxy, action: Callable[..., None], *args: float) -> None:
        assert proxy.loop is not None
        proxy.loop.call_soon_threadsafe(action, *args)

    def close(self) -> None:
        if self._stop is not None and self.valkey.loop is not None:
            self.valkey.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.replace(f":{parts.port}", f":{port}")).geturl()


Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def _scrape(port: int) -> Scrape:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            return str(reply.read().decode())

    found: Scrape = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _buckets(scrape: Scrape) -> dict[str, list[float]]:
    """Cumulative RPC latency buckets per method (every caller together)."""
    by: dict[str, list[float]] = defaultdict(lambda: [0.0] * (len(BUCKETS) + 1))
    for (name, labels), value in scrape.items():
        if name != "grpc_server_handling_seconds_bucket":
            continue
        label = dict(labels)
        bound = float(label["le"])
        at = len(BUCKETS) if bound == float("inf") else BUCKETS.index(bound)
        by[label["grpc_method"]][at] += value
    return dict(by)


def _p99(before: dict[str, list[float]], after: dict[str, list[float]]) -> dict[str, float]:
    found = {}
    for method, counts in after.items():
        window = [
            b - a for a, b in zip(before.get(method, [0.0] * len(counts)), counts, strict=True)
        ]
        if window[-1] >= 20:
            found[method] = quantile(0.99, window)
    return found


def _total(scrape: Scrape, name: str) -> float:
    return sum(v for (n, _), v in scrape.items() if n == name)


async def _resources(scrape: Scrape, valkey: aredis.Redis, db: asyncpg.Pool) -> dict[str, float]:
    info = await valkey.info()
    connections = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
    )
    return {
        "rss_mb": _total(scrape, "process_resident_memory_bytes") / 2**20,
        "fds": _total(scrape, "process_open_fds"),
        "tasks": _total(scrape, "availability_asyncio_tasks"),
        "valkey_pool": _total(scrape, "availability_valkey_connections"),
        "postgres_pool": _total(scrape, "availability_postgres_pool_connections"),
        "valkey_clients": float(info["connected_clients"]),
        "postgres_connections": float(connections),
        "valkey_memory_mb": float(info["used_memory"]) / 2**20,
    }


def growth(samples: list[Sample], resource: str, window: float) -> float:
    """The least-squares change of a resource over the last `window` seconds, relative to its
    mean there: a trend, which one fault's spike or dip moves little."""
    points = [(s.at, s.resources[resource]) for s in samples if s.at >= samples[-1].at - window]
    if len(points) < 3:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if not spread or not mean_v:
        return 0.0
    slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / spread
    return slope * (points[-1][0] - points[0][0]) / mean_v


async def run(
    minutes: float,
    *,
    fault_every: float = 240.0,
    sample_seconds: float = 60.0,
    mitras: int = 2000,
    fault_seconds: float = FAULT_SECONDS,
    recovered_seconds: float = RECOVERED_SECONDS,
    max_growth: float = 0.05,
    back_factor: float = BACK_FACTOR,
    back_slack: float = BACK_SLACK,
    report: Path | None = None,
    plot: Path | None = None,
) -> Soak:
    with tempfile.TemporaryDirectory(prefix="availability-soak-") as tmp:
        folder = Path(tmp)
        stores = chaos.Stores(folder, "single")
        proxies = _Proxies(_port(stores.valkey_url), _port(stores.dsn))
        try:
            soak = await _Run(stores, proxies, folder, fault_seconds, recovered_seconds).run(
                minutes * 60, fault_every, sample_seconds, mitras
            )
        finally:
            proxies.close()
            await stores.close()
        errors = await asyncio.to_thread(chaos._logged_errors, folder)
        soak.problems += [f"the server logged: {e}" for e in errors[:5]]
        kept = (
            Path(tempfile.gettempdir()) / f"availability-soak-{time.strftime('%Y%m%d-%H%M%S')}.log"
        )
        await asyncio.to_thread(shutil.copyfile, folder / "server.log", kept)
        print(f"[soak] server log: {kept}", file=sys.stderr, flush=True)
    soak.back_factor, soak.back_slack = back_factor, back_slack
    _judge(soak, minutes * 60, max_growth)
    lines = _report(soak, minutes, fault_every, sample_seconds, mitras, plot)
    print("\n".join(lines))
    if report is not None:
        await asyncio.to_thread(report.write_text, "\n".join(lines) + "\n")
    if plot is not None:
        await asyncio.to_thread(_plot, soak, plot)
    return soak


class _Run:
    def __init__(
        self,
        stores: chaos.Stores,
        proxies: _Proxies,
        folder: Path,
        fault_seconds: float,
        recovered_seconds: float,
    ) -> None:
        self.stores, self.proxies, self.folder = stores, proxies, folder
        self.fault_seconds, self.recovered_seconds = fault_seconds, recovered_seconds
        self.soak = Soak(fault_seconds=fault_seconds, recovered_seconds=recovered_seconds)
        self.rng = random.Random(33)
        self.stop = asyncio.Event()
        self.metrics_port = local_stores.free_port()
        self.env = {
            **os.environ,
            "DATABASE_URL": _via(stores.dsn, proxies.postgres.port),
            "VALKEY_URL": _via(stores.valkey_url, proxies.valkey.port),
            "VALKEY_KEY_PREFIX": chaos.PREFIX,
            "LOG_LEVEL": "WARNING",
            "METRICS_ADDRESS": f"127.0.0.1:{self.metrics_port}",
            "MIRROR_LAYOUT": str(MIRROR_LAYOUT),
            "MITRA_AUTO_OFFLINE_SWEEP_SECONDS": "10",
            "HEARTBEAT_MIRROR_INTERVAL_SECONDS": "15",
            "VALKEY_ONLINE_MIRROR_SWEEP_SECONDS": "60",
            # The production thresholds, whatever the environment says (the test suite
            # raises them for its loaded machine): the soak checks that status names a slow
            # store.
            "VALKEY_SLOW_SECONDS": str(_DEFAULTS["valkey_slow_seconds"]),
            "POSTGRES_SLOW_SECONDS": str(_DEFAULTS["postgres_slow_seconds"]),
        }
        self.started = 0.0

    @property
    def now(self) -> float:
        return time.monotonic() - self.started

    async def run(
        self, seconds: float, fault_every: float, sample_seconds: float, mitras: int
    ) -> Soak:
        migrate = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "availability", "migrate", env=self.env
        )
        if await migrate.wait() != 0:
            raise RuntimeError("availability migrate failed")
        db = await asyncpg.create_pool(self.stores.dsn, min_size=1, max_size=4)
        valkey = aredis.Redis.from_url(self.stores.valkey_url, socket_timeout=5)
        insert = (
            "INSERT INTO mitras (display_name, max_concurrent_sessions)"
            " SELECT $1 || g, $3 FROM generate_series(1, $2) g RETURNING id"
        )
        await db.fetch(insert, "Demo ", mitras, 3)
        async with (
            chaos._server(self.env, self.folder / "server.log") as address,
            AvailabilityClient(address, timeout=chaos.DEADLINE_SECONDS, attempts=2) as client,
        ):
            target = chaos.Target(address, f"v{MIRROR_LAYOUT}")
            demo = DemoTraffic(client, db)
            demo_task = asyncio.create_task(demo.run())
            await demo.started.wait()
            # The gateway's mitras take no chats (capacity 0: reachable, never available), so
            # the demo's chats go to mitras the demo drives, which accept them.
            gateway = [r["id"] for r in await db.fetch(insert, "Gateway ", mitras // 2, 0)]
            checked = [r["id"] for r in await db.fetch(insert, "Checked ", 60, 3)]
            expected = chaos.Expected()
            async with AvailabilityClient(address, timeout=30.0) as setup:
                for mitra in [*gateway, *checked]:
                    await setup.set_online(mitra)
                for mitra in checked:
                    expected.online[mitra], expected.active[mitra] = True, True
            self.started = time.monotonic()
            load = _Load(self, target, gateway, checked, expected)
            tasks = load.start()
            watchers = _Watchers(self, target)
            tasks.append(asyncio.create_task(watchers.run()))
            tasks.append(asyncio.create_task(self._dashboards(client)))
            sampler = asyncio.create_task(self._sample(db, valkey, sample_seconds))
            try:
                await self._faults(seconds, fault_every, address)
            finally:
                self.stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
                await chaos._cancel(sampler)
                self.soak.demo = demo.summary(30.0)
                await chaos._cancel(demo_task)
            lives = [w.live for w in watchers.open]
            self.soak.problems += await chaos._check(self.stores, client, lives, expected)
            await watchers.close()
            await target.close()
        await valkey.aclose()
        await db.close()
        self.soak.problems += _unexpected(self.soak.tally)
        return self.soak

    async def _faults(self, seconds: float, fault_every: float, address: str) -> None:
        """Warm-up (its last minute is the baseline), then one fault each fault_every s."""
        tally, port = self.soak.tally, self.metrics_port
        tally.phase = "warm-up"
        warm = min(fault_every, seconds)
        await self._until(warm - self.recovered_seconds)
        before = _buckets(await _scrape(port))
        await self._until(warm)
        self.soak.baseline = _p99(before, _buckets(await _scrape(port)))
        turn = 0
        while (start := warm + turn * fault_every) + fault_every <= seconds + 1:
            await self._until(start)
            kind = FAULTS[turn % len(FAULTS)]
            turn += 1
            fault = Fault(kind, self.now)
            self.soak.faults.append(fault)
            print(f"[soak] {self.now / 60:5.1f} min: {kind}", file=sys.stderr, flush=True)
            tally.phase = kind
            await self._inflict(fault, address)
            fault.ended = self.now
            tally.phase = f"after {kind}"
            end = start + fault_every
            await self._until(end - self.recovered_seconds)
            before = _buckets(await _scrape(port))
            await self._until(end)
            fault.p99_after = _p99(before, _buckets(await _scrape(port)))

    async def _until(self, at: float) -> None:
        if (wait := at - self.now) > 0:
            await asyncio.sleep(wait)

    async def _inflict(self, fault: Fault, address: str) -> None:
        proxies, stores = self.proxies, self.stores
        until = fault.started + self.fault_seconds
        if fault.kind == "valkey restart":
            await stores.do("valkey kill")
            await asyncio.sleep(1.0)
            await stores.do("valkey start")
        elif fault.kind == "postgres restart":
            await stores.do("postgres stop")
            await asyncio.sleep(3.0)
            await stores.do("postgres start")
        else:
            proxy = proxies.valkey if fault.kind == "valkey slow" else proxies.postgres
            delay = VALKEY_DELAY if fault.kind == "valkey slow" else POSTGRES_DELAY
            proxies.call(proxy, proxy.slow, 0.0, delay)
            try:
                async with asyncio.timeout(max(0.1, until - self.now)):
                    fault.named = await self._named(fault.kind, address)
                await self._until(until)
            except TimeoutError:
                fault.named = False
            finally:
                proxies.call(proxy, proxy.heal)
        await self._until(until)

    async def _named(self, kind: str, address: str) -> bool:
        """Once `availability status` names the slow store (the caller bounds the wait)."""
        settings = Settings.from_env(self.env)
        store = "Valkey slow" if kind == "valkey slow" else "Postgres slow"
        while True:
            with contextlib.suppress(Exception):
                report = await gather(settings, address=address, timeout=3.0)
                if any(store in problem for problem in report["problems"]):
                    return True
            await asyncio.sleep(1.0)

    async def _sample(self, db: asyncpg.Pool, valkey: aredis.Redis, every: float) -> None:
        last = _buckets(await _scrape(self.metrics_port))
        while True:
            await asyncio.sleep(every)
            for attempt in range(5):
                try:
                    scrape = await _scrape(self.metrics_port)
                    resources = await _resources(scrape, valkey, db)
                    break
                except Exception as exc:  # a store restarting: try again in a moment
                    print(f"[soak] sample {attempt}: {exc!r}", file=sys.stderr, flush=True)
                    await asyncio.sleep(2.0)
            else:
                continue
            now = _buckets(scrape)
            self.soak.samples.append(
                Sample(self.now, self.soak.tally.phase, resources, _p99(last, now))
            )
            last = now

    async def _dashboards(self, client: AvailabilityClient) -> None:
        """The CC dashboard: a poll every 2 s, and up to two streams open, 30-120 s each."""

        async def stream() -> None:
            try:
                async with asyncio.timeout(self.rng.uniform(30, 120)):
                    async for _ in client.watch_dashboard_stats(timedelta(seconds=2)):
                        if self.stop.is_set():
                            return
            except (TimeoutError, grpc.aio.AioRpcError):
                pass

        streams: set[asyncio.Task[None]] = set()
        while not self.stop.is_set():
            while len(streams) < 2:
                streams.add(task := asyncio.create_task(stream()))
                task.add_done_callback(streams.discard)
            await chaos._call(self.soak.tally, "GetDashboardStats", client.get_dashboard_stats(20))
            await asyncio.sleep(2.0)
        for task in list(streams):
            await chaos._cancel(task)


class _Load:
    """The gateway's batches, and bench.chaos's writers, heartbeats and pairing reads on the
    checked fleet (its invariant)."""

    def __init__(
        self,
        run: _Run,
        target: chaos.Target,
        gateway: list[UUID],
        checked: list[UUID],
        expected: chaos.Expected,
    ) -> None:
        self.run, self.target = run, target
        self.gateway, self.checked, self.expected = gateway, checked, expected
        self.tally, self.invariant = run.soak.tally, run.soak.invariant
        self.rng = run.rng

    def start(self) -> list[asyncio.Task[None]]:
        stop = self.run.stop
        writers = [self.checked[i::4] for i in range(4)]
        steps: list[tuple[Callable[[], Awaitable[object]], float]] = [
            (self.heartbeat, 0.1),
            (self.pairing, 0.5),
            *((self.writer(w), 0.5) for w in writers),
        ]
        tasks = [asyncio.create_task(chaos._forever(step, pause, stop)) for step, pause in steps]
        tasks.append(asyncio.create_task(self.batches()))
        return tasks

    async def batches(self) -> None:
        """Each gateway mitra every 15 s, in batches of 100 spread over the 15 s; one the
        service took offline (the auto-offline sweep after a restart) is set online again."""
        batches = [self.gateway[i : i + 100] for i in range(0, len(self.gateway), 100)]
        client = self.target.client
        while not self.run.stop.is_set():
            for batch in batches:
                try:
                    results = await client.batch_heartbeat(batch)
                except grpc.aio.AioRpcError as exc:
                    self.tally.add("BatchHeartbeat", exc.code().name)
                else:
                    self.tally.add("BatchHeartbeat", "OK")
                    offline = [m for m, r in zip(batch, results, strict=True) if not r.online]
                    for mitra in offline:
                        await chaos._call(self.tally, "SetOnline", client.set_online(mitra))
                if self.run.stop.is_set():
                    return
                await asyncio.sleep(15.0 / len(batches))

    async def heartbeat(self) -> None:
        mitra = self.rng.choice(self.checked)
        phase, started = self.tally.phase, time.monotonic()
        try:
            await self.target.stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra)))
        except grpc.aio.AioRpcError as exc:
            self.tally.add("Heartbeat", exc.code().name)
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                self.invariant.heartbeat(phase, started, mitra, False, self.target.name)
            return
        self.tally.add("Heartbeat", "OK")
        self.invariant.heartbeat(phase, started, mitra, True, self.target.name)

    async def pairing(self) -> None:
        """Before a blast: is this recently deactivated one reachable; who is available."""
        stub, name = self.target.stub, self.target.name
        mitra = self.invariant.pick(self.rng) or self.rng.choice(self.checked)
        phase, started = self.tally.phase, time.monotonic()
        try:
            reply = await stub.IsMitraReachable(pb.IsMitraReachableRequest(mitra_id=str(mitra)))
        except grpc.aio.AioRpcError as exc:
            self.tally.add("IsMitraReachable", exc.code().name)
        else:
            self.tally.add("IsMitraReachable", "OK")
            source = pb.Source.Name(reply.source)
            self.invariant.reachable(phase, started, mitra, reply.reachable, source, name)
        phase, started = self.tally.phase, time.monotonic()
        try:
            found = await stub.FindAvailableMitras(pb.FindAvailableMitrasRequest(limit=10_000))
        except grpc.aio.AioRpcError as exc:
            self.tally.add("FindAvailableMitras", exc.code().name)
            return
        self.tally.add("FindAvailableMitras", "OK")
        offered = (UUID(m.mitra_id) for m in found.mitras)
        self.invariant.offered(phase, started, offered, pb.Source.Name(found.source), name)

    def writer(self, own: list[UUID]) -> Callable[[], Awaitable[None]]:
        """bench.chaos's writer: each checked mitra has one, so its writes are ordered."""
        client, expected, invariant = self.target.client, self.expected, self.invariant

        async def write() -> None:
            mitra, kind = self.rng.choice(own), self.rng.random()
            call: Coroutine[Any, Any, object]
            online: bool | None
            active: bool | None
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
                self.tally.add(rpc, exc.code().name)
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    return
                expected.online[mitra] = expected.active[mitra] = None
                if active:
                    invariant.reactivation_failed(mitra)
                return
            self.tally.add(rpc, "OK")
            if online is not None:
                expected.online[mitra] = online
            if active is not None:
                expected.active[mitra] = active
            if active is False:
                invariant.deactivated(mitra, self.target.name)

        return write


class _Watchers:
    """The pairing service's live sets: four open at a time, each for 20-90 s, every in-sync
    one checked against the invariant five times a second."""

    def __init__(self, run: _Run, target: chaos.Target) -> None:
        self.owner, self.target = run, target
        self.open: list[chaos.Watcher] = []
        self._following: dict[int, tuple[asyncio.Task[None], float]] = {}

    async def run(self) -> None:
        soak, rng = self.owner.soak, self.owner.rng
        while not self.owner.stop.is_set():
            now = time.monotonic()
            for watcher in list(self.open):
                task, until = self._following[id(watcher)]
                if until <= now:
                    await self._close(watcher)
            while len(self.open) < 4:
                watcher = chaos.Watcher(self.target.client.watch_available(), self.target.name)
                task = asyncio.create_task(watcher.follow())
                self._following[id(watcher)] = (task, now + rng.uniform(20, 90))
                self.open.append(watcher)
            for watcher in self.open:
                soak.invariant.watched(soak.tally.phase, watcher)
            await asyncio.sleep(0.2)

    async def _close(self, watcher: chaos.Watcher) -> None:
        task, _ = self._following.pop(id(watcher))
        self.open.remove(watcher)
        await chaos._cancel(task)

    async def close(self) -> None:
        for watcher in list(self.open):
            await self._close(watcher)


def _unexpected(tally: chaos.Tally) -> list[str]:
    found = [
        f"{phase}: {rpc} {code} {n}"
        for (phase, rpc, code), n in sorted(tally.counts.items())
        if code != "OK"
        and code not in chaos.ALLOWED.get(rpc, set())
        and not (
            code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
            and phase.removeprefix("after ") in UNEXPECTED_OK_IN
        )
    ]
    return [f"calls answered codes a caller should not see: {found}"] if found else []


def _judge(soak: Soak, seconds: float, max_growth: float) -> None:
    """The invariant, the slow stores named, the growth over the last half (at most 30
    minutes), and every p99 back near its baseline."""
    if soak.invariant.total:
        examples = [e for found in soak.invariant.examples.values() for e in found]
        soak.problems.append(f"the invariant broke: {soak.invariant.summary()}")
        soak.problems += [f"e.g. {example}" for example in examples[:6]]
    if not sum(soak.invariant.reads.values()):
        soak.problems.append("no read was checked against the invariant")
    for fault in soak.faults:
        if fault.named is False:
            soak.problems.append(f"{fault.kind} at {fault.started / 60:.1f} min: status silent")
    if len(soak.samples) < 3:
        soak.problems.append(f"only {len(soak.samples)} samples")
        return
    window = min(30 * 60, seconds / 2)
    for resource, title in RESOURCES.items():
        soak.growth[resource] = change = growth(soak.samples, resource, window)
        if change > max_growth:
            soak.problems.append(
                f"{title} grew {change:.1%} over the last {window / 60:.0f} min (at most "
                f"{max_growth:.0%})"
            )
    for fault in soak.faults:
        for method in CHECKED_METHODS:
            base, after = soak.baseline.get(method), fault.p99_after.get(method)
            if (
                base is not None
                and after is not None
                and after > soak.back_factor * base + soak.back_slack
            ):
                soak.problems.append(
                    f"{method} p99 {after * 1000:.1f} ms before the fault after "
                    f"{fault.kind} at {fault.started / 60:.1f} min, baseline {base * 1000:.1f} ms"
                )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _report(
    soak: Soak, minutes: float, fault_every: float, sample: float, mitras: int, plot: Path | None
) -> list[str]:
    first, last = (
        soak.samples[0] if soak.samples else None,
        soak.samples[-1] if soak.samples else None,
    )
    lines = [
        "# Soak",
        "",
        f"Made by `python -m bench.soak --minutes {minutes:g} --fault-every {fault_every:g}"
        f" --sample {sample:g} --mitras {mitras}` on {time.strftime('%Y-%m-%d')}"
        f" ({os.cpu_count()} cores, shared with other work). A fault every {fault_every / 60:g}"
        f" min after a warm-up as long, in turn: {', '.join(FAULTS)} (slow: the proxy holds"
        f" each chunk towards the server {VALKEY_DELAY * 1000:.0f} ms for Valkey,"
        f" {POSTGRES_DELAY * 1000:.0f} ms for Postgres, for {soak.fault_seconds:.0f} s).",
        "",
        f"Load: {mitras} demo mitras (availability.demo_traffic: apps and chats),"
        f" {mitras // 2} gateway mitras in BatchHeartbeat, 60 checked mitras (bench.chaos's"
        " writers and invariant), pairing reads, 4 watchers and 2 dashboard streams coming and"
        " going.",
        "",
        f"The demo traffic's last report (it counts 30 s at a time): {soak.demo}",
        "",
        "## Resources",
        "",
        f"Sampled every {sample:g} s. Growth: the least-squares trend over the last 30 minutes"
        " (half the run when shorter), relative to the mean there; target under 5 %.",
        "",
        "| resource | first | last | min | max | growth, last 30 min |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for resource, title in RESOURCES.items():
        values = [s.resources[resource] for s in soak.samples]
        if not values or first is None or last is None:
            continue
        lines.append(
            f"| {title} | {first.resources[resource]:.1f} | {last.resources[resource]:.1f} |"
            f" {min(values):.1f} | {max(values):.1f} | {soak.growth.get(resource, 0.0):+.1%} |"
        )
    lines += [
        "",
        "## RPC p99 after each fault",
        "",
        f"p99 (ms) over the last {soak.recovered_seconds:.0f} s before the next fault, against"
        f" the last {soak.recovered_seconds:.0f} s of the warm-up (baseline); back: at most"
        f" {soak.back_factor:g} x baseline + {soak.back_slack * 1000:.0f} ms. Slow store named:"
        " whether `availability status` listed it as a problem while it lasted.",
        "",
        "| fault | at (min) | named | " + " | ".join(CHECKED_METHODS) + " |",
        "| --- | ---: | --- | " + " | ".join("---:" for _ in CHECKED_METHODS) + " |",
        "| baseline | | | " + " | ".join(_ms(soak.baseline.get(m)) for m in CHECKED_METHODS) + " |",
    ]
    for fault in soak.faults:
        named = {None: "", True: "yes", False: "NO"}[fault.named]
        lines.append(
            f"| {fault.kind} | {fault.started / 60:.1f} | {named} | "
            + " | ".join(_ms(fault.p99_after.get(m)) for m in CHECKED_METHODS)
            + " |"
        )
    calls = sum(soak.tally.counts.values())
    codes: dict[str, int] = defaultdict(int)
    for (_, _, code), n in soak.tally.counts.items():
        codes[code] += n
    lines += [
        "",
        "## Calls and the invariant",
        "",
        f"{calls:,} calls from the checked load (the demo traffic's not counted here): "
        + ", ".join(f"{code} {n:,}" for code, n in sorted(codes.items())),
        "",
        f"Invariant: {soak.invariant.summary()}.",
        "",
        "## Problems",
        "",
        *([f"- {p}" for p in soak.problems] or ["None."]),
    ]
    if plot is not None:
        lines += ["", f"![soak curves]({plot.name})"]
    return lines


def _plot(soak: Soak, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.at / 60 for s in soak.samples]
    panels = [
        ("Server RSS (MB)", ["rss_mb"]),
        ("Server fds and tasks", ["fds", "tasks"]),
        ("Connections", ["valkey_pool", "postgres_pool", "valkey_clients", "postgres_connections"]),
        ("Valkey used memory (MB)", ["valkey_memory_mb"]),
    ]
    figure, axes = plt.subplots(5, 1, figsize=(10, 16), sharex=True)
    for axis, (title, resources) in zip(axes, panels, strict=False):
        for resource in resources:
            axis.plot(
                minutes, [s.resources[resource] for s in soak.samples], label=RESOURCES[resource]
            )
        axis.set_title(title)
        axis.legend(loc="upper left", fontsize=8)
        axis.set_ylim(bottom=0)
    axis = axes[-1]
    for method in CHECKED_METHODS:
        axis.plot(
            minutes, [s.p99.get(method, float("nan")) * 1000 for s in soak.samples], label=method
        )
    axis.set_yscale("log")
    axis.set_title("RPC p99 per minute (ms)")
    axis.legend(loc="upper left", fontsize=8)
    axis.set_xlabel("minutes")
    for axis in axes:
        for fault in soak.faults:
            axis.axvspan(fault.started / 60, fault.ended / 60, color="red", alpha=0.15)
    figure.suptitle("Soak: faults shaded (" + ", ".join(FAULTS) + ", in turn)")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main() -> None:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=float(env.get("SOAK_MINUTES", 60)))
    parser.add_argument(
        "--fault-every", type=float, default=float(env.get("SOAK_FAULT_EVERY", 240))
    )
    parser.add_argument("--sample", type=float, default=float(env.get("SOAK_SAMPLE_SECONDS", 60)))
    parser.add_argument("--mitras", type=int, default=int(env.get("SOAK_MITRAS", 2000)))
    args = parser.parse_args()
    soak = asyncio.run(
        run(
            args.minutes,
            fault_every=args.fault_every,
            sample_seconds=args.sample,
            mitras=args.mitras,
            report=HERE / "SOAK.md",
            plot=HERE / "soak.png",
        )
    )
    sys.exit(1 if soak.problems else 0)


if __name__ == "__main__":
    main()
