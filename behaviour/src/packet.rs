//! The client packet a relay forwards, as the reference SDK and relay frame
//! it (31-byte big-endian header, then the encrypted payload):
//!
//! ```text
//! 0   version (0x01)
//! 1   flags: 0x01 data, 0x02 ack, 0x03 chaff, 0x04 handshake, 0x05 route request, 0x06 route offer
//! 2   destination hash (8)
//! 10  sender ephemeral id (16)
//! 26  ttl (hops)
//! 27  payload length (u32)
//! 31  payload
//! ```
//!
//! A relay routes by the destination hash and forwards the bytes unchanged.
//! It also refuses what cannot be a packet: shorter than the header, over
//! the size limit, a version other than 0x01, or a payload length field
//! that disagrees with the frame's size (the reference relay stores and
//! forwards such frames; a recipient can only discard them).

use meshwhisper_crypto::destination::DestHash;

/// Header length.
pub const HEADER_LEN: usize = 31;
/// The reference relay's packet limit (whole frame, header included).
pub const DEFAULT_MAX_PACKET: usize = 256 * 1024;

/// Why a frame is not a packet a relay can route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Shorter than the header.
    #[error("packet of {0} bytes is shorter than the 31-byte header")]
    TooShort(usize),
    /// Longer than the configured limit.
    #[error("packet of {got} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Its size.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// A version this relay does not know.
    #[error("packet version {0:#04x} is not 0x01")]
    UnknownVersion(u8),
    /// The payload length field is not the payload's size.
    #[error("packet says its payload is {declared} bytes but carries {actual}")]
    LengthMismatch {
        /// The header's payload length.
        declared: u32,
        /// The bytes after the header.
        actual: usize,
    },
}

impl Error {
    /// A short stable label, for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::TooShort(_) => "too_short",
            Error::TooLarge { .. } => "too_large",
            Error::UnknownVersion(_) => "version",
            Error::LengthMismatch { .. } => "length",
        }
    }
}

/// The packet version this relay routes.
pub const VERSION: u8 = 0x01;

/// The destination hash of a packet, after checking that it is one: its
/// size is routable, its version known and its length field true.
pub fn destination(frame: &[u8], max: usize) -> Result<DestHash, Error> {
    if frame.len() > max {
        return Err(Error::TooLarge {
            got: frame.len(),
            max,
        });
    }
    if frame.len() < HEADER_LEN {
        return Err(Error::TooShort(frame.len()));
    }
    if frame[0] != VERSION {
        return Err(Error::UnknownVersion(frame[0]));
    }
    let declared = u32::from_be_bytes([frame[27], frame[28], frame[29], frame[30]]);
    let actual = frame.len() - HEADER_LEN;
    if usize::try_from(declared).ok() != Some(actual) {
        return Err(Error::LengthMismatch { declared, actual });
    }
    let mut d = [0u8; 8];
    d.copy_from_slice(&frame[2..10]);
    Ok(DestHash(d))
}

/// Packet flags (header byte 1), as the reference SDK sets them.
pub mod flags {
    /// A message in an established session.
    pub const DATA: u8 = 0x01;
    /// An acknowledgement.
    pub const ACK: u8 = 0x02;
    /// Cover traffic.
    pub const CHAFF: u8 = 0x03;
    /// A first-contact (handshake) message.
    pub const HANDSHAKE: u8 = 0x04;
    /// A route request.
    pub const ROUTE_REQUEST: u8 = 0x05;
    /// A route offer.
    pub const ROUTE_OFFER: u8 = 0x06;
}

/// The payload a packet's header declares: the `payload length` bytes
/// after the 31-byte header, as a recipient reads a delivered packet.
/// Unlike [`destination`] (the relay's strict check) it checks neither the
/// version nor the size limit, and ignores bytes after the declared
/// payload.
///
/// Errors: [`Error::TooShort`] when the frame is shorter than the header,
/// [`Error::LengthMismatch`] when the declared length runs past its end.
pub fn payload(frame: &[u8]) -> Result<&[u8], Error> {
    // The payload length is the header's last field (u32, big-endian).
    let Some(len) = frame.get(..HEADER_LEN).and_then(|h| h.last_chunk::<4>()) else {
        return Err(Error::TooShort(frame.len()));
    };
    let declared = u32::from_be_bytes(*len);
    usize::try_from(declared)
        .ok()
        .and_then(|n| HEADER_LEN.checked_add(n))
        .and_then(|end| frame.get(HEADER_LEN..end))
        .ok_or(Error::LengthMismatch {
            declared,
            actual: frame.len() - HEADER_LEN,
        })
}

/// Builds a packet (for tests, tools and the load generator).
pub fn build(flags: u8, dest: DestHash, sender: [u8; 16], ttl: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.push(0x01);
    out.push(flags);
    out.extend_from_slice(&dest.0);
    out.extend_from_slice(&sender);
    out.push(ttl);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_destination_and_bounds() {
        let p = build(1, DestHash([1, 2, 3, 4, 5, 6, 7, 8]), [9; 16], 7, b"hi");
        assert_eq!(p.len(), 33);
        assert_eq!(destination(&p, 100), Ok(DestHash([1, 2, 3, 4, 5, 6, 7, 8])));
        assert_eq!(destination(&p[..30], 100), Err(Error::TooShort(30)));
        assert_eq!(
            destination(&p, 32),
            Err(Error::TooLarge { got: 33, max: 32 })
        );
        let empty = build(1, DestHash([1; 8]), [9; 16], 7, b"");
        assert!(destination(&empty, 31).is_ok());
    }

    #[test]
    fn refuses_unknown_versions_and_false_lengths() {
        let mut p = build(1, DestHash([1; 8]), [9; 16], 7, b"hello");
        assert_eq!(
            destination(&p[..33], 100),
            Err(Error::LengthMismatch {
                declared: 5,
                actual: 2
            })
        );
        let mut longer = p.clone();
        longer.push(0);
        assert!(matches!(
            destination(&longer, 100),
            Err(Error::LengthMismatch { .. })
        ));
        p[0] = 2;
        assert_eq!(destination(&p, 100), Err(Error::UnknownVersion(2)));
    }

    #[test]
    fn payload_reads_the_declared_bytes() {
        let p = build(flags::DATA, DestHash([1; 8]), [2; 16], 8, b"hello");
        assert_eq!(payload(&p), Ok(&b"hello"[..]));
        let empty = build(flags::HANDSHAKE, DestHash([1; 8]), [2; 16], 8, b"");
        assert_eq!(payload(&empty), Ok(&b""[..]));
        let mut longer = p.clone();
        longer.extend_from_slice(b"??");
        assert_eq!(payload(&longer), Ok(&b"hello"[..]));
        assert_eq!(payload(&p[..30]), Err(Error::TooShort(30)));
        assert_eq!(
            payload(&p[..33]),
            Err(Error::LengthMismatch {
                declared: 5,
                actual: 2
            })
        );
    }
}
