//! Sealed sender: hides who sent a message from the relays that carry it.
//!
//! A relay sees only the 8-byte destination hash of a packet. Inside the
//! payload, the recipient must learn which contact sent it (to pick the
//! session) without the relay learning it too. The sender's identity is
//! therefore encrypted to the recipient's identity key in two stages:
//!
//! ```text
//! E        = fresh X25519 key pair
//! (ck, k1) = HKDF-SHA256(ikm = DH(E, IK_B), info = INFO_1 ‖ E_pub ‖ IK_B)       64 bytes
//! c1       = ChaCha20-Poly1305(k1, nonce 0, aad = VERSION ‖ E_pub ‖ IK_B, IK_A)
//! k2       = HKDF-SHA256(salt = ck, ikm = DH(IK_A, IK_B), info = INFO_2 ‖ c1)  32 bytes
//! c2       = ChaCha20-Poly1305(k2, nonce 0, aad = c1, content)
//! sealed   = VERSION (1) ‖ E_pub (32) ‖ c1 (48) ‖ c2
//! ```
//!
//! The first stage reveals IK_A only to the holder of IK_B; the second
//! proves the sender holds IK_A (the static-static exchange), so a sealed
//! message cannot claim a sender it does not come from. Identity keys are
//! the Ed25519 keys of [`crate::identity`], used here in their X25519 form.

use crate::identity::{IdentityKeyPair, IdentityPublic};
use crate::primitives::{self, Rng, X25519Public, X25519Secret};
use crate::wire::{DecodeError, Reader};
use zeroize::Zeroizing;

/// Encoding version.
pub const VERSION: u8 = 0x01;
/// Bytes a sealed message adds to its content.
pub const OVERHEAD: usize = 1 + 32 + 32 + primitives::TAG_LEN + primitives::TAG_LEN;
const INFO_1: &[u8] = b"MeshWhisper_SealedSender_v1_Sender";
const INFO_2: &[u8] = b"MeshWhisper_SealedSender_v1_Content";
const NONCE: [u8; primitives::NONCE_LEN] = [0; primitives::NONCE_LEN];

/// Why a sealed message could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not a sealed message of a known version.
    #[error("malformed sealed message: {0}")]
    Malformed(#[from] DecodeError),
    /// A key in the message is not a usable public key.
    #[error("invalid {0} key in sealed message")]
    BadKey(&'static str),
    /// Not sealed to us, or altered.
    #[error("sealed message does not decrypt")]
    Decrypt,
}

/// An opened message: who sent it and what they sent.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    /// The sender's identity, proven by the static-static exchange.
    pub sender: IdentityPublic,
    /// The content.
    pub content: Vec<u8>,
}

fn stage_one(
    dh: &primitives::SharedSecret,
    ephemeral: &X25519Public,
    recipient: &IdentityPublic,
) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let mut okm = Zeroizing::new([0u8; 64]);
    primitives::hkdf_sha256(
        None,
        dh.as_bytes(),
        &[INFO_1, ephemeral.as_bytes(), &recipient.to_bytes()],
        okm.as_mut(),
    );
    let mut ck = Zeroizing::new([0u8; 32]);
    let mut k1 = Zeroizing::new([0u8; 32]);
    ck.copy_from_slice(&okm[..32]);
    k1.copy_from_slice(&okm[32..]);
    (ck, k1)
}

fn stage_two(ck: &[u8; 32], dh: &primitives::SharedSecret, c1: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut k2 = Zeroizing::new([0u8; 32]);
    primitives::hkdf_sha256(Some(ck), dh.as_bytes(), &[INFO_2, c1], k2.as_mut());
    k2
}

fn aad_one(ephemeral: &X25519Public, recipient: &IdentityPublic) -> [u8; 65] {
    let mut aad = [0u8; 65];
    aad[0] = VERSION;
    aad[1..33].copy_from_slice(ephemeral.as_bytes());
    aad[33..].copy_from_slice(&recipient.to_bytes());
    aad
}

/// Seals `content` from `sender` to `recipient`.
pub fn seal(
    rng: &mut impl Rng,
    sender: &IdentityKeyPair,
    recipient: &IdentityPublic,
    content: &[u8],
) -> Result<Vec<u8>, Error> {
    let e = X25519Secret::generate(rng);
    let e_pub = e.public();
    let ik_b = recipient.x25519();
    let dh1 = e
        .diffie_hellman(&ik_b)
        .map_err(|_| Error::BadKey("recipient"))?;
    let (ck, k1) = stage_one(&dh1, &e_pub, recipient);
    let c1 = primitives::chacha20poly1305_seal(
        &k1,
        &NONCE,
        &aad_one(&e_pub, recipient),
        &sender.public().to_bytes(),
    );
    let dh2 = sender
        .x25519()
        .diffie_hellman(&ik_b)
        .map_err(|_| Error::BadKey("recipient"))?;
    let k2 = stage_two(&ck, &dh2, &c1);
    let c2 = primitives::chacha20poly1305_seal(&k2, &NONCE, &c1, content);
    let mut out = Vec::with_capacity(1 + 32 + c1.len() + c2.len());
    out.push(VERSION);
    out.extend_from_slice(e_pub.as_bytes());
    out.extend_from_slice(&c1);
    out.extend_from_slice(&c2);
    Ok(out)
}

/// Opens a message sealed to `recipient`. Never panics on any input.
pub fn open(recipient: &IdentityKeyPair, sealed: &[u8]) -> Result<Opened, Error> {
    let mut r = Reader::new(sealed);
    if r.u8("version")? != VERSION {
        return Err(DecodeError::Invalid {
            what: "sealed message version",
            why: "unknown",
        }
        .into());
    }
    let e_pub = X25519Public(r.array("ephemeral key")?);
    let c1 = r.take("sealed sender", 32 + primitives::TAG_LEN)?;
    let c2 = r.rest();
    if c2.len() < primitives::TAG_LEN {
        return Err(DecodeError::Truncated {
            what: "sealed content",
            needed: primitives::TAG_LEN - c2.len(),
        }
        .into());
    }
    let dh1 = recipient
        .x25519()
        .diffie_hellman(&e_pub)
        .map_err(|_| Error::BadKey("ephemeral"))?;
    let (ck, k1) = stage_one(&dh1, &e_pub, recipient.public());
    let sender =
        primitives::chacha20poly1305_open(&k1, &NONCE, &aad_one(&e_pub, recipient.public()), c1)
            .map_err(|_| Error::Decrypt)?;
    let sender = IdentityPublic::from_slice(&sender).map_err(|_| Error::BadKey("sender"))?;
    let dh2 = recipient
        .x25519()
        .diffie_hellman(&sender.x25519())
        .map_err(|_| Error::BadKey("sender"))?;
    let k2 = stage_two(&ck, &dh2, c1);
    let content =
        primitives::chacha20poly1305_open(&k2, &NONCE, c1, c2).map_err(|_| Error::Decrypt)?;
    Ok(Opened { sender, content })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng as _;

    #[test]
    fn round_trip_reveals_the_sender_only_to_the_recipient() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let alice = IdentityKeyPair::generate(&mut rng);
        let bob = IdentityKeyPair::generate(&mut rng);
        let eve = IdentityKeyPair::generate(&mut rng);
        let sealed = seal(&mut rng, &alice, bob.public(), b"hello bob").expect("seal");
        assert_eq!(sealed.len(), OVERHEAD + 9);
        let opened = open(&bob, &sealed).expect("open");
        assert_eq!(opened.sender, *alice.public());
        assert_eq!(opened.content, b"hello bob");
        assert_eq!(open(&eve, &sealed), Err(Error::Decrypt));
        // The sender's key is not visible in the bytes.
        let a = alice.public().to_bytes();
        assert!(!sealed.windows(32).any(|w| w == a));
    }

    #[test]
    fn every_flipped_bit_is_rejected() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let alice = IdentityKeyPair::generate(&mut rng);
        let bob = IdentityKeyPair::generate(&mut rng);
        let sealed = seal(&mut rng, &alice, bob.public(), b"x").expect("seal");
        for i in 0..sealed.len() * 8 {
            let mut bad = sealed.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(open(&bob, &bad).is_err(), "bit {i}");
        }
        for n in 0..sealed.len() {
            assert!(open(&bob, &sealed[..n]).is_err());
        }
    }

    #[test]
    fn a_forged_sender_does_not_open() {
        // Mallory seals with her own key but writes Alice's identity into
        // the first stage: the static-static exchange gives her away.
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let alice = IdentityKeyPair::generate(&mut rng);
        let bob = IdentityKeyPair::generate(&mut rng);
        let mallory = IdentityKeyPair::generate(&mut rng);
        let e = X25519Secret::generate(&mut rng);
        let e_pub = e.public();
        let dh1 = e.diffie_hellman(&bob.public().x25519()).expect("dh");
        let (ck, k1) = stage_one(&dh1, &e_pub, bob.public());
        let c1 = primitives::chacha20poly1305_seal(
            &k1,
            &NONCE,
            &aad_one(&e_pub, bob.public()),
            &alice.public().to_bytes(),
        );
        let dh2 = mallory
            .x25519()
            .diffie_hellman(&bob.public().x25519())
            .expect("dh");
        let k2 = stage_two(&ck, &dh2, &c1);
        let c2 = primitives::chacha20poly1305_seal(&k2, &NONCE, &c1, b"trust me");
        let mut forged = vec![VERSION];
        forged.extend_from_slice(e_pub.as_bytes());
        forged.extend_from_slice(&c1);
        forged.extend_from_slice(&c2);
        assert_eq!(open(&bob, &forged), Err(Error::Decrypt));
    }
}
