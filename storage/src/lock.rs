//! An exclusive lock on a directory, held for a process's whole life.
//!
//! Two relays on one data directory would share an identity and replay
//! each other's hot log; two clients on one profile would step the same
//! ratchets. [`DirLock::acquire`] takes a non-blocking `flock` on a file in
//! the directory and writes the holder's pid into it, so a second process
//! is refused with a message that names the first. The kernel drops the
//! lock when the holder exits, however it exits (SIGKILL included), so a
//! stale lock file never blocks a restart; the file itself stays.

use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

/// Why a directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error("{dir} is in use by another meshwhisper process{}", pid_text(*.pid))]
    Held {
        /// The locked directory.
        dir: PathBuf,
        /// The holder's pid, as it wrote it (absent if unreadable).
        pid: Option<u32>,
    },
    /// The lock file could not be opened.
    #[error("lock file {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn pid_text(pid: Option<u32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
}

/// A held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl DirLock {
    /// Locks `dir` through the file `dir/name` (created 0600 if absent).
    /// Never waits: if another process holds it, fails with
    /// [`LockError::Held`] naming that process's pid.
    pub fn acquire(dir: &Path, name: &str) -> Result<Self, LockError> {
        let path = dir.join(name);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let mut file = opts.open(&path).map_err(io)?;
        #[cfg(unix)]
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(LockError::Held {
                dir: dir.to_path_buf(),
                pid: text.trim().parse().ok(),
            });
        }
        // Ours: say who holds it.
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().expect("tmp");
        let first = DirLock::acquire(dir.path(), "lock").expect("first");
        let e = DirLock::acquire(dir.path(), "lock").expect_err("second");
        match &e {
            LockError::Held { pid, .. } => assert_eq!(*pid, Some(std::process::id())),
            other => panic!("unexpected {other}"),
        }
        assert!(
            e.to_string()
                .contains(&format!("pid {}", std::process::id()))
        );
        drop(first);
        let again = DirLock::acquire(dir.path(), "lock").expect("free again");
        assert_eq!(again.path(), dir.path().join("lock"));
    }
}
