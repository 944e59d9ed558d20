//! The profile database: one SQLite file in WAL mode with `synchronous =
//! FULL` (a session step that was committed survives power loss, so no
//! message key is ever used twice), written by one task.
//!
//! Functions take a connection, or a transaction through it (the engine's
//! `Tx` derefs to the connection), so the engine can commit a ratchet step
//! together with what it produced.

use crate::Error;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection as _, Row as _, SqliteConnection};
use std::path::Path;

pub(crate) type Conn = SqliteConnection;

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |source| Error::Database { what, source }
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) async fn open(path: &Path) -> Result<Conn, Error> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(std::time::Duration::from_secs(5));
    let mut conn = SqliteConnection::connect_with(&opts)
        .await
        .map_err(db("open the profile database"))?;
    sqlx::migrate!("./migrations")
        .run(&mut conn)
        .await
        .map_err(|e| Error::Migrate(e.to_string()))?;
    Ok(conn)
}

/// Opens the database to read only (beside a process that uses the
/// profile): no migrations, no writes.
pub(crate) async fn open_read_only(path: &Path) -> Result<Conn, Error> {
    if !path.exists() {
        return Err(Error::CorruptProfile(format!(
            "{} is missing",
            path.display()
        )));
    }
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .busy_timeout(std::time::Duration::from_secs(5));
    SqliteConnection::connect_with(&opts)
        .await
        .map_err(db("open the profile database"))
}

// --- meta ---------------------------------------------------------------

pub(crate) async fn meta_get(c: &mut Conn, key: &str) -> Result<Option<Vec<u8>>, Error> {
    sqlx::query_scalar("SELECT value FROM meta WHERE key = ?")
        .bind(key)
        .fetch_optional(c)
        .await
        .map_err(db("read profile settings"))
}

pub(crate) async fn meta_set(c: &mut Conn, key: &str, value: &[u8]) -> Result<(), Error> {
    sqlx::query("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
        .bind(key)
        .bind(value)
        .execute(c)
        .await
        .map_err(db("write profile settings"))?;
    Ok(())
}

pub(crate) async fn meta_u64(c: &mut Conn, key: &str) -> Result<Option<u64>, Error> {
    Ok(meta_get(c, key).await?.and_then(|v| {
        let a: [u8; 8] = v.as_slice().try_into().ok()?;
        Some(u64::from_be_bytes(a))
    }))
}

pub(crate) async fn meta_set_u64(c: &mut Conn, key: &str, v: u64) -> Result<(), Error> {
    meta_set(c, key, &v.to_be_bytes()).await
}

// --- contacts -----------------------------------------------------------

/// A contact row.
#[derive(Debug, Clone)]
pub(crate) struct ContactRow {
    pub id: i64,
    pub name: String,
    pub identity: [u8; 32],
    pub card: Vec<u8>,
    pub added_ms: u64,
    pub verified: bool,
}

fn contact_row(r: &sqlx::sqlite::SqliteRow) -> Result<ContactRow, sqlx::Error> {
    let identity: Vec<u8> = r.try_get("identity")?;
    Ok(ContactRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        identity: identity.as_slice().try_into().unwrap_or([0; 32]),
        card: r.try_get("card")?,
        added_ms: r.try_get::<i64, _>("added_ms")?.max(0) as u64,
        verified: r.try_get::<i64, _>("verified")? != 0,
    })
}

pub(crate) async fn contacts(c: &mut Conn) -> Result<Vec<ContactRow>, Error> {
    let rows = sqlx::query("SELECT * FROM contacts ORDER BY name")
        .fetch_all(c)
        .await
        .map_err(db("list contacts"))?;
    rows.iter()
        .map(contact_row)
        .collect::<Result<_, _>>()
        .map_err(db("read a contact"))
}

pub(crate) async fn contact_by(
    c: &mut Conn,
    column: &'static str,
    value: impl sqlx::Encode<'_, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite> + Send,
) -> Result<Option<ContactRow>, Error> {
    let sql = match column {
        "name" => "SELECT * FROM contacts WHERE name = ?",
        "identity" => "SELECT * FROM contacts WHERE identity = ?",
        _ => "SELECT * FROM contacts WHERE id = ?",
    };
    let row = sqlx::query(sql)
        .bind(value)
        .fetch_optional(c)
        .await
        .map_err(db("find a contact"))?;
    row.as_ref()
        .map(contact_row)
        .transpose()
        .map_err(db("read a contact"))
}

pub(crate) async fn insert_contact(
    c: &mut Conn,
    name: &str,
    identity: &[u8; 32],
    card: &[u8],
    now_ms: u64,
) -> Result<i64, Error> {
    sqlx::query_scalar(
        "INSERT INTO contacts (name, identity, card, added_ms) VALUES (?, ?, ?, ?) RETURNING id",
    )
    .bind(name)
    .bind(identity.as_slice())
    .bind(card)
    .bind(ms(now_ms))
    .fetch_one(c)
    .await
    .map_err(db("add a contact"))
}

pub(crate) async fn update_card(c: &mut Conn, id: i64, card: &[u8]) -> Result<(), Error> {
    sqlx::query("UPDATE contacts SET card = ? WHERE id = ?")
        .bind(card)
        .bind(id)
        .execute(c)
        .await
        .map_err(db("update a contact"))?;
    Ok(())
}

pub(crate) async fn set_verified(c: &mut Conn, id: i64, verified: bool) -> Result<(), Error> {
    sqlx::query("UPDATE contacts SET verified = ? WHERE id = ?")
        .bind(i64::from(verified))
        .bind(id)
        .execute(c)
        .await
        .map_err(db("update a contact"))?;
    Ok(())
}

// --- sessions -----------------------------------------------------------

/// A session row.
#[derive(Debug, Clone)]
pub(crate) struct SessionRow {
    pub session_id: [u8; 8],
    pub state: zeroize::Zeroizing<Vec<u8>>,
    pub initial: Option<Vec<u8>>,
    pub initiator: [u8; 32],
    pub active: bool,
}

fn session_row(r: &sqlx::sqlite::SqliteRow) -> Result<SessionRow, sqlx::Error> {
    let sid: Vec<u8> = r.try_get("session_id")?;
    let initiator: Vec<u8> = r.try_get("initiator")?;
    Ok(SessionRow {
        session_id: sid.as_slice().try_into().unwrap_or([0; 8]),
        state: zeroize::Zeroizing::new(r.try_get("state")?),
        initial: r.try_get("initial")?,
        initiator: initiator.as_slice().try_into().unwrap_or([0; 32]),
        active: r.try_get::<i64, _>("active")? != 0,
    })
}

pub(crate) async fn sessions(c: &mut Conn, contact: i64) -> Result<Vec<SessionRow>, Error> {
    let rows = sqlx::query(
        "SELECT * FROM sessions WHERE contact_id = ? ORDER BY active DESC, created_ms DESC",
    )
    .bind(contact)
    .fetch_all(c)
    .await
    .map_err(db("load sessions"))?;
    rows.iter()
        .map(session_row)
        .collect::<Result<_, _>>()
        .map_err(db("read a session"))
}

pub(crate) async fn save_session(
    c: &mut Conn,
    contact: i64,
    s: &SessionRow,
    now_ms: u64,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO sessions (contact_id, session_id, state, initial, initiator, active, created_ms) \
         VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (contact_id, session_id) DO UPDATE SET \
         state = excluded.state, initial = excluded.initial, active = excluded.active",
    )
    .bind(contact)
    .bind(s.session_id.as_slice())
    .bind(s.state.as_slice())
    .bind(s.initial.as_deref())
    .bind(s.initiator.as_slice())
    .bind(i64::from(s.active))
    .bind(ms(now_ms))
    .execute(c)
    .await
    .map_err(db("save a session"))?;
    Ok(())
}

/// Makes `session_id` the contact's only active session and keeps at most
/// `keep` sessions (the active one and the newest others).
pub(crate) async fn activate_session(
    c: &mut Conn,
    contact: i64,
    session_id: &[u8; 8],
    keep: u32,
) -> Result<(), Error> {
    sqlx::query("UPDATE sessions SET active = (session_id = ?) WHERE contact_id = ?")
        .bind(session_id.as_slice())
        .bind(contact)
        .execute(&mut *c)
        .await
        .map_err(db("switch sessions"))?;
    sqlx::query(
        "DELETE FROM sessions WHERE contact_id = ? AND session_id NOT IN (SELECT session_id \
         FROM sessions WHERE contact_id = ? ORDER BY active DESC, created_ms DESC LIMIT ?)",
    )
    .bind(contact)
    .bind(contact)
    .bind(i64::from(keep.max(1)))
    .execute(c)
    .await
    .map_err(db("drop old sessions"))?;
    Ok(())
}

// --- prekeys ------------------------------------------------------------

/// Kinds of prekey secrets.
pub(crate) const SIGNED: i64 = 1;
pub(crate) const PQ: i64 = 2;
pub(crate) const ONE_TIME: i64 = 3;

pub(crate) async fn prekeys(
    c: &mut Conn,
    kind: i64,
) -> Result<Vec<(u32, zeroize::Zeroizing<Vec<u8>>, u64)>, Error> {
    let rows = sqlx::query("SELECT id, secret, created_ms FROM prekeys WHERE kind = ? ORDER BY id")
        .bind(kind)
        .fetch_all(c)
        .await
        .map_err(db("load prekeys"))?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get::<i64, _>("id")?.clamp(0, i64::from(u32::MAX)) as u32,
                zeroize::Zeroizing::new(r.try_get("secret")?),
                r.try_get::<i64, _>("created_ms")?.max(0) as u64,
            ))
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(db("read a prekey"))
}

pub(crate) async fn insert_prekey(
    c: &mut Conn,
    kind: i64,
    id: u32,
    secret: &[u8],
    now_ms: u64,
) -> Result<(), Error> {
    sqlx::query("INSERT INTO prekeys (kind, id, secret, created_ms) VALUES (?, ?, ?, ?)")
        .bind(kind)
        .bind(i64::from(id))
        .bind(secret)
        .bind(ms(now_ms))
        .execute(c)
        .await
        .map_err(db("store a prekey"))?;
    Ok(())
}

pub(crate) async fn delete_prekey(c: &mut Conn, kind: i64, id: u32) -> Result<(), Error> {
    sqlx::query("DELETE FROM prekeys WHERE kind = ? AND id = ?")
        .bind(kind)
        .bind(i64::from(id))
        .execute(c)
        .await
        .map_err(db("delete a prekey"))?;
    Ok(())
}

// --- messages -----------------------------------------------------------

/// A message row.
#[derive(Debug, Clone)]
pub(crate) struct MessageRow {
    pub seq: i64,
    pub contact_id: i64,
    pub outgoing: bool,
    pub msg_id: [u8; 16],
    pub kind: u8,
    pub body: Vec<u8>,
    pub sent_ms: u64,
    pub status: u8,
}

fn message_row(r: &sqlx::sqlite::SqliteRow) -> Result<MessageRow, sqlx::Error> {
    let id: Vec<u8> = r.try_get("msg_id")?;
    Ok(MessageRow {
        seq: r.try_get("seq")?,
        contact_id: r.try_get("contact_id")?,
        outgoing: r.try_get::<i64, _>("outgoing")? != 0,
        msg_id: id.as_slice().try_into().unwrap_or([0; 16]),
        kind: r.try_get::<i64, _>("kind")?.clamp(0, 255) as u8,
        body: r.try_get("body")?,
        sent_ms: r.try_get::<i64, _>("sent_ms")?.max(0) as u64,
        status: r.try_get::<i64, _>("status")?.clamp(0, 255) as u8,
    })
}

/// Inserts a message; `None` when (contact, direction, id) is already stored.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn insert_message(
    c: &mut Conn,
    contact: i64,
    outgoing: bool,
    msg_id: &[u8; 16],
    kind: u8,
    body: &[u8],
    sent_ms: u64,
    now_ms: u64,
) -> Result<Option<i64>, Error> {
    sqlx::query_scalar(
        "INSERT INTO messages (contact_id, outgoing, msg_id, kind, body, sent_ms, stored_ms) \
         VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING seq",
    )
    .bind(contact)
    .bind(i64::from(outgoing))
    .bind(msg_id.as_slice())
    .bind(i64::from(kind))
    .bind(body)
    .bind(ms(sent_ms))
    .bind(ms(now_ms))
    .fetch_optional(c)
    .await
    .map_err(db("store a message"))
}

/// Raises the status of our messages to `status`; returns those changed.
pub(crate) async fn raise_status(
    c: &mut Conn,
    contact: i64,
    ids: &[[u8; 16]],
    status: u8,
) -> Result<Vec<[u8; 16]>, Error> {
    let mut changed = Vec::new();
    for id in ids {
        let n = sqlx::query(
            "UPDATE messages SET status = ? WHERE contact_id = ? AND outgoing = 1 AND msg_id = ? AND status < ?",
        )
        .bind(i64::from(status))
        .bind(contact)
        .bind(id.as_slice())
        .bind(i64::from(status))
        .execute(&mut *c)
        .await
        .map_err(db("update a message"))?
        .rows_affected();
        if n > 0 {
            changed.push(*id);
        }
    }
    Ok(changed)
}

pub(crate) async fn set_status_by_seq(c: &mut Conn, seq: i64, status: u8) -> Result<(), Error> {
    sqlx::query("UPDATE messages SET status = max(status, ?) WHERE seq = ?")
        .bind(i64::from(status))
        .bind(seq)
        .execute(c)
        .await
        .map_err(db("update a message"))?;
    Ok(())
}

pub(crate) async fn message_by_seq(c: &mut Conn, seq: i64) -> Result<Option<MessageRow>, Error> {
    let row = sqlx::query("SELECT * FROM messages WHERE seq = ?")
        .bind(seq)
        .fetch_optional(c)
        .await
        .map_err(db("find a message"))?;
    row.as_ref()
        .map(message_row)
        .transpose()
        .map_err(db("read a message"))
}

/// Our messages to `contact` that are neither at a relay nor in the outbox.
pub(crate) async fn unsent(c: &mut Conn, contact: i64) -> Result<Vec<MessageRow>, Error> {
    let rows = sqlx::query(
        "SELECT * FROM messages m WHERE contact_id = ? AND outgoing = 1 AND status = 0 \
         AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.msg_seq = m.seq) ORDER BY seq",
    )
    .bind(contact)
    .fetch_all(c)
    .await
    .map_err(db("list unsent messages"))?;
    rows.iter()
        .map(message_row)
        .collect::<Result<_, _>>()
        .map_err(db("read a message"))
}

/// Contacts with unsent messages or unreceipted incoming ones.
pub(crate) async fn contacts_with_work(c: &mut Conn) -> Result<Vec<i64>, Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT contact_id FROM messages m WHERE status = 0 AND (outgoing = 0 OR \
         NOT EXISTS (SELECT 1 FROM outbox o WHERE o.msg_seq = m.seq))",
    )
    .fetch_all(c)
    .await
    .map_err(db("list pending work"))
}

/// Incoming text messages whose delivery receipt is not yet queued.
pub(crate) async fn unreceipted(
    c: &mut Conn,
    contact: i64,
    limit: u32,
) -> Result<Vec<(i64, [u8; 16])>, Error> {
    let rows = sqlx::query(
        "SELECT seq, msg_id FROM messages WHERE contact_id = ? AND outgoing = 0 AND kind = 1 \
         AND status = 0 ORDER BY seq LIMIT ?",
    )
    .bind(contact)
    .bind(i64::from(limit))
    .fetch_all(c)
    .await
    .map_err(db("list receipts to send"))?;
    rows.iter()
        .map(|r| {
            let id: Vec<u8> = r.try_get("msg_id")?;
            Ok((
                r.try_get("seq")?,
                id.as_slice().try_into().unwrap_or([0; 16]),
            ))
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(db("read a message"))
}

pub(crate) async fn history(
    c: &mut Conn,
    contact: i64,
    limit: u32,
) -> Result<Vec<MessageRow>, Error> {
    let mut rows = sqlx::query(
        "SELECT * FROM messages WHERE contact_id = ? AND kind = 1 ORDER BY seq DESC LIMIT ?",
    )
    .bind(contact)
    .bind(i64::from(limit))
    .fetch_all(c)
    .await
    .map_err(db("read history"))?
    .iter()
    .map(message_row)
    .collect::<Result<Vec<_>, _>>()
    .map_err(db("read a message"))?;
    rows.reverse();
    Ok(rows)
}

// --- outbox -------------------------------------------------------------

/// An outbox row.
#[derive(Debug, Clone)]
pub(crate) struct OutboxRow {
    pub id: i64,
    pub relay: String,
    pub packet: Vec<u8>,
}

pub(crate) async fn insert_outbox(
    c: &mut Conn,
    relay: &str,
    packet: &[u8],
    msg_seq: i64,
    now_ms: u64,
) -> Result<i64, Error> {
    sqlx::query_scalar(
        "INSERT INTO outbox (relay, packet, msg_seq, created_ms) VALUES (?, ?, ?, ?) RETURNING id",
    )
    .bind(relay)
    .bind(packet)
    .bind(msg_seq)
    .bind(ms(now_ms))
    .fetch_one(c)
    .await
    .map_err(db("queue a packet"))
}

/// Removes a sent packet; returns the message it carried.
pub(crate) async fn delete_outbox(c: &mut Conn, id: i64) -> Result<Option<i64>, Error> {
    let seq: Option<Option<i64>> =
        sqlx::query_scalar("DELETE FROM outbox WHERE id = ? RETURNING msg_seq")
            .bind(id)
            .fetch_optional(c)
            .await
            .map_err(db("dequeue a packet"))?;
    Ok(seq.flatten())
}

pub(crate) async fn outbox(c: &mut Conn, limit: u32) -> Result<Vec<OutboxRow>, Error> {
    let rows = sqlx::query("SELECT id, relay, packet FROM outbox ORDER BY id LIMIT ?")
        .bind(i64::from(limit))
        .fetch_all(c)
        .await
        .map_err(db("list queued packets"))?;
    rows.iter()
        .map(|r| {
            Ok(OutboxRow {
                id: r.try_get("id")?,
                relay: r.try_get("relay")?,
                packet: r.try_get("packet")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(db("read a queued packet"))
}

pub(crate) async fn count(c: &mut Conn, sql: &'static str) -> Result<u64, Error> {
    let n: i64 = sqlx::query_scalar(sql)
        .fetch_one(c)
        .await
        .map_err(db("count"))?;
    Ok(n.max(0) as u64)
}
