//! What a relay carries on for others (transit frames, onion layers), each
//! kept until the next relay answers: sent at once over an open stream or
//! when one opens, counted per relay it came from (the callers bound the
//! table in all and per relay), and handed back for a refusal upstream
//! when no answer comes in time. Pure state.

use super::action::Action;
use foldhash::{HashMap, HashMapExt as _};
use libp2p::PeerId;
use meshwhisper_behaviour::federation::codec::Frame;
use std::hash::Hash;

/// One frame carried on.
#[derive(Debug)]
pub struct Entry<E> {
    /// The relay it came from (the answer goes back there).
    pub upstream: PeerId,
    /// The relay it goes to (the answer comes from there).
    pub to: PeerId,
    /// What goes to `to`.
    pub frame: Frame,
    /// When it is given up.
    pub deadline_ms: u64,
    /// Sent on the current stream to `to`.
    pub sent: bool,
    /// What the caller needs to answer upstream.
    pub extra: E,
}

/// Frames carried, by the key their answer names.
#[derive(Debug)]
pub struct Carried<K, E> {
    entries: HashMap<K, Entry<E>>,
    per_peer: HashMap<PeerId, usize>,
}

impl<K: Hash + Eq + Copy, E> Default for Carried<K, E> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            per_peer: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Copy, E> Carried<K, E> {
    /// Frames carried now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is carried.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Frames carried for `peer`.
    pub fn from(&self, peer: &PeerId) -> usize {
        self.per_peer.get(peer).copied().unwrap_or(0)
    }

    /// Carries `entry.frame` to `entry.to`: sent now if a stream to it is
    /// `open`, else reached first. Whether it is new (not a resend of one
    /// carried already).
    pub fn carry(
        &mut self,
        key: K,
        mut entry: Entry<E>,
        open: bool,
        out: &mut Vec<Action>,
    ) -> bool {
        entry.sent = open;
        out.push(if open {
            Action::Send {
                peer: entry.to,
                frame: entry.frame.clone(),
            }
        } else {
            Action::Reach(entry.to)
        });
        *self.per_peer.entry(entry.upstream).or_default() += 1;
        match self.entries.insert(key, entry) {
            Some(old) => {
                self.release(old.upstream);
                false
            }
            None => true,
        }
    }

    fn release(&mut self, upstream: PeerId) {
        if let Some(n) = self.per_peer.get_mut(&upstream) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_peer.remove(&upstream);
            }
        }
    }

    /// Whether `key` was carried to `from` (its answer comes from there).
    pub fn awaits(&self, key: &K, from: &PeerId) -> bool {
        self.entries.get(key).is_some_and(|e| e.to == *from)
    }

    /// The entry `from` answered, taken out.
    pub fn answered(&mut self, key: &K, from: &PeerId) -> Option<Entry<E>> {
        if !self.awaits(key, from) {
            return None;
        }
        let e = self.entries.remove(key)?;
        self.release(e.upstream);
        Some(e)
    }

    /// A stream to `peer` opened: what waits for it goes now.
    pub fn stream_opened(&mut self, peer: PeerId, out: &mut Vec<Action>) {
        for e in self.entries.values_mut() {
            if e.to == peer && !e.sent {
                e.sent = true;
                out.push(Action::Send {
                    peer,
                    frame: e.frame.clone(),
                });
            }
        }
    }

    /// A stream to `peer` closed: what went on it goes again on the next.
    pub fn stream_closed(&mut self, peer: PeerId) {
        for e in self.entries.values_mut() {
            if e.to == peer {
                e.sent = false;
            }
        }
    }

    /// The entries past their deadline, taken out.
    pub fn expired(&mut self, now: u64) -> Vec<(K, Entry<E>)> {
        let late: Vec<K> = self
            .entries
            .iter()
            .filter(|(_, e)| e.deadline_ms <= now)
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::with_capacity(late.len());
        for k in late {
            if let Some(e) = self.entries.remove(&k) {
                self.release(e.upstream);
                out.push((k, e));
            }
        }
        out
    }
}
