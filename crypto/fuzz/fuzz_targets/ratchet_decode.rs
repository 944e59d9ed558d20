#![no_main]
//! Arbitrary bytes as a ratchet message (fed to a live session) and as
//! serialized session state.
use libfuzzer_sys::fuzz_target;
use meshwhisper_crypto::primitives::X25519Secret;
use meshwhisper_crypto::ratchet::{Message, Session};
use rand_core::SeedableRng;

fuzz_target!(|data: &[u8]| {
    let _ = Message::decode(data);
    if let Ok(s) = Session::from_bytes(data) {
        assert_eq!(&*s.to_bytes(), data);
    }
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let mut rx = Session::responder(&[1u8; 32], X25519Secret::from_bytes([2u8; 32]), b"ad")
        .expect("session");
    let before = rx.to_bytes();
    assert!(rx.decrypt(&mut rng, data).is_err());
    assert_eq!(&*rx.to_bytes(), &*before);
});
