"""The watch hub behind WatchAvailableMitras: one per process.

Every path that changes a mitra's availability, on any instance, appends one change to a
Valkey stream under a cluster-wide revision (`publish` in mirror/lua/prelude.lua). The hub
follows that stream with one blocking XREAD and keeps the available set and the retained
changes in memory, so each watcher on this instance is served from memory: a thousand
watchers cost one reader, and a resume within retention never touches Valkey.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar
from uuid import UUID

from .errors import LimitReached, WatchInterrupted
from .mirror import MIRROR_ERRORS, Mirror
from .model import AvailabilityChange, AvailabilitySnapshot, AvailableMitra, ChangeKind
from .settings import Settings
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

EXPIRE_INTERVAL_SECONDS = 0.5
"""How often each instance publishes the mitras that went stale: with the stream's own
latency, a stale mitra leaves every watcher's set well within a second."""

_RETRY_SECONDS = 0.5
_POSITION_CHECK_SECONDS = 1.0

LOST_AFTER_SECONDS = 1.0
"""How long the hub retries its failing Valkey calls before it ends every watch. A call that
timed out because this process's event loop was busy (a thousand watches arriving at once)
is not a lost Valkey, and the stream keeps every change after the hub's revision, so a retry
within this loses nothing; a Valkey that is gone fails every retry, and its watches end."""
_RETRY_SOON_SECONDS = 0.05

SNAPSHOT_SENDS = 8
"""Snapshot parts in the sending at once, over all of a process's watchers. gRPC encodes each
part in the event loop (5,000 mitras, about a millisecond): a burst of watchers of a city (a
thousand dashboards back after a deploy) would otherwise make each turn of the loop encode a
part for every one of them, and every other call's Valkey reply would wait behind that past
its timeout (seen: the hub's own calls timed out and it ended every watch)."""

SNAPSHOT_SEND_WAIT_SECONDS = 5.0
"""How long a part waits for a free place before it goes anyway: a client that stopped
reading holds its place until its write completes, and must not hold up the others for long."""

Event = AvailabilitySnapshot | AvailabilityChange
_Part = TypeVar("_Part")


class _Resync(Exception):
    """The stream skipped revisions (a flushed or replaced Valkey): start over from a snapshot."""


class _Unseeded(Exception):
    """The mirror lost its seed (a flushed Valkey): watchers must wait for the reseed."""


_LOST: tuple[type[BaseException], ...] = (*MIRROR_ERRORS, _Unseeded)


@dataclass(eq=False, slots=True)
class _Watcher:
    buffer: deque[AvailabilityChange] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    resync: bool = False
    ended: WatchInterrupted | None = None


@dataclass
class WatchStats:
    """Counted for operators (metrics.py exports them)."""

    changes: int = 0
    snapshots: int = 0
    overflows: int = 0
    resyncs: int = 0
    losses: int = 0
    retries: int = 0
    """failed Valkey calls of the hub that it retried without ending the watches"""
    most_snapshot_sends: int = 0
    """the most places for snapshot parts ever held at once (at most SNAPSHOT_SENDS)"""


def _leading_to(retained: list[AvailabilityChange], revision: int) -> list[AvailabilityChange]:
    """The retained changes that lead without a gap to revision. A reseed publishes silently
    and restarts the revision from the clock: changes from before it do not lead to the
    current state, so a resume from them must get a snapshot instead."""
    first = len(retained)
    expected = revision
    while first > 0 and retained[first - 1].revision == expected:
        first -= 1
        expected -= 1
    return retained[first:]


class WatchHub:
    def __init__(self, mirror: Mirror, settings: Settings) -> None:
        self._mirror = mirror
        self._buffer_limit = settings.watch_buffer_events
        self._max_watchers = settings.watch_max_streams
        self._retained: deque[AvailabilityChange] = deque(maxlen=settings.watch_retained_changes)
        self._view: dict[UUID, AvailableMitra] = {}
        self._snapshot: AvailabilitySnapshot | None = None
        self._watchers: set[_Watcher] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.revision = 0
        self._marker = ""
        self.ready = False
        self.stats = WatchStats()
        self._send_places = asyncio.Semaphore(SNAPSHOT_SENDS)
        self.places_held = 0
        self._failing_since: float | None = None

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    async def paced(self, parts: Sequence[_Part]) -> AsyncGenerator[_Part]:
        """A snapshot's parts, each holding one of SNAPSHOT_SENDS places from when it is
        handed out until the next is asked for (gRPC has sent it by then). Close it with
        contextlib.aclosing, so a watch that ends midway gives its place back at once."""
        for part in parts:
            held = True
            try:
                async with asyncio.timeout(SNAPSHOT_SEND_WAIT_SECONDS):
                    await self._send_places.acquire()
            except TimeoutError:
                held = False
            self.places_held += held
            self.stats.most_snapshot_sends = max(self.stats.most_snapshot_sends, self.places_held)
            try:
                yield part
            finally:
                if held:
                    self.places_held -= 1
                    self._send_places.release()

    async def start(self) -> None:
        """Take the first snapshot now if Valkey answers (so a server that reports SERVING
        can be watched at once), then follow the stream in the background."""
        with contextlib.suppress(*MIRROR_ERRORS):
            await self._sync()
        self._tasks = [
            asyncio.create_task(self._follow(), name="watch-follow"),
            asyncio.create_task(self._expire(), name="watch-expire"),
        ]

    async def stop(self) -> None:
        """End every watch (UNAVAILABLE: the client resumes on another instance), so they do
        not hold the drain open, and stop following."""
        self._end_all(WatchInterrupted("the server is shutting down; resume elsewhere"))
        self.ready = False
        await cancel_and_wait(self._tasks)
        self._tasks.clear()

    def check_ready(self) -> None:
        if not self.ready:
            raise WatchInterrupted(
                "the Valkey mirror is unreachable or being seeded; retry with resume_revision"
            )

    def snapshot(self) -> AvailabilitySnapshot:
        """The available set at the current revision, least loaded first (built once per
        revision, whoever asks)."""
        if self._snapshot is None or self._snapshot.revision != self.revision:
            mitras = sorted(self._view.values(), key=lambda m: (m.load, str(m.mitra_id)))
            self._snapshot = AvailabilitySnapshot(self.revision, tuple(mitras))
        return self._snapshot

    async def watch(self, resume_revision: int | None = None) -> AsyncIterator[Event]:
        """A snapshot (or the changes missed since resume_revision, while retained), then
        every change. A watcher that falls more than WATCH_BUFFER_EVENTS behind gets a fresh
        snapshot instead of a growing backlog. Raises WatchInterrupted when Valkey is lost
        or the server stops."""
        self.check_ready()
        if len(self._watchers) >= self._max_watchers:
            raise LimitReached(
                f"this instance already serves {len(self._watchers)} watches "
                "(WATCH_MAX_STREAMS); retry later or on another instance"
            )
        watcher = _Watcher()
        missed = self._since(resume_revision)
        watcher.resync = missed is None
        self._watchers.add(watcher)
        try:
            for change in missed or ():
                yield change
            while True:
                if watcher.ended is not None:
                    raise watcher.ended
                if watcher.resync:
                    watcher.resync = False
                    watcher.buffer.clear()
                    self.stats.snapshots += 1
                    yield self.snapshot()
                elif watcher.buffer:
                    yield watcher.buffer.popleft()
                else:
                    watcher.wake.clear()
                    await watcher.wake.wait()
        finally:
            self._watchers.discard(watcher)

    def _since(self, revision: int | None) -> list[AvailabilityChange] | None:
        """The retained changes after revision; None when a snapshot is needed instead."""
        if revision is None or revision > self.revision:
            return None
        if revision == self.revision:
            return []
        if not self._retained or self._retained[0].revision > revision + 1:
            return None
        return [c for c in self._retained if c.revision > revision]

    async def _sync(self) -> None:
        snapshot, retained, self._marker = await self._mirror.watch_snapshot()
        self._view = {m.mitra_id: m for m in snapshot.mitras}
        self._snapshot = snapshot
        self._retained.clear()
        self._retained.extend(_leading_to(retained, snapshot.revision))
        self.revision = snapshot.revision
        for watcher in self._watchers:
            watcher.resync = True
            watcher.wake.set()
        if not self.ready:
            log.info("watch: following changes from revision %d", self.revision)
        self.ready = True

    async def _follow(self) -> None:
        resync = False
        while True:
            try:
                if resync or not self.ready:
                    await self._sync()
                resync = False
                await self._tail()
            except _Resync as exc:
                self.stats.resyncs += 1
                log.warning("watch: %s; watchers get a fresh snapshot", exc)
                resync = True
            except _LOST as exc:
                if self._retrying(exc):
                    await asyncio.sleep(_RETRY_SOON_SECONDS)
                    continue
                self._failing_since = None
                if self.ready:
                    self.stats.losses += 1
                    log.warning(
                        "watch: mirror lost (%s: %s); ending watches", type(exc).__name__, exc
                    )
                    self._end_all(
                        WatchInterrupted(
                            "lost the Valkey mirror; retry with resume_revision "
                            "(a fresh snapshot follows if it lost changes)"
                        )
                    )
                self.ready = False
                await asyncio.sleep(_RETRY_SECONDS)

    def _retrying(self, exc: BaseException) -> bool:
        """Whether a failed call of a following hub is retried rather than ending every
        watch: for LOST_AFTER_SECONDS after the first failure (a flushed mirror never is)."""
        if not self.ready or isinstance(exc, _Unseeded):
            return False
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            log.warning(
                "watch: a Valkey call failed (%s: %s); retrying for up to %.1f s before ending"
                " watches",
                type(exc).__name__,
                exc,
                LOST_AFTER_SECONDS,
            )
        if now - self._failing_since >= LOST_AFTER_SECONDS:
            return False
        self.stats.retries += 1
        return True

    async def _tail(self) -> None:
        checked = time.monotonic()
        while True:
            changes = await self._mirror.read_changes(self.revision)
            for change in changes:
                if change.revision != self.revision + 1:
                    raise _Resync(f"revision {self.revision} was followed by {change.revision}")
                self._apply(change)
            if time.monotonic() - checked >= _POSITION_CHECK_SECONDS:
                marker, revision = await self._mirror.watch_position()
                if not marker:
                    raise _Unseeded("the mirror is being reseeded")
                if marker != self._marker:
                    raise _Resync("the mirror was reseeded")
                if revision < self.revision:
                    raise _Resync(f"the revision went back from {self.revision} to {revision}")
                checked = time.monotonic()
                self._failing_since = None  # both of the hub's kinds of call answered

    def _apply(self, change: AvailabilityChange) -> None:
        if change.kind is ChangeKind.UNAVAILABLE:
            self._view.pop(change.mitra.mitra_id, None)
        else:
            self._view[change.mitra.mitra_id] = change.mitra
        self.revision = change.revision
        self._retained.append(change)
        self.stats.changes += 1
        for watcher in self._watchers:
            if watcher.resync:
                continue
            if len(watcher.buffer) >= self._buffer_limit:
                watcher.buffer.clear()
                watcher.resync = True
                self.stats.overflows += 1
            else:
                watcher.buffer.append(change)
            watcher.wake.set()

    def _end_all(self, reason: WatchInterrupted) -> None:
        for watcher in self._watchers:
            watcher.ended = reason
            watcher.wake.set()

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL_SECONDS)
            with contextlib.suppress(*MIRROR_ERRORS):
                await self._mirror.expire_stale()
