//! PQXDH agreement with and without a one-time prekey, feeding the ratchet.

use meshwhisper_crypto::identity::IdentityKeyPair;
use meshwhisper_crypto::pqxdh::{
    self, Error, InitialMessage, MemoryPrekeyStore, OneTimePrekey, PrekeyBundle,
};
use meshwhisper_crypto::primitives::{MlKemSecret, X25519Secret};
use meshwhisper_crypto::ratchet::Session;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

struct Bob {
    id: IdentityKeyPair,
    store: MemoryPrekeyStore,
    bundle: PrekeyBundle,
    opk: OneTimePrekey,
}

fn bob(rng: &mut ChaCha20Rng) -> Bob {
    let id = IdentityKeyPair::generate(rng);
    let spk = X25519Secret::generate(rng);
    let pq = MlKemSecret::generate(rng);
    let opk = X25519Secret::generate(rng);
    let bundle = PrekeyBundle::sign(&id, 7, &spk.public(), 9, &pq.public());
    let opk_pub = OneTimePrekey {
        id: 100,
        key: opk.public(),
    };
    let store = MemoryPrekeyStore {
        signed: vec![(7, spk)],
        pq: vec![(9, pq)],
        one_time: vec![(100, opk)],
    };
    Bob {
        id,
        store,
        bundle,
        opk: opk_pub,
    }
}

fn agree_and_talk(with_opk: bool) {
    let mut rng = ChaCha20Rng::seed_from_u64(u64::from(with_opk));
    let alice = IdentityKeyPair::generate(&mut rng);
    let bob = bob(&mut rng);
    // Bundles travel as bytes and are verified on decode.
    let bundle = PrekeyBundle::decode(&bob.bundle.encode()).expect("bundle");
    let opk = with_opk.then_some(bob.opk);
    let (a, init) = pqxdh::initiate(&mut rng, &alice, &bundle, opk.as_ref()).expect("initiate");
    let init = InitialMessage::decode(&init.encode()).expect("initial");
    assert_eq!(init.one_time_prekey_id, with_opk.then_some(100));
    let b = pqxdh::respond(&bob.id, &bob.store, &init).expect("respond");
    assert_eq!(*a.shared_key, *b.shared_key);
    assert_eq!(a.associated_data, b.associated_data);

    let mut sa = Session::initiator(
        &mut rng,
        &a.shared_key,
        &bundle.signed_prekey().1,
        &a.associated_data,
    )
    .expect("alice session");
    let spk = bob.store.signed[0].1.clone();
    let mut sb = Session::responder(&b.shared_key, spk, &b.associated_data).expect("bob session");
    let c = sa.encrypt(b"hello bob").expect("enc");
    assert_eq!(sb.decrypt(&mut rng, &c).expect("dec"), b"hello bob");
    let r = sb.encrypt(b"hello alice").expect("enc");
    assert_eq!(sa.decrypt(&mut rng, &r).expect("dec"), b"hello alice");
}

#[test]
fn agreement_without_one_time_prekey() {
    agree_and_talk(false);
}

#[test]
fn agreement_with_one_time_prekey() {
    agree_and_talk(true);
}

#[test]
fn one_time_prekey_changes_the_key() {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let alice = IdentityKeyPair::generate(&mut rng);
    let bob = bob(&mut rng);
    let (_, mut init) = pqxdh::initiate(&mut rng, &alice, &bob.bundle, Some(&bob.opk)).expect("i");
    let (a, _) = (pqxdh::respond(&bob.id, &bob.store, &init).expect("r"), ());
    init.one_time_prekey_id = None;
    let b = pqxdh::respond(&bob.id, &bob.store, &init).expect("r");
    assert_ne!(*a.shared_key, *b.shared_key);
    init.one_time_prekey_id = Some(5);
    assert_eq!(
        pqxdh::respond(&bob.id, &bob.store, &init).map(|_| ()),
        Err(Error::UnknownPrekey("one-time prekey", 5))
    );
}

#[test]
fn wrong_keys_give_different_secrets() {
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let alice = IdentityKeyPair::generate(&mut rng);
    let bob = bob(&mut rng);
    let (a, init) = pqxdh::initiate(&mut rng, &alice, &bob.bundle, None).expect("i");
    // A responder with other prekeys under the same ids derives another key.
    let imposter = self::bob(&mut rng);
    let x = pqxdh::respond(&bob.id, &imposter.store, &init).expect("r");
    assert_ne!(*a.shared_key, *x.shared_key);
    // A tampered ML-KEM ciphertext yields another key (implicit rejection).
    let mut t = init.clone();
    t.pq_ciphertext[0] ^= 1;
    let y = pqxdh::respond(&bob.id, &bob.store, &t).expect("r");
    assert_ne!(*a.shared_key, *y.shared_key);
    // Another identity claiming to be Alice changes the key too.
    let mut m = init.clone();
    m.identity = *IdentityKeyPair::generate(&mut rng).public();
    let z = pqxdh::respond(&bob.id, &bob.store, &m).expect("r");
    assert_ne!(*a.shared_key, *z.shared_key);
}

#[test]
fn bundle_bit_flips_and_foreign_signatures_are_rejected() {
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let bob = bob(&mut rng);
    let bytes = bob.bundle.encode();
    assert_eq!(bytes.len(), pqxdh::BUNDLE_LEN);
    // Flip one bit in every byte (all bits in the small fields).
    for i in 0..bytes.len() {
        let bits: &[u8] = if i < 1 + 32 + 4 + 32 + 64 + 4 {
            &[0, 1, 2, 3, 4, 5, 6, 7]
        } else {
            &[(i % 8) as u8]
        };
        for &bit in bits {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            assert!(
                PrekeyBundle::decode(&b).is_err(),
                "byte {i} bit {bit} accepted"
            );
        }
    }
    // A bundle re-signed by someone else but claiming Bob's identity fails.
    let mallory = IdentityKeyPair::generate(&mut rng);
    let fake = PrekeyBundle::sign(
        &mallory,
        7,
        &X25519Secret::generate(&mut rng).public(),
        9,
        &MlKemSecret::generate(&mut rng).public(),
    )
    .encode();
    let mut spliced = fake.clone();
    spliced[1..33].copy_from_slice(&bob.id.public().to_bytes());
    assert!(matches!(
        PrekeyBundle::decode(&spliced),
        Err(Error::BadSignature(_))
    ));
    assert!(PrekeyBundle::decode(&bytes[..bytes.len() - 1]).is_err());
}

#[test]
fn initial_message_strictness() {
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let alice = IdentityKeyPair::generate(&mut rng);
    let bob = bob(&mut rng);
    let (_, init) = pqxdh::initiate(&mut rng, &alice, &bob.bundle, Some(&bob.opk)).expect("i");
    let bytes = init.encode();
    assert_eq!(bytes.len(), pqxdh::MAX_INITIAL_LEN);
    assert!(InitialMessage::decode(&bytes[..bytes.len() - 1]).is_err());
    let mut extra = bytes.clone();
    extra.push(0);
    assert!(InitialMessage::decode(&extra).is_err());
    let mut flag = bytes.clone();
    flag[1 + 32 + 32 + 8] = 2;
    assert!(InitialMessage::decode(&flag).is_err());
}

#[test]
fn one_time_prekey_batches_are_signed_per_namespace() {
    let mut rng = ChaCha20Rng::seed_from_u64(40);
    let b = bob(&mut rng);
    let other = IdentityKeyPair::generate(&mut rng);
    let keys = vec![
        b.opk,
        OneTimePrekey {
            id: 101,
            key: X25519Secret::generate(&mut rng).public(),
        },
    ];
    let sig = pqxdh::sign_one_time_prekeys(&b.id, b"ns", &keys);
    assert!(pqxdh::verify_one_time_prekeys(b.id.public(), b"ns", &keys, &sig).is_ok());
    // Another namespace, another owner, a changed or dropped key: refused.
    assert!(pqxdh::verify_one_time_prekeys(b.id.public(), b"nt", &keys, &sig).is_err());
    assert!(pqxdh::verify_one_time_prekeys(other.public(), b"ns", &keys, &sig).is_err());
    assert!(pqxdh::verify_one_time_prekeys(b.id.public(), b"ns", &keys[..1], &sig).is_err());
    let mut changed = keys.clone();
    changed[1].id = 102;
    assert!(pqxdh::verify_one_time_prekeys(b.id.public(), b"ns", &changed, &sig).is_err());
    assert!(pqxdh::verify_one_time_prekeys(b.id.public(), &[0; 256], &keys, &sig).is_err());
}
