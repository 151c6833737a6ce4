-- compatible-with: >=0.1.0
-- Chat sessions counted per UTC day and sensitivity, kept by statement triggers, so the
-- dashboard's "all sensitive" and "last 30 days" counts add up a few hundred day rows plus
-- one partial day, instead of counting millions of sessions on every refresh.
-- Statement-level with transition tables: a bulk insert of a million sessions updates each
-- day row once, not once per session (which would also be quadratic inside one transaction).
CREATE TABLE IF NOT EXISTS chat_session_days (
    day date NOT NULL,
    sensitive boolean NOT NULL,
    sessions bigint NOT NULL,
    PRIMARY KEY (day, sensitive)
);

CREATE OR REPLACE FUNCTION availability_count_session_days() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO chat_session_days AS d (day, sensitive, sessions)
        SELECT (created_at AT TIME ZONE 'UTC')::date, topic_sensitivity = 'sensitive', count(*)
        FROM new_rows GROUP BY 1, 2
        ON CONFLICT (day, sensitive) DO UPDATE SET sessions = d.sessions + excluded.sessions;
    ELSIF TG_OP = 'DELETE' THEN
        UPDATE chat_session_days d SET sessions = d.sessions - o.sessions
        FROM (
            SELECT (created_at AT TIME ZONE 'UTC')::date AS day,
                   topic_sensitivity = 'sensitive' AS sensitive, count(*) AS sessions
            FROM old_rows GROUP BY 1, 2
        ) o
        WHERE d.day = o.day AND d.sensitive = o.sensitive;
    ELSE
        INSERT INTO chat_session_days AS d (day, sensitive, sessions)
        SELECT day, sensitive, sum(delta) FROM (
            SELECT (created_at AT TIME ZONE 'UTC')::date AS day,
                   topic_sensitivity = 'sensitive' AS sensitive, 1 AS delta FROM new_rows
            UNION ALL
            SELECT (created_at AT TIME ZONE 'UTC')::date, topic_sensitivity = 'sensitive', -1
            FROM old_rows
        ) changes
        GROUP BY day, sensitive
        HAVING sum(delta) <> 0
        ON CONFLICT (day, sensitive) DO UPDATE SET sessions = d.sessions + excluded.sessions;
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS availability_session_days_insert ON chat_sessions;
CREATE TRIGGER availability_session_days_insert
    AFTER INSERT ON chat_sessions REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION availability_count_session_days();
DROP TRIGGER IF EXISTS availability_session_days_update ON chat_sessions;
CREATE TRIGGER availability_session_days_update
    AFTER UPDATE ON chat_sessions REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION availability_count_session_days();
DROP TRIGGER IF EXISTS availability_session_days_delete ON chat_sessions;
CREATE TRIGGER availability_session_days_delete
    AFTER DELETE ON chat_sessions REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION availability_count_session_days();

CREATE OR REPLACE FUNCTION availability_clear_session_days() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM chat_session_days;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS availability_session_days_truncate ON chat_sessions;
CREATE TRIGGER availability_session_days_truncate
    AFTER TRUNCATE ON chat_sessions
    FOR EACH STATEMENT EXECUTE FUNCTION availability_clear_session_days();

-- Sessions that existed before this migration.
LOCK TABLE chat_sessions IN SHARE MODE;
DELETE FROM chat_session_days;
INSERT INTO chat_session_days (day, sensitive, sessions)
SELECT (created_at AT TIME ZONE 'UTC')::date, topic_sensitivity = 'sensitive', count(*)
FROM chat_sessions GROUP BY 1, 2;
