//! Per-IP rate limits with the reference relay's semantics: for each bucket,
//! a fixed 60-second window that starts at a client's first request; the
//! request that would exceed the limit is refused with the seconds left in
//! the window. Bounded: at most `max_clients` (bucket, IP) entries; when the
//! table is full the least recently used entry makes room, so a flood of
//! new addresses never locks newcomers out. IPv6 clients are counted by
//! their /64 ([`client_key`]): one host owns a whole /64.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;

/// The address a per-client limit counts: IPv4 as is (IPv4-mapped IPv6
/// too), IPv6 by its /64 prefix.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

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
    windows: Mutex<hashlink::LruCache<(Bucket, IpAddr), Window>>,
}

impl RateLimiter {
    /// Limits per minute for dir, media, read, archive.
    pub fn new(limits: [u32; 4], max_clients: usize) -> Self {
        Self {
            limits,
            windows: Mutex::new(hashlink::LruCache::new(max_clients.max(1))),
        }
    }

    /// (bucket, client) windows held.
    pub fn len(&self) -> usize {
        match self.windows.lock() {
            Ok(w) => w.len(),
            Err(p) => p.into_inner().len(),
        }
    }

    /// Whether no window is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `Ok` if allowed; otherwise the `Retry-After` seconds.
    pub fn check(&self, bucket: Bucket, ip: IpAddr, now_ms: u64) -> Result<(), u64> {
        let max = self.limits[bucket as usize];
        let key = (bucket, client_key(ip));
        let mut w = match self.windows.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        // A new client evicts the least recently used entry when full.
        if w.get(&key).is_none() {
            w.insert(
                key,
                Window {
                    start_ms: now_ms,
                    count: 0,
                },
            );
        }
        let Some(win) = w.get_mut(&key) else {
            return Ok(());
        };
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
    fn a_full_table_evicts_the_least_recently_used_not_newcomers() {
        let rl = RateLimiter::new([1; 4], 2);
        let (a, b, c) = (
            IpAddr::from([1, 1, 1, 1]),
            IpAddr::from([1, 1, 1, 2]),
            IpAddr::from([1, 1, 1, 3]),
        );
        assert!(rl.check(Bucket::Read, a, 0).is_ok());
        assert!(rl.check(Bucket::Read, b, 0).is_ok());
        assert!(rl.check(Bucket::Read, a, 1).is_err(), "a is limited");
        // A newcomer gets in although every window is live.
        assert!(rl.check(Bucket::Read, c, 10).is_ok());
        assert_eq!(rl.len(), 2);
        // b was the least recently used and made room; a is still limited.
        assert!(rl.check(Bucket::Read, a, 20).is_err());
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let rl = RateLimiter::new([1; 4], 100);
        let one: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let same64: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let other64: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert!(rl.check(Bucket::Dir, one, 0).is_ok());
        assert!(rl.check(Bucket::Dir, same64, 0).is_err());
        assert!(rl.check(Bucket::Dir, other64, 0).is_ok());
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert_eq!(client_key(mapped), IpAddr::from([10, 0, 0, 1]));
    }
}
