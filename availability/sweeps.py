"""The server-owned background work of DESIGN.md: auto-offline, heartbeat flush, reconcile,
and keeping the mirror trusted: checked every second, reseeded whenever its data set was
replaced (a restart, a restore, a failover, a flush, an eviction).

Each sweep runs on one instance per tick: whoever holds its lease in Valkey. The lease's
epoch is a fencing token; writes a late former leader could still make are either refused
by Postgres (auto-offline) or idempotent and monotonic (flush, reconcile).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from .domain import STORE_ERRORS, Availability, changed
from .errors import TruthUnavailable
from .mirror import MIRROR_ERRORS, Trust
from .model import AUTO_OFFLINE, HEARTBEAT_FLUSH, RECONCILE, SWEEPS, Drift
from .tasks import cancel_and_wait

SWEEP_BACKOFF_CEILING = 60.0
"""The longest a failing sweep waits between tries (or its interval, if longer)."""

AUTO_OFFLINE_BY = "auto-offline sweep"
"""Who the presence-changed event names for a mitra the sweep took offline."""

__all__ = ["AUTO_OFFLINE", "HEARTBEAT_FLUSH", "RECONCILE", "SWEEPS", "Sweeps"]

log = logging.getLogger(__name__)


@dataclass
class SweepStats:
    """Per sweep: what the metrics endpoint and `availability status` report."""

    runs: int = 0
    aborted: int = 0
    skipped: int = 0
    affected: int = 0
    last_run_at: datetime | None = None
    last_duration_seconds: float = 0.0
    failing: str | None = None
    """The error its last run failed with (not an outage: TruthUnavailable and Valkey errors
    abort and retry at the next interval); None once a run went through."""
    failing_logged_at: float = 0.0


@dataclass
class SweepReport:
    stats: dict[str, SweepStats] = field(default_factory=dict)
    guard_trips: int = 0
    drift: Drift = field(default_factory=Drift)
    reseeds: int = 0

    def of(self, name: str) -> SweepStats:
        return self.stats.setdefault(name, SweepStats())


class Sweeps:
    def __init__(self, availability: Availability) -> None:
        self._availability = availability
        self._settings = availability.settings
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        """This instance, as leases and `availability status` name it."""
        self.report = SweepReport()
        self._details: dict[str, dict[str, Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        self._reconcile_due = False
        self._reseeding: asyncio.Task[None] | None = None
        self._running: set[str] = set()

    def valkey_connected(self) -> None:
        """Called from the Valkey connection on every (re)connect (which checked the data set
        already): act on its verdict now rather than at the next second."""
        self._connected.set()

    def valkey_moved(self) -> None:
        """The Valkey Cluster master serving the mirror changed: it may lack the last writes
        the old one acknowledged, so reconcile now rather than at the next cycle."""
        self._reconcile_due = True
        self._connected.set()

    def start(self) -> None:
        s = self._settings
        schedule: list[tuple[str, float, Callable[[int], Awaitable[int]]]] = [
            (AUTO_OFFLINE, s.mitra_auto_offline_sweep_seconds, self.auto_offline),
            (HEARTBEAT_FLUSH, s.heartbeat_mirror_interval_seconds, self.flush_heartbeats),
            (RECONCILE, s.valkey_online_mirror_sweep_seconds, self.reconcile),
        ]
        for name, interval, sweep in schedule:
            self._tasks.append(
                asyncio.create_task(self._every(name, interval, sweep), name=f"sweep-{name}")
            )
        self._tasks.append(asyncio.create_task(self._keep_trusted(), name="keep-trusted"))

    async def stop(self) -> None:
        if self._reseeding is not None:
            self._tasks.append(self._reseeding)
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        for name in SWEEPS:
            with contextlib.suppress(*MIRROR_ERRORS):
                await self._availability.mirror.release_lease(name, self.owner)

    async def _every(
        self, name: str, interval: float, sweep: Callable[[int], Awaitable[int]]
    ) -> None:
        failures = 0
        while True:
            # An error that repeats (a grant revoked, say) waits ever longer, up to
            # SWEEP_BACKOFF_CEILING, rather than failing the same way every interval.
            await asyncio.sleep(min(interval * 2**failures, max(interval, SWEEP_BACKOFF_CEILING)))
            ran = await self.run_once(name, interval, sweep)
            failed = self.report.of(name).failing
            failures = min(failures + 1, 16) if failed and not ran else 0

    async def run_once(
        self, name: str, interval: float, sweep: Callable[[int], Awaitable[int]]
    ) -> bool:
        """One tick: take or renew the lease, run if held; True when the sweep ran to its
        end. The lease outlives the tick, so the holder keeps it and the other instances skip;
        if the holder dies, another takes over within 1.5 intervals."""
        stats = self.report.of(name)
        mirror = self._availability.mirror
        if mirror.guest:  # another version owns the mirror, and its sweeps run
            stats.skipped += 1
            return False
        if name in self._running:  # a reseed and the cycle's reconcile met here: one is enough
            return False
        self._running.add(name)
        try:
            return await self._run_leased(name, interval, sweep)
        finally:
            self._running.discard(name)

    async def _run_leased(
        self, name: str, interval: float, sweep: Callable[[int], Awaitable[int]]
    ) -> bool:
        stats = self.report.of(name)
        mirror = self._availability.mirror
        ttl = interval * 1.5
        try:
            epoch = await mirror.take_lease(name, self.owner, ttl)
        except MIRROR_ERRORS as exc:
            stats.aborted += 1
            log.warning("%s: no lease without Valkey (%r); not running", name, exc)
            return False
        if not epoch:
            stats.skipped += 1
            return False
        renew = asyncio.create_task(self._renew(name, ttl), name=f"renew-{name}")
        started = time.perf_counter()
        outcome, affected = "ok", 0
        self._details[name] = {}
        try:
            affected = await sweep(epoch)
            stats.affected += affected
            stats.runs += 1
        except MIRROR_ERRORS as exc:
            stats.aborted += 1
            outcome = f"aborted: Valkey error ({exc!r})"
            log.warning("%s aborted: Valkey error (%r); nothing taken from it", name, exc)
        except TruthUnavailable as exc:
            stats.aborted += 1
            outcome = f"aborted: {exc}"
            log.warning("%s aborted: %s", name, exc)
        except Exception as exc:  # any other failure (a grant missing): recorded, backed off
            stats.aborted += 1
            error = f"{type(exc).__name__}: {exc}"
            outcome = f"failed: {error}"
            if error != stats.failing or time.monotonic() - stats.failing_logged_at >= 60:
                stats.failing_logged_at = time.monotonic()
                log.error("%s failed: %s; retrying with backoff", name, error)
            stats.failing = error
        else:
            stats.failing = None
        finally:
            # Awaited: a renewal that lost its cancel would hold the lease for good.
            await cancel_and_wait([renew])
            stats.last_duration_seconds = time.perf_counter() - started
            stats.last_run_at = datetime.now(UTC)
        await self.record(
            name, interval, stats.last_duration_seconds, outcome, affected, self._details.pop(name)
        )
        return outcome == "ok"

    async def record(
        self,
        name: str,
        every: float,
        seconds: float,
        outcome: str,
        affected: int,
        details: dict[str, Any],
    ) -> None:
        """Tell the deployment (`availability status`) how this sweep last ran."""
        record = {
            "at": datetime.now(UTC).isoformat(),
            "seconds": round(seconds, 4),
            "every": every,
            "affected": affected,
            "outcome": outcome,
            "instance": self.owner,
            **details,
        }
        with contextlib.suppress(*MIRROR_ERRORS):
            await self._availability.mirror.record_sweep(name, json.dumps(record))

    async def _renew(self, name: str, ttl: float) -> None:
        while True:
            await asyncio.sleep(ttl / 3)
            with contextlib.suppress(*MIRROR_ERRORS):
                await self._availability.mirror.take_lease(name, self.owner, ttl)

    async def auto_offline(self, epoch: int) -> int:
        """Online mitras whose heartbeat went stale go offline: Postgres first, fenced by the
        lease epoch, then Valkey. Any Valkey error aborts before Postgres is touched.

        The mass-stale guard: when more than MASS_STALE_SHARE of the online mitras (and more
        than MASS_STALE_MIN) are stale at once, the fault is probably ours (the heartbeat
        path), so at most MASS_STALE_MAX_PER_SWEEP go offline this sweep, loudly.
        """
        s = self._settings
        availability = self._availability
        online, stale, ids = await availability.mirror.stale(s.auto_offline_batch)
        if not ids:
            return 0
        if stale > s.mass_stale_min and stale > s.mass_stale_share * online:
            self.report.guard_trips += 1
            self._details[AUTO_OFFLINE] = {"guard_tripped": True, "stale": stale, "online": online}
            ids = ids[: s.mass_stale_max_per_sweep]
            log.error(
                "mass-stale guard tripped: %d of %d online mitras stale at once; taking only "
                "%d offline this sweep. Check the heartbeat path before trusting this.",
                stale,
                online,
                len(ids),
            )
        offline = await availability.truth.take_offline(ids, AUTO_OFFLINE, epoch)
        # Those Postgres kept online (a heartbeat it recorded itself) or had offline already:
        # the resync brings their mirror up to it, so the next sweep does not pick them again.
        kept = set(ids).difference(offline)
        await availability.resync([*offline, *kept])
        if offline:
            log.info("auto-offline: %d stale mitras taken offline", len(offline))
            for mitra_id in offline:
                changed("auto_offline", mitra_id, True, False, by=AUTO_OFFLINE_BY)
        if kept:
            self._details.setdefault(AUTO_OFFLINE, {})["kept_by_postgres"] = len(kept)
        return len(offline)

    async def flush_heartbeats(self, epoch: int) -> int:
        """Heartbeat times from Valkey to last_heartbeat_at, one statement a cycle, only the
        heartbeats since the last flush. If Postgres fails they stay set aside in Valkey and
        the next flush merges and retries them."""
        availability = self._availability
        taken = await availability.mirror.take_dirty_heartbeats(epoch)
        if not taken:
            return 0
        await availability.truth.flush_heartbeats(taken)
        await availability.mirror.release_flushed(epoch)
        await availability.truth.announce_flush(availability.mirror.identity, min(taken.values()))
        return len(taken)

    async def reconcile(self, epoch: int) -> int:
        mitras, drift = await self._availability.reconcile()
        self.report.drift += drift
        self._details[RECONCILE] = {"mitras": mitras, "drift": asdict(drift)}
        if drift.total:
            log.warning("reconcile healed drift over %d mitras: %s", mitras, drift)
        return drift.total

    async def _keep_trusted(self) -> None:
        """Check the mirror every second and on every reconnect (trust.lua: a replaced data
        set is distrusted at once, by whichever instance sees it first), reseed it when it is
        not trusted, one instance at a time under the reconcile lease. While trusted: the
        reconcile a Cluster or Sentinel failover made due, the resyncs other versions asked
        for, and the mitras whose mirror write failed during a hiccup."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # not wait_for: see listener.py
                    await self._connected.wait()
            self._connected.clear()
            if self._reseeding is not None and not self._reseeding.done():
                continue  # it checks the data set at its start and end
            try:
                verdict = (await self._availability.mirror.check_trust()).verdict
                if verdict is Trust.GUEST:
                    continue
                if verdict is Trust.TRUSTED:
                    if self._reconcile_due:
                        self._reseeding = asyncio.create_task(self._due_reconcile())
                        continue
                    await self._resync_requested()
                    await self._availability.repair_unmirrored()
                    continue
            except STORE_ERRORS:
                continue
            except Exception as exc:  # a grant missing, say: this loop must not die of it
                self._keep_trusted_failed(exc)
                continue
            self._reseeding = asyncio.create_task(self._reseed())

    def _keep_trusted_failed(self, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        stats = self.report.of(RECONCILE)
        if error != stats.failing or time.monotonic() - stats.failing_logged_at >= 60:
            stats.failing_logged_at = time.monotonic()
            log.error("keeping the mirror trusted failed: %s; trying again", error)
        stats.failing = error

    async def _reseed(self) -> None:
        if await self.run_once(
            RECONCILE, self._settings.valkey_online_mirror_sweep_seconds, self.reconcile
        ):
            self.report.reseeds += 1
            log.info("mirror reseeded: trusted again")

    async def _due_reconcile(self) -> None:
        # Due until it ran here or another instance holds the lease (it was told of the move
        # too); an aborted run is tried again.
        skipped = self.report.of(RECONCILE).skipped
        ran = await self.run_once(
            RECONCILE, self._settings.valkey_online_mirror_sweep_seconds, self.reconcile
        )
        self._reconcile_due = not ran and self.report.of(RECONCILE).skipped == skipped

    async def _resync_requested(self) -> None:
        """Mitras another version wrote or heard a heartbeat of while it could not write the
        mirror (a rolling upgrade): Postgres has them, so the mirror takes them from there."""
        mirror = self._availability.mirror
        taken_at, ids = await mirror.resync_requests()
        if ids:
            await self._availability.resync(ids)
            unmirrored = self._availability.unmirrored
            await mirror.release_resync_requests(taken_at, [i for i in ids if i not in unmirrored])
