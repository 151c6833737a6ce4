-- compatible-with: >=0.1.0
-- Fencing tokens of the sweeps' leases (epochs from Valkey): a sweep's Postgres write
-- carries its epoch and is refused once a newer leader has written, so a paused former
-- leader that wakes late changes nothing.
CREATE TABLE IF NOT EXISTS sweep_fences (
    name text PRIMARY KEY,
    epoch bigint NOT NULL
);

-- The heartbeat flush and the auto-offline sweep address rows by mitra_id (the primary
-- key); the stale-detection itself runs in Valkey, so no index on last_heartbeat_at.
