//! Frames of `/meshwhisper/device/1`: one long-lived stream per device,
//! length-prefixed frames in both directions.
//!
//! ```text
//! frame = length (u32 BE, of what follows) ‖ type (u8) ‖ body
//!
//! device → relay
//!   0x01 Register  count (u16) ‖ count × destination hash (8)   replaces the set
//!   0x02 Packet    seq (u64) ‖ client packet                     answered by Stored or Refused
//!   0x03 Ack       delivery id (u64)                             the relay may forget it
//!   0x04 Drain     (empty)                                       send me what is stored
//!   0x05 Publish   req (u64) ‖ ns len (u8) ‖ namespace ‖ bundle  store my prekey bundle
//!   0x06 Prekeys   req (u64) ‖ ns len (u8) ‖ namespace ‖ identity (32)
//!                  ‖ signature (64) ‖ n × one-time prekey (36)  add to my one-time pool
//!   0x07 Claim     req (u64) ‖ ns len (u8) ‖ namespace ‖ identity (32)
//!   0x08 PacketTo  seq (u64) ‖ home relay key (32) ‖ client packet
//!                                                                a Packet whose recipient is homed
//!                                                                at that relay (federation hint)
//!   0x09 ClaimAt   req (u64) ‖ home relay key (32) ‖ ns len (u8) ‖ namespace ‖ identity (32)
//!                                                                a Claim answered by the identity's
//!                                                                home relay, asked by ours over
//!                                                                federation (the device talks only
//!                                                                to its own relay)
//!   0x0A Home      count (u16) ‖ count × destination hash (8)   hashes (say, future hours') to keep
//!                                                                packets for while offline; nothing
//!                                                                is delivered on them now
//! relay → device
//!   0x81 Stored    seq (u64)                                     the packet is durable
//!   0x82 Deliver   delivery id (u64) ‖ client packet
//!   0x83 Refused   seq (u64) ‖ code (u8) ‖ reason (UTF-8)
//!   0x84 Reply     req (u64) ‖ status (u8) ‖ body                answers 0x05-0x07
//! ```
//!
//! Reply bodies: to Publish and Prekeys, the one-time prekeys left in the
//! pool (u32); to Claim, bundle length (u32) ‖ bundle ‖ one-time prekey
//! (36 bytes, absent when the pool is empty); on any error, a UTF-8 reason.

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

/// The protocol name.
pub const PROTOCOL: &str = "/meshwhisper/device/1";
/// Default largest frame: a 256 KiB packet plus framing.
pub const DEFAULT_MAX_FRAME: usize = 256 * 1024 + 64;
/// Most hashes in one Register frame.
pub const MAX_REGISTER: usize = u16::MAX as usize;

/// Why a Packet was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RefusedCode {
    /// Not a routable packet (size).
    Malformed = 1,
    /// The relay could not store it; retry later.
    Unavailable = 2,
    /// Too many packets in flight on this stream.
    Busy = 3,
}

impl RefusedCode {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Malformed),
            2 => Some(Self::Unavailable),
            3 => Some(Self::Busy),
            _ => None,
        }
    }
}

/// How a directory request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Done; the body is the answer.
    Ok = 0,
    /// No such identity in that namespace.
    NotFound = 1,
    /// The request was malformed or a signature did not verify.
    Invalid = 2,
    /// The relay could not serve it now; retry later.
    Unavailable = 3,
    /// A newer bundle of this identity is already stored.
    Stale = 4,
}

impl Status {
    /// The status of a wire byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Ok),
            1 => Some(Self::NotFound),
            2 => Some(Self::Invalid),
            3 => Some(Self::Unavailable),
            4 => Some(Self::Stale),
            _ => None,
        }
    }
}

/// Longest namespace in a directory request.
pub const MAX_NAMESPACE: usize = 255;
/// Encoded one-time prekey length in a Prekeys frame.
pub const PREKEY_LEN: usize = 36;

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Device registers these destination hashes (replacing earlier ones).
    Register(Vec<[u8; 8]>),
    /// Device names hashes that are its own (future hours', typically):
    /// the relay keeps packets for them while it is offline and answers
    /// for them as their home relay, but delivers nothing on them now.
    Home(Vec<[u8; 8]>),
    /// Device sends a packet; `seq` is its own counter.
    Packet {
        /// Sender's sequence number, echoed in Stored/Refused.
        seq: u64,
        /// The client packet.
        packet: Bytes,
    },
    /// Device sends a packet and names the recipient's home relay.
    PacketTo {
        /// Sender's sequence number, echoed in Stored/Refused.
        seq: u64,
        /// The home relay's Ed25519 key.
        home: [u8; 32],
        /// The client packet.
        packet: Bytes,
    },
    /// Device received a delivery.
    Ack(u64),
    /// Device asks for stored packets.
    Drain,
    /// Relay stored packet `seq` durably.
    Stored(u64),
    /// Relay delivers a packet.
    Deliver {
        /// Acknowledge with this id.
        id: u64,
        /// The client packet.
        packet: Bytes,
    },
    /// Device publishes its prekey bundle.
    Publish {
        /// Request id, echoed in the Reply.
        req: u64,
        /// Directory namespace.
        namespace: String,
        /// The signed bundle.
        bundle: Bytes,
    },
    /// Device adds one-time prekeys to its pool.
    Prekeys {
        /// Request id.
        req: u64,
        /// Directory namespace.
        namespace: String,
        /// The owner's identity key.
        identity: [u8; 32],
        /// The owner's signature over the batch.
        signature: [u8; 64],
        /// `n × 36` bytes: the keys.
        keys: Bytes,
    },
    /// Device asks for an identity's bundle and one of its one-time prekeys.
    Claim {
        /// Request id.
        req: u64,
        /// Directory namespace.
        namespace: String,
        /// Whose bundle.
        identity: [u8; 32],
    },
    /// Device asks its relay to claim from another relay (the identity's
    /// home) over federation.
    ClaimAt {
        /// Request id.
        req: u64,
        /// The identity's home relay (Ed25519 key).
        home: [u8; 32],
        /// Directory namespace.
        namespace: String,
        /// Whose bundle.
        identity: [u8; 32],
    },
    /// Relay answers a directory request.
    Reply {
        /// The request's id.
        req: u64,
        /// Outcome.
        status: Status,
        /// Answer or reason.
        body: Bytes,
    },
    /// Relay refused packet `seq`.
    Refused {
        /// The device's sequence number.
        seq: u64,
        /// Why.
        code: RefusedCode,
        /// Human-readable detail.
        reason: String,
    },
}

/// A frame that could not be read or written.
pub use crate::stream::FrameError as Error;

/// The wire format of `/meshwhisper/device/1`.
#[derive(Debug, Clone, Copy)]
pub struct DeviceWire;

fn put_hashes(dst: &mut BytesMut, h: Vec<[u8; 8]>) {
    dst.put_u16(h.len() as u16);
    for x in h {
        dst.put_slice(&x);
    }
}

/// Length-prefixed frame codec with a size limit.
pub type Codec = crate::stream::LengthCodec<DeviceWire>;

fn body_len(f: &Frame) -> usize {
    1 + match f {
        Frame::Register(h) | Frame::Home(h) => 2 + 8 * h.len(),
        Frame::Packet { packet, .. } | Frame::Deliver { packet, .. } => 8 + packet.len(),
        Frame::PacketTo { packet, .. } => 40 + packet.len(),
        Frame::Ack(_) | Frame::Stored(_) => 8,
        Frame::Drain => 0,
        Frame::Refused { reason, .. } => 9 + reason.len(),
        Frame::Publish {
            namespace, bundle, ..
        } => 9 + namespace.len() + bundle.len(),
        Frame::Prekeys {
            namespace, keys, ..
        } => 9 + namespace.len() + 96 + keys.len(),
        Frame::Claim { namespace, .. } => 9 + namespace.len() + 32,
        Frame::ClaimAt { namespace, .. } => 9 + 32 + namespace.len() + 32,
        Frame::Reply { body, .. } => 9 + body.len(),
    }
}

impl crate::stream::Wire for DeviceWire {
    type Frame = Frame;
    const PROTOCOL: &'static str = PROTOCOL;

    fn body_len(f: &Frame) -> usize {
        body_len(f)
    }

    fn check(f: &Frame) -> Result<(), Error> {
        if let Frame::Register(h) | Frame::Home(h) = &f
            && h.len() > MAX_REGISTER
        {
            return Err(Error::Malformed("too many hashes in one Register or Home"));
        }
        match &f {
            Frame::Publish { namespace, .. }
            | Frame::Prekeys { namespace, .. }
            | Frame::Claim { namespace, .. }
            | Frame::ClaimAt { namespace, .. }
                if namespace.len() > MAX_NAMESPACE =>
            {
                return Err(Error::Malformed("namespace longer than 255 bytes"));
            }
            Frame::Prekeys { keys, .. } if !keys.len().is_multiple_of(PREKEY_LEN) => {
                return Err(Error::Malformed("one-time prekeys are 36 bytes each"));
            }
            _ => {}
        }
        Ok(())
    }

    fn write(f: Frame, dst: &mut BytesMut) {
        match f {
            Frame::Register(h) => {
                dst.put_u8(0x01);
                put_hashes(dst, h);
            }
            Frame::Home(h) => {
                dst.put_u8(0x0A);
                put_hashes(dst, h);
            }
            Frame::Packet { seq, packet } => {
                dst.put_u8(0x02);
                dst.put_u64(seq);
                dst.put_slice(&packet);
            }
            Frame::PacketTo { seq, home, packet } => {
                dst.put_u8(0x08);
                dst.put_u64(seq);
                dst.put_slice(&home);
                dst.put_slice(&packet);
            }
            Frame::Ack(id) => {
                dst.put_u8(0x03);
                dst.put_u64(id);
            }
            Frame::Drain => dst.put_u8(0x04),
            Frame::Stored(seq) => {
                dst.put_u8(0x81);
                dst.put_u64(seq);
            }
            Frame::Deliver { id, packet } => {
                dst.put_u8(0x82);
                dst.put_u64(id);
                dst.put_slice(&packet);
            }
            Frame::Refused { seq, code, reason } => {
                dst.put_u8(0x83);
                dst.put_u64(seq);
                dst.put_u8(code as u8);
                dst.put_slice(reason.as_bytes());
            }
            Frame::Publish {
                req,
                namespace,
                bundle,
            } => {
                dst.put_u8(0x05);
                put_head(dst, req, &namespace);
                dst.put_slice(&bundle);
            }
            Frame::Prekeys {
                req,
                namespace,
                identity,
                signature,
                keys,
            } => {
                dst.put_u8(0x06);
                put_head(dst, req, &namespace);
                dst.put_slice(&identity);
                dst.put_slice(&signature);
                dst.put_slice(&keys);
            }
            Frame::Claim {
                req,
                namespace,
                identity,
            } => {
                dst.put_u8(0x07);
                put_head(dst, req, &namespace);
                dst.put_slice(&identity);
            }
            Frame::ClaimAt {
                req,
                home,
                namespace,
                identity,
            } => {
                dst.put_u8(0x09);
                dst.put_u64(req);
                dst.put_slice(&home);
                dst.put_u8(namespace.len() as u8);
                dst.put_slice(namespace.as_bytes());
                dst.put_slice(&identity);
            }
            Frame::Reply { req, status, body } => {
                dst.put_u8(0x84);
                dst.put_u64(req);
                dst.put_u8(status as u8);
                dst.put_slice(&body);
            }
        }
    }

    fn read(kind: u8, body: Bytes) -> Result<Frame, Error> {
        decode_body(kind, body)
    }
}

fn put_head(dst: &mut BytesMut, req: u64, namespace: &str) {
    dst.put_u64(req);
    dst.put_u8(namespace.len() as u8);
    dst.put_slice(namespace.as_bytes());
}

/// Reads `req (u64) ‖ ns len (u8) ‖ namespace`.
fn get_head(body: &mut Bytes) -> Result<(u64, String), Error> {
    if body.len() < 9 {
        return Err(Error::Malformed("frame body too short"));
    }
    let req = body.get_u64();
    Ok((req, get_namespace(body)?))
}

fn get_namespace(body: &mut Bytes) -> Result<String, Error> {
    if body.is_empty() {
        return Err(Error::Malformed("frame body too short"));
    }
    let n = body.get_u8() as usize;
    if body.len() < n {
        return Err(Error::Malformed("namespace runs past the frame"));
    }
    String::from_utf8(body.split_to(n).to_vec())
        .map_err(|_| Error::Malformed("namespace is not UTF-8"))
}

fn get_array<const N: usize>(body: &mut Bytes) -> Result<[u8; N], Error> {
    if body.len() < N {
        return Err(Error::Malformed("frame body too short"));
    }
    let mut a = [0u8; N];
    body.copy_to_slice(&mut a);
    Ok(a)
}

fn decode_body(ty: u8, mut body: Bytes) -> Result<Frame, Error> {
    let need = |b: &Bytes, n: usize| {
        if b.len() < n {
            Err(Error::Malformed("frame body too short"))
        } else {
            Ok(())
        }
    };
    let exact = |b: &Bytes, n: usize| {
        if b.len() != n {
            Err(Error::Malformed("frame body has the wrong length"))
        } else {
            Ok(())
        }
    };
    let frame = match ty {
        0x01 | 0x0A => {
            need(&body, 2)?;
            let n = body.get_u16() as usize;
            exact(&body, 8 * n)?;
            let mut hashes = Vec::with_capacity(n);
            for _ in 0..n {
                let mut h = [0u8; 8];
                body.copy_to_slice(&mut h);
                hashes.push(h);
            }
            if ty == 0x01 {
                Frame::Register(hashes)
            } else {
                Frame::Home(hashes)
            }
        }
        0x02 => {
            need(&body, 8)?;
            let seq = body.get_u64();
            Frame::Packet { seq, packet: body }
        }
        0x08 => {
            need(&body, 40)?;
            let seq = body.get_u64();
            let mut home = [0u8; 32];
            body.copy_to_slice(&mut home);
            Frame::PacketTo {
                seq,
                home,
                packet: body,
            }
        }
        0x03 => {
            exact(&body, 8)?;
            Frame::Ack(body.get_u64())
        }
        0x04 => {
            exact(&body, 0)?;
            Frame::Drain
        }
        0x81 => {
            exact(&body, 8)?;
            Frame::Stored(body.get_u64())
        }
        0x82 => {
            need(&body, 8)?;
            let id = body.get_u64();
            Frame::Deliver { id, packet: body }
        }
        0x83 => {
            need(&body, 9)?;
            let seq = body.get_u64();
            let code = RefusedCode::from_u8(body.get_u8())
                .ok_or(Error::Malformed("unknown refusal code"))?;
            let reason = String::from_utf8(body.to_vec())
                .map_err(|_| Error::Malformed("reason is not UTF-8"))?;
            Frame::Refused { seq, code, reason }
        }
        0x05 => {
            let (req, namespace) = get_head(&mut body)?;
            Frame::Publish {
                req,
                namespace,
                bundle: body,
            }
        }
        0x06 => {
            let (req, namespace) = get_head(&mut body)?;
            let identity = get_array(&mut body)?;
            let signature = get_array(&mut body)?;
            if !body.len().is_multiple_of(PREKEY_LEN) {
                return Err(Error::Malformed("one-time prekeys are 36 bytes each"));
            }
            Frame::Prekeys {
                req,
                namespace,
                identity,
                signature,
                keys: body,
            }
        }
        0x07 => {
            let (req, namespace) = get_head(&mut body)?;
            let identity = get_array(&mut body)?;
            exact(&body, 0)?;
            Frame::Claim {
                req,
                namespace,
                identity,
            }
        }
        0x09 => {
            need(&body, 8 + 32)?;
            let req = body.get_u64();
            let home = get_array(&mut body)?;
            let namespace = get_namespace(&mut body)?;
            let identity = get_array(&mut body)?;
            exact(&body, 0)?;
            Frame::ClaimAt {
                req,
                home,
                namespace,
                identity,
            }
        }
        0x84 => {
            need(&body, 9)?;
            let req = body.get_u64();
            let status =
                Status::from_u8(body.get_u8()).ok_or(Error::Malformed("unknown status"))?;
            Frame::Reply { req, status, body }
        }
        _ => return Err(Error::Malformed("unknown frame type")),
    };
    Ok(frame)
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
        let mut partial = BytesMut::from(&buf[..buf.len() - 1]);
        assert!(c.decode(&mut partial).expect("partial").is_none());
        assert_eq!(c.decode(&mut buf).expect("decode"), Some(f));
        assert!(buf.is_empty());
    }

    #[test]
    fn every_frame_round_trips() {
        round_trip(Frame::Register(vec![[1; 8], [2; 8]]));
        round_trip(Frame::Register(vec![]));
        round_trip(Frame::Home(vec![[3; 8]; 720]));
        round_trip(Frame::PacketTo {
            seq: 3,
            home: [4; 32],
            packet: Bytes::from_static(b"abc"),
        });
        round_trip(Frame::Packet {
            seq: 7,
            packet: Bytes::from_static(b"pkt"),
        });
        round_trip(Frame::Ack(u64::MAX));
        round_trip(Frame::Drain);
        round_trip(Frame::Stored(3));
        round_trip(Frame::Deliver {
            id: 9,
            packet: Bytes::from_static(b"x"),
        });
        round_trip(Frame::Refused {
            seq: 1,
            code: RefusedCode::Busy,
            reason: "slow down".into(),
        });
        round_trip(Frame::Publish {
            req: 1,
            namespace: "ns".into(),
            bundle: Bytes::from_static(b"bundle"),
        });
        round_trip(Frame::Prekeys {
            req: 2,
            namespace: String::new(),
            identity: [3; 32],
            signature: [4; 64],
            keys: Bytes::from(vec![5; 72]),
        });
        round_trip(Frame::ClaimAt {
            req: 4,
            home: [6; 32],
            namespace: "ns".into(),
            identity: [7; 32],
        });
        round_trip(Frame::Claim {
            req: 3,
            namespace: "x".repeat(255),
            identity: [6; 32],
        });
        round_trip(Frame::Reply {
            req: 4,
            status: Status::Stale,
            body: Bytes::from_static(b"newer bundle stored"),
        });
    }

    #[test]
    fn malformed_directory_frames_are_errors() {
        let mut c = Codec::new(DEFAULT_MAX_FRAME);
        let bad = |c: &mut Codec, body: &[u8]| {
            let mut buf = BytesMut::new();
            buf.put_u32(body.len() as u32);
            buf.put_slice(body);
            matches!(c.decode(&mut buf), Err(Error::Malformed(_)))
        };
        // Namespace length past the end.
        assert!(bad(&mut c, &[0x05, 0, 0, 0, 0, 0, 0, 0, 1, 9, b'a']));
        // Namespace not UTF-8.
        assert!(bad(&mut c, &[0x07, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0xff]));
        // Prekeys not a multiple of 36.
        let mut p = vec![0x06, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        p.extend_from_slice(&[0; 96 + 35]);
        assert!(bad(&mut c, &p));
        // Claim with trailing bytes.
        let mut cl = vec![0x07, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        cl.extend_from_slice(&[0; 33]);
        assert!(bad(&mut c, &cl));
        // Unknown status.
        assert!(bad(&mut c, &[0x84, 0, 0, 0, 0, 0, 0, 0, 1, 9]));
        assert!(
            c.encode(
                Frame::Claim {
                    req: 0,
                    namespace: "x".repeat(256),
                    identity: [0; 32]
                },
                &mut BytesMut::new()
            )
            .is_err()
        );
    }

    #[test]
    fn oversize_and_malformed_are_errors() {
        let mut c = Codec::new(16);
        let mut buf = BytesMut::from(&[0, 0, 0, 17][..]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(Error::TooLarge { got: 17, max: 16 })
        ));
        let mut buf = BytesMut::from(&[0, 0, 0, 1, 0x7f][..]);
        assert!(matches!(c.decode(&mut buf), Err(Error::Malformed(_))));
        let mut buf = BytesMut::from(&[0, 0, 0, 3, 0x01, 0, 1][..]);
        assert!(matches!(c.decode(&mut buf), Err(Error::Malformed(_))));
        assert!(
            c.encode(
                Frame::Packet {
                    seq: 0,
                    packet: Bytes::from(vec![0; 16])
                },
                &mut BytesMut::new()
            )
            .is_err()
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut c = Codec::new(128);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = c.decode(&mut buf) {}
        }
    }
}
