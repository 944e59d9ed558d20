//! Native devices over libp2p (`/meshwhisper/device/1`) and WebSocket
//! clients share one relay core: packets flow both ways, are acknowledged
//! when stored, and are deleted when the device acks them.

mod common;
use common::*;
use futures::StreamExt as _;
use libp2p::Multiaddr;
use libp2p::swarm::SwarmEvent;
use meshwhisper_behaviour::client::BehaviourEvent;
use meshwhisper_behaviour::device::{self, codec::Frame};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// A device: a real Swarm (TCP, Noise, yamux) dialing the relay.
struct Device {
    to_relay: mpsc::Sender<Frame>,
    from_relay: mpsc::Receiver<Frame>,
}

async fn device(relay: &meshwhisper_node::Running) -> Device {
    let mut addrs = relay.p2p.listen_addrs.clone();
    let addr: Multiaddr =
        tokio::time::timeout(Duration::from_secs(10), addrs.wait_for(|a| !a.is_empty()))
            .await
            .expect("relay listening")
            .expect("watch")[0]
            .clone();
    let relay_peer = relay.p2p.peer_id;
    let key = libp2p::identity::Keypair::generate_ed25519();
    let mut swarm = meshwhisper_node::p2p::build_swarm_with(key, |k| {
        Ok(meshwhisper_behaviour::client::Behaviour::new(
            k,
            device::Config::new(device::Role::Device),
            Default::default(),
        ))
    })
    .expect("swarm");
    swarm
        .dial(addr.with(libp2p::multiaddr::Protocol::P2p(relay_peer)))
        .expect("dial");
    let (to_relay, mut rx) = mpsc::channel::<Frame>(64);
    let (tx, from_relay) = mpsc::channel::<Frame>(1024);
    let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut opened = Some(opened_tx);
        let mut waiting: Vec<Frame> = Vec::new();
        loop {
            tokio::select! {
                f = rx.recv() => match f {
                    Some(f) => {
                        if !swarm.behaviour_mut().device.send_to(relay_peer, f.clone()) {
                            waiting.push(f);
                        }
                    }
                    None => break,
                },
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::Behaviour(BehaviourEvent::Device(device::Event::Opened { .. })) => {
                        for f in waiting.drain(..) {
                            swarm.behaviour_mut().device.send_to(relay_peer, f);
                        }
                        if let Some(o) = opened.take() {
                            let _ = o.send(());
                        }
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Device(device::Event::Frame { frame, .. })) => {
                        // The receiver lives as long as the test's Device.
                        let _ = tx.send(frame).await;
                    }
                    _ => {}
                },
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), opened_rx)
        .await
        .expect("stream opened")
        .expect("opened");
    Device {
        to_relay,
        from_relay,
    }
}

impl Device {
    async fn send(&self, f: Frame) {
        self.to_relay.send(f).await.expect("send");
    }
    async fn next(&mut self) -> Frame {
        tokio::time::timeout(Duration::from_secs(10), self.from_relay.recv())
            .await
            .expect("frame within 10 s")
            .expect("device task alive")
    }
}

const DEV: &str = "dddddddddddddddd";
const WEB: &str = "eeeeeeeeeeeeeeee";

fn hash(h: &str) -> [u8; 8] {
    meshwhisper_crypto::destination::DestHash::from_hex(h)
        .expect("hex")
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_and_websocket_exchange_packets_both_ways() {
    let relay = start(|_| {}).await;
    let running = relay.running.as_ref().expect("running");
    let mut dev = device(running).await;
    dev.send(Frame::Register(vec![hash(DEV)])).await;
    let mut web = ws(&relay.ws).await;
    hello(&mut web, &[WEB]).await;
    wait_health(&relay.base, |h| h["clients"] == 2 && h["devices"] == 1).await;

    // Device → WebSocket: each packet is acknowledged as stored.
    for seq in 0..10u64 {
        dev.send(Frame::Packet {
            seq,
            packet: packet(WEB, &seq.to_be_bytes()).into(),
        })
        .await;
    }
    for seq in 0..10u64 {
        assert_eq!(dev.next().await, Frame::Stored(seq));
        assert_eq!(&next_packet(&mut web).await[31..], &seq.to_be_bytes());
    }

    // WebSocket → device: delivered with ids; the relay keeps them until acked.
    for i in 0..5u8 {
        web.send(Message::Binary(packet(DEV, &[i]).into()))
            .await
            .expect("send");
    }
    let mut ids = Vec::new();
    for i in 0..5u8 {
        match dev.next().await {
            Frame::Deliver { id, packet } => {
                assert_eq!(packet[31], i);
                ids.push(id);
            }
            other => panic!("expected Deliver, got {other:?}"),
        }
    }
    wait_health(&relay.base, |h| h["storedBlobs"] == 5).await;
    for id in ids {
        dev.send(Frame::Ack(id)).await;
    }
    wait_health(&relay.base, |h| h["storedBlobs"] == 0).await;

    // Malformed packets are refused with a reason, not dropped silently.
    dev.send(Frame::Packet {
        seq: 99,
        packet: vec![1u8; 10].into(),
    })
    .await;
    match dev.next().await {
        Frame::Refused {
            seq: 99,
            code: device::codec::RefusedCode::Malformed,
            ..
        } => {}
        other => panic!("expected Refused, got {other:?}"),
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_deliveries_are_redelivered_after_reconnect() {
    let relay = start(|_| {}).await;
    let mut web = ws(&relay.ws).await;
    hello(&mut web, &[WEB]).await;
    for i in 0..3u8 {
        web.send(Message::Binary(packet(DEV, &[i]).into()))
            .await
            .expect("send");
    }
    wait_health(&relay.base, |h| h["storedBlobs"] == 3).await;
    let running = relay.running.as_ref().expect("running");
    {
        let mut dev = device(running).await;
        dev.send(Frame::Register(vec![hash(DEV)])).await;
        for _ in 0..3 {
            assert!(matches!(dev.next().await, Frame::Deliver { .. }));
        }
        // Gone without acking.
    }
    wait_health(&relay.base, |h| h["devices"] == 0).await;
    let mut dev = device(running).await;
    dev.send(Frame::Register(vec![hash(DEV)])).await;
    for i in 0..3u8 {
        match dev.next().await {
            Frame::Deliver { id, packet } => {
                assert_eq!(packet[31], i);
                dev.send(Frame::Ack(id)).await;
            }
            other => panic!("expected Deliver, got {other:?}"),
        }
    }
    wait_health(&relay.base, |h| h["storedBlobs"] == 0).await;
    relay.stop().await;
}

/// The device directory: only signed bundles and signed one-time prekey
/// batches are accepted, stale bundles are refused, and a claim hands out
/// the bundle with each one-time prekey at most once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_directory_checks_signatures_and_staleness() {
    use bytes::{Buf as _, Bytes};
    use meshwhisper_behaviour::device::codec::Status;
    use meshwhisper_crypto::identity::IdentityKeyPair;
    use meshwhisper_crypto::pqxdh::{self, OneTimePrekey, PrekeyBundle};
    use meshwhisper_crypto::primitives::{MlKemSecret, X25519Secret};
    use rand_core::SeedableRng as _;

    let relay = start(|_| {}).await;
    let running = relay.running.as_ref().expect("running");
    let mut dev = device(running).await;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
    let id = IdentityKeyPair::generate(&mut rng);
    let other = IdentityKeyPair::generate(&mut rng);
    let pq = MlKemSecret::generate(&mut rng).public();
    let bundle = |spk_id: u32, rng: &mut rand_chacha::ChaCha20Rng| {
        let spk = X25519Secret::generate(rng).public();
        Bytes::from(PrekeyBundle::sign(&id, spk_id, &spk, spk_id, &pq).encode())
    };
    let ns = "ns".to_string();
    let ask = async |dev: &mut Device, f: Frame| -> (Status, Bytes) {
        dev.send(f).await;
        match dev.next().await {
            Frame::Reply { status, body, .. } => (status, body),
            other => panic!("expected a reply, got {other:?}"),
        }
    };

    // Unknown identity: nothing to claim.
    let claim = Frame::Claim {
        req: 1,
        namespace: ns.clone(),
        identity: id.public().to_bytes(),
    };
    assert_eq!(ask(&mut dev, claim.clone()).await.0, Status::NotFound);
    // Garbage and tampered bundles are refused.
    let garbage = Frame::Publish {
        req: 2,
        namespace: ns.clone(),
        bundle: Bytes::from_static(b"x"),
    };
    assert_eq!(ask(&mut dev, garbage).await.0, Status::Invalid);
    let mut tampered = bundle(5, &mut rng).to_vec();
    tampered[40] ^= 1;
    let f = Frame::Publish {
        req: 3,
        namespace: ns.clone(),
        bundle: tampered.into(),
    };
    assert_eq!(ask(&mut dev, f).await.0, Status::Invalid);
    // A valid bundle is stored; the pool is empty.
    let v5 = bundle(5, &mut rng);
    let (st, mut body) = ask(
        &mut dev,
        Frame::Publish {
            req: 4,
            namespace: ns.clone(),
            bundle: v5.clone(),
        },
    )
    .await;
    assert_eq!((st, body.get_u32()), (Status::Ok, 0));
    // An older signed prekey is refused as stale; a newer one replaces it.
    let f = Frame::Publish {
        req: 5,
        namespace: ns.clone(),
        bundle: bundle(4, &mut rng),
    };
    assert_eq!(ask(&mut dev, f).await.0, Status::Stale);
    let v6 = bundle(6, &mut rng);
    assert_eq!(
        ask(
            &mut dev,
            Frame::Publish {
                req: 6,
                namespace: ns.clone(),
                bundle: v6.clone()
            }
        )
        .await
        .0,
        Status::Ok
    );

    // One-time prekeys: a batch signed by someone else is refused, the
    // owner's is stored.
    let keys: Vec<OneTimePrekey> = (1..=3)
        .map(|i| OneTimePrekey {
            id: i,
            key: X25519Secret::generate(&mut rng).public(),
        })
        .collect();
    let raw: Bytes = keys
        .iter()
        .flat_map(|k| k.encode())
        .collect::<Vec<u8>>()
        .into();
    let forged = Frame::Prekeys {
        req: 7,
        namespace: ns.clone(),
        identity: id.public().to_bytes(),
        signature: pqxdh::sign_one_time_prekeys(&other, ns.as_bytes(), &keys),
        keys: raw.clone(),
    };
    assert_eq!(ask(&mut dev, forged).await.0, Status::Invalid);
    let good = Frame::Prekeys {
        req: 8,
        namespace: ns.clone(),
        identity: id.public().to_bytes(),
        signature: pqxdh::sign_one_time_prekeys(&id, ns.as_bytes(), &keys),
        keys: raw,
    };
    let (st, mut body) = ask(&mut dev, good).await;
    assert_eq!((st, body.get_u32()), (Status::Ok, 3));

    // Claims: the newest bundle and a distinct key each time, then none.
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (st, mut body) = ask(&mut dev, claim.clone()).await;
        assert_eq!(st, Status::Ok);
        let n = body.get_u32() as usize;
        assert_eq!(body.split_to(n), v6);
        seen.push(body.to_vec());
    }
    assert_eq!(seen[3], Vec::<u8>::new());
    let mut keys_seen: Vec<Vec<u8>> = seen[..3].to_vec();
    keys_seen.sort();
    keys_seen.dedup();
    assert_eq!(keys_seen.len(), 3);
}

/// An ack for a packet this stream was never given (e.g. left over from a
/// connection before a relay restart) deletes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_for_undelivered_ids_are_ignored() {
    let relay = start(|_| {}).await;
    let running = relay.running.as_ref().expect("running");
    let core = running.core.clone();
    let h = meshwhisper_crypto::destination::DestHash(hash(DEV));
    let pkt = meshwhisper_behaviour::packet::build(1, h, [0; 16], 1, b"keep me");
    let acc = core.accept(pkt.clone().into()).await.expect("stored");
    let _ = acc;
    let now = meshwhisper_node::core::now_ms();
    let id = core
        .store
        .mailbox()
        .pending(&[h], now, 10)
        .await
        .expect("pending")[0]
        .id;
    let mut dev = device(running).await;
    dev.send(Frame::Ack(id.0 as u64)).await;
    // Still there: registering drains it to this device.
    dev.send(Frame::Register(vec![hash(DEV)])).await;
    match dev.next().await {
        Frame::Deliver { id: got, packet } => {
            assert_eq!(got, id.0 as u64);
            assert_eq!(&packet[..], &pkt[..]);
        }
        other => panic!("expected the stored packet, got {other:?}"),
    }
}

/// A device storing more than its rate for recipients who are away is
/// paced through the writer's bulk lane (counted); every packet is still
/// stored, acknowledged in order, and reaches the recipient in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_storing_fast_for_absent_recipients_is_paced_and_keeps_its_order() {
    let relay = start(|c| c.limits.client_away_bytes_per_sec = 16 * 1024).await;
    let running = relay.running.as_ref().expect("running");
    let mut dev = device(running).await;
    dev.send(Frame::Register(vec![hash(DEV)])).await;
    wait_health(&relay.base, |h| h["devices"] == 1).await;
    // 100 × 2 KiB for a recipient who is away: over 12 times the allowance.
    for seq in 0..100u64 {
        let mut payload = vec![0u8; 2 * 1024];
        payload[..8].copy_from_slice(&seq.to_be_bytes());
        dev.send(Frame::Packet {
            seq,
            packet: packet(WEB, &payload).into(),
        })
        .await;
    }
    for seq in 0..100u64 {
        assert_eq!(dev.next().await, Frame::Stored(seq));
    }
    let paced = metric(&relay.base, "meshwhisper_packets_paced_away_total").await;
    assert!(paced >= 80, "only {paced} of 100 paced");
    let mut web = ws(&relay.ws).await;
    hello(&mut web, &[WEB]).await;
    for seq in 0..100u64 {
        assert_eq!(&next_packet(&mut web).await[31..39], &seq.to_be_bytes());
    }
    relay.stop().await;
}
