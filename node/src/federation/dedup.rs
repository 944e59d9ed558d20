//! Floods seen recently, so a flood never loops and its `Stored` ack finds
//! its way back.
//!
//! A flood is one attempt of one packet: relays drop a repeat of the same
//! (id, attempt) and remember who sent it to them, so the home relay's
//! `Stored` ack travels back hop by hop. The home relay itself does not
//! rely on this: it stores an id once however often it comes (the store's
//! federated ids). Bounded by count and age.

use foldhash::{HashMap, HashMapExt as _};
use libp2p::PeerId;
use meshwhisper_behaviour::federation::codec::PacketId;
use std::collections::VecDeque;

/// One flood attempt: the packet id and which flood of it (attempts
/// beyond 31 count as 31).
pub type FloodKey = (PacketId, u8);

/// What we know of a packet's floods.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// When it was first seen.
    at_ms: u64,
    /// Attempts seen (bit n: attempt n).
    attempts: u32,
    /// Who sent it to us first (`None`: we started it).
    upstream: Option<PeerId>,
    /// A `Stored` ack already went upstream.
    acked: bool,
}

/// Floods seen, bounded by count and age.
#[derive(Debug)]
pub struct Dedup {
    map: HashMap<PacketId, Seen>,
    order: VecDeque<(PacketId, u64)>,
    max: usize,
    ttl_ms: u64,
}

fn bit(attempt: u8) -> u32 {
    1 << attempt.min(31)
}

impl Dedup {
    /// At most `max` packets, each for `ttl_ms`.
    pub fn new(max: usize, ttl_ms: u64) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            max: max.max(1),
            ttl_ms,
        }
    }

    /// Drops what is too old, or beyond the count.
    pub fn evict(&mut self, now: u64) {
        while let Some(&(id, at)) = self.order.front() {
            if self.order.len() > self.max || at + self.ttl_ms <= now {
                self.order.pop_front();
                if self.map.get(&id).is_some_and(|s| s.at_ms == at) {
                    self.map.remove(&id);
                }
            } else {
                break;
            }
        }
    }

    /// Records a flood attempt; false if that attempt was seen already.
    pub fn insert(&mut self, (id, attempt): FloodKey, upstream: Option<PeerId>, now: u64) -> bool {
        if let Some(s) = self.map.get_mut(&id) {
            if s.attempts & bit(attempt) != 0 {
                return false;
            }
            s.attempts |= bit(attempt);
            return true;
        }
        self.map.insert(
            id,
            Seen {
                at_ms: now,
                attempts: bit(attempt),
                upstream,
                acked: false,
            },
        );
        self.order.push_back((id, now));
        self.evict(now);
        true
    }

    /// The first time a `Stored` ack for `id` passes here: where to send
    /// it on (`None` if we started it, already sent it on, or forgot it).
    pub fn ack_upstream(&mut self, id: &PacketId) -> Option<PeerId> {
        let s = self.map.get_mut(id)?;
        if s.acked {
            return None;
        }
        s.acked = true;
        s.upstream
    }

    /// Forgets an attempt that was refused (so its retry is let through).
    pub fn remove(&mut self, (id, attempt): &FloodKey) {
        if let Some(s) = self.map.get_mut(id) {
            s.attempts &= !bit(*attempt);
        }
    }

    /// Packets remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none are remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_of_an_attempt_are_dropped_other_attempts_pass() {
        let mut d = Dedup::new(10, 1000);
        let p = PeerId::random();
        assert!(d.insert(([1; 16], 0), Some(p), 0));
        assert!(!d.insert(([1; 16], 0), None, 1), "a repeat");
        assert!(d.insert(([1; 16], 1), None, 2), "a re-flood");
        // The Stored ack goes upstream once.
        assert_eq!(d.ack_upstream(&[1; 16]), Some(p));
        assert_eq!(d.ack_upstream(&[1; 16]), None);
    }

    #[test]
    fn bounded_by_count_and_age() {
        let mut d = Dedup::new(3, 100);
        for i in 0..5u8 {
            d.insert(([i; 16], 0), None, u64::from(i));
        }
        assert_eq!(d.len(), 3);
        d.evict(200);
        assert!(d.is_empty());
    }
}
