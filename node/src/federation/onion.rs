//! Onion transit (`federation.onion_transit`): a routed packet goes to its
//! home relay through `federation.onion_hops` extra relays chosen at random
//! from the gossiped topology, wrapped in onion v2 layers
//! (`meshwhisper_crypto::onion::v2`: every layer of an onion one size,
//! a replay tag per layer).
//!
//! - The **sender** builds the onion for `[extra relays…, home relay]`; the
//!   last layer holds the encoded `Routed` frame. It sends `Onion { hop,
//!   layer }` to the first relay under a fresh random hop id.
//! - A **relay on the path** peels its layer with its onion key (the X25519
//!   key its record names) and learns the next relay's key and nothing
//!   else: not the packet, not its destination hash, not the home relay
//!   unless that is the next relay. A layer that does not open is refused
//!   (`OnionAck Malformed`) and counted; a replayed layer (its tag seen
//!   before) is dropped and counted. It sends the peeled layer on under a
//!   hop id of its own and keeps it until the next relay answers.
//! - The **home relay** peels the last layer, finds the `Routed` frame,
//!   stores the packet as any routed packet and answers `OnionAck` with the
//!   `Ack` status (`Stored`…) under the hop id it came with.
//! - **Custody and acknowledgements**: each relay keeps what it sent on
//!   until the next one answers, and passes the answer back under the hop
//!   id it received. A relay learns from an answer only how the packet
//!   ended (stored or not), never where. Nothing is acknowledged before
//!   the home relay has stored the packet, so a relay on the path that dies
//!   loses nothing: the sender keeps the packet until the answer and, after
//!   the ack timeout, sends a new onion (new keys, new tags) by a new path.
//!
//! Pure state: time, randomness and the network are passed in.

use super::action::Action;
use crate::metrics::FederationMetrics;
use bytes::{Bytes, BytesMut};
use foldhash::{HashMap, HashMapExt as _};
use libp2p::PeerId;
use meshwhisper_behaviour::federation::codec::{AckStatus, FederationWire, Frame, PacketId};
use meshwhisper_behaviour::relay_key::RelayKey;
use meshwhisper_behaviour::stream::Wire as _;
use meshwhisper_crypto::onion::{self, OnionPeeler as _, Peeled, v2};
use meshwhisper_crypto::primitives::X25519Secret;
use std::sync::atomic::Ordering::Relaxed;

/// A carried layer not answered within this long is answered `NoPath`.
pub const CARRY_TIMEOUT_MS: u64 = 20_000;

/// Bounds (from `[federation]`).
#[derive(Debug, Clone, Copy)]
pub struct OnionConfig {
    /// Layers carried at once (`federation.transit_max`).
    pub max_entries: usize,
    /// Of those, from one relay (`federation.transit_per_peer`).
    pub max_per_peer: usize,
    /// Replay tags remembered (`federation.onion_replay_tags`).
    pub replay_tags: usize,
    /// For how long, ms (`federation.onion_replay_secs`).
    pub replay_ttl_ms: u64,
}

/// The onion state of one relay.
pub struct Onion {
    me: RelayKey,
    cfg: OnionConfig,
    peeler: v2::Relay,
    replay: onion::ReplayCache,
    /// Layers sent on, by our hop id, with the upstream's.
    carried: super::carried::Carried<[u8; 16], [u8; 16]>,
    /// Routed packets delivered here from an onion: their acks go back as
    /// `OnionAck` under the hop id they came with.
    delivered: HashMap<PacketId, (PeerId, [u8; 16])>,
    rng: rand_chacha::ChaCha20Rng,
}

impl std::fmt::Debug for Onion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Onion")
            .field("carried", &self.carried.len())
            .finish_non_exhaustive()
    }
}

/// A frame's bytes (type and body), as an onion's last layer holds it.
pub fn encode(frame: Frame) -> Bytes {
    let mut b = BytesMut::with_capacity(FederationWire::body_len(&frame));
    FederationWire::write(frame, &mut b);
    b.freeze()
}

fn decode(bytes: &[u8]) -> Option<Frame> {
    let (kind, body) = bytes.split_first()?;
    FederationWire::read(*kind, Bytes::copy_from_slice(body)).ok()
}

impl Onion {
    /// The onion state of relay `me`, whose onion secret is `secret`;
    /// `seed` seeds its randomness (ephemeral keys, hop ids).
    pub fn new(me: RelayKey, secret: X25519Secret, cfg: OnionConfig, seed: [u8; 32]) -> Self {
        Self {
            me,
            cfg,
            peeler: v2::Relay::new(secret),
            replay: onion::ReplayCache::new(cfg.replay_tags, cfg.replay_ttl_ms),
            carried: Default::default(),
            delivered: HashMap::new(),
            rng: <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::from_seed(seed),
        }
    }

    fn hop_id(&mut self) -> [u8; 16] {
        let mut h = [0u8; 16];
        rand_core::Rng::fill_bytes(&mut self.rng, &mut h);
        h
    }

    /// Layers carried for others now.
    pub fn carried_len(&self) -> usize {
        self.carried.len()
    }

    /// An `Onion` frame from `from`. Returns the `Routed` frame inside when
    /// this relay is the last hop (handle it as if `from` had sent it, then
    /// [`Onion::answers`]); otherwise the layer goes on, or is refused.
    #[allow(clippy::too_many_arguments)]
    pub fn receive(
        &mut self,
        now: u64,
        from: PeerId,
        hop: [u8; 16],
        layer: &[u8],
        stream_open: impl Fn(&PeerId) -> bool,
        m: &FederationMetrics,
        out: &mut Vec<Action>,
    ) -> Option<Frame> {
        let refuse = |status: AckStatus, out: &mut Vec<Action>| {
            m.onion_refused.fetch_add(1, Relaxed);
            out.push(Action::Send {
                peer: from,
                frame: Frame::OnionAck { hop, status },
            });
        };
        let peeled = match self.peeler.peel(layer) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(%from, error = %e, "onion layer refused");
                refuse(AckStatus::Malformed, out);
                return None;
            }
        };
        if let Some(tag) = peeled.replay_tag()
            && !self.replay.check_and_insert(tag, now)
        {
            // A replay: dropped without an answer.
            m.onion_replays.fetch_add(1, Relaxed);
            return None;
        }
        match peeled {
            Peeled::Deliver { packet, .. } => match decode(&packet) {
                Some(f @ Frame::Routed { id, target, .. }) if RelayKey(target) == self.me => {
                    if self.delivered.len() >= self.cfg.max_entries {
                        refuse(AckStatus::Refused, out);
                        return None;
                    }
                    self.delivered.insert(id, (from, hop));
                    m.onion_delivered.fetch_add(1, Relaxed);
                    Some(f)
                }
                _ => {
                    refuse(AckStatus::Malformed, out);
                    None
                }
            },
            Peeled::Forward {
                next_hop, layer, ..
            } => {
                let Some(next) = RelayKey(next_hop).to_peer().filter(|p| *p != from) else {
                    refuse(AckStatus::Malformed, out);
                    return None;
                };
                let theirs = self.carried.from(&from);
                if self.carried.len() >= self.cfg.max_entries || theirs >= self.cfg.max_per_peer {
                    refuse(AckStatus::NoPath, out);
                    return None;
                }
                let out_hop = self.hop_id();
                let entry = super::carried::Entry {
                    upstream: from,
                    to: next,
                    frame: Frame::Onion {
                        hop: out_hop,
                        layer: layer.into(),
                    },
                    deadline_ms: now + CARRY_TIMEOUT_MS,
                    sent: false,
                    extra: hop,
                };
                self.carried.carry(out_hop, entry, stream_open(&next), out);
                m.onion_relayed.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Acks among `out[mark..]` for packets delivered here from an onion
    /// become `OnionAck`s to the relay the onion came from.
    pub fn answers(&mut self, mark: usize, out: &mut [Action]) {
        if self.delivered.is_empty() {
            return;
        }
        for a in out.iter_mut().skip(mark) {
            if let Action::Send {
                frame: Frame::Ack { id, status, .. },
                ..
            } = a
                && let Some((peer, hop)) = self.delivered.remove(id)
            {
                *a = Action::Send {
                    peer,
                    frame: Frame::OnionAck {
                        hop,
                        status: *status,
                    },
                };
            }
        }
    }

    /// An `OnionAck` from `from`: an answer to a layer we carried goes
    /// back upstream (true), else it is not ours to pass on.
    pub fn ack(
        &mut self,
        from: PeerId,
        hop: [u8; 16],
        status: AckStatus,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(c) = self.carried.answered(&hop, &from) else {
            return false;
        };
        out.push(Action::Send {
            peer: c.upstream,
            frame: Frame::OnionAck {
                hop: c.extra,
                status,
            },
        });
        true
    }

    /// A stream to `peer` opened: layers waiting for it go.
    pub fn stream_opened(&mut self, peer: PeerId, out: &mut Vec<Action>) {
        self.carried.stream_opened(peer, out);
    }

    /// A stream to `peer` closed: what went on it goes again on the next.
    pub fn stream_closed(&mut self, peer: PeerId) {
        self.carried.stream_closed(peer);
    }

    /// Layers not answered in time are answered `NoPath` upstream.
    pub fn tick(&mut self, now: u64, m: &FederationMetrics, out: &mut Vec<Action>) {
        for (_, c) in self.carried.expired(now) {
            m.onion_refused.fetch_add(1, Relaxed);
            out.push(Action::Send {
                peer: c.upstream,
                frame: Frame::OnionAck {
                    hop: c.extra,
                    status: AckStatus::NoPath,
                },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwhisper_crypto::identity::IdentityKeyPair;
    use meshwhisper_crypto::onion::{Hop, OnionBuilder as _};

    struct R {
        peer: PeerId,
        key: RelayKey,
        onion: Onion,
        pubkey: meshwhisper_crypto::primitives::X25519Public,
    }

    fn relay(seed: u8) -> R {
        let id = IdentityKeyPair::from_seed(&[seed; 32]);
        let key = RelayKey(id.public().to_bytes());
        let cfg = OnionConfig {
            max_entries: 8,
            max_per_peer: 4,
            replay_tags: 100,
            replay_ttl_ms: 60_000,
        };
        R {
            peer: key.to_peer().expect("peer"),
            key,
            pubkey: id.public().x25519(),
            onion: Onion::new(key, id.x25519().clone(), cfg, [seed; 32]),
        }
    }

    fn routed(target: RelayKey) -> Frame {
        Frame::Routed {
            id: [7; 16],
            flags: 0,
            hops: 1,
            target: target.0,
            // A client packet: its header starts with the destination hash.
            packet: Bytes::from([[0xd5u8; 8].as_slice(), &[0x11; 200]].concat()),
        }
    }

    fn onion_for(path: &[&R], inner: Frame) -> Vec<u8> {
        let hops: Vec<Hop> = path
            .iter()
            .map(|r| Hop {
                relay_key: r.key.0,
                onion_key: r.pubkey,
            })
            .collect();
        let mut rng = <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::from_seed([3; 32]);
        v2::Sender
            .build(&mut rng, &hops, &encode(inner))
            .expect("onion")
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
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
    fn middle_relays_learn_only_the_next_hop_and_answers_come_back_hop_by_hop() {
        let sender = relay(1);
        let (mut m1, mut m2, mut home) = (relay(2), relay(3), relay(4));
        let m = FederationMetrics::default();
        let inner = routed(home.key);
        let layer = onion_for(&[&m1, &m2, &home], inner.clone());
        // What the first middle relay receives: neither the destination
        // hash nor the home relay's key is in it.
        assert!(!contains(&layer, &[0xd5; 8]));
        assert!(!contains(&layer, &home.key.0));
        let mut out = Vec::new();
        let r = m1
            .onion
            .receive(0, sender.peer, [1; 16], &layer, |_| true, &m, &mut out);
        assert!(r.is_none());
        let s = sent(&out);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, m2.peer, "the next hop, and only that");
        let Frame::Onion {
            hop: h2,
            layer: layer2,
        } = s[0].1.clone()
        else {
            panic!("{:?}", s[0].1)
        };
        assert_eq!(layer2.len(), layer.len(), "every layer one size");
        assert!(!contains(&layer2, &[0xd5; 8]));
        assert!(!contains(&layer2, &home.key.0));
        out.clear();
        m2.onion
            .receive(0, m1.peer, h2, &layer2, |_| true, &m, &mut out);
        let s = sent(&out);
        assert_eq!(s[0].0, home.peer);
        let Frame::Onion {
            hop: h3,
            layer: layer3,
        } = s[0].1.clone()
        else {
            panic!()
        };
        assert_eq!(layer3.len(), layer.len());
        // The home relay finds the routed packet.
        out.clear();
        let got = home
            .onion
            .receive(0, m2.peer, h3, &layer3, |_| true, &m, &mut out);
        assert_eq!(got, Some(inner));
        // Its ack (as inbound would send it) becomes an OnionAck to m2...
        let mut acts = vec![Action::Send {
            peer: m2.peer,
            frame: Frame::Ack {
                id: [7; 16],
                status: AckStatus::Stored,
                home: None,
            },
        }];
        home.onion.answers(0, &mut acts);
        assert_eq!(
            sent(&acts),
            vec![(
                m2.peer,
                Frame::OnionAck {
                    hop: h3,
                    status: AckStatus::Stored
                }
            )]
        );
        // ... which goes back under each hop's own id.
        out.clear();
        assert!(m2.onion.ack(home.peer, h3, AckStatus::Stored, &mut out));
        assert_eq!(
            sent(&out),
            vec![(
                m1.peer,
                Frame::OnionAck {
                    hop: h2,
                    status: AckStatus::Stored
                }
            )]
        );
        out.clear();
        assert!(m1.onion.ack(m2.peer, h2, AckStatus::Stored, &mut out));
        assert_eq!(
            sent(&out),
            vec![(
                sender.peer,
                Frame::OnionAck {
                    hop: [1; 16],
                    status: AckStatus::Stored
                }
            )]
        );
        assert_eq!(m.onion_relayed.load(Relaxed), 2);
        assert_eq!(m.onion_delivered.load(Relaxed), 1);
    }

    #[test]
    fn replays_are_dropped_and_bad_layers_refused() {
        let sender = relay(1);
        let (mut m1, home) = (relay(2), relay(4));
        let m = FederationMetrics::default();
        let layer = onion_for(&[&m1, &home], routed(home.key));
        let mut out = Vec::new();
        m1.onion
            .receive(0, sender.peer, [1; 16], &layer, |_| true, &m, &mut out);
        assert_eq!(sent(&out).len(), 1);
        // The same layer again, even under another hop id: dropped, silently.
        out.clear();
        m1.onion
            .receive(5, sender.peer, [2; 16], &layer, |_| true, &m, &mut out);
        assert!(out.is_empty());
        assert_eq!(m.onion_replays.load(Relaxed), 1);
        // A layer for another relay, or tampered with: refused, counted.
        let mut bad = layer.clone();
        bad[200] ^= 1;
        m1.onion
            .receive(6, sender.peer, [3; 16], &bad, |_| true, &m, &mut out);
        let not_mine = onion_for(&[&home], routed(home.key));
        m1.onion
            .receive(6, sender.peer, [4; 16], &not_mine, |_| true, &m, &mut out);
        assert_eq!(
            sent(&out),
            vec![
                (
                    sender.peer,
                    Frame::OnionAck {
                        hop: [3; 16],
                        status: AckStatus::Malformed
                    }
                ),
                (
                    sender.peer,
                    Frame::OnionAck {
                        hop: [4; 16],
                        status: AckStatus::Malformed
                    }
                )
            ]
        );
        assert_eq!(m.onion_refused.load(Relaxed), 2);
        // A last layer that names another relay as the target is refused too.
        let mut home2 = relay(4);
        let wrong = onion_for(&[&home2], routed(m1.key));
        out.clear();
        let got = home2
            .onion
            .receive(0, sender.peer, [5; 16], &wrong, |_| true, &m, &mut out);
        assert!(got.is_none());
        assert_eq!(sent(&out).len(), 1);
    }

    #[test]
    fn an_unanswered_layer_is_answered_no_path_and_resent_when_the_stream_opens() {
        let sender = relay(1);
        let (mut m1, home) = (relay(2), relay(4));
        let m = FederationMetrics::default();
        let layer = onion_for(&[&m1, &home], routed(home.key));
        let mut out = Vec::new();
        m1.onion
            .receive(0, sender.peer, [1; 16], &layer, |_| false, &m, &mut out);
        assert!(matches!(out[0], Action::Reach(p) if p == home.peer));
        out.clear();
        m1.onion.stream_opened(home.peer, &mut out);
        assert_eq!(sent(&out).len(), 1);
        out.clear();
        m1.onion.tick(CARRY_TIMEOUT_MS, &m, &mut out);
        assert_eq!(
            sent(&out),
            vec![(
                sender.peer,
                Frame::OnionAck {
                    hop: [1; 16],
                    status: AckStatus::NoPath
                }
            )]
        );
        assert_eq!(m1.onion.carried_len(), 0);
    }
}
