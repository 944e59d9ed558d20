//! `meshwhisper backup` copies a live store consistently.

use meshwhisper_crypto::destination::DestHash;
use meshwhisper_storage::{Config, Store};
use sqlx::Connection as _;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_command_copies_a_live_store() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(Config::new(dir.path())).await.expect("open");
    for i in 0..50u8 {
        store
            .mailbox()
            .enqueue(DestHash([i; 8]), vec![i; 100], 1_700_000_000_000)
            .await
            .expect("enqueue");
    }
    let out_dir = tempfile::tempdir().expect("tmp");
    let out = out_dir.path().join("copy.db");
    // The store stays open (as in a running relay) while the CLI copies it.
    let status = Command::new(env!("CARGO_BIN_EXE_meshwhisper"))
        .arg("backup")
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let mut c = sqlx::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&out)
            .read_only(true),
    )
    .await
    .expect("open copy");
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM mailbox")
        .fetch_one(&mut c)
        .await
        .expect("n");
    assert_eq!(n, 50);
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut c)
        .await
        .expect("c");
    assert_eq!(check, "ok");

    // A second run refuses to overwrite; a missing data dir is a clear error.
    let again = Command::new(env!("CARGO_BIN_EXE_meshwhisper"))
        .args(["backup", "--data-dir"])
        .arg(dir.path())
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run");
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let missing = Command::new(env!("CARGO_BIN_EXE_meshwhisper"))
        .args(["backup", "--data-dir", "/nonexistent/meshwhisper", "--out"])
        .arg(out_dir.path().join("x.db"))
        .output()
        .expect("run");
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/meshwhisper"));
    store.close().await;
}
