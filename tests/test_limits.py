"""Limits and hostile input: every bound answers with a clear code, any bytes sent to any
RPC get INVALID_ARGUMENT at worst (never INTERNAL or UNKNOWN), and the server keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace

import asyncpg
import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from availability.server import Server, running
from availability.settings import Settings
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc
from availability.v1 import dashboard_pb2

from .helpers import Fleet, code_of, eventually

NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


async def test_a_request_over_the_size_limit_is_resource_exhausted(
    settings: Settings, db: asyncpg.Connection
) -> None:
    async with (
        running(replace(settings, grpc_max_message_bytes=4096)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.AvailabilityServiceStub(channel)
        big = pb.FindAvailableMitrasRequest(exclude_mitra_ids=[str(uuid.uuid4())] * 200)
        small = pb.FindAvailableMitrasRequest(exclude_mitra_ids=[str(uuid.uuid4())] * 10)
        assert await code_of(stub.FindAvailableMitras(big)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await code_of(stub.FindAvailableMitras(small)) == grpc.StatusCode.OK


async def test_too_many_ids_name_the_field(stub: pb_grpc.AvailabilityServiceStub) -> None:
    ids = [str(uuid.uuid4())] * 10_001
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RecomputeLoad(pb.RecomputeLoadRequest(mitra_ids=ids))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mitra_ids" in (caught.value.details() or "")


async def test_watches_past_the_instance_limit_are_resource_exhausted(
    settings: Settings, db: asyncpg.Connection
) -> None:
    async with (
        running(replace(settings, watch_max_streams=2)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.AvailabilityServiceStub(channel)
        held = [stub.WatchAvailableMitras(pb.WatchAvailableMitrasRequest()) for _ in range(2)]
        for call in held:
            await call.read()  # the snapshot: both are registered
        extra = stub.WatchAvailableMitras(pb.WatchAvailableMitrasRequest())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await extra.read()
        for call in held:
            call.cancel()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "WATCH_MAX_STREAMS" in (refused.value.details() or "")


async def test_calls_past_the_concurrency_limit_are_resource_exhausted(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """A long-lived watch holds one of GRPC_MAX_CONCURRENT_RPCS=1: the next call is refused
    at once instead of queueing without bound."""
    async with (
        running(replace(settings, grpc_max_concurrent_rpcs=1)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.AvailabilityServiceStub(channel)
        watch = stub.WatchAvailableMitras(pb.WatchAvailableMitrasRequest())
        await watch.read()
        refused = await code_of(stub.CountAvailableMitras(pb.CountAvailableMitrasRequest()))
        watch.cancel()
        await asyncio.sleep(0.2)
        after = await code_of(stub.CountAvailableMitras(pb.CountAvailableMitrasRequest()))
    assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert after == grpc.StatusCode.OK


def _methods() -> list[tuple[str, bool]]:
    """(path, server-streaming) of every RPC of both services."""
    found = []
    for file in (pb.DESCRIPTOR, dashboard_pb2.DESCRIPTOR):
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        for service in proto.service:
            for method in service.method:
                path = f"/{proto.package}.{service.name}/{method.name}"
                found.append((path, method.server_streaming))
    return found


METHODS = _methods()


@contextlib.asynccontextmanager
async def raw_channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


async def send_raw(channel: grpc.aio.Channel, path: str, streaming: bool, body: bytes) -> object:
    """Any bytes as the request; the code the server answers with (OK if it answered)."""
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    try:
        if streaming:
            call = channel.unary_stream(path, **identity)(body, timeout=2)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(call.read(), 1.0)
            call.cancel()
            return grpc.StatusCode.OK
        await channel.unary_unary(path, **identity)(body, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _field_bytes() -> st.SearchStrategy[bytes]:
    """Well-formed protobuf fields with any number and wire type, and junk: what a confused
    or hostile client can put on the wire."""
    varint = st.integers(min_value=0, max_value=2**64 - 1).map(_varint)
    key = st.tuples(st.integers(1, 12), st.sampled_from([0, 1, 2, 5])).map(
        lambda t: _varint(t[0] << 3 | t[1])
    )
    value = st.one_of(
        varint,
        st.binary(min_size=8, max_size=8),
        st.binary(min_size=4, max_size=4),
        st.binary(max_size=64).map(lambda b: _varint(len(b)) + b),
        st.text(max_size=40).map(lambda t: _varint(len(t.encode())) + t.encode()),
    )
    field = st.tuples(key, value).map(lambda kv: kv[0] + kv[1])
    return st.one_of(st.binary(max_size=200), st.lists(field, max_size=6).map(b"".join))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


async def test_any_bytes_to_any_rpc_never_get_internal_or_unknown(server: Server) -> None:
    """Hypothesis drives the bytes; each example is sent to every RPC of both services."""
    loop = asyncio.get_running_loop()
    seen: dict[str, set[object]] = {path: set() for path, _ in METHODS}
    async with raw_channel(server) as channel:

        @hypothesis_settings(
            max_examples=60,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(body=_field_bytes())
        def probe(body: bytes) -> None:
            for path, streaming in METHODS:
                future = asyncio.run_coroutine_threadsafe(
                    send_raw(channel, path, streaming, body), loop
                )
                code = future.result(timeout=30)
                seen[path].add(code)
                assert code not in NEVER, f"{path} answered {code} to {body!r}"

        await loop.run_in_executor(None, probe)
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="")
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING, "still serving"
    assert all(codes for codes in seen.values()), "every RPC was reached"
    assert any(grpc.StatusCode.INVALID_ARGUMENT in codes for codes in seen.values())


async def test_a_callers_deadline_cancels_its_database_work(
    stub: pb_grpc.AvailabilityServiceStub, fleet: Fleet, db: asyncpg.Connection, database_url: str
) -> None:
    """SetOnline waits on a row lock; when the caller's deadline passes, the server's
    statement is cancelled in Postgres instead of running on for nobody."""
    mitra = await fleet.mitra()
    blocker = await asyncpg.connect(database_url)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM mitras WHERE id = $1 FOR UPDATE", mitra)
            code = await code_of(
                stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)), timeout=0.5)
            )

            async def waiting() -> int:
                return int(
                    await db.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND datname = current_database()"
                    )
                )

            await eventually(lambda: _zero(waiting()))
    finally:
        await blocker.close()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not (await fleet.online_row(mitra) or {}).get("is_online"), "nothing was written"


async def _zero(count: Awaitable[int]) -> bool:
    return await count == 0
