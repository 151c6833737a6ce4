"""The service as users run it: `availability serve` in its own process, poked with the
real grpcurl binary, stopped with SIGTERM; `--workers N` sharing the port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from availability.settings import Settings

from .helpers import Fleet, eventually

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
SERVICE = "availability.v1.AvailabilityService"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Served:
    process: subprocess.Popen[str]
    address: str
    log: Path

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


def _wait_serving(address: str, process: subprocess.Popen[str], log: Path) -> None:
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"server did not become SERVING:\n{log.read_text()}")


@pytest.fixture
def serve(settings: Settings, tmp_path: Path) -> Iterator[object]:
    started: list[Served] = []

    def start(*args: str) -> Served:
        address = f"127.0.0.1:{_free_port()}"
        env = {
            **os.environ,
            "DATABASE_URL": settings.database_url,
            "VALKEY_URL": settings.valkey_url,
            "VALKEY_KEY_PREFIX": settings.valkey_key_prefix,
            "GRPC_ADDRESS": address,
            "METRICS_ADDRESS": "127.0.0.1:0",
        }
        log = tmp_path / f"server-{len(started)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "availability", "serve", *args],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
        )
        served = Served(process, address, log)
        started.append(served)
        _wait_serving(address, process, log)
        return served

    yield start
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()


def grpcurl(
    address: str,
    *args: str,
    data: dict[str, object] | None = None,
    options: tuple[str, ...] = (),
    allow_deadline: bool = False,
) -> str:
    command = [GRPCURL, "-plaintext", *options]
    if data is not None:
        command += ["-d", json.dumps(data)]
    result = subprocess.run([*command, address, *args], capture_output=True, text=True, timeout=30)
    if allow_deadline and "DeadlineExceeded" in result.stderr:
        return result.stdout
    assert result.returncode == 0, result.stderr
    return result.stdout


def grpcurl_error(address: str, method: str, data: dict[str, object]) -> str:
    result = subprocess.run(
        [GRPCURL, "-plaintext", "-d", json.dumps(data), address, f"{SERVICE}/{method}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    return result.stderr


async def test_grpcurl_reaches_every_rpc(serve: object, fleet: Fleet) -> None:
    mitra = str(await fleet.mitra("Dewi Kusuma", capacity=2))
    served: Served = serve()  # type: ignore[operator]
    address = served.address

    services = grpcurl(address, "list").split()
    assert {
        SERVICE,
        "availability.v1.DashboardService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(services)
    description = grpcurl(address, "describe", SERVICE)
    for rpc in (
        "SetOnline",
        "SetOffline",
        "Heartbeat",
        "SetMitraActive",
        "GetMitraStatus",
        "IsMitraReachable",
        "FindAvailableMitras",
        "CountAvailableMitras",
        "RecomputeLoad",
        "WatchAvailableMitras",
    ):
        assert f"rpc {rpc}" in description
    assert "last_heartbeat_time" in grpcurl(address, "describe", "availability.v1.MitraStatus")

    def call(method: str, **data: object) -> dict[str, object]:
        reply: dict[str, object] = json.loads(grpcurl(address, f"{SERVICE}/{method}", data=data))
        return reply

    online = call("SetOnline", mitra_id=mitra)
    assert online["status"]["online"] is True  # type: ignore[index]
    assert call("Heartbeat", mitra_id=mitra) == {"online": True}
    status = call("GetMitraStatus", mitra_id=mitra)["status"]
    assert status["display_name"] == "Dewi Kusuma" and status["available"] is True  # type: ignore[index]
    assert call("IsMitraReachable", mitra_id=mitra)["reachable"] is True
    found = call("FindAvailableMitras", limit=5)["mitras"]
    assert [m["mitra_id"] for m in found] == [mitra]  # type: ignore[union-attr]
    count = call("CountAvailableMitras")
    assert count["available_count"] == 1 and count["online_count"] == 1
    loads = call("RecomputeLoad", mitra_ids=[mitra])["loads"]
    assert loads == [{"mitra_id": mitra}], "load 0 is the proto3 default, omitted in JSON"
    stats = json.loads(
        grpcurl(address, "availability.v1.DashboardService/GetDashboardStats", data={})
    )
    assert stats["online_mitras"] == "1" and stats["customers_per_mitra"][0]["mitra_id"] == mitra
    watched = grpcurl(
        address,
        "availability.v1.DashboardService/WatchDashboardStats",
        data={"interval": "1s"},
        options=("-max-time", "2"),
        allow_deadline=True,
    )
    assert '"online_mitras": "1"' in watched
    live = grpcurl(
        address,
        f"{SERVICE}/WatchAvailableMitras",
        data={},
        options=("-max-time", "2"),
        allow_deadline=True,
    )
    snapshot = json.loads(live)
    assert int(snapshot["revision"]) > 0
    assert [m["mitra_id"] for m in snapshot["snapshot"]["mitras"]] == [mitra]
    resumed = grpcurl(
        address,
        f"{SERVICE}/WatchAvailableMitras",
        data={"resume_revision": snapshot["revision"]},
        options=("-max-time", "1"),
        allow_deadline=True,
    )
    assert resumed == "", "nothing changed since that revision"
    assert call("SetOffline", mitra_id=mitra)["status"].get("online") is None  # type: ignore[union-attr]
    deactivated = call("SetMitraActive", mitra_id=mitra, active=False)
    assert deactivated["status"].get("active") is None  # type: ignore[union-attr]

    assert "Code: PermissionDenied" in grpcurl_error(address, "Heartbeat", {"mitra_id": mitra})
    assert "Code: FailedPrecondition" in grpcurl_error(address, "SetOnline", {"mitra_id": mitra})
    bad = grpcurl_error(address, "GetMitraStatus", {"mitra_id": "nope"})
    assert "Code: InvalidArgument" in bad and "mitra_id" in bad
    ghost = grpcurl_error(address, "GetMitraStatus", {"mitra_id": str(uuid.uuid4())})
    assert "Code: NotFound" in ghost
    assert served.stop() == 0


async def test_sigterm_drains_in_flight_calls(
    serve: object, fleet: Fleet, db: asyncpg.Connection, database_url: str
) -> None:
    mitra = await fleet.mitra()
    served: Served = serve()  # type: ignore[operator]
    blocker = await asyncpg.connect(database_url)
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("SELECT 1 FROM mitras WHERE id = $1 FOR UPDATE", mitra)
    async with grpc.aio.insecure_channel(served.address) as channel:
        from availability.v1 import availability_pb2 as pb
        from availability.v1 import availability_pb2_grpc as pb_grpc

        stub = pb_grpc.AvailabilityServiceStub(channel)
        call = asyncio.ensure_future(stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra))))
        await asyncio.sleep(0.5)
        assert not call.done(), "the write waits on the row lock"
        served.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        await transaction.rollback()
        reply = await call
    await blocker.close()
    assert reply.status.online, "the in-flight call finished after SIGTERM"
    assert served.process.wait(timeout=30) == 0
    assert "shutting down" in served.log.read_text()


async def test_workers_share_the_port(serve: object, fleet: Fleet) -> None:
    mitra = str(await fleet.mitra())
    served: Served = serve("--workers", "2")  # type: ignore[operator]

    async def both_serving() -> bool:
        return served.log.read_text().count("serving on") >= 2

    await eventually(both_serving, timeout=20)
    pids = {
        line.split("(pid ")[1].split(")")[0]
        for line in served.log.read_text().splitlines()
        if "serving on" in line
    }
    assert len(pids) == 2, served.log.read_text()
    for _ in range(5):
        reply = json.loads(
            grpcurl(served.address, f"{SERVICE}/SetOnline", data={"mitra_id": mitra})
        )
        assert reply["status"]["online"] is True
    assert served.stop() == 0
    assert served.log.read_text().count("stopped") == 2
