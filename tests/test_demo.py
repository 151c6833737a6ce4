"""The living demo: `availability dev` (make run) and `availability demo --live` drive the demo
fleet as real traffic, so the fleet stays alive, the streams move and status stays OK; Ctrl-C
stops the traffic with the server; `--reset` starts the demo data again."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis

from availability.client import AvailabilityClient
from availability.demo_traffic import DemoTraffic
from availability.local_stores import free_port
from availability.model import AvailabilitySnapshot
from availability.server import Server
from availability.settings import Settings
from availability.status import gather

from .helpers import Fleet, eventually, scrape_metrics, server_env, store_env

# Ten times the default pace: staleness 9 s (the traffic scales with it: heartbeats every
# 1.5-3 s, 15 chats a second), auto-offline every 3 s. Valkey's timeout as the `settings`
# fixture has it: on a busy test machine a 0.25 s read can time out, a fallback status flags.
FAST = {
    "HEARTBEAT_STALE_SECONDS": "9",
    "MITRA_AUTO_OFFLINE_SWEEP_SECONDS": "3",
    "HEARTBEAT_MIRROR_INTERVAL_SECONDS": "3",
    "VALKEY_ONLINE_MIRROR_SWEEP_SECONDS": "10",
    "VALKEY_TIMEOUT_SECONDS": "1",
}
RUN_SECONDS = 40.0
SAMPLE_EVERY = 2.0


@dataclass
class Observed:
    statuses: list[dict[str, object]] = field(default_factory=list)
    changes: int = 0
    dashboards: set[tuple[int, int, int]] = field(default_factory=set)


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


async def _ctrl_c(process: asyncio.subprocess.Process, log: Path) -> int:
    process.send_signal(signal.SIGINT)
    try:
        async with asyncio.timeout(30):
            return await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"Ctrl-C did not stop it:\n{_tail(log)}") from None


@contextlib.asynccontextmanager
async def _started(
    args: list[str], env: dict[str, str], log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("w") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "availability",
            *args,
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _serving(
    client: AvailabilityClient, process: asyncio.subprocess.Process, log: Path
) -> None:
    async def serving() -> bool:
        assert process.returncode is None, _tail(log)
        with contextlib.suppress(Exception):
            return await client.health() == "SERVING"
        return False

    await eventually(serving, timeout=60, interval=0.1)


@pytest.mark.slow(seconds=45)
async def test_make_run_keeps_the_demo_fleet_alive_and_status_ok(
    settings: Settings, db: asyncpg.Connection, valkey: redis.Redis, tmp_path: Path
) -> None:
    address, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    leftover = await db.fetchval(
        "INSERT INTO mitras (display_name) VALUES ('Left Over') RETURNING id"
    )
    await valkey.set("{" + settings.valkey_key_prefix + "}:left-over", "1")
    env = store_env(
        settings,
        address,
        **FAST,
        METRICS_ADDRESS=f"127.0.0.1:{metrics_port}",
        LOG_FORMAT="text",
    )
    log, data = tmp_path / "dev.log", tmp_path / ".data"
    args = ["dev", "--reset", "--data-dir", str(data), "--demo-mitras", "200"]
    async with _started(args, env, log) as process, AvailabilityClient(address) as client:
        await _serving(client, process, log)
        started = await db.fetchval("SELECT now()")
        assert await db.fetchval("SELECT count(*) FROM mitras") == 200, "reset, then the demo"
        assert not await db.fetchval("SELECT count(*) FROM mitras WHERE id = $1", leftover)
        assert not await valkey.exists("{" + settings.valkey_key_prefix + "}:left-over")
        assert (data / "dev.env").exists()
        observed = Observed()

        async def follow_watch() -> None:
            async for event in client.watch_available():
                if not isinstance(event, AvailabilitySnapshot):
                    observed.changes += 1

        async def follow_dashboard() -> None:
            async for stats in client.watch_dashboard_stats(timedelta(seconds=1)):
                observed.dashboards.add(
                    (stats.counts.active_chats, stats.counts.pending_requests, stats.online_mitras)
                )

        followers = [asyncio.create_task(follow_watch()), asyncio.create_task(follow_dashboard())]
        status_settings = replace(settings, grpc_address=address)
        deadline = time.monotonic() + RUN_SECONDS
        while time.monotonic() < deadline:
            await asyncio.sleep(SAMPLE_EVERY)
            observed.statuses.append(await gather(status_settings, address=address))
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        metrics = await scrape_metrics(metrics_port)
        sessions = await db.fetch(
            "SELECT status, count(*) FROM chat_sessions WHERE created_at >= $1 GROUP BY status",
            started,
        )
        moved = {row["status"]: row["count"] for row in sessions}
        code = await _ctrl_c(process, log)

    text = log.read_text()
    problems = [s["problems"] for s in observed.statuses if not s["ok"]]
    assert not problems, problems
    assert len(observed.statuses) >= RUN_SECONDS / SAMPLE_EVERY - 3
    online = {s["valkey"]["online"] for s in observed.statuses}  # type: ignore[index]
    available = {s["server"]["available"] for s in observed.statuses}  # type: ignore[index]
    assert len(online) > 1 and len(available) > 1, (online, available)
    assert min(online) > 90, "the fleet stays online, about 60 % of the active"
    assert observed.changes > 50, "the watch stream moves"
    assert len(observed.dashboards) > 5, "the dashboard stream moves"
    assert {"active", "ended", "expired", "cancelled"} <= moved.keys(), moved
    assert moved["ended"] > 20, moved

    def handled(method: str) -> float:
        return metrics.get(
            (
                "grpc_server_handled_total",
                (
                    ("caller", "anonymous"),
                    ("grpc_code", "OK"),
                    ("grpc_method", method),
                    ("grpc_service", "availability.v1.AvailabilityService"),
                ),
            ),
            0.0,
        )

    # The demo's client coalesces its apps' heartbeats into BatchHeartbeat calls.
    recorded = metrics.get(("availability_heartbeats_total", (("outcome", "recorded"),)), 0.0)
    assert recorded > 1000, "every online app heartbeats every 1.5-3 s"
    assert handled("BatchHeartbeat") < recorded / 2, "heartbeats went together"
    for method in ("SetOnline", "SetOffline", "SetMitraActive", "FindAvailableMitras"):
        assert handled(method) > 0, method
    swept = metrics[("availability_sweep_affected_mitras_total", (("sweep", "auto_offline"),))]
    assert swept > 0, "quiet apps were taken offline by the auto-offline sweep"
    assert metrics[("availability_mass_stale_guard_trips_total", ())] == 0
    assert "mass-stale guard tripped" not in text
    assert "back after the sweep took them offline" in text
    summaries = [line for line in text.splitlines() if "demo traffic, last" in line]
    assert len(summaries) >= RUN_SECONDS / 3 - 2, "one line every 30 s, scaled to 3 s"
    assert "errors: none" in summaries[-1], summaries[-1]
    assert "Traceback" not in text, text[-3000:]
    assert code == 0, text[-3000:]
    assert not (data / "dev.env").exists(), "what `availability dev` wrote goes with it"


async def test_demo_live_brings_a_dead_fleet_back_and_drives_a_running_server(
    server: Server, db: asyncpg.Connection, tmp_path: Path
) -> None:
    env = server_env(
        server, LOG_FORMAT="text", HEARTBEAT_STALE_SECONDS=FAST["HEARTBEAT_STALE_SECONDS"]
    )
    log = tmp_path / "demo.log"
    # An empty database: the fleet is loaded, all offline, as after a stop longer than the
    # staleness with no traffic: the traffic brings 60 % of the active online at once.
    args = ["demo", "--live", "--mitras", "50", "--online-share", "0"]
    async with _started(args, env, log) as process:

        async def reported() -> bool:
            assert process.returncode is None, log.read_text()
            return "demo traffic, last" in log.read_text()

        await eventually(reported, timeout=30, interval=0.2)
        code = await _ctrl_c(process, log)
    text = log.read_text()
    assert code == 0, text
    assert await db.fetchval("SELECT count(*) FROM mitras") == 50
    started = re.search(r"(\d+) of (\d+) active online \((\d+) set online now\)", text)
    assert started, text
    online, active, set_online = map(int, started.groups())
    assert online == set_online == round(0.6 * active) and active > 40, started.group(0)
    started = "SELECT count(*) FROM chat_sessions WHERE created_at > now() - interval '30 s'"
    assert await db.fetchval(started) > 0, "customers start chats"
    assert server.metrics is not None
    metrics = await scrape_metrics(server.metrics.port)
    beats = sum(
        value
        for (name, labels), value in metrics.items()
        if name == "availability_heartbeats_total" and labels != (("outcome", "invalid_id"),)
    )
    assert beats >= 25, "every active app heartbeats once at the start, then every 1.5-3 s"
    assert "Traceback" not in text, text


async def test_a_call_in_flight_when_the_demo_deactivates_its_mitra_is_not_an_error(
    server: Server, fleet: Fleet, database_url: str
) -> None:
    """The demo's own deactivation races its apps' heartbeats: one already sent comes back
    refused (the mitra is deactivated, its sessions revoked). That is the demo's doing, not an
    error of its traffic (a `make run` once reported `errors: Heartbeat PERMISSION_DENIED 1`)."""
    mitra = await fleet.mitra(online=True)
    async with (
        AvailabilityClient(f"127.0.0.1:{server.port}", timeout=5.0) as client,
        asyncpg.create_pool(database_url, min_size=1, max_size=2) as pool,
    ):
        demo = DemoTraffic(client, pool)
        await demo._start()
        app = demo._apps[mitra]
        assert app.active and app.online
        await demo._set_active(app, False)
        await demo._beat(app)  # sent before the deactivation, answered after it
        assert demo.errors == Counter()
        assert demo.tally["deactivated"] == 1 and demo._deactivated == [mitra]
        assert not app.active and not app.online
