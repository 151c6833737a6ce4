"""Start-up and the connections under it: health per service, freshness at the boundary,
and the change listener surviving a Postgres restart."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import asyncpg
import grpc
import pytest
import redis.asyncio as redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from availability.local_stores import LocalPostgres
from availability.mirror import Keys
from availability.server import SERVICE_NAMES, Server, running
from availability.settings import Settings
from availability.truth import Truth
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet, eventually, notified, settled

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_reports_each_service_and_shutdown(server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", *SERVICE_NAMES):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == SERVING, name
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAMES[0]))
        assert (await watch.read()).status == SERVING
        stopping = asyncio.create_task(server.stop(grace=1.0))
        assert (await watch.read()).status == NOT_SERVING, "health says so before the port closes"
        await stopping


async def test_freshness_boundary_in_the_cache(
    stub: pb_grpc.AvailabilityServiceStub,
    fleet: Fleet,
    valkey: redis.Redis,
    settings: Settings,
    server: Server,
    db: asyncpg.Connection,
) -> None:
    keys = Keys.for_prefix(settings.valkey_key_prefix)
    inside, outside = await fleet.mitra("Inside"), await fleet.mitra("Outside")
    await notified(valkey, keys, inside, outside)
    for mitra in (inside, outside):
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    # The feed resyncs those writes with Postgres's (fresh) heartbeat time: let it land first.
    await settled(server, db)
    seconds, micros = await valkey.time()
    now_ms = seconds * 1000 + micros // 1000
    stale_ms = settings.heartbeat_stale_seconds * 1000
    await valkey.zadd(
        keys.heartbeats,
        {str(inside): now_ms - stale_ms + 3000, str(outside): now_ms - stale_ms - 1},
    )

    statuses = {
        m: (await stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=str(m)))).status
        for m in (inside, outside)
    }
    found = await stub.FindAvailableMitras(pb.FindAvailableMitrasRequest())

    assert statuses[inside].fresh and statuses[inside].available
    assert not statuses[outside].fresh and not statuses[outside].reachable
    assert [m.mitra_id for m in found.mitras] == [str(inside)]


@pytest.fixture
async def own_database(own_postgres: LocalPostgres, settings: Settings) -> Settings:
    migrated = replace(settings, database_url=own_postgres.dsn, database_timeout_seconds=2.0)
    truth = await Truth.connect(migrated)
    await truth.migrate()
    await truth.close()
    return migrated


async def test_listener_reconnects_after_a_postgres_restart(
    own_database: Settings, own_postgres: LocalPostgres
) -> None:
    db = await asyncpg.connect(own_database.database_url)
    mitra = await db.fetchval("INSERT INTO mitras (display_name) VALUES ('Eka') RETURNING id")
    await db.close()
    async with running(own_database) as server:
        assert server.listener is not None
        await asyncio.wait_for(server.listener.connected.wait(), 30)
        own_postgres.kill()
        own_postgres.start()
        restarted = time.monotonic()
        await eventually(lambda: _reconnected(server), timeout=30)
        db = await asyncpg.connect(own_database.database_url)
        await db.execute(
            "INSERT INTO chat_sessions (mitra_id, customer_id, status)"
            " VALUES ($1, gen_random_uuid(), 'active')",
            mitra,
        )
        await db.close()
        availability = server.availability
        assert availability is not None

        async def load_mirrored() -> bool:
            value = await availability.mirror.client.hget(
                availability.mirror.keys.loads, str(mitra)
            )
            return value == b"1"

        await eventually(load_mirrored, timeout=10)
        print(f"listener back and converged {time.monotonic() - restarted:.2f}s after the restart")


async def _reconnected(server: Server) -> bool:
    assert server.listener is not None
    return server.listener.connected.is_set() and server.listener.reconnects >= 1
