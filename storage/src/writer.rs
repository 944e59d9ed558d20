//! The single writer: one task owns the only writing connection and commits
//! queued operations in groups.
//!
//! Callers send an [`Op`] over a bounded channel and await a oneshot reply.
//! The writer takes everything queued (up to `writer_batch_max`), runs it in
//! one `BEGIN IMMEDIATE … COMMIT`, and answers each caller only after the
//! commit returned: an `Ok` reply means the change is in the WAL and
//! survives the process being killed. Consecutive mailbox enqueues become
//! one multi-row `INSERT`. Forgetting federated ids is its own operation (it
//! touches SQLite only for ids already spilled there). Other operations run
//! as jobs inside a savepoint:
//! a job that fails with a logical error (a taken username, a wrong token)
//! is rolled back alone; a database-level failure (full disk, I/O) aborts
//! the whole group, and every caller in it gets the error.
//!
//! Because every write goes through this one connection, writes never
//! contend for SQLite's lock, and read-modify-write jobs (claiming a
//! one-time prekey, taking a username) are atomic without retries.
//!
//! Operations come in two lanes: enqueues carrying a packet of more than
//! [`BULK_PACKET_BYTES`], and those their caller sends there
//! ([`crate::mailbox::Lane::Bulk`]: a client storing much for recipients
//! who are away), go to the bulk lane, everything else (however many small
//! packets) to the main one. A group takes everything waiting in the main lane and at most
//! [`BULK_GROUP_BYTES`] from the bulk lane, and the bulk lane is paced to
//! `bulk_bytes_per_sec`: clients streaming large packets make others wait
//! for one bulk share at most, and cannot take all of the disk's bandwidth
//! (writes stall for everyone once the kernel throttles dirty pages). (Packets in different lanes may commit in a
//! different order than they were sent.)

use crate::error::{Error, Result};
use crate::mailbox::{Enqueued, MailboxCounts};
use futures::future::BoxFuture;
use sqlx::{Connection as _, SqliteConnection};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};

/// What the writer task owns and lends to jobs.
pub(crate) struct WriterCtx {
    pub(crate) conn: SqliteConnection,
    pub(crate) path: PathBuf,
    pub(crate) counts: MailboxCounts,
    pub(crate) mailbox_max_per_dest: u32,
    /// The mailbox's hot tier, when enabled.
    pub(crate) hot: Option<crate::hot::HotLog>,
    /// Federated packet ids stored here.
    pub(crate) seen: crate::fed_seen::FedSeen,
    /// The group's spill moved `seen`'s recent ids into the table.
    pub(crate) seen_spilled: bool,
}

impl WriterCtx {
    pub(crate) fn db_err(&self, context: &'static str, e: sqlx::Error) -> Error {
        Error::db(context, &self.path, e)
    }

    async fn exec(&mut self, context: &'static str, sql: &'static str) -> Result<()> {
        sqlx::query(sql)
            .execute(&mut self.conn)
            .await
            .map(|_| ())
            .map_err(|e| Error::db(context, &self.path, e))
    }
}

/// A closure run by the writer inside the group transaction.
pub(crate) type JobFn<T> =
    Box<dyn for<'c> FnOnce(&'c mut WriterCtx) -> BoxFuture<'c, Result<T>> + Send>;

/// A type-erased job with its reply channel.
trait Job: Send {
    fn run<'c>(&'c mut self, ctx: &'c mut WriterCtx) -> BoxFuture<'c, Outcome>;
    fn finish(self: Box<Self>, commit: Result<(), Error>);
}

/// How a job's run ended.
enum Outcome {
    Ok,
    /// A logical failure: roll back this job only.
    Refused,
    /// A database failure: abort the group.
    Fatal(Error),
}

struct ClosureJob<T> {
    f: Option<JobFn<T>>,
    result: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

fn is_fatal(e: &Error) -> bool {
    matches!(
        e,
        Error::Database { .. } | Error::DiskFull { .. } | Error::Corrupt { .. } | Error::Io { .. }
    )
}

impl<T: Send + 'static> Job for ClosureJob<T> {
    fn run<'c>(&'c mut self, ctx: &'c mut WriterCtx) -> BoxFuture<'c, Outcome> {
        Box::pin(async move {
            let Some(f) = self.f.take() else {
                return Outcome::Refused;
            };
            match f(ctx).await {
                Ok(v) => {
                    self.result = Some(Ok(v));
                    Outcome::Ok
                }
                Err(e) if is_fatal(&e) => {
                    let copy = replicate(&e);
                    self.result = Some(Err(e));
                    Outcome::Fatal(copy)
                }
                Err(e) => {
                    self.result = Some(Err(e));
                    Outcome::Refused
                }
            }
        })
    }

    fn finish(self: Box<Self>, commit: Result<(), Error>) {
        let reply = match (commit, self.result) {
            (Err(e), _) => Err(e),
            (Ok(()), Some(r)) => r,
            (Ok(()), None) => Err(Error::Closed),
        };
        let _ = self.reply.send(reply);
    }
}

/// One packet to queue.
pub(crate) struct Row {
    pub(crate) dest: [u8; 8],
    pub(crate) packet: bytes::Bytes,
    pub(crate) received_ms: u64,
    pub(crate) expires_ms: u64,
    /// The home relay the sender named.
    pub(crate) route: Option<[u8; 32]>,
    /// Stored for another relay under this federated id (remembered until
    /// the given time): not stored again if already seen.
    pub(crate) fed: Option<(crate::fed_seen::FedId, u64)>,
    /// Held unlogged (with the hot tier on) until delivered or due; the
    /// enqueue's [`crate::hot::Settle`] hears when.
    pub(crate) unlogged: Option<Arc<crate::hot::Settle>>,
}

/// Where an enqueue's result goes: one packet or a batch.
pub(crate) enum Reply {
    One(oneshot::Sender<Result<Enqueued>>),
    Many(oneshot::Sender<Result<Vec<Enqueued>>>),
}

impl Reply {
    fn ok(self, v: Vec<Enqueued>) {
        match self {
            Reply::One(tx) => {
                let _ = tx.send(v.into_iter().next().ok_or(Error::Closed));
            }
            Reply::Many(tx) => {
                let _ = tx.send(Ok(v));
            }
        }
    }

    fn err(self, e: Error) {
        match self {
            Reply::One(tx) => {
                let _ = tx.send(Err(e));
            }
            Reply::Many(tx) => {
                let _ = tx.send(Err(e));
            }
        }
    }
}

/// Mailbox enqueues, batched with their neighbours into multi-row INSERTs.
pub(crate) struct EnqueueOp {
    pub(crate) rows: Vec<Row>,
    pub(crate) reply: Reply,
    /// Told once the enqueue committed and its unlogged packets are
    /// logged or delivered.
    pub(crate) settle: Option<Arc<crate::hot::Settle>>,
    /// The caller asks for the bulk lane (see [`crate::mailbox::Lane`]).
    pub(crate) bulk: bool,
}

/// Deletions of delivered packets, merged with their neighbours into one
/// statement.
pub(crate) struct DeleteOp {
    pub(crate) ids: Vec<i64>,
    pub(crate) reply: oneshot::Sender<Result<u64>>,
}

/// Federated ids to forget (their senders have the acks).
pub(crate) struct ForgetOp {
    pub(crate) ids: Vec<crate::fed_seen::FedId>,
    pub(crate) reply: oneshot::Sender<Result<u64>>,
}

/// Errors are not `Clone`; give each caller of a failed group its own copy.
pub(crate) fn replicate(e: &Error) -> Error {
    match e {
        Error::DiskFull { path } => Error::DiskFull { path: path.clone() },
        Error::Corrupt { path, detail } => Error::Corrupt {
            path: path.clone(),
            detail: detail.clone(),
        },
        Error::Closed => Error::Closed,
        other => Error::Database {
            context: "group commit",
            path: PathBuf::new(),
            source: sqlx::Error::Protocol(other.to_string()),
        },
    }
}

/// Enqueues with a packet larger than this go to the bulk lane.
pub(crate) const BULK_PACKET_BYTES: usize = 16 * 1024;
/// Packet bytes a group takes from the bulk lane (at least one op).
pub(crate) const BULK_GROUP_BYTES: usize = 1024 * 1024;

/// The handle callers use to reach the writer.
#[derive(Clone)]
pub(crate) struct WriterHandle {
    tx: mpsc::Sender<Msg>,
    bulk: mpsc::Sender<Msg>,
}

fn is_bulk(op: &EnqueueOp) -> bool {
    op.bulk || op.rows.iter().any(|r| r.packet.len() > BULK_PACKET_BYTES)
}

/// The packet bytes of a bulk-lane operation (0 for any other).
fn bulk_bytes(m: &Msg) -> usize {
    match m {
        Msg::Enqueue(op) if is_bulk(op) => op.rows.iter().map(|r| r.packet.len()).sum(),
        _ => 0,
    }
}

enum Msg {
    Enqueue(EnqueueOp),
    Delete(DeleteOp),
    Forget(ForgetOp),
    Job(Box<dyn Job>),
    /// Commit what came before, then stop.
    Shutdown,
}

impl WriterHandle {
    pub(crate) async fn delete(&self, op: DeleteOp) -> Result<()> {
        self.tx
            .send(Msg::Delete(op))
            .await
            .map_err(|_| Error::Closed)
    }

    pub(crate) async fn forget(&self, op: ForgetOp) -> Result<()> {
        self.tx
            .send(Msg::Forget(op))
            .await
            .map_err(|_| Error::Closed)
    }

    pub(crate) async fn enqueue(&self, op: EnqueueOp) -> Result<()> {
        let lane = if is_bulk(&op) { &self.bulk } else { &self.tx };
        lane.send(Msg::Enqueue(op)).await.map_err(|_| Error::Closed)
    }

    /// Asks the writer to stop once everything queued before is committed.
    pub(crate) async fn shutdown(&self) {
        let _ = self.tx.send(Msg::Shutdown).await;
    }

    /// Runs `f` in the writer and returns its result once committed.
    pub(crate) async fn run<T: Send + 'static>(&self, f: JobFn<T>) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let job = ClosureJob {
            f: Some(f),
            result: None,
            reply,
        };
        self.tx
            .send(Msg::Job(Box::new(job)))
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }
}

/// Counters the writer keeps for metrics.
#[derive(Debug, Default)]
pub(crate) struct WriterStats {
    pub(crate) evicted: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) ops: AtomicU64,
    /// Packets held unlogged and delivered before they were written.
    pub(crate) unlogged_delivered: AtomicU64,
    /// Packets held unlogged and written after all (not delivered in time).
    pub(crate) unlogged_logged: AtomicU64,
}

/// Starts the writer task.
pub(crate) fn spawn(
    ctx: WriterCtx,
    queue: usize,
    batch_max: usize,
    bulk_rate: u64,
    stats: Arc<WriterStats>,
) -> (WriterHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(queue.max(1));
    let (bulk, bulk_rx) = mpsc::channel(queue.max(1));
    let task = tokio::spawn(run(ctx, rx, bulk_rx, batch_max.max(1), bulk_rate, stats));
    (WriterHandle { tx, bulk }, task)
}

async fn run(
    mut ctx: WriterCtx,
    mut rx: mpsc::Receiver<Msg>,
    mut bulk_rx: mpsc::Receiver<Msg>,
    batch_max: usize,
    bulk_rate: u64,
    stats: Arc<WriterStats>,
) {
    let mut batch = Vec::with_capacity(batch_max);
    let mut main_open = true;
    let mut bulk_open = true;
    // When the bulk lane may be read again (its bytes pace it).
    let mut bulk_at = tokio::time::Instant::now();
    let pace = |bytes: usize| match bulk_rate {
        0 => std::time::Duration::ZERO,
        r => std::time::Duration::from_secs_f64(bytes as f64 / r as f64),
    };
    while main_open || bulk_open {
        let bulk_ready = tokio::time::Instant::now() >= bulk_at;
        let log_due = ctx
            .hot
            .as_ref()
            .and_then(|h| h.next_log_due())
            .map(tokio::time::Instant::from_std);
        // Wait for one operation in either lane, main first; the bulk lane
        // only when its pace allows.
        tokio::select! {
            biased;
            n = rx.recv_many(&mut batch, batch_max), if main_open => {
                if n == 0 {
                    main_open = false;
                }
            }
            m = bulk_rx.recv(), if bulk_open && bulk_ready => match m {
                Some(m) => batch.push(m),
                None => bulk_open = false,
            },
            _ = tokio::time::sleep_until(bulk_at), if bulk_open && !bulk_ready => continue,
            // Unlogged packets whose time is up: a group of their own logs
            // them (nothing else may come for a while).
            _ = tokio::time::sleep_until(log_due.unwrap_or_else(tokio::time::Instant::now)), if log_due.is_some() => {
                stats.batches.fetch_add(1, Ordering::Relaxed);
                process(&mut ctx, Vec::new(), &stats).await;
                continue;
            }
        }
        // Then whatever else waits in the main lane, and a share of bulk.
        while batch.len() < batch_max {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut taken: usize = batch.iter().map(bulk_bytes).sum();
        if tokio::time::Instant::now() >= bulk_at {
            while taken < BULK_GROUP_BYTES && batch.len() < batch_max {
                match bulk_rx.try_recv() {
                    Ok(m) => {
                        taken += bulk_bytes(&m);
                        batch.push(m);
                    }
                    Err(_) => break,
                }
            }
        }
        if taken > 0 {
            bulk_at = bulk_at.max(tokio::time::Instant::now()) + pace(taken);
        }
        let stop = batch.iter().position(|m| matches!(m, Msg::Shutdown));
        if let Some(i) = stop {
            // Operations after the stop are dropped: their callers see the
            // store closed. Bulk operations queued before it still commit.
            batch.truncate(i);
            while let Ok(m) = bulk_rx.try_recv() {
                batch.push(m);
            }
        }
        if !batch.is_empty() {
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats.ops.fetch_add(batch.len() as u64, Ordering::Relaxed);
            process(&mut ctx, std::mem::take(&mut batch), &stats).await;
        }
        if stop.is_some() {
            break;
        }
    }
    // Leave nothing in the hot log: spill it all in a last group.
    if let Some(hot) = ctx.hot.as_mut() {
        hot.force_spill();
        process(&mut ctx, Vec::new(), &stats).await;
    }
    let _ = ctx.conn.close().await;
}

enum Done {
    Enqueue(Reply, Vec<Enqueued>, Option<Arc<crate::hot::Settle>>),
    Delete(oneshot::Sender<Result<u64>>, u64),
    Job(Box<dyn Job>),
}

async fn process(ctx: &mut WriterCtx, batch: Vec<Msg>, stats: &WriterStats) {
    let mut done: Vec<Done> = Vec::with_capacity(batch.len());
    // A group of only enqueues, deletes and forgets, with the hot tier on
    // and no spill due, needs no SQLite transaction: the log append is the
    // commit (the occasional SQLite statement in it — a count, an eviction,
    // the delete of a spilled packet or of a spilled federated id — runs on
    // its own).
    let light = ctx.hot.as_ref().is_some_and(|h| !h.spill_due())
        && batch
            .iter()
            .all(|m| matches!(m, Msg::Enqueue(_) | Msg::Delete(_) | Msg::Forget(_)));
    // Unlogged packets whose time is up are logged by this group.
    if let Some(hot) = ctx.hot.as_mut() {
        let mut fed = Vec::new();
        hot.log_due(None, &mut fed);
        ctx.seen.confirm(&fed);
    }
    let mut pending: Vec<Msg> = batch;
    pending.reverse();
    if !light && let Err(e) = ctx.exec("begin", "BEGIN IMMEDIATE").await {
        fail_all(pending.into_iter().filter_map(msg_to_failed), &e);
        return;
    }
    let mut fatal: Option<Error> = None;
    let mut evicted_total = 0u64;
    while let Some(msg) = pending.pop() {
        if fatal.is_some() {
            pending.push(msg);
            break;
        }
        match msg {
            Msg::Enqueue(first) => {
                let mut rows = first.rows.len();
                let mut group = vec![first];
                while rows < crate::mailbox::MAX_ROWS_PER_INSERT {
                    match pending.pop() {
                        Some(Msg::Enqueue(op)) => {
                            rows += op.rows.len();
                            group.push(op);
                        }
                        Some(other) => {
                            pending.push(other);
                            break;
                        }
                        None => break,
                    }
                }
                let all: Vec<&Row> = group.iter().flat_map(|op| op.rows.iter()).collect();
                let inserted = if ctx.hot.is_some() {
                    crate::mailbox::hot_insert_group(ctx, &all).await
                } else {
                    crate::mailbox::insert_group(ctx, &all).await
                };
                match inserted {
                    Ok(results) => {
                        let mut results = results.into_iter();
                        for op in group {
                            let mine: Vec<Enqueued> =
                                results.by_ref().take(op.rows.len()).collect();
                            evicted_total += mine.iter().map(|r| u64::from(r.evicted)).sum::<u64>();
                            done.push(Done::Enqueue(op.reply, mine, op.settle));
                        }
                    }
                    Err(e) => {
                        for op in group {
                            op.reply.err(replicate(&e));
                        }
                        fatal = Some(e);
                    }
                }
            }
            Msg::Delete(first) => {
                let mut group = vec![first];
                while let Some(m) = pending.pop() {
                    match m {
                        Msg::Delete(op) => group.push(op),
                        other => {
                            pending.push(other);
                            break;
                        }
                    }
                }
                let all: Vec<i64> = group.iter().flat_map(|op| op.ids.iter().copied()).collect();
                let (hot_gone, rest) = crate::mailbox::hot_delete(ctx, &all);
                let deleted = if rest.is_empty() {
                    Ok(hot_gone)
                } else {
                    crate::mailbox::delete_group(ctx, &rest).await.map(|mut g| {
                        g.extend(hot_gone);
                        g
                    })
                };
                match deleted {
                    Ok(gone) => {
                        for op in group {
                            let n = op.ids.iter().filter(|i| gone.contains(i)).count() as u64;
                            done.push(Done::Delete(op.reply, n));
                        }
                    }
                    Err(e) => {
                        for op in group {
                            let _ = op.reply.send(Err(replicate(&e)));
                        }
                        fatal = Some(e);
                    }
                }
            }
            Msg::Forget(op) => {
                let WriterCtx {
                    seen, conn, path, ..
                } = &mut *ctx;
                match seen.forget(conn, path, &op.ids).await {
                    Ok(n) => done.push(Done::Delete(op.reply, n)),
                    Err(e) => {
                        let _ = op.reply.send(Err(replicate(&e)));
                        fatal = Some(e);
                    }
                }
            }
            Msg::Job(mut job) => {
                if let Err(e) = ctx.exec("savepoint", "SAVEPOINT job").await {
                    job.finish(Err(replicate(&e)));
                    fatal = Some(e);
                    continue;
                }
                match job.run(ctx).await {
                    Outcome::Ok => {
                        if let Err(e) = ctx.exec("release savepoint", "RELEASE job").await {
                            job.finish(Err(replicate(&e)));
                            fatal = Some(e);
                            continue;
                        }
                        done.push(Done::Job(job));
                    }
                    Outcome::Refused => {
                        let rolled = ctx.exec("rollback savepoint", "ROLLBACK TO job").await;
                        let released = ctx.exec("release savepoint", "RELEASE job").await;
                        if let Err(e) = rolled.and(released) {
                            job.finish(Err(replicate(&e)));
                            fatal = Some(e);
                            continue;
                        }
                        // The job's own (logical) error is its reply.
                        job.finish(Ok(()));
                    }
                    Outcome::Fatal(e) => {
                        job.finish(Err(replicate(&e)));
                        fatal = Some(e);
                    }
                }
            }
            Msg::Shutdown => {}
        }
    }
    if fatal.is_none()
        && !light
        && ctx.hot.as_ref().is_some_and(|h| h.spill_due())
        && let Err(e) = crate::mailbox::spill(ctx).await
    {
        fatal = Some(e);
    }
    if fatal.is_none()
        && let Some(hot) = ctx.hot.as_mut()
        && let Err(e) = hot.flush()
    {
        fatal = Some(Error::io("append to the hot log", hot.path(), e));
    }
    if let Some(e) = fatal {
        if !light {
            let _ = ctx.exec("rollback", "ROLLBACK").await;
        }
        ctx.counts.clear();
        ctx.seen_spilled = false;
        roll_back_hot(ctx);
        fail_done(done, &e);
        fail_all(pending.into_iter().filter_map(msg_to_failed), &e);
        return;
    }
    let committed = if light {
        Ok(())
    } else {
        ctx.exec("commit", "COMMIT").await
    };
    match committed {
        Ok(()) => {
            if let Some(hot) = ctx.hot.as_mut() {
                hot.committed(stats);
            }
            if std::mem::take(&mut ctx.seen_spilled) {
                ctx.seen.spilled();
            }
            stats.evicted.fetch_add(evicted_total, Ordering::Relaxed);
            for d in done {
                match d {
                    Done::Enqueue(reply, r, settle) => {
                        reply.ok(r);
                        if let Some(s) = settle {
                            s.done();
                        }
                    }
                    Done::Delete(reply, n) => {
                        let _ = reply.send(Ok(n));
                    }
                    Done::Job(job) => job.finish(Ok(())),
                }
            }
        }
        Err(e) => {
            let _ = ctx.exec("rollback", "ROLLBACK").await;
            ctx.counts.clear();
            ctx.seen_spilled = false;
            roll_back_hot(ctx);
            fail_done(done, &e);
        }
    }
}

/// Undoes a failed group's changes to the hot tier, and to the federated
/// ids of its unlogged packets.
fn roll_back_hot(ctx: &mut WriterCtx) {
    if let Some(hot) = ctx.hot.as_mut() {
        let undone = hot.rolled_back();
        ctx.seen.unconfirm(&undone.unlogged_again);
        ctx.seen.unclaim(&undone.gone);
        ctx.seen.unrecord(&undone.gone_logged);
    }
}

enum Failed {
    Enqueue(Reply),
    Delete(oneshot::Sender<Result<u64>>),
    Job(Box<dyn Job>),
}

fn msg_to_failed(m: Msg) -> Option<Failed> {
    match m {
        Msg::Enqueue(op) => Some(Failed::Enqueue(op.reply)),
        Msg::Delete(op) => Some(Failed::Delete(op.reply)),
        Msg::Forget(op) => Some(Failed::Delete(op.reply)),
        Msg::Job(j) => Some(Failed::Job(j)),
        Msg::Shutdown => None,
    }
}

fn fail_all(items: impl Iterator<Item = Failed>, e: &Error) {
    for f in items {
        match f {
            Failed::Enqueue(reply) => reply.err(replicate(e)),
            Failed::Delete(reply) => {
                let _ = reply.send(Err(replicate(e)));
            }
            Failed::Job(job) => job.finish(Err(replicate(e))),
        }
    }
}

fn fail_done(done: Vec<Done>, e: &Error) {
    fail_all(
        done.into_iter().map(|d| match d {
            Done::Enqueue(reply, _, _) => Failed::Enqueue(reply),
            Done::Delete(reply, _) => Failed::Delete(reply),
            Done::Job(j) => Failed::Job(j),
        }),
        e,
    );
}
