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
    // This bench measures SQLite group commit; the hot tier in front of it
    // (on by default) is measured by the relay benchmark.
    c.hot_log = false;
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

/// How the callers feed the store.
#[derive(Clone, Copy)]
enum Callers {
    /// One `enqueue` in flight per caller.
    One,
    /// This many `enqueue`s in flight per caller (as relay sessions pipeline).
    Pipelined(usize),
    /// `enqueue_many` batches of this size, one reply each.
    Batches(u64),
}

fn dest(t: u64, per: u64, i: u64) -> DestHash {
    DestHash(((t * per + i) % 64).to_be_bytes())
}

/// `tasks` concurrent callers storing `total` packets in the given shape.
/// Returns packets stored, elapsed time, and packets per commit.
async fn group_commit(
    durability: Durability,
    tasks: u64,
    shape: Callers,
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
                match shape {
                    Callers::One => {
                        for i in 0..per {
                            let packet = vec![0x5au8; PACKET];
                            s.mailbox()
                                .enqueue(dest(t, per, i), packet, NOW)
                                .await
                                .expect("enqueue");
                        }
                    }
                    Callers::Pipelined(depth) => {
                        let mut inflight = futures::stream::FuturesUnordered::new();
                        let mut next = 0u64;
                        while next < per || !inflight.is_empty() {
                            while next < per && inflight.len() < depth {
                                let (s, d) = (s.clone(), dest(t, per, next));
                                inflight.push(async move {
                                    s.mailbox().enqueue(d, vec![0x5au8; PACKET], NOW).await
                                });
                                next += 1;
                            }
                            if let Some(r) = inflight.next().await {
                                r.expect("enqueue");
                            }
                        }
                    }
                    Callers::Batches(batch) => {
                        let mut i = 0;
                        while i < per {
                            let n = batch.min(per - i);
                            let packets = (i..i + n)
                                .map(|k| (dest(t, per, k), vec![0x5au8; PACKET]))
                                .collect();
                            s.mailbox()
                                .enqueue_many(packets, NOW)
                                .await
                                .expect("enqueue");
                            i += n;
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.await.expect("join");
    }
    let elapsed = start.elapsed();
    let (commits, _) = store.commit_stats();
    store.close().await;
    let stored = per * tasks;
    (stored, elapsed, stored as f64 / commits.max(1) as f64)
}

fn main() {
    // `cargo bench` passes `--bench`; accept and ignore libtest flags.
    let quick = std::env::args().any(|a| a == "--quick");
    let env_num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(env_num("BENCH_WORKERS").unwrap_or(2) as usize)
        .enable_all()
        .build()
        .expect("runtime");
    let total = if quick { 20_000 } else { 200_000 };
    // Group commit's gain grows with the number of concurrent writers: the
    // table shows 256 and this many (a relay serves thousands of clients).
    let callers = env_num("BENCH_CALLERS").unwrap_or(2048);
    println!("| durability | method | enqueues | seconds | enqueues/s | avg group |");
    println!("|---|---|---|---|---|---|");
    for durability in [Durability::Process, Durability::PowerLoss] {
        let label = match durability {
            Durability::Process => "process (NORMAL)",
            Durability::PowerLoss => "power loss (FULL)",
        };
        let budget = Duration::from_secs(if quick { 1 } else { 5 });
        let (n, t) = rt.block_on(naive(durability, budget, total));
        let naive_rate = n as f64 / t.as_secs_f64();
        println!(
            "| {label} | one transaction per insert | {n} | {:.2} | {naive_rate:.0} | 1 |",
            t.as_secs_f64()
        );
        let runs = [
            ("group commit, 256 callers".to_string(), 256, Callers::One),
            (
                format!("group commit, {callers} callers"),
                callers,
                Callers::One,
            ),
            (
                "group commit, 8 callers × 32 in flight".into(),
                8,
                Callers::Pipelined(32),
            ),
            (
                "group commit, 8 callers × batches of 32 (`enqueue_many`)".into(),
                8,
                Callers::Batches(32),
            ),
            // The ceiling: one caller, batches of 512 (the writer's largest
            // group), so caller wake-ups cost nothing: only SQLite and sqlx.
            (
                "ceiling: 1 caller, batches of 512".into(),
                1,
                Callers::Batches(512),
            ),
        ];
        for (name, tasks, shape) in runs {
            let (n, t, avg) = rt.block_on(group_commit(durability, tasks, shape, total));
            let rate = n as f64 / t.as_secs_f64();
            println!(
                "| {label} | {name} | {n} | {:.2} | {rate:.0} | {avg:.0} |",
                t.as_secs_f64()
            );
            println!(
                "| {label} | **ratio** | | | **{:.1}×** | |",
                rate / naive_rate
            );
        }
    }
}
