"""The local stores are the servers other tests crash, restart and hang on purpose, so each of
those moves is checked here against a real Postgres and a real Valkey."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from redis.cluster import RedisCluster

from availability.local_stores import (
    LocalPostgres,
    LocalStoreError,
    LocalValkey,
    _gone,
    free_port,
    start_postgres,
    start_valkey,
    start_valkey_cluster,
    start_valkey_sentinel,
)

pytestmark = pytest.mark.servers

SHARED_PORTS = {5432, 6379}
CONNECTION_LOST = (asyncpg.InterfaceError, asyncpg.PostgresError, OSError)


@pytest.fixture
def local_postgres(tmp_path: Path) -> Iterator[LocalPostgres]:
    local = start_postgres(tmp_path / "postgres")
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture
def local_valkey(tmp_path: Path) -> Iterator[LocalValkey]:
    local = start_valkey(tmp_path / "valkey")
    try:
        yield local
    finally:
        local.stop()


def query(dsn: str, sql: str, timeout: float = 5.0) -> list[Any]:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(dsn, timeout=timeout)
        try:
            if ";" in sql:
                await conn.execute(sql)
                return []
            return [tuple(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(run())


def client(local: LocalValkey, timeout: float = 2.0) -> redis.Redis:
    return redis.Redis.from_url(local.url, socket_timeout=timeout, socket_connect_timeout=timeout)


def test_free_port_can_be_bound_and_is_not_a_shared_one() -> None:
    port = free_port()
    assert port not in SHARED_PORTS
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_free_port_is_below_the_range_outgoing_connections_take_their_ports_from() -> None:
    """An outgoing connection's local port comes from the ephemeral range: a port picked there
    may be taken by one before the server binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(50)}
    assert all(10000 <= port < low for port in ports), sorted(ports)
    assert len(ports) > 40, "picked at random, not one port again and again"


def test_postgres_answers_on_its_own_loopback_port(local_postgres: LocalPostgres) -> None:
    assert local_postgres.port not in SHARED_PORTS
    assert local_postgres.dsn == f"postgresql://postgres@127.0.0.1:{local_postgres.port}/postgres"
    assert query(local_postgres.dsn, "SELECT current_user, current_database()") == [
        ("postgres", "postgres")
    ]


def test_postgres_data_survives_a_kill(local_postgres: LocalPostgres) -> None:
    query(local_postgres.dsn, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (42);")
    port = local_postgres.port

    local_postgres.kill()

    assert not local_postgres.running
    with pytest.raises(ConnectionRefusedError):
        query(local_postgres.dsn, "SELECT 1", timeout=1.0)
    local_postgres.start()
    assert local_postgres.port == port
    assert query(local_postgres.dsn, "SELECT x FROM kept") == [(42,)]


def test_postgres_kill_drops_open_connections(local_postgres: LocalPostgres) -> None:
    async def scenario() -> None:
        conn = await asyncpg.connect(local_postgres.dsn)
        try:
            assert await conn.fetchval("SELECT 1") == 1
            local_postgres.kill()
            with pytest.raises(CONNECTION_LOST):
                await asyncio.wait_for(conn.fetchval("SELECT 1"), 5.0)
        finally:
            conn.terminate()

    asyncio.run(scenario())


def test_a_stopped_data_dir_starts_again_with_its_data(tmp_path: Path) -> None:
    first = start_postgres(tmp_path / "postgres")
    try:
        query(first.dsn, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (7);")
    finally:
        first.stop()

    second = start_postgres(tmp_path / "postgres")
    try:
        assert query(second.dsn, "SELECT x FROM kept") == [(7,)]
    finally:
        second.stop()


def test_postgres_pause_hangs_connections_until_resume(local_postgres: LocalPostgres) -> None:
    local_postgres.pause()
    try:
        with pytest.raises(TimeoutError):
            query(local_postgres.dsn, "SELECT 1", timeout=0.5)
    finally:
        local_postgres.resume()

    assert query(local_postgres.dsn, "SELECT 1") == [(1,)]


def test_postgres_stops_and_kills_even_when_paused(tmp_path: Path) -> None:
    local = start_postgres(tmp_path / "postgres")
    local.pause()
    local.stop()
    assert not local.running
    local.stop()
    local.kill()

    local.start()
    local.pause()
    local.kill()
    local.start()
    assert query(local.dsn, "SELECT 1") == [(1,)]
    local.stop()


def test_postgres_refuses_a_directory_that_is_not_its_own(tmp_path: Path) -> None:
    data_dir = tmp_path / "postgres"
    data_dir.mkdir()
    (data_dir / "something.txt").write_text("not a cluster")

    with pytest.raises(LocalStoreError, match="neither empty nor a Postgres data directory"):
        start_postgres(data_dir)


@contextlib.contextmanager
def grpc_traffic() -> Iterator[Callable[[], int]]:
    """A gRPC server and a client calling it without pause, on a thread of their own, as in a
    test that restarts a store under a running service; yields the count of calls made."""
    calls = 0
    stop = threading.Event()
    started = threading.Event()

    async def run() -> None:
        nonlocal calls
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest()
            started.set()
            while not stop.is_set():
                await asyncio.gather(*(stub.Check(request) for _ in range(20)))
                calls += 20
        await server.stop(None)

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield lambda: calls
    finally:
        stop.set()
        thread.join(10)


def test_servers_start_while_grpc_threads_are_busy(tmp_path: Path) -> None:
    """Switching user or arming the parent-death signal in a forked child of this process
    runs gRPC's fork handlers there, and they fail while gRPC's threads are busy: the server
    never started, in 118 of 300 tries. Every start here must succeed."""
    with grpc_traffic() as calls:
        before = calls()
        postgres = start_postgres(tmp_path / "postgres")
        assert query(postgres.dsn, "SELECT 1") == [(1,)]
        postgres.stop()
        for _ in range(20):
            valkey = start_valkey(tmp_path / "valkey")
            assert client(valkey).ping()
            valkey.stop()
        assert calls() > before


def test_servers_die_with_the_process_that_started_them(tmp_path: Path) -> None:
    script = (
        "import sys, time; from pathlib import Path;"
        " from availability.local_stores import start_postgres, start_valkey;"
        " d = Path(sys.argv[1]);"
        " print(start_postgres(d / 'postgres').pid, start_valkey(d / 'valkey').pid, flush=True);"
        " time.sleep(600)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pids = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(pids) == 2 and not any(_gone(pid) for pid in pids)
    finally:
        parent.kill()  # no exit hook runs: only the parent-death signal can stop them
        parent.wait()
    deadline = time.monotonic() + 30
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in pids if not _gone(pid)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert left == []


def test_valkey_set_get_then_kill_and_start(local_valkey: LocalValkey) -> None:
    assert local_valkey.port not in SHARED_PORTS
    assert local_valkey.url == f"redis://127.0.0.1:{local_valkey.port}/0"
    valkey = client(local_valkey)
    assert valkey.set("k", "v")
    assert valkey.get("k") == b"v"

    local_valkey.kill()

    with pytest.raises(redis.ConnectionError):
        valkey.ping()
    local_valkey.start()
    assert valkey.ping()
    assert valkey.get("k") is None


def test_valkey_pause_blocks_ping_until_resume(local_valkey: LocalValkey) -> None:
    valkey = client(local_valkey, timeout=0.3)
    assert valkey.ping()

    local_valkey.pause()
    try:
        with pytest.raises(redis.TimeoutError):
            valkey.ping()
    finally:
        local_valkey.resume()

    assert client(local_valkey).ping()


def test_valkey_stops_even_when_paused(local_valkey: LocalValkey) -> None:
    local_valkey.pause()
    local_valkey.stop()

    assert not local_valkey.running
    with pytest.raises(redis.ConnectionError):
        client(local_valkey).ping()


def test_a_taken_port_fails_with_the_server_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(LocalStoreError, match="Address already in use"):
            start_valkey(tmp_path / "valkey", port=port)


def test_a_port_taken_after_it_was_picked_is_picked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1], free_port()])
        monkeypatch.setattr("availability.local_stores.process.free_port", lambda: next(ports))

        local = start_valkey(tmp_path / "valkey")
        try:
            assert local.port != taken.getsockname()[1]
            assert client(local).ping()
        finally:
            local.stop()


def test_valkey_cluster_fails_over_a_killed_master_and_keeps_its_replicated_key(
    tmp_path: Path,
) -> None:
    cluster = start_valkey_cluster(tmp_path / "cluster", masters=3, replicas=1)
    key = "{mitra:7}:slots"
    try:
        assert len(cluster.nodes) == 6
        with RedisCluster.from_url(cluster.url) as writer:
            assert writer.set(key, "v")
            # WAIT counts this client's writes on its connection: the pool hands back the SET's.
            owner = writer.get_node_from_key(key)
            assert writer.execute_command("WAIT", 1, 1000, target_nodes=owner) == 1
        master = cluster.master_of(key)
        assert client(master).get(key) == b"v"
        replicas = cluster.replicas_of(master)
        assert len(replicas) == 1

        master.kill()
        cluster.wait_failover(key, master, timeout=10.0)

        assert cluster.master_of(key) is replicas[0]
        with RedisCluster.from_url(cluster.url) as reader:
            assert reader.get(key) == b"v"
    finally:
        cluster.stop()

    cluster.stop()
    for node in cluster.nodes:
        assert not node.running
        with pytest.raises(redis.ConnectionError):
            client(node).ping()


def test_valkey_sentinel_promotes_the_replica_of_a_killed_master(tmp_path: Path) -> None:
    group = start_valkey_sentinel(tmp_path / "sentinel", master_name="mirror")
    try:
        assert group.master_name == "mirror" and len(group.sentinels) == 3
        assert not {int(s.rpartition(":")[2]) for s in group.sentinels} & SHARED_PORTS
        master = group.master()
        replicas = group.replicas()
        assert len(replicas) == 1
        with client(master) as valkey:
            assert valkey.set("k", "v")
            assert valkey.wait(1, 1000) == 1
        assert client(replicas[0]).get("k") == b"v"

        master.kill()
        group.wait_failover(master, timeout=15.0)

        assert group.master() is replicas[0]
        with client(replicas[0]) as valkey:
            assert valkey.info("replication")["role"] == "master"
            assert valkey.get("k") == b"v"
            assert valkey.set("k", "w")
    finally:
        group.stop()

    for server in (*group.nodes, *group.sentinel_nodes):
        assert not server.running
        with pytest.raises(redis.ConnectionError):
            client(server).ping()
