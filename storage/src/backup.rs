//! Whole-relay backups: one tar file holding everything a relay needs to
//! come back as itself on another disk or machine.
//!
//! ```text
//! node.key            the relay's identity (and any other secret files named)
//! meshwhisper.db      a consistent snapshot (VACUUM INTO) plus the hot log's packets
//! media/<32 hex>      media blobs
//! archive/<name>      archives
//! MANIFEST            format line, then one line per file: crc32, size, path
//! ```
//!
//! [`backup`] runs beside a live relay: the database snapshot comes from a
//! read-only connection (writers are not blocked) and media and archive
//! files are immutable once written. The artefact is written to a
//! temporary name, synced and renamed, mode 0600 (it holds the node key).
//! [`restore`] unpacks into a directory that is empty or absent, checks
//! every file against the manifest and the database's integrity, and only
//! then moves the result into place: a damaged artefact changes nothing.

use crate::{Error, Result, check_header, hot, mailbox};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection as _, SqliteConnection};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The first line of every manifest.
pub const FORMAT: &str = "meshwhisper-backup 1";
/// The manifest's name inside the artefact (its last entry).
pub const MANIFEST: &str = "MANIFEST";
/// The subdirectories whose files are carried.
const DIRS: [&str; 2] = ["media", "archive"];

/// What a backup or restore carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Report {
    /// Files (database and secrets included).
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// A reader that counts and checksums what passes through.
struct Summing<R> {
    inner: R,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<R: Read> Read for Summing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// `VACUUM INTO` from a separate read-only connection: usable on a live
/// database (a relay writing to it). Packets still in the hot log are
/// added to the copy.
pub async fn backup_database(db: &Path, out: &Path, busy_timeout: Duration) -> Result<()> {
    if out.exists() {
        return Err(Error::Invalid {
            what: "backup destination",
            why: "file already exists",
        });
    }
    check_header(db)?;
    if !db.exists() {
        return Err(Error::io(
            "open",
            db,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no database here"),
        ));
    }
    let opts = SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .busy_timeout(busy_timeout);
    let mut conn = SqliteConnection::connect_with(&opts)
        .await
        .map_err(|e| Error::db("open for backup", db, e))?;
    crate::check_identity(&mut conn, db).await?;
    let target = out.to_str().ok_or(Error::Invalid {
        what: "backup destination",
        why: "path is not UTF-8",
    })?;
    sqlx::query("VACUUM INTO ?")
        .bind(target)
        .execute(&mut conn)
        .await
        .map_err(|e| Error::db("backup (VACUUM INTO)", db, e))?;
    let _ = conn.close().await;
    // Packets still in the hot log (the last fraction of a second) are
    // acknowledged too: add them to the copy.
    let log = hot::log_path(db);
    let rec = match std::fs::read(&log) {
        Ok(bytes) => hot::replay_all(&bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => hot::replay_all(&[]),
        Err(e) => return Err(Error::io("read the hot log", &log, e)),
    };
    if !rec.live.is_empty() || !rec.fed_ids.is_empty() {
        let mut c = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(out))
            .await
            .map_err(|e| Error::db("open the backup", out, e))?;
        mailbox::insert_with_ids(&mut c, out, &rec.live).await?;
        crate::fed_seen::recover(&mut c, out, &rec.fed_ids).await?;
        let _ = c.close().await;
    }
    Ok(())
}

/// Writes the relay in `data_dir` (database `db`, and the files named in
/// `secrets`, e.g. the node key, where they exist) to the new file `out`.
pub async fn backup(
    data_dir: &Path,
    db: &Path,
    secrets: &[&str],
    out: &Path,
    busy_timeout: Duration,
) -> Result<Report> {
    if out.exists() {
        return Err(Error::Invalid {
            what: "backup destination",
            why: "file already exists",
        });
    }
    if !data_dir.is_dir() {
        return Err(Error::io(
            "open",
            data_dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no relay data directory here"),
        ));
    }
    let partial = sibling(out, "partial");
    let snapshot = sibling(out, "db-snapshot");
    let result = async {
        backup_database(db, &snapshot, busy_timeout).await?;
        write_tar(data_dir, &snapshot, secrets, &partial)
    }
    .await;
    let _ = std::fs::remove_file(&snapshot);
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, out).map_err(|e| Error::io("rename", out, e))?;
    sync_parent(out);
    Ok(report)
}

fn sibling(path: &Path, what: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "backup".into());
    path.with_file_name(format!(".{name}.{what}-{}", std::process::id()))
}

fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(dir);
    }
}

fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn create_private(path: &Path) -> Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    opts.open(path).map_err(|e| Error::io("create", path, e))
}

fn write_tar(data_dir: &Path, snapshot: &Path, secrets: &[&str], out: &Path) -> Result<Report> {
    let file = create_private(out)?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    let mut manifest = format!("{FORMAT}\n");
    let mut report = Report::default();
    let mut add = |tar: &mut tar::Builder<_>, src: &Path, name: &str| -> Result<bool> {
        let f = match std::fs::File::open(src) {
            Ok(f) => f,
            // Gone since it was listed (an expired media blob): skip it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io("read", src, e)),
        };
        let len = f.metadata().map_err(|e| Error::io("read", src, e))?.len();
        let mut header = tar::Header::new_gnu();
        header.set_size(len);
        header.set_mode(0o600);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        let mut r = Summing {
            inner: f.take(len),
            crc: crc32fast::Hasher::new(),
            len: 0,
        };
        tar.append_data(&mut header, name, &mut r)
            .map_err(|e| Error::io("write", out, e))?;
        if r.len != len {
            return Err(Error::io(
                "read",
                src,
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shrank while copied",
                ),
            ));
        }
        manifest.push_str(&format!("{:08x} {len} {name}\n", r.crc.finalize()));
        report.files += 1;
        report.bytes += len;
        Ok(true)
    };
    for s in secrets {
        add(&mut tar, &data_dir.join(s), s)?;
    }
    add(&mut tar, snapshot, crate::DB_FILE)?;
    for d in DIRS {
        let dir = data_dir.join(d);
        let mut names: Vec<String> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| safe_name(n))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io("read directory", &dir, e)),
        };
        names.sort();
        for n in names {
            add(&mut tar, &dir.join(&n), &format!("{d}/{n}"))?;
        }
    }
    let mut header = tar::Header::new_gnu();
    header.set_size(manifest.len() as u64);
    header.set_mode(0o600);
    header.set_mtime(0);
    tar.append_data(&mut header, MANIFEST, manifest.as_bytes())
        .map_err(|e| Error::io("write", out, e))?;
    let file = tar
        .into_inner()
        .map_err(|e| Error::io("write", out, e))?
        .into_inner()
        .map_err(|e| Error::io("write", out, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io("sync", out, e))?;
    Ok(report)
}

/// A file name we write and accept: no separators, no dot files.
fn safe_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 200
        && !n.starts_with('.')
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Where an artefact entry may go: a secret or the database at the top,
/// or a file in one of [`DIRS`].
fn entry_allowed(name: &str, secrets: &[&str]) -> bool {
    if name == crate::DB_FILE || name == MANIFEST || secrets.contains(&name) {
        return true;
    }
    match name.split_once('/') {
        Some((d, f)) => DIRS.contains(&d) && safe_name(f),
        None => false,
    }
}

fn bad(why: &'static str) -> Error {
    Error::Invalid {
        what: "backup artefact",
        why,
    }
}

/// Unpacks the artefact `from` into `data_dir` (which must be absent or
/// empty). Every file is checked against the manifest and the database
/// with `PRAGMA integrity_check` before anything is moved into place.
pub async fn restore(from: &Path, data_dir: &Path, secrets: &[&str]) -> Result<Report> {
    match std::fs::read_dir(data_dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(Error::Invalid {
                    what: "restore destination",
                    why: "directory is not empty (restore into a new or empty directory)",
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if data_dir.exists() && !data_dir.is_dir() => {
            let _ = e;
            return Err(Error::NotADirectory(data_dir.to_path_buf()));
        }
        Err(e) => return Err(Error::io("read directory", data_dir, e)),
    }
    let staging = sibling(data_dir, "restoring");
    let _ = std::fs::remove_dir_all(&staging);
    let result = async {
        let report = unpack(from, &staging, secrets)?;
        check_restored_db(&staging.join(crate::DB_FILE)).await?;
        Ok::<_, Error>(report)
    }
    .await;
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    if data_dir.exists() {
        std::fs::remove_dir(data_dir).map_err(|e| Error::io("replace", data_dir, e))?;
    }
    std::fs::rename(&staging, data_dir).map_err(|e| Error::io("rename", data_dir, e))?;
    sync_parent(data_dir);
    Ok(report)
}

fn unpack(from: &Path, staging: &Path, secrets: &[&str]) -> Result<Report> {
    let file = std::fs::File::open(from).map_err(|e| Error::io("open", from, e))?;
    mkdir_private(staging)?;
    for d in DIRS {
        mkdir_private(&staging.join(d))?;
    }
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let mut seen: Vec<(String, u64, u32)> = Vec::new();
    let mut manifest: Option<String> = None;
    let damaged = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::NotFound => {
            Error::io("read", from, e)
        }
        _ => bad("truncated or damaged (not a complete tar file)"),
    };
    let entries = archive.entries().map_err(damaged)?;
    for entry in entries {
        let entry = entry.map_err(damaged)?;
        if manifest.is_some() {
            return Err(bad("entries after the manifest"));
        }
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(bad("an entry is not a regular file"));
        }
        let name = entry
            .path()
            .ok()
            .and_then(|p| p.to_str().map(str::to_owned))
            .ok_or(bad("an entry name is not UTF-8"))?;
        if !entry_allowed(&name, secrets) {
            return Err(bad("an entry is not a relay file"));
        }
        if name == MANIFEST {
            let mut text = String::new();
            entry
                .take(1 << 24)
                .read_to_string(&mut text)
                .map_err(|_| bad("the manifest is not text"))?;
            manifest = Some(text);
            continue;
        }
        if seen.iter().any(|(n, _, _)| *n == name) {
            return Err(bad("a file appears twice"));
        }
        let dest = staging.join(&name);
        let mut out = create_private(&dest)?;
        let mut r = Summing {
            inner: entry,
            crc: crc32fast::Hasher::new(),
            len: 0,
        };
        std::io::copy(&mut r, &mut out).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bad("truncated or damaged (not a complete tar file)")
            } else {
                Error::io("write", &dest, e)
            }
        })?;
        out.sync_all().map_err(|e| Error::io("sync", &dest, e))?;
        seen.push((name, r.len, r.crc.finalize()));
    }
    let manifest = manifest.ok_or(bad("no manifest (truncated or not a meshwhisper backup)"))?;
    let mut lines = manifest.lines();
    if lines.next() != Some(FORMAT) {
        return Err(bad("unknown format (made by a newer meshwhisper?)"));
    }
    let mut listed = 0usize;
    for line in lines {
        let mut parts = line.splitn(3, ' ');
        let (Some(crc), Some(len), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("a manifest line is malformed"));
        };
        let crc =
            u32::from_str_radix(crc, 16).map_err(|_| bad("a manifest checksum is malformed"))?;
        let len: u64 = len
            .parse()
            .map_err(|_| bad("a manifest size is malformed"))?;
        match seen.iter().find(|(n, _, _)| n == name) {
            Some((_, l, c)) if *l == len && *c == crc => listed += 1,
            Some(_) => return Err(bad("a file does not match its checksum")),
            None => return Err(bad("a file named in the manifest is missing")),
        }
    }
    if listed != seen.len() {
        return Err(bad("a file is not named in the manifest"));
    }
    if !seen.iter().any(|(n, _, _)| n == crate::DB_FILE) {
        return Err(bad("no database in it"));
    }
    sync_dir(staging);
    for d in DIRS {
        sync_dir(&staging.join(d));
    }
    Ok(Report {
        files: seen.len() as u64,
        bytes: seen.iter().map(|(_, l, _)| l).sum(),
    })
}

fn mkdir_private(path: &Path) -> Result<()> {
    let mut b = std::fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        b.mode(0o700);
    }
    b.create(path)
        .map_err(|e| Error::io("create directory", path, e))
}

async fn check_restored_db(db: &Path) -> Result<()> {
    check_header(db)?;
    let mut c = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(db))
        .await
        .map_err(|e| Error::db("open the restored database", db, e))?;
    crate::check_identity(&mut c, db).await?;
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut c)
        .await
        .map_err(|e| Error::db("integrity check", db, e))?;
    let _ = c.close().await;
    if check != "ok" {
        return Err(Error::Corrupt {
            path: db.to_path_buf(),
            detail: check,
        });
    }
    Ok(())
}
