//! Namespace ids and destination hashes.
//!
//! Relays route by an 8-byte *destination hash* that changes every hour, so a
//! relay sees neither who a recipient is nor links their traffic across hours
//! unless it already knows their key:
//!
//! - namespace id = BLAKE3(UTF-8 app bundle id ‖ developer public key)
//! - destination hash = BLAKE3(namespace id ‖ recipient X25519 key ‖ epoch hour
//!   as u64 big-endian)\[..8\]
//! - epoch hour = ⌊unix ms / 3 600 000⌋
//!
//! Receivers accept the current and the previous hour.

use crate::primitives::{self, X25519Public};

/// Milliseconds in one epoch hour.
pub const MS_PER_HOUR: u64 = 3_600_000;

/// A 32-byte namespace id: one app of one developer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespaceId(pub [u8; 32]);

impl NamespaceId {
    /// Derives the namespace id of an app.
    pub fn derive(app_bundle_id: &str, developer_public_key: &[u8]) -> Self {
        Self(primitives::blake3(&[
            app_bundle_id.as_bytes(),
            developer_public_key,
        ]))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for NamespaceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NamespaceId({})", crate::hex_prefix(&self.0))
    }
}

/// An 8-byte destination hash: what a relay keys its mailboxes by.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestHash(pub [u8; 8]);

impl DestHash {
    /// The destination hash of `recipient` in `namespace` for `epoch_hour`.
    pub fn derive(namespace: &NamespaceId, recipient: &X25519Public, epoch_hour: u64) -> Self {
        let digest = primitives::blake3(&[
            namespace.as_bytes(),
            recipient.as_bytes(),
            &epoch_hour.to_be_bytes(),
        ]);
        let mut out = [0u8; 8];
        out.copy_from_slice(&digest[..8]);
        Self(out)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 8] {
        &self.0
    }

    /// Lower-case hex, as the WebSocket protocol writes it.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 16 hex digits (either case).
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() != 16 {
            return None;
        }
        let mut out = [0u8; 8];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Self(out))
    }
}

impl std::fmt::Debug for DestHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DestHash({})", self.to_hex())
    }
}

impl std::fmt::Display for DestHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The epoch hour of a Unix time in milliseconds.
pub fn epoch_hour(unix_ms: u64) -> u64 {
    unix_ms / MS_PER_HOUR
}

/// The hashes a receiver accepts at `unix_ms`: the current hour first, then
/// the previous one (the current one alone in hour 0).
pub fn current_and_previous(
    namespace: &NamespaceId,
    recipient: &X25519Public,
    unix_ms: u64,
) -> Vec<DestHash> {
    let now = epoch_hour(unix_ms);
    let mut out = vec![DestHash::derive(namespace, recipient, now)];
    if let Some(prev) = now.checked_sub(1) {
        out.push(DestHash::derive(namespace, recipient, prev));
    }
    out
}

/// The hashes for the hours `now - back ..= now + ahead` (clipped at hour 0
/// and at `u64::MAX`), oldest first. Clients register such a window so a
/// relay can recognise packets for them across hour boundaries while they
/// are offline.
pub fn window(
    namespace: &NamespaceId,
    recipient: &X25519Public,
    unix_ms: u64,
    back: u64,
    ahead: u64,
) -> Vec<(u64, DestHash)> {
    let now = epoch_hour(unix_ms);
    let first = now.saturating_sub(back);
    let last = now.saturating_add(ahead);
    (first..=last)
        .map(|h| (h, DestHash::derive(namespace, recipient, h)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects() {
        let h = DestHash([0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 0xff]);
        assert_eq!(DestHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(DestHash::from_hex("DEADBEEF000102FF"), Some(h));
        assert_eq!(DestHash::from_hex("deadbeef000102f"), None);
        assert_eq!(DestHash::from_hex("deadbeef000102fg"), None);
        assert_eq!(DestHash::from_hex("ééééééééé"), None);
    }

    #[test]
    fn windows_and_hours() {
        let ns = NamespaceId::derive("app", &[1u8; 32]);
        let key = X25519Public([2u8; 32]);
        let t = 5 * MS_PER_HOUR + 10;
        let cp = current_and_previous(&ns, &key, t);
        assert_eq!(cp[0], DestHash::derive(&ns, &key, 5));
        assert_eq!(cp[1], DestHash::derive(&ns, &key, 4));
        assert_eq!(current_and_previous(&ns, &key, 10).len(), 1);
        let w = window(&ns, &key, t, 2, 3);
        let hours: Vec<u64> = w.iter().map(|(h, _)| *h).collect();
        assert_eq!(hours, vec![3, 4, 5, 6, 7, 8]);
        assert_eq!(window(&ns, &key, 0, 5, 0).len(), 1);
        assert_ne!(
            DestHash::derive(&ns, &key, 5),
            DestHash::derive(&ns, &key, 6)
        );
    }
}
