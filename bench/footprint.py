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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
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

# A session the script works on: its own rows per writer count and client, walked in order
# (wrapping), so each statement moves a row from the state the previous kind left it in.
_ROW = "md5(:w::text || ':' || :client_id::text || ':' || :k::text)::uuid"
_NEXT = "\\set i :i + 1\n\\set k :i % :pool\n"

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

# Before each kind, the rows it walks are put in the state that kind expects (untimed).
_PREPARE = {
    "offer": """
        INSERT INTO chat_sessions (id, customer_id, status)
        SELECT md5($1 || ':' || c || ':' || k)::uuid, gen_random_uuid(), 'searching'
        FROM generate_series(0, $2 - 1) c, generate_series(0, $3 - 1) k
        ON CONFLICT (id) DO UPDATE SET status = 'searching', mitra_id = NULL
    """,
    "accept": """
        UPDATE chat_sessions SET status = 'pending_acceptance',
            mitra_id = coalesce(mitra_id, md5('m' || (1 + abs(hashtext(id::text)) % $4))::uuid)
        WHERE id IN (SELECT md5($1 || ':' || c || ':' || k)::uuid
                     FROM generate_series(0, $2 - 1) c, generate_series(0, $3 - 1) k)
          AND status <> 'pending_acceptance'
    """,
    "end": """
        UPDATE chat_sessions SET status = 'active'
        WHERE id IN (SELECT md5($1 || ':' || c || ':' || k)::uuid
                     FROM generate_series(0, $2 - 1) c, generate_series(0, $3 - 1) k)
          AND status <> 'active'
    """,
}

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
async def database(admin_dsn: str, name: str, installed: bool) -> AsyncIterator[str]:
    """A migrated, seeded database; without `installed`, our triggers do not fire on the
    tables the chat backend writes, as if the service had never been there."""
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_dsn.rpartition("/")[0] + f"/{name}"
    try:
        truth = await Truth.connect(
            Settings(database_url=url, valkey_url="redis://unused", database_timeout_seconds=600)
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


async def run_pgbench(
    url: str,
    kind: str,
    writers: int,
    seconds: float,
    pool: int,
    folder: Path,
    synchronous: bool = False,
) -> float:
    script = folder / f"{kind}.sql"
    script.write_text(KINDS[kind][1])
    db = await asyncpg.connect(url)
    await db.execute("CHECKPOINT")
    await db.close()
    command = [
        pgbench(),
        "--no-vacuum",
        "--protocol=prepared",
        f"--client={writers}",
        f"--jobs={min(writers, 4)}",
        f"--time={max(1, round(seconds))}",
        f"--file={script}",
        f"--define=w={writers}",
        "--define=i=-1",
        f"--define=pool={pool}",
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


def pool_size(writers: int, seconds: float) -> int:
    """Rows per client: more than one client gets through in a run, at up to 6,000 updates/s
    shared by the writers."""
    return max(1000, int(6000 * seconds / writers))


async def measure(
    admin_dsn: str,
    seconds: float,
    writers: tuple[int, ...] = WRITERS,
    kinds: tuple[str, ...] = tuple(KINDS),
    rounds: int = 2,
    install: Callable[[str], object] | None = None,
    synchronous: bool = False,
) -> dict[tuple[str, int], tuple[float, float]]:
    """(kind, writers) -> (tps with our objects, tps without them)."""
    results: dict[tuple[str, int], tuple[float, float]] = {}
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"availability-footprint-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    async with (
        database(admin_dsn, "availability_footprint_on", True) as on,
        database(admin_dsn, "availability_footprint_off", False) as off,
    ):
        if install is not None:
            install(on)
        drainer = asyncio.create_task(drain(on))
        try:
            for count in writers:
                pool = pool_size(count, seconds)
                for kind in kinds:
                    tps = {"on": 0.0, "off": 0.0}
                    # Interleaved rounds, best of each: the machine is shared and a burst of
                    # someone else's work would otherwise land on one side only.
                    order = [(on, "on"), (off, "off")]
                    if (count + list(KINDS).index(kind)) % 2:
                        order.reverse()
                    for url, label in order * rounds:
                        if kind in _PREPARE:
                            db = await asyncpg.connect(url)
                            args = (str(count), count, pool, MITRAS)
                            await db.execute(
                                _PREPARE[kind], *args[: _PREPARE[kind].count("$4") + 3]
                            )
                            await db.close()
                        measured = await run_pgbench(
                            url, kind, count, seconds, pool, folder, synchronous
                        )
                        tps[label] = max(tps[label], measured)
                    results[(kind, count)] = (tps["on"], tps["off"])
                    progress(
                        f"footprint: {kind} at {count} writers: {tps['on']:,.0f} tps with our"
                        f" objects, {tps['off']:,.0f} without ({tps['on'] / tps['off']:.2f}x)"
                    )
        finally:
            drainer.cancel()
            with suppress(asyncio.CancelledError):
                await drainer
    shutil.rmtree(folder, ignore_errors=True)
    return results


def rows(results: dict[tuple[str, int], tuple[float, float]], seconds: float) -> list[Row]:
    out = []
    for (kind, writers), (on, off) in results.items():
        ratio = on / off
        gated = writers == max(WRITERS)
        out.append(
            Row(
                f"chat backend's writes, {KINDS[kind][0]}, {writers} writer(s)",
                f"{on:,.0f} tps with the service's triggers",
                f"{off:,.0f} tps without them (DISABLE TRIGGER USER)",
                ratio,
                f">= {TARGET}x at {max(WRITERS)} writers" if gated else "report",
                ratio >= TARGET if gated else None,
                f"pgbench, best of interleaved {seconds:.0f} s runs, {MITRAS:,} mitras,"
                f" {SESSIONS:,} sessions, synchronous_commit=off on both sides (the disk's"
                " noise out, our share of each write larger); ratio = with / without",
            )
        )
    return out


async def bench_footprint(admin_dsn: str, quick: bool) -> list[Row]:
    seconds, rounds = (3.0, 1) if quick else (6.0, 2)
    progress(f"footprint: pgbench, {seconds:.0f} s per run, best of {rounds}")
    return rows(await measure(admin_dsn, seconds, rounds=rounds), seconds)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
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
        args.database_url, args.seconds, rounds=args.rounds, synchronous=args.synchronous_commit
    )
    results = rows(measured, args.seconds)
    print("| statement | writers | with our triggers | without | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r.case} | {r.figure} | {r.comparison} | {r.ratio:.2f} | {r.met} |")


if __name__ == "__main__":
    asyncio.run(main())
