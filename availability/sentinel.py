"""Valkey behind Sentinel (VALKEY_SENTINELS, VALKEY_SENTINEL_MASTER): every new connection asks
the sentinels which node is the master, connects there and checks with ROLE that the node
agrees, then runs the service's connect hook. VALKEY_URL still gives the scheme (rediss:// is
TLS, to the data nodes and to the sentinels alike), the data nodes' username and password and
the database; its host and port are not used. VALKEY_SENTINEL_PASSWORD is the sentinels' own.

Nothing retries: while the sentinels name no master, or name one that is down or not yet
promoted, connections fail like any Valkey outage and the service answers from Postgres. A
READONLY reply or a failed role check drops the idle connections, and the next one asks the
sentinels again.

When the master changes, writes the old one acknowledged may not have reached the replica
that replaced it (replication is asynchronous), so `on_moved` is told and the mirror is
reconciled from Postgres."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import ConnectionPool, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError

from .settings import Settings

log = logging.getLogger(__name__)

Node = tuple[str, int]


class _MasterOnly:
    """Tells the pool whether the node a connection reached is the master."""

    host: str
    port: int
    connection_pool: Any

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        # The connect hook's `connection.on_connect()` lands here: the role is checked, and a
        # move reported, before the service checks the data set.
        await super().on_connect_check_health(check_health)  # type: ignore[misc]
        await self.send_command("ROLE")  # type: ignore[attr-defined]
        role = (await self.read_response())[0]
        role = role.decode() if isinstance(role, bytes) else str(role)
        node = (self.host, self.port)
        if role != "master":
            await self.connection_pool.demoted()
            raise RedisConnectionError(
                f"Valkey at {self.host}:{self.port} is a {role}, not the master the sentinels named"
            )
        self.connection_pool.confirmed(node)

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except RedisConnectionError as exc:
            # SentinelManagedConnection turns READONLY into a ConnectionError of its own.
            if isinstance(exc.__context__, ReadOnlyError):
                await self.connection_pool.demoted()
            raise


class _MasterConnection(_MasterOnly, SentinelManagedConnection):
    pass


class _MasterSSLConnection(_MasterOnly, SentinelManagedSSLConnection):
    pass


class MasterPool(SentinelConnectionPool):
    """Connections to whichever node the sentinels name master of `service_name`."""

    def __init__(
        self,
        service_name: str,
        sentinels: Sentinel,
        *,
        on_moved: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(service_name, sentinels, **kwargs)  # type: ignore[no-untyped-call]
        self._on_moved = on_moved
        self._master: Node | None = None
        self.moves = 0

    def confirmed(self, node: Node) -> None:
        """A new connection found `node` to be master; a different one than before is a move."""
        previous, self._master = self._master, node
        if previous is None or previous == node:
            return
        self.moves += 1
        # The client that reports moves warns; the others (the watch hub's reader) only note it.
        log.log(
            logging.WARNING if self._on_moved is not None else logging.INFO,
            "Valkey Sentinel: %s master is now %s:%d (was %s:%d)",
            self.service_name,
            *node,
            *previous,
        )
        if self._on_moved is not None:
            self._on_moved()

    async def demoted(self) -> None:
        """A node the sentinels named is not master (any more): no idle connection may keep
        reading from it, and every new one asks the sentinels again."""
        await self.disconnect(inuse_connections=False)

    async def aclose(self) -> None:
        await super().aclose()
        await self.sentinel_manager.aclose()


def sentinel_pool(
    settings: Settings, url: str, *, on_moved: Callable[[], None] | None = None, **options: Any
) -> ConnectionPool:
    """A pool for `redis.Redis(connection_pool=...)`: `options` are the data nodes' client
    options, and their `redis_connect_func` runs on every new connection, after the role
    check."""
    target: dict[str, Any] = dict(parse_url(url))
    target.pop("host", None)
    target.pop("port", None)
    tls = target.pop("connection_class", None) is SSLConnection
    sentinel_options: dict[str, Any] = {
        "socket_timeout": options.get("socket_timeout"),
        "socket_connect_timeout": options.get("socket_connect_timeout"),
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
        "password": settings.valkey_sentinel_password or None,
    }
    if tls:
        sentinel_options.update(ssl=True, **{k: v for k, v in target.items() if k[:4] == "ssl_"})
    sentinels = Sentinel(
        [_node(address) for address in settings.valkey_sentinels],
        sentinel_kwargs=sentinel_options,
    )
    return MasterPool(
        settings.valkey_sentinel_master,
        sentinels,
        on_moved=on_moved,
        connection_class=_MasterSSLConnection if tls else _MasterConnection,
        **{**options, **target},
    )


def _node(address: str) -> Node:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)
