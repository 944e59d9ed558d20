//! A backup taken while writes continue is consistent.

mod common;
use common::*;
use sqlx::Connection as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_during_writes_passes_integrity_check() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = open(&dir).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let s = store.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                s.mailbox()
                    .enqueue(dest(w), vec![7; 700], NOW)
                    .await
                    .expect("enqueue");
                n += 1;
            }
            n
        }));
    }
    // Let some rows exist first: wait on the data, not the clock.
    while store.mailbox().count().await.expect("count") < 2_000 {
        tokio::task::yield_now().await;
    }
    let out_dir = tempfile::tempdir().expect("tmp");
    let out = out_dir.path().join("backup.db");
    store.backup_to(&out).await.expect("backup");
    stop.store(true, Ordering::Relaxed);
    let mut written = 0;
    for w in writers {
        written += w.await.expect("join");
    }
    let mut c = sqlx::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&out)
            .read_only(true),
    )
    .await
    .expect("open backup");
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut c)
        .await
        .expect("check");
    assert_eq!(check, "ok");
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM mailbox")
        .fetch_one(&mut c)
        .await
        .expect("count");
    assert!(
        rows >= 2_000 && rows as u64 <= written,
        "rows {rows}, written {written}"
    );
    drop(c);
    // The backup opens as a store of its own, with the data.
    let restored = tempfile::tempdir().expect("tmp");
    std::fs::copy(&out, restored.path().join(meshwhisper_storage::DB_FILE)).expect("copy");
    let r = open(&restored).await;
    assert_eq!(r.mailbox().count().await.expect("count"), rows as u64);
    // Refuses to overwrite.
    assert!(store.backup_to(&out).await.is_err());
}
