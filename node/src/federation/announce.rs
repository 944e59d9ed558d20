//! Pushing news along open streams.
//!
//! Gossip carries a record to most relays within a second, but a small
//! gossip mesh can miss a relay, which then waits for an anti-entropy round
//! (up to `anti_entropy_ms`), and while a mesh forms its gossip mesh is not
//! there yet. So two kinds of news also go straight to every relay with an
//! open stream (but the one they came from), once per relay that learns
//! them:
//!
//! - a **change**: a record that replaced an older one of the same relay
//!   (it restarted on a new address). Each relay that stores it as a change
//!   does the same, so it floods the graph of open streams in a few hops;
//!   changes are rare.
//! - an **introduction**: a relay sends its own record to its bootstrap
//!   relays as `Records` with request id [`INTRODUCE`]; a bootstrap relay
//!   passes a valid record of the relay itself (not of others) on to all
//!   its peers at once, whether it knew it already or not, so a relay
//!   joining a forming mesh is known to everyone its bootstrap knows in one
//!   hop. Only the bootstrap passes it on: if every relay that met a
//!   newcomer told all its peers, each record would cross every edge of
//!   the mesh once per relay.
//!
//! A relay sends its own record to every relay whose stream opens (it may
//! have missed a change while we were away) and to all of them when its
//! addresses change. Records merely new to us (we just joined) are not
//! pushed: anti-entropy walks those.
//!
//! Bounded: one push per relay key per [`PUSH_EVERY_MS`] (a relay that
//! re-signs its record in a loop cannot make the mesh flood it), and at most
//! [`MAX_REMEMBERED`] keys remembered.

use super::action::Action;
use bytes::Bytes;
use libp2p::PeerId;
use meshwhisper_behaviour::federation::codec::Frame;
use meshwhisper_behaviour::relay_key::RelayKey;
use meshwhisper_crypto::address_record::AddressRecord;
use std::collections::HashMap;

/// The request id of a `Records` frame nobody asked for.
pub const PUSHED: u64 = 0;

/// The request id of a relay's own record sent to its bootstrap relays:
/// "tell your peers about me". (Anti-entropy's requests count from 2.)
pub const INTRODUCE: u64 = 1;

/// What a record just stored is worth to others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum News {
    /// It replaced an older record of its relay.
    Change,
    /// Its relay sent it to us asking to be introduced ([`INTRODUCE`]).
    Introduction,
    /// Nothing to tell.
    Old,
}

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
    /// News (key, encoded, worth), learned from `from`: each goes to
    /// every peer but `from`, unless pushed lately. How many records were
    /// pushed.
    pub fn news(
        &mut self,
        now: u64,
        from: Option<PeerId>,
        records: Vec<([u8; 32], Bytes, News)>,
        peers: &[PeerId],
        out: &mut Vec<Action>,
    ) -> usize {
        let news: Vec<Bytes> = records
            .into_iter()
            .filter(|(key, _, worth)| *worth != News::Old && self.due(now, *key))
            .map(|(_, r, _)| r)
            .collect();
        if news.is_empty() {
            return 0;
        }
        for peer in peers.iter().filter(|p| Some(**p) != from) {
            out.push(Action::Send {
                peer: *peer,
                frame: Frame::Records {
                    req: PUSHED,
                    records: news.clone(),
                },
            });
        }
        news.len()
    }

    /// `peer` asks to be introduced: its own valid record among `records`
    /// goes to every other peer (unless pushed lately). How many records
    /// were pushed (0 or 1).
    pub fn introduction(
        &mut self,
        now: u64,
        peer: PeerId,
        records: &[Bytes],
        peers: &[PeerId],
        out: &mut Vec<Action>,
    ) -> usize {
        let Some(key) = RelayKey::from_peer(&peer) else {
            return 0;
        };
        let own = records.iter().find(|r| {
            AddressRecord::peek(r).is_some_and(|(k, _)| k == key.0)
                && AddressRecord::accept(r, now).is_ok()
        });
        match own {
            Some(r) => self.news(
                now,
                Some(peer),
                vec![(key.0, r.clone(), News::Introduction)],
                peers,
                out,
            ),
            None => 0,
        }
    }

    /// Our own record changed: to every peer (not rate-limited: it is ours).
    pub fn own(&mut self, record: Bytes, peers: &[PeerId], out: &mut Vec<Action>) {
        for peer in peers {
            Self::own_to(record.clone(), *peer, false, out);
        }
    }

    /// Our own record to one peer whose stream just opened; a bootstrap
    /// relay is asked to introduce us.
    pub fn own_to(record: Bytes, peer: PeerId, bootstrap: bool, out: &mut Vec<Action>) {
        out.push(Action::Send {
            peer,
            frame: Frame::Records {
                req: if bootstrap { INTRODUCE } else { PUSHED },
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
    fn news_goes_to_every_peer_but_its_source_once_per_interval() {
        let peers: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        let mut a = Announce::default();
        let mut out = Vec::new();
        let rec = ([7; 32], Bytes::from_static(b"r1"), News::Change);
        let old = ([9; 32], Bytes::from_static(b"old"), News::Old);
        a.news(
            1000,
            Some(peers[0]),
            vec![rec.clone(), old],
            &peers,
            &mut out,
        );
        assert_eq!(
            sent(&out),
            vec![(peers[1], 1), (peers[2], 1)],
            "old records stay"
        );
        out.clear();
        // The same relay changing again at once: not pushed again.
        a.news(
            1000 + PUSH_EVERY_MS - 1,
            None,
            vec![rec.clone()],
            &peers,
            &mut out,
        );
        assert!(out.is_empty());
        // Another relay's introduction is.
        let other = ([8; 32], Bytes::from_static(b"r2"), News::Introduction);
        a.news(2000, None, vec![other], &peers, &mut out);
        assert_eq!(sent(&out).len(), 3);
        out.clear();
        a.news(1000 + PUSH_EVERY_MS, None, vec![rec], &peers, &mut out);
        assert_eq!(sent(&out).len(), 3, "due again after the interval");
    }

    fn signed(seed: u8, now: u64) -> (PeerId, Bytes) {
        let (peer, record) = super::super::tests::signed_record(seed, now);
        (peer, Bytes::from(record))
    }

    #[test]
    fn an_introduction_passes_on_the_relays_own_valid_record_only() {
        let now = 1_800_000_000_000;
        let peers: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        let (newcomer, own) = signed(1, now);
        let (_, someone_else) = signed(2, now);
        let mut forged = own.to_vec();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let mut a = Announce::default();
        let mut out = Vec::new();
        let n = a.introduction(
            now,
            newcomer,
            &[someone_else.clone(), Bytes::from(forged)],
            &peers,
            &mut out,
        );
        assert_eq!((n, out.len()), (0, 0), "not its own, or forged: nothing");
        let n = a.introduction(
            now,
            newcomer,
            &[someone_else, own.clone()],
            &peers,
            &mut out,
        );
        assert_eq!(n, 1);
        assert_eq!(
            sent(&out),
            peers.iter().map(|p| (*p, 1)).collect::<Vec<_>>()
        );
        out.clear();
        let n = a.introduction(now, newcomer, &[own], &peers, &mut out);
        assert_eq!((n, out.len()), (0, 0), "once per interval");
    }

    #[test]
    fn bootstrap_relays_are_asked_to_introduce_us() {
        let p = PeerId::random();
        let mut out = Vec::new();
        Announce::own_to(Bytes::from_static(b"me"), p, true, &mut out);
        Announce::own_to(Bytes::from_static(b"me"), p, false, &mut out);
        let reqs: Vec<u64> = out
            .iter()
            .filter_map(|a| match a {
                Action::Send {
                    frame: Frame::Records { req, .. },
                    ..
                } => Some(*req),
                _ => None,
            })
            .collect();
        assert_eq!(reqs, vec![INTRODUCE, PUSHED]);
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
            a.news(
                u64::from(i),
                None,
                vec![(k, Bytes::new(), News::Change)],
                &[],
                &mut out,
            );
            assert!(a.remembered() <= MAX_REMEMBERED);
        }
    }
}
