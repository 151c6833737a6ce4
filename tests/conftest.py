"""Shared fixtures: real Postgres and real Valkey, a real server over a real channel.

The shared servers (127.0.0.1:5432 and :6379, or TEST_DATABASE_URL / TEST_VALKEY_URL) are
used when they answer; otherwise throwaway ones are started. Each test run gets its own
database, and each test its own Valkey key prefix, so runs and tests never see each other.
Tests that stop a server use `own_valkey` / `own_postgres`, never the shared ones.

Modules marked `single_and_cluster` run each of their tests twice: against the single Valkey
and against a local Valkey Cluster (3 masters, 3 replicas) started once for the session.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
import redis.asyncio as redis

from availability.server import Server, running
from availability.settings import Settings
from availability.truth import Truth
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet

if TYPE_CHECKING:
    from availability.local_stores import LocalPostgres, LocalValkey, LocalValkeyCluster

_OWN_STORES = {"own_valkey", "own_postgres", "own_cluster"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`single_and_cluster` tests run on both kinds of Valkey, unless they bring their own."""
    if (
        metafunc.definition.get_closest_marker("single_and_cluster")
        and "valkey_mode" in metafunc.fixturenames
        and not _OWN_STORES & set(metafunc.fixturenames)
    ):
        metafunc.parametrize("valkey_mode", ["single", "cluster"], indirect=True)


@pytest.fixture
def valkey_mode(request: pytest.FixtureRequest) -> str:
    mode: str = getattr(request, "param", "single")
    return mode


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stores")


@pytest.fixture(scope="session")
def postgres_admin_dsn(store_dir: Path) -> Iterator[str]:
    if dsn := os.environ.get("TEST_DATABASE_URL"):
        yield dsn
        return
    if _answers("127.0.0.1", 5432):
        yield "postgresql://postgres@127.0.0.1:5432/test"
        return
    from availability import local_stores

    local = local_stores.start_postgres(store_dir / "postgres")
    try:
        yield local.dsn
    finally:
        local.stop()


@pytest.fixture(scope="session")
def database_url(postgres_admin_dsn: str) -> Iterator[str]:
    """A database of this run's own, migrated once."""
    name = f"availability_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"

    async def create() -> str:
        admin = await asyncpg.connect(postgres_admin_dsn)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        base, _, _ = postgres_admin_dsn.rpartition("/")
        return f"{base}/{name}"

    async def drop() -> None:
        admin = await asyncpg.connect(postgres_admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    url = asyncio.run(create())

    async def migrate() -> None:
        truth = await Truth.connect(Settings(database_url=url, valkey_url="redis://unused"))
        try:
            await truth.migrate()
        finally:
            await truth.close()

    asyncio.run(migrate())
    yield url
    asyncio.run(drop())


@pytest.fixture(scope="session")
def shared_valkey_url(store_dir: Path) -> Iterator[str]:
    if url := os.environ.get("TEST_VALKEY_URL"):
        yield url
        return
    if _answers("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
        return
    from availability import local_stores

    local = local_stores.start_valkey(store_dir / "valkey")
    try:
        yield local.url
    finally:
        local.stop()


@pytest.fixture(scope="session")
def shared_cluster(store_dir: Path) -> Iterator[LocalValkeyCluster]:
    from availability import local_stores

    cluster = local_stores.start_valkey_cluster(store_dir / "cluster")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def settings(
    request: pytest.FixtureRequest, database_url: str, shared_valkey_url: str, valkey_mode: str
) -> Settings:
    cluster = valkey_mode == "cluster"
    return Settings(
        database_url=database_url,
        valkey_url=request.getfixturevalue("shared_cluster").url if cluster else shared_valkey_url,
        valkey_cluster=cluster,
        grpc_address="127.0.0.1:0",
        valkey_key_prefix=f"test-{uuid.uuid4().hex[:12]}",
        migrate_on_start=False,
        valkey_timeout_seconds=1.0,
        metrics_address="127.0.0.1:0",
    )


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection for arranging and checking the truth; tables start empty."""
    conn = await asyncpg.connect(database_url)
    await conn.execute("TRUNCATE mitras, mitra_online_status, chat_sessions, auth_sessions CASCADE")
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def valkey(settings: Settings) -> AsyncIterator[redis.Redis]:
    """The test's own client of the deployment's Valkey (a cluster client in cluster mode)."""
    client: redis.Redis
    if settings.valkey_cluster:
        client = redis.RedisCluster.from_url(  # type: ignore[assignment]
            settings.valkey_url, decode_responses=True, socket_timeout=5
        )
    else:
        client = redis.Redis.from_url(settings.valkey_url, decode_responses=True, socket_timeout=5)
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match="{" + settings.valkey_key_prefix + "}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
def fleet(db: asyncpg.Connection) -> Fleet:
    return Fleet(db)


@pytest.fixture
async def server(settings: Settings, db: asyncpg.Connection) -> AsyncIterator[Server]:
    async with running(settings) as started:
        yield started


@pytest.fixture
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.AvailabilityServiceStub:
    return pb_grpc.AvailabilityServiceStub(channel)


@pytest.fixture
def own_valkey(tmp_path: Path) -> Iterator[LocalValkey]:
    """A Valkey of this test's own, to stop, kill or pause."""
    from availability import local_stores

    local = local_stores.start_valkey(tmp_path / "valkey")
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[LocalPostgres]:
    from availability import local_stores

    local = local_stores.start_postgres(tmp_path / "postgres")
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture
async def server_on_own_valkey(
    settings: Settings, own_valkey: LocalValkey, db: asyncpg.Connection
) -> AsyncIterator[Server]:
    async with running(replace(settings, valkey_url=own_valkey.url)) as started:
        yield started


@pytest.fixture
async def stub_own(server_on_own_valkey: Server) -> AsyncIterator[pb_grpc.AvailabilityServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server_on_own_valkey.port}") as ch:
        yield pb_grpc.AvailabilityServiceStub(ch)
