//! Pushing changed address records along open streams.
//!
//! Gossip carries a record to most relays within a second, but a small
//! gossip mesh can miss a relay, which then waits for an anti-entropy round
//! (up to `anti_entropy_ms`). A *changed* record (one that replaced an
//! older record of the same relay: it restarted on a new address) is also
//! sent, once, straight to every relay with an open stream except the one it
//! came from; each relay that stores it as a change does the same, so it
//! floods the graph of open streams in a few hops. Records that are merely
//! new to us (a mesh forming) are not pushed: anti-entropy already walks
//! those, and pushing them would cost a record per edge per relay.
//!
//! Our own record is pushed when it changes and to every relay whose stream
//! opens (it may have missed the change while we were away).
//!
//! Bounded: one push per relay key per [`PUSH_EVERY_MS`] (a relay that
//! re-signs its record in a loop cannot make the mesh flood it), and at most
//! [`MAX_REMEMBERED`] keys remembered.

use super::action::Action;
use bytes::Bytes;
use libp2p::PeerId;
use meshwhisper_behaviour::federation::codec::Frame;
use std::collections::HashMap;

/// The request id of a `Records` frame nobody asked for (anti-entropy's
/// requests count from 1).
pub const PUSHED: u64 = 0;

/// The shortest interval between two pushes of the same relay's record.
pub const PUSH_EVERY_MS: u64 = 5_000;

/// Relay keys whose last push is remembered; beyond this, the oldest are
/// forgotten (a forgotten key may be pushed again sooner).
pub const MAX_REMEMBERED: usize = 4096;

/// The push state.
#[derive(Debug, Default)]
pub struct Announce {
    /// When each relay's record was last pushed.
    pushed: HashMap<[u8; 32], u64>,
}

impl Announce {
    /// Records that replaced older ones (key, encoded), learned from `from`:
    /// each goes to every peer but `from`, unless pushed lately. How many
    /// were pushed.
    pub fn changed(
        &mut self,
        now: u64,
        from: Option<PeerId>,
        records: Vec<([u8; 32], Bytes)>,
        peers: &[PeerId],
        out: &mut Vec<Action>,
    ) -> usize {
        let fresh: Vec<Bytes> = records
            .into_iter()
            .filter(|(key, _)| self.due(now, *key))
            .map(|(_, r)| r)
            .collect();
        if fresh.is_empty() {
            return 0;
        }
        for peer in peers.iter().filter(|p| Some(**p) != from) {
            out.push(Action::Send {
                peer: *peer,
                frame: Frame::Records {
                    req: PUSHED,
                    records: fresh.clone(),
                },
            });
        }
        fresh.len()
    }

    /// Our own record changed: to every peer (not rate-limited: it is ours).
    pub fn own(&mut self, record: Bytes, peers: &[PeerId], out: &mut Vec<Action>) {
        for peer in peers {
            Self::own_to(record.clone(), *peer, out);
        }
    }

    /// Our own record to one peer (its stream just opened).
    pub fn own_to(record: Bytes, peer: PeerId, out: &mut Vec<Action>) {
        out.push(Action::Send {
            peer,
            frame: Frame::Records {
                req: PUSHED,
                records: vec![record],
            },
        });
    }

    /// Whether `key`'s record may be pushed now (and note that it is).
    fn due(&mut self, now: u64, key: [u8; 32]) -> bool {
        if let Some(last) = self.pushed.get(&key)
            && now.saturating_sub(*last) < PUSH_EVERY_MS
        {
            return false;
        }
        if self.pushed.len() >= MAX_REMEMBERED && !self.pushed.contains_key(&key) {
            self.evict(now);
        }
        self.pushed.insert(key, now);
        true
    }

    /// Forgets pushes older than [`PUSH_EVERY_MS`]; if all are recent,
    /// the oldest half.
    fn evict(&mut self, now: u64) {
        self.pushed
            .retain(|_, t| now.saturating_sub(*t) < PUSH_EVERY_MS);
        if self.pushed.len() >= MAX_REMEMBERED {
            let mut times: Vec<u64> = self.pushed.values().copied().collect();
            times.sort_unstable();
            let cut = times[times.len() / 2];
            self.pushed.retain(|_, t| *t > cut);
        }
    }

    /// Keys remembered (for tests and metrics).
    pub fn remembered(&self) -> usize {
        self.pushed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(out: &[Action]) -> Vec<(PeerId, usize)> {
        out.iter()
            .filter_map(|a| match a {
                Action::Send {
                    peer,
                    frame: Frame::Records { records, .. },
                } => Some((*peer, records.len())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_change_goes_to_every_peer_but_its_source_once_per_interval() {
        let peers: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        let mut a = Announce::default();
        let mut out = Vec::new();
        let rec = ([7; 32], Bytes::from_static(b"r1"));
        a.changed(1000, Some(peers[0]), vec![rec.clone()], &peers, &mut out);
        assert_eq!(sent(&out), vec![(peers[1], 1), (peers[2], 1)]);
        out.clear();
        // The same relay changing again at once: not pushed again.
        a.changed(
            1000 + PUSH_EVERY_MS - 1,
            None,
            vec![rec.clone()],
            &peers,
            &mut out,
        );
        assert!(out.is_empty());
        // Another relay's change is.
        a.changed(
            2000,
            None,
            vec![([8; 32], Bytes::from_static(b"r2"))],
            &peers,
            &mut out,
        );
        assert_eq!(sent(&out).len(), 3);
        out.clear();
        a.changed(1000 + PUSH_EVERY_MS, None, vec![rec], &peers, &mut out);
        assert_eq!(sent(&out).len(), 3, "due again after the interval");
    }

    #[test]
    fn own_record_goes_to_every_peer_without_limit() {
        let peers: Vec<PeerId> = (0..2).map(|_| PeerId::random()).collect();
        let mut a = Announce::default();
        let mut out = Vec::new();
        a.own(Bytes::from_static(b"me"), &peers, &mut out);
        a.own(Bytes::from_static(b"me"), &peers, &mut out);
        assert_eq!(sent(&out).len(), 4);
    }

    #[test]
    fn remembered_keys_stay_bounded() {
        let mut a = Announce::default();
        let mut out = Vec::new();
        for i in 0..(3 * MAX_REMEMBERED as u32) {
            let mut k = [0; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            a.changed(u64::from(i), None, vec![(k, Bytes::new())], &[], &mut out);
            assert!(a.remembered() <= MAX_REMEMBERED);
        }
    }
}
