//! The task that owns the libp2p Swarm. Everything else talks to it over a
//! bounded command channel; it reports its listen addresses on a watch.

use libp2p::{Multiaddr, PeerId, Swarm, futures::StreamExt as _, identity::Keypair, noise, swarm::SwarmEvent, tcp, yamux};
use meshwhisper_behaviour::node::{Behaviour, BehaviourEvent};
use std::path::Path;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The node key file inside the data directory.
pub const KEY_FILE: &str = "node.key";

/// Errors starting the Swarm.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the key file failed.
    #[error("node key {path}: {source}")]
    Key {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key file does not hold a key.
    #[error("node key {0} is not a 32-byte Ed25519 seed")]
    BadKey(std::path::PathBuf),
    /// A listen address is not a multiaddr.
    #[error("invalid listen address {addr}: {why}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        why: String,
    },
    /// Building the transport failed.
    #[error("building the libp2p transport: {0}")]
    Transport(String),
}

/// Loads the node's Ed25519 key from `<data_dir>/node.key`, creating it
/// (mode 0600) on first use.
pub fn load_or_create_key(data_dir: &Path) -> Result<Keypair, Error> {
    let path = data_dir.join(KEY_FILE);
    let io = |source| Error::Key { path: path.clone(), source };
    match std::fs::read(&path) {
        Ok(mut bytes) => {
            let kp = Keypair::ed25519_from_bytes(&mut bytes).map_err(|_| Error::BadKey(path.clone()));
            zeroize_vec(&mut bytes);
            kp
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir).map_err(io)?;
            let mut seed = [0u8; 32];
            getrandom_fill(&mut seed).map_err(io)?;
            write_private(&path, &seed).map_err(io)?;
            let kp = Keypair::ed25519_from_bytes(&mut seed).map_err(|_| Error::BadKey(path.clone()));
            seed.fill(0);
            kp
        }
        Err(e) => Err(io(e)),
    }
}

fn zeroize_vec(v: &mut [u8]) {
    v.fill(0);
}

fn getrandom_fill(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

/// Builds the Swarm: TCP and QUIC, Noise, yamux.
pub fn build_swarm(key: Keypair) -> Result<Swarm<Behaviour>, Error> {
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| Error::Transport(e.to_string()))?
        .with_quic()
        .with_behaviour(|key| Ok(Behaviour::new(key)))
        .map_err(|e| Error::Transport(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    Ok(swarm)
}

/// The running Swarm task's handle.
#[derive(Debug, Clone)]
pub struct P2p {
    /// Our PeerId.
    pub peer_id: PeerId,
    /// Current listen addresses.
    pub listen_addrs: watch::Receiver<Vec<Multiaddr>>,
}

/// Starts listening and spawns the event loop.
pub fn start(
    mut swarm: Swarm<Behaviour>,
    listen: &[String],
    cancel: CancellationToken,
) -> Result<(P2p, tokio::task::JoinHandle<()>), Error> {
    for a in listen {
        let addr: Multiaddr = a.parse().map_err(|e: libp2p::multiaddr::Error| Error::Listen {
            addr: a.clone(),
            why: e.to_string(),
        })?;
        swarm.listen_on(addr).map_err(|e| Error::Listen {
            addr: a.clone(),
            why: e.to_string(),
        })?;
    }
    let peer_id = *swarm.local_peer_id();
    let (tx, rx) = watch::channel(Vec::new());
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::NewListenAddr { address, .. } => {
                        tracing::info!(%address, "libp2p listening");
                        tx.send_modify(|v| v.push(address));
                    }
                    SwarmEvent::ExpiredListenAddr { address, .. } => {
                        tx.send_modify(|v| v.retain(|a| a != &address));
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Identify(_)) => {}
                    SwarmEvent::Behaviour(BehaviourEvent::Ping(_)) => {}
                    other => tracing::trace!(?other, "swarm event"),
                },
            }
        }
    });
    Ok((P2p { peer_id, listen_addrs: rx }, task))
}
