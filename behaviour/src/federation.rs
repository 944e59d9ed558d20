//! `/meshwhisper/federation/2`: relays forwarding packets to each other and
//! reconciling their address books.
//!
//! One long-lived stream per connection between two admitted relays carries
//! the frames of [`codec`]. The **dialer** of a connection opens the stream
//! (once the Swarm owner has admitted the peer, see [`Behaviour::open`]), so
//! two relays never race to open two streams on one connection. This
//! behaviour only moves frames; the Swarm owner decides what they mean.

pub mod codec;

use crate::relay_key::PeerMap;
use crate::stream;
use codec::Frame;
use libp2p::PeerId;
use libp2p::core::{Endpoint, Multiaddr, transport::PortUse};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, NotifyHandler, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use std::collections::{HashSet, VecDeque};
use std::task::{Context, Poll};

/// Limits.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Largest frame. Default [`codec::DEFAULT_MAX_FRAME`].
    pub max_frame: usize,
    /// Frames queued per stream; beyond that a frame is handed back as
    /// [`Event::Unsent`]. Default 8192.
    pub max_queued_frames: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_frame: codec::DEFAULT_MAX_FRAME,
            max_queued_frames: 8192,
        }
    }
}

/// What happened on a federation stream.
#[derive(Debug)]
pub enum Event {
    /// The first stream to `peer` opened.
    Opened {
        /// The peer.
        peer: PeerId,
    },
    /// A frame arrived.
    Frame {
        /// The peer.
        peer: PeerId,
        /// The frame.
        frame: Frame,
    },
    /// A stream to `peer` closed; frames queued on it are lost.
    Closed {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: stream::CloseReason,
        /// Whether it was the last one.
        last: bool,
    },
    /// A frame could not be queued (queue full, or the stream went away):
    /// the sender keeps it and decides what to do.
    Unsent {
        /// The peer.
        peer: PeerId,
        /// The frame.
        frame: Frame,
    },
}

/// The behaviour.
pub struct Behaviour {
    config: Config,
    /// Connections we dialed, per peer (the ones we may open a stream on).
    dialed: PeerMap<HashSet<ConnectionId>>,
    /// Connections with an open stream, per peer.
    open: PeerMap<HashSet<ConnectionId>>,
    /// Connections that go through an anchor's circuit, and to whom: a
    /// stream on a direct connection to the same peer is preferred.
    relayed: std::collections::HashMap<ConnectionId, PeerId>,
    /// This relay (who opens the stream on a hole-punched connection).
    local: Option<PeerId>,
    actions: VecDeque<ToSwarm<Event, stream::In<Frame>>>,
}

impl Behaviour {
    /// A behaviour with `config`.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            dialed: PeerMap::default(),
            open: PeerMap::default(),
            relayed: std::collections::HashMap::new(),
            local: None,
            actions: VecDeque::new(),
        }
    }

    /// Opens a stream on every connection to `peer` that we dialed and that
    /// has none yet. Connections `peer` dialed get their stream from it.
    pub fn open(&mut self, peer: PeerId) {
        let Some(conns) = self.dialed.get(&peer) else {
            return;
        };
        let open = self.open.get(&peer);
        for c in conns {
            if open.is_some_and(|o| o.contains(c)) {
                continue;
            }
            self.actions.push_back(ToSwarm::NotifyHandler {
                peer_id: peer,
                handler: NotifyHandler::One(*c),
                event: stream::In::Open,
            });
        }
    }

    /// The connection frames to `peer` go on: one with an open stream,
    /// direct rather than through a circuit when there is one (after a
    /// hole punch the traffic moves to the direct connection).
    fn chosen(&self, peer: &PeerId) -> Option<ConnectionId> {
        let open = self.open.get(peer)?;
        open.iter()
            .find(|c| !self.relayed.contains_key(c))
            .or_else(|| open.iter().next())
            .copied()
    }

    /// Whether frames to `peer` go on a direct connection (`Some(false)`:
    /// through a circuit; `None`: no stream is open).
    pub fn is_direct(&self, peer: &PeerId) -> Option<bool> {
        self.chosen(peer).map(|c| !self.relayed.contains_key(&c))
    }

    /// This relay's PeerId: on a direct connection to a peer it already
    /// reaches through a circuit (a hole punch, which dials from both
    /// ends), the end with the smaller PeerId opens the stream.
    pub fn with_local(mut self, local: PeerId) -> Self {
        self.local = Some(local);
        self
    }

    /// Whether we open the stream on a new direct connection to `peer`
    /// (`dialed`: we dialed it as the dialer). Normally the dialer does;
    /// on a connection to a peer we reach through a circuit, the end with
    /// the smaller PeerId does: a hole punch dials from both ends and
    /// libp2p reports the result differently over TCP (one connection,
    /// both ends "dialers", one with its role overridden) and QUIC (an
    /// outbound connection at one end, an inbound one at the other).
    fn opens(&self, peer: &PeerId, dialed: bool) -> bool {
        let punched = self.relayed.values().any(|p| p == peer);
        match (punched, self.local) {
            (true, Some(local)) => local < *peer,
            _ => dialed,
        }
    }

    /// Connections to `peer` that go through a circuit.
    pub fn relayed_connections(&self, peer: &PeerId) -> Vec<ConnectionId> {
        self.relayed
            .iter()
            .filter(|(_, p)| *p == peer)
            .map(|(c, _)| *c)
            .collect()
    }

    /// Sends `frame` on an open stream to `peer`; `false` if there is none.
    pub fn send(&mut self, peer: PeerId, frame: Frame) -> bool {
        let Some(c) = self.chosen(&peer) else {
            return false;
        };
        self.actions.push_back(ToSwarm::NotifyHandler {
            peer_id: peer,
            handler: NotifyHandler::One(c),
            event: stream::In::Send(frame),
        });
        true
    }

    /// Whether a stream to `peer` is open.
    pub fn is_open(&self, peer: &PeerId) -> bool {
        self.open.get(peer).is_some_and(|s| !s.is_empty())
    }

    /// Peers with an open stream.
    pub fn peers(&self) -> impl Iterator<Item = &PeerId> {
        self.open.keys()
    }

    fn stream_gone(&mut self, peer: PeerId, connection: ConnectionId, reason: stream::CloseReason) {
        if let Some(s) = self.open.get_mut(&peer)
            && s.remove(&connection)
        {
            let last = s.is_empty();
            if last {
                self.open.remove(&peer);
            }
            self.actions
                .push_back(ToSwarm::GenerateEvent(Event::Closed { peer, reason, last }));
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = stream::Handler<codec::Codec>;
    type ToSwarm = Event;

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if crate::nat::is_relayed(local) || crate::nat::is_relayed(remote) {
            self.relayed.insert(connection, peer);
        } else if self.opens(&peer, false) {
            self.dialed.entry(peer).or_default().insert(connection);
        }
        Ok(stream::Handler::shedding(
            self.config.max_frame,
            self.config.max_queued_frames,
        ))
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if crate::nat::is_relayed(addr) {
            self.relayed.insert(connection, peer);
            if role == Endpoint::Dialer {
                self.dialed.entry(peer).or_default().insert(connection);
            }
        } else if self.opens(&peer, role == Endpoint::Dialer) {
            self.dialed.entry(peer).or_default().insert(connection);
        }
        Ok(stream::Handler::shedding(
            self.config.max_frame,
            self.config.max_queued_frames,
        ))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(c) = event {
            self.relayed.remove(&c.connection_id);
            if let Some(d) = self.dialed.get_mut(&c.peer_id) {
                d.remove(&c.connection_id);
                if d.is_empty() {
                    self.dialed.remove(&c.peer_id);
                }
            }
            self.stream_gone(
                c.peer_id,
                c.connection_id,
                stream::CloseReason::ConnectionClosed,
            );
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {
            stream::Out::Opened => {
                let s = self.open.entry(peer).or_default();
                let first = s.is_empty();
                s.insert(connection);
                if first {
                    self.actions
                        .push_back(ToSwarm::GenerateEvent(Event::Opened { peer }));
                }
            }
            stream::Out::Frame(frame) => self
                .actions
                .push_back(ToSwarm::GenerateEvent(Event::Frame { peer, frame })),
            stream::Out::Closed(reason) => self.stream_gone(peer, connection, reason),
            stream::Out::Unsent(frame) => self
                .actions
                .push_back(ToSwarm::GenerateEvent(Event::Unsent { peer, frame })),
        }
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Event, THandlerInEvent<Self>>> {
        match self.actions.pop_front() {
            Some(a) => Poll::Ready(a),
            None => Poll::Pending,
        }
    }
}
