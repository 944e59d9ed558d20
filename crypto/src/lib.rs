//! MeshWhisper's cryptographic core.
//!
//! Pure functions and types: no I/O, no async runtime, no clock reads.
//! Whatever needs randomness takes a [`primitives::Rng`]; whatever needs the
//! time takes `now` in Unix milliseconds.
//!
//! | module | what |
//! |---|---|
//! | [`primitives`] | the only module naming primitive crates |
//! | [`identity`] | Ed25519 identities and their derived X25519 keys |
//! | [`destination`] | namespace ids and 8-byte destination hashes |
//! | [`address_record`] | a relay's signed, self-certifying address record |
//! | [`onion`] | layered transit encryption, v1 (reference) and v2 (padded, replay-tagged) |
//! | [`pqxdh`] | first contact: X25519 + ML-KEM-768 prekey agreement |
//! | [`ratchet`] | the Double Ratchet with AEAD message keys |
//! | [`safety_number`] | 60-digit numbers for comparing identity keys |
//! | [`sealed`] | sealed sender: the sender's identity hidden from relays |

pub mod address_record;
pub mod destination;
pub mod identity;
pub mod onion;
pub mod pqxdh;
pub mod primitives;
pub mod ratchet;
pub mod safety_number;
pub mod sealed;
mod wire;

/// First bytes of a key as hex, for `Debug` output that never shows a whole
/// secret and keeps public keys short.
pub(crate) fn hex_prefix(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(18);
    for b in bytes.iter().take(8) {
        s.push_str(&format!("{b:02x}"));
    }
    if bytes.len() > 8 {
        s.push('…');
    }
    s
}
