"""Valkey Cluster failover: a master killed under load, the service answering from Postgres
while the slot has no master, then routing to the promoted replica and reconciling, so the
mirror equals Postgres again."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis.asyncio as redis

from availability.local_stores import LocalValkeyCluster
from availability.mirror import Keys
from availability.server import running
from availability.settings import Settings
from availability.sweeps import RECONCILE
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet, eventually


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[LocalValkeyCluster]:
    from availability import local_stores

    cluster = local_stores.start_valkey_cluster(tmp_path / "cluster")
    try:
        yield cluster
    finally:
        cluster.stop()


async def online_in_truth(db: asyncpg.Connection) -> set[str]:
    rows = await db.fetch("SELECT mitra_id FROM mitra_online_status WHERE is_online")
    return {str(r[0]) for r in rows}


async def test_a_killed_master_fails_over_and_the_mirror_equals_postgres(
    own_cluster: LocalValkeyCluster, settings: Settings, fleet: Fleet, db: asyncpg.Connection
) -> None:
    on_cluster = replace(
        settings, valkey_url=own_cluster.url, valkey_cluster=True, valkey_timeout_seconds=0.25
    )
    keys = Keys.for_prefix(on_cluster.valkey_key_prefix)
    mitras = [str(await fleet.mitra(online=True)) for _ in range(20)]
    async with (
        running(on_cluster) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.AvailabilityServiceStub(channel)
        assert server.availability is not None and server.sweeps is not None
        found = await stub.FindAvailableMitras(pb.FindAvailableMitrasRequest(limit=100))
        assert found.source == pb.SOURCE_CACHE and len(found.mitras) == 20
        master = own_cluster.master_of(keys.online)

        master.kill()
        failover = asyncio.create_task(
            asyncio.to_thread(own_cluster.wait_failover, keys.online, master, 20.0)
        )
        codes: Counter[str] = Counter()
        sources: Counter[int] = Counter()
        step = 0
        while not failover.done():
            mitra = mitras[step % 20]
            try:
                if step % 4 == 0:
                    await stub.SetOffline(pb.SetOfflineRequest(mitra_id=mitra))
                elif step % 4 == 1:
                    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=mitra))
                elif step % 4 == 2:
                    await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=mitra))
                else:
                    reply = await stub.FindAvailableMitras(pb.FindAvailableMitrasRequest(limit=5))
                    sources[reply.source] += 1
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
            step += 1
            await asyncio.sleep(0.01)
        await failover
        assert set(codes) == {"OK"}, codes
        assert sources[pb.SOURCE_DATABASE] > 0, "answered from Postgres while the slot had none"
        await stub.SetOffline(pb.SetOfflineRequest(mitra_id=mitras[0]))

        async def routed_again() -> bool:
            reply = await stub.FindAvailableMitras(pb.FindAvailableMitrasRequest(limit=100))
            return reply.source == pb.SOURCE_CACHE

        await eventually(routed_again, timeout=15)
        pool = server.availability.mirror.client.connection_pool
        assert getattr(pool, "moves", 0) >= 1
        promoted = own_cluster.master_of(keys.online)
        assert promoted.port != master.port

        async def reconciled() -> bool:
            return server.sweeps is not None and server.sweeps.report.of(RECONCILE).runs >= 1

        await eventually(reconciled, timeout=15)
        direct = redis.Redis(port=promoted.port, decode_responses=True)
        try:

            async def mirror_equals_truth() -> bool:
                return await direct.smembers(keys.online) == await online_in_truth(db)

            await eventually(mirror_equals_truth, timeout=15)
        finally:
            await direct.aclose()
        statuses = [
            (await stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=m))).status for m in mitras
        ]
        truth = await online_in_truth(db)
        assert all(s.source == pb.SOURCE_CACHE for s in statuses)
        assert {s.mitra_id for s in statuses if s.online} == truth
        assert mitras[0] not in truth


def test_the_cluster_fixture_serves_one_slot_from_one_master(
    own_cluster: LocalValkeyCluster,
) -> None:
    keys = Keys.for_prefix("any")
    masters = {own_cluster.master_of(key).port for key in keys.all()}
    assert len(masters) == 1, "every key of a deployment shares its hash tag's slot"
    started = time.monotonic()
    assert own_cluster.replicas_of(own_cluster.master_of(keys.online))
    assert time.monotonic() - started < 5


def test_cluster_connections_keep_the_urls_transport() -> None:
    from redis.asyncio.connection import SSLConnection

    from availability.cluster import SlotPool

    tls = SlotPool.from_url("rediss://10.0.0.5:7000/0", slot=1)
    assert isinstance(tls.make_connection(), SSLConnection)
    with pytest.raises(ValueError, match="VALKEY_CLUSTER"):
        SlotPool.from_url("unix:///tmp/valkey.sock", slot=1)
