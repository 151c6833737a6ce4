"""Waiting for Postgres at start-up, since an orchestrator starts the stores and the server in
any order, and giving up in one line, not a traceback, once that wait has run out.

`serve` and `availability migrate` share both: a migration job is started as early as the
server."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import asyncpg

from .errors import TruthUnavailable

# These lines have always come from the server's logger; log filters may select on it.
log = logging.getLogger("availability.server")

_RETRY_FIRST_SECONDS = 0.5
_RETRY_MAX_SECONDS = 5.0
_POSTGRES_NOT_YET: tuple[type[Exception], ...] = (
    TruthUnavailable,
    # A role or database that a job started with us creates is as late as Postgres itself.
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)
T = TypeVar("T")


class StartupFailed(Exception):
    """Postgres stayed unreachable past STARTUP_TIMEOUT_SECONDS; the message is the one line
    the process ends with."""


class StartupDeadline:
    """STARTUP_TIMEOUT_SECONDS from now. Until then a start-up step that fails for want of
    Postgres is tried again, backing off from 0.5 s doubling to 5 s, one log line a try."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._at = time.monotonic() + seconds

    async def retry(self, step: Callable[[], Awaitable[T]]) -> T:
        delay = _RETRY_FIRST_SECONDS
        attempt = 1
        while True:
            try:
                result = await step()
            except _POSTGRES_NOT_YET as exc:
                error = _named(exc.__cause__ or exc)
                left = self._at - time.monotonic()
                if left <= 0:
                    raise StartupFailed(
                        f"Postgres unreachable for {self.seconds:g} s at start-up "
                        f"(last error: {error}); giving up"
                    ) from None
                wait = min(delay, left)
                log.warning(
                    "Postgres unreachable at start-up, attempt %d (%s); retrying in %.1f s, "
                    "%.1f s left before STARTUP_TIMEOUT_SECONDS",
                    attempt,
                    error,
                    wait,
                    left,
                )
                await asyncio.sleep(wait)
                delay = min(delay * 2, _RETRY_MAX_SECONDS)
                attempt += 1
                continue
            if attempt > 1:
                log.info("Postgres answered at attempt %d", attempt)
            return result


def _named(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


def run(main: Coroutine[Any, Any, None]) -> int:
    """asyncio.run(main) as a command's exit code: 1 with one line, not a traceback, when
    start-up gave up (or 130 on Ctrl-C while it waited)."""
    try:
        asyncio.run(main)
    except StartupFailed as exc:
        print(f"availability: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
