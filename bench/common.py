"""What every benchmark case shares: a result row, timing, the stores, a fresh domain and a
fleet.

Stores: DATABASE_URL / VALKEY_URL when set, else the local servers on 5432 / 6379 when they
answer, else throwaway ones. A fresh database and key prefix per case; nothing shared is
touched beyond them."""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from availability.domain import Availability
from availability.mirror import Keys, Mirror, connect_valkey
from availability.settings import Settings
from availability.truth import Truth


@dataclass
class Row:
    """One line of bench/RESULTS.md."""

    case: str
    figure: str
    comparison: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


async def median_ms(call: Callable[[], Awaitable[object]], runs: int, warmup: int = 3) -> float:
    """Median wall time of call in milliseconds, after a few unmeasured warm-up runs."""
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


async def timed_s(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


@dataclass
class Stores:
    admin_dsn: str
    valkey_url: str


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@asynccontextmanager
async def stores() -> AsyncIterator[Stores]:
    from availability.local_stores import start_postgres, start_valkey

    folder = Path(tempfile.mkdtemp(prefix="availability-bench-"))
    started = []
    admin = os.environ.get("DATABASE_URL") or (
        "postgresql://postgres@127.0.0.1:5432/postgres" if _answers(5432) else ""
    )
    if not admin:
        pg = start_postgres(folder / "postgres")
        started.append(pg)
        admin = pg.dsn
    valkey = os.environ.get("VALKEY_URL") or ("redis://127.0.0.1:6379/0" if _answers(6379) else "")
    if not valkey:
        vk = start_valkey(folder / "valkey")
        started.append(vk)
        valkey = vk.url
    try:
        yield Stores(admin, valkey)
    finally:
        for store in started:
            store.stop()


@asynccontextmanager
async def fresh_domain(base: Stores, name: str) -> AsyncIterator[Availability]:
    """A new database and key prefix, migrated, with a domain object over them."""
    database = f"availability_bench_{name}"
    admin = await asyncpg.connect(base.admin_dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{database}"')
    settings = Settings(
        database_url=base.admin_dsn.rpartition("/")[0] + f"/{database}",
        valkey_url=base.valkey_url,
        valkey_key_prefix=f"bench-{uuid.uuid4().hex[:8]}",
        valkey_timeout_seconds=30.0,
        database_timeout_seconds=300.0,
    )
    truth = await Truth.connect(settings)
    await truth.migrate()
    mirror = Mirror(connect_valkey(settings), settings)
    try:
        yield Availability(truth, mirror, settings)
    finally:
        keys = [
            k
            async for k in mirror.client.scan_iter(
                match=Keys.for_prefix(settings.valkey_key_prefix).prefix + "*"
            )
        ]
        if keys:
            await mirror.client.delete(*keys)
        await mirror.close()
        await truth.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


async def online_fleet(db: asyncpg.Connection, online: int) -> list[uuid.UUID]:
    await db.execute(
        "INSERT INTO mitras (display_name, max_concurrent_sessions)"
        " SELECT 'Mitra ' || g, 3 FROM generate_series(1, $1) g",
        online,
    )
    await db.execute(
        "INSERT INTO mitra_online_status (mitra_id, is_online, last_heartbeat_at)"
        " SELECT id, true, now() FROM mitras"
    )
    await db.execute(
        "INSERT INTO chat_sessions (mitra_id, customer_id, status)"
        " SELECT id, gen_random_uuid(), 'active' FROM mitras WHERE random() < 0.5"
    )
    await db.execute("ANALYZE")
    return [r[0] for r in await db.fetch("SELECT id FROM mitras")]
