"""What the service does, in DESIGN.md's words: writes go to the truth then the mirror,
reads go to the mirror then the truth, heartbeats go to the mirror alone."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar, cast
from uuid import UUID

from .coalesce import Coalesced
from .errors import HeartbeatRefused, MitraNotFound, TruthUnavailable
from .logs import UNIDENTIFIED, current
from .mirror import MIRROR_ERRORS, HeartbeatOutcome, Mirror, MirrorMiss, untrusted
from .model import (
    Audit,
    AvailabilityCount,
    AvailableMitra,
    Beat,
    DashboardStats,
    Drift,
    MitraLoad,
    MitraState,
    MitraStatus,
    Source,
)
from .sessions import SessionGate
from .settings import Settings
from .truth import Truth
from .watch import WatchHub

log = logging.getLogger(__name__)

T = TypeVar("T")

DASHBOARD_MAX_AGE = 1.0

PIN_SECONDS = 30.0
"""How long a deactivation's pin outlasts the write's own deadline (twice the database
timeout) if the write never unpins it (the process died): the mitra is read from Postgres
until then."""

_BEATS = {
    HeartbeatOutcome.RECORDED: Beat.RECORDED,
    HeartbeatOutcome.OFFLINE: Beat.OFFLINE,
    HeartbeatOutcome.DEACTIVATED: Beat.DEACTIVATED,
}
_UNKNOWN, _UNSEEDED = HeartbeatOutcome.UNKNOWN, HeartbeatOutcome.UNSEEDED
_OFFLINE = HeartbeatOutcome.OFFLINE

STORE_ERRORS: tuple[type[BaseException], ...] = (*MIRROR_ERRORS, TruthUnavailable)
"""Either store failing: what background work retries later instead of crashing on."""


@dataclass
class Counters:
    """Counted for operators, by path (metrics.py exports them). Postgres answers a read
    instead of the mirror for three reasons, counted apart because only the first is trouble:
    Valkey failed (fallbacks), the mirror does not know the mitra (mirror_misses), or the mirror
    may not be read yet: unseeded, being reseeded, distrusted or another layout's
    (untrusted_reads). And mirror writes that failed after Postgres committed."""

    fallbacks: dict[str, int] = field(default_factory=dict)
    mirror_misses: dict[str, int] = field(default_factory=dict)
    untrusted_reads: dict[str, int] = field(default_factory=dict)
    mirror_write_errors: dict[str, int] = field(default_factory=dict)
    heartbeats: dict[str, int] = field(default_factory=dict)
    """Heartbeats (not calls: a batch counts each of its ids) by what became of them."""

    @staticmethod
    def bump(counter: dict[str, int], path: str, count: int = 1) -> None:
        counter[path] = counter.get(path, 0) + count


class _Throttled:
    """At most one warning a second a path: in an outage every call fails the same way, and
    a line each would bury the log; the metrics count every one."""

    def __init__(self, seconds: float = 1.0) -> None:
        self._seconds = seconds
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, path: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(path, -self._seconds) < self._seconds:
            self._held[path] = self._held.get(path, 0) + 1
            return
        self._last[path] = now
        held = self._held.pop(path, 0)
        if held:
            message += " (and %d more like it since the last line)"
            args += (held,)
        log.warning(message, *args)


class Availability:
    """The domain: one instance per process, shared by every RPC and background task."""

    def __init__(self, truth: Truth, mirror: Mirror, settings: Settings) -> None:
        self.truth = truth
        self.mirror = mirror
        self.settings = settings
        self.counters = Counters()
        self.stopping = False
        """Set first thing at shutdown: long-running streams end on it."""
        self._warnings = _Throttled()
        self.unmirrored: set[UUID] = set()
        self._pins: dict[UUID, int] = {}
        """Deactivations whose mirror write failed: unpinned once repaired."""
        self._beacon: Coalesced[None, AvailabilityCount] = Coalesced()
        self.dashboards: Coalesced[int, DashboardStats] = Coalesced()
        self.watch_hub = WatchHub(mirror, settings)
        self.sessions = SessionGate(mirror, truth)
        """Presence bound to mitras: whose auth sessions a bound caller's calls carry."""

    async def _read(
        self,
        path: str,
        from_mirror: Callable[[], Awaitable[T]],
        from_truth: Callable[[], Awaitable[T]],
    ) -> T:
        """Valkey first; on any Valkey error (or a mitra it does not know), Postgres."""
        try:
            return await from_mirror()
        except MIRROR_ERRORS as exc:
            self._bypassed(path, exc, "reading the truth")
            return await from_truth()

    def _bypassed(self, path: str, exc: BaseException, then: str, count: int = 1) -> None:
        """Count why Postgres answers instead of the mirror; warn only when Valkey failed."""
        if isinstance(exc, MirrorMiss):
            Counters.bump(self.counters.mirror_misses, path, count)
            log.debug("%s: not in the mirror (%s), %s", path, exc, then)
        elif untrusted(exc):
            Counters.bump(self.counters.untrusted_reads, path, count)
            log.debug("%s: the mirror is not trusted yet (%s), %s", path, exc, then)
        else:
            Counters.bump(self.counters.fallbacks, path, count)
            self._warnings.warning(
                path, "%s: mirror failed (%s: %s), %s", path, _named(exc), exc, then
            )

    async def _mirror(self, path: str, states: Sequence[MitraState]) -> bool:
        """Best effort after the truth committed: a failure is logged and counted, never raised.
        The mitras are remembered and resynced as soon as Valkey answers again
        (`repair_unmirrored`); the reconcile sweep heals anything else. True if it went through."""
        if not await self._mirror_best_effort(path, self.mirror.apply(states)):
            self.unmirrored.update(s.mitra_id for s in states)
            return False
        return True

    async def _mirror_best_effort(self, path: str, write: Awaitable[object]) -> bool:
        try:
            await write
        except MIRROR_ERRORS as exc:
            Counters.bump(self.counters.mirror_write_errors, path)
            self._warnings.warning(
                f"{path} write", "%s: mirror write failed (%s: %s)", path, _named(exc), exc
            )
            return False
        return True

    async def repair_unmirrored(self) -> int:
        """Resync the mitras whose mirror write failed; returns how many were repaired."""
        if not self.unmirrored:
            return 0
        ids, self.unmirrored = list(self.unmirrored), set()
        try:
            await self.mirror.apply(await self.truth.states(ids))
        except STORE_ERRORS:
            self.unmirrored.update(ids)
            raise
        for mitra_id in ids:
            if (pin := self._pins.pop(mitra_id, None)) is not None:
                await self._unpin(mitra_id, pin)
        return len(ids)

    def _status_from_truth(self, state: MitraState, now: datetime) -> MitraStatus:
        window = timedelta(seconds=self.settings.truth_freshness_seconds)
        heartbeat = state.last_heartbeat_at
        return MitraStatus(
            mitra_id=state.mitra_id,
            display_name=state.display_name,
            online=state.online,
            active=state.active,
            fresh=heartbeat is not None and heartbeat >= now - window,
            load=state.load,
            max_concurrent_sessions=state.max_concurrent_sessions,
            last_heartbeat_at=heartbeat,
            source=Source.DATABASE,
        )

    async def set_online(self, mitra_id: UUID) -> MitraStatus:
        written = await self.truth.set_online(mitra_id, _audit("set_online"))
        changed("set_online", mitra_id, written.was_online, written.state.online)
        await self._mirror("set_online", [written.state])
        return self._status_from_truth(written.state, written.now)

    async def set_offline(self, mitra_id: UUID) -> MitraStatus:
        written = await self.truth.set_offline(mitra_id, _audit("set_offline"))
        changed("set_offline", mitra_id, written.was_online, written.state.online)
        await self._mirror("set_offline", [written.state])
        return self._status_from_truth(written.state, written.now)

    async def set_active(self, mitra_id: UUID, active: bool) -> tuple[MitraStatus, int]:
        # A deactivation pins its mitra in the mirror first: from then on every reader asks
        # Postgres about it, until the mirror holds the deactivation. Without the pin, a
        # mirror write that failed after the commit (a timeout on a live Valkey) would leave
        # the mitra served from the mirror after the caller was told it is deactivated.
        pin = None if active else await self._pin(mitra_id)
        try:
            written = await self.truth.set_active(
                mitra_id, active, _audit("set_active", always=True)
            )
        except BaseException:
            if pin is not None:
                await self._unpin(mitra_id, pin)
            raise
        changed("set_active", mitra_id, written.was_online, written.state.online)
        mirrored = await self._mirror("set_active", [written.state])
        if pin is not None:
            if mirrored:
                await self._unpin(mitra_id, pin)
            else:
                self._pins[mitra_id] = pin  # unpinned by repair_unmirrored once it went through
        return self._status_from_truth(written.state, written.now), written.revoked

    async def _unpin(self, mitra_id: UUID, pin: int) -> None:
        """A pin that could not be lifted (a timeout on a live Valkey) is lifted by the next
        repair, not left to run out: until then the mitra is answered from Postgres and left
        out of FindAvailableMitras, even once reactivated."""
        if not await self._mirror_best_effort("unpin", self.mirror.unpin(pin, [mitra_id])):
            self._pins[mitra_id] = pin
            self.unmirrored.add(mitra_id)

    async def _pin(self, mitra_id: UUID) -> int | None:
        """The pin (mirror.pin), or None when Valkey did not take it: then the deactivation
        goes on, as every write does without Valkey, and the mirror write after it is all."""
        seconds = PIN_SECONDS + 2 * self.settings.database_timeout_seconds
        try:
            return await self.mirror.pin([mitra_id], seconds)
        except MIRROR_ERRORS as exc:
            Counters.bump(self.counters.mirror_write_errors, "pin")
            self._warnings.warning(
                "set_active pin",
                "set_active: pinning in the mirror failed (%s: %s)",
                _named(exc),
                exc,
            )
            return None

    async def heartbeat(self, mitra_id: UUID) -> bool:
        """True while the mitra is online; a deactivated or unknown mitra raises."""
        (beat,) = await self.heartbeats([mitra_id])
        if beat is Beat.DEACTIVATED:
            raise HeartbeatRefused(mitra_id)
        if beat is Beat.NOT_FOUND:
            raise MitraNotFound(mitra_id)
        return beat is Beat.RECORDED

    async def heartbeats(self, mitra_ids: Sequence[UUID]) -> list[Beat]:
        """One beat a (distinct) id, in order. One Valkey round trip; Postgres only for the
        ids Valkey cannot answer, so an outage never lets a deactivated mitra's heartbeat
        through."""
        try:
            outcomes = await self.mirror.heartbeats(mitra_ids)
        except MIRROR_ERRORS as exc:
            self._bypassed("heartbeat", exc, "recording in the truth", len(mitra_ids))
            recorded = await self.truth.record_heartbeats(mitra_ids)
            # Postgres has them and the mirror not: repaired once it answers again (a hiccup
            # keeps its data, and an app that beat meanwhile must not look stale there).
            self.unmirrored.update(
                i for i, beat in zip(mitra_ids, recorded, strict=True) if beat is Beat.RECORDED
            )
            return self._counted(recorded)
        # Offline here may only mean that this mirror has not heard of a SetOnline yet (one
        # made through an instance on another Valkey, during a move): Postgres decides.
        beats = [None if o is _OFFLINE else _BEATS.get(o) for o in outcomes]
        if None not in beats:
            return self._counted(cast(list[Beat], beats))
        unknown = [i for i, o in zip(mitra_ids, outcomes, strict=True) if o is _UNKNOWN]
        offline = [i for i, o in zip(mitra_ids, outcomes, strict=True) if o is _OFFLINE]
        unseeded = [i for i, o in zip(mitra_ids, outcomes, strict=True) if o is _UNSEEDED]
        if unseeded:
            Counters.bump(self.counters.untrusted_reads, "heartbeat", len(unseeded))
        asked = [*unknown, *offline, *unseeded]
        # The truth answers in the order asked.
        by_id = dict(zip(asked, await self.truth.record_heartbeats(asked), strict=True))
        unheard = [i for i in offline if by_id[i] is Beat.RECORDED]
        if unknown or unheard:
            Counters.bump(self.counters.mirror_misses, "heartbeat", len(unknown) + len(unheard))
        heal = [*(i for i in unknown if by_id[i] is not Beat.NOT_FOUND), *unheard]
        if heal:
            await self.resync(heal)
        if unseeded and self.mirror.guest:
            # The owner's mirror must see these heartbeats, or its sweep finds them stale.
            await self._mirror_best_effort("heartbeat", self.mirror.request_resync(unseeded))
        return self._counted(
            [by_id[i] if b is None else b for i, b in zip(mitra_ids, beats, strict=True)]
        )

    def refused_invalid(self, count: int) -> None:
        """Heartbeats of a batch whose id is not a UUID (counted; a unary one is refused)."""
        Counters.bump(self.counters.heartbeats, "invalid_id", count)

    def count_beats(self, beat: Beat, count: int) -> None:
        Counters.bump(self.counters.heartbeats, beat.value, count)

    def _counted(self, beats: list[Beat]) -> list[Beat]:
        counter = self.counters.heartbeats
        for beat in beats:
            counter[beat.value] = counter.get(beat.value, 0) + 1
        return beats

    async def status(self, mitra_id: UUID) -> MitraStatus:
        async def from_truth() -> MitraStatus:
            return self._status_from_truth(*await self.truth.state(mitra_id))

        return await self._read("status", lambda: self.mirror.status(mitra_id), from_truth)

    async def find_available(
        self, limit: int, exclude: Sequence[UUID]
    ) -> tuple[list[AvailableMitra], Source]:
        async def from_mirror() -> tuple[list[AvailableMitra], Source]:
            return await self.mirror.find_available(limit, exclude), Source.CACHE

        async def from_truth() -> tuple[list[AvailableMitra], Source]:
            return await self.truth.find_available(limit, exclude), Source.DATABASE

        return await self._read("find_available", from_mirror, from_truth)

    async def count_available(self) -> AvailabilityCount:
        """The beacon. Valkey computes one shared snapshot per expiry for the whole cluster;
        each instance reuses what it fetched for up to a second, so neither Valkey nor, in an
        outage, Postgres sees more than one query a second per instance."""

        async def fetch() -> AvailabilityCount:
            return await self._read(
                "count_available", self.mirror.count_available, self.truth.count_available
            )

        return await self._beacon.get(None, self.settings.beacon_local_seconds, fetch)

    @property
    def last_count(self) -> AvailabilityCount | None:
        """The beacon this instance computed last (the metrics' online and available)."""
        return self._beacon.latest(None)

    async def dashboard(self, limit: int, max_age: float = DASHBOARD_MAX_AGE) -> DashboardStats:
        """Counts from one Postgres round trip, online mitras from the mirror (or the truth);
        computed at most once per max_age per instance, however many dashboards ask."""

        async def compute() -> DashboardStats:
            async def from_mirror() -> tuple[int, list[MitraLoad], Source]:
                return *await self.mirror.busiest(limit), Source.CACHE

            async def from_truth() -> tuple[int, list[MitraLoad], Source]:
                return *await self.truth.busiest(limit), Source.DATABASE

            (counts, as_of), (online, busiest, source) = await asyncio.gather(
                self.truth.session_counts(), self._read("dashboard", from_mirror, from_truth)
            )
            return DashboardStats(counts, online, tuple(busiest), as_of, source)

        return await self.dashboards.get(limit, max_age, compute)

    async def resync(self, mitra_ids: Sequence[UUID]) -> list[MitraState]:
        """Re-read these mitras from the truth (load included) and mirror them."""
        states = await self.truth.states(mitra_ids)
        await self._mirror("resync", states)
        return states

    async def recompute_load(self, mitra_ids: Sequence[UUID]) -> list[tuple[UUID, int]]:
        states = {s.mitra_id: s for s in await self.resync(mitra_ids)}
        missing = [m for m in mitra_ids if m not in states]
        if missing:
            raise MitraNotFound(missing[0])
        return [(m, states[m].load) for m in mitra_ids]

    async def reconcile(self) -> tuple[int, Drift]:
        """Rebuild the mirror from the truth in place; returns (mitras, drift healed).

        Every mitra is rewritten through the same fenced script as any write, batch by
        batch, so readers never see an emptied or half-built set and a write that lands
        meanwhile is not undone. Members the truth does not have are dropped last. Only a
        complete pass marks the mirror seeded (readers of an unseeded mirror use Postgres), and
        only if the data set is still the one it started on (mirror/trust.py).
        """
        identity = await self.mirror.begin_seed()
        drift = Drift()
        known: set[str] = set()
        serving = deactivated = ready = 0
        snapshot: datetime | None = None
        applying: asyncio.Task[Drift] | None = None
        # Valkey applies one batch while Postgres sends the next.
        async for batch in self.truth.all_states():
            if applying is not None:
                drift += await applying
            applying = asyncio.create_task(self.mirror.apply(batch))
            for s in batch:
                known.add(str(s.mitra_id))
                deactivated += not s.active
                if s.active and s.online:
                    serving += 1
                    ready += s.load < s.max_concurrent_sessions
            snapshot = snapshot or batch[0].read_at
        if applying is not None:
            drift += await applying
        count = len(known)
        extra = sorted(await self.mirror.unknown_members(known, serving, deactivated, ready))
        if extra:
            forgotten = await self.mirror.forget(extra, snapshot or datetime.now(UTC))
            drift += Drift(forgotten=forgotten)
        await self.mirror.finish_seed(identity)
        return count, drift


changes_log = logging.getLogger("availability.changes")


def changed(action: str, mitra_id: UUID, before: bool, after: bool, by: str = "") -> None:
    """Every change of a mitra's presence is attributable: one INFO line with who made it
    (the caller, or the sweep), which mitra, online before and after, and the request id
    (the log line's context). The audit table keeps the admin changes (docs/security.md:
    Audit, why not all)."""
    request = current.get()
    who = by or (request.caller if request is not None else UNIDENTIFIED)
    changes_log.info(
        "%s: mitra %s online %s -> %s by %s",
        action,
        mitra_id,
        str(before).lower(),
        str(after).lower(),
        who,
        extra={
            "event": "presence_changed",
            "action": action,
            "changed_mitra": str(mitra_id),
            "online_before": before,
            "online_after": after,
            "changed_by": who,
            "request_id": request.id if request is not None else None,
        },
    )


def _audit(action: str, *, always: bool = False) -> Audit | None:
    """The audit row's who, from the call being served (logs.Request, named by
    interceptors.Guard): always for a change of activation, and for a change of presence
    when the caller has the admin scope."""
    request = current.get()
    if request is None:
        return Audit(UNIDENTIFIED, None, action) if always else None
    if not (always or request.admin):
        return None
    return Audit(request.caller, request.id, action)


def _named(exc: BaseException) -> str:
    return type(exc).__name__
