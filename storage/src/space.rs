//! Free space on the data directory's filesystem, so writes that add data
//! are refused before the disk is full (a full disk would also stop the
//! writes that free space: deletions go through the same log).

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a reading is trusted.
const FRESH: Duration = Duration::from_secs(1);

/// The last reading of free bytes.
#[derive(Debug, Default)]
pub(crate) struct Space {
    last: Mutex<Option<(Instant, Option<u64>)>>,
}

impl Space {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Bytes available to this process on `dir`'s filesystem (`None`:
    /// unknown), read again when the last reading is a second old.
    pub(crate) fn free(&self, dir: &Path) -> Option<u64> {
        let mut last = match self.last.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some((at, v)) = *last
            && at.elapsed() < FRESH
        {
            return v;
        }
        let v = read(dir);
        *last = Some((Instant::now(), v));
        v
    }
}

#[cfg(unix)]
fn read(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(not(unix))]
fn read(_dir: &Path) -> Option<u64> {
    None
}
