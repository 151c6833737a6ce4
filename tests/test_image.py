"""The container image (`make image`, Containerfile) as a team deploys it: `migrate` as the Job
runs it, then `serve` with a read-only root filesystem, as a non-root uid, against real
Postgres and a throwaway Valkey; a SIGTERM drains it and it exits 0 within the Deployment's
grace period.

Image registries cannot be reached from these machines, so the image is built on a base made
from Debian's packages (`make image-base`: mmdebstrap, then `podman import`). Podman here
needs the runc runtime and explicit ulimits (crun and the default limits are refused by this
kind of kernel); `.ci/run` installs podman, runc and mmdebstrap."""

from __future__ import annotations

import asyncio
import subprocess
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from availability.local_stores import LocalValkey, free_port
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc
from availability.version import VERSION

from .helpers import required_tool

pytestmark = pytest.mark.slow(seconds=70)

ROOT = Path(__file__).resolve().parent.parent
IMAGE = f"availability-test:{VERSION}"
LOCAL_BASE = "localhost/availability-base:bookworm"
RUNTIME = ["--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
GRACE_SECONDS = yaml.safe_load((ROOT / "deploy/kubernetes/base/deployment.yaml").read_text())[
    "spec"
]["template"]["spec"]["terminationGracePeriodSeconds"]


def _podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [required_tool("podman"), *RUNTIME, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """`make image` on the local base; the build time is printed for the issue's note."""
    required_tool("podman")
    required_tool("mmdebstrap")
    make = ["make", "--no-print-directory", "-C", str(ROOT)]
    base = subprocess.run([*make, "image-base"], capture_output=True, text=True, timeout=600)
    assert base.returncode == 0, base.stdout + base.stderr
    started = time.perf_counter()
    built = subprocess.run(
        [
            *make,
            "image",
            f"IMAGE={IMAGE}",
            f"BASE={LOCAL_BASE}",
            f"CONTAINER_FLAGS={' '.join(RUNTIME + LIMITS)}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    print(f"make image: {time.perf_counter() - started:.1f} s")
    yield IMAGE
    _podman("rmi", "--force", IMAGE)
    _podman("image", "prune", "--force")


@pytest.fixture
def fresh_database(postgres_admin_dsn: str) -> Iterator[str]:
    """An empty database, so the image's `migrate` has the whole schema to apply."""
    name = f"availability_image_{uuid.uuid4().hex[:8]}"

    async def admin(statement: str) -> None:
        conn = await asyncpg.connect(postgres_admin_dsn)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    yield f"{postgres_admin_dsn.rpartition('/')[0]}/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _run(image: str, *args: str, env: dict[str, str], detach: bool = False) -> str:
    """`podman run` as the Deployment runs the image: read-only root, its own user, the host's
    network (the stores listen on loopback)."""
    flags = [f"--env={k}={v}" for k, v in env.items()]
    mode = ["--detach"] if detach else ["--rm"]
    ran = _podman("run", *mode, *LIMITS, "--read-only", "--network=host", *flags, image, *args)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return ran.stdout.strip()


def test_lock_names_the_image_runtime_and_nothing_more(image: str) -> None:
    """What the image installed is what uv.lock pins for the runtime: the same versions."""
    frozen = _podman(
        "run", "--rm", *LIMITS, "--entrypoint", "python", image, "-m", "pip", "--version"
    )
    assert frozen.returncode != 0, "the final stage keeps no pip"
    listed = _podman(
        "run",
        "--rm",
        *LIMITS,
        "--entrypoint",
        "python",
        image,
        "-c",
        "import importlib.metadata as m\n"
        "for d in m.distributions():\n"
        "    print(d.name.lower().replace('_', '-') + '==' + d.version)",
    )
    assert listed.returncode == 0, listed.stderr
    installed = dict(line.split("==") for line in listed.stdout.split())
    locked = {
        p["name"]: p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]
    }
    for name in ("grpcio", "protobuf", "redis", "asyncpg", "prometheus-client"):
        assert installed[name] == locked[name], name
    assert installed["availability"] == VERSION
    assert "grpcio-tools" not in installed and "pytest" not in installed
    compilers = _podman(
        "run", "--rm", *LIMITS, "--entrypoint", "sh", image, "-c", "command -v gcc cc clang"
    )
    assert compilers.stdout.strip() == "", "no compiler in the final stage"


def test_image_migrates_serves_read_only_as_non_root_and_drains(
    image: str, fresh_database: str, own_valkey: LocalValkey
) -> None:
    # The migration Job has the same settings as the server (VALKEY_URL too), as here.
    migrated = _run(
        image, "migrate", env={"DATABASE_URL": fresh_database, "VALKEY_URL": own_valkey.url}
    )
    assert migrated.startswith("applied ") and "schema up to date" not in migrated, migrated

    port, metrics_port = free_port(), free_port()
    mitra = uuid.uuid4()

    async def arrange() -> None:
        conn = await asyncpg.connect(fresh_database)
        try:
            await conn.execute(
                "INSERT INTO mitras (id, display_name) VALUES ($1, 'Image test')", mitra
            )
        finally:
            await conn.close()

    asyncio.run(arrange())
    started = time.perf_counter()
    container = _run(
        image,
        env={
            "DATABASE_URL": fresh_database,
            "VALKEY_URL": own_valkey.url,
            "GRPC_ADDRESS": f"127.0.0.1:{port}",
            "METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
            "MIGRATE_ON_START": "false",
        },
        detach=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            _wait_serving(channel, container)
            print(f"image start-up to SERVING: {time.perf_counter() - started:.2f} s")
            stub = pb_grpc.AvailabilityServiceStub(channel)
            status = stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)), timeout=5).status
            assert status.online and status.reachable
            assert stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra)), timeout=5).online

        pid = _podman("inspect", "--format", "{{.State.Pid}}", container).stdout.strip()
        uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[:4]
        assert set(uids) == {"10001"}, f"the server runs as uid {uids}, not 10001"

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert 'availability_build_info{commit="' in metrics
        assert f'version="{VERSION}"' in metrics

        stopping = time.perf_counter()
        stopped = _podman("stop", f"--time={GRACE_SECONDS}", container, timeout=GRACE_SECONDS + 30)
        assert stopped.returncode == 0, stopped.stderr
        drained = time.perf_counter() - stopping
        state = _podman("inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip()
        printed = _podman("logs", container)
        logs = printed.stdout + printed.stderr
        assert state == "0", logs[-3000:]
        assert drained < GRACE_SECONDS, f"took {drained:.1f} s to drain"
        assert f"version {VERSION} (commit " in logs
        assert "Traceback" not in logs, logs[-3000:]
        print(f"SIGTERM to exit: {drained:.2f} s")
    finally:
        _podman("rm", "--force", container)


def _wait_serving(channel: grpc.Channel, container: str) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    printed = _podman("logs", container)
    pytest.fail("the image never reported SERVING:\n" + (printed.stdout + printed.stderr)[-3000:])
