//! A private relay's anchors: the public relays it holds circuit relay
//! reservations on, so that others reach it by key through their circuits.
//!
//! Sans-io: the Swarm owner tells it which relays could anchor us (admitted
//! relays that serve the hop protocol and that we reached directly, with
//! the address we reached them at), what became of each reservation, and
//! the time; it answers with listeners to open and close. It keeps `want`
//! anchors while the relay is private and none otherwise; an anchor that
//! refuses or drops us is not asked again for `retry_ms`, and another is
//! chosen at the next tick, so a relay whose anchor dies re-anchors (and
//! republishes its record) within a tick or two.

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use std::collections::{BTreeMap, HashMap};

/// A reservation not confirmed within this long is given up.
pub const RESERVE_TIMEOUT_MS: u64 = 20_000;

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Listen on `addr` (`<anchor's address>/p2p/<anchor>/p2p-circuit`):
    /// the relay client reserves a slot there. Answer with
    /// [`Anchors::listening`] or [`Anchors::listen_failed`].
    Listen {
        /// The anchor.
        anchor: PeerId,
        /// The circuit listen address.
        addr: Multiaddr,
    },
    /// Close this anchor's listener (and so its reservation).
    Close {
        /// The anchor.
        anchor: PeerId,
        /// Its listener.
        listener: libp2p::core::transport::ListenerId,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `listen_on` was asked for; no listener id yet.
    Asked { since_ms: u64 },
    /// Listening; the reservation is not confirmed yet.
    Reserving {
        listener: libp2p::core::transport::ListenerId,
        since_ms: u64,
    },
    /// The anchor holds our reservation.
    Held {
        listener: libp2p::core::transport::ListenerId,
    },
}

/// The anchoring state.
#[derive(Debug)]
pub struct Anchors {
    want: usize,
    retry_ms: u64,
    active: bool,
    anchors: BTreeMap<PeerId, State>,
    /// Anchors not to ask again before the given time.
    resting: HashMap<PeerId, u64>,
    /// The anchors held changed since [`take_changed`](Self::take_changed).
    changed: bool,
}

impl Anchors {
    /// Keeps `want` anchors while active; a failed anchor rests `retry_ms`.
    pub fn new(want: usize, retry_ms: u64) -> Self {
        Self {
            want,
            retry_ms,
            active: false,
            anchors: BTreeMap::new(),
            resting: HashMap::new(),
            changed: false,
        }
    }

    /// Anchors holding our reservation, in key order.
    pub fn held(&self) -> impl Iterator<Item = &PeerId> {
        self.anchors
            .iter()
            .filter(|(_, s)| matches!(s, State::Held { .. }))
            .map(|(p, _)| p)
    }

    /// Whether the anchors held changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Whether `peer` is one of our anchors (held or being asked).
    pub fn is_anchor(&self, peer: &PeerId) -> bool {
        self.anchors.contains_key(peer)
    }

    /// Timers and choices. `active`: the relay is private (it anchors
    /// itself); `candidates`: relays that could anchor us, in order of
    /// preference, each with the address we reached it at.
    pub fn tick(
        &mut self,
        now: u64,
        active: bool,
        candidates: &[(PeerId, Multiaddr)],
        out: &mut Vec<Action>,
    ) {
        self.resting.retain(|_, until| *until > now);
        if !active {
            if self.active {
                for (anchor, s) in std::mem::take(&mut self.anchors) {
                    self.changed |= matches!(s, State::Held { .. });
                    if let State::Reserving { listener, .. } | State::Held { listener } = s {
                        out.push(Action::Close { anchor, listener });
                    }
                }
            }
            self.active = false;
            return;
        }
        self.active = true;
        // Reservations that never came.
        let stale: Vec<(PeerId, State)> = self
            .anchors
            .iter()
            .filter(|(_, s)| match s {
                State::Asked { since_ms } | State::Reserving { since_ms, .. } => {
                    now.saturating_sub(*since_ms) >= RESERVE_TIMEOUT_MS
                }
                State::Held { .. } => false,
            })
            .map(|(p, s)| (*p, *s))
            .collect();
        for (anchor, s) in stale {
            self.anchors.remove(&anchor);
            self.resting.insert(anchor, now + self.retry_ms);
            if let State::Reserving { listener, .. } = s {
                out.push(Action::Close { anchor, listener });
            }
        }
        for (peer, addr) in candidates {
            if self.anchors.len() >= self.want {
                break;
            }
            if self.anchors.contains_key(peer) || self.resting.contains_key(peer) {
                continue;
            }
            self.anchors.insert(*peer, State::Asked { since_ms: now });
            out.push(Action::Listen {
                anchor: *peer,
                addr: circuit_addr(addr, peer),
            });
        }
    }

    /// `listen_on` for `anchor` gave `listener`.
    pub fn listening(
        &mut self,
        anchor: PeerId,
        listener: libp2p::core::transport::ListenerId,
        now: u64,
    ) {
        if let Some(s) = self.anchors.get_mut(&anchor) {
            *s = State::Reserving {
                listener,
                since_ms: now,
            };
        }
    }

    /// `listen_on` for `anchor` failed at once.
    pub fn listen_failed(&mut self, anchor: PeerId, now: u64) {
        self.anchors.remove(&anchor);
        self.resting.insert(anchor, now + self.retry_ms);
    }

    /// `anchor` accepted our reservation (a renewal changes nothing).
    pub fn reserved(&mut self, anchor: PeerId) {
        if let Some(s) = self.anchors.get_mut(&anchor)
            && let State::Reserving { listener, .. } = *s
        {
            *s = State::Held { listener };
            self.changed = true;
        }
    }

    /// A listener closed (the anchor refused us, dropped the connection or
    /// died); its anchor rests and another is chosen at the next tick.
    pub fn closed(&mut self, listener: libp2p::core::transport::ListenerId, now: u64) {
        let found = self.anchors.iter().find_map(|(p, s)| match s {
            State::Reserving { listener: l, .. } | State::Held { listener: l }
                if *l == listener =>
            {
                Some((*p, matches!(s, State::Held { .. })))
            }
            _ => None,
        });
        if let Some((anchor, was_held)) = found {
            self.anchors.remove(&anchor);
            self.resting.insert(anchor, now + self.retry_ms);
            self.changed |= was_held;
        }
    }
}

/// `<addr>/p2p/<anchor>/p2p-circuit`, `addr` without any `/p2p` of its own.
pub fn circuit_addr(addr: &Multiaddr, anchor: &PeerId) -> Multiaddr {
    let mut a: Multiaddr = addr
        .iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect();
    a.push(Protocol::P2p(*anchor));
    a.push(Protocol::P2pCircuit);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::core::transport::ListenerId;

    fn peers(n: usize) -> Vec<(PeerId, Multiaddr)> {
        (0..n)
            .map(|i| {
                (
                    PeerId::random(),
                    format!("/ip4/203.0.113.{}/tcp/4001", 10 + i)
                        .parse()
                        .expect("addr"),
                )
            })
            .collect()
    }

    fn listens(out: &[Action]) -> Vec<PeerId> {
        out.iter()
            .filter_map(|a| match a {
                Action::Listen { anchor, .. } => Some(*anchor),
                Action::Close { .. } => None,
            })
            .collect()
    }

    /// Asks, confirms with fresh listener ids; returns them.
    fn hold(a: &mut Anchors, out: &[Action], now: u64) -> Vec<(PeerId, ListenerId)> {
        listens(out)
            .into_iter()
            .map(|p| {
                let l = ListenerId::next();
                a.listening(p, l, now);
                a.reserved(p);
                (p, l)
            })
            .collect()
    }

    #[test]
    fn a_private_relay_asks_for_want_anchors_with_circuit_addresses() {
        let c = peers(4);
        let mut a = Anchors::new(2, 30_000);
        let mut out = Vec::new();
        a.tick(0, true, &c, &mut out);
        assert_eq!(listens(&out), vec![c[0].0, c[1].0]);
        let Action::Listen { addr, .. } = &out[0] else {
            panic!("listen first")
        };
        assert_eq!(
            addr.to_string(),
            format!("/ip4/203.0.113.10/tcp/4001/p2p/{}/p2p-circuit", c[0].0)
        );
        // Asked, not yet held: no more asks, and the record has no anchors.
        let first = std::mem::take(&mut out);
        a.tick(1000, true, &c, &mut out);
        assert!(out.is_empty());
        assert_eq!(a.held().count(), 0);
        assert!(!a.take_changed());
        hold(&mut a, &first, 1000);
        assert_eq!(a.held().count(), 2);
        assert!(a.take_changed());
    }

    #[test]
    fn a_lost_anchor_is_replaced_at_the_next_tick_and_rests() {
        let c = peers(3);
        let mut a = Anchors::new(2, 30_000);
        let mut out = Vec::new();
        a.tick(0, true, &c, &mut out);
        let held = hold(&mut a, &out, 0);
        a.take_changed();
        // The first anchor dies: its listener closes.
        a.closed(held[0].1, 5_000);
        assert!(a.take_changed());
        assert_eq!(a.held().copied().collect::<Vec<_>>(), vec![held[1].0]);
        out.clear();
        a.tick(5_100, true, &c, &mut out);
        assert_eq!(
            listens(&out),
            vec![c[2].0],
            "the third relay, not the dead one"
        );
        // Once rested, the first is a candidate again (if another goes).
        let third = hold(&mut a, &out, 5_100);
        a.closed(third[0].1, 40_000);
        out.clear();
        a.tick(40_000, true, &c, &mut out);
        assert_eq!(listens(&out), vec![c[0].0]);
    }

    #[test]
    fn a_reservation_that_never_comes_is_given_up() {
        let c = peers(3);
        let mut a = Anchors::new(1, 30_000);
        let mut out = Vec::new();
        a.tick(0, true, &c, &mut out);
        let l = ListenerId::next();
        a.listening(c[0].0, l, 0);
        out.clear();
        a.tick(RESERVE_TIMEOUT_MS, true, &c, &mut out);
        assert_eq!(
            out,
            vec![
                Action::Close {
                    anchor: c[0].0,
                    listener: l
                },
                Action::Listen {
                    anchor: c[1].0,
                    addr: circuit_addr(&c[1].1, &c[1].0)
                }
            ]
        );
    }

    #[test]
    fn a_relay_found_public_lets_its_anchors_go() {
        let c = peers(2);
        let mut a = Anchors::new(2, 30_000);
        let mut out = Vec::new();
        a.tick(0, true, &c, &mut out);
        let held = hold(&mut a, &out, 0);
        a.take_changed();
        out.clear();
        a.tick(1, false, &c, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|o| matches!(o, Action::Close { .. })));
        assert!(held.iter().all(|(p, _)| !a.is_anchor(p)));
        assert!(a.take_changed());
        out.clear();
        a.tick(2, false, &c, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn a_failed_listen_rests_its_anchor() {
        let c = peers(2);
        let mut a = Anchors::new(1, 30_000);
        let mut out = Vec::new();
        a.tick(0, true, &c, &mut out);
        a.listen_failed(c[0].0, 0);
        out.clear();
        a.tick(1, true, &c, &mut out);
        assert_eq!(listens(&out), vec![c[1].0]);
    }
}
