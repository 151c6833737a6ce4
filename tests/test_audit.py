"""The audit trail: who changed which mitra's state, written in the transaction of the change
(a row that cannot be written fails the change), none for refused calls, and
`availability audit` to read it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from uuid import UUID

import asyncpg
import grpc
import pytest

from availability.server import running
from availability.settings import Settings
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .callers_file import token, write_callers
from .helpers import Fleet, code_of

ADMIN, OPERATOR, APP, READER = (token(n) for n in ("admin", "operator", "app", "reader"))
CALLERS = {
    "admin-console": {"tokens": [ADMIN], "scopes": ["admin", "read"]},
    "ops-console": {"tokens": [OPERATOR], "scopes": ["admin", "presence"]},
    "mitra-app": {"tokens": [APP], "scopes": ["presence"]},
    "pairing": {"tokens": [READER], "scopes": ["read"]},
    "slow-admin": {
        "tokens": [token("slow")],
        "scopes": ["admin"],
        "max_calls_per_second": 0.01,
        "burst": 1,
    },
}
SLOW_ADMIN = CALLERS["slow-admin"]["tokens"][0]  # type: ignore[index]
Stub = pb_grpc.AvailabilityServiceStub


def as_caller(secret: str, request_id: str = "") -> tuple[tuple[str, str], ...]:
    metadata = (("authorization", f"Bearer {secret}"),)
    return (*metadata, ("x-request-id", request_id)) if request_id else metadata


@pytest.fixture
async def audit(db: asyncpg.Connection) -> asyncpg.Connection:
    """The database connection, with this test's audit table empty."""
    await db.execute("TRUNCATE availability_audit")
    return db


@pytest.fixture
async def stub(
    settings: Settings, audit: asyncpg.Connection, tmp_path: Path
) -> AsyncIterator[Stub]:
    path = tmp_path / "callers.toml"
    write_callers(path, CALLERS)
    async with (
        running(replace(settings, auth_callers_file=str(path))) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield pb_grpc.AvailabilityServiceStub(channel)


async def rows(db: asyncpg.Connection) -> list[dict[str, object]]:
    found = await db.fetch("SELECT * FROM availability_audit ORDER BY id")
    return [dict(r) for r in found]


async def test_set_mitra_active_records_who_when_what_and_the_sessions_revoked(
    stub: Stub, audit: asyncpg.Connection, fleet: Fleet
) -> None:
    mitra = await fleet.mitra(online=True)
    for _ in range(2):
        await fleet.auth_session(mitra)
    off = await stub.SetMitraActive(
        pb.SetMitraActiveRequest(mitra_id=str(mitra), active=False),
        metadata=as_caller(ADMIN, "deactivate-7f3a"),
    )
    await stub.SetMitraActive(
        pb.SetMitraActiveRequest(mitra_id=str(mitra), active=True), metadata=as_caller(ADMIN)
    )
    changed_at = await audit.fetchval("SELECT updated_at FROM mitra_online_status")

    first, second = await rows(audit)
    assert off.revoked_auth_sessions == 2
    assert {k: first[k] for k in first if k not in ("id", "at")} == {
        "caller": "admin-console",
        "request_id": "deactivate-7f3a",
        "action": "set_active",
        "mitra_id": mitra,
        "active_before": True,
        "active_after": False,
        "online_before": True,
        "online_after": False,
        "revoked_auth_sessions": 2,
    }
    assert second["caller"] == "admin-console" and second["request_id"], "an id is made"
    assert (second["active_before"], second["active_after"]) == (False, True)
    assert (second["online_before"], second["online_after"]) == (False, False)
    assert second["revoked_auth_sessions"] == 0
    assert second["at"] == changed_at, "the row is the change's transaction's"


async def test_presence_changes_are_audited_for_admin_callers_only(
    stub: Stub, audit: asyncpg.Connection, fleet: Fleet
) -> None:
    mitra = str(await fleet.mitra())
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=mitra), metadata=as_caller(APP))
    await stub.SetOffline(pb.SetOfflineRequest(mitra_id=mitra), metadata=as_caller(APP))
    await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=mitra), metadata=as_caller(OPERATOR))
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=mitra), metadata=as_caller(OPERATOR))
    await stub.SetOffline(pb.SetOfflineRequest(mitra_id=mitra), metadata=as_caller(OPERATOR))

    found = [
        (r["caller"], r["action"], r["online_before"], r["online_after"]) for r in await rows(audit)
    ]
    assert found == [
        ("ops-console", "set_online", False, True),
        ("ops-console", "set_offline", True, False),
    ]


async def test_refused_and_failed_calls_write_no_row(
    stub: Stub, audit: asyncpg.Connection, fleet: Fleet
) -> None:
    mitra = str(await fleet.mitra())
    deactivated = str(await fleet.mitra(active=False))
    deactivate = pb.SetMitraActiveRequest(mitra_id=mitra, active=False)
    codes = [
        await code_of(stub.SetMitraActive(deactivate, metadata=as_caller(READER))),
        await code_of(stub.SetMitraActive(deactivate, metadata=as_caller(APP))),
        await code_of(stub.SetMitraActive(deactivate, metadata=as_caller(token("stranger")))),
        await code_of(stub.SetMitraActive(deactivate)),
        await code_of(
            stub.SetMitraActive(
                pb.SetMitraActiveRequest(mitra_id=str(UUID(int=7)), active=False),
                metadata=as_caller(ADMIN),
            )
        ),
        await code_of(
            stub.SetOnline(pb.SetOnlineRequest(mitra_id=deactivated), metadata=as_caller(OPERATOR))
        ),
        await code_of(stub.SetMitraActive(deactivate, metadata=as_caller(SLOW_ADMIN))),
        await code_of(stub.SetMitraActive(deactivate, metadata=as_caller(SLOW_ADMIN))),
    ]
    code = grpc.StatusCode
    assert codes == [
        code.PERMISSION_DENIED,
        code.PERMISSION_DENIED,
        code.UNAUTHENTICATED,
        code.UNAUTHENTICATED,
        code.NOT_FOUND,
        code.FAILED_PRECONDITION,
        code.OK,
        code.RESOURCE_EXHAUSTED,
    ]
    assert [(r["caller"], r["action"]) for r in await rows(audit)] == [("slow-admin", "set_active")]


@pytest.fixture
async def audit_fails_for_doomed(audit: asyncpg.Connection) -> AsyncIterator[None]:
    """A real failure of the audit insert in Postgres (a trigger raising), for one caller."""
    await audit.execute(
        """
        CREATE FUNCTION test_refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.caller = 'ops-console' THEN
                RAISE EXCEPTION 'audit refused by the test';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER test_refuse_audit BEFORE INSERT ON availability_audit
            FOR EACH ROW EXECUTE FUNCTION test_refuse_audit();
        """
    )
    try:
        yield
    finally:
        await audit.execute(
            "DROP TRIGGER test_refuse_audit ON availability_audit;"
            " DROP FUNCTION test_refuse_audit()"
        )


async def test_a_change_whose_audit_row_cannot_be_written_is_not_made(
    stub: Stub, audit: asyncpg.Connection, fleet: Fleet, audit_fails_for_doomed: None
) -> None:
    mitra = await fleet.mitra(online=True)
    session = await fleet.auth_session(mitra)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.SetMitraActive(
            pb.SetMitraActiveRequest(mitra_id=str(mitra), active=False),
            metadata=as_caller(OPERATOR),
        )
    with pytest.raises(grpc.aio.AioRpcError) as presence:
        await stub.SetOffline(
            pb.SetOfflineRequest(mitra_id=str(mitra)), metadata=as_caller(OPERATOR)
        )
    status = await stub.GetMitraStatus(
        pb.GetMitraStatusRequest(mitra_id=str(mitra)), metadata=as_caller(ADMIN)
    )
    allowed = await stub.SetOffline(
        pb.SetOfflineRequest(mitra_id=str(mitra)), metadata=as_caller(APP)
    )

    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "audit row could not be written" in (failed.value.details() or "")
    assert presence.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await audit.fetchval("SELECT is_active FROM mitras WHERE id = $1", mitra) is True
    assert (
        await audit.fetchval("SELECT revoked_at FROM auth_sessions WHERE id = $1", session) is None
    )
    assert status.status.active and status.status.online, "the mirror was not told either"
    assert not allowed.status.online, "unaudited changes go on"
    assert await rows(audit) == []


async def test_without_named_callers_activation_alone_is_audited(
    settings: Settings, audit: asyncpg.Connection, fleet: Fleet
) -> None:
    mitra = await fleet.mitra()
    request = pb.SetMitraActiveRequest(mitra_id=str(mitra), active=False)
    async with (
        running(settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        await pb_grpc.AvailabilityServiceStub(channel).SetMitraActive(request)
        await pb_grpc.AvailabilityServiceStub(channel).SetOnline(
            pb.SetOnlineRequest(mitra_id=str(await fleet.mitra()))
        )
    async with (
        running(replace(settings, auth_tokens=("all-access-token",))) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        await pb_grpc.AvailabilityServiceStub(channel).SetMitraActive(
            request, metadata=as_caller("all-access-token")
        )
        await pb_grpc.AvailabilityServiceStub(channel).SetOnline(
            pb.SetOnlineRequest(mitra_id=str(await fleet.mitra())),
            metadata=as_caller("all-access-token"),
        )
    assert [(r["caller"], r["action"]) for r in await rows(audit)] == [
        ("anonymous", "set_active"),
        ("token", "set_active"),
    ]


def audit_command(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`availability audit` with DATABASE_URL alone: it needs no Valkey."""
    return subprocess.run(
        [sys.executable, "-m", "availability", "audit", *args],
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": settings.database_url},
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


async def test_availability_audit_lists_changes_by_mitra_and_time(
    stub: Stub, settings: Settings, audit: asyncpg.Connection, fleet: Fleet
) -> None:
    ayu, budi = await fleet.mitra("Ayu"), await fleet.mitra("Budi")
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(ayu)), metadata=as_caller(APP))
    for mitra in (ayu, budi):
        await stub.SetMitraActive(
            pb.SetMitraActiveRequest(mitra_id=str(mitra), active=False),
            metadata=as_caller(ADMIN, f"off-{mitra}"),
        )

    everything = audit_command(settings, "--json")
    of_ayu = audit_command(settings, "--mitra", str(ayu), "--since", "1h", "--json")
    future = audit_command(settings, "--since", "2099-01-01T00:00:00Z", "--json")
    text = audit_command(settings, "--mitra", str(budi))
    bad_since = audit_command(settings, "--since", "yesterday-ish")
    bad_mitra = audit_command(settings, "--mitra", "ayu")

    assert everything.returncode == 0, everything.stderr
    listed = json.loads(everything.stdout)
    assert [(r["mitra_id"], r["caller"]) for r in listed] == [
        (str(ayu), "admin-console"),
        (str(budi), "admin-console"),
    ]
    (only,) = json.loads(of_ayu.stdout)
    assert only["request_id"] == f"off-{ayu}" and only["active_after"] is False
    assert json.loads(future.stdout) == []
    assert text.returncode == 0 and str(budi) in text.stdout and str(ayu) not in text.stdout
    assert "admin-console" in text.stdout and "active yes->no" in text.stdout
    assert bad_since.returncode == 2 and "--since" in bad_since.stderr
    assert bad_mitra.returncode == 2 and "--mitra" in bad_mitra.stderr
    for run in (bad_since, bad_mitra):
        assert "Traceback" not in run.stderr


async def test_every_presence_change_is_one_info_event_with_who_before_after_and_request(
    stub: Stub, audit: asyncpg.Connection, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """Not only the audited ones: a presence caller's changes and the sweep's are logged."""
    mitra = await fleet.mitra()
    caplog.set_level(logging.INFO, logger="availability.changes")
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)), metadata=as_caller(APP, "on-1"))
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)), metadata=as_caller(APP, "on-2"))
    await stub.SetOffline(
        pb.SetOfflineRequest(mitra_id=str(mitra)), metadata=as_caller(OPERATOR, "off-1")
    )
    events = [
        (r.action, r.changed_mitra, r.online_before, r.online_after, r.changed_by, r.request_id)  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "event", None) == "presence_changed"
    ]
    assert events == [
        ("set_online", str(mitra), False, True, "mitra-app", "on-1"),
        ("set_online", str(mitra), True, True, "mitra-app", "on-2"),
        ("set_offline", str(mitra), True, False, "ops-console", "off-1"),
    ]
    assert all(
        r.levelno == logging.INFO for r in caplog.records if r.name == "availability.changes"
    )
    assert len(await rows(audit)) == 1, "the audit table keeps the admin caller's change only"
