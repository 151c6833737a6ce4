"""What the commands around the service ask of Postgres: `availability migrate` (and every
start), `availability status`, and the demo's fleet and reset (`availability dev`)."""

from __future__ import annotations

from collections.abc import Callable

from .. import schema
from .connection import TruthBase

_MIGRATION_LOCK = 0x6D69747261  # "mitra": one advisory lock id for every instance

_DEMO_BATCH = """
WITH new AS (
    INSERT INTO mitras (display_name, is_active, max_concurrent_sessions)
    SELECT ($1::text[])[1 + floor(random() * cardinality($1::text[]))::int] || ' '
           || ($2::text[])[1 + floor(random() * cardinality($2::text[]))::int],
           random() >= 0.03, 2 + floor(random() * 3)::int
    FROM generate_series(1, $3)
    RETURNING id, is_active, max_concurrent_sessions
),
status AS (
    INSERT INTO mitra_online_status (mitra_id, is_online, last_heartbeat_at, updated_at, version)
    SELECT id, is_active AND random() < $4, now() - random() * interval '20 seconds', now(), 1
    FROM new
    RETURNING mitra_id, is_online
),
live AS (
    INSERT INTO chat_sessions (mitra_id, customer_id, status, topic_sensitivity)
    SELECT s.mitra_id, gen_random_uuid(),
           (ARRAY['active', 'active', 'active', 'pending_payment'])[1 + floor(random() * 4)::int],
           CASE WHEN random() < 0.2 THEN 'sensitive' ELSE 'normal' END
    FROM status s JOIN new n ON n.id = s.mitra_id
    CROSS JOIN LATERAL generate_series(1, floor(random() * (n.max_concurrent_sessions + 1))::int) g
    WHERE s.is_online
    RETURNING 1
)
INSERT INTO chat_sessions (mitra_id, customer_id, status, topic_sensitivity, created_at)
SELECT n.id, gen_random_uuid(),
       (ARRAY['ended', 'ended', 'ended', 'expired', 'cancelled'])[1 + floor(random() * 5)::int],
       CASE WHEN random() < 0.2 THEN 'sensitive' ELSE 'normal' END,
       now() - random() * interval '60 days'
FROM new n CROSS JOIN LATERAL generate_series(1, 3) g
"""

_DEMO_SEARCHING = """
INSERT INTO chat_sessions (customer_id, status, topic_sensitivity)
SELECT gen_random_uuid(), (ARRAY['searching', 'pending_acceptance'])[1 + floor(random() * 2)::int],
       CASE WHEN random() < 0.2 THEN 'sensitive' ELSE 'normal' END
FROM generate_series(1, $1)
"""

# The demo's reset (`availability dev --reset`): no CASCADE, so a table another backend added
# that references mitras stops it rather than being emptied too.
_EMPTY = (
    "TRUNCATE mitras, mitra_online_status, chat_sessions, availability_session_days, auth_sessions,"
    " sweep_fences"
)

_FIRST_NAMES = [
    "Ayu",
    "Budi",
    "Citra",
    "Dewi",
    "Eka",
    "Fajar",
    "Gita",
    "Hana",
    "Indra",
    "Joko",
    "Kartika",
    "Lestari",
    "Maya",
    "Nadia",
    "Putri",
    "Rani",
    "Sari",
    "Tono",
    "Wulan",
    "Yudi",
]
_LAST_NAMES = [
    "Pratama",
    "Wijaya",
    "Santoso",
    "Lestari",
    "Saputra",
    "Hidayat",
    "Kusuma",
    "Nugroho",
    "Permata",
    "Rahmawati",
    "Setiawan",
    "Utami",
    "Wibowo",
    "Yulianti",
    "Halim",
    "Siregar",
]


class Upkeep(TruthBase):
    async def migrate(self, *, contract: bool = False) -> list[str]:
        """Apply the pending steps (schema.py: expand, and contract when due); returns the
        names applied.

        An advisory lock serialises instances that start together. All the steps of one run
        apply in one transaction, each recorded in schema_migrations: a release in service
        never sees the schema between two of them (0008 dropped what 0.1.0 listens to, and
        0010 puts it back).
        """
        applied: list[str] = []
        async with self._connection() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
                due = [
                    step
                    for step in schema.steps()
                    if step.name not in done and step.due(contract=contract, fresh=not done)
                ]
                async with conn.transaction():
                    for step in due:
                        await conn.execute(step.sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (name) VALUES ($1)", step.name
                        )
                        applied.append(step.name)
                    await conn.execute(
                        "SELECT availability_set_session_triggers($1)",
                        self._settings.chat_session_triggers,
                    )
                    default = int(self._settings.default_max_concurrent_sessions)
                    await conn.execute(
                        "ALTER TABLE mitras ALTER COLUMN max_concurrent_sessions"
                        f" SET DEFAULT {default}"
                    )
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
        return applied

    async def pending_contract_steps(self) -> list[str]:
        """Contract steps not applied yet: `availability migrate --contract` applies them
        once no release they would break is running (status shows them)."""
        async with self._connection() as conn:
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        return [s.name for s in schema.steps() if s.contract and s.name not in done]

    async def vitals(self) -> tuple[bool, int, int, str]:
        """(a read-only standby?, online mitras, mitras, last migration) for
        `availability status`: a standby here means a failover left the service behind."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT pg_is_in_recovery() AS standby,"
                " (SELECT count(*) FROM mitra_online_status WHERE is_online) AS online,"
                " (SELECT count(*) FROM mitras) AS mitras,"
                " (SELECT max(name) FROM schema_migrations WHERE name NOT LIKE 'contract/%')"
                " AS migration"
            )
        assert row is not None
        return bool(row["standby"]), int(row["online"]), int(row["mitras"]), str(row["migration"])

    async def mitra_count(self) -> int:
        async with self._connection() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM mitras"))

    async def sample_online_mitra(self) -> str | None:
        async with self._connection() as conn:
            found = await conn.fetchval(
                "SELECT mitra_id FROM mitra_online_status WHERE is_online LIMIT 1"
            )
        return None if found is None else str(found)

    async def empty(self) -> None:
        """Every row of the service's tables: the demo starts again from nothing."""
        async with self._connection() as conn:
            await conn.execute(_EMPTY)

    async def insert_demo_fleet(
        self, mitras: int, online_share: float, progress: Callable[[int], None], batch: int = 2000
    ) -> None:
        """A realistic fleet: names, capacities, some deactivated, live and past sessions."""
        done = 0
        async with self._connection() as conn:
            while done < mitras:
                size = min(batch, mitras - done)
                async with conn.transaction():
                    await conn.execute(_DEMO_BATCH, _FIRST_NAMES, _LAST_NAMES, size, online_share)
                    await conn.execute(_DEMO_SEARCHING, max(1, size // 50))
                done += size
                progress(done)
