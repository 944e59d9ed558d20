//! One encrypted archive per identity (a device's backup), kept as a file
//! under `archive/` and replaced whole on each write.
//!
//! The first write pins SHA-256 of its bearer token; later writes must
//! present the same token. Each write goes to a fresh file that the row then
//! points to, so a failed write leaves the previous archive intact.

use crate::error::{Error, Result};
use crate::{Store, ms};
use meshwhisper_crypto::primitives;
use sqlx::Row as _;
use tokio::io::AsyncWriteExt as _;

/// The archive API of a [`Store`].
#[derive(Debug, Clone, Copy)]
pub struct Archive<'a> {
    pub(crate) store: &'a Store,
}

impl Archive<'_> {
    /// Stores `bytes` as `owner`'s archive, authorised by `token`.
    /// Returns the size stored.
    pub async fn put(
        &self,
        owner: [u8; 32],
        token: &str,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<u64> {
        let mut up = self.begin(owner, token).await?;
        up.write(bytes).await?;
        up.finish(now_ms).await
    }

    /// Starts replacing `owner`'s archive. The token is checked first (an
    /// archive that exists accepts only the token that created it), so a
    /// client without it is refused before it sends a byte; the check is
    /// repeated atomically when the upload is committed.
    pub async fn begin(&self, owner: [u8; 32], token: &str) -> Result<ArchiveUpload> {
        if token.is_empty() {
            return Err(Error::Unauthorized { what: "archive" });
        }
        let hash = primitives::sha256(&[token.as_bytes()]);
        let pinned: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT token_hash FROM archive WHERE owner = ?")
                .bind(owner.as_slice())
                .fetch_optional(self.store.readers())
                .await
                .map_err(|e| self.store.db_err("read archive", e))?;
        if let Some(p) = pinned
            && !primitives::ct_eq(&p, &hash)
        {
            return Err(Error::Unauthorized { what: "archive" });
        }
        self.store.check_space()?;
        let name = format!(
            "{}-{}",
            hex::encode(owner),
            hex::encode(crate::random_bytes::<8>()?)
        );
        let tmp = self
            .store
            .config()
            .data_dir
            .join("tmp")
            .join(format!("archive-{name}.part"));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .await
            .map_err(|e| Error::io("create archive upload", &tmp, e))?;
        Ok(ArchiveUpload {
            store: self.store.clone(),
            owner,
            hash,
            name,
            tmp,
            file: Some(file),
            written: 0,
            done: false,
        })
    }

    /// Removes archives neither written nor read since `before_ms` (at
    /// most `max` of them); returns how many.
    pub async fn expire(&self, before_ms: u64, max: u32) -> Result<u64> {
        let data_dir = self.store.config().data_dir.clone();
        let files: Vec<String> = self
            .store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    let rows: Vec<(Vec<u8>, String)> = sqlx::query_as(
                        "SELECT owner, file FROM archive WHERE max(updated_ms, accessed_ms) < ? LIMIT ?",
                    )
                    .bind(ms(before_ms))
                    .bind(i64::from(max))
                    .fetch_all(&mut ctx.conn)
                    .await
                    .map_err(|e| ctx.db_err("expire archives", e))?;
                    for (owner, _) in &rows {
                        sqlx::query("DELETE FROM archive WHERE owner = ?")
                            .bind(owner)
                            .execute(&mut ctx.conn)
                            .await
                            .map_err(|e| ctx.db_err("expire archives", e))?;
                    }
                    Ok(rows.into_iter().map(|(_, f)| f).collect())
                })
            }))
            .await?;
        for f in &files {
            let _ = tokio::fs::remove_file(data_dir.join("archive").join(f)).await;
        }
        Ok(files.len() as u64)
    }

    /// `owner`'s archive, if any. A read counts as activity (archives
    /// expire after `archive_ttl_ms` without any).
    pub async fn get(&self, owner: [u8; 32], now_ms: u64) -> Result<Option<Vec<u8>>> {
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT file, accessed_ms FROM archive WHERE owner = ?")
                .bind(owner.as_slice())
                .fetch_optional(self.store.readers())
                .await
                .map_err(|e| self.store.db_err("read archive", e))?;
        let Some((file, accessed)) = row else {
            return Ok(None);
        };
        // Recorded at most once a day per archive.
        if ms(now_ms).saturating_sub(accessed) > 24 * 3_600_000 {
            let r = self
                .store
                .writer()
                .run(Box::new(move |ctx| {
                    Box::pin(async move {
                        sqlx::query("UPDATE archive SET accessed_ms = ? WHERE owner = ?")
                            .bind(ms(now_ms))
                            .bind(owner.as_slice())
                            .execute(&mut ctx.conn)
                            .await
                            .map_err(|e| ctx.db_err("touch archive", e))?;
                        Ok(())
                    })
                }))
                .await;
            if let Err(e) = r {
                tracing::debug!(error = %e, "could not record an archive read");
            }
        }
        let path = self.store.config().data_dir.join("archive").join(file);
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read archive", &path, e)),
        }
    }

    /// Archives stored.
    pub async fn count(&self) -> Result<u64> {
        self.store.count("SELECT COUNT(*) FROM archive").await
    }
}

/// An archive being uploaded. Dropping it without
/// [`ArchiveUpload::finish`] removes the partial file.
#[derive(Debug)]
pub struct ArchiveUpload {
    store: Store,
    owner: [u8; 32],
    hash: [u8; 32],
    name: String,
    tmp: std::path::PathBuf,
    file: Option<tokio::fs::File>,
    written: u64,
    done: bool,
}

impl ArchiveUpload {
    /// Appends bytes; beyond `archive_max_bytes` the upload is abandoned.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        let max = self.store.config().archive_max_bytes;
        let new_len = self.written.saturating_add(chunk.len() as u64);
        if new_len > max {
            self.abandon();
            return Err(Error::TooLarge {
                what: "archive (archive_max_bytes)",
                got: new_len,
                max,
            });
        }
        if let Err(e) = self.store.check_space() {
            self.abandon();
            return Err(e);
        }
        let Some(file) = self.file.as_mut() else {
            return Err(Error::Closed);
        };
        if let Err(e) = file.write_all(chunk).await {
            let err = Error::io("write archive", &self.tmp, e);
            self.abandon();
            return Err(err);
        }
        self.written = new_len;
        Ok(())
    }

    /// Makes it durable and current: fsync, rename into `archive/`, then
    /// commit the row if the token still matches; the previous file goes.
    /// Returns the size stored.
    pub async fn finish(mut self, now_ms: u64) -> Result<u64> {
        let Some(mut file) = self.file.take() else {
            return Err(Error::Closed);
        };
        let flushed = async {
            file.flush().await?;
            file.sync_all().await
        }
        .await;
        drop(file);
        if let Err(e) = flushed {
            let err = Error::io("sync archive", &self.tmp, e);
            self.abandon();
            return Err(err);
        }
        let archive_dir = self.store.config().data_dir.join("archive");
        let path = archive_dir.join(&self.name);
        if let Err(e) = tokio::fs::rename(&self.tmp, &path).await {
            let err = Error::io("rename archive", &path, e);
            self.abandon();
            return Err(err);
        }
        self.done = true;
        let (owner, hash, size, file) = (self.owner, self.hash, self.written, self.name.clone());
        let result = self
            .store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    let row = sqlx::query("SELECT token_hash, file FROM archive WHERE owner = ?")
                        .bind(owner.as_slice())
                        .fetch_optional(&mut ctx.conn)
                        .await
                        .map_err(|e| ctx.db_err("read archive", e))?;
                    let previous = match row {
                        Some(r) => {
                            let pinned: Vec<u8> =
                                r.try_get("token_hash").map_err(|e| ctx.db_err("read archive", e))?;
                            if !primitives::ct_eq(&pinned, &hash) {
                                return Err(Error::Unauthorized { what: "archive" });
                            }
                            Some(r.try_get::<String, _>("file").map_err(|e| ctx.db_err("read archive", e))?)
                        }
                        None => None,
                    };
                    sqlx::query(
                        "INSERT INTO archive (owner, token_hash, file, size, updated_ms, accessed_ms) \
                         VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (owner) DO UPDATE SET file = excluded.file, \
                         size = excluded.size, updated_ms = excluded.updated_ms",
                    )
                    .bind(owner.as_slice())
                    .bind(hash.as_slice())
                    .bind(&file)
                    .bind(ms(size))
                    .bind(ms(now_ms))
                    .bind(ms(now_ms))
                    .execute(&mut ctx.conn)
                    .await
                    .map_err(|e| ctx.db_err("write archive", e))?;
                    Ok(previous)
                })
            }))
            .await;
        match result {
            Ok(previous) => {
                if let Some(prev) = previous.filter(|p| *p != self.name) {
                    let _ = tokio::fs::remove_file(archive_dir.join(prev)).await;
                }
                Ok(size)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                Err(e)
            }
        }
    }

    fn abandon(&mut self) {
        self.file = None;
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
            self.done = true;
        }
    }
}

impl Drop for ArchiveUpload {
    fn drop(&mut self) {
        self.abandon();
    }
}
