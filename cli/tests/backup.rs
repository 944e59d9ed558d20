//! `meshwhisper backup` copies a live store consistently; `restore` brings
//! it back and refuses damaged artefacts.

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
    let out = out_dir.path().join("copy.tar");
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
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&out).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the backup holds the node key");
    }
    let restored = out_dir.path().join("restored");
    let r = Command::new(env!("CARGO_BIN_EXE_meshwhisper"))
        .args(["restore", "--from"])
        .arg(&out)
        .arg("--data-dir")
        .arg(&restored)
        .output()
        .expect("run");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let mut c = sqlx::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new()
            .filename(restored.join("meshwhisper.db"))
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

    // A truncated or altered artefact is refused and leaves nothing behind.
    let bytes = std::fs::read(&out).expect("read");
    let truncated = out_dir.path().join("truncated.tar");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let mut flipped = bytes.clone();
    // Inside the database's content (after the node key's 512-byte header
    // and block, and the database's header).
    flipped[512 * 4 + 100] ^= 0x55;
    let altered = out_dir.path().join("altered.tar");
    std::fs::write(&altered, &flipped).expect("write");
    for bad in [&truncated, &altered] {
        let target = out_dir.path().join("never");
        let r = Command::new(env!("CARGO_BIN_EXE_meshwhisper"))
            .args(["restore", "--from"])
            .arg(bad)
            .arg("--data-dir")
            .arg(&target)
            .output()
            .expect("run");
        assert_eq!(r.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&r.stderr).contains("backup artefact"),
            "{}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert!(
            !target.exists(),
            "a refused restore created {}",
            target.display()
        );
    }
    store.close().await;
}
