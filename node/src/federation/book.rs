//! Gossiped and pushed address records: checked here (signature, age,
//! clock skew, size) before anything reaches the store, and ignored
//! without a store round trip (and without checking the signature) when a
//! record as new or newer is known or on its way to the store. What passes
//! is handed to a store worker, which keeps it under the book's eviction
//! rule (see `storage::address_book`).

use super::action::{Action, Job};
use crate::metrics::FederationMetrics;
use bytes::Bytes;
use libp2p::PeerId;
use libp2p::gossipsub::{MessageAcceptance, MessageId};
use meshwhisper_crypto::address_record::AddressRecord;

/// What a gossiped record is worth.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forged, expired, from the future or oversized: penalise the source.
    Reject,
    /// Known already (as new or newer): do not pass it on.
    Ignore,
    /// Worth storing: a worker stores it and reports.
    Learn,
}

/// Newest record timestamp seen per relay, bounded.
#[derive(Debug)]
pub struct Book {
    me: [u8; 32],
    known: hashlink::LruCache<[u8; 32], u64>,
}

impl Book {
    /// The book of relay `me`, remembering at most `max` relays' timestamps.
    pub fn new(me: [u8; 32], max: usize) -> Self {
        Self {
            me,
            known: hashlink::LruCache::new(max.max(1)),
        }
    }

    /// Checks a record; on [`Verdict::Reject`] the reason is counted. A
    /// record worth learning is remembered at once, so the copies that
    /// follow it (every neighbour pushes a change) are ignored before
    /// its store job is done.
    pub fn check(&mut self, now: u64, data: &[u8], m: &FederationMetrics) -> Verdict {
        // No newer than one verified before: nothing to verify.
        if let Some((key, ts)) = AddressRecord::peek(data)
            && (key == self.me || self.known.get(&key).is_some_and(|&t| t >= ts))
        {
            return Verdict::Ignore;
        }
        match AddressRecord::accept(data, now) {
            Err(e) => {
                m.reject_record(e.kind());
                Verdict::Reject
            }
            Ok(r) => {
                let key = r.relay_key().to_bytes();
                if key == self.me
                    || self
                        .known
                        .get(&key)
                        .is_some_and(|&ts| ts >= r.timestamp_ms())
                {
                    Verdict::Ignore
                } else {
                    self.known.insert(key, r.timestamp_ms());
                    Verdict::Learn
                }
            }
        }
    }

    /// A gossiped record: reject or ignore at once, or store then report.
    pub fn gossip(
        &mut self,
        now: u64,
        source: PeerId,
        message_id: MessageId,
        data: Vec<u8>,
        m: &FederationMetrics,
        out: &mut Vec<Action>,
    ) {
        let report = |acceptance| Action::ReportGossip {
            message_id: message_id.clone(),
            source,
            acceptance,
        };
        match self.check(now, &data, m) {
            Verdict::Reject => out.push(report(MessageAcceptance::Reject)),
            Verdict::Ignore => out.push(report(MessageAcceptance::Ignore)),
            Verdict::Learn => out.push(Action::Job(Job::Learn {
                records: vec![Bytes::from(data)],
                gossip: Some((message_id, source)),
                from: Some(source),
            })),
        }
    }

    /// Records from `peer`, pushed or asked for in an anti-entropy walk:
    /// the ones worth learning go to a store worker (several walks may
    /// have asked for the same record: only the first copy is checked and
    /// stored).
    pub fn pushed(
        &mut self,
        now: u64,
        peer: PeerId,
        records: Vec<Bytes>,
        m: &FederationMetrics,
        out: &mut Vec<Action>,
    ) {
        let records: Vec<Bytes> = records
            .into_iter()
            .filter(|r| self.check(now, r, m) == Verdict::Learn)
            .collect();
        if !records.is_empty() {
            out.push(Action::Job(Job::Learn {
                records,
                gossip: None,
                from: Some(peer),
            }));
        }
    }

    /// Records remembered by [`Book::check`] that never reached the book
    /// (their store job was refused or failed): forgotten again, so that
    /// the next copy is checked and stored rather than ignored.
    pub fn unstored(&mut self, records: &[Bytes]) {
        for r in records {
            if let Some((key, ts)) = AddressRecord::peek(r)
                && self.known.peek(&key) == Some(&ts)
            {
                self.known.remove(&key);
            }
        }
    }

    /// Whether a record of `key` at least as new as `ts` is known (stored,
    /// or checked and on its way to the store).
    pub fn knows(&self, key: &[u8; 32], ts: u64) -> bool {
        *key == self.me || self.known.peek(key).is_some_and(|&t| t >= ts)
    }

    /// A record was stored (or found older) with this timestamp.
    pub fn note(&mut self, key: [u8; 32], ts: u64) {
        let newest = self.known.get(&key).map_or(ts, |&t| t.max(ts));
        self.known.insert(key, newest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwhisper_crypto::identity::IdentityKeyPair;

    fn record(seed: u8, ts: u64) -> Vec<u8> {
        super::super::tests::signed_record(seed, ts).1
    }

    #[test]
    fn forged_rejected_known_ignored_new_learned() {
        let now = 1_800_000_000_000;
        let mut b = Book::new([0; 32], 10);
        let m = FederationMetrics::default();
        let r = record(1, now);
        let mut forged = r.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert_eq!(b.check(now, &forged, &m), Verdict::Reject);
        assert_eq!(
            b.check(now, &record(1, now - 8 * 86_400_000), &m),
            Verdict::Reject
        );
        assert_eq!(b.check(now, &r, &m), Verdict::Learn);
        // Copies of a record on its way to the store are ignored, forged
        // ones too (unverified: they could not have been newer).
        assert_eq!(b.check(now, &r, &m), Verdict::Ignore);
        assert_eq!(b.check(now, &forged, &m), Verdict::Ignore);
        let key = IdentityKeyPair::from_seed(&[1; 32]).public().to_bytes();
        b.note(key, now);
        assert_eq!(b.check(now, &r, &m), Verdict::Ignore);
        assert_eq!(b.check(now + 1, &record(1, now + 1), &m), Verdict::Learn);
        // A forged newer one is still verified, and rejected.
        let mut newer = record(1, now + 2);
        newer[last] ^= 1;
        assert_eq!(b.check(now + 2, &newer, &m), Verdict::Reject);
    }

    #[test]
    fn a_record_the_store_did_not_take_is_learned_from_the_next_copy() {
        let now = 1_800_000_000_000;
        let mut b = Book::new([0; 32], 10);
        let m = FederationMetrics::default();
        let r = record(1, now);
        assert_eq!(b.check(now, &r, &m), Verdict::Learn);
        assert_eq!(b.check(now, &r, &m), Verdict::Ignore);
        // Its store job was refused (or the store failed).
        b.unstored(&[Bytes::from(r.clone())]);
        assert_eq!(b.check(now, &r, &m), Verdict::Learn);
        // A record that was not the one remembered changes nothing: the
        // newer one on its way stays remembered.
        let newer = record(1, now + 1);
        assert_eq!(b.check(now + 1, &newer, &m), Verdict::Learn);
        b.unstored(&[Bytes::from(r)]);
        assert_eq!(b.check(now + 1, &newer, &m), Verdict::Ignore);
    }

    #[test]
    fn pushed_records_worth_learning_go_to_one_store_job() {
        let now = 1_800_000_000_000;
        let mut b = Book::new([0; 32], 10);
        let m = FederationMetrics::default();
        let peer = PeerId::random();
        let mut out = Vec::new();
        let known = record(1, now);
        b.note(
            IdentityKeyPair::from_seed(&[1; 32]).public().to_bytes(),
            now,
        );
        let mut forged = record(2, now);
        forged[5] ^= 1;
        let fresh = record(3, now);
        let all = [known, forged, fresh.clone()].map(Bytes::from).to_vec();
        b.pushed(now, peer, all.clone(), &m, &mut out);
        let [Action::Job(Job::Learn { records, from, .. })] = &out[..] else {
            panic!("one store job: {out:?}");
        };
        assert_eq!(records, &vec![Bytes::from(fresh)]);
        assert_eq!(*from, Some(peer));
        out.clear();
        // The same push again (from another neighbour): nothing to store.
        b.pushed(now, PeerId::random(), all, &m, &mut out);
        assert!(out.is_empty());
    }
}
