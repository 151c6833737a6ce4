"""Migrations: ordered, recorded, idempotent, safe when instances start together; the
contract tables exist as written; every hot query is served by an index."""

from __future__ import annotations

import asyncio
import os
import tomllib
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from availability import schema
from availability.settings import Settings
from availability.truth import Truth

ROOT = Path(__file__).resolve().parent.parent


async def test_migrate_is_idempotent_and_concurrent_safe(
    settings: Settings, db: asyncpg.Connection
) -> None:
    truths = [await Truth.connect(settings) for _ in range(3)]
    try:
        results = await asyncio.gather(*(t.migrate() for t in truths))
    finally:
        for truth in truths:
            await truth.close()
    assert results == [[], [], []], "already migrated by the session fixture"
    names = [r["name"] for r in await db.fetch("SELECT name FROM schema_migrations ORDER BY 1")]
    assert names and names == sorted(names)


async def test_migrate_from_scratch_applies_all_once(
    settings: Settings, postgres_admin_dsn: str
) -> None:
    fresh_name = f"availability_fresh_{os.getpid()}"
    admin = await asyncpg.connect(postgres_admin_dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{fresh_name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{fresh_name}"')
    url = postgres_admin_dsn.rpartition("/")[0] + f"/{fresh_name}"
    try:
        fresh = replace(settings, database_url=url, default_max_concurrent_sessions=5)
        truths = [await Truth.connect(fresh) for _ in range(2)]
        try:
            results = await asyncio.gather(*(t.migrate() for t in truths))
        finally:
            for truth in truths:
                await truth.close()
        assert sorted(map(len, results)) == [0, len(results[0]) or len(results[1])]
        conn = await asyncpg.connect(url)
        try:
            default = await conn.fetchval(
                "INSERT INTO mitras (display_name) VALUES ('x') RETURNING max_concurrent_sessions"
            )
        finally:
            await conn.close()
        assert default == 5, "max_concurrent_sessions defaults from config"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{fresh_name}" WITH (FORCE)')
        await admin.close()


CONTRACT = {
    "mitras": {
        "id": "uuid",
        "display_name": "text",
        "is_active": "boolean",
        "max_concurrent_sessions": "integer",
        "created_at": "timestamp with time zone",
    },
    "mitra_online_status": {
        "mitra_id": "uuid",
        "is_online": "boolean",
        "last_heartbeat_at": "timestamp with time zone",
        "updated_at": "timestamp with time zone",
    },
    "chat_sessions": {
        "id": "uuid",
        "mitra_id": "uuid",
        "customer_id": "uuid",
        "status": "text",
        "topic_sensitivity": "text",
        "created_at": "timestamp with time zone",
    },
    "auth_sessions": {
        "id": "uuid",
        "mitra_id": "uuid",
        "created_at": "timestamp with time zone",
        "expires_at": "timestamp with time zone",
        "revoked_at": "timestamp with time zone",
    },
}


async def test_contract_tables_exist_as_written(db: asyncpg.Connection) -> None:
    for table, columns in CONTRACT.items():
        rows = await db.fetch(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = $1",
            table,
        )
        found = {r["column_name"]: r["data_type"] for r in rows}
        for column, kind in columns.items():
            assert found.get(column) == kind, f"{table}.{column}"


@pytest.mark.parametrize(
    ("column", "value"), [("status", "paused"), ("topic_sensitivity", "secret")]
)
async def test_unknown_values_are_refused(db: asyncpg.Connection, column: str, value: str) -> None:
    row = {"status": "active", "topic_sensitivity": "normal", column: value}
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "INSERT INTO chat_sessions (customer_id, status, topic_sensitivity)"
            " VALUES (gen_random_uuid(), $1, $2)",
            row["status"],
            row["topic_sensitivity"],
        )


async def _plan(db: asyncpg.Connection, sql: str, *args: object) -> str:
    rows = await db.fetch(f"EXPLAIN {sql}", *args)
    return "\n".join(r[0] for r in rows)


async def test_online_version_moves_for_writers_other_than_the_service(
    db: asyncpg.Connection,
) -> None:
    """The mirror orders online/offline by version: a row inserted or flipped by hand must
    still move it past what a read before it saw (0 for no row)."""
    mitra = await db.fetchval("INSERT INTO mitras (display_name) VALUES ('Ayu') RETURNING id")
    await db.execute(
        "INSERT INTO mitra_online_status (mitra_id, is_online) VALUES ($1, true)", mitra
    )
    inserted = await db.fetchval(
        "SELECT version FROM mitra_online_status WHERE mitra_id = $1", mitra
    )
    await db.execute("UPDATE mitra_online_status SET is_online = false WHERE mitra_id = $1", mitra)
    flipped = await db.fetchval(
        "SELECT version FROM mitra_online_status WHERE mitra_id = $1", mitra
    )
    await db.execute(
        "UPDATE mitra_online_status SET last_heartbeat_at = now() WHERE mitra_id = $1", mitra
    )
    touched = await db.fetchval(
        "SELECT version FROM mitra_online_status WHERE mitra_id = $1", mitra
    )

    assert (inserted, flipped, touched) == (1, 2, 2)


async def test_hot_queries_use_indexes_on_large_tables(db: asyncpg.Connection) -> None:
    from availability import truth

    await db.execute(
        "INSERT INTO mitras (display_name) SELECT 'm' || g FROM generate_series(1, 5000) g"
    )
    await db.execute(
        "INSERT INTO mitra_online_status (mitra_id, is_online, last_heartbeat_at)"
        " SELECT id, random() < 0.1, now() FROM mitras"
    )
    await db.execute(
        "INSERT INTO chat_sessions (mitra_id, customer_id, status, created_at)"
        " SELECT ids[1 + g % 5000], gen_random_uuid(),"
        " CASE WHEN g % 100 = 0 THEN 'active' ELSE 'ended' END, now() - (g % 60) * interval '1 day'"
        " FROM (SELECT array_agg(id) AS ids FROM mitras) m, generate_series(1, 200000) g"
    )
    await db.execute(
        "INSERT INTO auth_sessions (mitra_id, revoked_at)"
        " SELECT id, now() FROM mitras CROSS JOIN generate_series(1, 10)"
    )
    await db.execute("VACUUM ANALYZE")  # as autovacuum leaves it: the visibility map set
    some = await db.fetchval("SELECT id FROM mitras LIMIT 1")

    states = await _plan(db, truth._STATES_BY_ID, [some])
    assert "mitras_pkey" in states and "chat_sessions_load_idx" in states
    assert "Seq Scan on chat_sessions" not in states
    revoke = await _plan(db, truth._REVOKE_AUTH_SESSIONS, some)
    assert "auth_sessions_unrevoked_idx" in revoke
    find = await _plan(db, truth._FIND_AVAILABLE, 150.0, [], 100)
    assert "chat_sessions_load_idx" in find and "Seq Scan on chat_sessions" not in find
    count = await _plan(db, truth._COUNT_AVAILABLE, 150.0)
    assert "Seq Scan on chat_sessions" not in count
    dashboard = await _plan(db, truth._SESSION_COUNTS)
    for index in ("chat_sessions_load_idx", "chat_sessions_pending_idx"):
        assert index in dashboard
    # Every count of sessions reads an index alone, never the table's rows.
    scans = [line.strip() for line in dashboard.splitlines() if " on chat_sessions" in line]
    assert scans and all(line.startswith("->  Index Only Scan") for line in scans), scans


def test_every_step_says_which_releases_it_keeps_working() -> None:
    """Expand steps keep the last release working (it may run beside this one, or instead of
    it after a rollback); only contract steps may break it, and a plain migrate applies them
    by itself only from a later release on (docs/deployment.md: Upgrades and rollbacks)."""
    previous = tomllib.loads((ROOT / "releases.toml").read_text())["release"][-1]["version"]
    steps = schema.steps()
    assert [s.name for s in steps] == sorted(s.name for s in steps)
    for step in steps:
        if step.contract:
            assert step.automatic_from is not None
            assert schema.version_key(step.automatic_from) > schema.version_key(
                step.compatible_with
            ), step.name
        else:
            assert schema.version_key(step.compatible_with) <= schema.version_key(previous), (
                f"{step.name} is an expand step: it must keep release {previous} working"
            )


async def test_a_fresh_database_gets_the_contract_steps_at_once(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """No older release ever ran on the session's database: nothing waits to be contracted."""
    names = {r["name"] for r in await db.fetch("SELECT name FROM schema_migrations")}
    assert {s.name for s in schema.steps()} <= names
    assert await db.fetchval("SELECT to_regclass('chat_session_days')") is None
