"""Request validation and domain-to-protobuf conversion shared by the servicers."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

from google.protobuf.timestamp_pb2 import Timestamp

from ..errors import InvalidArgument
from ..model import (
    AvailabilityChange,
    AvailabilitySnapshot,
    AvailableMitra,
    Beat,
    ChangeKind,
    MitraStatus,
    Source,
    UnavailableReason,
)
from ..v1 import availability_pb2 as pb

MAX_IDS = 10_000
MAX_BATCH_HEARTBEATS = 5_000
REVISION_HEADER = "availability-revision"
"""Initial metadata of a watch: the revision it is live from (a resume replays up to it)."""
SNAPSHOT_PART = 5_000
"""Mitras per snapshot message: 100,000 mitras in one message would pass gRPC's default
4 MiB message limit."""

SOURCES = {Source.CACHE: pb.SOURCE_CACHE, Source.DATABASE: pb.SOURCE_DATABASE}
KINDS = {
    ChangeKind.AVAILABLE: pb.CHANGE_KIND_AVAILABLE,
    ChangeKind.UNAVAILABLE: pb.CHANGE_KIND_UNAVAILABLE,
    ChangeKind.LOAD_CHANGED: pb.CHANGE_KIND_LOAD_CHANGED,
}
_Result = pb.HeartbeatResult
OUTCOMES = {
    Beat.RECORDED: _Result.OUTCOME_RECORDED,
    Beat.OFFLINE: _Result.OUTCOME_OFFLINE,
    Beat.DEACTIVATED: _Result.OUTCOME_DEACTIVATED,
    Beat.NOT_FOUND: _Result.OUTCOME_NOT_FOUND,
    Beat.SESSION_REFUSED: _Result.OUTCOME_SESSION_REFUSED,
}
REASONS = {
    None: pb.UNAVAILABLE_REASON_UNSPECIFIED,
    UnavailableReason.OFFLINE: pb.UNAVAILABLE_REASON_OFFLINE,
    UnavailableReason.STALE: pb.UNAVAILABLE_REASON_STALE,
    UnavailableReason.DEACTIVATED: pb.UNAVAILABLE_REASON_DEACTIVATED,
    UnavailableReason.FULL: pb.UNAVAILABLE_REASON_FULL,
    UnavailableReason.REMOVED: pb.UNAVAILABLE_REASON_REMOVED,
}


def mitra_id(value: str, field: str = "mitra_id") -> UUID:
    if not value:
        raise InvalidArgument(field, "required")
    try:
        return UUID(value)
    except ValueError:
        raise InvalidArgument(field, f"must be a UUID, got {value[:64]!r}") from None


def valid_mitra_id(value: str) -> UUID | None:
    """The id, or None where mitra_id() would refuse it (a batch answers each id apart)."""
    try:
        return UUID(value)
    except ValueError:
        return None


def heartbeat_results(
    values: Sequence[str],
    ids: Sequence[UUID | None],
    beats: dict[UUID, Beat],
    refused: Sequence[bool] = (),
) -> list[pb.HeartbeatResult]:
    """One result an entry; `refused`: the entries whose session a bound caller's batch
    did not vouch for."""
    results = []
    for at, (value, mitra_id) in enumerate(zip(values, ids, strict=True)):
        if mitra_id is None:
            results.append(_Result(mitra_id=value, outcome=_Result.OUTCOME_INVALID_ID))
        elif refused and refused[at]:
            results.append(_Result(mitra_id=value, outcome=_Result.OUTCOME_SESSION_REFUSED))
        else:
            beat = beats[mitra_id]
            results.append(
                _Result(mitra_id=value, online=beat is Beat.RECORDED, outcome=OUTCOMES[beat])
            )
    return results


def mitra_ids(values: Sequence[str], field: str, *, required: bool) -> list[UUID]:
    """Parsed, de-duplicated in order, bounded."""
    if required and not values:
        raise InvalidArgument(field, "at least one id is required")
    if len(values) > MAX_IDS:
        raise InvalidArgument(field, f"at most {MAX_IDS} ids, got {len(values)}")
    return list(dict.fromkeys(mitra_id(v, f"{field}[{i}]") for i, v in enumerate(values)))


def timestamp(when: datetime | None) -> Timestamp | None:
    if when is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def source(value: Source) -> pb.Source.ValueType:
    return SOURCES[value]


def status(value: MitraStatus) -> pb.MitraStatus:
    return pb.MitraStatus(
        mitra_id=str(value.mitra_id),
        display_name=value.display_name,
        online=value.online,
        active=value.active,
        fresh=value.fresh,
        reachable=value.reachable,
        available=value.available,
        load=value.load,
        max_concurrent_sessions=value.max_concurrent_sessions,
        last_heartbeat_time=timestamp(value.last_heartbeat_at),
        source=source(value.source),
    )


def available_mitra(value: AvailableMitra) -> pb.AvailableMitra:
    return pb.AvailableMitra(
        mitra_id=str(value.mitra_id),
        display_name=value.display_name,
        load=value.load,
        max_concurrent_sessions=value.max_concurrent_sessions,
    )


@functools.lru_cache(maxsize=4096)
def change(value: AvailabilityChange) -> pb.WatchAvailableMitrasResponse:
    """Cached: every watcher of an instance is sent the same few changes at once."""
    return pb.WatchAvailableMitrasResponse(
        revision=value.revision,
        change=pb.AvailabilityChange(
            kind=KINDS[value.kind],
            mitra=available_mitra(value.mitra),
            reason=REASONS[value.reason],
        ),
    )


def snapshot_parts(value: AvailabilitySnapshot) -> list[pb.WatchAvailableMitrasResponse]:
    mitras = [available_mitra(m) for m in value.mitras]
    parts = max(1, -(-len(mitras) // SNAPSHOT_PART))
    return [
        pb.WatchAvailableMitrasResponse(
            revision=value.revision,
            snapshot=pb.AvailabilitySnapshot(
                mitras=mitras[i * SNAPSHOT_PART : (i + 1) * SNAPSHOT_PART], part=i, parts=parts
            ),
        )
        for i in range(parts)
    ]
