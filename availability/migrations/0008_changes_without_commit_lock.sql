-- compatible-with: >=0.1.0 (only with 0010, which puts back what this step drops; one migrate applies both in one transaction)
-- Issue 16: the chat backend's writes paid for our triggers. NOTIFY takes one database-wide
-- lock at commit, so every committing transaction that notified queued behind the others
-- (updates 3x slower at 16 writers); every insert of a day updated the same day-counter row
-- and held its lock until commit (inserts 4-5x slower). Now (figures: README, Cost to your
-- database):
--
-- 1. Changes are noted in availability_changes, one row per mitra (an upsert keyed by
--    mitra_id: however long the service stays away, the table holds at most one row per
--    mitra), and the service takes them with DELETE ... FOR UPDATE SKIP LOCKED, polling.
--    ON CONFLICT DO UPDATE, not DO NOTHING: the update locks the existing row until the
--    writer commits, so a drain cannot take that row, read the mitra before the writer's
--    commit and miss the change. A condition on each trigger (WHEN) skips every transition
--    that cannot move a load (creating, offering, pending_payment -> active) without calling
--    PL/pgSQL at all. UNLOGGED: no WAL for it; a crash empties it, and the service reconciles
--    after every reconnect anyway (a failover to a standby, where it is empty, likewise).
-- 2. The dashboard's day counts cover only days before chat_session_days_state.counted_before
--    (about two days ago, moved on by the service: availability_close_session_days); the days
--    since are counted from the created_at indexes. A session inserted now has nothing to
--    count, so no trigger fires on an ordinary insert. Only a row dated before that line
--    (a backfill, an edited created_at or sensitivity, a delete of an old session) fires one,
--    which appends to chat_session_day_changes (append-only: a million-row backfill adds
--    rows, it never updates one row a million times).
-- 3. availability_set_session_triggers(false) drops every trigger of ours on chat_sessions
--    (CHAT_SESSION_TRIGGERS=false, applied by migrate); true puts them back and recounts.

CREATE UNLOGGED TABLE IF NOT EXISTS availability_changes (
    mitra_id uuid PRIMARY KEY,
    noted_at timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION availability_note_session_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    old_id uuid := CASE WHEN TG_OP <> 'INSERT' AND OLD.status IN ('active', 'pending_payment')
                        THEN OLD.mitra_id END;
    new_id uuid := CASE WHEN TG_OP <> 'DELETE' AND NEW.status IN ('active', 'pending_payment')
                        THEN NEW.mitra_id END;
    first_id uuid := least(old_id, new_id);
    second_id uuid := greatest(old_id, new_id);
BEGIN
    -- In id order, so two reroutes between the same two mitras cannot deadlock.
    INSERT INTO availability_changes AS c (mitra_id)
    VALUES (coalesce(first_id, second_id))
    ON CONFLICT (mitra_id) DO UPDATE SET noted_at = c.noted_at;
    IF first_id IS DISTINCT FROM second_id AND first_id IS NOT NULL THEN
        INSERT INTO availability_changes AS c (mitra_id) VALUES (second_id)
        ON CONFLICT (mitra_id) DO UPDATE SET noted_at = c.noted_at;
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION availability_note_mitra_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO availability_changes AS c (mitra_id) VALUES (NEW.id)
    ON CONFLICT (mitra_id) DO UPDATE SET noted_at = c.noted_at;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION availability_note_all_mitras() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO availability_changes (mitra_id) SELECT id FROM mitras
    ON CONFLICT (mitra_id) DO NOTHING;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS availability_mitra_change ON mitras;
CREATE TRIGGER availability_mitra_change
    AFTER INSERT OR UPDATE OF display_name, is_active, max_concurrent_sessions ON mitras
    FOR EACH ROW EXECUTE FUNCTION availability_note_mitra_change();
DROP FUNCTION IF EXISTS availability_notify_mitra_change();

CREATE TABLE IF NOT EXISTS chat_session_days_state (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    counted_before date NOT NULL
);

CREATE TABLE IF NOT EXISTS chat_session_day_changes (
    day date NOT NULL,
    sensitive boolean NOT NULL,
    sessions bigint NOT NULL
);

DROP TRIGGER IF EXISTS availability_session_days_insert ON chat_sessions;
DROP TRIGGER IF EXISTS availability_session_days_update ON chat_sessions;
DROP TRIGGER IF EXISTS availability_session_days_delete ON chat_sessions;
DROP FUNCTION IF EXISTS availability_count_session_days();

-- Fired only for rows dated at least two days back (the WHEN of each trigger), so always
-- for a row before counted_before, which never comes closer than two days.
CREATE OR REPLACE FUNCTION availability_count_old_session() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    line timestamptz := (SELECT counted_before FROM chat_session_days_state)::timestamp
        AT TIME ZONE 'UTC';
BEGIN
    IF TG_OP <> 'INSERT' AND OLD.created_at < line THEN
        INSERT INTO chat_session_day_changes VALUES (
            (OLD.created_at AT TIME ZONE 'UTC')::date, OLD.topic_sensitivity = 'sensitive', -1);
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.created_at < line THEN
        INSERT INTO chat_session_day_changes VALUES (
            (NEW.created_at AT TIME ZONE 'UTC')::date, NEW.topic_sensitivity = 'sensitive', 1);
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION availability_clear_session_days() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM chat_session_days;
    DELETE FROM chat_session_day_changes;
    RETURN NULL;
END;
$$;

-- Moves counted_before to two days ago (counting the days it passes from the index) and
-- folds the appended changes into the day rows. The SHARE lock waits for writers in flight
-- (one of them may be inserting a row the count must see) and holds new ones for the count
-- of those days, about once a day; it gives up after lock_wait so that it never queues the
-- chat backend's writes behind a long transaction (false: try again later).
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
    INSERT INTO chat_session_days AS d (day, sensitive, sessions)
    SELECT day, sensitive, sum(sessions) FROM moved GROUP BY 1, 2
    ON CONFLICT (day, sensitive) DO UPDATE SET sessions = d.sessions + excluded.sessions;
    RETURN true;
END;
$$;

-- The one place our chat_sessions triggers are defined: migrate calls it with
-- CHAT_SESSION_TRIGGERS. Turning them on after they were off recounts the days under a
-- SHARE lock (writers wait for that count, once); turning them off empties the day counts,
-- which nothing reads then (the dashboard counts from the created_at index instead).
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
        DELETE FROM chat_session_days;
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
    DELETE FROM chat_session_days;
    DELETE FROM chat_session_day_changes;
    DELETE FROM chat_session_days_state;
    INSERT INTO chat_session_days_state VALUES (true, (now() AT TIME ZONE 'UTC')::date - 2);
    INSERT INTO chat_session_days (day, sensitive, sessions)
    SELECT (created_at AT TIME ZONE 'UTC')::date, topic_sensitivity = 'sensitive', count(*)
    FROM chat_sessions
    WHERE created_at < (SELECT counted_before FROM chat_session_days_state)::timestamp
        AT TIME ZONE 'UTC'
    GROUP BY 1, 2;
    RETURN true;
END;
$$;

SELECT availability_set_session_triggers(false);
SELECT availability_set_session_triggers(true);
DROP FUNCTION IF EXISTS availability_notify_session_change();
