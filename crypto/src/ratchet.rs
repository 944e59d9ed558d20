//! The Double Ratchet (Signal's specification, revision 4) with AEAD
//! message keys.
//!
//! - Root KDF: HKDF-SHA256 with the root key as salt, the DH output as input
//!   and info [`INFO_ROOT`]; 64 bytes become the new root key and a chain key.
//! - Chain KDF: HMAC-SHA256(chain key, 0x01) is the message key,
//!   HMAC-SHA256(chain key, 0x02) the next chain key.
//! - Message keys: HKDF-SHA256 (no salt, info [`INFO_MESSAGE`]) expands a
//!   message key to a ChaCha20-Poly1305 key and nonce. The associated data is
//!   the session's (from PQXDH) followed by the message version and header.
//!
//! Messages may arrive out of order: keys of skipped messages are kept, at
//! most [`MAX_SKIPPED_PER_CHAIN`] per receiving chain (oldest dropped) for at
//! most [`MAX_RECEIVING_CHAINS`] chains, and one message may skip at most
//! [`MAX_SKIP_STEP`] keys. These match libsignal's bounds. A message beyond
//! them is refused with an error; nothing panics.
//!
//! Decryption is transactional: when it fails, the session is unchanged.
//! Callers persist [`Session::to_bytes`] after every successful step, so a
//! crash never reuses a message key.
//!
//! ```text
//! message = version (1) = 0x01 ‖ ratchet key (32) ‖ previous chain length (4) ‖ n (4) ‖ ciphertext ‖ tag (16)
//! ```

use crate::primitives::{self, Rng, X25519Public, X25519Secret};
use crate::wire::{DecodeError, Reader, Writer as _};
use std::collections::VecDeque;
use zeroize::{Zeroize, Zeroizing};

/// Message format version.
pub const MESSAGE_VERSION: u8 = 1;
/// State encoding version.
pub const STATE_VERSION: u8 = 1;
/// Bytes of a message before its ciphertext.
pub const HEADER_LEN: usize = 1 + 32 + 4 + 4;
/// The largest ratchet message accepted.
pub const MAX_MESSAGE_LEN: usize = 512 * 1024;
/// Skipped message keys kept per receiving chain.
pub const MAX_SKIPPED_PER_CHAIN: usize = 2_000;
/// Receiving chains whose skipped keys are kept.
pub const MAX_RECEIVING_CHAINS: usize = 5;
/// Most message keys one incoming message may make us skip.
pub const MAX_SKIP_STEP: u32 = 25_000;
/// Longest associated data a session carries.
pub const MAX_AD_LEN: usize = 256;
/// Root KDF info.
pub const INFO_ROOT: &[u8] = b"MeshWhisper_DoubleRatchet_Root_v1";
/// Message key expansion info.
pub const INFO_MESSAGE: &[u8] = b"MeshWhisper_DoubleRatchet_MessageKeys_v1";

/// Why a ratchet operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The message or state bytes are malformed.
    #[error("malformed ratchet data: {0}")]
    Malformed(#[from] DecodeError),
    /// The message did not authenticate (wrong session, tampered, or a key
    /// already used).
    #[error("ratchet message failed to decrypt")]
    Decrypt,
    /// The message is a duplicate, or its key was dropped under the skip
    /// bounds.
    #[error("ratchet message is a duplicate or its key has been discarded")]
    DuplicateOrExpired,
    /// The message would skip more than [`MAX_SKIP_STEP`] keys.
    #[error("ratchet message skips {skip} keys, more than {MAX_SKIP_STEP}")]
    TooManySkipped {
        /// How many keys it would skip.
        skip: u64,
    },
    /// This side cannot send yet (the responder must receive first).
    #[error("no sending chain yet: receive a message first")]
    NoSendingChain,
    /// The message counter would overflow.
    #[error("message counter exhausted")]
    CounterExhausted,
    /// The peer's ratchet key is a low-order point.
    #[error("peer ratchet key is invalid")]
    BadRatchetKey,
}

impl Error {
    /// A short stable label, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Malformed(_) => "malformed",
            Error::Decrypt => "decrypt",
            Error::DuplicateOrExpired => "duplicate",
            Error::TooManySkipped { .. } => "too_many_skipped",
            Error::NoSendingChain => "no_sending_chain",
            Error::CounterExhausted => "counter_exhausted",
            Error::BadRatchetKey => "bad_ratchet_key",
        }
    }
}

/// A parsed message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The sender's current ratchet public key.
    pub ratchet_key: X25519Public,
    /// Length of the sender's previous sending chain.
    pub previous_chain_len: u32,
    /// This message's number in its chain.
    pub n: u32,
}

/// A ratchet message, split into header and sealed body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    /// The header.
    pub header: Header,
    /// The bytes the header occupies, for the AEAD associated data.
    header_bytes: &'a [u8],
    /// Ciphertext and tag.
    pub sealed: &'a [u8],
}

impl<'a> Message<'a> {
    /// Parses a message. Never panics.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_MESSAGE_LEN {
            return Err(DecodeError::TooLarge {
                what: "ratchet message",
                got: bytes.len(),
                max: MAX_MESSAGE_LEN,
            });
        }
        let mut r = Reader::new(bytes);
        if r.u8("version")? != MESSAGE_VERSION {
            return Err(DecodeError::Invalid {
                what: "version",
                why: "unknown ratchet message version",
            });
        }
        let ratchet_key = X25519Public(r.array("ratchet key")?);
        let previous_chain_len = r.u32("previous chain length")?;
        let n = r.u32("message number")?;
        let sealed = r.rest();
        if sealed.len() < primitives::TAG_LEN {
            return Err(DecodeError::Truncated {
                what: "tag",
                needed: primitives::TAG_LEN - sealed.len(),
            });
        }
        Ok(Self {
            header: Header {
                ratchet_key,
                previous_chain_len,
                n,
            },
            header_bytes: &bytes[..HEADER_LEN],
            sealed,
        })
    }
}

type Key = Zeroizing<[u8; 32]>;

fn key(bytes: [u8; 32]) -> Key {
    Zeroizing::new(bytes)
}

fn kdf_root(root: &[u8; 32], dh_out: &[u8; 32]) -> (Key, Key) {
    let mut okm = Zeroizing::new([0u8; 64]);
    primitives::hkdf_sha256(Some(root), dh_out, &[INFO_ROOT], okm.as_mut());
    let mut rk = key([0u8; 32]);
    let mut ck = key([0u8; 32]);
    rk.copy_from_slice(&okm[..32]);
    ck.copy_from_slice(&okm[32..]);
    (rk, ck)
}

fn kdf_chain(ck: &[u8; 32]) -> (Key, Key) {
    let mk = key(primitives::hmac_sha256(ck, &[&[0x01]]));
    let next = key(primitives::hmac_sha256(ck, &[&[0x02]]));
    (next, mk)
}

fn message_cipher(mk: &[u8; 32]) -> (Key, [u8; 12]) {
    let mut okm = Zeroizing::new([0u8; 44]);
    primitives::hkdf_sha256(None, mk, &[INFO_MESSAGE], okm.as_mut());
    let mut k = key([0u8; 32]);
    k.copy_from_slice(&okm[..32]);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&okm[32..]);
    (k, nonce)
}

fn aad(session_ad: &[u8], header_bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(session_ad.len() + header_bytes.len());
    v.extend_from_slice(session_ad);
    v.extend_from_slice(header_bytes);
    v
}

/// Skipped message keys of one receiving chain.
#[derive(Clone)]
struct SkippedChain {
    ratchet_key: X25519Public,
    keys: VecDeque<(u32, Key)>,
}

/// One side of a Double Ratchet session. Zeroized on drop; `Debug` shows
/// only counters.
#[derive(Clone)]
pub struct Session {
    dhs: X25519Secret,
    /// `dhs`'s public key, cached: deriving it is a scalar multiplication.
    dhs_public: X25519Public,
    dhr: Option<X25519Public>,
    root: Key,
    cks: Option<Key>,
    ckr: Option<Key>,
    ns: u32,
    nr: u32,
    pn: u32,
    ad: Vec<u8>,
    skipped: VecDeque<SkippedChain>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("sent", &self.ns)
            .field("received", &self.nr)
            .field("skipped_keys", &self.skipped_key_count())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// The initiator's side: `shared_key` from PQXDH, the responder's signed
    /// prekey as its first ratchet key, and the PQXDH associated data.
    pub fn initiator(
        rng: &mut impl Rng,
        shared_key: &[u8; 32],
        responder_ratchet_key: &X25519Public,
        associated_data: &[u8],
    ) -> Result<Self, Error> {
        check_ad(associated_data)?;
        let dhs = X25519Secret::generate(rng);
        let dh = dhs
            .diffie_hellman(responder_ratchet_key)
            .map_err(|_| Error::BadRatchetKey)?;
        let (root, cks) = kdf_root(shared_key, dh.as_bytes());
        Ok(Self {
            dhs_public: dhs.public(),
            dhs,
            dhr: Some(*responder_ratchet_key),
            root,
            cks: Some(cks),
            ckr: None,
            ns: 0,
            nr: 0,
            pn: 0,
            ad: associated_data.to_vec(),
            skipped: VecDeque::new(),
        })
    }

    /// The responder's side: `shared_key` from PQXDH and the signed prekey
    /// pair the initiator used. It can send once it has received.
    pub fn responder(
        shared_key: &[u8; 32],
        signed_prekey: X25519Secret,
        associated_data: &[u8],
    ) -> Result<Self, Error> {
        check_ad(associated_data)?;
        Ok(Self {
            dhs_public: signed_prekey.public(),
            dhs: signed_prekey,
            dhr: None,
            root: key(*shared_key),
            cks: None,
            ckr: None,
            ns: 0,
            nr: 0,
            pn: 0,
            ad: associated_data.to_vec(),
            skipped: VecDeque::new(),
        })
    }

    /// Whether this side can send.
    pub fn can_send(&self) -> bool {
        self.cks.is_some()
    }

    /// This side's current ratchet public key.
    pub fn ratchet_key(&self) -> X25519Public {
        self.dhs_public
    }

    /// Number of stored skipped-message keys.
    pub fn skipped_key_count(&self) -> usize {
        self.skipped.iter().map(|c| c.keys.len()).sum()
    }

    /// Encrypts `plaintext` as the next message.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        let cks = self.cks.as_ref().ok_or(Error::NoSendingChain)?;
        if self.ns == u32::MAX {
            return Err(Error::CounterExhausted);
        }
        let max_plain = MAX_MESSAGE_LEN - HEADER_LEN - primitives::TAG_LEN;
        if plaintext.len() > max_plain {
            return Err(DecodeError::TooLarge {
                what: "ratchet plaintext",
                got: plaintext.len(),
                max: max_plain,
            }
            .into());
        }
        let (next, mk) = kdf_chain(cks);
        let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + primitives::TAG_LEN);
        out.push(MESSAGE_VERSION);
        out.extend_from_slice(self.dhs_public.as_bytes());
        out.put_u32(self.pn);
        out.put_u32(self.ns);
        let (k, nonce) = message_cipher(&mk);
        let sealed = primitives::chacha20poly1305_seal(&k, &nonce, &aad(&self.ad, &out), plaintext);
        out.extend_from_slice(&sealed);
        self.cks = Some(next);
        self.ns += 1;
        Ok(out)
    }

    /// Decrypts a message. On any error the session is left unchanged.
    pub fn decrypt(&mut self, rng: &mut impl Rng, message: &[u8]) -> Result<Vec<u8>, Error> {
        let msg = Message::decode(message)?;
        let h = msg.header;
        let aad = aad(&self.ad, msg.header_bytes);

        if let Some((ci, ki)) = self.find_skipped(&h.ratchet_key, h.n) {
            let (k, nonce) = message_cipher(&self.skipped[ci].keys[ki].1);
            let plain = primitives::chacha20poly1305_open(&k, &nonce, &aad, msg.sealed)
                .map_err(|_| Error::Decrypt)?;
            self.skipped[ci].keys.remove(ki);
            if self.skipped[ci].keys.is_empty() {
                self.skipped.remove(ci);
            }
            return Ok(plain);
        }

        // Work on a copy of the chain state; commit only on success.
        let mut next = Pending {
            dhs: None,
            dhr: self.dhr,
            root: self.root.clone(),
            cks: self.cks.clone(),
            ckr: self.ckr.clone(),
            ns: self.ns,
            nr: self.nr,
            pn: self.pn,
            skipped: Vec::new(),
        };

        if Some(h.ratchet_key) != self.dhr {
            if let (Some(dhr), Some(_)) = (next.dhr, next.ckr.as_ref()) {
                next.skip_until(dhr, h.previous_chain_len)?;
            }
            // DH ratchet step.
            next.pn = next.ns;
            next.ns = 0;
            next.nr = 0;
            next.dhr = Some(h.ratchet_key);
            let dh = self
                .dhs
                .diffie_hellman(&h.ratchet_key)
                .map_err(|_| Error::BadRatchetKey)?;
            let (root, ckr) = kdf_root(&next.root, dh.as_bytes());
            let dhs = X25519Secret::generate(rng);
            let dh = dhs
                .diffie_hellman(&h.ratchet_key)
                .map_err(|_| Error::BadRatchetKey)?;
            let (root, cks) = kdf_root(&root, dh.as_bytes());
            next.root = root;
            next.ckr = Some(ckr);
            next.cks = Some(cks);
            next.dhs = Some(dhs);
        } else if h.n < next.nr {
            return Err(Error::DuplicateOrExpired);
        }
        next.skip_until(h.ratchet_key, h.n)?;
        let ckr = next.ckr.as_ref().ok_or(Error::DuplicateOrExpired)?;
        let (ck, mk) = kdf_chain(ckr);
        let (k, nonce) = message_cipher(&mk);
        let plain = primitives::chacha20poly1305_open(&k, &nonce, &aad, msg.sealed)
            .map_err(|_| Error::Decrypt)?;
        next.ckr = Some(ck);
        next.nr = h.n.checked_add(1).ok_or(Error::CounterExhausted)?;
        self.commit(next);
        Ok(plain)
    }

    fn find_skipped(&self, ratchet_key: &X25519Public, n: u32) -> Option<(usize, usize)> {
        self.skipped.iter().enumerate().find_map(|(ci, c)| {
            if &c.ratchet_key != ratchet_key {
                return None;
            }
            c.keys
                .iter()
                .position(|(kn, _)| *kn == n)
                .map(|ki| (ci, ki))
        })
    }

    fn commit(&mut self, next: Pending) {
        if let Some(dhs) = next.dhs {
            self.dhs_public = dhs.public();
            self.dhs = dhs;
        }
        self.dhr = next.dhr;
        self.root = next.root;
        self.cks = next.cks;
        self.ckr = next.ckr;
        self.ns = next.ns;
        self.nr = next.nr;
        self.pn = next.pn;
        for (rk, n, mk) in next.skipped {
            let idx = match self.skipped.iter().position(|c| c.ratchet_key == rk) {
                Some(i) => i,
                None => {
                    if self.skipped.len() >= MAX_RECEIVING_CHAINS {
                        self.skipped.pop_front();
                    }
                    self.skipped.push_back(SkippedChain {
                        ratchet_key: rk,
                        keys: VecDeque::new(),
                    });
                    self.skipped.len() - 1
                }
            };
            let chain = &mut self.skipped[idx];
            if chain.keys.len() >= MAX_SKIPPED_PER_CHAIN {
                chain.keys.pop_front();
            }
            chain.keys.push_back((n, mk));
        }
    }

    /// Serializes the whole session (secrets included) for persistence.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(256));
        out.push(STATE_VERSION);
        out.extend_from_slice(self.dhs.to_bytes().as_ref());
        put_opt(&mut out, self.dhr.as_ref().map(|k| k.as_bytes()));
        out.extend_from_slice(self.root.as_ref());
        put_opt(&mut out, self.cks.as_deref());
        put_opt(&mut out, self.ckr.as_deref());
        out.put_u32(self.ns);
        out.put_u32(self.nr);
        out.put_u32(self.pn);
        // Bounded by MAX_AD_LEN, MAX_RECEIVING_CHAINS, MAX_SKIPPED_PER_CHAIN.
        out.put_u16(self.ad.len() as u16);
        out.extend_from_slice(&self.ad);
        out.push(self.skipped.len() as u8);
        for c in &self.skipped {
            out.extend_from_slice(c.ratchet_key.as_bytes());
            out.put_u16(c.keys.len() as u16);
            for (n, mk) in &c.keys {
                out.put_u32(*n);
                out.extend_from_slice(mk.as_ref());
            }
        }
        out
    }

    /// Restores a session from [`Session::to_bytes`]. Never panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(bytes);
        if r.u8("state version")? != STATE_VERSION {
            return Err(DecodeError::Invalid {
                what: "state version",
                why: "unknown ratchet state version",
            }
            .into());
        }
        let dhs = X25519Secret::from_bytes(r.array("sending ratchet key")?);
        let dhr = get_opt(&mut r, "receiving ratchet key")?.map(X25519Public);
        let root = key(r.array("root key")?);
        let cks = get_opt(&mut r, "sending chain key")?.map(key);
        let ckr = get_opt(&mut r, "receiving chain key")?.map(key);
        let ns = r.u32("sent count")?;
        let nr = r.u32("received count")?;
        let pn = r.u32("previous chain length")?;
        let ad_len = r.u16("associated data length")? as usize;
        if ad_len > MAX_AD_LEN {
            return Err(DecodeError::TooLarge {
                what: "associated data",
                got: ad_len,
                max: MAX_AD_LEN,
            }
            .into());
        }
        let ad = r.take("associated data", ad_len)?.to_vec();
        let chains = r.u8("skipped chain count")? as usize;
        if chains > MAX_RECEIVING_CHAINS {
            return Err(DecodeError::TooLarge {
                what: "skipped chains",
                got: chains,
                max: MAX_RECEIVING_CHAINS,
            }
            .into());
        }
        let mut skipped = VecDeque::with_capacity(chains);
        for _ in 0..chains {
            let ratchet_key = X25519Public(r.array("skipped chain key")?);
            let count = r.u16("skipped key count")? as usize;
            if count > MAX_SKIPPED_PER_CHAIN {
                return Err(DecodeError::TooLarge {
                    what: "skipped keys",
                    got: count,
                    max: MAX_SKIPPED_PER_CHAIN,
                }
                .into());
            }
            let mut keys = VecDeque::with_capacity(count);
            for _ in 0..count {
                let n = r.u32("skipped key number")?;
                keys.push_back((n, key(r.array("skipped key")?)));
            }
            skipped.push_back(SkippedChain { ratchet_key, keys });
        }
        r.finish()?;
        Ok(Self {
            dhs_public: dhs.public(),
            dhs,
            dhr,
            root,
            cks,
            ckr,
            ns,
            nr,
            pn,
            ad,
            skipped,
        })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.ad.zeroize();
        self.ns = 0;
        self.nr = 0;
    }
}

/// Chain state being computed by a decryption, not yet committed.
struct Pending {
    dhs: Option<X25519Secret>,
    dhr: Option<X25519Public>,
    root: Key,
    cks: Option<Key>,
    ckr: Option<Key>,
    ns: u32,
    nr: u32,
    pn: u32,
    skipped: Vec<(X25519Public, u32, Key)>,
}

impl Pending {
    /// Stores the keys of the current receiving chain up to (not including)
    /// message `until`.
    fn skip_until(&mut self, ratchet_key: X25519Public, until: u32) -> Result<(), Error> {
        if until <= self.nr {
            return Ok(());
        }
        let skip = u64::from(until - self.nr);
        if skip > u64::from(MAX_SKIP_STEP) {
            return Err(Error::TooManySkipped { skip });
        }
        let Some(mut ck) = self.ckr.take() else {
            return Ok(());
        };
        // Only the newest MAX_SKIPPED_PER_CHAIN keys would survive storage.
        let keep_from = until.saturating_sub(MAX_SKIPPED_PER_CHAIN as u32);
        while self.nr < until {
            let (next, mk) = kdf_chain(&ck);
            if self.nr >= keep_from {
                self.skipped.push((ratchet_key, self.nr, mk));
            }
            ck = next;
            self.nr += 1;
        }
        self.ckr = Some(ck);
        Ok(())
    }
}

fn check_ad(ad: &[u8]) -> Result<(), Error> {
    if ad.len() > MAX_AD_LEN {
        return Err(DecodeError::TooLarge {
            what: "associated data",
            got: ad.len(),
            max: MAX_AD_LEN,
        }
        .into());
    }
    Ok(())
}

fn put_opt(out: &mut Vec<u8>, v: Option<&[u8; 32]>) {
    match v {
        Some(b) => {
            out.push(1);
            out.extend_from_slice(b);
        }
        None => out.push(0),
    }
}

fn get_opt(r: &mut Reader<'_>, what: &'static str) -> Result<Option<[u8; 32]>, DecodeError> {
    match r.u8(what)? {
        0 => Ok(None),
        1 => Ok(Some(r.array(what)?)),
        _ => Err(DecodeError::Invalid {
            what,
            why: "presence flag must be 0 or 1",
        }),
    }
}
