//! Relays behind NAT, and the public relays that help them.
//!
//! - [`reachability`]: whether this relay is public (sans-io).
//! - [`anchors`]: a private relay's reservations on public relays
//!   (sans-io).
//! - [`Driver`]: applies both to the Swarm and reads the NAT protocols'
//!   events (AutoNAT v2, circuit relay client and server, DCUtR) for them
//!   and for the metrics.
//!
//! See docs/nat.md for what a relay does and who learns what.

pub mod anchors;
pub mod reachability;

use crate::metrics::NatMetrics;
use libp2p::core::ConnectedPoint;
use libp2p::{Multiaddr, PeerId, Swarm, autonat, dcutr, relay};
use meshwhisper_behaviour::nat::{HOP_PROTOCOL, is_relayed};
use meshwhisper_behaviour::node::Behaviour;
use reachability::Status;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// What `/health` says about reachability.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatStatus {
    /// `unknown`, `public` or `private`.
    pub reachability: &'static str,
    /// The anchors holding our reservation.
    pub anchors: Vec<PeerId>,
    /// Federation peers reached through a circuit.
    pub via_circuit: Vec<PeerId>,
}

/// The NAT part of the Swarm task.
#[derive(Debug)]
pub struct Driver {
    reach: reachability::Reachability,
    anchors: anchors::Anchors,
    /// Relays that serve the hop protocol (identify told us).
    hop: HashMap<PeerId, bool>,
    /// The direct address we dialed each connected relay at (what an
    /// anchor's circuit address starts with).
    dialed_at: HashMap<PeerId, Multiaddr>,
    serving: bool,
    metrics: Arc<crate::metrics::Metrics>,
    /// The circuit address we dialled each relay at (we may dial it again).
    circuit_at: HashMap<PeerId, Multiaddr>,
    /// Relays whose hole punch failed: when to try again, and how many
    /// tries are left.
    punch_again: HashMap<PeerId, (u64, u8)>,
}

/// Hole punches tried again after a failure (DCUtR itself tries three
/// dials at once; a NAT mapping that raced those often lets a later try
/// through).
const PUNCH_RETRIES: u8 = 3;
/// The first retry comes this long after the failure, then twice as long.
const PUNCH_RETRY_MS: u64 = 5_000;
/// Relays whose hole punch is remembered as failed, at most.
const MAX_PUNCH_RETRIES: usize = 1024;

impl Driver {
    /// The driver for these settings.
    pub fn new(cfg: &crate::config::Nat, metrics: Arc<crate::metrics::Metrics>) -> Self {
        let d = Self {
            reach: reachability::Reachability::new(cfg.reachability, cfg.private_after),
            anchors: anchors::Anchors::new(cfg.anchors, cfg.anchor_retry_secs.saturating_mul(1000)),
            hop: HashMap::new(),
            dialed_at: HashMap::new(),
            serving: false,
            metrics,
            circuit_at: HashMap::new(),
            punch_again: HashMap::new(),
        };
        d.m().reachability.store(d.reach.status().gauge(), Relaxed);
        d
    }

    fn m(&self) -> &NatMetrics {
        &self.metrics.nat
    }

    /// The current reachability.
    pub fn status(&self) -> Status {
        self.reach.status()
    }

    /// Anchors holding our reservation.
    pub fn anchors(&self) -> Vec<PeerId> {
        self.anchors.held().copied().collect()
    }

    /// A listen address is up: a relay declared public advertises it
    /// (loopback addresses aside: they name another host to everyone
    /// else; `--external-addr` declares one where it is meant).
    pub fn on_listen_addr(&mut self, swarm: &mut Swarm<Behaviour>, addr: &Multiaddr) {
        if self.reach.mode() == crate::config::Reachability::Public
            && !is_relayed(addr)
            && !is_unspecified_or_loopback(addr)
        {
            swarm.add_external_address(addr.clone());
        }
    }

    /// A connection was established.
    pub fn on_connected(&mut self, peer: PeerId, endpoint: &ConnectedPoint) {
        if let ConnectedPoint::Dialer { address, .. } = endpoint {
            if is_relayed(address) {
                self.circuit_at.insert(peer, address.clone());
            } else {
                self.dialed_at.insert(peer, address.clone());
                self.punch_again.remove(&peer);
            }
        }
    }

    /// The last connection to `peer` closed.
    pub fn on_disconnected(&mut self, peer: &PeerId) {
        self.dialed_at.remove(peer);
        self.hop.remove(peer);
        // (`punch_again` stays: a retry closes and redials the circuit,
        // and its count must survive that.)
        self.circuit_at.remove(peer);
    }

    /// identify told us what `peer` speaks.
    pub fn on_identified(&mut self, peer: PeerId, info: &libp2p::identify::Info) {
        let hop = info.protocols.iter().any(|p| p.as_ref() == HOP_PROTOCOL);
        self.hop.insert(peer, hop);
    }

    /// The Swarm confirmed an external address (a probe, an anchor's
    /// reservation, or the operator).
    pub fn on_external_confirmed(&mut self, addr: &Multiaddr) {
        if !is_relayed(addr) {
            self.reach.confirmed(addr.clone());
        }
    }

    /// An external address expired.
    pub fn on_external_expired(&mut self, addr: &Multiaddr) {
        self.reach.expired(addr);
    }

    /// An AutoNAT v2 probe of one of our addresses finished.
    pub fn on_probe(&mut self, e: &autonat::v2::client::Event) {
        match &e.result {
            Ok(()) => {
                self.m().probes_ok.fetch_add(1, Relaxed);
                tracing::info!(addr = %e.tested_addr, server = %e.server, "address reachable");
            }
            // A relayed connection's "observed address" (`/p2p/<us>`, no
            // IP) is probed too; it says nothing about our reachability.
            Err(_) if !has_ip(&e.tested_addr) || is_relayed(&e.tested_addr) => {}
            Err(err) => {
                self.m().probes_failed.fetch_add(1, Relaxed);
                self.reach.probe_failed();
                tracing::info!(addr = %e.tested_addr, server = %e.server, error = %err, "address not reachable");
            }
        }
    }

    /// Our side of circuits: reservations on our anchors.
    pub fn on_relay_client(&mut self, e: &relay::client::Event) {
        if let relay::client::Event::ReservationReqAccepted {
            relay_peer_id,
            renewal,
            ..
        } = e
        {
            if !renewal {
                tracing::info!(anchor = %relay_peer_id, "anchored");
            }
            self.anchors.reserved(*relay_peer_id);
        }
    }

    /// A listener closed: maybe an anchor's.
    pub fn on_listener_closed(&mut self, listener: libp2p::core::transport::ListenerId) {
        let before = self.anchors.held().count();
        self.anchors.closed(listener, crate::core::now_ms());
        if self.anchors.held().count() < before {
            self.m().reanchors.fetch_add(1, Relaxed);
            tracing::warn!("lost an anchor; choosing another");
        }
    }

    /// The anchor service's events, counted.
    pub fn on_relay_server(&mut self, e: &relay::Event) {
        let m = self.m();
        match e {
            relay::Event::ReservationReqAccepted { renewed: false, .. } => {
                m.reservations_served.fetch_add(1, Relaxed);
            }
            relay::Event::ReservationClosed { .. } | relay::Event::ReservationTimedOut { .. } => {
                dec(&m.reservations_served)
            }
            relay::Event::ReservationReqDenied { src_peer_id, .. } => {
                m.reservations_refused.fetch_add(1, Relaxed);
                tracing::debug!(peer = %src_peer_id, "reservation refused");
            }
            relay::Event::CircuitReqAccepted { .. } => {
                m.circuits_open.fetch_add(1, Relaxed);
            }
            relay::Event::CircuitClosed { .. } => dec(&m.circuits_open),
            relay::Event::CircuitReqDenied { src_peer_id, .. } => {
                m.circuits_refused.fetch_add(1, Relaxed);
                tracing::debug!(peer = %src_peer_id, "circuit refused");
            }
            _ => {}
        }
    }

    /// A hole punch finished.
    pub fn on_hole_punch(&mut self, e: &dcutr::Event) {
        let m = self.m();
        m.hole_punch_attempts.fetch_add(1, Relaxed);
        match &e.result {
            Ok(_) => {
                m.hole_punch_successes.fetch_add(1, Relaxed);
                tracing::info!(peer = %e.remote_peer_id, "hole punched: direct connection");
            }
            Err(err) => {
                tracing::info!(peer = %e.remote_peer_id, error = %err, "hole punch failed; staying on the circuit");
                // The end that dialled the circuit tries again later.
                if self.circuit_at.contains_key(&e.remote_peer_id) {
                    let now = crate::core::now_ms();
                    let known = self.punch_again.get(&e.remote_peer_id).copied();
                    let left = known.map_or(PUNCH_RETRIES, |(_, l)| l);
                    if left > 0 && (known.is_some() || self.punch_again.len() < MAX_PUNCH_RETRIES) {
                        let wait = PUNCH_RETRY_MS << (PUNCH_RETRIES - left);
                        self.punch_again
                            .insert(e.remote_peer_id, (now + wait, left - 1));
                    }
                }
            }
        }
    }

    /// Hole punches due again: while a relay is still reached through a
    /// circuit only, that circuit is closed and dialled anew (DCUtR runs
    /// on every new circuit). Unacknowledged packets on it are resent.
    fn punch_again(&mut self, swarm: &mut Swarm<Behaviour>, now: u64) {
        let due: Vec<PeerId> = self
            .punch_again
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            let Some((_, left)) = self.punch_again.get_mut(&peer) else {
                continue;
            };
            let left = *left;
            // Not again unless this try fails too.
            self.punch_again.insert(peer, (u64::MAX, left));
            let b = swarm.behaviour();
            if b.federation.is_direct(&peer) != Some(false) {
                continue;
            }
            let Some(addr) = self.circuit_at.get(&peer).cloned() else {
                continue;
            };
            let conns = b.federation.relayed_connections(&peer);
            tracing::info!(%peer, "trying the hole punch again");
            for c in conns {
                swarm.close_connection(c);
            }
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                .addresses(vec![addr])
                .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
                .build();
            if let Err(e) = swarm.dial(opts) {
                tracing::debug!(%peer, error = %e, "redialling the circuit failed");
            }
        }
    }

    /// Timers and choices: the anchor service on while public, anchors
    /// kept while private. `admitted` tells admitted relays. Returns the
    /// anchors' keys when they changed (our record must name them).
    pub fn tick(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        now: u64,
        admitted: impl Fn(&PeerId) -> bool,
    ) -> Option<Vec<PeerId>> {
        self.punch_again(swarm, now);
        let status = self.reach.status();
        self.m().reachability.store(status.gauge(), Relaxed);
        let serve = status == Status::Public;
        if serve != self.serving
            && let Some(r) = swarm.behaviour_mut().relay_server.as_mut()
        {
            r.set_status(Some(if serve {
                relay::Status::Enable
            } else {
                relay::Status::Disable
            }));
            tracing::info!(
                reachability = status.label(),
                serving = serve,
                "anchor service"
            );
            self.serving = serve;
        }
        let mut candidates: Vec<(PeerId, Multiaddr)> = self
            .dialed_at
            .iter()
            .filter(|(p, _)| self.hop.get(*p).copied().unwrap_or(false) && admitted(p))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        candidates.sort_by_key(|c| c.0);
        let mut out = Vec::new();
        self.anchors
            .tick(now, status == Status::Private, &candidates, &mut out);
        for a in out {
            match a {
                anchors::Action::Listen { anchor, addr } => match swarm.listen_on(addr.clone()) {
                    Ok(id) => {
                        tracing::debug!(%anchor, %addr, "reserving");
                        self.anchors.listening(anchor, id, now);
                    }
                    Err(e) => {
                        tracing::warn!(%anchor, %addr, error = %e, "cannot reserve on anchor");
                        self.anchors.listen_failed(anchor, now);
                    }
                },
                anchors::Action::Close { listener, .. } => {
                    swarm.remove_listener(listener);
                }
            }
        }
        self.m()
            .anchors_held
            .store(self.anchors.held().count() as u64, Relaxed);
        self.anchors.take_changed().then(|| self.anchors())
    }
}

fn dec(a: &std::sync::atomic::AtomicU64) {
    let _ = a.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(1)));
}

/// Whether `addr` names an IP address.
fn has_ip(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| {
        matches!(
            p,
            libp2p::multiaddr::Protocol::Ip4(_) | libp2p::multiaddr::Protocol::Ip6(_)
        )
    })
}

/// `0.0.0.0` / `::` (what a relay listens on, not where it is) and
/// loopback addresses.
fn is_unspecified_or_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(ip) => ip.is_unspecified() || ip.is_loopback(),
        libp2p::multiaddr::Protocol::Ip6(ip) => ip.is_unspecified() || ip.is_loopback(),
        _ => false,
    })
}
