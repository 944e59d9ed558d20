//! Shared helpers for storage tests.
#![allow(dead_code)]

use meshwhisper_crypto::destination::DestHash;
use meshwhisper_storage::{Config, Store};

pub const NOW: u64 = 1_700_000_000_000;

pub fn dest(i: u64) -> DestHash {
    DestHash(i.to_be_bytes())
}

pub async fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(Config::new(dir.path()))
        .await
        .expect("open store")
}

pub async fn open_with(dir: &tempfile::TempDir, f: impl FnOnce(&mut Config)) -> Store {
    let mut cfg = Config::new(dir.path());
    f(&mut cfg);
    Store::open(cfg).await.expect("open store")
}

/// Files in `<data>/<sub>`.
pub fn files_in(dir: &tempfile::TempDir, sub: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.path().join(sub))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
