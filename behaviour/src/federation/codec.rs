//! Frames of `/meshwhisper/federation/2`: one long-lived stream per pair of
//! relays, length-prefixed frames in both directions.
//!
//! ```text
//! frame = length (u32 BE, of what follows) ‖ type (u8) ‖ body
//!
//! packets
//!   0x01 Forward   id (16) ‖ attempt (u8) ‖ hops (u8) ‖ client packet
//!                                         flooded: stored only where homed; a re-flood keeps
//!                                         its id and counts up `attempt` (relays drop repeats
//!                                         of one attempt; the home relay stores an id once)
//!   0x02 Routed    id (16) ‖ flags (u8) ‖ hops (u8) ‖ target key (32) ‖ client packet
//!                                         for the relay with that Ed25519 key; flags bit 0:
//!                                         store it even if that relay does not home the recipient
//!   0x03 Ack       id (16) ‖ status (u8) [‖ home key (32), with Stored of a flood]
//!                                         answers 0x01 and 0x02; a Stored ack names the relay
//!                                         that stored the packet
//!   0x04 Forget    n (u16) ‖ n × id (16)  the sender has these Stored acks: the home relay may
//!                                         forget the ids (it remembers them until then, so a
//!                                         packet resent after a lost ack is never stored twice)
//!   0x05 Batch     n (u16) ‖ n × (length (u32) ‖ type (u8) ‖ body)
//!                                         1..=1024 frames of any other type, in order: what a
//!                                         relay sends one peer at once goes out as one frame
//!   0x06 Transit   to (32) ‖ hops (u8) ‖ inner type (u8) ‖ inner body
//!                                         "deliver the inner frame to relay `to`" (for a relay
//!                                         that cannot dial it): inner is a Routed packet, a
//!                                         Claim, or another Transit, nested at most
//!                                         MAX_TRANSIT_DEPTH deep; `hops` counts the relays the
//!                                         frame has passed. The relay carrying it answers with
//!                                         the inner frame's Ack or ClaimReply as they come back
//!   0x07 Onion     hop id (16) ‖ layer    one onion v2 layer (a v2 size: every layer of an onion,
//!                                         and every onion of a size class, has one size); the
//!                                         hop id is the sender's own, for the answer
//!   0x08 OnionAck  hop id (16) ‖ status (u8)   how the onion ended: the home relay's Ack status,
//!                                         passed back hop by hop, each under the hop's own id
//! directory
//!   0x20 Claim      req (u64) ‖ ns len (u8) ‖ namespace ‖ identity (32)
//!                                         a client of the sender wants this identity's bundle
//!                                         and a one-time prekey (it talks only to its own relay)
//!   0x21 ClaimReply req (u64) ‖ status (u8) ‖ body   as the device protocol's Reply to a Claim
//! address-book anti-entropy
//!   0x10 DigestRequest  req (u64) ‖ after flag (u8) [‖ key (32)] ‖ limit (u16)
//!   0x11 Digest         req (u64) ‖ more (u8) ‖ n (u16) ‖ n × (key (32) ‖ timestamp ms (u64))
//!   0x12 Pull           req (u64) ‖ n (u16) ‖ n × key (32)
//!   0x13 Records        req (u64) ‖ n (u16) ‖ n × (length (u16) ‖ signed address record)
//! ```
//!
//! Decoding is strict: unknown types, short bodies, trailing bytes, counts
//! over the bounds below and frames over the size limit are errors, and an
//! error closes the stream.

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

/// The protocol name.
pub const PROTOCOL: &str = "/meshwhisper/federation/2";
/// Most frames in one Batch.
pub const MAX_BATCH: usize = 1024;
/// Most ids in one Forget.
pub const MAX_FORGET: usize = 1024;
/// Routed flag: store the packet even if the target does not home its
/// recipient (the sender tried flooding and no relay claimed it).
pub const ROUTED_STORE_ANYWAY: u8 = 1;
/// Default largest frame: a 256 KiB packet plus framing, or a page of records.
pub const DEFAULT_MAX_FRAME: usize = 512 * 1024;
/// Most entries in one Digest (and the largest `limit` a request may ask).
pub const MAX_DIGEST: usize = 1024;
/// Most keys in one Pull.
pub const MAX_PULL: usize = 256;
/// Most records in one Records frame.
pub const MAX_RECORDS: usize = 64;
/// Most Transit frames nested in one another.
pub const MAX_TRANSIT_DEPTH: usize = 4;

/// A forwarded packet's id: random, chosen by the relay that first
/// forwarded it, used for dedup and acks.
pub type PacketId = [u8; 16];

/// How the receiving relay took a forwarded packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AckStatus {
    /// Stored at the recipient's home relay (durable there): the sender may
    /// forget its copy.
    Stored = 0,
    /// Not homed here; flooded on to other relays (a `Stored` may follow).
    Relayed = 1,
    /// Seen before (by id); nothing done.
    Duplicate = 2,
    /// Not homed here and the hop cap stops it.
    NotHome = 3,
    /// Not taken now (rate limit, storage failure): retry later.
    Refused = 4,
    /// A routed packet for a relay other than this one.
    NotTarget = 5,
    /// Not a routable packet: never retry.
    Malformed = 6,
    /// A relay carrying the packet in transit could not take it on (hop
    /// cap, no way to the next relay, its transit table full): the sender
    /// tries another path.
    NoPath = 7,
}

impl AckStatus {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Stored,
            1 => Self::Relayed,
            2 => Self::Duplicate,
            3 => Self::NotHome,
            4 => Self::Refused,
            5 => Self::NotTarget,
            6 => Self::Malformed,
            7 => Self::NoPath,
            _ => return None,
        })
    }

    /// A short stable label, for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Relayed => "relayed",
            Self::Duplicate => "duplicate",
            Self::NotHome => "not_home",
            Self::Refused => "refused",
            Self::NotTarget => "not_target",
            Self::Malformed => "malformed",
            Self::NoPath => "no_path",
        }
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Several frames for one peer, in order (never a batch inside).
    Batch(Vec<Frame>),
    /// A flooded packet.
    Forward {
        /// Packet id (the same for every attempt).
        id: PacketId,
        /// Which flood of this packet (0 first).
        attempt: u8,
        /// Relays it has passed (1 when first sent).
        hops: u8,
        /// The client packet.
        packet: Bytes,
    },
    /// A packet for one relay.
    Routed {
        /// Packet id.
        id: PacketId,
        /// [`ROUTED_STORE_ANYWAY`] or 0.
        flags: u8,
        /// Relays it has passed.
        hops: u8,
        /// The home relay's Ed25519 key.
        target: [u8; 32],
        /// The client packet.
        packet: Bytes,
    },
    /// The answer to Forward or Routed.
    Ack {
        /// Packet id.
        id: PacketId,
        /// What happened.
        status: AckStatus,
        /// With `Stored`: the relay that stored it (the recipient's home).
        home: Option<[u8; 32]>,
    },
    /// The home relay may forget these ids: their senders have the acks.
    Forget {
        /// Packet ids (at most [`MAX_FORGET`]).
        ids: Vec<PacketId>,
    },
    /// A directory claim on behalf of a client of the sender.
    Claim {
        /// Request id.
        req: u64,
        /// Directory namespace (≤ 255 bytes).
        namespace: String,
        /// Whose bundle.
        identity: [u8; 32],
    },
    /// The answer to a Claim.
    ClaimReply {
        /// The request's id.
        req: u64,
        /// Outcome.
        status: crate::device::codec::Status,
        /// Bundle and one-time prekey, or a reason.
        body: Bytes,
    },
    /// Asks for a page of the peer's address-book digest.
    DigestRequest {
        /// Request id.
        req: u64,
        /// Keys strictly greater than this (from the start when `None`).
        after: Option<[u8; 32]>,
        /// Most entries wanted (≤ [`MAX_DIGEST`]).
        limit: u16,
    },
    /// A page of `(relay key, record timestamp)` in key order.
    Digest {
        /// Request id.
        req: u64,
        /// Whether entries follow the last one of this page.
        more: bool,
        /// The entries.
        entries: Vec<([u8; 32], u64)>,
    },
    /// Asks for the records of these relays.
    Pull {
        /// Request id.
        req: u64,
        /// Relay keys.
        keys: Vec<[u8; 32]>,
    },
    /// Signed address records (each checked by the receiver).
    Records {
        /// Request id (0 when unsolicited).
        req: u64,
        /// Encoded records.
        records: Vec<Bytes>,
    },
    /// One onion layer (see the module docs).
    Onion {
        /// This hop's id for it (answers come back under it).
        hop: [u8; 16],
        /// The layer: a valid onion v2 size.
        layer: Bytes,
    },
    /// The answer to an Onion frame.
    OnionAck {
        /// The hop id the onion came under.
        hop: [u8; 16],
        /// The home relay's answer.
        status: AckStatus,
    },
    /// Carry `inner` to the relay `to` (see the module docs).
    Transit {
        /// The relay the inner frame is for (Ed25519 key).
        to: [u8; 32],
        /// Relays the frame has passed (1 when first sent).
        hops: u8,
        /// A Routed packet, a Claim, or another Transit.
        inner: Box<Frame>,
    },
}

impl Frame {
    /// How deep Transit frames nest here (0 for any other frame).
    pub fn transit_depth(&self) -> usize {
        match self {
            Frame::Transit { inner, .. } => 1 + inner.transit_depth(),
            _ => 0,
        }
    }

    /// The frame at the bottom of nested Transit frames (itself for any
    /// other frame).
    pub fn innermost(&self) -> &Frame {
        match self {
            Frame::Transit { inner, .. } => inner.innermost(),
            f => f,
        }
    }
}

/// A frame that could not be read or written.
pub use crate::stream::FrameError as Error;

/// The wire format of `/meshwhisper/federation/1`.
#[derive(Debug, Clone, Copy)]
pub struct FederationWire;

/// Length-prefixed frame codec with a size limit.
pub type Codec = crate::stream::LengthCodec<FederationWire>;

fn body_len(f: &Frame) -> usize {
    1 + match f {
        Frame::Batch(frames) => 2 + frames.iter().map(|f| 4 + body_len(f)).sum::<usize>(),
        Frame::Forward { packet, .. } => 18 + packet.len(),
        Frame::Routed { packet, .. } => 18 + 32 + packet.len(),
        Frame::Ack { home, .. } => 17 + home.map_or(0, |_| 32),
        Frame::Forget { ids } => 2 + 16 * ids.len(),
        Frame::Claim { namespace, .. } => 8 + 1 + namespace.len() + 32,
        Frame::ClaimReply { body, .. } => 8 + 1 + body.len(),
        Frame::DigestRequest { after, .. } => 8 + 1 + after.map_or(0, |_| 32) + 2,
        Frame::Digest { entries, .. } => 8 + 1 + 2 + 40 * entries.len(),
        Frame::Pull { keys, .. } => 8 + 2 + 32 * keys.len(),
        Frame::Records { records, .. } => {
            8 + 2 + records.iter().map(|r| 2 + r.len()).sum::<usize>()
        }
        Frame::Transit { inner, .. } => 32 + 1 + body_len(inner),
        Frame::Onion { layer, .. } => 16 + layer.len(),
        Frame::OnionAck { .. } => 17,
    }
}

impl crate::stream::Wire for FederationWire {
    type Frame = Frame;
    const PROTOCOL: &'static str = PROTOCOL;

    fn body_len(f: &Frame) -> usize {
        body_len(f)
    }

    fn check(f: &Frame) -> Result<(), Error> {
        match &f {
            Frame::Batch(frames) => {
                if frames.is_empty() || frames.len() > MAX_BATCH {
                    return Err(Error::Malformed("a batch holds 1 to 1024 frames"));
                }
                for inner in frames {
                    if matches!(inner, Frame::Batch(_)) {
                        return Err(Error::Malformed("a batch inside a batch"));
                    }
                    Self::check(inner)?;
                }
            }
            Frame::Digest { entries, .. } if entries.len() > MAX_DIGEST => {
                return Err(Error::Malformed("too many digest entries"));
            }
            // What the decoder refuses is never written either.
            Frame::Forward { packet, .. } | Frame::Routed { packet, .. } if packet.is_empty() => {
                return Err(Error::Malformed("empty packet"));
            }
            Frame::Routed { flags, .. } if flags & !ROUTED_STORE_ANYWAY != 0 => {
                return Err(Error::Malformed("unknown routed flags"));
            }
            Frame::DigestRequest { limit, .. } if usize::from(*limit) > MAX_DIGEST => {
                return Err(Error::Malformed("digest limit too large"));
            }
            Frame::Claim { namespace, .. } if namespace.len() > 255 => {
                return Err(Error::Malformed("namespace longer than 255 bytes"));
            }
            Frame::Forget { ids } if ids.len() > MAX_FORGET => {
                return Err(Error::Malformed("too many ids in a forget"));
            }
            Frame::Ack {
                status,
                home: Some(_),
                ..
            } if *status != AckStatus::Stored => {
                return Err(Error::Malformed("only a Stored ack names a home relay"));
            }
            Frame::Transit { inner, .. } => {
                if f.transit_depth() > MAX_TRANSIT_DEPTH {
                    return Err(Error::Malformed("transit nested too deep"));
                }
                if !matches!(
                    **inner,
                    Frame::Routed { .. } | Frame::Claim { .. } | Frame::Transit { .. }
                ) {
                    return Err(Error::Malformed(
                        "transit carries a routed packet, a claim or a transit",
                    ));
                }
                Self::check(inner)?;
            }
            Frame::Onion { layer, .. } if !is_onion_size(layer.len()) => {
                return Err(Error::Malformed("onion layer of no v2 size"));
            }
            Frame::Pull { keys, .. } if keys.len() > MAX_PULL => {
                return Err(Error::Malformed("too many keys in a pull"));
            }
            Frame::Records { records, .. }
                if records.len() > MAX_RECORDS
                    || records.iter().any(|r| r.len() > u16::MAX as usize) =>
            {
                return Err(Error::Malformed("too many or too large records"));
            }
            _ => {}
        }
        Ok(())
    }

    fn write(f: Frame, dst: &mut BytesMut) {
        match f {
            Frame::Batch(frames) => {
                dst.put_u8(0x05);
                dst.put_u16(frames.len() as u16);
                for inner in frames {
                    dst.put_u32(body_len(&inner) as u32);
                    Self::write(inner, dst);
                }
            }
            Frame::Forward {
                id,
                attempt,
                hops,
                packet,
            } => {
                dst.put_u8(0x01);
                dst.put_slice(&id);
                dst.put_u8(attempt);
                dst.put_u8(hops);
                dst.put_slice(&packet);
            }
            Frame::Routed {
                id,
                flags,
                hops,
                target,
                packet,
            } => {
                dst.put_u8(0x02);
                dst.put_slice(&id);
                dst.put_u8(flags);
                dst.put_u8(hops);
                dst.put_slice(&target);
                dst.put_slice(&packet);
            }
            Frame::Ack { id, status, home } => {
                dst.put_u8(0x03);
                dst.put_slice(&id);
                dst.put_u8(status as u8);
                if let Some(h) = home {
                    dst.put_slice(&h);
                }
            }
            Frame::Forget { ids } => {
                dst.put_u8(0x04);
                dst.put_u16(ids.len() as u16);
                for id in ids {
                    dst.put_slice(&id);
                }
            }
            Frame::Claim {
                req,
                namespace,
                identity,
            } => {
                dst.put_u8(0x20);
                dst.put_u64(req);
                dst.put_u8(namespace.len() as u8);
                dst.put_slice(namespace.as_bytes());
                dst.put_slice(&identity);
            }
            Frame::ClaimReply { req, status, body } => {
                dst.put_u8(0x21);
                dst.put_u64(req);
                dst.put_u8(status as u8);
                dst.put_slice(&body);
            }
            Frame::DigestRequest { req, after, limit } => {
                dst.put_u8(0x10);
                dst.put_u64(req);
                match after {
                    Some(k) => {
                        dst.put_u8(1);
                        dst.put_slice(&k);
                    }
                    None => dst.put_u8(0),
                }
                dst.put_u16(limit);
            }
            Frame::Digest { req, more, entries } => {
                dst.put_u8(0x11);
                dst.put_u64(req);
                dst.put_u8(u8::from(more));
                dst.put_u16(entries.len() as u16);
                for (k, ts) in entries {
                    dst.put_slice(&k);
                    dst.put_u64(ts);
                }
            }
            Frame::Pull { req, keys } => {
                dst.put_u8(0x12);
                dst.put_u64(req);
                dst.put_u16(keys.len() as u16);
                for k in keys {
                    dst.put_slice(&k);
                }
            }
            Frame::Transit { to, hops, inner } => {
                dst.put_u8(0x06);
                dst.put_slice(&to);
                dst.put_u8(hops);
                Self::write(*inner, dst);
            }
            Frame::Onion { hop, layer } => {
                dst.put_u8(0x07);
                dst.put_slice(&hop);
                dst.put_slice(&layer);
            }
            Frame::OnionAck { hop, status } => {
                dst.put_u8(0x08);
                dst.put_slice(&hop);
                dst.put_u8(status as u8);
            }
            Frame::Records { req, records } => {
                dst.put_u8(0x13);
                dst.put_u64(req);
                dst.put_u16(records.len() as u16);
                for r in records {
                    dst.put_u16(r.len() as u16);
                    dst.put_slice(&r);
                }
            }
        }
    }

    fn read(kind: u8, body: Bytes) -> Result<Frame, Error> {
        decode_body(kind, body, 0)
    }
}

fn need(body: &Bytes, n: usize) -> Result<(), Error> {
    if body.remaining() < n {
        Err(Error::Malformed("frame too short"))
    } else {
        Ok(())
    }
}

fn array<const N: usize>(body: &mut Bytes) -> Result<[u8; N], Error> {
    need(body, N)?;
    let mut a = [0u8; N];
    body.copy_to_slice(&mut a);
    Ok(a)
}

fn u8_(body: &mut Bytes) -> Result<u8, Error> {
    need(body, 1)?;
    Ok(body.get_u8())
}

fn u16_(body: &mut Bytes) -> Result<u16, Error> {
    need(body, 2)?;
    Ok(body.get_u16())
}

fn u32_(body: &mut Bytes) -> Result<u32, Error> {
    need(body, 4)?;
    Ok(body.get_u32())
}

fn u64_(body: &mut Bytes) -> Result<u64, Error> {
    need(body, 8)?;
    Ok(body.get_u64())
}

fn done(body: &Bytes) -> Result<(), Error> {
    if body.has_remaining() {
        Err(Error::Malformed("trailing bytes"))
    } else {
        Ok(())
    }
}

/// Whether `len` is the size of an onion v2 layer.
pub fn is_onion_size(len: usize) -> bool {
    use meshwhisper_crypto::onion::v2;
    len.checked_sub(v2::PREFIX_LEN)
        .is_some_and(|p| v2::PAYLOAD_CLASSES.contains(&p))
}

/// Decodes a frame body; `depth` is how many Transit frames enclose it.
fn decode_body(kind: u8, mut body: Bytes, depth: usize) -> Result<Frame, Error> {
    let f = match kind {
        0x07 => {
            let hop = array::<16>(&mut body)?;
            if !is_onion_size(body.len()) {
                return Err(Error::Malformed("onion layer of no v2 size"));
            }
            Frame::Onion {
                hop,
                layer: body.split_off(0),
            }
        }
        0x08 => {
            let hop = array::<16>(&mut body)?;
            let status = AckStatus::from_u8(u8_(&mut body)?)
                .ok_or(Error::Malformed("unknown ack status"))?;
            Frame::OnionAck { hop, status }
        }
        0x06 => {
            if depth >= MAX_TRANSIT_DEPTH {
                return Err(Error::Malformed("transit nested too deep"));
            }
            let to = array::<32>(&mut body)?;
            let hops = u8_(&mut body)?;
            let kind = u8_(&mut body)?;
            if !matches!(kind, 0x02 | 0x06 | 0x20) {
                return Err(Error::Malformed(
                    "transit carries a routed packet, a claim or a transit",
                ));
            }
            let inner = decode_body(kind, body.split_off(0), depth + 1)?;
            Frame::Transit {
                to,
                hops,
                inner: Box::new(inner),
            }
        }
        0x01 | 0x02 => {
            let id = array::<16>(&mut body)?;
            let second = u8_(&mut body)?;
            let hops = u8_(&mut body)?;
            let target = if kind == 0x02 {
                Some(array::<32>(&mut body)?)
            } else {
                None
            };
            if body.is_empty() {
                return Err(Error::Malformed("empty packet"));
            }
            let packet = body.split_off(0);
            match target {
                Some(target) => {
                    if second & !ROUTED_STORE_ANYWAY != 0 {
                        return Err(Error::Malformed("unknown routed flags"));
                    }
                    Frame::Routed {
                        id,
                        flags: second,
                        hops,
                        target,
                        packet,
                    }
                }
                None => Frame::Forward {
                    id,
                    attempt: second,
                    hops,
                    packet,
                },
            }
        }
        0x03 => {
            let id = array::<16>(&mut body)?;
            let status = AckStatus::from_u8(u8_(&mut body)?)
                .ok_or(Error::Malformed("unknown ack status"))?;
            let home = if body.has_remaining() && status == AckStatus::Stored {
                Some(array::<32>(&mut body)?)
            } else {
                None
            };
            Frame::Ack { id, status, home }
        }
        0x04 => {
            let n = u16_(&mut body)? as usize;
            if n > MAX_FORGET {
                return Err(Error::Malformed("too many ids in a forget"));
            }
            need(&body, n * 16)?;
            let mut ids = Vec::with_capacity(n);
            for _ in 0..n {
                ids.push(array::<16>(&mut body)?);
            }
            Frame::Forget { ids }
        }
        0x20 => {
            let req = u64_(&mut body)?;
            let n = u8_(&mut body)? as usize;
            need(&body, n)?;
            let namespace = String::from_utf8(body.split_to(n).to_vec())
                .map_err(|_| Error::Malformed("namespace is not UTF-8"))?;
            let identity = array::<32>(&mut body)?;
            Frame::Claim {
                req,
                namespace,
                identity,
            }
        }
        0x21 => {
            let req = u64_(&mut body)?;
            let status = crate::device::codec::Status::from_u8(u8_(&mut body)?)
                .ok_or(Error::Malformed("unknown claim status"))?;
            let rest = body.split_off(0);
            Frame::ClaimReply {
                req,
                status,
                body: rest,
            }
        }
        0x10 => {
            let req = u64_(&mut body)?;
            let after = match u8_(&mut body)? {
                0 => None,
                1 => Some(array::<32>(&mut body)?),
                _ => return Err(Error::Malformed("bad digest cursor flag")),
            };
            let limit = u16_(&mut body)?;
            if limit as usize > MAX_DIGEST {
                return Err(Error::Malformed("digest limit too large"));
            }
            Frame::DigestRequest { req, after, limit }
        }
        0x11 => {
            let req = u64_(&mut body)?;
            let more = match u8_(&mut body)? {
                0 => false,
                1 => true,
                _ => return Err(Error::Malformed("bad digest flag")),
            };
            let n = u16_(&mut body)? as usize;
            if n > MAX_DIGEST {
                return Err(Error::Malformed("too many digest entries"));
            }
            need(&body, n * 40)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let k = array::<32>(&mut body)?;
                entries.push((k, u64_(&mut body)?));
            }
            Frame::Digest { req, more, entries }
        }
        0x12 => {
            let req = u64_(&mut body)?;
            let n = u16_(&mut body)? as usize;
            if n > MAX_PULL {
                return Err(Error::Malformed("too many keys in a pull"));
            }
            need(&body, n * 32)?;
            let mut keys = Vec::with_capacity(n);
            for _ in 0..n {
                keys.push(array::<32>(&mut body)?);
            }
            Frame::Pull { req, keys }
        }
        0x13 => {
            let req = u64_(&mut body)?;
            let n = u16_(&mut body)? as usize;
            if n > MAX_RECORDS {
                return Err(Error::Malformed("too many records"));
            }
            let mut records = Vec::with_capacity(n);
            for _ in 0..n {
                let len = u16_(&mut body)? as usize;
                need(&body, len)?;
                records.push(body.split_to(len));
            }
            Frame::Records { req, records }
        }
        0x05 => {
            let n = u16_(&mut body)? as usize;
            if n == 0 || n > MAX_BATCH {
                return Err(Error::Malformed("a batch holds 1 to 1024 frames"));
            }
            let mut frames = Vec::with_capacity(n);
            for _ in 0..n {
                let len = u32_(&mut body)? as usize;
                if len == 0 {
                    return Err(Error::Malformed("empty frame in a batch"));
                }
                need(&body, len)?;
                let mut inner = body.split_to(len);
                let kind = inner.get_u8();
                if kind == 0x05 {
                    return Err(Error::Malformed("a batch inside a batch"));
                }
                frames.push(decode_body(kind, inner, 0)?);
            }
            Frame::Batch(frames)
        }
        _ => return Err(Error::Malformed("unknown frame type")),
    };
    done(&body)?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use asynchronous_codec::{Decoder as _, Encoder as _};
    use proptest::prelude::*;

    fn round_trip(f: Frame) {
        let mut c = Codec::new(DEFAULT_MAX_FRAME);
        let mut buf = BytesMut::new();
        c.encode(f.clone(), &mut buf).expect("encode");
        let back = c.decode(&mut buf).expect("decode").expect("whole frame");
        assert_eq!(back, f);
        assert!(buf.is_empty());
    }

    #[test]
    fn every_frame_round_trips() {
        let p = Bytes::from_static(&[1u8; 40]);
        round_trip(Frame::Forward {
            id: [7; 16],
            attempt: 3,
            hops: 2,
            packet: p.clone(),
        });
        round_trip(Frame::Routed {
            id: [8; 16],
            flags: ROUTED_STORE_ANYWAY,
            hops: 1,
            target: [9; 32],
            packet: p,
        });
        for s in 0..=6 {
            let status = AckStatus::from_u8(s).expect("status");
            round_trip(Frame::Ack {
                id: [1; 16],
                status,
                home: None,
            });
        }
        round_trip(Frame::Ack {
            id: [1; 16],
            status: AckStatus::Stored,
            home: Some([5; 32]),
        });
        round_trip(Frame::Forget {
            ids: vec![[2; 16]; 3],
        });
        round_trip(Frame::Claim {
            req: 3,
            namespace: "ns".into(),
            identity: [4; 32],
        });
        round_trip(Frame::ClaimReply {
            req: 3,
            status: crate::device::codec::Status::NotFound,
            body: Bytes::from_static(b"none"),
        });
        round_trip(Frame::DigestRequest {
            req: 5,
            after: None,
            limit: 256,
        });
        round_trip(Frame::DigestRequest {
            req: 6,
            after: Some([3; 32]),
            limit: 1,
        });
        round_trip(Frame::Digest {
            req: 6,
            more: true,
            entries: vec![([1; 32], 10), ([2; 32], u64::MAX)],
        });
        round_trip(Frame::Pull {
            req: 7,
            keys: vec![[4; 32]; 3],
        });
        round_trip(Frame::Records {
            req: 8,
            records: vec![Bytes::from_static(b"abc"), Bytes::new()],
        });
    }

    fn transit(depth: usize, inner: Frame) -> Frame {
        (0..depth).fold(inner, |f, i| Frame::Transit {
            to: [i as u8; 32],
            hops: 1,
            inner: Box::new(f),
        })
    }

    #[test]
    fn transit_frames_nest_round_trip_and_are_bounded() {
        let routed = Frame::Routed {
            id: [8; 16],
            flags: 0,
            hops: 1,
            target: [9; 32],
            packet: Bytes::from_static(&[1u8; 40]),
        };
        let claim = Frame::Claim {
            req: 7,
            namespace: "ns".into(),
            identity: [3; 32],
        };
        for depth in 1..=MAX_TRANSIT_DEPTH {
            round_trip(transit(depth, routed.clone()));
            let f = transit(depth, claim.clone());
            assert_eq!(f.transit_depth(), depth);
            assert_eq!(f.innermost(), &claim);
            round_trip(f);
        }
        // One level deeper: neither written nor read.
        let deep = transit(MAX_TRANSIT_DEPTH + 1, routed.clone());
        let mut c = Codec::new(DEFAULT_MAX_FRAME);
        let mut buf = BytesMut::new();
        assert!(c.encode(deep.clone(), &mut buf).is_err());
        let mut raw = BytesMut::new();
        <FederationWire as crate::stream::Wire>::write(deep, &mut raw);
        let kind = raw[0];
        assert!(decode_raw(kind, &raw[1..]).is_err(), "too deep");
        // Only a routed packet, a claim or a transit may be carried.
        let ack = Frame::Ack {
            id: [1; 16],
            status: AckStatus::Stored,
            home: None,
        };
        assert!(c.encode(transit(1, ack.clone()), &mut buf).is_err());
        let mut raw = BytesMut::new();
        <FederationWire as crate::stream::Wire>::write(transit(1, ack), &mut raw);
        assert!(decode_raw(0x06, &raw[1..]).is_err(), "an ack in transit");
        // Short: no inner frame.
        assert!(decode_raw(0x06, &[[0u8; 32].as_slice(), &[1]].concat()).is_err());
        // Onion layers: only v2 sizes.
        let size = meshwhisper_crypto::onion::v2::onion_len(100).expect("size");
        round_trip(Frame::Onion {
            hop: [4; 16],
            layer: Bytes::from(vec![2u8; size]),
        });
        assert!(decode_raw(0x07, &vec![0u8; 16 + size - 1]).is_err());
        assert!(
            c.encode(
                Frame::Onion {
                    hop: [4; 16],
                    layer: Bytes::from(vec![2u8; size + 1]),
                },
                &mut buf
            )
            .is_err()
        );
        round_trip(Frame::OnionAck {
            hop: [5; 16],
            status: AckStatus::Stored,
        });
        // The new ack status reads back.
        round_trip(Frame::Ack {
            id: [2; 16],
            status: AckStatus::NoPath,
            home: None,
        });
    }

    fn decode_raw(kind: u8, body: &[u8]) -> Result<Option<Frame>, Error> {
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32 + 1);
        buf.put_u8(kind);
        buf.put_slice(body);
        Codec::new(DEFAULT_MAX_FRAME).decode(&mut buf)
    }

    #[test]
    fn malformed_frames_are_errors() {
        // Unknown type, short ack, bad status, trailing bytes, empty packet.
        assert!(decode_raw(0x7f, &[]).is_err());
        assert!(decode_raw(0x03, &[0; 10]).is_err());
        assert!(decode_raw(0x03, &[[0u8; 16].as_slice(), &[9]].concat()).is_err());
        assert!(decode_raw(0x03, &[0u8; 18]).is_err());
        assert!(decode_raw(0x01, &[0u8; 18]).is_err());
        // A home key on an ack that is not Stored; unknown routed flags.
        assert!(decode_raw(0x03, &[[0u8; 16].as_slice(), &[1], &[0; 32]].concat()).is_err());
        assert!(
            decode_raw(
                0x02,
                &[[0u8; 16].as_slice(), &[2, 1], &[0; 32], &[1]].concat()
            )
            .is_err()
        );
        // A forget over the bound, or shorter than its count.
        assert!(decode_raw(0x04, &[0x04, 0x01]).is_err());
        assert!(decode_raw(0x04, &[[0u8, 2].as_slice(), &[0; 16]].concat()).is_err());
        // Counts over the bounds, and counts the body cannot hold.
        let mut d = 1u64.to_be_bytes().to_vec();
        d.extend_from_slice(&[0, 0xff, 0xff]);
        assert!(decode_raw(0x11, &d).is_err());
        let mut p = 1u64.to_be_bytes().to_vec();
        p.extend_from_slice(&[0, 2]);
        p.extend_from_slice(&[0; 32]);
        assert!(decode_raw(0x12, &p).is_err());
        let mut r = 1u64.to_be_bytes().to_vec();
        r.extend_from_slice(&[0, 1, 0, 10, 1, 2]);
        assert!(decode_raw(0x13, &r).is_err());
        let mut q = 1u64.to_be_bytes().to_vec();
        q.extend_from_slice(&[2]);
        q.extend_from_slice(&[0, 1]);
        assert!(decode_raw(0x10, &q).is_err());
    }

    #[test]
    fn oversize_frames_are_refused_both_ways() {
        let mut c = Codec::new(100);
        let mut buf = BytesMut::new();
        let big = Frame::Forward {
            id: [0; 16],
            attempt: 0,
            hops: 1,
            packet: Bytes::from(vec![0u8; 200]),
        };
        assert!(matches!(
            c.encode(big, &mut buf),
            Err(Error::TooLarge { .. })
        ));
        buf.put_u32(1_000_000);
        assert!(matches!(c.decode(&mut buf), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn batches_round_trip_and_refuse_nesting_and_bad_counts() {
        round_trip(Frame::Batch(vec![
            Frame::Ack {
                id: [1; 16],
                status: AckStatus::Stored,
                home: Some([2; 32]),
            },
            Frame::Routed {
                id: [3; 16],
                flags: 0,
                hops: 1,
                target: [4; 32],
                packet: Bytes::from_static(b"pkt"),
            },
            Frame::Forget { ids: vec![[5; 16]] },
        ]));
        let mut c = Codec::new(DEFAULT_MAX_FRAME);
        for bad in [
            Frame::Batch(Vec::new()),
            Frame::Batch(vec![Frame::Batch(vec![Frame::Forget { ids: vec![] }])]),
        ] {
            let mut buf = BytesMut::new();
            assert!(c.encode(bad, &mut buf).is_err());
        }
        // Nested or empty on the wire, and an inner length past the end.
        assert!(decode_raw(0x05, &[0, 0]).is_err());
        assert!(decode_raw(0x05, &[0, 1, 0, 0, 0, 3, 0x05, 0, 0]).is_err());
        assert!(decode_raw(0x05, &[0, 1, 0, 0, 0, 9, 0x04, 0, 0]).is_err());
        assert!(decode_raw(0x05, &[0, 1, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn what_the_decoder_refuses_is_never_written() {
        let mut c = Codec::new(DEFAULT_MAX_FRAME);
        for f in [
            Frame::Forward {
                id: [0; 16],
                attempt: 0,
                hops: 1,
                packet: Bytes::new(),
            },
            Frame::Routed {
                id: [0; 16],
                flags: 2,
                hops: 1,
                target: [0; 32],
                packet: Bytes::from_static(b"x"),
            },
            Frame::DigestRequest {
                req: 1,
                after: None,
                limit: (MAX_DIGEST + 1) as u16,
            },
        ] {
            let mut buf = BytesMut::new();
            assert!(c.encode(f.clone(), &mut buf).is_err(), "{f:?}");
            assert!(buf.is_empty());
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = BytesMut::from(bytes.as_slice());
            let _ = Codec::new(DEFAULT_MAX_FRAME).decode(&mut buf);
        }
    }
}
