"""What the demo plays of the chat backend: its own statements on chat_sessions (it owns their
writes; the auth backend owns mitras'), and the errors its app would retry. The service
follows those writes by itself (the change table), as it does the real backend's."""

from __future__ import annotations

import asyncpg

FLEET = "SELECT id, is_active FROM mitras"
OPEN_CHATS = """
SELECT id, mitra_id, status FROM chat_sessions
WHERE status IN ('searching', 'pending_acceptance', 'pending_payment', 'active')
"""
START_CHAT = """
INSERT INTO chat_sessions (customer_id, status, topic_sensitivity)
VALUES (gen_random_uuid(), 'searching', $1) RETURNING id
"""
MOVE_CHAT = """
UPDATE chat_sessions SET status = $3, mitra_id = coalesce($4, mitra_id)
WHERE id = $1 AND status = $2
"""
CLOSED = frozenset({"ended", "expired", "cancelled"})
ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # A connection the driver lost track of while Postgres restarted ("cannot switch to state
    # 12; another operation is in progress", seen once in the soak): the chat backend's app
    # would retry, and so does the demo.
    asyncpg.InternalClientError,
)
