"""Prometheus metrics: scraped over HTTP after real calls, fallbacks and sweeps."""

from __future__ import annotations

import uuid
from dataclasses import replace

import asyncpg
import grpc

from availability.local_stores import LocalValkey
from availability.server import Server, running
from availability.settings import Settings
from availability.sweeps import AUTO_OFFLINE
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet, Samples, code_of, eventually, scrape_metrics

Stub = pb_grpc.AvailabilityServiceStub
SERVICE = "availability.v1.AvailabilityService"


async def scrape(server: Server) -> Samples:
    assert server.metrics is not None and server.metrics.port
    return await scrape_metrics(server.metrics.port)


def rpc(method: str, code: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    labels = {
        "grpc_service": SERVICE,
        "grpc_method": method,
        "grpc_code": code,
        "caller": "anonymous",
    }
    return ("grpc_server_handled_total", tuple(sorted(labels.items())))


async def test_rpcs_are_counted_by_method_and_code_with_latency(
    server: Server, stub: Stub, fleet: Fleet
) -> None:
    mitra = await fleet.mitra()
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    for _ in range(2):
        await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra)))
    missing = await code_of(
        stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=str(uuid.uuid4())))
    )

    samples = await scrape(server)

    assert missing == grpc.StatusCode.NOT_FOUND
    assert samples[rpc("Heartbeat", "OK")] == 2
    assert samples[rpc("GetMitraStatus", "NOT_FOUND")] == 1
    duration = (
        "grpc_server_handling_seconds_count",
        (("caller", "anonymous"), ("grpc_method", "Heartbeat"), ("grpc_service", SERVICE)),
    )
    assert samples[duration] == 2


async def test_domain_counters_follow_sweeps_watchers_and_the_beacon(
    settings: Settings, db: asyncpg.Connection, fleet: Fleet
) -> None:
    quick_beacon = replace(settings, beacon_ttl_seconds=0.2)
    async with (
        running(quick_beacon) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.AvailabilityServiceStub(channel)
        mitra = await fleet.mitra()
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
        assert server.sweeps is not None
        await server.sweeps.run_once(AUTO_OFFLINE, 30.0, server.sweeps.auto_offline)
        watch = stub.WatchAvailableMitras(pb.WatchAvailableMitrasRequest())
        await watch.read()

        async def counted() -> bool:
            await stub.CountAvailableMitras(pb.CountAvailableMitrasRequest())
            return (await scrape(server)).get(("availability_online_mitras", ())) == 1

        await eventually(counted)
        samples = await scrape(server)
        watch.cancel()

    assert samples[("availability_sweep_runs_total", (("sweep", AUTO_OFFLINE),))] >= 1
    assert samples[("availability_watchers", ())] == 1
    assert samples[("availability_available_mitras", ())] == 1
    assert samples[("availability_mass_stale_guard_trips_total", ())] == 0


async def test_fallbacks_are_counted_by_path_when_valkey_is_down(
    server_on_own_valkey: Server, stub_own: Stub, own_valkey: LocalValkey, fleet: Fleet
) -> None:
    mitra = await fleet.mitra()
    await stub_own.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    own_valkey.stop()
    await stub_own.FindAvailableMitras(pb.FindAvailableMitrasRequest())
    await stub_own.SetOffline(pb.SetOfflineRequest(mitra_id=str(mitra)))

    samples = await scrape(server_on_own_valkey)

    assert samples[("availability_fallbacks_total", (("path", "find_available"),))] >= 1
    assert samples[("availability_valkey_write_errors_total", (("path", "set_offline"),))] >= 1
    assert series(samples, "availability_mirror_misses_total") == {}


async def test_an_id_the_mirror_does_not_know_is_a_miss_not_a_fallback(
    server: Server, stub: Stub
) -> None:
    unknown = str(uuid.uuid4())
    looked_up = await code_of(stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=unknown)))
    beat = await code_of(stub.Heartbeat(pb.HeartbeatRequest(mitra_id=unknown)))

    samples = await scrape(server)

    assert looked_up == beat == grpc.StatusCode.NOT_FOUND
    assert series(samples, "availability_mirror_misses_total") == {
        (("path", "heartbeat"),): 1,
        (("path", "status"),): 1,
    }
    assert series(samples, "availability_fallbacks_total") == {}, "Valkey did not fail"
    assert series(samples, "availability_mirror_untrusted_reads_total") == {}


def series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (sample, labels), value in samples.items() if sample == name}
