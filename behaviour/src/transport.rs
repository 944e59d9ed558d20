//! The transport stack relays and devices share: TCP (no Nagle) and QUIC,
//! Noise, yamux, on tokio. Building a Swarm opens no socket; its owner does,
//! by listening and dialing.

use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{Swarm, noise, tcp, yamux};
use std::time::Duration;

/// The stack could not be built.
#[derive(Debug, thiserror::Error)]
#[error("building the libp2p transport: {0}")]
pub struct Error(String);

/// A Swarm for `key` over the shared transports, with the behaviour `make`
/// builds; idle connections close after `idle`.
pub fn build_swarm<B: NetworkBehaviour>(
    key: Keypair,
    idle: Duration,
    make: impl FnOnce(&Keypair) -> Result<B, Box<dyn std::error::Error + Send + Sync>>,
) -> Result<Swarm<B>, Error> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| Error(e.to_string()))?
        .with_quic()
        .with_behaviour(make)
        .map_err(|e| Error(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build())
}
