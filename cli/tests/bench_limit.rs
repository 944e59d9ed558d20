//! `bench forwarder` and the single-threaded `bench relay` that
//! scripts/bench-limit.sh runs side by side: the forwarder delivers every
//! packet once, and the load generator reports latency percentiles and the
//! CPU time the loaded process spent.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `meshwhisper ARGS` and waits for the stdout line starting with
/// `prefix`; the process and the rest of that line.
fn spawn_until(args: &[&str], prefix: &'static str) -> (Proc, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshwhisper"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix(prefix) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let rest = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("no '{prefix}' line from {args:?}"));
    (Proc(child), rest)
}

/// One single-threaded load run against `addr`, as bench-limit.sh does it.
fn load(addr: &str, pid: u32) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_meshwhisper"))
        .args(["bench", "relay", "--threads", "1", "--url"])
        .arg(format!("ws://{addr}/"))
        .args([
            "--pairs",
            "4",
            "--msgs",
            "500",
            "--size",
            "300",
            "--window",
            "8",
            "--timeout",
            "60",
            "--json",
            "--relay-pid",
        ])
        .arg(pid.to_string())
        .output()
        .expect("run the load generator");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON summary")
}

fn check(summary: &serde_json::Value, what: &str) {
    assert_eq!(summary["delivered"], 2000, "{what}: {summary}");
    assert_eq!(summary["lost"], 0, "{what}: {summary}");
    assert_eq!(summary["duplicates"], 0, "{what}: {summary}");
    let p = |k: &str| summary[k].as_f64().unwrap_or(-1.0);
    assert!(
        0.0 < p("p50_ms") && p("p50_ms") <= p("p99_ms") && p("p99_ms") <= p("p999_ms"),
        "{what}: {summary}"
    );
    assert!(p("relay_cpu_s") >= 0.0, "{what}: {summary}");
    assert!(p("relay_cpu_s_per_million") >= 0.0, "{what}: {summary}");
}

#[test]
fn the_forwarder_and_the_relay_carry_the_same_load_and_report_cpu() {
    let (fwd, addr) = spawn_until(
        &["bench", "forwarder", "--http", "127.0.0.1:0"],
        "listening=",
    );
    check(&load(&addr, fwd.0.id()), "forwarder");

    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().to_str().expect("utf-8 path");
    let (relay, http) = spawn_until(
        &[
            "relay",
            "--http",
            "127.0.0.1:0",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-dir",
            data,
        ],
        "http=http://",
    );
    check(&load(&http, relay.0.id()), "relay");
}
