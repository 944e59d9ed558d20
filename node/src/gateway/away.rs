//! Pacing what one client (a WebSocket, or a device on libp2p) stores for
//! recipients who are away.
//!
//! Packets for a connected recipient are delivered within milliseconds and
//! their stored copies never reach SQLite; packets for recipients who are
//! away stay, and the store writer moves them into SQLite. One client
//! flooding absent (or made-up) hashes would otherwise fill every write
//! group of the one writer, and every other client's packets would wait
//! behind that work. A client may store `limits.client_away_bytes_per_sec`
//! for absent recipients (a second's worth at once); beyond that its
//! packets take the writer's bulk lane, which gives at most 1 MiB a group
//! and is paced relay-wide, until it is back under its rate and everything
//! it sent through the bulk lane is stored (so its packets keep their
//! order).

use meshwhisper_storage::mailbox::Lane;
use std::time::Instant;

/// A token bucket of bytes a second, in debt at most one second's worth.
#[derive(Debug)]
pub struct AwayPacer {
    rate: f64,
    tokens: f64,
    at: Instant,
    /// Batches sent through the bulk lane and not yet stored.
    bulk_in_flight: usize,
}

impl AwayPacer {
    /// A pacer allowing `rate` bytes a second (0: never paced).
    pub fn new(rate: u64, now: Instant) -> Self {
        Self {
            rate: rate as f64,
            tokens: rate as f64,
            at: now,
            bulk_in_flight: 0,
        }
    }

    /// The lane for a batch leaving `away` bytes in the store, at `now`.
    /// Each [`Lane::Bulk`] answer must be matched by [`AwayPacer::stored`].
    pub fn lane(&mut self, away: usize, now: Instant) -> Lane {
        if self.rate <= 0.0 {
            return Lane::Main;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.tokens = (self.tokens - away as f64).max(-self.rate);
        if self.tokens < 0.0 || self.bulk_in_flight > 0 {
            self.bulk_in_flight += 1;
            Lane::Bulk
        } else {
            Lane::Main
        }
    }

    /// A batch sent through `lane` is stored.
    pub fn stored(&mut self, lane: Lane) {
        if lane == Lane::Bulk {
            self.bulk_in_flight = self.bulk_in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MIB: usize = 1024 * 1024;

    #[test]
    fn a_client_within_its_rate_stays_in_the_main_lane() {
        let t0 = Instant::now();
        let mut p = AwayPacer::new(MIB as u64, t0);
        // Half a MiB a second for ten seconds.
        for i in 0..100 {
            let now = t0 + Duration::from_millis(100 * i);
            assert_eq!(p.lane(MIB / 20, now), Lane::Main, "at {i}");
        }
        // Packets for connected recipients cost nothing.
        assert_eq!(p.lane(0, t0 + Duration::from_secs(11)), Lane::Main);
    }

    #[test]
    fn a_flood_goes_to_the_bulk_lane_and_comes_back_in_order() {
        let t0 = Instant::now();
        let mut p = AwayPacer::new(MIB as u64, t0);
        // A second's worth at once is allowed...
        assert_eq!(p.lane(MIB, t0), Lane::Main);
        // ...more is not.
        assert_eq!(p.lane(64 * 1024, t0), Lane::Bulk);
        assert_eq!(p.lane(10 * MIB, t0), Lane::Bulk);
        // Debt is capped at a second: two seconds later it has room again,
        // but stays in the bulk lane while a bulk batch is being stored.
        let later = t0 + Duration::from_secs(3);
        assert_eq!(p.lane(1, later), Lane::Bulk);
        // Three bulk batches out; two are stored.
        p.stored(Lane::Bulk);
        p.stored(Lane::Bulk);
        assert_eq!(p.lane(1, later), Lane::Bulk, "one bulk batch still out");
        p.stored(Lane::Bulk);
        p.stored(Lane::Bulk);
        assert_eq!(p.lane(1, later), Lane::Main);
        p.stored(Lane::Main);
        assert_eq!(p.lane(1, later), Lane::Main);
    }

    #[test]
    fn a_zero_rate_never_paces() {
        let t0 = Instant::now();
        let mut p = AwayPacer::new(0, t0);
        assert_eq!(p.lane(usize::MAX, t0), Lane::Main);
    }
}
