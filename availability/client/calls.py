"""The client's methods, each an RPC of docs/api/reference.md. Deadlines, retries and
round-robin balancing are the channel's service config rather than code in each method: gRPC
applies them to every call alike, and the Node client reads the same config
(clients/node/src/serviceConfig.ts)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, timedelta
from types import TracebackType
from uuid import UUID

import grpc
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..model import AvailabilityCount, AvailableMitra, DashboardStats, MitraStatus
from ..services import _convert as convert
from ..v1 import availability_pb2 as pb
from ..v1 import availability_pb2_grpc as pb_grpc
from ..v1 import dashboard_pb2 as dashboard_pb
from ..v1 import dashboard_pb2_grpc as dashboard_pb_grpc
from . import replies
from .heartbeats import SESSION_HEADER, Heartbeats
from .live import LiveAvailability

_SERVICES = ("availability.v1.AvailabilityService", "availability.v1.DashboardService")
_STREAMS = (
    ("availability.v1.AvailabilityService", "WatchAvailableMitras"),
    ("availability.v1.DashboardService", "WatchDashboardStats"),
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
    """Every RPC of docs/api/reference.md, typed with the service's own model classes."""

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
            Heartbeats(self._stub, self._metadata, heartbeat_window, heartbeat_batch)
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

    def _acting(self, mitra_session: UUID | str | None) -> tuple[tuple[str, str], ...]:
        if mitra_session is None:
            return self._metadata
        return (*self._metadata, (SESSION_HEADER, str(mitra_session)))

    async def set_online(
        self, mitra_id: UUID | str, *, mitra_session: UUID | str | None = None
    ) -> MitraStatus:
        """`mitra_session`: the mitra's auth session, which a caller whose presence calls are
        bound to mitras (bind_presence) must send with every presence call."""
        request = pb.SetOnlineRequest(mitra_id=str(mitra_id))
        reply = await self._stub.SetOnline(request, metadata=self._acting(mitra_session))
        return replies.status(reply.status)

    async def set_offline(
        self, mitra_id: UUID | str, *, mitra_session: UUID | str | None = None
    ) -> MitraStatus:
        request = pb.SetOfflineRequest(mitra_id=str(mitra_id))
        reply = await self._stub.SetOffline(request, metadata=self._acting(mitra_session))
        return replies.status(reply.status)

    async def heartbeat(
        self, mitra_id: UUID | str, *, mitra_session: UUID | str | None = None
    ) -> bool:
        """False: the mitra was taken offline; its app must call set_online again. Sent with
        the other heartbeats of the window in one BatchHeartbeat; the answer and the error
        (PERMISSION_DENIED for a deactivated mitra, or a session refused) are what a lone
        Heartbeat would give."""
        session = None if mitra_session is None else str(mitra_session)
        if self._heartbeats is not None:
            return await self._heartbeats.beat(str(mitra_id), session)
        request = pb.HeartbeatRequest(mitra_id=str(mitra_id))
        return (await self._stub.Heartbeat(request, metadata=self._acting(session))).online

    async def batch_heartbeat(
        self,
        mitra_ids: Iterable[UUID | str],
        mitra_sessions: Iterable[UUID | str] | None = None,
    ) -> list[pb.HeartbeatResult]:
        """One BatchHeartbeat: a result an id, in order (a relay that batches by itself);
        `mitra_sessions`, one an id, for a caller bound to mitras' sessions."""
        request = pb.BatchHeartbeatRequest(
            mitra_ids=[str(m) for m in mitra_ids],
            mitra_sessions=[str(s) for s in mitra_sessions or ()],
        )
        return list((await self._stub.BatchHeartbeat(request, metadata=self._metadata)).results)

    async def set_mitra_active(self, mitra_id: UUID | str, active: bool) -> tuple[MitraStatus, int]:
        """(status, auth sessions revoked)."""
        request = pb.SetMitraActiveRequest(mitra_id=str(mitra_id), active=active)
        reply = await self._stub.SetMitraActive(request, metadata=self._metadata)
        return replies.status(reply.status), reply.revoked_auth_sessions

    async def get_mitra_status(self, mitra_id: UUID | str) -> MitraStatus:
        request = pb.GetMitraStatusRequest(mitra_id=str(mitra_id))
        reply = await self._stub.GetMitraStatus(request, metadata=self._metadata)
        return replies.status(reply.status)

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
        return [replies.available_mitra(m) for m in reply.mitras]

    async def count_available_mitras(self) -> AvailabilityCount:
        reply = await self._stub.CountAvailableMitras(
            pb.CountAvailableMitrasRequest(), metadata=self._metadata
        )
        return AvailabilityCount(
            reply.available_count,
            reply.online_count,
            reply.as_of.ToDatetime(UTC),
            replies.source(reply.source),
        )

    async def recompute_load(self, mitra_ids: Iterable[UUID | str]) -> dict[UUID, int]:
        request = pb.RecomputeLoadRequest(mitra_ids=[str(m) for m in mitra_ids])
        reply = await self._stub.RecomputeLoad(request, metadata=self._metadata)
        return {UUID(m.mitra_id): m.load for m in reply.loads}

    async def get_dashboard_stats(self, customers_per_mitra_limit: int = 0) -> DashboardStats:
        request = dashboard_pb.GetDashboardStatsRequest(
            customers_per_mitra_limit=customers_per_mitra_limit
        )
        reply = await self._dashboard.GetDashboardStats(request, metadata=self._metadata)
        return replies.dashboard(reply)

    async def watch_dashboard_stats(
        self, interval: timedelta = timedelta(seconds=1), customers_per_mitra_limit: int = 0
    ) -> AsyncIterator[DashboardStats]:
        duration = Duration()
        duration.FromTimedelta(interval)
        request = dashboard_pb.WatchDashboardStatsRequest(
            interval=duration, customers_per_mitra_limit=customers_per_mitra_limit
        )
        async for reply in self._dashboard.WatchDashboardStats(request, metadata=self._metadata):
            yield replies.dashboard(reply)

    def watch_available(self) -> LiveAvailability:
        """The live set of available mitras; iterate it to keep it current (and to see each
        change). It resumes by revision on its own after any interruption."""
        return LiveAvailability(self._stub, self._metadata)
