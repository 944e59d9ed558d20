//! `bench forwarder` and the single-threaded `bench relay` that
//! scripts/bench-limit.sh runs side by side: the forwarder delivers every
//! packet once, and the load generator reports latency percentiles and the
//! CPU time the loaded process spent, for the relay's offline path too.

mod people;

use people::{Proc, bin};

/// Starts `meshwhisper ARGS` and waits for the stdout line starting with
/// `prefix`; the process and the rest of that line.
fn spawn_until(args: &[&str], prefix: &str) -> (Proc, String) {
    let p = Proc::spawn(bin().args(args).env("RUST_LOG", "warn"));
    let line = p.until(prefix, |l| l.starts_with(prefix));
    let rest = line[prefix.len()..].to_string();
    (p, rest)
}

/// One single-threaded load run against `addr`, as bench-limit.sh does it.
fn load(addr: &str, pid: u32, extra: &[&str]) -> serde_json::Value {
    let out = bin()
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
        .args(extra)
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
    check(&load(&addr, fwd.pid(), &[]), "forwarder");

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
    check(&load(&http, relay.pid(), &[]), "relay");

    // The offline path: everything stored with the receivers away (two
    // hashes each), then drained, each packet once.
    let off = load(&http, relay.pid(), &["--offline", "--dests", "2"]);
    assert_eq!(off["offline"], true, "{off}");
    assert_eq!(off["sent"], 2000, "{off}");
    assert_eq!(off["delivered"], 2000, "{off}");
    assert_eq!(off["lost"], 0, "{off}");
    assert_eq!(off["duplicates"], 0, "{off}");
    for k in [
        "store_msgs_per_sec",
        "drain_msgs_per_sec",
        "relay_cpu_s_per_million",
    ] {
        assert!(off[k].as_f64().is_some_and(|v| v > 0.0), "{k}: {off}");
    }
}
