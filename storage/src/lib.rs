//! MeshWhisper's durable state, in one SQLite file (through sqlx, bundled
//! SQLite, WAL) plus media and archive files beside it.
//!
//! ```text
//! <data dir>/meshwhisper.db        SQLite: mailbox, directory, opks, push, address book, metadata
//! <data dir>/media/<32 hex>        encrypted media blobs
//! <data dir>/archive/<64 hex>      encrypted archives
//! <data dir>/tmp/                  uploads in progress (cleared at open)
//! ```
//!
//! # Durability contract
//!
//! Every write goes through one writer task ([`writer`]) that commits
//! queued operations together. When a write returns `Ok`, its transaction
//! has committed to the write-ahead log: it survives the process being
//! killed (SIGKILL) at any moment. With the default
//! [`Durability::Process`] (`synchronous = NORMAL`) a power loss or kernel
//! crash may lose the most recent commits, though never corrupt the file;
//! [`Durability::PowerLoss`] (`synchronous = FULL`) fsyncs the log at every
//! commit, which group commit keeps affordable. Files (media, archives) are
//! written to `tmp/`, fsynced, and renamed into place before their row is
//! committed.
//!
//! # Bad input
//!
//! Oversize values, unknown ids, wrong tokens, a full disk, a corrupt or
//! foreign database: each gives a typed [`Error`] and changes nothing.

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection as _, SqliteConnection};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub mod address_book;
pub mod archive;
pub mod backup;
pub mod directory;
mod error;
pub mod fed_seen;
pub mod homed;
mod hot;
pub mod lock;
pub mod mailbox;
pub mod media;
pub mod push;
pub mod secret_file;
mod space;
mod writer;

pub use backup::backup_database;
pub use error::{Error, Result};

/// The schema version this binary writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;
/// `PRAGMA application_id` of MeshWhisper databases ('MWND').
pub const APPLICATION_ID: i64 = 0x4D57_4E44;
/// The database file name inside the data directory.
pub const DB_FILE: &str = "meshwhisper.db";
/// The lock file inside the data directory (holds the relay's pid).
pub const LOCK_FILE: &str = "lock";

const MS_PER_HOUR: u64 = 3_600_000;

/// How much a committed write survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Survives the process being killed; the last commits may be lost on
    /// power loss (`synchronous = NORMAL`). The default: a relay's queued
    /// packets are retried by senders, and this is several times faster.
    #[default]
    Process,
    /// Survives power loss too (`synchronous = FULL`).
    PowerLoss,
}

/// Storage limits and placement. Every limit has a documented default.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory for the database, media and archives.
    pub data_dir: PathBuf,
    /// Database file; default `<data_dir>/meshwhisper.db` (reference: `DB_PATH`).
    pub db_path: Option<PathBuf>,
    /// See [`Durability`]. Default: `Process`.
    pub durability: Durability,
    /// How long a queued packet is kept. Default 30 days (reference: `BLOB_TTL_HOURS` = 720).
    pub mailbox_ttl_ms: u64,
    /// Most packets queued per destination hash; the oldest is dropped
    /// beyond it. Default 500 (reference: `MAX_BLOBS_PER_HASH`).
    pub mailbox_max_per_dest: u32,
    /// Largest packet, header included. Default 262 144 (reference: `MAX_BLOB_SIZE`).
    pub max_packet_bytes: usize,
    /// Largest media blob. Default 50 MiB (reference: `MAX_MEDIA_SIZE`).
    pub media_max_bytes: u64,
    /// How long media is kept. Default 168 h (reference: `MEDIA_TTL_HOURS`).
    pub media_ttl_ms: u64,
    /// Largest archive. Default 12 MiB.
    pub archive_max_bytes: u64,
    /// Largest prekey bundle. Default 16 KiB.
    pub bundle_max_bytes: usize,
    /// One-time prekeys accepted per upload. Default 20.
    pub opk_max_per_upload: usize,
    /// One-time prekeys kept per identity. Default 100.
    pub opk_max_per_identity: u32,
    /// Largest one-time prekey. Default 1 KiB.
    pub opk_max_bytes: usize,
    /// Most address records kept. Default 4096.
    pub address_book_max: u32,
    /// Writes queued for the writer before callers wait. Default 8192.
    pub writer_queue: usize,
    /// Most writes committed in one transaction. Default 1024.
    pub writer_batch_max: usize,
    /// Bytes per second of large packets (enqueues over 16 KiB) the writer
    /// takes, so a flood of them cannot use all the disk's bandwidth and
    /// stall everyone else's writes; 0 = no limit. Default 67108864.
    pub bulk_bytes_per_sec: u64,
    /// Read connections. Default 4.
    pub reader_connections: u32,
    /// Cap on the database size (SQLite `max_page_count`); `None` = the disk.
    pub max_db_bytes: Option<u64>,
    /// How long a reader waits for a lock. Default 5 s.
    pub busy_timeout: Duration,
    /// Keep new packets in an append-only log in front of SQLite, and move
    /// what is still undelivered into SQLite every `hot_spill` (see
    /// `storage/src/hot.rs`). Default true: most packets are delivered
    /// before then and never touch SQLite's B-trees. Not used when
    /// `max_db_bytes` is set (the cap must refuse writes at once).
    pub hot_log: bool,
    /// How often the hot log's undelivered packets move into SQLite.
    /// Default 500 ms.
    pub hot_spill: Duration,
    /// How long a packet another relay holds until we acknowledge it may
    /// stay unlogged, waiting to be delivered (see
    /// [`mailbox::Mailbox::enqueue_federated`]). Default 50 ms.
    pub hot_unlogged: Duration,
    /// Writes that add data (packets, media, archives) are refused with
    /// [`Error::DiskFull`] while the filesystem of the data directory has
    /// less than this free, so the disk never fills up. Default 1 GiB;
    /// 0 turns the check off.
    pub min_free_bytes: u64,
    /// Archives neither written nor read for this long are removed by the
    /// sweeper. Default 180 days.
    pub archive_ttl_ms: u64,
}

impl Config {
    /// Defaults, with everything under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            db_path: None,
            durability: Durability::Process,
            mailbox_ttl_ms: 720 * MS_PER_HOUR,
            mailbox_max_per_dest: 500,
            max_packet_bytes: 256 * 1024,
            media_max_bytes: 50 * 1024 * 1024,
            media_ttl_ms: 168 * MS_PER_HOUR,
            archive_max_bytes: 12 * 1024 * 1024,
            bundle_max_bytes: 16 * 1024,
            opk_max_per_upload: 20,
            opk_max_per_identity: 100,
            opk_max_bytes: 1024,
            address_book_max: 4096,
            writer_queue: 8192,
            writer_batch_max: 1024,
            bulk_bytes_per_sec: 64 * 1024 * 1024,
            reader_connections: 4,
            max_db_bytes: None,
            busy_timeout: Duration::from_secs(5),
            hot_log: true,
            hot_spill: Duration::from_millis(500),
            hot_unlogged: Duration::from_millis(50),
            min_free_bytes: 1024 * 1024 * 1024,
            archive_ttl_ms: 180 * 24 * MS_PER_HOUR,
        }
    }

    /// The database file path.
    pub fn db_path(&self) -> PathBuf {
        self.db_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join(DB_FILE))
    }
}

struct Inner {
    cfg: Config,
    db_path: PathBuf,
    readers: SqlitePool,
    writer: writer::WriterHandle,
    writer_task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    checkpointer: std::sync::Mutex<Option<Checkpointer>>,
    stats: Arc<writer::WriterStats>,
    hot_rows: Option<Arc<std::sync::Mutex<hot::HotRows>>>,
    /// Held until [`Store::close`] (or the last handle goes): one process
    /// per data directory.
    locks: std::sync::Mutex<Vec<lock::DirLock>>,
    /// Free space of the data directory's filesystem, read at most once a
    /// second.
    space: space::Space,
}

type Checkpointer = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
);

/// How often the background checkpointer copies the log into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Copies committed log frames into the database file off the writer's
/// path (`PASSIVE`: never blocks readers or the writer).
async fn checkpoint_loop(mut conn: SqliteConnection, mut stop: tokio::sync::oneshot::Receiver<()>) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            _ = tick.tick() => {
                if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut conn).await {
                    tracing::debug!(error = %e, "checkpoint failed");
                }
            }
        }
    }
    let _ = conn.close().await;
}

/// Opens the mailbox's hot log: moves what a crash left in it into SQLite,
/// empties it, and starts its ids after every id SQLite has used.
async fn open_hot(
    conn: &mut SqliteConnection,
    db_path: &Path,
    cfg: &Config,
) -> Result<hot::HotLog> {
    let path = hot::log_path(db_path);
    let (
        mut log,
        hot::Recovered {
            live,
            max_id: log_max,
            fed_ids,
        },
    ) = hot::HotLog::open(
        path.clone(),
        cfg.durability == Durability::PowerLoss,
        cfg.hot_spill,
    )
    .map_err(|e| Error::io("open the hot log", &path, e))?;
    log.unlogged_for = cfg.hot_unlogged;
    if !live.is_empty() || !fed_ids.is_empty() {
        let mut tx = conn
            .begin()
            .await
            .map_err(|e| Error::db("recover the hot log", db_path, e))?;
        mailbox::insert_with_ids(&mut tx, db_path, &live).await?;
        fed_seen::recover(&mut tx, db_path, &fed_ids).await?;
        tx.commit()
            .await
            .map_err(|e| Error::db("recover the hot log", db_path, e))?;
        tracing::info!(
            packets = live.len(),
            "recovered queued packets from the hot log"
        );
    }
    log.truncate()
        .map_err(|e| Error::io("truncate the hot log", &path, e))?;
    let max: i64 = sqlx::query_scalar(
        "SELECT max(COALESCE((SELECT MAX(id) FROM mailbox), 0), \
         COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'mailbox'), 0))",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| Error::db("read the last packet id", db_path, e))?;
    log.next_id = max.max(log_max).saturating_add(1);
    Ok(log)
}

/// The relay's store. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("db", &self.inner.db_path)
            .finish()
    }
}

fn connect_options(cfg: &Config, path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match cfg.durability {
            Durability::Process => SqliteSynchronous::Normal,
            Durability::PowerLoss => SqliteSynchronous::Full,
        })
        .busy_timeout(cfg.busy_timeout)
        .foreign_keys(true)
        // Sorts and temporary tables stay in memory (a temporary file is
        // created and unlinked for each otherwise); the queries that use
        // them are bounded by their LIMITs.
        .pragma("temp_store", "memory")
}

fn mkdir(path: &Path) -> Result<()> {
    if path.exists() && !path.is_dir() {
        return Err(Error::NotADirectory(path.to_path_buf()));
    }
    std::fs::create_dir_all(path).map_err(|e| Error::io("create directory", path, e))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    let a = if a.as_os_str().is_empty() {
        Path::new(".")
    } else {
        a
    };
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Reads the first bytes of an existing database file to tell a foreign or
/// corrupt file from an SQLite one before SQLite touches it.
pub(crate) fn check_header(path: &Path) -> Result<()> {
    use std::io::Read as _;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("open", path, e)),
    };
    let mut header = [0u8; 16];
    let mut read = 0;
    while read < header.len() {
        match f.read(&mut header[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => return Err(Error::io("read", path, e)),
        }
    }
    if read == 0 {
        return Ok(()); // an empty file becomes a new database
    }
    if read < 16 || &header != b"SQLite format 3\0" {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            detail: "file does not start with the SQLite header".into(),
        });
    }
    Ok(())
}

async fn pragma_i64(conn: &mut SqliteConnection, path: &Path, sql: &'static str) -> Result<i64> {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(conn)
        .await
        .map_err(|e| Error::db("read pragma", path, e))
}

/// Refuses databases of other applications and of newer MeshWhisper
/// versions, before any migration touches them.
pub(crate) async fn check_identity(conn: &mut SqliteConnection, path: &Path) -> Result<()> {
    let app = pragma_i64(conn, path, "PRAGMA application_id").await?;
    let version = pragma_i64(conn, path, "PRAGMA user_version").await?;
    if app != 0 && app != APPLICATION_ID {
        return Err(Error::Foreign {
            path: path.to_path_buf(),
            why: format!("application_id is {app:#x}"),
        });
    }
    if app == 0 {
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
             AND name != '_sqlx_migrations' LIMIT 5",
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| Error::db("list tables", path, e))?;
        if !tables.is_empty() {
            return Err(Error::Foreign {
                path: path.to_path_buf(),
                why: format!("it holds other tables ({})", tables.join(", ")),
            });
        }
    }
    if version > SCHEMA_VERSION {
        return Err(Error::NewerSchema {
            path: path.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// What one call of [`Store::sweep`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Expired queued packets deleted.
    pub mailbox: u64,
    /// Expired media blobs deleted (rows and files).
    pub media: u64,
    /// Archives removed after long inactivity.
    pub archives: u64,
    /// Whether there may be more to do (a limit was reached).
    pub more: bool,
}

impl Store {
    /// Opens (creating if needed) the store described by `cfg`, migrating
    /// the schema. Refuses corrupt, foreign and newer databases.
    pub async fn open(cfg: Config) -> Result<Self> {
        mkdir(&cfg.data_dir)?;
        // Before anything in the directory is touched (tmp/ is emptied,
        // the hot log replayed): one process per data directory.
        let mut locks = vec![lock::DirLock::acquire(&cfg.data_dir, LOCK_FILE)?];
        mkdir(&cfg.data_dir.join("media"))?;
        mkdir(&cfg.data_dir.join("archive"))?;
        let tmp = cfg.data_dir.join("tmp");
        mkdir(&tmp)?;
        clear_dir(&tmp)?;
        let db_path = cfg.db_path();
        if let Some(parent) = db_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            mkdir(parent)?;
        }
        if let (Some(parent), Some(name)) = (db_path.parent(), db_path.file_name())
            && !same_dir(parent, &cfg.data_dir)
        {
            let name = format!("{}.lock", name.to_string_lossy());
            locks.push(lock::DirLock::acquire(parent, &name)?);
        }
        check_header(&db_path)?;

        let opts = connect_options(&cfg, &db_path).create_if_missing(true);
        let mut conn = SqliteConnection::connect_with(&opts)
            .await
            .map_err(|e| Error::db("open", &db_path, e))?;
        check_identity(&mut conn, &db_path).await?;
        sqlx::migrate!("./migrations")
            .run(&mut conn)
            .await
            .map_err(|source| Error::Migrate {
                path: db_path.clone(),
                source,
            })?;
        // Checkpoints copy the log into the database and fsync it; a
        // background task does that (below) so the writer never stalls on
        // it. The writer checkpoints itself only past this safety bound.
        sqlx::query("PRAGMA wal_autocheckpoint = 16384")
            .execute(&mut conn)
            .await
            .map_err(|e| Error::db("set wal_autocheckpoint", &db_path, e))?;
        if let Some(max) = cfg.max_db_bytes {
            let page = pragma_i64(&mut conn, &db_path, "PRAGMA page_size").await?;
            let pages = (max / page.max(512) as u64).max(1);
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "PRAGMA max_page_count = {pages}"
            )))
            .execute(&mut conn)
            .await
            .map_err(|e| Error::db("set max_page_count", &db_path, e))?;
        }

        // Readers serve small indexed lookups: a 512 KiB page cache each
        // (SQLite's default is 2 MiB) keeps the relay's memory small.
        let readers = SqlitePoolOptions::new()
            .max_connections(cfg.reader_connections.max(1))
            .connect_with(connect_options(&cfg, &db_path).pragma("cache_size", "-512"))
            .await
            .map_err(|e| Error::db("open readers", &db_path, e))?;

        // With a size cap the cap must refuse writes at once, which the hot
        // tier would postpone to its next spill: packets go straight to SQLite.
        let hot = if cfg.hot_log && cfg.max_db_bytes.is_none() {
            Some(open_hot(&mut conn, &db_path, &cfg).await?)
        } else {
            None
        };
        let hot_rows = hot.as_ref().map(|h| h.rows.clone());
        let seen = fed_seen::FedSeen::load(&mut conn, &db_path).await?;
        let ctx = writer::WriterCtx {
            conn,
            path: db_path.clone(),
            counts: mailbox::MailboxCounts::default(),
            mailbox_max_per_dest: cfg.mailbox_max_per_dest.max(1),
            hot,
            seen,
            seen_spilled: false,
        };
        let stats = Arc::new(writer::WriterStats::default());
        let (writer, task) = writer::spawn(
            ctx,
            cfg.writer_queue,
            cfg.writer_batch_max,
            cfg.bulk_bytes_per_sec,
            stats.clone(),
        );
        let checkpointer = SqliteConnection::connect_with(&connect_options(&cfg, &db_path))
            .await
            .map_err(|e| Error::db("open checkpointer", &db_path, e))?;
        let (checkpoint_stop, stop_rx) = tokio::sync::oneshot::channel();
        let checkpoint_task = tokio::spawn(checkpoint_loop(checkpointer, stop_rx));
        tracing::debug!(db = %db_path.display(), "store opened");
        let store = Self {
            inner: Arc::new(Inner {
                cfg,
                db_path,
                readers,
                writer,
                writer_task: tokio::sync::Mutex::new(Some(task)),
                checkpointer: std::sync::Mutex::new(Some((checkpoint_stop, checkpoint_task))),
                stats,
                hot_rows,
                locks: std::sync::Mutex::new(locks),
                space: space::Space::new(),
            }),
        };
        // Nothing is uploading yet, so files without rows are leftovers.
        let orphans = store.media().remove_orphans().await?;
        if orphans > 0 {
            tracing::info!(orphans, "removed media files left by an interrupted write");
        }
        Ok(store)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    /// The database file.
    pub fn db_path(&self) -> &Path {
        &self.inner.db_path
    }

    /// The queued-packet store.
    pub fn mailbox(&self) -> mailbox::Mailbox<'_> {
        mailbox::Mailbox { store: self }
    }

    /// The prekey and username directory.
    pub fn directory(&self) -> directory::Directory<'_> {
        directory::Directory { store: self }
    }

    /// Encrypted media blobs.
    pub fn media(&self) -> media::Media<'_> {
        media::Media { store: self }
    }

    /// Encrypted archives.
    pub fn archive(&self) -> archive::Archive<'_> {
        archive::Archive { store: self }
    }

    /// Push wake registrations.
    pub fn push(&self) -> push::Push<'_> {
        push::Push { store: self }
    }

    /// Destination hashes homed at this relay.
    pub fn homed(&self) -> homed::Homed<'_> {
        homed::Homed { store: self }
    }

    /// Signed relay address records.
    pub fn address_book(&self) -> address_book::AddressBook<'_> {
        address_book::AddressBook { store: self }
    }

    /// Refuses a write that adds data when the disk is nearly full
    /// ([`Config::min_free_bytes`]).
    pub fn check_space(&self) -> Result<()> {
        let cfg = &self.inner.cfg;
        if cfg.min_free_bytes == 0 {
            return Ok(());
        }
        match self.inner.space.free(&cfg.data_dir) {
            Some(free) if free < cfg.min_free_bytes => Err(Error::DiskFull {
                path: cfg.data_dir.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Free bytes on the data directory's filesystem (cached for a second).
    pub fn free_bytes(&self) -> Option<u64> {
        self.inner.space.free(&self.inner.cfg.data_dir)
    }

    pub(crate) fn readers(&self) -> &SqlitePool {
        &self.inner.readers
    }

    pub(crate) fn hot_rows(&self) -> Option<&Arc<std::sync::Mutex<hot::HotRows>>> {
        self.inner.hot_rows.as_ref()
    }

    pub(crate) fn writer(&self) -> &writer::WriterHandle {
        &self.inner.writer
    }

    /// Runs a `SELECT COUNT(*)` on a reader.
    pub(crate) async fn count(&self, sql: &'static str) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(sql)
            .fetch_one(self.readers())
            .await
            .map_err(|e| self.db_err("count", e))?;
        Ok(n.max(0) as u64)
    }

    pub(crate) fn inner_stats(&self) -> &writer::WriterStats {
        &self.inner.stats
    }

    pub(crate) fn db_err(&self, context: &'static str, e: sqlx::Error) -> Error {
        Error::db(context, &self.inner.db_path, e)
    }

    /// Transactions committed by the writer so far, and operations in them.
    pub fn commit_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.inner.stats.batches.load(Relaxed),
            self.inner.stats.ops.load(Relaxed),
        )
    }

    /// Packets from other relays held unlogged so far: delivered before
    /// they were written, and written after all (see
    /// [`mailbox::Mailbox::enqueue_federated`]).
    pub fn unlogged_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.inner.stats.unlogged_delivered.load(Relaxed),
            self.inner.stats.unlogged_logged.load(Relaxed),
        )
    }

    /// Deletes expired packets and media, at most `budget` of each per
    /// call, so a sweep never holds the writer for long. Call it
    /// periodically; `more` says whether another call would find work.
    pub async fn sweep(&self, now_ms: u64, budget: u32) -> Result<SweepReport> {
        let mailbox = self.mailbox().expire(now_ms, budget).await?;
        let media = self.media().expire(now_ms, budget).await?;
        let archives = self
            .archive()
            .expire(now_ms.saturating_sub(self.inner.cfg.archive_ttl_ms), budget)
            .await?;
        Ok(SweepReport {
            mailbox,
            media,
            archives,
            more: mailbox >= u64::from(budget)
                || media >= u64::from(budget)
                || archives >= u64::from(budget),
        })
    }

    /// Writes a consistent copy of the database to `out` while writes go
    /// on (`VACUUM INTO` reads one snapshot). `out` must not exist. Media
    /// and archive files are not included: copy those directories after.
    pub async fn backup_to(&self, out: &Path) -> Result<()> {
        backup_database(&self.inner.db_path, out, self.inner.cfg.busy_timeout).await
    }

    /// Stops the writer after it has committed everything queued, and
    /// closes all connections.
    pub async fn close(&self) {
        let cp = match self.inner.checkpointer.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some((stop, task)) = cp {
            let _ = stop.send(());
            let _ = task.await;
        }
        let task = self.inner.writer_task.lock().await.take();
        if let Some(task) = task {
            self.inner.writer.shutdown().await;
            let _ = task.await;
        }
        self.inner.readers.close().await;
        // Closed: another store (a restart in this process) may open the
        // directory now.
        match self.inner.locks.lock() {
            Ok(mut g) => g.clear(),
            Err(p) => p.into_inner().clear(),
        }
    }
}

fn clear_dir(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("read directory", dir, e))?;
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_file() {
            let _ = std::fs::remove_file(&p);
        }
    }
    Ok(())
}

/// Fresh random bytes from the operating system.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|e| Error::Io {
        op: "read randomness",
        path: PathBuf::from("getrandom"),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(out)
}

/// Milliseconds → SQLite INTEGER (saturating; times beyond 2^63 ms do not occur).
pub(crate) fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
