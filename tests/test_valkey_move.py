"""Moving to a new Valkey without downtime: a rolling deploy in which one instance still runs
on the old Valkey and one already on the new, on one Postgres. Every change of a mitra's
online state goes through the change table, and the instance that takes it tells the others
(listener.py), so both mirrors hold every mitra; a heartbeat that a mirror has not heard of
yet is answered from Postgres. Then the old instance goes, and the new one has them all."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import grpc
import pytest

from availability import local_stores
from availability.local_stores import LocalValkey
from availability.server import Server, running
from availability.settings import Settings
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet

pytestmark = pytest.mark.slow

CONVERGE_SECONDS = 1.0


@pytest.fixture
def two_valkeys(tmp_path: Path) -> AsyncIterator[tuple[LocalValkey, LocalValkey]]:
    old = local_stores.start_valkey(tmp_path / "old")
    new = local_stores.start_valkey(tmp_path / "new")
    try:
        yield old, new
    finally:
        old.stop()
        new.stop()


@contextlib.asynccontextmanager
async def stub_of(server: Server) -> AsyncIterator[pb_grpc.AvailabilityServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.AvailabilityServiceStub(channel)


async def found(stub: pb_grpc.AvailabilityServiceStub) -> set[str]:
    reply = await stub.FindAvailableMitras(pb.FindAvailableMitrasRequest(limit=1000))
    return {m.mitra_id for m in reply.mitras}


async def converged(
    stubs: list[pb_grpc.AvailabilityServiceStub], check: object, what: str
) -> float:
    """Seconds until every instance's FindAvailableMitras passes check; fails past 1 s."""
    started = time.monotonic()
    while True:
        sets = [await found(stub) for stub in stubs]
        if all(check(s) for s in sets):  # type: ignore[operator]
            return time.monotonic() - started
        assert time.monotonic() - started < CONVERGE_SECONDS, f"{what}: not within 1 s"
        await asyncio.sleep(0.01)


async def test_a_move_to_a_new_valkey_keeps_every_mitra_found_by_every_instance(
    settings: Settings,
    db: asyncpg.Connection,
    two_valkeys: tuple[LocalValkey, LocalValkey],
) -> None:
    old_valkey, new_valkey = two_valkeys
    # Stale after 5 s: ten heartbeat rounds (each 0.5 s apart) and ten flushes, room for
    # the rounds to slow down on a loaded machine without anyone going stale.
    cadences = replace(
        settings,
        heartbeat_stale_seconds=5.0,
        mitra_auto_offline_sweep_seconds=0.5,
        heartbeat_mirror_interval_seconds=0.5,
    )
    fleet = Fleet(db)
    mitras = [str(await fleet.mitra(f"Mitra {i}")) for i in range(20)]
    deactivated: set[str] = set()
    online: set[str] = set()
    slowest = 0.0
    async with running(replace(cadences, valkey_url=new_valkey.url)) as new_server:
        async with (
            running(replace(cadences, valkey_url=old_valkey.url)) as old_server,
            stub_of(old_server) as old,
            stub_of(new_server) as new,
        ):
            both = [old, new]
            through = itertools.cycle(both)
            # Apps come online through either instance; before any heartbeat, so only the
            # change feed can tell the other mirror.
            for mitra in mitras:
                await next(through).SetOnline(pb.SetOnlineRequest(mitra_id=mitra))
                online.add(mitra)
                slowest = max(slowest, await converged(both, lambda s, m=mitra: m in s, "online"))
            for mitra in mitras[:2]:  # one deactivation through each
                await next(through).SetMitraActive(
                    pb.SetMitraActiveRequest(mitra_id=mitra, active=False)
                )
                deactivated.add(mitra)
                online.discard(mitra)
                slowest = max(
                    slowest, await converged(both, lambda s, m=mitra: m not in s, "deactivated")
                )
            beating = asyncio.create_task(heartbeat_forever(both, online))
            try:
                # Longer than the stale window, heartbeats landing on either mirror, and both
                # instances' auto-offline sweeps running: nobody goes offline.
                deadline = time.monotonic() + 2 * cadences.heartbeat_stale_seconds
                while time.monotonic() < deadline:
                    for stub in both:
                        assert await found(stub) == online
                    await asyncio.sleep(0.1)
            finally:
                beating.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beating
        # The old instance is gone: the new one has every mitra at once.
        async with stub_of(new_server) as new:
            assert await found(new) == online
            for mitra in online:
                assert (await new.Heartbeat(pb.HeartbeatRequest(mitra_id=mitra))).online
            for mitra in deactivated:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await new.Heartbeat(pb.HeartbeatRequest(mitra_id=mitra))
                assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    offline_in_truth = await db.fetch(
        "SELECT mitra_id FROM mitra_online_status WHERE NOT is_online"
    )
    assert {str(r["mitra_id"]) for r in offline_in_truth} == deactivated, "none taken offline"
    print(f"slowest convergence across the two mirrors: {slowest * 1000:.0f} ms")


async def heartbeat_forever(stubs: list[pb_grpc.AvailabilityServiceStub], online: set[str]) -> None:
    """Every app heartbeats every 0.5 s, each always through the same instance: the other
    mirror hears of its heartbeats only through Postgres (the flush)."""
    apps = {mitra: stubs[i % len(stubs)] for i, mitra in enumerate(sorted(online))}
    while True:
        for mitra, stub in apps.items():
            reply = await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=mitra))
            assert reply.online, f"{mitra} answered online=false"
        await asyncio.sleep(0.5)


async def test_a_heartbeat_the_mirror_has_not_heard_of_is_answered_from_postgres(
    settings: Settings, db: asyncpg.Connection, two_valkeys: tuple[LocalValkey, LocalValkey]
) -> None:
    """Online in Postgres, unknown as online to this instance's mirror (its change feed has
    not delivered it yet): the heartbeat is recorded, answered online, and the mirror healed."""
    _, valkey = two_valkeys
    fleet = Fleet(db)
    async with running(replace(settings, valkey_url=valkey.url)) as server, stub_of(server) as stub:
        mitra = str(await fleet.mitra())
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=mitra))
        await stub.SetOffline(pb.SetOfflineRequest(mitra_id=mitra))
        assert not (await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=mitra))).online
        # What a SetOnline through an instance on another Valkey leaves here: Postgres only,
        # with the change feed's word still on its way (the listener is held off).
        assert server.listener is not None
        server.listener._interval = 3600.0
        await asyncio.sleep(0.2)
        await db.execute(
            "UPDATE mitra_online_status SET is_online = true, last_heartbeat_at = now()"
            " WHERE mitra_id = $1",
            uuid.UUID(mitra),
        )
        reply = await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=mitra))
        assert reply.online, "Postgres says online: the heartbeat is not turned away"
        status = (await stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=mitra))).status
        assert status.online and status.source == pb.SOURCE_CACHE, "and the mirror healed"
