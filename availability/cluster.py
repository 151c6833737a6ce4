"""Valkey Cluster (VALKEY_CLUSTER=true): every key of a deployment carries one hash tag, so the
whole mirror lives in one slot, served by one master at a time. The client therefore needs no
cluster-wide routing, only to know which node serves that slot: this pool asks the cluster
(CLUSTER SLOTS) and sends every connection there. A MOVED reply (the slot changed hands), a
READONLY one (that node became a replica) or a lost connection (the master died) sends the
next connection to ask again; until a replica is promoted the calls fail like any Valkey
outage and the service answers from Postgres. Everything else (scripts, pipelines, the hand-
packed heartbeat, XREAD) works unchanged, because the client is an ordinary one.

When the slot's master changes, writes the old master acknowledged may not have reached the
replica that replaced it (replication is asynchronous), so `on_moved` is told and the mirror
is reconciled from Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    ConnectionPool,
    SSLConnection,
)
from redis.crc import key_slot
from redis.exceptions import (
    ClusterDownError,
    MovedError,
    ReadOnlyError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

Node = tuple[str, int]
_MISROUTED = (
    MovedError,
    ReadOnlyError,
    ClusterDownError,
    TryAgainError,
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
)
"""Replies and failures after which the slot's master must be looked up again. ASK (the slot
is being migrated key by key) is a MovedError too: a multi-key script cannot follow it, so
the call fails over to Postgres and the lookup after the migration finds the new owner."""


class _Routing:
    """Tells the pool when a connection found the slot gone from its node."""

    host: str
    port: int
    misrouted: Callable[[Node], None]

    async def connect(self) -> None:
        try:
            await super().connect()  # type: ignore[misc]
        except _MISROUTED:
            self.misrouted((self.host, self.port))
            raise

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except _MISROUTED:
            self.misrouted((self.host, self.port))
            raise


class _RoutedConnection(_Routing, Connection):
    pass


class _RoutedSSLConnection(_Routing, SSLConnection):
    pass


_ROUTED: dict[type[Connection], type[Connection]] = {
    Connection: _RoutedConnection,
    SSLConnection: _RoutedSSLConnection,
}


class SlotPool(ConnectionPool):
    """Connections to whichever node serves `slot` as master."""

    def __init__(
        self, *, slot: int, on_moved: Callable[[], None] | None = None, **kwargs: Any
    ) -> None:
        plain = kwargs.pop("connection_class", Connection)
        if plain not in _ROUTED:
            raise ValueError("VALKEY_CLUSTER needs a redis:// or rediss:// VALKEY_URL")
        super().__init__(connection_class=_ROUTED[plain], **kwargs)
        self.slot = slot
        self._on_moved = on_moved
        self._known: list[Node] = [(kwargs.get("host", "localhost"), int(kwargs.get("port", 6379)))]
        self._route: Node | None = None
        self._stale: Node | None = None
        self._lookup = asyncio.Lock()
        self.moves = 0

    def make_connection(self) -> AbstractConnection:
        kwargs = dict(self.connection_kwargs)
        if self._route is not None:
            kwargs["host"], kwargs["port"] = self._route
        connection = self.connection_class(**kwargs)
        connection.misrouted = self.misrouted  # type: ignore[attr-defined]
        return connection

    async def ensure_connection(self, connection: Any) -> None:
        route = await self.route()
        if (connection.host, connection.port) != route:
            await connection.disconnect()
            connection.host, connection.port = route
        await super().ensure_connection(connection)

    def misrouted(self, node: Node) -> None:
        """A connection to `node` was refused the slot or lost: look it up again."""
        if self._route == node:
            self._stale, self._route = node, None

    async def route(self) -> Node:
        if self._route is not None:
            return self._route
        async with self._lookup:
            if self._route is None:
                self._route = await self._find_master()
                if self._stale is not None and self._route != self._stale:
                    self.moves += 1
                    log.warning(
                        "Valkey Cluster: slot %d now served by %s:%d (was %s:%d)",
                        self.slot,
                        *self._route,
                        *self._stale,
                    )
                    if self._on_moved is not None:
                        self._on_moved()
        return self._route

    async def _find_master(self) -> Node:
        """Ask the known nodes, the one that just failed last, until one answers."""
        timeout = self.connection_kwargs.get("socket_connect_timeout")
        failures: list[str] = []
        for host, port in sorted(self._known, key=lambda node: node == self._stale):
            probe = redis.Redis(
                host=host, port=port, socket_timeout=timeout, socket_connect_timeout=timeout
            )
            try:
                slots = await probe.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            except (RedisError, OSError) as exc:
                failures.append(f"{host}:{port}: {exc}")
                continue
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await probe.aclose()
            master = self._learn(slots, host)
            if master is not None:
                return master
            failures.append(f"{host}:{port}: no master serves slot {self.slot}")
        raise RedisConnectionError("Valkey Cluster: " + "; ".join(failures))

    def _learn(self, slots: list[Any], asked: str) -> Node | None:
        """Remember every node the reply names; return the slot's master."""
        master = None
        for start, end, *nodes in slots:
            for index, (host, port, *_rest) in enumerate(nodes):
                node = ((host.decode() if isinstance(host, bytes) else host) or asked, int(port))
                if node not in self._known:
                    self._known.append(node)
                if index == 0 and int(start) <= self.slot <= int(end):
                    master = node
        return master


def slot_of(prefix: str) -> int:
    """The one slot a deployment's keys hash to (their tag is `{prefix}`)."""
    return key_slot(("{" + prefix + "}").encode())
