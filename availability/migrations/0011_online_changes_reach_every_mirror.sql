-- compatible-with: >=0.1.0
-- Every change of a mitra's online state goes through the change table, as its loads and
-- deactivations do, so every instance's mirror hears of it (a move to a new Valkey, a
-- blue/green deploy on two): before, a SetOnline or SetOffline reached only the mirror of the
-- instance that took it, and the others learned of it at the next reconcile (300 s).
-- Only a change of is_online fires it: the heartbeat flush (many rows, last_heartbeat_at
-- only) never does, nor does an UPDATE that leaves is_online as it was.

CREATE OR REPLACE FUNCTION availability_note_online_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO availability_changes AS c (mitra_id) VALUES (NEW.mitra_id)
    ON CONFLICT (mitra_id) DO UPDATE SET noted_at = c.noted_at;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS availability_online_insert ON mitra_online_status;
CREATE TRIGGER availability_online_insert
    AFTER INSERT ON mitra_online_status
    FOR EACH ROW WHEN (NEW.is_online)
    EXECUTE FUNCTION availability_note_online_change();

DROP TRIGGER IF EXISTS availability_online_update ON mitra_online_status;
CREATE TRIGGER availability_online_update
    AFTER UPDATE OF is_online ON mitra_online_status
    FOR EACH ROW WHEN (NEW.is_online IS DISTINCT FROM OLD.is_online)
    EXECUTE FUNCTION availability_note_online_change();
