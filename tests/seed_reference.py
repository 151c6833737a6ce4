"""The original dashboard's method (the dashboard service of the JavaScript backend this
service replaces): six queries, one of them a correlated subquery per online mitra. The
reference our numbers must equal, and the baseline the benchmark compares with."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import asyncpg


async def seed_dashboard(pool: asyncpg.Pool) -> dict[str, Any]:
    async def one(sql: str) -> int:
        return int(await pool.fetchval(sql))

    (
        active_chats,
        online_mitras,
        pending_requests,
        sensitive_total,
        last_30d_total,
        last_30d_sensitive,
    ) = await asyncio.gather(
        one("SELECT COUNT(*) FROM chat_sessions WHERE status IN ('active', 'pending_payment')"),
        one("SELECT COUNT(*)::int FROM mitra_online_status WHERE is_online = true"),
        one(
            "SELECT COUNT(*) FROM chat_sessions WHERE status IN ('searching', 'pending_acceptance')"
        ),
        one("SELECT COUNT(*) FROM chat_sessions WHERE topic_sensitivity = 'sensitive'"),
        one("SELECT COUNT(*) FROM chat_sessions WHERE created_at >= NOW() - INTERVAL '30 days'"),
        one(
            "SELECT COUNT(*) FROM chat_sessions WHERE created_at >= NOW() - INTERVAL '30 days'"
            " AND topic_sensitivity = 'sensitive'"
        ),
    )
    per_mitra = await pool.fetch(
        """
        SELECT m.id, m.display_name,
          (SELECT COUNT(*) FROM chat_sessions cs
           WHERE cs.mitra_id = m.id AND cs.status IN ('active', 'pending_payment'))
           AS active_session_count
        FROM mitras m
        INNER JOIN mitra_online_status s ON s.mitra_id = m.id
        WHERE s.is_online = true
        ORDER BY active_session_count DESC
        """
    )
    return {
        "active_chats": active_chats,
        "online_mitras": online_mitras,
        "pending_requests": pending_requests,
        "customers_per_mitra": [
            (r["id"], r["display_name"] or "", r["active_session_count"]) for r in per_mitra
        ],
        "sensitive": {
            "total": sensitive_total,
            "last_30d_total": last_30d_total,
            "last_30d_sensitive": last_30d_sensitive,
            # JavaScript's Math.round(x * 1000) / 10: halves round up.
            "last_30d_percent": (
                math.floor((last_30d_sensitive / last_30d_total) * 1000 + 0.5) / 10
                if last_30d_total > 0
                else 0
            ),
        },
    }
