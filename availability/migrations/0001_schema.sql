-- compatible-with: >=0.1.0
-- The contract tables of DESIGN.md. Other backends write mitras and chat_sessions.
CREATE TABLE IF NOT EXISTS mitras (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    display_name text,
    is_active boolean NOT NULL DEFAULT true,
    max_concurrent_sessions int NOT NULL DEFAULT 3 CHECK (max_concurrent_sessions >= 0),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS mitra_online_status (
    mitra_id uuid PRIMARY KEY REFERENCES mitras (id) ON DELETE CASCADE,
    is_online boolean NOT NULL DEFAULT false,
    last_heartbeat_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- Bumped by every online/offline/active write; the mirror ignores a write older
    -- than the one it already holds, so two racing instances cannot reorder them.
    version bigint NOT NULL DEFAULT 0
);

CREATE INDEX IF NOT EXISTS mitra_online_status_online_idx
    ON mitra_online_status (mitra_id) WHERE is_online;

CREATE TABLE IF NOT EXISTS chat_sessions (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    mitra_id uuid REFERENCES mitras (id) ON DELETE SET NULL,
    customer_id uuid,
    status text NOT NULL CHECK (status IN (
        'searching', 'pending_acceptance', 'pending_payment', 'active',
        'ended', 'expired', 'cancelled')),
    topic_sensitivity text NOT NULL DEFAULT 'normal'
        CHECK (topic_sensitivity IN ('normal', 'sensitive')),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Load = sessions in active or pending_payment: a small partial index, so a load
-- count is an index-only scan however many ended sessions pile up.
CREATE INDEX IF NOT EXISTS chat_sessions_load_idx
    ON chat_sessions (mitra_id) WHERE status IN ('active', 'pending_payment');

CREATE TABLE IF NOT EXISTS auth_sessions (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    mitra_id uuid NOT NULL REFERENCES mitras (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    revoked_at timestamptz
);

CREATE INDEX IF NOT EXISTS auth_sessions_unrevoked_idx
    ON auth_sessions (mitra_id) WHERE revoked_at IS NULL;

-- Every change that can move a mitra's availability notifies its id, so the mirror
-- converges even when a backend writes these tables and never calls the service.
CREATE OR REPLACE FUNCTION availability_notify_session_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    old_counts boolean := TG_OP <> 'INSERT' AND OLD.mitra_id IS NOT NULL
        AND OLD.status IN ('active', 'pending_payment');
    new_counts boolean := TG_OP <> 'DELETE' AND NEW.mitra_id IS NOT NULL
        AND NEW.status IN ('active', 'pending_payment');
BEGIN
    IF old_counts AND new_counts AND OLD.mitra_id = NEW.mitra_id THEN
        RETURN NULL;
    END IF;
    IF old_counts THEN
        PERFORM pg_notify('availability_mitra_changed', OLD.mitra_id::text);
    END IF;
    IF new_counts THEN
        PERFORM pg_notify('availability_mitra_changed', NEW.mitra_id::text);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS availability_session_change ON chat_sessions;
CREATE TRIGGER availability_session_change
    AFTER INSERT OR UPDATE OF mitra_id, status OR DELETE ON chat_sessions
    FOR EACH ROW EXECUTE FUNCTION availability_notify_session_change();

CREATE OR REPLACE FUNCTION availability_notify_mitra_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('availability_mitra_changed', NEW.id::text);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS availability_mitra_change ON mitras;
CREATE TRIGGER availability_mitra_change
    AFTER INSERT OR UPDATE OF display_name, is_active, max_concurrent_sessions ON mitras
    FOR EACH ROW EXECUTE FUNCTION availability_notify_mitra_change();
