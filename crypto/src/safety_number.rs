//! Safety numbers: 60 digits two people compare to check they hold each
//! other's real identity keys.
//!
//! Each identity key gets a 30-digit fingerprint: SHA-512 iterated
//! [`ITERATIONS`] times over a version, the key and a domain label, then the
//! first 30 bytes read as six 40-bit big-endian numbers, each reduced mod
//! 100 000 and written as 5 digits. The safety number is the two
//! fingerprints in ascending order, so both sides compute the same 60
//! digits. Iterating makes finding a key with a chosen fingerprint costly.

use crate::identity::IdentityPublic;
use crate::primitives;

/// Hash iterations per fingerprint.
pub const ITERATIONS: usize = 5200;
/// Encoding version mixed into the hash.
pub const VERSION: u16 = 1;
const DOMAIN: &[u8] = b"meshwhisper-safety-number";

/// The 30-digit fingerprint of one identity key.
pub fn fingerprint(key: &IdentityPublic) -> String {
    let key = key.to_bytes();
    let mut hash = primitives::sha512(&[&VERSION.to_be_bytes(), &key, DOMAIN]);
    for _ in 0..ITERATIONS {
        hash = primitives::sha512(&[&hash, &key]);
    }
    let mut out = String::with_capacity(30);
    for chunk in hash[..30].chunks_exact(5) {
        let v = chunk.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        out.push_str(&format!("{:05}", v % 100_000));
    }
    out
}

/// The 60-digit safety number of two identities; the same whichever order
/// they are given in.
pub fn safety_number(a: &IdentityPublic, b: &IdentityPublic) -> String {
    let (fa, fb) = (fingerprint(a), fingerprint(b));
    if fa <= fb { fa + &fb } else { fb + &fa }
}

/// The safety number in twelve groups of five digits, as people read it.
pub fn display(number: &str) -> String {
    number
        .as_bytes()
        .chunks(5)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityKeyPair;

    #[test]
    fn sixty_digits_order_independent_and_key_sensitive() {
        let a = *IdentityKeyPair::from_seed(&[1u8; 32]).public();
        let b = *IdentityKeyPair::from_seed(&[2u8; 32]).public();
        let c = *IdentityKeyPair::from_seed(&[3u8; 32]).public();
        let ab = safety_number(&a, &b);
        assert_eq!(ab.len(), 60);
        assert!(ab.bytes().all(|d| d.is_ascii_digit()));
        assert_eq!(ab, safety_number(&b, &a));
        assert_ne!(ab, safety_number(&a, &c));
        assert_eq!(display(&ab).split(' ').count(), 12);
    }
}
