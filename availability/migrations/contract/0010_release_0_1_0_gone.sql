-- compatible-with: >=0.2.0
-- automatic-from: 0.3.0
-- Contract of 0010: release 0.1.0 can no longer run. Its NOTIFY triggers go (the chat
-- backend's writes stop paying NOTIFY's commit lock), and so does the view of complete day
-- counts it reads. After this step a rollback to 0.1.0 leaves its loads unfollowed and its
-- dashboard short: roll back before it, or no further than 0.2.0.

DROP TRIGGER IF EXISTS availability_session_change ON chat_sessions;
DROP TRIGGER IF EXISTS availability_mitra_notify ON mitras;
DROP FUNCTION IF EXISTS availability_notify_session_change();
DROP FUNCTION IF EXISTS availability_notify_mitra_change();
DROP VIEW IF EXISTS chat_session_days;
