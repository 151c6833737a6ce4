"""Two database roles: the owner migrates (`availability migrate`), and `serve` runs as a
runtime role holding only what the service's own statements need, so a leaked runtime
password cannot drop a table, rewrite the audit or touch the chat backend's sessions beyond
reading them. `availability grants ROLE` prints the SQL; start-up checks it and names the
first grant missing."""

from __future__ import annotations

from dataclasses import dataclass

from .connection import TruthBase, _Connectionish


@dataclass(frozen=True, slots=True)
class Grant:
    privilege: str
    table: str
    columns: tuple[str, ...] = ()

    def sql(self, role: str) -> str:
        columns = f" ({', '.join(self.columns)})" if self.columns else ""
        return f'GRANT {self.privilege}{columns} ON {self.table} TO "{role}";'

    def __str__(self) -> str:
        columns = f"({', '.join(self.columns)})" if self.columns else ""
        return f"{self.privilege}{columns} on {self.table}"


RUNTIME_GRANTS = (
    Grant("SELECT", "mitras"),
    # Deactivation; and the row lock every write of a mitra takes first (FOR UPDATE needs
    # UPDATE on one column).
    Grant("UPDATE", "mitras", ("is_active",)),
    Grant("SELECT", "mitra_online_status"),
    Grant("INSERT", "mitra_online_status"),
    Grant("UPDATE", "mitra_online_status"),
    Grant("SELECT", "auth_sessions"),
    Grant("UPDATE", "auth_sessions", ("revoked_at",)),
    # The chat backend's table: read only. The day counters' SHARE lock is taken inside
    # availability_close_session_days, which runs as its owner (migration 0012).
    Grant("SELECT", "chat_sessions"),
    Grant("SELECT", "availability_changes"),
    Grant("INSERT", "availability_changes"),
    Grant("UPDATE", "availability_changes"),
    Grant("DELETE", "availability_changes"),
    # Written once, never changed: no UPDATE, no DELETE.
    Grant("SELECT", "availability_audit"),
    Grant("INSERT", "availability_audit"),
    Grant("SELECT", "sweep_fences"),
    Grant("INSERT", "sweep_fences"),
    Grant("UPDATE", "sweep_fences"),
    Grant("SELECT", "availability_session_days"),
    Grant("SELECT", "chat_session_day_changes"),
    Grant("SELECT", "chat_session_days_state"),
    Grant("SELECT", "schema_migrations"),
)

_HELD = """
SELECT CASE WHEN to_regclass($1) IS NULL THEN NULL
            WHEN cardinality($3::text[]) = 0
            THEN has_table_privilege($1::regclass, $2)
            ELSE (SELECT bool_and(has_column_privilege($1::regclass, c, $2)) FROM unnest($3) c)
       END
"""

_OWNS_SCHEMA = """
SELECT coalesce(
    (SELECT pg_has_role(current_user, c.relowner, 'USAGE') FROM pg_class c
     WHERE c.oid = to_regclass('mitras')),
    has_schema_privilege('public', 'CREATE'))
"""


def grants_sql(role: str) -> str:
    """What the owner runs once, after `availability migrate`, for the runtime role."""
    lines = [
        f'-- The runtime role of availability serve: "{role}". Run as the schema\'s owner.',
        f'GRANT USAGE ON SCHEMA public TO "{role}";',
        *(grant.sql(role) for grant in RUNTIME_GRANTS),
        f'GRANT EXECUTE ON FUNCTION availability_close_session_days(text) TO "{role}";',
    ]
    return "\n".join(lines)


class Grants(TruthBase):
    async def role(self) -> str:
        async with self._connection() as conn:
            return str(await conn.fetchval("SELECT current_user"))

    async def owns_schema(self) -> bool:
        """Whether this connection's role owns the tables (may migrate)."""
        async with self._connection() as conn:
            return bool(await conn.fetchval(_OWNS_SCHEMA))

    async def missing_grants(self) -> list[Grant]:
        """What this role lacks of RUNTIME_GRANTS; SchemaMissing if a table does not exist."""
        async with self._connection() as conn:
            return [g for g in RUNTIME_GRANTS if not await _held(conn, g)]


class SchemaMissing(Exception):
    """A table of the service does not exist: the database was never migrated."""


async def _held(conn: _Connectionish, grant: Grant) -> bool:
    held = await conn.fetchval(_HELD, grant.table, grant.privilege, list(grant.columns))
    if held is None:
        raise SchemaMissing(grant.table)
    return bool(held)
