//! What a new operator and a new user meet in their first hour, run as they
//! run it: relay processes, CLI commands in several terminals, busy ports,
//! unreachable relays, a backup restored elsewhere.

mod people;

use people::{
    Proc, bin, closed_port, curl, invite, json, listen, profile, publish_prekeys, relay, run,
    run_fail,
};
use rustix::process::Signal;
use std::io::Write as _;
use std::process::Stdio;
use std::time::Duration;

fn s(p: &std::path::Path) -> &str {
    p.to_str().expect("utf8")
}

/// The message is one line and names each cause once.
fn one_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line: {stderr}");
    lines[0]
}

#[test]
fn a_second_relay_on_the_same_data_dir_is_refused_and_backup_still_works() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let first = relay(&data, &[]);
    let err = run_fail(&[
        "relay",
        "--data-dir",
        s(&data),
        "--http",
        "127.0.0.1:0",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ]);
    let line = one_line(&err);
    assert!(line.contains("in use"), "{line}");
    assert!(
        line.contains(&format!("pid {}", first.proc.pid())),
        "{line}"
    );
    assert!(!err.contains("recovered"), "{err}");
    // A backup of the running relay works (it takes no lock).
    let out = tmp.path().join("relay.tar");
    let said = run(&["backup", "--data-dir", s(&data), "--out", s(&out)]);
    assert!(said.contains("backup written"), "{said}");
    // The first relay is unharmed.
    assert!(curl(&format!("{}/health", first.http)).contains("\"status\":\"ok\""));
}

#[test]
fn a_restored_backup_is_the_same_relay_and_clients_drain_their_queue() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let r = relay(&data, &[]);
    let (a, b) = (
        profile(tmp.path(), "alice", &r.addr),
        profile(tmp.path(), "bob", &r.addr),
    );
    publish_prekeys(&b);
    run(&["contact", "add", "--profile", s(&a), &invite(&b)]);
    for text in ["one", "two", "three"] {
        run(&["send", "--profile", s(&a), "bob", text]);
    }
    // Media files travel too.
    let media = curl_post(&format!("{}/media", r.http), b"media-bytes-8d1e");
    assert!(media.contains("\"id\""), "{media}");
    let backup = tmp.path().join("relay.tar");
    run(&["backup", "--data-dir", s(&data), "--out", s(&backup)]);
    // The disk is lost.
    let port = r.addr.split('/').nth(4).expect("port").to_string();
    drop(r);
    std::fs::remove_dir_all(&data).expect("rm");

    let restored = tmp.path().join("restored");
    std::fs::create_dir(&restored).expect("empty dir");
    let said = run(&["restore", "--from", s(&backup), "--data-dir", s(&restored)]);
    // Restoring again over it is refused and changes nothing.
    let again = run_fail(&["restore", "--from", s(&backup), "--data-dir", s(&restored)]);
    assert!(one_line(&again).contains("not empty"), "{again}");
    let listen_addr = format!("/ip4/127.0.0.1/tcp/{port}");
    let back = relay(&restored, &["--listen", &listen_addr]);
    assert!(said.contains(&format!("peer_id={}", back.peer)), "{said}");
    assert!(back.addr.ends_with(&back.peer));
    // Bob, homed there, reconnects and gets what was queued.
    let bob = listen(&b);
    let mut got = Vec::new();
    while got.len() < 3 {
        let m = json(&bob.until("message", |l| json(l)["event"] == "message"));
        got.push(m["text"].as_str().expect("text").to_string());
    }
    assert_eq!(got, ["one", "two", "three"]);
    let id = json(&media)["id"].as_str().expect("id").to_string();
    assert_eq!(
        curl(&format!("{}/media/{id}", back.http)),
        "media-bytes-8d1e"
    );
}

fn curl_post(url: &str, body: &[u8]) -> String {
    let mut child = std::process::Command::new("curl")
        .args([
            "-fsS",
            "--max-time",
            "5",
            "-H",
            "content-type: application/octet-stream",
            "--data-binary",
            "@-",
            url,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body)
        .expect("write");
    let out = child.wait_with_output().expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[cfg(unix)]
fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
}

#[cfg(unix)]
#[test]
fn profile_files_are_owner_only_and_loose_ones_are_tightened() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().expect("tmp");
    let r = relay(&tmp.path().join("relay"), &[]);
    let a = profile(tmp.path(), "alice", &r.addr);
    assert_eq!(mode(&a), 0o700);
    publish_prekeys(&a);
    for f in [
        "identity.key",
        "profile.db",
        "profile.db-wal",
        "profile.db-shm",
        "lock",
    ] {
        let p = a.join(f);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{f}");
        }
    }
    // An older profile with loose modes is tightened, with a warning.
    std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(a.join("profile.db"), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    let out = bin()
        .args(["contact", "list", "--profile", s(&a)])
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tightened"));
    assert_eq!(mode(&a), 0o700);
    assert_eq!(mode(&a.join("profile.db")), 0o600);
}

#[test]
fn busy_ports_stop_the_relay_with_the_address_and_the_reason_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Held by another relay (whose sockets allow port sharing, as ours do).
    let holder = relay(&tmp.path().join("holder"), &[]);
    let busy_tcp = holder.addr.split("/p2p/").next().expect("addr").to_string();
    let err = run_fail(&[
        "relay",
        "--data-dir",
        s(&tmp.path().join("b")),
        "--http",
        "127.0.0.1:0",
        "--listen",
        &busy_tcp,
    ]);
    let line = one_line(&err);
    assert!(line.contains(&busy_tcp), "{line}");
    assert_eq!(line.matches("Address already in use").count(), 1, "{line}");
    // QUIC on a taken UDP port: the reason is given, not an empty one.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let quic = format!(
        "/ip4/127.0.0.1/udp/{}/quic-v1",
        udp.local_addr().expect("addr").port()
    );
    let err = run_fail(&[
        "relay",
        "--data-dir",
        s(&tmp.path().join("c")),
        "--http",
        "127.0.0.1:0",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--listen",
        &quic,
    ]);
    let line = one_line(&err);
    assert!(line.contains(&quic) && line.contains("in use"), "{line}");
    // The gateway port too, named as such.
    let http_port = holder.http.rsplit(':').next().expect("port").to_string();
    let err = run_fail(&[
        "relay",
        "--data-dir",
        s(&tmp.path().join("d")),
        "--http",
        &format!("127.0.0.1:{http_port}"),
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ]);
    let line = one_line(&err);
    assert!(line.contains("HTTP") && line.contains(&http_port), "{line}");
    assert!(
        !tmp.path().join("d").exists(),
        "a relay that cannot listen writes nothing"
    );
    // An address marked optional is skipped with a warning.
    let r = relay(
        &tmp.path().join("e"),
        &[
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--listen-optional",
            &quic,
        ],
    );
    r.proc.until_err("skip warning", |l| {
        l.contains("optional listen address skipped")
    });
}

#[test]
fn paths_that_are_files_and_damaged_profiles_are_one_clear_line() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("afile");
    std::fs::write(&file, b"x").expect("write");
    let err = run_fail(&["relay", "--data-dir", s(&file), "--http", "127.0.0.1:0"]);
    assert!(
        one_line(&err).contains("is a file, not a directory"),
        "{err}"
    );
    let err = run_fail(&["contact", "list", "--profile", s(&file)]);
    assert!(one_line(&err).contains("is a file"), "{err}");
    // A damaged profile database: one line, the cause once.
    let r = relay(&tmp.path().join("relay"), &[]);
    let a = profile(tmp.path(), "alice", &r.addr);
    std::fs::write(a.join("profile.db"), vec![0x42u8; 8192]).expect("clobber");
    for f in ["profile.db-wal", "profile.db-shm"] {
        let _ = std::fs::remove_file(a.join(f));
    }
    let err = run_fail(&["invite", "--profile", s(&a)]);
    let line = one_line(&err);
    assert_eq!(line.matches("not a database").count(), 1, "{line}");
    assert!(!err.contains("--log"), "{err}");
    // An invalid log filter is refused, not silently ignored.
    let err = run_fail(&[
        "relay",
        "--log",
        "verbose",
        "--data-dir",
        s(&tmp.path().join("x")),
    ]);
    assert!(one_line(&err).contains("\"verbose\""), "{err}");
}

#[test]
fn an_unreachable_bootstrap_is_logged_with_its_reason_and_health_says_no_peers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let other = relay(&tmp.path().join("other"), &[]);
    let stranger = || {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    };
    let closed = format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", closed_port(), stranger());
    // The right address with a mistyped PeerId.
    let other_addr = other.addr.split("/p2p/").next().expect("addr");
    let mistyped = format!("{other_addr}/p2p/{}", stranger());
    let r = relay(
        &tmp.path().join("r"),
        &["--bootstrap", &closed, "--bootstrap", &mistyped],
    );
    r.proc.until_err("refused bootstrap", |l| {
        l.contains("bootstrap") && l.contains("unreachable") && l.contains("refused")
    });
    r.proc
        .until_err("mistyped PeerId", |l| l.contains("mistyped"));
    let deadline = std::time::Instant::now() + people::WAIT;
    loop {
        let h = json(&curl(&format!("{}/health", r.http)));
        if h["federation"]["bootstrapErrors"]
            .as_array()
            .is_some_and(|a| a.len() == 2)
        {
            assert_eq!(h["federation"]["status"], "no peers");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{h}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn clients_say_which_relay_is_unreachable_and_that_messages_wait() {
    let tmp = tempfile::tempdir().expect("tmp");
    let r = relay(&tmp.path().join("relay"), &[]);
    let (a, b) = (
        profile(tmp.path(), "alice", &r.addr),
        profile(tmp.path(), "bob", &r.addr),
    );
    publish_prekeys(&b);
    run(&["contact", "add", "--profile", s(&a), &invite(&b)]);
    let peer = r.peer.clone();
    drop(r);
    let err = run_fail(&["send", "--profile", s(&a), "bob", "later", "--timeout", "3"]);
    assert!(err.contains(&peer), "{err}");
    assert!(err.contains("unreachable"), "{err}");
    assert!(err.contains("outbox"), "{err}");
    assert!(err.contains("refused"), "{err}");
    let l = listen(&a);
    let e = json(&l.until("unreachable event", |x| json(x)["event"] == "unreachable"));
    assert_eq!(e["relay"], peer.as_str());
    assert_eq!(e["home"], true);
}

#[test]
fn other_terminals_use_a_profile_while_it_listens() {
    let tmp = tempfile::tempdir().expect("tmp");
    let r = relay(&tmp.path().join("relay"), &[]);
    let (a, b, c) = (
        profile(tmp.path(), "alice", &r.addr),
        profile(tmp.path(), "bob", &r.addr),
        profile(tmp.path(), "carol", &r.addr),
    );
    publish_prekeys(&b);
    publish_prekeys(&c);
    run(&["contact", "add", "--profile", s(&a), &invite(&b)]);
    let alice = listen(&a);
    alice.until("connected", |l| json(l)["event"] == "connection");
    // Reading works beside the listener.
    assert!(run(&["contact", "list", "--profile", s(&a)]).starts_with("bob\t"));
    assert!(run(&["invite", "--profile", s(&a)]).starts_with("MW1"));
    assert!(run(&["id", "show", "--profile", s(&a)]).contains("identity="));
    assert_eq!(
        run(&["contact", "verify", "--profile", s(&a), "bob"])
            .trim()
            .replace(' ', "")
            .len(),
        60
    );
    // Changes are carried out by the listener.
    let added = run(&["contact", "add", "--profile", s(&a), &invite(&c)]);
    assert!(added.starts_with("added carol"), "{added}");
    let again = run(&[
        "contact",
        "add",
        "--profile",
        s(&a),
        &invite(&c),
        "--name",
        "caz",
    ]);
    assert!(again.starts_with("already a contact as carol"), "{again}");
    run(&["contact", "verify", "--profile", s(&a), "bob", "--confirm"]);
    assert!(run(&["contact", "list", "--profile", s(&a)]).starts_with("bob\tverified\t"));
    let sent = run(&["send", "--profile", s(&a), "bob", "from-another-terminal"]);
    assert!(sent.starts_with("sent "), "{sent}");
    let bob = listen(&b);
    let m = json(&bob.until("message", |l| json(l)["event"] == "message"));
    assert_eq!(m["text"], "from-another-terminal");
    // A send to someone who is not a contact is refused by the listener.
    let err = run_fail(&["send", "--profile", s(&a), "dave", "x"]);
    assert!(one_line(&err).contains("dave"), "{err}");
}

#[test]
fn contact_add_twice_says_under_which_name_and_chat_refuses_strangers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let r = relay(&tmp.path().join("relay"), &[]);
    let (a, b) = (
        profile(tmp.path(), "alice", &r.addr),
        profile(tmp.path(), "bob", &r.addr),
    );
    let inv = invite(&b);
    assert!(
        run(&["contact", "add", "--profile", s(&a), &inv, "--name", "bob2"])
            .starts_with("added bob2")
    );
    let out = bin()
        .args([
            "contact",
            "add",
            "--profile",
            s(&a),
            &inv,
            "--name",
            "robert",
        ])
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("already a contact as bob2"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("robert"));
    let err = run_fail(&["chat", "--profile", s(&a), "carol"]);
    assert!(
        one_line(&err).contains("no contact named \"carol\""),
        "{err}"
    );
}

/// `chat` with its input held open (as a terminal is), then interrupted.
fn chat(profile: &std::path::Path, name: &str) -> Proc {
    let mut cmd = bin();
    cmd.args(["chat", "--profile", s(profile), name])
        .stdin(Stdio::piped());
    let p = Proc::spawn(&mut cmd);
    p.until_err("chat prompt", |l| l.starts_with("chatting with"));
    p
}

#[test]
fn ctrl_c_and_ctrl_d_leave_chat_at_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let r = relay(&tmp.path().join("relay"), &[]);
    let (a, b) = (
        profile(tmp.path(), "alice", &r.addr),
        profile(tmp.path(), "bob", &r.addr),
    );
    run(&["contact", "add", "--profile", s(&a), &invite(&b)]);
    // Ctrl-C: SIGINT while input is open and nothing was typed.
    let mut c = chat(&a, "bob");
    c.signal(Signal::INT);
    let status = c
        .wait_exit(Duration::from_secs(5))
        .expect("chat did not leave on Ctrl-C");
    assert!(status.success(), "{status:?}");
    // Ctrl-D: end of input.
    let mut c = chat(&a, "bob");
    drop(c.child.stdin.take());
    let status = c
        .wait_exit(Duration::from_secs(15))
        .expect("chat did not leave on Ctrl-D");
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_relay_prints_a_reachable_url_and_the_next_command_that_works() {
    let tmp = tempfile::tempdir().expect("tmp");
    let r = relay(&tmp.path().join("relay"), &["--http", "0.0.0.0:0"]);
    assert!(r.http.starts_with("http://127.0.0.1:"), "{}", r.http);
    assert!(curl(&format!("{}/health", r.http)).contains("\"status\":\"ok\""));
    // Federation is open by default, unlike the reference relay: said so,
    // with a warning when there is no one to mesh with.
    assert_eq!(
        r.proc
            .until("federation=", |l| l.starts_with("federation=")),
        "federation=open"
    );
    let note = r
        .proc
        .until("federation note", |l| l.starts_with("note: federation"));
    assert!(
        note.contains("our default") && note.contains("reference relay's is off"),
        "{note}"
    );
    let warn = r.proc.until("warning", |l| l.starts_with("warning: "));
    assert!(warn.contains("no peers and no --bootstrap"), "{warn}");
    let next = r.proc.until("next command", |l| l.starts_with("next: "));
    let cmd = next.trim_start_matches("next: meshwhisper ");
    let cmd = cmd.replace("<your name>", "alice");
    let p = tmp.path().join("alice");
    let mut args: Vec<&str> = cmd.split(' ').collect();
    args.extend(["--profile", s(&p)]);
    assert!(run(&args).contains("identity="));
}
