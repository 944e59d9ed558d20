//! What our address book holds, in memory: every stored record's relay key
//! and timestamp, ordered by key like the store's digest. Anti-entropy
//! serves digest pages and compares a peer's pages against it without a
//! store round trip (a forming mesh walks every new peer, and on a loaded
//! machine each of those reads waited behind the store workers' other
//! work for up to seconds).
//!
//! It is loaded from the store (a [`Job::LoadHeld`]), then kept up to date
//! from what the store reports as stored. Records the store drops on its
//! own (a full book evicting, old records pruned) are not reported: the
//! index then claims a record we no longer have, which costs a peer one
//! pull that finds nothing, and is corrected by the next reload (every
//! [`RELOAD_MS`], and at once when the index outgrows the book's cap).
//! Until it is loaded, the store answers as before.

use super::action::{Action, Job};
use std::collections::BTreeMap;

/// A digest page: (relay key, timestamp) in key order, and whether more
/// follow.
pub type Page = (Vec<([u8; 32], u64)>, bool);

/// How often the index is read again from the store.
pub const RELOAD_MS: u64 = 10 * 60 * 1000;

/// The index.
#[derive(Debug)]
pub struct Held {
    me: [u8; 32],
    /// At most this many entries (the book's cap): more means the store
    /// evicted some, and the index is read again.
    max: usize,
    map: Option<BTreeMap<[u8; 32], u64>>,
    /// A load is running: what was stored meanwhile (applied when it ends).
    loading: Option<Vec<([u8; 32], u64)>>,
    next_load_ms: u64,
}

impl Held {
    /// The index of a book of at most `max` records (`me`: our own key).
    pub fn new(me: [u8; 32], max: usize) -> Self {
        Self {
            me,
            max: max.max(1),
            map: None,
            loading: None,
            next_load_ms: 0,
        }
    }

    /// Asks for a load when none is running and the index is missing or
    /// due for a reload.
    pub fn tick(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.loading.is_some() || (self.map.is_some() && now < self.next_load_ms) {
            return;
        }
        self.loading = Some(Vec::new());
        self.next_load_ms = now.saturating_add(RELOAD_MS);
        out.push(Action::Job(Job::LoadHeld {
            limit: u32::try_from(self.max.saturating_add(1)).unwrap_or(u32::MAX),
        }));
    }

    /// The store's entries (`None`: the load failed or was refused; the
    /// next tick asks again).
    pub fn loaded(&mut self, entries: Option<Vec<([u8; 32], u64)>>) {
        let meanwhile = self.loading.take().unwrap_or_default();
        let Some(entries) = entries else {
            self.next_load_ms = 0;
            return;
        };
        if entries.len() > self.max {
            // Read more than the cap: not the whole book; try again later.
            self.map = None;
            return;
        }
        let mut map: BTreeMap<[u8; 32], u64> = entries.into_iter().collect();
        for (k, ts) in meanwhile {
            let t = map.entry(k).or_insert(ts);
            *t = (*t).max(ts);
        }
        self.map = Some(map);
        self.check_size();
    }

    /// The store took a record of `key` with timestamp `ts` (ours too).
    pub fn stored(&mut self, key: [u8; 32], ts: u64) {
        if let Some(m) = self.loading.as_mut() {
            if m.len() < self.max {
                m.push((key, ts));
            } else {
                // Too much at once to keep track of: load again.
                self.loading = None;
                self.map = None;
                self.next_load_ms = 0;
            }
        }
        if let Some(map) = self.map.as_mut() {
            let t = map.entry(key).or_insert(ts);
            *t = (*t).max(ts);
        }
        self.check_size();
    }

    fn check_size(&mut self) {
        if self.map.as_ref().is_some_and(|m| m.len() > self.max) {
            self.map = None;
            self.next_load_ms = 0;
        }
    }

    /// A digest page as the store would give it: up to `limit` entries
    /// after `after` in key order, and whether there are more (`None`:
    /// not loaded).
    pub fn page(&self, after: Option<[u8; 32]>, limit: u16) -> Option<Page> {
        let map = self.map.as_ref()?;
        let from = match after {
            Some(a) => std::ops::Bound::Excluded(a),
            None => std::ops::Bound::Unbounded,
        };
        let range = map.range((from, std::ops::Bound::Unbounded));
        let mut entries: Vec<([u8; 32], u64)> = range
            .take(usize::from(limit) + 1)
            .map(|(k, t)| (*k, *t))
            .collect();
        let more = entries.len() > usize::from(limit);
        entries.truncate(usize::from(limit));
        Some((entries, more))
    }

    /// Which of a peer's digest entries are newer there than here (never
    /// our own record); `None`: not loaded.
    pub fn newer_there(&self, entries: &[([u8; 32], u64)]) -> Option<Vec<[u8; 32]>> {
        let map = self.map.as_ref()?;
        Some(
            entries
                .iter()
                .filter(|(k, ts)| *k != self.me && map.get(k).is_none_or(|o| o < ts))
                .map(|(k, _)| *k)
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> [u8; 32] {
        [n; 32]
    }

    fn loaded(entries: &[(u8, u64)]) -> Held {
        let mut h = Held::new(key(0), 10);
        let mut out = Vec::new();
        h.tick(0, &mut out);
        assert!(matches!(
            &out[..],
            [Action::Job(Job::LoadHeld { limit: 11 })]
        ));
        h.loaded(Some(entries.iter().map(|&(k, t)| (key(k), t)).collect()));
        h
    }

    #[test]
    fn answers_only_once_loaded_and_reloads_when_due() {
        let mut h = Held::new(key(0), 10);
        assert!(h.page(None, 5).is_none());
        assert!(h.newer_there(&[(key(1), 1)]).is_none());
        let mut out = Vec::new();
        h.tick(0, &mut out);
        h.tick(1, &mut out);
        assert_eq!(out.len(), 1, "one load at a time");
        h.loaded(Some(vec![(key(1), 5)]));
        assert_eq!(h.page(None, 5), Some((vec![(key(1), 5)], false)));
        out.clear();
        h.tick(RELOAD_MS - 1, &mut out);
        assert!(out.is_empty());
        h.tick(RELOAD_MS, &mut out);
        assert_eq!(out.len(), 1, "reloaded when due");
        // A failed load: asked again at the next tick.
        h.loaded(None);
        out.clear();
        h.tick(RELOAD_MS + 1, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn pages_in_key_order_like_the_store() {
        let h = loaded(&[(3, 1), (1, 1), (2, 1), (4, 1)]);
        let (p, more) = h.page(None, 2).expect("loaded");
        assert_eq!(p, vec![(key(1), 1), (key(2), 1)]);
        assert!(more);
        let (p, more) = h.page(Some(key(2)), 2).expect("loaded");
        assert_eq!(p, vec![(key(3), 1), (key(4), 1)]);
        assert!(!more);
        let (p, more) = h.page(Some(key(4)), 2).expect("loaded");
        assert!(p.is_empty() && !more);
    }

    #[test]
    fn wants_what_is_newer_there_or_missing_but_never_our_own() {
        let mut h = loaded(&[(1, 10), (2, 10)]);
        let want = h
            .newer_there(&[(key(0), 99), (key(1), 10), (key(2), 11), (key(3), 1)])
            .expect("loaded");
        assert_eq!(want, vec![key(2), key(3)]);
        h.stored(key(2), 11);
        h.stored(key(3), 1);
        let want = h.newer_there(&[(key(2), 11), (key(3), 1)]).expect("loaded");
        assert!(want.is_empty(), "stored since");
    }

    #[test]
    fn records_stored_during_a_load_are_kept() {
        let mut h = Held::new(key(0), 10);
        let mut out = Vec::new();
        h.tick(0, &mut out);
        // Stored after the store was read, reported before the load ended.
        h.stored(key(5), 7);
        h.loaded(Some(vec![(key(1), 1), (key(5), 3)]));
        assert_eq!(
            h.page(None, 10),
            Some((vec![(key(1), 1), (key(5), 7)], false))
        );
    }

    #[test]
    fn outgrowing_the_cap_means_the_store_evicted_and_the_index_is_read_again() {
        let mut h = Held::new(key(0), 2);
        let mut out = Vec::new();
        h.tick(0, &mut out);
        h.loaded(Some(vec![(key(1), 1), (key(2), 1)]));
        assert!(h.page(None, 5).is_some());
        h.stored(key(3), 1);
        assert!(h.page(None, 5).is_none(), "no longer trusted");
        out.clear();
        h.tick(1, &mut out);
        assert_eq!(out.len(), 1, "read again at once");
    }
}
