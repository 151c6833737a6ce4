"""The sweeps: each one's effect, abort on Valkey error, the mass-stale guard, flush
idempotency and monotonicity, reconcile healing every kind of drift, leases and fencing."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import redis.asyncio as redis

from availability.mirror import Keys
from availability.server import Server, running
from availability.settings import Settings
from availability.sweeps import AUTO_OFFLINE, AUTO_OFFLINE_BY, HEARTBEAT_FLUSH, RECONCILE, Sweeps
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet, eventually, make_stale

pytestmark = pytest.mark.single_and_cluster

Stub = pb_grpc.AvailabilityServiceStub


def sweeps_of(server: Server) -> Sweeps:
    assert server.sweeps is not None
    return server.sweeps


async def tick(server: Server, name: str) -> bool:
    sweeps = sweeps_of(server)
    sweep = {
        AUTO_OFFLINE: sweeps.auto_offline,
        HEARTBEAT_FLUSH: sweeps.flush_heartbeats,
        RECONCILE: sweeps.reconcile,
    }[name]
    return await sweeps.run_once(name, 30.0, sweep)


async def online_in_truth(db: asyncpg.Connection) -> set[uuid.UUID]:
    return {
        r[0] for r in await db.fetch("SELECT mitra_id FROM mitra_online_status WHERE is_online")
    }


async def test_auto_offline_takes_stale_mitras_offline_in_both_stores(
    server: Server, stub: Stub, fleet: Fleet, valkey: redis.Redis, db: asyncpg.Connection
) -> None:
    keys = Keys.for_prefix(server.settings.valkey_key_prefix)
    fresh, stale = await fleet.mitra("Fresh"), await fleet.mitra("Stale")
    for mitra in (fresh, stale):
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await make_stale(valkey, db, keys, stale)

    assert await tick(server, AUTO_OFFLINE)

    assert await online_in_truth(db) == {fresh}
    assert await valkey.smembers(keys.online) == {str(fresh)}
    assert await valkey.zscore(keys.ready, str(stale)) is None
    heartbeat = await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(stale)))
    assert not heartbeat.online, "the app learns it was taken offline"
    assert sweeps_of(server).report.of(AUTO_OFFLINE).affected == 1


async def test_the_auto_offline_sweep_logs_each_mitra_it_takes_offline(
    server: Server,
    stub: Stub,
    fleet: Fleet,
    valkey: redis.Redis,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = Keys.for_prefix(server.settings.valkey_key_prefix)
    stale = await fleet.mitra("Stale")
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(stale)))
    await make_stale(valkey, db, keys, stale)
    caplog.set_level(logging.INFO, logger="availability.changes")

    assert await tick(server, AUTO_OFFLINE)

    events = [
        (r.action, r.changed_mitra, r.online_before, r.online_after, r.changed_by)  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "event", None) == "presence_changed"
    ]
    assert events == [("auto_offline", str(stale), True, False, AUTO_OFFLINE_BY)]


async def test_auto_offline_aborts_when_valkey_errors(
    server: Server, stub: Stub, fleet: Fleet, valkey: redis.Redis, db: asyncpg.Connection
) -> None:
    keys = Keys.for_prefix(server.settings.valkey_key_prefix)
    mitras = [await fleet.mitra() for _ in range(3)]
    for mitra in mitras:
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await make_stale(valkey, db, keys, *mitras)
    await valkey.delete(keys.seeded)  # the mirror now answers every read with an error

    await tick(server, AUTO_OFFLINE)

    assert await online_in_truth(db) == set(mitras), "Postgres untouched"
    assert sweeps_of(server).report.of(AUTO_OFFLINE).aborted == 1


async def test_sweeps_do_not_run_without_valkey(
    server_on_own_valkey: Server,
    stub_own: Stub,
    fleet: Fleet,
    own_valkey: object,
    db: asyncpg.Connection,
) -> None:
    mitra = await fleet.mitra()
    await stub_own.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await db.execute("UPDATE mitra_online_status SET last_heartbeat_at = now() - interval '1 day'")
    own_valkey.stop()  # type: ignore[attr-defined]

    for name in (AUTO_OFFLINE, HEARTBEAT_FLUSH, RECONCILE):
        assert not await tick(server_on_own_valkey, name)

    assert await online_in_truth(db) == {mitra}, "no mass-offline through a Postgres scan"


async def test_mass_stale_guard_limits_and_counts(
    settings: Settings, fleet: Fleet, valkey: redis.Redis, db: asyncpg.Connection
) -> None:
    guarded = replace(settings, mass_stale_min=10, mass_stale_max_per_sweep=4)
    mitras = [await fleet.mitra(online=True) for _ in range(30)]
    async with running(guarded) as server:
        keys = Keys.for_prefix(guarded.valkey_key_prefix)
        await make_stale(valkey, db, keys, *mitras[:20])  # 20 of 30: more than half

        await tick(server, AUTO_OFFLINE)

        assert len(await online_in_truth(db)) == 26, "only 4 taken offline"
        assert sweeps_of(server).report.guard_trips == 1
        still_online = sorted(await online_in_truth(db))
        await valkey.zadd(keys.heartbeats, {str(m): time.time() * 1000 for m in still_online})
        await make_stale(valkey, db, keys, *still_online[:5])  # 5 of 26: an ordinary sweep

        await tick(server, AUTO_OFFLINE)

        assert len(await online_in_truth(db)) == 26 - 5, "below the share: all go"
        assert sweeps_of(server).report.guard_trips == 1


async def test_flush_writes_only_changed_heartbeats_once(
    server: Server, stub: Stub, fleet: Fleet, valkey: redis.Redis, db: asyncpg.Connection
) -> None:
    keys = Keys.for_prefix(server.settings.valkey_key_prefix)
    a, b = await fleet.mitra(), await fleet.mitra()
    for mitra in (a, b):
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await db.execute(
        "UPDATE mitra_online_status SET last_heartbeat_at = now() - interval '1 minute'"
    )
    await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(a)))
    sent = int(float(await valkey.zscore(keys.heartbeats, str(a))))  # type: ignore[arg-type]

    await tick(server, HEARTBEAT_FLUSH)

    times = dict(await db.fetch("SELECT mitra_id, last_heartbeat_at FROM mitra_online_status"))
    assert int(times[a].timestamp() * 1000) == sent
    assert times[b] < datetime.now(UTC) - timedelta(seconds=30), "b sent none: untouched"
    assert await valkey.hlen(keys.dirty) == 0
    assert sweeps_of(server).report.of(HEARTBEAT_FLUSH).affected == 1
    await tick(server, HEARTBEAT_FLUSH)
    assert sweeps_of(server).report.of(HEARTBEAT_FLUSH).affected == 1, "nothing new to flush"


async def test_flush_never_moves_time_backwards_and_overlapping_instances_agree(
    settings: Settings, fleet: Fleet, valkey: redis.Redis, db: asyncpg.Connection
) -> None:
    mitras = [await fleet.mitra() for _ in range(50)]
    async with running(settings) as one, running(settings) as two:
        async with __import__("grpc").aio.insecure_channel(f"127.0.0.1:{one.port}") as ch:
            stub = pb_grpc.AvailabilityServiceStub(ch)
            for mitra in mitras:
                await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
                await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra)))
        future = datetime.now(UTC) + timedelta(hours=1)
        await db.execute(
            "UPDATE mitra_online_status SET last_heartbeat_at = $2 WHERE mitra_id = $1",
            mitras[0],
            future,
        )
        keys = Keys.for_prefix(settings.valkey_key_prefix)
        expected = {uuid.UUID(k): int(v) for k, v in (await valkey.hgetall(keys.dirty)).items()}
        assert len(expected) == 50

        await asyncio.gather(sweeps_of(one).flush_heartbeats(1), sweeps_of(two).flush_heartbeats(1))

        rows = dict(await db.fetch("SELECT mitra_id, last_heartbeat_at FROM mitra_online_status"))
        assert rows[mitras[0]] == future, "never backwards"
        for mitra in mitras[1:]:
            assert int(rows[mitra].timestamp() * 1000) == expected[mitra]
        assert await valkey.hlen(keys.dirty) == 0
        assert not await valkey.exists(keys.flushing)


async def test_flush_keeps_a_heartbeat_that_arrived_during_it(
    server: Server, stub: Stub, fleet: Fleet, valkey: redis.Redis
) -> None:
    keys = Keys.for_prefix(server.settings.valkey_key_prefix)
    mitra = await fleet.mitra()
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra)))
    availability = server.availability
    assert availability is not None
    taken = await availability.mirror.take_dirty_heartbeats(epoch=1)
    await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra)))  # during the flush

    await availability.truth.flush_heartbeats(taken)
    assert await availability.mirror.release_flushed(epoch=1)

    assert await valkey.hexists(keys.dirty, str(mitra)), "left for the next flush"
    assert not await valkey.exists(keys.flushing)


async def test_flush_survives_a_failed_write_and_a_late_former_leader(
    server: Server, stub: Stub, fleet: Fleet, valkey: redis.Redis, db: asyncpg.Connection
) -> None:
    keys = Keys.for_prefix(server.settings.valkey_key_prefix)
    availability = server.availability
    assert availability is not None
    first, second = await fleet.mitra(), await fleet.mitra()
    for mitra in (first, second):
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await db.execute("UPDATE mitra_online_status SET last_heartbeat_at = now() - interval '1 hour'")
    await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(first)))
    await availability.mirror.take_dirty_heartbeats(epoch=1)  # then this leader stalls
    await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(second)))

    taken = await availability.mirror.take_dirty_heartbeats(epoch=2)  # the new leader
    assert set(taken) == {str(first), str(second)}, "the stalled batch is merged, not lost"
    assert not await availability.mirror.release_flushed(epoch=1), "the late leader drops nothing"
    assert await valkey.exists(keys.flushing)
    await availability.truth.flush_heartbeats(taken)
    assert await availability.mirror.release_flushed(epoch=2)

    ages = await db.fetch(
        "SELECT extract(epoch FROM now() - last_heartbeat_at) FROM mitra_online_status"
    )
    assert all(age[0] < 60 for age in ages)


async def test_reconcile_heals_every_kind_of_drift(
    server: Server, stub: Stub, fleet: Fleet, valkey: redis.Redis, db: asyncpg.Connection
) -> None:
    keys = Keys.for_prefix(server.settings.valkey_key_prefix)
    online = [await fleet.mitra(f"On {i}", capacity=2) for i in range(4)]
    offline = await fleet.mitra("Off")
    deactivated = await fleet.mitra("Gone", active=False)
    for mitra in online:
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await fleet.session(online[0])
    await stub.RecomputeLoad(pb.RecomputeLoadRequest(mitra_ids=[str(online[0])]))
    await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(online[1])))

    async def all_mirrored() -> bool:
        return await valkey.hlen(keys.capacity) == 6 and await valkey.hlen(keys.loads) == 6

    async def change_drained() -> bool:
        noted = "SELECT count(*) FROM availability_changes WHERE mitra_id = $1"
        return await db.fetchval(noted, online[0]) == 0

    await eventually(all_mirrored)
    # The session's change is taken by the listener and resynced: let that resync land
    # before the drift is made, or it heals the wrong load before the reconcile can.
    await eventually(change_drained)
    await asyncio.sleep(0.2)
    expected = await snapshot(valkey, keys)
    ghost = str(uuid.uuid4())

    await valkey.srem(keys.online, str(online[1]))  # missing member
    await valkey.sadd(keys.online, str(offline), ghost)  # extra members
    await valkey.srem(keys.deactivated, str(deactivated))
    await valkey.hset(keys.loads, str(online[0]), "7")  # wrong load
    await valkey.zadd(keys.heartbeats, {str(online[2]): 5})  # wrong (old) heartbeat
    await valkey.delete(keys.ready)  # deleted key
    await valkey.hset(keys.capacity, str(online[3]), "99")

    assert await tick(server, RECONCILE)

    healed = await snapshot(valkey, keys)
    assert healed["online"] == expected["online"]
    assert healed["deactivated"] == expected["deactivated"]
    assert healed["loads"] == expected["loads"]
    assert healed["capacity"] == expected["capacity"]
    assert set(healed["ready"]) == set(expected["ready"])
    assert healed["heartbeats"][str(online[2])] > 5
    drift = sweeps_of(server).report.drift
    assert drift.online == 2 and drift.deactivated == 1 and drift.load == 1
    assert drift.profile == 1 and drift.heartbeat == 1 and drift.ready == 4
    assert drift.forgotten == 1


async def snapshot(valkey: redis.Redis, keys: Keys) -> dict[str, object]:
    return {
        "online": await valkey.smembers(keys.online),
        "deactivated": await valkey.smembers(keys.deactivated),
        "loads": await valkey.hgetall(keys.loads),
        "capacity": await valkey.hgetall(keys.capacity),
        "ready": dict(await valkey.zrange(keys.ready, 0, -1, withscores=True)),
        "heartbeats": dict(await valkey.zrange(keys.heartbeats, 0, -1, withscores=True)),
    }


async def test_reconcile_does_not_forget_a_mitra_created_during_it(
    server: Server, fleet: Fleet, valkey: redis.Redis
) -> None:
    keys = Keys.for_prefix(server.settings.valkey_key_prefix)
    availability = server.availability
    assert availability is not None
    before = datetime.now(UTC) - timedelta(seconds=5)
    late = await fleet.mitra("Late")
    await availability.resync([late])

    forgotten = await availability.mirror.forget([str(late)], before)

    assert forgotten == 0 and await valkey.hexists(keys.capacity, str(late))


async def test_one_write_naming_a_mitra_twice_keeps_the_newer_state(
    server: Server, stub: Stub, fleet: Fleet, valkey: redis.Redis, settings: Settings
) -> None:
    """The mirror script reads a batch's state once, so repeats go in separate batches and
    the version fence still orders them."""
    availability = server.availability
    assert availability is not None
    keys = Keys.for_prefix(settings.valkey_key_prefix)
    mitra = await fleet.mitra()
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    (online,) = await availability.truth.states([mitra])
    await stub.SetOffline(pb.SetOfflineRequest(mitra_id=str(mitra)))
    (offline,) = await availability.truth.states([mitra])

    await availability.mirror.apply([offline, online])
    after_late_online = await valkey.sismember(keys.online, str(mitra))
    await availability.mirror.apply([replace(online, version=offline.version + 1), offline])

    assert not after_late_online, "the older online state came second and lost"
    assert await valkey.sismember(keys.online, str(mitra)), "the newer one won"


async def test_a_late_former_leader_is_fenced_out(
    server: Server, stub: Stub, fleet: Fleet, db: asyncpg.Connection
) -> None:
    availability = server.availability
    assert availability is not None
    mitra = await fleet.mitra()
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await db.execute("UPDATE mitra_online_status SET last_heartbeat_at = now() - interval '1 hour'")

    old = await availability.mirror.take_lease(AUTO_OFFLINE, "old", 60)
    new = old + 1

    new_leader = await availability.truth.take_offline([], AUTO_OFFLINE, new)
    late = await availability.truth.take_offline([mitra], AUTO_OFFLINE, old)

    assert new_leader == [] and late == []
    assert await online_in_truth(db) == {mitra}, "the old epoch after the new changes nothing"
    assert await availability.truth.take_offline([mitra], AUTO_OFFLINE, new) == [mitra]


async def test_lease_has_one_holder_and_passes_on_expiry(server: Server) -> None:
    availability = server.availability
    assert availability is not None
    mirror = availability.mirror

    first = await mirror.take_lease("test", "a", 0.3)
    assert await mirror.take_lease("test", "b", 0.3) == 0
    assert await mirror.take_lease("test", "a", 0.3) == first, "renewal keeps the epoch"
    await asyncio.sleep(0.4)
    second = await mirror.take_lease("test", "b", 0.3)
    assert second > first
    await mirror.release_lease("test", "a")  # a no longer holds it: no effect
    assert await mirror.take_lease("test", "a", 0.3) == 0


async def test_epochs_keep_growing_after_valkey_loses_its_data(
    server: Server, stub: Stub, fleet: Fleet, db: asyncpg.Connection, valkey: redis.Redis
) -> None:
    """A replaced or flushed Valkey starts the epoch counter again; Postgres still holds the
    last epoch that wrote, so a counter restarting at 1 would fence out every auto-offline."""
    availability = server.availability
    assert availability is not None
    mitra = await fleet.mitra()
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await db.execute("UPDATE mitra_online_status SET last_heartbeat_at = now() - interval '1 hour'")
    before = await availability.mirror.take_lease(AUTO_OFFLINE, "old", 60)
    await availability.truth.take_offline([], AUTO_OFFLINE, before)
    await valkey.delete(*availability.mirror.keys.lease(AUTO_OFFLINE))

    after = await availability.mirror.take_lease(AUTO_OFFLINE, "new", 60)

    assert after > before
    assert await availability.truth.take_offline([mitra], AUTO_OFFLINE, after) == [mitra]


async def test_two_instances_run_each_sweep_once_per_tick(
    settings: Settings, fleet: Fleet, db: asyncpg.Connection
) -> None:
    # 1 s ticks: a lease (1.5 ticks) outlives the event-loop stalls of a loaded machine,
    # which at 0.2 s let the lease lapse and the other instance take a turn.
    tick = 1.0
    fast = replace(
        settings,
        mitra_auto_offline_sweep_seconds=tick,
        heartbeat_mirror_interval_seconds=tick,
        valkey_online_mirror_sweep_seconds=tick,
    )
    names = (AUTO_OFFLINE, HEARTBEAT_FLUSH, RECONCILE)
    async with running(fast) as one, running(fast) as two:
        # Counted from when both serve: the first ran alone while the second started.
        reports = [sweeps_of(one).report, sweeps_of(two).report]
        before = {name: [r.of(name).runs for r in reports] for name in names}
        started = time.monotonic()
        await asyncio.sleep(6 * tick)
        after = {name: [r.of(name).runs for r in reports] for name in names}
        ticks = (time.monotonic() - started) / tick
    for name in names:
        runs = [a - b for a, b in zip(after[name], before[name], strict=True)]
        assert sum(runs) <= ticks + 1, f"{name}: {runs} runs in {ticks:.0f} ticks"
        assert sum(runs) >= ticks / 3, f"{name}: {runs}"
        assert min(runs) <= 1, f"{name}: one instance holds the lease ({runs})"


async def test_one_sweep_runs_once_at_a_time_in_an_instance(
    server: Server, fleet: Fleet, db: asyncpg.Connection
) -> None:
    """A reseed and the cycle's reconcile can meet in one instance (the lease lets its holder
    in twice): one runs, the other steps aside, and the run is recorded once."""
    for i in range(50):
        await fleet.mitra(f"M{i}", online=True)
    runs = sweeps_of(server).report.of(RECONCILE).runs

    outcomes = await asyncio.gather(tick(server, RECONCILE), tick(server, RECONCILE))

    assert sorted(outcomes) == [False, True]
    assert sweeps_of(server).report.of(RECONCILE).runs == runs + 1
