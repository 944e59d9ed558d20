//! Fixed-size, replay-tagged onion layers (version 2, ours).
//!
//! Version 1 leaks two things: a layer's size tells a hop how many layers
//! are inside it, and nothing stops a recorded layer from being sent to the
//! same hop again. Version 2 is built like Sphinx, in its simplest form:
//!
//! ```text
//! onion   = 0x02 ‖ α (32) ‖ γ (16) ‖ β (MAX_HOPS × SLOT_LEN) ‖ δ (payload class)
//! slot    = type (1) ‖ next hop key (32) ‖ next α (32) ‖ next γ (16)
//! ```
//!
//! - α is a fresh ephemeral X25519 key per hop; the hop computes the shared
//!   secret with its onion key and derives, with HKDF-SHA256 (info
//!   `meshwhisper-onion-v2` ‖ α ‖ onion key), a MAC key, a header stream
//!   key, a payload stream key and the 16-byte replay tag.
//! - γ is a BLAKE3-keyed MAC (first 16 bytes) over β ‖ δ.
//! - β is a fixed-size header. The hop appends one zero slot, XORs the
//!   ChaCha20 stream of its header key over it, reads its slot off the front
//!   and passes the remaining `MAX_HOPS` slots on. The sender precomputes the
//!   *filler* those appended slots turn into, so every hop's MAC checks and
//!   no hop can tell how many hops remain.
//! - δ, the payload, is `length (4) ‖ packet ‖ zero padding` up to a size
//!   class, XORed with one ChaCha20 stream per hop.
//!
//! Every layer of an onion therefore has the same size, and two onions with
//! packets in the same size class have the same size. Each layer's replay
//! tag is a function of its α and the hop's key, so a replayed layer has the
//! same tag and a relay with a [`super::ReplayCache`] refuses it.

use super::{Error, Hop, OnionBuilder, OnionPeeler, Peeled, ReplayTag, check_path, dh};
use crate::primitives::{self, Rng, X25519Public, X25519Secret};
use zeroize::{Zeroize, Zeroizing};

/// Version byte at the start of every v2 layer.
pub const VERSION: u8 = 0x02;
/// HKDF info prefix of version 2.
pub const INFO: &[u8] = b"meshwhisper-onion-v2";
/// Bytes per routing slot.
pub const SLOT_LEN: usize = 1 + 32 + 32 + MAC_LEN;
/// Header (β) length.
pub const HEADER_LEN: usize = super::MAX_HOPS * SLOT_LEN;
/// MAC length.
pub const MAC_LEN: usize = 16;
/// Bytes before the payload: version, α, γ, β.
pub const PREFIX_LEN: usize = 1 + 32 + MAC_LEN + HEADER_LEN;
/// Payload sizes; an onion's payload is the smallest that fits
/// `4 + packet length`. The largest carries a 256 KiB packet with its
/// 31-byte header.
pub const PAYLOAD_CLASSES: [usize; 5] = [1024, 4096, 16 * 1024, 64 * 1024, 256 * 1024 + 64];
/// The largest packet a v2 onion carries.
pub const MAX_PACKET_LEN: usize = PAYLOAD_CLASSES[PAYLOAD_CLASSES.len() - 1] - 4;

const TYPE_FORWARD: u8 = 0x00;
const TYPE_DELIVER: u8 = 0x01;
const STREAM_NONCE: [u8; 12] = [0u8; 12];

/// The total size of a v2 onion whose payload class fits `packet_len`.
pub fn onion_len(packet_len: usize) -> Option<usize> {
    payload_class(packet_len).map(|p| PREFIX_LEN + p)
}

fn payload_class(packet_len: usize) -> Option<usize> {
    PAYLOAD_CLASSES
        .iter()
        .copied()
        .find(|&c| c >= packet_len.saturating_add(4))
}

/// Per-hop keys, zeroized on drop.
struct HopKeys {
    mac: Zeroizing<[u8; 32]>,
    header: Zeroizing<[u8; 32]>,
    payload: Zeroizing<[u8; 32]>,
    replay: [u8; 16],
}

impl HopKeys {
    fn derive(shared: &[u8; 32], alpha: &X25519Public, onion_key: &X25519Public) -> Self {
        let mut okm = Zeroizing::new([0u8; 112]);
        primitives::hkdf_sha256(
            None,
            shared,
            &[INFO, alpha.as_bytes(), onion_key.as_bytes()],
            okm.as_mut(),
        );
        let mut keys = Self {
            mac: Zeroizing::new([0u8; 32]),
            header: Zeroizing::new([0u8; 32]),
            payload: Zeroizing::new([0u8; 32]),
            replay: [0u8; 16],
        };
        keys.mac.copy_from_slice(&okm[..32]);
        keys.header.copy_from_slice(&okm[32..64]);
        keys.payload.copy_from_slice(&okm[64..96]);
        keys.replay.copy_from_slice(&okm[96..112]);
        keys
    }

    /// The header stream, (MAX_HOPS + 1) slots long.
    fn header_stream(&self) -> Zeroizing<Vec<u8>> {
        let mut s = Zeroizing::new(vec![0u8; HEADER_LEN + SLOT_LEN]);
        primitives::chacha20_xor(&self.header, &STREAM_NONCE, &mut s);
        s
    }

    fn mac(&self, beta: &[u8], delta: &[u8]) -> [u8; MAC_LEN] {
        let full = primitives::blake3_keyed(&self.mac, &[beta, delta]);
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&full[..MAC_LEN]);
        out
    }

    fn xor_payload(&self, delta: &mut [u8]) {
        primitives::chacha20_xor(&self.payload, &STREAM_NONCE, delta);
    }
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// The sender's side of version 2.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sender;

impl OnionBuilder for Sender {
    fn build(&self, rng: &mut impl Rng, path: &[Hop], packet: &[u8]) -> Result<Vec<u8>, Error> {
        check_path(path)?;
        let class = payload_class(packet.len()).ok_or(Error::PacketTooLarge {
            got: packet.len(),
            max: MAX_PACKET_LEN,
        })?;
        let n = path.len();
        let r = super::MAX_HOPS;

        // Fresh ephemeral key and derived keys for every hop.
        let mut alphas = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        for hop in path {
            let eph = X25519Secret::generate(rng);
            let alpha = eph.public();
            let shared = dh(&eph, &hop.onion_key)?;
            keys.push(HopKeys::derive(shared.as_bytes(), &alpha, &hop.onion_key));
            alphas.push(alpha);
        }
        let streams: Vec<_> = keys.iter().map(HopKeys::header_stream).collect();

        // Filler: what the slots appended by hops 0..n-1 have become by the
        // time the header reaches the last hop.
        let mut filler: Vec<u8> = Vec::with_capacity((n - 1) * SLOT_LEN);
        for (i, stream) in streams.iter().enumerate().take(n - 1) {
            filler.extend_from_slice(&[0u8; SLOT_LEN]);
            xor_into(&mut filler, &stream[(r - i) * SLOT_LEN..]);
        }

        // The last hop's header: a deliver slot, random bytes, then filler.
        let last = n - 1;
        let mut beta = vec![0u8; (r - n + 1) * SLOT_LEN];
        beta[0] = TYPE_DELIVER;
        primitives::fill_random(rng, &mut beta[SLOT_LEN..]);
        xor_into(&mut beta, &streams[last]);
        beta.extend_from_slice(&filler);

        let mut delta = vec![0u8; class];
        let len = u32::try_from(packet.len()).map_err(|_| Error::PacketTooLarge {
            got: packet.len(),
            max: MAX_PACKET_LEN,
        })?;
        delta[..4].copy_from_slice(&len.to_be_bytes());
        delta[4..4 + packet.len()].copy_from_slice(packet);
        keys[last].xor_payload(&mut delta);
        let mut gamma = keys[last].mac(&beta, &delta);

        for i in (0..last).rev() {
            let mut next = Vec::with_capacity(HEADER_LEN + SLOT_LEN);
            next.push(TYPE_FORWARD);
            next.extend_from_slice(&path[i + 1].relay_key);
            next.extend_from_slice(alphas[i + 1].as_bytes());
            next.extend_from_slice(&gamma);
            next.extend_from_slice(&beta[..HEADER_LEN - SLOT_LEN]);
            xor_into(&mut next, &streams[i]);
            beta = next;
            keys[i].xor_payload(&mut delta);
            gamma = keys[i].mac(&beta, &delta);
        }

        let mut out = Vec::with_capacity(PREFIX_LEN + class);
        out.push(VERSION);
        out.extend_from_slice(alphas[0].as_bytes());
        out.extend_from_slice(&gamma);
        out.extend_from_slice(&beta);
        out.extend_from_slice(&delta);
        Ok(out)
    }
}

/// A relay's side of version 2: holds the onion secret.
#[derive(Debug, Clone)]
pub struct Relay {
    secret: X25519Secret,
    public: X25519Public,
}

impl Relay {
    /// A peeler for the relay whose onion secret is `secret`.
    pub fn new(secret: X25519Secret) -> Self {
        let public = secret.public();
        Self { secret, public }
    }
}

impl OnionPeeler for Relay {
    fn peel(&self, layer: &[u8]) -> Result<Peeled, Error> {
        let class = layer
            .len()
            .checked_sub(PREFIX_LEN)
            .filter(|p| PAYLOAD_CLASSES.contains(p))
            .ok_or(Error::Malformed("layer size is not a v2 size class"))?;
        if layer[0] != VERSION {
            return Err(Error::Malformed("not a v2 layer"));
        }
        let alpha = X25519Public(
            primitives::array("alpha", &layer[1..33]).map_err(|_| Error::Malformed("alpha"))?,
        );
        let gamma = &layer[33..33 + MAC_LEN];
        let beta = &layer[33 + MAC_LEN..PREFIX_LEN];
        let delta_in = &layer[PREFIX_LEN..];
        debug_assert_eq!(delta_in.len(), class);

        let shared = self
            .secret
            .diffie_hellman(&alpha)
            .map_err(|_| Error::Authentication)?;
        let keys = HopKeys::derive(shared.as_bytes(), &alpha, &self.public);
        if !primitives::ct_eq(&keys.mac(beta, delta_in), gamma) {
            return Err(Error::Authentication);
        }
        let replay_tag = Some(ReplayTag(keys.replay));

        let mut rho = Zeroizing::new(Vec::with_capacity(HEADER_LEN + SLOT_LEN));
        rho.extend_from_slice(beta);
        rho.extend_from_slice(&[0u8; SLOT_LEN]);
        xor_into(&mut rho, &keys.header_stream());
        let mut delta = delta_in.to_vec();
        keys.xor_payload(&mut delta);

        match rho[0] {
            TYPE_FORWARD => {
                let next_hop: [u8; 32] = primitives::array("next hop", &rho[1..33])
                    .map_err(|_| Error::Malformed("slot"))?;
                let mut out = Vec::with_capacity(layer.len());
                out.push(VERSION);
                out.extend_from_slice(&rho[33..SLOT_LEN]);
                out.extend_from_slice(&rho[SLOT_LEN..]);
                out.extend_from_slice(&delta);
                Ok(Peeled::Forward {
                    next_hop,
                    layer: out,
                    replay_tag,
                })
            }
            TYPE_DELIVER => {
                let len = u32::from_be_bytes([delta[0], delta[1], delta[2], delta[3]]) as usize;
                if len > class - 4 {
                    delta.zeroize();
                    return Err(Error::Malformed("payload length exceeds payload"));
                }
                if delta[4 + len..].iter().any(|&b| b != 0) {
                    delta.zeroize();
                    return Err(Error::Malformed("payload padding is not zero"));
                }
                delta.truncate(4 + len);
                delta.drain(..4);
                Ok(Peeled::Deliver {
                    packet: delta,
                    replay_tag,
                })
            }
            _ => Err(Error::Malformed("unknown slot type")),
        }
    }
}
