-- compatible-with: >=0.1.0
-- Presence bound to mitras (bind_presence): the mirror vouches for auth sessions Postgres
-- found live, so a change to a mitra's sessions (a revocation, a logout, an expiry moved, a
-- delete, a deactivation's revocations) must void what it vouches for. Such changes are
-- noted in the change table like the others, flagged, so that only they void the mitra's
-- cached sessions: a chat moving a load must not send the next heartbeat to Postgres.
-- Older releases insert without the flag (its default) and take ids without reading it.

ALTER TABLE availability_changes ADD COLUMN IF NOT EXISTS sessions boolean NOT NULL DEFAULT false;

CREATE OR REPLACE FUNCTION availability_note_auth_session_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO availability_changes AS c (mitra_id, sessions) VALUES (OLD.mitra_id, true)
    ON CONFLICT (mitra_id) DO UPDATE SET sessions = true;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS availability_auth_session_update ON auth_sessions;
CREATE TRIGGER availability_auth_session_update
    AFTER UPDATE OF revoked_at, expires_at, mitra_id ON auth_sessions
    FOR EACH ROW WHEN (
        NEW.revoked_at IS DISTINCT FROM OLD.revoked_at
        OR NEW.expires_at IS DISTINCT FROM OLD.expires_at
        OR NEW.mitra_id IS DISTINCT FROM OLD.mitra_id
    )
    EXECUTE FUNCTION availability_note_auth_session_change();

DROP TRIGGER IF EXISTS availability_auth_session_delete ON auth_sessions;
CREATE TRIGGER availability_auth_session_delete
    AFTER DELETE ON auth_sessions
    FOR EACH ROW EXECUTE FUNCTION availability_note_auth_session_change();
