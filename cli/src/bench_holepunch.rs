//! `meshwhisper bench holepunch`: one hole punch between two hosts behind
//! NAT through a relay's anchor service, on the relay's own transports
//! (TCP with TLS or Noise and yamux, or QUIC) with libp2p's DCUtR.
//! `scripts/bench-holepunch.sh` runs it many times in `testnet/nat.sh`'s
//! namespaces, each attempt with fresh keys and fresh ports (so fresh NAT
//! mappings), and reports the success rate and the time to a direct
//! connection.
//!
//! - `--role listen`: reserves a slot on the anchor and prints
//!   `reserved=<PeerId>`, then waits (until killed, or `--secs`).
//! - `--role dial --peer <PeerId>`: dials that peer through the anchor's
//!   circuit and prints one JSON line: `{"ok":true,"ms":…}` when DCUtR gave
//!   a direct connection, `{"ok":false,"ms":…,"error":"…"}` otherwise.

use anyhow::Context as _;
use futures::StreamExt as _;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, dcutr, identify, identity::Keypair, ping, relay};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct HolepunchBench {
    /// `listen` (reserve on the anchor and wait) or `dial`.
    #[arg(long)]
    role: Role,
    /// The anchor relay: a multiaddr ending in /p2p/<PeerId>.
    #[arg(long)]
    anchor: Multiaddr,
    /// The listener to dial (with `--role dial`).
    #[arg(long)]
    peer: Option<PeerId>,
    /// `tcp` or `quic`: the transport to listen and punch on.
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 30)]
    secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    Listen,
    Dial,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    relay: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

pub fn run(b: HolepunchBench) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(punch(b))
}

async fn punch(b: HolepunchBench) -> anyhow::Result<()> {
    let anchor_id = match b.anchor.iter().last() {
        Some(Protocol::P2p(p)) => p,
        _ => anyhow::bail!("--anchor must end in /p2p/<PeerId>"),
    };
    let listen: Multiaddr = match b.transport.as_str() {
        "tcp" => "/ip4/0.0.0.0/tcp/0".parse()?,
        "quic" => "/ip4/0.0.0.0/udp/0/quic-v1".parse()?,
        other => anyhow::bail!("--transport {other:?}: tcp or quic"),
    };
    let key = Keypair::generate_ed25519();
    let mut swarm = meshwhisper_behaviour::transport::build_relay_swarm(
        key,
        Duration::from_secs(60),
        |k, relay| {
            Ok(Behaviour {
                relay,
                dcutr: dcutr::Behaviour::new(k.public().to_peer_id()),
                identify: meshwhisper_behaviour::node::identify_behaviour(k),
                ping: ping::Behaviour::new(ping::Config::new()),
            })
        },
    )?;
    // A listener first: dials leave from its port (what the NAT maps and
    // what the other end is told to punch to).
    swarm.listen_on(listen)?;
    swarm.dial(b.anchor.clone())?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(b.secs);
    let mut identified = false;
    let mut started: Option<Instant> = None;
    let mut circuit = None;
    let mut failed = Vec::new();
    loop {
        let ev = tokio::select! {
            ev = swarm.select_next_some() => ev,
            _ = tokio::time::sleep_until(deadline) => {
                match b.role {
                    Role::Dial => println!(
                        "{{\"ok\":false,\"ms\":{},\"error\":\"no hole punch result within {} s\"}}",
                        started.map_or(0, |s| s.elapsed().as_millis()),
                        b.secs
                    ),
                    Role::Listen => {}
                }
                return Ok(());
            }
        };
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                ..
            })) if peer_id == anchor_id && !identified => {
                identified = true;
                match b.role {
                    Role::Listen => {
                        swarm.listen_on(b.anchor.clone().with(Protocol::P2pCircuit))?;
                    }
                    Role::Dial => {
                        let peer = b.peer.context("--role dial needs --peer")?;
                        started = Some(Instant::now());
                        let opts = libp2p::swarm::dial_opts::DialOpts::unknown_peer_id()
                            .address(
                                b.anchor
                                    .clone()
                                    .with(Protocol::P2pCircuit)
                                    .with(Protocol::P2p(peer)),
                            )
                            .build();
                        circuit = Some(opts.connection_id());
                        swarm.dial(opts)?;
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Relay(
                relay::client::Event::ReservationReqAccepted { renewal: false, .. },
            )) => {
                println!("reserved={}", swarm.local_peer_id());
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(e)) if b.role == Role::Dial => {
                let ms = started.map_or(0, |s| s.elapsed().as_millis());
                // DCUtR tries up to 3 times; each failure is an event.
                match e.result {
                    Ok(_) => {
                        println!(
                            "{{\"ok\":true,\"ms\":{ms},\"failed_tries\":{}}}",
                            failed.len()
                        );
                        return Ok(());
                    }
                    Err(err) => failed.push(err.to_string()),
                }
                if failed.len() >= 3 {
                    println!(
                        "{{\"ok\":false,\"ms\":{ms},\"error\":{}}}",
                        serde_json::Value::String(failed.join("; "))
                    );
                    return Ok(());
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } if circuit == Some(connection_id) => {
                let ms = started.map_or(0, |s| s.elapsed().as_millis());
                println!(
                    "{{\"ok\":false,\"ms\":{ms},\"error\":{}}}",
                    serde_json::Value::String(format!("circuit dial: {error}"))
                );
                return Ok(());
            }
            _ => {}
        }
    }
}
