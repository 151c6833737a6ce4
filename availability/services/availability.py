"""AvailabilityService: validate, call the domain, build the response."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from uuid import UUID

import grpc

from ..domain import Availability
from ..errors import InvalidArgument, SessionRefused
from ..logs import current
from ..model import AvailabilitySnapshot, Beat
from ..sessions import SESSION_HEADER
from ..v1 import availability_pb2 as pb
from ..v1 import availability_pb2_grpc as pb_grpc
from . import _convert as convert

DEFAULT_FIND_LIMIT = 100
MAX_FIND_LIMIT = 10_000
REVISION_HEADER = convert.REVISION_HEADER

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]


class AvailabilityService(pb_grpc.AvailabilityServiceServicer):
    def __init__(self, availability: Availability) -> None:
        self._availability = availability
        self._snapshot_parts: tuple[int, list[pb.WatchAvailableMitrasResponse]] = (-1, [])

    async def _acts_for(self, mitra_id: UUID, context: Context) -> None:
        """A caller bound to mitras' sessions (bind_presence) must carry this mitra's."""
        call = current.get()
        if call is None or not call.bound:
            return
        session = ""
        for key, value in context.invocation_metadata() or ():
            if key == SESSION_HEADER:
                session = value if isinstance(value, str) else value.decode(errors="replace")
        (refused,) = await self._availability.sessions.refused([(mitra_id, session.strip())])
        if refused:
            raise SessionRefused(mitra_id)

    async def SetOnline(
        self, request: pb.SetOnlineRequest, context: Context
    ) -> pb.SetOnlineResponse:
        mitra_id = convert.mitra_id(request.mitra_id)
        await self._acts_for(mitra_id, context)
        status = await self._availability.set_online(mitra_id)
        return pb.SetOnlineResponse(status=convert.status(status))

    async def SetOffline(
        self, request: pb.SetOfflineRequest, context: Context
    ) -> pb.SetOfflineResponse:
        mitra_id = convert.mitra_id(request.mitra_id)
        await self._acts_for(mitra_id, context)
        status = await self._availability.set_offline(mitra_id)
        return pb.SetOfflineResponse(status=convert.status(status))

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: Context
    ) -> pb.HeartbeatResponse:
        mitra_id = convert.mitra_id(request.mitra_id)
        await self._acts_for(mitra_id, context)
        online = await self._availability.heartbeat(mitra_id)
        return pb.HeartbeatResponse(online=online)

    async def BatchHeartbeat(
        self, request: pb.BatchHeartbeatRequest, context: Context
    ) -> pb.BatchHeartbeatResponse:
        values = request.mitra_ids
        if len(values) > convert.MAX_BATCH_HEARTBEATS:
            raise InvalidArgument(
                "mitra_ids", f"at most {convert.MAX_BATCH_HEARTBEATS} ids, got {len(values)}"
            )
        ids = [convert.valid_mitra_id(v) for v in values]
        refused = await self._refused_entries(request, ids)
        distinct = list(
            dict.fromkeys(i for at, i in enumerate(ids) if i is not None and not refused[at])
        )
        beats = await self._availability.heartbeats(distinct) if distinct else []
        invalid = ids.count(None)
        if invalid:
            self._availability.refused_invalid(invalid)
        return pb.BatchHeartbeatResponse(
            results=convert.heartbeat_results(
                values, ids, dict(zip(distinct, beats, strict=True)), refused
            )
        )

    async def _refused_entries(
        self, request: pb.BatchHeartbeatRequest, ids: list[UUID | None]
    ) -> list[bool]:
        """For a caller bound to mitras' sessions: the entries whose session (mitra_sessions,
        one an entry) is not a live session of that entry's mitra."""
        call = current.get()
        if call is None or not call.bound:
            return [False] * len(ids)
        sessions = request.mitra_sessions
        if len(sessions) != len(ids):
            raise InvalidArgument(
                "mitra_sessions",
                f"this caller's heartbeats act for mitras: one auth session per mitra_ids "
                f"entry, in order (got {len(sessions)} for {len(ids)} ids)",
            )
        asked = [(at, i) for at, i in enumerate(ids) if i is not None]
        verdicts = await self._availability.sessions.refused(
            [(i, sessions[at].strip()) for at, i in asked]
        )
        refused = [False] * len(ids)
        for (at, _), verdict in zip(asked, verdicts, strict=True):
            refused[at] = verdict
        if any(refused):
            self._availability.count_beats(Beat.SESSION_REFUSED, sum(refused))
        return refused

    async def SetMitraActive(
        self, request: pb.SetMitraActiveRequest, context: Context
    ) -> pb.SetMitraActiveResponse:
        status, revoked = await self._availability.set_active(
            convert.mitra_id(request.mitra_id), request.active
        )
        return pb.SetMitraActiveResponse(
            status=convert.status(status), revoked_auth_sessions=revoked
        )

    async def GetMitraStatus(
        self, request: pb.GetMitraStatusRequest, context: Context
    ) -> pb.GetMitraStatusResponse:
        status = await self._availability.status(convert.mitra_id(request.mitra_id))
        return pb.GetMitraStatusResponse(status=convert.status(status))

    async def IsMitraReachable(
        self, request: pb.IsMitraReachableRequest, context: Context
    ) -> pb.IsMitraReachableResponse:
        status = await self._availability.status(convert.mitra_id(request.mitra_id))
        return pb.IsMitraReachableResponse(
            reachable=status.reachable, source=convert.source(status.source)
        )

    async def FindAvailableMitras(
        self, request: pb.FindAvailableMitrasRequest, context: Context
    ) -> pb.FindAvailableMitrasResponse:
        if not 0 <= request.limit <= MAX_FIND_LIMIT:
            raise InvalidArgument(
                "limit", f"must be 0 (default) to {MAX_FIND_LIMIT}, got {request.limit}"
            )
        exclude = convert.mitra_ids(request.exclude_mitra_ids, "exclude_mitra_ids", required=False)
        mitras, source = await self._availability.find_available(
            request.limit or DEFAULT_FIND_LIMIT, exclude
        )
        return pb.FindAvailableMitrasResponse(
            mitras=[convert.available_mitra(m) for m in mitras], source=convert.source(source)
        )

    async def CountAvailableMitras(
        self, request: pb.CountAvailableMitrasRequest, context: Context
    ) -> pb.CountAvailableMitrasResponse:
        count = await self._availability.count_available()
        return pb.CountAvailableMitrasResponse(
            available_count=count.available,
            online_count=count.online,
            as_of=convert.timestamp(count.as_of),
            source=convert.source(count.source),
        )

    async def RecomputeLoad(
        self, request: pb.RecomputeLoadRequest, context: Context
    ) -> pb.RecomputeLoadResponse:
        ids = convert.mitra_ids(request.mitra_ids, "mitra_ids", required=True)
        loads = await self._availability.recompute_load(ids)
        return pb.RecomputeLoadResponse(
            loads=[pb.MitraLoad(mitra_id=str(m), load=load) for m, load in loads]
        )

    async def WatchAvailableMitras(
        self, request: pb.WatchAvailableMitrasRequest, context: Context
    ) -> AsyncIterator[pb.WatchAvailableMitrasResponse]:
        resume = request.resume_revision if request.HasField("resume_revision") else 0
        hub = self._availability.watch_hub
        hub.check_ready()
        # Headers now, before any event: a resumed client with nothing missed knows it is live.
        await context.send_initial_metadata(((REVISION_HEADER, str(hub.revision)),))
        async for event in hub.watch(resume or None):
            if isinstance(event, AvailabilitySnapshot):
                async with contextlib.aclosing(hub.paced(self._snapshot(event))) as parts:
                    async for part in parts:
                        yield part
            else:
                yield convert.change(event)

    def _snapshot(self, snapshot: AvailabilitySnapshot) -> list[pb.WatchAvailableMitrasResponse]:
        """Encoded once per revision, however many watchers take it."""
        revision, parts = self._snapshot_parts
        if revision != snapshot.revision:
            parts = convert.snapshot_parts(snapshot)
            self._snapshot_parts = (snapshot.revision, parts)
        return parts
