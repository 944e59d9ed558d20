//! This relay's own signed address record: signed at start, whenever the
//! addresses change, and every `record_refresh_hours` (records expire
//! after 7 days); the timestamp always grows, so a republished record is
//! never a duplicate. Kept in our own book and published over gossip,
//! retried until gossipsub has a subscriber to send it to.

use super::action::{Action, Job};
use crate::metrics::FederationMetrics;
use meshwhisper_crypto::address_record::{self, AddressRecord, Contents};
use meshwhisper_crypto::identity::IdentityKeyPair;
use std::sync::atomic::Ordering::Relaxed;

/// The record's state.
pub struct OwnRecord {
    identity: IdentityKeyPair,
    refresh_ms: u64,
    gossip: bool,
    own: Option<(AddressRecord, Vec<Vec<u8>>)>,
    unpublished: bool,
    /// The addresses changed and connected relays were not told yet.
    unannounced: bool,
    next_sign_ms: u64,
    /// The relays that anchor us (behind NAT), named in the record.
    anchors: Vec<[u8; 32]>,
    /// The anchors changed since the record was signed.
    anchors_changed: bool,
}

impl std::fmt::Debug for OwnRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnRecord")
            .field(
                "timestamp",
                &self.own.as_ref().map(|(r, _)| r.timestamp_ms()),
            )
            .field("unpublished", &self.unpublished)
            .finish_non_exhaustive()
    }
}

impl OwnRecord {
    /// The record of `identity`, re-signed every `refresh_ms`, published
    /// over gossip if `gossip`.
    pub fn new(identity: IdentityKeyPair, refresh_ms: u64, gossip: bool) -> Self {
        Self {
            identity,
            refresh_ms,
            gossip,
            own: None,
            unpublished: false,
            unannounced: false,
            next_sign_ms: 0,
            anchors: Vec::new(),
            anchors_changed: false,
        }
    }

    /// The relays that anchor us now (at most
    /// [`address_record::MAX_ANCHORS`]); a change re-signs the record at
    /// the next [`maintain`](Self::maintain) and announces it at once.
    pub fn set_anchors(&mut self, mut anchors: Vec<[u8; 32]>) {
        anchors.truncate(address_record::MAX_ANCHORS);
        anchors.dedup();
        if anchors != self.anchors {
            self.anchors = anchors;
            self.anchors_changed = true;
        }
    }

    /// The current record, if signed.
    pub fn record(&self) -> Option<&AddressRecord> {
        self.own.as_ref().map(|(r, _)| r)
    }

    /// Signs a new record when `addrs` (our reachable addresses, in order
    /// of preference) changed or the refresh is due, and publishes what is
    /// unpublished.
    pub fn maintain(
        &mut self,
        now: u64,
        candidates: impl IntoIterator<Item = Vec<u8>>,
        m: &FederationMetrics,
        out: &mut Vec<Action>,
    ) {
        let mut addrs: Vec<Vec<u8>> = Vec::new();
        for a in candidates {
            if a.len() <= address_record::MAX_ADDR_LEN
                && !addrs.contains(&a)
                && addrs.len() < address_record::MAX_ADDRS
            {
                addrs.push(a);
            }
        }
        if addrs.is_empty() {
            return;
        }
        let changed = self.anchors_changed || self.own.as_ref().is_none_or(|(_, a)| *a != addrs);
        if changed || now >= self.next_sign_ms {
            let ts = self
                .own
                .as_ref()
                .map_or(now, |(r, _)| now.max(r.timestamp_ms() + 1));
            let contents = Contents {
                timestamp_ms: ts,
                onion_key: self.identity.public().x25519(),
                addrs: addrs.clone(),
                anchors: self.anchors.clone(),
            };
            match AddressRecord::sign(&self.identity, contents) {
                Ok(r) => {
                    m.records_signed.fetch_add(1, Relaxed);
                    out.push(Action::Job(Job::StoreOwnRecord(Box::new(r.clone()))));
                    self.own = Some((r, addrs));
                    self.anchors_changed = false;
                    self.unpublished = self.gossip;
                    self.unannounced |= changed && self.gossip;
                    self.next_sign_ms = now.saturating_add(self.refresh_ms);
                }
                Err(e) => tracing::warn!(error = %e, "cannot sign our address record"),
            }
        }
        if self.unpublished
            && let Some((r, _)) = &self.own
        {
            out.push(Action::Publish(r.encode()));
        }
    }

    /// Our current record's timestamp (`None` before the first is signed).
    pub fn timestamp(&self) -> Option<u64> {
        self.own.as_ref().map(|(r, _)| r.timestamp_ms())
    }

    /// The record, encoded, if its addresses changed since the last call
    /// (connected relays are to be told at once).
    pub fn take_change(&mut self) -> Option<Vec<u8>> {
        if !std::mem::take(&mut self.unannounced) {
            return None;
        }
        self.own.as_ref().map(|(r, _)| r.encode())
    }

    /// The record, encoded, to tell a relay whose stream just opened
    /// (`None` when we do not publish it).
    pub fn to_announce(&self) -> Option<Vec<u8>> {
        self.own
            .as_ref()
            .filter(|_| self.gossip)
            .map(|(r, _)| r.encode())
    }

    /// The publish went out (or gossipsub had it already).
    pub fn published(&mut self) {
        self.unpublished = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(out: &[Action]) -> Vec<u64> {
        out.iter()
            .filter_map(|a| match a {
                Action::Job(Job::StoreOwnRecord(r)) => Some(r.timestamp_ms()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn signs_on_change_and_refresh_with_growing_timestamps() {
        let id = IdentityKeyPair::from_seed(&[4; 32]);
        let mut r = OwnRecord::new(id, 1000, true);
        let m = FederationMetrics::default();
        let mut out = Vec::new();
        r.maintain(0, Vec::<Vec<u8>>::new(), &m, &mut out);
        assert!(out.is_empty(), "no address, no record");
        r.maintain(10, vec![b"/a".to_vec()], &m, &mut out);
        assert_eq!(signed(&out), vec![10]);
        assert!(out.iter().any(|a| matches!(a, Action::Publish(_))));
        assert!(r.take_change().is_some(), "a new record is announced");
        assert!(r.take_change().is_none(), "once");
        out.clear();
        r.published();
        r.maintain(10, vec![b"/a".to_vec()], &m, &mut out);
        assert!(out.is_empty(), "unchanged, published");
        r.maintain(10, vec![b"/b".to_vec()], &m, &mut out);
        assert_eq!(
            signed(&out),
            vec![11],
            "changed in the same ms: still newer"
        );
        out.clear();
        r.published();
        r.maintain(1011, vec![b"/b".to_vec()], &m, &mut out);
        assert!(r.take_change().is_some(), "changed addresses are announced");
        assert_eq!(signed(&out), vec![1011], "refresh");
        assert!(r.take_change().is_none(), "a refresh is only gossiped");
        // Unpublished records are offered again until published.
        out.clear();
        r.maintain(1012, vec![b"/b".to_vec()], &m, &mut out);
        assert!(out.iter().any(|a| matches!(a, Action::Publish(_))));
    }
}
