"""Start in any order: `availability serve` started before its stores binds its port with
health NOT_SERVING, waits for Postgres (one log line a try), serves once it answers, and
gives up at STARTUP_TIMEOUT_SECONDS with one line and no traceback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from availability import local_stores
from availability.server import SERVICE_NAMES
from availability.settings import Settings
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet, store_env
from .test_process import Served, _wait_serving

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WAITING = "Postgres unreachable at start-up, attempt "

Launch = Callable[..., Served]


@pytest.fixture
def launch(settings: Settings, tmp_path: Path) -> Iterator[Launch]:
    """`availability <args>` in its own process, not waited for; env overrides the test's
    settings (a nowhere DATABASE_URL, say)."""
    started: list[Served] = []

    def start(*args: str, **env: str) -> Served:
        address = f"127.0.0.1:{local_stores.free_port()}"
        log = tmp_path / f"availability-{len(started)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "availability", *args],
            env=store_env(settings, address, METRICS_ADDRESS="127.0.0.1:0", **env),
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
        )
        started.append(Served(process, address, log))
        return started[-1]

    yield start
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()


def _messages(served: Served) -> list[str]:
    """The log's messages (JSON lines); anything else the process wrote, as it is."""
    messages = []
    for line in served.log.read_text().splitlines():
        try:
            messages.append(json.loads(line)["message"])
        except (ValueError, KeyError, TypeError):
            messages.append(line)
    return messages


def _attempts(served: Served) -> list[int]:
    return [int(m[len(WAITING) :].split()[0]) for m in _messages(served) if m.startswith(WAITING)]


def _wait_for(check: Callable[[], bool], served: Served, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert served.process.poll() is None, served.log.read_text()
        assert time.monotonic() < deadline, f"{what}:\n{served.log.read_text()}"
        time.sleep(0.05)


def _health(address: str, name: str) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=name)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status


def _answers(address: str) -> bool:
    try:
        _health(address, "")
        return True
    except grpc.RpcError:
        return False


async def test_serves_once_postgres_arrives_late(launch: Launch, tmp_path: Path) -> None:
    port = local_stores.free_port()
    late_dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    served = launch("serve", DATABASE_URL=late_dsn)

    _wait_for(lambda: _answers(served.address), served, "port not bound while waiting")
    for name in ("", *SERVICE_NAMES):
        assert _health(served.address, name) == NOT_SERVING, name
    with grpc.insecure_channel(served.address) as channel, pytest.raises(grpc.RpcError) as early:
        pb_grpc.AvailabilityServiceStub(channel).CountAvailableMitras(
            pb.CountAvailableMitrasRequest(), timeout=2
        )
    assert early.value.code() == grpc.StatusCode.UNAVAILABLE
    _wait_for(lambda: len(_attempts(served)) >= 2, served, "no retries logged")

    postgres = local_stores.start_postgres(tmp_path / "late-postgres", port=port)
    try:
        assert postgres.dsn == late_dsn
        _wait_serving(served.address, served.process, served.log)
        db = await asyncpg.connect(late_dsn)
        try:
            mitra = await db.fetchval(
                "INSERT INTO mitras (display_name) VALUES ('Late') RETURNING id"
            )
        finally:
            await db.close()
        async with grpc.aio.insecure_channel(served.address) as channel:
            reply = await pb_grpc.AvailabilityServiceStub(channel).SetOnline(
                pb.SetOnlineRequest(mitra_id=str(mitra))
            )
        assert reply.status.online and reply.status.display_name == "Late"
        assert served.stop() == 0
    finally:
        postgres.stop()

    attempts = _attempts(served)
    assert attempts == list(range(1, len(attempts) + 1)), "one line a try, numbered"
    messages = _messages(served)
    waiting = [m for m in messages if m.startswith(WAITING)]
    assert all("s left before STARTUP_TIMEOUT_SECONDS" in m for m in waiting), waiting
    assert f"Postgres answered at attempt {len(attempts) + 1}" in messages
    assert any(m.startswith("mirror seeded") for m in messages), "start-up went on as usual"
    assert "Traceback" not in served.log.read_text()


@pytest.mark.parametrize(
    "command", [("serve",), ("serve", "--workers", "2"), ("migrate",)], ids=" ".join
)
def test_gives_up_at_the_deadline_with_one_line(launch: Launch, command: tuple[str, ...]) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{local_stores.free_port()}/postgres"
    began = time.monotonic()
    served = launch(*command, DATABASE_URL=nowhere, STARTUP_TIMEOUT_SECONDS="1.5")

    assert served.process.wait(timeout=30) != 0
    assert time.monotonic() - began >= 1.5, "it waited for Postgres before giving up"
    output = served.log.read_text()
    assert "Traceback" not in output
    unlogged = [line for line in output.splitlines() if not line.startswith("{")]
    # With workers, the first to give up makes the parent stop the other, which may then
    # end quietly before its own deadline.
    assert 1 <= len(unlogged) <= (2 if "--workers" in command else 1), output
    for line in unlogged:
        assert line.startswith(
            "availability: Postgres unreachable for 1.5 s at start-up (last error: "
        ), line
        assert line.endswith("); giving up"), line
    assert len(_attempts(served)) >= 2, output


async def test_serves_from_postgres_when_valkey_is_unreachable_at_start(
    launch: Launch, fleet: Fleet, tmp_path: Path
) -> None:
    mitra = str(await fleet.mitra("Wulan"))
    port = local_stores.free_port()
    served = launch("serve", VALKEY_URL=f"redis://127.0.0.1:{port}/0")
    _wait_serving(served.address, served.process, served.log)

    async with grpc.aio.insecure_channel(served.address) as channel:
        stub = pb_grpc.AvailabilityServiceStub(channel)
        status = (await stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=mitra))).status
        assert status.display_name == "Wulan" and status.source == pb.SOURCE_DATABASE
        said = [m for m in _messages(served) if "Valkey unreachable at start-up" in m]
        assert len(said) == 1 and "serving from Postgres" in said[0], said

        valkey = local_stores.start_valkey(tmp_path / "late-valkey", port=port)
        try:
            deadline = time.monotonic() + 30
            while status.source != pb.SOURCE_CACHE:
                assert time.monotonic() < deadline, served.log.read_text()
                await asyncio.sleep(0.2)
                request = pb.GetMitraStatusRequest(mitra_id=mitra)
                status = (await stub.GetMitraStatus(request)).status
        finally:
            valkey.stop()
    assert "Traceback" not in served.log.read_text()
    assert served.stop() == 0
