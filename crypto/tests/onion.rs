//! Onion layers: reference vectors for v1, and the fixed-size and replay
//! properties of v2.

use meshwhisper_crypto::onion::{
    self, Error, Hop, OnionBuilder as _, OnionPeeler as _, Peeled, ReplayCache, v1, v2,
};
use meshwhisper_crypto::primitives::X25519Secret;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde_json::Value;

const VECTORS: &str = include_str!("vectors/onion-v1.json");

fn h(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("hex string")).expect("hex")
}

fn h32(v: &Value) -> [u8; 32] {
    h(v).try_into().expect("32 bytes")
}

fn relay_of(hop: &Value) -> v1::Relay {
    v1::Relay::new(X25519Secret::from_bytes(h32(
        &hop["onion_x25519_private_raw_hex"],
    )))
}

/// Peels `onion` along `hops` and returns the delivered packet.
fn peel_path(relays: &[impl onion::OnionPeeler], keys: &[[u8; 32]], onion: Vec<u8>) -> Vec<u8> {
    let mut layer = onion;
    for (i, r) in relays.iter().enumerate() {
        match r.peel(&layer).expect("peel") {
            Peeled::Forward {
                next_hop, layer: l, ..
            } => {
                assert_eq!(next_hop, keys[i + 1], "hop {i} names the next relay");
                layer = l;
            }
            Peeled::Deliver { packet, .. } => {
                assert_eq!(i, relays.len() - 1, "only the last hop delivers");
                return packet;
            }
        }
    }
    panic!("no hop delivered");
}

#[test]
fn v1_reference_vectors_seal_byte_for_byte() {
    let v: Value = serde_json::from_str(VECTORS).expect("json");
    for vector in v["vectors"].as_array().expect("vectors") {
        let hops = vector["hops"].as_array().expect("hops");
        for layer in vector["layers_by_hop"].as_array().expect("layers") {
            let i = layer["for_hop"].as_u64().expect("index") as usize;
            let eph = X25519Secret::from_bytes(h32(&layer["ephemeral_x25519_private_raw_hex"]));
            let iv: [u8; 12] = h(&layer["iv_hex"]).try_into().expect("iv");
            let onion_pub =
                X25519Secret::from_bytes(h32(&hops[i]["onion_x25519_private_raw_hex"])).public();
            assert_eq!(
                hex::encode(onion_pub.as_bytes()),
                hops[i]["onion_x25519_public_hex"].as_str().expect("s")
            );
            let sealed =
                v1::seal_layer(&eph, &onion_pub, &iv, &h(&layer["plaintext_hex"])).expect("seal");
            assert_eq!(
                hex::encode(&sealed),
                layer["layer_hex"].as_str().expect("s")
            );
        }
        // And the whole onion peels back to the packet, naming each next hop.
        let relays: Vec<_> = hops.iter().map(relay_of).collect();
        let keys: Vec<[u8; 32]> = hops
            .iter()
            .map(|x| h32(&x["federation_pubkey_hex"]))
            .collect();
        let packet = peel_path(&relays, &keys, h(&vector["onion_hex"]));
        assert_eq!(packet, h(&vector["packet_hex"]));
        // The tampered layer from the reference is refused, as it refuses it.
        let tampered = h(&vector["negative"]["tampered_outer_layer_hex"]);
        assert_eq!(relays[0].peel(&tampered), Err(Error::Authentication));
    }
}

#[test]
fn v1_reference_onion_with_real_randomness_peels() {
    let v: Value = serde_json::from_str(VECTORS).expect("json");
    for vector in v["peel_only_vectors"].as_array().expect("vectors") {
        let hops = vector["hops"].as_array().expect("hops");
        let mut layer = h(&vector["onion_hex"]);
        for (i, expected) in vector["expected_peel"]
            .as_array()
            .expect("peel")
            .iter()
            .enumerate()
        {
            match relay_of(&hops[i]).peel(&layer).expect("peel") {
                Peeled::Forward {
                    next_hop, layer: l, ..
                } => {
                    assert_eq!(expected["result"], "forward");
                    assert_eq!(next_hop.to_vec(), h(&expected["next_hex"]));
                    assert_eq!(l, h(&expected["inner_hex"]));
                    layer = l;
                }
                Peeled::Deliver { packet, .. } => {
                    assert_eq!(expected["result"], "deliver");
                    assert_eq!(packet, h(&expected["inner_hex"]));
                }
            }
        }
    }
}

struct Net {
    hops: Vec<Hop>,
    v1: Vec<v1::Relay>,
    v2: Vec<v2::Relay>,
}

fn net(rng: &mut ChaCha20Rng, n: usize) -> Net {
    let mut hops = Vec::new();
    let mut r1 = Vec::new();
    let mut r2 = Vec::new();
    for i in 0..n {
        let secret = X25519Secret::generate(rng);
        hops.push(Hop {
            relay_key: [i as u8 + 1; 32],
            onion_key: secret.public(),
        });
        r1.push(v1::Relay::new(secret.clone()));
        r2.push(v2::Relay::new(secret));
    }
    Net {
        hops,
        v1: r1,
        v2: r2,
    }
}

fn keys(n: &Net) -> Vec<[u8; 32]> {
    n.hops.iter().map(|h| h.relay_key).collect()
}

#[test]
fn round_trips_for_every_path_length() {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    for n in 1..=onion::MAX_HOPS {
        let net = net(&mut rng, n);
        let packet: Vec<u8> = (0..(300 + n * 17)).map(|i| i as u8).collect();
        let o1 = v1::Sender
            .build(&mut rng, &net.hops, &packet)
            .expect("build v1");
        assert_eq!(peel_path(&net.v1, &keys(&net), o1), packet);
        let o2 = v2::Sender
            .build(&mut rng, &net.hops, &packet)
            .expect("build v2");
        assert_eq!(peel_path(&net.v2, &keys(&net), o2), packet);
    }
}

#[test]
fn v2_every_layer_has_the_same_size() {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    for &packet_len in &[0usize, 1, 500, 1020, 1021, 5000, v2::MAX_PACKET_LEN] {
        for n in 1..=onion::MAX_HOPS {
            let net = net(&mut rng, n);
            let packet = vec![0xAB; packet_len];
            let mut layer = v2::Sender
                .build(&mut rng, &net.hops, &packet)
                .expect("build");
            let size = v2::onion_len(packet_len).expect("class");
            assert_eq!(layer.len(), size);
            for (i, r) in net.v2.iter().enumerate() {
                match r.peel(&layer).expect("peel") {
                    Peeled::Forward { layer: l, .. } => {
                        assert_eq!(l.len(), size, "layer {i} of {n} changed size");
                        layer = l;
                    }
                    Peeled::Deliver { packet: p, .. } => assert_eq!(p, packet),
                }
            }
        }
    }
    // v1 layers shrink: the leak v2 fixes.
    let net = net(&mut rng, 3);
    let o = v1::Sender.build(&mut rng, &net.hops, b"x").expect("build");
    match net.v1[0].peel(&o).expect("peel") {
        Peeled::Forward { layer, .. } => assert_eq!(o.len() - layer.len(), v1::FORWARD_OVERHEAD),
        Peeled::Deliver { .. } => panic!("expected forward"),
    }
}

#[test]
fn v2_replays_are_detected() {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let net = net(&mut rng, 3);
    let onion = v2::Sender
        .build(&mut rng, &net.hops, b"packet")
        .expect("build");
    let mut cache = ReplayCache::new(1024, 60_000);
    let first = net.v2[0].peel(&onion).expect("peel");
    let tag = first.replay_tag().expect("v2 has tags");
    assert!(cache.check_and_insert(tag, 1_000));
    let again = net.v2[0].peel(&onion).expect("peel");
    assert_eq!(again.replay_tag(), Some(tag));
    assert!(!cache.check_and_insert(tag, 2_000), "replay accepted");
    // Another onion through the same hop has another tag.
    let other = v2::Sender
        .build(&mut rng, &net.hops, b"packet")
        .expect("build");
    let t2 = net.v2[0]
        .peel(&other)
        .expect("peel")
        .replay_tag()
        .expect("tag");
    assert!(cache.check_and_insert(t2, 3_000));
}

#[test]
fn wrong_keys_and_flipped_bits_are_rejected() {
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let net = net(&mut rng, 2);
    let o1 = v1::Sender
        .build(&mut rng, &net.hops, b"secret packet")
        .expect("v1");
    let o2 = v2::Sender
        .build(&mut rng, &net.hops, b"secret packet")
        .expect("v2");
    // The second hop cannot open the first hop's layer.
    assert_eq!(net.v1[1].peel(&o1), Err(Error::Authentication));
    assert_eq!(net.v2[1].peel(&o2), Err(Error::Authentication));
    for i in 0..o1.len() * 8 {
        let mut t = o1.clone();
        t[i / 8] ^= 1 << (i % 8);
        assert!(net.v1[0].peel(&t).is_err(), "v1 bit {i} accepted");
    }
    // v2 onions are ≥ 1.4 KiB: flip every bit of the header and a bit in
    // every byte of the payload.
    for byte in 0..o2.len() {
        let bits: Vec<usize> = if byte < v2::PREFIX_LEN {
            (0..8).collect()
        } else {
            vec![byte % 8]
        };
        for bit in bits {
            let mut t = o2.clone();
            t[byte] ^= 1 << bit;
            assert!(
                net.v2[0].peel(&t).is_err(),
                "v2 byte {byte} bit {bit} accepted"
            );
        }
    }
    // Truncated and extended layers are malformed, not panics.
    assert!(net.v2[0].peel(&o2[..o2.len() - 1]).is_err());
    assert!(net.v1[0].peel(&o1[..40]).is_err());
}

#[test]
fn build_bounds() {
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let six = net(&mut rng, onion::MAX_HOPS + 1);
    assert_eq!(
        v2::Sender.build(&mut rng, &six.hops, b"x"),
        Err(Error::PathLength(onion::MAX_HOPS + 1))
    );
    assert_eq!(
        v1::Sender.build(&mut rng, &[], b"x"),
        Err(Error::PathLength(0))
    );
    let one = net(&mut rng, 1);
    let big = vec![0u8; v2::MAX_PACKET_LEN + 1];
    assert!(matches!(
        v2::Sender.build(&mut rng, &one.hops, &big),
        Err(Error::PacketTooLarge { .. })
    ));
    let big = vec![0u8; v1::MAX_PACKET_LEN + 1];
    assert!(matches!(
        v1::Sender.build(&mut rng, &one.hops, &big),
        Err(Error::PacketTooLarge { .. })
    ));
    let mut low_order = one.hops.clone();
    low_order[0].onion_key = meshwhisper_crypto::primitives::X25519Public([0u8; 32]);
    assert_eq!(
        v2::Sender.build(&mut rng, &low_order, b"x"),
        Err(Error::BadHopKey)
    );
}
