//! Encrypted media blobs: files under `media/`, one row each.
//!
//! An upload streams into `tmp/`, is fsynced and renamed into `media/`, and
//! only then gets its row; an upload that is dropped, fails or exceeds
//! `media_max_bytes` leaves nothing behind. Expiry (`media_ttl_ms`) removes
//! the row, then the file. Files left without a row by a crash are removed
//! by [`Media::remove_orphans`].

use crate::error::{Error, Result};
use crate::{Store, ms};
use sqlx::Row as _;
use std::path::PathBuf;
use tokio::io::AsyncWriteExt as _;

/// A media id: 16 random bytes as 32 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MediaId(String);

impl MediaId {
    /// Parses and checks an id.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| Self(s.to_string()))
    }

    /// The 32 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for MediaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A stored blob's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaMeta {
    /// Its id.
    pub id: MediaId,
    /// Its size in bytes.
    pub size: u64,
    /// When it was stored, unix ms.
    pub created_ms: u64,
    /// When it expires, unix ms.
    pub expires_ms: u64,
}

/// An upload in progress. Dropping it without [`Upload::finish`] removes
/// the partial file.
#[derive(Debug)]
pub struct Upload {
    store: Store,
    id: MediaId,
    tmp: PathBuf,
    file: Option<tokio::fs::File>,
    written: u64,
    max: u64,
    done: bool,
}

impl Upload {
    /// Appends bytes. Beyond `media_max_bytes` the upload is abandoned (its
    /// file removed) and [`Error::TooLarge`] returned.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        let new_len = self.written.saturating_add(chunk.len() as u64);
        if new_len > self.max {
            self.abandon();
            return Err(Error::TooLarge {
                what: "media blob (media_max_bytes)",
                got: new_len,
                max: self.max,
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
            let err = Error::io("write media", &self.tmp, e);
            self.abandon();
            return Err(err);
        }
        self.written = new_len;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.written
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// Makes the blob durable and visible: fsync, rename into `media/`,
    /// then commit its row.
    pub async fn finish(mut self, now_ms: u64) -> Result<MediaMeta> {
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
            let err = Error::io("sync media", &self.tmp, e);
            self.abandon();
            return Err(err);
        }
        let media_dir = self.store.config().data_dir.join("media");
        let dest = media_dir.join(self.id.as_str());
        if let Err(e) = tokio::fs::rename(&self.tmp, &dest).await {
            let err = Error::io("rename media", &dest, e);
            self.abandon();
            return Err(err);
        }
        self.done = true;
        sync_dir(&media_dir).await;
        let meta = MediaMeta {
            id: self.id.clone(),
            size: self.written,
            created_ms: now_ms,
            expires_ms: now_ms.saturating_add(self.store.config().media_ttl_ms),
        };
        let row = meta.clone();
        let result = self
            .store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO media (id, size, created_ms, expires_ms) VALUES (?, ?, ?, ?)",
                    )
                    .bind(row.id.as_str())
                    .bind(ms(row.size))
                    .bind(ms(row.created_ms))
                    .bind(ms(row.expires_ms))
                    .execute(&mut ctx.conn)
                    .await
                    .map_err(|e| ctx.db_err("insert media", e))?;
                    Ok(())
                })
            }))
            .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&dest).await;
            return Err(e);
        }
        Ok(meta)
    }

    fn abandon(&mut self) {
        self.file = None;
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
            self.done = true;
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.abandon();
    }
}

async fn sync_dir(dir: &std::path::Path) {
    if let Ok(d) = tokio::fs::File::open(dir).await {
        let _ = d.sync_all().await;
    }
}

/// The media API of a [`Store`].
#[derive(Debug, Clone, Copy)]
pub struct Media<'a> {
    pub(crate) store: &'a Store,
}

impl Media<'_> {
    /// Starts an upload with a fresh id.
    pub async fn begin(&self) -> Result<Upload> {
        self.store.check_space()?;
        let id = MediaId(hex::encode(crate::random_bytes::<16>()?));
        let tmp = self
            .store
            .config()
            .data_dir
            .join("tmp")
            .join(format!("media-{id}.part"));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .await
            .map_err(|e| Error::io("create media upload", &tmp, e))?;
        Ok(Upload {
            store: self.store.clone(),
            id,
            tmp,
            file: Some(file),
            written: 0,
            max: self.store.config().media_max_bytes,
            done: false,
        })
    }

    /// Stores a whole blob in one call.
    pub async fn put(&self, bytes: &[u8], now_ms: u64) -> Result<MediaMeta> {
        let mut up = self.begin().await?;
        up.write(bytes).await?;
        up.finish(now_ms).await
    }

    /// Metadata of an unexpired blob.
    pub async fn meta(&self, id: &MediaId, now_ms: u64) -> Result<Option<MediaMeta>> {
        let row = sqlx::query(
            "SELECT size, created_ms, expires_ms FROM media WHERE id = ? AND expires_ms > ?",
        )
        .bind(id.as_str())
        .bind(ms(now_ms))
        .fetch_optional(self.store.readers())
        .await
        .map_err(|e| self.store.db_err("read media", e))?;
        let Some(r) = row else { return Ok(None) };
        let get = |c: &str| -> Result<u64> {
            r.try_get::<i64, _>(c)
                .map(|v| v.max(0) as u64)
                .map_err(|e| self.store.db_err("read media", e))
        };
        Ok(Some(MediaMeta {
            id: id.clone(),
            size: get("size")?,
            created_ms: get("created_ms")?,
            expires_ms: get("expires_ms")?,
        }))
    }

    /// Opens an unexpired blob for streaming.
    pub async fn open(
        &self,
        id: &MediaId,
        now_ms: u64,
    ) -> Result<Option<(MediaMeta, tokio::fs::File)>> {
        let Some(meta) = self.meta(id, now_ms).await? else {
            return Ok(None);
        };
        let path = self.path(id);
        match tokio::fs::File::open(&path).await {
            Ok(f) => Ok(Some((meta, f))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("open media", &path, e)),
        }
    }

    /// Reads a whole unexpired blob.
    pub async fn get(&self, id: &MediaId, now_ms: u64) -> Result<Option<Vec<u8>>> {
        let Some((_, mut f)) = self.open(id, now_ms).await? else {
            return Ok(None);
        };
        let mut buf = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut f, &mut buf)
            .await
            .map_err(|e| Error::io("read media", &self.path(id), e))?;
        Ok(Some(buf))
    }

    fn path(&self, id: &MediaId) -> PathBuf {
        self.store.config().data_dir.join("media").join(id.as_str())
    }

    /// Removes up to `max_rows` expired blobs (row first, then file).
    pub async fn expire(&self, now_ms: u64, max_rows: u32) -> Result<u64> {
        let ids: Vec<String> = self
            .store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    sqlx::query_scalar(
                        "DELETE FROM media WHERE id IN (SELECT id FROM media WHERE expires_ms <= ? \
                         ORDER BY expires_ms LIMIT ?) RETURNING id",
                    )
                    .bind(ms(now_ms))
                    .bind(i64::from(max_rows))
                    .fetch_all(&mut ctx.conn)
                    .await
                    .map_err(|e| ctx.db_err("expire media", e))
                })
            }))
            .await?;
        for id in &ids {
            if let Some(id) = MediaId::parse(id) {
                let _ = tokio::fs::remove_file(self.path(&id)).await;
            }
        }
        Ok(ids.len() as u64)
    }

    /// Deletes files in `media/` that have no row (left by a crash between
    /// rename and commit, or between commit and unlink). Returns how many.
    pub async fn remove_orphans(&self) -> Result<u64> {
        let dir = self.store.config().data_dir.join("media");
        let mut rd = tokio::fs::read_dir(&dir)
            .await
            .map_err(|e| Error::io("read media directory", &dir, e))?;
        let mut removed = 0;
        while let Some(entry) = rd
            .next_entry()
            .await
            .map_err(|e| Error::io("read media directory", &dir, e))?
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = MediaId::parse(&name) else {
                continue;
            };
            let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM media WHERE id = ?")
                .bind(id.as_str())
                .fetch_optional(self.store.readers())
                .await
                .map_err(|e| self.store.db_err("check media", e))?;
            if exists.is_none() {
                let _ = tokio::fs::remove_file(entry.path()).await;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Blobs stored.
    pub async fn count(&self) -> Result<u64> {
        self.store.count("SELECT COUNT(*) FROM media").await
    }
}
