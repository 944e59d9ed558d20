//! Every decoder returns an error on arbitrary input and never panics.
//! (The cargo-fuzz targets in `crypto/fuzz/` explore the same surfaces
//! with coverage guidance.)

use meshwhisper_crypto::address_record::AddressRecord;
use meshwhisper_crypto::identity::IdentityKeyPair;
use meshwhisper_crypto::onion::{OnionBuilder as _, OnionPeeler as _, v1, v2};
use meshwhisper_crypto::pqxdh::{InitialMessage, OneTimePrekey, PrekeyBundle};
use meshwhisper_crypto::primitives::X25519Secret;
use meshwhisper_crypto::ratchet::{Message, Session};
use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

fn relay_secret() -> X25519Secret {
    X25519Secret::from_bytes([0x42; 32])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn address_record_decode(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = AddressRecord::decode(&bytes);
        let _ = AddressRecord::accept(&bytes, 1_700_000_000_000);
    }

    #[test]
    fn address_record_mutations(pos in any::<prop::sample::Index>(), val in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let id = IdentityKeyPair::from_seed(&[1u8; 32]);
        let rec = AddressRecord::sign(&id, meshwhisper_crypto::address_record::Contents {
            timestamp_ms: 5,
            onion_key: relay_secret().public(),
            addrs: vec![b"/ip4/1.2.3.4/tcp/1".to_vec()],
            anchors: vec![[3u8; 32]],
        }).expect("sign");
        let mut bytes = rec.encode();
        let i = pos.index(bytes.len());
        let changed = bytes[i] != val;
        bytes[i] = val;
        let r = AddressRecord::decode(&bytes);
        prop_assert_eq!(r.is_ok(), !changed);
        let _ = AddressRecord::decode(&bytes[..cut.index(bytes.len())]);
    }

    #[test]
    fn onion_v1_peel(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        prop_assert!(v1::Relay::new(relay_secret()).peel(&bytes).is_err());
    }

    #[test]
    fn onion_v2_peel(seed in any::<u64>(), class in 0usize..2) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let len = v2::PREFIX_LEN + v2::PAYLOAD_CLASSES[class];
        let mut bytes = vec![0u8; len];
        rand_core::Rng::fill_bytes(&mut rng, &mut bytes);
        bytes[0] = v2::VERSION;
        prop_assert!(v2::Relay::new(relay_secret()).peel(&bytes).is_err());
        prop_assert!(v2::Relay::new(relay_secret()).peel(&bytes[..len - 1]).is_err());
    }

    #[test]
    fn onion_v1_mutated_layer(seed in any::<u64>(), pos in any::<prop::sample::Index>()) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let hop = meshwhisper_crypto::onion::Hop { relay_key: [1; 32], onion_key: relay_secret().public() };
        let mut o = v1::Sender.build(&mut rng, &[hop], b"pkt").expect("build");
        let i = pos.index(o.len());
        o[i] ^= 0x01;
        prop_assert!(v1::Relay::new(relay_secret()).peel(&o).is_err());
    }

    #[test]
    fn bundle_and_prekeys(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
        let _ = PrekeyBundle::decode(&bytes);
        let _ = InitialMessage::decode(&bytes);
        let _ = OneTimePrekey::decode(&bytes);
    }

    #[test]
    fn sealed_sender(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let bob = IdentityKeyPair::from_seed(&[5u8; 32]);
        prop_assert!(meshwhisper_crypto::sealed::open(&bob, &bytes).is_err());
    }

    #[test]
    fn ratchet_message_and_state(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Message::decode(&bytes);
        let _ = Session::from_bytes(&bytes);
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let spk = X25519Secret::from_bytes([7u8; 32]);
        let mut bob = Session::responder(&[1u8; 32], spk, b"ad").expect("session");
        let before = bob.to_bytes();
        prop_assert!(bob.decrypt(&mut rng, &bytes).is_err());
        prop_assert_eq!(&*bob.to_bytes(), &*before);
    }
}
