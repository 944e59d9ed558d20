//! Double Ratchet behaviour: round trips, out-of-order, duplicates, drops,
//! skip bounds, tampering and persistence.

use meshwhisper_crypto::primitives::X25519Secret;
use meshwhisper_crypto::ratchet::{self, Error, Session};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

fn pair(seed: u64) -> (Session, Session, ChaCha20Rng) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let sk = [42u8; 32];
    let spk = X25519Secret::generate(&mut rng);
    let alice = Session::initiator(&mut rng, &sk, &spk.public(), b"AD").expect("alice");
    let bob = Session::responder(&sk, spk, b"AD").expect("bob");
    (alice, bob, rng)
}

#[test]
fn ping_pong_many_turns() {
    let (mut a, mut b, mut rng) = pair(1);
    assert!(!b.can_send());
    assert_eq!(b.encrypt(b"x"), Err(Error::NoSendingChain));
    for round in 0..20u32 {
        for i in 0..(round % 4 + 1) {
            let m = format!("a{round}.{i}");
            let c = a.encrypt(m.as_bytes()).expect("enc");
            assert_eq!(b.decrypt(&mut rng, &c).expect("dec"), m.as_bytes());
        }
        for i in 0..(round % 3 + 1) {
            let m = format!("b{round}.{i}");
            let c = b.encrypt(m.as_bytes()).expect("enc");
            assert_eq!(a.decrypt(&mut rng, &c).expect("dec"), m.as_bytes());
        }
    }
    assert_eq!(a.skipped_key_count(), 0);
    assert_eq!(b.skipped_key_count(), 0);
}

#[test]
fn out_of_order_across_ratchet_steps() {
    let (mut a, mut b, mut rng) = pair(2);
    let a1: Vec<_> = (0..5).map(|i| a.encrypt(&[i]).expect("enc")).collect();
    // Bob gets only message 3 of the first chain, then replies.
    assert_eq!(b.decrypt(&mut rng, &a1[3]).expect("dec"), vec![3]);
    assert_eq!(b.skipped_key_count(), 3);
    let r = b.encrypt(b"reply").expect("enc");
    assert_eq!(a.decrypt(&mut rng, &r).expect("dec"), b"reply");
    // Alice's second chain; Bob receives its last message first.
    let a2: Vec<_> = (10..13).map(|i| a.encrypt(&[i]).expect("enc")).collect();
    assert_eq!(b.decrypt(&mut rng, &a2[2]).expect("dec"), vec![12]);
    // Messages 4 of chain 1 (after pn) and all stragglers now arrive.
    for (c, want) in [
        (&a1[4], 4u8),
        (&a1[0], 0),
        (&a2[0], 10),
        (&a1[2], 2),
        (&a2[1], 11),
        (&a1[1], 1),
    ] {
        assert_eq!(b.decrypt(&mut rng, c).expect("dec"), vec![want]);
    }
    assert_eq!(b.skipped_key_count(), 0);
}

#[test]
fn duplicates_are_refused_and_change_nothing() {
    let (mut a, mut b, mut rng) = pair(3);
    let c0 = a.encrypt(b"zero").expect("enc");
    let c1 = a.encrypt(b"one").expect("enc");
    assert_eq!(b.decrypt(&mut rng, &c1).expect("dec"), b"one");
    assert_eq!(b.decrypt(&mut rng, &c1), Err(Error::DuplicateOrExpired));
    assert_eq!(b.decrypt(&mut rng, &c0).expect("dec"), b"zero");
    assert_eq!(b.decrypt(&mut rng, &c0), Err(Error::DuplicateOrExpired));
    let before = b.to_bytes();
    assert!(b.decrypt(&mut rng, &c0).is_err());
    assert_eq!(
        *b.to_bytes(),
        *before,
        "failed decrypt must not change state"
    );
}

#[test]
fn dropped_messages_do_not_block_later_ones() {
    let (mut a, mut b, mut rng) = pair(4);
    for i in 0..50u8 {
        let c = a.encrypt(&[i]).expect("enc");
        if i % 7 != 0 {
            assert_eq!(b.decrypt(&mut rng, &c).expect("dec"), vec![i]);
        }
    }
    // 0, 7, ..., 42 were skipped; 49 was the last and is simply missing.
    assert_eq!(b.skipped_key_count(), 7);
}

#[test]
fn skip_bounds() {
    let (mut a, mut b, mut rng) = pair(5);
    let first = a.encrypt(b"first").expect("enc");
    // Skipping exactly MAX_SKIP_STEP keys (including "first") is allowed...
    for _ in 1..ratchet::MAX_SKIP_STEP {
        a.encrypt(b"").expect("enc");
    }
    let far = a.encrypt(b"far").expect("enc");
    assert_eq!(b.decrypt(&mut rng, &far).expect("dec"), b"far");
    // ...but only the newest MAX_SKIPPED_PER_CHAIN are kept.
    assert_eq!(b.skipped_key_count(), ratchet::MAX_SKIPPED_PER_CHAIN);
    assert_eq!(b.decrypt(&mut rng, &first), Err(Error::DuplicateOrExpired));
    // One more than the step bound is refused without changing state.
    for _ in 0..ratchet::MAX_SKIP_STEP {
        a.encrypt(b"").expect("enc");
    }
    let _ = a.encrypt(b"").expect("enc");
    let too_far = a.encrypt(b"too far").expect("enc");
    let before = b.to_bytes();
    assert!(matches!(
        b.decrypt(&mut rng, &too_far),
        Err(Error::TooManySkipped { skip }) if skip == u64::from(ratchet::MAX_SKIP_STEP) + 1
    ));
    assert_eq!(*b.to_bytes(), *before);
}

#[test]
fn every_flipped_bit_is_rejected() {
    let (mut a, mut b, mut rng) = pair(6);
    let c = a.encrypt(b"integrity").expect("enc");
    let before = b.to_bytes();
    for i in 0..c.len() * 8 {
        let mut t = c.clone();
        t[i / 8] ^= 1 << (i % 8);
        assert!(b.decrypt(&mut rng, &t).is_err(), "bit {i} accepted");
        assert_eq!(*b.to_bytes(), *before, "bit {i} changed state");
    }
    assert_eq!(b.decrypt(&mut rng, &c).expect("dec"), b"integrity");
}

#[test]
fn wrong_session_is_rejected() {
    let (mut a, _, _) = pair(7);
    let (_, mut other_b, mut rng) = pair(8);
    let c = a.encrypt(b"hi").expect("enc");
    assert!(other_b.decrypt(&mut rng, &c).is_err());
}

#[test]
fn state_survives_serialization_mid_conversation() {
    let (mut a, mut b, mut rng) = pair(9);
    let early = a.encrypt(b"early").expect("enc");
    let late = a.encrypt(b"late").expect("enc");
    assert_eq!(b.decrypt(&mut rng, &late).expect("dec"), b"late");
    let mut b2 = Session::from_bytes(&b.to_bytes()).expect("restore");
    let mut a2 = Session::from_bytes(&a.to_bytes()).expect("restore");
    drop((a, b));
    assert_eq!(b2.decrypt(&mut rng, &early).expect("dec"), b"early");
    let r = b2.encrypt(b"back").expect("enc");
    assert_eq!(a2.decrypt(&mut rng, &r).expect("dec"), b"back");
    // Trailing or truncated state is refused.
    let mut bytes = b2.to_bytes().to_vec();
    bytes.push(0);
    assert!(Session::from_bytes(&bytes).is_err());
    bytes.truncate(bytes.len() - 2);
    assert!(Session::from_bytes(&bytes).is_err());
}
