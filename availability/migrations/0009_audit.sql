-- compatible-with: >=0.1.0
-- Issue 18: who changed a mitra's state. Every SetMitraActive writes one row, and so do
-- SetOnline and SetOffline made by a caller with the admin scope, in the same transaction
-- as the change: a row that cannot be written fails the change with it. Rows outlive their
-- mitra (no foreign key): deleting a mitra must not erase who deactivated it.
CREATE TABLE IF NOT EXISTS availability_audit (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    caller text NOT NULL,
    request_id text,
    action text NOT NULL CHECK (action IN ('set_active', 'set_online', 'set_offline')),
    mitra_id uuid NOT NULL,
    active_before boolean NOT NULL,
    active_after boolean NOT NULL,
    online_before boolean NOT NULL,
    online_after boolean NOT NULL,
    revoked_auth_sessions int NOT NULL DEFAULT 0
);

CREATE INDEX IF NOT EXISTS availability_audit_mitra_idx ON availability_audit (mitra_id, at);
CREATE INDEX IF NOT EXISTS availability_audit_at_idx ON availability_audit (at);
