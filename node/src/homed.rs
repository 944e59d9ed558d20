//! Destination hashes homed at this relay, in memory: which hashes clients
//! registered here, until when, and on whose behalf.
//!
//! Bounded three ways so that no client can crowd out the others: each
//! connection registers at most `limits.max_hashes_per_client`, each client
//! address (IPv6: one /64) holds at most `per_owner` entries, and the table
//! at most `max`. A full table or a full share evicts the entry registered
//! least recently (the one with the earliest expiry: every registration
//! moves a hash's expiry forward) instead of refusing newcomers, so a flood
//! of random hashes from one address only churns that address's own share.
//! Pure state: time is passed in, persistence is the caller's.

use hashlink::{LinkedHashMap, LinkedHashSet};
use meshwhisper_crypto::destination::DestHash;
use std::collections::HashMap;
use std::net::IpAddr;

/// Who registered a hash: a client's address (a WebSocket's, or a libp2p
/// device connection's), or unknown (an entry loaded from the store after
/// a restart).
pub type Owner = Option<IpAddr>;

#[derive(Debug, Clone, Copy)]
struct Entry {
    exp: u64,
    owner: Owner,
}

/// What a registration changed, for the store.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Hashes new or moved forward (persist with the new expiry).
    pub remembered: Vec<DestHash>,
    /// Hashes evicted to make room (forget them in the store too).
    pub evicted: Vec<DestHash>,
}

/// The table. Entries are kept in the order of their last registration,
/// which is the order of their expiry (every registration sets it to now +
/// the TTL), in one list for the table and one per owner: eviction and
/// expiry take from the front, a registration moves an entry to the back,
/// all in O(1).
#[derive(Debug)]
pub struct HomedSet {
    entries: LinkedHashMap<DestHash, Entry>,
    by_owner: HashMap<IpAddr, LinkedHashSet<DestHash>>,
    ttl_ms: u64,
    max: usize,
    per_owner: usize,
}

/// A hash is re-persisted when its expiry moves by more than this.
const PERSIST_STEP_MS: u64 = 3_600_000;

impl HomedSet {
    /// A table keeping hashes `ttl_ms` after their last registration, at
    /// most `max` of them and `per_owner` per client address.
    pub fn new(ttl_ms: u64, max: usize, per_owner: usize) -> Self {
        Self {
            entries: LinkedHashMap::new(),
            by_owner: HashMap::new(),
            ttl_ms,
            max: max.max(1),
            per_owner: per_owner.max(1),
        }
    }

    /// The most hashes held.
    pub fn max(&self) -> usize {
        self.max
    }

    /// How long a registration keeps a hash.
    pub fn ttl_ms(&self) -> u64 {
        self.ttl_ms
    }

    /// Hashes held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries held for `owner`.
    pub fn owned_by(&self, owner: IpAddr) -> usize {
        self.by_owner.get(&owner).map_or(0, LinkedHashSet::len)
    }

    /// Whether `dest` is homed here at `now`.
    pub fn contains(&self, dest: &DestHash, now: u64) -> bool {
        self.entries.get(dest).is_some_and(|e| e.exp > now)
    }

    fn remove(&mut self, dest: &DestHash) -> Option<Entry> {
        let e = self.entries.remove(dest)?;
        if let Some(owner) = e.owner
            && let Some(set) = self.by_owner.get_mut(&owner)
        {
            set.remove(dest);
            if set.is_empty() {
                self.by_owner.remove(&owner);
            }
        }
        Some(e)
    }

    /// Adds `dest` at the back (the most recent).
    fn insert(&mut self, dest: DestHash, e: Entry) {
        if let Some(owner) = e.owner {
            self.by_owner.entry(owner).or_default().insert(dest);
        }
        self.entries.insert(dest, e);
    }

    /// Loads an entry from the store (owner unknown). Entries come newest
    /// first: each goes to the front, and beyond `max` the rest are
    /// dropped.
    pub fn load(&mut self, dest: DestHash, exp: u64) {
        if self.entries.len() >= self.max || self.entries.contains_key(&dest) {
            return;
        }
        self.entries.insert(dest, Entry { exp, owner: None });
        self.entries.to_front(&dest);
    }

    /// Registers `hashes` for `owner` at `now`.
    pub fn register(&mut self, hashes: &[DestHash], owner: Owner, now: u64) -> Changes {
        let exp = now.saturating_add(self.ttl_ms);
        let mut out = Changes::default();
        for d in hashes {
            if let Some(o) = self.remove(d)
                && o.exp.saturating_add(PERSIST_STEP_MS) >= exp
            {
                // Registered recently: refresh in memory only.
                let refreshed = Entry {
                    exp: o.exp.max(exp),
                    owner: owner.or(o.owner),
                };
                self.insert(*d, refreshed);
                continue;
            }
            // Room in this owner's share, then in the table: the least
            // recently registered go first.
            if let Some(who) = owner {
                while self.owned_by(who) >= self.per_owner {
                    let Some(&victim) = self.by_owner.get(&who).and_then(|s| s.front()) else {
                        break;
                    };
                    self.remove(&victim);
                    out.evicted.push(victim);
                }
            }
            while self.entries.len() >= self.max {
                let Some((&victim, _)) = self.entries.front() else {
                    break;
                };
                self.remove(&victim);
                out.evicted.push(victim);
            }
            self.insert(*d, Entry { exp, owner });
            out.remembered.push(*d);
        }
        out
    }

    /// Forgets what expired by `now`; returns how many.
    pub fn expire(&mut self, now: u64) -> usize {
        let mut n = 0;
        while let Some((&d, e)) = self.entries.front() {
            if e.exp > now {
                break;
            }
            self.remove(&d);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u32) -> DestHash {
        let mut d = [0u8; 8];
        d[..4].copy_from_slice(&i.to_be_bytes());
        DestHash(d)
    }

    fn ip(i: u8) -> Owner {
        Some(IpAddr::from([10, 0, 0, i]))
    }

    #[test]
    fn a_flood_from_one_address_only_churns_its_own_share() {
        let mut t = HomedSet::new(1000, 100, 10);
        let honest: Vec<DestHash> = (0..5).map(h).collect();
        t.register(&honest, ip(1), 0);
        // 1000 random hashes from another address, over time.
        for i in 0..1000u32 {
            let c = t.register(&[h(10_000 + i)], ip(2), u64::from(i));
            assert!(c.evicted.iter().all(|d| !honest.contains(d)));
        }
        assert_eq!(t.owned_by(IpAddr::from([10, 0, 0, 2])), 10);
        assert!(honest.iter().all(|d| t.contains(d, 500)));
        assert_eq!(t.len(), 15);
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_registered() {
        let mut t = HomedSet::new(10_000_000, 3, 100);
        t.register(&[h(1)], ip(1), 0);
        t.register(&[h(2)], ip(2), 4_000_000);
        t.register(&[h(3)], ip(3), 8_000_000);
        // h(1) registers again: it becomes the most recent.
        t.register(&[h(1)], ip(1), 9_000_000);
        let c = t.register(&[h(4)], ip(4), 9_500_000);
        assert_eq!(c.evicted, vec![h(2)]);
        assert_eq!(c.remembered, vec![h(4)]);
        assert!(t.contains(&h(1), 9_600_000) && !t.contains(&h(2), 9_600_000));
    }

    #[test]
    fn recent_registrations_are_not_persisted_again_and_expiry_works() {
        let mut t = HomedSet::new(10 * PERSIST_STEP_MS, 10, 10);
        assert_eq!(t.register(&[h(1)], None, 0).remembered, vec![h(1)]);
        assert!(t.register(&[h(1)], None, 1000).remembered.is_empty());
        assert_eq!(
            t.register(&[h(1)], None, 2 * PERSIST_STEP_MS).remembered,
            vec![h(1)]
        );
        assert_eq!(t.expire(20 * PERSIST_STEP_MS), 1);
        assert!(t.is_empty());
        t.load(h(5), 7);
        assert!(t.contains(&h(5), 6) && !t.contains(&h(5), 7));
    }
}
