//! The connection handler of `/meshwhisper/device/1`: at most one stream
//! per connection, read and written as frames.

use super::codec::{Codec, Frame, PROTOCOL};
use asynchronous_codec::Framed;
use futures::{SinkExt as _, StreamExt as _};
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound, FullyNegotiatedOutbound};
use libp2p::swarm::{
    ConnectionHandler, ConnectionHandlerEvent, Stream, StreamProtocol, SubstreamProtocol,
};
use std::collections::VecDeque;
use std::task::{Context, Poll};

/// Commands from the behaviour.
#[derive(Debug)]
pub enum In {
    /// Open the stream (device side).
    Open,
    /// Send a frame.
    Send(Frame),
}

/// Events to the behaviour.
#[derive(Debug)]
pub enum Out {
    /// The stream is open.
    Opened,
    /// A frame arrived.
    Frame(Frame),
    /// The stream ended (or failed, or never opened).
    Closed(String),
}

/// The handler.
pub struct Handler {
    max_frame: usize,
    max_queued: usize,
    stream: Option<Framed<Stream, Codec>>,
    want_open: bool,
    opening: bool,
    queue: VecDeque<Frame>,
    events: VecDeque<Out>,
}

impl Handler {
    pub(crate) fn new(max_frame: usize, max_queued: usize) -> Self {
        Self {
            max_frame,
            max_queued: max_queued.max(1),
            stream: None,
            want_open: false,
            opening: false,
            queue: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    fn attach(&mut self, stream: Stream) {
        if self.stream.is_some() {
            // One stream per connection: a second one is refused by
            // dropping it.
            return;
        }
        self.stream = Some(Framed::new(stream, Codec::new(self.max_frame)));
        self.events.push_back(Out::Opened);
    }

    fn close(&mut self, why: String) {
        if self.stream.take().is_some() || self.opening {
            self.events.push_back(Out::Closed(why));
        }
        self.opening = false;
        self.queue.clear();
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = In;
    type ToBehaviour = Out;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(StreamProtocol::new(PROTOCOL)), ())
    }

    fn connection_keep_alive(&self) -> bool {
        self.stream.is_some() || self.opening || self.want_open
    }

    fn on_behaviour_event(&mut self, event: In) {
        match event {
            In::Open => {
                if self.stream.is_none() && !self.opening {
                    self.want_open = true;
                }
            }
            In::Send(frame) => {
                if self.stream.is_none() {
                    return;
                }
                if self.queue.len() >= self.max_queued {
                    self.close("peer is not reading: send queue full".into());
                    return;
                }
                self.queue.push_back(frame);
            }
        }
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol, ..
            }) => self.attach(protocol),
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol, ..
            }) => {
                self.opening = false;
                self.attach(protocol)
            }
            ConnectionEvent::DialUpgradeError(e) => {
                self.opening = false;
                self.events
                    .push_back(Out::Closed(format!("could not open stream: {:?}", e.error)));
            }
            _ => {}
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Out>> {
        if let Some(e) = self.events.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(e));
        }
        if self.want_open {
            self.want_open = false;
            self.opening = true;
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(
                    ReadyUpgrade::new(StreamProtocol::new(PROTOCOL)),
                    (),
                ),
            });
        }
        let Some(stream) = self.stream.as_mut() else {
            return Poll::Pending;
        };
        // Write what is queued.
        let mut failed = None;
        while !self.queue.is_empty() {
            match stream.poll_ready_unpin(cx) {
                Poll::Ready(Ok(())) => {
                    if let Some(f) = self.queue.pop_front()
                        && let Err(e) = stream.start_send_unpin(f)
                    {
                        failed = Some(e.to_string());
                        break;
                    }
                }
                Poll::Ready(Err(e)) => {
                    failed = Some(e.to_string());
                    break;
                }
                Poll::Pending => break,
            }
        }
        if failed.is_none()
            && let Poll::Ready(Err(e)) = stream.poll_flush_unpin(cx)
        {
            failed = Some(e.to_string());
        }
        if let Some(why) = failed {
            self.close(why);
            return self.poll(cx);
        }
        // Read one frame.
        match stream.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(Out::Frame(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.close(e.to_string());
                self.poll(cx)
            }
            Poll::Ready(None) => {
                self.close("stream closed by peer".into());
                self.poll(cx)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
