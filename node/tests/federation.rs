//! Federation across in-process relays on loopback: real libp2p swarms,
//! real SQLite stores, WebSocket clients.

mod common;

use common::*;
use futures::StreamExt as _;
use meshwhisper_node::config::Config;
use meshwhisper_node::federation::key_of;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// What a failed federation test prints of its relays' logs (unless
/// `MW_TEST_LOG` says otherwise): connections, dials, admissions.
const FEDERATION_LOGS: &str = "meshwhisper_node=debug,libp2p_swarm=debug,libp2p_identify=debug";

/// Federation settings that make tests quick: short retry and anti-entropy
/// intervals, loopback only.
fn quick(cfg: &mut Config, bootstrap: Option<&str>) {
    init_logs(FEDERATION_LOGS);
    cfg.federation.retry_ms = 200;
    cfg.federation.anti_entropy_ms = 300;
    cfg.federation.flood_retry_ms = 5_000;
    cfg.federation.gossip_heartbeat_ms = 200;
    // A tiny send window, so routed packets go through the backlog.
    cfg.federation.send_window = 2;
    if let Some(b) = bootstrap {
        cfg.federation.bootstrap = vec![b.to_string()];
    }
}

/// The relay's libp2p address with its PeerId (what `--bootstrap` takes).
async fn p2p_addr(r: &Relay) -> String {
    let running = r.running.as_ref().expect("running");
    let mut addrs = running.p2p.listen_addrs.clone();
    let a = tokio::time::timeout(Duration::from_secs(10), addrs.wait_for(|a| !a.is_empty()))
        .await
        .expect("listening")
        .expect("watch")[0]
        .clone();
    format!("{a}/p2p/{}", running.p2p.peer_id)
}

fn running(r: &Relay) -> &meshwhisper_node::Running {
    r.running.as_ref().expect("running")
}

fn fed(r: &Relay) -> &meshwhisper_node::metrics::FederationMetrics {
    &running(r).core.metrics.federation
}

/// The relay's Ed25519 key in hex (what the `route` frame names).
fn key_hex(r: &Relay) -> String {
    hex::encode(key_of(&running(r).p2p.peer_id).expect("ed25519 peer id"))
}

/// Waits (bounded) until `check` holds; `what` names it in the failure.
async fn eventually<F, Fut>(what: &str, secs: u64, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_or(what, secs, check, String::new).await;
}

/// [`eventually`], with `explain()` in the failure message.
async fn eventually_or<F, Fut>(what: &str, secs: u64, mut check: F, explain: impl Fn() -> String)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut every = tokio::time::interval(Duration::from_millis(25));
    let mut watch = WaitWatch::default();
    loop {
        every.tick().await;
        watch.tick();
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {secs} s{}; {}",
            explain(),
            watch.describe()
        );
    }
}

async fn book_count(r: &Relay) -> u64 {
    running(r)
        .core
        .store
        .address_book()
        .count()
        .await
        .expect("count")
}

/// Starts `n` relays, the first being everyone's bootstrap, with `tweak`
/// applied to each configuration.
async fn mesh(n: usize, tweak: impl Fn(usize, &mut Config)) -> Vec<Relay> {
    let first = start(|c| {
        quick(c, None);
        tweak(0, c);
    })
    .await;
    let boot = p2p_addr(&first).await;
    let mut relays = vec![first];
    for i in 1..n {
        let b = boot.clone();
        relays.push(
            start(|c| {
                quick(c, Some(&b));
                tweak(i, c);
            })
            .await,
        );
    }
    relays
}

/// `n` relays with default (quick) settings whose books all hold `n` records.
async fn converged_mesh(n: usize) -> Vec<Relay> {
    let relays = mesh(n, |_, _| {}).await;
    converged(&relays, n as u64).await;
    relays
}

async fn stop_all(relays: Vec<Relay>) {
    for r in relays {
        r.stop().await;
    }
}

/// A relay's federation counters, for a failure message.
fn counters(r: &Relay) -> String {
    let m = fed(r);
    format!(
        "peers {} pending {} sent {} routed {} received {} stored {} retries {} stale hints {} \
         dials {} queue full {} rate limited {} learned {} rejected {:?} jobs refused {} rounds {}",
        m.peers_connected.load(Relaxed),
        m.pending.load(Relaxed),
        m.forwards_sent.load(Relaxed),
        m.routed_forwards.load(Relaxed),
        m.forwards_received.load(Relaxed),
        m.stored_locally.load(Relaxed),
        m.retries.load(Relaxed),
        m.stale_hints.load(Relaxed),
        m.discovered_dials.load(Relaxed),
        m.drops_queue_full.load(Relaxed),
        m.drops_rate_limited.load(Relaxed),
        m.records_learned.load(Relaxed),
        m.records_rejected
            .iter()
            .map(|c| c.load(Relaxed))
            .collect::<Vec<_>>(),
        m.jobs_refused.load(Relaxed),
        m.anti_entropy_rounds.load(Relaxed),
    )
}

async fn converged(relays: &[Relay], n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut every = tokio::time::interval(Duration::from_millis(25));
    let mut watch = WaitWatch::default();
    for (i, r) in relays.iter().enumerate() {
        loop {
            every.tick().await;
            watch.tick();
            let have = book_count(r).await;
            if have == n {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let counts: Vec<u64> =
                    futures::future::join_all(relays.iter().map(book_count)).await;
                panic!(
                    "relay {i} knows {have} records, not {n}, after 30 s; books: {counts:?}; \
                     relay {i}: {}; {}",
                    counters(r),
                    watch.describe()
                );
            }
        }
    }
}

const H: &str = "00112233445566ff";

async fn send_packet(ws: &mut Ws, dest: &str, payload: &[u8]) {
    ws.send(Message::Binary(packet(dest, payload).into()))
        .await
        .expect("send");
}

async fn send_route(ws: &mut Ws, dest: &str, home: &str) {
    let v = serde_json::json!({"type": "route", "destHash": dest, "homeRelay": home});
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send route");
}

/// A client registered with `relay` for `H`, once the relay holds it.
async fn recipient(relay: &Relay) -> Ws {
    let mut ws = ws(&relay.ws).await;
    hello(&mut ws, &[H]).await;
    eventually("recipient registered", 10, || async {
        running(relay)
            .core
            .is_homed(&meshwhisper_crypto::destination::DestHash::from_hex(H).expect("hex"))
            && running(relay).core.registered_hashes() == 1
    })
    .await;
    ws
}

/// Nothing more arrives on `ws` before a marker packet sent after it.
async fn no_more_before_marker(sender: &mut Ws, recipient: &mut Ws, home: Option<&str>) {
    if let Some(h) = home {
        send_route(sender, H, h).await;
    }
    send_packet(sender, H, b"marker").await;
    let p = next_packet(recipient).await;
    assert_eq!(&p[31..], b"marker", "a duplicate arrived before the marker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_relays_converge_and_relearn_a_relay_on_a_new_port() {
    let mut relays = converged_mesh(10).await;
    for r in &relays {
        let h = get(&format!("{}/health", r.base)).await.json();
        assert!(
            h["federationPeersConnected"].as_u64().unwrap_or(0) >= 1,
            "{h}"
        );
    }

    // Relay 5 restarts on a new port with gossip off: only anti-entropy
    // can tell the others.
    let old = relays.remove(5);
    let old_addr = p2p_addr(&old).await;
    let boot = p2p_addr(&relays[0]).await;
    let dir = old.stop().await;
    let moved = start_in(dir, |c| {
        quick(c, Some(&boot));
        c.federation.record_gossip = false;
    })
    .await;
    let new_addr = p2p_addr(&moved).await;
    assert_ne!(new_addr, old_addr, "new port");
    let key = key_of(&running(&moved).p2p.peer_id).expect("key");
    let port = new_addr
        .split("/tcp/")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .expect("port")
        .to_string();
    for (i, r) in relays.iter().enumerate() {
        eventually(&format!("relay {i} learns the new address"), 30, || async {
            match running(r).core.store.address_book().get(&key).await {
                Ok(Some(rec)) => rec.addrs().iter().any(|a| {
                    libp2p::Multiaddr::try_from(a.clone())
                        .map(|m| m.to_string().contains(&format!("/tcp/{port}")))
                        .unwrap_or(false)
                }),
                _ => false,
            }
        })
        .await;
    }
    assert_eq!(fed(&moved).records_signed.load(Relaxed), 1);
    stop_all(relays).await;
    moved.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_alone_spreads_a_new_record() {
    // Anti-entropy effectively off: records travel by gossipsub only.
    let relays = mesh(3, |_, c| c.federation.anti_entropy_ms = 3_600_000).await;
    converged(&relays, 3).await;
    for r in &relays {
        assert!(fed(r).records_learned.load(Relaxed) >= 2);
    }
    stop_all(relays).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hinted_packet_touches_only_sender_and_home_relay() {
    let relays = converged_mesh(5).await;
    let (a, f) = (&relays[1], &relays[4]);
    let mut bob = recipient(f).await;
    let mut alice = ws(&a.ws).await;
    hello(&mut alice, &["aaaaaaaaaaaaaaaa"]).await;
    let home = key_hex(f);
    for i in 0..50u8 {
        send_route(&mut alice, H, &home).await;
        send_packet(&mut alice, H, &[i; 40]).await;
    }
    for i in 0..50u8 {
        let p = next_packet(&mut bob).await;
        assert_eq!(&p[31..], &[i; 40], "in order, once");
    }
    no_more_before_marker(&mut alice, &mut bob, Some(&home)).await;
    // Every other relay never saw a packet.
    for (i, r) in relays.iter().enumerate() {
        if i == 1 || i == 4 {
            continue;
        }
        assert_eq!(fed(r).forwards_received.load(Relaxed), 0, "relay {i}");
        assert_eq!(fed(r).forwards_sent.load(Relaxed), 0, "relay {i}");
    }
    assert_eq!(fed(f).forwards_received.load(Relaxed), 51);
    assert_eq!(fed(a).routed_forwards.load(Relaxed), 51);
    // Sent on from memory and never stored at the sender.
    assert_eq!(fed(a).unstored.load(Relaxed), 51);
    assert_eq!(fed(a).kept.load(Relaxed), 0);
    assert_eq!(
        fed(a).retries.load(Relaxed),
        0,
        "a live stream needs no resends"
    );
    // The sender's copies are deleted once the home relay acknowledged.
    eventually("sender forgets acknowledged packets", 10, || async {
        running(a).core.store.mailbox().count().await.unwrap_or(1) == 0
            && fed(a).pending.load(Relaxed) == 0
    })
    .await;
    stop_all(relays).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhinted_packet_floods_and_is_delivered_once() {
    let relays = converged_mesh(5).await;
    let (a, f) = (&relays[1], &relays[4]);
    let mut bob = recipient(f).await;
    let mut alice = ws(&a.ws).await;
    for i in 0..5u8 {
        send_packet(&mut alice, H, &[i; 40]).await;
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(next_packet(&mut bob).await[31..].to_vec());
    }
    got.sort();
    assert_eq!(got, (0..5u8).map(|i| vec![i; 40]).collect::<Vec<_>>());
    no_more_before_marker(&mut alice, &mut bob, None).await;
    eventually("every flood acknowledged", 10, || async {
        fed(a).pending.load(Relaxed) == 0
    })
    .await;
    let delivered: u64 = relays
        .iter()
        .map(|r| fed(r).delivered_locally.load(Relaxed) + fed(r).stored_locally.load(Relaxed))
        .sum();
    assert_eq!(delivered, 6, "stored only at the home relay, once each");
    assert_eq!(
        fed(f).delivered_locally.load(Relaxed) + fed(f).stored_locally.load(Relaxed),
        6
    );
    // Only the home relay keeps anything: the sender forgot its copies.
    eventually("sender's copies deleted", 10, || async {
        running(a).core.store.mailbox().count().await.unwrap_or(1) == 0
    })
    .await;
    stop_all(relays).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_for_a_home_relay_that_is_down_arrives_after_it_returns() {
    let mut relays = converged_mesh(3).await;
    // Bob registers on F, then F goes down (Bob with it).
    let f = relays.remove(2);
    let home = key_hex(&f);
    let bob = recipient(&f).await;
    drop(bob);
    let dir = f.stop().await;
    let a = &relays[1];
    let mut alice = ws(&a.ws).await;
    send_route(&mut alice, H, &home).await;
    send_packet(&mut alice, H, b"while you were away").await;
    eventually("the sender holds it for F", 10, || async {
        fed(a).pending.load(Relaxed) == 1
    })
    .await;
    // F comes back (new port) and is reached from its new record.
    let boot = p2p_addr(&relays[0]).await;
    let f = start_in(dir, |c| quick(c, Some(&boot))).await;
    eventually("F acknowledged", 30, || async {
        fed(a).pending.load(Relaxed) == 0 && fed(a).routed_acked.load(Relaxed) == 1
    })
    .await;
    let mut bob = ws(&f.ws).await;
    hello(&mut bob, &[H]).await;
    let p = next_packet(&mut bob).await;
    assert_eq!(&p[31..], b"while you were away");
    no_more_before_marker(&mut alice, &mut bob, Some(&home)).await;
    stop_all(relays).await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_recipient_homed_elsewhere_gets_flooded_packets() {
    // The JS SDK case: no hint, recipient offline, its relay remembers the
    // hashes it registered.
    let relays = converged_mesh(3).await;
    let (a, f) = (&relays[1], &relays[2]);
    let bob = recipient(f).await;
    drop(bob);
    eventually("bob gone", 10, || async {
        running(f).core.registered_hashes() == 0
    })
    .await;
    let mut alice = ws(&a.ws).await;
    for i in 0..20u8 {
        send_packet(&mut alice, H, &[i; 32]).await;
    }
    eventually("all stored at F", 10, || async {
        fed(f).stored_locally.load(Relaxed) == 20
    })
    .await;
    let mut bob = ws(&f.ws).await;
    hello(&mut bob, &[H]).await;
    let mut got = Vec::new();
    for _ in 0..20 {
        got.push(next_packet(&mut bob).await[31..].to_vec());
    }
    got.sort();
    assert_eq!(got, (0..20u8).map(|i| vec![i; 32]).collect::<Vec<_>>());
    no_more_before_marker(&mut alice, &mut bob, None).await;
    assert_eq!(fed(&relays[0]).stored_locally.load(Relaxed), 0);
    stop_all(relays).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocklisting_a_connected_relay_disconnects_it_at_once() {
    let list = tempfile::NamedTempFile::new().expect("tmp");
    let path = list.path().to_path_buf();
    let relays = mesh(2, |i, c| {
        if i == 0 {
            c.federation.blocklist_file = Some(path.clone());
        }
    })
    .await;
    converged(&relays, 2).await;
    let (a, b) = (&relays[0], &relays[1]);
    let mut status = running(a).p2p.federation.clone();
    status
        .wait_for(|s| s.connected.contains(&running(b).p2p.peer_id))
        .await
        .expect("connected");
    std::fs::write(&path, format!("# bad relay\n{}\n", running(b).p2p.peer_id)).expect("write");
    tokio::time::timeout(
        Duration::from_secs(5),
        status.wait_for(|s| s.connected.is_empty()),
    )
    .await
    .expect("disconnected within the file-check period")
    .expect("watch");
    eventually("B's reconnects are refused", 10, || async {
        fed(a).handshake_rejections_blocked.load(Relaxed) >= 1
    })
    .await;
    assert!(
        !running(a)
            .p2p
            .federation
            .borrow()
            .connected
            .contains(&running(b).p2p.peer_id)
    );
    // Taking it off the list lets B back in (it keeps bootstrapping).
    std::fs::write(&path, "# nobody\n").expect("write");
    tokio::time::timeout(
        Duration::from_secs(30),
        status.wait_for(|s| !s.connected.is_empty()),
    )
    .await
    .expect("reconnected")
    .expect("watch");
    stop_all(relays).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_off_refuses_relays_but_serves_clients() {
    let relays = mesh(2, |i, c| {
        if i == 0 {
            c.federation.mode = meshwhisper_node::config::FederationMode::Off;
        }
    })
    .await;
    eventually("B refused by A", 10, || async {
        fed(&relays[0]).admissions_refused.load(Relaxed) >= 1
    })
    .await;
    assert!(
        running(&relays[0])
            .p2p
            .federation
            .borrow()
            .connected
            .is_empty()
    );
    // A still relays between its own clients.
    let mut bob = recipient(&relays[0]).await;
    let mut alice = ws(&relays[0].ws).await;
    send_packet(&mut alice, H, b"local").await;
    assert_eq!(&next_packet(&mut bob).await[31..], b"local");
    stop_all(relays).await;
}

/// A hand-driven relay-like swarm: publishes forged records and sends bad
/// frames to a real relay, which must reject and count them, and go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_and_bad_frames_are_rejected_and_counted() {
    use libp2p::swarm::SwarmEvent;
    use meshwhisper_behaviour::federation::{self as fedb, codec::AckStatus, codec::Frame};
    use meshwhisper_behaviour::node::{BehaviourEvent, RECORDS_TOPIC};
    use meshwhisper_crypto::address_record::{AddressRecord, Contents};
    use meshwhisper_crypto::identity::IdentityKeyPair;

    let relays = mesh(1, |_, _| {}).await;
    let a = &relays[0];
    let a_peer = running(a).p2p.peer_id;
    let mut swarm = dial_as_relay(a, libp2p::identity::Keypair::generate_ed25519()).await;

    // Forged records: garbage, a bad signature, stale, from the future.
    let now = meshwhisper_node::core::now_ms();
    let forger = IdentityKeyPair::from_seed(&[9u8; 32]);
    let rec = |ts: u64| {
        AddressRecord::sign(
            &forger,
            Contents {
                timestamp_ms: ts,
                onion_key: forger.public().x25519(),
                addrs: vec![b"/ip4/127.0.0.1/tcp/1".to_vec()],
                anchors: Vec::new(),
            },
        )
        .expect("sign")
        .encode()
    };
    let mut bad_sig = rec(now);
    let last = bad_sig.len() - 1;
    bad_sig[last] ^= 1;
    let forged = vec![
        b"not a record".to_vec(),
        bad_sig,
        rec(now - 8 * 24 * 3_600_000),
        rec(now + 600_000),
    ];

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (mut opened, mut subscribed, mut published) = (false, false, false);
    let mut acks = std::collections::HashMap::new();
    let mut onion_acks = std::collections::HashMap::new();
    let mut sent_frames = false;
    let good_onion = {
        use meshwhisper_crypto::onion::{Hop, OnionBuilder as _, v2};
        let a_key = key_of(&a_peer).expect("key");
        let onion_key = meshwhisper_crypto::primitives::Ed25519Public::from_bytes(&a_key)
            .expect("ed25519")
            .to_x25519();
        let routed = Frame::Routed {
            id: [6; 16],
            hops: 1,
            flags: 0,
            target: a_key,
            packet: bytes::Bytes::from(packet(H, b"onion")),
        };
        let mut rng = <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::from_seed([1; 32]);
        let layer = v2::Sender
            .build(
                &mut rng,
                &[Hop {
                    relay_key: a_key,
                    onion_key,
                }],
                &meshwhisper_node::federation::onion::encode(routed),
            )
            .expect("onion");
        Frame::Onion {
            hop: [5; 16],
            layer: layer.into(),
        }
    };
    loop {
        if opened && subscribed && !published {
            for f in &forged {
                swarm
                    .behaviour_mut()
                    .gossipsub
                    .as_mut()
                    .expect("gossipsub on")
                    .publish(libp2p::gossipsub::IdentTopic::new(RECORDS_TOPIC), f.clone())
                    .expect("publish");
            }
            published = true;
        }
        if opened && !sent_frames {
            let fb = &mut swarm.behaviour_mut().federation;
            fb.send(
                a_peer,
                Frame::Records {
                    req: 1,
                    records: forged.iter().cloned().map(bytes::Bytes::from).collect(),
                },
            );
            fb.send(
                a_peer,
                Frame::Forward {
                    id: [1; 16],
                    hops: 1,
                    attempt: 0,
                    packet: bytes::Bytes::from_static(b"short"),
                },
            );
            fb.send(
                a_peer,
                Frame::Routed {
                    id: [2; 16],
                    hops: 1,
                    flags: 0,
                    target: [5; 32],
                    packet: bytes::Bytes::from(packet(H, b"x")),
                },
            );
            // A transit frame that has passed the hop cap already.
            fb.send(
                a_peer,
                Frame::Transit {
                    to: [5; 32],
                    hops: 3,
                    inner: Box::new(Frame::Routed {
                        id: [3; 16],
                        hops: 1,
                        flags: 0,
                        target: [5; 32],
                        packet: bytes::Bytes::from(packet(H, b"x")),
                    }),
                },
            );
            // An onion layer of a valid size that does not open.
            let size = meshwhisper_crypto::onion::v2::onion_len(100).expect("size");
            fb.send(
                a_peer,
                Frame::Onion {
                    hop: [4; 16],
                    layer: bytes::Bytes::from(vec![2u8; size]),
                },
            );
            // A good onion for `a`, twice: the replay is dropped.
            fb.send(a_peer, good_onion.clone());
            fb.send(a_peer, good_onion.clone());
            sent_frames = true;
        }
        let f = fed(a);
        let counted = [0usize, 2, 3, 4]
            .iter()
            .all(|&i| f.records_rejected[i].load(Relaxed) >= 2);
        if counted && acks.len() == 3 && onion_acks.len() == 2 && f.onion_replays.load(Relaxed) == 1
        {
            break;
        }
        tokio::select! {
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::Behaviour(BehaviourEvent::Identify(
                    libp2p::identify::Event::Received { peer_id, .. },
                )) => {
                    let b = swarm.behaviour_mut();
                    b.policy.admit(peer_id, now).expect("admit");
                    b.federation.open(peer_id);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Federation(fedb::Event::Opened { .. })) => {
                    opened = true;
                }
                SwarmEvent::Behaviour(BehaviourEvent::Federation(fedb::Event::Frame {
                    frame, ..
                })) => {
                    let frames = match frame {
                        Frame::Batch(frames) => frames,
                        f => vec![f],
                    };
                    for f in frames {
                        match f {
                            Frame::Ack { id, status, .. } => {
                                acks.insert(id, status);
                            }
                            Frame::OnionAck { hop, status } => {
                                onion_acks.insert(hop, status);
                            }
                            _ => {}
                        }
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(
                    libp2p::gossipsub::Event::Subscribed { .. },
                )) => subscribed = true,
                _ => {}
            },
            _ = tokio::time::sleep_until(deadline) => panic!(
                "relay did not reject everything: opened {opened} subscribed {subscribed} acks {acks:?}"
            ),
            // Check the counters while the swarm is quiet.
            _ = tokio::time::sleep(Duration::from_millis(25)) => {}
        }
    }
    assert_eq!(acks[&[1; 16]], AckStatus::Malformed);
    assert_eq!(acks[&[2; 16]], AckStatus::NotTarget);
    assert_eq!(
        acks[&[3; 16]],
        AckStatus::NoPath,
        "over the transit hop cap"
    );
    assert_eq!(onion_acks[&[4; 16]], AckStatus::Malformed);
    // The good onion's packet: not homed here, answered as a routed one is.
    assert_eq!(onion_acks[&[5; 16]], AckStatus::NotHome);
    assert!(fed(a).drops_malformed.load(Relaxed) >= 1);
    assert_eq!(fed(a).transit_refused.load(Relaxed), 1);
    assert_eq!(fed(a).onion_refused.load(Relaxed), 1);
    assert_eq!(fed(a).onion_delivered.load(Relaxed), 1);
    // Nothing was stored, and the relay is fine.
    assert_eq!(book_count(a).await, 1, "only its own record");
    assert_eq!(
        running(a)
            .core
            .store
            .mailbox()
            .count()
            .await
            .expect("count"),
        0
    );
    let h = get(&format!("{}/health", a.base)).await.json();
    assert_eq!(h["status"], "ok");
    let metrics = String::from_utf8(get(&format!("{}/metrics", a.base)).await.body).expect("utf8");
    assert!(
        metrics
            .contains("meshwhisper_federation_address_records_rejected_total{reason=\"stale\"} 2"),
        "{metrics}"
    );
    stop_all(relays).await;
}

/// A native device names the home relay in its packet frame (PacketTo):
/// the packet goes straight there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_packet_with_home_relay_goes_straight_there() {
    use libp2p::swarm::SwarmEvent;
    use meshwhisper_behaviour::client::BehaviourEvent;
    use meshwhisper_behaviour::device::{self, codec::Frame};

    let relays = converged_mesh(3).await;
    let (a, f) = (&relays[1], &relays[2]);
    let mut bob = recipient(f).await;
    let home = key_of(&running(f).p2p.peer_id).expect("key");
    let target: libp2p::Multiaddr = p2p_addr(a).await.parse().expect("addr");
    let a_peer = running(a).p2p.peer_id;
    let mut swarm = meshwhisper_node::p2p::build_swarm_with(
        libp2p::identity::Keypair::generate_ed25519(),
        |k| {
            Ok(meshwhisper_behaviour::client::Behaviour::new(
                k,
                device::Config::new(device::Role::Device),
                Default::default(),
            ))
        },
    )
    .expect("swarm");
    swarm.dial(target).expect("dial");
    let mut stored = 0;
    tokio::time::timeout(Duration::from_secs(20), async {
        while stored < 3 {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(BehaviourEvent::Device(device::Event::Opened { .. })) => {
                    for seq in 0..3u64 {
                        swarm.behaviour_mut().device.send_to(
                            a_peer,
                            Frame::PacketTo {
                                seq,
                                home,
                                packet: bytes::Bytes::from(packet(H, &[seq as u8; 20])),
                            },
                        );
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Device(device::Event::Frame {
                    frame: Frame::Stored(_),
                    ..
                })) => stored += 1,
                _ => {}
            }
        }
    })
    .await
    .expect("three packets stored by relay A");
    for i in 0..3u8 {
        assert_eq!(&next_packet(&mut bob).await[31..], &[i; 20]);
    }
    assert_eq!(fed(&relays[0]).forwards_received.load(Relaxed), 0);
    assert_eq!(fed(a).routed_forwards.load(Relaxed), 3);
    stop_all(relays).await;
}

/// A packet no relay homes (chaff, an unknown recipient) is flooded a
/// bounded number of times, then left stored at the sender's relay only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclaimed_floods_stop_after_their_attempts() {
    let relays = mesh(3, |_, c| {
        c.federation.flood_retry_ms = 100;
        c.federation.flood_attempts = 2;
    })
    .await;
    converged(&relays, 3).await;
    let a = &relays[1];
    let mut alice = ws(&a.ws).await;
    send_packet(&mut alice, "0badc0ffee000000", b"nobody's").await;
    eventually("the flood is given up", 10, || async {
        fed(a).floods_unclaimed.load(Relaxed) == 1 && fed(a).pending.load(Relaxed) == 0
    })
    .await;
    assert_eq!(fed(a).retries.load(Relaxed), 1, "one re-flood");
    assert_eq!(
        running(a)
            .core
            .store
            .mailbox()
            .count()
            .await
            .expect("count"),
        1
    );
    for (i, r) in relays.iter().enumerate() {
        if i != 1 {
            assert_eq!(fed(r).stored_locally.load(Relaxed), 0);
            assert_eq!(
                running(r)
                    .core
                    .store
                    .mailbox()
                    .count()
                    .await
                    .expect("count"),
                0
            );
        }
    }
    stop_all(relays).await;
}

/// The sending relay restarts while the home relay is down: the packet it
/// acknowledged is still forwarded once both are back, routed to the home
/// relay its sender named (the hint is stored with the packet), not
/// flooded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_restart_does_not_lose_an_unforwarded_packet() {
    let mut relays = converged_mesh(3).await;
    let f = relays.remove(2);
    let a = relays.remove(1);
    let home = key_hex(&f);
    drop(recipient(&f).await);
    let f_dir = f.stop().await;
    let mut alice = ws(&a.ws).await;
    send_route(&mut alice, H, &home).await;
    send_packet(&mut alice, H, b"survives a restart").await;
    eventually("A holds it for F", 10, || async {
        fed(&a).pending.load(Relaxed) == 1
    })
    .await;
    drop(alice);
    let a_dir = a.stop().await;
    let boot = p2p_addr(&relays[0]).await;
    let f = start_in(f_dir, |c| quick(c, Some(&boot))).await;
    let a = start_in(a_dir, |c| quick(c, Some(&boot))).await;
    eventually_or(
        "F stored it",
        30,
        || async { fed(&f).stored_locally.load(Relaxed) == 1 },
        || {
            format!(
                "\nA: {}\nF: {}\nrelay 0: {}",
                counters(&a),
                counters(&f),
                counters(&relays[0])
            )
        },
    )
    .await;
    let mut bob = ws(&f.ws).await;
    hello(&mut bob, &[H]).await;
    assert_eq!(&next_packet(&mut bob).await[31..], b"survives a restart");
    assert_eq!(fed(&a).routed_forwards.load(Relaxed), 1, "routed again");
    assert_eq!(
        fed(&a).forwards_sent.load(Relaxed),
        1,
        "nothing flooded after the restart"
    );
    assert_eq!(fed(&relays[0]).forwards_received.load(Relaxed), 0);
    eventually("A forgot its copy", 10, || async {
        running(&a).core.store.mailbox().count().await.unwrap_or(1) == 0
    })
    .await;
    for r in [a, f] {
        r.stop().await;
    }
    stop_all(relays).await;
}

/// Anti-entropy pages through a book of thousands of records: a relay that
/// joins a relay holding 3000 others' records learns every one of them
/// without gossip (those relays are not even running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_pages_through_thousands_of_records() {
    use meshwhisper_crypto::address_record::{AddressRecord, Contents};
    use meshwhisper_crypto::identity::IdentityKeyPair;
    const N: u64 = 3000;
    let a = start(|c| quick(c, None)).await;
    let now = meshwhisper_node::core::now_ms();
    let book = running(&a).core.store.address_book();
    let mut jobs = Vec::new();
    for i in 0..N {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&i.to_be_bytes());
        seed[31] = 0x5a;
        let id = IdentityKeyPair::from_seed(&seed);
        let rec = AddressRecord::sign(
            &id,
            Contents {
                timestamp_ms: now - i,
                onion_key: id.public().x25519(),
                addrs: vec![
                    format!("/ip4/10.0.{}.{}/tcp/4001", i / 256, i % 256)
                        .parse::<libp2p::Multiaddr>()
                        .expect("addr")
                        .to_vec(),
                ],
                anchors: Vec::new(),
            },
        )
        .expect("sign");
        jobs.push(async move { book.upsert(&rec, now).await });
    }
    // Many upserts in flight at once: the store groups them into commits.
    for r in futures::future::join_all(jobs).await {
        r.expect("upsert");
    }
    eventually("A's own record stored too", 10, || async {
        book_count(&a).await == N + 1
    })
    .await;
    // A relay reads its book into memory when it starts (and every ten
    // minutes): records written behind a running relay's back, as here,
    // are served once it restarts.
    let dir = a.stop().await;
    let a = start_in(dir, |c| quick(c, None)).await;
    let boot = p2p_addr(&a).await;
    let b = start(|c| {
        quick(c, Some(&boot));
        c.federation.record_gossip = false;
        // Dialing 3000 unreachable relays is not what this test is about.
        c.federation.target_peers = 1;
    })
    .await;
    eventually("B learns all of A's book", 60, || async {
        book_count(&b).await == N + 2
    })
    .await;
    // The counter follows each commit.
    eventually("B counted what it learned", 10, || async {
        fed(&b).records_learned.load(Relaxed) > N
    })
    .await;
    stop_all(vec![a, b]).await;
}

/// A relay not in the book (no gossip, no anti-entropy since it joined) is
/// found through the DHT when a packet must reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_missing_from_the_book_is_found_through_kademlia() {
    let quiet = |c: &mut Config| {
        c.federation.record_gossip = false;
        c.federation.anti_entropy_ms = 3_600_000;
        c.federation.target_peers = 1;
    };
    let b = start(|c| {
        quick(c, None);
        quiet(c);
    })
    .await;
    let boot = p2p_addr(&b).await;
    let a = start(|c| {
        quick(c, Some(&boot));
        quiet(c);
    })
    .await;
    eventually("A federated with B", 10, || async {
        !running(&a).p2p.federation.borrow().connected.is_empty()
    })
    .await;
    let c = start(|c| {
        quick(c, Some(&boot));
        quiet(c);
    })
    .await;
    let c_key = key_of(&running(&c).p2p.peer_id).expect("key");
    eventually("B knows C", 10, || async {
        running(&b).p2p.federation.borrow().connected.len() == 2
    })
    .await;
    assert!(
        running(&a)
            .core
            .store
            .address_book()
            .get(&c_key)
            .await
            .expect("get")
            .is_none(),
        "A must not know C yet"
    );
    let mut bob = recipient(&c).await;
    let mut alice = ws(&a.ws).await;
    send_route(&mut alice, H, &key_hex(&c)).await;
    send_packet(&mut alice, H, b"found by key").await;
    assert_eq!(&next_packet(&mut bob).await[31..], b"found by key");
    assert!(fed(&a).discovered_dials.load(Relaxed) >= 1);
    assert_eq!(
        fed(&b).forwards_received.load(Relaxed),
        0,
        "B only answered the DHT"
    );
    stop_all(vec![a, b, c]).await;
}

/// A hand-driven relay: a real Swarm with the relay's behaviour, admitted
/// by a real relay, whose frames the test writes and whose acks it reads.
struct FakeRelay {
    swarm: libp2p::Swarm<meshwhisper_behaviour::node::Behaviour>,
    target: libp2p::PeerId,
    acks: Vec<(
        meshwhisper_behaviour::federation::codec::PacketId,
        meshwhisper_behaviour::federation::codec::AckStatus,
    )>,
}

impl FakeRelay {
    /// Connected to `r` with an open federation stream.
    async fn connect(r: &Relay) -> Self {
        let target = running(r).p2p.peer_id;
        let swarm = dial_as_relay(r, libp2p::identity::Keypair::generate_ed25519()).await;
        let mut fake = FakeRelay {
            swarm,
            target,
            acks: Vec::new(),
        };
        let mut opened = false;
        tokio::time::timeout(Duration::from_secs(20), async {
            while !opened {
                opened = fake.step().await;
            }
        })
        .await
        .expect("federation stream opened");
        fake
    }

    /// Handles one Swarm event; whether it was our stream opening.
    async fn step(&mut self) -> bool {
        use libp2p::swarm::SwarmEvent;
        use meshwhisper_behaviour::federation::{self as fedb, codec::Frame};
        use meshwhisper_behaviour::node::BehaviourEvent;
        match self.swarm.select_next_some().await {
            SwarmEvent::Behaviour(BehaviourEvent::Identify(
                libp2p::identify::Event::Received { peer_id, .. },
            )) => {
                let b = self.swarm.behaviour_mut();
                b.policy
                    .admit(peer_id, meshwhisper_node::core::now_ms())
                    .expect("admit");
                b.federation.open(peer_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Federation(fedb::Event::Opened {
                peer, ..
            })) => return peer == self.target,
            SwarmEvent::Behaviour(BehaviourEvent::Federation(fedb::Event::Frame {
                frame, ..
            })) => {
                let frames = match frame {
                    Frame::Batch(frames) => frames,
                    f => vec![f],
                };
                for f in frames {
                    if let Frame::Ack { id, status, .. } = f {
                        self.acks.push((id, status));
                    }
                }
            }
            _ => {}
        }
        false
    }

    fn send(&mut self, frame: meshwhisper_behaviour::federation::codec::Frame) {
        let t = self.target;
        self.swarm.behaviour_mut().federation.send(t, frame);
    }

    /// Drives the Swarm until `done` holds (checked every 25 ms and after
    /// every event), at most `secs`.
    async fn until(&mut self, what: &str, secs: u64, mut done: impl FnMut(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while !done(self) {
            tokio::select! {
                _ = self.step() => {}
                _ = tokio::time::sleep(Duration::from_millis(25)) => {}
                _ = tokio::time::sleep_until(deadline) => panic!("{what}: not within {secs} s"),
            }
        }
    }

    fn ack_of(&self, id: [u8; 16]) -> Option<meshwhisper_behaviour::federation::codec::AckStatus> {
        self.acks
            .iter()
            .rev()
            .find(|(i, _)| *i == id)
            .map(|(_, s)| *s)
    }
}

fn routed_to(
    r: &Relay,
    id: [u8; 16],
    payload: &[u8],
) -> meshwhisper_behaviour::federation::codec::Frame {
    meshwhisper_behaviour::federation::codec::Frame::Routed {
        id,
        flags: 0,
        hops: 1,
        target: key_of(&running(r).p2p.peer_id).expect("key"),
        packet: bytes::Bytes::from(packet(H, payload)),
    }
}

/// A home relay that stored a packet remembers its id for the packet's
/// lifetime, in the store: the sender resending it after a lost ack (at
/// once, or after the home relay restarted and every cache is gone) gets
/// `Stored` again and the recipient gets it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_packet_is_delivered_once_even_after_the_home_relay_restarts() {
    use meshwhisper_behaviour::federation::codec::AckStatus;
    let f = start(|c| quick(c, None)).await;
    let mut bob = recipient(&f).await;
    let mut sender = FakeRelay::connect(&f).await;
    sender.send(routed_to(&f, [7; 16], b"only once"));
    sender
        .until("stored", 10, |s| s.ack_of([7; 16]).is_some())
        .await;
    assert_eq!(sender.ack_of([7; 16]), Some(AckStatus::Stored));
    assert_eq!(&next_packet(&mut bob).await[31..], b"only once");
    // The ack was lost: the sender resends the same id.
    sender.acks.clear();
    sender.send(routed_to(&f, [7; 16], b"only once"));
    sender.send(routed_to(&f, [8; 16], b"marker 1"));
    sender
        .until("acked again", 10, |s| s.ack_of([8; 16]).is_some())
        .await;
    assert_eq!(sender.ack_of([7; 16]), Some(AckStatus::Stored));
    assert_eq!(&next_packet(&mut bob).await[31..], b"marker 1");
    // Bob's pong confirms both deliveries: nothing left to deliver again.
    eventually("deliveries confirmed", 10, || async {
        running(&f).core.store.mailbox().count().await.unwrap_or(1) == 0
    })
    .await;
    drop(sender);
    drop(bob);

    // Much later, as far as any cache knows: the home relay restarted.
    let dir = f.stop().await;
    let f = start_in(dir, |c| quick(c, None)).await;
    let mut sender = FakeRelay::connect(&f).await;
    sender.send(routed_to(&f, [7; 16], b"only once"));
    sender.send(routed_to(&f, [9; 16], b"marker 2"));
    sender
        .until("acked after the restart", 10, |s| {
            s.ack_of([7; 16]).is_some() && s.ack_of([9; 16]).is_some()
        })
        .await;
    assert_eq!(sender.ack_of([7; 16]), Some(AckStatus::Stored));
    let mut bob = ws(&f.ws).await;
    hello(&mut bob, &[H]).await;
    assert_eq!(
        &next_packet(&mut bob).await[31..],
        b"marker 2",
        "the resent packet was delivered twice"
    );
    assert!(fed(&f).drops_duplicate.load(Relaxed) >= 1);
    f.stop().await;
}

/// A packet whose named home relay does not home the recipient (a stale
/// hint) is flooded and reaches the relay that does; one that no relay
/// claims goes back to the named relay, which stores it for the recipient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_hint_floods_and_an_unclaimed_one_is_kept_by_the_named_relay() {
    let relays = mesh(3, |_, c| {
        c.federation.flood_retry_ms = 200;
        c.federation.flood_attempts = 2;
    })
    .await;
    converged(&relays, 3).await;
    let (named, a, home) = (&relays[0], &relays[1], &relays[2]);
    let mut bob = recipient(home).await;
    let mut alice = ws(&a.ws).await;
    // Alice names relay 0, which never saw bob: relay 2 gets it anyway.
    send_route(&mut alice, H, &key_hex(named)).await;
    send_packet(&mut alice, H, b"moved").await;
    assert_eq!(&next_packet(&mut bob).await[31..], b"moved");
    assert_eq!(fed(a).stale_hints.load(Relaxed), 1);
    assert_eq!(fed(named).stored_locally.load(Relaxed), 0);
    // Sent on from memory, and stored at the sender once the named relay
    // turned out not to home the recipient.
    assert_eq!(fed(a).unstored.load(Relaxed), 1);
    assert_eq!(fed(a).kept.load(Relaxed), 1);
    // A recipient nobody homes yet (say, a new profile whose client has
    // not connected): after the floods, the named relay keeps it.
    const NEW: &str = "0000000000000abc";
    send_route(&mut alice, NEW, &key_hex(named)).await;
    send_packet(&mut alice, NEW, b"for later").await;
    eventually("the named relay stored it", 20, || async {
        fed(named).stored_locally.load(Relaxed) == 1 && fed(a).pending.load(Relaxed) == 0
    })
    .await;
    let mut carol = ws(&named.ws).await;
    hello(&mut carol, &[NEW]).await;
    assert_eq!(&next_packet(&mut carol).await[31..], b"for later");
    eventually("the sender forgot its copies", 10, || async {
        running(a).core.store.mailbox().count().await.unwrap_or(1) == 0
    })
    .await;
    stop_all(relays).await;
}

/// Packets that found the forwarding queue full are handed back to
/// federation as soon as it has room, not at the next restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_over_the_pending_bound_go_out_once_there_is_room() {
    let mut relays = mesh(3, |i, c| {
        if i == 1 {
            c.federation.max_pending = 2;
        }
    })
    .await;
    converged(&relays, 3).await;
    let f = relays.remove(2);
    let home = key_hex(&f);
    drop(recipient(&f).await);
    let dir = f.stop().await;
    let a = &relays[1];
    let mut alice = ws(&a.ws).await;
    for i in 0..6u8 {
        send_route(&mut alice, H, &home).await;
        send_packet(&mut alice, H, &[i; 24]).await;
    }
    eventually("two wait, four overflowed", 10, || async {
        fed(a).pending.load(Relaxed) == 2 && fed(a).drops_queue_full.load(Relaxed) == 4
    })
    .await;
    let boot = p2p_addr(&relays[0]).await;
    let f = start_in(dir, |c| quick(c, Some(&boot))).await;
    eventually("F acknowledged all six", 30, || async {
        fed(a).routed_acked.load(Relaxed) == 6 && fed(a).pending.load(Relaxed) == 0
    })
    .await;
    let mut bob = ws(&f.ws).await;
    hello(&mut bob, &[H]).await;
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(next_packet(&mut bob).await[31..].to_vec());
    }
    got.sort();
    assert_eq!(got, (0..6u8).map(|i| vec![i; 24]).collect::<Vec<_>>());
    eventually("A forgot every copy", 10, || async {
        running(a).core.store.mailbox().count().await.unwrap_or(1) == 0
    })
    .await;
    f.stop().await;
    stop_all(relays).await;
}

/// A peer minting 10 000 fresh relay keys (valid, signed records) against
/// a full address book displaces only other fresh records: the relays the
/// mesh runs on stay, and packets still reach them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minted_relay_keys_cannot_push_established_relays_out_of_a_full_book() {
    use meshwhisper_behaviour::federation::codec::{Frame, MAX_RECORDS};
    use meshwhisper_crypto::address_record::{AddressRecord, Contents};
    use meshwhisper_crypto::identity::IdentityKeyPair;
    const MAX: u64 = 40;
    const FLOOD: usize = 10_000;
    let relays = mesh(3, |i, c| {
        if i == 1 {
            c.federation.address_book_max = MAX as u32;
        }
    })
    .await;
    converged(&relays, 3).await;
    let a = &relays[1];
    let established: Vec<[u8; 32]> = relays
        .iter()
        .map(|r| key_of(&running(r).p2p.peer_id).expect("key"))
        .collect();
    // Connected relays are marked as such in the book.
    eventually("peers marked connected", 10, || async {
        fed(a).peers_connected.load(Relaxed) == 2
    })
    .await;

    let mut minter = FakeRelay::connect(a).await;
    let now = meshwhisper_node::core::now_ms();
    let records: Vec<bytes::Bytes> = (0..FLOOD)
        .map(|i| {
            let mut seed = [0x5a; 32];
            seed[..8].copy_from_slice(&(i as u64).to_be_bytes());
            let k = IdentityKeyPair::from_seed(&seed);
            AddressRecord::sign(
                &k,
                Contents {
                    timestamp_ms: now - 1000 + (i as u64 % 1000),
                    onion_key: k.public().x25519(),
                    addrs: vec![b"/ip4/127.0.0.1/tcp/9".to_vec()],
                    anchors: Vec::new(),
                },
            )
            .expect("sign")
            .encode()
            .into()
        })
        .collect();
    let seen = |r: &Relay| {
        let f = fed(r);
        f.records_learned.load(Relaxed)
            + f.records_rejected
                .iter()
                .map(|c| c.load(Relaxed))
                .sum::<u64>()
    };
    let before = seen(a);
    // In steps the store keeps up with (every record is looked at).
    for (n, chunk) in records.chunks(MAX_RECORDS * 8).enumerate() {
        for frames in chunk.chunks(MAX_RECORDS) {
            minter.send(Frame::Records {
                req: 0,
                records: frames.to_vec(),
            });
        }
        let want = before + ((n * MAX_RECORDS * 8 + chunk.len()) as u64);
        minter
            .until("the relay looked at every record", 60, |_| seen(a) >= want)
            .await;
    }
    assert_eq!(book_count(a).await, MAX, "the book is full");
    let full = fed(a).records_rejected[5].load(Relaxed);
    assert!(full > 0, "some minted records found no room");
    for (i, k) in established.iter().enumerate() {
        assert!(
            running(a)
                .core
                .store
                .address_book()
                .get(k)
                .await
                .expect("get")
                .is_some(),
            "relay {i}'s record was pushed out"
        );
    }
    // And the mesh still works: a hinted packet from A reaches relay 2.
    drop(minter);
    let f = &relays[2];
    let mut bob = recipient(f).await;
    let mut alice = ws(&a.ws).await;
    send_route(&mut alice, H, &key_hex(f)).await;
    send_packet(&mut alice, H, b"still here").await;
    assert_eq!(&next_packet(&mut bob).await[31..], b"still here");
    stop_all(relays).await;
}

/// Whether `r`'s book holds a record of `key` with an address on `port`.
async fn holds_port(r: &Relay, key: &[u8; 32], port: &str) -> bool {
    match running(r).core.store.address_book().get(key).await {
        Ok(Some(rec)) => rec.addrs().iter().any(|a| {
            libp2p::Multiaddr::try_from(a.clone()).is_ok_and(|m| {
                m.to_string().contains(&format!("/tcp/{port}/"))
                    || m.to_string().ends_with(&format!("/tcp/{port}"))
            })
        }),
        _ => false,
    }
}

fn tcp_port(addr: &str) -> String {
    addr.split("/tcp/")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .expect("port")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_record_is_pushed_on_to_relays_its_owner_is_not_connected_to() {
    // No gossip, anti-entropy only when a stream opens, and a blocks c:
    // a -- b -- c. A change of c reaches a only by being pushed on by b.
    let calm = |cfg: &mut Config, boot: Option<&str>| {
        quick(cfg, boot);
        cfg.federation.record_gossip = false;
        cfg.federation.anti_entropy_ms = 3_600_000;
    };
    let b = start(|cfg| calm(cfg, None)).await;
    let boot = p2p_addr(&b).await;
    let c = start(|cfg| calm(cfg, Some(&boot))).await;
    let c_id = running(&c).p2p.peer_id;
    let blocklist = tempfile::NamedTempFile::new().expect("blocklist");
    std::fs::write(blocklist.path(), format!("{c_id}\n")).expect("write blocklist");
    let a = start(|cfg| {
        calm(cfg, Some(&boot));
        cfg.federation.blocklist_file = Some(blocklist.path().to_path_buf());
    })
    .await;
    eventually("b knows a and c", 30, || async {
        book_count(&b).await == 3
    })
    .await;
    let key = key_of(&c_id).expect("key");
    let old_port = tcp_port(&p2p_addr(&c).await);
    let dir = c.stop().await;
    let c = start_in(dir, |cfg| calm(cfg, Some(&boot))).await;
    let port = tcp_port(&p2p_addr(&c).await);
    assert_ne!(port, old_port, "new port");
    eventually("a learns c's new address", 15, || {
        holds_port(&a, &key, &port)
    })
    .await;
    assert!(fed(&b).records_pushed.load(Relaxed) >= 1, "b pushed it on");
    assert!(
        !running(&a)
            .p2p
            .federation
            .borrow()
            .connected
            .contains(&c_id),
        "a never connects to c"
    );
    stop_all(vec![a, b, c]).await;
}

/// A bootstrap at `max_peers` keeps the newcomer it refuses as a guest for
/// `guest_secs`, long enough to walk its address book: the
/// newcomer ends up federated with the other relay and the bootstrap lets
/// it go. (Refused outright, 36 of 100 relays whose only bootstrap was full
/// knew no one: docs/benchmarks.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_bootstrap_still_introduces_a_newcomer_to_the_others() {
    // The bootstrap takes one relay; the second to come is refused.
    let a = start(|c| {
        quick(c, None);
        c.federation.max_peers = 1;
        c.federation.guest_secs = 2;
    })
    .await;
    let boot = p2p_addr(&a).await;
    let b = start(|c| quick(c, Some(&boot))).await;
    let mut relays = vec![a, b];
    converged(&relays, 2).await;
    relays.push(start(|c| quick(c, Some(&boot))).await);
    converged(&relays, 3).await;
    eventually(
        "the refused relay federates with the other; the bootstrap keeps one peer",
        20,
        || async {
            fed(&relays[0]).peers_connected.load(Relaxed) == 1
                && fed(&relays[1]).peers_connected.load(Relaxed) >= 1
                && fed(&relays[2]).peers_connected.load(Relaxed) >= 1
        },
    )
    .await;
    assert!(fed(&relays[0]).admissions_refused.load(Relaxed) >= 1);
    assert!(fed(&relays[0]).guests.load(Relaxed) >= 1, "kept as a guest");
    stop_all(relays).await;
}

/// TCP dials leave from the relay's listening port, bound on the wildcard
/// address. When another socket holds that port on another local address
/// without `SO_REUSEPORT` (here a listener of the test's on 127.0.0.2; in
/// CI, something left by an earlier test), every such dial fails with
/// "address in use", which libp2p does not retry from another port. The
/// relay's next dial then leaves from a fresh port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_whose_listening_port_is_taken_is_retried_from_a_fresh_port() {
    let a = start(|c| quick(c, None)).await;
    let boot = p2p_addr(&a).await;
    let list = tempfile::NamedTempFile::new().expect("tmp");
    let path = list.path().to_path_buf();
    // B starts with A on its blocklist, so it does not dial A yet.
    std::fs::write(&path, format!("{}\n", running(&a).p2p.peer_id)).expect("write");
    let b = start(|c| {
        quick(c, Some(&boot));
        c.federation.blocklist_file = Some(path.clone());
    })
    .await;
    let pb: u16 = tcp_port(&p2p_addr(&b).await).parse().expect("port");
    let _holder = std::net::TcpListener::bind(("127.0.0.2", pb)).expect("bind 127.0.0.2");
    std::fs::write(&path, "# nobody\n").expect("write");
    let mut status = running(&b).p2p.federation.clone();
    tokio::time::timeout(
        Duration::from_secs(20),
        status.wait_for(|s| s.connected.contains(&running(&a).p2p.peer_id)),
    )
    .await
    .expect("B reached A from another port")
    .expect("watch");
    stop_all(vec![a, b]).await;
}

/// A relay's Swarm with `key` (ours, as a relay), dialing `target`.
async fn dial_as_relay(
    target: &Relay,
    key: libp2p::identity::Keypair,
) -> libp2p::Swarm<meshwhisper_behaviour::node::Behaviour> {
    let addr: libp2p::Multiaddr = p2p_addr(target).await.parse().expect("addr");
    let mut swarm = meshwhisper_node::p2p::build_swarm(
        key,
        meshwhisper_behaviour::device::Config::new(meshwhisper_behaviour::device::Role::Relay),
        Default::default(),
        Default::default(),
    )
    .expect("swarm");
    swarm.dial(addr).expect("dial");
    swarm
}

/// The ids of the Routed packets a silent relay got.
type RoutedIds = std::sync::Arc<std::sync::Mutex<Vec<[u8; 16]>>>;

/// A relay with `key` that takes federation frames and never acknowledges
/// them: what a sender holds for it stays pending. Returns its relay key
/// (hex) and the ids of the Routed packets it got.
async fn silent_relay(
    target: &Relay,
    key: libp2p::identity::Keypair,
) -> (String, RoutedIds, tokio::task::JoinHandle<()>) {
    use libp2p::swarm::SwarmEvent;
    use meshwhisper_behaviour::federation::{self as fedb, codec::Frame};
    use meshwhisper_behaviour::node::BehaviourEvent;
    let me = key.public().to_peer_id();
    let mut swarm = dial_as_relay(target, key).await;
    let routed = RoutedIds::default();
    let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
    let count = routed.clone();
    let task = tokio::spawn(async move {
        let mut opened_tx = Some(opened_tx);
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(BehaviourEvent::Identify(
                    libp2p::identify::Event::Received { peer_id, .. },
                )) => {
                    let b = swarm.behaviour_mut();
                    let _ = b.policy.admit(peer_id, meshwhisper_node::core::now_ms());
                    b.federation.open(peer_id);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Federation(fedb::Event::Opened {
                    ..
                })) => {
                    if let Some(tx) = opened_tx.take() {
                        let _ = tx.send(());
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Federation(fedb::Event::Frame {
                    frame,
                    ..
                })) => {
                    let frames = match frame {
                        Frame::Batch(frames) => frames,
                        f => vec![f],
                    };
                    let mut ids = count.lock().expect("ids");
                    for f in frames {
                        if let Frame::Routed { id, .. } = f {
                            ids.push(id);
                        }
                    }
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(20), opened_rx)
        .await
        .expect("the silent relay's stream opens in time")
        .expect("opened");
    let key = meshwhisper_behaviour::relay_key::RelayKey::from_peer(&me).expect("ed25519");
    eventually("the relay sees the silent one", 20, || async {
        fed(target).peers_connected.load(Relaxed) >= 1
    })
    .await;
    (hex::encode(key.0), routed, task)
}

/// Packets a WebSocket client sends for another relay go on from memory:
/// the sending relay stores nothing while the home relay acknowledges at
/// once (two relays, not one, pay for storing a packet that passes
/// through). What it still holds when it stops is stored then, with its
/// route, and nothing it read is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_held_for_another_relay_are_stored_when_the_relay_stops() {
    let relays = mesh(1, |_, c| {
        c.federation.send_window = 4;
        c.federation.retry_ms = 600_000;
    })
    .await;
    let a = relays.into_iter().next().expect("one relay");
    let (silent, routed, task) =
        silent_relay(&a, libp2p::identity::Keypair::generate_ed25519()).await;
    let mut alice = ws(&a.ws).await;
    for i in 0..10u8 {
        send_route(&mut alice, H, &silent).await;
        send_packet(&mut alice, H, &[i; 32]).await;
    }
    eventually("four sent, six waiting for the window", 10, || async {
        routed.lock().expect("ids").len() == 4 && fed(&a).pending.load(Relaxed) == 10
    })
    .await;
    assert_eq!(fed(&a).unstored.load(Relaxed), 10);
    assert_eq!(fed(&a).kept.load(Relaxed), 0);
    assert_eq!(
        running(&a)
            .core
            .store
            .mailbox()
            .count()
            .await
            .expect("count"),
        0,
        "nothing stored while the packets are on their way"
    );
    drop(alice);
    let dir = a.stop().await;
    task.abort();
    // Back with federation off, so that nothing is sent on: all ten are
    // stored, each with the relay it was routed to.
    let a = start_in(dir, |c| {
        c.federation.mode = meshwhisper_node::config::FederationMode::Off
    })
    .await;
    let stored = running(&a)
        .core
        .store
        .mailbox()
        .page_stored(
            meshwhisper_storage::mailbox::MailboxId(0),
            meshwhisper_node::core::now_ms(),
            100,
        )
        .await
        .expect("page");
    let mut payloads: Vec<u8> = stored.iter().map(|p| p.packet[31]).collect();
    payloads.sort_unstable();
    assert_eq!(payloads, (0..10u8).collect::<Vec<_>>());
    let silent_key: [u8; 32] = hex::decode(&silent).expect("hex").try_into().expect("32");
    assert!(stored.iter().all(|p| p.route == Some(silent_key)));
    a.stop().await;
}

/// A client sending fast for a recipient homed at another relay is not
/// paced as if it stored for absent recipients (its packets leave at
/// once): 4 MiB in a burst, four times the pacer's allowance; with a
/// `route` hint, or without one once the first packet's ack taught the
/// relay where the recipient lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_sender_to_another_relay_is_not_paced() {
    let relays = converged_mesh(2).await;
    let (a, f) = (&relays[0], &relays[1]);
    let mut bob = recipient(f).await;
    let home = key_hex(f);
    let n = 4096u32;
    for hinted in [true, false] {
        let mut alice = ws(&a.ws).await;
        if !hinted {
            // Flooded; its ack teaches relay A the route.
            send_packet(&mut alice, H, &[0xff; 1024]).await;
            assert_eq!(&next_packet(&mut bob).await[31..33], &[0xff, 0xff]);
            eventually("route learned", 10, || async {
                fed(a).routed_acked.load(Relaxed) + fed(a).forwards_sent.load(Relaxed) > 0
                    && fed(a).pending.load(Relaxed) == 0
            })
            .await;
        }
        let unstored = fed(a).unstored.load(Relaxed);
        let sender = async {
            for i in 0..n {
                if hinted {
                    send_route(&mut alice, H, &home).await;
                }
                let mut payload = vec![0u8; 1024];
                payload[..4].copy_from_slice(&i.to_be_bytes());
                send_packet(&mut alice, H, &payload).await;
            }
        };
        let receiver = async {
            for i in 0..n {
                let p = next_packet(&mut bob).await;
                assert_eq!(
                    &p[31..35],
                    &i.to_be_bytes(),
                    "in order, once (hinted: {hinted})"
                );
            }
        };
        tokio::join!(sender, receiver);
        assert_eq!(
            running(a).core.metrics.packets_paced_away.load(Relaxed),
            0,
            "hinted: {hinted}"
        );
        assert!(
            fed(a).unstored.load(Relaxed) - unstored >= u64::from(n) / 2,
            "sent on from memory (hinted: {hinted})"
        );
    }
    assert_eq!(fed(a).retries.load(Relaxed), 0);
    stop_all(relays).await;
}

/// A stored copy goes out under the same packet id after its relay
/// restarts, so a home relay that stored it before (its ack lost to the
/// restart) recognises it (see
/// `a_resent_packet_is_delivered_once_even_after_the_home_relay_restarts`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_copy_goes_out_under_the_same_id_after_a_restart() {
    let slow = |c: &mut Config| {
        c.federation.retry_ms = 600_000;
    };
    let a = mesh(1, |_, c| slow(c))
        .await
        .into_iter()
        .next()
        .expect("relay");
    let key = libp2p::identity::Keypair::ed25519_from_bytes([5u8; 32]).expect("key");
    let home = hex::encode(
        meshwhisper_behaviour::relay_key::RelayKey::from_peer(&key.public().to_peer_id())
            .expect("ed25519")
            .0,
    );
    // No relay connected yet: the packet is stored, then sent once the
    // named relay shows up.
    let mut alice = ws(&a.ws).await;
    send_route(&mut alice, H, &home).await;
    send_packet(&mut alice, H, b"once, whatever happens").await;
    eventually("stored", 10, || async {
        running(&a).core.store.mailbox().count().await.unwrap_or(0) == 1
    })
    .await;
    let (_, ids, task) = silent_relay(&a, key.clone()).await;
    eventually("sent", 10, || async { ids.lock().expect("ids").len() == 1 }).await;
    let first = ids.lock().expect("ids")[0];
    assert_eq!(fed(&a).unstored.load(Relaxed), 0);
    drop(alice);
    task.abort();
    let a = start_in(a.stop().await, slow).await;
    let (_, ids, task) = silent_relay(&a, key).await;
    eventually("sent again", 20, || async {
        !ids.lock().expect("ids").is_empty()
    })
    .await;
    assert_eq!(
        ids.lock().expect("ids")[0],
        first,
        "another id after the restart"
    );
    task.abort();
    a.stop().await;
}

/// A sending relay that stops while packets are on their way to their
/// home relay neither loses nor duplicates any: it waits for the acks of
/// what it sent, stores what it still holds, and sends that after its
/// restart. Every packet it read reaches the recipient exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_restart_mid_stream_delivers_every_packet_it_read_once() {
    // Four hashes, each under the 500 packets a relay stores per hash.
    const HASHES: [&str; 4] = [
        "00112233445566a1",
        "00112233445566a2",
        "00112233445566a3",
        "00112233445566a4",
    ];
    const EACH: u32 = 450;
    let mut relays = converged_mesh(2).await;
    let f = relays.pop().expect("home");
    let a = relays.pop().expect("sender");
    let home = key_hex(&f);
    let mut bob = ws(&f.ws).await;
    hello(&mut bob, &HASHES).await;
    eventually("bob registered", 10, || async {
        running(&f).core.registered_hashes() == HASHES.len()
    })
    .await;
    let metrics = running(&a).core.metrics.clone();
    let mut alice = ws(&a.ws).await;
    for i in 0..EACH * HASHES.len() as u32 {
        let dest = HASHES[i as usize % HASHES.len()];
        send_route(&mut alice, dest, &home).await;
        send_packet(&mut alice, dest, &i.to_be_bytes()).await;
    }
    // Stop at once, packets still on their way.
    let a_dir = a.stop().await;
    drop(alice);
    let read = metrics.packets_in.load(Relaxed);
    assert!(read > 0);
    let boot = p2p_addr(&f).await;
    let a = start_in(a_dir, |c| quick(c, Some(&boot))).await;
    let mut seen = std::collections::HashSet::new();
    while (seen.len() as u64) < read {
        let p = match tokio::time::timeout(Duration::from_secs(10), next_packet(&mut bob)).await {
            Ok(p) => p,
            Err(_) => panic!(
                "{} of {read} arrived; A: {}; F: {}",
                seen.len(),
                counters(&a),
                counters(&f)
            ),
        };
        let i = u32::from_be_bytes(p[31..35].try_into().expect("4 bytes"));
        assert!(seen.insert(i), "packet {i} delivered twice");
        assert!(u64::from(i) < read, "packet {i} was never read");
    }
    let mut alice = ws(&a.ws).await;
    send_route(&mut alice, HASHES[0], &home).await;
    send_packet(&mut alice, HASHES[0], b"marker").await;
    assert_eq!(
        &next_packet(&mut bob).await[31..],
        b"marker",
        "a duplicate came first"
    );
    a.stop().await;
    f.stop().await;
}

/// A relay that takes packets and never acknowledges them (here, one a
/// client named as the home of its made-up destination) holds at most its
/// share of the pending queue (`max_pending_per_relay`): packets for
/// other relays still go at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_never_acks_cannot_hold_up_packets_for_others() {
    let mut relays = mesh(2, |i, c| {
        if i == 0 {
            c.federation.max_pending = 40;
            c.federation.max_pending_per_relay = 10;
            c.federation.retry_ms = 600_000;
        }
    })
    .await;
    converged(&relays, 2).await;
    let f = relays.pop().expect("home");
    let a = relays.pop().expect("sender");
    let (silent, _ids, task) =
        silent_relay(&a, libp2p::identity::Keypair::generate_ed25519()).await;
    let mut mallory = ws(&a.ws).await;
    for i in 0..60u8 {
        send_route(&mut mallory, "0000000000000bad", &silent).await;
        send_packet(&mut mallory, "0000000000000bad", &[i; 32]).await;
    }
    eventually("the silent relay holds its share only", 10, || async {
        fed(&a).pending.load(Relaxed) == 10
            && running(&a).core.store.mailbox().count().await.unwrap_or(0) >= 50
    })
    .await;
    let mut bob = recipient(&f).await;
    let mut alice = ws(&a.ws).await;
    for i in 0..5u8 {
        send_route(&mut alice, H, &key_hex(&f)).await;
        send_packet(&mut alice, H, &[i; 16]).await;
    }
    for i in 0..5u8 {
        assert_eq!(&next_packet(&mut bob).await[31..], &[i; 16]);
    }
    task.abort();
    a.stop().await;
    f.stop().await;
}
