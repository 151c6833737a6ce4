"""Issues 5 and 6: 1,000 WatchAvailableMitras watchers on one `availability serve` process.

Measures, in one run: the server's RSS without watchers and with 1,000 (each holding its
snapshot of the whole available fleet), how long the 1,000 snapshots take, and the
change-to-watcher latency: from just before a SetOffline/SetOnline call to each watcher
receiving the change, for every watcher and every change. Changes are made one at a time
(the next once every watcher has the last), so each sample is one change's delivery.

The server runs on CPU 0 and the watchers (one asyncio process, over 20 connections) on
CPU 1, so a watcher's own processing is included in its latency: the last of 1,000
watchers waits for the client process to handle the 999 before it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis.asyncio as redis

from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .common import Row, progress
from .throughput import SERVICE, _fleet, _serve

WATCHERS = 1_000
CONNECTIONS = 20
SNAPSHOT_PART = 5_000  # mitras per snapshot message (availability.services._convert)


@dataclass
class _Watcher:
    parts: int = 0
    changes: list[tuple[int, float]] = field(default_factory=list)  # (kind, arrival)
    error: str = ""


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _follow(channel: grpc.aio.Channel, watcher: _Watcher) -> None:
    # Bytes in, so snapshot parts are counted without decoding 100,000 mitras 1,000 times;
    # only the small change messages are decoded.
    call = channel.unary_stream(
        f"/{SERVICE}/WatchAvailableMitras",
        request_serializer=pb.WatchAvailableMitrasRequest.SerializeToString,
        response_deserializer=lambda raw: raw,
    )(pb.WatchAvailableMitrasRequest())
    try:
        async for raw in call:
            if len(raw) > 1_000:
                watcher.parts += 1
                continue
            message = pb.WatchAvailableMitrasResponse.FromString(raw)
            if message.HasField("snapshot"):
                watcher.parts += 1
            else:
                watcher.changes.append((message.change.kind, time.perf_counter()))
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            watcher.error = f"{exc.code().name}: {exc.details()}"


async def _until(check: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def bench_watchers(admin_dsn: str, valkey_url: str, quick: bool) -> list[Row]:
    size = 10_000 if quick else 100_000
    changes = 30 if quick else 100
    parts = -(-size // SNAPSHOT_PART)
    pinned = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    progress(f"watchers: {WATCHERS} watchers of {size:,} available mitras, {changes} changes")
    valkey = redis.Redis.from_url(valkey_url)
    try:
        async with _fleet(admin_dsn, valkey_url, valkey, size) as fleet:
            with tempfile.TemporaryDirectory(prefix="availability-watchers-") as tmp:
                server_cpus = "0" if pinned else None
                async with _serve(fleet, valkey_url, 1, server_cpus, Path(tmp)) as served:
                    if pinned:
                        os.sched_setaffinity(0, {1})
                    try:
                        return await _measure(
                            served.process.pid,
                            served.address,
                            size,
                            parts,
                            changes,
                            fleet.mitras[0],
                        )
                    except RuntimeError as exc:
                        tail = "\n".join(served.log_text().splitlines()[-30:])
                        raise RuntimeError(f"{exc}\nthe server's log ends:\n{tail}") from None
                    finally:
                        if pinned:
                            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    finally:
        await valkey.aclose()


async def _measure(
    pid: int, address: str, size: int, parts: int, changes: int, mitra: str
) -> list[Row]:
    await asyncio.sleep(1.0)
    idle_rss = _rss_mib(pid)
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(CONNECTIONS)]
    watchers = [_Watcher() for _ in range(WATCHERS)]
    started = time.perf_counter()
    tasks = [
        asyncio.create_task(_follow(channels[i % CONNECTIONS], w)) for i, w in enumerate(watchers)
    ]
    rows: list[Row] = []
    try:
        while not await _until(lambda: all(w.parts >= parts for w in watchers), 60):
            whole = sum(w.parts >= parts for w in watchers)
            failed = dict(Counter(w.error for w in watchers if w.error)) or "none"
            waited = time.perf_counter() - started
            progress(f"watchers: {whole} of {WATCHERS} whole snapshots after {waited:.0f} s")
            if waited > 600:
                raise RuntimeError(
                    f"{whole} of {WATCHERS} watchers received their whole snapshot ({parts}"
                    f" parts) within 600 s; errors: {failed}"
                )
        snapshots_s = time.perf_counter() - started
        await asyncio.sleep(1.0)
        watched_rss = _rss_mib(pid)
        progress(
            f"watchers: {WATCHERS} snapshots in {snapshots_s:.1f} s; RSS {idle_rss:.0f} MiB idle,"
            f" {watched_rss:.0f} MiB with watchers"
        )
        latencies: list[float] = []
        async with grpc.aio.insecure_channel(address) as control:
            stub = pb_grpc.AvailabilityServiceStub(control)
            for n in range(changes):
                before = time.perf_counter()
                if n % 2 == 0:
                    await stub.SetOffline(pb.SetOfflineRequest(mitra_id=mitra))
                else:
                    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=mitra))
                if not await _until(lambda n=n: all(len(w.changes) > n for w in watchers), 30):
                    raise RuntimeError(f"change {n} did not reach every watcher within 30 s")
                latencies += [(w.changes[n][1] - before) * 1000 for w in watchers]
                await asyncio.sleep(0.05)
        after_rss = _rss_mib(pid)
        errors = [w.error for w in watchers if w.error]
        if errors:
            raise RuntimeError(f"{len(errors)} watchers failed: {errors[0]}")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
    ordered = sorted(latencies)
    median = statistics.median(ordered)
    p99 = ordered[int(0.99 * (len(ordered) - 1))]
    progress(f"watchers: change to watcher median {median:.1f} ms, p99 {p99:.1f} ms")
    shape = f"{WATCHERS:,} watchers, {size:,} available mitras"
    rows.append(
        Row(
            f"Change to watcher latency, {shape}",
            f"median {median:.1f} ms, p99 {p99:.1f} ms",
            target="< 1 s",
            met=p99 < 1000,
            note=f"{changes} changes x {WATCHERS:,} watchers; watchers pinned apart, "
            "their own processing included",
        )
    )
    rows.append(
        Row(
            f"Server RSS, {shape}",
            f"{watched_rss:.0f} MiB ({after_rss:.0f} MiB after the changes)",
            comparison=f"{idle_rss:.0f} MiB with no watcher",
            target="report",
            note=f"{(watched_rss - idle_rss) * 1024 / WATCHERS:.0f} KiB a watcher; "
            f"the {WATCHERS:,} snapshots took {snapshots_s:.1f} s",
        )
    )
    return rows
