"""WatchAvailableMitras: a snapshot, then every change from every path and every instance,
resumable by revision, bounded for slow consumers, and loud when Valkey is lost."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from uuid import UUID

import asyncpg
import grpc
import pytest
import redis.asyncio as redis

from availability.local_stores import LocalValkey
from availability.mirror import MIRROR_ERRORS, Keys
from availability.model import AvailabilitySnapshot
from availability.server import Server, running
from availability.settings import Settings
from availability.sweeps import AUTO_OFFLINE
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc
from availability.watch import SNAPSHOT_SENDS, WatchHub

from .helpers import Fleet, eventually, settled

pytestmark = pytest.mark.single_and_cluster

Stub = pb_grpc.AvailabilityServiceStub
Message = pb.WatchAvailableMitrasResponse


@dataclass
class Watcher:
    """One raw WatchAvailableMitras stream, read in the background into a list."""

    call: grpc.aio.UnaryStreamCall[pb.WatchAvailableMitrasRequest, Message]
    messages: list[Message] = field(default_factory=list)
    error: grpc.aio.AioRpcError | None = None
    task: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        try:
            async for message in self.call:
                self.messages.append(message)
        except grpc.aio.AioRpcError as exc:
            self.error = exc

    def changes(self) -> list[tuple[int, str, int, int]]:
        """(kind, mitra id, load, reason) of every change so far."""
        return [
            (m.change.kind, m.change.mitra.mitra_id, m.change.mitra.load, m.change.reason)
            for m in self.messages
            if m.HasField("change")
        ]

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Message]:
        await eventually(lambda: _true(len(self.messages) >= count), timeout=timeout)
        return self.messages


async def _true(value: bool) -> bool:
    return value


@contextlib.asynccontextmanager
async def watching(stub: Stub, resume: int | None = None) -> AsyncIterator[Watcher]:
    request = pb.WatchAvailableMitrasRequest()
    if resume is not None:
        request.resume_revision = resume
    watcher = Watcher(stub.WatchAvailableMitras(request))
    watcher.task = asyncio.create_task(watcher._read())
    try:
        yield watcher
    finally:
        watcher.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher.task


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[tuple[Server, Stub]]:
    async with (
        running(settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield server, pb_grpc.AvailabilityServiceStub(channel)


async def online(stub: Stub, *mitras: UUID) -> None:
    for mitra in mitras:
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))


def snapshot_ids(message: Message) -> list[str]:
    assert message.HasField("snapshot"), message
    return [m.mitra_id for m in message.snapshot.mitras]


AVAILABLE, UNAVAILABLE, LOAD = (
    pb.CHANGE_KIND_AVAILABLE,
    pb.CHANGE_KIND_UNAVAILABLE,
    pb.CHANGE_KIND_LOAD_CHANGED,
)
NO_REASON = pb.UNAVAILABLE_REASON_UNSPECIFIED


async def _online_in_sql(db: asyncpg.Connection, server: Server, count: int) -> WatchHub:
    """`count` mitras online, written in SQL as the other backends do, reconciled and in the
    server's watch hub; the hub."""
    await db.execute(
        "INSERT INTO mitras (display_name) SELECT 'Mitra ' || i FROM generate_series(1, $1) i",
        count,
    )
    await db.execute(
        "INSERT INTO mitra_online_status (mitra_id, is_online, last_heartbeat_at)"
        " SELECT id, true, now() FROM mitras"
    )
    assert server.availability is not None
    # Reconciled as the sweep would: a pass that a starved Valkey timed out is run again
    # (12,000 mitras are 12 scripts; one passed the suite's 1 s timeout on a machine overloaded
    # on purpose).
    for attempt in range(3):
        try:
            await server.availability.reconcile()
            break
        except MIRROR_ERRORS:
            if attempt == 2:
                raise
    hub = server.availability.watch_hub
    await eventually(lambda: _true(len(hub.snapshot().mitras) == count))
    return hub


async def test_watch_opens_with_a_snapshot_least_loaded_first(
    stub: Stub, fleet: Fleet, server: Server
) -> None:
    busy = await fleet.mitra("Busy", capacity=3)
    idle = await fleet.mitra("Idle", capacity=3)
    full = await fleet.mitra("Full", capacity=1)
    await fleet.mitra("Offline")
    await online(stub, busy, idle, full)
    await fleet.session(busy)
    await fleet.session(full)
    await stub.RecomputeLoad(pb.RecomputeLoadRequest(mitra_ids=[str(busy), str(full)]))

    async with watching(stub) as watcher:
        (first,) = await watcher.wait_for(1)

    assert snapshot_ids(first) == [str(idle), str(busy)]
    assert [m.load for m in first.snapshot.mitras] == [0, 1]
    assert (first.snapshot.part, first.snapshot.parts) == (0, 1)
    assert first.revision > 0


async def test_every_write_path_sends_one_change_with_its_reason(
    stub: Stub, fleet: Fleet, server: Server
) -> None:
    mitra = await fleet.mitra("Ayu", capacity=2)
    m = str(mitra)
    async with watching(stub) as watcher:
        await watcher.wait_for(1)
        await online(stub, mitra)
        await watcher.wait_for(2)
        session = await fleet.session(mitra)
        await stub.RecomputeLoad(pb.RecomputeLoadRequest(mitra_ids=[m]))
        await watcher.wait_for(3)
        await fleet.session(mitra)
        await stub.RecomputeLoad(pb.RecomputeLoadRequest(mitra_ids=[m]))
        await watcher.wait_for(4)
        await fleet.move_session(session, "ended")
        await stub.RecomputeLoad(pb.RecomputeLoadRequest(mitra_ids=[m]))
        await watcher.wait_for(5)
        await stub.SetOffline(pb.SetOfflineRequest(mitra_id=m))
        await watcher.wait_for(6)
        await online(stub, mitra)
        await watcher.wait_for(7)
        await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=m, active=False))
        messages = await watcher.wait_for(8)
        await asyncio.sleep(0.3)

    assert watcher.changes() == [
        (AVAILABLE, m, 0, NO_REASON),
        (LOAD, m, 1, NO_REASON),
        (UNAVAILABLE, m, 2, pb.UNAVAILABLE_REASON_FULL),
        (AVAILABLE, m, 1, NO_REASON),
        (UNAVAILABLE, m, 1, pb.UNAVAILABLE_REASON_OFFLINE),
        (AVAILABLE, m, 1, NO_REASON),
        (UNAVAILABLE, m, 1, pb.UNAVAILABLE_REASON_DEACTIVATED),
    ]
    revisions = [message.revision for message in messages]
    assert revisions == list(range(revisions[0], revisions[0] + 8))


async def test_changes_made_in_sql_alone_reach_watchers(
    stub: Stub, fleet: Fleet, db: asyncpg.Connection, server: Server
) -> None:
    """Other backends write chat_sessions and mitras directly; the triggers' NOTIFY feeds
    the stream without any RPC."""
    mitra = await fleet.mitra("Ayu", capacity=1)
    await online(stub, mitra)
    async with watching(stub) as watcher:
        await watcher.wait_for(1)
        await fleet.session(mitra)
        await watcher.wait_for(2)
        await db.execute("DELETE FROM chat_sessions")
        await watcher.wait_for(3)
        await db.execute("UPDATE mitras SET display_name = 'Ayu L.' WHERE id = $1", mitra)
        messages = await watcher.wait_for(4)

    assert watcher.changes()[:2] == [
        (UNAVAILABLE, str(mitra), 1, pb.UNAVAILABLE_REASON_FULL),
        (AVAILABLE, str(mitra), 0, NO_REASON),
    ]
    assert messages[3].change.kind == LOAD
    assert messages[3].change.mitra.display_name == "Ayu L."


@pytest.fixture
def quick_settings(settings: Settings) -> Settings:
    return replace(
        settings,
        heartbeat_stale_seconds=1.0,
        mitra_auto_offline_sweep_seconds=0.5,
        heartbeat_mirror_interval_seconds=0.5,
    )


async def test_stale_mitra_leaves_and_a_heartbeat_brings_it_back(
    quick_settings: Settings, fleet: Fleet
) -> None:
    """Nothing is written when a heartbeat goes stale: the expiry check publishes it, and
    the auto-offline sweep that follows sends nothing more (the watcher already knows)."""
    mitra = await fleet.mitra("Ayu")
    steady = await fleet.mitra("Steady")
    # The sweep runs by hand once the stale event is out: on its own cadence it could win
    # the race with the expiry check on a loaded machine, and the event would say OFFLINE.
    hand_swept = replace(quick_settings, mitra_auto_offline_sweep_seconds=600)
    async with served(hand_swept) as (server, stub):
        await online(stub, mitra, steady)
        async with watching(stub) as watcher, beating(stub, steady):  # Ayu stops
            await watcher.wait_for(2)
            stale = watcher.changes()[0]
            # The auto-offline sweep takes Ayu offline: no second event.
            assert server.sweeps is not None
            assert await server.sweeps.run_once(AUTO_OFFLINE, 30.0, server.sweeps.auto_offline)
            await eventually(lambda: _offline(stub, mitra), timeout=5.0)
            await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
            await watcher.wait_for(3)
            await asyncio.sleep(0.3)

    assert stale == (UNAVAILABLE, str(mitra), 0, pb.UNAVAILABLE_REASON_STALE)
    assert watcher.changes()[1:] == [(AVAILABLE, str(mitra), 0, NO_REASON)]


@contextlib.asynccontextmanager
async def beating(stub: Stub, mitra: UUID) -> AsyncIterator[None]:
    """A mitra's app heartbeating every 0.1 s for the block."""

    async def beat() -> None:
        while True:
            await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra)))
            await asyncio.sleep(0.1)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _offline(stub: Stub, mitra: UUID) -> bool:
    reply = await stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=str(mitra)))
    return not reply.status.online


async def test_a_heartbeat_makes_a_stale_mitra_available_again(
    quick_settings: Settings, fleet: Fleet
) -> None:
    mitra = await fleet.mitra("Ayu")
    stale = (UNAVAILABLE, str(mitra), 0, pb.UNAVAILABLE_REASON_STALE)
    back = (AVAILABLE, str(mitra), 0, NO_REASON)
    async with served(replace(quick_settings, mitra_auto_offline_sweep_seconds=60)) as (
        _server,
        stub,
    ):
        await online(stub, mitra)
        async with watching(stub) as watcher:
            # Ayu sends no heartbeat and goes stale a second after SetOnline.
            await eventually(lambda: _true(stale in watcher.changes()), timeout=10.0)
            assert await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra)))
            await eventually(lambda: _true(watcher.changes()[-1] == back), timeout=10.0)
            seen = watcher.changes()

    snapshot = watcher.messages[0].snapshot
    in_snapshot = any(m.mitra_id == str(mitra) for m in snapshot.mitras)
    # On a loaded machine the hub may answer with a snapshot from before SetOnline reached
    # it: then SetOnline's own change comes first.
    assert seen == ([] if in_snapshot else [back]) + [stale, back]


async def test_reconcile_publishes_the_drift_it_heals(
    stub: Stub, fleet: Fleet, db: asyncpg.Connection, server: Server
) -> None:
    """A change that reached neither the mirror nor the listener (triggers off) becomes a
    change on the stream when the reconcile sweep finds it."""
    mitra = await fleet.mitra("Ayu")
    await online(stub, mitra)
    await settled(server, db)  # the feed's resync of that SetOnline lands before the edit
    async with watching(stub) as watcher:
        await watcher.wait_for(1)
        async with db.transaction():
            await db.execute("SET LOCAL session_replication_role = replica")
            await db.execute(
                "UPDATE mitra_online_status SET is_online = false WHERE mitra_id = $1", mitra
            )
        await asyncio.sleep(0.2)
        assert len(watcher.messages) == 1
        assert server.availability is not None
        await server.availability.reconcile()
        await watcher.wait_for(2)

    assert watcher.changes() == [(UNAVAILABLE, str(mitra), 0, pb.UNAVAILABLE_REASON_OFFLINE)]


async def test_removed_mitra_leaves_with_reason_removed(
    stub: Stub, fleet: Fleet, db: asyncpg.Connection, server: Server
) -> None:
    mitra = await fleet.mitra("Ayu")
    await online(stub, mitra)
    await settled(server, db)  # the feed's resync of that SetOnline lands before the edit
    async with watching(stub) as watcher:
        await watcher.wait_for(1)
        async with db.transaction():
            await db.execute("SET LOCAL session_replication_role = replica")
            await db.execute("DELETE FROM mitra_online_status WHERE mitra_id = $1", mitra)
            await db.execute("DELETE FROM mitras WHERE id = $1", mitra)
        assert server.availability is not None
        await server.availability.reconcile()
        await watcher.wait_for(2)

    assert watcher.changes() == [(UNAVAILABLE, str(mitra), 0, pb.UNAVAILABLE_REASON_REMOVED)]


@pytest.fixture
async def two_servers(settings: Settings, db: asyncpg.Connection) -> AsyncIterator[list[Stub]]:
    """Two instances sharing Postgres and Valkey (one key prefix), as in production."""
    async with served(settings) as (_, first), served(settings) as (_, second):
        yield [first, second]


async def test_changes_through_either_instance_reach_watchers_on_both(
    two_servers: list[Stub], fleet: Fleet
) -> None:
    first, second = two_servers
    ayu = await fleet.mitra("Ayu")
    budi = await fleet.mitra("Budi")
    async with watching(first) as on_first, watching(second) as on_second:
        await on_first.wait_for(1)
        await on_second.wait_for(1)
        await online(first, ayu)
        await online(second, budi)
        await first.SetOffline(pb.SetOfflineRequest(mitra_id=str(budi)))
        await on_first.wait_for(4)
        await on_second.wait_for(4)

    expected = [
        (AVAILABLE, str(ayu), 0, NO_REASON),
        (AVAILABLE, str(budi), 0, NO_REASON),
        (UNAVAILABLE, str(budi), 0, pb.UNAVAILABLE_REASON_OFFLINE),
    ]
    assert on_first.changes() == expected
    assert on_second.changes() == expected
    assert [m.revision for m in on_first.messages] == [m.revision for m in on_second.messages]


async def test_sweeps_on_either_instance_reach_watchers_on_both(
    quick_settings: Settings, fleet: Fleet, db: asyncpg.Connection
) -> None:
    """Staleness is published by whichever instance checks first, the auto-offline runs on
    whichever holds its lease, a reconcile on either heals drift: each change reaches the
    watchers of both instances once."""
    ayu, budi = await fleet.mitra("Ayu"), await fleet.mitra("Budi")
    async with (
        served(quick_settings) as (one, first),
        served(quick_settings) as (two, second),
        contextlib.AsyncExitStack() as stack,  # the watchers, opened while Ayu is fresh
    ):
        await online(first, ayu, budi)
        async with beating(second, budi):
            async with beating(first, ayu):  # fresh until both watchers hold their snapshot
                # The feed's resyncs of those SetOnlines land before anything is watched.
                await settled(one, db)
                await settled(two, db)
                on_first = await stack.enter_async_context(watching(first))
                on_second = await stack.enter_async_context(watching(second))
                await on_first.wait_for(1)
                await on_second.wait_for(1)
            await eventually(lambda: _offline(first, ayu))  # stale, then auto-offline
            async with db.transaction():
                await db.execute("SET LOCAL session_replication_role = replica")
                await db.execute(
                    "UPDATE mitra_online_status SET is_online = false WHERE mitra_id = $1", budi
                )
            assert two.availability is not None
            await two.availability.reconcile()
            await on_first.wait_for(3)
            await on_second.wait_for(3)
            await asyncio.sleep(0.3)
            await stack.aclose()

    # Ayu leaves once: STALE from whichever expiry check ran first, or OFFLINE when an
    # auto-offline sweep got there before any expiry check (a loaded machine).
    ayu_left = on_first.changes()[0]
    assert ayu_left[:3] == (UNAVAILABLE, str(ayu), 0)
    assert ayu_left[3] in (pb.UNAVAILABLE_REASON_STALE, pb.UNAVAILABLE_REASON_OFFLINE)
    expected = [ayu_left, (UNAVAILABLE, str(budi), 0, pb.UNAVAILABLE_REASON_OFFLINE)]
    assert on_first.changes() == expected
    assert on_second.changes() == expected


async def test_resume_within_retention_replays_only_what_was_missed(
    stub: Stub, fleet: Fleet, server: Server
) -> None:
    ayu, budi = await fleet.mitra("Ayu"), await fleet.mitra("Budi")
    async with watching(stub) as watcher:
        (snapshot,) = await watcher.wait_for(1)
    await online(stub, ayu, budi)
    await stub.SetOffline(pb.SetOfflineRequest(mitra_id=str(ayu)))
    assert server.availability is not None
    hub = server.availability.watch_hub
    await eventually(lambda: _true(hub.revision == snapshot.revision + 3))

    async with watching(stub, resume=snapshot.revision) as resumed:
        await resumed.wait_for(3)
        await asyncio.sleep(0.2)
    async with watching(stub, resume=hub.revision) as current:
        await asyncio.sleep(0.3)
        await online(stub, ayu)
        await current.wait_for(1)

    assert not any(m.HasField("snapshot") for m in resumed.messages)
    assert resumed.changes() == [
        (AVAILABLE, str(ayu), 0, NO_REASON),
        (AVAILABLE, str(budi), 0, NO_REASON),
        (UNAVAILABLE, str(ayu), 0, pb.UNAVAILABLE_REASON_OFFLINE),
    ]
    assert current.changes() == [(AVAILABLE, str(ayu), 0, NO_REASON)]


async def test_resume_beyond_retention_starts_with_a_fresh_snapshot(
    settings: Settings, fleet: Fleet
) -> None:
    mitras = [await fleet.mitra(f"Mitra {i}") for i in range(8)]
    async with served(replace(settings, watch_retained_changes=3)) as (_server, stub):
        async with watching(stub) as watcher:
            (snapshot,) = await watcher.wait_for(1)
        await online(stub, *mitras)
        async with watching(stub, resume=snapshot.revision) as resumed:
            (fresh,) = await resumed.wait_for(1)
        future = fresh.revision + 1000
        async with watching(stub, resume=future) as from_the_future:
            (other,) = await from_the_future.wait_for(1)

    assert fresh.revision == snapshot.revision + 8
    assert sorted(snapshot_ids(fresh)) == sorted(map(str, mitras))
    assert snapshot_ids(other) == snapshot_ids(fresh)


async def test_a_slow_consumer_gets_a_fresh_snapshot_instead_of_a_growing_backlog(
    settings: Settings, fleet: Fleet
) -> None:
    """The hub side of a watcher that stops reading: its buffer never holds more than
    WATCH_BUFFER_EVENTS, and once over it, the watcher's next event is a snapshot."""
    mitras = [await fleet.mitra(f"Mitra {i}") for i in range(12)]
    async with running(replace(settings, watch_buffer_events=4)) as server:
        assert server.availability is not None
        hub = server.availability.watch_hub
        slow = hub.watch(None)
        first = await anext(slow)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.AvailabilityServiceStub(channel)
            await online(stub, *mitras)
            await eventually(lambda: _true(hub.revision == first.revision + 12))
        after = await anext(slow)
        await slow.aclose()

    assert hub.stats.overflows == 1
    assert after.revision == first.revision + 12
    assert isinstance(after, AvailabilitySnapshot) and len(after.mitras) == 12
    assert hub.watchers == 0


async def test_a_large_snapshot_comes_in_parts(
    stub: Stub, fleet: Fleet, server: Server, db: asyncpg.Connection
) -> None:
    await _online_in_sql(db, server, 12000)

    async with watching(stub) as watcher:
        messages = await watcher.wait_for(3)

    assert [(m.snapshot.part, m.snapshot.parts) for m in messages] == [(0, 3), (1, 3), (2, 3)]
    assert len({m.revision for m in messages}) == 1
    assert sum(len(m.snapshot.mitras) for m in messages) == 12000


async def test_a_burst_of_watchers_takes_snapshot_parts_a_few_at_a_time_and_every_place_back(
    stub: Stub, fleet: Fleet, server: Server, db: asyncpg.Connection
) -> None:
    """Each part is encoded in the event loop: a burst of watchers sends at most
    SNAPSHOT_SENDS parts at once, so other calls' replies are not held up behind them, and a
    watch that ends midway gives its place back."""
    hub = await _online_in_sql(db, server, 12000)

    async with contextlib.AsyncExitStack() as stack:
        watchers = [await stack.enter_async_context(watching(stub)) for _ in range(30)]
        for watcher in watchers:
            messages = await watcher.wait_for(3)
            assert [(m.snapshot.part, m.snapshot.parts) for m in messages] == [
                (0, 3),
                (1, 3),
                (2, 3),
            ]
    assert 1 <= hub.stats.most_snapshot_sends <= SNAPSHOT_SENDS

    for _ in range(10):  # ended after the first part: the others are never asked for
        async with watching(stub) as watcher:
            await watcher.wait_for(1)
    await eventually(lambda: _true(hub.watchers == 0))
    assert hub.places_held == 0
    async with watching(stub) as watcher:
        assert len(await watcher.wait_for(3)) == 3


async def test_losing_valkey_ends_the_watch_unavailable_and_recovery_brings_a_snapshot(
    server_on_own_valkey: Server, stub_own: Stub, own_valkey: LocalValkey, fleet: Fleet
) -> None:
    ayu = await fleet.mitra("Ayu")
    await online(stub_own, ayu)
    async with watching(stub_own) as watcher:
        await watcher.wait_for(1)
        own_valkey.kill()
        await eventually(lambda: _true(watcher.error is not None), timeout=5.0)
    assert watcher.error is not None
    assert watcher.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "Valkey" in (watcher.error.details() or "")

    async with watching(stub_own) as early:
        await eventually(lambda: _true(early.error is not None))
    assert early.error is not None and early.error.code() == grpc.StatusCode.UNAVAILABLE
    own_valkey.start()
    assert server_on_own_valkey.availability is not None
    hub = server_on_own_valkey.availability.watch_hub
    await eventually(lambda: _true(hub.ready), timeout=15.0)
    async with watching(stub_own, resume=watcher.messages[0].revision) as after:
        (snapshot,) = await after.wait_for(1)

    assert snapshot_ids(snapshot) == [str(ayu)]
    assert snapshot.revision > watcher.messages[0].revision


async def test_a_valkey_call_of_the_hub_that_times_out_once_ends_no_watch(
    settings: Settings, own_valkey: LocalValkey, fleet: Fleet
) -> None:
    """Valkey paused for twice a call's timeout (a busy event loop looks the same to the
    hub): the hub retries from its revision within LOST_AFTER_SECONDS, the watch stays and
    gets the change made meanwhile. (A Valkey that is gone ends them: the test above.)"""
    ayu, budi = await fleet.mitra("Ayu"), await fleet.mitra("Budi")
    production = replace(settings, valkey_url=own_valkey.url, valkey_timeout_seconds=0.25)
    async with served(production) as (server, stub):
        assert server.availability is not None
        hub = server.availability.watch_hub
        await online(stub, ayu)
        async with watching(stub) as watcher:
            await watcher.wait_for(1)
            for _ in range(20):  # until one of the hub's calls fell in a pause
                own_valkey.pause()
                await asyncio.sleep(0.5)
                own_valkey.resume()
                await asyncio.sleep(0.2)
                if hub.stats.retries:
                    break
            assert hub.stats.retries > 0
            await online(stub, budi)
            await eventually(lambda: _true(any(c[1] == str(budi) for c in watcher.changes())))
            assert watcher.error is None
        assert hub.stats.losses == 0


def test_the_response_carries_exactly_an_availability_event() -> None:
    """buf's STANDARD rules name the stream's message WatchAvailableMitrasResponse;
    docs/api/reference.md calls it AvailabilityEvent. They are the same message, field for
    field."""

    def shape(descriptor: object) -> list[tuple[str, int, int, str]]:
        return [
            (f.name, f.number, f.type, f.message_type.full_name if f.message_type else "")
            for f in descriptor.fields  # type: ignore[attr-defined]
        ]

    assert shape(pb.WatchAvailableMitrasResponse.DESCRIPTOR) == shape(
        pb.AvailabilityEvent.DESCRIPTOR
    )
    event = pb.AvailabilityEvent(revision=7, change=pb.AvailabilityChange(kind=AVAILABLE))
    assert pb.WatchAvailableMitrasResponse.FromString(event.SerializeToString()).revision == 7


async def test_a_resume_from_before_a_reseed_gets_a_snapshot_without_what_changed_silently(
    stub: Stub, fleet: Fleet, server: Server, valkey: redis.Redis
) -> None:
    """A reseed mirrors what changed while the mirror was unseeded without publishing it;
    a watcher resuming from before must not be told only the changes after it."""
    ayu, budi = await fleet.mitra("Ayu"), await fleet.mitra("Budi")
    await online(stub, ayu, budi)
    assert server.availability is not None and server.sweeps is not None
    hub = server.availability.watch_hub
    async with watching(stub) as watcher:
        (snapshot,) = await watcher.wait_for(1)
    assert set(snapshot_ids(snapshot)) == {str(ayu), str(budi)}
    await server.sweeps.stop()  # the test reseeds by hand, after the silent change
    await valkey.delete(Keys.for_prefix(server.settings.valkey_key_prefix).seeded)
    await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(ayu), active=False))
    await server.availability.reconcile()
    await eventually(lambda: _true(hub.ready and hub.revision != snapshot.revision))

    async with watching(stub, resume=snapshot.revision) as resumed:
        await resumed.wait_for(1)
        await asyncio.sleep(0.2)

    first = resumed.messages[0]
    assert first.HasField("snapshot"), resumed.changes()
    assert snapshot_ids(first) == [str(budi)]
