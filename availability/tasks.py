"""Ending background tasks for sure.

On Python 3.11, asyncio.wait_for returns the result instead of raising when a cancellation
lands just as the awaited call completes (CPython gh-86296, fixed in 3.12), and redis-py
sends every command through it. A loop that calls Valkey can therefore lose a cancel() and
carry on: awaited once, it never ends, and a shutdown waits for it forever. So each task is
cancelled again until it has ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

_AGAIN_SECONDS = 0.1


_REAPERS: set[asyncio.Task[None]] = set()
"""Reapers still cancelling tasks whose waiter gave up (held so they are not collected)."""


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel the tasks (again, while any carries on) and wait until all have ended. A task
    that failed instead is logged; the caller's own cancellation is never swallowed. If the
    caller stops waiting (a shutdown step's deadline), the cancelling goes on without it: a
    task told to stop is never left running (a sweep outliving its server kept writing)."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    try:
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=_AGAIN_SECONDS)
    except asyncio.CancelledError:
        if pending:
            reaper = asyncio.get_running_loop().create_task(_reap(pending), name="reaper")
            _REAPERS.add(reaper)
            reaper.add_done_callback(_REAPERS.discard)
        raise
    for task in tasks:
        if not task.cancelled() and (failure := task.exception()) is not None:
            log.error("task %s had failed: %r", task.get_name(), failure, exc_info=failure)


async def _reap(pending: set[asyncio.Task[Any]]) -> None:
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=_AGAIN_SECONDS)
