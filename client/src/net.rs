//! The client's network task: the only owner of its libp2p Swarm.
//!
//! The engine talks to it with [`Command`]s (bounded queue, oneshot
//! replies) and hears [`NetEvent`]s back. It keeps the home relay
//! connected, reconnecting with exponential backoff, dials other relays on
//! demand (a contact's home relay), matches `Stored`/`Refused` to packets
//! and `Reply` to directory requests, and fails whatever is outstanding on a
//! relay when its connection drops (the engine's outbox sends it again).

use bytes::Bytes;
use libp2p::futures::StreamExt as _;
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId, Swarm};
use meshwhisper_behaviour::client::{Behaviour, BehaviourEvent};
use meshwhisper_behaviour::device::{
    self,
    codec::{Frame, Status},
};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why a network operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// The relay could not be reached, or the connection dropped before it
    /// answered.
    #[error("relay {0} unreachable or disconnected")]
    Unreachable(PeerId),
    /// The relay refused the packet.
    #[error("relay refused the packet: {0}")]
    Refused(String),
    /// Too much is already queued for this relay.
    #[error("too many operations queued for relay {0}")]
    Busy(PeerId),
    /// The network task has stopped.
    #[error("the client's network task has stopped")]
    Stopped,
}

/// Requests to the network task.
#[derive(Debug)]
pub(crate) enum Command {
    /// Keep this relay connected: dial now and redial with backoff.
    Keep { peer: PeerId, addrs: Vec<Multiaddr> },
    /// Send a frame needing no answer (Register, Ack, Drain).
    Frame { peer: PeerId, frame: Frame },
    /// Send a packet through `peer` (our home relay); answered once the
    /// relay stored or refused it. `home`: the recipient's home relay
    /// (Ed25519 key), when it is not `peer` — the relay forwards it there.
    Packet {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        home: Option<[u8; 32]>,
        packet: Bytes,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    /// A directory request (its `req` is assigned here); answered with the
    /// relay's Reply.
    Request {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        frame: Frame,
        reply: oneshot::Sender<Result<(Status, Bytes), NetError>>,
    },
}

/// What the network task reports.
#[derive(Debug)]
pub(crate) enum NetEvent {
    /// A device stream to this relay opened.
    Up(PeerId),
    /// The last stream to this relay closed.
    Down(PeerId),
    /// A dial to a relay failed; it is tried again after `retry_in` when
    /// it is kept connected.
    Unreachable {
        peer: PeerId,
        reason: String,
        retry_in: Option<Duration>,
    },
    /// The relay delivered a packet; ack `id` once it is processed.
    Deliver {
        relay: PeerId,
        id: u64,
        packet: Bytes,
    },
}

/// Bounds and timing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NetConfig {
    /// Frames queued per relay while its stream is not open.
    pub max_waiting: usize,
    /// First redial delay; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest redial delay.
    pub max_backoff: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            max_waiting: 4096,
            min_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
        }
    }
}

enum Waiter {
    Packet(oneshot::Sender<Result<(), NetError>>),
    Request(oneshot::Sender<Result<(Status, Bytes), NetError>>),
}

impl Waiter {
    fn fail(self, e: NetError) {
        match self {
            Waiter::Packet(r) => {
                let _ = r.send(Err(e));
            }
            Waiter::Request(r) => {
                let _ = r.send(Err(e));
            }
        }
    }
}

#[derive(Default)]
struct Relay {
    addrs: Vec<Multiaddr>,
    keep: bool,
    up: bool,
    dialing: bool,
    backoff: Duration,
    redial_at: Option<Instant>,
    /// Frames waiting for the stream to open.
    waiting: VecDeque<Frame>,
    /// Outstanding packets (by seq) and requests (by req).
    outstanding: HashMap<u64, Waiter>,
}

impl Relay {
    fn fail_all(&mut self, peer: PeerId) {
        self.waiting.clear();
        for (_, w) in self.outstanding.drain() {
            w.fail(NetError::Unreachable(peer));
        }
    }
}

/// Why a dial failed, in a few words: the operating system's reason for
/// the first address tried (e.g. "Connection refused (os error 111)")
/// rather than libp2p's nested description.
pub(crate) fn dial_reason(e: &libp2p::swarm::DialError) -> String {
    use libp2p::swarm::DialError;
    fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
        let mut cur = e;
        while let Some(next) = cur.source() {
            cur = next;
        }
        let text = cur.to_string();
        if text.trim().is_empty() {
            e.to_string()
        } else {
            text
        }
    }
    match e {
        DialError::Transport(list) => list
            .first()
            .map(|(_, t)| innermost(t))
            .unwrap_or_else(|| "no address to dial".into()),
        DialError::NoAddresses => "no address known".into(),
        DialError::WrongPeerId { obtained, .. } => {
            format!("a different relay ({obtained}) answers at that address")
        }
        other => innermost(other),
    }
}

/// Builds the client's Swarm over the shared transports, with a fresh key
/// (relays need not recognise a device across runs).
pub(crate) fn build_swarm() -> Result<Swarm<Behaviour>, String> {
    let key = libp2p::identity::Keypair::generate_ed25519();
    meshwhisper_behaviour::transport::build_swarm(key, Duration::from_secs(30), |key| {
        Ok(Behaviour::new(
            key,
            device::Config::new(device::Role::Device),
            Default::default(),
        ))
    })
    .map_err(|e| e.to_string())
}

pub(crate) struct Net {
    swarm: Swarm<Behaviour>,
    cfg: NetConfig,
    relays: HashMap<PeerId, Relay>,
    next_id: u64,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    cancel: CancellationToken,
}

impl Net {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        cfg: NetConfig,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<NetEvent>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            swarm,
            cfg,
            relays: HashMap::new(),
            next_id: 1,
            commands,
            events,
            cancel,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                Some(cmd) = self.commands.recv() => self.on_command(cmd),
                ev = self.swarm.select_next_some() => {
                    if !self.on_swarm(ev).await {
                        break;
                    }
                }
                _ = tick.tick() => self.redial_due(),
            }
        }
        for (peer, r) in self.relays.iter_mut() {
            r.fail_all(*peer);
        }
    }

    fn relay(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) -> &mut Relay {
        let min = self.cfg.min_backoff;
        let r = self.relays.entry(peer).or_insert_with(|| Relay {
            backoff: min,
            ..Relay::default()
        });
        for a in addrs {
            if !r.addrs.contains(&a) {
                r.addrs.push(a);
            }
        }
        r
    }

    fn dial(&mut self, peer: PeerId) {
        let Some(r) = self.relays.get_mut(&peer) else {
            return;
        };
        if r.up || r.dialing {
            return;
        }
        r.dialing = true;
        r.redial_at = None;
        let opts = DialOpts::peer_id(peer).addresses(r.addrs.clone()).build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %e, "dial failed at once");
            let retry_in = self.dial_failed(peer);
            self.unreachable(peer, dial_reason(&e), retry_in);
        }
    }

    /// Tells the engine (without waiting: it may be waiting for us).
    fn unreachable(&self, peer: PeerId, reason: String, retry_in: Option<Duration>) {
        let _ = self.events.try_send(NetEvent::Unreachable {
            peer,
            reason,
            retry_in,
        });
    }

    /// Fails what waits on `peer` and schedules a redial if it is kept;
    /// returns the delay until that redial.
    fn dial_failed(&mut self, peer: PeerId) -> Option<Duration> {
        let max = self.cfg.max_backoff;
        let r = self.relays.get_mut(&peer)?;
        r.dialing = false;
        r.fail_all(peer);
        if !r.keep {
            return None;
        }
        let wait = r.backoff;
        r.redial_at = Some(Instant::now() + wait);
        r.backoff = (r.backoff * 2).min(max);
        Some(wait)
    }

    fn redial_due(&mut self) {
        let now = Instant::now();
        let due: Vec<PeerId> = self
            .relays
            .iter()
            .filter(|(_, r)| r.redial_at.is_some_and(|t| t <= now))
            .map(|(p, _)| *p)
            .collect();
        for p in due {
            self.dial(p);
        }
    }

    fn send(&mut self, peer: PeerId, frame: Frame, waiter: Option<(u64, Waiter)>) {
        let max_waiting = self.cfg.max_waiting;
        let Some(r) = self.relays.get_mut(&peer) else {
            if let Some((_, w)) = waiter {
                w.fail(NetError::Unreachable(peer));
            }
            return;
        };
        if !r.up && r.waiting.len() >= max_waiting {
            if let Some((_, w)) = waiter {
                w.fail(NetError::Busy(peer));
            }
            return;
        }
        if let Some((id, w)) = waiter {
            r.outstanding.insert(id, w);
        }
        if r.up {
            if !self
                .swarm
                .behaviour_mut()
                .device
                .send_to(peer, frame.clone())
                && let Some(r) = self.relays.get_mut(&peer)
            {
                r.waiting.push_back(frame);
            }
        } else {
            r.waiting.push_back(frame);
            self.dial(peer);
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Keep { peer, addrs } => {
                self.relay(peer, addrs).keep = true;
                self.dial(peer);
            }
            Command::Frame { peer, frame } => self.send(peer, frame, None),
            Command::Packet {
                peer,
                addrs,
                home,
                packet,
                reply,
            } => {
                let seq = self.next_id;
                self.next_id += 1;
                self.relay(peer, addrs);
                let frame = match home {
                    Some(home) => Frame::PacketTo { seq, home, packet },
                    None => Frame::Packet { seq, packet },
                };
                self.send(peer, frame, Some((seq, Waiter::Packet(reply))));
            }
            Command::Request {
                peer,
                addrs,
                mut frame,
                reply,
            } => {
                let id = self.next_id;
                self.next_id += 1;
                match &mut frame {
                    Frame::Publish { req, .. }
                    | Frame::Prekeys { req, .. }
                    | Frame::Claim { req, .. }
                    | Frame::ClaimAt { req, .. } => *req = id,
                    _ => {
                        let _ = reply.send(Err(NetError::Refused("not a request".into())));
                        return;
                    }
                }
                self.relay(peer, addrs);
                self.send(peer, frame, Some((id, Waiter::Request(reply))));
            }
        }
    }

    /// Handles a Swarm event; `false` when the engine has gone away.
    async fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) -> bool {
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Device(e)) => match e {
                device::Event::Opened { peer, .. } => {
                    let min = self.cfg.min_backoff;
                    let Some(r) = self.relays.get_mut(&peer) else {
                        return true;
                    };
                    r.up = true;
                    r.dialing = false;
                    r.backoff = min;
                    let waiting: Vec<Frame> = r.waiting.drain(..).collect();
                    for f in waiting {
                        self.swarm.behaviour_mut().device.send_to(peer, f);
                    }
                    return self.events.send(NetEvent::Up(peer)).await.is_ok();
                }
                device::Event::Frame { peer, frame, .. } => match frame {
                    Frame::Deliver { id, packet } => {
                        return self
                            .events
                            .send(NetEvent::Deliver {
                                relay: peer,
                                id,
                                packet,
                            })
                            .await
                            .is_ok();
                    }
                    Frame::Stored(seq) => {
                        if let Some(Waiter::Packet(r)) = self
                            .relays
                            .get_mut(&peer)
                            .and_then(|r| r.outstanding.remove(&seq))
                        {
                            let _ = r.send(Ok(()));
                        }
                    }
                    Frame::Refused { seq, reason, .. } => {
                        if let Some(w) = self
                            .relays
                            .get_mut(&peer)
                            .and_then(|r| r.outstanding.remove(&seq))
                        {
                            w.fail(NetError::Refused(reason));
                        }
                    }
                    Frame::Reply { req, status, body } => {
                        if let Some(Waiter::Request(r)) = self
                            .relays
                            .get_mut(&peer)
                            .and_then(|r| r.outstanding.remove(&req))
                        {
                            let _ = r.send(Ok((status, body)));
                        }
                    }
                    other => tracing::debug!(%peer, ?other, "unexpected frame from a relay"),
                },
                device::Event::Closed { peer, reason, .. } => {
                    tracing::debug!(%peer, %reason, "relay stream closed");
                    if self.swarm.behaviour().device.open_streams_to(peer) == 0 {
                        let was_up = self.relays.get(&peer).is_some_and(|r| r.up);
                        if let Some(r) = self.relays.get_mut(&peer) {
                            r.up = false;
                        }
                        self.dial_failed(peer);
                        if was_up {
                            return self.events.send(NetEvent::Down(peer)).await.is_ok();
                        }
                    }
                }
            },
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                tracing::debug!(%peer, %error, "could not reach relay");
                if !self.relays.get(&peer).is_some_and(|r| r.up) {
                    let retry_in = self.dial_failed(peer);
                    self.unreachable(peer, dial_reason(&error), retry_in);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                // The stream's Closed event usually came first and did this.
                let Some(r) = self.relays.get_mut(&peer_id) else {
                    return true;
                };
                let was_up = r.up;
                if !(r.up || r.dialing) {
                    return true;
                }
                r.up = false;
                self.dial_failed(peer_id);
                if was_up {
                    return self.events.send(NetEvent::Down(peer_id)).await.is_ok();
                }
            }
            _ => {}
        }
        true
    }
}
