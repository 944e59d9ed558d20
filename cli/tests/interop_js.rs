//! Interop with the real reference client: two `@meshwhisper/sdk` 0.5.0
//! processes (installed by npm from `tests/interop/package-lock.json`) find
//! each other through our `/directory` by username, exchange messages both
//! ways, and one receives what was sent while it was stopped, after
//! restarting; every message arrives exactly once (`tests/interop/scenario.mjs`
//! checks all of it against a relay process of ours).

mod testnet;

use std::path::PathBuf;
use std::process::Command;
use testnet::Testnet;

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/interop")
}

fn run(cmd: &mut Command, what: &str) -> std::process::Output {
    cmd.output().unwrap_or_else(|e| {
        panic!("{what}: cannot run ({e}); the interop test needs Node.js 20+ and npm (.ci/run installs them)")
    })
}

/// Installs the SDK (pinned by package-lock.json) unless it is there.
/// Tests run in parallel, and `npm ci` deletes `node_modules` first: one
/// install at a time, in this process (a mutex) and across processes (an
/// exclusive lock on a file beside it), and the others then find it there.
fn npm_ci(dir: &std::path::Path) {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _in_process = INSTALL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let lock = std::fs::File::create(dir.join("node_modules.lock")).expect("npm lock file");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("npm lock");
    if !dir
        .join("node_modules/@meshwhisper/sdk/package.json")
        .exists()
    {
        let out = run(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(dir),
            "npm ci",
        );
        assert!(
            out.status.success(),
            "npm ci failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn js_sdk_clients_talk_through_our_relay() {
    let dir = interop_dir();
    npm_ci(&dir);
    for stop_mode in ["quit", "kill"] {
        let out = run(
            Command::new("node")
                .arg("scenario.mjs")
                .arg("ours")
                .current_dir(&dir)
                .env("MW_BIN", env!("CARGO_BIN_EXE_meshwhisper"))
                .env("STOP_MODE", stop_mode),
            "node scenario.mjs",
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "interop scenario (STOP_MODE={stop_mode}) failed with {:?}:\n{stdout}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("PASS"), "{stdout}");
    }
}

/// Two real JS SDK clients homed on two relays of a 3-relay testnet meet by
/// QR string and exchange 20 messages each way; 20 sent while the recipient
/// was offline arrive once each after it reconnects (the reference relay
/// delivers 0 of those).
#[test]
fn js_sdk_clients_on_two_federated_relays() {
    let dir = interop_dir();
    npm_ci(&dir);
    let net = Testnet::new(&[]);
    net.up(3);
    let http: Vec<String> = net.relays().into_iter().map(|r| r.2).collect();
    assert_eq!(http.len(), 3);
    let status = net.script("status.sh", &[]);
    let status_out = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(status.status.success(), "{status_out}");
    assert_eq!(status_out.matches(" yes ").count(), 3, "{status_out}");
    let out = run(
        Command::new("node")
            .arg("federation.mjs")
            .arg(&http[1])
            .arg(&http[2])
            .current_dir(&dir),
        "node federation.mjs",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "federation scenario failed with {:?}:\n{stdout}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("RESULT: PASS"), "{stdout}");
}

/// A real JS SDK client that falls behind (a burst overflows its live queue
/// on a relay configured with `limits.client_queue = 2`) still receives
/// every message at once, without reconnecting: the JS SDK never sends
/// `pull`, so the relay must drain what it kept as soon as the queue
/// empties (`tests/interop/behind.mjs`).
#[test]
fn a_js_client_that_falls_behind_gets_everything_without_asking() {
    let dir = interop_dir();
    npm_ci(&dir);
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = tmp.path().join("relay.toml");
    std::fs::write(&cfg, "[limits]\nclient_queue = 2\n").expect("config");
    let mut relay = Command::new(env!("CARGO_BIN_EXE_meshwhisper"))
        .args([
            "relay",
            "--http",
            "127.0.0.1:0",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--federation",
            "off",
            "--config",
        ])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("relay");
    let stdout = relay.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::sync_channel(16);
    std::thread::spawn(move || {
        for l in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if let Some(h) = l.strip_prefix("http=") {
                let _ = tx.send(h.to_string());
            }
        }
    });
    let http = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("relay address");
    let out = run(
        Command::new("node")
            .arg("behind.mjs")
            .arg(&http)
            .current_dir(&dir),
        "node behind.mjs",
    );
    let _ = relay.kill();
    let _ = relay.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "behind scenario failed with {:?}:\n{stdout}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("RESULT: PASS"), "{stdout}");
}
