//! Federation between relay processes started by `testnet/up.sh`: the
//! blocklist reloads on SIGHUP alone (the file is changed without changing
//! its size or modification time, so the file watcher cannot see it).

mod testnet;

use std::process::Command;
use std::time::{Duration, Instant};
use testnet::Testnet;

fn health(http: &str) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "2", &format!("{http}/health")])
        .output()
        .expect("curl");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Polls `/health` (bounded) until `pred` holds.
fn wait_health(http: &str, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h = health(http);
        if pred(&h) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: last /health {h}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sighup_reloads_the_blocklist_and_disconnects_at_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let list = dir.path().join("blocklist");
    // A comment as long as a PeerId line, so the change keeps the size.
    let placeholder = format!("#{}\n", "x".repeat(51));
    std::fs::write(&list, &placeholder).expect("write");
    let list_arg = list.display().to_string();
    let net = Testnet::new(&["--blocklist", &list_arg]);
    net.up(2);
    let relays = net.relays();
    let (a_pid, _, a_http, _) = &relays[0];
    let (_, b_peer, _, _) = &relays[1];
    wait_health(a_http, "A federated with B", |h| {
        h["federation"]["peers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x == b_peer.as_str()))
    });
    // Same length, same modification time: invisible to the watcher.
    let line = format!("{b_peer}\n");
    assert_eq!(line.len(), placeholder.len(), "PeerId line length");
    let mtime = std::fs::metadata(&list)
        .and_then(|m| m.modified())
        .expect("mtime");
    std::fs::write(&list, &line).expect("write");
    std::fs::File::options()
        .write(true)
        .open(&list)
        .and_then(|f| f.set_modified(mtime))
        .expect("restore mtime");
    // Without the signal nothing changes (the watcher checks every second).
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(health(a_http)["federationPeersConnected"], 1);
    let kill = Command::new("kill")
        .args(["-HUP", &a_pid.to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    wait_health(a_http, "B dropped after SIGHUP", |h| {
        h["federationPeersConnected"] == 0
    });
    // B keeps trying to come back and is refused, and A is still serving.
    wait_health(a_http, "B refused", |h| h["status"] == "ok");
    let metrics = Command::new("curl")
        .args(["-fsS", &format!("{a_http}/metrics")])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        text.lines().any(|l| l
            .strip_prefix("meshwhisper_federation_handshake_rejections_blocked_total ")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|v| v >= 1)),
        "{text}"
    );
}

/// Relays of this testnet still running (by their data directories).
fn relays_alive(net: &Testnet) -> Vec<String> {
    let pattern = format!("--data-dir {}/relay-", net.run.path().display());
    let out = Command::new("pgrep")
        .args(["-af", "--", &pattern])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("pgrep"))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_relay_that_fails_to_start_leaves_nothing_running() {
    let mut net = Testnet::new(&[]);
    // Relay 2 of 4 fails at start; relays 0 and 1 are up by then.
    let wrapper = net.run.path().join("meshwhisper-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$*\" in *relay-2/data*) echo simulated start failure >&2; exit 3;; esac\nexec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_meshwhisper")
        ),
    )
    .expect("wrapper");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    net.bin = wrapper;
    let out = net.script("up.sh", &["4"]);
    assert!(!out.status.success(), "up.sh should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("relay 2"), "{err}");
    assert!(err.contains("simulated start failure"), "{err}");
    assert_eq!(relays_alive(&net), Vec::<String>::new(), "orphaned relays");
    // down.sh finds nothing left and a new up.sh works in the same place.
    assert!(net.script("down.sh", &[]).status.success());
    net.bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_meshwhisper"));
    net.up(2);
    assert_eq!(net.relays().len(), 2);
}

#[test]
fn down_finds_the_relays_of_an_interrupted_up() {
    let net = Testnet::new(&[]);
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testnet/up.sh");
    let mut up = Command::new("bash")
        .arg(script)
        .arg("3")
        .env("MW_BIN", &net.bin)
        .env("MW_TESTNET_DIR", net.run.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("up.sh");
    // Once a relay of it runs, up.sh dies without cleaning up.
    let deadline = Instant::now() + Duration::from_secs(60);
    while relays_alive(&net).is_empty() {
        assert!(Instant::now() < deadline, "no relay started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = up.kill();
    let _ = up.wait();
    assert!(!relays_alive(&net).is_empty());
    let down = net.script("down.sh", &[]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert_eq!(
        relays_alive(&net),
        Vec::<String>::new(),
        "down.sh left relays"
    );
}
