-- compatible-with: >=0.1.0
-- Each write RPC is one statement, so one round trip to Postgres (issue: writes in fewer
-- round trips), its audit row included. The row goes through this function so that a row
-- that cannot be written (a constraint, a trigger, a grant) fails the statement with a code
-- of its own, AVAUD, which the service reports as "its audit row could not be written"
-- rather than any other database error. The change is not made either: it is the same
-- statement.
CREATE OR REPLACE FUNCTION availability_audit_row(
    caller text, request_id text, action text, mitra_id uuid, active_before boolean,
    active_after boolean, online_before boolean, online_after boolean, revoked integer
) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO availability_audit (caller, request_id, action, mitra_id, active_before,
        active_after, online_before, online_after, revoked_auth_sessions)
    VALUES (caller, request_id, action, mitra_id, active_before, active_after, online_before,
        online_after, revoked);
    RETURN 1;
EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION USING ERRCODE = 'AVAUD', MESSAGE = SQLERRM;
END;
$$;
