//! The composed behaviour of a relay node. Fields are polled in declaration
//! order; each is documented.

use crate::device;
use libp2p::{identify, identity::Keypair, ping, swarm::NetworkBehaviour};

/// Protocol name advertised by identify.
pub const PROTOCOL_VERSION: &str = "/meshwhisper/0.1.0";

/// The node's behaviour.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Tells peers our listen addresses and protocols, and learns theirs.
    pub identify: identify::Behaviour,
    /// Keeps connections measured and detects dead ones.
    pub ping: ping::Behaviour,
    /// Native devices' long-lived streams (`/meshwhisper/device/1`).
    pub device: device::Behaviour,
}

impl Behaviour {
    /// The behaviour for `key`, speaking the device protocol in `role`.
    pub fn new(key: &Keypair, device: device::Config) -> Self {
        Self {
            identify: identify::Behaviour::new(identify::Config::new(
                PROTOCOL_VERSION.into(),
                key.public(),
            )),
            ping: ping::Behaviour::new(ping::Config::new()),
            device: device::Behaviour::new(device),
        }
    }
}
