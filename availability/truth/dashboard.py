"""The dashboard's numbers from Postgres: session counts (which the day counters exist for)
and the busiest mitras when the mirror cannot say."""

from __future__ import annotations

from datetime import datetime

from ..model import MitraLoad, SessionCounts
from .connection import TruthBase

# One round trip. Active and pending are index-only scans of small partial indexes. The
# sensitive and 30-day counts add up availability_session_days (and the changes appended since the
# last fold) for the days before counted_before, which is about two days back, and count the
# sessions since from the created_at indexes; the boundary day itself is counted from the
# index too (the boundary is a time, not a day). No trigger counts an ordinary insert
# (issue 16; migration 0008). Every count of sessions is an index-only scan: the sensitive ones
# from the sensitive partial index, apart from the others, because one scan counting both with
# a FILTER on topic_sensitivity reads the table's rows (a bitmap heap scan; at 1,000,000
# sessions the query took 29.7 ms that way and 13.3 ms this way, on 2026-12-07).
_SESSION_COUNTS = """
WITH line AS (
    SELECT now() - interval '30 days' AS since,
           s.counted_before::timestamp AT TIME ZONE 'UTC' AS line_at
    FROM chat_session_days_state s
),
bound AS (
    SELECT since, line_at,
           (since AT TIME ZONE 'UTC')::date AS first_day,
           least(((since AT TIME ZONE 'UTC')::date + 1)::timestamp AT TIME ZONE 'UTC', line_at)
               AS first_day_end,
           greatest(line_at, since) AS recent_from
    FROM line
),
days AS (
    SELECT day, sensitive, sessions FROM availability_session_days
    UNION ALL
    SELECT day, sensitive, sessions FROM chat_session_day_changes
),
boundary_day AS (
    SELECT (SELECT count(*) FROM chat_sessions c, bound
            WHERE c.created_at >= bound.since AND c.created_at < bound.first_day_end)
               AS sessions,
           (SELECT count(*) FROM chat_sessions c, bound
            WHERE c.topic_sensitivity = 'sensitive'
              AND c.created_at >= bound.since AND c.created_at < bound.first_day_end)
               AS sensitive
),
later_days AS (
    SELECT coalesce(sum(d.sessions), 0) AS sessions,
           coalesce(sum(d.sessions) FILTER (WHERE d.sensitive), 0) AS sensitive
    FROM days d, bound
    WHERE d.day > bound.first_day
),
recent AS (
    SELECT (SELECT count(*) FROM chat_sessions c, bound
            WHERE c.created_at >= bound.recent_from) AS sessions,
           (SELECT count(*) FROM chat_sessions c, bound
            WHERE c.topic_sensitivity = 'sensitive' AND c.created_at >= bound.recent_from)
               AS sensitive
)
SELECT
    (SELECT count(*) FROM chat_sessions
     WHERE status IN ('active', 'pending_payment')) AS active_chats,
    (SELECT count(*) FROM chat_sessions
     WHERE status IN ('searching', 'pending_acceptance')) AS pending_requests,
    (SELECT coalesce(sum(sessions), 0) FROM days WHERE sensitive)
        + (SELECT count(*) FROM chat_sessions c, bound
           WHERE c.topic_sensitivity = 'sensitive'
             AND c.created_at >= bound.line_at AND c.created_at < bound.recent_from)
        + (SELECT sensitive FROM recent)
        AS sensitive_total,
    (SELECT sessions FROM boundary_day) + (SELECT sessions FROM later_days)
        + (SELECT sessions FROM recent) AS last_30d_total,
    (SELECT sensitive FROM boundary_day) + (SELECT sensitive FROM later_days)
        + (SELECT sensitive FROM recent) AS last_30d_sensitive
"""

# With CHAT_SESSION_TRIGGERS=false there are no day counters: the same numbers, counted from
# the created_at and sensitive indexes (exact; the cost grows with 30 days of sessions).
_SESSION_COUNTS_FROM_INDEXES = """
SELECT
    (SELECT count(*) FROM chat_sessions
     WHERE status IN ('active', 'pending_payment')) AS active_chats,
    (SELECT count(*) FROM chat_sessions
     WHERE status IN ('searching', 'pending_acceptance')) AS pending_requests,
    (SELECT count(*) FROM chat_sessions WHERE topic_sensitivity = 'sensitive') AS sensitive_total,
    (SELECT count(*) FROM chat_sessions
     WHERE created_at >= now() - interval '30 days') AS last_30d_total,
    (SELECT count(*) FROM chat_sessions
     WHERE created_at >= now() - interval '30 days' AND topic_sensitivity = 'sensitive')
        AS last_30d_sensitive
"""

_BUSIEST = """
SELECT m.id, coalesce(m.display_name, '') AS display_name, coalesce(l.load, 0)::int AS load,
       count(*) OVER () AS online
FROM mitra_online_status s
JOIN mitras m ON m.id = s.mitra_id
LEFT JOIN (
    SELECT mitra_id, count(*) AS load FROM chat_sessions
    WHERE status IN ('active', 'pending_payment') AND mitra_id IS NOT NULL
    GROUP BY mitra_id
) l ON l.mitra_id = m.id
WHERE s.is_online
ORDER BY load DESC, m.id DESC
LIMIT $1
"""


class Dashboard(TruthBase):
    async def session_counts(self) -> tuple[SessionCounts, datetime]:
        async with self._connection() as conn:
            counts = (
                _SESSION_COUNTS
                if self._settings.chat_session_triggers
                else _SESSION_COUNTS_FROM_INDEXES
            )
            row = await conn.fetchrow(counts + ", now() AS as_of")
        assert row is not None
        return SessionCounts(*(int(row[i]) for i in range(5))), row["as_of"]

    async def busiest(self, limit: int) -> tuple[int, list[MitraLoad]]:
        """The mirror's `busiest`, from the truth."""
        async with self._connection() as conn:
            rows = await conn.fetch(_BUSIEST, limit)
            online = (
                int(rows[0]["online"])
                if rows
                else int(
                    await conn.fetchval("SELECT count(*) FROM mitra_online_status WHERE is_online")
                )
            )
        return online, [MitraLoad(r["id"], r["display_name"], r["load"]) for r in rows]
