-- The home relay a packet's sender named: a restart still routes it there.
ALTER TABLE mailbox ADD COLUMN route BLOB CHECK (route IS NULL OR length(route) = 32);

-- Federated packet ids stored here, remembered until the sending relay has
-- the acknowledgement (or they expire), so a resent packet is never stored
-- twice.
CREATE TABLE fed_seen (
    id         BLOB PRIMARY KEY CHECK (length(id) = 16),
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX fed_seen_expiry ON fed_seen (expires_ms);

-- The book prefers proven relays when full: ones we were connected to
-- recently, or whose records have been here a long time. A flood of fresh
-- keys can then only displace other fresh keys.
ALTER TABLE address_book ADD COLUMN first_seen_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE address_book ADD COLUMN connected_ms INTEGER NOT NULL DEFAULT 0;
