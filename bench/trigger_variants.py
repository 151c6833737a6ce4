"""`python -m bench.trigger_variants`: what each way of noting a session's change costs the
chat backend's accepts and ends, on one database, swapped between runs.

One database migrated and seeded as `bench.footprint` does, drained as the service drains,
16 writers; the update trigger is swapped between interleaved runs (so every variant meets
the same data and the same noise) and each variant's median is given as a ratio to the runs
with no update trigger at all. The figures in README "Cost to your database" (the trigger
table) come from this and its one-off predecessors.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
from contextlib import suppress
from pathlib import Path

import asyncpg

from . import footprint
from .common import progress

_TRIGGER = "availability_session_update"
_EMPTY_TRIGGER = "availability_bench_empty"
_RULE = "availability_note_session_update_rule"
_LOADED = "('active', 'pending_payment')"
# The shipped update trigger's condition (migration 0008), in a rule's spelling too.
_CONDITION = (
    f"(OLD.status IN {_LOADED}) IS DISTINCT FROM (NEW.status IN {_LOADED})"
    f" OR (NEW.status IN {_LOADED} AND OLD.mitra_id IS DISTINCT FROM NEW.mitra_id)"
)
_EMPTY = f"""
CREATE OR REPLACE FUNCTION availability_bench_empty() RETURNS trigger
LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END; $$;
DROP TRIGGER IF EXISTS {_EMPTY_TRIGGER} ON chat_sessions;
CREATE TRIGGER {_EMPTY_TRIGGER} AFTER UPDATE OF mitra_id, status ON chat_sessions
    FOR EACH ROW WHEN ({_CONDITION}) EXECUTE FUNCTION availability_bench_empty();
ALTER TABLE chat_sessions DISABLE TRIGGER {_EMPTY_TRIGGER};
"""
# The shipped trigger's condition and upsert as a rule: no PL/pgSQL call, but a second
# query in the writer's statement, reading the row under its own snapshot before the update.
_RULE_SQL = f"""
CREATE RULE {_RULE} AS ON UPDATE TO chat_sessions
WHERE {_CONDITION}
DO ALSO INSERT INTO availability_changes AS c (mitra_id)
SELECT DISTINCT m FROM (VALUES
    (CASE WHEN OLD.status IN {_LOADED} THEN OLD.mitra_id END),
    (CASE WHEN NEW.status IN {_LOADED} THEN NEW.mitra_id END)) v(m)
WHERE m IS NOT NULL ORDER BY m
ON CONFLICT (mitra_id) DO UPDATE SET noted_at = c.noted_at
"""
VARIANTS = {
    # name: (what it is, the triggers enabled, whether the rule is in place)
    "none": ("no update trigger", (), False),
    "empty": ("an empty PL/pgSQL function", (_EMPTY_TRIGGER,), False),
    "shipped": ("the shipped upsert (migration 0008)", (_TRIGGER,), False),
    "rule": ("a DO ALSO rule doing the upsert", (), True),
}


async def arrange(db: asyncpg.Connection, variant: str) -> None:
    """Swap to `variant`; the rule goes only after the rows are prepared, since Postgres
    refuses INSERT ... ON CONFLICT (the preparation's) on a table with an update rule."""
    _, enabled, _ = VARIANTS[variant]
    await db.execute(f"DROP RULE IF EXISTS {_RULE} ON chat_sessions")
    for trigger in (_TRIGGER, _EMPTY_TRIGGER):
        state = "ENABLE" if trigger in enabled else "DISABLE"
        await db.execute(f"ALTER TABLE chat_sessions {state} TRIGGER {trigger}")


async def measure(
    admin_dsn: str, kinds: list[str], variants: list[str], seconds: float, rounds: int
) -> dict[tuple[str, str], list[float]]:
    writers = max(footprint.WRITERS)
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"availability-variants-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, str], list[float]] = {}
    async with footprint.database(admin_dsn, "availability_trigger_variants", True) as url:
        db = await asyncpg.connect(url)
        await db.execute(_EMPTY)
        drainer = asyncio.create_task(footprint.drain(url))
        try:
            for kind in kinds:
                await arrange(db, "none")
                rate = await footprint.timed(url, kind, writers, 2000 // writers, folder, False)
                transactions = max(100, int(rate * seconds / writers))
                for n in range(rounds):
                    shift = n % len(variants)
                    for variant in variants[shift:] + variants[:shift]:
                        await arrange(db, variant)
                        await footprint.prepare(url, kind, writers, transactions)
                        if VARIANTS[variant][2]:
                            await db.execute(_RULE_SQL)
                        tps = await footprint.run_pgbench(url, kind, writers, transactions, folder)
                        runs.setdefault((kind, variant), []).append(tps)
                        progress(f"variants: {kind}, {variant}, round {n + 1}: {tps:,.0f} tps")
        finally:
            drainer.cancel()
            with suppress(asyncio.CancelledError):
                await drainer
            await db.close()
    shutil.rmtree(folder, ignore_errors=True)
    return runs


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", default=["accept", "end"], choices=["accept", "end"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="a superuser DSN; one throwaway database is made beside its database",
    )
    args = parser.parse_args()
    variants = ["none", *(v for v in args.variants if v != "none")]
    runs = await measure(args.database_url, args.kinds, variants, args.seconds, args.rounds)
    print(
        f"| the update trigger ({max(footprint.WRITERS)} writers, drained) | "
        + " | ".join(args.kinds)
        + " |"
    )
    print("| --- |" + " --- |" * len(args.kinds))
    for variant in variants:
        cells = []
        for kind in args.kinds:
            median = statistics.median(runs[(kind, variant)])
            cells.append(
                f"{median / statistics.median(runs[(kind, 'none')]):.2f}x ({median:,.0f} tps)"
            )
        print(f"| {VARIANTS[variant][0]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    asyncio.run(main())
