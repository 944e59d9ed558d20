//! The composed behaviour of a relay node. Fields are polled in declaration
//! order; each is documented.

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
}

impl Behaviour {
    /// The behaviour for `key`.
    pub fn new(key: &Keypair) -> Self {
        Self {
            identify: identify::Behaviour::new(identify::Config::new(
                PROTOCOL_VERSION.into(),
                key.public(),
            )),
            ping: ping::Behaviour::new(ping::Config::new()),
        }
    }
}
