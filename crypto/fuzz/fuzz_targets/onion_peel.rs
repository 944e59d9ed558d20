#![no_main]
//! Arbitrary bytes as an onion layer of either version: never panics, never
//! opens (the fuzzer cannot forge a layer for this key).
use libfuzzer_sys::fuzz_target;
use meshwhisper_crypto::onion::{OnionPeeler as _, v1, v2};
use meshwhisper_crypto::primitives::X25519Secret;

fuzz_target!(|data: &[u8]| {
    let secret = X25519Secret::from_bytes([0x42; 32]);
    assert!(v1::Relay::new(secret.clone()).peel(data).is_err());
    // Also try the data padded to the smallest v2 size so the MAC path runs.
    assert!(v2::Relay::new(secret.clone()).peel(data).is_err());
    let mut padded = vec![0u8; v2::PREFIX_LEN + v2::PAYLOAD_CLASSES[0]];
    padded[0] = v2::VERSION;
    let n = data.len().min(padded.len() - 1);
    padded[1..1 + n].copy_from_slice(&data[..n]);
    assert!(v2::Relay::new(secret).peel(&padded).is_err());
});
