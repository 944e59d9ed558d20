//! `meshwhisper bench onion`: what onion transit costs per packet, against
//! the primitives its layers are made of, in one run.
//!
//! One packet's onion transit is: the sender encodes its `Routed` frame
//! and builds the onion for `hops` extra relays and the home relay; each
//! relay on the path peels its layer as a relay does (`Onion::receive`:
//! peel, replay check, and at the last hop decoding the frame inside). Its
//! primitives, per layer: two X25519 exchanges (the sender's and the
//! relay's) and two AEAD-sized passes over the payload (ChaCha20-Poly1305
//! sealing of the payload class is the reference). Each figure is the
//! mean over `--secs` seconds of back-to-back runs, after a warm-up.

use meshwhisper_behaviour::federation::codec::Frame;
use meshwhisper_behaviour::relay_key::RelayKey;
use meshwhisper_crypto::identity::IdentityKeyPair;
use meshwhisper_crypto::onion::{Hop, OnionBuilder as _, v2};
use meshwhisper_crypto::primitives::{self, X25519Secret};
use meshwhisper_node::federation::action::Action;
use meshwhisper_node::federation::onion::{self, Onion, OnionConfig};
use meshwhisper_node::metrics::FederationMetrics;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct OnionBench {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3)]
    secs: u64,
    /// Extra relays on the path, comma-separated (0-4 each).
    #[arg(long, default_value = "1,2,3")]
    hops: String,
    /// Client packet size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
}

/// Mean nanoseconds per call of `f` over `secs` seconds (after a warm-up
/// of a tenth of that).
fn per_op(secs: u64, mut f: impl FnMut()) -> f64 {
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(secs * 100) {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        for _ in 0..8 {
            f();
        }
        n += 8;
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

struct Relay {
    peer: libp2p::PeerId,
    hop: Hop,
    onion: Onion,
}

fn relay(seed: u8) -> Relay {
    let id = IdentityKeyPair::from_seed(&[seed; 32]);
    let key = RelayKey(id.public().to_bytes());
    Relay {
        peer: key.to_peer().unwrap_or_else(libp2p::PeerId::random),
        hop: Hop {
            relay_key: key.0,
            onion_key: id.public().x25519(),
        },
        onion: Onion::new(
            key,
            id.x25519().clone(),
            OnionConfig {
                max_entries: 1 << 20,
                max_per_peer: 1 << 20,
                replay_tags: 1 << 16,
                replay_ttl_ms: 600_000,
            },
            [seed; 32],
        ),
    }
}

pub fn run(b: OnionBench) -> anyhow::Result<()> {
    let mut rng = rand::make_rng::<rand::rngs::StdRng>();
    let hops: Vec<usize> = b
        .hops
        .split(',')
        .map(|h| h.trim().parse::<usize>())
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(
        hops.iter()
            .all(|h| *h < meshwhisper_crypto::onion::MAX_HOPS),
        "--hops: each 0 to 4"
    );
    let payload_len = b.size + 1 + 16 + 2 + 32;
    let class = v2::onion_len(payload_len)
        .map(|l| l - v2::PREFIX_LEN)
        .ok_or_else(|| anyhow::anyhow!("--size too large for an onion"))?;
    // The primitives, in the same run.
    let a = X25519Secret::generate(&mut rng);
    let bp = X25519Secret::generate(&mut rng).public();
    let dh = per_op(b.secs, || {
        let _ = std::hint::black_box(a.diffie_hellman(&bp));
    });
    let keygen = per_op(b.secs, || {
        let _ = std::hint::black_box(X25519Secret::generate(&mut rng).public());
    });
    let buf = vec![7u8; class];
    let aead = per_op(b.secs, || {
        let _ = std::hint::black_box(primitives::chacha20poly1305_seal(
            &[1; 32],
            &[2; 12],
            &[],
            &buf,
        ));
    });
    println!(
        "x25519 DH: {:.1} µs; X25519 key generation: {:.1} µs; ChaCha20-Poly1305 seal of {class} B: {:.1} µs",
        dh / 1e3,
        keygen / 1e3,
        aead / 1e3
    );
    println!(
        "| extra relays | layers | onion transit per packet | 2·layers DH + 2·layers AEAD | ratio |"
    );
    println!("|---|---|---|---|---|");
    let m = FederationMetrics::default();
    for h in hops {
        let layers = h + 1;
        let mut path: Vec<Relay> = (0..layers).map(|i| relay(10 + i as u8)).collect();
        let home = path[layers - 1].hop.relay_key;
        let hop_keys: Vec<Hop> = path.iter().map(|r| r.hop).collect();
        let sender = libp2p::PeerId::random();
        let mut out: Vec<Action> = Vec::new();
        let mut n = 0u64;
        let t = per_op(b.secs, || {
            n += 1;
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&n.to_be_bytes());
            let routed = Frame::Routed {
                id,
                flags: 0,
                hops: 1,
                target: home,
                packet: bytes::Bytes::from(vec![0x5a; b.size]),
            };
            let layer = v2::Sender
                .build(&mut rng, &hop_keys, &onion::encode(routed))
                .expect("onion");
            let mut layer = bytes::Bytes::from(layer);
            let mut from = sender;
            for r in path.iter_mut() {
                out.clear();
                let delivered = r
                    .onion
                    .receive(0, from, [0; 16], &layer, |_| true, &m, &mut out);
                if delivered.is_some() {
                    break;
                }
                match out.pop() {
                    Some(Action::Send {
                        frame: Frame::Onion { layer: next, .. },
                        ..
                    }) => layer = next,
                    other => panic!("layer not passed on: {other:?}"),
                }
                from = r.peer;
            }
        });
        let prims = 2.0 * layers as f64 * (dh + aead);
        println!(
            "| {h} | {layers} | {:.1} µs | {:.1} µs | {:.2}× |",
            t / 1e3,
            prims / 1e3,
            t / prims
        );
    }
    Ok(())
}
