"""AvailabilityClient.heartbeat() coalesces: concurrent heartbeats go as one BatchHeartbeat,
and each caller gets what a lone Heartbeat would have given it."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

import grpc
import pytest

from availability.client import AvailabilityClient
from availability.server import Server
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet, scrape_metrics
from .test_client import flaky_server

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]


async def calls_by_method(server: Server) -> dict[str, float]:
    """RPCs the server handled, by method (whatever other labels the series carry)."""
    assert server.metrics is not None
    calls: dict[str, float] = {}
    for (name, labels), value in (await scrape_metrics(server.metrics.port)).items():
        if name == "grpc_server_handled_total":
            method = dict(labels)["grpc_method"]
            calls[method] = calls.get(method, 0) + value
    return calls


async def answer(client: AvailabilityClient, mitra_id: UUID | str) -> object:
    try:
        return await client.heartbeat(mitra_id)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()


async def test_concurrent_heartbeats_go_in_one_call_and_each_gets_its_own_answer(
    server: Server, fleet: Fleet
) -> None:
    online = [await fleet.mitra(f"Online {i}", online=True) for i in range(40)]
    offline = await fleet.mitra("Offline")
    deactivated = await fleet.mitra("Deactivated", active=False)
    ghost = uuid4()
    before = await calls_by_method(server)

    async with AvailabilityClient(f"127.0.0.1:{server.port}", heartbeat_window=0.05) as client:
        answers = await asyncio.gather(
            *(answer(client, m) for m in [*online, offline, deactivated, ghost, "nope"])
        )

    assert answers == [True] * 40 + [
        False,
        (grpc.StatusCode.PERMISSION_DENIED, f"mitra {deactivated} is deactivated"),
        (grpc.StatusCode.NOT_FOUND, f"mitra {ghost} not found"),
        (grpc.StatusCode.INVALID_ARGUMENT, "mitra_id: must be a UUID, got 'nope'"),
    ]
    after = await calls_by_method(server)
    assert after.get("BatchHeartbeat", 0) - before.get("BatchHeartbeat", 0) == 1
    assert after.get("Heartbeat", 0) == before.get("Heartbeat", 0)


async def test_the_same_errors_as_unary_heartbeats(server: Server, fleet: Fleet) -> None:
    deactivated = await fleet.mitra("Deactivated", active=False)
    ghost = uuid4()
    target = f"127.0.0.1:{server.port}"
    async with (
        AvailabilityClient(target) as coalescing,
        AvailabilityClient(target, heartbeat_window=0) as unary,
    ):
        for mitra in (deactivated, ghost, "nope", ""):
            assert await answer(coalescing, mitra) == await answer(unary, mitra)


async def test_a_window_holds_at_most_the_batch_size(server: Server, fleet: Fleet) -> None:
    mitras = [await fleet.mitra(f"Mitra {i}", online=True) for i in range(25)]
    before = (await calls_by_method(server)).get("BatchHeartbeat", 0)

    async with AvailabilityClient(
        f"127.0.0.1:{server.port}", heartbeat_window=1.0, heartbeat_batch=10
    ) as client:
        # 20 fill two batches at once; the last 5 wait for the window, or for close().
        answers = await asyncio.gather(*(client.heartbeat(m) for m in mitras))

    assert answers == [True] * 25
    assert (await calls_by_method(server)).get("BatchHeartbeat", 0) - before == 3


async def test_switched_off_each_heartbeat_is_its_own_call(server: Server, fleet: Fleet) -> None:
    mitras = [await fleet.mitra(f"Mitra {i}", online=True) for i in range(5)]
    before = await calls_by_method(server)

    async with AvailabilityClient(f"127.0.0.1:{server.port}", heartbeat_window=0) as client:
        answers = await asyncio.gather(*(client.heartbeat(m) for m in mitras))

    after = await calls_by_method(server)
    assert answers == [True] * 5
    assert after.get("Heartbeat", 0) - before.get("Heartbeat", 0) == 5
    assert after.get("BatchHeartbeat", 0) == before.get("BatchHeartbeat", 0)


def test_bad_coalescing_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="heartbeat_batch"):
        AvailabilityClient("127.0.0.1:1", heartbeat_batch=5_001)
    with pytest.raises(ValueError, match="heartbeat_window"):
        AvailabilityClient("127.0.0.1:1", heartbeat_window=-1)


class Older(pb_grpc.AvailabilityServiceServicer):
    """A server from before BatchHeartbeat (mid-rollout): only unary heartbeats."""

    def __init__(self) -> None:
        self.heartbeats = 0
        self.batches = 0

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: Context
    ) -> pb.HeartbeatResponse:
        self.heartbeats += 1
        return pb.HeartbeatResponse(online=True)


class Overloaded(Older):
    """Every batch fails UNAVAILABLE: what a real server cannot be made to do on cue."""

    async def BatchHeartbeat(
        self, request: pb.BatchHeartbeatRequest, context: Context
    ) -> pb.BatchHeartbeatResponse:
        self.batches += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "overloaded")
        raise AssertionError("abort raises")


async def test_a_server_without_batch_heartbeat_gets_unary_calls() -> None:
    servicer = Older()
    async with flaky_server(servicer) as port, AvailabilityClient(f"127.0.0.1:{port}") as client:
        first = await asyncio.gather(*(client.heartbeat(uuid4()) for _ in range(4)))
        then = await client.heartbeat(uuid4())
    assert first == [True] * 4 and then is True
    assert servicer.heartbeats == 5


async def test_a_failed_batch_is_retried_then_fails_every_waiter_with_its_status() -> None:
    servicer = Overloaded()
    async with flaky_server(servicer) as port, AvailabilityClient(f"127.0.0.1:{port}") as client:
        answers = await asyncio.gather(*(answer(client, uuid4()) for _ in range(3)))
    assert answers == [(grpc.StatusCode.UNAVAILABLE, "overloaded")] * 3
    assert servicer.batches == 4, "retried as the service config says"
    assert servicer.heartbeats == 0
