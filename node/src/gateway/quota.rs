//! Per-client daily byte quotas for uploads (media and archives), so one
//! address cannot fill the disk however slowly it goes. Counted per UTC
//! day by client address (IPv6 by /64); the table is bounded and forgets
//! the least recently used addresses first.

use crate::gateway::ratelimit::client_key;
use std::net::IpAddr;
use std::sync::Mutex;

const DAY_MS: u64 = 24 * 3_600_000;

#[derive(Debug, Clone, Copy)]
struct Usage {
    day: u64,
    bytes: u64,
}

/// Daily upload bytes per client address.
#[derive(Debug)]
pub struct UploadQuota {
    per_day: u64,
    table: Mutex<hashlink::LruCache<IpAddr, Usage>>,
}

impl UploadQuota {
    /// `per_day` bytes per address per day (0: no quota), remembering at
    /// most `max_clients` addresses.
    pub fn new(per_day: u64, max_clients: usize) -> Self {
        Self {
            per_day,
            table: Mutex::new(hashlink::LruCache::new(max_clients.max(1))),
        }
    }

    /// Counts `n` more bytes from `ip`; false (and nothing counted) when
    /// that would pass today's quota.
    pub fn take(&self, ip: IpAddr, n: u64, now_ms: u64) -> bool {
        if self.per_day == 0 {
            return true;
        }
        let key = client_key(ip);
        let day = now_ms / DAY_MS;
        let mut t = match self.table.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut u = t.get(&key).copied().unwrap_or(Usage { day, bytes: 0 });
        if u.day != day {
            u = Usage { day, bytes: 0 };
        }
        let Some(total) = u.bytes.checked_add(n).filter(|t| *t <= self.per_day) else {
            return false;
        };
        u.bytes = total;
        t.insert(key, u);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_per_address_per_day() {
        let q = UploadQuota::new(100, 10);
        let a: IpAddr = [10, 0, 0, 1].into();
        assert!(q.take(a, 60, 0));
        assert!(!q.take(a, 41, 1), "over today's quota");
        assert!(q.take(a, 40, 2), "exactly the quota");
        assert!(q.take([10, 0, 0, 2].into(), 100, 3), "another address");
        assert!(q.take(a, 100, DAY_MS), "a new day");
        assert!(UploadQuota::new(0, 1).take(a, u64::MAX, 0), "0 = no quota");
    }
}
