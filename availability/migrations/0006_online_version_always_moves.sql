-- compatible-with: >=0.1.0
-- The mirror orders online/offline writes by mitra_online_status.version. The service bumps
-- it on every write; these make it move for any other writer too, so a read from before a
-- row existed (version 0) or before a direct UPDATE can never overwrite a newer one.
ALTER TABLE mitra_online_status ALTER COLUMN version SET DEFAULT 1;

CREATE OR REPLACE FUNCTION availability_bump_online_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.version <= OLD.version THEN
        NEW.version := OLD.version + 1;
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS availability_online_version ON mitra_online_status;
CREATE TRIGGER availability_online_version
    BEFORE UPDATE OF is_online ON mitra_online_status
    FOR EACH ROW WHEN (NEW.is_online IS DISTINCT FROM OLD.is_online)
    EXECUTE FUNCTION availability_bump_online_version();
