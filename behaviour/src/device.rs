//! `/meshwhisper/device/1`: how native devices talk to their home relay.
//!
//! One long-lived stream per device connection carries length-prefixed
//! frames both ways ([`codec`]): the device registers its destination
//! hashes, sends packets (each answered by `Stored` once durable), and acks
//! deliveries (so the relay may forget them). This behaviour is a state
//! machine: it moves frames between streams and the Swarm owner, which
//! decides what they mean (store, route, deliver).

pub mod codec;

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

/// Which end of the protocol this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts device streams.
    Relay,
    /// Opens a stream on every connection it dials.
    Device,
}

/// Limits.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// This node's role.
    pub role: Role,
    /// Largest frame. Default [`codec::DEFAULT_MAX_FRAME`].
    pub max_frame: usize,
    /// Frames queued per stream before it is closed as stuck. Default 1024.
    pub max_queued_frames: usize,
}

impl Config {
    /// Defaults for `role`.
    pub fn new(role: Role) -> Self {
        Self {
            role,
            max_frame: codec::DEFAULT_MAX_FRAME,
            max_queued_frames: 1024,
        }
    }
}

/// What happened on a device stream.
#[derive(Debug)]
pub enum Event {
    /// A stream opened on `connection`.
    Opened {
        /// The peer.
        peer: PeerId,
        /// The connection.
        connection: ConnectionId,
    },
    /// A frame arrived.
    Frame {
        /// The peer.
        peer: PeerId,
        /// The connection.
        connection: ConnectionId,
        /// The frame.
        frame: Frame,
    },
    /// The stream closed (or failed to open).
    Closed {
        /// The peer.
        peer: PeerId,
        /// The connection.
        connection: ConnectionId,
        /// Why.
        reason: crate::stream::CloseReason,
    },
}

/// The behaviour.
pub struct Behaviour {
    config: Config,
    open: HashSet<(PeerId, ConnectionId)>,
    actions: VecDeque<ToSwarm<Event, stream::In<Frame>>>,
}

impl Behaviour {
    /// A behaviour with `config`.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            open: HashSet::new(),
            actions: VecDeque::new(),
        }
    }

    /// Sends `frame` on the stream of `connection`; `false` if there is none.
    pub fn send(&mut self, peer: PeerId, connection: ConnectionId, frame: Frame) -> bool {
        if !self.open.contains(&(peer, connection)) {
            return false;
        }
        self.actions.push_back(ToSwarm::NotifyHandler {
            peer_id: peer,
            handler: NotifyHandler::One(connection),
            event: stream::In::Send(frame),
        });
        true
    }

    /// Sends `frame` on any open stream to `peer` (device side).
    pub fn send_to(&mut self, peer: PeerId, frame: Frame) -> bool {
        let conn = self.open.iter().find(|(p, _)| *p == peer).map(|(_, c)| *c);
        match conn {
            Some(c) => self.send(peer, c, frame),
            None => false,
        }
    }

    /// Open streams to `peer`.
    pub fn open_streams_to(&self, peer: PeerId) -> usize {
        self.open.iter().filter(|(p, _)| *p == peer).count()
    }

    /// Open streams.
    pub fn open_streams(&self) -> usize {
        self.open.len()
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = stream::Handler<codec::Codec>;
    type ToSwarm = Event;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(stream::Handler::new(
            self.config.max_frame,
            self.config.max_queued_frames,
        ))
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if self.config.role == Role::Device {
            self.actions.push_back(ToSwarm::NotifyHandler {
                peer_id: peer,
                handler: NotifyHandler::One(connection),
                event: stream::In::Open,
            });
        }
        Ok(stream::Handler::new(
            self.config.max_frame,
            self.config.max_queued_frames,
        ))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(c) = event
            && self.open.remove(&(c.peer_id, c.connection_id))
        {
            self.actions
                .push_back(ToSwarm::GenerateEvent(Event::Closed {
                    peer: c.peer_id,
                    connection: c.connection_id,
                    reason: crate::stream::CloseReason::ConnectionClosed,
                }));
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        let ev = match event {
            stream::Out::Opened => {
                self.open.insert((peer, connection));
                Event::Opened { peer, connection }
            }
            stream::Out::Frame(frame) => Event::Frame {
                peer,
                connection,
                frame,
            },
            // Device handlers close instead of shedding.
            stream::Out::Unsent(_) => return,
            stream::Out::Closed(reason) => {
                self.open.remove(&(peer, connection));
                Event::Closed {
                    peer,
                    connection,
                    reason,
                }
            }
        };
        self.actions.push_back(ToSwarm::GenerateEvent(ev));
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Event, THandlerInEvent<Self>>> {
        match self.actions.pop_front() {
            Some(a) => Poll::Ready(a),
            None => Poll::Pending,
        }
    }
}
