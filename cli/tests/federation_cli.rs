//! People on different relays, with our CLI: each client talks only to its
//! own relay, and a packet (message, receipt, prekey claim) touches exactly
//! the two relays of the people involved.
//!
//! - On a 3-relay `testnet/` mesh (relay 1 is everyone's bootstrap), alice
//!   on relay 2 and bob on relay 3 exchange messages and receipts: relay 1
//!   forwards, stores and serves nothing of theirs.
//! - In network namespaces (root only): alice's network lets her reach her
//!   own relay and nothing else, and she still talks to bob, homed on
//!   another relay; that relay never sees a packet from her address.

mod people;
mod testnet;

use people::{Proc, invite, json, listen, profile, publish_prekeys, run};
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};
use testnet::Testnet;

/// The counters of a relay's `/metrics` (name with labels → value).
fn metrics(http: &str) -> HashMap<String, f64> {
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "5", &format!("{http}/metrics")])
        .output()
        .expect("curl");
    parse_metrics(&String::from_utf8_lossy(&out.stdout))
}

fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn fed(m: &HashMap<String, f64>, name: &str) -> f64 {
    m.get(&format!("meshwhisper_federation_{name}"))
        .copied()
        .unwrap_or_else(|| panic!("no meshwhisper_federation_{name} in /metrics"))
}

/// What a relay that only passes a packet on (or serves a claim for
/// someone else) would count.
const TOUCHED: [&str; 7] = [
    "forwards_received_total",
    "forwards_sent_total",
    "forwarded_onward_total",
    "stored_locally_total",
    "delivered_locally_total",
    "claims_served_total",
    "claims_sent_total",
];

/// Sends `n` messages from `from` to `to` (each its own `send` process),
/// then `to` listens until it has them all and `from` listens until all
/// are receipted; bob answers once and alice gets it.
fn converse(alice: &std::path::Path, bob: &std::path::Path, n: usize) {
    let a = alice.to_str().expect("utf8");
    let mut ids = Vec::new();
    for i in 0..n {
        let out = run(&["send", "--profile", a, "bob", &format!("message {i}")]);
        ids.push(out.trim().trim_start_matches("sent ").to_string());
    }
    let b = listen(bob);
    let mut got = Vec::new();
    while got.len() < n {
        let m = json(&b.until("message", |l| json(l)["event"] == "message"));
        got.push(m["text"].as_str().expect("text").to_string());
    }
    let want: Vec<String> = (0..n).map(|i| format!("message {i}")).collect();
    assert_eq!(got, want, "every message once, in order");
    run(&[
        "send",
        "--profile",
        bob.to_str().expect("utf8"),
        "alice",
        "the reply",
    ]);
    assert!(b.stop().success());
    let l = listen(alice);
    let mut receipted = Vec::new();
    let mut reply = None;
    while receipted.len() < n || reply.is_none() {
        let e = json(&l.until("receipt or reply", |x| {
            matches!(json(x)["event"].as_str(), Some("delivered" | "message"))
        }));
        if e["event"] == "message" {
            assert!(reply.is_none(), "the reply arrived twice");
            reply = Some(e["text"].as_str().expect("text").to_string());
        } else {
            for id in e["ids"].as_array().expect("ids") {
                receipted.push(id.as_str().expect("id").to_string());
            }
        }
    }
    assert_eq!(reply.as_deref(), Some("the reply"));
    receipted.sort();
    ids.sort();
    assert_eq!(receipted, ids);
    assert!(l.stop().success());
}

#[test]
fn only_the_two_home_relays_touch_messages_receipts_and_claims() {
    let net = Testnet::new(&[]);
    net.up(3);
    let relays = net.relays();
    let (hub, ra, rb) = (&relays[0], &relays[1], &relays[2]);
    let dir = tempfile::tempdir().expect("tmp");
    let alice = profile(dir.path(), "alice", &ra.3);
    let bob = profile(dir.path(), "bob", &rb.3);
    publish_prekeys(&bob);
    run(&[
        "contact",
        "add",
        "--profile",
        alice.to_str().expect("utf8"),
        &invite(&bob),
    ]);
    converse(&alice, &bob, 10);

    let hub_m = metrics(&hub.2);
    for name in TOUCHED {
        assert_eq!(
            fed(&hub_m, name),
            0.0,
            "relay 1 (the bootstrap) counted {name}: it touched a packet or claim of people homed elsewhere"
        );
    }
    // Alice's relay routed her messages (and asked bob's relay for his
    // prekeys); bob's relay routed his receipts and reply. Nothing flooded.
    let (am, bm) = (metrics(&ra.2), metrics(&rb.2));
    assert!(fed(&am, "routed_forwards_total") >= 10.0, "{am:?}");
    assert!(fed(&am, "claims_sent_total") >= 1.0);
    assert!(fed(&bm, "claims_served_total") >= 1.0);
    assert!(fed(&bm, "routed_forwards_total") >= 2.0);
    for m in [&am, &bm] {
        assert_eq!(
            fed(m, "forwards_sent_total"),
            fed(m, "routed_forwards_total"),
            "a packet was flooded"
        );
        assert_eq!(fed(m, "forwarded_onward_total"), 0.0);
        assert_eq!(fed(m, "drops_duplicate_total"), 0.0);
    }
}

/// Network namespaces for one test, deleted when dropped.
struct Netns {
    prefix: String,
    names: Vec<String>,
}

fn sh(cmd: &str) {
    let out = Command::new("bash")
        .args(["-c", cmd])
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh_out(cmd: &str) -> String {
    let out = Command::new("bash")
        .args(["-c", cmd])
        .output()
        .expect("bash");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Netns {
    /// A bridge namespace `<p>inet` and one namespace per host, each on a
    /// veth into the bridge with its address in 203.0.113.0/24.
    fn new(hosts: &[(&str, &str)]) -> Self {
        let prefix = format!("mwf{}-", std::process::id());
        let mut n = Netns {
            names: vec![format!("{prefix}inet")],
            prefix: prefix.clone(),
        };
        let inet = format!("{prefix}inet");
        sh(&format!("ip netns add {inet}"));
        sh(&format!(
            "ip -n {inet} link add br0 type bridge && ip -n {inet} link set br0 up && ip -n {inet} link set lo up"
        ));
        for (i, (host, addr)) in hosts.iter().enumerate() {
            let ns = format!("{prefix}{host}");
            sh(&format!("ip netns add {ns}"));
            n.names.push(ns.clone());
            sh(&format!(
                "ip -n {ns} link add eth0 type veth peer name v{i} netns {inet} \
                 && ip -n {inet} link set v{i} master br0 && ip -n {inet} link set v{i} up \
                 && ip -n {ns} addr add {addr}/24 dev eth0 && ip -n {ns} link set eth0 up \
                 && ip -n {ns} link set lo up"
            ));
        }
        n
    }

    fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    /// `meshwhisper args` inside `host`'s namespace.
    fn bin(&self, host: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)])
            .arg(env!("CARGO_BIN_EXE_meshwhisper"));
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn have(tool: &str) -> bool {
    Command::new("bash")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A relay process in `host`'s namespace on `ip`, bootstrapping from
/// `bootstrap`; (process, its libp2p address with /p2p/, HTTP base).
fn relay_in(
    net: &Netns,
    host: &str,
    ip: &str,
    data: &std::path::Path,
    bootstrap: Option<&str>,
) -> (Proc, String, String) {
    let mut cmd = net.bin(host);
    cmd.arg("relay")
        .arg("--data-dir")
        .arg(data)
        .args(["--http", &format!("{ip}:8080")])
        .args(["--listen", &format!("/ip4/{ip}/tcp/4001")])
        .env("RUST_LOG", "info");
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    let p = Proc::spawn(&mut cmd);
    let peer = p
        .until("peer_id=", |l| l.starts_with("peer_id="))
        .trim_start_matches("peer_id=")
        .to_string();
    (
        p,
        format!("/ip4/{ip}/tcp/4001/p2p/{peer}"),
        format!("http://{ip}:8080"),
    )
}

#[test]
fn a_client_that_reaches_only_its_relay_talks_to_a_contact_elsewhere() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: needs root for network namespaces (CI runs as root)");
        return;
    }
    for tool in ["ip", "nft"] {
        assert!(
            have(tool),
            "`{tool}` is missing: .ci/run installs iproute2 and nftables"
        );
    }
    const R1: &str = "203.0.113.11";
    const R3: &str = "203.0.113.13";
    const ALICE: &str = "203.0.113.21";
    const BOB: &str = "203.0.113.22";
    let net = Netns::new(&[("r1", R1), ("r3", R3), ("alice", ALICE), ("bob", BOB)]);
    // Alice's network lets her reach her relay and nothing else (counted,
    // so we also see whether she ever tried).
    let a_ns = net.ns("alice");
    sh(&format!(
        "ip netns exec {a_ns} nft add table ip fw \
         && ip netns exec {a_ns} nft add chain ip fw out '{{ type filter hook output priority 0 ; policy accept ; }}' \
         && ip netns exec {a_ns} nft add rule ip fw out oifname lo accept \
         && ip netns exec {a_ns} nft add rule ip fw out ip daddr {R1} accept \
         && ip netns exec {a_ns} nft add rule ip fw out counter drop"
    ));
    // Bob's relay counts every packet that comes from alice's address.
    let r3_ns = net.ns("r3");
    sh(&format!(
        "ip netns exec {r3_ns} nft add table ip watch \
         && ip netns exec {r3_ns} nft add chain ip watch in '{{ type filter hook input priority 0 ; policy accept ; }}' \
         && ip netns exec {r3_ns} nft add rule ip watch in ip saddr {ALICE} counter"
    ));

    let dir = tempfile::tempdir().expect("tmp");
    let (_r1, r1_addr, _) = relay_in(&net, "r1", R1, &dir.path().join("r1"), None);
    let (_r3, r3_addr, r3_http) = relay_in(&net, "r3", R3, &dir.path().join("r3"), Some(&r1_addr));
    // Relay 3 has federated with relay 1 (bounded wait on its /health).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = sh_out(&format!(
            "ip netns exec {r3_ns} curl -fsS --max-time 2 {r3_http}/health"
        ));
        if serde_json::from_str::<serde_json::Value>(&h).is_ok_and(|v| {
            v["federation"]["peers"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "relays did not federate: {h}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Profiles live on the shared filesystem; commands run in the people's
    // namespaces.
    let alice = profile(dir.path(), "alice", &r1_addr);
    let bob = profile(dir.path(), "bob", &r3_addr);
    let (a, b) = (
        alice.to_str().expect("utf8").to_string(),
        bob.to_str().expect("utf8").to_string(),
    );
    let run_in = |host: &str, args: &[&str]| -> String {
        let out = net.bin(host).args(args).output().expect("run");
        assert!(
            out.status.success(),
            "meshwhisper {args:?} in {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listen_in =
        |host: &str, p: &str| Proc::spawn(net.bin(host).args(["listen", "--json", "--profile", p]));
    let bl = listen_in("bob", &b);
    bl.until("bob's prekeys", |l| {
        json(l)["event"] == "prekeys" && json(l)["oneTime"] == 100
    });
    run_in("alice", &["contact", "add", "--profile", &a, &invite(&bob)]);
    for i in 0..3 {
        run_in(
            "alice",
            &["send", "--profile", &a, "bob", &format!("hi {i}")],
        );
    }
    for i in 0..3 {
        let m = json(&bl.until("message", |l| json(l)["event"] == "message"));
        assert_eq!(m["text"], format!("hi {i}"));
    }
    run_in("bob", &["send", "--profile", &b, "alice", "hello from bob"]);
    let al = listen_in("alice", &a);
    let (mut reply, mut receipts) = (None, 0);
    while reply.is_none() || receipts < 3 {
        let e = json(&al.until("bob's reply and receipts", |l| {
            matches!(json(l)["event"].as_str(), Some("delivered" | "message"))
        }));
        if e["event"] == "message" {
            reply = Some(e["text"].as_str().expect("text").to_string());
        } else {
            receipts += e["ids"].as_array().expect("ids").len();
        }
    }
    assert_eq!(reply.as_deref(), Some("hello from bob"));
    assert!(al.stop().success());
    assert!(bl.stop().success());

    let counted = |ns: &str, table: &str| -> u64 {
        let out = sh_out(&format!("ip netns exec {ns} nft list table ip {table}"));
        out.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no counter in {out}"))
    };
    assert_eq!(
        counted(&a_ns, "fw"),
        0,
        "alice's client tried to reach something other than her relay"
    );
    assert_eq!(
        counted(&r3_ns, "watch"),
        0,
        "bob's relay saw a packet from alice's address"
    );
}
