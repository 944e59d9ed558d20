//! Enqueue throughput: group commit (the store's writer) against one
//! transaction per insert, in the same run, for both durability settings.
//!
//! `cargo bench -p meshwhisper-storage --bench enqueue`
//! Prints a markdown table; figures are recorded in docs/benchmarks.md.

use meshwhisper_crypto::destination::DestHash;
use meshwhisper_storage::{Config, Durability, Store};
use sqlx::Connection as _;
use std::time::{Duration, Instant};

const PACKET: usize = 1024;
const NOW: u64 = 1_700_000_000_000;

fn config(dir: &std::path::Path, durability: Durability) -> Config {
    let mut c = Config::new(dir);
    c.durability = durability;
    c.mailbox_max_per_dest = u32::MAX;
    c
}

/// One INSERT per transaction on a plain connection with the same pragmas.
async fn naive(durability: Durability, budget: Duration, max: u64) -> (u64, Duration) {
    let dir = tempfile::tempdir().expect("tmp");
    Store::open(config(dir.path(), durability))
        .await
        .expect("schema")
        .close()
        .await;
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.path().join(meshwhisper_storage::DB_FILE))
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .synchronous(match durability {
            Durability::Process => sqlx::sqlite::SqliteSynchronous::Normal,
            Durability::PowerLoss => sqlx::sqlite::SqliteSynchronous::Full,
        });
    let mut conn = sqlx::SqliteConnection::connect_with(&opts)
        .await
        .expect("connect");
    let packet = vec![0x5au8; PACKET];
    let start = Instant::now();
    let mut n = 0u64;
    while n < max && start.elapsed() < budget {
        let mut tx = conn.begin().await.expect("begin");
        sqlx::query(
            "INSERT INTO mailbox (dest, packet, received_ms, expires_ms) VALUES (?, ?, ?, ?)",
        )
        .bind((n % 64).to_be_bytes().to_vec())
        .bind(&packet)
        .bind(NOW as i64)
        .bind((NOW + 1) as i64)
        .execute(&mut *tx)
        .await
        .expect("insert");
        tx.commit().await.expect("commit");
        n += 1;
    }
    (n, start.elapsed())
}

/// `tasks` concurrent callers of `Store::enqueue`, `total` packets.
async fn grouped(durability: Durability, tasks: u64, total: u64) -> (u64, Duration, f64) {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(config(dir.path(), durability))
        .await
        .expect("open");
    let per = total / tasks;
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let s = store.clone();
            tokio::spawn(async move {
                for i in 0..per {
                    let dest = DestHash(((t * per + i) % 64).to_be_bytes());
                    s.mailbox()
                        .enqueue(dest, vec![0x5au8; PACKET], NOW)
                        .await
                        .expect("enqueue");
                }
            })
        })
        .collect();
    for h in handles {
        h.await.expect("join");
    }
    let elapsed = start.elapsed();
    let (batches, ops) = store.commit_stats();
    store.close().await;
    (per * tasks, elapsed, ops as f64 / batches.max(1) as f64)
}

/// `tasks` callers, each keeping `depth` enqueues in flight (as the relay's
/// connection sessions do), `total` packets.
async fn pipelined(
    durability: Durability,
    tasks: u64,
    depth: usize,
    total: u64,
) -> (u64, Duration, f64) {
    use futures::StreamExt as _;
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(config(dir.path(), durability))
        .await
        .expect("open");
    let per = total / tasks;
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let s = store.clone();
            tokio::spawn(async move {
                let mut inflight = futures::stream::FuturesUnordered::new();
                let mut next = 0u64;
                while next < per || !inflight.is_empty() {
                    while next < per && inflight.len() < depth {
                        let dest = DestHash(((t * per + next) % 64).to_be_bytes());
                        let s = s.clone();
                        inflight.push(async move {
                            s.mailbox().enqueue(dest, vec![0x5au8; PACKET], NOW).await
                        });
                        next += 1;
                    }
                    if let Some(r) = inflight.next().await {
                        r.expect("enqueue");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.await.expect("join");
    }
    let elapsed = start.elapsed();
    let (batches, ops) = store.commit_stats();
    store.close().await;
    (per * tasks, elapsed, ops as f64 / batches.max(1) as f64)
}

/// `tasks` callers, each sending batches of `batch` through `enqueue_many`.
async fn batched(
    durability: Durability,
    tasks: u64,
    batch: u64,
    total: u64,
) -> (u64, Duration, f64) {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(config(dir.path(), durability))
        .await
        .expect("open");
    let per = total / tasks;
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let s = store.clone();
            tokio::spawn(async move {
                let mut i = 0;
                while i < per {
                    let n = batch.min(per - i);
                    let packets = (i..i + n)
                        .map(|k| {
                            (
                                DestHash(((t * per + k) % 64).to_be_bytes()),
                                vec![0x5au8; PACKET],
                            )
                        })
                        .collect();
                    s.mailbox()
                        .enqueue_many(packets, NOW)
                        .await
                        .expect("enqueue");
                    i += n;
                }
            })
        })
        .collect();
    for h in handles {
        h.await.expect("join");
    }
    let elapsed = start.elapsed();
    let (batches, ops) = store.commit_stats();
    store.close().await;
    let rows_per_commit = (per * tasks) as f64 / batches.max(1) as f64;
    let _ = ops;
    (per * tasks, elapsed, rows_per_commit)
}

/// The ceiling: one caller, batches of 512 (the writer's largest group),
/// so caller wake-ups are negligible and only SQLite and sqlx remain.
async fn ceiling(durability: Durability, total: u64) -> (u64, Duration, f64) {
    batched_with(durability, 1, 512, total).await
}

async fn batched_with(
    durability: Durability,
    tasks: u64,
    batch: u64,
    total: u64,
) -> (u64, Duration, f64) {
    batched(durability, tasks, batch, total).await
}

fn main() {
    // `cargo bench` passes `--bench`; accept and ignore libtest flags.
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::env::var("BENCH_WORKERS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2),
        )
        .enable_all()
        .build()
        .expect("runtime");
    let total = if quick { 20_000 } else { 200_000 };
    // Group commit's gain grows with the number of concurrent writers: the
    // table shows 256 and this many (a relay serves thousands of clients).
    let callers: u64 = std::env::var("BENCH_CALLERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    println!("| durability | method | enqueues | seconds | enqueues/s | avg group |");
    println!("|---|---|---|---|---|---|");
    for durability in [Durability::Process, Durability::PowerLoss] {
        let label = match durability {
            Durability::Process => "process (NORMAL)",
            Durability::PowerLoss => "power loss (FULL)",
        };
        let (n, t) = rt.block_on(naive(
            durability,
            Duration::from_secs(if quick { 1 } else { 5 }),
            total,
        ));
        let naive_rate = n as f64 / t.as_secs_f64();
        println!(
            "| {label} | one transaction per insert | {n} | {:.2} | {naive_rate:.0} | 1 |",
            t.as_secs_f64()
        );
        for callers in [256u64, callers] {
            let (n, t, avg) = rt.block_on(grouped(durability, callers, total));
            let rate = n as f64 / t.as_secs_f64();
            println!(
                "| {label} | group commit, {callers} callers | {n} | {:.2} | {rate:.0} | {avg:.0} |",
                t.as_secs_f64()
            );
            println!(
                "| {label} | **ratio** | | | **{:.1}×** | |",
                rate / naive_rate
            );
        }
        let (n, t, avg) = rt.block_on(pipelined(durability, 8, 32, total));
        let prate = n as f64 / t.as_secs_f64();
        println!(
            "| {label} | group commit, 8 callers × 32 in flight | {n} | {:.2} | {prate:.0} | {avg:.0} |",
            t.as_secs_f64()
        );
        println!(
            "| {label} | **ratio** | | | **{:.1}×** | |",
            prate / naive_rate
        );
        let (n, t, avg) = rt.block_on(batched(durability, 8, 32, total));
        let brate = n as f64 / t.as_secs_f64();
        println!(
            "| {label} | group commit, 8 callers × batches of 32 (`enqueue_many`) | {n} | {:.2} | {brate:.0} | {avg:.0} |",
            t.as_secs_f64()
        );
        println!(
            "| {label} | **ratio** | | | **{:.1}×** | |",
            brate / naive_rate
        );
        let (n, t, avg) = rt.block_on(ceiling(durability, total));
        let crate_ = n as f64 / t.as_secs_f64();
        println!(
            "| {label} | ceiling: 1 caller, batches of 512 | {n} | {:.2} | {crate_:.0} | {avg:.0} |",
            t.as_secs_f64()
        );
        println!(
            "| {label} | **ratio** | | | **{:.1}×** | |",
            crate_ / naive_rate
        );
    }
}
