//! Whether this relay is publicly reachable: told by the operator
//! (`public`, `private`) or found out (`auto`) from AutoNAT v2, where other
//! relays dial our observed addresses back. One address confirmed makes
//! the relay public; `private_after` failed probes with none confirmed make
//! it private. A later confirmation makes it public again (a port was
//! forwarded, say), and losing every confirmed address makes it unknown.

use crate::config::Reachability as Mode;
use libp2p::Multiaddr;
use std::collections::BTreeSet;

/// What the relay currently takes itself for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not known yet (no probe answered).
    Unknown,
    /// Reachable: serves as an anchor.
    Public,
    /// Behind NAT: anchors itself.
    Private,
}

impl Status {
    /// Lower-case name, for `/health` and logs.
    pub fn label(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Public => "public",
            Status::Private => "private",
        }
    }

    /// The value of the `meshwhisper_nat_reachability` gauge.
    pub fn gauge(self) -> u64 {
        match self {
            Status::Unknown => 0,
            Status::Public => 1,
            Status::Private => 2,
        }
    }
}

/// The state.
#[derive(Debug)]
pub struct Reachability {
    mode: Mode,
    private_after: u32,
    /// Direct (not relayed) addresses a probe confirmed.
    confirmed: BTreeSet<Multiaddr>,
    failures: u32,
}

impl Reachability {
    /// Starts in `mode`; an `auto` relay is private after
    /// `private_after` failed probes.
    pub fn new(mode: Mode, private_after: u32) -> Self {
        Self {
            mode,
            private_after: private_after.max(1),
            confirmed: BTreeSet::new(),
            failures: 0,
        }
    }

    /// The current status.
    pub fn status(&self) -> Status {
        match self.mode {
            Mode::Public => Status::Public,
            Mode::Private => Status::Private,
            Mode::Auto if !self.confirmed.is_empty() => Status::Public,
            Mode::Auto if self.failures >= self.private_after => Status::Private,
            Mode::Auto => Status::Unknown,
        }
    }

    /// The operator's setting.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// A probe reached us at `addr` (a direct address).
    pub fn confirmed(&mut self, addr: Multiaddr) {
        self.confirmed.insert(addr);
    }

    /// `addr` is no longer an external address of ours.
    pub fn expired(&mut self, addr: &Multiaddr) {
        self.confirmed.remove(addr);
    }

    /// A probe of one of our addresses failed.
    pub fn probe_failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().expect("addr")
    }

    #[test]
    fn the_operators_word_wins_over_probes() {
        let mut r = Reachability::new(Mode::Private, 2);
        r.confirmed(addr("/ip4/203.0.113.2/tcp/4001"));
        assert_eq!(r.status(), Status::Private);
        let mut r = Reachability::new(Mode::Public, 2);
        r.probe_failed();
        r.probe_failed();
        assert_eq!(r.status(), Status::Public);
    }

    #[test]
    fn auto_is_unknown_until_probes_answer() {
        let mut r = Reachability::new(Mode::Auto, 2);
        assert_eq!(r.status(), Status::Unknown);
        r.probe_failed();
        assert_eq!(r.status(), Status::Unknown, "one failure is not enough");
        r.probe_failed();
        assert_eq!(r.status(), Status::Private);
        // A port forwarded later: one confirmation makes it public.
        let a = addr("/ip4/203.0.113.2/tcp/4001");
        r.confirmed(a.clone());
        assert_eq!(r.status(), Status::Public);
        r.expired(&a);
        assert_eq!(r.status(), Status::Private);
    }

    #[test]
    fn one_confirmed_address_outweighs_failed_ones() {
        let mut r = Reachability::new(Mode::Auto, 2);
        r.confirmed(addr("/ip4/203.0.113.10/tcp/4001"));
        for _ in 0..5 {
            r.probe_failed();
        }
        assert_eq!(r.status(), Status::Public);
    }
}
