//! Live deliveries waiting for one client connection, bounded in count and
//! bytes per connection and in bytes across all connections.
//!
//! A packet is stored before it is offered here, so the live copy is an
//! optimisation: when a queue (or the relay-wide budget) is full the
//! packet simply stays stored, and the queue remembers that it turned one
//! away ([`LiveQueue::take_behind`]). The session then drains the store as
//! soon as its queue is empty again, so the client gets everything without
//! asking. A slow reader therefore costs at most its queue's bytes, and all
//! slow readers together at most the budget.

use crate::core::Outbound;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Bytes of live deliveries queued across all connections.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max,
        })
    }

    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.max)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// Bytes queued now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Outbound>,
    bytes: usize,
    /// A packet was turned away since the last [`LiveQueue::take_behind`].
    behind: bool,
}

/// One connection's queue.
#[derive(Debug)]
pub struct LiveQueue {
    state: Mutex<State>,
    notify: Notify,
    max_count: usize,
    max_bytes: usize,
    budget: Arc<Budget>,
}

impl LiveQueue {
    /// A queue of at most `max_count` packets and `max_bytes` bytes, also
    /// drawing on the relay-wide `budget`.
    pub fn new(max_count: usize, max_bytes: usize, budget: Arc<Budget>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            max_count: max_count.max(1),
            max_bytes: max_bytes.max(1),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Queues `out` if there is room; otherwise remembers that the client
    /// is behind (its packet stays stored) and returns false. Once behind,
    /// every packet is turned away until the queue has emptied and the
    /// connection has caught up from the store ([`LiveQueue::take_behind`]):
    /// a later packet must not overtake the ones that stayed stored.
    pub fn offer(&self, out: Outbound) -> bool {
        let len = out.packet.len();
        let mut st = self.lock();
        if st.behind {
            return false;
        }
        // One packet always fits an empty queue (the byte bound is at
        // least one packet in practice, but never starve a client).
        let over = st.items.len() >= self.max_count
            || (!st.items.is_empty() && st.bytes.saturating_add(len) > self.max_bytes);
        if over || !self.budget.take(len) {
            st.behind = true;
            let empty = st.items.is_empty();
            drop(st);
            if empty {
                // Nothing queued will wake the connection: wake it to catch
                // up from the store now, not at its next keepalive.
                self.notify.notify_one();
            }
            return false;
        }
        st.items.push_back(out);
        st.bytes += len;
        drop(st);
        self.notify.notify_one();
        true
    }

    /// Takes up to `max_count` packets and about `max_bytes` bytes (at
    /// least one packet), waiting until there is one — or returns nothing
    /// at once when the queue is empty and the client is behind, so its
    /// connection goes to catch up from the store ([`LiveQueue::take_behind`]).
    pub async fn next_batch(&self, max_count: usize, max_bytes: usize) -> Vec<Outbound> {
        loop {
            let batch = self.take(max_count, max_bytes);
            if !batch.is_empty() || self.lock().behind {
                return batch;
            }
            self.notify.notified().await;
        }
    }

    /// Takes what is queued now, as [`LiveQueue::next_batch`] without waiting.
    pub fn take(&self, max_count: usize, max_bytes: usize) -> Vec<Outbound> {
        let mut st = self.lock();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while out.len() < max_count.max(1) {
            let Some(len) = st.items.front().map(|o| o.packet.len()) else {
                break;
            };
            if !out.is_empty() && bytes.saturating_add(len) > max_bytes {
                break;
            }
            if let Some(o) = st.items.pop_front() {
                bytes += len;
                out.push(o);
            }
        }
        st.bytes = st.bytes.saturating_sub(bytes);
        drop(st);
        self.budget.give(bytes);
        out
    }

    /// Whether the queue is empty.
    pub fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// Whether a packet was turned away since the last call (and the
    /// queue is now empty, so a drain from the store can catch up).
    pub fn take_behind(&self) -> bool {
        let mut st = self.lock();
        if st.behind && st.items.is_empty() {
            st.behind = false;
            return true;
        }
        false
    }

    /// Returns what is still queued to the budget (the connection ended).
    pub fn close(&self) {
        let mut st = self.lock();
        let bytes = st.bytes;
        st.items.clear();
        st.bytes = 0;
        drop(st);
        self.budget.give(bytes);
    }
}

impl Drop for LiveQueue {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn out(n: usize) -> Outbound {
        Outbound {
            packet: Bytes::from(vec![0u8; n]),
            mailbox_id: None,
        }
    }

    #[test]
    fn bounded_per_connection_in_count_and_bytes() {
        let b = Budget::new(1 << 20);
        let q = LiveQueue::new(3, 100, b.clone());
        assert!(q.offer(out(60)));
        assert!(!q.offer(out(60)), "over the byte bound");
        assert!(
            !q.offer(out(40)),
            "behind: it must not overtake the one turned away"
        );
        assert_eq!(b.used(), 60);
        assert!(!q.take_behind(), "not empty yet");
        assert_eq!(q.take(10, 1000).len(), 1);
        assert!(!q.offer(out(1)), "still behind until it caught up");
        assert!(q.take_behind(), "turned a packet away, now empty");
        assert!(!q.take_behind(), "said once");
        assert_eq!(b.used(), 0);
        assert!(
            q.offer(out(60)) && q.offer(out(40)),
            "caught up: live again"
        );
        assert_eq!(q.take(10, 1000).len(), 2);
        let q = LiveQueue::new(2, 1000, b.clone());
        assert!(q.offer(out(1)) && q.offer(out(1)));
        assert!(!q.offer(out(1)), "over the count bound");
        // An empty queue takes one packet even over the byte bound.
        let big = LiveQueue::new(2, 10, b.clone());
        assert!(big.offer(out(50)));
    }

    #[test]
    fn bounded_across_connections_and_returned_when_closed() {
        let b = Budget::new(100);
        let q1 = LiveQueue::new(10, 1000, b.clone());
        let q2 = LiveQueue::new(10, 1000, b.clone());
        assert!(q1.offer(out(70)));
        assert!(!q2.offer(out(40)), "over the relay-wide budget");
        assert!(q2.take_behind(), "empty: catches up from the store");
        assert!(q2.offer(out(30)));
        drop(q1);
        assert_eq!(b.used(), 30);
        assert!(q2.offer(out(60)));
        let batch = q2.take(10, 40);
        assert_eq!(batch.len(), 1, "about max_bytes per batch");
        assert_eq!(b.used(), 60);
    }

    #[tokio::test]
    async fn a_connection_waiting_for_packets_wakes_when_one_is_turned_away() {
        // The relay-wide budget is used up elsewhere: the packet is turned
        // away with the queue empty, and the waiting connection must wake
        // to catch up from the store (nothing else would wake it).
        let b = Budget::new(10);
        let other = LiveQueue::new(10, 1000, b.clone());
        assert!(other.offer(out(10)));
        let q = Arc::new(LiveQueue::new(10, 1000, b));
        let q2 = q.clone();
        let t = tokio::spawn(async move { q2.next_batch(10, 1000).await.len() });
        tokio::task::yield_now().await;
        assert!(!q.offer(out(5)));
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), t)
            .await
            .expect("woken")
            .expect("join");
        assert_eq!(n, 0, "nothing live: catch up from the store");
        assert!(q.take_behind());
    }

    #[tokio::test]
    async fn next_batch_waits_for_a_packet() {
        let q = Arc::new(LiveQueue::new(10, 1000, Budget::new(1000)));
        let q2 = q.clone();
        let t = tokio::spawn(async move { q2.next_batch(10, 1000).await.len() });
        tokio::task::yield_now().await;
        assert!(q.offer(out(5)));
        assert_eq!(t.await.expect("join"), 1);
    }
}
