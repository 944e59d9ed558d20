//! What travels inside a packet, layer by layer (outermost first):
//!
//! ```text
//! packet   31-byte relay header (destination hash of the recipient) ‖ sealed
//! sealed   crypto::sealed: the sender's identity, visible only to the recipient
//! content  0x01 first contact: card length (u16) ‖ card (the sender's invite)
//!               ‖ initial length (u16) ‖ PQXDH initial message ‖ ratchet message
//!          0x02 session id (8) ‖ ratchet message
//! ratchet  Double Ratchet message whose plaintext is an envelope
//! envelope version (1) ‖ kind (1) ‖ message id (16) ‖ sent at, unix ms (u64)
//!          ‖ body length (u32) ‖ body ‖ zero padding to a size class
//! ```
//!
//! Envelopes are padded to [`SIZE_CLASSES`] before encryption, so packet
//! sizes say little about what was written. A receipt's body is the
//! 16-byte ids of the messages it acknowledges.

/// Envelope version.
pub const VERSION: u8 = 1;
/// Envelope header length.
pub const HEADER_LEN: usize = 1 + 1 + 16 + 8 + 4;
/// Padded envelope sizes.
pub const SIZE_CLASSES: [usize; 5] = [256, 1024, 4096, 16 * 1024, 64 * 1024];
/// Largest message body.
pub const MAX_BODY: usize = SIZE_CLASSES[SIZE_CLASSES.len() - 1] - HEADER_LEN;
/// Most message ids in one receipt.
pub const MAX_RECEIPT_IDS: usize = 256;

/// A message id.
pub type MessageId = [u8; 16];

/// What an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A message from the person.
    Text = 1,
    /// Their device received these messages (sent automatically).
    Delivered = 2,
    /// They read these messages.
    Read = 3,
}

impl Kind {
    /// From the wire byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Text),
            2 => Some(Self::Delivered),
            3 => Some(Self::Read),
            _ => None,
        }
    }
}

/// Why an envelope or content was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Malformed.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// Over a bound.
    #[error("{what} of {got} bytes exceeds {max}")]
    TooLarge {
        /// What.
        what: &'static str,
        /// Its size.
        got: usize,
        /// The bound.
        max: usize,
    },
}

/// One envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// What it is.
    pub kind: Kind,
    /// Its id (random, chosen by the sender).
    pub id: MessageId,
    /// When it was written (sender's clock).
    pub sent_ms: u64,
    /// The body.
    pub body: Vec<u8>,
}

impl Envelope {
    /// Encodes and pads to the smallest size class that fits.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        if self.body.len() > MAX_BODY {
            return Err(Error::TooLarge {
                what: "message body",
                got: self.body.len(),
                max: MAX_BODY,
            });
        }
        let need = HEADER_LEN + self.body.len();
        let class = SIZE_CLASSES
            .iter()
            .copied()
            .find(|c| *c >= need)
            .unwrap_or(need);
        let mut out = Vec::with_capacity(class);
        out.push(VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.sent_ms.to_be_bytes());
        out.extend_from_slice(&(self.body.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.body);
        out.resize(class, 0);
        Ok(out)
    }

    /// Decodes, checking the padding is zeros.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() < HEADER_LEN {
            return Err(Error::Malformed("envelope: too short"));
        }
        if bytes[0] != VERSION {
            return Err(Error::Malformed("envelope: unknown version"));
        }
        let kind = Kind::from_u8(bytes[1]).ok_or(Error::Malformed("envelope: unknown kind"))?;
        let mut id = [0u8; 16];
        id.copy_from_slice(&bytes[2..18]);
        let mut t = [0u8; 8];
        t.copy_from_slice(&bytes[18..26]);
        let mut l = [0u8; 4];
        l.copy_from_slice(&bytes[26..30]);
        let len = u32::from_be_bytes(l) as usize;
        let rest = &bytes[HEADER_LEN..];
        if len > rest.len() {
            return Err(Error::Malformed("envelope: body runs past the end"));
        }
        if rest[len..].iter().any(|b| *b != 0) {
            return Err(Error::Malformed("envelope: padding is not zeros"));
        }
        let body = rest[..len].to_vec();
        if kind != Kind::Text
            && (!body.len().is_multiple_of(16) || body.len() > 16 * MAX_RECEIPT_IDS)
        {
            return Err(Error::Malformed("receipt: not a list of message ids"));
        }
        Ok(Self {
            kind,
            id,
            sent_ms: u64::from_be_bytes(t),
            body,
        })
    }

    /// The message ids a receipt acknowledges.
    pub fn receipt_ids(&self) -> Vec<MessageId> {
        self.body
            .chunks_exact(16)
            .map(|c| {
                let mut id = [0u8; 16];
                id.copy_from_slice(c);
                id
            })
            .collect()
    }
}

/// Content of a sealed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content<'a> {
    /// First contact: the sender's card, the PQXDH initial message and the
    /// first ratchet message.
    Initial {
        /// The sender's invite, binary.
        card: &'a [u8],
        /// PQXDH initial message.
        initial: &'a [u8],
        /// Ratchet message.
        message: &'a [u8],
    },
    /// A message in an established session.
    Session {
        /// Which session.
        session_id: [u8; 8],
        /// Ratchet message.
        message: &'a [u8],
    },
}

impl<'a> Content<'a> {
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Content::Initial {
                card,
                initial,
                message,
            } => {
                let mut out = Vec::with_capacity(5 + card.len() + initial.len() + message.len());
                out.push(0x01);
                out.extend_from_slice(&(card.len() as u16).to_be_bytes());
                out.extend_from_slice(card);
                out.extend_from_slice(&(initial.len() as u16).to_be_bytes());
                out.extend_from_slice(initial);
                out.extend_from_slice(message);
                out
            }
            Content::Session {
                session_id,
                message,
            } => {
                let mut out = Vec::with_capacity(9 + message.len());
                out.push(0x02);
                out.extend_from_slice(session_id);
                out.extend_from_slice(message);
                out
            }
        }
    }

    /// Decodes. Never panics.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, Error> {
        let (&kind, rest) = bytes
            .split_first()
            .ok_or(Error::Malformed("content: empty"))?;
        let split16 = |b: &'a [u8]| -> Result<(&'a [u8], &'a [u8]), Error> {
            if b.len() < 2 {
                return Err(Error::Malformed("content: truncated length"));
            }
            let n = u16::from_be_bytes([b[0], b[1]]) as usize;
            if b.len() < 2 + n {
                return Err(Error::Malformed("content: field runs past the end"));
            }
            Ok((&b[2..2 + n], &b[2 + n..]))
        };
        match kind {
            0x01 => {
                let (card, rest) = split16(rest)?;
                let (initial, message) = split16(rest)?;
                Ok(Content::Initial {
                    card,
                    initial,
                    message,
                })
            }
            0x02 => {
                if rest.len() < 8 {
                    return Err(Error::Malformed("content: truncated session id"));
                }
                let mut session_id = [0u8; 8];
                session_id.copy_from_slice(&rest[..8]);
                Ok(Content::Session {
                    session_id,
                    message: &rest[8..],
                })
            }
            _ => Err(Error::Malformed("content: unknown kind")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_pad_to_classes_and_round_trip() {
        for (len, class) in [(0, 256), (226, 256), (227, 1024), (5000, 16384)] {
            let e = Envelope {
                kind: Kind::Text,
                id: [3; 16],
                sent_ms: 42,
                body: vec![7; len],
            };
            let b = e.encode().expect("encode");
            assert_eq!(b.len(), class, "body {len}");
            assert_eq!(Envelope::decode(&b).expect("decode"), e);
        }
        let big = Envelope {
            kind: Kind::Text,
            id: [0; 16],
            sent_ms: 0,
            body: vec![0; MAX_BODY + 1],
        };
        assert!(big.encode().is_err());
    }

    #[test]
    fn malformed_envelopes_are_refused() {
        let e = Envelope {
            kind: Kind::Delivered,
            id: [1; 16],
            sent_ms: 1,
            body: vec![9; 32],
        };
        let good = e.encode().expect("encode");
        assert_eq!(Envelope::decode(&good).expect("ok").receipt_ids().len(), 2);
        let mut bad = good.clone();
        bad[100] = 1; // padding
        assert!(Envelope::decode(&bad).is_err());
        let mut bad = good.clone();
        bad[29] = 33; // receipt body not a multiple of 16
        assert!(Envelope::decode(&bad).is_err());
        let mut bad = good.clone();
        bad[1] = 9;
        assert!(Envelope::decode(&bad).is_err());
        for n in 0..HEADER_LEN {
            assert!(Envelope::decode(&good[..n]).is_err());
        }
    }

    #[test]
    fn content_round_trips_and_never_panics() {
        let c = Content::Initial {
            card: b"card",
            initial: b"init",
            message: b"msg",
        };
        let b = c.encode();
        assert_eq!(Content::decode(&b).expect("decode"), c);
        for n in 0..b.len() {
            let _ = Content::decode(&b[..n]);
        }
        let s = Content::Session {
            session_id: [5; 8],
            message: b"m",
        };
        assert_eq!(Content::decode(&s.encode()).expect("decode"), s);
        assert!(Content::decode(&[0x03]).is_err());
    }
}
