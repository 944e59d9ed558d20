//! Which relays may federate with us.
//!
//! Relays and devices connect to the same Swarm. A peer counts as a relay
//! once identify shows it speaks `/meshwhisper/federation/1`; the Swarm
//! owner then asks [`Behaviour::admit`]. The modes:
//! - `open`: any relay (it proved its key in the Noise handshake) up to
//!   `max_peers`;
//! - `allowlist`: only the listed keys;
//! - `off`: none.
//!
//! A relay refused only because the cap is reached may stay connected as
//! a **guest** for `guest_ms` (at most `max_guests` at once): not admitted
//! (no packets, no gossip of ours, not counted), but allowed to walk our
//! address book, so a newcomer that knows only us (its bootstrap) learns
//! other relays to join instead. Then it is disconnected.
//!
//! A blocklist applies in every mode and to every peer, relay or device: a
//! blocked peer's connections are denied when they are established, and
//! [`Behaviour::set_blocklist`] closes the live ones at once. Admitted
//! relays get a per-peer token bucket of frames per minute.
//!
//! A state machine: time comes in as `now_ms`, nothing is read from disk.

use libp2p::PeerId;
use libp2p::core::{Endpoint, Multiaddr, transport::PortUse};
use libp2p::swarm::{
    CloseConnection, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::task::{Context, Poll};

/// Federation admission mode (the relay's `federation.mode` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Any relay that proves its key, up to the peer cap.
    #[default]
    Open,
    /// Only listed relays.
    Allowlist,
    /// No federation: the relay serves its own clients only.
    Off,
}

impl Mode {
    /// The setting's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Allowlist => "allowlist",
            Self::Off => "off",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "open" => Ok(Self::Open),
            "allowlist" => Ok(Self::Allowlist),
            "off" => Ok(Self::Off),
            other => Err(format!("{other:?} is not open, allowlist or off")),
        }
    }
}

/// Policy settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Admission mode.
    pub mode: Mode,
    /// Most admitted relays at once. Default 64.
    pub max_peers: usize,
    /// Relays admitted in `allowlist` mode.
    pub allowlist: HashSet<PeerId>,
    /// Peers refused in every mode.
    pub blocklist: HashSet<PeerId>,
    /// Federation frames one relay may send per minute (bursts up to ten
    /// seconds' worth). Default 12 000 000.
    pub frames_per_minute: u32,
    /// Relays refused for lack of room kept as guests at once. Default 32.
    pub max_guests: usize,
    /// How long a guest stays connected, ms. Default 10 000.
    pub guest_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Open,
            max_peers: 64,
            allowlist: HashSet::new(),
            blocklist: HashSet::new(),
            frames_per_minute: 12_000_000,
            max_guests: 32,
            guest_ms: 10_000,
        }
    }
}

/// The connection was refused because the peer is blocklisted.
#[derive(Debug, thiserror::Error)]
#[error("peer {0} is blocklisted")]
pub struct Blocked(pub PeerId);

/// Why a relay was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Federation is off.
    Off,
    /// Not on the allowlist.
    NotAllowed,
    /// The peer cap is reached.
    Full,
    /// Blocklisted.
    Blocked,
}

impl Refusal {
    /// A short stable label, for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Off => "federation_off",
            Refusal::NotAllowed => "not_allowlisted",
            Refusal::Full => "max_peers",
            Refusal::Blocked => "blocklisted",
        }
    }
}

/// What the policy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A relay's connections are being closed.
    Disconnecting {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: Refusal,
    },
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// The behaviour.
pub struct Behaviour {
    config: Config,
    connected: HashMap<PeerId, usize>,
    admitted: HashMap<PeerId, Bucket>,
    /// Guests and when they are disconnected.
    guests: HashMap<PeerId, u64>,
    actions: VecDeque<ToSwarm<Event, std::convert::Infallible>>,
}

impl Behaviour {
    /// A policy with `config`.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            connected: HashMap::new(),
            admitted: HashMap::new(),
            guests: HashMap::new(),
            actions: VecDeque::new(),
        }
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.config.mode
    }

    /// Decides on a connected relay. Admitted relays stay admitted until
    /// their last connection closes; a refused one is disconnected.
    pub fn admit(&mut self, peer: PeerId, now_ms: u64) -> Result<(), Refusal> {
        if self.admitted.contains_key(&peer) {
            return Ok(());
        }
        let refusal = if self.config.blocklist.contains(&peer) {
            Some(Refusal::Blocked)
        } else {
            match self.config.mode {
                Mode::Off => Some(Refusal::Off),
                Mode::Allowlist if !self.config.allowlist.contains(&peer) => {
                    Some(Refusal::NotAllowed)
                }
                _ if self.admitted.len() >= self.config.max_peers => Some(Refusal::Full),
                _ => None,
            }
        };
        if let Some(r) = refusal {
            if r == Refusal::Full
                && (self.guests.contains_key(&peer) || self.guests.len() < self.config.max_guests)
            {
                self.guests
                    .entry(peer)
                    .or_insert(now_ms.saturating_add(self.config.guest_ms));
                return Err(r);
            }
            self.disconnect(peer, r);
            return Err(r);
        }
        self.guests.remove(&peer);
        self.admitted.insert(
            peer,
            Bucket {
                tokens: self.burst(),
                at_ms: now_ms,
            },
        );
        Ok(())
    }

    /// Whether `peer` is a guest (refused for lack of room, still
    /// connected for a while to walk our address book).
    pub fn is_guest(&self, peer: &PeerId) -> bool {
        self.guests.contains_key(peer)
    }

    /// Disconnects the guests whose time is up; how many.
    pub fn expire_guests(&mut self, now_ms: u64) -> usize {
        let done: Vec<PeerId> = self
            .guests
            .iter()
            .filter(|(_, until)| **until <= now_ms)
            .map(|(p, _)| *p)
            .collect();
        for p in &done {
            self.guests.remove(p);
            self.disconnect(*p, Refusal::Full);
        }
        done.len()
    }

    /// Whether `peer` is an admitted relay.
    pub fn is_admitted(&self, peer: &PeerId) -> bool {
        self.admitted.contains_key(peer)
    }

    /// Admitted relays.
    pub fn admitted(&self) -> impl Iterator<Item = &PeerId> {
        self.admitted.keys()
    }

    /// How many relays are admitted.
    pub fn admitted_count(&self) -> usize {
        self.admitted.len()
    }

    /// Whether there is room for another relay.
    pub fn has_room(&self) -> bool {
        self.config.mode != Mode::Off && self.admitted.len() < self.config.max_peers
    }

    /// Whether `peer` is blocklisted.
    pub fn is_blocked(&self, peer: &PeerId) -> bool {
        self.config.blocklist.contains(peer)
    }

    /// Bucket capacity: ten seconds at the configured rate (at least one).
    fn burst(&self) -> f64 {
        (f64::from(self.config.frames_per_minute) / 6.0).max(1.0)
    }

    /// Takes one frame from `peer`'s bucket; `false` when it is over its
    /// rate (the frame should be refused) or not admitted.
    pub fn allow_frame(&mut self, peer: &PeerId, now_ms: u64) -> bool {
        let rate = f64::from(self.config.frames_per_minute);
        let burst = self.burst();
        let Some(b) = self.admitted.get_mut(peer) else {
            return false;
        };
        let elapsed = now_ms.saturating_sub(b.at_ms) as f64;
        b.tokens = (b.tokens + elapsed * rate / 60_000.0).min(burst);
        b.at_ms = now_ms;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Replaces the blocklist; connected peers now on it are disconnected
    /// at once. Returns how many were disconnected.
    pub fn set_blocklist(&mut self, blocklist: HashSet<PeerId>) -> usize {
        self.config.blocklist = blocklist;
        let hit: Vec<PeerId> = self
            .connected
            .keys()
            .filter(|p| self.config.blocklist.contains(p))
            .copied()
            .collect();
        for p in &hit {
            self.disconnect(*p, Refusal::Blocked);
        }
        hit.len()
    }

    /// Replaces the allowlist; in `allowlist` mode, admitted relays no
    /// longer on it are disconnected.
    pub fn set_allowlist(&mut self, allowlist: HashSet<PeerId>) {
        self.config.allowlist = allowlist;
        if self.config.mode == Mode::Allowlist {
            let out: Vec<PeerId> = self
                .admitted
                .keys()
                .filter(|p| !self.config.allowlist.contains(p))
                .copied()
                .collect();
            for p in out {
                self.disconnect(p, Refusal::NotAllowed);
            }
        }
    }

    fn disconnect(&mut self, peer: PeerId, reason: Refusal) {
        self.admitted.remove(&peer);
        self.actions
            .push_back(ToSwarm::GenerateEvent(Event::Disconnecting {
                peer,
                reason,
            }));
        self.actions.push_back(ToSwarm::CloseConnection {
            peer_id: peer,
            connection: CloseConnection::All,
        });
    }

    fn check(&self, peer: PeerId) -> Result<(), ConnectionDenied> {
        if self.config.blocklist.contains(&peer) {
            return Err(ConnectionDenied::new(Blocked(peer)));
        }
        Ok(())
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Event;

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        maybe_peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        if let Some(p) = maybe_peer {
            self.check(p)?;
        }
        Ok(Vec::new())
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(c) => {
                *self.connected.entry(c.peer_id).or_default() += 1;
            }
            FromSwarm::ConnectionClosed(c) => {
                if c.remaining_established == 0 {
                    self.connected.remove(&c.peer_id);
                    self.admitted.remove(&c.peer_id);
                    self.guests.remove(&c.peer_id);
                } else if let Some(n) = self.connected.get_mut(&c.peer_id) {
                    *n = c.remaining_established;
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Event, THandlerInEvent<Self>>> {
        match self.actions.pop_front() {
            Some(a) => Poll::Ready(a),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        PeerId::random()
    }

    #[test]
    fn modes_decide_admission() {
        let a = peer();
        let mut open = Behaviour::new(Config {
            max_peers: 1,
            ..Config::default()
        });
        assert_eq!(open.admit(a, 0), Ok(()));
        assert_eq!(open.admit(peer(), 0), Err(Refusal::Full));
        let mut off = Behaviour::new(Config {
            mode: Mode::Off,
            ..Config::default()
        });
        assert_eq!(off.admit(a, 0), Err(Refusal::Off));
        let mut allow = Behaviour::new(Config {
            mode: Mode::Allowlist,
            allowlist: [a].into(),
            ..Config::default()
        });
        assert_eq!(allow.admit(a, 0), Ok(()));
        assert_eq!(allow.admit(peer(), 0), Err(Refusal::NotAllowed));
        allow.set_allowlist(HashSet::new());
        assert!(!allow.is_admitted(&a));
        let mut blocked = Behaviour::new(Config {
            blocklist: [a].into(),
            ..Config::default()
        });
        assert_eq!(blocked.admit(a, 0), Err(Refusal::Blocked));
        assert!(blocked.check(a).is_err());
    }

    /// What the behaviour asked the Swarm to close.
    fn closed(p: &mut Behaviour) -> Vec<PeerId> {
        p.actions
            .drain(..)
            .filter_map(|a| match a {
                ToSwarm::CloseConnection { peer_id, .. } => Some(peer_id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_full_relay_keeps_a_few_newcomers_as_guests_for_a_while() {
        let (a, b, c, d) = (peer(), peer(), peer(), peer());
        let mut p = Behaviour::new(Config {
            max_peers: 1,
            max_guests: 2,
            guest_ms: 1_000,
            ..Config::default()
        });
        p.admit(a, 0).expect("admit");
        assert_eq!(p.admit(b, 0), Err(Refusal::Full));
        assert_eq!(p.admit(c, 100), Err(Refusal::Full));
        assert!(p.is_guest(&b) && p.is_guest(&c) && !p.is_admitted(&b));
        assert!(closed(&mut p).is_empty(), "guests stay connected");
        assert_eq!(p.admit(d, 0), Err(Refusal::Full));
        assert_eq!(closed(&mut p), vec![d], "no room for a third guest");
        // Asking again does not extend a guest's time.
        assert_eq!(p.admit(b, 900), Err(Refusal::Full));
        assert_eq!(p.expire_guests(999), 0);
        assert_eq!(p.expire_guests(1_000), 1);
        assert_eq!(closed(&mut p), vec![b]);
        // Room frees: a guest is admitted.
        p.admitted.remove(&a);
        assert_eq!(p.admit(c, 1_050), Ok(()));
        assert!(!p.is_guest(&c) && p.is_admitted(&c));
        assert_eq!(p.expire_guests(5_000), 0);
    }

    #[test]
    fn rate_limit_refills_with_time() {
        let a = peer();
        let mut p = Behaviour::new(Config {
            frames_per_minute: 60,
            ..Config::default()
        });
        assert!(!p.allow_frame(&a, 0), "not admitted");
        p.admit(a, 0).expect("admit");
        // A burst of ten seconds' worth.
        for _ in 0..10 {
            assert!(p.allow_frame(&a, 0));
        }
        assert!(!p.allow_frame(&a, 0), "bucket empty");
        assert!(!p.allow_frame(&a, 500), "half a token");
        assert!(p.allow_frame(&a, 1_000), "one token per second");
    }
}
