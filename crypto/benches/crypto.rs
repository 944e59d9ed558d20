//! Crypto benchmarks: the primitives, then our operations built from them.
//! `crypto/benches/ratios.py` turns the results into the ratios recorded in
//! docs/benchmarks.md.

use criterion::{Criterion, criterion_group, criterion_main};
use meshwhisper_crypto::address_record::{AddressRecord, Contents};
use meshwhisper_crypto::destination::{DestHash, NamespaceId};
use meshwhisper_crypto::identity::IdentityKeyPair;
use meshwhisper_crypto::onion::{Hop, OnionBuilder as _, OnionPeeler as _, Peeled, v1, v2};
use meshwhisper_crypto::pqxdh::{self, MemoryPrekeyStore, PrekeyBundle};
use meshwhisper_crypto::primitives::{self, MlKemSecret, X25519Secret};
use meshwhisper_crypto::ratchet::Session;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use std::hint::black_box;

fn primitives(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let a = X25519Secret::generate(&mut rng);
    let b = X25519Secret::generate(&mut rng).public();
    c.bench_function("prim/x25519_dh", |bench| {
        bench.iter(|| black_box(a.diffie_hellman(black_box(&b))))
    });
    c.bench_function("prim/x25519_keygen", |bench| {
        bench.iter(|| black_box(X25519Secret::generate(&mut rng).public()))
    });
    let key = [7u8; 32];
    let nonce = [1u8; 12];
    let kib = vec![0x5au8; 1024];
    c.bench_function("prim/aes256gcm_seal_1k", |bench| {
        bench.iter(|| {
            black_box(primitives::aes256gcm_seal(
                &key,
                &nonce,
                &[],
                black_box(&kib),
            ))
        })
    });
    c.bench_function("prim/chacha20poly1305_seal_1k", |bench| {
        bench.iter(|| {
            black_box(primitives::chacha20poly1305_seal(
                &key,
                &nonce,
                &[],
                black_box(&kib),
            ))
        })
    });
    c.bench_function("prim/hmac_sha256_32b", |bench| {
        bench.iter(|| black_box(primitives::hmac_sha256(&key, &[black_box(&kib[..32])])))
    });
    c.bench_function("prim/hkdf_sha256_64b", |bench| {
        bench.iter(|| {
            let mut out = [0u8; 64];
            primitives::hkdf_sha256(Some(&key), black_box(&kib[..32]), &[b"info"], &mut out);
            black_box(out)
        })
    });
    let id = IdentityKeyPair::from_seed(&[3u8; 32]);
    let sig = id.sign(&kib);
    c.bench_function("prim/ed25519_verify", |bench| {
        bench.iter(|| black_box(id.public().verify(black_box(&kib), &sig)))
    });
    c.bench_function("prim/ed25519_sign", |bench| {
        bench.iter(|| black_box(id.sign(black_box(&kib[..64]))))
    });
    let kem = MlKemSecret::generate(&mut rng);
    let kem_pub = kem.public();
    c.bench_function("prim/mlkem768_encaps", |bench| {
        bench.iter(|| black_box(kem_pub.encapsulate(&mut rng)))
    });
    let (ct, _) = kem_pub.encapsulate(&mut rng);
    c.bench_function("prim/mlkem768_decaps", |bench| {
        bench.iter(|| black_box(kem.decapsulate(black_box(&ct))))
    });
}

fn operations(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let ns = NamespaceId::derive("com.example.chat", &[1u8; 32]);
    let recipient = X25519Secret::generate(&mut rng).public();
    c.bench_function("op/dest_hash", |bench| {
        bench.iter(|| black_box(DestHash::derive(&ns, black_box(&recipient), 493_000)))
    });

    let relay = IdentityKeyPair::from_seed(&[4u8; 32]);
    let contents = Contents {
        timestamp_ms: 1_700_000_000_000,
        onion_key: recipient,
        addrs: vec![
            b"/ip4/203.0.113.7/tcp/4001".to_vec(),
            b"/ip4/203.0.113.7/udp/4001/quic-v1".to_vec(),
        ],
        anchors: vec![[9u8; 32]],
    };
    c.bench_function("op/record_sign", |bench| {
        bench.iter(|| black_box(AddressRecord::sign(&relay, black_box(contents.clone()))))
    });
    let encoded = AddressRecord::sign(&relay, contents.clone())
        .expect("sign")
        .encode();
    c.bench_function("op/record_verify", |bench| {
        bench.iter(|| black_box(AddressRecord::decode(black_box(&encoded))))
    });

    let secrets: Vec<X25519Secret> = (0..3).map(|_| X25519Secret::generate(&mut rng)).collect();
    let path: Vec<Hop> = secrets
        .iter()
        .enumerate()
        .map(|(i, s)| Hop {
            relay_key: [i as u8; 32],
            onion_key: s.public(),
        })
        .collect();
    let packet = vec![0x11u8; 1024];
    let r1: Vec<v1::Relay> = secrets.iter().cloned().map(v1::Relay::new).collect();
    c.bench_function("op/onion_v1_3hop_build_peel", |bench| {
        bench.iter(|| {
            let mut layer = v1::Sender.build(&mut rng, &path, &packet).expect("build");
            for r in &r1 {
                match r.peel(&layer).expect("peel") {
                    Peeled::Forward { layer: l, .. } => layer = l,
                    Peeled::Deliver { packet, .. } => return black_box(packet),
                }
            }
            unreachable!()
        })
    });
    let r2: Vec<v2::Relay> = secrets.iter().cloned().map(v2::Relay::new).collect();
    c.bench_function("op/onion_v2_3hop_build_peel", |bench| {
        bench.iter(|| {
            let mut layer = v2::Sender
                .build(&mut rng, &path, &packet[..900])
                .expect("build");
            for r in &r2 {
                match r.peel(&layer).expect("peel") {
                    Peeled::Forward { layer: l, .. } => layer = l,
                    Peeled::Deliver { packet, .. } => return black_box(packet),
                }
            }
            unreachable!()
        })
    });

    let alice = IdentityKeyPair::generate(&mut rng);
    let bob = IdentityKeyPair::generate(&mut rng);
    let spk = X25519Secret::generate(&mut rng);
    let pq = MlKemSecret::generate(&mut rng);
    let opk = X25519Secret::generate(&mut rng);
    let bundle = PrekeyBundle::sign(&bob, 1, &spk.public(), 2, &pq.public());
    let opk_pub = pqxdh::OneTimePrekey {
        id: 3,
        key: opk.public(),
    };
    let store = MemoryPrekeyStore {
        signed: vec![(1, spk.clone())],
        pq: vec![(2, pq)],
        one_time: vec![(3, opk)],
    };
    c.bench_function("op/pqxdh_both_sides", |bench| {
        bench.iter(|| {
            let (a, init) =
                pqxdh::initiate(&mut rng, &alice, &bundle, Some(&opk_pub)).expect("initiate");
            let b = pqxdh::respond(&bob, &store, &init).expect("respond");
            black_box((a, b))
        })
    });
    let bundle_bytes = bundle.encode();
    c.bench_function("op/pqxdh_bundle_verify", |bench| {
        bench.iter(|| black_box(PrekeyBundle::decode(black_box(&bundle_bytes))))
    });

    let mut sa = Session::initiator(&mut rng, &[8u8; 32], &spk.public(), b"ad").expect("a");
    let mut sb = Session::responder(&[8u8; 32], spk, b"ad").expect("b");
    let first = sa.encrypt(b"hi").expect("enc");
    sb.decrypt(&mut rng, &first).expect("dec");
    c.bench_function("op/ratchet_encrypt_decrypt_1k", |bench| {
        bench.iter(|| {
            let ct = sa.encrypt(black_box(&kib_of(1024))).expect("enc");
            black_box(sb.decrypt(&mut rng, &ct).expect("dec"))
        })
    });
}

fn kib_of(n: usize) -> Vec<u8> {
    vec![0x22u8; n]
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = primitives, operations
}
criterion_main!(benches);
