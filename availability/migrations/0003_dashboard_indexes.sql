-- compatible-with: >=0.1.0
-- GetDashboardStats counts each of these with an index-only scan of a small or ranged
-- index, instead of scanning every chat session ever held.
CREATE INDEX IF NOT EXISTS chat_sessions_pending_idx
    ON chat_sessions (created_at) WHERE status IN ('searching', 'pending_acceptance');
CREATE INDEX IF NOT EXISTS chat_sessions_sensitive_idx
    ON chat_sessions (created_at) WHERE topic_sensitivity = 'sensitive';
CREATE INDEX IF NOT EXISTS chat_sessions_created_idx
    ON chat_sessions (created_at);
