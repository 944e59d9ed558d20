//! Per-IP rate limits with the reference relay's semantics: for each bucket,
//! a fixed 60-second window that starts at a client's first request; the
//! request that would exceed the limit is refused with the seconds left in
//! the window. Bounded: at most `max_clients` (bucket, IP) entries; expired
//! windows are dropped first, and a full table refuses nothing new.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// The window length.
pub const WINDOW_MS: u64 = 60_000;

/// A limiter bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// Directory and prekey writes.
    Dir = 0,
    /// Media uploads.
    Media = 1,
    /// Reads.
    Read = 2,
    /// Archive writes.
    Archive = 3,
}

#[derive(Debug)]
struct Window {
    start_ms: u64,
    count: u32,
}

/// The limiter.
#[derive(Debug)]
pub struct RateLimiter {
    limits: [u32; 4],
    max_clients: usize,
    windows: Mutex<HashMap<(Bucket, IpAddr), Window>>,
}

impl RateLimiter {
    /// Limits per minute for dir, media, read, archive.
    pub fn new(limits: [u32; 4], max_clients: usize) -> Self {
        Self {
            limits,
            max_clients: max_clients.max(1),
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// `Ok` if allowed; otherwise the `Retry-After` seconds.
    pub fn check(&self, bucket: Bucket, ip: IpAddr, now_ms: u64) -> Result<(), u64> {
        let max = self.limits[bucket as usize];
        let mut w = match self.windows.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        if !w.contains_key(&(bucket, ip)) && w.len() >= self.max_clients {
            w.retain(|_, win| now_ms.saturating_sub(win.start_ms) < WINDOW_MS);
        }
        if !w.contains_key(&(bucket, ip)) && w.len() >= self.max_clients {
            // Table full of live windows: refuse rather than grow.
            return Err(1);
        }
        let win = w.entry((bucket, ip)).or_insert(Window {
            start_ms: now_ms,
            count: 0,
        });
        if now_ms.saturating_sub(win.start_ms) >= WINDOW_MS {
            win.start_ms = now_ms;
            win.count = 0;
        }
        if win.count >= max {
            let left = WINDOW_MS - now_ms.saturating_sub(win.start_ms);
            return Err(left.div_ceil(1000).max(1));
        }
        win.count += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_window_with_retry_after() {
        let rl = RateLimiter::new([2, 1, 3, 1], 10);
        let ip: IpAddr = [10, 0, 0, 1].into();
        assert!(rl.check(Bucket::Dir, ip, 0).is_ok());
        assert!(rl.check(Bucket::Dir, ip, 1000).is_ok());
        assert_eq!(rl.check(Bucket::Dir, ip, 1500), Err(59));
        assert_eq!(rl.check(Bucket::Dir, ip, 59_999), Err(1));
        assert!(rl.check(Bucket::Dir, ip, 60_000).is_ok(), "new window");
        assert!(
            rl.check(Bucket::Media, ip, 0).is_ok(),
            "buckets are separate"
        );
        assert!(
            rl.check(Bucket::Dir, [10, 0, 0, 2].into(), 1500).is_ok(),
            "IPs are separate"
        );
    }

    #[test]
    fn table_is_bounded() {
        let rl = RateLimiter::new([5; 4], 2);
        assert!(rl.check(Bucket::Read, [1, 1, 1, 1].into(), 0).is_ok());
        assert!(rl.check(Bucket::Read, [1, 1, 1, 2].into(), 0).is_ok());
        assert!(rl.check(Bucket::Read, [1, 1, 1, 3].into(), 10).is_err());
        assert!(
            rl.check(Bucket::Read, [1, 1, 1, 3].into(), WINDOW_MS)
                .is_ok(),
            "expired windows make room"
        );
    }
}
