-- MeshWhisper relay state, schema version 1.
PRAGMA application_id = 1297567300; -- 'MWND'
PRAGMA user_version = 1;

-- Packets queued for offline recipients, in arrival order (id).
CREATE TABLE mailbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    dest        BLOB    NOT NULL CHECK (length(dest) = 8),
    packet      BLOB    NOT NULL,
    received_ms INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL
);
CREATE INDEX mailbox_dest ON mailbox (dest, id);
-- No expiry index: every packet gets the same TTL, so expiry follows id
-- order and the sweeper scans from the oldest id (one index less per insert).

-- Prekey bundles by (namespace, identity public key), usernames unique per namespace.
CREATE TABLE directory (
    namespace  TEXT    NOT NULL,
    public_key TEXT    NOT NULL,
    bundle     BLOB    NOT NULL,
    username   TEXT,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (namespace, public_key)
);
CREATE UNIQUE INDEX directory_username ON directory (namespace, username) WHERE username IS NOT NULL;

CREATE TABLE namespace_policy (
    namespace TEXT PRIMARY KEY,
    policy    TEXT NOT NULL CHECK (policy IN ('signed-transfer', 'last-writer-wins'))
);

-- One-time prekeys, claimed (deleted) one at a time.
CREATE TABLE opks (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace  TEXT NOT NULL,
    public_key TEXT NOT NULL,
    opk        BLOB NOT NULL,
    UNIQUE (namespace, public_key, opk)
);
CREATE INDEX opks_owner ON opks (namespace, public_key, id);

-- SHA-256 of the bearer token that may purge an identity's pool, pinned on first use.
CREATE TABLE opk_tokens (
    public_key TEXT PRIMARY KEY,
    token_hash BLOB NOT NULL
);

-- Encrypted media blobs: the bytes are files under media/, rows hold metadata.
CREATE TABLE media (
    id         TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE INDEX media_expiry ON media (expires_ms);

-- One encrypted archive per identity: the bytes are files under archive/.
CREATE TABLE archive (
    owner      BLOB PRIMARY KEY CHECK (length(owner) = 32),
    token_hash BLOB NOT NULL,
    file       TEXT NOT NULL,
    size       INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);

-- Push wake registrations by destination hash; kept after disconnect.
CREATE TABLE push (
    dest         BLOB PRIMARY KEY CHECK (length(dest) = 8),
    platform     TEXT NOT NULL,
    token        TEXT NOT NULL,
    topic        TEXT,
    subscription TEXT,
    updated_ms   INTEGER NOT NULL
);

-- Signed relay address records, newest per relay.
CREATE TABLE address_book (
    relay_key    BLOB PRIMARY KEY CHECK (length(relay_key) = 32),
    timestamp_ms INTEGER NOT NULL,
    record       BLOB    NOT NULL,
    received_ms  INTEGER NOT NULL
);
CREATE INDEX address_book_age ON address_book (timestamp_ms);
