"""Presence bound to mitras (bind_presence = "auth_session"): a backend's token moves only
the mitras whose live auth session the call carries; revoked, expired, another mitra's or
missing sessions are refused with PERMISSION_DENIED naming the mitra and never the session;
a batch refuses per id; once a session is known, the check stays off Postgres; a logout or
deactivation in Postgres voids the cached session through the change feed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from uuid import uuid4

import asyncpg
import grpc
import pytest

from availability.callers import CallersError, parse
from availability.client import AvailabilityClient
from availability.local_stores import LocalValkey
from availability.server import Server, running
from availability.settings import Settings
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .callers_file import callers_toml, token, write_callers
from .helpers import Fleet, scrape_metrics, settled

DENIED = grpc.StatusCode.PERMISSION_DENIED
_Result = pb.HeartbeatResult

APP, LEGACY, ADMIN = token("app"), token("legacy"), token("admin")


def bearer(secret: str, session: object = None) -> tuple[tuple[str, str], ...]:
    metadata = (("authorization", f"Bearer {secret}"),)
    if session is not None:
        metadata += (("x-mitra-session", str(session)),)
    return metadata


@contextlib.asynccontextmanager
async def serving_bound(
    settings: Settings, path: Path
) -> AsyncIterator[tuple[Server, pb_grpc.AvailabilityServiceStub]]:
    """A server where `app` acts for mitras, `legacy` holds presence unbound, `admin` admin."""
    write_callers(
        path,
        {
            "app": {
                "tokens": [APP],
                "scopes": ["presence", "read"],
                "bind_presence": "auth_session",
            },
            "legacy": {"tokens": [LEGACY], "scopes": ["presence"]},
            "admin": {"tokens": [ADMIN], "scopes": ["admin", "read"]},
        },
    )
    guarded = replace(settings, auth_callers_file=str(path), auth_callers_poll_seconds=0.1)
    async with (
        running(guarded) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield server, pb_grpc.AvailabilityServiceStub(channel)


@pytest.fixture
async def bound(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> AsyncIterator[tuple[Server, pb_grpc.AvailabilityServiceStub]]:
    async with serving_bound(settings, tmp_path / "callers.toml") as served:
        yield served


async def code_and_details(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_a_bound_token_moves_only_the_mitras_whose_session_it_carries(
    bound: tuple[Server, pb_grpc.AvailabilityServiceStub], fleet: Fleet, db: asyncpg.Connection
) -> None:
    _, stub = bound
    ayu, budi = await fleet.mitra("Ayu"), await fleet.mitra("Budi")
    ayus = await fleet.auth_session(ayu)
    budis = await fleet.auth_session(budi)

    online = await stub.SetOnline(
        pb.SetOnlineRequest(mitra_id=str(ayu)), metadata=bearer(APP, ayus)
    )
    assert online.status.online
    for session in (ayus, None, "not-a-session", uuid4()):
        for rpc, request in (
            (stub.SetOnline, pb.SetOnlineRequest(mitra_id=str(budi))),
            (stub.SetOffline, pb.SetOfflineRequest(mitra_id=str(budi))),
            (stub.Heartbeat, pb.HeartbeatRequest(mitra_id=str(budi))),
        ):
            code, details = await code_and_details(rpc(request, metadata=bearer(APP, session)))
            assert code == DENIED, (session, code, details)
            assert str(budi) in details and "x-mitra-session" in details
            assert str(ayus) not in details and str(budis) not in details, "never the session"
    row = await fleet.online_row(budi)
    assert row is None or not row["is_online"], "Budi was never moved"

    beat = await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(ayu)), metadata=bearer(APP, ayus))
    assert beat.online
    offline = await stub.SetOffline(
        pb.SetOfflineRequest(mitra_id=str(ayu)), metadata=bearer(APP, ayus)
    )
    assert not offline.status.online
    # Binding is the caller's: an unbound presence caller moves anyone, as before.
    moved = await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(budi)), metadata=bearer(LEGACY))
    assert moved.status.online


async def test_revoked_expired_and_logged_out_sessions_are_refused(
    bound: tuple[Server, pb_grpc.AvailabilityServiceStub], fleet: Fleet, db: asyncpg.Connection
) -> None:
    server, stub = bound
    ayu = await fleet.mitra("Ayu")
    revoked = await fleet.auth_session(ayu, revoked=True)
    expired = await fleet.auth_session(ayu, expires_in=timedelta(seconds=-1))
    live = await fleet.auth_session(ayu)
    request = pb.SetOnlineRequest(mitra_id=str(ayu))
    for session in (revoked, expired):
        code, details = await code_and_details(
            stub.SetOnline(request, metadata=bearer(APP, session))
        )
        assert code == DENIED and str(ayu) in details

    await stub.SetOnline(request, metadata=bearer(APP, live))
    beat = pb.HeartbeatRequest(mitra_id=str(ayu))
    assert (await stub.Heartbeat(beat, metadata=bearer(APP, live))).online  # cached now
    # The chat backend logs the app out, in its own SQL: the cached session is voided.
    await db.execute("UPDATE auth_sessions SET revoked_at = now() WHERE id = $1", live)
    await settled(server, db)
    code, _ = await code_and_details(stub.Heartbeat(beat, metadata=bearer(APP, live)))
    assert code == DENIED

    # A deactivation revokes every session: refused at once, then by the session too.
    again = await fleet.auth_session(ayu)
    assert (await stub.Heartbeat(beat, metadata=bearer(APP, again))).online
    await stub.SetMitraActive(
        pb.SetMitraActiveRequest(mitra_id=str(ayu), active=False), metadata=bearer(ADMIN)
    )
    code, _ = await code_and_details(stub.Heartbeat(beat, metadata=bearer(APP, again)))
    assert code == DENIED
    await stub.SetMitraActive(
        pb.SetMitraActiveRequest(mitra_id=str(ayu), active=True), metadata=bearer(ADMIN)
    )
    await settled(server, db)
    code, _ = await code_and_details(stub.SetOnline(request, metadata=bearer(APP, again)))
    assert code == DENIED, "reactivation does not bring a revoked session back"


async def test_a_batch_refuses_per_id_and_needs_a_session_per_id(
    bound: tuple[Server, pb_grpc.AvailabilityServiceStub], fleet: Fleet
) -> None:
    _, stub = bound
    mitras = [await fleet.mitra(f"M{i}", online=True) for i in range(3)]
    sessions = [await fleet.auth_session(m) for m in mitras]
    ids = [str(m) for m in mitras]
    reply = await stub.BatchHeartbeat(
        pb.BatchHeartbeatRequest(
            mitra_ids=[*ids, ids[0]],
            # The second carries the first mitra's session; the last repeats a good pair.
            mitra_sessions=[str(sessions[0]), str(sessions[0]), str(sessions[2]), str(sessions[0])],
        ),
        metadata=bearer(APP),
    )
    assert [r.outcome for r in reply.results] == [
        _Result.OUTCOME_RECORDED,
        _Result.OUTCOME_SESSION_REFUSED,
        _Result.OUTCOME_RECORDED,
        _Result.OUTCOME_RECORDED,
    ]
    assert not reply.results[1].online

    code, details = await code_and_details(
        stub.BatchHeartbeat(pb.BatchHeartbeatRequest(mitra_ids=ids), metadata=bearer(APP))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "mitra_sessions" in details


async def test_once_a_session_is_known_the_check_stays_off_postgres(
    bound: tuple[Server, pb_grpc.AvailabilityServiceStub], fleet: Fleet
) -> None:
    server, stub = bound
    assert server.availability is not None
    checked = server.availability.sessions.checked
    ayu = await fleet.mitra("Ayu", online=True)
    session = await fleet.auth_session(ayu)
    beat = pb.HeartbeatRequest(mitra_id=str(ayu))
    await stub.Heartbeat(beat, metadata=bearer(APP, session))
    from_postgres = checked.get("database", 0)
    assert from_postgres >= 1
    for _ in range(20):
        assert (await stub.Heartbeat(beat, metadata=bearer(APP, session))).online
    assert checked.get("database", 0) == from_postgres
    assert checked.get("cache", 0) >= 20
    scraped = await scrape_metrics(server.metrics.port)  # type: ignore[union-attr]
    assert scraped[("availability_session_checks_total", (("answered", "cache"),))] >= 20


async def test_the_python_client_passes_the_session(
    bound: tuple[Server, pb_grpc.AvailabilityServiceStub], fleet: Fleet
) -> None:
    server, _ = bound
    ayu, budi = await fleet.mitra("Ayu"), await fleet.mitra("Budi")
    ayus = await fleet.auth_session(ayu)
    async with AvailabilityClient(f"127.0.0.1:{server.port}", token=APP) as client:
        assert (await client.set_online(ayu, mitra_session=ayus)).online
        assert await client.heartbeat(ayu, mitra_session=ayus)  # coalesced into a batch
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.heartbeat(budi, mitra_session=ayus)
        assert refused.value.code() == DENIED and str(budi) in (refused.value.details() or "")
        results = await client.batch_heartbeat([ayu, budi], [ayus, ayus])
        assert [r.outcome for r in results] == [
            _Result.OUTCOME_RECORDED,
            _Result.OUTCOME_SESSION_REFUSED,
        ]
        assert not (await client.set_offline(ayu, mitra_session=ayus)).online


async def test_with_valkey_gone_postgres_checks_the_session(
    settings: Settings,
    own_valkey: LocalValkey,
    db: asyncpg.Connection,
    fleet: Fleet,
    tmp_path: Path,
) -> None:
    """Never a pass without a check: a mirror that cannot answer sends the check to Postgres."""
    on_own = replace(settings, valkey_url=own_valkey.url)
    async with serving_bound(on_own, tmp_path / "callers.toml") as (_, stub):
        ayu, budi = await fleet.mitra("Ayu", online=True), await fleet.mitra("Budi", online=True)
        ayus = await fleet.auth_session(ayu)
        own_valkey.stop()
        assert (
            await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(ayu)), metadata=bearer(APP, ayus))
        ).online
        code, _ = await code_and_details(
            stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(budi)), metadata=bearer(APP, ayus))
        )
        assert code == DENIED


def test_bind_presence_takes_auth_session_only() -> None:
    ok = parse(
        callers_toml(
            {"app": {"tokens": [APP], "scopes": ["presence"], "bind_presence": "auth_session"}}
        ).encode()
    )
    assert ok.callers[0].bind_presence
    with pytest.raises(CallersError, match=r"callers\.app\.bind_presence must be 'auth_session'"):
        parse(
            callers_toml(
                {"app": {"tokens": [APP], "scopes": ["presence"], "bind_presence": "yes"}}
            ).encode()
        )
