"""Each write RPC costs at most two round trips to Postgres (one statement each, its audit
row included), counted by a proxy between the server and Postgres: at 1-2 ms a round trip
to a database in another zone, every one is latency on the caller's path."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import asyncpg
import grpc

from availability.server import running
from availability.settings import Settings
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet
from .round_trips import RoundTrips, counting

MOST = 2


def _through(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{host}127.0.0.1:{port}"))


WARM_UP = 8
"""Calls before counting: the pool hands its connections out in turn, and each prepares a
statement the first time it runs it (a round trip more); a loaded machine's pool may hold
all of its connections (the suite's DATABASE_POOL_SIZE is 4)."""


async def _least(proxy: RoundTrips, call: Callable[[], Awaitable[object]]) -> int:
    """The fewest round trips of five calls, once every connection of the pool prepared the
    call's statement and the server's own work went quiet (a background task's statement in
    the middle of one only adds: under load the server's start-up work overlapped every
    counted SetOnline once, 4 round trips for 1)."""
    for _ in range(WARM_UP):
        await call()
    await proxy.quiet(0.5)
    counts = []
    for _ in range(5):
        before = proxy.count
        await call()
        counts.append(proxy.count - before)
    return min(counts)


async def test_every_write_rpc_takes_at_most_two_round_trips(
    settings: Settings, db: asyncpg.Connection, fleet: Fleet
) -> None:
    port = urlsplit(settings.database_url).port or 5432
    async with counting(port) as proxy:
        quiet = replace(
            settings,
            database_url=_through(settings.database_url, proxy.port),
            # Nothing else talks to Postgres while a call is counted.
            change_poll_seconds=30.0,
            mitra_auto_offline_sweep_seconds=600.0,
            heartbeat_mirror_interval_seconds=600.0,
            valkey_online_mirror_sweep_seconds=600.0,
        )
        mitra = await fleet.mitra("Counted")
        async with (
            running(quiet) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            stub = pb_grpc.AvailabilityServiceStub(channel)
            assert server.availability is not None
            truth = server.availability.truth
            m = str(mitra)

            async def deactivate_and_back() -> None:
                for active in (False, True):
                    await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=m, active=active))

            async def guard() -> object:
                return await truth.record_heartbeats([UUID(m)])

            counted = {
                "SetOnline": await _least(
                    proxy, lambda: stub.SetOnline(pb.SetOnlineRequest(mitra_id=m))
                ),
                "SetOffline": await _least(
                    proxy, lambda: stub.SetOffline(pb.SetOfflineRequest(mitra_id=m))
                ),
                "SetMitraActive (audited), twice": await _least(proxy, deactivate_and_back),
                "RecomputeLoad": await _least(
                    proxy, lambda: stub.RecomputeLoad(pb.RecomputeLoadRequest(mitra_ids=[m]))
                ),
                "the heartbeat guard on Postgres": await _least(proxy, guard),
            }
    print("\nround trips to Postgres:", counted)
    assert counted["SetMitraActive (audited), twice"] <= 2 * MOST, counted
    for name, trips in counted.items():
        assert 1 <= trips <= (2 * MOST if "twice" in name else MOST), (name, counted)
