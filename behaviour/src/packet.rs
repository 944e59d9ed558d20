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
//! A relay reads only the destination hash; it never needs the rest, and
//! forwards the bytes unchanged.

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
}

/// The destination hash of a packet, after checking its size is routable.
/// Like the reference relay, nothing else in the header is validated.
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
    let mut d = [0u8; 8];
    d.copy_from_slice(&frame[2..10]);
    Ok(DestHash(d))
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
        assert!(destination(&p[..31], 31).is_ok());
    }
}
