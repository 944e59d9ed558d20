//! The one module that names the primitive crates.
//!
//! Everything else in this crate (and in the workspace) reaches X25519,
//! Ed25519, ML-KEM-768, AES-256-GCM, ChaCha20-Poly1305, ChaCha20, HKDF,
//! HMAC, SHA-2 and BLAKE3 through the small types and functions here, so a
//! primitive can be swapped or audited in one place.
//!
//! Secret types zeroize on drop and print as `<redacted>` in `Debug`.

use aes_gcm::aead::{AeadInOut, KeyInit};
use chacha20::cipher::{KeyIvInit, StreamCipher};
use ed25519_dalek::{Signer as _, Verifier as _};
use hmac::Mac as _;
use ml_kem::kem::{Decapsulate as _, Encapsulate as _, KeyExport as _};
use rand_core::CryptoRng;
use sha2::Digest as _;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub use rand_core::CryptoRng as Rng;

/// Length of X25519 public keys, secrets and shared secrets.
pub const X25519_LEN: usize = 32;
/// Length of an Ed25519 public key and of its 32-byte seed.
pub const ED25519_PUBLIC_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Length of an AEAD tag (AES-256-GCM and ChaCha20-Poly1305).
pub const TAG_LEN: usize = 16;
/// Length of an AES-256-GCM or ChaCha20-Poly1305 nonce.
pub const NONCE_LEN: usize = 12;
/// Length of an ML-KEM-768 encapsulation (public) key.
pub const MLKEM_PUBLIC_LEN: usize = 1184;
/// Length of an ML-KEM-768 ciphertext.
pub const MLKEM_CIPHERTEXT_LEN: usize = 1088;
/// Length of the ML-KEM-768 decapsulation key seed (d || z).
pub const MLKEM_SEED_LEN: usize = 64;

/// A primitive failed on the given input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// AEAD authentication failed: wrong key, wrong nonce or modified data.
    #[error("authentication failed")]
    Aead,
    /// A signature did not verify under the given key.
    #[error("signature verification failed")]
    BadSignature,
    /// The bytes are not a valid public key of the expected kind.
    #[error("invalid {0} public key")]
    InvalidKey(&'static str),
    /// An X25519 exchange produced the all-zero output (a low-order point).
    #[error("x25519 exchange with a low-order point")]
    NonContributory,
    /// An input had the wrong length.
    #[error("{what}: expected {expected} bytes, got {got}")]
    Length {
        /// What was being read.
        what: &'static str,
        /// The required length.
        expected: usize,
        /// The length given.
        got: usize,
    },
}

/// Fills `out` from `rng`.
pub fn fill_random(rng: &mut impl CryptoRng, out: &mut [u8]) {
    rng.fill_bytes(out);
}

/// Returns `N` random bytes.
pub fn random_array<const N: usize>(rng: &mut impl CryptoRng) -> [u8; N] {
    let mut out = [0u8; N];
    rng.fill_bytes(&mut out);
    out
}

/// Reads a fixed-size array from a slice, naming the field on error.
pub fn array<const N: usize>(what: &'static str, bytes: &[u8]) -> Result<[u8; N], Error> {
    <[u8; N]>::try_from(bytes).map_err(|_| Error::Length {
        what,
        expected: N,
        got: bytes.len(),
    })
}

/// Compares two byte strings in constant time (for equal lengths).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

// ---------------------------------------------------------------- X25519

/// An X25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct X25519Public(pub [u8; X25519_LEN]);

impl X25519Public {
    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; X25519_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for X25519Public {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "X25519Public({})", crate::hex_prefix(&self.0))
    }
}

/// An X25519 secret key. Zeroized on drop.
#[derive(Clone)]
pub struct X25519Secret(x25519_dalek::StaticSecret);

impl X25519Secret {
    /// A fresh random secret.
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        let mut bytes = Zeroizing::new([0u8; X25519_LEN]);
        rng.fill_bytes(bytes.as_mut());
        Self::from_bytes(*bytes)
    }

    /// A secret from 32 bytes (clamped when used, per RFC 7748).
    pub fn from_bytes(bytes: [u8; X25519_LEN]) -> Self {
        Self(x25519_dalek::StaticSecret::from(bytes))
    }

    /// The 32 secret bytes, for persistence. Handle with care.
    pub fn to_bytes(&self) -> Zeroizing<[u8; X25519_LEN]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The matching public key.
    pub fn public(&self) -> X25519Public {
        X25519Public(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    /// Diffie-Hellman with `their` key. Rejects low-order points whose output
    /// would be all zeros, so a peer cannot force a known shared secret.
    pub fn diffie_hellman(&self, their: &X25519Public) -> Result<SharedSecret, Error> {
        let shared = self
            .0
            .diffie_hellman(&x25519_dalek::PublicKey::from(their.0));
        if !shared.was_contributory() {
            return Err(Error::NonContributory);
        }
        Ok(SharedSecret(Zeroizing::new(shared.to_bytes())))
    }
}

impl std::fmt::Debug for X25519Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("X25519Secret(<redacted>)")
    }
}

/// The output of an X25519 exchange. Zeroized on drop.
pub struct SharedSecret(Zeroizing<[u8; X25519_LEN]>);

impl SharedSecret {
    /// The 32 shared bytes.
    pub fn as_bytes(&self) -> &[u8; X25519_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedSecret(<redacted>)")
    }
}

// ---------------------------------------------------------------- Ed25519

/// An Ed25519 public (verifying) key, checked to be a valid point.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Ed25519Public(ed25519_dalek::VerifyingKey);

impl Ed25519Public {
    /// Parses 32 bytes; rejects encodings that are not curve points.
    pub fn from_bytes(bytes: &[u8; ED25519_PUBLIC_LEN]) -> Result<Self, Error> {
        ed25519_dalek::VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|_| Error::InvalidKey("ed25519"))
    }

    /// The 32 bytes.
    pub fn to_bytes(&self) -> [u8; ED25519_PUBLIC_LEN] {
        self.0.to_bytes()
    }

    /// The 32 bytes, borrowed.
    pub fn as_bytes(&self) -> &[u8; ED25519_PUBLIC_LEN] {
        self.0.as_bytes()
    }

    /// Verifies `signature` over `message` (strict: rejects malleable and
    /// small-order forms).
    pub fn verify(&self, message: &[u8], signature: &[u8; SIGNATURE_LEN]) -> Result<(), Error> {
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        if self.0.is_weak() {
            return Err(Error::InvalidKey("ed25519 (weak)"));
        }
        self.0
            .verify_strict(message, &sig)
            .map_err(|_| Error::BadSignature)
    }

    /// Non-strict verification as RFC 8032 and most libraries accept it.
    /// Used only where a foreign signer must be accepted.
    pub fn verify_lenient(
        &self,
        message: &[u8],
        signature: &[u8; SIGNATURE_LEN],
    ) -> Result<(), Error> {
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        self.0
            .verify(message, &sig)
            .map_err(|_| Error::BadSignature)
    }

    /// The birationally equivalent X25519 public key (Edwards y to Montgomery u).
    pub fn to_x25519(&self) -> X25519Public {
        X25519Public(self.0.to_montgomery().to_bytes())
    }
}

impl std::hash::Hash for Ed25519Public {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl std::fmt::Debug for Ed25519Public {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ed25519Public({})", crate::hex_prefix(self.as_bytes()))
    }
}

/// An Ed25519 signing key. Zeroized on drop.
#[derive(Clone)]
pub struct Ed25519Secret(ed25519_dalek::SigningKey);

impl Ed25519Secret {
    /// A fresh random key.
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        Self::from_seed(&seed)
    }

    /// The key for a 32-byte seed (RFC 8032 private key).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(seed))
    }

    /// The 32-byte seed, for persistence. Handle with care.
    pub fn to_seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public key.
    pub fn public(&self) -> Ed25519Public {
        Ed25519Public(self.0.verifying_key())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.0.sign(message).to_bytes()
    }

    /// The X25519 secret that matches [`Ed25519Public::to_x25519`]: the first
    /// half of SHA-512(seed), clamped (as `toMontgomerySecret` in
    /// @noble/curves, which the reference SDK uses).
    pub fn to_x25519(&self) -> X25519Secret {
        let mut scalar = Zeroizing::new(self.0.to_scalar_bytes());
        scalar[0] &= 248;
        scalar[31] &= 127;
        scalar[31] |= 64;
        X25519Secret::from_bytes(*scalar)
    }
}

impl std::fmt::Debug for Ed25519Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ed25519Secret(<redacted>)")
    }
}

// ---------------------------------------------------------------- ML-KEM-768

/// An ML-KEM-768 encapsulation (public) key, validated on parse.
#[derive(Clone, PartialEq)]
pub struct MlKemPublic(Box<ml_kem::EncapsulationKey768>);

impl MlKemPublic {
    /// Parses the 1184-byte encoding (FIPS 203 modulus check included).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let arr = ml_kem::Key::<ml_kem::EncapsulationKey768>::try_from(bytes).map_err(|_| {
            Error::Length {
                what: "ML-KEM-768 public key",
                expected: MLKEM_PUBLIC_LEN,
                got: bytes.len(),
            }
        })?;
        ml_kem::EncapsulationKey768::new(&arr)
            .map(|k| Self(Box::new(k)))
            .map_err(|_| Error::InvalidKey("ML-KEM-768"))
    }

    /// The 1184-byte encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_bytes().to_vec()
    }

    /// Encapsulates a fresh shared secret to this key.
    pub fn encapsulate(&self, rng: &mut impl CryptoRng) -> (Vec<u8>, Zeroizing<[u8; 32]>) {
        let (ct, ss) = self.0.encapsulate_with_rng(rng);
        let mut shared = Zeroizing::new([0u8; 32]);
        shared.copy_from_slice(&ss);
        (ct.to_vec(), shared)
    }
}

impl std::fmt::Debug for MlKemPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes = self.to_bytes();
        write!(f, "MlKemPublic({})", crate::hex_prefix(&bytes))
    }
}

/// An ML-KEM-768 decapsulation key, kept as its 64-byte seed. Zeroized on drop.
#[derive(Clone)]
pub struct MlKemSecret {
    seed: Zeroizing<[u8; MLKEM_SEED_LEN]>,
    key: Box<ml_kem::DecapsulationKey768>,
}

impl MlKemSecret {
    /// A fresh random key pair.
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        let mut seed = Zeroizing::new([0u8; MLKEM_SEED_LEN]);
        rng.fill_bytes(seed.as_mut());
        Self::from_seed(&seed)
    }

    /// The key pair for a 64-byte seed (d || z, FIPS 203).
    pub fn from_seed(seed: &[u8; MLKEM_SEED_LEN]) -> Self {
        let s = ml_kem::Seed::from(*seed);
        Self {
            seed: Zeroizing::new(*seed),
            key: Box::new(ml_kem::DecapsulationKey768::from_seed(s)),
        }
    }

    /// The seed, for persistence. Handle with care.
    pub fn seed(&self) -> &[u8; MLKEM_SEED_LEN] {
        &self.seed
    }

    /// The public key.
    pub fn public(&self) -> MlKemPublic {
        MlKemPublic(Box::new(self.key.encapsulation_key().clone()))
    }

    /// Recovers the shared secret from a ciphertext. ML-KEM decapsulation
    /// never fails on a well-sized ciphertext (implicit rejection yields an
    /// unrelated secret), so only the length is checked here.
    pub fn decapsulate(&self, ciphertext: &[u8]) -> Result<Zeroizing<[u8; 32]>, Error> {
        let ss = self
            .key
            .decapsulate_slice(ciphertext)
            .map_err(|_| Error::Length {
                what: "ML-KEM-768 ciphertext",
                expected: MLKEM_CIPHERTEXT_LEN,
                got: ciphertext.len(),
            })?;
        let mut shared = Zeroizing::new([0u8; 32]);
        shared.copy_from_slice(&ss);
        Ok(shared)
    }
}

impl Drop for MlKemSecret {
    fn drop(&mut self) {
        // The expanded key zeroizes itself (ml-kem "zeroize" feature); the
        // seed is a Zeroizing buffer.
        self.seed.zeroize();
    }
}

impl ZeroizeOnDrop for MlKemSecret {}

impl std::fmt::Debug for MlKemSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MlKemSecret(<redacted>)")
    }
}

// ---------------------------------------------------------------- AEADs

/// AES-256-GCM: encrypts `plaintext` and returns `(ciphertext, tag)`.
pub fn aes256gcm_seal(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> (Vec<u8>, [u8; TAG_LEN]) {
    let cipher = aes_gcm::Aes256Gcm::new(&(*key).into());
    let mut buf = plaintext.to_vec();
    let tag = cipher
        .encrypt_inout_detached(&(*nonce).into(), aad, buf.as_mut_slice().into())
        .map(|t| {
            let mut out = [0u8; TAG_LEN];
            out.copy_from_slice(&t);
            out
        })
        .expect("AEAD sealing only fails above 64 GiB; every input here is bounded far below");
    (buf, tag)
}

/// AES-256-GCM: checks `tag` and decrypts `ciphertext`.
pub fn aes256gcm_open(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    ciphertext: &[u8],
    tag: &[u8; TAG_LEN],
) -> Result<Vec<u8>, Error> {
    let cipher = aes_gcm::Aes256Gcm::new(&(*key).into());
    let mut buf = ciphertext.to_vec();
    cipher
        .decrypt_inout_detached(
            &(*nonce).into(),
            aad,
            buf.as_mut_slice().into(),
            &(*tag).into(),
        )
        .map_err(|_| Error::Aead)?;
    Ok(buf)
}

/// ChaCha20-Poly1305: returns `ciphertext || tag`.
pub fn chacha20poly1305_seal(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let cipher = chacha20poly1305::ChaCha20Poly1305::new(&(*key).into());
    let mut buf = Vec::with_capacity(plaintext.len() + TAG_LEN);
    buf.extend_from_slice(plaintext);
    let tag = cipher
        .encrypt_inout_detached(&(*nonce).into(), aad, buf.as_mut_slice().into())
        .map(|t| {
            let mut out = [0u8; TAG_LEN];
            out.copy_from_slice(&t);
            out
        })
        .expect("AEAD sealing only fails above 64 GiB; every input here is bounded far below");
    buf.extend_from_slice(&tag);
    buf
}

/// ChaCha20-Poly1305: opens `ciphertext || tag`.
pub fn chacha20poly1305_open(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, Error> {
    if sealed.len() < TAG_LEN {
        return Err(Error::Aead);
    }
    let (ct, tag) = sealed.split_at(sealed.len() - TAG_LEN);
    let tag: [u8; TAG_LEN] = array("tag", tag)?;
    let cipher = chacha20poly1305::ChaCha20Poly1305::new(&(*key).into());
    let mut buf = ct.to_vec();
    cipher
        .decrypt_inout_detached(
            &(*nonce).into(),
            aad,
            buf.as_mut_slice().into(),
            &tag.into(),
        )
        .map_err(|_| Error::Aead)?;
    Ok(buf)
}

/// XORs the ChaCha20 keystream for `(key, nonce)` into `buf`, starting at
/// block 0. A pseudo-random generator for fixed-size onion headers.
pub fn chacha20_xor(key: &[u8; 32], nonce: &[u8; NONCE_LEN], buf: &mut [u8]) {
    let mut c = chacha20::ChaCha20::new(&(*key).into(), &(*nonce).into());
    c.apply_keystream(buf);
}

// ---------------------------------------------------------------- hashes and KDFs

/// HKDF-SHA256 (RFC 5869) into `out`. `salt = None` is the empty salt
/// (HMAC keyed with zeros). `out` may be at most 255 * 32 bytes; every
/// caller in this crate asks for far less.
pub fn hkdf_sha256(salt: Option<&[u8]>, ikm: &[u8], info: &[&[u8]], out: &mut [u8]) {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(salt, ikm);
    if hk.expand_multi_info(info, out).is_err() {
        // Only reachable for out.len() > 8160: make misuse obvious, not silent.
        out.fill(0);
    }
}

/// HMAC-SHA256.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut mac = match <hmac::Hmac<sha2::Sha256> as hmac::digest::KeyInit>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0u8; 32],
    };
    for p in parts {
        mac.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(&mac.finalize().into_bytes());
    out
}

/// SHA-256.
pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(&h.finalize());
    out
}

/// SHA-512.
pub fn sha512(parts: &[&[u8]]) -> [u8; 64] {
    let mut h = sha2::Sha512::new();
    for p in parts {
        h.update(p);
    }
    let mut out = [0u8; 64];
    out.copy_from_slice(&h.finalize());
    out
}

/// BLAKE3 over the concatenation of `parts`.
pub fn blake3(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p);
    }
    *h.finalize().as_bytes()
}

/// BLAKE3 keyed hash (a MAC) over the concatenation of `parts`.
pub fn blake3_keyed(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    for p in parts {
        h.update(p);
    }
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn x25519_agrees_and_rejects_low_order() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let a = X25519Secret::generate(&mut rng);
        let b = X25519Secret::generate(&mut rng);
        let ab = a.diffie_hellman(&b.public()).expect("dh");
        let ba = b.diffie_hellman(&a.public()).expect("dh");
        assert_eq!(ab.as_bytes(), ba.as_bytes());
        // The identity point (u = 0) is low order.
        assert_eq!(
            a.diffie_hellman(&X25519Public([0u8; 32])).map(|_| ()),
            Err(Error::NonContributory)
        );
    }

    #[test]
    fn aeads_round_trip_and_reject_tamper() {
        let key = [7u8; 32];
        let nonce = [9u8; 12];
        let (ct, tag) = aes256gcm_seal(&key, &nonce, b"ad", b"hello");
        assert_eq!(
            aes256gcm_open(&key, &nonce, b"ad", &ct, &tag).expect("open"),
            b"hello"
        );
        assert_eq!(
            aes256gcm_open(&key, &nonce, b"ax", &ct, &tag),
            Err(Error::Aead)
        );
        let sealed = chacha20poly1305_seal(&key, &nonce, b"ad", b"hello");
        assert_eq!(
            chacha20poly1305_open(&key, &nonce, b"ad", &sealed).expect("open"),
            b"hello"
        );
        let mut bad = sealed.clone();
        bad[0] ^= 1;
        assert_eq!(
            chacha20poly1305_open(&key, &nonce, b"ad", &bad),
            Err(Error::Aead)
        );
        assert_eq!(
            chacha20poly1305_open(&key, &nonce, b"ad", &sealed[..3]),
            Err(Error::Aead)
        );
    }

    #[test]
    fn mlkem_round_trip() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let sk = MlKemSecret::generate(&mut rng);
        let pk = MlKemPublic::from_bytes(&sk.public().to_bytes()).expect("pk");
        let (ct, ss) = pk.encapsulate(&mut rng);
        assert_eq!(ct.len(), MLKEM_CIPHERTEXT_LEN);
        assert_eq!(*sk.decapsulate(&ct).expect("decap"), *ss);
        assert!(sk.decapsulate(&ct[1..]).is_err());
        assert!(MlKemPublic::from_bytes(&[0xFF; MLKEM_PUBLIC_LEN]).is_err());
        let restored = MlKemSecret::from_seed(sk.seed());
        assert_eq!(restored.public(), sk.public());
    }

    #[test]
    fn rfc4231_hmac_and_rfc5869_hkdf() {
        // RFC 4231 test case 2.
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // RFC 5869 test case 1.
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0u8..=0x0c).collect();
        let info: Vec<u8> = (0xf0u8..=0xf9).collect();
        let mut okm = [0u8; 42];
        hkdf_sha256(Some(&salt), &ikm, &[&info], &mut okm);
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }
}
