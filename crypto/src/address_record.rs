//! A relay's signed, self-certifying address record.
//!
//! Relays find each other by key, never by DNS: each relay signs a record
//! naming its listen addresses (opaque bytes; multiaddrs in practice), up to
//! 16 *anchor* relays that can reach it when it is behind NAT, its X25519
//! onion key and a timestamp. Anyone holding the record can check it came
//! from the key it describes. Among records of one relay the newest wins.
//!
//! Encoding (big-endian), the signed part first:
//!
//! ```text
//! version (1) = 0x01
//! relay key (32)        Ed25519
//! timestamp (8)         unix ms
//! onion key (32)        X25519
//! address count (1)     ≤ 16, then per address: length (1, 1..=200) ‖ bytes
//! anchor count (1)      ≤ 16, then 32 bytes per anchor key
//! signature (64)        Ed25519 over "meshwhisper/address-record/v1\0" ‖ all of the above
//! ```
//!
//! Decoding is strict (no trailing bytes, no duplicate anchors, bounded
//! sizes) so every record has exactly one encoding.

use crate::identity::IdentityKeyPair;
use crate::primitives::{Ed25519Public, X25519Public};
use crate::wire::{DecodeError, Reader, Writer as _};

/// Domain separation prefix of the signed bytes.
pub const SIGNING_DOMAIN: &[u8] = b"meshwhisper/address-record/v1\0";
/// The encoding version this module writes and reads.
pub const VERSION: u8 = 1;
/// Most listen addresses in one record.
pub const MAX_ADDRS: usize = 16;
/// Longest single address, in bytes.
pub const MAX_ADDR_LEN: usize = 200;
/// Most anchor relays in one record.
pub const MAX_ANCHORS: usize = 16;
/// Largest encoded record: a record at every bound fits.
pub const MAX_ENCODED_LEN: usize =
    1 + 32 + 8 + 32 + 1 + MAX_ADDRS * (1 + MAX_ADDR_LEN) + 1 + MAX_ANCHORS * 32 + 64;
/// Records older than this (relative to `now`) are refused.
pub const MAX_AGE_MS: u64 = 7 * 24 * 3_600_000;
/// Records dated further than this into the future are refused.
pub const MAX_FUTURE_SKEW_MS: u64 = 60_000;

/// Why a record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The bytes are not a well-formed record.
    #[error("malformed address record: {0}")]
    Malformed(#[from] DecodeError),
    /// The relay key is not a valid Ed25519 point.
    #[error("address record relay key is invalid")]
    BadKey,
    /// The signature does not verify under the record's relay key.
    #[error("address record signature is invalid")]
    BadSignature,
    /// The record is older than [`MAX_AGE_MS`].
    #[error("address record is stale: {age_ms} ms old")]
    Stale {
        /// How old it is.
        age_ms: u64,
    },
    /// The record is dated more than [`MAX_FUTURE_SKEW_MS`] ahead.
    #[error("address record is {ahead_ms} ms in the future")]
    FromFuture {
        /// How far ahead of `now` it is.
        ahead_ms: u64,
    },
}

impl Error {
    /// A short stable label, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Malformed(_) => "malformed",
            Error::BadKey => "bad_key",
            Error::BadSignature => "bad_signature",
            Error::Stale { .. } => "stale",
            Error::FromFuture { .. } => "future",
        }
    }
}

/// What a relay says about itself, before signing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    /// When the record was made, unix ms.
    pub timestamp_ms: u64,
    /// The X25519 key that opens onion layers addressed to this relay.
    pub onion_key: X25519Public,
    /// Listen addresses (opaque bytes, e.g. binary multiaddrs).
    pub addrs: Vec<Vec<u8>>,
    /// Ed25519 keys of relays through which this relay can be reached.
    pub anchors: Vec<[u8; 32]>,
}

impl Contents {
    fn check_bounds(&self) -> Result<(), DecodeError> {
        if self.addrs.len() > MAX_ADDRS {
            return Err(DecodeError::TooLarge {
                what: "address count",
                got: self.addrs.len(),
                max: MAX_ADDRS,
            });
        }
        for a in &self.addrs {
            if a.is_empty() || a.len() > MAX_ADDR_LEN {
                return Err(DecodeError::Invalid {
                    what: "address",
                    why: "length must be 1..=200",
                });
            }
        }
        if self.anchors.len() > MAX_ANCHORS {
            return Err(DecodeError::TooLarge {
                what: "anchor count",
                got: self.anchors.len(),
                max: MAX_ANCHORS,
            });
        }
        for (i, a) in self.anchors.iter().enumerate() {
            if self.anchors[..i].contains(a) {
                return Err(DecodeError::Invalid {
                    what: "anchors",
                    why: "duplicate anchor key",
                });
            }
        }
        Ok(())
    }
}

/// A verified address record. Values of this type exist only with a valid
/// signature: [`AddressRecord::sign`] makes one, [`AddressRecord::decode`]
/// checks one.
#[derive(Clone, PartialEq, Eq)]
pub struct AddressRecord {
    relay_key: Ed25519Public,
    contents: Contents,
    signature: [u8; 64],
}

impl AddressRecord {
    /// Signs `contents` as `relay`'s record.
    pub fn sign(relay: &IdentityKeyPair, contents: Contents) -> Result<Self, Error> {
        contents.check_bounds()?;
        let relay_key = *relay.public().ed25519();
        let body = encode_body(&relay_key, &contents);
        let signature = relay.sign(&signed_message(&body));
        Ok(Self {
            relay_key,
            contents,
            signature,
        })
    }

    /// The relay key and timestamp an encoded record claims, read without
    /// verifying anything: only for skipping a record that is no newer than
    /// one already verified (`None`: too short or an unknown version).
    pub fn peek(bytes: &[u8]) -> Option<([u8; 32], u64)> {
        if bytes.first() != Some(&VERSION) {
            return None;
        }
        let key: [u8; 32] = bytes.get(1..33)?.try_into().ok()?;
        let ts: [u8; 8] = bytes.get(33..41)?.try_into().ok()?;
        Some((key, u64::from_be_bytes(ts)))
    }

    /// Parses and verifies the signature. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() > MAX_ENCODED_LEN {
            return Err(DecodeError::TooLarge {
                what: "address record",
                got: bytes.len(),
                max: MAX_ENCODED_LEN,
            }
            .into());
        }
        let mut r = Reader::new(bytes);
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(DecodeError::Invalid {
                what: "version",
                why: "unknown address record version",
            }
            .into());
        }
        let key_bytes: [u8; 32] = r.array("relay key")?;
        let timestamp_ms = r.u64("timestamp")?;
        let onion_key = X25519Public(r.array("onion key")?);
        let n_addrs = r.u8("address count")? as usize;
        if n_addrs > MAX_ADDRS {
            return Err(DecodeError::TooLarge {
                what: "address count",
                got: n_addrs,
                max: MAX_ADDRS,
            }
            .into());
        }
        let mut addrs = Vec::with_capacity(n_addrs);
        for _ in 0..n_addrs {
            let len = r.u8("address length")? as usize;
            addrs.push(r.take("address", len)?.to_vec());
        }
        let n_anchors = r.u8("anchor count")? as usize;
        if n_anchors > MAX_ANCHORS {
            return Err(DecodeError::TooLarge {
                what: "anchor count",
                got: n_anchors,
                max: MAX_ANCHORS,
            }
            .into());
        }
        let mut anchors = Vec::with_capacity(n_anchors);
        for _ in 0..n_anchors {
            anchors.push(r.array::<32>("anchor key")?);
        }
        let signature: [u8; 64] = r.array("signature")?;
        r.finish()?;
        let contents = Contents {
            timestamp_ms,
            onion_key,
            addrs,
            anchors,
        };
        contents.check_bounds()?;
        let relay_key = Ed25519Public::from_bytes(&key_bytes).map_err(|_| Error::BadKey)?;
        let body_len = bytes.len() - 64;
        relay_key
            .verify(&signed_message(&bytes[..body_len]), &signature)
            .map_err(|_| Error::BadSignature)?;
        Ok(Self {
            relay_key,
            contents,
            signature,
        })
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = encode_body(&self.relay_key, &self.contents);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Checks the timestamp against `now_ms`: refuses records older than
    /// seven days or more than 60 s in the future.
    pub fn check_fresh(&self, now_ms: u64) -> Result<(), Error> {
        let ts = self.contents.timestamp_ms;
        if ts > now_ms.saturating_add(MAX_FUTURE_SKEW_MS) {
            return Err(Error::FromFuture {
                ahead_ms: ts - now_ms,
            });
        }
        let age_ms = now_ms.saturating_sub(ts);
        if age_ms > MAX_AGE_MS {
            return Err(Error::Stale { age_ms });
        }
        Ok(())
    }

    /// Decodes, verifies and checks freshness in one step: what a relay does
    /// with a record it receives.
    pub fn accept(bytes: &[u8], now_ms: u64) -> Result<Self, Error> {
        let record = Self::decode(bytes)?;
        record.check_fresh(now_ms)?;
        Ok(record)
    }

    /// Last-writer-wins: whether `self` should replace `other`. Only records
    /// of the same relay compare; a newer timestamp wins and equal
    /// timestamps are broken by the encoding, so every relay picks the same
    /// winner whatever the order it heard them in.
    pub fn supersedes(&self, other: &AddressRecord) -> bool {
        if self.relay_key != other.relay_key {
            return false;
        }
        self.supersedes_encoded(other.contents.timestamp_ms, &other.encode())
    }

    /// [`AddressRecord::supersedes`] against a stored record of the same
    /// relay given by its timestamp and encoding (no signature check: for
    /// stores that verified it when it was written).
    pub fn supersedes_encoded(&self, other_timestamp_ms: u64, other_encoding: &[u8]) -> bool {
        match self.contents.timestamp_ms.cmp(&other_timestamp_ms) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => self.encode().as_slice() > other_encoding,
        }
    }

    /// The relay's Ed25519 key.
    pub fn relay_key(&self) -> &Ed25519Public {
        &self.relay_key
    }

    /// What the record says.
    pub fn contents(&self) -> &Contents {
        &self.contents
    }

    /// When it was signed, unix ms.
    pub fn timestamp_ms(&self) -> u64 {
        self.contents.timestamp_ms
    }

    /// The onion key.
    pub fn onion_key(&self) -> &X25519Public {
        &self.contents.onion_key
    }

    /// The listen addresses.
    pub fn addrs(&self) -> &[Vec<u8>] {
        &self.contents.addrs
    }

    /// The anchor relay keys.
    pub fn anchors(&self) -> &[[u8; 32]] {
        &self.contents.anchors
    }
}

impl std::fmt::Debug for AddressRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressRecord")
            .field("relay_key", &self.relay_key)
            .field("timestamp_ms", &self.contents.timestamp_ms)
            .field("addrs", &self.contents.addrs.len())
            .field("anchors", &self.contents.anchors.len())
            .finish()
    }
}

fn encode_body(relay_key: &Ed25519Public, c: &Contents) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.push(VERSION);
    out.extend_from_slice(relay_key.as_bytes());
    out.put_u64(c.timestamp_ms);
    out.extend_from_slice(c.onion_key.as_bytes());
    // Bounds were checked before any record value exists.
    out.push(c.addrs.len() as u8);
    for a in &c.addrs {
        out.push(a.len() as u8);
        out.extend_from_slice(a);
    }
    out.push(c.anchors.len() as u8);
    for a in &c.anchors {
        out.extend_from_slice(a);
    }
    out
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_DOMAIN.len() + body.len());
    m.extend_from_slice(SIGNING_DOMAIN);
    m.extend_from_slice(body);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(ts: u64) -> Contents {
        Contents {
            timestamp_ms: ts,
            onion_key: X25519Public([9u8; 32]),
            addrs: vec![b"/ip4/127.0.0.1/tcp/4001".to_vec(), vec![4, 127, 0, 0, 1]],
            anchors: vec![[1u8; 32], [2u8; 32]],
        }
    }

    #[test]
    fn round_trip() {
        let id = IdentityKeyPair::from_seed(&[5u8; 32]);
        let rec = AddressRecord::sign(&id, contents(1_000)).expect("sign");
        let bytes = rec.encode();
        let back = AddressRecord::decode(&bytes).expect("decode");
        assert_eq!(back, rec);
        assert_eq!(back.encode(), bytes);
        assert_eq!(
            AddressRecord::peek(&bytes),
            Some((id.public().to_bytes(), 1_000))
        );
        assert_eq!(AddressRecord::peek(&bytes[..40]), None);
        assert_eq!(AddressRecord::peek(&[]), None);
    }

    #[test]
    fn every_flipped_bit_is_rejected() {
        let id = IdentityKeyPair::from_seed(&[5u8; 32]);
        let bytes = AddressRecord::sign(&id, contents(1_000))
            .expect("sign")
            .encode();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(AddressRecord::decode(&b).is_err(), "bit {i} accepted");
        }
    }

    #[test]
    fn freshness_window() {
        let id = IdentityKeyPair::from_seed(&[5u8; 32]);
        let now = 10 * MAX_AGE_MS;
        let ok = AddressRecord::sign(&id, contents(now - MAX_AGE_MS)).expect("sign");
        assert!(ok.check_fresh(now).is_ok());
        let stale = AddressRecord::sign(&id, contents(now - MAX_AGE_MS - 1)).expect("sign");
        assert_eq!(stale.check_fresh(now).map_err(|e| e.kind()), Err("stale"));
        let edge = AddressRecord::sign(&id, contents(now + MAX_FUTURE_SKEW_MS)).expect("sign");
        assert!(edge.check_fresh(now).is_ok());
        let future = AddressRecord::sign(&id, contents(now + MAX_FUTURE_SKEW_MS + 1)).expect("s");
        assert_eq!(future.check_fresh(now).map_err(|e| e.kind()), Err("future"));
        assert!(AddressRecord::accept(&future.encode(), now).is_err());
        assert!(AddressRecord::accept(&ok.encode(), now).is_ok());
    }

    #[test]
    fn last_writer_wins() {
        let id = IdentityKeyPair::from_seed(&[5u8; 32]);
        let old = AddressRecord::sign(&id, contents(1)).expect("sign");
        let new = AddressRecord::sign(&id, contents(2)).expect("sign");
        assert!(new.supersedes(&old));
        assert!(!old.supersedes(&new));
        assert!(!new.supersedes(&new));
        let mut c = contents(2);
        c.addrs.pop();
        let twin = AddressRecord::sign(&id, c).expect("sign");
        assert!(twin.supersedes(&new) != new.supersedes(&twin));
        let other = AddressRecord::sign(&IdentityKeyPair::from_seed(&[6u8; 32]), contents(9))
            .expect("sign");
        assert!(!other.supersedes(&old));
    }

    #[test]
    fn bounds_are_enforced() {
        let id = IdentityKeyPair::from_seed(&[5u8; 32]);
        let mut c = contents(1);
        c.addrs = vec![vec![1u8; MAX_ADDR_LEN]; MAX_ADDRS];
        c.anchors = (0..MAX_ANCHORS as u8).map(|i| [i; 32]).collect();
        let max = AddressRecord::sign(&id, c.clone()).expect("at bounds");
        assert_eq!(max.encode().len(), MAX_ENCODED_LEN);
        let mut too_many = c.clone();
        too_many.anchors.push([0xaa; 32]);
        assert!(AddressRecord::sign(&id, too_many).is_err());
        let mut dup = contents(1);
        dup.anchors = vec![[1u8; 32], [1u8; 32]];
        assert!(AddressRecord::sign(&id, dup).is_err());
        let mut long = contents(1);
        long.addrs = vec![vec![0u8; MAX_ADDR_LEN + 1]];
        assert!(AddressRecord::sign(&id, long).is_err());
        let mut oversize = max.encode();
        oversize.push(0);
        assert!(AddressRecord::decode(&oversize).is_err());
    }
}
