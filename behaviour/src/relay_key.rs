//! A relay's identity: its Ed25519 public key. Address records, route
//! hints and federation frames name relays by it; libp2p names them by the
//! PeerId derived from it. This is the one place the two are converted.

use libp2p::{PeerId, identity};

/// The protobuf encoding of an Ed25519 public key before its 32 bytes:
/// field 1 (`Type`) = 1 (Ed25519), field 2 (`Data`) of length 32.
const ED25519_PROTOBUF_PREFIX: [u8; 4] = [0x08, 0x01, 0x12, 0x20];

/// A relay's Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayKey(pub [u8; 32]);

impl RelayKey {
    /// The key inside an Ed25519 PeerId (`None` for other key types).
    pub fn from_peer(peer: &PeerId) -> Option<Self> {
        let mh: &libp2p::multihash::Multihash<64> = peer.as_ref();
        // Ed25519 PeerIds embed the key (identity multihash) as the
        // protobuf `PublicKey { Type: Ed25519, Data: key }`: read the key
        // out directly. Decoding it as a key would decompress the curve
        // point, which costs tens of microseconds, on every packet.
        if mh.code() != 0 {
            return None;
        }
        let digest = mh.digest();
        if let Some(key) = digest.strip_prefix(&ED25519_PROTOBUF_PREFIX)
            && let Ok(k) = <[u8; 32]>::try_from(key)
        {
            return Some(Self(k));
        }
        let pk = identity::PublicKey::try_decode_protobuf(digest).ok()?;
        Some(Self(pk.try_into_ed25519().ok()?.to_bytes()))
    }

    /// The PeerId of this key (`None` if the bytes are not an Ed25519
    /// key). This validates the point (tens of microseconds): callers on a
    /// hot path keep the answers.
    pub fn to_peer(&self) -> Option<PeerId> {
        let k = identity::ed25519::PublicKey::try_from_bytes(&self.0).ok()?;
        Some(identity::PublicKey::from(k).to_peer_id())
    }

    /// The key's bytes.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl From<[u8; 32]> for RelayKey {
    fn from(b: [u8; 32]) -> Self {
        Self(b)
    }
}

impl std::fmt::Debug for RelayKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RelayKey({})", hex::encode(&self.0[..8]))
    }
}

impl std::fmt::Display for RelayKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Hash-map state for maps keyed by [`PeerId`]: foldhash (randomly seeded)
/// over at most the last 16 bytes of each write. A PeerId hashes as its
/// multihash code and digest, and the digest ends in the peer's public key
/// (identity multihash) or in a hash of it: those 16 bytes tell peers
/// apart as well as all 36 or more (choosing a key whose last 16 bytes
/// collide with another's takes about 2^128 tries), and hashing them
/// costs a fraction. Maps on the packet path look a PeerId up a dozen
/// times per packet.
#[derive(Clone, Debug, Default)]
pub struct PeerIdHash(foldhash::fast::RandomState);

impl std::hash::BuildHasher for PeerIdHash {
    type Hasher = TailHasher;

    fn build_hasher(&self) -> TailHasher {
        TailHasher(self.0.build_hasher())
    }
}

/// See [`PeerIdHash`].
#[derive(Clone)]
pub struct TailHasher(foldhash::fast::FoldHasher<'static>);

impl std::fmt::Debug for TailHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TailHasher")
    }
}

impl std::hash::Hasher for TailHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(&bytes[bytes.len().saturating_sub(16)..]);
    }
    fn write_u8(&mut self, i: u8) {
        self.0.write_u8(i);
    }
    fn write_u64(&mut self, i: u64) {
        self.0.write_u64(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.0.write_usize(i);
    }
    fn finish(&self) -> u64 {
        self.0.finish()
    }
}

/// A map keyed by [`PeerId`], hashed with [`PeerIdHash`].
pub type PeerMap<V> = std::collections::HashMap<PeerId, V, PeerIdHash>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ids_and_keys_convert_both_ways() {
        let kp = identity::Keypair::generate_ed25519();
        let peer = kp.public().to_peer_id();
        let key = RelayKey::from_peer(&peer).expect("ed25519 peer");
        assert_eq!(key.to_peer(), Some(peer));
        assert_eq!(
            key.0,
            kp.public().try_into_ed25519().expect("ed").to_bytes()
        );
        // A PeerId that does not embed an Ed25519 key has none.
        assert_eq!(RelayKey::from_peer(&PeerId::random()), None);
    }

    #[test]
    fn peer_maps_tell_peers_apart() {
        use std::hash::BuildHasher as _;
        let h = PeerIdHash::default();
        let peers: Vec<PeerId> = (0..1000)
            .map(|i| {
                if i % 2 == 0 {
                    identity::Keypair::generate_ed25519().public().to_peer_id()
                } else {
                    PeerId::random()
                }
            })
            .collect();
        let hashes: std::collections::HashSet<u64> = peers.iter().map(|p| h.hash_one(p)).collect();
        assert_eq!(hashes.len(), peers.len(), "distinct peers, distinct hashes");
        let mut m: PeerMap<usize> = PeerMap::default();
        for (i, p) in peers.iter().enumerate() {
            m.insert(*p, i);
        }
        for (i, p) in peers.iter().enumerate() {
            assert_eq!(m.get(p), Some(&i));
            assert_eq!(
                h.hash_one(p),
                h.hash_one(*p),
                "a PeerId hashes the same each time"
            );
        }
    }
}
