"""Valkey may fail at any moment, and every caller has Postgres to fall back on: so the client
never retries or backs off, and the breaker stops trying altogether for a while after a run of
failures, so that readers reach Postgres at once instead of each waiting out a timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as redis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..cluster import SlotPool, slot_of
from ..settings import Settings

# The package's logger: every mirror line keeps one logger name, whichever module logs it.
log = logging.getLogger(__package__)

_OUTAGES = (RedisConnectionError, RedisTimeoutError, OSError)
"""Failures that say Valkey is unreachable (a script's own error, like UNSEEDED, does not)."""


class MirrorMiss(Exception):
    """The mirror does not know this mitra (yet): ask the truth."""


class MirrorDown(Exception):
    """The breaker is open: Valkey failed repeatedly, so calls fail at once for a while."""


class MirrorUntrusted(Exception):
    """A seed cannot make the mirror trusted: another version's layout owns it, or the data
    set changed under the seed (a flush, a restart, an eviction) and it must run again."""


MIRROR_ERRORS: tuple[type[BaseException], ...] = (
    RedisError,
    OSError,
    MirrorMiss,
    MirrorDown,
    MirrorUntrusted,
)
"""What makes a reader fall back to Postgres."""


def untrusted(exc: BaseException) -> bool:
    """Valkey answered, but the mirror may not be read: a script's UNSEEDED (unseeded, being
    reseeded, distrusted, or marked by another layout) or a seed that could not finish."""
    return isinstance(exc, MirrorUntrusted) or (
        isinstance(exc, ResponseError) and str(exc).startswith("UNSEEDED")
    )


BREAKER_CEILING_SECONDS = 8.0


class Breaker:
    """After `failures` consecutive failed calls, Valkey is taken as down for `seconds`: calls
    fail at once (MirrorDown), so readers reach Postgres without first waiting out
    VALKEY_TIMEOUT_SECONDS each. Then one call probes; its success closes the breaker, its
    failure opens it again, for twice as long each time Valkey is still down (up to
    BREAKER_CEILING_SECONDS, or `seconds` if longer): a Valkey gone for good is probed a few
    times a minute, not every second."""

    def __init__(self, failures: int, seconds: float) -> None:
        self._threshold = failures
        self._seconds = seconds
        self._failures = 0
        self._open_until = 0.0
        self._probing = False
        self._probe_deadline = 0.0
        self._reopened = 0
        """Failed probes in a row: each doubles the time the breaker stays open."""
        self.opened = 0
        self.short_circuits = 0

    @property
    def is_open(self) -> bool:
        return self._failures >= self._threshold

    def check(self) -> None:
        if not self.is_open:
            return
        now = time.monotonic()
        # A probe that never reported back (a path that forgot to) must not hold it shut.
        if now < self._open_until or (self._probing and now < self._probe_deadline):
            self.short_circuits += 1
            raise MirrorDown("Valkey is failing; not trying again for now")
        self._probing = True
        self._probe_deadline = now + self._seconds

    def failed(self) -> None:
        self._failures += 1
        self._probing = False
        if self._failures >= self._threshold:
            if self._failures == self._threshold:
                self.opened += 1
                self._reopened = 0
                log.warning("Valkey breaker open: %d calls in a row failed", self._failures)
            else:
                self._reopened = min(self._reopened + 1, 16)
            ceiling = max(self._seconds, BREAKER_CEILING_SECONDS)
            self._open_until = time.monotonic() + min(self._seconds * 2**self._reopened, ceiling)

    def judge(self, exc: BaseException) -> None:
        """A call raised: an outage counts against Valkey; an error Valkey itself answered
        (a script's UNSEEDED) proves it is there; a cancelled call says nothing."""
        if isinstance(exc, _OUTAGES):
            self.failed()
        elif isinstance(exc, RedisError):
            self.succeeded()
        else:
            self._probing = False

    def succeeded(self) -> None:
        if self.is_open:
            log.info("Valkey breaker closed: the probe succeeded")
        self._failures = 0
        self._probing = False


def connect_valkey(
    settings: Settings,
    on_connect: Callable[[Connection], Awaitable[None]] | None = None,
    *,
    blocking_seconds: float = 0.0,
    on_moved: Callable[[], None] | None = None,
) -> redis.Redis:
    """A client that fails fast: no retries or backoff, since every caller has a fallback.

    on_connect runs on every new connection before its first command, so a restarted or
    replaced Valkey is checked the moment the client reaches it again. blocking_seconds
    extends the read timeout for a client whose commands block on purpose (XREAD BLOCK).
    With VALKEY_CLUSTER, the client talks to the master of the deployment's one slot
    (cluster.py), and on_moved runs when that master changed.
    """

    async def connected(connection: Connection) -> None:
        await connection.on_connect()
        if on_connect is not None:
            await on_connect(connection)

    url = settings.valkey_url.replace("valkey://", "redis://", 1).replace(
        "valkeys://", "rediss://", 1
    )
    options: dict[str, Any] = {
        "socket_timeout": settings.valkey_timeout_seconds + blocking_seconds,
        "socket_connect_timeout": settings.valkey_timeout_seconds,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
        "redis_connect_func": connected,
    }
    if settings.valkey_sentinels:
        from ..sentinel import sentinel_pool

        return redis.Redis.from_pool(sentinel_pool(settings, url, on_moved=on_moved, **options))
    if settings.valkey_cluster:
        pool = SlotPool.from_url(
            url, slot=slot_of(settings.valkey_key_prefix), on_moved=on_moved, **options
        )
        return redis.Redis.from_pool(pool)
    client: redis.Redis = redis.Redis.from_url(url, **options)
    return client
