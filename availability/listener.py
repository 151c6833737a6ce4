"""Load follows truth on its own: triggers on chat_sessions and mitras note the ids whose
availability may have changed in `availability_changes` (one row per mitra), and this task
takes them every CHANGE_POLL_SECONDS and resyncs them, so a backend that forgets
RecomputeLoad still converges within milliseconds.

Not LISTEN/NOTIFY: a transaction that notifies takes one database-wide lock at commit, and
the chat backend's writes queued behind it (issue 16). The change table costs the writer one
small upsert, only for the transitions that move a load.

Every ten minutes it also moves the dashboard's day counters on (truth.close_session_days), so
the sessions the dashboard counts from the index stay about two days' worth."""

from __future__ import annotations

import asyncio
import logging
import time
from uuid import UUID

from .domain import Availability
from .errors import TruthUnavailable
from .mirror import MIRROR_ERRORS

log = logging.getLogger(__name__)

_TAKE_BATCH = 1000
_CLOSE_DAYS_SECONDS = 600.0
_RETRY_SECONDS = (0.1, 0.5, 1.0, 2.0, 5.0)


class ChangeListener:
    def __init__(self, availability: Availability) -> None:
        self._availability = availability
        self._interval = availability.settings.change_poll_seconds
        self._pending: set[UUID] = set()
        self.resyncs = 0
        self.reconnects = 0
        self.connected = asyncio.Event()
        self.reconcile_on_connect = False
        """Set after the first connection (the server seeds right after it), and by the
        server if it had to seed before this connected."""

    def _notified(self, payload: str) -> None:
        self._pending.add(UUID(payload))

    async def run(self) -> None:
        """Take changes forever, on a connection of its own. After losing it, reconcile: the
        noted changes survive a restart, but a failover may have lost commits the mirror
        already holds, and only a full pass brings the mirror back to the new primary."""
        failures = 0
        truth = self._availability.truth
        while True:
            try:
                async with truth.dedicated() as conn:
                    if self.reconcile_on_connect:
                        self.reconnects += 1
                        try:
                            await self._availability.reconcile()
                            log.info("change listener reconnected; mirror reconciled")
                        except MIRROR_ERRORS as exc:
                            log.warning("change listener reconnected; reconcile failed (%r)", exc)
                    self.reconcile_on_connect = True
                    failures = 0
                    self.connected.set()
                    days_closed_at = -_CLOSE_DAYS_SECONDS
                    while True:
                        if (
                            self._availability.settings.chat_session_triggers
                            and time.monotonic() - days_closed_at > _CLOSE_DAYS_SECONDS
                        ):
                            await truth.close_session_days(conn)
                            days_closed_at = time.monotonic()
                        for mitra in await truth.take_changes(_TAKE_BATCH, conn):
                            self._notified(str(mitra))
                        if not await self._resync_pending():
                            await asyncio.sleep(self._interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of the connection: log, back off, reconnect
                self.connected.clear()
                delay = _RETRY_SECONDS[min(failures, len(_RETRY_SECONDS) - 1)]
                failures += 1
                log.warning(
                    "change listener lost Postgres (%s: %s); retry %d in %.1fs",
                    type(exc).__name__,
                    exc,
                    failures,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _resync_pending(self) -> bool:
        """Resync what was taken; True when a full batch came (more may be waiting)."""
        if not self._pending:
            return False
        ids, self._pending = list(self._pending), set()
        try:
            await self._availability.resync(ids)
        except TruthUnavailable:
            # Taken from the table already: keep them for after the reconnect's reconcile.
            self._pending.update(ids)
            raise
        self.resyncs += 1
        return len(ids) >= _TAKE_BATCH
