"""The pool every query borrows from, and the base class the Truth's parts share: each part
is a mixin over TruthBase, so it reaches Postgres only through `_connection` and answers a
lost database with TruthUnavailable the same way."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Self, TypeVar

import asyncpg

from ..errors import TruthUnavailable
from ..settings import Settings
from ..timing import StoreTimes

# The package's one logger, whichever part logs: log lines keep saying availability.truth.
log = logging.getLogger("availability.truth")

_Connectionish = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

# Errors that mean "the database is not there", as opposed to "the statement is wrong".
_UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up, recovering
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, out of memory
    asyncpg.exceptions.InternalClientError,  # a connection left in a broken state
)


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    """What the pool runs when a connection comes back, after rolling back a transaction left
    open. asyncpg's default sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL` each time: one more round trip to Postgres at the end of every call. The
    service's pooled statements leave no session state: no LISTEN (the change listener has a
    connection of its own), no SET, no cursor outside a transaction, and the one advisory
    lock (migrate's) is released before the connection is."""


class TruthBase:
    """The pool and the settings, and how a query gets a connection."""

    _pool: asyncpg.Pool
    _settings: Settings

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._waiting = 0
        self.seconds = StoreTimes(
            "availability_postgres_seconds",
            "Time of a Postgres operation as this process sees it (waiting for a pooled "
            "connection included), by operation: the store's method.",
        )

    def pool(self) -> dict[str, int]:
        """The pool's connections: open (size), in use, the most it opens (max), and the
        callers waiting for one (waiting: above 0, the pool is exhausted)."""
        size = self._pool.get_size()
        return {
            "size": size,
            "in_use": size - self._pool.get_idle_size(),
            "max": self._pool.get_max_size(),
            "waiting": self._waiting,
        }

    @classmethod
    async def connect(cls, settings: Settings) -> Self:
        try:
            pool = await asyncpg.create_pool(
                settings.database_url,
                min_size=1,
                max_size=settings.database_pool_size,
                command_timeout=settings.database_timeout_seconds,
                timeout=settings.database_timeout_seconds,
                reset=_nothing_to_reset,
            )
        except _UNREACHABLE as exc:
            raise TruthUnavailable(exc) from exc
        return cls(pool, settings)

    async def close(self) -> None:
        """Close gracefully, but never hang a shutdown on a connection stuck in a query."""
        try:
            await asyncio.wait_for(self._pool.close(), self._settings.database_timeout_seconds)
        except TimeoutError:
            log.warning("Postgres pool did not close in time; terminating its connections")
            self._pool.terminate()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Connectionish]:
        self._waiting += 1
        try:
            conn = await self._pool.acquire(timeout=self._settings.database_timeout_seconds)
        except _UNREACHABLE as exc:
            raise TruthUnavailable(exc) from exc
        finally:
            self._waiting -= 1
        try:
            yield conn
        except _UNREACHABLE as exc:
            raise TruthUnavailable(exc) from exc
        finally:
            try:
                await self._pool.release(conn)
            except _UNREACHABLE as exc:
                raise TruthUnavailable(exc) from exc


_T = TypeVar("_T", bound=type)
_NOT_OPERATIONS = frozenset({"close"})


def timed(cls: _T) -> _T:
    """Every public coroutine method of the store, timed as its name in `seconds`: one place
    that names each operation, so no query site has to. Async iterators and context
    managers (the reconcile's snapshot, the listener's connection) are not operations."""
    methods = {
        name: method
        for klass in reversed(cls.__mro__)
        for name, method in vars(klass).items()
        if not name.startswith("_") and name not in _NOT_OPERATIONS
    }
    for name, method in methods.items():
        if inspect.iscoroutinefunction(method):
            setattr(cls, name, _timing(name, method))
    return cls


def _timing(op: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def timing(self: TruthBase, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await method(self, *args, **kwargs)
        finally:
            self.seconds.observe(op, time.perf_counter() - started)

    return timing
