//! Relays behind NAT, in the network namespaces of `testnet/nat.sh`
//! (three public relays; sites A, B and C behind masquerading routers that
//! drop unsolicited packets; C may reach only pub1). Needs root: without it
//! each test says so and passes without running.
//!
//! The tests share the namespaces (all named `mwn-*`), so they take a lock.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static TOPOLOGY: Mutex<()> = Mutex::new(());

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn skip(test: &str) -> bool {
    if !is_root() {
        eprintln!(
            "SKIPPED {test}: needs root (network namespaces for the NAT topology); CI runs it as root"
        );
        return true;
    }
    false
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_meshwhisper")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo")
        .to_path_buf()
}

/// A NAT testnet, taken down on drop.
struct Net {
    dir: tempfile::TempDir,
    /// name → (namespace, pid, PeerId, libp2p address, HTTP base)
    relays: Vec<(String, String, u32, String, String, String)>,
}

impl Net {
    fn up(transports: &str) -> Self {
        Self::up_with(transports, &[])
    }

    /// `up` with extra environment for `nat.sh` (MW_RELAY_ARGS_<name>…).
    fn up_with(transports: &str, env: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let script = repo().join("testnet/nat.sh");
        // A topology left by a killed run would make `up` refuse.
        let _ = Command::new(&script)
            .arg("down")
            .env("MW_NAT_DIR", dir.path())
            .output();
        let out = Command::new(&script)
            .arg("up")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("MW_BIN", bin())
            .env("MW_NAT_DIR", dir.path())
            .env("MW_NAT_TRANSPORTS", transports)
            .env("MW_NAT_WAIT", "120")
            .output()
            .expect("nat.sh");
        assert!(
            out.status.success(),
            "nat.sh up failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let table = std::fs::read_to_string(dir.path().join("relays.tsv")).expect("relays.tsv");
        let relays = table
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (
                    f[0].to_string(),
                    f[1].to_string(),
                    f[2].parse().expect("pid"),
                    f[3].to_string(),
                    f[4].to_string(),
                    f[5].to_string(),
                )
            })
            .collect();
        Net { dir, relays }
    }

    fn relay(&self, name: &str) -> &(String, String, u32, String, String, String) {
        self.relays
            .iter()
            .find(|r| r.0 == name)
            .unwrap_or_else(|| panic!("no relay {name}"))
    }

    fn name_of(&self, peer: &str) -> &str {
        &self
            .relays
            .iter()
            .find(|r| r.3 == peer)
            .unwrap_or_else(|| panic!("no relay {peer}"))
            .0
    }

    /// `GET path` on relay `name`, from inside its namespace.
    fn get(&self, name: &str, path: &str) -> String {
        let r = self.relay(name);
        let out = Command::new("ip")
            .args(["netns", "exec", &r.1, "curl", "-fsS", "--max-time", "3"])
            .arg(format!("{}{path}", r.5))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn health(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.get(name, "/health")).unwrap_or(serde_json::Value::Null)
    }

    fn metric(&self, name: &str, metric: &str) -> u64 {
        self.get(name, "/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{metric} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Polls relay `name`'s `/health` until `pred` holds (bounded).
    fn wait_health(
        &self,
        name: &str,
        what: &str,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let h = self.health(name);
            if pred(&h) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{what} within {limit:?}: last /health {h}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `meshwhisper args` in namespace `ns`, asserting success.
    fn run(&self, ns: &str, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, bin()])
            .args(args)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "meshwhisper {args:?} in {ns} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    }

    fn profile(&self, ns: &str, name: &str, relay: &str) -> String {
        let p = self.dir.path().join(name).display().to_string();
        let addr = self.relay(relay).4.clone();
        self.run(
            ns,
            &[
                "id",
                "new",
                "--profile",
                &p,
                "--relay",
                &addr,
                "--name",
                name,
            ],
        );
        p
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("testnet/nat.sh"))
            .arg("down")
            .env("MW_NAT_DIR", self.dir.path())
            .output();
        if std::thread::panicking() {
            // The relays' logs, for whoever reads the failure.
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tmp")).keep();
            eprintln!("relay logs kept in {}", kept.display());
        }
    }
}

/// `listen --json` in a namespace; its stdout lines on a channel.
struct Listener {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Listener {
    fn start(ns: &str, profile: &str) -> Self {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                bin(),
                "listen",
                "--json",
                "--profile",
                profile,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("listen");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::sync_channel(4096);
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for l in std::io::BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Listener { child, lines }
    }

    /// The next event for which `f` holds (bounded).
    fn until(&self, what: &str, limit: Duration, f: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {what} within {limit:?}"));
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l)
                && f(&v)
            {
                return;
            }
        }
    }

    /// Texts of the messages received within `limit` until `n` arrived.
    fn messages(&self, n: usize, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(l) = self.lines.recv_timeout(left) else {
                break;
            };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l)
                && v["event"] == "message"
            {
                got.push(v["text"].as_str().unwrap_or("").to_string());
            }
        }
        got
    }

    fn stop(mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let _ = self.child.wait();
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Adds `b` (by its invite) to `a`'s contacts; `b` learns of `a` from
/// `a`'s first message.
fn introduce(net: &Net, (a_ns, a): (&str, &str), (b_ns, b): (&str, &str)) {
    let invite = net.run(b_ns, &["invite", "--profile", b]);
    net.run(a_ns, &["contact", "add", "--profile", a, invite.trim()]);
}

const LONG: Duration = Duration::from_secs(60);

#[test]
fn clients_behind_nat_and_on_a_public_relay_talk_and_relays_punch_holes() {
    if skip("clients_behind_nat_and_on_a_public_relay_talk_and_relays_punch_holes") {
        return;
    }
    let _g = TOPOLOGY.lock().unwrap_or_else(|e| e.into_inner());
    let net = Net::up("both");
    // The sites found themselves private and anchored; the health page says
    // through whom.
    for site in ["a", "b", "c"] {
        let h = net.health(site);
        if site != "c" {
            assert_eq!(h["nat"]["reachability"], "private", "{site}: {h}");
        }
        let state = if site == "c" {
            "transit-only"
        } else {
            "anchored"
        };
        assert_eq!(h["nat"]["state"], state, "{site}: {h}");
        assert!(!h["nat"]["servingAnchors"].as_bool().unwrap_or(true));
    }
    // C never dials anyone but its uplink, pub1 (others reach it there).
    let c_peers = net.health("c")["federation"]["peers"].clone();
    let pub1 = net.relay("pub1").3.clone();
    assert!(
        c_peers
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x == pub1.as_str())),
        "{c_peers}"
    );
    let served: u64 = ["pub1", "pub2", "pub3"]
        .iter()
        .map(|p| net.metric(p, "meshwhisper_nat_reservations_served"))
        .sum();
    assert!(served >= 4, "a and b hold two reservations each: {served}");
    assert!(net.metric("a", "meshwhisper_nat_probes_failed_total") >= 1);

    // Alice in site A (homed on relay a), carol on public relay pub2.
    let alice = net.profile("mwn-a-cli", "alice", "a");
    let carol = net.profile("mwn-pub2", "carol", "pub2");
    let carol_l = Listener::start("mwn-pub2", &carol);
    carol_l.until("carol's prekeys", LONG, |v| {
        v["event"] == "prekeys" && v["oneTime"] == 100
    });
    let alice_l = Listener::start("mwn-a-cli", &alice);
    alice_l.until("alice's prekeys", LONG, |v| {
        v["event"] == "prekeys" && v["oneTime"] == 100
    });
    introduce(&net, ("mwn-a-cli", &alice), ("mwn-pub2", &carol));
    // Live, both ways.
    net.run(
        "mwn-a-cli",
        &["send", "carol", "a to pub2", "--profile", &alice],
    );
    assert_eq!(carol_l.messages(1, LONG), vec!["a to pub2"]);
    net.run(
        "mwn-pub2",
        &["send", "alice", "pub2 to a", "--profile", &carol],
    );
    assert_eq!(alice_l.messages(1, LONG), vec!["pub2 to a"]);
    // Offline, both ways: sent while the recipient is away, read later.
    alice_l.stop();
    net.run(
        "mwn-pub2",
        &["send", "alice", "while you were away", "--profile", &carol],
    );
    let alice_l = Listener::start("mwn-a-cli", &alice);
    assert_eq!(alice_l.messages(1, LONG), vec!["while you were away"]);
    carol_l.stop();
    net.run(
        "mwn-a-cli",
        &["send", "carol", "and back", "--profile", &alice],
    );
    let carol_l = Listener::start("mwn-pub2", &carol);
    assert_eq!(carol_l.messages(1, LONG), vec!["and back"]);

    // Bob in site B: the relays of A and B meet through a circuit, punch a
    // hole and move federation to the direct connection.
    let bob = net.profile("mwn-b-cli", "bob", "b");
    let bob_l = Listener::start("mwn-b-cli", &bob);
    bob_l.until("bob's prekeys", LONG, |v| {
        v["event"] == "prekeys" && v["oneTime"] == 100
    });
    introduce(&net, ("mwn-a-cli", &alice), ("mwn-b-cli", &bob));
    net.run("mwn-a-cli", &["send", "bob", "a to b", "--profile", &alice]);
    assert_eq!(bob_l.messages(1, LONG), vec!["a to b"]);
    net.run("mwn-b-cli", &["send", "alice", "b to a", "--profile", &bob]);
    assert_eq!(alice_l.messages(1, LONG), vec!["b to a"]);
    let b_peer = net.relay("b").3.clone();
    net.wait_health("a", "A federated with B directly", LONG, |h| {
        let peers = h["federation"]["peers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let via = h["nat"]["peersViaCircuit"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        peers.iter().any(|p| p == b_peer.as_str()) && !via.iter().any(|p| p == b_peer.as_str())
    });
    assert!(
        net.metric("a", "meshwhisper_nat_hole_punch_successes_total")
            + net.metric("b", "meshwhisper_nat_hole_punch_successes_total")
            >= 1
    );

    // Dave in site C, whose relay may reach only pub1 and is transit-only:
    // his claim and his 20 messages to alice go through pub1 (the path
    // search finds it), and alice's answer comes back.
    let dave = net.profile("mwn-c-cli", "dave", "c");
    let dave_l = Listener::start("mwn-c-cli", &dave);
    dave_l.until("dave's prekeys", LONG, |v| {
        v["event"] == "prekeys" && v["oneTime"] == 100
    });
    introduce(&net, ("mwn-c-cli", &dave), ("mwn-a-cli", &alice));
    for i in 0..20 {
        net.run(
            "mwn-c-cli",
            &["send", "alice", &format!("t{i}"), "--profile", &dave],
        );
    }
    let mut got = alice_l.messages(20, LONG);
    got.sort_by_key(|m| m[1..].parse::<u32>().unwrap_or(0));
    let want: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
    assert_eq!(got, want, "20/20 through the bridge, once each");
    assert!(net.metric("c", "meshwhisper_federation_transit_sent_total") >= 20);
    assert!(net.metric("c", "meshwhisper_federation_paths_searched_total") >= 1);
    assert!(net.metric("pub1", "meshwhisper_federation_transit_relayed_total") >= 20);
    net.run(
        "mwn-a-cli",
        &["send", "dave", "back to c", "--profile", &alice],
    );
    assert_eq!(dave_l.messages(1, LONG), vec!["back to c"]);

    // SIGKILL one of A's anchors (not carol's relay) while carol sends to
    // alice: A re-anchors and republishes within 30 s; every message
    // arrives exactly once.
    let anchors: Vec<String> = net.health("a")["nat"]["anchors"]
        .as_array()
        .expect("anchors")
        .iter()
        .map(|p| p.as_str().expect("peer").to_string())
        .collect();
    assert_eq!(anchors.len(), 2, "{anchors:?}");
    let victim = anchors
        .iter()
        .find(|p| net.name_of(p) != "pub2")
        .expect("an anchor other than pub2")
        .clone();
    let victim_name = net.name_of(&victim).to_string();
    let sender = {
        let carol = carol.clone();
        std::thread::spawn(move || {
            for i in 0..20 {
                let out = Command::new("ip")
                    .args(["netns", "exec", "mwn-pub2", bin(), "send", "alice"])
                    .arg(format!("m{i}"))
                    .args(["--profile", &carol])
                    .output()
                    .expect("send");
                assert!(
                    out.status.success(),
                    "send m{i}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let signed = net.metric("a", "meshwhisper_federation_records_signed_total");
    let learned = net.metric(
        "pub2",
        "meshwhisper_federation_address_records_learned_total",
    );
    let victim_pid = net.relay(&victim_name).2;
    let pid = rustix::process::Pid::from_raw(victim_pid as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill");
    let took = net.wait_health("a", "A re-anchored", Duration::from_secs(30), |h| {
        let a = h["nat"]["anchors"].as_array().cloned().unwrap_or_default();
        a.len() == 2 && !a.iter().any(|p| p == victim.as_str())
    });
    eprintln!("re-anchored {took:?} after SIGKILL of {victim_name}");
    // A signed a new record naming its new anchors, and pub2 learned a
    // newer record (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(10);
    while net.metric("a", "meshwhisper_federation_records_signed_total") <= signed
        || net.metric(
            "pub2",
            "meshwhisper_federation_address_records_learned_total",
        ) <= learned
    {
        assert!(
            Instant::now() < deadline,
            "A's new record not signed and spread within 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    sender.join().expect("sender");
    let mut got = alice_l.messages(20, LONG);
    got.sort_by_key(|m| m[1..].parse::<u32>().unwrap_or(0));
    let want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "every message once");
    assert!(
        alice_l.messages(1, Duration::from_secs(2)).is_empty(),
        "no duplicates"
    );
    assert!(net.metric("a", "meshwhisper_nat_reanchors_total") >= 1);
    bob_l.stop();
}

#[test]
fn hole_punching_works_over_tcp_alone_and_over_quic_alone() {
    if skip("hole_punching_works_over_tcp_alone_and_over_quic_alone") {
        return;
    }
    let _g = TOPOLOGY.lock().unwrap_or_else(|e| e.into_inner());
    // pub2 takes two reservations a minute from one address (burst two).
    let conf = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(conf.path(), "[nat]\nreservations_per_ip_per_min = 2\n").expect("conf");
    for transport in ["tcp", "quic"] {
        let net = Net::up_with(
            transport,
            &[(
                "MW_RELAY_ARGS_pub2",
                format!("--config {}", conf.path().display()),
            )],
        );
        let alice = net.profile("mwn-a-cli", "alice", "a");
        let bob = net.profile("mwn-b-cli", "bob", "b");
        let bob_l = Listener::start("mwn-b-cli", &bob);
        bob_l.until("bob's prekeys", LONG, |v| {
            v["event"] == "prekeys" && v["oneTime"] == 100
        });
        introduce(&net, ("mwn-a-cli", &alice), ("mwn-b-cli", &bob));
        net.run("mwn-a-cli", &["send", "bob", "punch", "--profile", &alice]);
        assert_eq!(bob_l.messages(1, LONG), vec!["punch"], "{transport}");
        let b_peer = net.relay("b").3.clone();
        let took = net.wait_health("a", &format!("{transport}: A and B direct"), LONG, |h| {
            let peers = h["federation"]["peers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let via = h["nat"]["peersViaCircuit"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            peers.iter().any(|p| p == b_peer.as_str()) && !via.iter().any(|p| p == b_peer.as_str())
        });
        let ok = net.metric("a", "meshwhisper_nat_hole_punch_successes_total")
            + net.metric("b", "meshwhisper_nat_hole_punch_successes_total");
        assert!(ok >= 1, "{transport}: no hole punch counted");
        eprintln!("{transport}: direct {took:?} after the first message");
        bob_l.stop();
        if transport == "tcp" {
            reservations_beyond_the_caps_are_refused_and_counted(&net);
        }
    }
}

/// Three more reservations on pub2 from site B's one public address:
/// beyond pub2's per-address rate, at least one is refused and counted,
/// and pub2 stays healthy and keeps serving the sites it anchors.
fn reservations_beyond_the_caps_are_refused_and_counted(net: &Net) {
    let before = net.metric("pub2", "meshwhisper_nat_reservations_refused_total");
    let anchor = net.relay("pub2").4.clone();
    let mut listeners: Vec<Child> = (0..3)
        .map(|_| {
            Command::new("ip")
                .args(["netns", "exec", "mwn-b-cli", bin(), "bench", "holepunch"])
                .args(["--role", "listen", "--anchor", &anchor, "--secs", "20"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("holepunch listener")
        })
        .collect();
    let start = Instant::now();
    while net.metric("pub2", "meshwhisper_nat_reservations_refused_total") <= before {
        assert!(
            start.elapsed() < LONG,
            "no reservation refused by pub2 within {LONG:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for l in &mut listeners {
        let _ = l.kill();
        let _ = l.wait();
    }
    assert_eq!(net.health("pub2")["status"], "ok");
    assert_eq!(net.health("a")["nat"]["state"], "anchored");
}

#[test]
fn onion_transit_carries_messages_through_extra_relays() {
    if skip("onion_transit_carries_messages_through_extra_relays") {
        return;
    }
    let _g = TOPOLOGY.lock().unwrap_or_else(|e| e.into_inner());
    for hops in ["1", "2"] {
        let net = Net::up_with(
            "both",
            &[(
                "MW_RELAY_ARGS",
                format!("--onion-transit --onion-hops {hops}"),
            )],
        );
        let alice = net.profile("mwn-a-cli", "alice", "a");
        let carol = net.profile("mwn-pub2", "carol", "pub2");
        let carol_l = Listener::start("mwn-pub2", &carol);
        carol_l.until("carol's prekeys", LONG, |v| {
            v["event"] == "prekeys" && v["oneTime"] == 100
        });
        introduce(&net, ("mwn-a-cli", &alice), ("mwn-pub2", &carol));
        for i in 0..10 {
            net.run(
                "mwn-a-cli",
                &["send", "carol", &format!("o{i}"), "--profile", &alice],
            );
        }
        let mut got = carol_l.messages(10, LONG);
        got.sort_by_key(|m| m[1..].parse::<u32>().unwrap_or(0));
        let want: Vec<String> = (0..10).map(|i| format!("o{i}")).collect();
        assert_eq!(got, want, "{hops} extra hops: 10/10, once each");
        let sum =
            |metric: &str| -> u64 { net.relays.iter().map(|r| net.metric(&r.0, metric)).sum() };
        assert!(net.metric("a", "meshwhisper_federation_onion_sent_total") >= 10);
        assert!(net.metric("pub2", "meshwhisper_federation_onion_delivered_total") >= 10);
        let relayed = sum("meshwhisper_federation_onion_relayed_total");
        let n: u64 = hops.parse().expect("hops");
        assert!(
            relayed >= 10 * n,
            "{hops} extra hops: {relayed} layers relayed"
        );
        // Every routed packet a sent went as an onion, none in the clear.
        assert_eq!(
            net.metric("a", "meshwhisper_federation_routed_forwards_total"),
            net.metric("a", "meshwhisper_federation_onion_sent_total")
        );
        carol_l.stop();
    }
}

#[test]
fn a_circuit_that_reaches_its_limit_is_renewed_without_losing_packets() {
    if skip("a_circuit_that_reaches_its_limit_is_renewed_without_losing_packets") {
        return;
    }
    let _g = TOPOLOGY.lock().unwrap_or_else(|e| e.into_inner());
    // Anchors close every circuit after 4 s; a and b never punch a hole,
    // so their federation stream lives on circuits only.
    let anchors = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(anchors.path(), "[nat]\ncircuit_secs = 4\n").expect("conf");
    let sites = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(sites.path(), "[nat]\nhole_punch = false\n").expect("conf");
    let arg = |f: &tempfile::NamedTempFile| format!("--config {}", f.path().display());
    let net = Net::up_with(
        "both",
        &[
            ("MW_RELAY_ARGS_pub1", arg(&anchors)),
            ("MW_RELAY_ARGS_pub2", arg(&anchors)),
            ("MW_RELAY_ARGS_pub3", arg(&anchors)),
            ("MW_RELAY_ARGS_a", arg(&sites)),
            ("MW_RELAY_ARGS_b", arg(&sites)),
        ],
    );
    let alice = net.profile("mwn-a-cli", "alice", "a");
    let bob = net.profile("mwn-b-cli", "bob", "b");
    let bob_l = Listener::start("mwn-b-cli", &bob);
    bob_l.until("bob's prekeys", LONG, |v| {
        v["event"] == "prekeys" && v["oneTime"] == 100
    });
    introduce(&net, ("mwn-a-cli", &alice), ("mwn-b-cli", &bob));
    // 40 messages over more than two circuit lifetimes.
    let start = Instant::now();
    for i in 0..40 {
        net.run(
            "mwn-a-cli",
            &["send", "bob", &format!("c{i}"), "--profile", &alice],
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(start.elapsed() > Duration::from_secs(9));
    let mut got = bob_l.messages(40, LONG);
    got.sort_by_key(|m| m[1..].parse::<u32>().unwrap_or(0));
    let want: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
    assert_eq!(got, want, "every message once across circuit renewals");
    assert!(
        bob_l.messages(1, Duration::from_secs(2)).is_empty(),
        "no duplicates"
    );
    // Still no hole punch: it all went over circuits.
    assert_eq!(
        net.metric("a", "meshwhisper_nat_hole_punch_successes_total"),
        0
    );
    bob_l.stop();
}
