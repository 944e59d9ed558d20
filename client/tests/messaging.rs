//! Two clients and one relay, all in this process on loopback: invites,
//! first contact, messages both ways, receipts, an offline recipient,
//! restarts, safety numbers, and a relay that only ever holds ciphertext.

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use meshwhisper_client::{
    Client, Config, ConnectionState, Event, Invite, MessageStatus, Profile, ReceiptKind,
};
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(30);

struct Relay {
    running: Option<meshwhisper_node::Running>,
    dir: tempfile::TempDir,
    addr: Multiaddr,
}

async fn relay_in(dir: tempfile::TempDir, port: u16) -> Relay {
    relay_with(dir, port, Vec::new()).await
}

/// A relay that federates with the relays at `bootstrap`.
async fn relay_with(dir: tempfile::TempDir, port: u16, bootstrap: Vec<String>) -> Relay {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cfg = meshwhisper_node::config::Config {
        data_dir: dir.path().to_path_buf(),
        http: "127.0.0.1:0".into(),
        listen: vec![format!("/ip4/127.0.0.1/tcp/{port}")],
        ..Default::default()
    };
    let mut cfg = cfg;
    cfg.federation.bootstrap = bootstrap;
    let running = meshwhisper_node::start(cfg).await.expect("relay");
    let mut addrs = running.p2p.listen_addrs.clone();
    let addr = tokio::time::timeout(WAIT, addrs.wait_for(|a| !a.is_empty()))
        .await
        .expect("listening")
        .expect("watch")[0]
        .clone()
        .with(Protocol::P2p(running.p2p.peer_id));
    Relay {
        running: Some(running),
        dir,
        addr,
    }
}

impl Relay {
    fn port(&self) -> u16 {
        self.addr
            .iter()
            .find_map(|p| match p {
                Protocol::Tcp(port) => Some(port),
                _ => None,
            })
            .expect("tcp port")
    }
    async fn stop(mut self) -> tempfile::TempDir {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        self.dir
    }
}

struct Person {
    client: Client,
    events: mpsc::Receiver<Event>,
}

async fn person(dir: &Path) -> Person {
    let (client, events) = Client::start(Config::new(dir)).await.expect("client");
    let mut p = Person { client, events };
    p.wait(|e| matches!(e, Event::Connection(ConnectionState::Connected)))
        .await;
    p
}

impl Person {
    async fn wait(&mut self, mut f: impl FnMut(&Event) -> bool) -> Event {
        tokio::time::timeout(WAIT, async {
            loop {
                let e = self.events.recv().await.expect("events open");
                if f(&e) {
                    return e;
                }
            }
        })
        .await
        .expect("event in time")
    }

    async fn texts(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        while out.len() < n {
            if let Event::Message(m) = self.wait(|e| matches!(e, Event::Message(_))).await {
                out.push(String::from_utf8(m.body).expect("utf8"));
            }
        }
        out
    }

    async fn add(&self, invite: Invite) {
        self.client.add_contact(invite, None).await.expect("add");
    }

    async fn say(&self, to: &str, text: &str) -> meshwhisper_client::MessageId {
        self.client
            .send(to, text.as_bytes().to_vec())
            .await
            .expect("send")
    }

    /// Waits until the relay holds our bundle and a full pool of
    /// one-time prekeys, so others can start sessions with us.
    async fn published(&mut self) {
        self.wait(|e| matches!(e, Event::PrekeysPublished { one_time: 100 }))
            .await;
    }

    async fn flush(&self) {
        tokio::time::timeout(WAIT, self.client.flush())
            .await
            .expect("flushed in time")
            .expect("flush");
    }

    async fn stop(self) {
        tokio::time::timeout(WAIT, self.client.shutdown())
            .await
            .expect("stopped in time");
    }
}

async fn profiles(relay: &Relay) -> (tempfile::TempDir, tempfile::TempDir) {
    profiles_on(relay, relay).await
}

/// Alice homed on `ra`, Bob on `rb`.
async fn profiles_on(ra: &Relay, rb: &Relay) -> (tempfile::TempDir, tempfile::TempDir) {
    let (a, b) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    Profile::create(a.path(), std::slice::from_ref(&ra.addr), "alice")
        .await
        .expect("alice");
    Profile::create(b.path(), std::slice::from_ref(&rb.addr), "bob")
        .await
        .expect("bob");
    (a, b)
}

/// A relay on a fresh directory, Alice's and Bob's profiles homed on it,
/// and Bob's invite.
async fn alice_and_bob() -> (Relay, tempfile::TempDir, tempfile::TempDir, Invite) {
    let relay = relay_in(tempfile::tempdir().expect("tmp"), 0).await;
    let (a, b) = profiles(&relay).await;
    let invite = invite_of(b.path()).await;
    (relay, a, b, invite)
}

async fn invite_of(dir: &Path) -> meshwhisper_client::Invite {
    Profile::open(dir).await.expect("open").invite()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_contact_messages_both_ways_receipts_and_safety_numbers() {
    let (relay, a, b, bob_invite) = alice_and_bob().await;
    let mut alice = person(a.path()).await;
    let mut bob = person(b.path()).await;
    bob.published().await;

    // Alice adds Bob from his invite only; Bob learns of Alice from her
    // first message.
    alice.add(bob_invite).await;
    let id = alice.say("bob", "hello bob").await;
    let added = bob.wait(|e| matches!(e, Event::ContactAdded(_))).await;
    let Event::ContactAdded(c) = added else {
        unreachable!()
    };
    assert_eq!(c.name, "alice");
    assert_eq!(c.identity, *alice.client.identity());
    assert_eq!(bob.texts(1).await, ["hello bob"]);
    // Delivery receipt back to Alice.
    let r = alice.wait(|e| matches!(e, Event::Receipt { .. })).await;
    assert_eq!(
        r,
        Event::Receipt {
            contact: "bob".into(),
            kind: ReceiptKind::Delivered,
            ids: vec![id]
        }
    );

    // Bob answers in the same session; Alice reads it and says so.
    bob.say("alice", "hi alice").await;
    let m = alice.wait(|e| matches!(e, Event::Message(_))).await;
    let Event::Message(m) = m else { unreachable!() };
    assert_eq!(m.body, b"hi alice");
    alice
        .client
        .mark_read("bob", vec![m.id])
        .await
        .expect("read");
    let r = bob
        .wait(|e| {
            matches!(
                e,
                Event::Receipt {
                    kind: ReceiptKind::Read,
                    ..
                }
            )
        })
        .await;
    assert!(matches!(r, Event::Receipt { ids, .. } if ids == vec![m.id]));

    // Ten more each way, interleaved, in order, once.
    for i in 0..10 {
        alice.say("bob", &format!("a{i}")).await;
        bob.say("alice", &format!("b{i}")).await;
    }
    let want_a: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
    let want_b: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    assert_eq!(bob.texts(10).await, want_a);
    assert_eq!(alice.texts(10).await, want_b);

    // Safety numbers: same 60 digits on both sides.
    let sa = alice.client.safety_number("bob").await.expect("sn");
    let sb = bob.client.safety_number("alice").await.expect("sn");
    assert_eq!(sa.len(), 60);
    assert_eq!(sa, sb);

    // History: Alice's first message reached "delivered".
    let h = alice.client.history("bob", 100).await.expect("history");
    assert_eq!(
        h.first().map(|m| (m.id, m.status)),
        Some((id, MessageStatus::Delivered))
    );
    assert_eq!(h.len(), 22);

    alice.stop().await;
    bob.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_recipient_gets_everything_once_in_order_across_restarts() {
    let (relay, a, b, bob_invite) = alice_and_bob().await;
    // Bob has been online once (his prekeys are at the relay), then leaves.
    let mut bob = person(b.path()).await;
    bob.published().await;
    bob.stop().await;

    let alice = person(a.path()).await;
    alice.add(bob_invite).await;
    for i in 0..5 {
        alice.say("bob", &format!("offline {i}")).await;
    }
    alice.flush().await;
    alice.stop().await;

    // Bob comes back: all five, in order, once.
    let mut bob = person(b.path()).await;
    let want: Vec<String> = (0..5).map(|i| format!("offline {i}")).collect();
    assert_eq!(bob.texts(5).await, want);
    bob.say("alice", "got them").await;
    bob.flush().await;
    bob.stop().await;

    // Restart both, then continue the same sessions.
    let mut alice = person(a.path()).await;
    assert_eq!(alice.texts(1).await, ["got them"]);
    let mut bob = person(b.path()).await;
    alice.say("bob", "after restart").await;
    assert_eq!(bob.texts(1).await, ["after restart"]);
    // Nothing was delivered twice: Bob's history holds each text once.
    let h = bob.client.history("alice", 100).await.expect("history");
    let bodies: Vec<String> = h
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    let mut want = want;
    want.push("got them".into());
    want.push("after restart".into());
    assert_eq!(bodies, want);

    // The relay restarts too (same port, same data): sessions continue.
    let port = relay.port();
    let dir = relay.stop().await;
    alice
        .wait(|e| matches!(e, Event::Connection(ConnectionState::Disconnected)))
        .await;
    let relay = relay_in(dir, port).await;
    alice
        .wait(|e| matches!(e, Event::Connection(ConnectionState::Connected)))
        .await;
    bob.wait(|e| matches!(e, Event::Connection(ConnectionState::Connected)))
        .await;
    alice.say("bob", "relay restarted").await;
    assert_eq!(bob.texts(1).await, ["relay restarted"]);

    // The relay's files hold no plaintext.
    alice.stop().await;
    bob.stop().await;
    let dir = relay.stop().await;
    let found = meshwhisper_tests::find_any(
        dir.path(),
        &[
            b"offline 3",
            b"got them",
            b"after restart",
            b"relay restarted",
        ],
    );
    assert!(found.is_none(), "plaintext found at the relay: {found:?}");
    // Control: the same scan finds it where it is kept in the clear (Bob's
    // own history).
    assert!(meshwhisper_tests::find_any(b.path(), &[b"relay restarted"]).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordered_and_duplicated_packets_decrypt_once() {
    use meshwhisper_crypto::destination;
    let (relay, a, b, bob_invite) = alice_and_bob().await;
    let mut bob = person(b.path()).await;
    bob.published().await;
    bob.stop().await;

    let mut alice = person(a.path()).await;
    alice.add(bob_invite.clone()).await;
    for i in 0..5 {
        alice.say("bob", &format!("m{i}")).await;
    }
    alice.flush().await;

    // Take Alice's five packets out of the relay and put them back
    // reversed, with two duplicates: 4 3 2 1 0 2 4. All five are first
    // messages (Bob has not answered), so the session starts from m4 and
    // m0-m3 decrypt with skipped keys.
    let core = relay.running.as_ref().expect("running").core.clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let hashes = destination::current_and_previous(
        &meshwhisper_client::profile::default_namespace(),
        &bob_invite.identity.x25519(),
        now,
    );
    let stored = core
        .store
        .mailbox()
        .pending(&hashes, now, 100)
        .await
        .expect("pending");
    assert_eq!(stored.len(), 5);
    core.store
        .mailbox()
        .delete(stored.iter().map(|p| p.id).collect())
        .await
        .expect("delete");
    for i in [4usize, 3, 2, 1, 0, 2, 4] {
        core.accept(stored[i].packet.clone().into())
            .await
            .expect("inject");
    }

    let mut bob = person(b.path()).await;
    assert_eq!(bob.texts(5).await, ["m4", "m3", "m2", "m1", "m0"]);
    // The duplicates produced nothing: the next message is the next one.
    alice.say("bob", "m5").await;
    assert_eq!(bob.texts(1).await, ["m5"]);
    assert_eq!(
        bob.client
            .history("alice", 100)
            .await
            .expect("history")
            .len(),
        6
    );
    // And Bob's receipts name all six exactly once between them.
    let mut receipted = std::collections::HashSet::new();
    while receipted.len() < 6 {
        if let Event::Receipt {
            ids,
            kind: ReceiptKind::Delivered,
            ..
        } = alice.wait(|e| matches!(e, Event::Receipt { .. })).await
        {
            for id in ids {
                assert!(receipted.insert(id), "receipt repeated");
            }
        }
    }
    alice.stop().await;
    bob.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prekeys_rotate_on_schedule_and_refill_when_low() {
    use meshwhisper_crypto::pqxdh::PrekeyBundle;
    let (relay, a, b, bob_invite) = alice_and_bob().await;
    let ns = hex::encode(meshwhisper_client::profile::default_namespace().as_bytes());
    let key = hex::encode(bob_invite.identity.to_bytes());
    let core = relay.running.as_ref().expect("running").core.clone();
    let spk_id = || async {
        let e = core
            .store
            .directory()
            .by_key(&ns, &key)
            .await
            .expect("dir")
            .expect("bob");
        PrekeyBundle::decode(&e.bundle)
            .expect("bundle")
            .signed_prekey()
            .0
    };

    let mut cfg = Config::new(b.path());
    cfg.opk_target = 10;
    cfg.opk_low = 5;
    cfg.rotate_after = Duration::from_secs(2);
    let (client, events) = Client::start(cfg).await.expect("bob");
    let mut bob = Person { client, events };
    bob.wait(|e| matches!(e, Event::PrekeysPublished { one_time: 10 }))
        .await;
    assert_eq!(spk_id().await, 1);

    // Six first contacts' worth of one-time prekeys are claimed.
    for _ in 0..6 {
        assert!(
            core.store
                .directory()
                .claim_one_time_prekey(&ns, &key)
                .await
                .expect("claim")
                .is_some()
        );
    }
    // At the next rotation Bob publishes a new signed prekey, learns his
    // pool is low (4) and refills it to 10.
    bob.wait(|e| matches!(e, Event::PrekeysPublished { one_time: 4 }))
        .await;
    bob.wait(|e| matches!(e, Event::PrekeysPublished { one_time: 10 }))
        .await;
    assert!(spk_id().await >= 2);

    // First contact against the rotated bundle works.
    let alice = person(a.path()).await;
    alice.add(bob_invite).await;
    alice.say("bob", "after rotation").await;
    assert_eq!(bob.texts(1).await, ["after rotation"]);
    alice.stop().await;
    bob.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_on_different_relays_and_changed_keys() {
    // Alice is homed on one relay, Bob on another, and the relays
    // federate: Alice's relay claims Bob's prekeys from his relay for her
    // and sends her packets there; Bob answers through his relay the same
    // way. Each client talks only to its own relay.
    let r1 = relay_in(tempfile::tempdir().expect("tmp"), 0).await;
    let r2 = relay_with(
        tempfile::tempdir().expect("tmp"),
        0,
        vec![r1.addr.to_string()],
    )
    .await;
    let (a, b) = profiles_on(&r1, &r2).await;
    let bob_invite = invite_of(b.path()).await;
    let mut bob = person(b.path()).await;
    bob.published().await;
    let mut alice = person(a.path()).await;
    alice.add(bob_invite).await;
    alice.say("bob", "across relays").await;
    assert_eq!(bob.texts(1).await, ["across relays"]);
    bob.say("alice", "back across").await;
    assert_eq!(alice.texts(1).await, ["back across"]);
    // Each relay stored only its own client's packets.
    let r2_core = r2.running.as_ref().expect("running").core.clone();
    assert!(
        r2_core
            .metrics
            .device_directory_requests
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );

    // Safety numbers agree, and change when Bob's key changes: a new
    // profile for Bob (new identity) gives Alice a different number.
    let sa = alice.client.safety_number("bob").await.expect("sn");
    assert_eq!(sa, bob.client.safety_number("alice").await.expect("sn"));
    let b2 = tempfile::tempdir().expect("tmp");
    let new_bob = Profile::create(b2.path(), std::slice::from_ref(&r2.addr), "bob")
        .await
        .expect("new bob")
        .invite();
    alice
        .client
        .add_contact(new_bob, Some("bob-new-phone".into()))
        .await
        .expect("add");
    let sn_new = alice
        .client
        .safety_number("bob-new-phone")
        .await
        .expect("sn");
    assert_eq!(sn_new.len(), 60);
    assert_ne!(sn_new, sa);
    // The same identity again only refreshes it; another identity under a
    // name in use is refused with a typed error.
    let again = Profile::open(b2.path()).await.expect("open").invite();
    let refreshed = alice
        .client
        .add_contact(again, None)
        .await
        .expect("refresh");
    assert_eq!(refreshed.name, "bob-new-phone");
    let b3 = tempfile::tempdir().expect("tmp");
    let third: Invite = Profile::create(b3.path(), std::slice::from_ref(&r2.addr), "bob")
        .await
        .expect("third")
        .invite();
    let err = alice.client.add_contact(third, None).await;
    assert!(matches!(err, Err(meshwhisper_client::Error::NameTaken(n)) if n == "bob"));
    alice.stop().await;
    bob.stop().await;
    r1.stop().await;
    r2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_hashes_follow_the_hour() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    // Both clients read one test clock, 3 s before an hour boundary.
    let hour = 3_600_000u64;
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let boundary = (real / hour + 1) * hour;
    let t = Arc::new(AtomicU64::new(boundary - 3_000));
    let clock = {
        let t = t.clone();
        meshwhisper_client::Clock::from_fn(move || t.load(Ordering::SeqCst))
    };
    let start = |dir: &Path| {
        let mut cfg = Config::new(dir);
        cfg.clock = clock.clone();
        Client::start(cfg)
    };
    let (relay, a, b, bob_invite) = alice_and_bob().await;
    let (client, events) = start(b.path()).await.expect("bob");
    let mut bob = Person { client, events };
    bob.published().await;
    let (client, events) = start(a.path()).await.expect("alice");
    let alice = Person { client, events };
    alice.add(bob_invite).await;
    alice.say("bob", "before the hour").await;
    assert_eq!(bob.texts(1).await, ["before the hour"]);

    // The hour turns: Alice now addresses Bob's hash for the new hour,
    // which Bob had not registered; he re-registers at his next tick and
    // the relay hands it over.
    t.store(boundary + 1_000, Ordering::SeqCst);
    alice.say("bob", "after the hour").await;
    assert_eq!(bob.texts(1).await, ["after the hour"]);
    // And a sender whose clock still says the previous hour reaches him
    // too (the previous hour stays registered).
    t.store(boundary - 1_000, Ordering::SeqCst);
    alice.say("bob", "late sender").await;
    assert_eq!(bob.texts(1).await, ["late sender"]);
    alice.stop().await;
    bob.stop().await;
    relay.stop().await;
}
