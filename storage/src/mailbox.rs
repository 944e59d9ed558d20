//! Packets queued for destination hashes whose recipients are offline.
//!
//! Each packet is kept until it is delivered (deleted by id), it expires
//! (`mailbox_ttl_ms`, default 30 days), or `mailbox_max_per_dest` newer
//! packets for the same hash push it out (default 500; the oldest goes
//! first and is counted). Pending packets list in arrival order.

use crate::error::{Error, Result};
use crate::writer::{DeleteOp, EnqueueOp, Reply, Row, WriterCtx};
use crate::{Store, ms};
use meshwhisper_crypto::destination::DestHash;
use sqlx::Row as _;
use std::collections::HashMap;
use tokio::sync::oneshot;

/// Most rows in one group insert (4 bound values each, far under SQLite's
/// 32 766 variable limit).
pub(crate) const MAX_ROWS_PER_INSERT: usize = 512;
/// Statement sizes a group is split into, largest first.
const INSERT_CHUNKS: [usize; 8] = [256, 128, 64, 32, 16, 8, 4, 1];

/// The multi-row INSERT for `n` rows (one of [`INSERT_CHUNKS`]).
fn insert_sql(n: usize) -> sqlx::AssertSqlSafe<&'static str> {
    static SQL: std::sync::OnceLock<Vec<(usize, String)>> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| {
        INSERT_CHUNKS
            .iter()
            .map(|&c| {
                let mut s = String::from(
                    "INSERT INTO mailbox (dest, packet, received_ms, expires_ms, route) VALUES ",
                );
                for i in 0..c {
                    if i > 0 {
                        s.push_str(", ");
                    }
                    s.push_str("(?, ?, ?, ?, ?)");
                }
                (c, s)
            })
            .collect()
    });
    let sql = all
        .iter()
        .find(|(c, _)| *c == n)
        .map(|(_, s)| s.as_str())
        .unwrap_or(
            "INSERT INTO mailbox (dest, packet, received_ms, expires_ms, route) VALUES (?, ?, ?, ?, ?)",
        );
    sqlx::AssertSqlSafe(sql)
}
/// Entries in the writer's per-hash count cache before it is reset.
const COUNT_CACHE_MAX: usize = 65_536;

/// Which of the store writer's lanes an enqueue takes. The main lane's
/// groups take everything waiting in it; the bulk lane gives at most
/// 1 MiB a group and is paced relay-wide (`storage.bulk_bytes_per_sec`),
/// so what waits there cannot hold up the main lane. Packets of one caller
/// in different lanes may commit out of order: a caller that moves from
/// bulk back to main should wait until its bulk enqueues are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lane {
    /// The default.
    #[default]
    Main,
    /// For a client storing much for recipients who are away.
    Bulk,
}

/// The id of a queued packet; ids grow in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MailboxId(pub i64);

/// What an enqueue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The new packet's id.
    pub id: MailboxId,
    /// Older packets for the same hash dropped to stay within the cap.
    pub evicted: u32,
    /// A federated packet already stored here under its id: nothing was
    /// stored now (and `id` is 0).
    pub duplicate: bool,
}

/// A packet another relay forwards, to store once under its federated id.
#[derive(Debug, Clone)]
pub struct Federated {
    /// Its destination.
    pub dest: DestHash,
    /// The packet.
    pub packet: bytes::Bytes,
    /// The id the sending relay gave it.
    pub id: crate::fed_seen::FedId,
    /// Until when the id is remembered (the sender may resend until then).
    pub remember_until_ms: u64,
    /// Its recipient is connected here: hold it unlogged until it is
    /// delivered (see [`Mailbox::enqueue_federated`]).
    pub unlogged: bool,
}

/// Resolves when the unlogged packets of a federated enqueue are logged or
/// delivered.
#[derive(Debug)]
pub struct Settled(oneshot::Receiver<()>);

impl Settled {
    /// Whether they were (`false`: the store failed or closed first; the
    /// packets may be gone, so do not acknowledge them).
    pub async fn wait(self) -> bool {
        self.await
    }
}

impl std::future::Future for Settled {
    type Output = bool;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<bool> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| r.is_ok())
    }
}

/// A queued packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPacket {
    /// Its id.
    pub id: MailboxId,
    /// Its destination hash.
    pub dest: DestHash,
    /// The packet bytes, exactly as received.
    pub packet: Vec<u8>,
    /// When it arrived, unix ms.
    pub received_ms: u64,
    /// When it expires, unix ms.
    pub expires_ms: u64,
    /// The home relay its sender named, if any.
    pub route: Option<[u8; 32]>,
}

/// Per-hash packet counts, kept by the writer (the only one who changes
/// them) so enforcing the cap costs no query per insert.
#[derive(Debug, Default)]
pub(crate) struct MailboxCounts {
    counts: HashMap<[u8; 8], u32>,
}

impl MailboxCounts {
    pub(crate) fn clear(&mut self) {
        self.counts.clear();
    }

    /// One packet for `dest` is gone (the writer is the only writer, so
    /// the count stays exact).
    fn decrement(&mut self, dest: &[u8; 8]) {
        if let Some(c) = self.counts.get_mut(dest) {
            *c = c.saturating_sub(1);
        }
    }
}

/// Inserts a group of enqueues in one statement and enforces the per-hash
/// cap. Runs inside the writer's transaction.
/// Makes sure every hash of `ops` has a known count (SQLite's rows plus
/// hot ones).
async fn ensure_counts(ctx: &mut WriterCtx, ops: &[&Row]) -> Result<()> {
    if ctx.counts.counts.len() > COUNT_CACHE_MAX {
        ctx.counts.clear();
    }
    for op in ops {
        if !ctx.counts.counts.contains_key(&op.dest) {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM mailbox WHERE dest = ?")
                .bind(op.dest.as_slice())
                .fetch_one(&mut ctx.conn)
                .await
                .map_err(|e| ctx.db_err("count mailbox", e))?;
            let hot = ctx.hot.as_ref().map_or(0, |h| h.count_for(&op.dest));
            ctx.counts.counts.insert(
                op.dest,
                u32::try_from(n).unwrap_or(u32::MAX).saturating_add(hot),
            );
        }
    }
    Ok(())
}

/// Which federated rows of `ops` were stored here already (or repeat an
/// earlier row of the same group).
async fn duplicates(ctx: &mut WriterCtx, ops: &[&Row]) -> Result<Vec<bool>> {
    let mut out = Vec::with_capacity(ops.len());
    let mut in_group = std::collections::HashSet::new();
    for op in ops {
        let dup = match &op.fed {
            Some((id, _)) => {
                !in_group.insert(*id) || ctx.seen.contains(&mut ctx.conn, &ctx.path, id).await?
            }
            None => false,
        };
        out.push(dup);
    }
    Ok(out)
}

/// Runs `insert` on the rows of `ops` that are not duplicates and puts
/// duplicate markers back in place.
fn merge_duplicates(dups: &[bool], stored: Vec<Enqueued>) -> Vec<Enqueued> {
    let mut stored = stored.into_iter();
    dups.iter()
        .map(|d| {
            if *d {
                Enqueued {
                    id: MailboxId(0),
                    evicted: 0,
                    duplicate: true,
                }
            } else {
                stored.next().unwrap_or(Enqueued {
                    id: MailboxId(0),
                    evicted: 0,
                    duplicate: true,
                })
            }
        })
        .collect()
}

pub(crate) async fn insert_group(ctx: &mut WriterCtx, all: &[&Row]) -> Result<Vec<Enqueued>> {
    let dups = duplicates(ctx, all).await?;
    let ops: Vec<&Row> = all
        .iter()
        .zip(&dups)
        .filter(|(_, d)| !**d)
        .map(|(r, _)| *r)
        .collect();
    let ops = ops.as_slice();
    for op in ops {
        if let Some((id, until)) = op.fed {
            ctx.seen.insert(&mut ctx.conn, &ctx.path, id, until).await?;
        }
    }
    let stored = insert_plain(ctx, ops).await?;
    Ok(merge_duplicates(&dups, stored))
}

async fn insert_plain(ctx: &mut WriterCtx, ops: &[&Row]) -> Result<Vec<Enqueued>> {
    ensure_counts(ctx, ops).await?;
    // Insert in chunks of fixed sizes so each statement shape is prepared
    // once and then served from the statement cache.
    let mut ids: Vec<i64> = Vec::with_capacity(ops.len());
    let mut rest = ops;
    while !rest.is_empty() {
        let n = INSERT_CHUNKS
            .iter()
            .copied()
            .find(|&c| c <= rest.len())
            .unwrap_or(1);
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let mut q = sqlx::query(insert_sql(n));
        for op in chunk {
            q = q
                .bind(op.dest.as_slice())
                .bind(op.packet.as_ref())
                .bind(ms(op.received_ms))
                .bind(ms(op.expires_ms))
                .bind(op.route.map(|r| r.to_vec()));
        }
        let done = q
            .execute(&mut ctx.conn)
            .await
            .map_err(|e| ctx.db_err("enqueue", e))?;
        if done.rows_affected() != n as u64 {
            return Err(Error::Invalid {
                what: "enqueue",
                why: "database inserted a different number of rows",
            });
        }
        // The writer is the only writer and ids are AUTOINCREMENT, so the
        // rows of one statement got consecutive ids ending at the last one.
        let last = done.last_insert_rowid();
        ids.extend((last - n as i64 + 1)..=last);
    }

    let mut results: Vec<Enqueued> = ids
        .iter()
        .map(|&id| Enqueued {
            id: MailboxId(id),
            evicted: 0,
            duplicate: false,
        })
        .collect();
    // Count per hash and evict the oldest beyond the cap; the eviction is
    // reported on the last packet of that hash in this group.
    let cap = ctx.mailbox_max_per_dest;
    let mut last_of: HashMap<[u8; 8], usize> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        if let Some(c) = ctx.counts.counts.get_mut(&op.dest) {
            *c = c.saturating_add(1);
        }
        last_of.insert(op.dest, i);
    }
    for (dest, i) in last_of {
        let count = ctx.counts.counts.get(&dest).copied().unwrap_or(0);
        if count > cap {
            let excess = count - cap;
            let deleted = sqlx::query(
                "DELETE FROM mailbox WHERE id IN \
                 (SELECT id FROM mailbox WHERE dest = ? ORDER BY id LIMIT ?)",
            )
            .bind(dest.as_slice())
            .bind(i64::from(excess))
            .execute(&mut ctx.conn)
            .await
            .map_err(|e| ctx.db_err("evict oldest", e))?
            .rows_affected();
            let deleted = u32::try_from(deleted).unwrap_or(u32::MAX);
            ctx.counts
                .counts
                .insert(dest, count.saturating_sub(deleted));
            results[i].evicted = deleted;
        }
    }
    Ok(results)
}

/// Like [`insert_group`], into the hot tier (see [`crate::hot`]): ids from
/// the tier's counter, the per-hash cap over both tiers (the oldest go
/// first, and SQLite's rows are always older than hot ones).
pub(crate) async fn hot_insert_group(ctx: &mut WriterCtx, all: &[&Row]) -> Result<Vec<Enqueued>> {
    let dups = duplicates(ctx, all).await?;
    let ops: Vec<&Row> = all
        .iter()
        .zip(&dups)
        .filter(|(_, d)| !**d)
        .map(|(r, _)| *r)
        .collect();
    let stored = hot_insert_plain(ctx, &ops).await?;
    // A duplicate of a packet still held unlogged is answered as stored
    // once this group commits: so the packet is logged by this group.
    for (row, _) in all.iter().zip(&dups).filter(|(_, d)| **d) {
        if let Some((fid, _)) = row.fed
            && ctx.seen.is_claimed(&fid)
            && let Some(hot) = ctx.hot.as_mut()
            && let Some(id) = hot.unlogged_of(&fid)
        {
            let mut fed = Vec::new();
            hot.log_due(Some(id), &mut fed);
            ctx.seen.confirm(&fed);
        }
    }
    Ok(merge_duplicates(&dups, stored))
}

async fn hot_insert_plain(ctx: &mut WriterCtx, ops: &[&Row]) -> Result<Vec<Enqueued>> {
    ensure_counts(ctx, ops).await?;
    let mut results = Vec::with_capacity(ops.len());
    let cap = ctx.mailbox_max_per_dest;
    for op in ops {
        let Some(hot) = ctx.hot.as_mut() else {
            return Err(Error::Closed);
        };
        let row = crate::hot::HotRow {
            dest: op.dest,
            packet: op.packet.clone(),
            received_ms: op.received_ms,
            expires_ms: op.expires_ms,
            route: op.route,
            at: Some(std::time::Instant::now()),
        };
        let id = match &op.unlogged {
            Some(settle) => {
                let id = hot.add_unlogged(row, op.fed, settle);
                if let Some((fid, until)) = op.fed {
                    ctx.seen.claim(fid, until);
                }
                id
            }
            None => {
                let id = hot.add(row, op.fed);
                if let Some((fid, until)) = op.fed {
                    ctx.seen.record(fid, until);
                }
                id
            }
        };
        let Some(hot) = ctx.hot.as_mut() else {
            return Err(Error::Closed);
        };
        let count = ctx.counts.counts.entry(op.dest).or_insert(0);
        *count = count.saturating_add(1);
        let mut evicted = 0u32;
        if *count > cap {
            let mut excess = *count - cap;
            let hot_n = hot.count_for(&op.dest);
            let in_sqlite = (*count).saturating_sub(hot_n);
            if in_sqlite > 0 {
                let n = sqlx::query(
                    "DELETE FROM mailbox WHERE id IN \
                     (SELECT id FROM mailbox WHERE dest = ? ORDER BY id LIMIT ?)",
                )
                .bind(op.dest.as_slice())
                .bind(i64::from(excess.min(in_sqlite)))
                .execute(&mut ctx.conn)
                .await
                .map_err(|e| ctx.db_err("evict oldest", e))?
                .rows_affected();
                let n = u32::try_from(n).unwrap_or(u32::MAX);
                excess = excess.saturating_sub(n);
                evicted += n;
            }
            let Some(hot) = ctx.hot.as_mut() else {
                return Err(Error::Closed);
            };
            let mut fed = Vec::new();
            while excess > 0 {
                let Some(old) = hot.oldest_of(&op.dest) else {
                    break;
                };
                hot.remove(old, &mut fed);
                excess -= 1;
                evicted += 1;
            }
            ctx.seen.confirm(&fed);
            if let Some(c) = ctx.counts.counts.get_mut(&op.dest) {
                *c = c.saturating_sub(evicted);
            }
        }
        results.push(Enqueued {
            id: MailboxId(id),
            evicted,
            duplicate: false,
        });
    }
    Ok(results)
}

/// Removes the hot ones of `ids`; returns those and the ids left for SQLite.
pub(crate) fn hot_delete(
    ctx: &mut WriterCtx,
    ids: &[i64],
) -> (std::collections::HashSet<i64>, Vec<i64>) {
    let mut gone = std::collections::HashSet::new();
    let mut rest = Vec::new();
    let Some(hot) = ctx.hot.as_mut() else {
        return (gone, ids.to_vec());
    };
    let mut fed = Vec::new();
    for id in ids {
        match hot.remove(*id, &mut fed) {
            Some(dest) => {
                ctx.counts.decrement(&dest);
                gone.insert(*id);
            }
            None => rest.push(*id),
        }
    }
    ctx.seen.confirm(&fed);
    (gone, rest)
}

/// Moves every hot packet into SQLite (same ids) inside the writer's
/// transaction; the tier drops them once the transaction commits.
pub(crate) async fn spill(ctx: &mut WriterCtx) -> Result<()> {
    let Some(hot) = ctx.hot.as_mut() else {
        return Ok(());
    };
    let rows = hot.take_for_spill();
    let high = hot.next_id.saturating_sub(1);
    insert_with_ids(&mut ctx.conn, &ctx.path, &rows).await?;
    // Federated ids recorded since the last spill go into their table
    // with it (the rewritten log no longer holds them).
    ctx.seen.spill(&mut ctx.conn, &ctx.path).await?;
    ctx.seen_spilled = true;
    // Ids handed out to packets delivered while hot never reach the table;
    // record the high-water mark so a restart never hands them out again
    // (a stale acknowledgement must not delete a newer packet).
    sqlx::query(
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'mailbox', ? \
         WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'mailbox')",
    )
    .bind(high)
    .execute(&mut ctx.conn)
    .await
    .map_err(|e| ctx.db_err("record the last packet id", e))?;
    sqlx::query("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'mailbox'")
        .bind(high)
        .execute(&mut ctx.conn)
        .await
        .map_err(|e| ctx.db_err("record the last packet id", e))?;
    Ok(())
}

/// Packet bytes bound in one spill statement.
const INSERT_BYTES: usize = 4 * 1024 * 1024;

/// `INSERT OR IGNORE` of rows with their ids (spills and crash recovery).
pub(crate) async fn insert_with_ids(
    conn: &mut sqlx::SqliteConnection,
    path: &std::path::Path,
    rows: &[(i64, crate::hot::HotRow)],
) -> Result<()> {
    // At most 128 rows and about INSERT_BYTES of packets per statement:
    // SQLite copies bound blobs, so a spill of large packets holds only one
    // statement's worth of copies at a time.
    let mut rest = rows;
    while !rest.is_empty() {
        let mut n = 0;
        let mut bytes = 0;
        while n < rest.len()
            && n < 128
            && (n == 0 || bytes + rest[n].1.packet.len() <= INSERT_BYTES)
        {
            bytes += rest[n].1.packet.len();
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT OR IGNORE INTO mailbox (id, dest, packet, received_ms, expires_ms, route) ",
        );
        qb.push_values(chunk, |mut b, (id, r)| {
            b.push_bind(*id)
                .push_bind(r.dest.to_vec())
                .push_bind(r.packet.as_ref())
                .push_bind(ms(r.received_ms))
                .push_bind(ms(r.expires_ms))
                .push_bind(r.route.map(|x| x.to_vec()));
        });
        qb.build()
            .execute(&mut *conn)
            .await
            .map_err(|e| Error::db("spill hot packets", path, e))?;
    }
    Ok(())
}

/// Deletes `ids` (any that exist) inside the writer's transaction and
/// returns the ids that were deleted.
pub(crate) async fn delete_group(
    ctx: &mut WriterCtx,
    ids: &[i64],
) -> Result<std::collections::HashSet<i64>> {
    let mut gone = std::collections::HashSet::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new("DELETE FROM mailbox WHERE id IN (");
        let mut sep = qb.separated(", ");
        for id in chunk {
            sep.push_bind(*id);
        }
        qb.push(") RETURNING id, dest");
        let rows = qb
            .build()
            .fetch_all(&mut ctx.conn)
            .await
            .map_err(|e| ctx.db_err("delete delivered", e))?;
        for r in rows {
            let id: i64 = r.try_get(0).map_err(|e| ctx.db_err("delete", e))?;
            let dest: Vec<u8> = r.try_get(1).map_err(|e| ctx.db_err("delete", e))?;
            if let Ok(d) = <[u8; 8]>::try_from(dest.as_slice()) {
                ctx.counts.decrement(&d);
            }
            gone.insert(id);
        }
    }
    Ok(gone)
}

fn row_to_packet(r: &sqlx::sqlite::SqliteRow) -> Result<StoredPacket, sqlx::Error> {
    let dest: Vec<u8> = r.try_get("dest")?;
    let mut d = [0u8; 8];
    if dest.len() == 8 {
        d.copy_from_slice(&dest);
    }
    Ok(StoredPacket {
        id: MailboxId(r.try_get("id")?),
        dest: DestHash(d),
        packet: r.try_get("packet")?,
        received_ms: r.try_get::<i64, _>("received_ms")?.max(0) as u64,
        expires_ms: r.try_get::<i64, _>("expires_ms")?.max(0) as u64,
        route: r
            .try_get::<Option<Vec<u8>>, _>("route")
            .ok()
            .flatten()
            .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok()),
    })
}

/// The mailbox API of a [`Store`].
#[derive(Debug, Clone, Copy)]
pub struct Mailbox<'a> {
    pub(crate) store: &'a Store,
}

impl Mailbox<'_> {
    /// Queues `packet` for `dest`. When this returns `Ok`, the packet is
    /// committed (see the crate's durability contract).
    pub async fn enqueue(&self, dest: DestHash, packet: Vec<u8>, now_ms: u64) -> Result<Enqueued> {
        self.store.check_space()?;
        let row = self.row(dest, packet, now_ms)?;
        let (reply, rx) = oneshot::channel();
        self.store
            .writer()
            .enqueue(EnqueueOp {
                rows: vec![row],
                reply: Reply::One(reply),
                settle: None,
                bulk: false,
            })
            .await?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Queues several packets with one reply, in order: cheaper than one
    /// [`Mailbox::enqueue`] each. All are committed when this returns `Ok`;
    /// if any is invalid, none is queued.
    pub async fn enqueue_many(
        &self,
        packets: Vec<(DestHash, Vec<u8>)>,
        now_ms: u64,
    ) -> Result<Vec<Enqueued>> {
        if packets.is_empty() {
            return Ok(Vec::new());
        }
        self.store.check_space()?;
        let rows = packets
            .into_iter()
            .map(|(d, p)| self.row(d, p, now_ms))
            .collect::<Result<Vec<_>>>()?;
        self.enqueue_rows(Lane::Main, rows, None).await
    }

    /// Queues packets with the home relay each one's sender named (kept
    /// with the packet, so a restart still routes it there), in `lane`.
    pub async fn enqueue_routed(
        &self,
        packets: Vec<(DestHash, bytes::Bytes, Option<[u8; 32]>)>,
        now_ms: u64,
        lane: Lane,
    ) -> Result<Vec<Enqueued>> {
        self.enqueue_rows(
            lane,
            packets
                .into_iter()
                .map(|(d, p, route)| {
                    let mut r = self.row(d, p, now_ms)?;
                    r.route = route;
                    Ok(r)
                })
                .collect::<Result<Vec<_>>>()?,
            None,
        )
        .await
    }

    /// Stores packets forwarded by other relays, each once under its
    /// federated id: a packet whose id was stored before (and not
    /// forgotten) is not stored again and comes back `duplicate`.
    ///
    /// Packets marked [`Federated::unlogged`] are held in memory until
    /// they are delivered (deleted) or a short while passes, and written
    /// only then if at all; the returned [`Settled`] resolves once every
    /// one of them is logged or delivered. Acknowledge them to their
    /// sender only then: until that, the sender's copy is the only one.
    pub async fn enqueue_federated(
        &self,
        packets: Vec<Federated>,
        now_ms: u64,
    ) -> Result<(Vec<Enqueued>, Settled)> {
        let (tx, settled) = oneshot::channel();
        let settle = crate::hot::Settle::new(tx);
        let rows = packets
            .into_iter()
            .map(|f| {
                let mut r = self.row(f.dest, f.packet, now_ms)?;
                r.fed = Some((f.id, f.remember_until_ms));
                r.unlogged = f.unlogged.then(|| settle.clone());
                Ok(r)
            })
            .collect::<Result<Vec<_>>>()?;
        let enqueued = self.enqueue_rows(Lane::Main, rows, Some(settle)).await?;
        Ok((enqueued, Settled(settled)))
    }

    /// Queues `rows` in one operation; `settle` hears when it committed
    /// and its unlogged rows were logged or delivered.
    async fn enqueue_rows(
        &self,
        lane: Lane,
        rows: Vec<Row>,
        settle: Option<std::sync::Arc<crate::hot::Settle>>,
    ) -> Result<Vec<Enqueued>> {
        if rows.is_empty() {
            if let Some(s) = settle {
                s.done();
            }
            return Ok(Vec::new());
        }
        self.store.check_space()?;
        let (reply, rx) = oneshot::channel();
        self.store
            .writer()
            .enqueue(EnqueueOp {
                rows,
                reply: Reply::Many(reply),
                settle,
                bulk: lane == Lane::Bulk,
            })
            .await?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Forgets federated ids whose senders have the acknowledgement.
    pub async fn forget_federated(&self, ids: Vec<crate::fed_seen::FedId>) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let (reply, rx) = oneshot::channel();
        self.store
            .writer()
            .forget(crate::writer::ForgetOp { ids, reply })
            .await?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Drops federated ids remembered past their time (at most `max`).
    pub async fn expire_federated(&self, now_ms: u64, max: u32) -> Result<u64> {
        self.store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    crate::fed_seen::expire(&mut ctx.conn, &ctx.path, now_ms, max).await
                })
            }))
            .await
    }

    fn row(&self, dest: DestHash, packet: impl Into<bytes::Bytes>, now_ms: u64) -> Result<Row> {
        let packet = packet.into();
        let cfg = self.store.config();
        if packet.len() > cfg.max_packet_bytes {
            return Err(Error::TooLarge {
                what: "packet (max_packet_bytes)",
                got: packet.len() as u64,
                max: cfg.max_packet_bytes as u64,
            });
        }
        Ok(Row {
            dest: dest.0,
            packet,
            received_ms: now_ms,
            expires_ms: now_ms.saturating_add(cfg.mailbox_ttl_ms),
            route: None,
            fed: None,
            unlogged: None,
        })
    }

    /// Up to `limit` unexpired packets for `dests`, oldest first.
    pub async fn pending(
        &self,
        dests: &[DestHash],
        now_ms: u64,
        limit: u32,
    ) -> Result<Vec<StoredPacket>> {
        self.pending_within(dests, MailboxId(0), now_ms, limit, usize::MAX, &|_| false)
            .await
    }

    /// SQLite's share of a page: ids and sizes of unexpired packets for
    /// `dests` above `after`, and the bound up to which the list is
    /// complete (`None`: everything). Each hash with anything stored
    /// (found by one index probe each) gives its first few ids as one
    /// range of the `(dest, id)` index, with no sort; the smallest last id
    /// of a hash that may have more bounds the page. A page costs about
    /// `limit` rows and a probe per hash, whatever the queue's length.
    async fn cold_ids(
        &self,
        dests: &[DestHash],
        after: i64,
        now_ms: u64,
        limit: u32,
        skip: &(dyn Fn(MailboxId) -> bool + Sync),
    ) -> Result<(Vec<(i64, usize)>, Option<i64>)> {
        let mut stored: Vec<Vec<u8>> = Vec::new();
        for chunk in dests.chunks(500) {
            let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new("WITH w(d) AS (VALUES ");
            let mut sep = qb.separated(", ");
            for d in chunk {
                sep.push("(");
                sep.push_bind_unseparated(d.0.to_vec());
                sep.push_unseparated(")");
            }
            qb.push(
                ") SELECT d FROM w WHERE EXISTS (SELECT 1 FROM mailbox WHERE dest = w.d AND id > ",
            );
            qb.push_bind(after).push(")");
            let rows: Vec<Vec<u8>> = qb
                .build_query_scalar()
                .fetch_all(self.store.readers())
                .await
                .map_err(|e| self.store.db_err("list pending", e))?;
            stored.extend(rows);
        }
        if stored.is_empty() {
            return Ok((Vec::new(), None));
        }
        // Enough from each that the page is full if they interleave.
        let each = (limit as usize).div_ceil(stored.len()).max(8);
        let mut out = Vec::new();
        let mut bound: Option<i64> = None;
        for d in &stored {
            let rows = sqlx::query(
                "SELECT id, length(packet) AS len FROM mailbox \
                 WHERE dest = ? AND id > ? AND expires_ms > ? ORDER BY id LIMIT ?",
            )
            .bind(d.as_slice())
            .bind(after)
            .bind(ms(now_ms))
            .bind(each as i64)
            .fetch_all(self.store.readers())
            .await
            .map_err(|e| self.store.db_err("list pending", e))?;
            let mut last = None;
            for r in &rows {
                let id: i64 = r
                    .try_get("id")
                    .map_err(|e| self.store.db_err("read pending", e))?;
                last = Some(id);
                if skip(MailboxId(id)) {
                    continue;
                }
                let len: i64 = r
                    .try_get("len")
                    .map_err(|e| self.store.db_err("read pending", e))?;
                out.push((id, len.max(0) as usize));
            }
            if rows.len() == each
                && let Some(last) = last
            {
                bound = Some(bound.map_or(last, |b: i64| b.min(last)));
            }
        }
        Ok((out, bound))
    }

    /// Up to `limit` unexpired packets for `dests` with ids above `after`,
    /// oldest first, that `skip` does not exclude (ids already in flight to
    /// the client), and no more than `max_bytes` of them (always at least
    /// one packet if there is one). Sizes are read first and only the
    /// chosen packets' bytes are loaded, so a drain's memory is bounded
    /// whatever is stored.
    ///
    /// A drain passes the last id of its previous page as `after`, so that
    /// each page reads only what follows (a drain of a long queue is then
    /// linear, not quadratic). That misses nothing: ids are given in
    /// increasing order, and the hot tier is read before SQLite, so a
    /// packet a spill moves between the two reads is seen in one of them.
    pub async fn pending_within(
        &self,
        dests: &[DestHash],
        after: MailboxId,
        now_ms: u64,
        limit: u32,
        max_bytes: usize,
        skip: &(dyn Fn(MailboxId) -> bool + Sync),
    ) -> Result<Vec<StoredPacket>> {
        // Ids and sizes: the hot tier, then SQLite (this order: see above).
        // Everything listed is at most `bound` (the page is a prefix of
        // the queue after `after`); a page whose every id is in flight
        // moves on past them.
        let mut after = after.0;
        let meta = loop {
            let mut meta: Vec<(i64, usize)> = Vec::new();
            if let Some(hot) = self.store.hot_rows() {
                let rows = match hot.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                meta.extend(
                    rows.pending_ids(dests, after, now_ms, limit as usize, &|id| {
                        skip(MailboxId(id))
                    }),
                );
            }
            let (cold, bound) = self.cold_ids(dests, after, now_ms, limit, skip).await?;
            meta.extend(cold);
            if let Some(b) = bound {
                meta.retain(|(id, _)| *id <= b);
            }
            meta.sort_unstable_by_key(|(id, _)| *id);
            meta.dedup_by_key(|(id, _)| *id);
            match bound {
                Some(b) if meta.is_empty() => after = b,
                _ => break meta,
            }
        };
        let mut chosen = Vec::new();
        let mut bytes = 0usize;
        for (id, len) in meta {
            if chosen.len() >= limit as usize
                || (!chosen.is_empty() && bytes.saturating_add(len) > max_bytes)
            {
                break;
            }
            bytes = bytes.saturating_add(len);
            chosen.push(id);
        }
        // Bodies: from the hot tier where still there, else from SQLite (a
        // spill may have moved them); deleted ones are gone.
        let mut out = Vec::with_capacity(chosen.len());
        let mut cold = Vec::new();
        match self.store.hot_rows() {
            Some(hot) => {
                let rows = match hot.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                for id in &chosen {
                    match rows.get(*id) {
                        Some(p) => out.push(p),
                        None => cold.push(*id),
                    }
                }
            }
            None => cold = chosen,
        }
        for ids in cold.chunks(500) {
            let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "SELECT id, dest, packet, received_ms, expires_ms, route FROM mailbox WHERE id IN (",
            );
            let mut sep = qb.separated(", ");
            for id in ids {
                sep.push_bind(*id);
            }
            qb.push(")");
            let rows = qb
                .build()
                .fetch_all(self.store.readers())
                .await
                .map_err(|e| self.store.db_err("read pending", e))?;
            for r in &rows {
                out.push(row_to_packet(r).map_err(|e| self.store.db_err("read pending", e))?);
            }
        }
        out.sort_by_key(|p| p.id);
        Ok(out)
    }

    /// Up to `limit` unexpired packets with ids above `after`, in id order,
    /// from both tiers (a packet moving from the hot tier to SQLite during
    /// the call is listed once).
    pub async fn page_stored(
        &self,
        after: MailboxId,
        now_ms: u64,
        limit: u32,
    ) -> Result<Vec<StoredPacket>> {
        let rows = sqlx::query(
            "SELECT id, dest, packet, received_ms, expires_ms, route FROM mailbox \
             WHERE id > ? AND expires_ms > ? ORDER BY id LIMIT ?",
        )
        .bind(after.0)
        .bind(ms(now_ms))
        .bind(i64::from(limit))
        .fetch_all(self.store.readers())
        .await
        .map_err(|e| self.store.db_err("page stored packets", e))?;
        let mut out = rows
            .iter()
            .map(|r| row_to_packet(r).map_err(|e| self.store.db_err("read stored packet", e)))
            .collect::<Result<Vec<_>>>()?;
        if let Some(hot) = self.store.hot_rows() {
            let rows = match hot.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            out.extend(rows.page(after.0, now_ms, limit as usize));
        }
        out.sort_by_key(|p| p.id);
        out.dedup_by_key(|p| p.id);
        out.truncate(limit as usize);
        Ok(out)
    }

    /// Deletes delivered packets; returns how many existed. Deletions from
    /// many callers are merged into one statement per commit.
    pub async fn delete(&self, ids: Vec<MailboxId>) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let (reply, rx) = oneshot::channel();
        self.store
            .writer()
            .delete(DeleteOp {
                ids: ids.into_iter().map(|i| i.0).collect(),
                reply,
            })
            .await?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Deletes up to `max_rows` packets that expired at `now_ms`.
    pub async fn expire(&self, now_ms: u64, max_rows: u32) -> Result<u64> {
        self.store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    let mut hot_expired = 0u64;
                    if let Some(hot) = ctx.hot.as_mut() {
                        let mut fed = Vec::new();
                        for (id, dest) in hot.expired(now_ms, max_rows as usize) {
                            hot.remove(id, &mut fed);
                            ctx.counts.decrement(&dest);
                            hot_expired += 1;
                        }
                        ctx.seen.confirm(&fed);
                    }
                    // Packets expire in arrival order (one TTL for all), so
                    // look only at the oldest rows: bounded work per call.
                    let rows = sqlx::query(
                        "DELETE FROM mailbox WHERE id IN (SELECT id FROM \
                         (SELECT id, expires_ms FROM mailbox ORDER BY id LIMIT ?) \
                         WHERE expires_ms <= ?) RETURNING dest",
                    )
                    .bind(i64::from(max_rows))
                    .bind(ms(now_ms))
                    .fetch_all(&mut ctx.conn)
                    .await
                    .map_err(|e| ctx.db_err("expire mailbox", e))?;
                    for r in &rows {
                        let dest: Vec<u8> = r.try_get(0).map_err(|e| ctx.db_err("expire", e))?;
                        if let Ok(d) = <[u8; 8]>::try_from(dest.as_slice()) {
                            ctx.counts.decrement(&d);
                        }
                    }
                    Ok(rows.len() as u64 + hot_expired)
                })
            }))
            .await
    }

    fn hot_count(&self, dest: Option<&[u8; 8]>) -> u64 {
        let Some(hot) = self.store.hot_rows() else {
            return 0;
        };
        let rows = match hot.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match dest {
            Some(d) => u64::from(rows.count_for(d)),
            None => rows.count(),
        }
    }

    /// Packets queued in total.
    pub async fn count(&self) -> Result<u64> {
        Ok(self.store.count("SELECT COUNT(*) FROM mailbox").await? + self.hot_count(None))
    }

    /// Packets queued for one hash.
    pub async fn count_for(&self, dest: DestHash) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM mailbox WHERE dest = ?")
            .bind(dest.0.as_slice())
            .fetch_one(self.store.readers())
            .await
            .map_err(|e| self.store.db_err("count mailbox", e))?;
        Ok(n.max(0) as u64 + self.hot_count(Some(&dest.0)))
    }

    /// Packets dropped to enforce the per-hash cap since the store opened.
    pub fn evicted_total(&self) -> u64 {
        self.store
            .inner_stats()
            .evicted
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}
