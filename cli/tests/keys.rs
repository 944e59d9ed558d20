//! `meshwhisper keys` reproduces every shared vector, and rejects bad input
//! with exit code 2.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshwhisper"))
}

/// The vector files: `../shared/vectors/` when it exists, else the copy
/// committed with the crypto crate.
fn vector_files() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let shared = root.join("../shared/vectors");
    let dir = if shared.is_dir() {
        shared
    } else {
        root.join("crypto/tests/vectors")
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("vector dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = bin().args(args).output().expect("run meshwhisper");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn reproduces_every_vector() {
    let mut checked = 0;
    for file in vector_files() {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
        for c in v["dest_hash"].as_array().into_iter().flatten() {
            let hour = c["epoch_hour"].as_u64().expect("hour").to_string();
            let (code, stdout, stderr) = run(&[
                "keys",
                "dest-hash",
                "--app-bundle-id",
                c["app_bundle_id"].as_str().expect("s"),
                "--developer-key",
                c["developer_public_key"].as_str().expect("s"),
                "--recipient-key",
                c["recipient_x25519_public_key"].as_str().expect("s"),
                "--epoch-hour",
                &hour,
            ]);
            assert_eq!(code, 0, "{stderr}");
            let want = format!(
                "namespace_id={}\ndest_hash={}\n",
                c["namespace_id"].as_str().expect("s"),
                c["dest_hash"].as_str().expect("s")
            );
            assert_eq!(stdout, want);
            checked += 1;
        }
        for c in v["ed25519_to_x25519"].as_array().into_iter().flatten() {
            let (code, stdout, stderr) = run(&[
                "keys",
                "x25519-from-ed25519",
                "--seed",
                c["ed25519_seed"].as_str().expect("s"),
            ]);
            assert_eq!(code, 0, "{stderr}");
            let want = format!(
                "ed25519_public_key={}\nx25519_public_key={}\nx25519_private_key={}\n",
                c["ed25519_public_key"].as_str().expect("s"),
                c["x25519_public_key"].as_str().expect("s"),
                c["x25519_private_key"].as_str().expect("s"),
            );
            assert_eq!(stdout, want);
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} vectors found");
}

#[test]
fn bad_hex_and_lengths_exit_2() {
    let key = "11".repeat(32);
    let cases: Vec<Vec<&str>> = vec![
        vec!["keys", "x25519-from-ed25519", "--seed", "zz"],
        vec!["keys", "x25519-from-ed25519", "--seed", "0101"],
        vec!["keys", "x25519-from-ed25519", "--seed", &key[..63]],
        vec![
            "keys",
            "dest-hash",
            "--app-bundle-id",
            "a",
            "--developer-key",
            "11",
            "--recipient-key",
            &key,
            "--epoch-hour",
            "1",
        ],
        vec![
            "keys",
            "dest-hash",
            "--app-bundle-id",
            "a",
            "--developer-key",
            &key,
            "--recipient-key",
            "xyz",
            "--epoch-hour",
            "1",
        ],
        vec![
            "keys",
            "dest-hash",
            "--app-bundle-id",
            "a",
            "--developer-key",
            &key,
            "--recipient-key",
            &key,
            "--epoch-hour",
            "-1",
        ],
        vec!["keys", "dest-hash", "--app-bundle-id", "a"],
    ];
    for args in cases {
        let (code, stdout, stderr) = run(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?} printed {stdout}");
        assert!(stderr.contains("error"), "{args:?}: {stderr}");
    }
}
