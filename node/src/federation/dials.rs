//! Reaching relays: the bootstrap list (dialled until some relay is
//! admitted, backing off to 30 s), relays we must send to (their record's
//! addresses, else the DHT; backing off per relay), relays discovered in
//! the book (a few at a time while below `target_peers`, each at most once
//! a minute, from a random point so relays spread their dials), and the
//! periodic DHT refresh.

use super::View;
use super::action::{Action, Job};
use libp2p::{Multiaddr, PeerId};
use std::collections::HashMap;

/// How often the DHT is refreshed while federated.
const KAD_REFRESH_MS: u64 = 5 * 60_000;
/// The first refresh comes this long after the first relay was admitted:
/// at start the bootstrap relays and the book find the mesh, and a DHT
/// walk by every relay at once would connect everyone to everyone.
const KAD_FIRST_MS: u64 = 30_000;
/// A discovered relay is not dialled again for this long.
const DISCOVERED_MS: u64 = 60_000;
/// Longest backoff between attempts to reach one relay.
const MAX_BACKOFF_MS: u64 = 30_000;

#[derive(Debug)]
struct Backoff {
    next_ms: u64,
    backoff_ms: u64,
}

/// The dialling state.
#[derive(Debug)]
pub struct Dials {
    me: PeerId,
    retry_ms: u64,
    target_peers: usize,
    bootstrap: Vec<(PeerId, Multiaddr)>,
    bootstrap_next_ms: u64,
    bootstrap_backoff_ms: u64,
    /// Relays we must reach (packets wait for them).
    targets: HashMap<PeerId, Backoff>,
    discovered_at: HashMap<PeerId, u64>,
    next_kad_ms: u64,
    /// Dial only the bootstrap relays.
    transit_only: bool,
}

impl Dials {
    /// Dialling for relay `me`.
    pub fn new(
        me: PeerId,
        bootstrap: Vec<(PeerId, Multiaddr)>,
        retry_ms: u64,
        target_peers: usize,
    ) -> Self {
        Self {
            me,
            retry_ms,
            target_peers,
            bootstrap: bootstrap.into_iter().filter(|(p, _)| *p != me).collect(),
            bootstrap_next_ms: 0,
            bootstrap_backoff_ms: 500,
            targets: HashMap::new(),
            discovered_at: HashMap::new(),
            next_kad_ms: 0,
            transit_only: false,
        }
    }

    /// A transit-only relay dials its bootstrap relays (its uplinks) and
    /// nothing else: no relays to send to, none discovered, no DHT walk.
    pub fn transit_only(mut self, on: bool) -> Self {
        self.transit_only = on;
        self
    }

    /// Bootstrap relays configured.
    pub fn bootstrap_count(&self) -> usize {
        self.bootstrap.len()
    }

    /// The bootstrap relays' PeerIds.
    pub fn bootstrap_peers(&self) -> impl Iterator<Item = &PeerId> {
        self.bootstrap.iter().map(|(p, _)| p)
    }

    /// Dial the bootstrap relays again at the next tick (a connection to
    /// one was closed because it never led to admission).
    pub fn bootstrap_soon(&mut self) {
        self.bootstrap_next_ms = 0;
        self.bootstrap_backoff_ms = 500;
    }

    /// The configured address of bootstrap relay `peer`.
    pub fn bootstrap_addr(&self, peer: &PeerId) -> Option<&Multiaddr> {
        self.bootstrap
            .iter()
            .find(|(p, _)| p == peer)
            .map(|(_, a)| a)
    }

    /// Bootstrap dials and the DHT refresh, when due.
    pub fn tick(&mut self, now: u64, view: &dyn View, out: &mut Vec<Action>) {
        let admitted = view.admitted_count();
        if admitted == 0 && !self.bootstrap.is_empty() && now >= self.bootstrap_next_ms {
            for (peer, addr) in &self.bootstrap {
                out.push(Action::KadAddAddress {
                    peer: *peer,
                    addr: addr.clone(),
                });
                if !view.is_connected(peer) {
                    out.push(Action::Dial {
                        peer: *peer,
                        addrs: vec![addr.clone()],
                    });
                }
            }
            self.bootstrap_next_ms = now + self.bootstrap_backoff_ms;
            self.bootstrap_backoff_ms = (self.bootstrap_backoff_ms * 2).min(MAX_BACKOFF_MS);
        } else if admitted > 0 {
            self.bootstrap_backoff_ms = 500;
        }
        if self.transit_only {
            return;
        }
        if admitted > 0 && self.next_kad_ms == 0 {
            self.next_kad_ms = now + KAD_FIRST_MS;
        }
        if admitted > 0 && now >= self.next_kad_ms {
            self.next_kad_ms = now + KAD_REFRESH_MS;
            out.push(Action::KadBootstrap);
        }
    }

    /// We must reach `peer`: look its record up (then dial), backing off.
    pub fn reach(&mut self, now: u64, peer: PeerId, view: &dyn View, out: &mut Vec<Action>) {
        if view.is_connected(&peer) || peer == self.me {
            // Connected but no stream yet: identify and admission follow.
            return;
        }
        let b = self.targets.entry(peer).or_insert(Backoff {
            next_ms: 0,
            backoff_ms: self.retry_ms,
        });
        if b.next_ms > now {
            return;
        }
        b.next_ms = now + b.backoff_ms;
        b.backoff_ms = (b.backoff_ms * 2).min(MAX_BACKOFF_MS);
        out.push(Action::Job(Job::LookupAddrs(peer)));
    }

    /// The book's addresses for a relay we must reach (empty: ask the DHT).
    pub fn addrs(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, out: &mut Vec<Action>) {
        if self.transit_only {
            // Looked up for its record (how to reach it), never dialled.
            return;
        }
        if addrs.is_empty() {
            out.push(Action::KadFindPeer(peer));
        } else {
            out.push(Action::Dial { peer, addrs });
        }
    }

    /// The DHT found peers: dial those we must reach.
    pub fn kad_found(&mut self, found: Vec<(PeerId, Vec<Multiaddr>)>, out: &mut Vec<Action>) {
        for (peer, addrs) in found {
            if self.targets.contains_key(&peer) && !addrs.is_empty() {
                out.push(Action::Dial { peer, addrs });
            }
        }
    }

    /// Whether more relays are wanted (below `target_peers`, with room).
    pub fn wants_more(&self, view: &dyn View) -> bool {
        view.has_room() && view.admitted_count() < self.target_peers
    }

    /// Relays found in the book: dial a few, from `start` (a random index)
    /// on, while below the target.
    pub fn discovered(
        &mut self,
        now: u64,
        candidates: Vec<(PeerId, Vec<Multiaddr>)>,
        start: usize,
        view: &dyn View,
        out: &mut Vec<Action>,
    ) {
        if !self.wants_more(view) || candidates.is_empty() || self.transit_only {
            return;
        }
        self.discovered_at
            .retain(|_, t| t.saturating_add(DISCOVERED_MS) > now);
        let mut budget = self
            .target_peers
            .saturating_sub(view.admitted_count() + self.discovered_at.len());
        let n = candidates.len();
        let mut list = candidates;
        list.rotate_left(start % n);
        for (peer, addrs) in list {
            if budget == 0 {
                break;
            }
            if peer == self.me || view.is_connected(&peer) || self.discovered_at.contains_key(&peer)
            {
                continue;
            }
            self.discovered_at.insert(peer, now);
            out.push(Action::Dial { peer, addrs });
            budget -= 1;
        }
    }

    /// A stream to `peer` opened: it is reached.
    pub fn reached(&mut self, peer: &PeerId) {
        self.targets.remove(peer);
    }

    /// Nothing waits for `peer` any more: stop trying.
    pub fn forget(&mut self, peer: &PeerId) {
        self.targets.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::FakeView;
    use super::*;

    #[test]
    fn bootstrap_backs_off_until_admitted() {
        let b = PeerId::random();
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("addr");
        let mut d = Dials::new(PeerId::random(), vec![(b, addr)], 100, 8);
        let view = FakeView::with_streams(&[]);
        let dials = |out: &[Action]| {
            out.iter()
                .filter(|a| matches!(a, Action::Dial { .. }))
                .count()
        };
        let mut out = Vec::new();
        d.tick(0, &view, &mut out);
        d.tick(100, &view, &mut out);
        assert_eq!(dials(&out), 1, "backing off");
        d.tick(500, &view, &mut out);
        d.tick(1000, &view, &mut out);
        d.tick(2500, &view, &mut out);
        // Attempts at 0, 500 (+500) and 2500 (+1000 was due at 1500).
        assert_eq!(dials(&out), 3);
        d.tick(4000, &view, &mut out);
        assert_eq!(dials(&out), 3, "next one is due at 4500");
        let admitted = FakeView::with_streams(&[b]);
        out.clear();
        d.tick(10_000, &admitted, &mut out);
        assert_eq!(dials(&out), 0);
        // The DHT is walked only once the mesh had time to form.
        let kad = |out: &[Action]| {
            out.iter()
                .filter(|a| matches!(a, Action::KadBootstrap))
                .count()
        };
        assert_eq!(kad(&out), 0);
        d.tick(10_000 + KAD_FIRST_MS, &admitted, &mut out);
        assert_eq!(kad(&out), 1);
        d.tick(20_000 + KAD_FIRST_MS, &admitted, &mut out);
        assert_eq!(kad(&out), 1, "then every KAD_REFRESH_MS");
    }

    #[test]
    fn reaching_a_relay_backs_off_and_falls_back_to_the_dht() {
        let mut d = Dials::new(PeerId::random(), Vec::new(), 100, 8);
        let view = FakeView::with_streams(&[]);
        let t = PeerId::random();
        let mut out = Vec::new();
        d.reach(0, t, &view, &mut out);
        d.reach(50, t, &view, &mut out);
        d.reach(100, t, &view, &mut out);
        let lookups = out
            .iter()
            .filter(|a| matches!(a, Action::Job(Job::LookupAddrs(_))))
            .count();
        assert_eq!(lookups, 2);
        out.clear();
        d.addrs(t, Vec::new(), &mut out);
        assert!(matches!(out[0], Action::KadFindPeer(p) if p == t));
        out.clear();
        d.kad_found(
            vec![(t, vec!["/ip4/1.1.1.1/tcp/1".parse().expect("a")])],
            &mut out,
        );
        assert!(matches!(out[0], Action::Dial { peer, .. } if peer == t));
    }

    #[test]
    fn discovery_dials_a_few_once_a_minute() {
        let mut d = Dials::new(PeerId::random(), Vec::new(), 100, 3);
        let view = FakeView::with_streams(&[]);
        let cands: Vec<(PeerId, Vec<Multiaddr>)> =
            (0..10).map(|_| (PeerId::random(), Vec::new())).collect();
        let mut out = Vec::new();
        d.discovered(0, cands.clone(), 4, &view, &mut out);
        assert_eq!(out.len(), 3, "up to the target");
        out.clear();
        d.discovered(1, cands.clone(), 4, &view, &mut out);
        assert!(out.is_empty(), "the budget counts recent dials");
        d.discovered(DISCOVERED_MS + 1, cands, 4, &view, &mut out);
        assert_eq!(out.len(), 3);
    }
}
