//! The transport stack relays and devices share, on tokio: TCP (no Nagle)
//! secured with TLS 1.3 (AES-GCM preferred, see [`crate::tls`]) or, with
//! peers that do not offer it, Noise, then yamux; and QUIC. Building a
//! Swarm opens no socket; its owner does, by listening and dialing.

use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{Swarm, noise, relay, tcp, yamux};
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
            (crate::tls::Config::new, noise::Config::new),
            yamux::Config::default,
        )
        .map_err(|e| Error(e.to_string()))?
        .with_quic()
        .with_behaviour(make)
        .map_err(|e| Error(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build())
}

/// A relay's Swarm: the shared transports plus circuit relay v2 (a relay
/// behind NAT listens and is dialled through an anchor's circuit, with the
/// same TLS-or-Noise and yamux on top). `make` gets the relay client
/// behaviour that drives the circuits.
pub fn build_relay_swarm<B: NetworkBehaviour>(
    key: Keypair,
    idle: Duration,
    make: impl FnOnce(
        &Keypair,
        relay::client::Behaviour,
    ) -> Result<B, Box<dyn std::error::Error + Send + Sync>>,
) -> Result<Swarm<B>, Error> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            (crate::tls::Config::new, noise::Config::new),
            yamux::Config::default,
        )
        .map_err(|e| Error(e.to_string()))?
        .with_quic()
        .with_relay_client(
            (crate::tls::Config::new, noise::Config::new),
            yamux::Config::default,
        )
        .map_err(|e| Error(e.to_string()))?
        .with_behaviour(make)
        .map_err(|e| Error(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .with_connection_timeout(DIAL_TIMEOUT)
        .build())
}

/// How long a relay's dial (connect and handshake) may take. Below the
/// 10 s an AutoNAT v2 client waits for its answer: a relay dialling back a
/// probed address behind a NAT that drops the SYN must give up, and say
/// so, before the prober stops listening (at libp2p's default of 10 s both
/// time out together and the prober learns nothing).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(8);

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;
    use libp2p::swarm::{SwarmEvent, dummy};

    /// A relay of an earlier version offers Noise only; ours still connects
    /// to it, and it to ours.
    #[tokio::test]
    async fn a_noise_only_peer_connects_both_ways() {
        let idle = Duration::from_secs(30);
        let ours = || {
            build_swarm(Keypair::generate_ed25519(), idle, |_| Ok(dummy::Behaviour)).expect("ours")
        };
        let noise_only = || {
            libp2p::SwarmBuilder::with_existing_identity(Keypair::generate_ed25519())
                .with_tokio()
                .with_tcp(
                    tcp::Config::default(),
                    noise::Config::new,
                    yamux::Config::default,
                )
                .expect("tcp")
                .with_behaviour(|_| dummy::Behaviour)
                .expect("behaviour")
                .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
                .build()
        };
        for ours_listens in [true, false] {
            let (mut a, mut b) = (ours(), noise_only());
            let (listener, dialer) = if ours_listens {
                (&mut a, &mut b)
            } else {
                (&mut b, &mut a)
            };
            listener
                .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("addr"))
                .expect("listen");
            let addr = loop {
                if let SwarmEvent::NewListenAddr { address, .. } = listener.select_next_some().await
                {
                    break address;
                }
            };
            dialer.dial(addr).expect("dial");
            let (mut up_a, mut up_b) = (false, false);
            tokio::time::timeout(Duration::from_secs(10), async {
                while !(up_a && up_b) {
                    tokio::select! {
                        e = a.select_next_some() => up_a |= matches!(e, SwarmEvent::ConnectionEstablished { .. }),
                        e = b.select_next_some() => up_b |= matches!(e, SwarmEvent::ConnectionEstablished { .. }),
                    }
                }
            })
            .await
            .expect("connected within 10 s");
        }
    }
}
