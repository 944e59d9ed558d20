//! Helpers shared by the integration tests of several crates (a
//! dev-dependency of `client` and `cli`), and the home of cross-crate
//! integration tests that need no binary (`tests/tests/`).

use std::path::{Path, PathBuf};

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The first file under `dir` (or extra haystack) containing any of
/// `needles`, with the needle's index: for "the relay never stores this"
/// checks.
pub fn find_any(dir: &Path, needles: &[&[u8]]) -> Option<(PathBuf, usize)> {
    for f in files_under(dir) {
        let Ok(bytes) = std::fs::read(&f) else {
            continue;
        };
        if let Some(i) = needles.iter().position(|n| contains(&bytes, n)) {
            return Some((f, i));
        }
    }
    None
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_needles_in_nested_files() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(dir.path().join("a")).expect("mkdir");
        std::fs::write(dir.path().join("a/x.bin"), b"..secret..").expect("write");
        std::fs::write(dir.path().join("y.bin"), b"nothing").expect("write");
        assert_eq!(files_under(dir.path()).len(), 2);
        let hit = find_any(dir.path(), &[b"absent", b"secret"]).expect("found");
        assert_eq!(hit.1, 1);
        assert!(hit.0.ends_with("a/x.bin"));
        assert!(find_any(dir.path(), &[b"absent"]).is_none());
        assert!(!contains(b"abc", b""));
    }
}
