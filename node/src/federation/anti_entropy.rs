//! Anti-entropy: gossip can be lost, so a relay regularly walks one peer's
//! address book (the next peer in turn, and every peer whose stream just
//! opened): it asks for a page of (key, timestamp), pulls the records that
//! are newer there, and asks for the next page while there is more. Rounds
//! come every [`FAST_MS`] while they find something or peers come and go,
//! backing off (doubling) to `anti_entropy_ms` while books agree: a mesh
//! that is forming converges in seconds, a settled one costs one round per
//! `anti_entropy_ms`. One walk per peer at a time, [`MAX_WALKS`] in all (a stuck one is given up after
//! `walk_timeout`); requests from a peer are served at most
//! [`SERVING_PER_PEER`] at a time.

use super::action::{Action, Job};
use crate::metrics::FederationMetrics;
use libp2p::PeerId;
use meshwhisper_behaviour::federation::codec::{Frame, MAX_PULL};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;

/// The shortest interval between rounds (after a change).
pub const FAST_MS: u64 = 250;

/// Walks in progress at once; more wait their turn (walks that start
/// together pull the same records, but one slow peer must not hold up a
/// relay that just joined and has everything to learn).
pub const MAX_WALKS: usize = 4;

/// Anti-entropy requests served for one peer at a time.
pub const SERVING_PER_PEER: usize = 4;

/// The anti-entropy state.
#[derive(Debug)]
pub struct AntiEntropy {
    every_ms: u64,
    /// The interval now: [`FAST_MS`] after a change, doubling to `every_ms`.
    interval_ms: u64,
    page: u16,
    walk_timeout_ms: u64,
    next_ms: u64,
    turn: usize,
    next_req: u64,
    /// Walks in progress, per peer, since when.
    walks: HashMap<PeerId, u64>,
    /// Peers waiting for a walk, in order.
    waiting: std::collections::VecDeque<PeerId>,
    /// Requests being served, per peer.
    serving: HashMap<PeerId, usize>,
}

impl AntiEntropy {
    /// Rounds every `every_ms`, pages of `page` entries.
    pub fn new(every_ms: u64, page: u16, walk_timeout_ms: u64) -> Self {
        Self {
            every_ms,
            interval_ms: FAST_MS.min(every_ms),
            page,
            walk_timeout_ms,
            next_ms: 0,
            turn: 0,
            next_req: 1,
            walks: HashMap::new(),
            waiting: std::collections::VecDeque::new(),
            serving: HashMap::new(),
        }
    }

    fn req(&mut self) -> u64 {
        self.next_req += 1;
        self.next_req
    }

    /// Starts a walk through `peer`'s book unless one is under way (or,
    /// with [`MAX_WALKS`] under way, once one of them ends).
    pub fn start(&mut self, now: u64, peer: PeerId, m: &FederationMetrics, out: &mut Vec<Action>) {
        self.expire(now, m, out);
        if self.walks.contains_key(&peer) {
            return;
        }
        if self.walks.len() >= MAX_WALKS {
            if !self.waiting.contains(&peer) {
                self.waiting.push_back(peer);
            }
            return;
        }
        self.begin(now, peer, m, out);
    }

    /// Gives up stuck walks (and walks whose peer left), and lets waiting
    /// walks take their places.
    fn expire(&mut self, now: u64, m: &FederationMetrics, out: &mut Vec<Action>) {
        let timeout = self.walk_timeout_ms;
        self.walks.retain(|_, t| t.saturating_add(timeout) > now);
        while self.walks.len() < MAX_WALKS
            && let Some(next) = self.waiting.pop_front()
        {
            if !self.walks.contains_key(&next) {
                self.begin(now, next, m, out);
            }
        }
    }

    fn begin(&mut self, now: u64, peer: PeerId, m: &FederationMetrics, out: &mut Vec<Action>) {
        self.walks.insert(peer, now);
        let req = self.req();
        m.anti_entropy_rounds.fetch_add(1, Relaxed);
        tracing::debug!(%peer, "anti-entropy walk");
        out.push(Action::Send {
            peer,
            frame: Frame::DigestRequest {
                req,
                after: None,
                limit: self.page,
            },
        });
    }

    /// A round with the next peer in turn when due; whether one was due
    /// (the caller also refreshes discovery then).
    pub fn tick(
        &mut self,
        now: u64,
        peers: &[PeerId],
        m: &FederationMetrics,
        out: &mut Vec<Action>,
    ) -> bool {
        if now < self.next_ms {
            return false;
        }
        self.next_ms = now + self.interval_ms;
        self.interval_ms = self.interval_ms.saturating_mul(2).min(self.every_ms);
        if !peers.is_empty() {
            self.turn = (self.turn + 1) % peers.len();
            self.start(now, peers[self.turn], m, out);
        }
        true
    }

    /// A digest page from `peer`: compare it with our book (in the store).
    pub fn digest(
        &mut self,
        now: u64,
        peer: PeerId,
        more: bool,
        entries: Vec<([u8; 32], u64)>,
        m: &FederationMetrics,
        out: &mut Vec<Action>,
    ) {
        self.page_arrived(now, peer, more, m, out);
        out.push(Action::Job(Job::CompareDigest {
            peer,
            more,
            entries,
        }));
    }

    /// A digest page from `peer` arrived (compared by the caller, then
    /// [`AntiEntropy::compared`]); the last one ends its walk.
    pub fn page_arrived(
        &mut self,
        now: u64,
        peer: PeerId,
        more: bool,
        m: &FederationMetrics,
        out: &mut Vec<Action>,
    ) {
        if !more {
            self.walks.remove(&peer);
            self.expire(now, m, out);
        }
    }

    /// A compared page: pull what is newer there, and ask for the next page.
    pub fn compared(
        &mut self,
        peer: PeerId,
        want: Vec<[u8; 32]>,
        next_after: Option<[u8; 32]>,
        out: &mut Vec<Action>,
    ) {
        if !want.is_empty() {
            self.changed();
        }
        for keys in want.chunks(MAX_PULL) {
            let req = self.req();
            out.push(Action::Send {
                peer,
                frame: Frame::Pull {
                    req,
                    keys: keys.to_vec(),
                },
            });
        }
        if let Some(after) = next_after {
            let req = self.req();
            out.push(Action::Send {
                peer,
                frame: Frame::DigestRequest {
                    req,
                    after: Some(after),
                    limit: self.page,
                },
            });
        }
    }

    /// Whether another request of `peer` may be served now (then it
    /// counts until [`AntiEntropy::served`]).
    pub fn may_serve(&mut self, peer: PeerId, m: &FederationMetrics) -> bool {
        let n = self.serving.entry(peer).or_default();
        if *n >= SERVING_PER_PEER {
            m.drops_rate_limited.fetch_add(1, Relaxed);
            return false;
        }
        *n += 1;
        true
    }

    /// A request of `peer` was answered.
    pub fn served(&mut self, peer: PeerId) {
        if let Some(n) = self.serving.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.serving.remove(&peer);
            }
        }
    }

    /// The mesh changed (a peer came or went, a walk found records): the
    /// next rounds come fast again.
    pub fn changed(&mut self) {
        self.interval_ms = FAST_MS.min(self.every_ms);
    }

    /// `peer`'s last stream closed.
    pub fn closed(&mut self, peer: &PeerId) {
        self.changed();
        self.walks.remove(peer);
        self.waiting.retain(|p| p != peer);
        self.serving.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_walk_per_peer_and_bounded_serving() {
        let mut ae = AntiEntropy::new(1000, 256, 60_000);
        let m = FederationMetrics::default();
        let p = PeerId::random();
        let mut out = Vec::new();
        ae.start(0, p, &m, &mut out);
        ae.start(1, p, &m, &mut out);
        assert_eq!(out.len(), 1, "one walk at a time");
        ae.start(60_001, p, &m, &mut out);
        assert_eq!(out.len(), 2, "a stuck walk is given up");
        for _ in 0..SERVING_PER_PEER {
            assert!(ae.may_serve(p, &m));
        }
        assert!(!ae.may_serve(p, &m));
        ae.served(p);
        assert!(ae.may_serve(p, &m));
    }

    /// The peers asked for a digest, in order.
    fn asked(out: &[Action]) -> Vec<PeerId> {
        out.iter()
            .filter_map(|a| match a {
                Action::Send {
                    peer,
                    frame: Frame::DigestRequest { .. },
                } => Some(*peer),
                _ => None,
            })
            .collect()
    }

    /// Walks asked of two more peers than may walk at once (walk timeout
    /// 10 s): the first [`MAX_WALKS`] started, the other two waiting.
    fn two_more_than_fit() -> (AntiEntropy, FederationMetrics, Vec<PeerId>, Vec<Action>) {
        let mut ae = AntiEntropy::new(1000, 256, 10_000);
        let m = FederationMetrics::default();
        let peers: Vec<PeerId> = (0..MAX_WALKS + 2).map(|_| PeerId::random()).collect();
        let mut out = Vec::new();
        for p in peers.iter().copied() {
            ae.start(0, p, &m, &mut out);
        }
        assert_eq!(out.len(), MAX_WALKS);
        (ae, m, peers, out)
    }

    #[test]
    fn walks_take_turns() {
        let (mut ae, m, peers, mut out) = two_more_than_fit();
        // Each walk that ends lets the next waiting one start.
        for (i, p) in peers.iter().enumerate().take(peers.len() - MAX_WALKS) {
            ae.digest(5 + i as u64, *p, false, Vec::new(), &m, &mut out);
        }
        let asked = asked(&out);
        assert_eq!(asked, peers);
        // A stuck walk is given up after its timeout.
        out.clear();
        ae.start(10_010, peers[1], &m, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn waiting_walks_start_when_stuck_ones_are_given_up() {
        let (mut ae, m, peers, mut out) = two_more_than_fit();
        // No digest ever comes back; the next round gives the stuck walks
        // up, and both waiting peers are asked then.
        out.clear();
        assert!(ae.tick(10_000, &peers[..1], &m, &mut out));
        let asked = asked(&out);
        assert_eq!(asked[..2], peers[MAX_WALKS..]);
    }

    #[test]
    fn pages_pull_what_is_newer_and_continue_while_there_is_more() {
        let mut ae = AntiEntropy::new(1000, 2, 60_000);
        let p = PeerId::random();
        let mut out = Vec::new();
        let want: Vec<[u8; 32]> = (0..300u16).map(|i| [(i % 250) as u8; 32]).collect();
        ae.compared(p, want, Some([9; 32]), &mut out);
        let pulls = out
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    Action::Send {
                        frame: Frame::Pull { .. },
                        ..
                    }
                )
            })
            .count();
        assert_eq!(pulls, 2, "300 keys in pulls of 256");
        assert!(matches!(
            out.last(),
            Some(Action::Send { frame: Frame::DigestRequest { after: Some(k), limit: 2, .. }, .. }) if *k == [9; 32]
        ));
    }

    #[test]
    fn rounds_back_off_while_books_agree_and_speed_up_on_a_change() {
        let mut ae = AntiEntropy::new(4000, 2, 60_000);
        let m = FederationMetrics::default();
        let peers = [PeerId::random()];
        let mut out = Vec::new();
        let mut rounds = Vec::new();
        let mut t = 0;
        while t <= 20_000 {
            if ae.tick(t, &peers, &m, &mut out) {
                rounds.push(t);
                // Nothing new there: the walk ends empty.
                ae.walks.clear();
            }
            t += 50;
        }
        // 250, 500, 1000, 2000 ms apart, then every 4000 ms.
        assert_eq!(&rounds[..4], &[0, 250, 750, 1750]);
        assert!(
            rounds.windows(2).skip(4).all(|w| w[1] - w[0] == 4000),
            "{rounds:?}"
        );
        // A walk that finds records makes the next round come fast.
        let before = ae.next_ms;
        ae.compared(peers[0], vec![[1; 32]], None, &mut out);
        ae.tick(before, &peers, &m, &mut out);
        assert_eq!(ae.next_ms, before + FAST_MS);
    }

    #[test]
    fn rounds_take_peers_in_turn() {
        let mut ae = AntiEntropy::new(1000, 2, 60_000);
        let m = FederationMetrics::default();
        let peers = [PeerId::random(), PeerId::random()];
        let mut out = Vec::new();
        assert!(ae.tick(0, &peers, &m, &mut out));
        assert!(!ae.tick(200, &peers, &m, &mut out));
        // That walk ends (one page, nothing more).
        ae.digest(300, peers[1], false, Vec::new(), &m, &mut out);
        assert!(ae.tick(1000, &peers, &m, &mut out));
        assert_eq!(asked(&out), vec![peers[1], peers[0]]);
    }
}
