"""The live set of available mitras, for a caller that picks one for every chat: it holds
the set in memory, kept current by WatchAvailableMitras and resumed by revision after any
cut, rather than asking FindAvailableMitras each time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING
from uuid import UUID

import grpc

from ..model import AvailabilityChange, AvailabilitySnapshot, AvailableMitra, ChangeKind
from ..services import _convert as convert
from ..v1 import availability_pb2 as pb
from . import replies

if TYPE_CHECKING:
    from ..v1.availability_pb2_grpc import AvailabilityServiceAsyncStub

log = logging.getLogger("availability.client")  # the client's one logger, by its package

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
                            message.revision, tuple(replies.available_mitra(m) for m in parts)
                        )
                        parts = []
                        self._mitras = {m.mitra_id: m for m in snapshot.mitras}
                        self.revision, self.in_sync = snapshot.revision, True
                        yield snapshot
                    else:
                        change = replies.change(message)
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
