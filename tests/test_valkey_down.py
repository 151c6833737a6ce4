"""Valkey stopped: reads answer from Postgres (source = database), writes succeed, the
heartbeat guard falls back to Postgres and records there."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import grpc
import pytest
import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from availability.local_stores import LocalValkey
from availability.mirror import Breaker, Keys, Mirror, MirrorDown, connect_valkey
from availability.server import Server, running
from availability.settings import Settings
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet, eventually

Stub = pb_grpc.AvailabilityServiceStub


@pytest.fixture
async def down_stub(server_on_own_valkey: Server, own_valkey: LocalValkey) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server_on_own_valkey.port}") as channel:
        yield pb_grpc.AvailabilityServiceStub(channel)


async def test_reads_fall_back_to_postgres_with_source_database(
    down_stub: Stub, fleet: Fleet, own_valkey: LocalValkey, server_on_own_valkey: Server
) -> None:
    idle = await fleet.mitra("Idle", capacity=2)
    busy = await fleet.mitra("Busy", capacity=2)
    full = await fleet.mitra("Full", capacity=1)
    stale = await fleet.mitra("Stale", online=True, heartbeat_age=10_000)
    for mitra in (idle, busy, full):
        await down_stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await fleet.session(busy)
    await fleet.session(full)
    own_valkey.stop()

    status = await down_stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=str(busy)))
    reachable = await down_stub.IsMitraReachable(pb.IsMitraReachableRequest(mitra_id=str(stale)))
    found = await down_stub.FindAvailableMitras(pb.FindAvailableMitrasRequest(limit=10))
    count = await down_stub.CountAvailableMitras(pb.CountAvailableMitrasRequest())

    assert status.status.source == pb.SOURCE_DATABASE
    assert status.status.load == 1 and status.status.available and status.status.fresh
    assert reachable.source == pb.SOURCE_DATABASE and not reachable.reachable
    assert found.source == pb.SOURCE_DATABASE
    assert [m.mitra_id for m in found.mitras] == [str(idle), str(busy)]
    assert [m.load for m in found.mitras] == [0, 1]
    assert count.source == pb.SOURCE_DATABASE
    assert (count.available_count, count.online_count) == (2, 4)
    assert server_on_own_valkey.availability is not None
    assert server_on_own_valkey.availability.counters.fallbacks["find_available"] == 1


async def test_writes_succeed_and_land_in_postgres(
    down_stub: Stub, fleet: Fleet, own_valkey: LocalValkey, server_on_own_valkey: Server
) -> None:
    mitra = await fleet.mitra()
    own_valkey.stop()

    online = await down_stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    assert online.status.online
    assert (await fleet.online_row(mitra))["is_online"]  # type: ignore[index]
    deactivated = await down_stub.SetMitraActive(
        pb.SetMitraActiveRequest(mitra_id=str(mitra), active=False)
    )
    assert not deactivated.status.active and not deactivated.status.online
    offline = await down_stub.SetOffline(pb.SetOfflineRequest(mitra_id=str(mitra)))
    assert not offline.status.online
    assert server_on_own_valkey.availability is not None
    errors = server_on_own_valkey.availability.counters.mirror_write_errors
    assert errors["set_online"] == 1 and errors["set_active"] == 1
    assert errors["pin"] == 1  # the deactivation tried to pin its mitra first


async def test_heartbeat_guard_falls_back_to_postgres(
    down_stub: Stub, fleet: Fleet, own_valkey: LocalValkey, db: asyncpg.Connection
) -> None:
    active = await fleet.mitra()
    deactivated = await fleet.mitra()
    for mitra in (active, deactivated):
        await down_stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await down_stub.SetMitraActive(
        pb.SetMitraActiveRequest(mitra_id=str(deactivated), active=False)
    )
    await db.execute("UPDATE mitra_online_status SET last_heartbeat_at = now() - interval '1 hour'")
    own_valkey.stop()

    reply = await down_stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(active)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await down_stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(deactivated)))

    assert reply.online
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    age = await db.fetchval(
        "SELECT extract(epoch FROM now() - last_heartbeat_at) FROM mitra_online_status"
        " WHERE mitra_id = $1",
        active,
    )
    assert age < 60, "the heartbeat was recorded in Postgres"


async def test_postgres_fallback_freshness_allows_for_the_flush_lag(
    down_stub: Stub, fleet: Fleet, own_valkey: LocalValkey, server_on_own_valkey: Server
) -> None:
    settings = server_on_own_valkey.settings
    lagging = await fleet.mitra(
        "Lagging", online=True, heartbeat_age=settings.heartbeat_stale_seconds + 10
    )
    gone = await fleet.mitra(
        "Gone", online=True, heartbeat_age=settings.truth_freshness_seconds + 10
    )
    own_valkey.stop()

    lagging_status = await down_stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=str(lagging)))
    gone_status = await down_stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=str(gone)))

    assert lagging_status.status.fresh, "Postgres lags Valkey by up to one flush interval"
    assert not gone_status.status.fresh


async def test_the_breaker_stops_waiting_on_a_hung_valkey_and_probes_until_it_is_back(
    settings: Settings, own_valkey: LocalValkey, fleet: Fleet
) -> None:
    """A paused Valkey (SIGSTOP) accepts connections and never answers: each call waits out
    VALKEY_TIMEOUT_SECONDS. After a few, the breaker opens and reads go to Postgres at once."""
    mitra = await fleet.mitra()
    hung = replace(
        settings,
        valkey_url=own_valkey.url,
        valkey_timeout_seconds=0.25,
        valkey_breaker_failures=3,
        valkey_breaker_seconds=0.5,
    )
    async with running(hung) as server:
        assert server.availability is not None
        breaker = server.availability.mirror.breaker
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.AvailabilityServiceStub(channel)
            await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
            own_valkey.pause()
            try:
                sources = []
                for _ in range(10):
                    reply = await stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=str(mitra)))
                    sources.append(reply.status.source)
                short_circuited = breaker.short_circuits
            finally:
                own_valkey.resume()

            async def cached() -> bool:
                request = pb.GetMitraStatusRequest(mitra_id=str(mitra))
                return (await stub.GetMitraStatus(request)).status.source == pb.SOURCE_CACHE

            await eventually(cached, timeout=10)

    assert sources == [pb.SOURCE_DATABASE] * 10
    assert breaker.opened >= 1
    assert short_circuited >= 5, "most reads did not wait for the hung Valkey"
    assert not breaker.is_open, "a probe closed it once Valkey answered"


def test_the_breaker_lets_one_probe_through_and_any_answer_closes_it() -> None:
    breaker = Breaker(failures=2, seconds=0.5)
    breaker.judge(RedisConnectionError("refused"))
    breaker.judge(RedisConnectionError("refused"))
    assert breaker.is_open
    with pytest.raises(MirrorDown):
        breaker.check()  # cooling down
    time.sleep(0.6)
    breaker.check()  # the cooldown is over: this call probes
    with pytest.raises(MirrorDown):
        breaker.check()  # one probe at a time
    breaker.judge(asyncio.CancelledError())  # a cancelled probe says nothing...
    breaker.check()  # ...so the next call probes again
    breaker.judge(ResponseError("UNSEEDED the mirror is being seeded"))
    assert not breaker.is_open, "Valkey answered, even if with an error"


def test_each_failed_probe_keeps_the_breaker_open_twice_as_long_up_to_a_ceiling() -> None:
    """A Valkey gone for good is probed ever less often: 0.05, 0.1, 0.2 s ... up to the
    ceiling; a probe that succeeds starts over from the shortest wait."""
    breaker = Breaker(failures=1, seconds=0.05)
    waits = []
    breaker.judge(RedisConnectionError("refused"))
    for _ in range(4):
        started = time.monotonic()
        while True:
            try:
                breaker.check()
                break
            except MirrorDown:
                time.sleep(0.005)
        waits.append(time.monotonic() - started)
        breaker.judge(RedisConnectionError("still refused"))  # the probe failed
    # At least the doubled wait each time (a loaded machine may only add to it).
    for wait, expected in zip(waits[1:], (0.1, 0.2, 0.4), strict=True):
        assert expected * 0.95 <= wait < expected + 1.0, waits
    breaker.succeeded()
    breaker.judge(RedisConnectionError("refused again"))
    with pytest.raises(MirrorDown):
        breaker.check()
    time.sleep(0.07)
    breaker.check()  # back to the shortest wait (0.05 s, not 0.8 s) after a success


async def _timed_out(*_: object) -> None:
    """The fake: one Valkey call that times out on a live Valkey (a real one cannot be made to
    fail a single call)."""
    raise RedisTimeoutError("Timeout reading from socket")


async def test_a_deactivation_whose_mirror_write_fails_is_never_served(
    server: Server, stub: Stub, settings: Settings, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Valkey answers, but the one write after the commit does not reach it (a timeout on a
    live Valkey): the deactivation pinned the mitra before it committed, so no instance
    answers it from the mirror, which still says online and active, until the repair."""
    mitra = await fleet.mitra("Ayu")
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    assert server.availability is not None
    mirror = server.availability.mirror

    async with (
        running(settings) as other,
        grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as channel,
    ):
        other_stub = pb_grpc.AvailabilityServiceStub(channel)
        ask = pb.IsMitraReachableRequest(mitra_id=str(mitra))
        before = await other_stub.IsMitraReachable(ask)
        assert (before.reachable, before.source) == (True, pb.SOURCE_CACHE)

        with monkeypatch.context() as patched:
            patched.setattr(mirror, "apply", _timed_out)  # this write only
            await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(mitra), active=False))
            assert mitra in server.availability.unmirrored
            # The mirror still holds the mitra as online and active; both instances ask Postgres.
            for reader in (stub, other_stub):
                reply = await reader.IsMitraReachable(ask)
                assert (reply.reachable, reply.source) == (False, pb.SOURCE_DATABASE)
                found = await reader.FindAvailableMitras(pb.FindAvailableMitrasRequest())
                assert str(mitra) not in {m.mitra_id for m in found.mitras}
            beat = other_stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra)))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await beat
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # Repaired within a second or two: the mirror holds the deactivation and the pin is
        # gone, so the mirror answers again.
        async def from_the_mirror() -> bool:
            reply = await other_stub.IsMitraReachable(ask)
            return not reply.reachable and reply.source == pb.SOURCE_CACHE

        await eventually(from_the_mirror, timeout=15)


async def test_a_deactivation_unpins_its_mitra_once_the_mirror_holds_it(
    server: Server, stub: Stub, fleet: Fleet
) -> None:
    mitra = await fleet.mitra("Ayu")
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(mitra), active=False))
    ask = pb.IsMitraReachableRequest(mitra_id=str(mitra))

    async def from_the_mirror() -> bool:
        reply = await stub.IsMitraReachable(ask)
        assert not reply.reachable
        return reply.source == pb.SOURCE_CACHE

    await eventually(from_the_mirror, timeout=10)


async def test_a_pin_that_could_not_be_lifted_is_lifted_by_the_repair(
    server: Server, stub: Stub, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deactivation reached the mirror but lifting its pin timed out: the repair lifts it
    within a second or two, not the pin's own expiry (half a minute) during which the mitra,
    reactivated and online, would be left out of FindAvailableMitras."""
    mitra = await fleet.mitra("Ayu")
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    assert server.availability is not None
    mirror = server.availability.mirror

    with monkeypatch.context() as patched:
        patched.setattr(mirror, "unpin", _timed_out)  # the unpin only
        await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(mitra), active=False))
    assert server.availability.counters.mirror_write_errors.get("unpin") == 1
    await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(mitra), active=True))
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))

    async def found_from_the_mirror() -> bool:
        found = await stub.FindAvailableMitras(pb.FindAvailableMitrasRequest())
        assert found.source == pb.SOURCE_CACHE
        status = await stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=str(mitra)))
        assert status.status.available
        return str(mitra) in {m.mitra_id for m in found.mitras}

    await eventually(found_from_the_mirror, timeout=10)


async def test_a_deactivation_pins_its_mitra_even_while_the_breaker_is_open(
    server: Server, stub: Stub, fleet: Fleet
) -> None:
    """An open breaker may not have noticed that Valkey is back while other instances read
    the mirror: the pin goes past it (and its answer closes it)."""
    mitra = await fleet.mitra("Ayu")
    assert server.availability is not None
    mirror = server.availability.mirror
    for _ in range(server.settings.valkey_breaker_failures):
        mirror.breaker.failed()
    assert mirror.breaker.is_open
    with pytest.raises(MirrorDown):
        mirror.breaker.check()

    pin = await mirror.pin([mitra], 5.0)

    assert not mirror.breaker.is_open
    taken_at, asked = await mirror.resync_requests()
    assert mitra in asked and pin > taken_at  # pinned: no resync before then releases it
    await mirror.unpin(pin, [mitra])


async def test_a_resync_request_of_the_take_s_own_millisecond_waits_for_the_next_take(
    fleet: Fleet, valkey: redis.Redis, settings: Settings
) -> None:
    """A request asked in the very millisecond of a take, after it, may come from a write that
    committed after the resync read Postgres: releasing it would leave that write out of the
    mirror until the reconcile sweep. (No server runs on this mirror: its own resyncs would
    take and release the requests meanwhile.)"""
    early, same = await fleet.mitra("Early"), await fleet.mitra("Same")
    mirror = Mirror(connect_valkey(settings), settings)
    try:
        resync = Keys.for_prefix(settings.valkey_key_prefix).resync
        await mirror.request_resync([early, same])
        asked = await valkey.zscore(resync, str(same))
        assert asked is not None
        await valkey.zadd(resync, {str(early): asked - 1})  # asked a millisecond before

        await mirror.release_resync_requests(int(asked), [early, same])

        assert await valkey.zscore(resync, str(early)) is None
        assert await valkey.zscore(resync, str(same)) == asked
        await mirror.release_resync_requests(int(asked) + 1, [same])
        assert await valkey.zscore(resync, str(same)) is None
    finally:
        await mirror.close()
