//! What a relay needs to live behind NAT, and to help others who do: the
//! limits of the circuit relay v2 *server* a public relay runs for relays
//! that anchor on it, the AutoNAT v2 probe settings, and what tells a
//! relayed connection from a direct one.
//!
//! The protocols themselves are libp2p's (`relay`, `dcutr`,
//! `autonat::v2`); this module only sizes them. libp2p's relay defaults
//! (2 min and 128 KiB per circuit, 16 circuits) suit a short hop to a
//! hole punch; a federation stream lives for hours and carries every
//! packet between two relays, so ours are larger, and every one of them is
//! a setting.

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, relay};
use std::num::NonZeroU32;
use std::time::Duration;

/// The protocol a relay that serves as an anchor speaks (identify lists
/// it only while the relay server is enabled).
pub const HOP_PROTOCOL: &str = "/libp2p/circuit/relay/0.2.0/hop";

/// Whether `addr` goes through a relay's circuit.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// Limits of the anchor service (the circuit relay v2 server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnchorLimits {
    /// Reservations held at once, all relays together. Default 256.
    pub max_reservations: usize,
    /// Reservations one relay may hold at once. Default 2.
    pub max_reservations_per_peer: usize,
    /// How long a reservation lasts before it must be renewed (the client
    /// renews at three quarters). Default 1 h.
    pub reservation: Duration,
    /// New reservations (renewals included) one relay may make per
    /// minute, sustained; the burst is the same number. Default 10.
    pub reservations_per_peer_per_min: u32,
    /// New reservations per minute from one IP address. Default 30.
    pub reservations_per_ip_per_min: u32,
    /// Circuits open at once, all relays together. Default 1024.
    pub max_circuits: usize,
    /// Circuits one relay may have open at once (as either end counted
    /// when it opens one). Default 32.
    pub max_circuits_per_peer: usize,
    /// Longest life of one circuit; the federation stream on it is then
    /// re-opened (packets are kept until acked, so none is lost). Default 6 h.
    pub circuit_duration: Duration,
    /// Most bytes one circuit carries, both directions together (then it is
    /// closed and re-opened, as above). Default 1 GiB.
    pub circuit_bytes: u64,
    /// New circuits one relay may open per minute. Default 60.
    pub circuits_per_peer_per_min: u32,
    /// New circuits per minute from one IP address. Default 120.
    pub circuits_per_ip_per_min: u32,
}

impl Default for AnchorLimits {
    fn default() -> Self {
        Self {
            max_reservations: 256,
            max_reservations_per_peer: 2,
            reservation: Duration::from_secs(3600),
            reservations_per_peer_per_min: 10,
            reservations_per_ip_per_min: 30,
            max_circuits: 1024,
            max_circuits_per_peer: 32,
            circuit_duration: Duration::from_secs(6 * 3600),
            circuit_bytes: 1 << 30,
            circuits_per_peer_per_min: 60,
            circuits_per_ip_per_min: 120,
        }
    }
}

/// A limit that must be positive was zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("anchor limit {0} must be positive")]
pub struct ZeroLimit(pub &'static str);

impl AnchorLimits {
    /// Checks every limit is positive (libp2p treats zero as "none
    /// allowed", never as "unlimited").
    pub fn validate(&self) -> Result<(), ZeroLimit> {
        let checks: [(&'static str, u64); 11] = [
            ("max_reservations", self.max_reservations as u64),
            (
                "max_reservations_per_peer",
                self.max_reservations_per_peer as u64,
            ),
            ("reservation_secs", self.reservation.as_secs()),
            (
                "reservations_per_peer_per_min",
                self.reservations_per_peer_per_min.into(),
            ),
            (
                "reservations_per_ip_per_min",
                self.reservations_per_ip_per_min.into(),
            ),
            ("max_circuits", self.max_circuits as u64),
            ("max_circuits_per_peer", self.max_circuits_per_peer as u64),
            ("circuit_secs", self.circuit_duration.as_secs()),
            ("circuit_bytes", self.circuit_bytes),
            (
                "circuits_per_peer_per_min",
                self.circuits_per_peer_per_min.into(),
            ),
            (
                "circuits_per_ip_per_min",
                self.circuits_per_ip_per_min.into(),
            ),
        ];
        match checks.iter().find(|(_, v)| *v == 0) {
            Some((name, _)) => Err(ZeroLimit(name)),
            None => Ok(()),
        }
    }

    /// The relay server's configuration. Zero rates (refused by
    /// [`validate`](Self::validate)) are taken as one.
    pub fn relay_config(&self) -> relay::Config {
        // libp2p's limiter refills one token per `interval` up to `limit`:
        // n a minute sustained, with a burst of n.
        let rate = |n: u32| {
            let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
            (n, Duration::from_secs(60) / n.get())
        };
        let c = relay::Config {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: self.max_reservations_per_peer,
            reservation_duration: self.reservation,
            reservation_rate_limiters: Vec::new(),
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_duration: self.circuit_duration,
            max_circuit_bytes: self.circuit_bytes,
            circuit_src_rate_limiters: Vec::new(),
        };
        let (n, every) = rate(self.reservations_per_peer_per_min);
        let c = c.reservation_rate_per_peer(n, every);
        let (n, every) = rate(self.reservations_per_ip_per_min);
        let c = c.reservation_rate_per_ip(n, every);
        let (n, every) = rate(self.circuits_per_peer_per_min);
        let c = c.circuit_src_per_peer(n, every);
        let (n, every) = rate(self.circuits_per_ip_per_min);
        c.circuit_src_per_ip(n, every)
    }
}

/// The NAT-related parts of a relay's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Run the anchor service (it stays disabled until the relay is found
    /// or declared public). `None`: never serve.
    pub serve: Option<AnchorLimits>,
    /// Ask other relays to dial our observed addresses back (AutoNAT v2),
    /// to learn whether we are reachable.
    pub probe: bool,
    /// How often untested address candidates are probed. Default 5 s.
    pub probe_interval: Duration,
    /// Try hole punching (DCUtR) on connections that came through a
    /// circuit. Default on.
    pub hole_punch: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            serve: Some(AnchorLimits::default()),
            probe: true,
            probe_interval: Duration::from_secs(5),
            hole_punch: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_addresses_are_told_from_direct_ones() {
        let relayed: Multiaddr =
            "/ip4/203.0.113.10/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit"
                .parse()
                .expect("addr");
        let direct: Multiaddr = "/ip4/203.0.113.10/tcp/4001".parse().expect("addr");
        assert!(is_relayed(&relayed));
        assert!(!is_relayed(&direct));
    }

    #[test]
    fn a_zero_limit_is_refused_by_name() {
        assert_eq!(AnchorLimits::default().validate(), Ok(()));
        let l = AnchorLimits {
            circuit_bytes: 0,
            ..AnchorLimits::default()
        };
        assert_eq!(l.validate(), Err(ZeroLimit("circuit_bytes")));
    }

    #[test]
    fn the_relay_config_carries_our_limits_not_libp2ps() {
        let c = AnchorLimits::default().relay_config();
        assert_eq!(c.max_circuit_duration, Duration::from_secs(6 * 3600));
        assert_eq!(c.max_circuit_bytes, 1 << 30);
        assert_eq!(c.max_reservations_per_peer, 2);
        assert_eq!(c.reservation_rate_limiters.len(), 2);
        assert_eq!(c.circuit_src_rate_limiters.len(), 2);
    }
}
