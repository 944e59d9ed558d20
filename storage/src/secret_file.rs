//! Files that hold secrets (a node key, a client identity seed): created
//! once, readable only by their owner, durable before anyone relies on them.

use std::path::Path;

/// Creates `path` with `bytes`, mode 0600 on Unix. Fails if the file
/// exists (a key is never overwritten). The file and its directory entry
/// are synced before returning.
pub fn create(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn creates_once_with_owner_only_permissions() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("key");
        super::create(&p, b"secret").expect("create");
        assert_eq!(std::fs::read(&p).expect("read"), b"secret");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(super::create(&p, b"other").is_err());
        assert_eq!(std::fs::read(&p).expect("read"), b"secret");
    }
}
