"""Two database roles: the owner migrates, `serve` runs as a runtime role holding only what
`availability grants` gives. The whole black-box path works as the runtime role; the role
cannot drop a table, rewrite the audit or write the chat backend's sessions; a missing grant
stops start-up in one line naming it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import asyncpg
import grpc
import pytest

from availability.local_stores import free_port
from availability.settings import Settings
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc
from availability.v1 import dashboard_pb2 as dashboard_pb
from availability.v1 import dashboard_pb2_grpc as dashboard_pb_grpc

from .helpers import Fleet, eventually, runtime_role, stop_process, store_env
from .test_process import _wait_serving


def _serve(settings: Settings, url: str, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    address = f"127.0.0.1:{free_port()}"
    env = store_env(
        replace(settings, database_url=url),
        address,
        MIGRATE_ON_START="false",
        METRICS_ADDRESS="",
        **extra,
    )
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "availability", "serve"], env=env, stdout=out, stderr=out
        )
    process.address = address  # type: ignore[attr-defined]
    return process


async def test_serve_as_the_runtime_role_does_everything_the_service_does(
    settings: Settings,
    db: asyncpg.Connection,
    fleet: Fleet,
    runtime_database_url: str,
    tmp_path: Path,
) -> None:
    log = tmp_path / "serve.log"
    process = _serve(settings, runtime_database_url, log, CHANGE_POLL_SECONDS="0.02")
    try:
        await asyncio.to_thread(_wait_serving, process.address, process, log)  # type: ignore[attr-defined]
        mitra = await fleet.mitra("Runtime", capacity=3)
        session = await fleet.auth_session(mitra)
        async with grpc.aio.insecure_channel(process.address) as channel:  # type: ignore[attr-defined]
            stub = pb_grpc.AvailabilityServiceStub(channel)
            dashboard = dashboard_pb_grpc.DashboardServiceStub(channel)
            await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
            assert (await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra)))).online
            await fleet.session(mitra, "active")  # the chat backend writes its table

            async def load_followed() -> bool:
                found = await stub.FindAvailableMitras(pb.FindAvailableMitrasRequest())
                return [m.load for m in found.mitras if m.mitra_id == str(mitra)] == [1]

            await eventually(load_followed, what="load follows chat_sessions")
            loads = await stub.RecomputeLoad(pb.RecomputeLoadRequest(mitra_ids=[str(mitra)]))
            assert [entry.load for entry in loads.loads] == [1]
            stats = await dashboard.GetDashboardStats(dashboard_pb.GetDashboardStatsRequest())
            assert stats.active_chats == 1 and stats.online_mitras == 1
            deactivated = await stub.SetMitraActive(
                pb.SetMitraActiveRequest(mitra_id=str(mitra), active=False)
            )
            assert deactivated.revoked_auth_sessions == 1 and not deactivated.status.online
    finally:
        stop_process(process)
    text = log.read_text()
    assert "Traceback" not in text and "permission denied" not in text.lower(), text[-3000:]
    assert "change listener lost Postgres" not in text, "the listener held its connection"
    revoked = await db.fetchval("SELECT revoked_at FROM auth_sessions WHERE id = $1", session)
    audited = await db.fetchval(
        "SELECT count(*) FROM availability_audit WHERE mitra_id = $1 AND action = 'set_active'",
        mitra,
    )
    assert revoked is not None and audited == 1


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE mitras CASCADE",
        "UPDATE availability_audit SET caller = 'someone else'",
        "DELETE FROM availability_audit",
        "UPDATE chat_sessions SET status = 'ended'",
        "TRUNCATE mitra_online_status",
        "ALTER TABLE mitras ADD COLUMN x int",
        "UPDATE mitras SET display_name = 'x'",
        "LOCK TABLE chat_sessions IN SHARE MODE",
    ],
)
async def test_the_runtime_role_cannot_do_what_serve_never_does(
    runtime_database_url: str, statement: str
) -> None:
    conn = await asyncpg.connect(runtime_database_url)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with conn.transaction():
                await conn.execute(statement)
    finally:
        await conn.close()


def test_a_missing_grant_stops_start_up_in_one_line_naming_it(
    settings: Settings, database_url: str, tmp_path: Path
) -> None:
    role = f"availability_short_{uuid.uuid4().hex[:6]}"
    revoked = f'REVOKE INSERT ON availability_audit FROM "{role}"'
    runs = {}
    with runtime_role(database_url, role, revoked) as url:
        for migrate in ("false", "true"):
            env = store_env(
                replace(settings, database_url=url),
                f"127.0.0.1:{free_port()}",
                MIGRATE_ON_START=migrate,
                METRICS_ADDRESS="",
                STARTUP_TIMEOUT_SECONDS="20",
            )
            runs[migrate] = subprocess.run(
                [sys.executable, "-m", "availability", "serve"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
    serving, migrating = runs["false"], runs["true"]
    assert serving.returncode == 1, serving.stderr
    assert f"the database role {role} lacks INSERT on availability_audit" in serving.stderr
    assert f"availability grants {role}" in serving.stderr
    assert migrating.returncode == 1
    assert "does not own the schema" in migrating.stderr
    for run in (serving, migrating):
        assert "Traceback" not in run.stderr
        assert (
            len([line for line in run.stderr.splitlines() if "ERROR" in line or "lacks" in line])
            <= 2
        )


def test_grants_prints_sql_for_a_role_and_refuses_a_bad_name() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "availability", "grants", "availability_app"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert printed.returncode == 0
    assert 'GRANT SELECT ON chat_sessions TO "availability_app";' in printed.stdout
    assert "UPDATE ON chat_sessions" not in printed.stdout
    assert 'GRANT INSERT ON availability_audit TO "availability_app";' in printed.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "availability", "grants", 'x"; DROP TABLE mitras; --'],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2 and "expected a role name" in refused.stderr


async def test_a_grant_revoked_under_a_running_service_backs_off_and_shows_until_restored(
    settings: Settings, db: asyncpg.Connection, runtime_database_url: str
) -> None:
    """The change listener loses DELETE on the change table: it retries with backoff, not a
    reconnect and a full rebuild of the mirror every 0.1 s, says so once, and status shows
    it as a problem until the grant is back."""
    from availability.server import running

    from .test_status import reported

    role = runtime_database_url.partition("://")[2].partition("@")[0]
    async with running(replace(settings, database_url=runtime_database_url)) as server:
        listener = server.listener
        assert listener is not None
        await db.execute(f'REVOKE DELETE ON availability_changes FROM "{role}"')
        try:
            await eventually(lambda: _failing(listener), timeout=10, what="listener failing")
            before = listener.reconnects
            await asyncio.sleep(6)
            rebuilds = listener.reconnects - before
            problems = (await reported(server))["problems"]
        finally:
            await db.execute(f'GRANT DELETE ON availability_changes TO "{role}"')
        await eventually(lambda: _recovered(listener), timeout=40, what="listener recovered")
    # The backoff (0.1, 0.5, 1, 2, 5 s ...) allows 4 or 5 in 6 s; without it, one every 0.1 s.
    assert rebuilds <= 5, f"{rebuilds} reconnects and rebuilds in 6 s"
    assert any("change listener failing" in p and "permission" in p.lower() for p in problems)


async def _failing(listener: object) -> bool:
    return getattr(listener, "last_error", None) is not None


async def _recovered(listener: object) -> bool:
    return getattr(listener, "last_error", None) is None


async def test_a_sweep_that_loses_a_grant_backs_off_logs_once_and_shows_until_restored(
    settings: Settings,
    db: asyncpg.Connection,
    runtime_database_url: str,
    fleet: Fleet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The auto-offline sweep loses UPDATE on sweep_fences (its fence): every run fails the
    same way, so it waits ever longer between tries instead of failing every 0.2 s, logs the
    error once, and status shows it as a problem until the grant is back."""
    from availability.server import running
    from availability.sweeps import AUTO_OFFLINE

    from .test_status import reported

    role = runtime_database_url.partition("://")[2].partition("@")[0]
    quick = replace(
        settings,
        database_url=runtime_database_url,
        mitra_auto_offline_sweep_seconds=0.2,
        heartbeat_stale_seconds=1.0,
    )
    await fleet.mitra("Gone quiet", online=True, heartbeat_age=3600)  # stale: a take is due
    async with running(quick) as server:
        assert server.sweeps is not None
        stats = server.sweeps.report.of(AUTO_OFFLINE)
        await db.execute(f'REVOKE UPDATE ON sweep_fences FROM "{role}"')
        try:
            await eventually(lambda: _true(stats.failing is not None), what="the sweep failing")
            tries = stats.aborted
            await asyncio.sleep(4)
            tries = stats.aborted - tries
            problems = (await reported(server))["problems"]
        finally:
            await db.execute(f'GRANT UPDATE ON sweep_fences TO "{role}"')
        await eventually(lambda: _true(stats.failing is None), timeout=20, what="recovered")
    logged = [r for r in caplog.records if "auto_offline failed" in r.getMessage()]
    # 0.2 s doubling: at most 4 tries in 4 s (without the backoff, 20).
    assert tries <= 4, f"{tries} failed runs in 4 s"
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert "InsufficientPrivilegeError" in logged[0].getMessage()
    assert any(
        "auto_offline failing" in p and "InsufficientPrivilegeError" in p for p in problems
    ), problems


async def _true(value: bool) -> bool:
    return value
