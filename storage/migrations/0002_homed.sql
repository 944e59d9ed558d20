-- Destination hashes registered by this relay's clients: the relay treats
-- them as homed here while the client is offline, until they expire.
CREATE TABLE homed (
    hash       BLOB PRIMARY KEY CHECK (length(hash) = 8),
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX homed_expiry ON homed (expires_ms);
