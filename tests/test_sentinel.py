"""Valkey behind Sentinel: the client finds the master through the sentinels, checks it is one,
runs the service's connect hook on every new connection, answers from Postgres while a killed
master is failed over, then follows the promoted replica and reconciles the mirror. A mitra
deactivated just before the failover, whose mirror write the promoted replica never got, is
never served as reachable."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis
import redis.asyncio as aredis
from redis.asyncio.connection import Connection, SSLConnection

from availability.local_stores import LocalValkeySentinel, start_valkey_sentinel
from availability.mirror import Keys, connect_valkey
from availability.sentinel import sentinel_pool
from availability.server import Server, running
from availability.settings import Settings
from availability.sweeps import RECONCILE
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet, eventually


@pytest.fixture(scope="module")
def shared_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalValkeySentinel]:
    """For tests that fail nothing over."""
    group = start_valkey_sentinel(tmp_path_factory.mktemp("sentinel"))
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture
def own_sentinel(tmp_path: Path) -> Iterator[LocalValkeySentinel]:
    group = start_valkey_sentinel(tmp_path / "sentinel")
    try:
        yield group
    finally:
        group.stop()


def through(group: LocalValkeySentinel, settings: Settings, url: str = "") -> Settings:
    """The settings of a deployment behind `group`; VALKEY_URL's host is never looked up."""
    return replace(
        settings,
        valkey_url=url or "redis://ignored.invalid:1/0",
        valkey_sentinels=tuple(group.sentinels),
        valkey_sentinel_master=group.master_name,
        valkey_timeout_seconds=0.25,
    )


def direct(port: int) -> aredis.Redis:
    return aredis.Redis(port=port, decode_responses=True, socket_timeout=2)


@asynccontextmanager
async def serving(
    settings: Settings,
) -> AsyncIterator[tuple[Server, pb_grpc.AvailabilityServiceAsyncStub]]:
    async with (
        running(settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield server, pb_grpc.AvailabilityServiceStub(channel)


async def online_in_truth(db: asyncpg.Connection) -> set[str]:
    rows = await db.fetch("SELECT mitra_id FROM mitra_online_status WHERE is_online")
    return {str(r[0]) for r in rows}


@dataclass
class Load:
    """SetOnline / SetOffline / Heartbeat / FindAvailableMitras / IsMitraReachable in turn over
    `mitras`, until stopped: every call's outcome, every read's source, and when reads came
    from the cache again after the first from Postgres."""

    stub: pb_grpc.AvailabilityServiceAsyncStub
    mitras: list[str]
    codes: Counter[str] = field(default_factory=Counter)
    sources: Counter[int] = field(default_factory=Counter)
    first_database: float | None = None
    back_on_cache: float | None = None

    async def run(self, until: asyncio.Event) -> None:
        step = 0
        while not until.is_set():
            mitra = self.mitras[step % len(self.mitras)]
            try:
                await self.call(step % 5, mitra)
                self.codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                self.codes[exc.code().name] += 1
            step += 1
            await asyncio.sleep(0.005)

    async def call(self, kind: int, mitra: str) -> None:
        stub = self.stub
        if kind == 0:
            await stub.SetOffline(pb.SetOfflineRequest(mitra_id=mitra))
        elif kind == 1:
            await stub.SetOnline(pb.SetOnlineRequest(mitra_id=mitra))
        elif kind == 2:
            await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=mitra))
        elif kind == 3:
            self.read((await stub.FindAvailableMitras(pb.FindAvailableMitrasRequest())).source)
        else:
            self.read(
                (await stub.IsMitraReachable(pb.IsMitraReachableRequest(mitra_id=mitra))).source
            )

    async def is_back_on_cache(self) -> bool:
        return self.back_on_cache is not None

    def read(self, source: int) -> None:
        self.sources[source] += 1
        now = time.monotonic()
        if source == pb.SOURCE_DATABASE and self.first_database is None:
            self.first_database = now
        if source == pb.SOURCE_CACHE and self.first_database is not None:
            self.back_on_cache = self.back_on_cache or now


async def test_a_server_serves_from_the_cache_through_sentinel(
    shared_sentinel: LocalValkeySentinel, settings: Settings, fleet: Fleet
) -> None:
    mitra = str(await fleet.mitra(online=True))
    on = through(shared_sentinel, settings)
    async with (
        running(on) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.AvailabilityServiceStub(channel)
        status = (await stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=mitra))).status
        assert status.source == pb.SOURCE_CACHE and status.reachable
        found = await stub.FindAvailableMitras(pb.FindAvailableMitrasRequest(limit=10))
        assert found.source == pb.SOURCE_CACHE
        assert [m.mitra_id for m in found.mitras] == [mitra]
        master = direct(shared_sentinel.master().port)
        try:
            assert mitra in await master.smembers(Keys.for_prefix(on.valkey_key_prefix).online)
        finally:
            await master.aclose()


async def test_every_new_connection_reaches_the_master_as_the_url_says_then_runs_the_hook(
    shared_sentinel: LocalValkeySentinel, settings: Settings
) -> None:
    for node in shared_sentinel.nodes:  # ACL users are not replicated
        with redis.Redis(port=node.port) as valkey:
            valkey.acl_setuser(
                "mirror", enabled=True, passwords=["+pw"], keys="*", commands=["+@all"]
            )
    hooked: list[tuple[str, int, bytes]] = []

    async def hook(connection: Connection) -> None:
        await connection.send_command("ACL", "WHOAMI")
        hooked.append((connection.host, connection.port, await connection.read_response()))

    on = through(shared_sentinel, settings, url="redis://mirror:pw@ignored.invalid:1/3")
    client = connect_valkey(on, hook)
    try:
        await asyncio.gather(*(client.blpop(["nothing"], timeout=0.1) for _ in range(4)))
        info = await client.client_info()
    finally:
        await client.connection_pool.aclose()
    master = shared_sentinel.master().port
    assert hooked == [("127.0.0.1", master, b"mirror")] * 4
    assert int(info["db"]) == 3 and info["user"] == "mirror"


async def test_the_sentinels_password_is_sent_and_needed(
    own_sentinel: LocalValkeySentinel, settings: Settings
) -> None:
    for sentinel in own_sentinel.sentinel_nodes:
        with redis.Redis(port=sentinel.port) as valkey:
            valkey.execute_command("ACL", "SETUSER", "default", "on", ">s3cret")
    with_password = connect_valkey(
        replace(through(own_sentinel, settings), valkey_sentinel_password="s3cret")
    )
    without = connect_valkey(through(own_sentinel, settings))
    try:
        assert await with_password.ping()
        with pytest.raises(redis.ConnectionError, match="No master found"):
            await without.ping()
    finally:
        await with_password.connection_pool.aclose()
        await without.connection_pool.aclose()


async def test_a_master_demoted_behind_the_sentinels_back_is_left(
    own_sentinel: LocalValkeySentinel, settings: Settings
) -> None:
    hooked: list[int] = []

    async def hook(connection: Connection) -> None:
        hooked.append(connection.port)

    client = connect_valkey(through(own_sentinel, settings), hook)
    try:
        assert await client.set("k", "1")
        old, other = own_sentinel.master(), own_sentinel.replicas()[0]
        with redis.Redis(port=other.port) as valkey:
            valkey.replicaof("NO", "ONE")
        with redis.Redis(port=old.port) as valkey:
            valkey.replicaof("127.0.0.1", other.port)

        with pytest.raises(redis.ConnectionError, match="now a slave"):
            await client.set("k", "2")  # READONLY on the connection open to it
        assert own_sentinel.master() is old, "the sentinels have not noticed yet"
        with pytest.raises(redis.ConnectionError, match="not the master"):
            await client.set("k", "3")  # the role check of the next connection
        assert hooked == [old.port], "a refused connection does not reach the hook"
        assert client.connection_pool.moves == 0  # type: ignore[attr-defined]
    finally:
        await client.connection_pool.aclose()


async def test_a_killed_master_fails_over_under_load_and_the_mirror_equals_postgres(
    own_sentinel: LocalValkeySentinel,
    settings: Settings,
    fleet: Fleet,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="availability.sentinel")
    mitras = [str(await fleet.mitra(online=True)) for _ in range(20)]
    on = through(own_sentinel, settings)
    keys = Keys.for_prefix(on.valkey_key_prefix)
    async with serving(on) as (server, stub):
        found = await stub.FindAvailableMitras(pb.FindAvailableMitrasRequest(limit=100))
        assert found.source == pb.SOURCE_CACHE and len(found.mitras) == 20
        master = own_sentinel.master()

        load, stop = Load(stub, mitras), asyncio.Event()
        loading = asyncio.create_task(load.run(stop))
        killed = time.monotonic()
        master.kill()
        await asyncio.to_thread(own_sentinel.wait_failover, master, 20.0)
        promoted_after = time.monotonic() - killed
        await eventually(load.is_back_on_cache, timeout=15)
        stop.set()
        await loading
        assert set(load.codes) == {"OK"}, load.codes
        assert load.sources[pb.SOURCE_DATABASE] > 0, "answered from Postgres without a master"
        assert load.back_on_cache is not None
        print(
            f"\nSentinel failover: promoted {promoted_after:.2f}s after the kill, reads from the"
            f" cache again after {load.back_on_cache - killed:.2f}s;"
            f" {load.codes['OK']} calls, sources {dict(load.sources)}"
        )

        promoted = own_sentinel.master()
        assert promoted is not master
        assert server.availability is not None and server.sweeps is not None
        assert server.availability.mirror.client.connection_pool.moves == 1  # type: ignore[attr-defined]
        moved = [
            r.getMessage()
            for r in caplog.records
            if r.name == "availability.sentinel" and r.levelno == logging.WARNING
        ]
        assert len(moved) == 1, moved
        assert f":{master.port}" in moved[0] and f":{promoted.port}" in moved[0]

        async def reconciled() -> bool:
            return server.sweeps is not None and server.sweeps.report.of(RECONCILE).runs >= 1

        await eventually(reconciled, timeout=15)
        new_master = direct(promoted.port)
        try:

            async def mirror_equals_truth() -> bool:
                return await new_master.smembers(keys.online) == await online_in_truth(db)

            await eventually(mirror_equals_truth, timeout=15)
        finally:
            await new_master.aclose()
        statuses = [
            (await stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=m))).status for m in mitras
        ]
        assert all(s.source == pb.SOURCE_CACHE for s in statuses)
        assert {s.mitra_id for s in statuses if s.online} == await online_in_truth(db)


async def test_a_mitra_deactivated_just_before_a_failover_is_never_served_as_reachable(
    own_sentinel: LocalValkeySentinel, settings: Settings, fleet: Fleet
) -> None:
    mitras = [str(await fleet.mitra(online=True)) for _ in range(10)]
    target, others = mitras[0], mitras[1:]
    on = through(own_sentinel, settings)
    keys = Keys.for_prefix(on.valkey_key_prefix)
    async with serving(on) as (server, stub):
        reachable = await stub.IsMitraReachable(pb.IsMitraReachableRequest(mitra_id=target))
        assert reachable.reachable and reachable.source == pb.SOURCE_CACHE
        master, replica = own_sentinel.master(), own_sentinel.replicas()[0]

        # The replica stops and loses its link, so the deactivation reaches the master only
        # (a stopped process's socket would still take the bytes into its kernel buffer).
        replica.pause()
        try:
            with redis.Redis(port=master.port) as valkey:
                valkey.client_kill_filter(_type="replica")
                await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=target, active=False))
                assert valkey.sismember(keys.deactivated, target)
                assert valkey.info("replication")["connected_slaves"] == 0
            master.kill()
        finally:
            replica.resume()
        with redis.Redis(port=replica.port) as valkey:
            assert not valkey.sismember(keys.deactivated, target), "the replica got the write"
            assert valkey.sismember(keys.online, target)

        wrong: Counter[str] = Counter()
        checked: Counter[int] = Counter()
        stop = asyncio.Event()

        async def check() -> None:
            while not stop.is_set():
                reply = await stub.IsMitraReachable(pb.IsMitraReachableRequest(mitra_id=target))
                checked[reply.source] += 1
                if reply.reachable:
                    wrong[f"IsMitraReachable from {pb.Source.Name(reply.source)}"] += 1
                found = await stub.FindAvailableMitras(pb.FindAvailableMitrasRequest(limit=100))
                checked[found.source] += 1
                if target in {m.mitra_id for m in found.mitras}:
                    wrong[f"FindAvailableMitras from {pb.Source.Name(found.source)}"] += 1
                try:
                    beat = await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=target))
                    wrong[f"Heartbeat accepted, online={beat.online}"] += 1
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
                        wrong[f"Heartbeat {exc.code().name}"] += 1

        load = Load(stub, others)
        checkers = [asyncio.create_task(check()) for _ in range(4)]
        loading = asyncio.create_task(load.run(stop))
        await asyncio.to_thread(own_sentinel.wait_failover, master, 20.0)

        async def reconciled_and_back_on_cache() -> bool:
            assert server.sweeps is not None
            return server.sweeps.report.of(RECONCILE).runs >= 1 and await load.is_back_on_cache()

        await eventually(reconciled_and_back_on_cache, timeout=15)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(loading, *checkers)
        assert set(load.codes) == {"OK"}, load.codes
        assert checked[pb.SOURCE_CACHE] > 0, "never read the promoted master's mirror"
        assert not wrong, f"deactivated {target} was served: {dict(wrong)}"


def test_a_rediss_url_means_tls_to_the_data_nodes_and_the_sentinels() -> None:
    on = Settings(
        database_url="postgresql://localhost/x",
        valkey_url="rediss://mirror:pw@ignored.invalid:1/2",
        valkey_sentinels=("10.0.0.7:26379", "[fd00::8]:26379"),
        valkey_sentinel_master="availability",
        valkey_sentinel_password="s3cret",
    )
    pool = sentinel_pool(on, on.valkey_url + "?ssl_cert_reqs=none")
    assert issubclass(pool.connection_class, SSLConnection)
    target = pool.connection_kwargs
    assert (target["username"], target["password"], target["db"]) == ("mirror", "pw", 2)
    assert "host" not in target and target["ssl_cert_reqs"] == "none"
    sentinels = [s.connection_pool for s in pool.sentinel_manager.sentinels]  # type: ignore[attr-defined]
    assert [(s.connection_kwargs["host"], s.connection_kwargs["port"]) for s in sentinels] == [
        ("10.0.0.7", 26379),
        ("fd00::8", 26379),
    ]
    assert all(s.connection_class is SSLConnection for s in sentinels)
    assert all(s.connection_kwargs["password"] == "s3cret" for s in sentinels)
