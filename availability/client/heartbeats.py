"""heartbeat() coalesced into BatchHeartbeat calls. Apart from the client's other methods
because it alone keeps state between calls (a window, its timer, the batches in flight), and
each caller must still get the answer, or the error, its own Heartbeat would have."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import grpc

from ..v1 import availability_pb2 as pb

SESSION_HEADER = "x-mitra-session"
"""Where a bound caller's unary presence calls carry the mitra's auth session."""

if TYPE_CHECKING:
    from ..v1.availability_pb2_grpc import AvailabilityServiceAsyncStub

_Result = pb.HeartbeatResult
_REFUSED = {
    _Result.OUTCOME_DEACTIVATED: (grpc.StatusCode.PERMISSION_DENIED, "mitra {} is deactivated"),
    _Result.OUTCOME_SESSION_REFUSED: (
        grpc.StatusCode.PERMISSION_DENIED,
        "mitra {}: this caller's presence calls must carry a live auth session of that mitra",
    ),
    _Result.OUTCOME_NOT_FOUND: (grpc.StatusCode.NOT_FOUND, "mitra {} not found"),
}


class Heartbeats:
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
        self._waiting: list[tuple[str, str | None, asyncio.Future[bool]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._unary = False
        self.calls = 0
        """BatchHeartbeat calls sent (fewer than heartbeats under load)."""

    async def beat(self, mitra_id: str, session: str | None = None) -> bool:
        if self._unary:
            request = pb.HeartbeatRequest(mitra_id=mitra_id)
            return (await self._stub.Heartbeat(request, metadata=self._acting(session))).online
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._waiting.append((mitra_id, session, future))
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

    def _acting(self, session: str | None) -> tuple[tuple[str, str], ...]:
        return self._metadata if session is None else (*self._metadata, (SESSION_HEADER, session))

    async def _answer(self, waiting: list[tuple[str, str | None, asyncio.Future[bool]]]) -> None:
        # Sessions go along when any heartbeat of the window has one (a bound caller's do).
        sessions = [s or "" for _, s, _ in waiting] if any(s for _, s, _ in waiting) else []
        request = pb.BatchHeartbeatRequest(
            mitra_ids=[mitra_id for mitra_id, _, _ in waiting], mitra_sessions=sessions
        )
        self.calls += 1
        try:
            reply = await self._stub.BatchHeartbeat(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._unary = True
                await asyncio.gather(*(self._alone(m, s, f) for m, s, f in waiting))
                return
            for _, _, future in waiting:
                if not future.done():
                    future.set_exception(_copy(exc))
            return
        except BaseException as exc:  # cancelled with the loop, or a bug: no waiter hangs
            for _, _, future in waiting:
                if not future.done():
                    future.set_exception(exc)
            raise
        for (mitra_id, _, future), result in zip(waiting, reply.results, strict=True):
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

    async def _alone(
        self, mitra_id: str, session: str | None, future: asyncio.Future[bool]
    ) -> None:
        request = pb.HeartbeatRequest(mitra_id=mitra_id)
        try:
            online = (await self._stub.Heartbeat(request, metadata=self._acting(session))).online
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
