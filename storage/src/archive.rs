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
        let max = self.store.config().archive_max_bytes;
        if bytes.len() as u64 > max {
            return Err(Error::TooLarge {
                what: "archive (archive_max_bytes)",
                got: bytes.len() as u64,
                max,
            });
        }
        if token.is_empty() {
            return Err(Error::Unauthorized { what: "archive" });
        }
        let hash = primitives::sha256(&[token.as_bytes()]);
        let data_dir = self.store.config().data_dir.clone();
        let name = format!(
            "{}-{}",
            hex::encode(owner),
            hex::encode(crate::random_bytes::<8>()?)
        );
        let tmp = data_dir.join("tmp").join(format!("archive-{name}.part"));
        let path = data_dir.join("archive").join(&name);
        let written = async {
            let mut f = tokio::fs::File::create(&tmp).await?;
            f.write_all(bytes).await?;
            f.sync_all().await?;
            tokio::fs::rename(&tmp, &path).await
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&tmp).await;
            let _ = tokio::fs::remove_file(&path).await;
            return Err(Error::io("write archive", &path, e));
        }
        let size = bytes.len() as u64;
        let file = name.clone();
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
                        "INSERT INTO archive (owner, token_hash, file, size, updated_ms) VALUES (?, ?, ?, ?, ?) \
                         ON CONFLICT (owner) DO UPDATE SET file = excluded.file, size = excluded.size, \
                         updated_ms = excluded.updated_ms",
                    )
                    .bind(owner.as_slice())
                    .bind(hash.as_slice())
                    .bind(&file)
                    .bind(ms(size))
                    .bind(ms(now_ms))
                    .execute(&mut ctx.conn)
                    .await
                    .map_err(|e| ctx.db_err("write archive", e))?;
                    Ok(previous)
                })
            }))
            .await;
        let archive_dir = data_dir.join("archive");
        match result {
            Ok(previous) => {
                if let Some(prev) = previous.filter(|p| *p != name) {
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

    /// `owner`'s archive, if any.
    pub async fn get(&self, owner: [u8; 32]) -> Result<Option<Vec<u8>>> {
        let file: Option<String> = sqlx::query_scalar("SELECT file FROM archive WHERE owner = ?")
            .bind(owner.as_slice())
            .fetch_optional(self.store.readers())
            .await
            .map_err(|e| self.store.db_err("read archive", e))?;
        let Some(file) = file else { return Ok(None) };
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
