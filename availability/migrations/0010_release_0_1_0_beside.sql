-- compatible-with: >=0.1.0
-- Expand: what 0008 took from release 0.1.0 comes back, so 0.1.0 may run beside this release
-- (a rolling deploy) or instead of it (a rollback) on this schema. contract/0010 removes it
-- again, once 0.1.0 can no longer run (availability migrate --contract; by itself from 0.3.0).
--
-- 1. 0.1.0 follows chat_sessions and mitras through NOTIFY on availability_mitra_changed:
--    without it, a mitra given two active sessions by the chat backend kept load 0 in 0.1.0's
--    FindAvailableMitras until the 300 s reconcile. Its trigger functions and triggers come
--    back as 0.1.0 defined them, beside the change table (the chat sessions' one only while
--    CHAT_SESSION_TRIGGERS is on, as ours). Until the contract step, the chat backend's writes
--    pay for NOTIFY's commit lock again, as they did under 0.1.0.
-- 2. 0.1.0's dashboard adds up chat_session_days as complete counts of every day; since 0008
--    that table holds only the days before counted_before. It becomes
--    availability_session_days, and chat_session_days a view of complete counts: the stored
--    days, the changes not folded yet, and the days since counted_before from the created_at
--    index (what this release's own dashboard query adds up).

ALTER TABLE chat_session_days RENAME TO availability_session_days;
ALTER INDEX chat_session_days_pkey RENAME TO availability_session_days_pkey;

CREATE VIEW chat_session_days AS
SELECT day, sensitive, sum(sessions)::bigint AS sessions
FROM (
    SELECT day, sensitive, sessions FROM availability_session_days
    UNION ALL
    SELECT day, sensitive, sessions FROM chat_session_day_changes
    UNION ALL
    SELECT (c.created_at AT TIME ZONE 'UTC')::date, c.topic_sensitivity = 'sensitive', count(*)
    FROM chat_sessions c, chat_session_days_state s
    WHERE c.created_at >= s.counted_before::timestamp AT TIME ZONE 'UTC'
    GROUP BY 1, 2
) parts
GROUP BY day, sensitive;

CREATE OR REPLACE FUNCTION availability_clear_session_days() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM availability_session_days;
    DELETE FROM chat_session_day_changes;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION availability_close_session_days(lock_wait text DEFAULT '100ms')
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    target date := (now() AT TIME ZONE 'UTC')::date - 2;
    line date;
BEGIN
    IF (SELECT counted_before FROM chat_session_days_state) < target THEN
        PERFORM set_config('lock_timeout', lock_wait, true);
        BEGIN
            LOCK TABLE chat_sessions IN SHARE MODE;
        EXCEPTION WHEN lock_not_available THEN
            RETURN false;
        END;
        SELECT counted_before INTO line FROM chat_session_days_state FOR UPDATE;
        IF line < target THEN
            INSERT INTO chat_session_day_changes
            SELECT (created_at AT TIME ZONE 'UTC')::date, topic_sensitivity = 'sensitive',
                   count(*)
            FROM chat_sessions
            WHERE created_at >= line::timestamp AT TIME ZONE 'UTC'
              AND created_at < target::timestamp AT TIME ZONE 'UTC'
            GROUP BY 1, 2;
            UPDATE chat_session_days_state SET counted_before = target;
        END IF;
    END IF;
    WITH moved AS (DELETE FROM chat_session_day_changes RETURNING *)
    INSERT INTO availability_session_days AS d (day, sensitive, sessions)
    SELECT day, sensitive, sum(sessions) FROM moved GROUP BY 1, 2
    ON CONFLICT (day, sensitive) DO UPDATE SET sessions = d.sessions + excluded.sessions;
    RETURN true;
END;
$$;

CREATE OR REPLACE FUNCTION availability_set_session_triggers(enabled boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    installed boolean := EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgrelid = 'chat_sessions'::regclass AND tgname = 'availability_session_insert');
    counted text := $c$NEW.mitra_id IS NOT NULL AND NEW.status IN ('active', 'pending_payment')$c$;
BEGIN
    IF enabled AND installed THEN
        RETURN false;
    END IF;
    DROP TRIGGER IF EXISTS availability_session_change ON chat_sessions;
    DROP TRIGGER IF EXISTS availability_session_insert ON chat_sessions;
    DROP TRIGGER IF EXISTS availability_session_update ON chat_sessions;
    DROP TRIGGER IF EXISTS availability_session_delete ON chat_sessions;
    DROP TRIGGER IF EXISTS availability_session_truncate ON chat_sessions;
    DROP TRIGGER IF EXISTS availability_session_days_insert ON chat_sessions;
    DROP TRIGGER IF EXISTS availability_session_days_update ON chat_sessions;
    DROP TRIGGER IF EXISTS availability_session_days_delete ON chat_sessions;
    DROP TRIGGER IF EXISTS availability_session_days_truncate ON chat_sessions;
    IF NOT enabled THEN
        DELETE FROM availability_session_days;
        DELETE FROM chat_session_day_changes;
        RETURN installed;
    END IF;
    EXECUTE format($t$
        CREATE TRIGGER availability_session_insert AFTER INSERT ON chat_sessions
        FOR EACH ROW WHEN (%s)
        EXECUTE FUNCTION availability_note_session_change()$t$, counted);
    EXECUTE format($t$
        CREATE TRIGGER availability_session_update AFTER UPDATE OF mitra_id, status
        ON chat_sessions FOR EACH ROW WHEN (
            (%1$s) IS DISTINCT FROM (%2$s)
            OR ((%2$s) AND OLD.mitra_id IS DISTINCT FROM NEW.mitra_id))
        EXECUTE FUNCTION availability_note_session_change()$t$,
        replace(counted, 'NEW.', 'OLD.'), counted);
    EXECUTE format($t$
        CREATE TRIGGER availability_session_delete AFTER DELETE ON chat_sessions
        FOR EACH ROW WHEN (%s)
        EXECUTE FUNCTION availability_note_session_change()$t$,
        replace(counted, 'NEW.', 'OLD.'));
    CREATE TRIGGER availability_session_truncate AFTER TRUNCATE ON chat_sessions
        FOR EACH STATEMENT EXECUTE FUNCTION availability_note_all_mitras();
    -- Release 0.1.0's NOTIFY, until the contract step drops its function.
    IF to_regprocedure('availability_notify_session_change()') IS NOT NULL THEN
        CREATE TRIGGER availability_session_change
            AFTER INSERT OR UPDATE OF mitra_id, status OR DELETE ON chat_sessions
            FOR EACH ROW EXECUTE FUNCTION availability_notify_session_change();
    END IF;
    CREATE TRIGGER availability_session_days_insert AFTER INSERT ON chat_sessions
        FOR EACH ROW WHEN (NEW.created_at < clock_timestamp() - interval '2 days')
        EXECUTE FUNCTION availability_count_old_session();
    CREATE TRIGGER availability_session_days_update
        AFTER UPDATE OF created_at, topic_sensitivity ON chat_sessions FOR EACH ROW
        WHEN ((OLD.created_at IS DISTINCT FROM NEW.created_at
               OR OLD.topic_sensitivity IS DISTINCT FROM NEW.topic_sensitivity)
              AND least(OLD.created_at, NEW.created_at) < clock_timestamp() - interval '2 days')
        EXECUTE FUNCTION availability_count_old_session();
    CREATE TRIGGER availability_session_days_delete AFTER DELETE ON chat_sessions
        FOR EACH ROW WHEN (OLD.created_at < clock_timestamp() - interval '2 days')
        EXECUTE FUNCTION availability_count_old_session();
    CREATE TRIGGER availability_session_days_truncate
        AFTER TRUNCATE ON chat_sessions
        FOR EACH STATEMENT EXECUTE FUNCTION availability_clear_session_days();
    LOCK TABLE chat_sessions IN SHARE MODE;
    DELETE FROM availability_session_days;
    DELETE FROM chat_session_day_changes;
    DELETE FROM chat_session_days_state;
    INSERT INTO chat_session_days_state VALUES (true, (now() AT TIME ZONE 'UTC')::date - 2);
    INSERT INTO availability_session_days (day, sensitive, sessions)
    SELECT (created_at AT TIME ZONE 'UTC')::date, topic_sensitivity = 'sensitive', count(*)
    FROM chat_sessions
    WHERE created_at < (SELECT counted_before FROM chat_session_days_state)::timestamp
        AT TIME ZONE 'UTC'
    GROUP BY 1, 2;
    RETURN true;
END;
$$;

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

CREATE OR REPLACE FUNCTION availability_notify_mitra_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('availability_mitra_changed', NEW.id::text);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS availability_mitra_notify ON mitras;
CREATE TRIGGER availability_mitra_notify
    AFTER INSERT OR UPDATE OF display_name, is_active, max_concurrent_sessions ON mitras
    FOR EACH ROW EXECUTE FUNCTION availability_notify_mitra_change();

DROP TRIGGER IF EXISTS availability_session_change ON chat_sessions;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'chat_sessions'::regclass
               AND tgname = 'availability_session_insert') THEN
        CREATE TRIGGER availability_session_change
            AFTER INSERT OR UPDATE OF mitra_id, status OR DELETE ON chat_sessions
            FOR EACH ROW EXECUTE FUNCTION availability_notify_session_change();
    END IF;
END;
$$;
