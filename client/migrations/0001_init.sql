-- A MeshWhisper client profile: contacts, sessions, prekey secrets,
-- message history and the outbox. One writer (the client's engine task).

CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) STRICT;

CREATE TABLE contacts (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    identity    BLOB NOT NULL UNIQUE,
    -- The contact's invite (binary): namespace, home relay, addresses.
    card        BLOB NOT NULL,
    added_ms    INTEGER NOT NULL,
    verified    INTEGER NOT NULL DEFAULT 0
) STRICT;

-- Double Ratchet sessions; a contact can have more than one while both
-- sides started one at once. `active` is the one we send with.
CREATE TABLE sessions (
    contact_id  INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
    session_id  BLOB NOT NULL,
    state       BLOB NOT NULL,
    -- PQXDH initial message, attached to what we send until the peer answers.
    initial     BLOB,
    initiator   BLOB NOT NULL,
    active      INTEGER NOT NULL DEFAULT 0,
    created_ms  INTEGER NOT NULL,
    PRIMARY KEY (contact_id, session_id)
) STRICT;

-- Our prekey secrets: kind 1 signed X25519, 2 ML-KEM seed, 3 one-time X25519.
CREATE TABLE prekeys (
    kind        INTEGER NOT NULL,
    id          INTEGER NOT NULL,
    secret      BLOB NOT NULL,
    created_ms  INTEGER NOT NULL,
    PRIMARY KEY (kind, id)
) STRICT;

-- Message history; (contact, direction, msg_id) drops duplicates.
CREATE TABLE messages (
    seq         INTEGER PRIMARY KEY,
    contact_id  INTEGER NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
    outgoing    INTEGER NOT NULL,
    msg_id      BLOB NOT NULL,
    kind        INTEGER NOT NULL,
    body        BLOB NOT NULL,
    sent_ms     INTEGER NOT NULL,
    stored_ms   INTEGER NOT NULL,
    -- outgoing: 0 queued, 1 at the relay, 2 delivered, 3 read
    status      INTEGER NOT NULL DEFAULT 0,
    UNIQUE (contact_id, outgoing, msg_id)
) STRICT;
-- What still needs sending or a receipt: a small set, found without
-- scanning the history.
CREATE INDEX messages_pending ON messages (contact_id, outgoing, seq) WHERE status = 0;

-- Encrypted packets not yet acknowledged by a relay, sent again after a
-- reconnect or a restart (never re-encrypted: no key is used twice).
CREATE TABLE outbox (
    id          INTEGER PRIMARY KEY,
    relay       TEXT NOT NULL,
    packet      BLOB NOT NULL,
    msg_seq     INTEGER,
    created_ms  INTEGER NOT NULL
) STRICT;
CREATE INDEX outbox_msg ON outbox (msg_seq);
