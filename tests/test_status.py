"""`availability status` against started servers: a healthy deployment, a lost Valkey, drift
between the stores, a tripped mass-stale guard, and the command as on-call runs it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import redis.asyncio as redis

from availability.local_stores import LocalValkey
from availability.mirror import Keys
from availability.server import Server, running
from availability.settings import Settings
from availability.status import gather, render
from availability.sweeps import AUTO_OFFLINE, RECONCILE, SWEEPS
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet, code_of, eventually, make_stale, notified, server_env
from .test_sweeps import sweeps_of, tick

Stub = pb_grpc.AvailabilityServiceStub


async def status_of(server: Server) -> dict[str, Any]:
    return await gather(server.settings, address=f"127.0.0.1:{server.port}")


async def reported(server: Server) -> dict[str, Any]:
    """The status once this server has announced itself."""
    owner = sweeps_of(server).owner

    async def announced() -> bool:
        return owner in (await status_of(server))["instances"]

    await eventually(announced)
    return await status_of(server)


async def test_a_healthy_deployment_reports_ok_with_counts_leaders_and_instances(
    server: Server, fleet: Fleet
) -> None:
    for _ in range(3):
        await fleet.mitra(online=True)
    await tick(server, RECONCILE)
    await tick(server, AUTO_OFFLINE)

    report = await reported(server)

    assert report["ok"] and report["problems"] == [], report["problems"]
    assert report["server"]["health"] == "SERVING"
    assert report["postgres"]["online"] == 3 and report["postgres"]["standby"] is False
    assert report["valkey"]["seeded"] and report["valkey"]["online"] == 3
    assert report["drift"] == {"online_mirror_minus_truth": 0}
    owner = sweeps_of(server).owner
    for name in (RECONCILE, AUTO_OFFLINE):
        sweep = report["sweeps"][name]
        assert sweep["leader"] == owner and sweep["last"]["outcome"] == "ok"
        assert sweep["last"]["instance"] == owner and sweep["last"]["age_seconds"] < 30
    assert report["sweeps"][RECONCILE]["last"]["mitras"] == 3
    instance = report["instances"][owner]
    assert instance["serving"] and not instance["valkey_breaker_open"]
    assert instance["address"].endswith(f":{server.port}")
    assert instance["postgres_listener_connected"]
    text = render(report)
    assert text.splitlines()[0].endswith(": OK") and owner in text


async def test_a_lost_valkey_is_degraded_and_points_at_the_runbook(
    server_on_own_valkey: Server, own_valkey: LocalValkey
) -> None:
    await reported(server_on_own_valkey)
    own_valkey.stop()

    report = await status_of(server_on_own_valkey)

    assert not report["ok"]
    assert any("Valkey unreachable" in p and "Valkey lost" in p for p in report["problems"])
    assert report["server"]["health"] == "SERVING", "the server answers from Postgres"
    assert "ERROR" in render(report) and "DEGRADED" in render(report)

    async def from_postgres() -> bool:
        return (await status_of(server_on_own_valkey))["server"]["source"] == "DATABASE"

    await eventually(from_postgres)


async def test_lookups_of_ids_the_mirror_does_not_know_leave_a_healthy_deployment_ok(
    server: Server, stub: Stub
) -> None:
    for _ in range(3):
        request = pb.GetMitraStatusRequest(mitra_id=str(uuid.uuid4()))
        assert await code_of(stub.GetMitraStatus(request)) == grpc.StatusCode.NOT_FOUND
    owner = sweeps_of(server).owner

    async def counted() -> dict[str, Any] | None:
        report = await status_of(server)
        return report if report["instances"].get(owner, {}).get("mirror_misses") == 3 else None

    report = await eventually(counted, timeout=10)

    assert report["ok"] and report["problems"] == [], report["problems"]
    instance = report["instances"][owner]
    assert instance["fallbacks"] == instance["recent_fallbacks"] == 0
    assert "fallbacks 0 (0 recent)  misses 3" in render(report)


async def test_fallbacks_because_valkey_failed_are_a_note_then_a_problem_until_they_stop(
    server_on_own_valkey: Server, stub_own: Stub, own_valkey: LocalValkey
) -> None:
    server = server_on_own_valkey
    await reported(server)
    owner = sweeps_of(server).owner

    async def outage(reads: int) -> None:
        own_valkey.stop()
        for _ in range(reads):
            await stub_own.FindAvailableMitras(pb.FindAvailableMitrasRequest())
        own_valkey.start()

    async def fell_back(among: str, named: bool) -> dict[str, Any] | None:
        report = await status_of(server)
        found = any("fell back to Postgres" in line for line in report[among])
        return report if found == named and owner in report["instances"] else None

    await outage(1)
    blip = await eventually(lambda: fell_back("notes", True), timeout=10)
    assert not any("fell back" in p for p in blip["problems"]), "one timeout is a blip"

    await outage(5)
    report = await eventually(lambda: fell_back("problems", True), timeout=10)

    instance = report["instances"][owner]
    assert instance["recent_fallbacks"] >= 5 and instance["mirror_misses"] == 0
    (problem,) = [p for p in report["problems"] if "fell back" in p]
    assert problem.startswith(f"instance {owner}: ") and "Runbook: Valkey lost" in problem
    calm = await eventually(lambda: fell_back("problems", False), timeout=20)
    assert calm["instances"][owner]["fallbacks"] == instance["fallbacks"], "the total stays"


async def test_drift_between_the_stores_is_a_problem(
    server: Server, fleet: Fleet, valkey: redis.Redis
) -> None:
    mitras = [await fleet.mitra(online=True) for _ in range(10)]
    keys = Keys.for_prefix(server.settings.valkey_key_prefix)
    await notified(valkey, keys, *mitras)
    await valkey.srem(keys.online, *(str(m) for m in mitras[:7]))

    report = await status_of(server)

    assert report["drift"] == {"online_mirror_minus_truth": -7}
    assert any("Drift alarms" in p for p in report["problems"]), report["problems"]
    await tick(server, RECONCILE)
    healed = await status_of(server)
    assert healed["drift"] == {"online_mirror_minus_truth": 0}
    assert not any("Drift alarms" in p for p in healed["problems"])
    assert any("healed drift" in note for note in healed["notes"])


async def test_a_tripped_mass_stale_guard_is_a_problem(
    settings: Settings, fleet: Fleet, valkey: redis.Redis, db: asyncpg.Connection
) -> None:
    guarded = replace(settings, mass_stale_min=10, mass_stale_max_per_sweep=4)
    mitras = [await fleet.mitra(online=True) for _ in range(30)]
    async with running(guarded) as server:
        seeded = (await status_of(server))["sweeps"][RECONCILE]["last"]
        assert seeded["at_start_up"] and seeded["mitras"] == 30, "the seed counts as a run"
        await make_stale(valkey, db, Keys.for_prefix(guarded.valkey_key_prefix), *mitras[:20])
        await tick(server, AUTO_OFFLINE)

        report = await status_of(server)

    last = report["sweeps"][AUTO_OFFLINE]["last"]
    assert last["guard_tripped"] and last["stale"] == 20 and last["affected"] == 4
    assert any("mass-stale guard tripped" in p for p in report["problems"])


async def test_the_command_prints_and_exits_by_health(server: Server, tmp_path: Path) -> None:
    env = server_env(server)
    await reported(server)
    for sweep in SWEEPS:
        await tick(server, sweep)

    async def run(*args: str, **changes: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "availability",
            "status",
            *args,
            env={**env, **changes},
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await process.communicate()
        assert process.returncode is not None
        return process.returncode, out.decode()

    code, text = await run()
    assert code == 0, text
    assert text.startswith("availability status at") and "SERVING" in text
    code, out = await run("--json")
    assert code == 0 and json.loads(out)["ok"] is True
    code, text = await run("--address", "127.0.0.1:1", "--timeout", "1")
    assert code == 1 and "did not answer" in text


async def test_the_command_finds_the_stores_make_run_started(
    server: Server, tmp_path: Path
) -> None:
    settings = server.settings
    (tmp_path / ".data").mkdir()
    (tmp_path / ".data" / "dev.env").write_text(
        f"DATABASE_URL={settings.database_url}\nVALKEY_URL={settings.valkey_url}\n"
        f"GRPC_ADDRESS=127.0.0.1:{server.port}\nVALKEY_KEY_PREFIX={settings.valkey_key_prefix}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "VALKEY_URL")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "availability",
        "status",
        "--json",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    report = json.loads(out)
    assert report["server"]["health"] == "SERVING"
    assert report["postgres"]["url"].endswith(settings.database_url.rsplit("/", 1)[1])
