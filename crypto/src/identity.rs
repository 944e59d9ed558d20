//! Ed25519 identities and the X25519 keys derived from them.
//!
//! A MeshWhisper identity is an Ed25519 key pair. Its X25519 key (used for
//! destination hashes and Diffie-Hellman) is derived, never stored apart:
//! the public key by the Edwards-to-Montgomery map, the secret as the clamped
//! first half of SHA-512(seed), exactly as the reference SDK derives them.

use crate::primitives::{self, Ed25519Public, Ed25519Secret, Rng, X25519Public, X25519Secret};
use zeroize::Zeroizing;

/// A public identity: the Ed25519 key and its derived X25519 key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentityPublic {
    ed25519: Ed25519Public,
    x25519: X25519Public,
}

impl IdentityPublic {
    /// Parses and validates a 32-byte Ed25519 public key.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, primitives::Error> {
        let ed25519 = Ed25519Public::from_bytes(bytes)?;
        Ok(Self::from(ed25519))
    }

    /// Parses a 32-byte slice.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, primitives::Error> {
        Self::from_bytes(&primitives::array("identity key", bytes)?)
    }

    /// The Ed25519 public key.
    pub fn ed25519(&self) -> &Ed25519Public {
        &self.ed25519
    }

    /// The 32 Ed25519 bytes (what identities are known by on the wire).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.ed25519.to_bytes()
    }

    /// The derived X25519 public key.
    pub fn x25519(&self) -> X25519Public {
        self.x25519
    }

    /// Verifies an Ed25519 signature by this identity.
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> Result<(), primitives::Error> {
        self.ed25519.verify(message, signature)
    }
}

impl From<Ed25519Public> for IdentityPublic {
    fn from(ed25519: Ed25519Public) -> Self {
        Self {
            x25519: ed25519.to_x25519(),
            ed25519,
        }
    }
}

impl std::fmt::Debug for IdentityPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "IdentityPublic({})",
            crate::hex_prefix(self.ed25519.as_bytes())
        )
    }
}

/// An identity key pair. Zeroized on drop; `Debug` never shows the secret.
#[derive(Clone)]
pub struct IdentityKeyPair {
    ed25519: Ed25519Secret,
    x25519: X25519Secret,
    public: IdentityPublic,
}

impl IdentityKeyPair {
    /// A fresh identity.
    pub fn generate(rng: &mut impl Rng) -> Self {
        Self::from_ed25519(Ed25519Secret::generate(rng))
    }

    /// The identity for a 32-byte Ed25519 seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self::from_ed25519(Ed25519Secret::from_seed(seed))
    }

    fn from_ed25519(ed25519: Ed25519Secret) -> Self {
        let x25519 = ed25519.to_x25519();
        let public = IdentityPublic::from(ed25519.public());
        Self {
            ed25519,
            x25519,
            public,
        }
    }

    /// The 32-byte seed, for persistence.
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        self.ed25519.to_seed()
    }

    /// The public identity.
    pub fn public(&self) -> &IdentityPublic {
        &self.public
    }

    /// The derived X25519 secret.
    pub fn x25519(&self) -> &X25519Secret {
        &self.x25519
    }

    /// Signs with the Ed25519 key.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.ed25519.sign(message)
    }
}

impl std::fmt::Debug for IdentityKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityKeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_x25519_secret_matches_derived_public() {
        for seed in [[1u8; 32], [0x7f; 32], [0xee; 32]] {
            let id = IdentityKeyPair::from_seed(&seed);
            assert_eq!(id.x25519().public(), id.public().x25519());
        }
    }

    #[test]
    fn signatures_verify_and_reject() {
        let id = IdentityKeyPair::from_seed(&[3u8; 32]);
        let sig = id.sign(b"msg");
        assert!(id.public().verify(b"msg", &sig).is_ok());
        assert!(id.public().verify(b"msh", &sig).is_err());
        let other = IdentityKeyPair::from_seed(&[4u8; 32]);
        assert!(other.public().verify(b"msg", &sig).is_err());
        assert!(!format!("{id:?}").contains("0303"));
    }
}
