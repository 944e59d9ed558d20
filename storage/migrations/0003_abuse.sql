-- Archives expire after long inactivity: reads count as activity.
ALTER TABLE archive ADD COLUMN accessed_ms INTEGER NOT NULL DEFAULT 0;
UPDATE archive SET accessed_ms = updated_ms;
CREATE INDEX archive_activity ON archive (max(updated_ms, accessed_ms));
