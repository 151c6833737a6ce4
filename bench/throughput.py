"""Issue 6: gRPC throughput of `availability serve`, driven by h2load, next to a no-op RPC.

Each figure is a ratio from one run on one machine: the heartbeat (and the beacon,
`CountAvailableMitras`) against `grpc.health.v1.Health/Check` with an empty service name, a
call that touches neither store, on the same server instance, measured back to back.

h2load counts an HTTP 200 as a success even when the gRPC status in the trailers is an
error, so every run is checked otherwise: a real grpcurl call before, the DATA bytes h2load
received (a failed unary gRPC call is trailers-only, zero DATA bytes, so the bytes must equal
the successes times the reply's framed size), no fallback warning in the server's log, and,
for the heartbeat, Valkey's own record (the dirty hash is not empty, every mitra's score
moved forward).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import redis.asyncio as redis
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from availability.mirror import Keys
from availability.v1 import availability_pb2 as pb

from .common import Row, progress

DATABASE = "availability_bench_throughput"
SERVICE = "availability.v1.AvailabilityService"
GRPCURL = str(Path(sys.executable).parent / "grpcurl")
CONCURRENCY = 64
BATCHES = (100, 1_000)  # BatchHeartbeat sizes measured through serve --workers 1
GENERATORS = 4  # parallel h2load processes, one mitra id each
CONNECTIONS_PER_GENERATOR = 2
STREAMS_PER_CONNECTION = 8  # 4 x 2 x 8 = 64 concurrent streams over 8 connections
assert GENERATORS * CONNECTIONS_PER_GENERATOR * STREAMS_PER_CONNECTION == CONCURRENCY
H2LOAD_SHAPE = (
    f"{GENERATORS} h2load processes x -c {CONNECTIONS_PER_GENERATOR} "
    f"-m {STREAMS_PER_CONNECTION} (= {CONCURRENCY} streams on "
    f"{GENERATORS * CONNECTIONS_PER_GENERATOR} connections)"
)


@dataclass
class Load:
    """What one h2load measurement saw, summed over its parallel processes."""

    rps: float
    done: int
    succeeded: int
    failed: int
    data_bytes: int
    latencies_us: list[int] = field(repr=False)

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_us:
            return float("nan")
        ordered = sorted(self.latencies_us)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


@dataclass
class Call:
    """One RPC as h2load sends it: its path and a body file per generator."""

    name: str
    path: str
    bodies: list[Path]
    reply_sizes: tuple[int, int]  # framed reply size, min and max
    ids: list[list[str]] = field(default_factory=list)  # a BatchHeartbeat's, per generator

    @property
    def per_call(self) -> int:
        """Heartbeats one call carries."""
        return len(self.ids[0]) if self.ids else 1


def _frame(message: Message) -> bytes:
    payload = message.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _run(*command: str, timeout: float = 600) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        return -1, f"timed out after {timeout} s"
    return process.returncode or 0, out.decode(errors="replace")


async def _find_h2load() -> tuple[str | None, str]:
    """h2load's path, installing Debian's nghttp2-client if needed; else None and why."""
    found = shutil.which("h2load")
    if found:
        return found, ""
    if not shutil.which("apt-get"):
        return None, "h2load is not on PATH and there is no apt-get to install nghttp2-client"
    progress("throughput: h2load missing, installing nghttp2-client")
    env_install = ("apt-get", "install", "-y", "-q", "nghttp2-client")
    code, out = await _run(*env_install)
    if code != 0:
        await _run("apt-get", "update", "-q")
        code, out = await _run(*env_install)
    found = shutil.which("h2load")
    if found:
        return found, ""
    tail = " ".join(out.strip().splitlines()[-2:])[:200]
    return None, f"h2load unavailable: apt-get install nghttp2-client failed ({tail})"


def _not_measured(why: str) -> list[Row]:
    return [
        Row(
            f"{case} at concurrency {CONCURRENCY}",
            "not measured",
            target=target,
            met=None,
            note=why,
        )
        for case, target in (
            ("Heartbeat calls/s vs no-op (Health/Check)", ">= 0.7"),
            ("CountAvailableMitras calls/s vs no-op (Health/Check)", ">= 0.8"),
            *(
                (f"BatchHeartbeat of {size:,} heartbeats/s vs no-op calls/s", ">= 10")
                for size in BATCHES
            ),
        )
    ]


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"unexpected h2load output (no {pattern!r}):\n{text}")
    return float(match.group(1))


async def _h2load(
    h2load: str, port: int, call: Call, seconds: float, cpus: str | None, folder: Path
) -> Load:
    """GENERATORS h2load processes at once, each on its own body file, for `seconds`."""
    logs = [folder / f"{call.name}-{n}.log" for n in range(len(call.bodies))]
    commands = []
    for body, log in zip(call.bodies, logs, strict=True):
        command = [
            h2load,
            "-D",
            f"{seconds:g}",
            "-t",
            "1",
            "-c",
            str(CONNECTIONS_PER_GENERATOR),
            "-m",
            str(STREAMS_PER_CONNECTION),
            f"--data={body}",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"--log-file={log}",
            f"http://127.0.0.1:{port}{call.path}",
        ]
        if cpus is not None:
            command = ["taskset", "-c", cpus, *command]
        commands.append(command)
    outputs = await asyncio.gather(*(_run(*c, timeout=seconds + 60) for c in commands))
    rps = 0.0
    done = succeeded = failed = data = 0
    latencies: list[int] = []
    for (code, out), log in zip(outputs, logs, strict=True):
        if code != 0:
            raise RuntimeError(f"h2load exited with {code}:\n{out}")
        rps += _number(r"finished in [^,]+, ([\d.]+) req/s", out)
        done += int(_number(r"requests: \d+ total, \d+ started, (\d+) done", out))
        succeeded += int(_number(r"(\d+) succeeded", out))
        failed += int(_number(r"(\d+) failed", out))
        data += int(_number(r"traffic: .* \((\d+)\) data", out))
        for line in log.read_text().splitlines():
            columns = line.split("\t")
            if len(columns) >= 3 and columns[1] == "200":
                latencies.append(int(columns[2]))
        log.unlink()
    return Load(rps, done, succeeded, failed, data, latencies)


def _check(call: Call, load: Load) -> str:
    """Empty when every request came back 200 with a reply message; else what was wrong."""
    low, high = call.reply_sizes
    problems = []
    if load.failed or load.succeeded != load.done or load.succeeded == 0:
        problems.append(f"{load.failed} failed of {load.done}")
    if not low * load.succeeded <= load.data_bytes <= high * load.succeeded:
        per = load.data_bytes / max(1, load.succeeded)
        problems.append(f"{per:.2f} reply bytes per call, expected {low}-{high}")
    return "; ".join(problems)


@dataclass
class Fleet:
    database_url: str
    prefix: str
    mitras: list[str]
    batched: list[str]
    """GENERATORS x max(BATCHES) other online mitras, for the BatchHeartbeat bodies."""


@contextlib.asynccontextmanager
async def _fleet(
    admin_dsn: str, valkey_url: str, valkey: redis.Redis, size: int
) -> AsyncIterator[Fleet]:
    """A fresh database with `size` online mitras, and a fresh key prefix; both gone after."""
    admin = await asyncpg.connect(admin_dsn)
    prefix = f"bench-throughput-{uuid.uuid4().hex[:8]}"
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{DATABASE}"')
        database_url = admin_dsn.rpartition("/")[0] + f"/{DATABASE}"
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "VALKEY_URL": valkey_url,
            "VALKEY_KEY_PREFIX": prefix,
            "LOG_LEVEL": "WARNING",
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "availability",
            "migrate",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out_bytes, _ = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"availability migrate failed:\n{out_bytes.decode()}")
        db = await asyncpg.connect(database_url)
        try:
            await db.execute(
                "INSERT INTO mitras (display_name, max_concurrent_sessions)"
                " SELECT 'Mitra ' || g, 3 FROM generate_series(1, $1) g",
                size,
            )
            await db.execute(
                "INSERT INTO mitra_online_status (mitra_id, is_online, last_heartbeat_at)"
                " SELECT id, true, now() FROM mitras"
            )
            await db.execute("ANALYZE")
            ids = [
                str(r[0])
                for r in await db.fetch(
                    "SELECT id FROM mitras ORDER BY id LIMIT $1",
                    GENERATORS * (1 + max(BATCHES)),
                )
            ]
        finally:
            await db.close()
        yield Fleet(database_url, prefix, ids[:GENERATORS], ids[GENERATORS:])
    finally:
        # The database first: a straggling server then cannot reseed what is deleted next.
        await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await admin.close()
        for attempt in range(2):
            if attempt:
                await asyncio.sleep(1)
            keys = [k async for k in valkey.scan_iter(match=f"{{{prefix}}}:*", count=10_000)]
            for start in range(0, len(keys), 1000):
                await valkey.delete(*keys[start : start + 1000])


def _listeners(port: int) -> int:
    """Listening TCP sockets on 127.0.0.1:port (one per worker with SO_REUSEPORT); gRPC may
    bind an IPv6 socket with the v4-mapped address, so both tables are read."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for line in rows.readlines()[1:]:
                columns = line.split()
                address, _, hex_port = columns[1].partition(":")
                if (
                    columns[3] == "0A"
                    and int(hex_port, 16) == port
                    and address.endswith("0100007F")
                ):
                    count += 1
    return count


def _descendants(pid: int) -> dict[int, str]:
    """The processes below pid (the `--workers` children), with their command lines."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as stat:
                parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = _cmdline(child)
                frontier.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().decode(errors="replace")
    except OSError:
        return ""


async def _reap(children: dict[int, str], timeout: float) -> None:
    """Wait for the workers to be gone after their parent exited; kill (by pid) any left."""
    deadline = time.monotonic() + timeout
    while True:
        alive = {pid for pid, cmd in children.items() if cmd and _cmdline(pid) == cmd}
        if not alive:
            return
        if time.monotonic() > deadline:
            progress(f"throughput: killing server processes left behind: {sorted(alive)}")
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return
        await asyncio.sleep(0.1)


@dataclass
class Served:
    process: asyncio.subprocess.Process
    address: str
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


async def _health(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return int(reply.status)


@contextlib.asynccontextmanager
async def _serve(
    fleet: Fleet, valkey_url: str, workers: int, cpus: str | None, folder: Path
) -> AsyncIterator[Served]:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "DATABASE_URL": fleet.database_url,
        "VALKEY_URL": valkey_url,
        "VALKEY_KEY_PREFIX": fleet.prefix,
        "GRPC_ADDRESS": address,
        "LOG_LEVEL": "WARNING",
        # The fleet is inserted once with last_heartbeat_at = now() and only a few mitras
        # heartbeat during the run: keep the rest fresh so the auto-offline sweep does not
        # start taking the fleet offline mid-measurement (a real fleet heartbeats).
        "HEARTBEAT_STALE_SECONDS": "3600",
    }
    log = folder / f"server-{workers}.log"
    command = [sys.executable, "-m", "availability", "serve", "--workers", str(workers)]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    with log.open("w") as sink:
        process = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=sink, stderr=asyncio.subprocess.STDOUT
        )
    served = Served(process, address, port, log)
    children: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        consecutive = 0
        # With N workers, wait for N listening sockets, then for 20 fresh connections in a
        # row (spread over the workers by SO_REUSEPORT) to report SERVING.
        while consecutive < (1 if workers == 1 else 20):
            if process.returncode is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{served.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not become SERVING:\n{served.log_text()}")
            status = -1
            if _listeners(port) >= workers:
                with contextlib.suppress(grpc.RpcError):
                    status = await _health(address, SERVICE)
            if status == health_pb2.HealthCheckResponse.SERVING:
                consecutive += 1
            else:
                consecutive = 0
                await asyncio.sleep(0.2)
        children = _descendants(process.pid)
        yield served
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                progress("throughput: server did not stop within 60 s of SIGTERM, killing it")
                process.kill()
                await process.wait()
        await _reap(children, 30)


async def _grpcurl(address: str, method: str, data: dict[str, object]) -> dict[str, object]:
    code, out = await _run(
        GRPCURL, "-plaintext", "-d", json.dumps(data), address, method, timeout=30
    )
    if code != 0:
        raise RuntimeError(f"grpcurl {method} failed: {out}")
    reply: dict[str, object] = json.loads(out)
    return reply


def _calls(
    folder: Path, fleet: Fleet, count_reply: pb.CountAvailableMitrasResponse
) -> dict[str, Call]:
    mitras = fleet.mitras

    def bodies(name: str, messages: Sequence[Message]) -> list[Path]:
        paths = []
        for n, message in enumerate(messages):
            path = folder / f"{name}-{n}.bin"
            path.write_bytes(_frame(message))
            paths.append(path)
        return paths

    heartbeat_size = 5 + pb.HeartbeatResponse(online=True).ByteSize()
    health_size = (
        5 + health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).ByteSize()
    )
    # The beacon's as_of moves, so its nanos take 0 to 5 bytes (plus a tag byte).
    lean = pb.CountAvailableMitrasResponse()
    lean.CopyFrom(count_reply)
    lean.as_of.nanos = 0
    count_low = 5 + lean.ByteSize()
    lean.as_of.nanos = 999_999_999
    count_high = 5 + lean.ByteSize()
    batches = {}
    for size in BATCHES:
        ids = [fleet.batched[g * max(BATCHES) :][:size] for g in range(GENERATORS)]
        recorded = pb.BatchHeartbeatResponse(
            results=[
                pb.HeartbeatResult(
                    mitra_id=m, online=True, outcome=pb.HeartbeatResult.OUTCOME_RECORDED
                )
                for m in ids[0]
            ]
        )
        batches[f"batch{size}"] = Call(
            f"batch{size}",
            f"/{SERVICE}/BatchHeartbeat",
            bodies(f"batch{size}", [pb.BatchHeartbeatRequest(mitra_ids=i) for i in ids]),
            (5 + recorded.ByteSize(), 5 + recorded.ByteSize()),
            ids,
        )
    return {
        **batches,
        "noop": Call(
            "noop",
            "/grpc.health.v1.Health/Check",
            bodies("noop", [health_pb2.HealthCheckRequest(service="")] * GENERATORS),
            (health_size, health_size),
        ),
        "heartbeat": Call(
            "heartbeat",
            f"/{SERVICE}/Heartbeat",
            bodies("heartbeat", [pb.HeartbeatRequest(mitra_id=m) for m in mitras]),
            (heartbeat_size, heartbeat_size),
        ),
        "beacon": Call(
            "beacon",
            f"/{SERVICE}/CountAvailableMitras",
            bodies("beacon", [pb.CountAvailableMitrasRequest()] * GENERATORS),
            (count_low, count_high),
        ),
    }


async def _count_reply(address: str) -> pb.CountAvailableMitrasResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        method = channel.unary_unary(
            f"/{SERVICE}/CountAvailableMitras",
            request_serializer=pb.CountAvailableMitrasRequest.SerializeToString,
            response_deserializer=pb.CountAvailableMitrasResponse.FromString,
        )
        reply: pb.CountAvailableMitrasResponse = await method(
            pb.CountAvailableMitrasRequest(), timeout=5
        )
        return reply


async def _script_time(valkey: redis.Redis) -> tuple[int, int]:
    """(EVALSHA calls, µs Valkey spent in them) so far: its cost per heartbeat bounds how many
    heartbeats one Valkey (one cluster slot) can take."""
    stats = (await valkey.info("commandstats")).get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


async def _scores(valkey: redis.Redis, keys: Keys, mitras: Sequence[str]) -> list[float]:
    return [float(score or 0.0) for score in await valkey.zmscore(keys.heartbeats, list(mitras))]


async def _measure_server(
    h2load: str,
    fleet: Fleet,
    valkey: redis.Redis,
    valkey_url: str,
    workers: int,
    cases: Sequence[str],
    seconds: float,
    folder: Path,
) -> list[Row]:
    keys = Keys.for_prefix(fleet.prefix)
    pinned = workers == 1 and shutil.which("taskset") is not None
    server_cpus, load_cpus = ("0", "1") if pinned else (None, None)
    progress(
        f"throughput: serve --workers {workers}"
        + (" (server on CPU 0, h2load on CPU 1)" if pinned else " (cores shared)")
    )
    async with _serve(fleet, valkey_url, workers, server_cpus, folder) as served:
        for mitra in fleet.mitras:
            reply = await _grpcurl(served.address, f"{SERVICE}/Heartbeat", {"mitra_id": mitra})
            if reply.get("online") is not True:
                raise RuntimeError(f"grpcurl Heartbeat of {mitra} answered {reply}")
        count_reply = await _count_reply(served.address)
        online = await valkey.scard(keys.online)
        calls = _calls(folder, fleet, count_reply)
        for name in cases:
            for ids in calls[name].ids[:1]:
                await _grpcurl(served.address, f"{SERVICE}/BatchHeartbeat", {"mitra_ids": ids})
        order = ["noop", *cases]
        problems: dict[str, list[str]] = {name: [] for name in order}
        if count_reply.source != pb.SOURCE_CACHE or count_reply.online_count != online:
            problems["beacon"].append(
                f"CountAvailableMitras answered online={count_reply.online_count} "
                f"source={count_reply.source}, Valkey holds {online} online"
            )
        progress("throughput: warm-up")
        for name in order:
            await _h2load(h2load, served.port, calls[name], 1.0, load_cpus, folder)
        log_mark = len(served.log_text())
        best: dict[str, Load] = {}
        heartbeat_checks: dict[str, list[str]] = {}
        valkey_us: dict[str, list[float]] = {}
        for round_ in (1, 2):
            for name in order if round_ == 1 else order[::-1]:
                before = await _scores(
                    valkey, keys, [m for ids in calls[name].ids for m in ids] or fleet.mitras
                )
                started_ms = (await valkey.time())[0] * 1000
                scripts_before = await _script_time(valkey)
                load = await _h2load(h2load, served.port, calls[name], seconds, load_cpus, folder)
                scripts = [
                    a - b for a, b in zip(await _script_time(valkey), scripts_before, strict=True)
                ]
                problem = _check(calls[name], load)
                if problem:
                    problems[name].append(problem)
                if name == "heartbeat" or calls[name].ids:
                    beaten = [m for ids in calls[name].ids for m in ids] or fleet.mitras
                    dirty = await valkey.hlen(keys.dirty)
                    after = await _scores(valkey, keys, beaten)
                    pairs = zip(after, before, strict=True)
                    moved = sum(a > b and a >= started_ms for a, b in pairs)
                    beats = load.rps * seconds * calls[name].per_call
                    per_beat = scripts[1] / max(beats, 1)
                    valkey_us.setdefault(name, []).append(per_beat)
                    heartbeat_checks.setdefault(name, []).append(
                        f"dirty HLEN {dirty}, {moved}/{len(after)} scores moved, Valkey ran "
                        f"{scripts[0]:,.0f} scripts for {beats:,.0f} heartbeats, "
                        f"{per_beat:.1f} µs of its time a heartbeat (INFO commandstats)"
                    )
                    if moved != len(after):
                        problems[name].append(f"only {moved}/{len(after)} heartbeat scores moved")
                progress(
                    f"throughput: workers {workers} {name} round {round_}: "
                    f"{load.rps:,.0f} calls/s, "
                    f"p50 {load.percentile_ms(0.5):.2f} ms, p99 {load.percentile_ms(0.99):.2f} ms"
                    + (f" [{problem}]" if problem else "")
                )
                if name not in best or load.rps > best[name].rps:
                    best[name] = load
        new_log = served.log_text()[log_mark:]
        fallbacks = new_log.count("mirror failed") + new_log.count("recording in the truth")
        errors = sum(1 for line in new_log.splitlines() if "ERROR" in line or "Traceback" in line)
        if served.process.returncode is not None:
            raise RuntimeError(f"server died during the run:\n{served.log_text()}")

    noop = best["noop"]
    rows = []
    targets = {"heartbeat": 0.7, "beacon": 0.8, **{f"batch{n}": 10.0 for n in BATCHES}}
    labels = {
        "heartbeat": "Heartbeat",
        "beacon": "CountAvailableMitras (beacon)",
        **{f"batch{n}": f"BatchHeartbeat of {n:,} ids" for n in BATCHES},
    }
    for name in cases:
        ours = best[name]
        per_call = calls[name].per_call
        ratio = ours.rps * per_call / noop.rps
        if fallbacks or errors:
            problems[name].append(f"{fallbacks} fallbacks, {errors} errors in the server log")
        verified = not problems[name] and not problems["noop"]
        if name == "heartbeat":
            first_call = "grpcurl Heartbeat online=true for each id"
        elif per_call > 1:
            first_call = "grpcurl BatchHeartbeat first"
        else:
            online_count = f"{count_reply.online_count:,}"
            first_call = f"a gRPC call first answered source=CACHE, online={online_count} = SCARD"
        checks = [
            first_call,
            "every h2load response 200 with a full reply message (DATA bytes = calls x reply)",
            f"{fallbacks} fallback warnings, {errors} error lines in the server log",
        ]
        if name in heartbeat_checks:
            checks.append("Valkey after each run: " + "; ".join(heartbeat_checks[name]))
        placement = (
            "server pinned to CPU 0, h2load to CPU 1 (Postgres/Valkey unpinned)"
            if pinned
            else "server workers, h2load, Postgres and Valkey share both cores"
        )
        id_note = (
            f"{len(fleet.mitras)} mitra ids, one per h2load process"
            if name == "heartbeat"
            else f"{per_call:,} distinct online ids a call, other ids for each h2load process"
            if per_call > 1
            else ""
        )
        note = "; ".join(
            filter(
                None,
                [
                    f"{H2LOAD_SHAPE}, {seconds:g} s per run after a 1 s warm-up, best of 2 "
                    "alternating runs (its p50/p99 from h2load --log-file)",
                    id_note,
                    placement,
                    ("VERIFIED: " if verified else "NOT VERIFIED: ")
                    + ", ".join(checks)
                    + (
                        ""
                        if verified
                        else " | problems: " + "; ".join(problems[name] + problems["noop"])
                    ),
                ],
            )
        )
        rows.append(
            Row(
                f"{labels[name]} at concurrency {CONCURRENCY}, serve --workers {workers}"
                + (f" ({workers} instances)" if workers > 1 else ""),
                (f"{ours.rps * per_call:,.0f} heartbeats/s in " if per_call > 1 else "")
                + f"{ours.rps:,.0f} calls/s, p50 {ours.percentile_ms(0.5):.2f} ms, "
                f"p99 {ours.percentile_ms(0.99):.2f} ms"
                + (
                    f", Valkey {min(valkey_us[name]):.1f} µs a heartbeat"
                    if name in valkey_us
                    else ""
                ),
                f"no-op Health/Check {noop.rps:,.0f} calls/s, "
                f"p50 {noop.percentile_ms(0.5):.2f} ms, p99 {noop.percentile_ms(0.99):.2f} ms",
                ratio,
                f"heartbeats/s over no-op calls/s >= {targets[name]:g}"
                if per_call > 1
                else f"calls/s ratio >= {targets[name]}",
                ratio >= targets[name] and verified,
                note,
            )
        )
    return rows


async def bench_throughput(
    admin_dsn: str, valkey_url: str, quick: bool, workers: Sequence[int] = (1, 2, 3)
) -> list[Row]:
    h2load, why = await _find_h2load()
    if h2load is None:
        progress(f"throughput: not measured: {why}")
        return _not_measured(why)
    if not shutil.which("taskset"):
        progress("throughput: taskset missing, nothing pinned")
    size = 10_000 if quick else 100_000
    seconds = 5.0 if quick else 15.0
    progress(f"throughput: {size:,} online mitras, {seconds:g} s per measurement")
    valkey = redis.Redis.from_url(valkey_url)
    rows: list[Row] = []
    try:
        async with _fleet(admin_dsn, valkey_url, valkey, size) as fleet:
            with tempfile.TemporaryDirectory(prefix="availability-throughput-") as tmp:
                folder = Path(tmp)
                # --workers N runs N instances (each its own pools, sweeps and watch hub)
                # behind the kernel's SO_REUSEPORT balancing: three is the scale-out case.
                for count in workers:
                    cases = ["heartbeat", "beacon"]
                    if count == 1:
                        cases += [f"batch{n}" for n in BATCHES]
                    rows += await _measure_server(
                        h2load, fleet, valkey, valkey_url, count, cases, seconds, folder
                    )
    finally:
        await valkey.aclose()
    for row in rows:
        progress(
            f"throughput: {row.case}: {row.figure} | {row.comparison} | ratio "
            f"{row.ratio:.2f} | met={row.met}"
        )
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(
        description="The throughput rows alone (make bench runs them)."
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, action="append", help="repeatable; default 1 2 3")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a superuser DSN; a throwaway database is made beside its database",
    )
    parser.add_argument(
        "--valkey-url", default=os.environ.get("VALKEY_URL", "redis://127.0.0.1:6379")
    )
    args = parser.parse_args()
    rows = await bench_throughput(
        args.database_url, args.valkey_url, args.quick, args.workers or (1, 2, 3)
    )
    for row in rows:
        print(
            f"| {row.case} | {row.figure} | {row.comparison} | {row.ratio or 0:.2f} | {row.met} |"
            f" {row.note} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
