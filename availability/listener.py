"""Load follows truth on its own: triggers on chat_sessions and mitras note the ids whose
availability may have changed in `availability_changes` (one row per mitra), and this task
takes them every CHANGE_POLL_SECONDS and resyncs them, so a backend that forgets
RecomputeLoad still converges within milliseconds.

Not LISTEN/NOTIFY: a transaction that notifies takes one database-wide lock at commit, and
the chat backend's writes queued behind it (issue 16). The change table costs the writer one
small upsert, only for the transitions that move a load.

The instance that takes a change resyncs its own mirror and says so on CHANGES_TAKEN, with
the ids and which mirror it resynced; every instance on another mirror (a move to a new
Valkey, a blue/green deploy on two) resyncs them in its own. Heartbeats reach Postgres only
with the flush: after each, the flushing instance says from which time on
(HEARTBEATS_FLUSHED), and instances on other mirrors resync the mitras heartbeating since,
so an app whose heartbeats land on one mirror stays fresh in the other. Notifications come
from the service's own connections, one a poll or a flush. One missed while the connection
was down is covered by the reconcile after every reconnect.

Every ten minutes it also moves the dashboard's day counters on (truth.close_session_days), so
the sessions the dashboard counts from the index stay about two days' worth.

Without those triggers (CHAT_SESSION_TRIGGERS=false) the chat backend's writes cost nothing of
ours; with LOAD_POLL_SECONDS set, one instance (an advisory lock) reads every loaded mitra's
load from the load index that often instead, and resyncs the mitras whose load moved. A
constant cost to the database in place of one per write, paid once for all instances."""

from __future__ import annotations

import asyncio
import logging
import time
from uuid import UUID

import asyncpg

from .domain import Availability
from .errors import TruthUnavailable
from .mirror import MIRROR_ERRORS
from .mirror.sessions import ALL_SESSIONS
from .model import MitraState
from .truth import CHANGES_TAKEN, HEARTBEATS_FLUSHED

log = logging.getLogger(__name__)

_TAKE_BATCH = 1000
_CLOSE_DAYS_SECONDS = 600.0
_RETRY_SECONDS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Backoff after a failure: an error that repeats (a grant revoked, say) waits ever longer, up
to 30 s, so it cannot turn into a reconnect and a full rebuild of the mirror every 0.1 s."""


class ChangeListener:
    def __init__(self, availability: Availability) -> None:
        self._availability = availability
        self._interval = availability.settings.change_poll_seconds
        self._pending: set[UUID] = set()
        self._void: set[str] = set()
        """Mitras whose auth sessions changed (or ALL_SESSIONS): the mirror's cached sessions
        of theirs are voided before they are resynced, and kept here until that went through."""
        self.resyncs = 0
        self.heard = 0
        self._resyncing = False
        self._flushed_since: int | None = None
        self.last_error: str | None = None
        """The failure the listener is retrying after; None once a round went through."""
        self.reconnects = 0
        self.load_polls = 0
        self.leading_load_poll = False
        settings = availability.settings
        self._load_poll = 0.0 if settings.chat_session_triggers else settings.load_poll_seconds
        self._loads: dict[UUID, int] = {}
        self.connected = asyncio.Event()
        self.reconcile_on_connect = False
        """Set after the first connection (the server seeds right after it), and by the
        server if it had to seed before this connected."""

    def _heard(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        """Another instance took these changes; resync them here unless it did so in this
        very mirror."""
        mirror, _, ids = str(payload).partition("\n")
        if mirror and mirror == self._availability.mirror.identity:
            return
        for i in ids.split(","):
            if i.startswith("!"):
                i = i[1:]
                self._void.add(i)
            if i:
                self._pending.add(UUID(i))
        self.heard += 1

    def _heard_flush(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        """Another mirror's heartbeats reached Postgres from this time on."""
        mirror, _, since = str(payload).partition("\n")
        if mirror and mirror == self._availability.mirror.identity:
            return
        held = self._flushed_since
        self._flushed_since = int(since) if held is None else min(held, int(since))

    async def run(self) -> None:
        """Take changes forever, on a connection of its own. After losing it, reconcile: the
        noted changes survive a restart, but a failover may have lost commits the mirror
        already holds, and only a full pass brings the mirror back to the new primary."""
        failures, logged_at = 0, 0.0
        truth = self._availability.truth
        while True:
            try:
                async with truth.dedicated() as conn:
                    await conn.add_listener(CHANGES_TAKEN, self._heard)
                    await conn.add_listener(HEARTBEATS_FLUSHED, self._heard_flush)
                    self.leading_load_poll = False
                    # The loads' baseline before the reconcile (or the server's seed), so a
                    # change between the two is in one of them.
                    await self._lead_load_poll(conn)
                    if self.reconcile_on_connect:
                        self.reconnects += 1
                        # Sessions revoked meanwhile may be noted nowhere now (the change
                        # table is unlogged: a failover empties it): vouch for none.
                        self._void.add(ALL_SESSIONS)
                        await self._reconcile("change listener reconnected")
                    self.reconcile_on_connect = True
                    self.connected.set()
                    days_closed_at = -_CLOSE_DAYS_SECONDS
                    loads_polled_at = time.monotonic()
                    while True:
                        if (
                            self._load_poll
                            and time.monotonic() - loads_polled_at >= self._load_poll
                        ):
                            loads_polled_at = time.monotonic()
                            await self._poll_loads(conn)
                        if (
                            self._availability.settings.chat_session_triggers
                            and time.monotonic() - days_closed_at > _CLOSE_DAYS_SECONDS
                        ):
                            await truth.close_session_days(conn)
                            days_closed_at = time.monotonic()
                        if (since := self._flushed_since) is not None:
                            self._flushed_since = None
                            self._pending.update(await truth.heartbeats_since(conn, since))
                        taken, sessions = await truth.take_noted(_TAKE_BATCH, conn)
                        if taken:
                            self._pending.update(taken)
                            self._void.update(str(i) for i in sessions)
                            await truth.announce_changes(
                                conn, self._availability.mirror.identity, taken, sessions
                            )
                        more = await self._resync_pending()
                        # A whole round went through: only now is the failure behind us (an
                        # error right after connecting must not reset the backoff).
                        failures, self.last_error = 0, None
                        if not more:
                            await asyncio.sleep(self._interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of the connection: log, back off, reconnect
                self.connected.clear()
                delay = _RETRY_SECONDS[min(failures, len(_RETRY_SECONDS) - 1)]
                failures += 1
                error = f"{type(exc).__name__}: {exc}"
                # Each distinct error once, then once a minute while it repeats: it must not
                # flood the log any more than the database.
                if error != self.last_error or time.monotonic() - logged_at >= 60:
                    logged_at = time.monotonic()
                    log.warning(
                        "change listener lost Postgres (%s); retry %d in %.1fs",
                        error,
                        failures,
                        delay,
                    )
                self.last_error = error
                await asyncio.sleep(delay)

    async def _reconcile(self, why: str) -> None:
        try:
            await self._availability.reconcile()
            log.info("%s; mirror reconciled", why)
        except MIRROR_ERRORS as exc:
            log.warning("%s; reconcile failed (%r)", why, exc)

    async def _lead_load_poll(
        self, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
    ) -> bool:
        """Take the load poll if no other instance holds it; on taking it, the baseline."""
        if self._load_poll and not self.leading_load_poll:
            truth = self._availability.truth
            if await truth.lead_load_poll(conn):
                self._loads = await truth.loads(conn)
                self.leading_load_poll = True
                return True
        return False

    async def _poll_loads(
        self, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
    ) -> None:
        """Resync the mitras whose load moved since the last poll (LOAD_POLL_SECONDS)."""
        if not self.leading_load_poll:
            if await self._lead_load_poll(conn):
                # Taken over from an instance that stopped: what changed between its last
                # poll and this baseline is in no diff, so the mirror is rebuilt once.
                await self._reconcile("load poll taken over")
            return
        loads = await self._availability.truth.loads(conn)
        before, self._loads = self._loads, loads
        moved = [m for m in loads.keys() | before.keys() if loads.get(m) != before.get(m)]
        self.load_polls += 1
        for at in range(0, len(moved), _TAKE_BATCH):
            try:
                states = await self._resync(moved[at : at + _TAKE_BATCH])
            except TruthUnavailable:
                self._pending.update(moved[at + _TAKE_BATCH :])
                raise
            # The next diff starts from what the resync read and mirrored, not from what this
            # poll saw: a load that moved between the two and moved back before the next poll
            # would otherwise stay in the mirror, diffed by nobody.
            for state in states:
                if state.load:
                    self._loads[state.mitra_id] = state.load
                else:
                    self._loads.pop(state.mitra_id, None)

    @property
    def idle(self) -> bool:
        """Nothing taken is waiting to be resynced, nor being resynced."""
        return not self._pending and not self._resyncing and not self._void

    async def _resync_pending(self) -> bool:
        """Resync what was taken; True when a full batch came (more may be waiting). Auth
        sessions changed are voided in the mirror first, and retried until they are."""
        if self._void:
            void = list(self._void)
            try:
                await self._availability.mirror.forget_sessions(void)
                self._void.difference_update(void)
            except MIRROR_ERRORS as exc:
                log.debug("auth sessions of %d mitras not voided yet (%r)", len(void), exc)
        if not self._pending:
            return False
        ids = [self._pending.pop() for _ in range(min(_TAKE_BATCH, len(self._pending)))]
        await self._resync(ids)
        return bool(self._pending) or len(ids) >= _TAKE_BATCH

    async def _resync(self, ids: list[UUID]) -> list[MitraState]:
        """Resync these mitras (not idle meanwhile); what the resync read. If Postgres is
        lost they are kept pending, for after the reconnect's reconcile (taken from the table
        or diffed already, they are noted nowhere else)."""
        self._resyncing = True
        try:
            states = await self._availability.resync(ids)
        except TruthUnavailable:
            self._pending.update(ids)
            raise
        finally:
            self._resyncing = False
        self.resyncs += 1
        return states
