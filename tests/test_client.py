"""availability.client: every RPC typed, retries of UNAVAILABLE, and a live set that always
converges to what FindAvailableMitras says."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from uuid import UUID

import asyncpg
import grpc
import pytest

from availability.client import AvailabilityClient, LiveAvailability
from availability.local_stores import LocalValkey
from availability.model import AvailableMitra, Source
from availability.server import Server
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet, eventually

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]


@pytest.fixture
async def client(server: Server) -> AsyncIterator[AvailabilityClient]:
    async with AvailabilityClient(f"127.0.0.1:{server.port}", timeout=5.0) as connected:
        yield connected


async def test_every_rpc_returns_the_services_own_types(
    client: AvailabilityClient, fleet: Fleet
) -> None:
    ayu = await fleet.mitra("Ayu", capacity=2)
    budi = await fleet.mitra("Budi")
    await fleet.auth_session(budi)

    online = await client.set_online(ayu)
    beat = await client.heartbeat(ayu)
    await fleet.session(ayu)
    loads = await client.recompute_load([ayu])
    status = await client.get_mitra_status(ayu)
    reachable = await client.is_mitra_reachable(ayu)
    found = await client.find_available_mitras(limit=10)
    count = await client.count_available_mitras()
    deactivated, revoked = await client.set_mitra_active(budi, False)
    offline = await client.set_offline(ayu)
    dashboard = await client.get_dashboard_stats()
    async for update in client.watch_dashboard_stats():
        watched = update
        break

    assert online.online and online.available and online.mitra_id == ayu
    assert beat is True
    assert loads == {ayu: 1}
    assert (status.load, status.source) == (1, Source.CACHE)
    assert reachable is True
    assert found == [AvailableMitra(ayu, "Ayu", 1, 2)]
    assert (count.available, count.online) == (1, 1)
    assert not deactivated.active and revoked == 1
    assert not offline.online
    assert dashboard.counts.active_chats == 1 and dashboard.online_mitras == 0
    assert dashboard.source == Source.CACHE
    assert watched.counts == dashboard.counts


async def test_the_pairing_service_blasts_from_the_live_set(
    client: AvailabilityClient, fleet: Fleet
) -> None:
    """docs/clients.md's example, with the chats and the blast made up."""
    idle, busy, declined = [await fleet.mitra(n) for n in ("Idle", "Busy", "Declined")]
    for mitra in (idle, busy, declined):
        await client.set_online(mitra)
    await fleet.session(busy)
    await client.recompute_load([busy])
    blasted: list[list[UUID]] = []

    async with client.watch_available() as live:
        await live.wait_in_sync()
        picks = live.least_loaded(20, exclude=[declined])
        blasted.append([m.mitra_id for m in picks])
        await client.set_offline(idle)
        await eventually(lambda: _true(idle not in live.mitras))
        blasted.append([m.mitra_id for m in live.least_loaded(20, exclude=[declined])])

    assert blasted == [[idle, busy], [busy]]


async def test_errors_keep_their_codes(client: AvailabilityClient, fleet: Fleet) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as malformed:
        await client.get_mitra_status("not-a-uuid")
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await client.set_online(UUID(int=1))

    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mitra_id" in (malformed.value.details() or "")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


class Flaky(pb_grpc.AvailabilityServiceServicer):
    """Fails the first calls with a code: a real server cannot be made to fail exactly N
    times and then answer, which is what shows the client's retry policy at work."""

    def __init__(self, failures: int, code: grpc.StatusCode) -> None:
        self.failures = failures
        self.code = code
        self.calls = 0

    async def IsMitraReachable(
        self, request: pb.IsMitraReachableRequest, context: Context
    ) -> pb.IsMitraReachableResponse:
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(self.code, "not now")
        return pb.IsMitraReachableResponse(reachable=True)


@contextlib.asynccontextmanager
async def flaky_server(servicer: pb_grpc.AvailabilityServiceServicer) -> AsyncIterator[int]:
    """A stand-in server for what a real one cannot be made to do on cue."""
    server = grpc.aio.server()
    pb_grpc.add_AvailabilityServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


async def test_unavailable_is_retried_by_the_channel() -> None:
    servicer = Flaky(2, grpc.StatusCode.UNAVAILABLE)
    async with flaky_server(servicer) as port, AvailabilityClient(f"127.0.0.1:{port}") as client:
        assert await client.is_mitra_reachable(UUID(int=1)) is True
    assert servicer.calls == 3


async def test_other_errors_are_not_retried() -> None:
    servicer = Flaky(1, grpc.StatusCode.NOT_FOUND)
    async with flaky_server(servicer) as port, AvailabilityClient(f"127.0.0.1:{port}") as client:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await client.is_mitra_reachable(UUID(int=1))
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert servicer.calls == 1


async def test_retries_stop_after_the_configured_attempts() -> None:
    servicer = Flaky(10, grpc.StatusCode.UNAVAILABLE)
    async with (
        flaky_server(servicer) as port,
        AvailabilityClient(f"127.0.0.1:{port}", attempts=3) as client,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await client.is_mitra_reachable(UUID(int=1))
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls == 3


def as_found(mitras: list[AvailableMitra]) -> dict[UUID, AvailableMitra]:
    return {m.mitra_id: m for m in mitras}


async def converged(live: LiveAvailability, client: AvailabilityClient) -> bool:
    found = as_found(await client.find_available_mitras(limit=10_000))
    return live.in_sync and dict(live.mitras) == found


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_the_live_set_equals_find_after_every_change_in_a_random_sequence(
    client: AvailabilityClient, fleet: Fleet, db: asyncpg.Connection, seed: int
) -> None:
    rng = random.Random(seed)
    mitras = [await fleet.mitra(f"Mitra {i}", capacity=rng.randint(1, 3)) for i in range(6)]
    sessions: dict[UUID, list[UUID]] = {m: [] for m in mitras}

    async def take_chat(mitra: UUID) -> None:
        sessions[mitra].append(await fleet.session(mitra))
        await client.recompute_load([mitra])

    async def end_chat(mitra: UUID) -> None:
        if sessions[mitra]:
            await fleet.move_session(sessions[mitra].pop(), "ended")
            await client.recompute_load([mitra])

    async def resize(mitra: UUID) -> None:
        # A backend edits the mitra in SQL; the trigger alone must carry it.
        await db.execute(
            "UPDATE mitras SET max_concurrent_sessions = $2 WHERE id = $1", mitra, rng.randint(1, 3)
        )

    async def set_online(mitra: UUID) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):  # deactivated: refused
            await client.set_online(mitra)

    async def heartbeat(mitra: UUID) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):  # deactivated: refused
            await client.heartbeat(mitra)

    actions = [
        set_online,
        set_online,
        client.set_offline,
        lambda m: client.set_mitra_active(m, False),
        lambda m: client.set_mitra_active(m, True),
        take_chat,
        take_chat,
        end_chat,
        resize,
        heartbeat,
    ]
    async with client.watch_available() as live:
        await eventually(lambda: converged(live, client))
        for _ in range(40):
            await rng.choice(actions)(rng.choice(mitras))
            await eventually(lambda: converged(live, client))
        assert live.reconnects == 0


async def test_the_live_set_survives_losing_valkey_and_resumes(
    server_on_own_valkey: Server, own_valkey: LocalValkey, fleet: Fleet
) -> None:
    ayu, budi = await fleet.mitra("Ayu"), await fleet.mitra("Budi")
    target = f"127.0.0.1:{server_on_own_valkey.port}"
    async with AvailabilityClient(target) as client:
        await client.set_online(ayu)
        async with client.watch_available() as live:
            await eventually(lambda: converged(live, client))
            own_valkey.kill()
            await eventually(lambda: _not(live.in_sync))
            refused = live.reconnects
            # Its resumes are refused meanwhile (no headers, no revision): never in sync on
            # a refusal, not even for a moment, or a caller would act on the old set.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(live.wait_in_sync(), timeout=2.0)
            assert live.reconnects - refused >= 3, "it kept trying"
            await client.set_online(budi)  # lands in Postgres; the mirror heals later
            own_valkey.start()
            await eventually(lambda: converged(live, client), timeout=20.0)

        assert set(live.mitras) == {ayu, budi}
        assert live.reconnects >= 1


async def _not(value: bool) -> bool:
    return not value


async def test_the_live_set_resumes_by_revision_without_a_new_snapshot(
    server: Server, client: AvailabilityClient, fleet: Fleet
) -> None:
    """A watch ended by the server (here: its hub stopping, as in a shutdown) resumes by
    revision and gets the change it missed, not a second snapshot."""
    ayu = await fleet.mitra("Ayu")
    assert server.availability is not None
    hub = server.availability.watch_hub
    seen: list[object] = []
    live = client.watch_available()

    async def follow() -> None:
        async for event in live:
            seen.append(event)

    task = asyncio.create_task(follow())
    try:
        await eventually(lambda: _true(live.in_sync))
        await hub.stop()
        await eventually(lambda: _true(not live.in_sync))
        await client.set_online(ayu)
        await hub.start()
        await eventually(lambda: _true(ayu in live.mitras))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert [type(e).__name__ for e in seen] == ["AvailabilitySnapshot", "AvailabilityChange"]
    assert live.reconnects >= 1


async def _true(value: bool) -> bool:
    return value
