//! Who may add unsigned one-time prekeys to an identity's pool.
//!
//! The JavaScript SDK uploads one-time prekeys (`POST /opks`) with nothing
//! that proves it holds the identity key, and on its first start it does so
//! *before* it publishes its bundle. Anyone who knows a public key could
//! otherwise fill that identity's pool with junk, and every junk key breaks
//! one first contact. So, as far as the protocol allows, the pool is bound
//! to whoever publishes the identity's bundle (whose identity key must be
//! the registered key, see `check_bundle`):
//!
//! - an upload for an identity with a bundle is accepted only from the
//!   address that last published that bundle, within [`PUBLISHER_MS`];
//! - an upload for an identity without a bundle is parked (not claimable)
//!   and promoted when the first bundle for it arrives from the same
//!   address within [`PARK_MS`]; otherwise it is dropped.
//!
//! What remains: someone on the same address as the owner (a shared NAT)
//! who also knows the key can still add keys; an owner whose address
//! changed since its last publish has its uploads refused until it
//! publishes again (the SDK publishes at every start). Native clients sign
//! their batches and are not affected. Pure state: time is passed in.

use crate::gateway::ratelimit::client_key;
use std::net::IpAddr;

/// How long the last publisher of a bundle may add keys.
pub const PUBLISHER_MS: u64 = 24 * 3_600_000;
/// How long parked keys wait for their bundle.
pub const PARK_MS: u64 = 5 * 60_000;

type Key = (String, String);

#[derive(Debug)]
struct Parked {
    ip: IpAddr,
    at: u64,
    keys: Vec<Vec<u8>>,
}

/// What to do with an upload.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Store the keys.
    Accept,
    /// Kept aside until the identity's bundle is published.
    Parked,
    /// Refused (a reason for the client).
    Refuse(&'static str),
}

/// Publishers and parked uploads, bounded (least recently used go first).
#[derive(Debug)]
pub struct OpkBinding {
    publishers: hashlink::LruCache<Key, (IpAddr, u64)>,
    parked: hashlink::LruCache<Key, Parked>,
    max_parked_keys: usize,
}

impl OpkBinding {
    /// Remembers at most `max_identities` publishers and parked uploads,
    /// each parked upload at most `max_parked_keys` keys.
    pub fn new(max_identities: usize, max_parked_keys: usize) -> Self {
        Self {
            publishers: hashlink::LruCache::new(max_identities.max(1)),
            parked: hashlink::LruCache::new(max_identities.max(1)),
            max_parked_keys: max_parked_keys.max(1),
        }
    }

    /// A bundle for (`ns`, `pk`) was published from `ip`: it may add keys
    /// from now on. Returns the keys parked for it from that address.
    pub fn published(&mut self, ns: &str, pk: &str, ip: IpAddr, now: u64) -> Vec<Vec<u8>> {
        let key = (ns.to_string(), pk.to_string());
        let ip = client_key(ip.to_canonical());
        self.publishers.insert(key.clone(), (ip, now));
        match self.parked.remove(&key) {
            Some(p) if p.ip == ip && now.saturating_sub(p.at) <= PARK_MS => p.keys,
            _ => Vec::new(),
        }
    }

    /// An unsigned upload of `keys` for (`ns`, `pk`) from `ip`;
    /// `has_bundle`: whether the identity has a bundle here.
    pub fn upload(
        &mut self,
        ns: &str,
        pk: &str,
        ip: IpAddr,
        now: u64,
        has_bundle: bool,
        keys: Vec<Vec<u8>>,
    ) -> Decision {
        let key = (ns.to_string(), pk.to_string());
        let ip = client_key(ip.to_canonical());
        if has_bundle {
            return match self.publishers.get(&key) {
                Some((who, at)) if *who == ip && now.saturating_sub(*at) <= PUBLISHER_MS => {
                    Decision::Accept
                }
                _ => Decision::Refuse(
                    "one-time prekeys are accepted only from the address that published this identity's bundle; publish it again first",
                ),
            };
        }
        let max = self.max_parked_keys;
        match self.parked.get_mut(&key) {
            Some(p) if p.ip == ip && now.saturating_sub(p.at) <= PARK_MS => {
                let room = max.saturating_sub(p.keys.len());
                p.keys.extend(keys.into_iter().take(room));
            }
            // Someone else's (or a stale) parked upload: the newest wins,
            // so a squatter cannot lock the owner's first upload out.
            _ => {
                self.parked.insert(
                    key,
                    Parked {
                        ip,
                        at: now,
                        keys: keys.into_iter().take(max).collect(),
                    },
                );
            }
        }
        Decision::Parked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(i: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, i])
    }

    #[test]
    fn keys_uploaded_before_the_bundle_are_promoted_for_the_same_address() {
        let mut b = OpkBinding::new(100, 10);
        assert_eq!(
            b.upload("ns", "k", ip(1), 0, false, vec![vec![1]; 3]),
            Decision::Parked
        );
        assert_eq!(
            b.upload("ns", "k", ip(1), 10, false, vec![vec![2]; 20]),
            Decision::Parked
        );
        assert_eq!(b.published("ns", "k", ip(1), 1000).len(), 10, "bounded");
        // Later uploads from the publisher are accepted, others refused.
        assert_eq!(
            b.upload("ns", "k", ip(1), 2000, true, vec![]),
            Decision::Accept
        );
        assert!(matches!(
            b.upload("ns", "k", ip(2), 2000, true, vec![]),
            Decision::Refuse(_)
        ));
        assert!(matches!(
            b.upload("ns", "k", ip(1), 2000 + PUBLISHER_MS + 1, true, vec![]),
            Decision::Refuse(_)
        ));
    }

    #[test]
    fn parked_keys_from_another_address_or_too_old_are_dropped() {
        let mut b = OpkBinding::new(100, 10);
        b.upload("ns", "k", ip(2), 0, false, vec![vec![9]; 5]);
        assert!(
            b.published("ns", "k", ip(1), 10).is_empty(),
            "another address"
        );
        b.upload("ns", "j", ip(1), 0, false, vec![vec![9]; 5]);
        assert!(
            b.published("ns", "j", ip(1), PARK_MS + 1).is_empty(),
            "too old"
        );
        // A squatter's parked keys are replaced by the owner's upload.
        b.upload("ns", "m", ip(2), 0, false, vec![vec![6]; 5]);
        b.upload("ns", "m", ip(1), 1, false, vec![vec![7]; 2]);
        assert_eq!(b.published("ns", "m", ip(1), 2), vec![vec![7]; 2]);
    }
}
