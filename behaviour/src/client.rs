//! The composed behaviour of a device (the client SDK): no federation, no
//! gossip, no DHT, so identify never makes a device look like a relay.
//! Fields are polled in declaration order; each is documented.

use crate::device;
use crate::node::{Limits, identify_behaviour};
use libp2p::{connection_limits, identify, identity::Keypair, ping, swarm::NetworkBehaviour};

/// A device's behaviour.
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
            limits: limits.behaviour(),
            identify: identify_behaviour(key),
            ping: ping::Behaviour::new(ping::Config::new()),
            device: device::Behaviour::new(device),
        }
    }
}
