//! Counts for the `/events` Server-Sent Events stream: how many packets came
//! in, were forwarded live, queued, woke a device by push, or were drained,
//! since the last tick. Content-free by construction.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The five counters, swapped to zero at each tick.
#[derive(Debug, Default)]
pub struct EventCounts {
    /// Packets accepted.
    pub inbound: AtomicU64,
    /// Delivered live.
    pub forwarded: AtomicU64,
    /// Stored for offline recipients.
    pub queued: AtomicU64,
    /// Push wakes sent.
    pub wake: AtomicU64,
    /// Stored packets sent on hello/pull.
    pub drain: AtomicU64,
}

impl EventCounts {
    /// Takes the counts since the last call; `None` if all are zero.
    pub fn take(&self) -> Option<String> {
        let v = [
            self.inbound.swap(0, Relaxed),
            self.forwarded.swap(0, Relaxed),
            self.queued.swap(0, Relaxed),
            self.wake.swap(0, Relaxed),
            self.drain.swap(0, Relaxed),
        ];
        if v.iter().all(|&x| x == 0) {
            return None;
        }
        Some(format!(
            "{{\"in\":{},\"fwd\":{},\"queue\":{},\"wake\":{},\"drain\":{}}}",
            v[0], v[1], v[2], v[3], v[4]
        ))
    }
}
