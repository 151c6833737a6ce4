"""Arranging the truth directly in SQL, as the other backends do; waiting and scraping."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from typing import TypeVar
from uuid import UUID

import asyncpg
import grpc
import pytest
import redis.asyncio as redis
from prometheus_client.parser import text_string_to_metric_families

from availability.mirror import Keys
from availability.server import Server
from availability.settings import Settings

T = TypeVar("T")


class Fleet:
    def __init__(self, db: asyncpg.Connection) -> None:
        self.db = db

    async def mitra(
        self,
        name: str = "Ayu Lestari",
        *,
        active: bool = True,
        capacity: int = 3,
        online: bool = False,
        heartbeat_age: float = 0.0,
    ) -> UUID:
        # One statement: the mitra's insert wakes the server's follower, and a resync that
        # read the mitra between two statements would mirror it offline for good.
        mitra_id: UUID = await self.db.fetchval(
            "WITH mitra AS ("
            "  INSERT INTO mitras (display_name, is_active, max_concurrent_sessions)"
            "  VALUES ($1, $2, $3) RETURNING id),"
            " online AS ("
            "  INSERT INTO mitra_online_status (mitra_id, is_online, last_heartbeat_at)"
            "  SELECT id, true, now() - make_interval(secs => $5) FROM mitra WHERE $4)"
            " SELECT id FROM mitra",
            name,
            active,
            capacity,
            online,
            heartbeat_age,
        )
        return mitra_id

    async def session(
        self,
        mitra_id: UUID | None,
        status: str = "active",
        *,
        sensitivity: str = "normal",
        created_at: datetime | None = None,
    ) -> UUID:
        session_id: UUID = await self.db.fetchval(
            "INSERT INTO chat_sessions"
            " (mitra_id, customer_id, status, topic_sensitivity, created_at)"
            " VALUES ($1, gen_random_uuid(), $2, $3, coalesce($4, now())) RETURNING id",
            mitra_id,
            status,
            sensitivity,
            created_at,
        )
        return session_id

    async def move_session(
        self, session_id: UUID, status: str, mitra_id: UUID | None = None
    ) -> None:
        await self.db.execute(
            "UPDATE chat_sessions SET status = $2, mitra_id = coalesce($3, mitra_id) WHERE id = $1",
            session_id,
            status,
            mitra_id,
        )

    async def auth_session(
        self, mitra_id: UUID, *, expires_in: timedelta = timedelta(hours=1), revoked: bool = False
    ) -> UUID:
        auth_id: UUID = await self.db.fetchval(
            "INSERT INTO auth_sessions (mitra_id, expires_at, revoked_at)"
            " VALUES ($1, now() + $2, CASE WHEN $3 THEN now() END) RETURNING id",
            mitra_id,
            expires_in,
            revoked,
        )
        return auth_id

    async def online_row(self, mitra_id: UUID) -> asyncpg.Record | None:
        return await self.db.fetchrow(
            "SELECT * FROM mitra_online_status WHERE mitra_id = $1", mitra_id
        )

    async def load(self, mitra_id: UUID) -> int:
        return int(
            await self.db.fetchval(
                "SELECT count(*) FROM chat_sessions WHERE mitra_id = $1"
                " AND status IN ('active', 'pending_payment')",
                mitra_id,
            )
        )


async def eventually(
    check: Callable[[], Awaitable[T]],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll check until it returns a truthy value; fail with its last value otherwise. A wait,
    not a measurement: the default leaves room for 4 test workers on 2 shared cores."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            assert value, f"{what} not met within {timeout}s (last value {value!r})"
            return value
        await asyncio.sleep(interval)


async def notified(valkey: redis.Redis, keys: Keys, *mitras: UUID) -> None:
    """Wait until the change listener has mirrored these newly inserted mitras, so its
    resync cannot land after (and undo) what a test then sets in Valkey by hand."""

    async def known() -> bool:
        return all([await valkey.hexists(keys.capacity, str(m)) for m in mitras])

    await eventually(known)


async def make_stale(
    valkey: redis.Redis, db: asyncpg.Connection, keys: Keys, *mitras: UUID
) -> None:
    """Age their heartbeats in both stores, as an app that went quiet leaves them; again if
    the listener's resync of a just-made write (which carries Postgres's newer heartbeat
    time) lands after and freshens them."""
    await db.execute(
        "UPDATE mitra_online_status SET last_heartbeat_at = now() - interval '1 hour'"
        " WHERE mitra_id = ANY($1::uuid[])",
        list(mitras),
    )
    await notified(valkey, keys, *mitras)

    async def stays_stale() -> bool:
        await valkey.zadd(keys.heartbeats, {str(m): 1_000 for m in mitras})
        await asyncio.sleep(0.1)
        return all([await valkey.zscore(keys.heartbeats, str(m)) == 1_000 for m in mitras])

    await eventually(stays_stale)


async def settled(server: Server, db: asyncpg.Connection) -> None:
    """Wait until the change feed has nothing left for this server: every change noted is
    taken and resynced, so no late resync undoes what a test then sets by hand."""

    async def quiet() -> bool:
        listener = server.listener
        noted = await db.fetchval("SELECT count(*) FROM availability_changes")
        return noted == 0 and listener is not None and listener.idle

    await eventually(quiet, what="the change feed settled")


async def code_of(call: object) -> grpc.StatusCode:
    """The status a call ends with (OK when it answers)."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape_metrics(port: int) -> Samples:
    """Every sample a metrics endpoint serves, by name and labels."""

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text: str = response.read().decode()
            return text

    samples = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def store_env(settings: Settings, address: str, **extra: str) -> dict[str, str]:
    """The environment of an `availability` process on these stores, serving (or asking)
    address; extra settings by name."""
    return {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "VALKEY_URL": settings.valkey_url,
        "VALKEY_KEY_PREFIX": settings.valkey_key_prefix,
        "GRPC_ADDRESS": address,
        # As the in-process servers have it (conftest): on a machine running the suite in
        # parallel, Valkey's answers can outlast the default 0.25 s without anything wrong.
        "VALKEY_TIMEOUT_SECONDS": str(settings.valkey_timeout_seconds),
        "DATABASE_POOL_SIZE": str(settings.database_pool_size),
        "VALKEY_SLOW_SECONDS": str(settings.valkey_slow_seconds),
        "POSTGRES_SLOW_SECONDS": str(settings.postgres_slow_seconds),
        **extra,
    }


def server_env(server: Server, **extra: str) -> dict[str, str]:
    """The environment of a command run next to this server (`availability status`, ...)."""
    return store_env(server.settings, f"127.0.0.1:{server.port}", **extra)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as Kubernetes and systemd stop the server; SIGKILL after 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def required_tool(name: str) -> str:
    """The tool's path; a skip when it is missing, a failure under CI=true (.ci/run installs
    every tool a test needs; CONTRIBUTING.md: CI lists them)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (.ci/run installs it; see CONTRIBUTING.md: CI)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@contextlib.contextmanager
def runtime_role(database_url: str, role: str, *then: str) -> Iterator[str]:
    """A login role holding what `availability grants` gives (then the owner's `then`
    statements, e.g. a REVOKE); its DSN on the same database. Dropped afterwards."""
    from availability.truth.grants import grants_sql

    async def owner(*statements: str) -> None:
        conn = await asyncpg.connect(database_url)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(owner(f'CREATE ROLE "{role}" LOGIN', grants_sql(role), *then))
    scheme, _, rest = database_url.partition("://")
    try:
        yield f"{scheme}://{role}@{rest.rpartition('@')[2]}"
    finally:
        asyncio.run(owner(f'DROP OWNED BY "{role}"', f'DROP ROLE "{role}"'))
