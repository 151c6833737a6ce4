"""What presence bound to mitras (bind_presence) costs a heartbeat: BatchHeartbeat and
Heartbeat through `availability serve` (one worker) by a relay whose calls carry each
mitra's auth session, against the same calls by a relay that is not bound, in alternating
phases of one run (so the machine's other load weighs on both alike). Reports heartbeats a
second and the server's CPU a heartbeat, from /proc. Sessions are vouched for by the mirror
after each mitra's first call, so the phases measure the steady state.

    python -m bench.binding [--seconds 3] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from availability.callers import hash_token
from availability.local_stores import free_port
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .common import fresh_domain, online_fleet, progress, stores

FLEET = 4_000
BATCH = 1_000
BATCH_LOOPS = 4
UNARY_LOOPS = 32
RELAY, BOUND = "relay-token-for-the-benchmark", "bound-token-for-the-benchmark"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _phase(
    pid: int, seconds: float, loops: int, call: object, per_call: int
) -> tuple[float, float]:
    """(heartbeats a second, server CPU microseconds a heartbeat) over `seconds`."""
    done = 0
    stop = time.monotonic() + seconds

    async def loop(offset: int) -> None:
        nonlocal done
        i = offset
        while time.monotonic() < stop:
            await call(i)  # type: ignore[operator]
            done += per_call
            i += loops

    cpu, started = _cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(loops)))
    wall, used = time.perf_counter() - started, _cpu_seconds(pid) - cpu
    return done / wall, used / done * 1e6


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="availability-binding-"))
    async with stores() as base, fresh_domain(base, "binding") as availability:
        settings = availability.settings
        async with availability.truth._connection() as db:
            mitras = [str(m) for m in await online_fleet(db, FLEET)]
            rows = await db.fetch(
                "INSERT INTO auth_sessions (mitra_id, expires_at)"
                " SELECT unnest($1::uuid[]), now() + interval '1 day' RETURNING mitra_id, id",
                mitras,
            )
        session = {str(r["mitra_id"]): str(r["id"]) for r in rows}
        callers = folder / "callers.toml"
        callers.write_text(
            f'[callers.relay]\ntoken_sha256 = ["{hash_token(RELAY)}"]\nscopes = ["presence"]\n'
            f'[callers.bound]\ntoken_sha256 = ["{hash_token(BOUND)}"]\nscopes = ["presence"]\n'
            'bind_presence = "auth_session"\n'
        )
        callers.chmod(0o600)
        address = f"127.0.0.1:{free_port()}"
        env = {
            **os.environ,
            "DATABASE_URL": settings.database_url,
            "VALKEY_URL": settings.valkey_url,
            "VALKEY_KEY_PREFIX": settings.valkey_key_prefix,
            "GRPC_ADDRESS": address,
            "AUTH_CALLERS_FILE": str(callers),
            "METRICS_ADDRESS": "",
            "LOG_LEVEL": "WARNING",
            "HEARTBEAT_STALE_SECONDS": "3600",
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "availability", "serve", env=env
        )
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                await asyncio.wait_for(channel.channel_ready(), 120)
                stub = pb_grpc.AvailabilityServiceStub(channel)
                relay = (("authorization", f"Bearer {RELAY}"),)
                bound = (("authorization", f"Bearer {BOUND}"),)
                batches = [mitras[at : at + BATCH] for at in range(0, FLEET, BATCH)]
                plain = [pb.BatchHeartbeatRequest(mitra_ids=b) for b in batches]
                carried = [
                    pb.BatchHeartbeatRequest(mitra_ids=b, mitra_sessions=[session[m] for m in b])
                    for b in batches
                ]
                singles = [pb.HeartbeatRequest(mitra_id=m) for m in mitras]

                async def batch_plain(i: int) -> None:
                    await stub.BatchHeartbeat(plain[i % len(plain)], metadata=relay)

                async def batch_bound(i: int) -> None:
                    await stub.BatchHeartbeat(carried[i % len(carried)], metadata=bound)

                async def unary_plain(i: int) -> None:
                    await stub.Heartbeat(singles[i % FLEET], metadata=relay)

                async def unary_bound(i: int) -> None:
                    m = singles[i % FLEET]
                    await stub.Heartbeat(
                        m, metadata=(*bound, ("x-mitra-session", session[m.mitra_id]))
                    )

                for i in range(len(carried)):  # every session vouched for once
                    await batch_bound(i)
                pid = process.pid
                results: dict[str, list[tuple[float, float]]] = {}
                cases = (
                    ("BatchHeartbeat, not bound", batch_plain, BATCH_LOOPS, BATCH),
                    ("BatchHeartbeat, bound", batch_bound, BATCH_LOOPS, BATCH),
                    ("Heartbeat, not bound", unary_plain, UNARY_LOOPS, 1),
                    ("Heartbeat, bound", unary_bound, UNARY_LOOPS, 1),
                )
                for _name, call, loops, per_call in cases:  # warm
                    await _phase(pid, 0.5, loops, call, per_call)
                for round_ in range(args.rounds):
                    progress(f"binding: round {round_ + 1} of {args.rounds}")
                    for name, call, loops, per_call in cases:
                        results.setdefault(name, []).append(
                            await _phase(pid, args.seconds, loops, call, per_call)
                        )
        finally:
            process.send_signal(signal.SIGTERM)
            await process.wait()
    print(f"\nheartbeats through serve (1 worker), {args.rounds} rounds of {args.seconds:g} s:")
    medians = {
        name: (
            statistics.median(r[0] for r in runs),
            statistics.median(r[1] for r in runs),
        )
        for name, runs in results.items()
    }
    for name, (rate, cpu) in medians.items():
        print(f"  {name:28} {rate:10,.0f} heartbeats/s  {cpu:6.1f} us server CPU each")
    for kind in ("BatchHeartbeat", "Heartbeat"):
        plain_rate = medians[f"{kind}, not bound"][0]
        bound_rate = medians[f"{kind}, bound"][0]
        print(f"  {kind}: bound / not bound = {bound_rate / plain_rate:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
