"""DashboardService: the call-center dashboard's numbers, polled or streamed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from ..domain import DASHBOARD_MAX_AGE, Availability
from ..errors import InvalidArgument, WatchInterrupted
from ..model import DashboardStats
from ..v1 import dashboard_pb2 as pb
from ..v1 import dashboard_pb2_grpc as pb_grpc
from . import _convert as convert

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_LIST = 1000
MAX_LIST = 100_000
MIN_INTERVAL_SECONDS = 1.0


def _limit(value: int) -> int:
    if not 0 <= value <= MAX_LIST:
        raise InvalidArgument(
            "customers_per_mitra_limit", f"must be 0 (default) to {MAX_LIST}, got {value}"
        )
    return value or DEFAULT_LIST


def _fields(stats: DashboardStats) -> dict[str, Any]:
    counts = stats.counts
    return {
        "active_chats": counts.active_chats,
        "online_mitras": stats.online_mitras,
        "pending_requests": counts.pending_requests,
        "customers_per_mitra": [
            pb.MitraSessionCount(
                mitra_id=str(m.mitra_id), display_name=m.display_name, active_session_count=m.load
            )
            for m in stats.customers_per_mitra
        ],
        "sensitive": pb.SensitiveStats(
            total=counts.sensitive_total,
            last_30d_total=counts.last_30d_total,
            last_30d_sensitive=counts.last_30d_sensitive,
            last_30d_percent=counts.last_30d_percent,
        ),
        "as_of": convert.timestamp(stats.as_of),
        "source": convert.source(stats.source),
    }


class DashboardService(pb_grpc.DashboardServiceServicer):
    def __init__(self, availability: Availability) -> None:
        self._availability = availability

    async def GetDashboardStats(
        self, request: pb.GetDashboardStatsRequest, context: Context
    ) -> pb.GetDashboardStatsResponse:
        stats = await self._availability.dashboard(_limit(request.customers_per_mitra_limit))
        return pb.GetDashboardStatsResponse(**_fields(stats))

    async def WatchDashboardStats(
        self, request: pb.WatchDashboardStatsRequest, context: Context
    ) -> AsyncIterator[pb.WatchDashboardStatsResponse]:
        limit = _limit(request.customers_per_mitra_limit)
        requested = request.interval.ToTimedelta().total_seconds()
        if requested < 0:
            raise InvalidArgument("interval", f"must not be negative, got {requested}s")
        interval = max(MIN_INTERVAL_SECONDS, requested)
        sent: DashboardStats | None = None
        while True:
            if self._availability.stopping:
                # Ends here even if a cancellation was lost in a Valkey call (tasks.py): a
                # dashboard stream must not outlive its server.
                raise WatchInterrupted("the server is shutting down; watch again elsewhere")
            stats = await self._availability.dashboard(limit, max(interval, DASHBOARD_MAX_AGE))
            if not stats.same_numbers(sent):
                yield pb.WatchDashboardStatsResponse(**_fields(stats))
                sent = stats
            await asyncio.sleep(interval)
