//! Opening: migrations from empty files, refusing newer, foreign and corrupt
//! databases with a clear error and without touching them.

mod common;
use common::*;
use meshwhisper_storage::{Config, DB_FILE, Error, SCHEMA_VERSION, Store};
use sqlx::Connection as _;

async fn raw(path: &std::path::Path) -> sqlx::SqliteConnection {
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true);
    sqlx::SqliteConnection::connect_with(&opts)
        .await
        .expect("raw connect")
}

#[tokio::test]
async fn migrates_an_empty_file_and_reopens() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join(DB_FILE), b"").expect("empty file");
    let store = open(&dir).await;
    store
        .mailbox()
        .enqueue(dest(1), vec![1], NOW)
        .await
        .expect("enqueue");
    store.close().await;
    let mut c = raw(&dir.path().join(DB_FILE)).await;
    let v: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(&mut c)
        .await
        .expect("v");
    assert_eq!(v, SCHEMA_VERSION);
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut c)
        .await
        .expect("m");
    assert_eq!(mode, "wal");
    drop(c);
    let store = open(&dir).await;
    assert_eq!(store.mailbox().count().await.expect("count"), 1);
}

#[tokio::test]
async fn refuses_a_newer_schema() {
    let dir = tempfile::tempdir().expect("tmp");
    open(&dir).await.close().await;
    let path = dir.path().join(DB_FILE);
    let mut c = raw(&path).await;
    sqlx::query("PRAGMA user_version = 99")
        .execute(&mut c)
        .await
        .expect("bump");
    // Closing the last connection checkpoints the WAL into the main file.
    c.close().await.expect("close");
    let before = std::fs::read(&path).expect("read");
    let err = Store::open(Config::new(dir.path()))
        .await
        .expect_err("newer");
    assert!(
        matches!(
            err,
            Error::NewerSchema {
                found: 99,
                supported: SCHEMA_VERSION,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade"), "{err}");
    assert_eq!(
        std::fs::read(&path).expect("read"),
        before,
        "file untouched"
    );
}

#[tokio::test]
async fn refuses_a_foreign_database() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join(DB_FILE);
    let mut c = raw(&path).await;
    sqlx::query("CREATE TABLE customers (id INTEGER)")
        .execute(&mut c)
        .await
        .expect("create");
    drop(c);
    let err = Store::open(Config::new(dir.path()))
        .await
        .expect_err("foreign");
    assert!(matches!(err, Error::Foreign { .. }), "{err}");
    assert!(err.to_string().contains("customers"), "{err}");

    let dir2 = tempfile::tempdir().expect("tmp");
    let mut c = raw(&dir2.path().join(DB_FILE)).await;
    sqlx::query("PRAGMA application_id = 42")
        .execute(&mut c)
        .await
        .expect("id");
    drop(c);
    let err = Store::open(Config::new(dir2.path()))
        .await
        .expect_err("foreign");
    assert!(matches!(err, Error::Foreign { .. }), "{err}");
}

#[tokio::test]
async fn refuses_a_corrupt_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join(DB_FILE);
    let junk: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&path, &junk).expect("write");
    let err = Store::open(Config::new(dir.path()))
        .await
        .expect_err("corrupt");
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(DB_FILE), "{err}");
    assert_eq!(std::fs::read(&path).expect("read"), junk, "file untouched");

    // A valid header over garbage pages is caught by SQLite itself.
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join(DB_FILE);
    let mut bad = b"SQLite format 3\0".to_vec();
    bad.extend(std::iter::repeat_n(0xEEu8, 4096));
    std::fs::write(&path, &bad).expect("write");
    let err = Store::open(Config::new(dir.path()))
        .await
        .expect_err("corrupt");
    assert!(
        matches!(err, Error::Corrupt { .. } | Error::Database { .. }),
        "{err}"
    );
}
