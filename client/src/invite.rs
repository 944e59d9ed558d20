//! Invites: everything needed to add a contact, with no other lookup.
//!
//! ```text
//! binary  = version (1) = 0x01 ‖ identity key (32) ‖ namespace (32)
//!         ‖ relay PeerId length (u8) ‖ relay PeerId
//!         ‖ address count (u8) ‖ count × (length (u16) ‖ multiaddr)
//!         ‖ name length (u8) ‖ name (UTF-8)
//!         ‖ checksum: SHA-256 of the above, first 4 bytes
//! text    = "MW1" ‖ base32 (RFC 4648, no padding) of the binary
//! ```
//!
//! The text form is upper-case letters and digits only, so it survives
//! copy-paste, chat apps and QR alphanumeric mode; parsing ignores case
//! and whitespace. The checksum catches typos before anything is stored.

use libp2p::{Multiaddr, PeerId};
use meshwhisper_crypto::destination::NamespaceId;
use meshwhisper_crypto::identity::IdentityPublic;
use meshwhisper_crypto::primitives;

/// Text prefix, naming the version.
pub const PREFIX: &str = "MW1";
/// Binary version byte.
pub const VERSION: u8 = 0x01;
/// Most relay addresses in an invite.
pub const MAX_ADDRS: usize = 16;
/// Longest multiaddr in an invite.
pub const MAX_ADDR_LEN: usize = 256;
/// Longest suggested name.
pub const MAX_NAME: usize = 64;
/// Longest binary invite.
pub const MAX_LEN: usize =
    1 + 32 + 32 + 1 + 64 + 1 + MAX_ADDRS * (2 + MAX_ADDR_LEN) + 1 + MAX_NAME + 4;

/// Why an invite was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not text of the form `MW1...`.
    #[error("not a MeshWhisper invite (expected text starting with {PREFIX})")]
    Prefix,
    /// Not valid base32.
    #[error("invite text is damaged (not base32)")]
    Encoding,
    /// The checksum does not match: a typo or a truncated copy.
    #[error("invite checksum does not match (typo or incomplete copy?)")]
    Checksum,
    /// A field is malformed.
    #[error("malformed invite: {0}")]
    Malformed(&'static str),
    /// Too large or too many of something.
    #[error("invite too large: {0}")]
    TooLarge(&'static str),
}

/// A decoded invite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    /// The person's identity key.
    pub identity: IdentityPublic,
    /// The application namespace their destination hashes live in.
    pub namespace: NamespaceId,
    /// Their home relay.
    pub relay: PeerId,
    /// Where to dial it.
    pub addrs: Vec<Multiaddr>,
    /// The name they suggest for themselves (may be empty).
    pub name: String,
}

impl Invite {
    /// The binary form (also carried inside first messages).
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        if self.addrs.len() > MAX_ADDRS {
            return Err(Error::TooLarge("more than 16 relay addresses"));
        }
        if self.name.len() > MAX_NAME {
            return Err(Error::TooLarge("name longer than 64 bytes"));
        }
        let peer = self.relay.to_bytes();
        let mut out = Vec::with_capacity(256);
        out.push(VERSION);
        out.extend_from_slice(&self.identity.to_bytes());
        out.extend_from_slice(self.namespace.as_bytes());
        out.push(u8::try_from(peer.len()).map_err(|_| Error::TooLarge("relay PeerId"))?);
        out.extend_from_slice(&peer);
        out.push(self.addrs.len() as u8);
        for a in &self.addrs {
            let b = a.to_vec();
            if b.len() > MAX_ADDR_LEN {
                return Err(Error::TooLarge("relay address longer than 256 bytes"));
            }
            out.extend_from_slice(&(b.len() as u16).to_be_bytes());
            out.extend_from_slice(&b);
        }
        out.push(self.name.len() as u8);
        out.extend_from_slice(self.name.as_bytes());
        let sum = primitives::sha256(&[&out]);
        out.extend_from_slice(&sum[..4]);
        Ok(out)
    }

    /// Parses the binary form. Never panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() > MAX_LEN {
            return Err(Error::TooLarge("invite"));
        }
        if bytes.len() < 4 {
            return Err(Error::Malformed("too short"));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 4);
        if primitives::sha256(&[body])[..4] != *sum {
            return Err(Error::Checksum);
        }
        let mut r = body;
        let mut take = |n: usize, what: &'static str| -> Result<&[u8], Error> {
            if r.len() < n {
                return Err(Error::Malformed(what));
            }
            let (h, t) = r.split_at(n);
            r = t;
            Ok(h)
        };
        if take(1, "version")?[0] != VERSION {
            return Err(Error::Malformed("unknown version"));
        }
        let identity = IdentityPublic::from_slice(take(32, "identity key")?)
            .map_err(|_| Error::Malformed("identity key"))?;
        let mut ns = [0u8; 32];
        ns.copy_from_slice(take(32, "namespace")?);
        let n = take(1, "relay PeerId length")?[0] as usize;
        let relay = PeerId::from_bytes(take(n, "relay PeerId")?)
            .map_err(|_| Error::Malformed("relay PeerId"))?;
        let count = take(1, "address count")?[0] as usize;
        if count > MAX_ADDRS {
            return Err(Error::TooLarge("more than 16 relay addresses"));
        }
        let mut addrs = Vec::with_capacity(count);
        for _ in 0..count {
            let l = take(2, "address length")?;
            let l = u16::from_be_bytes([l[0], l[1]]) as usize;
            let a = Multiaddr::try_from(take(l, "relay address")?.to_vec())
                .map_err(|_| Error::Malformed("relay address"))?;
            addrs.push(a);
        }
        let n = take(1, "name length")?[0] as usize;
        let name = std::str::from_utf8(take(n, "name")?)
            .map_err(|_| Error::Malformed("name is not UTF-8"))?
            .to_string();
        if !r.is_empty() {
            return Err(Error::Malformed("trailing bytes"));
        }
        Ok(Self {
            identity,
            namespace: NamespaceId(ns),
            relay,
            addrs,
            name,
        })
    }

    /// The text form: `MW1` and base32.
    pub fn to_text(&self) -> Result<String, Error> {
        Ok(format!(
            "{PREFIX}{}",
            data_encoding::BASE32_NOPAD.encode(&self.to_bytes()?)
        ))
    }

    /// Parses the text form, ignoring case and whitespace.
    pub fn from_text(text: &str) -> Result<Self, Error> {
        let clean: String = text
            .chars()
            .filter(|c| !c.is_whitespace())
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let body = clean.strip_prefix(PREFIX).ok_or(Error::Prefix)?;
        if body.len() > MAX_LEN * 8 / 5 + 8 {
            return Err(Error::TooLarge("invite"));
        }
        let bytes = data_encoding::BASE32_NOPAD
            .decode(body.as_bytes())
            .map_err(|_| Error::Encoding)?;
        Self::from_bytes(&bytes)
    }

    /// The home relay as one dialable address list (`/p2p/<PeerId>` appended).
    pub fn relay_addrs(&self) -> Vec<Multiaddr> {
        self.addrs
            .iter()
            .map(|a| {
                if a.iter()
                    .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
                {
                    a.clone()
                } else {
                    a.clone().with(libp2p::multiaddr::Protocol::P2p(self.relay))
                }
            })
            .collect()
    }
}

/// The invite as a QR code drawn with Unicode half blocks, for a terminal.
pub fn qr(text: &str) -> Result<String, Error> {
    let code = qrcode::QrCode::with_error_correction_level(text.as_bytes(), qrcode::EcLevel::L)
        .map_err(|_| Error::TooLarge("too long for a QR code"))?;
    Ok(code
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwhisper_crypto::identity::IdentityKeyPair;

    fn sample() -> Invite {
        Invite {
            identity: *IdentityKeyPair::from_seed(&[7; 32]).public(),
            namespace: NamespaceId([9; 32]),
            relay: PeerId::random(),
            addrs: vec![
                "/ip4/127.0.0.1/tcp/4001".parse().expect("addr"),
                "/ip4/127.0.0.1/udp/4001/quic-v1".parse().expect("addr"),
            ],
            name: "alice".into(),
        }
    }

    #[test]
    fn text_round_trips_and_tolerates_case_and_spaces() {
        let inv = sample();
        let text = inv.to_text().expect("text");
        assert!(text.starts_with(PREFIX));
        assert!(
            text.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        );
        assert_eq!(Invite::from_text(&text).expect("parse"), inv);
        let messy = format!("  {}\n{} ", &text[..20].to_lowercase(), &text[20..]);
        assert_eq!(Invite::from_text(&messy).expect("parse"), inv);
        assert!(qr(&text).expect("qr").lines().count() > 20);
    }

    #[test]
    fn damage_is_detected() {
        let text = sample().to_text().expect("text");
        assert_eq!(Invite::from_text("hello"), Err(Error::Prefix));
        assert_eq!(Invite::from_text(&format!("{text}!")), Err(Error::Encoding));
        // Any changed character is caught (checksum or structure).
        for i in PREFIX.len()..text.len() {
            let mut b = text.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let s = String::from_utf8(b).expect("utf8");
            assert!(
                Invite::from_text(&s).is_err(),
                "change at {i} went unnoticed"
            );
        }
        // Truncated copies too.
        for n in 0..text.len() {
            assert!(Invite::from_text(&text[..n]).is_err());
        }
    }

    #[test]
    fn bounds_are_enforced() {
        let mut inv = sample();
        inv.name = "x".repeat(65);
        assert!(inv.to_bytes().is_err());
        let mut inv = sample();
        inv.addrs = vec![inv.addrs[0].clone(); 17];
        assert!(inv.to_bytes().is_err());
    }
}
