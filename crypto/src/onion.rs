//! Layered ("onion") encryption for transit between relays.
//!
//! A sender wraps a packet once per relay on a path; each relay peels one
//! layer with its X25519 *onion key* and learns only the next relay's key, or
//! that it should deliver the packet itself. Two versions exist:
//!
//! - [`v1`] is byte-compatible with the reference relay: one AES-256-GCM
//!   layer per hop, each layer 93 bytes shorter than the one around it (so a
//!   hop can tell its position from the size) and no replay protection.
//! - [`v2`] is ours and fixes both leaks: every layer of an onion has one
//!   fixed size (a Sphinx-style header with deterministic filler and a
//!   payload padded to a size class), and every layer carries a replay tag
//!   that a relay remembers in a [`ReplayCache`].
//!
//! Building and peeling are different roles with different types: a sender
//! holds no secrets beyond fresh ephemeral keys ([`OnionBuilder`]); a relay
//! holds its onion secret ([`OnionPeeler`]).

use crate::primitives::{self, Rng, X25519Public};
use std::collections::{HashMap, VecDeque};

pub mod v1;
pub mod v2;

/// Most hops on one onion path.
pub const MAX_HOPS: usize = 5;

/// One relay on a path: who it is and the key that opens its layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// The relay's Ed25519 key: what the previous hop is told to forward to.
    pub relay_key: [u8; 32],
    /// The relay's X25519 onion key, from its address record.
    pub onion_key: X25519Public,
}

/// A 16-byte tag identifying one onion layer; a relay that has seen it
/// before is being replayed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplayTag(pub [u8; 16]);

/// What peeling one layer revealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeled {
    /// Send `layer` on to the relay with Ed25519 key `next_hop`.
    Forward {
        /// The next relay's key.
        next_hop: [u8; 32],
        /// The layer for it.
        layer: Vec<u8>,
        /// This layer's replay tag (v2 only).
        replay_tag: Option<ReplayTag>,
    },
    /// This relay is the last hop: deliver `packet`.
    Deliver {
        /// The client packet.
        packet: Vec<u8>,
        /// This layer's replay tag (v2 only).
        replay_tag: Option<ReplayTag>,
    },
}

impl Peeled {
    /// The replay tag, where the version has one.
    pub fn replay_tag(&self) -> Option<ReplayTag> {
        match self {
            Peeled::Forward { replay_tag, .. } | Peeled::Deliver { replay_tag, .. } => *replay_tag,
        }
    }
}

/// Why an onion could not be built or peeled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A path must have 1 to [`MAX_HOPS`] hops.
    #[error("onion path must have 1..={MAX_HOPS} hops, got {0}")]
    PathLength(usize),
    /// The packet is larger than this version can carry.
    #[error("packet of {got} bytes exceeds the onion limit of {max}")]
    PacketTooLarge {
        /// Packet size.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// A hop's onion key is a low-order point.
    #[error("hop onion key is invalid")]
    BadHopKey,
    /// The layer is not well-formed (size, version, type byte, padding).
    #[error("malformed onion layer: {0}")]
    Malformed(&'static str),
    /// The layer does not open with this relay's key (or was modified).
    #[error("onion layer failed authentication")]
    Authentication,
}

impl Error {
    /// A short stable label, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::PathLength(_) => "path_length",
            Error::PacketTooLarge { .. } => "too_large",
            Error::BadHopKey => "bad_hop_key",
            Error::Malformed(_) => "malformed",
            Error::Authentication => "authentication",
        }
    }
}

/// The sender's role: wraps a packet for a path.
pub trait OnionBuilder {
    /// Builds the onion for `path[0]`; the last hop delivers `packet`.
    fn build(&self, rng: &mut impl Rng, path: &[Hop], packet: &[u8]) -> Result<Vec<u8>, Error>;
}

/// A relay's role: peels the layer addressed to it.
pub trait OnionPeeler {
    /// Opens one layer. A layer that does not open is an error; relays drop
    /// such layers without answering.
    fn peel(&self, layer: &[u8]) -> Result<Peeled, Error>;
}

fn check_path(path: &[Hop]) -> Result<(), Error> {
    if path.is_empty() || path.len() > MAX_HOPS {
        return Err(Error::PathLength(path.len()));
    }
    Ok(())
}

fn dh(
    secret: &primitives::X25519Secret,
    public: &X25519Public,
) -> Result<primitives::SharedSecret, Error> {
    secret.diffie_hellman(public).map_err(|_| Error::BadHopKey)
}

/// Remembers replay tags for a while, with a bounded number of entries.
///
/// Time is passed in. When full, the oldest tag is forgotten first; size the
/// capacity for the expected layer rate times the TTL so that happens only
/// under attack.
#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    ttl_ms: u64,
    seen: HashMap<ReplayTag, u64>,
    order: VecDeque<(ReplayTag, u64)>,
}

impl ReplayCache {
    /// A cache of at most `capacity` tags, each kept `ttl_ms`.
    pub fn new(capacity: usize, ttl_ms: u64) -> Self {
        Self {
            capacity: capacity.max(1),
            ttl_ms,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Records `tag` at `now_ms`. Returns `false` if it was already there
    /// (a replay) and `true` if it is new.
    pub fn check_and_insert(&mut self, tag: ReplayTag, now_ms: u64) -> bool {
        self.expire(now_ms);
        if self.seen.contains_key(&tag) {
            return false;
        }
        while self.seen.len() >= self.capacity {
            match self.order.pop_front() {
                Some((old, _)) => {
                    self.seen.remove(&old);
                }
                None => break,
            }
        }
        let expiry = now_ms.saturating_add(self.ttl_ms);
        self.seen.insert(tag, expiry);
        self.order.push_back((tag, expiry));
        true
    }

    /// How many tags are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no tag is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn expire(&mut self, now_ms: u64) {
        while let Some((tag, expiry)) = self.order.front().copied() {
            if expiry > now_ms {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&tag);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_cache_detects_expires_and_bounds() {
        let mut c = ReplayCache::new(3, 100);
        let t = |b| ReplayTag([b; 16]);
        assert!(c.check_and_insert(t(1), 0));
        assert!(!c.check_and_insert(t(1), 50));
        assert!(c.check_and_insert(t(1), 100), "expired after ttl");
        assert!(c.check_and_insert(t(2), 101));
        assert!(c.check_and_insert(t(3), 102));
        assert!(c.check_and_insert(t(4), 103));
        assert_eq!(c.len(), 3);
        assert!(!c.check_and_insert(t(4), 104));
    }
}
