"""Three `availability serve` processes on one Valkey (single node, then cluster) and one
Postgres, driven through one client that spreads calls round-robin over them: the guarantees
of one instance hold for three. One sweep leader per tick, watchers on every instance see
every change, the beacon is computed once per expiry."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis

from availability.client import AvailabilityClient
from availability.mirror import Keys
from availability.settings import Settings

from .helpers import Fleet, Samples, eventually, scrape_metrics

pytestmark = [pytest.mark.single_and_cluster, pytest.mark.slow]

SWEEP_SECONDS = 0.5


class Instance:
    def __init__(self, process: asyncio.subprocess.Process, port: int, metrics: int) -> None:
        self.process, self.address, self.metrics = process, f"127.0.0.1:{port}", metrics

    async def samples(self) -> Samples:
        return await scrape_metrics(self.metrics)

    async def sweep_runs(self, sweep: str) -> float:
        samples = await self.samples()
        return samples.get(("availability_sweep_runs_total", (("sweep", sweep),)), 0.0)

    async def handled(self, method: str) -> float:
        samples = await self.samples()
        return sum(
            value
            for (name, labels), value in samples.items()
            if name == "grpc_server_handled_total" and ("grpc_method", method) in labels
        )


_LISTENING = (
    re.compile(r"serving on 127\.0\.0\.1:(\d+)"),
    re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics"),
)


@pytest.fixture
async def instances(
    settings: Settings, tmp_path: Path, db: asyncpg.Connection
) -> AsyncIterator[list[Instance]]:
    """Started after `db` empties the tables, so they seed from this test's fleet alone. Each
    binds ports the kernel picks (port 0) and says which in its log: a port picked here and
    bound later could be taken meanwhile by another worker's server, and an instance whose
    metrics port is taken serves without metrics (seen: this test scraped another worker's
    gRPC port)."""
    processes: list[tuple[asyncio.subprocess.Process, Path]] = []
    started: list[Instance] = []
    for index in range(3):
        env = {
            **os.environ,
            "DATABASE_URL": settings.database_url,
            "VALKEY_URL": settings.valkey_url,
            "VALKEY_CLUSTER": str(settings.valkey_cluster).lower(),
            "VALKEY_KEY_PREFIX": settings.valkey_key_prefix,
            "GRPC_ADDRESS": "127.0.0.1:0",
            "METRICS_ADDRESS": "127.0.0.1:0",
            "MITRA_AUTO_OFFLINE_SWEEP_SECONDS": str(SWEEP_SECONDS),
            "HEARTBEAT_MIRROR_INTERVAL_SECONDS": str(SWEEP_SECONDS),
            "BEACON_TTL_SECONDS": "2",
        }
        path = tmp_path / f"instance-{index}.log"
        with path.open("w") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "availability", "serve", env=env, stdout=log, stderr=log
            )
        processes.append((process, path))
    try:
        for process, path in processes:

            async def listening(
                process: asyncio.subprocess.Process = process, path: Path = path
            ) -> list[int]:
                assert process.returncode is None, "it exited"
                text = await asyncio.to_thread(path.read_text)
                found = [pattern.search(text) for pattern in _LISTENING]
                return [int(m[1]) for m in found if m] if all(found) else []

            # Three processes start at once on 2 shared cores: a wait, not a deadline.
            try:
                port, metrics = await eventually(listening, timeout=90, what=f"{path.name} serving")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; its log ends:\n{path.read_text()[-3000:]}") from None
            started.append(Instance(process, port, metrics))
        yield started
    finally:
        for process, _ in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in processes:
            await process.wait()


def spread(instances: list[Instance]) -> AvailabilityClient:
    """One client over all three: round-robin, as a caller behind no load balancer would."""
    return AvailabilityClient("ipv4:" + ",".join(i.address for i in instances))


async def test_calls_spread_over_every_instance(instances: list[Instance], fleet: Fleet) -> None:
    mitra = await fleet.mitra(online=True)
    async with spread(instances) as client:
        for _ in range(30):
            await client.heartbeat(mitra)
    # One at a time, each coalesced heartbeat is a BatchHeartbeat call of its own.
    handled = [await instance.handled("BatchHeartbeat") for instance in instances]
    assert sum(handled) == 30 and all(count >= 5 for count in handled), handled


async def test_one_sweep_leader_runs_each_tick(instances: list[Instance], fleet: Fleet) -> None:
    await fleet.mitra(online=True)
    before = [await i.sweep_runs("auto_offline") for i in instances]
    started = time.monotonic()
    await asyncio.sleep(4)
    after = [await i.sweep_runs("auto_offline") for i in instances]
    runs = sum(after) - sum(before)
    ticks = (time.monotonic() - started) / SWEEP_SECONDS
    assert 0 < runs <= ticks + 2, f"{runs} runs in {ticks:.0f} ticks over 3 instances: {after}"
    assert sum(1 for b, a in zip(before, after, strict=True) if a > b) == 1, "one leader"


async def test_watchers_on_every_instance_see_every_change(
    instances: list[Instance], fleet: Fleet
) -> None:
    mitras = [await fleet.mitra() for _ in range(6)]
    clients = [AvailabilityClient(i.address) for i in instances]
    lives = [client.watch_available() for client in clients]
    try:
        for live in lives:
            await live.__aenter__()
            await asyncio.wait_for(live.wait_in_sync(), 30)
        async with spread(instances) as writer:
            for mitra in mitras:
                await writer.set_online(mitra)
            await writer.set_offline(mitras[0])
            await writer.set_mitra_active(mitras[1], False)
            expected = {m.mitra_id for m in await writer.find_available_mitras(100)}
        assert expected == set(mitras[2:])

        def seen(index: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return set(lives[index].mitras) == expected

            return check

        for index in range(3):
            await eventually(seen(index))
    finally:
        for live in lives:
            await live.__aexit__(None, None, None)
        for client in clients:
            await client.close()


async def test_the_beacon_is_computed_once_per_expiry(
    instances: list[Instance], fleet: Fleet, valkey: redis.Redis, settings: Settings
) -> None:
    for _ in range(5):
        await fleet.mitra(online=True)
    computed = Keys.for_prefix(settings.valkey_key_prefix).beacon_computed
    async with spread(instances) as client:
        await client.count_available_mitras()
        before = int(await valkey.get(computed) or 0)
        started, calls = time.monotonic(), 0
        while time.monotonic() - started < 3:
            await asyncio.gather(*(client.count_available_mitras() for _ in range(10)))
            calls += 10
        elapsed = time.monotonic() - started
    computations = int(await valkey.get(computed) or 0) - before
    # The shared snapshot lives BEACON_TTL_SECONDS less the 1 s each instance reuses it: 1 s.
    assert calls >= 100
    assert 1 <= computations <= elapsed / 1.0 + 2, f"{computations} in {elapsed:.1f} s"
