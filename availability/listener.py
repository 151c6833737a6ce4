"""Load follows truth on its own: triggers on chat_sessions and mitras NOTIFY the ids
whose availability may have changed, and this task resyncs them, so a backend that
forgets RecomputeLoad still converges within a second."""

from __future__ import annotations

import asyncio
import logging
from uuid import UUID

from .domain import Availability
from .errors import TruthUnavailable
from .mirror import MIRROR_ERRORS
from .truth import CHANGE_CHANNEL

log = logging.getLogger(__name__)

_BATCH_WINDOW_SECONDS = 0.02
_KEEPALIVE_SECONDS = 5.0
_RETRY_SECONDS = (0.1, 0.5, 1.0, 2.0, 5.0)


class ChangeListener:
    def __init__(self, availability: Availability) -> None:
        self._availability = availability
        self._pending: set[UUID] = set()
        self._wake = asyncio.Event()
        self.resyncs = 0
        self.reconnects = 0
        self.connected = asyncio.Event()
        self.reconcile_on_connect = False
        """Set after the first connection (the server seeds right after it), and by the
        server if it had to seed before this connected."""

    def _notified(self, payload: str) -> None:
        try:
            self._pending.add(UUID(payload))
        except ValueError:
            log.warning("ignoring %s payload %r", CHANGE_CHANNEL, payload)
            return
        self._wake.set()

    async def run(self) -> None:
        """Listen forever; after a reconnect, reseed, since notifications sent while we were
        away are lost."""
        failures = 0
        while True:
            try:
                async with self._availability.truth.listen(CHANGE_CHANNEL, self._notified) as conn:
                    conn.add_termination_listener(lambda _conn: self._wake.set())
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
                    while not conn.is_closed():
                        await self._resync_pending()
                        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                        # cancellation that races the wake-up, and shutdown would hang.
                        try:
                            async with asyncio.timeout(_KEEPALIVE_SECONDS):
                                await self._wake.wait()
                        except TimeoutError:
                            await conn.execute("SELECT 1", timeout=_KEEPALIVE_SECONDS)
                    raise ConnectionError("the LISTEN connection closed")
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

    async def _resync_pending(self) -> None:
        if not self._pending:
            self._wake.clear()
            return
        await asyncio.sleep(_BATCH_WINDOW_SECONDS)
        ids, self._pending = list(self._pending), set()
        self._wake.clear()
        try:
            await self._availability.resync(ids)
        except TruthUnavailable:
            self._pending.update(ids)
            raise
        self.resyncs += 1
