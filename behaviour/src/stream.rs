//! A connection handler for our long-lived framed protocols
//! (`/meshwhisper/device/1`, `/meshwhisper/federation/1`): at most one
//! stream per connection, read and written as frames by a [`FrameCodec`],
//! with a bounded send queue.

use asynchronous_codec::{Decoder, Encoder, Framed};
use futures::{SinkExt as _, StreamExt as _};
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound, FullyNegotiatedOutbound};
use libp2p::swarm::{
    ConnectionHandler, ConnectionHandlerEvent, Stream, StreamProtocol, SubstreamProtocol,
};
use std::collections::VecDeque;
use std::task::{Context, Poll};

/// Why a length prefix was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LengthError {
    /// It announces more than the limit.
    TooLarge {
        /// Announced size.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// It announces an empty frame (every frame has a type byte).
    Empty,
}

/// A frame that could not be read or written (both protocols).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed.
    #[error("stream I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A frame is larger than allowed.
    #[error("frame of {got} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced size.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// A frame is malformed.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

impl From<LengthError> for FrameError {
    fn from(e: LengthError) -> Self {
        match e {
            LengthError::TooLarge { got, max } => FrameError::TooLarge { got, max },
            LengthError::Empty => FrameError::Malformed("empty frame"),
        }
    }
}

/// Takes one `u32 BE length ‖ type ‖ body` frame off `src`: the type and
/// the body, `None` until it has all arrived.
pub fn split_frame(
    src: &mut bytes::BytesMut,
    max: usize,
) -> Result<Option<(u8, bytes::Bytes)>, LengthError> {
    use bytes::Buf as _;
    if src.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
    if len > max {
        return Err(LengthError::TooLarge { got: len, max });
    }
    if len == 0 {
        return Err(LengthError::Empty);
    }
    if src.len() < 4 + len {
        src.reserve(4 + len - src.len());
        return Ok(None);
    }
    src.advance(4);
    let mut body = src.split_to(len).freeze();
    let kind = body.get_u8();
    Ok(Some((kind, body)))
}

/// The wire format of one framed protocol: what [`Codec`] needs besides
/// the shared `u32 BE length ‖ type ‖ body` framing and size limit.
pub trait Wire: Send + 'static {
    /// What one frame decodes to.
    type Frame: std::fmt::Debug + Send + 'static;
    /// The protocol name negotiated for the stream.
    const PROTOCOL: &'static str;
    /// Encoded size of `frame` after the length prefix (type byte included).
    fn body_len(frame: &Self::Frame) -> usize;
    /// Refuses a frame that cannot be encoded (counts over their bounds).
    fn check(frame: &Self::Frame) -> Result<(), FrameError>;
    /// Writes the type byte and body (exactly [`Wire::body_len`] bytes).
    fn write(frame: Self::Frame, dst: &mut bytes::BytesMut);
    /// Decodes a body of type `kind`, strictly.
    fn read(kind: u8, body: bytes::Bytes) -> Result<Self::Frame, FrameError>;
}

/// The length-prefixed codec of protocol `W`, refusing frames over a size
/// limit in both directions.
pub struct LengthCodec<W> {
    max: usize,
    wire: std::marker::PhantomData<fn() -> W>,
}

impl<W> std::fmt::Debug for LengthCodec<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LengthCodec")
            .field("max", &self.max)
            .finish()
    }
}

impl<W> Clone for LengthCodec<W> {
    fn clone(&self) -> Self {
        Self::new(self.max)
    }
}

impl<W> LengthCodec<W> {
    /// A codec refusing frames over `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            wire: std::marker::PhantomData,
        }
    }
}

impl<W: Wire> Encoder for LengthCodec<W> {
    type Item<'a> = W::Frame;
    type Error = FrameError;

    fn encode(&mut self, f: W::Frame, dst: &mut bytes::BytesMut) -> Result<(), FrameError> {
        use bytes::BufMut as _;
        let len = W::body_len(&f);
        if len > self.max {
            return Err(FrameError::TooLarge {
                got: len,
                max: self.max,
            });
        }
        W::check(&f)?;
        dst.reserve(4 + len);
        dst.put_u32(len as u32);
        W::write(f, dst);
        Ok(())
    }
}

impl<W: Wire> Decoder for LengthCodec<W> {
    type Item = W::Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut bytes::BytesMut) -> Result<Option<W::Frame>, FrameError> {
        match split_frame(src, self.max)? {
            Some((kind, body)) => W::read(kind, body).map(Some),
            None => Ok(None),
        }
    }
}

impl<W: Wire> FrameCodec for LengthCodec<W> {
    type Frame = W::Frame;
    type Fault = FrameError;
    const PROTOCOL: &'static str = W::PROTOCOL;
    fn with_max(max: usize) -> Self {
        Self::new(max)
    }
}

/// A length-prefixed codec of one protocol.
pub trait FrameCodec:
    for<'a> Encoder<Item<'a> = Self::Frame, Error = Self::Fault>
    + Decoder<Item = Self::Frame, Error = Self::Fault>
    + Send
    + 'static
{
    /// Why a frame could not be read or written.
    type Fault: std::fmt::Display + From<std::io::Error> + AsCloseReason;
    /// What one frame decodes to.
    type Frame: std::fmt::Debug + Send + 'static;
    /// The protocol name negotiated for the stream.
    const PROTOCOL: &'static str;
    /// A codec refusing frames over `max` bytes.
    fn with_max(max: usize) -> Self;
}

/// Commands from the behaviour.
#[derive(Debug)]
pub enum In<F> {
    /// Open the stream (dialer side).
    Open,
    /// Send a frame.
    Send(F),
}

/// Why a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// Its connection closed.
    ConnectionClosed,
    /// The peer closed the stream.
    ClosedByPeer,
    /// It could not be opened (the peer does not speak the protocol, or
    /// negotiation failed).
    OpenFailed(String),
    /// Reading or writing failed.
    Io(String),
    /// The peer sent a frame that does not decode.
    Malformed(String),
    /// The peer did not read: the send queue filled up.
    Stuck,
}

impl CloseReason {
    /// Whether the stream ended in a failure (rather than an orderly close
    /// of the stream or its connection).
    pub fn is_failure(&self) -> bool {
        !matches!(self, Self::ConnectionClosed | Self::ClosedByPeer)
    }

    /// A short stable label, for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::ConnectionClosed => "connection_closed",
            Self::ClosedByPeer => "closed_by_peer",
            Self::OpenFailed(_) => "open_failed",
            Self::Io(_) => "io",
            Self::Malformed(_) => "malformed",
            Self::Stuck => "stuck",
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ConnectionClosed => f.write_str("connection closed"),
            Self::ClosedByPeer => f.write_str("stream closed by peer"),
            Self::OpenFailed(e) => write!(f, "could not open stream: {e}"),
            Self::Io(e) => write!(f, "stream I/O: {e}"),
            Self::Malformed(e) => write!(f, "malformed frame: {e}"),
            Self::Stuck => f.write_str("peer is not reading: send queue full"),
        }
    }
}

/// Events to the behaviour.
#[derive(Debug)]
pub enum Out<F> {
    /// The stream is open.
    Opened,
    /// A frame arrived.
    Frame(F),
    /// The stream ended (or failed, or never opened).
    Closed(CloseReason),
    /// A frame was not queued (no stream, or the queue is full) in a
    /// handler that sheds instead of closing: the behaviour decides.
    Unsent(F),
}

/// A codec fault that names why its stream closed.
pub trait AsCloseReason {
    /// The reason a stream closes on this fault.
    fn close_reason(&self) -> CloseReason;
}

impl AsCloseReason for FrameError {
    fn close_reason(&self) -> CloseReason {
        reason_of(self)
    }
}

impl CloseReason {
    fn from_fault<F: AsCloseReason>(f: &F) -> Self {
        f.close_reason()
    }
}

fn reason_of(e: &FrameError) -> CloseReason {
    match e {
        FrameError::Io(e) => CloseReason::Io(e.to_string()),
        FrameError::Malformed(m) => CloseReason::Malformed((*m).to_string()),
        too_large @ FrameError::TooLarge { .. } => CloseReason::Malformed(too_large.to_string()),
    }
}

/// The handler.
pub struct Handler<C: FrameCodec> {
    max_frame: usize,
    max_queued: usize,
    shed: bool,
    stream: Option<Framed<Stream, C>>,
    want_open: bool,
    opening: bool,
    queue: VecDeque<C::Frame>,
    events: VecDeque<Out<C::Frame>>,
}

impl<C: FrameCodec> Handler<C> {
    /// A handler with frames up to `max_frame` bytes and at most
    /// `max_queued` frames waiting to be written (beyond that the stream is
    /// closed as stuck).
    pub fn new(max_frame: usize, max_queued: usize) -> Self {
        Self {
            max_frame,
            max_queued: max_queued.max(1),
            shed: false,
            stream: None,
            want_open: false,
            opening: false,
            queue: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Like [`Handler::new`], but a frame that finds the queue full (or no
    /// stream) is handed back as [`Out::Unsent`] and the stream stays open:
    /// for protocols whose sender keeps what it sends until acknowledged.
    pub fn shedding(max_frame: usize, max_queued: usize) -> Self {
        Self {
            shed: true,
            ..Self::new(max_frame, max_queued)
        }
    }

    fn attach(&mut self, stream: Stream) {
        if self.stream.is_some() {
            // One stream per connection: a second one is refused by
            // dropping it.
            return;
        }
        self.stream = Some(Framed::new(stream, C::with_max(self.max_frame)));
        self.events.push_back(Out::Opened);
    }

    fn close(&mut self, why: CloseReason) {
        if self.stream.take().is_some() || self.opening {
            self.events.push_back(Out::Closed(why));
        }
        self.opening = false;
        self.queue.clear();
    }
}

impl<C: FrameCodec> ConnectionHandler for Handler<C> {
    type FromBehaviour = In<C::Frame>;
    type ToBehaviour = Out<C::Frame>;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(StreamProtocol::new(C::PROTOCOL)), ())
    }

    fn connection_keep_alive(&self) -> bool {
        self.stream.is_some() || self.opening || self.want_open
    }

    fn on_behaviour_event(&mut self, event: In<C::Frame>) {
        match event {
            In::Open => {
                if self.stream.is_none() && !self.opening {
                    self.want_open = true;
                }
            }
            In::Send(frame) => {
                let full = self.queue.len() >= self.max_queued;
                if self.shed && (self.stream.is_none() || full) {
                    self.events.push_back(Out::Unsent(frame));
                    return;
                }
                if self.stream.is_none() {
                    return;
                }
                if full {
                    self.close(CloseReason::Stuck);
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
                    .push_back(Out::Closed(CloseReason::OpenFailed(format!(
                        "{:?}",
                        e.error
                    ))));
            }
            _ => {}
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Out<C::Frame>>> {
        if let Some(e) = self.events.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(e));
        }
        if self.want_open {
            self.want_open = false;
            self.opening = true;
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(
                    ReadyUpgrade::new(StreamProtocol::new(C::PROTOCOL)),
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
                        failed = Some(CloseReason::from_fault(&e));
                        break;
                    }
                }
                Poll::Ready(Err(e)) => {
                    failed = Some(CloseReason::from_fault(&e));
                    break;
                }
                Poll::Pending => break,
            }
        }
        if failed.is_none()
            && let Poll::Ready(Err(e)) = stream.poll_flush_unpin(cx)
        {
            failed = Some(CloseReason::from_fault(&e));
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
                self.close(CloseReason::from_fault(&e));
                self.poll(cx)
            }
            Poll::Ready(None) => {
                self.close(CloseReason::ClosedByPeer);
                self.poll(cx)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
