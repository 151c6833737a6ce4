-- compatible-with: >=0.1.0
-- The runtime role (availability grants) only reads chat_sessions; the day counters' fold
-- takes a SHARE lock on it, which needs more. The fold runs as its owner instead, and only
-- the roles granted EXECUTE may call it (a SHARE lock of at most lock_wait on the chat
-- backend's table is not for everyone).
ALTER FUNCTION availability_close_session_days(text)
    SECURITY DEFINER SET search_path = pg_catalog, public;
REVOKE EXECUTE ON FUNCTION availability_close_session_days(text) FROM PUBLIC;
