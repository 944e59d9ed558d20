//! The task that owns the libp2p Swarm. Everything else talks to it over a
//! bounded command channel; it reports its listen addresses on a watch.

use crate::core::Core;
use libp2p::swarm::ConnectionId;
use libp2p::{
    Multiaddr, PeerId, Swarm, futures::StreamExt as _, identity::Keypair, swarm::SwarmEvent,
};
use libp2p::{gossipsub, kad};
use meshwhisper_behaviour::device::{self, codec::Frame};
use meshwhisper_behaviour::federation;
use meshwhisper_behaviour::node::{Behaviour, BehaviourEvent};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
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
    /// A listen address is not a multiaddr libp2p can listen on.
    #[error("invalid listen address {addr}: {why}")]
    BadListenAddr {
        /// The address.
        addr: String,
        /// Why.
        why: String,
    },
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}{}", listen_hint(source))]
    Listen {
        /// The address.
        addr: String,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// Building the transport failed.
    #[error("building the libp2p transport: {0}")]
    Transport(String),
}

/// What to do about a listen address that could not be bound.
pub fn listen_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another program, or another relay, holds that port; choose another with --listen, or stop it)"
        }
        std::io::ErrorKind::PermissionDenied => {
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        }
        std::io::ErrorKind::AddrNotAvailable => " (no interface of this host has that address)",
        _ => "",
    }
}

/// Binds the address the way libp2p will, without `SO_REUSEPORT`, and
/// lets go at once: libp2p's own sockets share their port with any other
/// `SO_REUSEPORT` socket (another relay, say), so it would "listen" on a
/// port someone else holds and split its connections. Port 0 and
/// addresses that are not plain TCP or QUIC are left to libp2p.
fn probe_bind(addr: &Multiaddr) -> Result<(), std::io::Error> {
    use libp2p::multiaddr::Protocol;
    let mut it = addr.iter();
    let ip: std::net::IpAddr = match it.next() {
        Some(Protocol::Ip4(a)) => a.into(),
        Some(Protocol::Ip6(a)) => a.into(),
        _ => return Ok(()),
    };
    match it.next() {
        Some(Protocol::Tcp(port)) if port != 0 => std::net::TcpListener::bind((ip, port)).map(drop),
        Some(Protocol::Udp(port)) if port != 0 => std::net::UdpSocket::bind((ip, port)).map(drop),
        _ => Ok(()),
    }
}

/// The innermost cause of an error, for one-line messages (libp2p's
/// transport errors wrap the operating system's reason in layers whose
/// own text is sometimes empty).
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    let mut best = e.to_string();
    while let Some(next) = cur.source() {
        cur = next;
        let t = cur.to_string();
        if !t.trim().is_empty() {
            best = t;
        }
    }
    best
}

/// Loads the node's Ed25519 key from `<data_dir>/node.key`, creating it
/// (mode 0600) on first use.
pub fn load_or_create_key(data_dir: &Path) -> Result<Keypair, Error> {
    let path = data_dir.join(KEY_FILE);
    let io = |source| Error::Key {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        // `ed25519_from_bytes` zeroizes the bytes it was given.
        Ok(mut bytes) => {
            Keypair::ed25519_from_bytes(&mut bytes).map_err(|_| Error::BadKey(path.clone()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir).map_err(io)?;
            let key = libp2p::identity::ed25519::Keypair::generate();
            meshwhisper_storage::secret_file::create(&path, key.secret().as_ref()).map_err(io)?;
            Ok(Keypair::from(key))
        }
        Err(e) => Err(io(e)),
    }
}

/// Builds a relay's Swarm: TCP and QUIC, Noise, yamux.
pub fn build_swarm(
    key: Keypair,
    device: device::Config,
    limits: meshwhisper_behaviour::node::Limits,
    fed: meshwhisper_behaviour::node::FederationSettings,
) -> Result<Swarm<Behaviour>, Error> {
    meshwhisper_behaviour::transport::build_relay_swarm(
        key,
        Duration::from_secs(60),
        move |k, relay_client| {
            Behaviour::new(k, relay_client, device, limits, fed)
                .map_err(|e| Box::from(Error::Transport(e.to_string())))
        },
    )
    .map_err(|e| Error::Transport(e.to_string()))
}

/// Builds a Swarm with any behaviour over the relay's transports (tests use
/// it for device-side swarms).
pub fn build_swarm_with<B: libp2p::swarm::NetworkBehaviour>(
    key: Keypair,
    make: impl FnOnce(&Keypair) -> Result<B, Error>,
) -> Result<Swarm<B>, Error> {
    meshwhisper_behaviour::transport::build_swarm(key, Duration::from_secs(60), |k| {
        make(k).map_err(Box::from)
    })
    .map_err(|e| Error::Transport(e.to_string()))
}

/// The running Swarm task's handle.
#[derive(Debug, Clone)]
pub struct P2p {
    /// Our PeerId.
    pub peer_id: PeerId,
    /// Current listen addresses.
    pub listen_addrs: watch::Receiver<Vec<Multiaddr>>,
    /// Federation: admitted relays with an open stream, and the bootstrap
    /// entries configured.
    pub federation: watch::Receiver<FedStatus>,
    /// Sends a new blocklist to the Swarm task (tests and the file watcher).
    pub blocklist: mpsc::Sender<std::collections::HashSet<PeerId>>,
}

/// What `/health` reports about federation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FedStatus {
    /// Bootstrap relays configured.
    pub configured: usize,
    /// Relays with an open federation stream.
    pub connected: Vec<PeerId>,
    /// Why each bootstrap relay not reached yet failed its last dial.
    pub bootstrap_errors: Vec<String>,
    /// Reachability and anchors.
    pub nat: crate::nat::NatStatus,
}

/// How often a bootstrap relay that keeps failing is logged again.
const BOOTSTRAP_LOG_EVERY: Duration = Duration::from_secs(60);

/// Failed dials to bootstrap relays: logged at the first failure, when
/// the reason changes, and then once a minute (the relay redials with
/// backoff, every 30 s at most).
#[derive(Debug, Default)]
struct BootstrapWatch {
    /// Per bootstrap peer: the last reason and when it was logged.
    failures: HashMap<PeerId, (String, std::time::Instant)>,
}

impl BootstrapWatch {
    /// Records a failure; returns the line to log when one is due.
    fn failed(&mut self, peer: PeerId, line: String, now: std::time::Instant) -> Option<String> {
        let due = match self.failures.get(&peer) {
            Some((last, at)) => *last != line || now.duration_since(*at) >= BOOTSTRAP_LOG_EVERY,
            None => true,
        };
        if due {
            self.failures.insert(peer, (line.clone(), now));
            return Some(line);
        }
        None
    }

    fn reached(&mut self, peer: &PeerId) -> bool {
        self.failures.remove(peer).is_some()
    }

    fn lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self.failures.values().map(|(l, _)| l.clone()).collect();
        v.sort();
        v
    }
}

/// One line on why a dial to bootstrap relay `peer` at `addr` failed.
fn bootstrap_failure(peer: &PeerId, addr: &Multiaddr, e: &libp2p::swarm::DialError) -> String {
    use libp2p::swarm::DialError;
    let mut addr = addr.clone();
    if matches!(
        addr.iter().last(),
        Some(libp2p::multiaddr::Protocol::P2p(_))
    ) {
        addr.pop();
    }
    match e {
        DialError::WrongPeerId { obtained, .. } => format!(
            "bootstrap {addr}: the relay there is {obtained}, not {peer} (is the PeerId in --bootstrap mistyped?)"
        ),
        DialError::Transport(list) => {
            let why = list
                .first()
                .map(|(_, t)| root_cause(t))
                .unwrap_or_else(|| e.to_string());
            format!("bootstrap {addr}/p2p/{peer} unreachable: {why}")
        }
        other => format!(
            "bootstrap {addr}/p2p/{peer} unreachable: {}",
            root_cause(other)
        ),
    }
}

/// What the Swarm task needs for federation.
pub struct FedStart {
    /// Settings.
    pub cfg: crate::config::Federation,
    /// The node key (signs our address record).
    pub key: Keypair,
    /// How long a stored packet lives (bounds forwarding retries).
    pub mailbox_ttl_ms: u64,
    /// Reachability and anchors.
    pub nat: crate::config::Nat,
}

/// Frames queued from the Swarm task to one device session.
const SESSION_QUEUE: usize = 256;
/// Frames queued from all sessions to the Swarm task.
const COMMAND_QUEUE: usize = 4096;

/// Listens on every address of `listen` (failing on the first that cannot
/// be bound) and tries those of `optional` (a warning when one fails).
fn listen_all(
    swarm: &mut Swarm<Behaviour>,
    listen: &[String],
    optional: &[String],
) -> Result<(), Error> {
    let required = listen.iter().map(|a| (a, true));
    for (a, needed) in required.chain(optional.iter().map(|a| (a, false))) {
        let addr: Multiaddr =
            a.parse()
                .map_err(|e: libp2p::multiaddr::Error| Error::BadListenAddr {
                    addr: a.clone(),
                    why: e.to_string(),
                })?;
        let bound = probe_bind(&addr)
            .map_err(|source| Error::Listen {
                addr: a.clone(),
                source,
            })
            .and_then(|()| {
                swarm.listen_on(addr).map(drop).map_err(|e| match e {
                    libp2p::TransportError::MultiaddrNotSupported(_) => Error::BadListenAddr {
                        addr: a.clone(),
                        why: "not a TCP or QUIC (udp/…/quic-v1) address".into(),
                    },
                    libp2p::TransportError::Other(e) => Error::Listen {
                        addr: a.clone(),
                        source: std::io::Error::other(root_cause(&e)),
                    },
                })
            });
        match bound {
            Ok(()) => {}
            Err(e) if !needed => tracing::warn!("optional listen address skipped: {e}"),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The libp2p addresses to listen on.
#[derive(Debug, Clone, Copy)]
pub struct ListenAddrs<'a> {
    /// Each must be bound, or the relay does not start.
    pub required: &'a [String],
    /// Each is tried; one that cannot be bound is skipped with a warning.
    pub optional: &'a [String],
}

/// Starts listening and spawns the event loop.
pub fn start(
    mut swarm: Swarm<Behaviour>,
    listen: ListenAddrs<'_>,
    core: Arc<Core>,
    device_bounds: crate::device::session::Bounds,
    cancel: CancellationToken,
    sessions: tokio_util::task::TaskTracker,
    fed: FedStart,
) -> Result<(P2p, tokio::task::JoinHandle<()>), Error> {
    listen_all(&mut swarm, listen.required, listen.optional)?;
    let peer_id = *swarm.local_peer_id();
    let (tx, rx) = watch::channel(Vec::new());
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let (out_tx, out_rx) = crate::handoff::handoff(crate::federation::OUTBOUND_QUEUE);
    let (claim_tx, claim_rx) = mpsc::channel(crate::federation::CLAIM_QUEUE);
    let (block_tx, block_rx) = mpsc::channel(4);
    let enabled = fed.cfg.mode != crate::config::FederationMode::Off;
    // Federation's timers (resends, dials, anti-entropy's fastest rounds)
    // are looked at this often.
    let tick = std::time::Duration::from_millis(
        fed.cfg
            .retry_ms
            .clamp(50, crate::federation::anti_entropy::FAST_MS),
    );
    let ed = fed
        .key
        .clone()
        .try_into_ed25519()
        .map_err(|_| Error::Transport("the node key is not an Ed25519 key".into()))?;
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    seed.copy_from_slice(ed.secret().as_ref());
    let identity = meshwhisper_crypto::identity::IdentityKeyPair::from_seed(&seed);
    let mut rng_seed = [0u8; 32];
    getrandom::fill(&mut rng_seed)
        .map_err(|e| Error::Transport(format!("no randomness for packet ids: {e}")))?;
    let state = crate::federation::Federation::new(
        &fed.cfg,
        identity,
        fed.mailbox_ttl_ms,
        core.metrics.federation.clone(),
        rng_seed,
    );
    let (pool, done_rx) = crate::federation::jobs::Pool::start(
        core.clone(),
        fed.cfg.store_workers,
        ed.public().to_bytes(),
        fed.mailbox_ttl_ms,
        cancel.clone(),
    );
    let fed_driver = crate::federation::driver::Driver::new(state, core.clone(), pool);
    if enabled {
        core.set_federation(
            out_tx,
            claim_tx,
            ed.public().to_bytes(),
            fed.cfg.max_pending,
            fed.cfg.learned_routes,
        );
    }
    let nat = crate::nat::Driver::new(&fed.nat, core.metrics.clone());
    let (status_tx, status_rx) = watch::channel(FedStatus {
        configured: fed_driver.bootstrap_count(),
        nat: crate::nat::NatStatus {
            reachability: nat.status().label(),
            ..Default::default()
        },
        ..FedStatus::default()
    });
    // Addresses the operator declared are ours to advertise (and, for an
    // anchor, to put in reservations) without waiting for a probe.
    for a in &fed.cfg.external_addrs {
        if let Ok(a) = a.parse::<Multiaddr>() {
            swarm.add_external_address(a);
        }
    }
    let event_loop = EventLoop {
        fed: fed_driver,
        nat,
        done_rx,
        claim_rx,
        out_rx,
        block_rx,
        status: status_tx,
        tick,
        swarm,
        core,
        device_bounds,
        cancel,
        addrs: tx,
        cmd_tx,
        cmd_rx,
        sessions: HashMap::new(),
        conn_ips: HashMap::new(),
        tracker: sessions,
        bootstrap_watch: BootstrapWatch::default(),
    };
    // Every event of this relay's Swarm task carries the relay's id, so the
    // logs of several relays in one process (tests, benchmarks) tell apart.
    let span = tracing::info_span!("relay", id = %short_id(&peer_id));
    let task = tokio::spawn(tracing::Instrument::instrument(event_loop.run(), span));
    Ok((
        P2p {
            peer_id,
            listen_addrs: rx,
            federation: status_rx,
            blocklist: block_tx,
        },
        task,
    ))
}

/// A frame a session wants sent.
struct Outgoing {
    peer: PeerId,
    connection: ConnectionId,
    frame: Frame,
}

struct EventLoop {
    fed: crate::federation::driver::Driver,
    nat: crate::nat::Driver,
    done_rx: crate::federation::driver::Done,
    claim_rx: mpsc::Receiver<crate::core::RemoteClaim>,
    out_rx: crate::handoff::HandoffRx,
    block_rx: mpsc::Receiver<std::collections::HashSet<PeerId>>,
    status: watch::Sender<FedStatus>,
    tick: Duration,
    swarm: Swarm<Behaviour>,
    core: Arc<Core>,
    device_bounds: crate::device::session::Bounds,
    cancel: CancellationToken,
    addrs: watch::Sender<Vec<Multiaddr>>,
    cmd_tx: mpsc::Sender<Outgoing>,
    cmd_rx: mpsc::Receiver<Outgoing>,
    /// Each device session's inbound frames, and the bytes of packets
    /// among them.
    sessions: HashMap<(PeerId, ConnectionId), (mpsc::Sender<Frame>, Arc<AtomicUsize>)>,
    /// The remote IP address of each open connection (bounded by the
    /// connection limits): a device's homed hashes count against its
    /// address's share.
    conn_ips: HashMap<ConnectionId, std::net::IpAddr>,
    tracker: tokio_util::task::TaskTracker,
    bootstrap_watch: BootstrapWatch,
}

/// How long a stopping relay waits for acks of packets it sent.
const SHUTDOWN_ACKS: std::time::Duration = std::time::Duration::from_secs(2);

/// Federation results or packets taken from their queue at once.
const DRAIN: usize = 512;

impl EventLoop {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut done, mut outbound) = (Vec::new(), Vec::new());
        let (mut done_closed, mut out_closed) = (false, false);
        loop {
            tokio::select! {
                biased;
                // Stop first.
                _ = self.cancel.cancelled() => break,
                // Then frames sessions want sent (so queues drain).
                Some(out) = self.cmd_rx.recv() => {
                    self.swarm.behaviour_mut().device.send(out.peer, out.connection, out.frame);
                }
                // Results of federation work, then packets to federate,
                // as many as are waiting (their frames are batched).
                n = self.done_rx.recv_many(&mut done, DRAIN), if !done_closed => {
                    if n == 0 {
                        done_closed = true;
                    } else {
                        self.fed.on_job_done(&mut self.swarm, std::mem::take(&mut done));
                    }
                }
                n = self.out_rx.recv_many(&mut outbound, DRAIN), if !out_closed => {
                    if n == 0 {
                        out_closed = true;
                    } else {
                        self.fed.on_outbound(&mut self.swarm, std::mem::take(&mut outbound));
                    }
                }
                Some(c) = self.claim_rx.recv() => self.fed.on_remote_claim(&mut self.swarm, c),
                Some(b) = self.block_rx.recv() => self.fed.on_blocklist(&mut self.swarm, b),
                // Then the network.
                ev = self.swarm.select_next_some() => self.on_event(ev),
                _ = tick.tick() => self.tick(),
            }
            self.publish_status();
        }
        // Acks of packets already sent, for a moment: what their home
        // relays stored is then not sent again (nor kept) after a restart.
        let until = tokio::time::Instant::now() + SHUTDOWN_ACKS;
        while self.fed.in_flight(&self.swarm) > 0 {
            tokio::select! {
                biased;
                ev = self.swarm.select_next_some() => self.on_event(ev),
                _ = tokio::time::sleep_until(until) => break,
            }
        }
        // Packets held in memory for other relays are stored before we
        // stop (sessions store what they read from now on themselves).
        let unstored = self.fed.take_unstored(&mut self.out_rx);
        if !unstored.is_empty() {
            let n = unstored.len();
            let kept = self.core.keep_copies(unstored).await;
            let lost = kept.iter().filter(|k| k.is_none()).count();
            if lost > 0 {
                tracing::warn!(lost, "could not store packets held for other relays");
            }
            tracing::info!(stored = n - lost, "stored packets held for other relays");
        }
    }

    fn tick(&mut self) {
        let now = crate::core::now_ms();
        let policy = &self.swarm.behaviour().policy;
        let admitted: std::collections::HashSet<PeerId> = self
            .swarm
            .connected_peers()
            .filter(|p| policy.is_admitted(p))
            .copied()
            .collect();
        if let Some(anchors) = self
            .nat
            .tick(&mut self.swarm, now, |p| admitted.contains(p))
        {
            self.fed.set_anchors(&anchors);
        }
        self.fed.tick(&mut self.swarm);
    }

    fn publish_status(&mut self) {
        let b = self.swarm.behaviour();
        let mut connected: Vec<PeerId> = b
            .federation
            .peers()
            .filter(|p| b.policy.is_admitted(p))
            .copied()
            .collect();
        connected.sort();
        let via_circuit: Vec<PeerId> = connected
            .iter()
            .filter(|p| b.federation.is_direct(p) == Some(false))
            .copied()
            .collect();
        let nat = crate::nat::NatStatus {
            reachability: self.nat.status().label(),
            anchors: self.nat.anchors(),
            via_circuit,
        };
        let errors = self.bootstrap_watch.lines();
        self.status.send_if_modified(|s| {
            if s.connected == connected && s.bootstrap_errors == errors && s.nat == nat {
                false
            } else {
                self.core
                    .metrics
                    .nat
                    .peers_via_circuit
                    .store(nat.via_circuit.len() as u64, Relaxed);
                s.connected = connected;
                s.bootstrap_errors = errors;
                s.nat = nat;
                true
            }
        });
    }

    fn on_event(&mut self, ev: SwarmEvent<meshwhisper_behaviour::node::BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "libp2p listening");
                self.nat.on_listen_addr(&mut self.swarm, &address);
                self.addrs.send_modify(|v| v.push(address));
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "external address confirmed");
                self.nat.on_external_confirmed(&address);
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                tracing::info!(%address, "external address expired");
                self.nat.on_external_expired(&address);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(e)) => self.nat.on_probe(&e),
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(e)) => self.nat.on_relay_client(&e),
            SwarmEvent::Behaviour(BehaviourEvent::RelayServer(e)) => self.nat.on_relay_server(&e),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(e)) => self.nat.on_hole_punch(&e),
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.addrs.send_modify(|v| v.retain(|a| a != &address));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Device(e)) => self.on_device(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(
                libp2p::identify::Event::Received { peer_id, info, .. },
            )) => {
                self.nat.on_identified(peer_id, &info);
                self.fed.on_identified(&mut self.swarm, peer_id, &info)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Policy(e)) => self.fed.on_policy(e),
            SwarmEvent::Behaviour(BehaviourEvent::Federation(e)) => match e {
                federation::Event::Opened { peer } => self.fed.on_opened(&mut self.swarm, peer),
                federation::Event::Frame { peer, frame } => {
                    self.fed.on_frame(&mut self.swarm, peer, frame)
                }
                federation::Event::Closed { peer, reason, last } => {
                    self.fed.on_closed(&mut self.swarm, peer, &reason, last)
                }
                federation::Event::Unsent { peer, frame } => self.fed.on_unsent(peer, frame),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => self.fed.on_gossip(
                &mut self.swarm,
                propagation_source,
                message_id,
                message.data,
            ),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetClosestPeers(Ok(ok)),
                ..
            })) => self.fed.on_kad_peers(&mut self.swarm, ok.peers),
            SwarmEvent::Behaviour(_) => {}
            SwarmEvent::IncomingConnectionError {
                error: libp2p::swarm::ListenError::Denied { cause },
                ..
            }
            | SwarmEvent::OutgoingConnectionError {
                error: libp2p::swarm::DialError::Denied { cause },
                ..
            } if cause
                .downcast_ref::<meshwhisper_behaviour::policy::Blocked>()
                .is_some() =>
            {
                self.core
                    .metrics
                    .federation
                    .handshake_rejections_blocked
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                self.fed.dial_failed(peer);
                if let Some(addr) = self.fed.bootstrap_addr(&peer) {
                    let line = bootstrap_failure(&peer, addr, &error);
                    if let Some(l) =
                        self.bootstrap_watch
                            .failed(peer, line, std::time::Instant::now())
                    {
                        tracing::warn!("{l}; retrying with backoff");
                    }
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                if let Some(ip) = ip_of(endpoint.get_remote_address()) {
                    self.conn_ips.insert(connection_id, ip);
                }
                self.nat.on_connected(peer_id, &endpoint);
                if endpoint.is_dialer() {
                    self.fed.connected(&peer_id);
                }
                if self.bootstrap_watch.reached(&peer_id) {
                    tracing::info!(peer = %peer_id, "bootstrap relay reached");
                }
            }
            SwarmEvent::ConnectionClosed {
                connection_id,
                peer_id,
                num_established,
                ..
            } => {
                self.conn_ips.remove(&connection_id);
                if num_established == 0 {
                    self.nat.on_disconnected(&peer_id);
                }
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                tracing::warn!(?listener_id, error = %root_cause(&error), "libp2p listener error");
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                self.nat.on_listener_closed(listener_id);
                match reason {
                    Err(error) if addresses.iter().any(meshwhisper_behaviour::nat::is_relayed) => {
                        tracing::info!(?addresses, error = %root_cause(&error), "circuit listener closed");
                    }
                    Err(error) => {
                        tracing::error!(?addresses, error = %root_cause(&error), "libp2p listener closed");
                    }
                    Ok(()) => {}
                }
            }
            other => tracing::trace!(?other, "swarm event"),
        }
    }

    fn on_device(&mut self, e: device::Event) {
        match e {
            device::Event::Opened { peer, connection } => {
                let (in_tx, in_rx) = mpsc::channel(SESSION_QUEUE);
                let (out_tx, mut out_rx) = mpsc::channel::<Frame>(SESSION_QUEUE);
                let queued = Arc::new(AtomicUsize::new(0));
                self.sessions
                    .insert((peer, connection), (in_tx, queued.clone()));
                // Forward the session's frames into the shared command queue.
                let cmd = self.cmd_tx.clone();
                tokio::spawn(async move {
                    while let Some(frame) = out_rx.recv().await {
                        if cmd
                            .send(Outgoing {
                                peer,
                                connection,
                                frame,
                            })
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                });
                self.tracker.spawn(crate::device::session::run(
                    self.core.clone(),
                    self.conn_ips.get(&connection).copied(),
                    in_rx,
                    queued,
                    out_tx,
                    self.cancel.clone(),
                    self.device_bounds,
                ));
                tracing::debug!(%peer, "device stream opened");
            }
            device::Event::Frame {
                peer,
                connection,
                frame,
            } => {
                let Some((tx, queued)) = self.sessions.get(&(peer, connection)) else {
                    return;
                };
                // The session is behind (its queue is full in frames, or in
                // bytes of packets): refuse packets and requests (the device
                // retries them), drop anything else (an unacked delivery is
                // sent again on the next drain).
                let packet_len = match &frame {
                    Frame::Packet { packet, .. } | Frame::PacketTo { packet, .. } => packet.len(),
                    _ => 0,
                };
                let over = packet_len > 0
                    && queued.load(Relaxed).saturating_add(packet_len)
                        > self.device_bounds.inflight_bytes;
                let sent = if over {
                    Err(mpsc::error::TrySendError::Full(frame))
                } else {
                    tx.try_send(frame)
                };
                if sent.is_ok() {
                    queued.fetch_add(packet_len, Relaxed);
                }
                let refusal = match sent {
                    Err(mpsc::error::TrySendError::Full(
                        Frame::Packet { seq, .. } | Frame::PacketTo { seq, .. },
                    )) => Some(Frame::Refused {
                        seq,
                        code: device::codec::RefusedCode::Busy,
                        reason: "relay busy".into(),
                    }),
                    Err(mpsc::error::TrySendError::Full(
                        Frame::Publish { req, .. }
                        | Frame::Prekeys { req, .. }
                        | Frame::Claim { req, .. },
                    )) => Some(Frame::Reply {
                        req,
                        status: device::codec::Status::Unavailable,
                        body: "relay busy".into(),
                    }),
                    _ => None,
                };
                if let Some(r) = refusal {
                    self.swarm.behaviour_mut().device.send(peer, connection, r);
                }
            }
            device::Event::Closed {
                peer,
                connection,
                reason,
            } => {
                tracing::debug!(%peer, %reason, "device stream closed");
                self.sessions.remove(&(peer, connection));
            }
        }
    }
}

/// The IP address in a multiaddr (its first `/ip4` or `/ip6`).
fn ip_of(addr: &Multiaddr) -> Option<std::net::IpAddr> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(ip) => Some(ip.into()),
        libp2p::multiaddr::Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    })
}

/// The last six characters of a PeerId: enough to tell relays apart in logs.
fn short_id(peer: &PeerId) -> String {
    let s = peer.to_base58();
    s[s.len().saturating_sub(6)..].to_string()
}
