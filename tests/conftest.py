"""Shared fixtures: real Postgres and real Valkey, a real server over a real channel.

The shared servers (127.0.0.1:5432 and :6379, or TEST_DATABASE_URL / TEST_VALKEY_URL) are
used when they answer; otherwise throwaway ones are started. Each test run gets its own
database, and each test its own Valkey key prefix, so runs and tests never see each other.
Tests that stop a server use `own_valkey` / `own_postgres`, never the shared ones.

Modules marked `single_and_cluster` run each of their tests twice: against the single Valkey
and against a local Valkey Cluster (3 masters, 3 replicas) started once for the session.

Tests clean up after themselves. Every key prefix a test uses on a shared Valkey comes from
the `settings` fixture (derive others by appending to it), which deletes its keys after the
test, on the single node and on the cluster. When the run ends, a key left under any prefix
this run made fails it (the shared Valkey's and the cluster's teardown check): only this run's
prefixes, so runs sharing the Valkey at once (another engineer's `make test`) never trip each
other. Temporary folders, throwaway stores' data and logs included, are kept only for tests
that failed (`tmp_path_retention_policy` in pyproject.toml).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import grpc
import pytest
import redis.asyncio as redis
from redis import Redis as SyncValkey
from redis.cluster import RedisCluster as SyncValkeyCluster

from availability.server import Server, running
from availability.settings import Settings
from availability.truth import Truth
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet, runtime_role

if TYPE_CHECKING:
    from availability.local_stores import LocalPostgres, LocalValkey, LocalValkeyCluster

# Children that a test stops with SIGINT, as Ctrl-C would, must not inherit SIGINT ignored,
# which a shell that runs the suite in the background (`bash .ci/run &`) leaves. An ignored
# signal stays ignored across exec and a handled one does not, so the run handles it. Resetting
# it in each child instead (preexec_fn) forks this process, whose gRPC threads' fork handlers
# can then fail in the child before it ever runs.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Every `availability` process a test starts (status, dev, serve) inherits these: on 4
# workers sharing 2 cores a p99 of 200 ms is the machine, not a slow store. The tests of a
# slow store set the production thresholds themselves (test_store_latency.py, the soak).
os.environ.setdefault("VALKEY_SLOW_SECONDS", "2")
os.environ.setdefault("POSTGRES_SLOW_SECONDS", "5")

_OWN_STORES = {"own_valkey", "own_postgres", "own_cluster"}


_SERVERS = {
    "postgres_admin_dsn",
    "database_url",
    "shared_valkey_url",
    "shared_cluster",
    *_OWN_STORES,
}
"""Fixtures that start or reach a store: `make check` (--no-servers) leaves their tests out."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-servers",
        action="store_true",
        help="only the tests that need no Postgres, Valkey or server (make check)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--no-servers"):
        # The files with a slow test first, the longest first (the marker's `seconds`, summed
        # over the file): run in parallel (a file to a worker, in this order, which
        # --no-loadscope-reorder keeps), the longest start at once instead of being the tail.
        weight: dict[Path, float] = {}
        for item in items:
            if marker := item.get_closest_marker("slow"):
                weight[item.path] = weight.get(item.path, 0.0) + marker.kwargs.get("seconds", 1)
        items.sort(key=lambda item: -weight.get(item.path, 0.0))
        return
    kept, left = [], []
    for item in items:
        needs = _SERVERS & set(getattr(item, "fixturenames", ()))
        marked = item.get_closest_marker("slow") or item.get_closest_marker("servers")
        (left if needs or marked else kept).append(item)
    config.hook.pytest_deselected(items=left)
    items[:] = kept


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
def runtime_database_url(database_url: str) -> Iterator[str]:
    """The run's database as a runtime role holding only what `availability grants` gives
    (the owner migrated it). With TEST_SERVE_AS=runtime every `settings` fixture serves as it."""
    role = f"availability_rt_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with runtime_role(database_url, role) as url:
        yield url


_PREFIXES = pytest.StashKey[set[str]]()
_OWNERS = pytest.StashKey[dict[str, str]]()
"""Which test made each prefix, to name it when its keys are left behind."""
"""The Valkey key prefixes this run's tests used."""


def _sync_valkey(url: str, cluster: bool) -> SyncValkey | SyncValkeyCluster:
    if cluster:
        return SyncValkeyCluster.from_url(url, socket_timeout=5)
    return SyncValkey.from_url(url, socket_timeout=5)


def _keys_of(url: str, cluster: bool, prefixes: Iterable[str]) -> list[str]:
    """Keys of these prefixes, and of any prefix made by appending to one (`{<prefix>...}`)."""
    client = _sync_valkey(url, cluster)
    try:
        return sorted(
            {
                key.decode()
                for prefix in prefixes
                for key in client.scan_iter(match="{" + prefix + "*", count=1000)
            }
        )
    finally:
        client.close()


def _delete_keys(url: str, cluster: bool, prefixes: Iterable[str]) -> list[str]:
    """Delete the keys of these prefixes; returns them."""
    if keys := _keys_of(url, cluster, prefixes):
        client = _sync_valkey(url, cluster)
        try:
            client.delete(*keys)
        finally:
            client.close()
    return keys


def _check_no_keys_left(config: pytest.Config, url: str, cluster: bool) -> None:
    """At the end of the run: fail it if a prefix this run made still has keys here (and
    delete them, so the shared Valkey does not keep them)."""
    left = _delete_keys(url, cluster, config.stash.get(_PREFIXES, set()))
    where = "the Valkey Cluster" if cluster else url
    owners = config.stash.get(_OWNERS, {})
    made_by = sorted(
        {
            next((test for prefix, test in owners.items() if key.startswith("{" + prefix)), "?")
            for key in left
        }
    )
    assert not left, (
        f"{len(left)} keys of this run's test prefixes left in {where} (a test bypassed the "
        f"`settings` fixture's cleanup, or a server outlived its test): {left[:20]}, made by "
        f"{made_by}"
    )


@pytest.fixture(scope="session")
def shared_valkey_url(pytestconfig: pytest.Config, store_dir: Path) -> Iterator[str]:
    if url := os.environ.get("TEST_VALKEY_URL"):
        yield url
        _check_no_keys_left(pytestconfig, url, cluster=False)
        return
    if _answers("127.0.0.1", 6379):
        url = "redis://127.0.0.1:6379/0"
        yield url
        _check_no_keys_left(pytestconfig, url, cluster=False)
        return
    from availability import local_stores

    local = local_stores.start_valkey(store_dir / "valkey")
    try:
        yield local.url
        _check_no_keys_left(pytestconfig, local.url, cluster=False)
    finally:
        local.stop()


@pytest.fixture(scope="session")
def shared_cluster(pytestconfig: pytest.Config, store_dir: Path) -> Iterator[LocalValkeyCluster]:
    from availability import local_stores

    cluster = local_stores.start_valkey_cluster(store_dir / "cluster")
    try:
        yield cluster
        _check_no_keys_left(pytestconfig, cluster.url, cluster=True)
    finally:
        cluster.stop()


@pytest.fixture
def settings(
    request: pytest.FixtureRequest, database_url: str, shared_valkey_url: str, valkey_mode: str
) -> Iterator[Settings]:
    """The test's deployment settings, under a key prefix of its own whose keys are deleted
    after the test (servers the test started are stopped by then: they depend on this)."""
    cluster = valkey_mode == "cluster"
    url = request.getfixturevalue("shared_cluster").url if cluster else shared_valkey_url
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    if os.environ.get("TEST_SERVE_AS") == "runtime":
        database_url = request.getfixturevalue("runtime_database_url")
    request.config.stash.setdefault(_PREFIXES, set()).add(prefix)
    request.config.stash.setdefault(_OWNERS, {})[prefix] = request.node.nodeid
    yield Settings(
        database_url=database_url,
        valkey_url=url,
        valkey_cluster=cluster,
        grpc_address="127.0.0.1:0",
        valkey_key_prefix=prefix,
        migrate_on_start=False,
        valkey_timeout_seconds=1.0,
        metrics_address="127.0.0.1:0",
        # Four workers, each with servers of its own, share one Postgres (100 connections
        # by default): a test server needs few.
        database_pool_size=4,
        # Four workers on 2 cores: a p99 of 200 ms is the machine, not a slow store. The
        # tests of a slow store set the production thresholds (test_store_latency.py).
        valkey_slow_seconds=2.0,
        postgres_slow_seconds=5.0,
    )
    _delete_keys(url, cluster, [prefix])


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
