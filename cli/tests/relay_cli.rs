//! `meshwhisper relay --print-config` and `meshwhisper keys peer-id`.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshwhisper"))
}

#[test]
fn print_config_layers_file_env_and_flags() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("relay.toml");
    std::fs::write(
        &file,
        "http = \"127.0.0.1:9000\"\n[limits]\nrate_limit_read = 7\n",
    )
    .expect("write");
    let out = bin()
        .args(["relay", "--print-config", "--config"])
        .arg(&file)
        .env("PORT", "9100")
        .env("MAX_BLOBS_PER_HASH", "42")
        .args(["--data-dir", "/srv/mw"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf8");
    for want in [
        "data_dir = \"/srv/mw\"",
        "http = \"127.0.0.1:9100\"",
        "max_blobs_per_hash = 42",
        "rate_limit_read = 7",
        "rate_limit_media = 20",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // Defaults alone.
    let out = bin()
        .args(["relay", "--print-config"])
        .env_remove("PORT")
        .output()
        .expect("run");
    let text = String::from_utf8(out.stdout).expect("utf8");
    assert!(text.contains("http = \"0.0.0.0:8080\""), "{text}");
    assert!(text.contains("/ip4/0.0.0.0/udp/4001/quic-v1"), "{text}");
    // Bad values are one clear error, exit 1.
    let out = bin()
        .args(["relay", "--print-config"])
        .env("MAX_BLOB_SIZE", "lots")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MAX_BLOB_SIZE"));
}

#[test]
fn peer_id_is_created_once_with_private_permissions() {
    let dir = tempfile::tempdir().expect("tmp");
    let run = || {
        let out = bin()
            .args(["keys", "peer-id", "--data-dir"])
            .arg(dir.path())
            .output()
            .expect("run");
        assert!(out.status.success());
        String::from_utf8(out.stdout)
            .expect("utf8")
            .trim()
            .to_string()
    };
    let first = run();
    assert!(first.starts_with("12D3KooW"), "{first}");
    assert_eq!(run(), first, "the key is kept");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("node.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
