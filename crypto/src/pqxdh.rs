//! First contact: PQXDH (Signal's Post-Quantum Extended Diffie-Hellman) with
//! X25519 and ML-KEM-768.
//!
//! The responder ("Bob") publishes a [`PrekeyBundle`]: his identity key, a
//! signed X25519 prekey and a signed ML-KEM-768 prekey, plus separately a
//! pool of unsigned X25519 one-time prekeys ([`OneTimePrekey`]). The
//! initiator ("Alice") verifies the bundle, then computes
//!
//! ```text
//! DH1 = DH(IK_A, SPK_B)   DH2 = DH(EK_A, IK_B)   DH3 = DH(EK_A, SPK_B)
//! DH4 = DH(EK_A, OPK_B)   (only with a one-time prekey)
//! (CT, SS) = ML-KEM-768.Encaps(PQSPK_B)
//! SK = HKDF-SHA256(salt = 32 zero bytes,
//!                  ikm  = 0xFF×32 ‖ DH1 ‖ DH2 ‖ DH3 [‖ DH4] ‖ SS,
//!                  info = "MeshWhisper_PQXDH_CURVE25519_SHA-256_ML-KEM-768", 32 bytes)
//! AD = IK_A ‖ IK_B        (Ed25519 identity keys, 64 bytes)
//! ```
//!
//! and sends an [`InitialMessage`] (her identity key, ephemeral key, the
//! prekey ids used and CT) with her first ratchet message. Identity keys are
//! Ed25519; their X25519 forms (see [`crate::identity`]) enter the DH
//! computations, and prekey signatures are plain Ed25519 over a
//! domain-separated encoding.
//!
//! Bundle encoding (big-endian):
//!
//! ```text
//! version (1) = 0x81 ‖ identity key (32)
//! ‖ signed prekey id (4) ‖ signed prekey (32) ‖ signature (64)
//! ‖ PQ prekey id (4) ‖ ML-KEM-768 key (1184) ‖ signature (64)
//! ```

use crate::identity::{IdentityKeyPair, IdentityPublic};
use crate::primitives::{self, MlKemPublic, MlKemSecret, Rng, X25519Public, X25519Secret};
use crate::wire::{DecodeError, Reader, Writer as _};
use zeroize::Zeroizing;

/// Bundle encoding version. Distinct from the reference SDK's bundle
/// versions (0x01, 0x02) so relays can tell them apart.
pub const BUNDLE_VERSION: u8 = 0x81;
/// Initial message encoding version.
pub const INITIAL_VERSION: u8 = 0x01;
/// HKDF info: names every parameter of the agreement.
pub const INFO: &[u8] = b"MeshWhisper_PQXDH_CURVE25519_SHA-256_ML-KEM-768";
/// Signature domain of signed X25519 prekeys.
pub const SPK_DOMAIN: &[u8] = b"meshwhisper/pqxdh/signed-prekey/v1\0";
/// Signature domain of signed ML-KEM prekeys.
pub const PQSPK_DOMAIN: &[u8] = b"meshwhisper/pqxdh/pq-prekey/v1\0";
/// Signature domain of one-time prekey batches.
pub const OPK_BATCH_DOMAIN: &[u8] = b"meshwhisper/pqxdh/one-time-prekeys/v1\0";
/// Encoded bundle length.
pub const BUNDLE_LEN: usize = 1 + 32 + 4 + 32 + 64 + 4 + primitives::MLKEM_PUBLIC_LEN + 64;
/// Encoded one-time prekey length.
pub const ONE_TIME_PREKEY_LEN: usize = 4 + 32;
/// Longest encoded initial message.
pub const MAX_INITIAL_LEN: usize = 1 + 32 + 32 + 4 + 4 + 1 + 4 + primitives::MLKEM_CIPHERTEXT_LEN;

/// Why an agreement failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Malformed bundle, prekey or initial message.
    #[error("malformed PQXDH data: {0}")]
    Malformed(#[from] DecodeError),
    /// A key in the data is not a valid public key.
    #[error("invalid {0} key")]
    BadKey(&'static str),
    /// A prekey signature does not verify under the bundle's identity.
    #[error("{0} signature is invalid")]
    BadSignature(&'static str),
    /// The responder no longer holds a prekey the initiator used.
    #[error("unknown {0} id {1}")]
    UnknownPrekey(&'static str, u32),
}

/// A one-time X25519 prekey, as uploaded to the directory's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OneTimePrekey {
    /// Its id, chosen by the owner.
    pub id: u32,
    /// The public key.
    pub key: X25519Public,
}

impl OneTimePrekey {
    /// `id (4) ‖ key (32)`.
    pub fn encode(&self) -> [u8; ONE_TIME_PREKEY_LEN] {
        let mut out = [0u8; ONE_TIME_PREKEY_LEN];
        out[..4].copy_from_slice(&self.id.to_be_bytes());
        out[4..].copy_from_slice(self.key.as_bytes());
        out
    }

    /// Parses [`OneTimePrekey::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let id = r.u32("one-time prekey id")?;
        let key = X25519Public(r.array("one-time prekey")?);
        r.finish()?;
        Ok(Self { id, key })
    }
}

fn opk_batch_message(namespace: &[u8], keys: &[OneTimePrekey]) -> Vec<u8> {
    let mut m = Vec::with_capacity(OPK_BATCH_DOMAIN.len() + 2 + namespace.len() + 36 * keys.len());
    m.extend_from_slice(OPK_BATCH_DOMAIN);
    m.push(namespace.len().min(255) as u8);
    m.extend_from_slice(namespace);
    for k in keys {
        m.extend_from_slice(&k.encode());
    }
    m
}

/// Signs a batch of one-time prekeys for upload to `namespace`'s pool, so a
/// directory can refuse keys their owner did not make (the reference
/// directory accepts anyone's, which lets a stranger poison a pool).
pub fn sign_one_time_prekeys(
    identity: &IdentityKeyPair,
    namespace: &[u8],
    keys: &[OneTimePrekey],
) -> [u8; 64] {
    identity.sign(&opk_batch_message(namespace, keys))
}

/// Checks [`sign_one_time_prekeys`]'s signature.
pub fn verify_one_time_prekeys(
    identity: &IdentityPublic,
    namespace: &[u8],
    keys: &[OneTimePrekey],
    signature: &[u8; 64],
) -> Result<(), Error> {
    if namespace.len() > 255 {
        return Err(DecodeError::TooLarge {
            what: "namespace",
            got: namespace.len(),
            max: 255,
        }
        .into());
    }
    identity
        .verify(&opk_batch_message(namespace, keys), signature)
        .map_err(|_| Error::BadSignature("one-time prekey batch"))
}

/// A responder's verified prekey bundle. Values exist only with valid
/// signatures: [`PrekeyBundle::sign`] makes one, [`PrekeyBundle::decode`]
/// checks one.
#[derive(Debug, Clone, PartialEq)]
pub struct PrekeyBundle {
    identity: IdentityPublic,
    signed_prekey_id: u32,
    signed_prekey: X25519Public,
    signed_prekey_signature: [u8; 64],
    pq_prekey_id: u32,
    pq_prekey: MlKemPublic,
    pq_prekey_signature: [u8; 64],
}

fn spk_message(id: u32, key: &X25519Public) -> Vec<u8> {
    let mut m = Vec::with_capacity(SPK_DOMAIN.len() + 36);
    m.extend_from_slice(SPK_DOMAIN);
    m.put_u32(id);
    m.extend_from_slice(key.as_bytes());
    m
}

fn pqspk_message(id: u32, key: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(PQSPK_DOMAIN.len() + 4 + key.len());
    m.extend_from_slice(PQSPK_DOMAIN);
    m.put_u32(id);
    m.extend_from_slice(key);
    m
}

impl PrekeyBundle {
    /// Signs a bundle for `identity`'s prekeys.
    pub fn sign(
        identity: &IdentityKeyPair,
        signed_prekey_id: u32,
        signed_prekey: &X25519Public,
        pq_prekey_id: u32,
        pq_prekey: &MlKemPublic,
    ) -> Self {
        let pq_bytes = pq_prekey.to_bytes();
        Self {
            identity: *identity.public(),
            signed_prekey_id,
            signed_prekey: *signed_prekey,
            signed_prekey_signature: identity.sign(&spk_message(signed_prekey_id, signed_prekey)),
            pq_prekey_id,
            pq_prekey: pq_prekey.clone(),
            pq_prekey_signature: identity.sign(&pqspk_message(pq_prekey_id, &pq_bytes)),
        }
    }

    /// Parses a bundle and verifies both prekey signatures. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() != BUNDLE_LEN {
            return Err(DecodeError::Invalid {
                what: "bundle",
                why: "wrong length",
            }
            .into());
        }
        let mut r = Reader::new(bytes);
        if r.u8("version")? != BUNDLE_VERSION {
            return Err(DecodeError::Invalid {
                what: "bundle version",
                why: "not a MeshWhisper PQXDH bundle",
            }
            .into());
        }
        let identity = IdentityPublic::from_bytes(&r.array("identity key")?)
            .map_err(|_| Error::BadKey("identity"))?;
        let signed_prekey_id = r.u32("signed prekey id")?;
        let signed_prekey = X25519Public(r.array("signed prekey")?);
        let signed_prekey_signature: [u8; 64] = r.array("signed prekey signature")?;
        let pq_prekey_id = r.u32("PQ prekey id")?;
        let pq_bytes = r.take("PQ prekey", primitives::MLKEM_PUBLIC_LEN)?;
        let pq_prekey_signature: [u8; 64] = r.array("PQ prekey signature")?;
        r.finish()?;
        identity
            .verify(
                &spk_message(signed_prekey_id, &signed_prekey),
                &signed_prekey_signature,
            )
            .map_err(|_| Error::BadSignature("signed prekey"))?;
        identity
            .verify(&pqspk_message(pq_prekey_id, pq_bytes), &pq_prekey_signature)
            .map_err(|_| Error::BadSignature("PQ prekey"))?;
        let pq_prekey = MlKemPublic::from_bytes(pq_bytes).map_err(|_| Error::BadKey("ML-KEM"))?;
        Ok(Self {
            identity,
            signed_prekey_id,
            signed_prekey,
            signed_prekey_signature,
            pq_prekey_id,
            pq_prekey,
            pq_prekey_signature,
        })
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(BUNDLE_LEN);
        out.push(BUNDLE_VERSION);
        out.extend_from_slice(&self.identity.to_bytes());
        out.put_u32(self.signed_prekey_id);
        out.extend_from_slice(self.signed_prekey.as_bytes());
        out.extend_from_slice(&self.signed_prekey_signature);
        out.put_u32(self.pq_prekey_id);
        out.extend_from_slice(&self.pq_prekey.to_bytes());
        out.extend_from_slice(&self.pq_prekey_signature);
        out
    }

    /// The responder's identity.
    pub fn identity(&self) -> &IdentityPublic {
        &self.identity
    }

    /// The signed X25519 prekey and its id.
    pub fn signed_prekey(&self) -> (u32, X25519Public) {
        (self.signed_prekey_id, self.signed_prekey)
    }

    /// The ML-KEM prekey id.
    pub fn pq_prekey_id(&self) -> u32 {
        self.pq_prekey_id
    }
}

/// What the initiator sends so the responder can complete the agreement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialMessage {
    /// The initiator's identity.
    pub identity: IdentityPublic,
    /// The initiator's ephemeral X25519 key.
    pub ephemeral: X25519Public,
    /// Which signed prekey was used.
    pub signed_prekey_id: u32,
    /// Which ML-KEM prekey was used.
    pub pq_prekey_id: u32,
    /// Which one-time prekey was used, if any.
    pub one_time_prekey_id: Option<u32>,
    /// The ML-KEM-768 ciphertext.
    pub pq_ciphertext: Vec<u8>,
}

impl InitialMessage {
    /// `version ‖ identity ‖ ephemeral ‖ spk id ‖ pq id ‖ opk flag [‖ opk id] ‖ ciphertext`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_INITIAL_LEN);
        out.push(INITIAL_VERSION);
        out.extend_from_slice(&self.identity.to_bytes());
        out.extend_from_slice(self.ephemeral.as_bytes());
        out.put_u32(self.signed_prekey_id);
        out.put_u32(self.pq_prekey_id);
        match self.one_time_prekey_id {
            Some(id) => {
                out.push(1);
                out.put_u32(id);
            }
            None => out.push(0),
        }
        out.extend_from_slice(&self.pq_ciphertext);
        out
    }

    /// Parses an initial message. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() > MAX_INITIAL_LEN {
            return Err(DecodeError::TooLarge {
                what: "initial message",
                got: bytes.len(),
                max: MAX_INITIAL_LEN,
            }
            .into());
        }
        let mut r = Reader::new(bytes);
        if r.u8("version")? != INITIAL_VERSION {
            return Err(DecodeError::Invalid {
                what: "initial message version",
                why: "unknown",
            }
            .into());
        }
        let identity = IdentityPublic::from_bytes(&r.array("identity key")?)
            .map_err(|_| Error::BadKey("identity"))?;
        let ephemeral = X25519Public(r.array("ephemeral key")?);
        let signed_prekey_id = r.u32("signed prekey id")?;
        let pq_prekey_id = r.u32("PQ prekey id")?;
        let one_time_prekey_id = match r.u8("one-time prekey flag")? {
            0 => None,
            1 => Some(r.u32("one-time prekey id")?),
            _ => {
                return Err(DecodeError::Invalid {
                    what: "one-time prekey flag",
                    why: "must be 0 or 1",
                }
                .into());
            }
        };
        let pq_ciphertext = r
            .take("PQ ciphertext", primitives::MLKEM_CIPHERTEXT_LEN)?
            .to_vec();
        r.finish()?;
        Ok(Self {
            identity,
            ephemeral,
            signed_prekey_id,
            pq_prekey_id,
            one_time_prekey_id,
            pq_ciphertext,
        })
    }
}

/// The result of an agreement, on either side.
pub struct Agreement {
    /// The 32-byte shared secret that seeds the Double Ratchet.
    pub shared_key: Zeroizing<[u8; 32]>,
    /// IK_A ‖ IK_B: associated data for every ratchet message.
    pub associated_data: Vec<u8>,
}

impl std::fmt::Debug for Agreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Agreement(<redacted>)")
    }
}

fn derive(
    dh: &[&primitives::SharedSecret],
    pq_shared: &[u8; 32],
    initiator: &IdentityPublic,
    responder: &IdentityPublic,
) -> Agreement {
    let mut ikm = Zeroizing::new(Vec::with_capacity(32 * 6));
    ikm.extend_from_slice(&[0xFF; 32]);
    for d in dh {
        ikm.extend_from_slice(d.as_bytes());
    }
    ikm.extend_from_slice(pq_shared);
    let mut shared_key = Zeroizing::new([0u8; 32]);
    primitives::hkdf_sha256(Some(&[0u8; 32]), &ikm, &[INFO], shared_key.as_mut());
    let mut associated_data = Vec::with_capacity(64);
    associated_data.extend_from_slice(&initiator.to_bytes());
    associated_data.extend_from_slice(&responder.to_bytes());
    Agreement {
        shared_key,
        associated_data,
    }
}

fn dh(
    secret: &X25519Secret,
    public: &X25519Public,
    what: &'static str,
) -> Result<primitives::SharedSecret, Error> {
    secret
        .diffie_hellman(public)
        .map_err(|_| Error::BadKey(what))
}

/// The initiator's side: agrees on a key with the owner of `bundle`.
pub fn initiate(
    rng: &mut impl Rng,
    identity: &IdentityKeyPair,
    bundle: &PrekeyBundle,
    one_time_prekey: Option<&OneTimePrekey>,
) -> Result<(Agreement, InitialMessage), Error> {
    let ek = X25519Secret::generate(rng);
    let ik_b = bundle.identity.x25519();
    let dh1 = dh(identity.x25519(), &bundle.signed_prekey, "signed prekey")?;
    let dh2 = dh(&ek, &ik_b, "identity")?;
    let dh3 = dh(&ek, &bundle.signed_prekey, "signed prekey")?;
    let dh4 = one_time_prekey
        .map(|opk| dh(&ek, &opk.key, "one-time prekey"))
        .transpose()?;
    let (ct, ss) = bundle.pq_prekey.encapsulate(rng);
    let mut dhs = vec![&dh1, &dh2, &dh3];
    if let Some(d) = dh4.as_ref() {
        dhs.push(d);
    }
    let agreement = derive(&dhs, &ss, identity.public(), &bundle.identity);
    let message = InitialMessage {
        identity: *identity.public(),
        ephemeral: ek.public(),
        signed_prekey_id: bundle.signed_prekey_id,
        pq_prekey_id: bundle.pq_prekey_id,
        one_time_prekey_id: one_time_prekey.map(|o| o.id),
        pq_ciphertext: ct,
    };
    Ok((agreement, message))
}

/// Where the responder's prekey secrets live. A narrow read-only view: the
/// caller deletes a used one-time prekey once the session is established.
pub trait PrekeyStore {
    /// The signed X25519 prekey with `id`.
    fn signed_prekey(&self, id: u32) -> Option<X25519Secret>;
    /// The ML-KEM prekey with `id`.
    fn pq_prekey(&self, id: u32) -> Option<MlKemSecret>;
    /// The one-time prekey with `id`, if still unused.
    fn one_time_prekey(&self, id: u32) -> Option<X25519Secret>;
}

/// The responder's side: completes the agreement from `message`.
pub fn respond(
    identity: &IdentityKeyPair,
    store: &impl PrekeyStore,
    message: &InitialMessage,
) -> Result<Agreement, Error> {
    let spk = store
        .signed_prekey(message.signed_prekey_id)
        .ok_or(Error::UnknownPrekey(
            "signed prekey",
            message.signed_prekey_id,
        ))?;
    let pq = store
        .pq_prekey(message.pq_prekey_id)
        .ok_or(Error::UnknownPrekey("PQ prekey", message.pq_prekey_id))?;
    let opk = message
        .one_time_prekey_id
        .map(|id| {
            store
                .one_time_prekey(id)
                .ok_or(Error::UnknownPrekey("one-time prekey", id))
        })
        .transpose()?;
    let ik_a = message.identity.x25519();
    let dh1 = dh(&spk, &ik_a, "identity")?;
    let dh2 = dh(identity.x25519(), &message.ephemeral, "ephemeral")?;
    let dh3 = dh(&spk, &message.ephemeral, "ephemeral")?;
    let dh4 = opk
        .as_ref()
        .map(|k| dh(k, &message.ephemeral, "ephemeral"))
        .transpose()?;
    let ss = pq
        .decapsulate(&message.pq_ciphertext)
        .map_err(|_| Error::BadKey("ML-KEM ciphertext"))?;
    let mut dhs = vec![&dh1, &dh2, &dh3];
    if let Some(d) = dh4.as_ref() {
        dhs.push(d);
    }
    Ok(derive(&dhs, &ss, &message.identity, identity.public()))
}

/// An in-memory [`PrekeyStore`] for tests, tools and benchmarks.
#[derive(Debug, Default, Clone)]
pub struct MemoryPrekeyStore {
    /// Signed prekeys by id.
    pub signed: Vec<(u32, X25519Secret)>,
    /// ML-KEM prekeys by id.
    pub pq: Vec<(u32, MlKemSecret)>,
    /// One-time prekeys by id.
    pub one_time: Vec<(u32, X25519Secret)>,
}

impl PrekeyStore for MemoryPrekeyStore {
    fn signed_prekey(&self, id: u32) -> Option<X25519Secret> {
        self.signed
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, k)| k.clone())
    }
    fn pq_prekey(&self, id: u32) -> Option<MlKemSecret> {
        self.pq
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, k)| k.clone())
    }
    fn one_time_prekey(&self, id: u32) -> Option<X25519Secret> {
        self.one_time
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, k)| k.clone())
    }
}
