//! Two people, one relay, all separate processes of our binary: profiles,
//! invites, first contact, messages while the recipient is offline,
//! receipts and a reply; the relay's files and logs never contain the
//! plaintext or the people's keys.

mod people;

use people::{Proc, bin, json, listen, run};
use std::process::Stdio;

#[test]
fn two_people_talk_through_a_relay_with_the_cli() {
    let tmp = tempfile::tempdir().expect("tmp");
    let relay_dir = tmp.path().join("relay");
    let relay_log = tmp.path().join("relay.log");
    let log = std::fs::File::create(&relay_log).expect("log");
    let mut relay = Proc::spawn_with(
        bin()
            .args([
                "relay",
                "--http",
                "127.0.0.1:0",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--data-dir",
            ])
            .arg(&relay_dir)
            .env("RUST_LOG", "debug"),
        // The relay logs at debug to a file scanned at the end.
        Stdio::from(log),
    );
    let addr = relay
        .until("relay address", |l| l.starts_with("listen="))
        .trim_start_matches("listen=")
        .to_string();
    let (a, b) = (tmp.path().join("alice"), tmp.path().join("bob"));
    let (a_s, b_s) = (a.to_str().expect("utf8"), b.to_str().expect("utf8"));
    assert!(
        run(&[
            "id",
            "new",
            "--profile",
            a_s,
            "--relay",
            &addr,
            "--name",
            "alice"
        ])
        .contains("identity=")
    );
    run(&[
        "id",
        "new",
        "--profile",
        b_s,
        "--relay",
        &addr,
        "--name",
        "bob",
    ]);
    // A second `id new` on the same profile is refused.
    let again = bin()
        .args(["id", "new", "--profile", a_s, "--relay", &addr])
        .output()
        .expect("run");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    // Bob's invite is one line; the QR form adds a drawing after it.
    let invite = run(&["invite", "--profile", b_s]);
    assert_eq!(invite.lines().count(), 1);
    let invite = invite.trim().to_string();
    assert!(invite.starts_with("MW1"));
    let qr = run(&["invite", "--profile", b_s, "--qr"]);
    assert_eq!(qr.lines().next(), Some(invite.as_str()));
    assert!(qr.lines().count() > 20);

    // Bob goes online once (publishing his prekeys), then offline.
    let bob = listen(&b);
    bob.until("Bob's prekeys", |l| {
        json(l)["event"] == "prekeys" && json(l)["oneTime"] == 100
    });
    assert!(bob.stop().success());

    // Alice adds Bob and sends three messages while he is offline.
    assert!(run(&["contact", "add", "--profile", a_s, &invite]).starts_with("added bob"));
    let list = run(&["contact", "list", "--profile", a_s]);
    assert!(list.starts_with("bob\tunverified\t"));
    let mut ids = Vec::new();
    for text in [
        "first-secret-7f3a",
        "second-secret-91c2",
        "third-secret\nwith-lines",
    ] {
        let out = run(&["send", "--profile", a_s, "bob", text]);
        ids.push(
            out.trim()
                .strip_prefix("sent ")
                .expect("sent <id>")
                .to_string(),
        );
    }

    // Bob comes back: Alice is added from her first message and all three
    // arrive in order, once.
    let bob = listen(&b);
    let added = json(&bob.until("contact-added", |l| json(l)["event"] == "contact-added"));
    assert_eq!(added["contact"], "alice");
    let mut got = Vec::new();
    while got.len() < 3 {
        let m = json(&bob.until("message", |l| json(l)["event"] == "message"));
        got.push((
            m["id"].as_str().expect("id").to_string(),
            m["text"].as_str().expect("text").to_string(),
        ));
    }
    assert_eq!(
        got,
        vec![
            (ids[0].clone(), "first-secret-7f3a".to_string()),
            (ids[1].clone(), "second-secret-91c2".to_string()),
            (ids[2].clone(), "third-secret\nwith-lines".to_string()),
        ]
    );
    assert!(bob.stop().success());

    // Bob replies; Alice's listener gets the delivery receipts and the reply.
    run(&["send", "--profile", b_s, "alice", "reply-secret-55d0"]);
    let alice = listen(&a);
    let mut receipted = Vec::new();
    let mut reply = None;
    while receipted.len() < 3 || reply.is_none() {
        let e = json(&alice.until("receipt or message", |l| {
            matches!(json(l)["event"].as_str(), Some("delivered" | "message"))
        }));
        if e["event"] == "message" {
            assert!(reply.is_none(), "reply delivered twice");
            reply = Some(e["text"].as_str().expect("text").to_string());
        } else {
            for id in e["ids"].as_array().expect("ids") {
                receipted.push(id.as_str().expect("id").to_string());
            }
        }
    }
    assert_eq!(reply.as_deref(), Some("reply-secret-55d0"));
    receipted.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(receipted, want);
    // While Alice listens, a `send` in another process is handed to it.
    let handed = bin()
        .args(["send", "--profile", a_s, "bob", "handed-over"])
        .output()
        .expect("run");
    assert!(
        handed.status.success(),
        "{}",
        String::from_utf8_lossy(&handed.stderr)
    );
    assert!(String::from_utf8_lossy(&handed.stderr).contains("handed to the meshwhisper process"));
    assert!(alice.stop().success());

    // Safety numbers agree on both sides.
    let sa = run(&["contact", "verify", "--profile", a_s, "bob"]);
    let sb = run(&["contact", "verify", "--profile", b_s, "alice"]);
    assert_eq!(sa, sb);
    assert_eq!(sa.trim().replace(' ', "").len(), 60);
    run(&["contact", "verify", "--profile", a_s, "bob", "--confirm"]);
    assert!(run(&["contact", "list", "--profile", a_s]).starts_with("bob\tverified\t"));

    // Nothing the people wrote or hold secret is in the relay's files or
    // its debug log.
    let _ = relay.child.kill();
    let _ = relay.child.wait();
    let log = std::fs::read(&relay_log).expect("relay log");
    assert!(log.len() > 1000, "the relay logged at debug level");
    let mut haystacks = vec![log];
    for f in meshwhisper_tests::files_under(&relay_dir) {
        haystacks.push(std::fs::read(&f).expect("read"));
    }
    let mut needles: Vec<Vec<u8>> = [
        "first-secret-7f3a",
        "third-secret\nwith-lines",
        "reply-secret-55d0",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    for p in [&a, &b] {
        let seed = std::fs::read(p.join("identity.key")).expect("seed");
        needles.push(hex::encode(&seed).into_bytes());
        needles.push(seed);
    }
    for h in &haystacks {
        for n in &needles {
            assert!(
                !meshwhisper_tests::contains(h, n),
                "secret or plaintext found at the relay"
            );
        }
    }
}
