//! Federated packet ids this relay stored, so a packet resent by another
//! relay (its acknowledgement was lost) is never stored, or delivered,
//! twice — however long after.
//!
//! An id is remembered from the moment its packet is stored until the
//! sending relay says it has the acknowledgement (a `Forget`), or until it
//! expires (the time the sender may still resend it). Ids live in the
//! table `fed_seen`; the writer keeps the ids recorded since the last hot
//! spill in memory (they are in the hot log with their packets, so a crash
//! recovers them) and a Bloom filter over the table, so the common case —
//! a new id — costs no database read.

use crate::error::Result;
use crate::ms;
use sqlx::SqliteConnection;
use std::collections::HashMap;
use std::path::Path;

/// A federated packet id.
pub type FedId = [u8; 16];

/// A Bloom filter over 16-byte random ids (the ids themselves are uniform,
/// so their bytes serve as the hashes).
#[derive(Debug)]
struct Bloom {
    bits: Vec<u64>,
    mask: u64,
    /// Ids inserted since it was built.
    inserted: usize,
}

/// Probes per id.
const PROBES: usize = 6;

impl Bloom {
    /// A filter for about `n` ids at ~1% false positives (at least 2^20 bits).
    fn new(n: usize) -> Self {
        let want = (n.saturating_mul(10)).max(1 << 20).next_power_of_two();
        Self {
            bits: vec![0; want / 64],
            mask: (want - 1) as u64,
            inserted: 0,
        }
    }

    /// Past the ids it was sized for, false positives climb fast (at 5×
    /// its size, ~75%: nearly every lookup would read the table).
    fn full(&self) -> bool {
        self.inserted > self.bits.len() * 64 / 10
    }

    fn positions(&self, id: &FedId) -> [u64; PROBES] {
        let a = u64::from_le_bytes([id[0], id[1], id[2], id[3], id[4], id[5], id[6], id[7]]);
        let b =
            u64::from_le_bytes([id[8], id[9], id[10], id[11], id[12], id[13], id[14], id[15]]) | 1;
        let mut out = [0u64; PROBES];
        for (i, o) in out.iter_mut().enumerate() {
            *o = a.wrapping_add((i as u64).wrapping_mul(b)) & self.mask;
        }
        out
    }

    fn insert(&mut self, id: &FedId) {
        self.inserted += 1;
        for p in self.positions(id) {
            self.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    fn may_contain(&self, id: &FedId) -> bool {
        self.positions(id)
            .iter()
            .all(|p| self.bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }
}

/// The writer's view of `fed_seen`.
#[derive(Debug)]
pub(crate) struct FedSeen {
    /// Recorded since the last spill (also in the hot log), with expiry.
    recent: HashMap<FedId, u64, foldhash::fast::RandomState>,
    /// Ids of packets held in memory only (not yet logged, see
    /// `hot::HotLog::add_unlogged`): they count for duplicates but are never
    /// spilled into the table before their packet is logged or delivered —
    /// an id remembered durably without its packet would make a resend
    /// after a crash look stored.
    claimed: HashMap<FedId, u64, foldhash::fast::RandomState>,
    /// Over the table's ids only (`recent` is looked up first and
    /// exactly). Deletions are not removed: a false positive only costs a
    /// read; once it has taken more ids than it was sized for it is built
    /// again from the table.
    bloom: Bloom,
}

impl FedSeen {
    /// Loads the filter from the table.
    pub(crate) async fn load(conn: &mut SqliteConnection, path: &Path) -> Result<Self> {
        Ok(Self {
            recent: HashMap::default(),
            claimed: HashMap::default(),
            bloom: table_filter(conn, path).await?,
        })
    }

    /// Whether `id` was stored here (and not forgotten).
    pub(crate) async fn contains(
        &mut self,
        conn: &mut SqliteConnection,
        path: &Path,
        id: &FedId,
    ) -> Result<bool> {
        if self.recent.contains_key(id) || self.claimed.contains_key(id) {
            return Ok(true);
        }
        if self.bloom.full() {
            self.bloom = table_filter(conn, path).await?;
        }
        if !self.bloom.may_contain(id) {
            return Ok(false);
        }
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM fed_seen WHERE id = ?")
            .bind(id.as_slice())
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| crate::Error::db("look up a federated id", path, e))?;
        Ok(found.is_some())
    }

    /// Remembers `id` until `expires_ms` (in memory until the next spill;
    /// the hot log holds it with its packet).
    pub(crate) fn record(&mut self, id: FedId, expires_ms: u64) {
        self.recent.insert(id, expires_ms);
    }

    /// Counts `id` seen while its packet is held unlogged.
    pub(crate) fn claim(&mut self, id: FedId, expires_ms: u64) {
        self.claimed.insert(id, expires_ms);
    }

    /// Whether `id` is claimed by an unlogged packet.
    pub(crate) fn is_claimed(&self, id: &FedId) -> bool {
        self.claimed.contains_key(id)
    }

    /// The claimed ids' packets were logged or delivered: remembered like
    /// any other from now on.
    pub(crate) fn confirm(&mut self, ids: &[FedId]) {
        for id in ids {
            if let Some(exp) = self.claimed.remove(id) {
                self.recent.insert(*id, exp);
            }
        }
    }

    /// Undoes [`FedSeen::confirm`] (the group that logged them failed).
    pub(crate) fn unconfirm(&mut self, ids: &[FedId]) {
        for id in ids {
            if let Some(exp) = self.recent.remove(id) {
                self.claimed.insert(*id, exp);
            }
        }
    }

    /// Forgets recorded ids whose packets are gone (their group failed).
    pub(crate) fn unrecord(&mut self, ids: &[FedId]) {
        for id in ids {
            self.recent.remove(id);
        }
    }

    /// Drops claims whose packets are gone unlogged (their group failed).
    pub(crate) fn unclaim(&mut self, ids: &[FedId]) {
        for id in ids {
            self.claimed.remove(id);
        }
    }

    /// Remembers `id` in the table now (inside the caller's transaction:
    /// the store without a hot tier).
    pub(crate) async fn insert(
        &mut self,
        conn: &mut SqliteConnection,
        path: &Path,
        id: FedId,
        expires_ms: u64,
    ) -> Result<()> {
        insert_rows(conn, path, &[(id, expires_ms)]).await?;
        self.bloom.insert(&id);
        Ok(())
    }

    /// Moves the ids recorded since the last spill into the table (inside
    /// the spill's transaction).
    pub(crate) async fn spill(&mut self, conn: &mut SqliteConnection, path: &Path) -> Result<()> {
        if self.recent.is_empty() {
            return Ok(());
        }
        let rows: Vec<(FedId, u64)> = self.recent.iter().map(|(k, v)| (*k, *v)).collect();
        insert_rows(conn, path, &rows).await?;
        // Into the filter now: should the spill's transaction fail, the
        // extra ids only cost a read each.
        for (id, _) in &rows {
            self.bloom.insert(id);
        }
        Ok(())
    }

    /// The spill committed: the table holds them now.
    pub(crate) fn spilled(&mut self) {
        self.recent.clear();
    }

    /// Forgets `ids` (their senders have the acknowledgements).
    pub(crate) async fn forget(
        &mut self,
        conn: &mut SqliteConnection,
        path: &Path,
        ids: &[FedId],
    ) -> Result<u64> {
        let mut n = 0u64;
        let mut in_table = Vec::new();
        for id in ids {
            if self.recent.remove(id).is_some() || self.claimed.remove(id).is_some() {
                n += 1;
            } else if self.bloom.may_contain(id) {
                in_table.push(*id);
            }
        }
        for chunk in in_table.chunks(500) {
            let mut qb =
                sqlx::QueryBuilder::<sqlx::Sqlite>::new("DELETE FROM fed_seen WHERE id IN (");
            let mut sep = qb.separated(", ");
            for id in chunk {
                sep.push_bind(id.to_vec());
            }
            qb.push(")");
            n += qb
                .build()
                .execute(&mut *conn)
                .await
                .map_err(|e| crate::Error::db("forget federated ids", path, e))?
                .rows_affected();
        }
        Ok(n)
    }
}

/// A filter over the table's ids, sized for twice as many.
async fn table_filter(conn: &mut SqliteConnection, path: &Path) -> Result<Bloom> {
    let ids: Vec<Vec<u8>> = sqlx::query_scalar("SELECT id FROM fed_seen")
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| crate::Error::db("load federated ids", path, e))?;
    let mut bloom = Bloom::new(ids.len().saturating_mul(2));
    for id in ids {
        if let Ok(id) = <FedId>::try_from(id.as_slice()) {
            bloom.insert(&id);
        }
    }
    bloom.inserted = 0;
    Ok(bloom)
}

async fn insert_rows(
    conn: &mut SqliteConnection,
    path: &Path,
    rows: &[(FedId, u64)],
) -> Result<()> {
    for chunk in rows.chunks(400) {
        let mut qb =
            sqlx::QueryBuilder::<sqlx::Sqlite>::new("INSERT INTO fed_seen (id, expires_ms) ");
        qb.push_values(chunk, |mut b, (id, exp)| {
            b.push_bind(id.to_vec()).push_bind(ms(*exp));
        });
        qb.push(
            " ON CONFLICT (id) DO UPDATE SET expires_ms = max(expires_ms, excluded.expires_ms)",
        );
        qb.build()
            .execute(&mut *conn)
            .await
            .map_err(|e| crate::Error::db("remember federated ids", path, e))?;
    }
    Ok(())
}

/// Recovery: ids a crashed run's hot log holds go into the table.
pub(crate) async fn recover(
    conn: &mut SqliteConnection,
    path: &Path,
    ids: &[(FedId, u64)],
) -> Result<()> {
    insert_rows(conn, path, ids).await
}

/// Deletes ids expired at `now_ms` (at most `max`); returns how many.
pub(crate) async fn expire(
    conn: &mut SqliteConnection,
    path: &Path,
    now_ms: u64,
    max: u32,
) -> Result<u64> {
    sqlx::query(
        "DELETE FROM fed_seen WHERE id IN \
         (SELECT id FROM fed_seen WHERE expires_ms <= ? LIMIT ?)",
    )
    .bind(ms(now_ms))
    .bind(i64::from(max))
    .execute(&mut *conn)
    .await
    .map(|r| r.rows_affected())
    .map_err(|e| crate::Error::db("expire federated ids", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bloom_has_no_false_negatives_and_few_false_positives() {
        let mut b = Bloom::new(10_000);
        let mut x = 0x1234_5678_9abc_def0_u64;
        let mut next = || {
            // xorshift: uniform-looking ids, deterministic.
            let mut id = [0u8; 16];
            for chunk in id.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            id
        };
        let ids: Vec<FedId> = (0..10_000).map(|_| next()).collect();
        for id in &ids {
            b.insert(id);
        }
        assert!(ids.iter().all(|id| b.may_contain(id)));
        let fp = (0..10_000).filter(|_| b.may_contain(&next())).count();
        assert!(fp < 200, "{fp} false positives in 10 000");
    }

    #[test]
    fn a_filter_says_when_it_holds_more_than_it_was_sized_for() {
        let mut b = Bloom::new(0);
        let cap = b.bits.len() * 64 / 10;
        for i in 0..cap {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            b.insert(&id);
        }
        assert!(!b.full());
        b.insert(&[0xff; 16]);
        assert!(b.full(), "rebuilt from the table beyond {cap} ids");
    }
}
