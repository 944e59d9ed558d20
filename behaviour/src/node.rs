//! The composed behaviour of a relay node. Fields are polled in declaration
//! order; each is documented.

use crate::device;
use libp2p::{connection_limits, identify, identity::Keypair, ping, swarm::NetworkBehaviour};

/// Protocol name advertised by identify.
pub const PROTOCOL_VERSION: &str = "/meshwhisper/0.1.0";

/// Connection bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Established connections in total. Default 10 000.
    pub max_connections: u32,
    /// Incoming connections still handshaking. Default 256.
    pub max_pending_incoming: u32,
    /// Established connections per peer. Default 4 (at least 2 for hole punching).
    pub max_per_peer: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_pending_incoming: 256,
            max_per_peer: 4,
        }
    }
}

/// The node's behaviour.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Caps connections; first, so it decides before anything else sees a
    /// connection.
    pub limits: connection_limits::Behaviour,
    /// Tells peers our listen addresses and protocols, and learns theirs.
    pub identify: identify::Behaviour,
    /// Keeps connections measured and detects dead ones.
    pub ping: ping::Behaviour,
    /// Native devices' long-lived streams (`/meshwhisper/device/1`).
    pub device: device::Behaviour,
}

impl Behaviour {
    /// The behaviour for `key`, speaking the device protocol in `device.role`.
    pub fn new(key: &Keypair, device: device::Config, limits: Limits) -> Self {
        Self {
            limits: connection_limits::Behaviour::new(
                connection_limits::ConnectionLimits::default()
                    .with_max_established(Some(limits.max_connections))
                    .with_max_pending_incoming(Some(limits.max_pending_incoming))
                    .with_max_established_per_peer(Some(limits.max_per_peer)),
            ),
            identify: identify::Behaviour::new(identify::Config::new(
                PROTOCOL_VERSION.into(),
                key.public(),
            )),
            ping: ping::Behaviour::new(ping::Config::new()),
            device: device::Behaviour::new(device),
        }
    }
}
