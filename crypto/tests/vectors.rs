//! Known-answer vectors taken from the reference SDK.

use meshwhisper_crypto::destination::{DestHash, NamespaceId};
use meshwhisper_crypto::identity::IdentityKeyPair;
use meshwhisper_crypto::primitives::X25519Public;
use serde_json::Value;

const VECTORS: &str = include_str!("vectors/dest-hash.json");

fn hex32(v: &Value) -> [u8; 32] {
    let bytes = hex::decode(v.as_str().expect("hex string")).expect("hex");
    bytes.try_into().expect("32 bytes")
}

#[test]
fn dest_hash_vectors() {
    let v: Value = serde_json::from_str(VECTORS).expect("json");
    let cases = v["dest_hash"].as_array().expect("array");
    assert!(cases.len() >= 4);
    for c in cases {
        let dev = hex::decode(c["developer_public_key"].as_str().expect("s")).expect("hex");
        let ns = NamespaceId::derive(c["app_bundle_id"].as_str().expect("s"), &dev);
        assert_eq!(
            hex::encode(ns.as_bytes()),
            c["namespace_id"].as_str().expect("s")
        );
        let key = X25519Public(hex32(&c["recipient_x25519_public_key"]));
        let hour = c["epoch_hour"].as_u64().expect("u64");
        let h = DestHash::derive(&ns, &key, hour);
        assert_eq!(h.to_hex(), c["dest_hash"].as_str().expect("s"), "{c}");
    }
}

#[test]
fn ed25519_to_x25519_vectors() {
    let v: Value = serde_json::from_str(VECTORS).expect("json");
    let cases = v["ed25519_to_x25519"].as_array().expect("array");
    assert!(cases.len() >= 2);
    for c in cases {
        let id = IdentityKeyPair::from_seed(&hex32(&c["ed25519_seed"]));
        assert_eq!(
            hex::encode(id.public().to_bytes()),
            c["ed25519_public_key"].as_str().expect("s")
        );
        assert_eq!(
            hex::encode(id.public().x25519().as_bytes()),
            c["x25519_public_key"].as_str().expect("s")
        );
        assert_eq!(
            hex::encode(id.x25519().to_bytes().as_ref()),
            c["x25519_private_key"].as_str().expect("s")
        );
    }
}

/// The committed copy must match the shared vectors when they are present.
#[test]
fn committed_vectors_match_shared() {
    let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/vectors/dest-hash.json");
    if let Ok(text) = std::fs::read_to_string(&shared) {
        let a: Value = serde_json::from_str(&text).expect("json");
        let b: Value = serde_json::from_str(VECTORS).expect("json");
        assert_eq!(a, b, "crypto/tests/vectors/dest-hash.json is out of date");
    }
}
