#![no_main]
//! Arbitrary bytes as a prekey bundle, initial message or one-time prekey.
use libfuzzer_sys::fuzz_target;
use meshwhisper_crypto::pqxdh::{InitialMessage, OneTimePrekey, PrekeyBundle};

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = PrekeyBundle::decode(data) {
        assert_eq!(b.encode(), data);
    }
    if let Ok(m) = InitialMessage::decode(data) {
        assert_eq!(m.encode(), data);
    }
    if let Ok(o) = OneTimePrekey::decode(data) {
        assert_eq!(o.encode().as_slice(), data);
    }
});
