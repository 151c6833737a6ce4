"""Upgrades and rollbacks: the previous release (releases.toml's last entry), installed from
its commit into a venv of its own, on one Postgres and one Valkey with this tree:

- a rollback: the previous release alone on a database this release migrated (expand steps);
- a rolling deploy: one instance of each side by side, calls alternating between them.

Black-box checks in both, over gRPC only: load follows chat_sessions written by SQL alone, a
deactivation through either is never served by the other, heartbeats through either keep
mitras online through the other's auto-offline, and the dashboards agree. The same rollback
on the schema as it stood before migration 0010 (which put back what 0.1.0 listens to) is
checked to fail, so the test is shown to bite."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from availability import schema
from availability.local_stores import free_port
from availability.server import running
from availability.settings import Settings
from availability.truth import Truth
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc
from availability.v1 import dashboard_pb2 as dashboard_pb
from availability.v1 import dashboard_pb2_grpc as dashboard_pb_grpc

from .helpers import Fleet, eventually, stop_process

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PREVIOUS = tomllib.loads((ROOT / "releases.toml").read_text())["release"][-1]
STALE_SECONDS = 3.0
"""Short cadences on both releases, so an auto-offline would show within the test."""


@dataclass(frozen=True)
class Release:
    version: str
    python: Path
    source: Path


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    """The previous release's package from its commit, in a venv of its own with the runtime
    dependencies of this release's lock (the first release had no lock of its own)."""
    folder = tmp_path_factory.mktemp(f"release-{PREVIOUS['version']}")
    source = folder / "src"
    source.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", PREVIOUS["commit"], "availability"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    uv = str(ROOT / ".tools/bin/uv")
    requirements = folder / "requirements.txt"
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    export = ["--no-dev", "--no-emit-project", "--format", "requirements-txt"]
    python = str(folder / "venv/bin/python")
    for command in (
        [uv, "export", "--quiet", "--frozen", *export, "-o", str(requirements)],
        [uv, "venv", "--quiet", "--python", "python3", str(folder / "venv")],
        [uv, "pip", "install", "--quiet", "--require-hashes", "-r", str(requirements)],
    ):
        if command[1] == "pip":
            command += ["--python", python]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    return Release(PREVIOUS["version"], folder / "venv/bin/python", source)


def _run(release: Release, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(release.python), "-m", "availability", *args],
        env={**env, "PYTHONPATH": str(release.source)},
        cwd=release.source,
        capture_output=True,
        text=True,
        timeout=120,
    )


@contextlib.contextmanager
def _made_by_previous(admin_dsn: str, previous: Release, settings: Settings) -> Iterator[str]:
    """A new database that the previous release migrated (as it would have served it)."""
    url = _create_database(admin_dsn)
    try:
        made = _run(previous, "migrate", env=_env(settings, url))
        assert made.returncode == 0, made.stderr
        yield url
    finally:
        _drop_database(admin_dsn, url)


@pytest.fixture
def upgraded_database(
    postgres_admin_dsn: str, previous_release: Release, settings: Settings
) -> Iterator[str]:
    """A database the previous release made and served, then migrated by this release."""
    with _made_by_previous(postgres_admin_dsn, previous_release, settings) as url:
        applied = asyncio.run(_migrate(replace(settings, database_url=url)))
        assert "0010_release_0_1_0_beside.sql" in applied
        assert not [name for name in applied if name.startswith("contract/")], applied
        yield url


@pytest.fixture
def database_before_0010(
    postgres_admin_dsn: str, previous_release: Release, settings: Settings
) -> Iterator[str]:
    """The same, on the schema as it stood before 0010: what a rollback met then."""
    with _made_by_previous(postgres_admin_dsn, previous_release, settings) as url:
        asyncio.run(_apply_expand_steps_before(url, "0010"))
        yield url


def _create_database(admin_dsn: str) -> str:
    name = f"availability_upgrade_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(admin_dsn, f'CREATE DATABASE "{name}"'))
    return f"{admin_dsn.rpartition('/')[0]}/{name}"


def _drop_database(admin_dsn: str, url: str) -> None:
    asyncio.run(
        _admin(admin_dsn, f'DROP DATABASE IF EXISTS "{url.rpartition("/")[2]}" WITH (FORCE)')
    )


async def _admin(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _migrate(settings: Settings) -> list[str]:
    truth = await Truth.connect(settings)
    try:
        return await truth.migrate()
    finally:
        await truth.close()


async def _apply_expand_steps_before(url: str, first_left_out: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        async with conn.transaction():
            for step in schema.steps():
                if step.contract or step.name in done or step.name >= first_left_out:
                    continue
                await conn.execute(step.sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", step.name)
    finally:
        await conn.close()


def _env(settings: Settings, url: str, address: str = "127.0.0.1:0") -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": url,
        "VALKEY_URL": settings.valkey_url,
        "VALKEY_KEY_PREFIX": settings.valkey_key_prefix,
        "GRPC_ADDRESS": address,
        "METRICS_ADDRESS": "",
        "MIGRATE_ON_START": "false",
        "HEARTBEAT_STALE_SECONDS": str(STALE_SECONDS),
        "MITRA_AUTO_OFFLINE_SWEEP_SECONDS": "1",
        "LOG_FORMAT": "text",
    }


@contextlib.asynccontextmanager
async def serving_previous(
    release: Release, settings: Settings, url: str, log: Path
) -> AsyncIterator[grpc.aio.Channel]:
    """`availability serve` of the previous release, and a channel to it."""
    address = f"127.0.0.1:{free_port()}"
    with log.open("w") as out:
        process = subprocess.Popen(  # noqa: ASYNC220 (stopped by stop_process, as elsewhere)
            [str(release.python), "-m", "availability", "serve"],
            env={**_env(settings, url, address), "PYTHONPATH": str(release.source)},
            cwd=release.source,
            stdout=out,
            stderr=out,
        )
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            await _wait_serving(channel, process, log)
            yield channel
    finally:
        stop_process(process)


async def _wait_serving(
    channel: grpc.aio.Channel, process: subprocess.Popen[bytes], log: Path
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(grpc.RpcError):
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        await asyncio.sleep(0.1)
    printed = await asyncio.to_thread(log.read_text)
    pytest.fail(f"release {PREVIOUS['version']} did not serve:\n{printed[-3000:]}")


@contextlib.asynccontextmanager
async def serving_current(settings: Settings, url: str) -> AsyncIterator[grpc.aio.Channel]:
    current = replace(
        settings,
        database_url=url,
        heartbeat_stale_seconds=STALE_SECONDS,
        mitra_auto_offline_sweep_seconds=1.0,
    )
    async with (
        running(current) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield channel


class Instance:
    """One instance as its callers see it: the two services over one channel."""

    def __init__(self, name: str, channel: grpc.aio.Channel) -> None:
        self.name = name
        self.stub = pb_grpc.AvailabilityServiceStub(channel)
        self.dashboard = dashboard_pb_grpc.DashboardServiceStub(channel)

    async def loads(self) -> dict[str, int]:
        found = await self.stub.FindAvailableMitras(pb.FindAvailableMitrasRequest(limit=100))
        return {m.mitra_id: m.load for m in found.mitras}

    async def reachable(self, mitra: uuid.UUID) -> bool:
        reply = await self.stub.IsMitraReachable(pb.IsMitraReachableRequest(mitra_id=str(mitra)))
        return reply.reachable

    async def online(self, mitra: uuid.UUID) -> bool:
        reply = await self.stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=str(mitra)))
        return reply.status.online


async def check_load_follows_sql(fleet: Fleet, writer: Instance, readers: list[Instance]) -> None:
    mitra = await fleet.mitra("Load follows", capacity=3)
    await writer.stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    for _ in range(2):
        await fleet.session(mitra, "active")
    for reader in readers:

        async def followed(reader: Instance = reader) -> bool:
            return (await reader.loads()).get(str(mitra)) == 2

        await eventually(followed, timeout=3.0, what=f"{reader.name} sees load 2")


async def check_deactivation_is_never_served(
    fleet: Fleet, writer: Instance, reader: Instance
) -> None:
    mitra = await fleet.mitra("Deactivated")
    await writer.stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await eventually(lambda: reader.reachable(mitra), timeout=3.0, what="reachable first")
    await writer.stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(mitra), active=False))
    for _ in range(20):  # from the acknowledgement on, never again
        assert not await reader.reachable(mitra), f"{reader.name} served a deactivated mitra"
        assert str(mitra) not in await reader.loads()
        await asyncio.sleep(0.05)


async def check_heartbeats_keep_mitras_online(fleet: Fleet, instances: list[Instance]) -> None:
    """Each mitra heartbeats through one instance only, for longer than the stale window;
    every instance's auto-offline runs. A silent mitra is the control: it goes offline."""
    beating = {}
    for instance in instances:
        mitra = await fleet.mitra(f"Beats through {instance.name}")
        await instance.stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
        beating[mitra] = instance
    silent = await fleet.mitra("Silent")
    await instances[0].stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(silent)))
    until = time.monotonic() + 2.5 * STALE_SECONDS
    while time.monotonic() < until:
        for mitra, instance in beating.items():
            reply = await instance.stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra)))
            assert reply.online, f"{instance.name} answered a heartbeat online=false"
        await asyncio.sleep(0.5)
    for mitra in beating:
        for instance in instances:
            assert await instance.online(mitra), f"{instance.name}: taken offline"
    assert not await instances[-1].online(silent), "the auto-offline sweep ran"


async def check_dashboards_agree(fleet: Fleet, instances: list[Instance]) -> None:
    now = datetime.now(UTC)
    mitra = await fleet.mitra("Dashboard")
    await instances[0].stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    for status, sensitivity, age in (
        ("active", "sensitive", timedelta(0)),
        ("pending_payment", "normal", timedelta(0)),
        ("searching", "sensitive", timedelta(0)),
        ("ended", "sensitive", timedelta(days=5)),
        ("ended", "normal", timedelta(days=40)),
    ):
        await fleet.session(
            None if status == "searching" else mitra,
            status,
            sensitivity=sensitivity,
            created_at=now - age,
        )
    expected = await fleet.db.fetchrow(
        "SELECT count(*) FILTER (WHERE status IN ('active', 'pending_payment')) AS active,"
        " count(*) FILTER (WHERE status IN ('searching', 'pending_acceptance')) AS pending,"
        " count(*) FILTER (WHERE topic_sensitivity = 'sensitive') AS sensitive,"
        " count(*) FILTER (WHERE created_at >= now() - interval '30 days') AS last_30d"
        " FROM chat_sessions"
    )
    for instance in instances:
        stats = await instance.dashboard.GetDashboardStats(dashboard_pb.GetDashboardStatsRequest())
        seen = (
            stats.active_chats,
            stats.pending_requests,
            stats.sensitive.total,
            stats.sensitive.last_30d_total,
        )
        assert seen == tuple(expected.values()), f"{instance.name}: {seen} != {tuple(expected)}"


async def test_rollback_to_the_previous_release_keeps_every_guarantee(
    previous_release: Release,
    upgraded_database: str,
    settings: Settings,
    tmp_path: Path,
) -> None:
    conn = await asyncpg.connect(upgraded_database)
    fleet = Fleet(conn)
    try:
        async with serving_previous(
            previous_release, settings, upgraded_database, tmp_path / "previous.log"
        ) as channel:
            previous = Instance(previous_release.version, channel)
            await check_load_follows_sql(fleet, previous, [previous])
            await check_deactivation_is_never_served(fleet, previous, previous)
            await check_heartbeats_keep_mitras_online(fleet, [previous])
            await check_dashboards_agree(fleet, [previous])
    finally:
        await conn.close()


async def test_a_rolling_deploy_runs_both_releases_side_by_side(
    previous_release: Release,
    upgraded_database: str,
    settings: Settings,
    tmp_path: Path,
) -> None:
    conn = await asyncpg.connect(upgraded_database)
    fleet = Fleet(conn)
    try:
        async with (
            serving_current(settings, upgraded_database) as current_channel,
            serving_previous(
                previous_release, settings, upgraded_database, tmp_path / "previous.log"
            ) as previous_channel,
        ):
            current = Instance("main", current_channel)
            previous = Instance(previous_release.version, previous_channel)
            both = [current, previous]
            await check_load_follows_sql(fleet, current, both)
            await check_load_follows_sql(fleet, previous, both)
            await check_deactivation_is_never_served(fleet, current, previous)
            await check_deactivation_is_never_served(fleet, previous, current)
            await check_heartbeats_keep_mitras_online(fleet, both)
            await check_dashboards_agree(fleet, both)
    finally:
        await conn.close()


async def test_the_rollback_check_bites_on_the_schema_before_0010(
    previous_release: Release,
    database_before_0010: str,
    settings: Settings,
    tmp_path: Path,
) -> None:
    """What a rollback met before 0010: the previous release serves, but a mitra the chat
    backend gave two sessions keeps load 0 (and its dashboard misses today's sessions)."""
    conn = await asyncpg.connect(database_before_0010)
    fleet = Fleet(conn)
    try:
        async with serving_previous(
            previous_release, settings, database_before_0010, tmp_path / "previous.log"
        ) as channel:
            previous = Instance(previous_release.version, channel)
            with pytest.raises(AssertionError, match="sees load 2"):
                await check_load_follows_sql(fleet, previous, [previous])
            with pytest.raises(AssertionError):
                await check_dashboards_agree(fleet, [previous])
    finally:
        await conn.close()


async def test_contract_removes_what_only_the_previous_release_needed(
    upgraded_database: str, settings: Settings
) -> None:
    """`migrate --contract` drops 0.1.0's triggers and view; this release keeps working."""
    url = upgraded_database
    truth = await Truth.connect(replace(settings, database_url=url))
    try:
        assert await truth.pending_contract_steps() == ["contract/0010_release_0_1_0_gone.sql"]
        assert await truth.migrate(contract=True) == ["contract/0010_release_0_1_0_gone.sql"]
        assert await truth.pending_contract_steps() == []
    finally:
        await truth.close()
    conn = await asyncpg.connect(url)
    try:
        triggers = {
            r["tgname"]
            for r in await conn.fetch("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")
        }
        assert {"availability_session_change", "availability_mitra_notify"}.isdisjoint(triggers)
        assert await conn.fetchval("SELECT to_regclass('chat_session_days')") is None
        fleet = Fleet(conn)
        async with serving_current(settings, url) as channel:
            current = Instance("main", channel)
            await check_load_follows_sql(fleet, current, [current])
            await check_dashboards_agree(fleet, [current])
    finally:
        await conn.close()
