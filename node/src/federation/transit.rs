//! Transit: carrying frames for relays that cannot dial.
//!
//! A transit-only relay (`federation.transit_only`: a site that may reach
//! only its uplinks) never dials a relay it must send to. It wraps the
//! frame — a routed packet or a directory claim — in a `Transit { to }`
//! frame and sends it to a relay it is connected to, which carries the
//! inner frame on to `to` (dialling it if need be) and passes the answer
//! (`Ack`, `ClaimReply`) back. Transit frames nest (`Transit { to: Y,
//! Transit { to: X, Routed } }` goes through Y to X), each relay peeling
//! one level, so paths compose and bottom out at an ordinary routed packet;
//! `federation.transit_hops` caps how many relays a frame may pass.
//!
//! **Custody**: a carrying relay keeps the inner frame until the next relay
//! answers (resending it when the stream to that relay opens), and never
//! answers for it itself: the `Stored` ack the sender gets is the home
//! relay's own, passed back hop by hop. A carrier that dies loses nothing:
//! the sender keeps its packet (stored, as any routed packet) until that
//! ack, and after `ack_timeout` sends it again by another path. A carrier
//! that cannot go on (hop cap, its table full, no way to `to` before
//! [`CARRY_TIMEOUT_MS`]) answers `NoPath` (a claim: `Unavailable`).
//!
//! What a carrier learns: the next relay's key, the packet's size and id,
//! and (in the clear in a routed packet's header) its destination hash;
//! whether it was stored. Onion transit, which hides the destination from
//! carriers, is separate work (docs/nat.md).
//!
//! Pure state: time and the network are passed in.

use super::action::Action;
use crate::metrics::FederationMetrics;
use bytes::Bytes;
use libp2p::PeerId;
use meshwhisper_behaviour::device::codec::Status;
use meshwhisper_behaviour::federation::codec::{AckStatus, Frame, PacketId};
use meshwhisper_behaviour::relay_key::RelayKey;
use std::sync::atomic::Ordering::Relaxed;

/// A carried frame not answered within this long is answered `NoPath`.
pub const CARRY_TIMEOUT_MS: u64 = 20_000;

/// Bounds of the transit table.
#[derive(Debug, Clone, Copy)]
pub struct TransitConfig {
    /// Most relays a transit frame may pass (`federation.transit_hops`).
    pub max_hops: u8,
    /// Frames carried at once (`federation.transit_max`).
    pub max_entries: usize,
    /// Of those, from one relay (`federation.transit_per_peer`).
    pub max_per_peer: usize,
}

/// What is carried, and for whom.
#[derive(Debug)]
pub struct Transit {
    me: RelayKey,
    cfg: TransitConfig,
    /// Routed packets (and transit frames around them), by packet id.
    packets: super::carried::Carried<PacketId, ()>,
    /// Claims, by our request id, with the upstream's.
    claims: super::carried::Carried<u64, u64>,
    next_req: u64,
}

/// The id an answer to `frame` carries: a routed packet's id or a
/// claim's request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Packet(PacketId),
    Claim(u64),
}

fn answer_of(frame: &Frame) -> Option<Answer> {
    match frame.innermost() {
        Frame::Routed { id, .. } => Some(Answer::Packet(*id)),
        Frame::Claim { req, .. } => Some(Answer::Claim(*req)),
        _ => None,
    }
}

/// The refusal `upstream` gets for a frame we cannot carry.
fn refusal(upstream: PeerId, answer: Answer, why: &str) -> Action {
    Action::Send {
        peer: upstream,
        frame: match answer {
            Answer::Packet(id) => Frame::Ack {
                id,
                status: AckStatus::NoPath,
                home: None,
            },
            Answer::Claim(req) => Frame::ClaimReply {
                req,
                status: Status::Unavailable,
                body: Bytes::copy_from_slice(why.as_bytes()),
            },
        },
    }
}

impl Transit {
    /// The carrier of relay `me`.
    pub fn new(me: RelayKey, cfg: TransitConfig) -> Self {
        Self {
            me,
            cfg,
            packets: Default::default(),
            claims: Default::default(),
            next_req: 0,
        }
    }

    /// Frames carried now.
    pub fn len(&self) -> usize {
        self.packets.len() + self.claims.len()
    }

    /// Whether nothing is carried.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A `Transit { to, hops, inner }` from `from`. Returns the inner frame
    /// when it is for this relay (the caller handles it as if `from` had
    /// sent it); otherwise carries it on, or refuses.
    #[allow(clippy::too_many_arguments)]
    pub fn carry(
        &mut self,
        now: u64,
        from: PeerId,
        to: [u8; 32],
        hops: u8,
        inner: Frame,
        stream_open: impl Fn(&PeerId) -> bool,
        m: &FederationMetrics,
        out: &mut Vec<Action>,
    ) -> Option<Frame> {
        let Some(answer) = answer_of(&inner) else {
            m.transit_refused.fetch_add(1, Relaxed);
            return None;
        };
        if RelayKey(to) == self.me {
            return Some(inner);
        }
        let refuse = |why: &str, out: &mut Vec<Action>| {
            m.transit_refused.fetch_add(1, Relaxed);
            tracing::debug!(%from, why, "transit refused");
            out.push(refusal(from, answer, why));
        };
        if hops >= self.cfg.max_hops {
            refuse("over the transit hop cap", out);
            return None;
        }
        let Some(to_peer) = RelayKey(to).to_peer() else {
            refuse("not a relay key", out);
            return None;
        };
        if to_peer == from {
            refuse("a transit back to its sender", out);
            return None;
        }
        let theirs = self.packets.from(&from) + self.claims.from(&from);
        if self.len() >= self.cfg.max_entries || theirs >= self.cfg.max_per_peer {
            refuse("transit table full", out);
            return None;
        }
        let hops = hops.saturating_add(1);
        let (frame, key, upstream_req) = match inner {
            Frame::Transit { to, inner, .. } => (Frame::Transit { to, hops, inner }, answer, 0),
            Frame::Routed {
                id,
                flags,
                target,
                packet,
                ..
            } => (
                Frame::Routed {
                    id,
                    flags,
                    hops,
                    target,
                    packet,
                },
                answer,
                0,
            ),
            Frame::Claim {
                req,
                namespace,
                identity,
            } => {
                // Under a request id of ours: two relays' claims through us
                // never share one.
                self.next_req = self.next_req.wrapping_add(1);
                let ours = self.next_req;
                (
                    Frame::Claim {
                        req: ours,
                        namespace,
                        identity,
                    },
                    Answer::Claim(ours),
                    req,
                )
            }
            _ => return None,
        };
        let open = stream_open(&to_peer);
        let deadline_ms = now + CARRY_TIMEOUT_MS;
        let new = match key {
            Answer::Packet(id) => {
                let e = super::carried::Entry {
                    upstream: from,
                    to: to_peer,
                    frame,
                    deadline_ms,
                    sent: false,
                    extra: (),
                };
                self.packets.carry(id, e, open, out)
            }
            Answer::Claim(req) => {
                let e = super::carried::Entry {
                    upstream: from,
                    to: to_peer,
                    frame,
                    deadline_ms,
                    sent: false,
                    extra: upstream_req,
                };
                self.claims.carry(req, e, open, out)
            }
        };
        // A resend of a packet we carry is counted once.
        if new {
            m.transit_relayed.fetch_add(1, Relaxed);
        }
        None
    }

    /// An ack from `from`: if it answers a packet we carried to it, it
    /// goes back upstream (true: it was ours to pass on).
    pub fn ack(
        &mut self,
        from: PeerId,
        id: PacketId,
        status: AckStatus,
        home: Option<[u8; 32]>,
        out: &mut Vec<Action>,
    ) -> bool {
        if !self.packets.awaits(&id, &from) {
            return false;
        }
        // `Relayed` (a flood went on) is not the answer yet.
        if status == AckStatus::Relayed {
            return true;
        }
        if let Some(c) = self.packets.answered(&id, &from) {
            out.push(Action::Send {
                peer: c.upstream,
                frame: Frame::Ack { id, status, home },
            });
        }
        true
    }

    /// A claim reply from `from`: passed back if it answers one we carried.
    pub fn claim_reply(
        &mut self,
        from: PeerId,
        req: u64,
        status: Status,
        body: Bytes,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(c) = self.claims.answered(&req, &from) else {
            return false;
        };
        out.push(Action::Send {
            peer: c.upstream,
            frame: Frame::ClaimReply {
                req: c.extra,
                status,
                body,
            },
        });
        true
    }

    /// A stream to `peer` opened: what waits for it goes now.
    pub fn stream_opened(&mut self, peer: PeerId, out: &mut Vec<Action>) {
        self.packets.stream_opened(peer, out);
        self.claims.stream_opened(peer, out);
    }

    /// A stream to `peer` closed: what went on it goes again when one opens.
    pub fn stream_closed(&mut self, peer: PeerId) {
        self.packets.stream_closed(peer);
        self.claims.stream_closed(peer);
    }

    /// Frames not answered in time are answered `NoPath` upstream.
    pub fn tick(&mut self, now: u64, m: &FederationMetrics, out: &mut Vec<Action>) {
        for (id, c) in self.packets.expired(now) {
            m.transit_refused.fetch_add(1, Relaxed);
            out.push(refusal(c.upstream, Answer::Packet(id), "no way on"));
        }
        for (_, c) in self.claims.expired(now) {
            m.transit_refused.fetch_add(1, Relaxed);
            out.push(refusal(c.upstream, Answer::Claim(c.extra), "no way on"));
        }
    }
}

/// What the gossiped topology says about a relay: from its signed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The relays it names as anchors (behind NAT: where it holds
    /// reservations; transit-only: its uplinks).
    pub anchors: Vec<PeerId>,
    /// Whether any relay can dial it: it names no anchors (public), or
    /// it has a circuit address through one. A transit-only relay is
    /// reached only through its anchors.
    pub dialable: bool,
    /// The key that opens onion layers for it.
    pub onion_key: meshwhisper_crypto::primitives::X25519Public,
}

impl Node {
    /// The topology of a relay's record.
    pub fn of(record: &meshwhisper_crypto::address_record::AddressRecord) -> Self {
        let c = record.contents();
        let anchors: Vec<PeerId> = c
            .anchors
            .iter()
            .filter_map(|k| RelayKey(*k).to_peer())
            .collect();
        let circuit = c.addrs.iter().any(|a| {
            libp2p::Multiaddr::try_from(a.clone())
                .is_ok_and(|a| meshwhisper_behaviour::nat::is_relayed(&a))
        });
        Node {
            dialable: anchors.is_empty() || circuit,
            anchors,
            onion_key: c.onion_key,
        }
    }
}

/// The path a frame for `target` takes when we have no stream to it: the
/// relays it passes, first one we have a stream to (in `peers`), last
/// `target`; at most `max_hops` long. A bounded breadth-first search
/// backwards from `target` over the gossiped topology (`topo`): a dialable
/// relay is reached from any relay, any other one only from its anchors.
/// An unknown target counts as dialable. Carriers in `avoid` (they failed
/// this frame) are not first hops.
pub fn search(
    peers: &[PeerId],
    target: PeerId,
    topo: impl Fn(&PeerId) -> Option<Node>,
    avoid: &[PeerId],
    max_hops: usize,
) -> Option<Vec<PeerId>> {
    let first = |ok: &dyn Fn(&PeerId) -> bool, suffix: &[PeerId]| {
        peers
            .iter()
            .find(|p| !avoid.contains(p) && !suffix.contains(p) && ok(p))
            .copied()
    };
    // Paths end at `target`: each entry is a path's tail, first relay first.
    let mut level: Vec<Vec<PeerId>> = vec![vec![target]];
    let mut seen = vec![target];
    for _ in 1..max_hops {
        let mut next = Vec::new();
        for tail in &level {
            let head = tail[0];
            let node = topo(&head).unwrap_or(Node {
                anchors: Vec::new(),
                dialable: true,
                onion_key: meshwhisper_crypto::primitives::X25519Public([0; 32]),
            });
            let s = if node.dialable {
                first(&|_| true, tail)
            } else {
                first(&|p| node.anchors.contains(p), tail)
            };
            if let Some(s) = s {
                let mut path = vec![s];
                path.extend_from_slice(tail);
                return Some(path);
            }
            if !node.dialable {
                for a in node.anchors {
                    if !seen.contains(&a) {
                        seen.push(a);
                        let mut t = vec![a];
                        t.extend_from_slice(tail);
                        next.push(t);
                    }
                }
            }
        }
        if next.is_empty() {
            return None;
        }
        level = next;
    }
    None
}

/// `inner` wrapped for relay `to` (Ed25519 key), as first sent.
pub fn wrap(to: [u8; 32], inner: Frame) -> Frame {
    Frame::Transit {
        to,
        hops: 1,
        inner: Box::new(inner),
    }
}

/// `inner` (for the last relay of `path`) wrapped for each relay of the
/// path after the first, and the first relay to send it to.
pub fn wrap_path(path: &[PeerId], inner: Frame) -> Option<(PeerId, Frame)> {
    let (first, rest) = path.split_first()?;
    let mut frame = inner;
    for p in rest.iter().rev() {
        frame = wrap(RelayKey::from_peer(p)?.0, frame);
    }
    Some((*first, frame))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> (PeerId, [u8; 32]) {
        let p = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        (p, RelayKey::from_peer(&p).expect("ed25519").0)
    }

    fn routed(id: u8, target: [u8; 32]) -> Frame {
        Frame::Routed {
            id: [id; 16],
            flags: 0,
            hops: 1,
            target,
            packet: Bytes::from_static(&[1; 40]),
        }
    }

    fn cfg() -> TransitConfig {
        TransitConfig {
            max_hops: 3,
            max_entries: 4,
            max_per_peer: 2,
        }
    }

    fn sent(out: &[Action]) -> Vec<(PeerId, Frame)> {
        out.iter()
            .filter_map(|a| match a {
                Action::Send { peer, frame } => Some((*peer, frame.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_carrier_passes_the_packet_on_and_the_home_relays_ack_back() {
        let (_, me) = key();
        let (up, _) = key();
        let (home, home_key) = key();
        let m = FederationMetrics::default();
        let mut t = Transit::new(RelayKey(me), cfg());
        let mut out = Vec::new();
        let r = t.carry(
            0,
            up,
            home_key,
            1,
            routed(1, home_key),
            |_| true,
            &m,
            &mut out,
        );
        assert!(r.is_none());
        let s = sent(&out);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, home);
        assert!(
            matches!(s[0].1, Frame::Routed { hops: 2, .. }),
            "hops counted"
        );
        assert_eq!(m.transit_relayed.load(Relaxed), 1);
        // An ack for it from someone else is not the answer.
        out.clear();
        assert!(!t.ack(up, [1; 16], AckStatus::Stored, None, &mut out));
        // `Relayed` is not the answer yet; `Stored` goes back upstream.
        assert!(t.ack(home, [1; 16], AckStatus::Relayed, None, &mut out));
        assert!(out.is_empty());
        assert!(t.ack(home, [1; 16], AckStatus::Stored, None, &mut out));
        assert_eq!(
            sent(&out),
            vec![(
                up,
                Frame::Ack {
                    id: [1; 16],
                    status: AckStatus::Stored,
                    home: None
                }
            )]
        );
        assert!(t.is_empty());
    }

    #[test]
    fn nested_transit_is_peeled_one_level_at_a_time_and_capped() {
        let (_, me) = key();
        let (up, _) = key();
        let (next, next_key) = key();
        let (_, home_key) = key();
        let m = FederationMetrics::default();
        let mut t = Transit::new(RelayKey(me), cfg());
        let mut out = Vec::new();
        // Through us to `next`, which is to carry it on to `home`.
        let inner = wrap(home_key, routed(2, home_key));
        t.carry(0, up, next_key, 1, inner, |_| true, &m, &mut out);
        let s = sent(&out);
        assert_eq!(s[0].0, next);
        let Frame::Transit { to, hops, inner } = &s[0].1 else {
            panic!("{:?}", s[0].1)
        };
        assert_eq!((*to, *hops), (home_key, 2));
        assert!(matches!(**inner, Frame::Routed { .. }));
        // A frame that has passed the cap already is refused, with NoPath.
        out.clear();
        t.carry(
            0,
            up,
            next_key,
            3,
            routed(3, home_key),
            |_| true,
            &m,
            &mut out,
        );
        assert_eq!(
            sent(&out),
            vec![(
                up,
                Frame::Ack {
                    id: [3; 16],
                    status: AckStatus::NoPath,
                    home: None
                }
            )]
        );
        assert_eq!(m.transit_refused.load(Relaxed), 1);
        // A transit for this relay is handed back to be handled here.
        out.clear();
        let mine = t.carry(0, up, me, 1, routed(4, me), |_| true, &m, &mut out);
        assert_eq!(mine, Some(routed(4, me)));
        assert!(out.is_empty());
    }

    #[test]
    fn the_table_is_bounded_per_peer_and_in_all() {
        let (_, me) = key();
        let (a, _) = key();
        let (b, _) = key();
        let (c, _) = key();
        let (_, to) = key();
        let m = FederationMetrics::default();
        let mut t = Transit::new(RelayKey(me), cfg());
        let mut out = Vec::new();
        for i in 0..3 {
            t.carry(0, a, to, 1, routed(i, to), |_| true, &m, &mut out);
        }
        assert_eq!(t.len(), 2, "two per peer");
        for i in 10..13 {
            t.carry(0, b, to, 1, routed(i, to), |_| true, &m, &mut out);
        }
        t.carry(0, c, to, 1, routed(20, to), |_| true, &m, &mut out);
        assert_eq!(t.len(), 4, "four in all");
        assert_eq!(m.transit_refused.load(Relaxed), 3);
    }

    #[test]
    fn an_unanswered_frame_is_answered_no_path_and_resent_when_the_stream_opens() {
        let (_, me) = key();
        let (up, _) = key();
        let (home, home_key) = key();
        let m = FederationMetrics::default();
        let mut t = Transit::new(RelayKey(me), cfg());
        let mut out = Vec::new();
        // No stream to `home` yet: reach it, send when it opens.
        t.carry(
            0,
            up,
            home_key,
            1,
            routed(1, home_key),
            |_| false,
            &m,
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0], Action::Reach(p) if p == home));
        out.clear();
        t.stream_opened(home, &mut out);
        assert_eq!(sent(&out).len(), 1);
        out.clear();
        t.tick(CARRY_TIMEOUT_MS, &m, &mut out);
        assert_eq!(
            sent(&out),
            vec![(
                up,
                Frame::Ack {
                    id: [1; 16],
                    status: AckStatus::NoPath,
                    home: None
                }
            )]
        );
        assert!(t.is_empty());
    }

    #[test]
    fn claims_go_under_our_request_id_and_come_back_under_theirs() {
        let (_, me) = key();
        let (a, _) = key();
        let (b, _) = key();
        let (home, home_key) = key();
        let m = FederationMetrics::default();
        let mut t = Transit::new(RelayKey(me), cfg());
        let mut out = Vec::new();
        let claim = |req| Frame::Claim {
            req,
            namespace: "ns".into(),
            identity: [9; 32],
        };
        // Two relays' claims with the same request id.
        t.carry(0, a, home_key, 1, claim(5), |_| true, &m, &mut out);
        t.carry(0, b, home_key, 1, claim(5), |_| true, &m, &mut out);
        let reqs: Vec<u64> = sent(&out)
            .iter()
            .map(|(_, f)| match f {
                Frame::Claim { req, .. } => *req,
                f => panic!("{f:?}"),
            })
            .collect();
        assert_eq!(reqs.len(), 2);
        assert_ne!(reqs[0], reqs[1]);
        out.clear();
        assert!(t.claim_reply(
            home,
            reqs[1],
            Status::Ok,
            Bytes::from_static(b"bundle"),
            &mut out
        ));
        assert_eq!(
            sent(&out),
            vec![(
                b,
                Frame::ClaimReply {
                    req: 5,
                    status: Status::Ok,
                    body: Bytes::from_static(b"bundle")
                }
            )]
        );
        assert!(!t.claim_reply(home, reqs[1], Status::Ok, Bytes::new(), &mut out));
    }

    #[test]
    fn the_path_search_follows_anchors_and_stops_at_the_hop_cap() {
        let (s1, _) = key();
        let (s2, _) = key();
        let (x, _) = key();
        let (a1, _) = key();
        let (a2, _) = key();
        let k = meshwhisper_crypto::primitives::X25519Public([9; 32]);
        let public = Node {
            anchors: vec![],
            dialable: true,
            onion_key: k,
        };
        // A dialable target: any peer carries it, failed ones skipped.
        assert_eq!(
            search(&[s1, s2], x, |_| Some(public.clone()), &[], 3),
            Some(vec![s1, x])
        );
        assert_eq!(
            search(&[s1, s2], x, |_| Some(public.clone()), &[s1], 3),
            Some(vec![s2, x])
        );
        assert_eq!(search(&[s1], x, |_| Some(public.clone()), &[s1], 3), None);
        // A transit-only target (anchor a1, no circuit): through a1 only.
        let topo = |p: &PeerId| {
            if *p == x {
                Some(Node {
                    anchors: vec![a1],
                    dialable: false,
                    onion_key: k,
                })
            } else if *p == a1 {
                Some(Node {
                    anchors: vec![a2],
                    dialable: false,
                    onion_key: k,
                })
            } else {
                Some(public.clone())
            }
        };
        assert_eq!(search(&[s1, a1], x, topo, &[], 3), Some(vec![a1, x]));
        // Not connected to a1: a1 is itself behind a2, which we reach.
        assert_eq!(search(&[s1, a2], x, topo, &[], 3), Some(vec![a2, a1, x]));
        // Neither: a2 is dialable, so s1 takes it there, but that is four
        // relays, over the cap of three.
        assert_eq!(search(&[s1], x, topo, &[], 3), None);
        assert_eq!(search(&[s1], x, topo, &[], 4), Some(vec![s1, a2, a1, x]));
    }

    #[test]
    fn a_path_is_wrapped_once_per_carrier_after_the_first() {
        let (s, _) = key();
        let (a, ak) = key();
        let (x, xk) = key();
        let (first, f) = wrap_path(&[s, a, x], routed(1, xk)).expect("path");
        assert_eq!(first, s);
        assert_eq!(f, wrap(ak, wrap(xk, routed(1, xk))));
    }
}
