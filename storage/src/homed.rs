//! Destination hashes homed at this relay: every hash a client registered,
//! kept until it expires, so a packet forwarded by another relay for a
//! client that is offline right now is still stored here.

use crate::error::Result;
use crate::{Store, ms};
use meshwhisper_crypto::destination::DestHash;
use sqlx::Row as _;

/// The homed-hashes API of a [`Store`].
#[derive(Debug, Clone, Copy)]
pub struct Homed<'a> {
    pub(crate) store: &'a Store,
}

impl Homed<'_> {
    /// Remembers `hashes` as homed here until `expires_ms` (a later expiry
    /// replaces an earlier one, never the other way round).
    pub async fn remember(&self, hashes: Vec<DestHash>, expires_ms: u64) -> Result<()> {
        if hashes.is_empty() {
            return Ok(());
        }
        self.store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    for h in &hashes {
                        sqlx::query(
                            "INSERT INTO homed (hash, expires_ms) VALUES (?, ?) \
                             ON CONFLICT (hash) DO UPDATE SET expires_ms = \
                             max(expires_ms, excluded.expires_ms)",
                        )
                        .bind(h.as_bytes().as_slice())
                        .bind(ms(expires_ms))
                        .execute(&mut ctx.conn)
                        .await
                        .map_err(|e| ctx.db_err("remember homed hash", e))?;
                    }
                    Ok(())
                })
            }))
            .await
    }

    /// Up to `limit` unexpired hashes with their expiry, latest expiry
    /// first (streamed: 16 bytes each in memory, not a row each).
    pub async fn load(&self, now_ms: u64, limit: u32) -> Result<Vec<(DestHash, u64)>> {
        let mut rows = sqlx::query(
            "SELECT hash, expires_ms FROM homed WHERE expires_ms > ? \
             ORDER BY expires_ms DESC LIMIT ?",
        )
        .bind(ms(now_ms))
        .bind(i64::from(limit))
        .fetch(self.store.readers());
        let mut out = Vec::new();
        while let Some(r) = futures::TryStreamExt::try_next(&mut rows)
            .await
            .map_err(|e| self.store.db_err("load homed hashes", e))?
        {
            let h: Vec<u8> = r.try_get(0).map_err(|e| self.store.db_err("homed", e))?;
            let t: i64 = r.try_get(1).map_err(|e| self.store.db_err("homed", e))?;
            if let Ok(h) = <[u8; 8]>::try_from(h.as_slice()) {
                out.push((DestHash(h), t.max(0) as u64));
            }
        }
        Ok(out)
    }

    /// Forgets `hashes` (evicted to make room).
    pub async fn forget(&self, hashes: Vec<DestHash>) -> Result<()> {
        if hashes.is_empty() {
            return Ok(());
        }
        self.store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    for h in &hashes {
                        sqlx::query("DELETE FROM homed WHERE hash = ?")
                            .bind(h.as_bytes().as_slice())
                            .execute(&mut ctx.conn)
                            .await
                            .map_err(|e| ctx.db_err("forget homed hash", e))?;
                    }
                    Ok(())
                })
            }))
            .await
    }

    /// Forgets hashes that expired before `now_ms`; returns how many.
    pub async fn expire(&self, now_ms: u64) -> Result<u64> {
        self.store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    let r = sqlx::query("DELETE FROM homed WHERE expires_ms <= ?")
                        .bind(ms(now_ms))
                        .execute(&mut ctx.conn)
                        .await
                        .map_err(|e| ctx.db_err("expire homed hashes", e))?;
                    Ok(r.rows_affected())
                })
            }))
            .await
    }

    /// Hashes remembered (expired or not).
    pub async fn count(&self) -> Result<u64> {
        self.store.count("SELECT COUNT(*) FROM homed").await
    }
}
