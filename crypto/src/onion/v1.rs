//! Onion layers as the reference relay builds them (version 1).
//!
//! Per hop: a fresh ephemeral X25519 key, ECDH with the hop's onion key,
//! HKDF-SHA256 (empty salt, info `meshwhisper-onion-v1`, 32 bytes) as an
//! AES-256-GCM key, a random 12-byte IV and no associated data.
//!
//! ```text
//! layer     = ephemeral public (32) ‖ IV (12) ‖ tag (16) ‖ ciphertext
//! plaintext = 0x00 ‖ next hop key (32) ‖ inner layer     (forward)
//!           | 0x01 ‖ packet                              (deliver)
//! ```
//!
//! Each layer is [`FORWARD_OVERHEAD`] bytes longer than the one inside it,
//! which tells a hop roughly where on the path it sits; [`super::v2`] fixes
//! that.

use super::{Error, Hop, OnionBuilder, OnionPeeler, Peeled, check_path, dh};
use crate::primitives::{self, NONCE_LEN, Rng, TAG_LEN, X25519Public, X25519Secret};
use zeroize::Zeroizing;

/// HKDF info string of version 1.
pub const INFO: &[u8] = b"meshwhisper-onion-v1";
/// Bytes of a layer before its ciphertext.
pub const HEADER_LEN: usize = 32 + NONCE_LEN + TAG_LEN;
/// What one forward layer adds: header, type byte and next hop key.
pub const FORWARD_OVERHEAD: usize = HEADER_LEN + 1 + 32;
/// The largest packet a v1 onion carries (the reference relay's 256 KiB
/// packet limit plus the 31-byte packet header).
pub const MAX_PACKET_LEN: usize = 256 * 1024 + 31;
/// The largest layer a relay accepts.
pub const MAX_LAYER_LEN: usize =
    MAX_PACKET_LEN + 1 + HEADER_LEN + super::MAX_HOPS * FORWARD_OVERHEAD;

const TYPE_FORWARD: u8 = 0x00;
const TYPE_DELIVER: u8 = 0x01;

/// The sender's side of version 1.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sender;

impl OnionBuilder for Sender {
    fn build(&self, rng: &mut impl Rng, path: &[Hop], packet: &[u8]) -> Result<Vec<u8>, Error> {
        check_path(path)?;
        if packet.len() > MAX_PACKET_LEN {
            return Err(Error::PacketTooLarge {
                got: packet.len(),
                max: MAX_PACKET_LEN,
            });
        }
        let mut inner = Vec::with_capacity(packet.len() + 1);
        inner.push(TYPE_DELIVER);
        inner.extend_from_slice(packet);
        let mut layer = Vec::new();
        for (i, hop) in path.iter().enumerate().rev() {
            if i + 1 < path.len() {
                let mut plain = Vec::with_capacity(layer.len() + 33);
                plain.push(TYPE_FORWARD);
                plain.extend_from_slice(&path[i + 1].relay_key);
                plain.extend_from_slice(&layer);
                inner = plain;
            }
            let eph = X25519Secret::generate(rng);
            let iv: [u8; NONCE_LEN] = primitives::random_array(rng);
            layer = seal_layer(&eph, &hop.onion_key, &iv, &inner)?;
        }
        Ok(layer)
    }
}

/// Seals one layer with a given ephemeral key and IV (deterministic; used by
/// [`Sender`] and by known-answer tests).
pub fn seal_layer(
    ephemeral: &X25519Secret,
    onion_key: &X25519Public,
    iv: &[u8; NONCE_LEN],
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    let shared = dh(ephemeral, onion_key)?;
    let key = layer_key(shared.as_bytes());
    let (ct, tag) = primitives::aes256gcm_seal(&key, iv, &[], plaintext);
    let mut out = Vec::with_capacity(HEADER_LEN + ct.len());
    out.extend_from_slice(ephemeral.public().as_bytes());
    out.extend_from_slice(iv);
    out.extend_from_slice(&tag);
    out.extend_from_slice(&ct);
    Ok(out)
}

fn layer_key(shared: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut key = Zeroizing::new([0u8; 32]);
    primitives::hkdf_sha256(None, shared, &[INFO], key.as_mut());
    key
}

/// A relay's side of version 1: holds the onion secret.
#[derive(Debug, Clone)]
pub struct Relay {
    secret: X25519Secret,
}

impl Relay {
    /// A peeler for the relay whose onion secret is `secret`.
    pub fn new(secret: X25519Secret) -> Self {
        Self { secret }
    }
}

impl OnionPeeler for Relay {
    fn peel(&self, layer: &[u8]) -> Result<Peeled, Error> {
        if layer.len() > MAX_LAYER_LEN {
            return Err(Error::Malformed("layer too large"));
        }
        if layer.len() < HEADER_LEN + 1 {
            return Err(Error::Malformed("layer too short"));
        }
        let eph = X25519Public(
            primitives::array("ephemeral key", &layer[..32])
                .map_err(|_| Error::Malformed("ephemeral key"))?,
        );
        let iv: [u8; NONCE_LEN] =
            primitives::array("iv", &layer[32..44]).map_err(|_| Error::Malformed("iv"))?;
        let tag: [u8; TAG_LEN] =
            primitives::array("tag", &layer[44..60]).map_err(|_| Error::Malformed("tag"))?;
        // X25519 ignores the top bit of a public key, so a layer with it
        // flipped would open too: refuse non-canonical encodings outright.
        if layer[31] & 0x80 != 0 {
            return Err(Error::Malformed("non-canonical ephemeral key"));
        }
        let shared = self
            .secret
            .diffie_hellman(&eph)
            .map_err(|_| Error::Authentication)?;
        let key = layer_key(shared.as_bytes());
        let plain = primitives::aes256gcm_open(&key, &iv, &[], &layer[HEADER_LEN..], &tag)
            .map_err(|_| Error::Authentication)?;
        match plain.split_first() {
            Some((&TYPE_DELIVER, packet)) => Ok(Peeled::Deliver {
                packet: packet.to_vec(),
                replay_tag: None,
            }),
            Some((&TYPE_FORWARD, rest)) if rest.len() > 32 => {
                let next_hop: [u8; 32] = primitives::array("next hop", &rest[..32])
                    .map_err(|_| Error::Malformed("next hop"))?;
                Ok(Peeled::Forward {
                    next_hop,
                    layer: rest[32..].to_vec(),
                    replay_tag: None,
                })
            }
            Some((&TYPE_FORWARD, _)) => Err(Error::Malformed("forward layer without inner layer")),
            _ => Err(Error::Malformed("unknown layer type")),
        }
    }
}
