"""`python -m bench.footprint` (and part of `make bench`): what the service's database objects
cost the chat backend's own writes.

pgbench drives the chat backend's statements on two databases seeded alike (10,000 mitras,
200,000 sessions): one migrated by the service with everything installed and a drainer
polling the change table as the service does, one with the same schema and
`DISABLE TRIGGER USER` on the tables other backends write. Each statement kind runs for a few
seconds at 1, 4 and 16 concurrent writers, alternating the two databases, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from availability.listener import _TAKE_BATCH
from availability.settings import Settings
from availability.truth import Truth

from .common import Row, progress

WRITERS = (1, 4, 16)
MITRAS = 10_000
SESSIONS = 200_000
TARGET = 0.8
LOAD_POLL_SECONDS = 0.05
FOLLOWING = {
    "triggers": "with the service's triggers",
    "load poll": "with no trigger, loads polled (LOAD_POLL_SECONDS=0.05)",
}

# The session a script works on: its own row per writer count, client and transaction
# number, each walked once (pgbench --transactions, never wrapping), so every timed statement
# makes the transition its kind names on a row in the state the chat backend leaves it in
# (an end really ends an active session, and our triggers fire as they would).
_ROW = "md5(:w::text || ':' || :client_id::text || ':' || :k::text)::uuid"
_NEXT = "\\set i :i + 1\n\\set k :i\n"

KINDS: dict[str, tuple[str, str]] = {
    # kind: (what the chat backend does, its pgbench script)
    "create": (
        "create a session (searching)",
        "\\set sensitive random(1, 5)\n"
        "INSERT INTO chat_sessions (customer_id, status, topic_sensitivity) VALUES"
        " (gen_random_uuid(), 'searching',"
        " CASE WHEN :sensitive = 1 THEN 'sensitive' ELSE 'normal' END);\n",
    ),
    "offer": (
        "offer it to a mitra (pending_acceptance)",
        f"{_NEXT}\\set m random(1, :mitras)\n"
        "UPDATE chat_sessions SET status = 'pending_acceptance',"
        " mitra_id = md5('m' || :m::text)::uuid"
        f" WHERE id = {_ROW};\n",
    ),
    "accept": (
        "accept: pending_payment, then active (two transactions)",
        f"{_NEXT}UPDATE chat_sessions SET status = 'pending_payment' WHERE id = {_ROW};\n"
        f"UPDATE chat_sessions SET status = 'active' WHERE id = {_ROW};\n",
    ),
    "end": (
        "end (9 in 10) or expire",
        f"{_NEXT}\\set e random(1, 10)\n"
        "UPDATE chat_sessions SET status = CASE WHEN :e = 1 THEN 'expired' ELSE 'ended' END"
        f" WHERE id = {_ROW};\n",
    ),
}

# Before each timed run, the rows its kind walks are put in the state that kind expects
# (untimed): searching for an offer, offered to a mitra for an accept, active for an end.
_BEFORE = {"offer": "searching", "accept": "pending_acceptance", "end": "active"}
_PREPARE = """
    INSERT INTO chat_sessions (id, customer_id, status, mitra_id)
    SELECT md5($1 || ':' || c || ':' || k)::uuid, gen_random_uuid(), $4,
           CASE WHEN $4 <> 'searching' THEN md5('m' || (1 + (c * 7919 + k) % $5))::uuid END
    FROM generate_series(0, $2 - 1) c, generate_series(0, $3 - 1) k
    ON CONFLICT (id) DO UPDATE SET status = excluded.status, mitra_id = excluded.mitra_id
"""

_SEED = """
INSERT INTO mitras (id, display_name, max_concurrent_sessions)
SELECT md5('m' || g)::uuid, 'Mitra ' || g, 3 FROM generate_series(1, $1) g;
INSERT INTO mitra_online_status (mitra_id, is_online, last_heartbeat_at)
SELECT id, random() < 0.5, now() FROM mitras;
INSERT INTO chat_sessions (mitra_id, customer_id, status, topic_sensitivity, created_at)
SELECT md5('m' || (1 + g % $1))::uuid, gen_random_uuid(),
       (ARRAY['ended','ended','ended','ended','expired','cancelled','active'])[1 + g % 7],
       CASE WHEN g % 5 = 0 THEN 'sensitive' ELSE 'normal' END,
       now() - (g % 30) * interval '1 day' - (g % 86400) * interval '1 second'
FROM generate_series(1, $2) g;
"""

_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)


def pgbench() -> str:
    found = shutil.which("pgbench")
    if not found:
        raise RuntimeError("pgbench not found: apt-get install postgresql-client")
    return found


@asynccontextmanager
async def database(
    admin_dsn: str, name: str, installed: bool, triggers: bool = True
) -> AsyncIterator[str]:
    """A migrated, seeded database; without `installed`, our triggers do not fire on the
    tables the chat backend writes, as if the service had never been there; without
    `triggers`, migrated with CHAT_SESSION_TRIGGERS=false."""
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_dsn.rpartition("/")[0] + f"/{name}"
    try:
        truth = await Truth.connect(
            Settings(
                database_url=url,
                valkey_url="redis://unused",
                database_timeout_seconds=600,
                chat_session_triggers=triggers,
            )
        )
        await truth.migrate()
        await truth.close()
        db = await asyncpg.connect(url)
        if not installed:
            await db.execute("ALTER TABLE chat_sessions DISABLE TRIGGER USER")
            await db.execute("ALTER TABLE mitras DISABLE TRIGGER USER")
        for statement in _SEED.split(";\n"):
            if statement.strip():
                await db.execute(statement, *([MITRAS, SESSIONS][: statement.count("$")]))
        await db.execute("TRUNCATE availability_changes")
        await db.execute("VACUUM ANALYZE")
        await db.close()
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def drain(url: str) -> None:
    """What every instance of the service runs against the database (listener.py): take the
    noted changes, read those mitras' states (the resync's Postgres half), and poll again
    after CHANGE_POLL_SECONDS, at once only when a full batch came."""
    settings = Settings(database_url=url, valkey_url="redis://unused", database_pool_size=1)
    truth = await Truth.connect(settings)
    try:
        while True:
            taken = await truth.take_changes(_TAKE_BATCH)
            if taken:
                await truth.states(taken)
            if len(taken) < _TAKE_BATCH:
                await asyncio.sleep(settings.change_poll_seconds)
    finally:
        await truth.close()


async def follow_loads(url: str, polls: list[float]) -> None:
    """What the service runs instead with CHAT_SESSION_TRIGGERS=false and LOAD_POLL_SECONDS
    (listener.py, on the one instance that leads): every loaded mitra's load from the load
    index, and the states of those whose load moved (the resync's Postgres half). `polls`
    gets each poll's seconds."""
    settings = Settings(database_url=url, valkey_url="redis://unused", database_pool_size=1)
    truth = await Truth.connect(settings)
    try:
        async with truth.dedicated() as conn:
            last = await truth.loads(conn)
            while True:
                started = time.perf_counter()
                loads = await truth.loads(conn)
                moved = [m for m in loads.keys() | last.keys() if loads.get(m) != last.get(m)]
                last = loads
                if moved:
                    await truth.states(moved)
                polls.append(time.perf_counter() - started)
                await asyncio.sleep(LOAD_POLL_SECONDS)
    finally:
        await truth.close()


async def run_pgbench(
    url: str,
    kind: str,
    writers: int,
    transactions: int,
    folder: Path,
    synchronous: bool = False,
) -> float:
    """tps of `transactions` scripts per writer, each on its own row."""
    script = folder / f"{kind}.sql"
    script.write_text(KINDS[kind][1])
    command = [
        pgbench(),
        "--no-vacuum",
        "--protocol=prepared",
        f"--client={writers}",
        f"--jobs={min(writers, 4)}",
        f"--transactions={transactions}",
        f"--file={script}",
        f"--define=w={writers}",
        "--define=i=-1",
        f"--define=mitras={MITRAS}",
        url,
    ]
    # No commit waits for the disk: on a shared machine, fsync times swing by 3x from one run
    # to the next and would hide (or invent) our cost; without them our triggers' CPU and
    # locks are a larger share of each write, so the ratio is the harsher one.
    env = {**os.environ, "PGOPTIONS": f"-c synchronous_commit={'on' if synchronous else 'off'}"}
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await process.communicate()
    found = _TPS.search(out.decode())
    if process.returncode != 0 or not found:
        raise RuntimeError(f"pgbench failed ({process.returncode}): {err.decode()[-2000:]}")
    return float(found.group(1))


async def prepare(url: str, kind: str, writers: int, transactions: int) -> None:
    """Put the rows a run walks in the state its kind expects, and wait until the drainer
    has taken the changes that made (so the timed run starts from an empty change table)."""
    db = await asyncpg.connect(url)
    try:
        if kind in _BEFORE:
            await db.execute(_PREPARE, str(writers), writers, transactions, _BEFORE[kind], MITRAS)
        await db.execute("VACUUM chat_sessions")
        while await db.fetchval("SELECT EXISTS (SELECT 1 FROM availability_changes)"):
            await asyncio.sleep(0.02)
        await db.execute("CHECKPOINT")
    finally:
        await db.close()


async def timed(
    url: str, kind: str, writers: int, transactions: int, folder: Path, synchronous: bool
) -> float:
    await prepare(url, kind, writers, transactions)
    return await run_pgbench(url, kind, writers, transactions, folder, synchronous)


@dataclass
class Footprint:
    """One (kind, writers) pair of runs: best tps with our objects and without them, and
    under the load poll, how long its polls took meanwhile (seconds, sorted)."""

    on: float
    off: float
    polls: list[float] = field(default_factory=list)


async def measure(
    admin_dsn: str,
    seconds: float,
    writers: tuple[int, ...] = WRITERS,
    kinds: tuple[str, ...] = tuple(KINDS),
    rounds: int = 2,
    synchronous: bool = False,
    following: str = "triggers",
) -> dict[tuple[str, int], Footprint]:
    """(kind, writers) -> figures, the service following chat_sessions by `following`."""
    results: dict[tuple[str, int], Footprint] = {}
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"availability-footprint-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    triggers = following == "triggers"
    polls: list[float] = []
    async with (
        database(admin_dsn, "availability_footprint_on", True, triggers) as on,
        database(admin_dsn, "availability_footprint_off", False) as off,
    ):
        follower = asyncio.create_task(drain(on) if triggers else follow_loads(on, polls))
        try:
            for count in writers:
                for kind in kinds:
                    # Sized from a short run without our objects, for runs of about
                    # `seconds`: every row is walked once, however fast the machine.
                    rate = await timed(off, kind, count, max(50, 2000 // count), folder, False)
                    transactions = max(100, int(rate * seconds / count))
                    tps = {"on": 0.0, "off": 0.0}
                    taken: list[float] = []
                    # Interleaved rounds, best of each: the machine is shared and a burst of
                    # someone else's work would otherwise land on one side only.
                    order = [(on, "on"), (off, "off")]
                    if (count + list(KINDS).index(kind)) % 2:
                        order.reverse()
                    for url, label in order * rounds:
                        await prepare(url, kind, count, transactions)
                        polls.clear()
                        measured = await run_pgbench(
                            url, kind, count, transactions, folder, synchronous
                        )
                        if label == "on":
                            taken += polls
                        tps[label] = max(tps[label], measured)
                    results[(kind, count)] = Footprint(tps["on"], tps["off"], sorted(taken))
                    progress(
                        f"footprint ({following}): {kind} at {count} writers:"
                        f" {tps['on']:,.0f} tps with our objects, {tps['off']:,.0f} without"
                        f" ({tps['on'] / tps['off']:.2f}x), {transactions:,} statements per"
                        f" writer{poll_figures(sorted(taken))}"
                    )
        finally:
            follower.cancel()
            with suppress(asyncio.CancelledError):
                await follower
    shutil.rmtree(folder, ignore_errors=True)
    return results


def poll_figures(polls: list[float]) -> str:
    if not polls:
        return ""
    median, p99 = polls[len(polls) // 2], polls[max(0, int(len(polls) * 0.99) - 1)]
    return f"; a load poll took {median * 1000:.1f} ms median, {p99 * 1000:.1f} ms p99"


def rows(
    results: dict[tuple[str, int], Footprint], seconds: float, following: str = "triggers"
) -> list[Row]:
    out = []
    for (kind, writers), figures in results.items():
        ratio = figures.on / figures.off
        gated = writers == max(WRITERS)
        polled = poll_figures(figures.polls)
        out.append(
            Row(
                f"chat backend's writes, {KINDS[kind][0]}, {writers} writer(s),"
                f" {FOLLOWING[following]}",
                f"{figures.on:,.0f} tps with our objects",
                f"{figures.off:,.0f} tps without them (DISABLE TRIGGER USER)",
                ratio,
                f">= {TARGET}x at {max(WRITERS)} writers" if gated else "report",
                ratio >= TARGET if gated else None,
                f"pgbench, best of interleaved {seconds:.0f} s runs, each statement on a row of"
                f" its own, {MITRAS:,} mitras, {SESSIONS:,} sessions, synchronous_commit=off on"
                " both sides (the disk's noise out, our share of each write larger); ratio ="
                f" with / without{polled}",
            )
        )
    return out


async def bench_footprint(admin_dsn: str, quick: bool) -> list[Row]:
    """Both ways of following chat_sessions: the triggers (the default) at 1, 4 and 16
    writers; no trigger and the load poll at 16 writers."""
    seconds, rounds = (3.0, 1) if quick else (5.0, 2)
    progress(f"footprint: pgbench, about {seconds:.0f} s per run, best of {rounds}")
    out = rows(await measure(admin_dsn, seconds, rounds=rounds), seconds)
    polled = await measure(
        admin_dsn, seconds, (max(WRITERS),), rounds=rounds, following="load poll"
    )
    return out + rows(polled, seconds, "load poll")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--writers", type=int, nargs="+", default=list(WRITERS))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--following", choices=list(FOLLOWING), default="triggers")
    parser.add_argument(
        "--synchronous-commit",
        action="store_true",
        help="commits wait for the disk (the default measures without: see run_pgbench)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a superuser DSN; two throwaway databases are made beside its database",
    )
    args = parser.parse_args()
    measured = await measure(
        args.database_url,
        args.seconds,
        tuple(args.writers),
        tuple(args.kinds),
        rounds=args.rounds,
        synchronous=args.synchronous_commit,
        following=args.following,
    )
    print("| statement | with our objects | without | ratio | met |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows(measured, args.seconds, args.following):
        print(f"| {r.case} | {r.figure} | {r.comparison} | {r.ratio:.2f}x | {r.met} |")


if __name__ == "__main__":
    asyncio.run(main())
