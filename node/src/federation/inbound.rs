//! Packets other relays send us: stored when their recipient is homed
//! here (once per id, in arrival order per sender), flooded on within the
//! hop cap when not, and acknowledged. The `Stored` ack of a flooded
//! packet names this relay, so the sender learns where the recipient
//! lives (a routed packet's sender knows already).
//!
//! A routed packet for a recipient this relay does not home is answered
//! `NotHome` (the sender then floods it) unless the sender says to store it
//! anyway (its flood found no home). Pure state: time and the network are
//! passed in.

use super::Ctx;
use super::action::{Action, Job, StoreOutcome, ToStore};
use super::dedup::Dedup;

use bytes::Bytes;
use libp2p::PeerId;
use meshwhisper_behaviour::federation::codec::{AckStatus, Frame, PacketId, ROUTED_STORE_ANYWAY};
use meshwhisper_behaviour::packet;
use meshwhisper_behaviour::relay_key::RelayKey;
use meshwhisper_crypto::destination::DestHash;
use std::sync::atomic::Ordering::Relaxed;

/// The receiving side of federation.
#[derive(Debug)]
pub struct Inbound {
    me: RelayKey,
    max_hops: u8,
}

fn ack(peer: PeerId, id: PacketId, status: AckStatus) -> Action {
    Action::Send {
        peer,
        frame: Frame::Ack {
            id,
            status,
            home: None,
        },
    }
}

fn store(peer: PeerId, id: PacketId, packet: Bytes, dest: DestHash, routed: bool) -> Action {
    Action::Job(Job::Store {
        peer,
        packets: vec![ToStore {
            id,
            packet,
            dest,
            routed,
        }],
    })
}

impl Inbound {
    /// The receiver of relay `me`, passing floods on for at most `max_hops`.
    pub fn new(me: RelayKey, max_hops: u8) -> Self {
        Self { me, max_hops }
    }

    /// A `Forward` or `Routed` frame from `peer`.
    pub fn packet(&self, now: u64, peer: PeerId, frame: Frame, cx: &mut Ctx<'_>) {
        cx.m.forwards_received.fetch_add(1, Relaxed);
        let (id, attempt, hops, routed, packet) = match frame {
            Frame::Forward {
                id,
                attempt,
                hops,
                packet,
            } => (id, attempt, hops, None, packet),
            Frame::Routed {
                id,
                flags,
                hops,
                target,
                packet,
            } => {
                if RelayKey(target) != self.me {
                    cx.out.push(ack(peer, id, AckStatus::NotTarget));
                    return;
                }
                (id, 0, hops, Some(flags & ROUTED_STORE_ANYWAY != 0), packet)
            }
            _ => return,
        };
        let dest = match packet::destination(&packet, usize::MAX) {
            Ok(d) => d,
            Err(_) => {
                cx.m.drops_malformed.fetch_add(1, Relaxed);
                cx.out.push(ack(peer, id, AckStatus::Malformed));
                return;
            }
        };
        let homed = cx.view.is_homed(&dest);
        match routed {
            Some(anyway) if homed || anyway => {
                cx.out.push(store(peer, id, packet, dest, true));
            }
            Some(_) => {
                // A stale hint: let the sender flood it.
                cx.out.push(ack(peer, id, AckStatus::NotHome));
            }
            None => {
                if !cx.dedup.insert((id, attempt), Some(peer), now) {
                    cx.m.drops_duplicate.fetch_add(1, Relaxed);
                    cx.out.push(ack(peer, id, AckStatus::Duplicate));
                    return;
                }
                if homed {
                    // The store keeps each id once, whatever the attempt.
                    cx.out.push(store(peer, id, packet, dest, false));
                    return;
                }
                self.flood_on(id, attempt, hops, packet, peer, cx);
            }
        }
    }

    fn flood_on(
        &self,
        id: PacketId,
        attempt: u8,
        hops: u8,
        packet: Bytes,
        from: PeerId,
        cx: &mut Ctx<'_>,
    ) {
        if hops >= self.max_hops {
            cx.m.drops_ttl.fetch_add(1, Relaxed);
            cx.out.push(ack(from, id, AckStatus::NotHome));
            return;
        }
        let peers: Vec<PeerId> = cx.view.peers().into_iter().filter(|p| *p != from).collect();
        for p in &peers {
            cx.out.push(Action::Send {
                peer: *p,
                frame: Frame::Forward {
                    id,
                    attempt,
                    hops: hops + 1,
                    packet: packet.clone(),
                },
            });
        }
        cx.m.forwards_sent.fetch_add(peers.len() as u64, Relaxed);
        cx.m.forwarded_onward
            .fetch_add(u64::from(!peers.is_empty()), Relaxed);
        cx.out.push(ack(
            from,
            id,
            if peers.is_empty() {
                AckStatus::NotHome
            } else {
                AckStatus::Relayed
            },
        ));
    }

    /// The store took (or refused) a packet `peer` sent us.
    pub fn stored(
        &self,
        peer: PeerId,
        id: PacketId,
        outcome: StoreOutcome,
        routed: bool,
        dedup: &mut Dedup,
        out: &mut Vec<Action>,
    ) {
        let (status, home) = match outcome {
            // A routed packet's sender named this relay: 32 bytes less
            // per ack.
            StoreOutcome::Stored if routed => (AckStatus::Stored, None),
            StoreOutcome::Stored => {
                // Acked to the sender here; a later Stored from elsewhere
                // for the same flood is not passed upstream again.
                let _ = dedup.ack_upstream(&id);
                (AckStatus::Stored, Some(self.me.0))
            }
            StoreOutcome::Malformed => (AckStatus::Malformed, None),
            StoreOutcome::Refused => {
                // Let a retry of any attempt through.
                for a in 0..=31 {
                    dedup.remove(&(id, a));
                }
                (AckStatus::Refused, None)
            }
        };
        out.push(Action::Send {
            peer,
            frame: Frame::Ack { id, status, home },
        });
    }

    /// A `Stored` ack for a flood we passed on: it goes back upstream once.
    pub fn relay_stored(
        &self,
        id: PacketId,
        home: Option<[u8; 32]>,
        dedup: &mut Dedup,
        out: &mut Vec<Action>,
    ) {
        if let Some(up) = dedup.ack_upstream(&id) {
            out.push(Action::Send {
                peer: up,
                frame: Frame::Ack {
                    id,
                    status: AckStatus::Stored,
                    home,
                },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::FakeView;
    use super::*;
    use crate::federation::dedup::Dedup;
    use crate::metrics::FederationMetrics;

    fn cx<'a>(
        view: &'a FakeView,
        dedup: &'a mut Dedup,
        m: &'a FederationMetrics,
        out: &'a mut Vec<Action>,
    ) -> Ctx<'a> {
        Ctx {
            view,
            dedup,
            m,
            out,
        }
    }
    use meshwhisper_crypto::destination::DestHash;

    fn key() -> (PeerId, RelayKey) {
        let p = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        (p, RelayKey::from_peer(&p).expect("ed25519"))
    }

    fn packet(dest: u8) -> Bytes {
        Bytes::from(packet::build(1, DestHash([dest; 8]), [0; 16], 7, b"hi"))
    }

    fn acks(out: &[Action]) -> Vec<(PeerId, AckStatus)> {
        out.iter()
            .filter_map(|a| match a {
                Action::Send {
                    peer,
                    frame: Frame::Ack { status, .. },
                } => Some((*peer, *status)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn routed_packets_are_stored_only_where_homed_unless_told_otherwise() {
        let (_, me) = key();
        let (sender, _) = key();
        let inb = Inbound::new(me, 3);
        let mut view = FakeView::with_streams(&[sender]);
        view.homed.insert(DestHash([1; 8]));
        let (mut d, m) = (Dedup::new(100, 1000), FederationMetrics::default());
        let mut out = Vec::new();
        let routed = |dest: u8, flags: u8, target: RelayKey| Frame::Routed {
            id: [dest; 16],
            flags,
            hops: 1,
            target: target.0,
            packet: packet(dest),
        };
        inb.packet(
            0,
            sender,
            routed(1, 0, me),
            &mut cx(&view, &mut d, &m, &mut out),
        );
        assert!(matches!(out[0], Action::Job(Job::Store { .. })));
        out.clear();
        inb.packet(
            0,
            sender,
            routed(2, 0, me),
            &mut cx(&view, &mut d, &m, &mut out),
        );
        assert_eq!(acks(&out), vec![(sender, AckStatus::NotHome)], "stale hint");
        out.clear();
        inb.packet(
            0,
            sender,
            routed(2, ROUTED_STORE_ANYWAY, me),
            &mut cx(&view, &mut d, &m, &mut out),
        );
        assert!(
            matches!(out[0], Action::Job(Job::Store { .. })),
            "store anyway"
        );
        out.clear();
        let (_, other) = key();
        inb.packet(
            0,
            sender,
            routed(1, 0, other),
            &mut cx(&view, &mut d, &m, &mut out),
        );
        assert_eq!(acks(&out), vec![(sender, AckStatus::NotTarget)]);
        out.clear();
        let bad = Frame::Routed {
            id: [9; 16],
            flags: 0,
            hops: 1,
            target: me.0,
            packet: Bytes::from_static(b"short"),
        };
        inb.packet(0, sender, bad, &mut cx(&view, &mut d, &m, &mut out));
        assert_eq!(acks(&out), vec![(sender, AckStatus::Malformed)]);
    }

    #[test]
    fn floods_pass_on_within_the_hop_cap_once_per_attempt() {
        let (_, me) = key();
        let (a, _) = key();
        let (b, _) = key();
        let inb = Inbound::new(me, 2);
        let view = FakeView::with_streams(&[a, b]);
        let (mut d, m) = (Dedup::new(100, 1000), FederationMetrics::default());
        let mut out = Vec::new();
        let fwd = |attempt: u8, hops: u8| Frame::Forward {
            id: [5; 16],
            attempt,
            hops,
            packet: packet(5),
        };
        inb.packet(0, a, fwd(0, 1), &mut cx(&view, &mut d, &m, &mut out));
        let onward: Vec<PeerId> = out
            .iter()
            .filter_map(|x| match x {
                Action::Send {
                    peer,
                    frame: Frame::Forward { hops: 2, .. },
                } => Some(*peer),
                _ => None,
            })
            .collect();
        assert_eq!(onward, vec![b], "to everyone but the sender");
        assert_eq!(acks(&out), vec![(a, AckStatus::Relayed)]);
        out.clear();
        inb.packet(1, b, fwd(0, 1), &mut cx(&view, &mut d, &m, &mut out));
        assert_eq!(acks(&out), vec![(b, AckStatus::Duplicate)]);
        out.clear();
        inb.packet(2, b, fwd(1, 2), &mut cx(&view, &mut d, &m, &mut out));
        assert_eq!(acks(&out), vec![(b, AckStatus::NotHome)], "hop cap");
        // A Stored ack from downstream goes back to the first sender, once.
        out.clear();
        inb.relay_stored([5; 16], Some([1; 32]), &mut d, &mut out);
        inb.relay_stored([5; 16], Some([1; 32]), &mut d, &mut out);
        assert_eq!(acks(&out), vec![(a, AckStatus::Stored)]);
    }

    #[test]
    fn stored_acks_of_floods_name_this_relay_and_of_routed_packets_do_not() {
        let (_, me) = key();
        let (s, _) = key();
        let inb = Inbound::new(me, 3);
        let mut d = Dedup::new(10, 10);
        let mut out = Vec::new();
        inb.stored(s, [1; 16], StoreOutcome::Stored, false, &mut d, &mut out);
        assert!(matches!(
            &out[0],
            Action::Send { frame: Frame::Ack { status: AckStatus::Stored, home: Some(h), .. }, .. } if *h == me.0
        ));
        out.clear();
        inb.stored(s, [2; 16], StoreOutcome::Stored, true, &mut d, &mut out);
        assert!(matches!(
            &out[0],
            Action::Send {
                frame: Frame::Ack {
                    status: AckStatus::Stored,
                    home: None,
                    ..
                },
                ..
            }
        ));
    }
}
