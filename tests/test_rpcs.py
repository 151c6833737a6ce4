"""Every AvailabilityService RPC: what it answers, what lands in each store, every error code."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import asyncpg
import grpc
import pytest
import redis.asyncio as redis

from availability.mirror import Keys
from availability.server import Server
from availability.settings import Settings
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet, eventually, make_stale, notified

pytestmark = pytest.mark.single_and_cluster

Stub = pb_grpc.AvailabilityServiceStub


async def mirrored(stub: Stub, mitra_id: uuid.UUID) -> pb.MitraStatus:
    """The status once the mirror knows the mitra (the trigger listener mirrors new rows)."""

    async def cached() -> pb.MitraStatus | None:
        reply = await stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=str(mitra_id)))
        return reply.status if reply.status.source == pb.SOURCE_CACHE else None

    status: pb.MitraStatus = await eventually(cached)
    return status


async def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    code: grpc.StatusCode = caught.value.code()
    return code


async def test_set_online_writes_truth_then_mirror(
    stub: Stub, fleet: Fleet, valkey: redis.Redis, settings: Settings
) -> None:
    mitra = await fleet.mitra("Budi Santoso", capacity=2)

    reply = await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))

    assert reply.status.online and reply.status.active and reply.status.fresh
    assert reply.status.available and reply.status.source == pb.SOURCE_DATABASE
    assert reply.status.display_name == "Budi Santoso"
    assert reply.status.max_concurrent_sessions == 2
    assert reply.status.HasField("last_heartbeat_time")
    row = await fleet.online_row(mitra)
    assert row is not None and row["is_online"] and row["last_heartbeat_at"] is not None
    tag = "{" + settings.valkey_key_prefix + "}"
    assert await valkey.sismember(f"{tag}:online", str(mitra))
    assert await valkey.zscore(f"{tag}:heartbeats", str(mitra)) is not None
    assert await valkey.zscore(f"{tag}:ready", str(mitra)) is not None


async def test_set_online_refuses_deactivated_mitra(stub: Stub, fleet: Fleet) -> None:
    mitra = await fleet.mitra(active=False)
    code = await code_of(stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra))))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert await fleet.online_row(mitra) is None


async def test_set_offline_is_idempotent(
    stub: Stub, fleet: Fleet, valkey: redis.Redis, settings: Settings
) -> None:
    mitra = await fleet.mitra()
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))

    first = await stub.SetOffline(pb.SetOfflineRequest(mitra_id=str(mitra)))
    second = await stub.SetOffline(pb.SetOfflineRequest(mitra_id=str(mitra)))

    assert not first.status.online and not second.status.online
    assert not second.status.reachable
    row = await fleet.online_row(mitra)
    assert row is not None and not row["is_online"]
    tag = "{" + settings.valkey_key_prefix + "}"
    assert not await valkey.sismember(f"{tag}:online", str(mitra))
    assert await valkey.zscore(f"{tag}:ready", str(mitra)) is None


async def test_set_offline_of_never_online_mitra_succeeds(stub: Stub, fleet: Fleet) -> None:
    mitra = await fleet.mitra()
    reply = await stub.SetOffline(pb.SetOfflineRequest(mitra_id=str(mitra)))
    assert not reply.status.online


async def test_heartbeat_records_in_valkey_only(
    stub: Stub, fleet: Fleet, valkey: redis.Redis, settings: Settings, db: asyncpg.Connection
) -> None:
    mitra = await fleet.mitra()
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    before_pg = (await fleet.online_row(mitra))["last_heartbeat_at"]  # type: ignore[index]
    tag = "{" + settings.valkey_key_prefix + "}"
    before = await valkey.zscore(f"{tag}:heartbeats", str(mitra))

    reply = await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra)))

    assert reply.online
    after = await valkey.zscore(f"{tag}:heartbeats", str(mitra))
    assert after is not None and before is not None and after >= before
    assert await valkey.hget(f"{tag}:heartbeats:dirty", str(mitra)) == str(int(after))
    assert (await fleet.online_row(mitra))["last_heartbeat_at"] == before_pg  # type: ignore[index]


async def test_heartbeat_tells_an_offline_mitra_it_is_offline(stub: Stub, fleet: Fleet) -> None:
    mitra = await fleet.mitra()
    await stub.SetOffline(pb.SetOfflineRequest(mitra_id=str(mitra)))
    reply = await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra)))
    assert not reply.online


async def test_heartbeat_of_deactivated_mitra_is_permission_denied(
    stub: Stub, fleet: Fleet
) -> None:
    mitra = await fleet.mitra()
    await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(mitra), active=False))
    code = await code_of(stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra))))
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_concurrent_heartbeats_share_script_calls_and_each_gets_its_own_answer(
    stub: Stub, fleet: Fleet, server: Server
) -> None:
    online = [await fleet.mitra(f"Online {i}") for i in range(5)]
    offline = await fleet.mitra("Offline")
    deactivated = await fleet.mitra("Deactivated")
    for mitra in online:
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(deactivated), active=False))
    assert server.availability is not None
    mirror = server.availability.mirror
    before = mirror.heartbeat_calls
    rounds = 40

    async def beat(mitra: uuid.UUID) -> object:
        try:
            return (await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra)))).online
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    senders = [*online, offline, deactivated] * rounds
    answers = await asyncio.gather(*(beat(m) for m in senders))

    expected = [True] * len(online) + [False, grpc.StatusCode.PERMISSION_DENIED]
    assert answers == expected * rounds
    assert mirror.heartbeat_calls - before < len(senders), "some went together"


async def test_heartbeat_survives_valkey_forgetting_its_scripts(
    stub: Stub, fleet: Fleet, server: Server, valkey: redis.Redis
) -> None:
    """The heartbeat sends its script by hash on a connection of its own; a Valkey that lost
    its scripts (a restart, SCRIPT FLUSH) gets it loaded again, without a fallback."""
    mitra = await fleet.mitra()
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    assert (await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra)))).online
    await valkey.script_flush()

    reply = await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra)))

    assert reply.online
    assert server.availability is not None
    assert "heartbeat" not in server.availability.counters.fallbacks


async def test_heartbeat_of_mitra_the_mirror_has_not_seen_asks_the_truth(
    stub: Stub, fleet: Fleet, server: Server, valkey: redis.Redis, settings: Settings
) -> None:
    assert server.listener is not None
    server.listener._notified = lambda payload: None  # type: ignore[method-assign]
    deactivated = await fleet.mitra(active=False)
    online = await fleet.mitra(online=True)

    code = await code_of(stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(deactivated))))
    reply = await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(online)))

    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert reply.online
    tag = "{" + settings.valkey_key_prefix + "}"
    assert await valkey.sismember(f"{tag}:online", str(online)), "the miss resynced the mitra"


async def test_unknown_mitra_is_not_found_everywhere(stub: Stub) -> None:
    ghost = str(uuid.uuid4())
    calls = [
        stub.SetOnline(pb.SetOnlineRequest(mitra_id=ghost)),
        stub.SetOffline(pb.SetOfflineRequest(mitra_id=ghost)),
        stub.Heartbeat(pb.HeartbeatRequest(mitra_id=ghost)),
        stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=ghost, active=False)),
        stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=ghost)),
        stub.IsMitraReachable(pb.IsMitraReachableRequest(mitra_id=ghost)),
        stub.RecomputeLoad(pb.RecomputeLoadRequest(mitra_ids=[ghost])),
    ]
    for call in calls:
        assert await code_of(call) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("bad", ["", "not-a-uuid", "1234", "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"])
async def test_malformed_mitra_id_is_invalid_argument_naming_the_field(
    stub: Stub, bad: str
) -> None:
    calls = [
        stub.SetOnline(pb.SetOnlineRequest(mitra_id=bad)),
        stub.SetOffline(pb.SetOfflineRequest(mitra_id=bad)),
        stub.Heartbeat(pb.HeartbeatRequest(mitra_id=bad)),
        stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=bad)),
        stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=bad)),
        stub.IsMitraReachable(pb.IsMitraReachableRequest(mitra_id=bad)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "mitra_id" in (caught.value.details() or "")


async def test_list_arguments_are_validated_by_element(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.FindAvailableMitras(
            pb.FindAvailableMitrasRequest(exclude_mitra_ids=[str(uuid.uuid4()), "nope"])
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exclude_mitra_ids[1]" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RecomputeLoad(pb.RecomputeLoadRequest())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mitra_ids" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.FindAvailableMitras(pb.FindAvailableMitrasRequest(limit=-1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit" in (caught.value.details() or "")


async def test_deactivation_revokes_auth_sessions_and_takes_offline(
    stub: Stub, fleet: Fleet, db: asyncpg.Connection, valkey: redis.Redis, settings: Settings
) -> None:
    mitra = await fleet.mitra()
    other = await fleet.mitra()
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    valid = [await fleet.auth_session(mitra) for _ in range(2)]
    already = await fleet.auth_session(mitra, revoked=True)
    expired = await fleet.auth_session(mitra, expires_in=timedelta(hours=-1))
    others = await fleet.auth_session(other)

    reply = await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(mitra), active=False))

    assert reply.revoked_auth_sessions == 2
    assert not reply.status.active and not reply.status.online and not reply.status.available
    revoked = {
        r["id"] for r in await db.fetch("SELECT id FROM auth_sessions WHERE revoked_at IS NOT NULL")
    }
    assert revoked == {*valid, already}
    assert expired not in revoked and others not in revoked
    assert not (await fleet.online_row(mitra))["is_online"]  # type: ignore[index]
    tag = "{" + settings.valkey_key_prefix + "}"
    assert await valkey.sismember(f"{tag}:deactivated", str(mitra))
    assert not await valkey.sismember(f"{tag}:online", str(mitra))


async def test_reactivation_clears_deactivated_but_stays_offline(
    stub: Stub, fleet: Fleet, valkey: redis.Redis, settings: Settings
) -> None:
    mitra = await fleet.mitra()
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(mitra), active=False))

    reply = await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(mitra), active=True))

    assert reply.status.active and not reply.status.online and reply.revoked_auth_sessions == 0
    tag = "{" + settings.valkey_key_prefix + "}"
    assert not await valkey.sismember(f"{tag}:deactivated", str(mitra))
    online = await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    assert online.status.available


async def test_get_status_from_cache_matches_truth(stub: Stub, fleet: Fleet) -> None:
    mitra = await fleet.mitra("Citra Dewi", capacity=2)
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await fleet.session(mitra, "active")
    await fleet.session(mitra, "pending_payment")
    await fleet.session(mitra, "ended")
    await stub.RecomputeLoad(pb.RecomputeLoadRequest(mitra_ids=[str(mitra)]))

    status = await mirrored(stub, mitra)

    assert status.source == pb.SOURCE_CACHE
    assert status.online and status.active and status.fresh and status.reachable
    assert status.load == 2 and status.max_concurrent_sessions == 2
    assert not status.available, "full: load equals capacity"
    assert status.display_name == "Citra Dewi"
    reachable = await stub.IsMitraReachable(pb.IsMitraReachableRequest(mitra_id=str(mitra)))
    assert reachable.reachable and reachable.source == pb.SOURCE_CACHE


async def test_find_available_orders_least_loaded_first_and_excludes(
    stub: Stub, fleet: Fleet
) -> None:
    busy = await fleet.mitra("Busy", capacity=3)
    idle = await fleet.mitra("Idle", capacity=3)
    full = await fleet.mitra("Full", capacity=1)
    excluded = await fleet.mitra("Excluded", capacity=3)
    offline = await fleet.mitra("Offline", capacity=3)
    for mitra in (busy, idle, full, excluded):
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await fleet.session(busy)
    await fleet.session(full)
    await stub.RecomputeLoad(pb.RecomputeLoadRequest(mitra_ids=[str(busy), str(full)]))

    reply = await stub.FindAvailableMitras(
        pb.FindAvailableMitrasRequest(limit=10, exclude_mitra_ids=[str(excluded)])
    )

    assert reply.source == pb.SOURCE_CACHE
    assert [m.mitra_id for m in reply.mitras] == [str(idle), str(busy)]
    assert [m.load for m in reply.mitras] == [0, 1]
    assert reply.mitras[0].display_name == "Idle"
    assert reply.mitras[0].max_concurrent_sessions == 3
    assert str(offline) not in {m.mitra_id for m in reply.mitras}
    limited = await stub.FindAvailableMitras(pb.FindAvailableMitrasRequest(limit=1))
    assert len(limited.mitras) == 1


async def test_find_available_skips_stale_mitras(
    stub: Stub, fleet: Fleet, valkey: redis.Redis, settings: Settings, db: asyncpg.Connection
) -> None:
    fresh = await fleet.mitra("Fresh")
    stale = await fleet.mitra("Stale")
    keys = Keys.for_prefix(settings.valkey_key_prefix)
    await notified(valkey, keys, fresh, stale)
    for mitra in (fresh, stale):
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await make_stale(valkey, db, keys, stale)

    reply = await stub.FindAvailableMitras(pb.FindAvailableMitrasRequest())

    assert [m.mitra_id for m in reply.mitras] == [str(fresh)]
    status = await stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=str(stale)))
    assert status.status.online and not status.status.fresh and not status.status.reachable


async def test_count_available_counts_and_caches(stub: Stub, fleet: Fleet) -> None:
    for _ in range(3):
        mitra = await fleet.mitra(capacity=1)
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await fleet.session(mitra)
    await stub.RecomputeLoad(pb.RecomputeLoadRequest(mitra_ids=[str(mitra)]))

    first = await stub.CountAvailableMitras(pb.CountAvailableMitrasRequest())
    late = await fleet.mitra()
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(late)))
    second = await stub.CountAvailableMitras(pb.CountAvailableMitrasRequest())

    assert (first.available_count, first.online_count) == (2, 3)
    assert first.source == pb.SOURCE_CACHE and first.HasField("as_of")
    assert second == first, "served from the shared snapshot until it expires"


async def test_recompute_load_returns_truth_and_updates_mirror(stub: Stub, fleet: Fleet) -> None:
    a = await fleet.mitra()
    b = await fleet.mitra()
    await fleet.session(a, "active")
    await fleet.session(a, "pending_payment")
    await fleet.session(a, "searching")
    await fleet.session(b, "ended")

    reply = await stub.RecomputeLoad(pb.RecomputeLoadRequest(mitra_ids=[str(a), str(b), str(a)]))

    assert [(x.mitra_id, x.load) for x in reply.loads] == [(str(a), 2), (str(b), 0)]
    status = await mirrored(stub, a)
    assert status.load == 2
