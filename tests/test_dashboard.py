"""DashboardService and the beacon: the seed's numbers exactly, one round trip, a live stream
that only speaks on change, and a beacon that a thousand callers cannot stampede."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from availability.local_stores import LocalValkey
from availability.server import Server, running
from availability.settings import Settings
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc
from availability.v1 import dashboard_pb2 as dpb
from availability.v1 import dashboard_pb2_grpc as dpb_grpc

from .helpers import Fleet, eventually
from .seed_reference import seed_dashboard


@pytest.fixture
async def dashboard(channel: grpc.aio.Channel) -> dpb_grpc.DashboardServiceStub:
    return dpb_grpc.DashboardServiceStub(channel)


@pytest.fixture
async def reference_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=6)
    try:
        yield pool
    finally:
        await pool.close()


def as_reference(reply: Any) -> dict[str, Any]:
    return {
        "active_chats": reply.active_chats,
        "online_mitras": reply.online_mitras,
        "pending_requests": reply.pending_requests,
        "customers_per_mitra": [
            (m.mitra_id, m.display_name, m.active_session_count) for m in reply.customers_per_mitra
        ],
        "sensitive": {
            "total": reply.sensitive.total,
            "last_30d_total": reply.sensitive.last_30d_total,
            "last_30d_sensitive": reply.sensitive.last_30d_sensitive,
            "last_30d_percent": reply.sensitive.last_30d_percent,
        },
    }


def comparable(stats: dict[str, Any]) -> dict[str, Any]:
    """The seed orders only by load; ties may come in any order, so compare them as sets."""
    by_load: dict[int, set[tuple[str, str]]] = {}
    for mitra, name, load in stats["customers_per_mitra"]:
        by_load.setdefault(load, set()).add((str(mitra), name))
    loads = [load for _, _, load in stats["customers_per_mitra"]]
    assert loads == sorted(loads, reverse=True), "busiest first"
    return {**stats, "customers_per_mitra": by_load}


async def arrange_city(fleet: Fleet, stub: pb_grpc.AvailabilityServiceStub) -> dict[str, Any]:
    """Every edge case at once: an online mitra with no sessions, an offline one with
    sessions, a deactivated one, sessions either side of the 30-day boundary."""
    busy = await fleet.mitra("Busy", capacity=3)
    idle = await fleet.mitra("Idle")
    away = await fleet.mitra("Away")
    gone = await fleet.mitra("Gone")
    for mitra in (busy, idle, gone):
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(gone), active=False))
    now = datetime.now(UTC)
    await fleet.session(busy, "active", sensitivity="sensitive")
    await fleet.session(busy, "pending_payment")
    await fleet.session(away, "active")
    await fleet.session(gone, "ended", sensitivity="sensitive")
    await fleet.session(None, "searching")
    await fleet.session(None, "pending_acceptance", sensitivity="sensitive")
    await fleet.session(idle, "ended", created_at=now - timedelta(days=30, minutes=-2))
    await fleet.session(
        idle, "ended", sensitivity="sensitive", created_at=now - timedelta(days=30, minutes=2)
    )
    await fleet.session(idle, "expired", created_at=now - timedelta(days=90))
    await stub.RecomputeLoad(pb.RecomputeLoadRequest(mitra_ids=[str(busy), str(away)]))
    return {"busy": busy, "idle": idle, "away": away, "gone": gone}


async def test_numbers_equal_the_seed_method(
    dashboard: dpb_grpc.DashboardServiceStub,
    stub: pb_grpc.AvailabilityServiceStub,
    fleet: Fleet,
    reference_pool: asyncpg.Pool,
) -> None:
    mitras = await arrange_city(fleet, stub)

    reply = await dashboard.GetDashboardStats(dpb.GetDashboardStatsRequest())
    expected = await seed_dashboard(reference_pool)

    assert comparable(as_reference(reply)) == comparable(expected)
    assert reply.active_chats == 3 and reply.pending_requests == 2 and reply.online_mitras == 2
    assert reply.sensitive.total == 4
    assert reply.sensitive.last_30d_total == 7, "the 29-days-23-hours session counts, not 30d+2m"
    assert reply.customers_per_mitra[0].mitra_id == str(mitras["busy"])
    assert reply.customers_per_mitra[0].active_session_count == 2
    assert reply.customers_per_mitra[1].active_session_count == 0, "online with no sessions"
    assert str(mitras["away"]) not in {m.mitra_id for m in reply.customers_per_mitra}


async def test_no_sessions_at_all(
    dashboard: dpb_grpc.DashboardServiceStub, fleet: Fleet, reference_pool: asyncpg.Pool
) -> None:
    reply = await dashboard.GetDashboardStats(dpb.GetDashboardStatsRequest())
    assert comparable(as_reference(reply)) == comparable(await seed_dashboard(reference_pool))
    assert reply.sensitive.last_30d_percent == 0 and reply.active_chats == 0


@pytest.mark.parametrize(
    ("sensitive", "total", "percent"), [(5, 5, 100.0), (1, 16, 6.3), (1, 3, 33.3)]
)
async def test_percent_is_rounded_like_the_seed(
    settings: Settings,
    fleet: Fleet,
    reference_pool: asyncpg.Pool,
    sensitive: int,
    total: int,
    percent: float,
) -> None:
    mitra = await fleet.mitra()
    for i in range(total):
        await fleet.session(mitra, "ended", sensitivity="sensitive" if i < sensitive else "normal")
    async with (
        running(settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        reply = await dpb_grpc.DashboardServiceStub(channel).GetDashboardStats(
            dpb.GetDashboardStatsRequest()
        )
    assert reply.sensitive.last_30d_percent == percent
    assert (await seed_dashboard(reference_pool))["sensitive"]["last_30d_percent"] == percent


async def test_valkey_down_gives_the_same_numbers(
    server_on_own_valkey: Server,
    own_valkey: LocalValkey,
    fleet: Fleet,
    reference_pool: asyncpg.Pool,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server_on_own_valkey.port}") as channel:
        await arrange_city(fleet, pb_grpc.AvailabilityServiceStub(channel))
        own_valkey.stop()
        reply = await dpb_grpc.DashboardServiceStub(channel).GetDashboardStats(
            dpb.GetDashboardStatsRequest()
        )
    assert comparable(as_reference(reply)) == comparable(await seed_dashboard(reference_pool))
    availability = server_on_own_valkey.availability
    assert availability is not None and availability.counters.fallbacks["dashboard"] == 1


async def test_list_limit_and_bad_arguments(
    dashboard: dpb_grpc.DashboardServiceStub, stub: pb_grpc.AvailabilityServiceStub, fleet: Fleet
) -> None:
    for _ in range(3):
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(await fleet.mitra())))
    reply = await dashboard.GetDashboardStats(
        dpb.GetDashboardStatsRequest(customers_per_mitra_limit=2)
    )
    assert len(reply.customers_per_mitra) == 2 and reply.online_mitras == 3
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dashboard.GetDashboardStats(
            dpb.GetDashboardStatsRequest(customers_per_mitra_limit=-1)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "customers_per_mitra_limit" in (caught.value.details() or "")
    stream = dashboard.WatchDashboardStats(
        dpb.WatchDashboardStatsRequest(interval=Duration(seconds=-1))
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "interval" in (caught.value.details() or "")


async def test_stream_sends_changes_only_and_holds_the_interval(
    dashboard: dpb_grpc.DashboardServiceStub, fleet: Fleet
) -> None:
    mitra = await fleet.mitra()
    stream = dashboard.WatchDashboardStats(
        dpb.WatchDashboardStatsRequest(interval=Duration(seconds=1))
    )
    first = await stream.read()
    first_at = time.monotonic()
    assert first.active_chats == 0

    pending = asyncio.ensure_future(stream.read())
    done, _ = await asyncio.wait({pending}, timeout=2.5)
    assert not done, "unchanged numbers are not resent"

    await fleet.session(mitra, "active")
    await fleet.session(mitra, "active")
    changed = await asyncio.wait_for(pending, 5)
    changed_at = time.monotonic()
    assert changed.active_chats in (1, 2)
    if changed.active_chats == 1:
        again = await asyncio.wait_for(stream.read(), 5)
        assert again.active_chats == 2
        assert time.monotonic() - changed_at >= 0.9, "at most one message per interval"
    assert changed_at - first_at >= 0.9
    stream.cancel()


async def test_a_hundred_watchers_cost_one_computation_per_interval(
    server: Server, channel: grpc.aio.Channel
) -> None:
    stub = dpb_grpc.DashboardServiceStub(channel)
    availability = server.availability
    assert availability is not None
    streams = [
        stub.WatchDashboardStats(dpb.WatchDashboardStatsRequest(interval=Duration(seconds=1)))
        for _ in range(100)
    ]
    await asyncio.gather(*(s.read() for s in streams))
    before = availability.dashboards.computations
    await asyncio.sleep(3.2)
    computed = availability.dashboards.computations - before
    for stream in streams:
        stream.cancel()
    assert 2 <= computed <= 5, f"{computed} computations for 100 watchers over 3 intervals"


async def test_a_thousand_beacon_calls_at_expiry_compute_once(
    settings: Settings, fleet: Fleet
) -> None:
    # Long enough that the burst below ends within one snapshot's life on a busy machine
    # (at 1 s it sometimes outlived it and was rightly computed twice).
    short = replace(settings, beacon_ttl_seconds=3.0)
    for _ in range(5):
        await fleet.mitra(online=True)
    async with running(short) as one, running(short) as two:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") for s in (one, two)]
        stubs = [pb_grpc.AvailabilityServiceStub(c) for c in channels]
        assert one.availability is not None
        mirror = one.availability.mirror
        await stubs[0].CountAvailableMitras(pb.CountAvailableMitrasRequest())
        await asyncio.sleep(3.2)  # the shared snapshot and both local copies have expired
        before = await mirror.beacon_computations()

        started = time.monotonic()
        replies = await asyncio.gather(
            *(
                stubs[i % 2].CountAvailableMitras(pb.CountAvailableMitrasRequest())
                for i in range(1000)
            )
        )
        # A shared snapshot lives BEACON_TTL_SECONDS less the instances' local second.
        lives = 1 + int((time.monotonic() - started) / short.beacon_shared_seconds)

        # Once a snapshot's life: once, unless a loaded machine stretched the burst past it.
        computed = await mirror.beacon_computations() - before
        assert 1 <= computed <= lives, f"{computed} computations over {lives} snapshot lives"
        assert {(r.available_count, r.online_count) for r in replies} == {(5, 5)}
        for c in channels:
            await c.close()


async def test_beacon_with_valkey_down_does_not_stampede_postgres(
    server_on_own_valkey: Server, own_valkey: LocalValkey, fleet: Fleet
) -> None:
    for _ in range(3):
        await fleet.mitra(online=True)
    own_valkey.stop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server_on_own_valkey.port}") as channel:
        stub = pb_grpc.AvailabilityServiceStub(channel)
        started = time.monotonic()
        replies = await asyncio.gather(
            *(stub.CountAvailableMitras(pb.CountAvailableMitrasRequest()) for _ in range(300))
        )
        took = time.monotonic() - started
    assert {(r.available_count, r.online_count, r.source) for r in replies} == {
        (3, 3, pb.SOURCE_DATABASE)
    }
    availability = server_on_own_valkey.availability
    assert availability is not None
    # One Postgres query a beacon_local_seconds at most, however many calls: one for all 300
    # unless a loaded machine spread them over more than that.
    queries = availability.counters.fallbacks["count_available"]
    allowed = 1 + int(took / server_on_own_valkey.settings.beacon_local_seconds)
    assert queries <= allowed, f"{queries} Postgres queries for 300 calls in {took:.2f} s"


async def test_trigger_keeps_dashboard_loads_current(
    dashboard: dpb_grpc.DashboardServiceStub, stub: pb_grpc.AvailabilityServiceStub, fleet: Fleet
) -> None:
    mitra = await fleet.mitra()
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await fleet.session(mitra, "active")

    async def counted() -> bool:
        await asyncio.sleep(1.0)  # past the shared computation's max age
        reply = await dashboard.GetDashboardStats(dpb.GetDashboardStatsRequest())
        return reply.customers_per_mitra[0].active_session_count == 1

    await eventually(counted, timeout=5)


async def test_day_counts_follow_updates_deletes_and_truncate(
    settings: Settings,
    stub: pb_grpc.AvailabilityServiceStub,
    fleet: Fleet,
    reference_pool: asyncpg.Pool,
    db: asyncpg.Connection,
) -> None:
    await arrange_city(fleet, stub)
    await db.execute(
        "UPDATE chat_sessions SET topic_sensitivity = 'sensitive' WHERE status = 'searching'"
    )
    await db.execute(
        "UPDATE chat_sessions SET created_at = now() - interval '45 days'"
        " WHERE status = 'pending_payment'"
    )
    await db.execute("UPDATE chat_sessions SET created_at = now() WHERE status = 'expired'")
    await db.execute(
        "DELETE FROM chat_sessions WHERE status = 'ended' AND topic_sensitivity = 'sensitive'"
    )

    async def matches() -> bool:
        async with (
            running(settings) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            reply = await dpb_grpc.DashboardServiceStub(channel).GetDashboardStats(
                dpb.GetDashboardStatsRequest()
            )
        expected = await seed_dashboard(reference_pool)
        return as_reference(reply)["sensitive"] == expected["sensitive"]

    assert await matches()
    await db.execute("TRUNCATE chat_sessions")
    assert await matches()
    assert await db.fetchval("SELECT count(*) FROM availability_session_days") == 0
