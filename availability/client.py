"""The typed async client other backends import.

    async with AvailabilityClient("availability:50051") as client:
        status = await client.get_mitra_status(mitra_id)
        async for event in (live := client.watch_available()):
            pick = live.least_loaded(10)

Every unary call has a deadline and is retried on UNAVAILABLE by gRPC itself (the service
config below): each is idempotent, a state set or a read. A retried deactivation that had
committed reports 0 revoked sessions the second time. Errors are grpc.aio.AioRpcError with
the codes of API.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, cast
from uuid import UUID

import grpc
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .model import (
    AvailabilityChange,
    AvailabilityCount,
    AvailabilitySnapshot,
    AvailableMitra,
    ChangeKind,
    DashboardStats,
    MitraLoad,
    MitraStatus,
    SessionCounts,
    Source,
)
from .services import _convert as convert
from .v1 import availability_pb2 as pb
from .v1 import availability_pb2_grpc as pb_grpc
from .v1 import dashboard_pb2 as dashboard_pb
from .v1 import dashboard_pb2_grpc as dashboard_pb_grpc

if TYPE_CHECKING:
    from .v1.availability_pb2_grpc import AvailabilityServiceAsyncStub

log = logging.getLogger(__name__)

__all__ = ["AvailabilityClient", "LiveAvailability"]

_SERVICES = ("availability.v1.AvailabilityService", "availability.v1.DashboardService")
_STREAMS = (
    ("availability.v1.AvailabilityService", "WatchAvailableMitras"),
    ("availability.v1.DashboardService", "WatchDashboardStats"),
)
# Worth resuming a watch after: the server or its Valkey went away, or the stream was cut.
_RESUMABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


def service_config(timeout: float, attempts: int) -> str:
    """Deadline and retries for every unary call; none for the two streams (a watch lives as
    long as its caller wants, and resumes by itself). One attempt: no retry policy, which
    gRPC requires to allow at least two. Calls are spread round-robin over every address
    the target resolves to (`dns:///availability:50051` with one address per instance, or
    `ipv4:10.0.0.1:50051,10.0.0.2:50051`)."""
    unary: dict[str, object] = {
        "name": [{"service": s} for s in _SERVICES],
        "timeout": f"{timeout}s",
    }
    if attempts > 1:
        unary["retryPolicy"] = {
            "maxAttempts": attempts,
            "initialBackoff": "0.05s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    streams = {"name": [{"service": s, "method": m} for s, m in _STREAMS]}
    return json.dumps(
        {"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [unary, streams]}
    )


class AvailabilityClient:
    """Every RPC of API.md, typed with the service's own model classes."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 5.0,
        attempts: int = 4,
        metadata: Sequence[tuple[str, str]] = (),
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        heartbeat_window: float = 0.002,
        heartbeat_batch: int = 500,
        options: Sequence[tuple[str, str | int]] = (),
    ) -> None:
        """token: one of the server's AUTH_TOKENS, sent as a bearer token. credentials: for
        TLS, e.g. grpc.ssl_channel_credentials(ca, client_key, client_chain) for mutual TLS.
        heartbeat_window (seconds) and heartbeat_batch: concurrent heartbeat() calls within
        the window, up to heartbeat_batch ids, go as one BatchHeartbeat; 0 sends each alone.
        options: more gRPC channel arguments (e.g. grpc.dns_min_time_between_resolutions_ms)."""
        if heartbeat_window < 0 or not 1 <= heartbeat_batch <= convert.MAX_BATCH_HEARTBEATS:
            raise ValueError(
                "heartbeat_window must be >= 0 and heartbeat_batch 1 to "
                f"{convert.MAX_BATCH_HEARTBEATS}, got {heartbeat_window} and {heartbeat_batch}"
            )
        options = [
            ("grpc.service_config", service_config(timeout, attempts)),
            ("grpc.enable_retries", 1),
            *options,
        ]
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._metadata = tuple(metadata)
        if token is not None:
            self._metadata += (("authorization", f"Bearer {token}"),)
        self._stub = pb_grpc.AvailabilityServiceStub(self._channel)
        self._dashboard = dashboard_pb_grpc.DashboardServiceStub(self._channel)
        self._heartbeats = (
            _Heartbeats(self._stub, self._metadata, heartbeat_window, heartbeat_batch)
            if heartbeat_window
            else None
        )

    async def __aenter__(self) -> AvailabilityClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._heartbeats is not None:
            await self._heartbeats.flush()
        await self._channel.close(grace=None)

    async def health(self, service: str = "") -> str:
        """The server's health (grpc.health.v1) as a name: SERVING, NOT_SERVING, ..."""
        reply = await health_pb2_grpc.HealthStub(self._channel).Check(
            health_pb2.HealthCheckRequest(service=service), metadata=self._metadata
        )
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return name

    async def set_online(self, mitra_id: UUID | str) -> MitraStatus:
        request = pb.SetOnlineRequest(mitra_id=str(mitra_id))
        return _status((await self._stub.SetOnline(request, metadata=self._metadata)).status)

    async def set_offline(self, mitra_id: UUID | str) -> MitraStatus:
        request = pb.SetOfflineRequest(mitra_id=str(mitra_id))
        return _status((await self._stub.SetOffline(request, metadata=self._metadata)).status)

    async def heartbeat(self, mitra_id: UUID | str) -> bool:
        """False: the mitra was taken offline; its app must call set_online again. Sent with
        the other heartbeats of the window in one BatchHeartbeat; the answer and the error
        (PERMISSION_DENIED for a deactivated mitra) are what a lone Heartbeat would give."""
        if self._heartbeats is not None:
            return await self._heartbeats.beat(str(mitra_id))
        request = pb.HeartbeatRequest(mitra_id=str(mitra_id))
        return (await self._stub.Heartbeat(request, metadata=self._metadata)).online

    async def batch_heartbeat(self, mitra_ids: Iterable[UUID | str]) -> list[pb.HeartbeatResult]:
        """One BatchHeartbeat: a result an id, in order (a relay that batches by itself)."""
        request = pb.BatchHeartbeatRequest(mitra_ids=[str(m) for m in mitra_ids])
        return list((await self._stub.BatchHeartbeat(request, metadata=self._metadata)).results)

    async def set_mitra_active(self, mitra_id: UUID | str, active: bool) -> tuple[MitraStatus, int]:
        """(status, auth sessions revoked)."""
        request = pb.SetMitraActiveRequest(mitra_id=str(mitra_id), active=active)
        reply = await self._stub.SetMitraActive(request, metadata=self._metadata)
        return _status(reply.status), reply.revoked_auth_sessions

    async def get_mitra_status(self, mitra_id: UUID | str) -> MitraStatus:
        request = pb.GetMitraStatusRequest(mitra_id=str(mitra_id))
        return _status((await self._stub.GetMitraStatus(request, metadata=self._metadata)).status)

    async def is_mitra_reachable(self, mitra_id: UUID | str) -> bool:
        request = pb.IsMitraReachableRequest(mitra_id=str(mitra_id))
        return (await self._stub.IsMitraReachable(request, metadata=self._metadata)).reachable

    async def find_available_mitras(
        self, limit: int = 100, exclude: Iterable[UUID | str] = ()
    ) -> list[AvailableMitra]:
        """Least loaded first, then longest idle."""
        request = pb.FindAvailableMitrasRequest(
            limit=limit, exclude_mitra_ids=[str(m) for m in exclude]
        )
        reply = await self._stub.FindAvailableMitras(request, metadata=self._metadata)
        return [_available(m) for m in reply.mitras]

    async def count_available_mitras(self) -> AvailabilityCount:
        reply = await self._stub.CountAvailableMitras(
            pb.CountAvailableMitrasRequest(), metadata=self._metadata
        )
        return AvailabilityCount(
            reply.available_count,
            reply.online_count,
            reply.as_of.ToDatetime(UTC),
            _source(reply.source),
        )

    async def recompute_load(self, mitra_ids: Iterable[UUID | str]) -> dict[UUID, int]:
        request = pb.RecomputeLoadRequest(mitra_ids=[str(m) for m in mitra_ids])
        reply = await self._stub.RecomputeLoad(request, metadata=self._metadata)
        return {UUID(m.mitra_id): m.load for m in reply.loads}

    async def get_dashboard_stats(self, customers_per_mitra_limit: int = 0) -> DashboardStats:
        request = dashboard_pb.GetDashboardStatsRequest(
            customers_per_mitra_limit=customers_per_mitra_limit
        )
        return _dashboard(await self._dashboard.GetDashboardStats(request, metadata=self._metadata))

    async def watch_dashboard_stats(
        self, interval: timedelta = timedelta(seconds=1), customers_per_mitra_limit: int = 0
    ) -> AsyncIterator[DashboardStats]:
        duration = Duration()
        duration.FromTimedelta(interval)
        request = dashboard_pb.WatchDashboardStatsRequest(
            interval=duration, customers_per_mitra_limit=customers_per_mitra_limit
        )
        async for reply in self._dashboard.WatchDashboardStats(request, metadata=self._metadata):
            yield _dashboard(reply)

    def watch_available(self) -> LiveAvailability:
        """The live set of available mitras; iterate it to keep it current (and to see each
        change). It resumes by revision on its own after any interruption."""
        return LiveAvailability(self._stub, self._metadata)


_Result = pb.HeartbeatResult
_REFUSED = {
    _Result.OUTCOME_DEACTIVATED: (grpc.StatusCode.PERMISSION_DENIED, "mitra {} is deactivated"),
    _Result.OUTCOME_NOT_FOUND: (grpc.StatusCode.NOT_FOUND, "mitra {} not found"),
}


class _Heartbeats:
    """Coalesces concurrent heartbeats: the first of a window starts a timer, and the window's
    ids (at most `batch`) go as one BatchHeartbeat, one gRPC call instead of hundreds. A
    server without BatchHeartbeat (an older one, mid-rollout) gets unary calls instead."""

    def __init__(
        self,
        stub: AvailabilityServiceAsyncStub,
        metadata: tuple[tuple[str, str], ...],
        window: float,
        batch: int,
    ) -> None:
        self._stub = stub
        self._metadata = metadata
        self._window = window
        self._batch = batch
        self._waiting: list[tuple[str, asyncio.Future[bool]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._unary = False
        self.calls = 0
        """BatchHeartbeat calls sent (fewer than heartbeats under load)."""

    async def beat(self, mitra_id: str) -> bool:
        if self._unary:
            request = pb.HeartbeatRequest(mitra_id=mitra_id)
            return (await self._stub.Heartbeat(request, metadata=self._metadata)).online
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._waiting.append((mitra_id, future))
        if len(self._waiting) >= self._batch:
            self._send()
        elif self._timer is None:
            self._timer = loop.call_later(self._window, self._send)
        return await future

    async def flush(self) -> None:
        """Send what waits now and wait for every batch in flight (before closing)."""
        if self._waiting:
            self._send()
        if self._sending:
            await asyncio.wait(self._sending)

    def _send(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, []
        task = asyncio.create_task(self._answer(waiting))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _answer(self, waiting: list[tuple[str, asyncio.Future[bool]]]) -> None:
        request = pb.BatchHeartbeatRequest(mitra_ids=[mitra_id for mitra_id, _ in waiting])
        self.calls += 1
        try:
            reply = await self._stub.BatchHeartbeat(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._unary = True
                await asyncio.gather(*(self._alone(m, f) for m, f in waiting))
                return
            for _, future in waiting:
                if not future.done():
                    future.set_exception(_copy(exc))
            return
        except BaseException as exc:  # cancelled with the loop, or a bug: no waiter hangs
            for _, future in waiting:
                if not future.done():
                    future.set_exception(exc)
            raise
        for (mitra_id, future), result in zip(waiting, reply.results, strict=True):
            if future.done():
                continue
            if result.outcome in (_Result.OUTCOME_RECORDED, _Result.OUTCOME_OFFLINE):
                future.set_result(result.online)
            elif result.outcome in _REFUSED:
                code, details = _REFUSED[result.outcome]
                future.set_exception(_error(code, details.format(mitra_id)))
            elif not mitra_id:
                future.set_exception(_error(grpc.StatusCode.INVALID_ARGUMENT, "mitra_id: required"))
            else:
                future.set_exception(
                    _error(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"mitra_id: must be a UUID, got {mitra_id[:64]!r}",
                    )
                )

    async def _alone(self, mitra_id: str, future: asyncio.Future[bool]) -> None:
        request = pb.HeartbeatRequest(mitra_id=mitra_id)
        try:
            online = (await self._stub.Heartbeat(request, metadata=self._metadata)).online
        except grpc.aio.AioRpcError as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(online)


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


def _copy(exc: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    """One error a waiter: each raise adds its own traceback."""
    return grpc.aio.AioRpcError(
        exc.code(),
        exc.initial_metadata(),
        cast(grpc.aio.Metadata, exc.trailing_metadata()),  # a Metadata at run time
        exc.details(),
        exc.debug_error_string(),
    )


class LiveAvailability:
    """Available mitras, kept current by WatchAvailableMitras: either iterate it (each
    snapshot and change is yielded once applied) or enter it (`async with`), which follows
    the stream in a background task until the block ends.

    in_sync is False until the first snapshot and while reconnecting; a caller that must
    not act on a possibly old set can fall back to find_available_mitras meanwhile.
    """

    def __init__(
        self,
        stub: AvailabilityServiceAsyncStub,
        metadata: Sequence[tuple[str, str]] = (),
        *,
        max_backoff: float = 2.0,
    ) -> None:
        self._stub = stub
        self._metadata = tuple(metadata)
        self._max_backoff = max_backoff
        self._mitras: dict[UUID, AvailableMitra] = {}
        self.revision = 0
        self.reconnects = 0
        self._in_sync = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def in_sync(self) -> bool:
        return self._in_sync.is_set()

    @in_sync.setter
    def in_sync(self, value: bool) -> None:
        if value:
            self._in_sync.set()
        else:
            self._in_sync.clear()

    async def wait_in_sync(self) -> None:
        """Until the set is current (the first snapshot, or a resumed stream)."""
        await self._in_sync.wait()

    async def __aenter__(self) -> LiveAvailability:
        async def follow() -> None:
            async for _ in self:
                pass

        self._task = asyncio.create_task(follow(), name="availability-watch")
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def mitras(self) -> Mapping[UUID, AvailableMitra]:
        return MappingProxyType(self._mitras)

    def least_loaded(self, limit: int, exclude: Iterable[UUID] = ()) -> list[AvailableMitra]:
        skip = set(exclude)
        candidates = (m for m in self._mitras.values() if m.mitra_id not in skip)
        return sorted(candidates, key=lambda m: (m.load, str(m.mitra_id)))[:limit]

    def __aiter__(self) -> AsyncIterator[AvailabilitySnapshot | AvailabilityChange]:
        return self._follow()

    async def _follow(self) -> AsyncIterator[AvailabilitySnapshot | AvailabilityChange]:
        backoff = 0.05
        while True:
            request = pb.WatchAvailableMitrasRequest()
            if self.revision:
                request.resume_revision = self.revision
            call = self._stub.WatchAvailableMitras(request, metadata=self._metadata)
            parts: list[pb.AvailableMitra] = []
            try:
                headers = await call.initial_metadata()
                # A resumed stream replays the missed changes (or sends a snapshot) up to the
                # server's revision at the start: in sync once that is reached. A refusal
                # (the server's mirror is down or not its own) comes without headers, hence
                # without the revision: never in sync on that, only on what a stream sends.
                live_from = _revision_header(headers)
                self.in_sync = (
                    live_from is not None and self.revision > 0 and self.revision >= live_from
                )
                async for message in call:
                    backoff = 0.05
                    if message.HasField("snapshot"):
                        parts.extend(message.snapshot.mitras)
                        if message.snapshot.part + 1 < message.snapshot.parts:
                            continue
                        snapshot = AvailabilitySnapshot(
                            message.revision, tuple(_available(m) for m in parts)
                        )
                        parts = []
                        self._mitras = {m.mitra_id: m for m in snapshot.mitras}
                        self.revision, self.in_sync = snapshot.revision, True
                        yield snapshot
                    else:
                        change = _change(message)
                        if change.kind is ChangeKind.UNAVAILABLE:
                            self._mitras.pop(change.mitra.mitra_id, None)
                        else:
                            self._mitras[change.mitra.mitra_id] = change.mitra
                        self.revision = change.revision
                        if live_from is not None and self.revision >= live_from:
                            self.in_sync = True
                        yield change
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RESUMABLE:
                    raise
                log.info("watch interrupted (%s: %s); resuming", exc.code().name, exc.details())
            finally:
                call.cancel()
            self.in_sync = False
            self.reconnects += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)


def _revision_header(headers: object) -> int | None:
    for key, value in headers or ():  # type: ignore[attr-defined]
        if key == convert.REVISION_HEADER:
            return int(value)
    return None


# The service's own mappings, read the other way.
_SOURCES = {v: k for k, v in convert.SOURCES.items()}
_KINDS = {v: k for k, v in convert.KINDS.items()}
_REASONS = {v: k for k, v in convert.REASONS.items() if k is not None}


def _source(value: pb.Source.ValueType) -> Source:
    return _SOURCES.get(value, Source.DATABASE)


def _when(stamp: object, present: bool) -> datetime | None:
    return stamp.ToDatetime(UTC) if present else None  # type: ignore[attr-defined]


def _status(value: pb.MitraStatus) -> MitraStatus:
    return MitraStatus(
        mitra_id=UUID(value.mitra_id),
        display_name=value.display_name,
        online=value.online,
        active=value.active,
        fresh=value.fresh,
        load=value.load,
        max_concurrent_sessions=value.max_concurrent_sessions,
        last_heartbeat_at=_when(value.last_heartbeat_time, value.HasField("last_heartbeat_time")),
        source=_source(value.source),
    )


def _available(value: pb.AvailableMitra) -> AvailableMitra:
    return AvailableMitra(
        UUID(value.mitra_id), value.display_name, value.load, value.max_concurrent_sessions
    )


def _change(message: pb.WatchAvailableMitrasResponse) -> AvailabilityChange:
    change = message.change
    return AvailabilityChange(
        revision=message.revision,
        kind=_KINDS[change.kind],
        mitra=_available(change.mitra),
        reason=_REASONS.get(change.reason),
    )


def _dashboard(
    value: dashboard_pb.GetDashboardStatsResponse | dashboard_pb.WatchDashboardStatsResponse,
) -> DashboardStats:
    sensitive = value.sensitive
    return DashboardStats(
        counts=SessionCounts(
            active_chats=value.active_chats,
            pending_requests=value.pending_requests,
            sensitive_total=sensitive.total,
            last_30d_total=sensitive.last_30d_total,
            last_30d_sensitive=sensitive.last_30d_sensitive,
        ),
        online_mitras=value.online_mitras,
        customers_per_mitra=tuple(
            MitraLoad(UUID(m.mitra_id), m.display_name, m.active_session_count)
            for m in value.customers_per_mitra
        ),
        as_of=value.as_of.ToDatetime(UTC),
        source=_source(value.source),
    )
