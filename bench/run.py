"""`make bench` / `make bench-quick`: measure the service next to what a user would otherwise
run, in one run on one machine, and write bench/RESULTS.md and bench/latency.png.

Stores: DATABASE_URL / VALKEY_URL when set, else the local servers on 5432 / 6379 when they
answer, else throwaway ones. A fresh database and key prefix per run; nothing shared is
touched beyond them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import redis.asyncio as redis

from availability.sweeps import Sweeps

from .common import Row, Stores, fresh_domain, median_ms, online_fleet, progress, stores, timed_s

HERE = Path(__file__).parent


async def bench_reseed(base: Stores, fleet: int) -> list[Row]:
    progress(f"reseed: {fleet} mitras")
    async with fresh_domain(base, "reseed") as availability:
        db = await asyncpg.connect(availability.settings.database_url)
        await online_fleet(db, fleet)
        await db.close()
        empty = await timed_s(availability.reconcile)
        again = await timed_s(availability.reconcile)
        client = availability.mirror.client
        keys = [k async for k in client.scan_iter(match=availability.mirror.keys.prefix + "*")]
        # SAMPLES 0: every element counted, not an estimate from a sample.
        used = sum([await client.memory_usage(k, samples=0) or 0 for k in keys])
    return [
        Row(
            f"reseed {fleet:,} mitras (empty Valkey)",
            f"{empty:.2f} s",
            target="<= 3 s",
            met=empty <= 3.0,
            note="readers use Postgres until the seed completes",
        ),
        Row(
            f"reconcile {fleet:,} mitras (no drift)",
            f"{again:.2f} s",
            target="<= 3 s",
            met=again <= 3.0,
            note="in place: no reader sees a partial set",
        ),
        Row(
            f"Valkey memory of the mirror, {fleet:,} mitras online",
            f"{used / 2**20:.1f} MiB",
            f"{used / fleet / 1024:.2f} KiB a mitra",
            target="report",
            note=f"MEMORY USAGE SAMPLES 0 summed over the deployment's {len(keys)} keys after the"
            " reseed; the watch stream's retained changes (WATCH_RETAINED_CHANGES) come on top",
        ),
    ]


async def bench_auto_offline(base: Stores, small: int, large: int) -> list[Row]:
    timings = {}
    for online in (small, large):
        progress(f"auto-offline: 100 stale among {online} online")
        async with fresh_domain(base, f"offline{online}") as availability:
            db = await asyncpg.connect(availability.settings.database_url)
            ids = await online_fleet(db, online)
            await db.close()
            await availability.reconcile()
            sweeps = Sweeps(availability)
            keys = availability.mirror.keys
            samples = []
            for _ in range(5):
                stale = ids[:100]
                await availability.mirror.client.zadd(
                    keys.heartbeats, {str(m): 1000 for m in stale}
                )
                samples.append(await timed_s(lambda s=sweeps: s.auto_offline(1)))
                for m in stale:
                    await availability.set_online(m)
            timings[online] = sorted(samples)[len(samples) // 2]
    ratio = timings[large] / timings[small]
    return [
        Row(
            f"auto-offline sweep, 100 stale among {large:,} online",
            f"{timings[large] * 1000:.1f} ms",
            f"{timings[small] * 1000:.1f} ms among {small:,}",
            ratio,
            "large/small <= 2",
            ratio <= 2.0,
            "cost follows the stale, not the online",
        ),
    ]


async def bench_flush(base: Stores, fleet: int, single_sample: int) -> list[Row]:
    progress(f"heartbeat flush: {fleet} heartbeats")
    async with fresh_domain(base, "flush") as availability:
        db = await asyncpg.connect(availability.settings.database_url)
        ids = await online_fleet(db, fleet)
        await availability.reconcile()
        now_ms = int(time.time() * 1000)
        await availability.mirror.client.hset(
            availability.mirror.keys.dirty, mapping={str(m): now_ms for m in ids}
        )
        sweeps = Sweeps(availability)
        batch = await timed_s(lambda: sweeps.flush_heartbeats(1))
        when = datetime.now(UTC)

        async def one_by_one() -> None:
            for m in ids[:single_sample]:
                await db.execute(
                    "UPDATE mitra_online_status SET last_heartbeat_at = $2 WHERE mitra_id = $1",
                    m,
                    when,
                )

        single = await timed_s(one_by_one) * fleet / single_sample
        await db.close()
    ratio = single / batch
    return [
        Row(
            f"heartbeat flush, {fleet:,} heartbeats",
            f"{batch:.2f} s (one UNNEST statement)",
            f"{single:.1f} s one UPDATE per mitra (from {single_sample:,}, scaled)",
            ratio,
            ">= 50x",
            ratio >= 50,
            "includes reading the dirty hash from Valkey",
        ),
    ]


async def bench_dashboard(base: Stores, sessions: int, runs: int) -> list[Row]:
    from tests.seed_reference import seed_dashboard

    progress(f"dashboard: {sessions} chat sessions")
    async with fresh_domain(base, "dashboard") as availability:
        db = await asyncpg.connect(availability.settings.database_url)
        await online_fleet(db, 10_000)
        await db.execute(
            """
            INSERT INTO chat_sessions (mitra_id, customer_id, status, topic_sensitivity, created_at)
            SELECT ids[1 + g % cardinality(ids)], gen_random_uuid(),
                   (ARRAY['ended','ended','ended','expired','cancelled','searching'])[1 + g % 6],
                   CASE WHEN g % 5 = 0 THEN 'sensitive' ELSE 'normal' END,
                   now() - (g % 90) * interval '1 day'
            FROM (SELECT array_agg(id) AS ids FROM mitras) m, generate_series(1, $1) g
            """,
            sessions,
        )
        # The rows are inserted days back, each appending a change to the day counters; the
        # service folds those every ten minutes (the listener's close_session_days). Fold
        # them as it would: a dashboard read is measured in the steady state, not within ten
        # minutes of a backfill of a million sessions.
        await availability.truth.close_session_days(db)
        await db.execute("VACUUM ANALYZE chat_sessions, chat_session_day_changes")
        await db.close()
        await availability.reconcile()
        pool = await asyncpg.create_pool(availability.settings.database_url, min_size=6, max_size=6)
        ours = await median_ms(lambda: availability.dashboard(1000, max_age=0), runs)
        seed = await median_ms(lambda: seed_dashboard(pool), runs)
        await pool.close()
    ratio = seed / ours
    return [
        Row(
            f"GetDashboardStats, {sessions:,} chat sessions, 10,000 online",
            f"{ours:.1f} ms median",
            f"{seed:.1f} ms the seed's six queries",
            ratio,
            ">= 2x",
            ratio >= 2,
            "computation itself (the shared 1 s cache bypassed)",
        ),
    ]


async def bench_trigger(base: Stores, samples: int) -> list[Row]:
    """Load follows truth on its own: from a chat_sessions commit to the mirror's new load,
    through the change table the triggers note it in (polled every CHANGE_POLL_SECONDS). The
    server is its own process (`availability serve`), so this process's polling of Valkey
    does not share its event loop."""
    progress("load via the change table")
    async with fresh_domain(base, "trigger") as availability:
        settings = availability.settings
        db = await asyncpg.connect(settings.database_url)
        mitra = (await online_fleet(db, 100))[0]
        loads = availability.mirror.keys.loads
        client = availability.mirror.client
        env = {
            **os.environ,
            "DATABASE_URL": settings.database_url,
            "VALKEY_URL": settings.valkey_url,
            "VALKEY_KEY_PREFIX": settings.valkey_key_prefix,
            "GRPC_ADDRESS": "127.0.0.1:0",
            "METRICS_ADDRESS": "",
            "LOG_LEVEL": "WARNING",
        }
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "availability", "serve", env=env
        )
        waits = []
        try:
            deadline = time.monotonic() + 60
            while await client.hget(loads, str(mitra)) is None:  # seeded
                if time.monotonic() > deadline or server.returncode is not None:
                    raise RuntimeError("availability serve did not seed the mirror")
                await asyncio.sleep(0.05)
            for i in range(samples):
                before = await client.hget(loads, str(mitra))
                started = time.perf_counter()
                session = await db.fetchval(
                    "INSERT INTO chat_sessions (mitra_id, customer_id, status)"
                    " VALUES ($1, gen_random_uuid(), $2) RETURNING id",
                    mitra,
                    "active" if i % 2 == 0 else "pending_payment",
                )
                while await client.hget(loads, str(mitra)) == before:
                    await asyncio.sleep(0.0005)
                waits.append((time.perf_counter() - started) * 1000)
                await db.execute("DELETE FROM chat_sessions WHERE id = $1", session)
                while await client.hget(loads, str(mitra)) != before:
                    await asyncio.sleep(0.0005)
        finally:
            server.terminate()
            await server.wait()
            await db.close()
    waits.sort()
    median, p99 = waits[len(waits) // 2], waits[int(len(waits) * 0.99) - 1]
    return [
        Row(
            "load follows a chat_sessions change via the change table (no RecomputeLoad)",
            f"{median:.1f} ms median, {p99:.1f} ms p99",
            target="p99 < 100 ms",
            met=p99 < 100,
            note=f"{samples} changes, commit to Valkey, `availability serve` in its own process;"
            f" includes the {settings.change_poll_seconds * 1000:.0f} ms poll interval",
        ),
    ]


async def seed_find(client: redis.Redis, prefix: str, stale_ms: int) -> list[str]:
    """The seed's findAvailableMitras: SDIFF, then a GET per id for load, capacity, heartbeat."""
    ids = await client.sdiff(f"{prefix}:online", f"{prefix}:deactivated")
    pipe = client.pipeline(transaction=False)
    for i in ids:
        pipe.get(f"{prefix}:capacity:{i.decode()}")
        pipe.get(f"{prefix}:max:{i.decode()}")
        pipe.get(f"{prefix}:heartbeat:{i.decode()}")
    values = await pipe.execute()
    now = time.time() * 1000
    found = []
    for n, i in enumerate(ids):
        load, capacity, beat = values[3 * n : 3 * n + 3]
        if int(load) < int(capacity) and now - float(beat) < stale_ms:
            found.append((int(load), i.decode()))
    return [i for _, i in sorted(found)[:100]]


async def commands(client: redis.Redis) -> int:
    info = await client.info("stats")
    return int(info["total_commands_processed"])


async def bench_find(
    base: Stores, sizes: list[int], runs: int
) -> tuple[list[Row], dict[str, list[float]]]:
    rows: list[Row] = []
    curves: dict[str, list[float]] = {
        "service (Valkey)": [],
        "seed method": [],
        "Postgres fallback": [],
    }
    for size in sizes:
        progress(f"find available: {size} online")
        async with fresh_domain(base, f"find{size}") as availability:
            db = await asyncpg.connect(availability.settings.database_url)
            ids = await online_fleet(db, size)
            loads = dict(
                await db.fetch(
                    "SELECT mitra_id, count(*) FROM chat_sessions"
                    " WHERE status = 'active' GROUP BY 1"
                )
            )
            await db.close()
            await availability.reconcile()
            client = availability.mirror.client
            seed_prefix = f"seedbench-{uuid.uuid4().hex[:6]}"
            now_ms = int(time.time() * 1000)
            pipe = client.pipeline(transaction=False)
            for m in ids:
                pipe.sadd(f"{seed_prefix}:online", str(m))
                pipe.set(f"{seed_prefix}:capacity:{m}", loads.get(m, 0))
                pipe.set(f"{seed_prefix}:max:{m}", 3)
                pipe.set(f"{seed_prefix}:heartbeat:{m}", now_ms)
            await pipe.execute()
            stale_ms = int(availability.settings.heartbeat_stale_seconds * 1000)
            before = await commands(client)
            await availability.mirror.find_available(100, [])
            inside = await commands(client) - before - 2  # the EVALSHA and INFO itself
            ours = await median_ms(lambda: availability.mirror.find_available(100, []), runs)
            seed = await median_ms(
                lambda: seed_find(client, seed_prefix, stale_ms), max(3, runs // 5)
            )
            fallback = await median_ms(lambda: availability.truth.find_available(100, []), runs)
            async for key in client.scan_iter(match=f"{seed_prefix}:*", count=10_000):
                await client.unlink(key)
        curves["service (Valkey)"].append(ours)
        curves["seed method"].append(seed)
        curves["Postgres fallback"].append(fallback)
        rows.append(
            Row(
                f"FindAvailableMitras(limit 100), {size:,} online",
                f"{ours:.2f} ms median; 1 round trip (EVALSHA), {inside} commands inside it",
                f"seed {seed:.2f} ms; Postgres fallback {fallback:.2f} ms",
                seed / ours,
                ">= 2x seed, >= 10x fallback at 10k" if size == 10_000 else "",
                (seed / ours >= 2 and fallback / ours >= 10) if size == 10_000 else None,
                f"fallback ratio {fallback / ours:.1f}x",
            )
        )
    return rows, curves


def write_results(
    rows: list[Row], curves: dict[str, list[float]], sizes: list[int], quick: bool
) -> None:
    lines = [
        "# Benchmark results",
        "",
        f"Measured by `make {'bench-quick' if quick else 'bench'}` on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores; each comparison is "
        "from the same run. Medians; ratios are comparison / ours (higher is better) unless "
        "the target says otherwise.",
        "",
        "| case | figure | comparison | ratio | target | met? | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.1f}"
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(
            f"| {r.case} | {r.figure} | {r.comparison} | {ratio} | {r.target} | {met} | {r.note} |"
        )
    lines += [
        "",
        "![latency against fleet size](latency.png)",
        "",
        "## Where the time goes, and what moved it",
        "",
        "- **Heartbeat vs no-op** (py-spy, `--workers 1`): the server is CPU-bound on its core and",
        "  about half of a heartbeat's CPU is gRPC's own machinery, the same as the no-op's. The",
        "  Python Redis client was the next third: redis-py 8's pool, command packing and timeout",
        "  wrappers. Now the first heartbeat in flight goes at once in its own task (no extra task",
        "  or future), its script is sent by hash on a connection of its own with the command",
        "  packed by hand, and heartbeats that arrive while one is in flight go together in the",
        "  next call (group commit: at loopback round trips batches average about 1.1; a remote",
        "  Valkey makes them larger). That took the ratio from 0.59-0.64 to 0.75-0.83.",
        "- **`--workers 2` and `--workers 3`** (2 and 3 instances): the workers share the two",
        "  cores with the four h2load processes, Valkey and Postgres, so no process has a core of",
        "  its own and the ratios (0.5-0.8 across runs) are not a clean measurement. Under that",
        "  oversubscription some Valkey calls exceed `VALKEY_TIMEOUT_SECONDS` (0.25 s) and fall",
        "  back to Postgres, which is why those rows say NOT VERIFIED. They show how the work",
        "  divides over instances on one machine, not how far more machines would go.",
        "- **Reseed, 100,000 mitras** (target 3 s; 2.6-4.7 s across runs, the slowest on",
        "  2026-12-07): Valkey-bound. Per batch of 1,000 mitras the",
        "  apply script spends about 30 ms in Valkey (INFO commandstats): about 2.4 us per",
        "  sorted-set insert (three sorted sets), about 1 us per hash field (six hashes) and",
        "  about 13 us of Lua per mitra; reading Postgres (0.7 s) and packing (0.2 s) overlap with",
        "  it. The script now reads and writes each structure with one command per batch (4.2 s",
        "  to 3.3 s in one run). On this machine the same reseed took 2.4 s in an earlier, less",
        "  loaded run, when the seed's own method was also 1.2-1.8x faster than today.",
        "- **Heartbeat flush** (target 50x; 41-54x across runs, the spread mostly in the",
        "  one-UPDATE-per-mitra baseline, 20-37 s): `mitra_online_status` is at fillfactor 50, so",
        "  every row's next version fits its page: 99 % of the flush's updates are HOT (70 %",
        "  allowed about a third) and the write is twice as fast.",
        "",
    ]
    # Sections written by hand from one-off runs (python -m bench.footprint and the like)
    # follow KEPT in the file; a new run keeps them.
    path = HERE / ("RESULTS-quick.md" if quick else "RESULTS.md")
    previous = path.read_text() if path.exists() else ""
    kept = previous[previous.index(KEPT) :] if KEPT in previous else KEPT + "\n"
    path.write_text("\n".join(lines) + "\n" + kept)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, values in curves.items():
        axes.plot(sizes, values, marker="o", label=label)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("online mitras")
    axes.set_ylabel("FindAvailableMitras(limit 100), median ms")
    axes.set_title("Find available: latency against fleet size")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(HERE / ("latency-quick.png" if quick else "latency.png"), dpi=120)


KEPT = "<!-- Kept by make bench: the sections below are from one-off runs, dated. -->"


async def main(quick: bool) -> None:
    sizes = [1_000, 10_000] if quick else [1_000, 10_000, 100_000]
    city = 10_000 if quick else 100_000
    rows: list[Row] = []
    async with stores() as base:
        rows += await bench_reseed(base, city)
        rows += await bench_auto_offline(base, 1_000, city)
        rows += await bench_flush(base, city, 1_000 if quick else 5_000)
        find_rows, curves = await bench_find(base, sizes, 20 if quick else 50)
        rows += find_rows
        rows += await bench_dashboard(base, 100_000 if quick else 1_000_000, 10 if quick else 20)
        rows += await bench_trigger(base, 50 if quick else 200)
        from .footprint import bench_footprint

        rows += await bench_footprint(base.admin_dsn, quick)
        from .throughput import bench_throughput

        rows += await bench_throughput(base.admin_dsn, base.valkey_url, quick)
        from .watchers import bench_watchers

        rows += await bench_watchers(base.admin_dsn, base.valkey_url, quick)
        from .trust import bench_trust

        rows += await bench_trust(base.admin_dsn, city)
    write_results(rows, curves, sizes, quick)
    for r in rows:
        progress(f"{r.case}: {r.figure} | {r.comparison} | met={r.met}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    asyncio.run(main(parser.parse_args().quick))
