//! Signed relay address records, newest per relay (last writer wins by
//! timestamp, as [`AddressRecord::supersedes`] decides), capped at
//! `address_book_max`, listed in key order for anti-entropy.
//!
//! When the book is full, a new relay may only displace an **unproven**
//! one: a relay is proven once we were connected to it within
//! [`PROVEN_CONNECTED_MS`], or its record has been in the book for
//! [`PROVEN_PRESENT_MS`]. Anyone can mint valid records for fresh keys, but
//! a flood of them only displaces other fresh records, never the relays
//! the mesh runs on.
//!
//! Only verified records exist as [`AddressRecord`] values, so only
//! verified records are stored; freshness against the clock is the
//! caller's check ([`AddressRecord::check_fresh`]).

use crate::error::{Error, Result};
use crate::{Store, ms};
use meshwhisper_crypto::address_record::AddressRecord;
use sqlx::Row as _;

/// A relay connected to within this long is proven.
pub const PROVEN_CONNECTED_MS: u64 = 7 * 24 * 3_600_000;
/// A relay whose record has been here this long is proven.
pub const PROVEN_PRESENT_MS: u64 = 24 * 3_600_000;

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    /// A relay not known before.
    Inserted,
    /// A newer record replaced the stored one.
    Replaced,
    /// The stored record is as new or newer: nothing changed.
    Unchanged,
}

/// The address book API of a [`Store`].
#[derive(Debug, Clone, Copy)]
pub struct AddressBook<'a> {
    pub(crate) store: &'a Store,
}

fn decode_row(bytes: &[u8]) -> Option<AddressRecord> {
    AddressRecord::decode(bytes).ok()
}

impl AddressBook<'_> {
    /// Stores `record` if it is newer than what is stored for its relay.
    /// When the book is full, a new relay's record displaces the unproven
    /// record with the oldest timestamp if it is newer than that one, and
    /// is refused with [`Error::BookFull`] otherwise.
    pub async fn upsert(&self, record: &AddressRecord, now_ms: u64) -> Result<Upsert> {
        self.upsert_inner(record, now_ms, false).await
    }

    /// Stores this relay's own record: never refused for room and never
    /// displaced (it may take the book one over its cap).
    pub async fn upsert_own(&self, record: &AddressRecord, now_ms: u64) -> Result<Upsert> {
        self.upsert_inner(record, now_ms, true).await
    }

    async fn upsert_inner(&self, record: &AddressRecord, now_ms: u64, own: bool) -> Result<Upsert> {
        let max = i64::from(self.store.config().address_book_max.max(1));
        let record = record.clone();
        self.store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move { upsert_in(ctx, &record, now_ms, own, max).await })
            }))
            .await
    }

    /// [`AddressBook::upsert`] of several records in one transaction; the
    /// outcome of each, in order (a full book refuses some, not all).
    pub async fn upsert_many(
        &self,
        records: Vec<AddressRecord>,
        now_ms: u64,
    ) -> Result<Vec<Result<Upsert>>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let max = i64::from(self.store.config().address_book_max.max(1));
        self.store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    let mut out = Vec::with_capacity(records.len());
                    for r in &records {
                        match upsert_in(ctx, r, now_ms, false, max).await {
                            Err(e @ Error::BookFull { .. }) => out.push(Err(e)),
                            other => out.push(Ok(other?)),
                        }
                    }
                    Ok(out)
                })
            }))
            .await
    }

    /// Notes that we are connected to these relays (their records are
    /// proven), in one transaction.
    pub async fn mark_connected(&self, relay_keys: Vec<[u8; 32]>, now_ms: u64) -> Result<()> {
        if relay_keys.is_empty() {
            return Ok(());
        }
        self.store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    for key in &relay_keys {
                        sqlx::query(
                            "UPDATE address_book SET connected_ms = max(connected_ms, ?) WHERE relay_key = ?",
                        )
                        .bind(ms(now_ms))
                        .bind(key.as_slice())
                        .execute(&mut ctx.conn)
                        .await
                        .map_err(|e| ctx.db_err("mark a relay connected", e))?;
                    }
                    Ok(())
                })
            }))
            .await
    }

    /// The stored record of a relay.
    pub async fn get(&self, relay_key: &[u8; 32]) -> Result<Option<AddressRecord>> {
        let bytes: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT record FROM address_book WHERE relay_key = ?")
                .bind(relay_key.as_slice())
                .fetch_optional(self.store.readers())
                .await
                .map_err(|e| self.store.db_err("read address record", e))?;
        Ok(bytes.as_deref().and_then(decode_row))
    }

    /// Up to `limit` records with keys greater than `after`, in key order.
    pub async fn page(&self, after: Option<[u8; 32]>, limit: u32) -> Result<Vec<AddressRecord>> {
        let rows: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT record FROM address_book WHERE relay_key > ? ORDER BY relay_key LIMIT ?",
        )
        .bind(after.map(|a| a.to_vec()).unwrap_or_default())
        .bind(i64::from(limit))
        .fetch_all(self.store.readers())
        .await
        .map_err(|e| self.store.db_err("page address book", e))?;
        Ok(rows.iter().filter_map(|b| decode_row(b)).collect())
    }

    /// Like [`AddressBook::page`] but only `(key, timestamp)` pairs: the
    /// digest anti-entropy compares before pulling records.
    pub async fn digest(
        &self,
        after: Option<[u8; 32]>,
        limit: u32,
    ) -> Result<Vec<([u8; 32], u64)>> {
        let rows = sqlx::query(
            "SELECT relay_key, timestamp_ms FROM address_book WHERE relay_key > ? \
             ORDER BY relay_key LIMIT ?",
        )
        .bind(after.map(|a| a.to_vec()).unwrap_or_default())
        .bind(i64::from(limit))
        .fetch_all(self.store.readers())
        .await
        .map_err(|e| self.store.db_err("digest address book", e))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let k: Vec<u8> = r.try_get(0).map_err(|e| self.store.db_err("digest", e))?;
            let t: i64 = r.try_get(1).map_err(|e| self.store.db_err("digest", e))?;
            if let Ok(k) = <[u8; 32]>::try_from(k.as_slice()) {
                out.push((k, t.max(0) as u64));
            }
        }
        Ok(out)
    }

    /// The stored timestamps of those of `keys` that are in the book (no
    /// signature checks: what anti-entropy compares a digest with).
    pub async fn timestamps(
        &self,
        keys: &[[u8; 32]],
    ) -> Result<std::collections::HashMap<[u8; 32], u64>> {
        let mut out = std::collections::HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(500) {
            let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "SELECT relay_key, timestamp_ms FROM address_book WHERE relay_key IN (",
            );
            let mut sep = qb.separated(", ");
            for k in chunk {
                sep.push_bind(k.to_vec());
            }
            qb.push(")");
            let rows = qb
                .build()
                .fetch_all(self.store.readers())
                .await
                .map_err(|e| self.store.db_err("read record timestamps", e))?;
            for r in rows {
                let k: Vec<u8> = r
                    .try_get(0)
                    .map_err(|e| self.store.db_err("timestamps", e))?;
                let t: i64 = r
                    .try_get(1)
                    .map_err(|e| self.store.db_err("timestamps", e))?;
                if let Ok(k) = <[u8; 32]>::try_from(k.as_slice()) {
                    out.insert(k, t.max(0) as u64);
                }
            }
        }
        Ok(out)
    }

    /// The stored encodings of those of `keys` that are in the book, as
    /// stored (they were verified when stored; receivers verify again).
    pub async fn encoded(&self, keys: &[[u8; 32]]) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(500) {
            let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "SELECT record FROM address_book WHERE relay_key IN (",
            );
            let mut sep = qb.separated(", ");
            for k in chunk {
                sep.push_bind(k.to_vec());
            }
            qb.push(") ORDER BY relay_key");
            let rows = qb
                .build()
                .fetch_all(self.store.readers())
                .await
                .map_err(|e| self.store.db_err("read records", e))?;
            for r in rows {
                out.push(r.try_get(0).map_err(|e| self.store.db_err("records", e))?);
            }
        }
        Ok(out)
    }

    /// Deletes records signed before `before_ms` (too old to be accepted
    /// anywhere, so not worth keeping or offering); returns how many.
    pub async fn expire(&self, before_ms: u64) -> Result<u64> {
        self.store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    let r = sqlx::query("DELETE FROM address_book WHERE timestamp_ms < ?")
                        .bind(ms(before_ms))
                        .execute(&mut ctx.conn)
                        .await
                        .map_err(|e| ctx.db_err("expire address records", e))?;
                    Ok(r.rows_affected())
                })
            }))
            .await
    }

    /// Records stored.
    pub async fn count(&self) -> Result<u64> {
        self.store.count("SELECT COUNT(*) FROM address_book").await
    }
}

/// The upsert inside the writer's transaction.
async fn upsert_in(
    ctx: &mut crate::writer::WriterCtx,
    record: &AddressRecord,
    now_ms: u64,
    own: bool,
    max: i64,
) -> Result<Upsert> {
    let key = record.relay_key().to_bytes();
    let bytes = record.encode();
    let ts = record.timestamp_ms();

    // The stored record was verified when it was written:
    // compare by its timestamp and encoding.
    let existing: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT timestamp_ms, record FROM address_book WHERE relay_key = ?")
            .bind(key.as_slice())
            .fetch_optional(&mut ctx.conn)
            .await
            .map_err(|e| ctx.db_err("read address record", e))?;
    let outcome = match existing {
        Some((ts, old)) if !record.supersedes_encoded(ts.max(0) as u64, &old) => {
            return Ok(Upsert::Unchanged);
        }
        Some(_) => Upsert::Replaced,
        None => {
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM address_book")
                .fetch_one(&mut ctx.conn)
                .await
                .map_err(|e| ctx.db_err("count address book", e))?;
            if count >= max && !own {
                let oldest = sqlx::query(
                    "SELECT relay_key, timestamp_ms FROM address_book \
                         WHERE connected_ms < ? AND first_seen_ms > ? \
                         ORDER BY timestamp_ms LIMIT 1",
                )
                .bind(ms(now_ms.saturating_sub(PROVEN_CONNECTED_MS)))
                .bind(ms(now_ms.saturating_sub(PROVEN_PRESENT_MS)))
                .fetch_optional(&mut ctx.conn)
                .await
                .map_err(|e| ctx.db_err("find oldest record", e))?;
                let evict = oldest.and_then(|r| {
                    let k: Vec<u8> = r.try_get(0).ok()?;
                    let t: i64 = r.try_get(1).ok()?;
                    (t < ms(ts)).then_some(k)
                });
                let Some(victim) = evict else {
                    return Err(Error::BookFull { max: max as u64 });
                };
                sqlx::query("DELETE FROM address_book WHERE relay_key = ?")
                    .bind(victim)
                    .execute(&mut ctx.conn)
                    .await
                    .map_err(|e| ctx.db_err("evict address record", e))?;
            }
            Upsert::Inserted
        }
    };
    // Our own record counts as connected for ever.
    let connected = if own { i64::MAX } else { 0 };
    sqlx::query(
            "INSERT INTO address_book (relay_key, timestamp_ms, record, received_ms, first_seen_ms, connected_ms) \
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (relay_key) DO UPDATE SET \
             timestamp_ms = excluded.timestamp_ms, record = excluded.record, \
             received_ms = excluded.received_ms, \
             connected_ms = max(connected_ms, excluded.connected_ms)",
        )
        .bind(key.as_slice())
        .bind(ms(ts))
        .bind(&bytes)
        .bind(ms(now_ms))
        .bind(ms(now_ms))
        .bind(connected)
        .execute(&mut ctx.conn)
        .await
        .map_err(|e| ctx.db_err("store address record", e))?;
    Ok(outcome)
}
