"""`python -m bench.logical`: logical decoding next to the change table (issue 16, item 3).

On a throwaway Postgres with `wal_level=logical` (fsync off, as every LocalPostgres; commits
with synchronous_commit=off, as bench.footprint runs them), pgbench drives the chat backend's
statements (bench.footprint's KINDS and seed) on databases alike, interleaved, best of rounds:

- none: `DISABLE TRIGGER USER`, no slot: the chat backend alone;
- change table: our triggers, and a drainer taking the change table every 20 ms;
- logical: triggers off, a test_decoding slot that a poller reads every 20 ms with
  `pg_logical_slot_get_changes`, keeping the chat_sessions changes that move a load. With the
  default replica identity a DELETE carries only the key and an UPDATE no old row, so a
  reroute's old mitra and a deleted session's mitra cannot be told: the service would need
  `REPLICA IDENTITY FULL` on chat_sessions, which logs every updated row's old image too.
  Both are measured ("logical" and "logical, full").
- logical, snapshots: "logical, full" with a running-xacts record logged after every read
  (`pg_log_standby_snapshot()`, Postgres 16+), so each read starts near the one before
  instead of re-decoding from a restart point the bgwriter moves every 15 s;
- logical, streaming: the same slot (full identity) read over the streaming replication
  protocol by a psycopg2 thread, so the walsender decodes each WAL record once, as it comes;
  run when psycopg2 is installed (`pip install psycopg2-binary`);
- logical, pg_recvlogical: the same stream taken by PostgreSQL's `pg_recvlogical` (C) into a
  pipe, read in chunks, so that the consumer's own parsing is out of the way and what is
  left is the walsender's decoding (its `sent_lsn` lag is reported with the latencies);
- logical, pgoutput: the same through `pgoutput` and a publication whose row filter passes
  only rows counted in a load, so the walsender formats and sends only the changes that
  move one.

`--variants` picks some (none is always run); `--hold-seconds 0` skips the slot retention.

Then the latency from a commit to the consumer holding the changed mitra id (single writer,
idle, and while 16 writers `end` sessions), and the WAL a slot retains while nobody reads it,
with and without `max_slot_wal_keep_size`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import re
import select
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import asyncpg

from availability.local_stores import start_postgres
from availability.settings import Settings
from availability.truth import Truth

from .common import progress
from .footprint import _BEFORE, _PREPARE, KINDS, MITRAS, database, run_pgbench

# The streaming consumer needs psycopg2 (`pip install psycopg2-binary`): without it, not run.
STREAMING = ("logical, streaming",) if importlib.util.find_spec("psycopg2") else ()
# pg_recvlogical (PostgreSQL's client tools) streams the slot in C; the service's side would
# only read its output in bulk.
RECVLOGICAL = (
    ("logical, pg_recvlogical", "logical, pgoutput") if shutil.which("pg_recvlogical") else ()
)
STREAMED = (*STREAMING, *RECVLOGICAL)
VARIANTS = ("none", "change table", "logical", "logical, full", "logical, snapshots", *STREAMED)
POLL_SECONDS = 0.02
SLOT = "availability_bench"
CAP = "64MB"
_COUNTED = ("active", "pending_payment")

# Only chat_sessions rows leave the server; test_decoding still decodes the whole WAL.
_GET_CHANGES = f"""
SELECT data FROM pg_logical_slot_get_changes('{SLOT}', NULL, NULL,
    'include-xids', '0', 'skip-empty-xacts', '1')
WHERE data LIKE 'table public.chat_sessions: %'
"""
_MITRA = re.compile(r"mitra_id\[uuid\]:(?:'([0-9a-f-]{36})'|null)")
_STATUS = re.compile(r"status\[text\]:'([a-z_]+)'")
# pgoutput sends only the changes this filter passes (an UPDATE is sent when either its old or
# its new row passes), each as tuples in text, so the ids are in the stream as they are.
_PUBLICATION = """
CREATE PUBLICATION availability_bench FOR TABLE chat_sessions
WHERE (mitra_id IS NOT NULL AND status IN ('active', 'pending_payment'))
"""
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_SLOT_ACTIVE = "SELECT active FROM pg_replication_slots WHERE slot_name = $1"
_SENT_BEHIND = """
SELECT coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), sent_lsn)), 0)::bigint
FROM pg_stat_replication
"""
_SLOT_STATE = """
SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained,
       wal_status, safe_wal_size, invalidation_reason,
       (SELECT sum(size) FROM pg_ls_waldir())::bigint AS pg_wal
FROM pg_replication_slots WHERE slot_name = $1
"""


async def _sent_behind(db: asyncpg.Connection) -> int:
    """How much WAL the walsenders have yet to send (0 without one)."""
    return int(await db.fetchval(_SENT_BEHIND))


def _tuple(text: str) -> tuple[str | None, str | None]:
    mitra, status = _MITRA.search(text), _STATUS.search(text)
    return (mitra.group(1) if mitra else None, status.group(1) if status else None)


def changed_mitras(line: str) -> set[str]:
    """The mitras whose load a decoded chat_sessions change may move, as the triggers' WHEN
    conditions decide it. Without an old row (default identity: any UPDATE, and a DELETE
    carries only the id) the new row's mitra is all there is to go on."""
    body = line.split(": ", 2)[2]
    op = line.split(": ", 2)[1]
    if "old-key: " in body:
        old_text, _, new_text = body.partition(" new-tuple: ")
        old, new = _tuple(old_text), _tuple(new_text)
    elif op == "DELETE":
        old, new = _tuple(body), (None, None)
    elif op == "INSERT":
        old, new = (None, None), _tuple(body)
    else:  # UPDATE, default identity: the old row is unknown
        new = _tuple(body)
        return {new[0]} if new[0] else set()
    was, now = (m is not None and s in _COUNTED for m, s in (old, new))
    if was != now or (now and old[0] != new[0]):
        return {m for m, s in (old, new) if m is not None and s in _COUNTED}
    return set()


@dataclass
class Consumer:
    """A poller's account: what it took, and when it first held each mitra id."""

    seen: dict[str, float] = field(default_factory=dict)
    polls: int = 0
    rows: int = 0
    poll_seconds: float = 0.0
    sent_behind: int = 0
    """The most WAL the slot's walsender was seen to have yet to send (streamed variants)."""
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by the first poll that finds nothing: what was pending before it started is taken."""

    def note(self, ids: Iterable[str]) -> None:
        """Called once the ids are parsed: in hand from now."""
        now = time.perf_counter()
        for mitra in ids:
            self.seen.setdefault(mitra, now)


async def poll_slot(url: str, consumer: Consumer, snapshots: bool = False) -> None:
    """What the service would run instead of the change-table drain: read the slot, then
    sleep for the poll interval whenever it had nothing. With `snapshots`, a running-xacts
    record is logged after every read (pg_log_standby_snapshot, Postgres 16+), so that the
    slot's restart point follows the reads instead of the bgwriter's 15 s cadence and a read
    need not decode again what the reads before it already returned."""
    db = await asyncpg.connect(url)
    try:
        while not consumer.stop.is_set():
            started = time.perf_counter()
            lines = [r[0] for r in await db.fetch(_GET_CHANGES)]
            if snapshots:
                await db.execute("SELECT pg_log_standby_snapshot()")
            consumer.poll_seconds += time.perf_counter() - started
            consumer.polls += 1
            consumer.rows += len(lines)
            consumer.note([m for line in lines for m in changed_mitras(line)])
            if not lines:
                consumer.idle.set()
                await asyncio.sleep(POLL_SECONDS)
    finally:
        await db.close()


async def poll_table(url: str, consumer: Consumer) -> None:
    """bench.footprint.drain, with an account of the ids taken."""
    settings = Settings(database_url=url, valkey_url="redis://unused", database_pool_size=1)
    truth = await Truth.connect(settings)
    try:
        while not consumer.stop.is_set():
            started = time.perf_counter()
            taken = await truth.take_changes(1000)
            consumer.poll_seconds += time.perf_counter() - started
            consumer.polls += 1
            consumer.rows += len(taken)
            consumer.note([str(m) for m in taken])
            if not taken:
                consumer.idle.set()
                await asyncio.sleep(settings.change_poll_seconds)
    finally:
        await truth.close()


def stream_slot(
    url: str, consumer: Consumer, halt: threading.Event, loop: asyncio.AbstractEventLoop
) -> None:
    """The slot read over the streaming replication protocol (a walsender decodes WAL as it
    is written, once, instead of again from the restart point at every call), in a thread:
    psycopg2 (`pip install psycopg2-binary`), since asyncpg does not speak that protocol."""
    import psycopg2
    import psycopg2.extras

    conn = psycopg2.connect(url, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        cursor = conn.cursor()
        cursor.start_replication(
            slot_name=SLOT, decode=True, options={"include-xids": "0", "skip-empty-xacts": "1"}
        )
        confirmed = time.monotonic()
        while not halt.is_set():
            message = cursor.read_message()
            if message is None:
                loop.call_soon_threadsafe(consumer.idle.set)
                select.select([cursor], [], [], 0.02)
                continue
            consumer.rows += 1
            if message.payload.startswith("table public.chat_sessions: "):
                consumer.note(changed_mitras(message.payload))
            if time.monotonic() - confirmed > 0.1:
                cursor.send_feedback(flush_lsn=message.data_start)
                confirmed = time.monotonic()
    finally:
        conn.close()


async def recv_slot(url: str, consumer: Consumer, pgoutput: bool = False) -> None:
    """The slot streamed by pg_recvlogical (C: the replication protocol, keepalives and
    feedback), its decoded lines read from a pipe in chunks of up to 64 KiB: Python touches
    each chat_sessions line once, never each protocol message. poll_seconds counts the CPU
    this side spends parsing. With `pgoutput`, the publication's filter has already chosen
    the changes and every id in them is noted (a bench's shortcut: the service would parse
    the messages for the old and new mitra)."""
    if pgoutput:
        options = ["proto_version=1", "publication_names=availability_bench"]
    else:
        options = ["include-xids=0", "skip-empty-xacts=1"]
    process = await asyncio.create_subprocess_exec(
        "pg_recvlogical",
        "--dbname",
        url,
        "--slot",
        SLOT,
        "--start",
        *(arg for option in options for arg in ("--option", option)),
        "--status-interval",
        "1",
        "--file",
        "-",
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    tail = b""
    try:
        while not consumer.stop.is_set():
            try:
                chunk = await asyncio.wait_for(process.stdout.read(1 << 16), POLL_SECONDS)
            except TimeoutError:
                consumer.idle.set()
                continue
            if not chunk:
                raise RuntimeError(f"pg_recvlogical exited ({await process.wait()})")
            started = time.process_time()
            ids: set[str] = set()
            if pgoutput:
                # The chunk's end may cut an id: the last 35 bytes are searched again next time.
                found = _UUID.findall(tail + chunk)
                tail = (tail + chunk)[-35:]
                ids.update(m.decode() for m in found)
                consumer.rows += len(found)
            else:
                lines = (tail + chunk).split(b"\n")
                tail = lines.pop()
                for line in lines:
                    if line.startswith(b"table public.chat_sessions: "):
                        ids |= changed_mitras(line.decode())
                consumer.rows += len(lines)
            consumer.note(ids)
            consumer.polls += 1
            consumer.poll_seconds += time.process_time() - started
    finally:
        if process.returncode is None:
            process.terminate()
        await process.communicate()  # to EOF: until then, wait() would never return


@asynccontextmanager
async def following(variant: str, url: str) -> AsyncIterator[Consumer]:
    """The variant's consumer running for the duration (and its slot, made and dropped)."""
    consumer = Consumer()
    db = await asyncpg.connect(url)
    task: asyncio.Task[None] | None = None
    halt = threading.Event()
    try:
        if variant == "logical, streaming":
            await db.execute("ALTER TABLE chat_sessions REPLICA IDENTITY FULL")
            await db.execute("SELECT pg_create_logical_replication_slot($1, 'test_decoding')", SLOT)
            task = asyncio.create_task(
                asyncio.to_thread(stream_slot, url, consumer, halt, asyncio.get_running_loop())
            )
        elif variant == "logical, pg_recvlogical":
            await db.execute("ALTER TABLE chat_sessions REPLICA IDENTITY FULL")
            await db.execute("SELECT pg_create_logical_replication_slot($1, 'test_decoding')", SLOT)
            task = asyncio.create_task(recv_slot(url, consumer))
        elif variant == "logical, pgoutput":
            await db.execute("ALTER TABLE chat_sessions REPLICA IDENTITY FULL")
            await db.execute("DROP PUBLICATION IF EXISTS availability_bench")
            await db.execute(_PUBLICATION)
            await db.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", SLOT)
            task = asyncio.create_task(recv_slot(url, consumer, pgoutput=True))
        elif variant.startswith("logical"):
            identity = "DEFAULT" if variant == "logical" else "FULL"
            await db.execute(f"ALTER TABLE chat_sessions REPLICA IDENTITY {identity}")
            await db.execute("SELECT pg_create_logical_replication_slot($1, 'test_decoding')", SLOT)
            task = asyncio.create_task(
                poll_slot(url, consumer, snapshots=variant == "logical, snapshots")
            )
        elif variant == "change table":
            task = asyncio.create_task(poll_table(url, consumer))
        if task is not None:
            # The set-up's own changes (the change table's backlog) are not the run's.
            idle = asyncio.create_task(consumer.idle.wait())
            await asyncio.wait((idle, task), timeout=60.0, return_when=asyncio.FIRST_COMPLETED)
            if not idle.done():
                idle.cancel()
                if task.done():
                    await task  # the consumer's own failure, if that is why
                raise TimeoutError(f"{variant}: no idle consumer in 60 s")
            consumer.polls = consumer.rows = 0
            consumer.poll_seconds = 0.0
        yield consumer
    finally:
        consumer.stop.set()
        halt.set()
        if task is not None:
            await task
        if variant.startswith("logical"):
            # A walsender outlives its client by a moment; the slot is busy until it exits.
            for _ in range(100):
                if not await db.fetchval(_SLOT_ACTIVE, SLOT):
                    break
                await asyncio.sleep(0.05)
            await db.execute("SELECT pg_drop_replication_slot($1)", SLOT)
        await db.close()


async def prepare(url: str, kind: str, writers: int, transactions: int) -> None:
    """bench.footprint's untimed set-up of the rows a kind walks (each walked once), without
    waiting for a drainer: here the consumers run only while they are measured."""
    if kind not in _BEFORE:
        return
    db = await asyncpg.connect(url)
    try:
        await db.execute(_PREPARE, str(writers), writers, transactions, _BEFORE[kind], MITRAS)
    finally:
        await db.close()


def transactions_for(writers: int, seconds: float) -> int:
    """Statements per writer for a run of about `seconds` at up to 15,000 a second shared."""
    return max(100, int(15_000 * seconds / writers))


async def wal_lsn(url: str) -> int:
    db = await asyncpg.connect(url)
    try:
        return int(await db.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')"))
    finally:
        await db.close()


@dataclass
class Throughput:
    tps: float = 0.0
    wal_per_txn: float = 0.0


async def measure_writers(
    urls: dict[str, str],
    seconds: float,
    rounds: int,
    writers: tuple[int, ...],
    kinds: tuple[str, ...],
    folder: Path,
) -> dict[tuple[str, int, str], Throughput]:
    """(kind, writers, variant) -> best tps (and WAL bytes per transaction of that run), for
    each variant of `urls`."""
    variants = tuple(urls)
    results: dict[tuple[str, int, str], Throughput] = {}
    for count in writers:
        transactions = transactions_for(count, seconds)
        for n, kind in enumerate(kinds):
            # Interleaved, each (kind, writers) starting from another variant: a burst of
            # someone else's work on this shared machine lands on one run, not one variant.
            shift = (n + writers.index(count)) % len(variants)
            order = list(variants[shift:] + variants[:shift])
            for _ in range(rounds):
                for variant in order:
                    url = urls[variant]
                    await prepare(url, kind, count, transactions)
                    async with following(variant, url) as consumer:
                        before = await wal_lsn(url)
                        tps = await run_pgbench(url, kind, count, transactions, folder)
                        wal = await wal_lsn(url) - before
                    best = results.setdefault((kind, count, variant), Throughput())
                    if tps > best.tps:
                        best.tps, best.wal_per_txn = tps, wal / (transactions * count)
                    polls = max(1, consumer.polls)
                    progress(
                        f"{kind} x{count} {variant}: {tps:,.0f} tps, {wal / 1e6:.0f} MB WAL,"
                        f" consumer {consumer.polls} polls, {consumer.rows} rows,"
                        f" {consumer.poll_seconds / polls * 1000:.1f} ms a poll"
                    )
    return results


async def latency(
    variant: str,
    url: str,
    samples: int,
    folder: Path,
    load_seconds: float = 0.0,
    load_writers: int = 16,
) -> tuple[list[float], int, float, int]:
    """ms from just before a single writer's INSERT of an active session (autocommit) to the
    consumer holding its mitra's id; each sample a mitra of its own, outside the ones the
    load touches, so nothing else can report it. With load_seconds, load_writers `end`
    sessions on the same database meanwhile."""
    db = await asyncpg.connect(url)
    tag = f"{variant}:{load_seconds}:{load_writers}"
    ids = [
        str(r[0])
        for r in await db.fetch(
            "INSERT INTO mitras (id, display_name) SELECT md5($1 || g)::uuid, 'probe ' || g"
            " FROM generate_series(1, $2) g RETURNING id",
            tag,
            samples,
        )
    ]
    waits: list[float] = []
    missed = 0
    load: asyncio.Task[float] | None = None
    transactions = transactions_for(load_writers, load_seconds)
    if load_seconds:
        await prepare(url, "end", load_writers, transactions)
    try:
        async with following(variant, url) as consumer:
            if load_seconds:
                load = asyncio.create_task(
                    run_pgbench(url, "end", load_writers, transactions, folder)
                )
                await asyncio.sleep(1.0)
            await asyncio.sleep(0.2)
            consumer.seen.clear()  # the probe mitras' own inserts, noted by the mitras trigger
            for mitra in ids:
                if load is not None and load.done():
                    break
                started = time.perf_counter()
                await db.execute(
                    "INSERT INTO chat_sessions (mitra_id, customer_id, status)"
                    " VALUES ($1, gen_random_uuid(), 'active')",
                    UUID(mitra),
                )
                deadline = started + 30.0
                while mitra not in consumer.seen and time.perf_counter() < deadline:
                    await asyncio.sleep(0.0005)
                if mitra not in consumer.seen:
                    missed += 1  # not in hand 30 s after its commit
                    continue
                waits.append((consumer.seen[mitra] - started) * 1000)
                consumer.sent_behind = max(consumer.sent_behind, await _sent_behind(db))
                await asyncio.sleep(0.005)
            if load is not None:
                await load
            per_poll = consumer.poll_seconds / max(1, consumer.polls) * 1000
            behind = consumer.sent_behind
    finally:
        if load is not None and not load.done():
            load.cancel()
            with suppress(asyncio.CancelledError, RuntimeError):
                await load
        await db.close()
    return sorted(waits), missed, per_poll, behind


def mb(value: object) -> str:
    """Bytes as MB; a lost slot has no restart_lsn, so nothing to count."""
    return "-" if value is None else f"{int(str(value)) / 2**20:,.0f} MB"


def percentile(sorted_ms: list[float], p: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, max(0, int(len(sorted_ms) * p) - 1))]


async def slot_state(db: asyncpg.Connection, slot: str) -> dict[str, object]:
    row = await db.fetchrow(_SLOT_STATE, slot)
    return dict(row) if row is not None else {}


async def retention(url: str, hold_seconds: float, folder: Path) -> list[tuple[str, str]]:
    """A slot nobody reads, under 16 writers accepting sessions (full identity, as the
    service would need): what it keeps, then the same under max_slot_wal_keep_size."""
    out: list[tuple[str, str]] = []
    db = await asyncpg.connect(url)
    try:
        await db.execute("ALTER TABLE chat_sessions REPLICA IDENTITY FULL")

        async def load(seconds: float) -> float:
            transactions = transactions_for(16, seconds)
            await prepare(url, "accept", 16, transactions)
            return await run_pgbench(url, "accept", 16, transactions, folder)

        # Uncapped: a consumer stopped for hold_seconds.
        await db.execute("SELECT pg_create_logical_replication_slot($1, 'test_decoding')", SLOT)
        started = time.perf_counter()
        tps = await load(hold_seconds)
        held = time.perf_counter() - started
        await db.execute("CHECKPOINT")
        state = await slot_state(db, SLOT)
        retained = int(str(state["retained"]))
        rate = retained / held
        out.append(
            (
                f"slot unread {held:.0f} s, 16 writers accepting ({tps:,.0f} tps),"
                " no cap, after a CHECKPOINT",
                f"{mb(retained)} retained (pg_wal {mb(state['pg_wal'])}),"
                f" wal_status={state['wal_status']}; {rate / 2**20:.1f} MB/s,"
                f" i.e. {rate * 3600 / 2**30:,.0f} GB an hour the service is down",
            )
        )
        started = time.perf_counter()
        rows = len(await db.fetch(_GET_CHANGES))
        caught_up = time.perf_counter() - started
        out.append(
            (
                "catching up: one pg_logical_slot_get_changes over that backlog",
                f"{caught_up:.1f} s to decode {retained / 2**20:,.0f} MB ({rows:,} chat_sessions"
                f" rows), i.e. {retained / 2**20 / caught_up:,.0f} MB/s"
                " (held in memory/spilled by the one call)",
            )
        )
        await db.execute("SELECT pg_drop_replication_slot($1)", SLOT)

        # Capped: the slot is given up once it holds more than CAP.
        await db.execute(f"ALTER SYSTEM SET max_slot_wal_keep_size = '{CAP}'")
        await db.execute("SELECT pg_reload_conf()")
        await asyncio.sleep(0.5)
        await db.execute("SELECT pg_create_logical_replication_slot($1, 'test_decoding')", SLOT)
        started = time.perf_counter()
        before: dict[str, object] = {}
        tps = 0.0
        while time.perf_counter() - started < 6 * hold_seconds:
            tps = max(tps, await load(hold_seconds / 2))
            before = await slot_state(db, SLOT)
            lost = before["wal_status"] == "lost"
            if lost or int(str(before["retained"])) > 2 * 64 * 2**20:
                break
        await db.execute("CHECKPOINT")
        after = await slot_state(db, SLOT)
        try:
            await db.fetch(_GET_CHANGES)
            read = "still readable"
        except asyncpg.PostgresError as error:
            read = f"reading it fails: {type(error).__name__}: {str(error).splitlines()[0]}"
        out.append(
            (
                f"max_slot_wal_keep_size={CAP}, slot unread"
                f" {time.perf_counter() - started:.0f} s under the same load",
                f"before the last CHECKPOINT: {mb(before['retained'])} behind,"
                f" wal_status={before['wal_status']}; after: wal_status={after['wal_status']},"
                f" invalidation_reason={after['invalidation_reason']}, pg_wal"
                f" {mb(after['pg_wal'])}; {read}",
            )
        )
        await db.execute("SELECT pg_drop_replication_slot($1)", SLOT)
        await db.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        await db.execute("SELECT pg_reload_conf()")
    finally:
        await db.close()
    return out


def table(
    results: dict[tuple[str, int, str], Throughput],
    value: Callable[[Throughput, Throughput], str],
) -> list[str]:
    measured = {v for _, _, v in results}
    variants = [v for v in VARIANTS if v in measured]
    lines = [
        "| statement | writers | " + " | ".join(variants) + " |",
        "| --- | --- |" + " --- |" * len(variants),
    ]
    for kind, count in dict.fromkeys((k, c) for k, c, _ in results):
        none = results[(kind, count, "none")]
        cells = [value(results[(kind, count, v)], none) for v in variants]
        lines.append(f"| {KINDS[kind][0]} | {count} | " + " | ".join(cells) + " |")
    return lines


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--writers", type=int, nargs="+", default=[16, 4])
    parser.add_argument("--kinds", nargs="+", default=["accept", "end", "create"])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--hold-seconds", type=float, default=10.0)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args()
    variants = tuple(v for v in VARIANTS if v == "none" or v in args.variants)

    folder = Path(tempfile.mkdtemp(prefix="availability-logical-"))
    progress(f"throwaway Postgres (wal_level=logical) in {folder}")
    server = start_postgres(folder / "pg", settings={"wal_level": "logical"})
    lines: list[str] = []
    try:
        async with (
            database(server.dsn, "logical_none", False) as none,
            database(server.dsn, "logical_table", True) as change_table,
            database(server.dsn, "logical_slot", False) as slot,
        ):
            urls = {"none": none, "change table": change_table}
            urls |= {v: slot for v in VARIANTS if v.startswith("logical")}
            urls = {v: url for v, url in urls.items() if v in variants}
            admin = await asyncpg.connect(server.dsn)
            version = await admin.fetchval("SHOW server_version")
            shown = {
                name: await admin.fetchval(f"SHOW {name}")
                for name in ("wal_level", "fsync", "shared_buffers", "max_wal_size")
            }
            await admin.close()
            load_average = os.getloadavg()[0]

            results = await measure_writers(
                urls,
                args.seconds,
                args.rounds,
                tuple(args.writers),
                tuple(args.kinds),
                folder,
            )

            latencies: dict[tuple[str, str], tuple[list[float], int, float, int]] = {}
            followed = ("change table", "logical, full", "logical, snapshots", *STREAMED)
            for variant in [v for v in followed if v in variants]:
                progress(f"latency: {variant}")
                latencies[(variant, "idle")] = await latency(
                    variant, urls[variant], args.samples, folder
                )
                for count in args.writers:
                    latencies[(variant, f"{count} writers ending sessions")] = await latency(
                        variant, urls[variant], args.samples, folder, 4 * args.seconds, count
                    )

            progress("WAL retained by an unread slot")
            kept = await retention(slot, args.hold_seconds, folder) if args.hold_seconds else []
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)

    lines.append(
        f"Postgres {version} ({', '.join(f'{k}={v}' for k, v in shown.items())}),"
        f" synchronous_commit=off for pgbench, {MITRAS:,} mitras; best of {args.rounds}"
        f" interleaved {args.seconds:.0f} s runs; load average {load_average:.1f} at the start"
        f" on {os.cpu_count()} cores shared with other test runs, so figures are noisy.\n"
    )
    lines += ["Writers' throughput (tps, and ratio to none):", ""]
    lines += table(results, lambda r, n: f"{r.tps:,.0f} ({r.tps / n.tps:.2f}x)")
    lines += ["", "WAL per pgbench transaction (bytes, best run; accept is two commits):", ""]
    lines += table(results, lambda r, n: f"{r.wal_per_txn:,.0f}")
    lines += [
        "",
        "Commit to the consumer holding the mitra id (single writer, 20 ms poll):",
        "",
        "| consumer | while | samples | p50 | p99 | max | not seen in 30 s | a poll takes"
        " | the walsender's send behind the WAL (max) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (variant, load), (waits, missed, per_poll, behind) in latencies.items():
        figures = " | ".join(
            f"{percentile(waits, p):.1f} ms" if waits else "-" for p in (0.5, 0.99, 1.0)
        )
        lines.append(
            f"| {variant} | {load} | {len(waits)} | {figures} | {missed} | {per_poll:.1f} ms"
            f" | {f'{behind / 2**20:,.1f} MB' if variant in STREAMED else '-'} |"
        )
    lines += ["", "A slot nobody reads:", "", "| case | figure |", "| --- | --- |"]
    lines += [f"| {case} | {figure} |" for case, figure in kept]
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
