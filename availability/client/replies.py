"""The server's messages as the model's values: the service's own mappings
(services/_convert.py) read the other way, so both ends agree by construction."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

from ..model import (
    AvailabilityChange,
    AvailableMitra,
    DashboardStats,
    MitraLoad,
    MitraStatus,
    SessionCounts,
    Source,
)
from ..services import _convert as convert
from ..v1 import availability_pb2 as pb
from ..v1 import dashboard_pb2 as dashboard_pb

_SOURCES = {v: k for k, v in convert.SOURCES.items()}
_KINDS = {v: k for k, v in convert.KINDS.items()}
_REASONS = {v: k for k, v in convert.REASONS.items() if k is not None}


def source(value: pb.Source.ValueType) -> Source:
    return _SOURCES.get(value, Source.DATABASE)


def _when(stamp: object, present: bool) -> datetime | None:
    return stamp.ToDatetime(UTC) if present else None  # type: ignore[attr-defined]


def status(value: pb.MitraStatus) -> MitraStatus:
    return MitraStatus(
        mitra_id=UUID(value.mitra_id),
        display_name=value.display_name,
        online=value.online,
        active=value.active,
        fresh=value.fresh,
        load=value.load,
        max_concurrent_sessions=value.max_concurrent_sessions,
        last_heartbeat_at=_when(value.last_heartbeat_time, value.HasField("last_heartbeat_time")),
        source=source(value.source),
    )


def available_mitra(value: pb.AvailableMitra) -> AvailableMitra:
    return AvailableMitra(
        UUID(value.mitra_id), value.display_name, value.load, value.max_concurrent_sessions
    )


def change(message: pb.WatchAvailableMitrasResponse) -> AvailabilityChange:
    event = message.change
    return AvailabilityChange(
        revision=message.revision,
        kind=_KINDS[event.kind],
        mitra=available_mitra(event.mitra),
        reason=_REASONS.get(event.reason),
    )


def dashboard(
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
        source=source(value.source),
    )
