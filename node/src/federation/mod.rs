//! Federation: relays finding each other by key and carrying packets to
//! their recipients' home relays.
//!
//! Sans-io, after quinn-proto: each concern is a small state machine that
//! takes the time and what happened, and returns [`Action`]s:
//!
//! | concern | state |
//! |---|---|
//! | our signed address record | [`own_record::OwnRecord`] |
//! | gossip validation, known records | [`book::Book`] |
//! | address-book reconciliation | [`anti_entropy::AntiEntropy`] |
//! | pushing news (changes, introductions) along open streams | [`announce::Announce`] |
//! | bootstrap, reaching relays by key, discovery | [`dials::Dials`] |
//! | sending: routed windows, floods, retries, learned routes | [`forward::Forward`] |
//! | flood loop prevention, acks back along the path | [`dedup::Dedup`] |
//! | receiving: store where homed, flood on, ack | [`inbound::Inbound`] |
//! | claims at other relays for our devices | [`claims::Claims`] |
//!
//! [`Federation`] composes them; [`driver`] applies the actions to the
//! Swarm and runs store work on a fixed set of workers ([`jobs`]).
//! Admission (who is a relay, the allowlist and blocklist, per-peer rate
//! limits) is the policy behaviour's, consulted through [`View`].

pub mod action;
pub mod announce;
pub mod anti_entropy;
pub mod book;
pub mod carried;
pub mod claims;
pub mod dedup;
pub mod dials;
pub mod driver;
pub mod forward;
pub mod held;
pub mod inbound;
pub mod jobs;
pub mod onion;
pub mod own_record;
pub mod transit;

pub use action::{Action, Job, JobDone, StoreOutcome};

use crate::config;
use crate::core::Federate;
use crate::metrics::FederationMetrics;
use libp2p::{Multiaddr, PeerId};
use meshwhisper_behaviour::federation::codec::{AckStatus, Frame, PacketId};
use meshwhisper_behaviour::relay_key::RelayKey;
use meshwhisper_crypto::destination::DestHash;
use meshwhisper_crypto::identity::IdentityKeyPair;
use meshwhisper_storage::mailbox::MailboxId;
use rand_core::Rng as _;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// Capacity of the channel from the core (packets to federate).
pub(crate) const OUTBOUND_QUEUE: usize = 8192;
/// Capacity of the channel of devices' claims at other relays.
pub(crate) const CLAIM_QUEUE: usize = 256;

/// The Ed25519 key inside an Ed25519 PeerId.
pub fn key_of(peer: &PeerId) -> Option<[u8; 32]> {
    RelayKey::from_peer(peer).map(|k| k.0)
}

/// What the state machines may ask about the network (and the core) now.
pub trait View {
    /// Whether `peer` is an admitted relay.
    fn is_admitted(&self, peer: &PeerId) -> bool;
    /// Whether a federation stream to `peer` is open.
    fn stream_open(&self, peer: &PeerId) -> bool;
    /// Whether any connection to `peer` is up.
    fn is_connected(&self, peer: &PeerId) -> bool;
    /// Admitted relays.
    fn admitted_count(&self) -> usize;
    /// Whether more relays may be admitted.
    fn has_room(&self) -> bool;
    /// Admitted relays with an open stream (flood targets).
    fn peers(&self) -> Vec<PeerId>;
    /// Whether a client of this relay registered `dest`.
    fn is_homed(&self, dest: &DestHash) -> bool;
}

/// What a forwarding or inbound step reads and writes besides its own
/// state.
pub struct Ctx<'a> {
    /// The Swarm's state (streams, peers).
    pub view: &'a dyn View,
    /// Flood ids seen, shared with the inbound side.
    pub dedup: &'a mut dedup::Dedup,
    /// Counters.
    pub m: &'a FederationMetrics,
    /// Actions for the driver.
    pub out: &'a mut Vec<Action>,
}

/// The federation state of one relay.
pub struct Federation {
    me: PeerId,
    my_key: RelayKey,
    enabled: bool,
    external: Vec<Multiaddr>,
    rng: rand_chacha::ChaCha20Rng,
    /// Key of the ids stored copies go out under (see [`Federation::copy_id`]).
    copy_ids: zeroize::Zeroizing<[u8; 32]>,
    /// Our address record.
    pub own: own_record::OwnRecord,
    /// Gossip validation.
    pub book: book::Book,
    /// Anti-entropy.
    pub ae: anti_entropy::AntiEntropy,
    /// Changed records pushed on.
    pub announce: announce::Announce,
    /// Dialling.
    pub dials: dials::Dials,
    /// Sending.
    pub forward: forward::Forward,
    /// Receiving.
    pub inbound: inbound::Inbound,
    /// Flood dedup.
    pub dedup: dedup::Dedup,
    /// Claims at other relays.
    pub claims: claims::Claims,
    /// Frames carried for relays that cannot dial.
    pub transit: transit::Transit,
    /// Onion layers peeled and carried here.
    pub onion: onion::Onion,
    /// This relay dials only its bootstrap relays (`federation.transit_only`).
    transit_only: bool,
    /// When each connected relay was last noted as connected in the book.
    marked: HashMap<RelayKey, u64>,
    /// Every record in the book, by key (answers anti-entropy in memory).
    held: held::Held,
    /// Our own record's timestamp as last put in `held`.
    own_held_ts: u64,
    /// Relays to note as connected at the next tick (at most
    /// [`MARK_BATCH`]; a full batch goes at once).
    to_mark: Vec<RelayKey>,
    metrics: Arc<FederationMetrics>,
}

/// The most relays noted as connected in one store job.
const MARK_BATCH: usize = 1024;

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("me", &self.me)
            .field("pending", &self.forward.pending_len())
            .finish_non_exhaustive()
    }
}

/// A connected relay is noted as connected in the book this often.
const MARK_EVERY_MS: u64 = 600_000;

/// Domain of the key of stored copies' packet ids.
const COPY_ID_CONTEXT: &[u8] = b"meshwhisper federation copy ids v1";

/// How long an ack may take before its packet is resent.
const ACK_TIMEOUT_MS: u64 = 60_000;
/// How long an anti-entropy walk may take before it is given up.
const WALK_TIMEOUT_MS: u64 = 10_000;

impl Federation {
    /// The federation of the relay with `identity` (its libp2p key too).
    pub fn new(
        cfg: &config::Federation,
        identity: IdentityKeyPair,
        mailbox_ttl_ms: u64,
        metrics: Arc<FederationMetrics>,
        seed: [u8; 32],
    ) -> Self {
        let my_key = RelayKey(identity.public().to_bytes());
        let me = my_key.to_peer().unwrap_or_else(PeerId::random);
        let bootstrap = cfg
            .bootstrap
            .iter()
            .filter_map(|b| {
                let a: Multiaddr = b.parse().ok()?;
                match a.iter().last() {
                    Some(libp2p::multiaddr::Protocol::P2p(p)) => Some((p, a)),
                    _ => None,
                }
            })
            .collect();
        let _ = mailbox_ttl_ms;
        let onion_secret = identity.x25519().clone();
        // Separate streams for onions (independent of `rng`'s).
        let seed_of = |label: &[u8]| meshwhisper_crypto::primitives::blake3(&[label, &seed]);
        let (onion_seed, forward_seed) = (
            seed_of(b"meshwhisper onion carrier"),
            seed_of(b"meshwhisper onion sender"),
        );
        let mut fed = Self {
            me,
            my_key,
            enabled: cfg.mode != config::FederationMode::Off,
            external: cfg
                .external_addrs
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            rng: <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::from_seed(seed),
            copy_ids: zeroize::Zeroizing::new(meshwhisper_crypto::primitives::blake3(&[
                COPY_ID_CONTEXT,
                identity.seed().as_slice(),
            ])),
            own: own_record::OwnRecord::new(
                identity,
                cfg.record_refresh_hours.saturating_mul(3_600_000),
                cfg.record_gossip,
            ),
            book: book::Book::new(my_key.0, 2 * cfg.address_book_max as usize),
            held: held::Held::new(my_key.0, cfg.address_book_max as usize),
            own_held_ts: 0,
            announce: announce::Announce::default(),
            ae: anti_entropy::AntiEntropy::new(
                cfg.anti_entropy_ms,
                cfg.anti_entropy_page,
                WALK_TIMEOUT_MS,
            ),
            dials: dials::Dials::new(me, bootstrap, cfg.retry_ms, cfg.target_peers)
                .transit_only(cfg.transit_only),
            forward: forward::Forward::new(
                forward::ForwardConfig {
                    send_window: cfg.send_window,
                    retry_ms: cfg.retry_ms,
                    flood_retry_ms: cfg.flood_retry_ms,
                    flood_attempts: cfg.flood_attempts,
                    max_pending: cfg.max_pending,
                    max_pending_bytes: cfg.max_pending_bytes,
                    dial_queue: cfg.dial_queue,
                    max_per_relay: cfg.max_pending_per_relay,
                    ack_timeout_ms: ACK_TIMEOUT_MS,
                    learned_routes: cfg.learned_routes,
                    forget_batch: 256,
                    transit_only: cfg.transit_only,
                    transit_hops: usize::from(cfg.transit_hops),
                    onion_hops: if cfg.onion_transit {
                        usize::from(cfg.onion_hops).max(1)
                    } else {
                        0
                    },
                },
                my_key,
            ),
            inbound: inbound::Inbound::new(my_key, cfg.max_hops),
            dedup: dedup::Dedup::new(cfg.dedup_entries, cfg.dedup_secs.saturating_mul(1000)),
            marked: HashMap::new(),
            to_mark: Vec::new(),
            claims: claims::Claims::new(1024),
            transit: transit::Transit::new(
                my_key,
                transit::TransitConfig {
                    max_hops: cfg.transit_hops,
                    max_entries: cfg.transit_max,
                    max_per_peer: cfg.transit_per_peer,
                },
            ),
            onion: onion::Onion::new(
                my_key,
                onion_secret,
                onion::OnionConfig {
                    max_entries: cfg.transit_max,
                    max_per_peer: cfg.transit_per_peer,
                    replay_tags: cfg.onion_replay_tags,
                    replay_ttl_ms: cfg.onion_replay_secs.saturating_mul(1000),
                },
                onion_seed,
            ),
            transit_only: cfg.transit_only,
            metrics,
        };
        fed.forward.seed_onions(forward_seed);
        fed
    }

    /// Our PeerId.
    pub fn me(&self) -> PeerId {
        self.me
    }

    /// Routed packets sent on open streams and not yet acknowledged.
    pub fn in_flight(&self, view: &dyn View) -> usize {
        self.forward.in_flight(view)
    }

    /// Packets held only in memory (and copies not yet kept), to store
    /// before this relay stops.
    pub fn take_unstored(&mut self) -> Vec<forward::Keep> {
        self.forward.take_unstored()
    }

    /// This relay's key.
    pub fn key(&self) -> RelayKey {
        self.my_key
    }

    /// The id a stored copy goes out under: the same for the same copy
    /// after a restart, so that a home relay that stored it before (its
    /// ack lost to the restart) recognises it and the recipient gets it
    /// once. Keyed with this relay's secret (other relays cannot link ids
    /// to copies) and taken over the packet too (its length, first 64 and
    /// last 32 bytes), so that a copy id used again after a restart (ids
    /// of packets deleted before they reached SQLite can be) with another
    /// packet gives another id.
    fn copy_id(&self, copy: MailboxId, packet: &[u8]) -> PacketId {
        let head = &packet[..packet.len().min(64)];
        let tail = &packet[packet.len().saturating_sub(32)..];
        let h = meshwhisper_crypto::primitives::blake3_keyed(
            &self.copy_ids,
            &[
                &copy.0.to_be_bytes(),
                &(packet.len() as u64).to_be_bytes(),
                head,
                tail,
            ],
        );
        let mut id = [0u8; 16];
        id.copy_from_slice(&h[..16]);
        id
    }

    fn random_id(&mut self) -> PacketId {
        let mut id = [0u8; 16];
        self.rng.fill_bytes(&mut id);
        id
    }

    /// A random book cursor (discovery starts there).
    fn random_cursor(&mut self) -> [u8; 32] {
        let mut c = [0u8; 32];
        self.rng.fill_bytes(&mut c);
        c
    }

    /// A packet accepted here whose recipient is homed elsewhere.
    pub fn outbound(&mut self, now: u64, f: Federate, view: &dyn View, out: &mut Vec<Action>) {
        let mark = out.len();
        if !self.enabled {
            if f.mailbox_id.is_none() {
                out.push(Action::Job(Job::KeepCopy(vec![forward::Keep {
                    id: None,
                    packet: f.packet,
                    route: f.hint.unwrap_or(self.key().0),
                }])));
            }
            return;
        }
        // A packet held in memory only gets a random id; a stored copy one
        // derived from it.
        let id = match f.mailbox_id {
            Some(m) => self.copy_id(m, &f.packet),
            None => self.random_id(),
        };
        self.forward.outbound(
            now,
            f,
            id,
            &mut Ctx {
                view,
                dedup: &mut self.dedup,
                m: &self.metrics,
                out,
            },
        );
        self.route_actions(now, view, out, mark);
    }

    /// Turns the `Reach` asks among the actions from `out[from..]` on into
    /// dial-state work (only the new actions are looked at: a batch of
    /// packets costs one pass, not one per packet).
    fn route_actions(&mut self, now: u64, view: &dyn View, out: &mut Vec<Action>, from: usize) {
        let from = from.min(out.len());
        if !out[from..].iter().any(|a| matches!(a, Action::Reach(_))) {
            return;
        }
        let mut reach = Vec::new();
        let tail = out.split_off(from);
        for a in tail {
            match a {
                Action::Reach(p) => reach.push(p),
                a => out.push(a),
            }
        }
        for p in reach {
            self.dials.reach(now, p, view, out);
        }
    }

    /// A federation stream to `peer` opened.
    pub fn stream_opened(
        &mut self,
        now: u64,
        peer: PeerId,
        view: &dyn View,
        out: &mut Vec<Action>,
    ) {
        let mark = out.len();
        self.dials.reached(&peer);
        if let Some(k) = RelayKey::from_peer(&peer) {
            self.marked.insert(k, now);
            self.note_connected([k], out);
        }
        self.forward.stream_opened(
            now,
            peer,
            &mut Ctx {
                view,
                dedup: &mut self.dedup,
                m: &self.metrics,
                out,
            },
        );
        self.claims.stream_opened(peer, out);
        self.transit.stream_opened(peer, out);
        self.onion.stream_opened(peer, out);
        // Our record first: it may have changed while the peer was away.
        if let Some(r) = self.own.to_announce() {
            let bootstrap = self.dials.bootstrap_addr(&peer).is_some();
            announce::Announce::own_to(r.into(), peer, bootstrap, out);
        }
        // Reconcile address books with a new peer right away.
        self.ae.changed();
        self.ae.start(now, peer, &self.metrics, out);
        self.route_actions(now, view, out, mark);
    }

    /// Notes relays as connected in the book: at the next tick, together
    /// with every other noted meanwhile (a mesh that is forming opens
    /// dozens of streams a second, and a store write for each held the
    /// store workers up for seconds).
    fn note_connected(&mut self, keys: impl IntoIterator<Item = RelayKey>, out: &mut Vec<Action>) {
        for k in keys {
            self.to_mark.push(k);
            if self.to_mark.len() >= MARK_BATCH {
                self.flush_marks(out);
            }
        }
    }

    fn flush_marks(&mut self, out: &mut Vec<Action>) {
        if !self.to_mark.is_empty() {
            let mut keys = std::mem::take(&mut self.to_mark);
            keys.sort_unstable_by_key(|k| k.0);
            keys.dedup();
            out.push(Action::Job(Job::MarkConnected(keys)));
        }
    }

    /// A stream to `peer` closed (`last`: no other is open).
    pub fn stream_closed(&mut self, now: u64, peer: PeerId, last: bool) {
        if last {
            self.ae.closed(&peer);
            if let Some(k) = RelayKey::from_peer(&peer) {
                self.marked.remove(&k);
            }
        }
        self.forward.stream_closed(now, peer);
        self.transit.stream_closed(peer);
        self.onion.stream_closed(peer);
    }

    /// A frame could not be queued for `peer`.
    pub fn unsent(&mut self, now: u64, peer: PeerId, frame: &Frame) {
        self.metrics.drops_queue_full.fetch_add(1, Relaxed);
        self.forward.unsent(now, peer, frame);
    }

    /// The store workers had no room for `job`. Records it carried are
    /// forgotten (the next copy is stored instead of ignored) and its
    /// gossip message, if any, is reported as ignored; a request it was to
    /// serve no longer counts against its peer.
    pub fn job_refused(&mut self, job: Job, out: &mut Vec<Action>) {
        match job {
            Job::Learn {
                records, gossip, ..
            } => {
                self.book.unstored(&records);
                if let Some((message_id, source)) = gossip {
                    out.push(Action::ReportGossip {
                        message_id,
                        source,
                        acceptance: libp2p::gossipsub::MessageAcceptance::Ignore,
                    });
                }
            }
            // Not served after all: the peer may ask again.
            Job::ServeDigest { peer, .. }
            | Job::ServePull { peer, .. }
            | Job::ServeClaim { peer, .. } => self.ae.served(peer),
            Job::LoadHeld { .. } => self.held.loaded(None),
            Job::KeepCopy(keeps) => self.forward.keep_refused(keeps),
            _ => {}
        }
    }

    /// A frame from an admitted relay (admission and rate limits are
    /// checked before).
    pub fn frame(
        &mut self,
        now: u64,
        peer: PeerId,
        frame: Frame,
        view: &dyn View,
        out: &mut Vec<Action>,
    ) {
        let mark = out.len();
        match frame {
            Frame::Batch(frames) => {
                for f in frames {
                    self.frame(now, peer, f, view, out);
                }
                return;
            }
            f @ (Frame::Forward { .. } | Frame::Routed { .. }) => self.inbound.packet(
                now,
                peer,
                f,
                &mut Ctx {
                    view,
                    dedup: &mut self.dedup,
                    m: &self.metrics,
                    out,
                },
            ),
            Frame::Transit { to, hops, inner } => {
                if let Some(inner) = self.transit.carry(
                    now,
                    peer,
                    to,
                    hops,
                    *inner,
                    |p| view.stream_open(p),
                    &self.metrics,
                    out,
                ) {
                    // For us: as if the sender had sent it directly.
                    self.frame(now, peer, inner, view, out);
                    return;
                }
            }
            Frame::Onion { hop, layer } => {
                if let Some(routed) = self.onion.receive(
                    now,
                    peer,
                    hop,
                    &layer,
                    |p| view.stream_open(p),
                    &self.metrics,
                    out,
                ) {
                    // The last layer: store it as a routed packet; its ack
                    // goes back as an OnionAck under `hop`.
                    let m = out.len();
                    self.inbound.packet(
                        now,
                        peer,
                        routed,
                        &mut Ctx {
                            view,
                            dedup: &mut self.dedup,
                            m: &self.metrics,
                            out,
                        },
                    );
                    self.onion.answers(m, out);
                }
            }
            Frame::OnionAck { hop, status } => {
                if !self.onion.ack(peer, hop, status, out)
                    && let Some(id) = self.forward.onion_answer(&hop)
                {
                    self.forward.ack(
                        now,
                        peer,
                        id,
                        status,
                        None,
                        &mut Ctx {
                            view,
                            dedup: &mut self.dedup,
                            m: &self.metrics,
                            out,
                        },
                    );
                }
            }
            Frame::Ack { id, status, home } if self.transit.ack(peer, id, status, home, out) => {}
            Frame::Ack { id, status, home } => {
                let mine = self.forward.ack(
                    now,
                    peer,
                    id,
                    status,
                    home,
                    &mut Ctx {
                        view,
                        dedup: &mut self.dedup,
                        m: &self.metrics,
                        out,
                    },
                );
                if !mine && status == AckStatus::Stored {
                    // A flood we passed on: its ack goes back the same way.
                    self.inbound.relay_stored(id, home, &mut self.dedup, out);
                }
            }
            Frame::Forget { ids } => {
                out.push(Action::Job(Job::Forget(ids)));
            }
            Frame::Claim {
                req,
                namespace,
                identity,
            } => {
                if self.ae.may_serve(peer, &self.metrics) {
                    self.metrics.claims_served.fetch_add(1, Relaxed);
                    out.push(Action::Job(Job::ServeClaim {
                        peer,
                        req,
                        namespace,
                        identity,
                    }));
                }
            }
            Frame::ClaimReply { req, status, body } => {
                if !self
                    .transit
                    .claim_reply(peer, req, status, body.clone(), out)
                {
                    self.claims.reply(peer, req, status, body)
                }
            }
            Frame::DigestRequest { req, after, limit } => {
                if let Some((entries, more)) = self.held.page(after, limit) {
                    out.push(Action::Send {
                        peer,
                        frame: Frame::Digest { req, more, entries },
                    });
                } else if self.ae.may_serve(peer, &self.metrics) {
                    out.push(Action::Job(Job::ServeDigest {
                        peer,
                        req,
                        after,
                        limit,
                    }));
                }
            }
            Frame::Digest { more, entries, .. } => {
                tracing::debug!(%peer, entries = entries.len(), more, "anti-entropy digest page");
                match self.held.newer_there(&entries) {
                    Some(mut want) => {
                        // Not what another walk is already fetching.
                        let ts: HashMap<[u8; 32], u64> = entries.iter().copied().collect();
                        want.retain(|k| ts.get(k).is_none_or(|t| !self.book.knows(k, *t)));
                        self.ae.page_arrived(now, peer, more, &self.metrics, out);
                        let next_after = if more {
                            entries.last().map(|(k, _)| *k)
                        } else {
                            None
                        };
                        tracing::debug!(%peer, want = want.len(), "anti-entropy page compared");
                        self.ae.compared(peer, want, next_after, out);
                    }
                    None => self.ae.digest(now, peer, more, entries, &self.metrics, out),
                }
            }
            Frame::Pull { req, keys } => {
                if self.ae.may_serve(peer, &self.metrics) {
                    out.push(Action::Job(Job::ServePull { peer, req, keys }));
                }
            }
            Frame::Records { req, records }
                if req == announce::PUSHED || req == announce::INTRODUCE =>
            {
                if req == announce::INTRODUCE {
                    let n = self
                        .announce
                        .introduction(now, peer, &records, &view.peers(), out);
                    self.metrics.records_pushed.fetch_add(n as u64, Relaxed);
                }
                self.book.pushed(now, peer, records, &self.metrics, out)
            }
            // Asked for in an anti-entropy walk.
            Frame::Records { records, .. } => {
                self.book.pushed(now, peer, records, &self.metrics, out)
            }
        }
        self.route_actions(now, view, out, mark);
    }

    /// A gossiped record.
    pub fn gossip(
        &mut self,
        now: u64,
        source: PeerId,
        message_id: libp2p::gossipsub::MessageId,
        data: Vec<u8>,
        out: &mut Vec<Action>,
    ) {
        self.book
            .gossip(now, source, message_id, data, &self.metrics, out);
    }

    /// A store job finished.
    pub fn job_done(&mut self, now: u64, done: JobDone, view: &dyn View, out: &mut Vec<Action>) {
        let mark = out.len();
        match done {
            JobDone::Many(all) => {
                for d in all {
                    self.job_done(now, d, view, out);
                }
            }
            JobDone::Stored {
                peer,
                id,
                outcome,
                routed,
            } => {
                let m = out.len();
                self.inbound
                    .stored(peer, id, outcome, routed, &mut self.dedup, out);
                self.onion.answers(m, out);
            }
            JobDone::Learned {
                relays,
                gossip,
                new_relay,
                news,
                from,
                unstored,
                topology,
            } => {
                self.book.unstored(&unstored);
                for (p, n) in topology {
                    self.forward.learn_node(p, n);
                }
                tracing::debug!(
                    ?from,
                    learned = relays.len(),
                    gossip = gossip.is_some(),
                    "records learned"
                );
                if let Some((message_id, source, acceptance)) = gossip {
                    out.push(Action::ReportGossip {
                        message_id,
                        source,
                        acceptance,
                    });
                }
                if !news.is_empty() {
                    let n = self.announce.news(now, from, news, &view.peers(), out);
                    self.metrics.records_pushed.fetch_add(n as u64, Relaxed);
                }
                if new_relay {
                    // Relays new to us: others may be missing them (or
                    // have more), so reconcile soon.
                    self.ae.changed();
                }
                let mut candidates = Vec::new();
                let mut connected = Vec::new();
                for (peer, addrs, ts) in relays {
                    if let Some(k) = RelayKey::from_peer(&peer) {
                        self.book.note(k.0, ts);
                        self.held.stored(k.0, ts);
                        // A relay we are connected to whose record just
                        // arrived: noted as connected now, not in ten minutes.
                        if view.stream_open(&peer) {
                            connected.push(k);
                        }
                    }
                    for a in &addrs {
                        out.push(Action::KadAddAddress {
                            peer,
                            addr: a.clone(),
                        });
                    }
                    candidates.push((peer, addrs));
                }
                self.note_connected(connected, out);
                let start = self.rng.next_u32() as usize;
                self.dials.discovered(now, candidates, start, view, out);
            }
            JobDone::Send { peer, frames } => {
                self.ae.served(peer);
                for frame in frames {
                    out.push(Action::Send { peer, frame });
                }
            }
            JobDone::ServeDone(peer) => self.ae.served(peer),
            JobDone::Held(entries) => self.held.loaded(entries),
            JobDone::Kept(kept) => {
                let mut cx = Ctx {
                    view,
                    dedup: &mut self.dedup,
                    m: &self.metrics,
                    out,
                };
                for (id, mailbox) in kept {
                    self.forward.kept(id, mailbox, &mut cx);
                }
            }
            JobDone::Compared {
                peer,
                want,
                next_after,
            } => {
                tracing::debug!(%peer, want = want.len(), "anti-entropy page compared");
                self.ae.compared(peer, want, next_after, out)
            }
            JobDone::Addrs { peer, addrs, node } => {
                if let Some(n) = node {
                    self.forward.learn_node(peer, n);
                }
                self.dials.addrs(peer, addrs, out)
            }
            JobDone::Discovered(relays) => {
                let start = self.rng.next_u32() as usize;
                let candidates = relays.into_iter().map(|(p, a, _)| (p, a)).collect();
                self.dials.discovered(now, candidates, start, view, out);
            }
        }
        self.route_actions(now, view, out, mark);
    }

    /// A device of ours wants a bundle from relay `home`: the request id
    /// (`None`: too many in flight, or `home` is not a relay key).
    pub fn claim(
        &mut self,
        now: u64,
        home: RelayKey,
        namespace: String,
        identity: [u8; 32],
        view: &dyn View,
        out: &mut Vec<Action>,
    ) -> Option<u64> {
        let mark = out.len();
        let Some(target) = home.to_peer() else {
            self.metrics.claims_failed.fetch_add(1, Relaxed);
            return None;
        };
        let way = if view.stream_open(&target) {
            claims::Way::Open
        } else {
            match self.forward.path(&view.peers(), target, &[], &self.metrics) {
                Some(path) => claims::Way::Through(path),
                None => claims::Way::Reach,
            }
        };
        let Some(req) = self
            .claims
            .request(now, target, namespace, identity, way, out)
        else {
            self.metrics.claims_failed.fetch_add(1, Relaxed);
            return None;
        };
        self.metrics.claims_sent.fetch_add(1, Relaxed);
        self.route_actions(now, view, out, mark);
        Some(req)
    }

    /// The DHT found relays.
    pub fn kad_found(&mut self, found: Vec<(PeerId, Vec<Multiaddr>)>, out: &mut Vec<Action>) {
        self.dials.kad_found(found, out);
    }

    /// Timers: our record, bootstrap, resends, anti-entropy, discovery.
    /// `listen` and `external` are our current addresses.
    pub fn tick(
        &mut self,
        now: u64,
        listen: &[Multiaddr],
        external: &[Multiaddr],
        view: &dyn View,
        out: &mut Vec<Action>,
    ) {
        let mark = out.len();
        if !self.enabled {
            return;
        }
        self.dedup.evict(now);
        self.claims.tick(now);
        self.transit.tick(now, &self.metrics, out);
        self.onion.tick(now, &self.metrics, out);
        if self.transit_only {
            // Our uplinks are where we are reached: our record names them
            // as anchors (we hold no reservations and have no circuit
            // address, so other relays send to us through them).
            let uplinks: Vec<[u8; 32]> = self
                .dials
                .bootstrap_peers()
                .filter(|p| view.stream_open(p))
                .filter_map(key_of)
                .collect();
            self.own.set_anchors(uplinks);
        }
        self.held.tick(now, out);
        self.flush_marks(out);
        let addrs = self
            .external
            .iter()
            .chain(external)
            .chain(listen)
            .map(|a| a.to_vec())
            .collect::<Vec<_>>();
        self.own.maintain(now, addrs, &self.metrics, out);
        if let Some(ts) = self.own.timestamp()
            && ts != self.own_held_ts
        {
            // Our own record is in the book too (its store job is queued).
            self.own_held_ts = ts;
            self.held.stored(self.key().0, ts);
        }
        if let Some(r) = self.own.take_change() {
            self.announce.own(r.into(), &view.peers(), out);
        }
        self.dials.tick(now, view, out);
        self.forward.tick(
            now,
            &mut Ctx {
                view,
                dedup: &mut self.dedup,
                m: &self.metrics,
                out,
            },
        );
        let peers = view.peers();
        if self.ae.tick(now, &peers, &self.metrics, out) {
            // Relays we are connected to stay proven in the book: noted
            // when their stream opens and then every MARK_EVERY_MS, all in
            // one store job.
            let mut due = Vec::new();
            for p in &peers {
                if let Some(k) = RelayKey::from_peer(p) {
                    let last = self.marked.entry(k).or_insert(0);
                    if now.saturating_sub(*last) >= MARK_EVERY_MS {
                        *last = now;
                        due.push(k);
                    }
                }
            }
            if !due.is_empty() {
                out.push(Action::Job(Job::MarkConnected(due)));
            }
            let cursor = self.random_cursor();
            out.push(Action::Job(Job::Discover {
                want_peers: self.dials.wants_more(view),
                cursor,
            }));
        }
        self.route_actions(now, view, out, mark);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashSet;

    /// The relay of `seed` (its PeerId) and its record signed at `ts`,
    /// encoded.
    pub(crate) fn signed_record(seed: u8, ts: u64) -> (PeerId, Vec<u8>) {
        use meshwhisper_crypto::address_record::{AddressRecord, Contents};
        let id = IdentityKeyPair::from_seed(&[seed; 32]);
        let peer = RelayKey(id.public().to_bytes())
            .to_peer()
            .expect("ed25519 peer id");
        let record = AddressRecord::sign(
            &id,
            Contents {
                timestamp_ms: ts,
                onion_key: id.public().x25519(),
                addrs: vec![b"/ip4/1.2.3.4".to_vec()],
                anchors: Vec::new(),
            },
        )
        .expect("sign")
        .encode();
        (peer, record)
    }

    /// A network of our making: these streams are open (and their peers
    /// admitted and connected), these destinations homed.
    #[derive(Debug, Default)]
    pub(crate) struct FakeView {
        pub streams: Vec<PeerId>,
        pub homed: HashSet<DestHash>,
    }

    impl FakeView {
        pub fn with_streams(peers: &[PeerId]) -> Self {
            Self {
                streams: peers.to_vec(),
                homed: HashSet::new(),
            }
        }
    }

    impl View for FakeView {
        fn is_admitted(&self, p: &PeerId) -> bool {
            self.streams.contains(p)
        }
        fn stream_open(&self, p: &PeerId) -> bool {
            self.streams.contains(p)
        }
        fn is_connected(&self, p: &PeerId) -> bool {
            self.streams.contains(p)
        }
        fn admitted_count(&self) -> usize {
            self.streams.len()
        }
        fn has_room(&self) -> bool {
            true
        }
        fn peers(&self) -> Vec<PeerId> {
            self.streams.clone()
        }
        fn is_homed(&self, d: &DestHash) -> bool {
            self.homed.contains(d)
        }
    }

    fn fed(seed: u8) -> Federation {
        let cfg = config::Federation::default();
        Federation::new(
            &cfg,
            IdentityKeyPair::from_seed(&[seed; 32]),
            1000,
            Arc::new(FederationMetrics::default()),
            [seed; 32],
        )
    }

    /// A stored copy goes out under the same id after a restart (a new
    /// `Federation` with the same identity and another random seed), and
    /// only that copy of that packet does.
    #[test]
    fn a_stored_copy_keeps_its_packet_id_across_restarts() {
        let packet = vec![3u8; 300];
        let before = fed(1);
        let mut after = fed(1);
        after.rng = <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::from_seed([77; 32]);
        let id = before.copy_id(MailboxId(5), &packet);
        assert_eq!(after.copy_id(MailboxId(5), &packet), id);
        assert_ne!(after.copy_id(MailboxId(6), &packet), id, "another copy");
        let mut other = packet.clone();
        other[299] = 4;
        assert_ne!(after.copy_id(MailboxId(5), &other), id, "the id used again");
        assert_ne!(fed(2).copy_id(MailboxId(5), &packet), id, "another relay");
        // A packet held in memory only gets a fresh random id.
        assert_ne!(after.random_id(), after.random_id());
    }

    /// A gossiped record whose store job found no room: its message is
    /// reported (ignored, not left pending) and the next copy is stored.
    #[test]
    fn a_refused_record_job_is_reported_and_the_next_copy_learned() {
        let now = 1_800_000_000_000;
        let mut a = fed(1);
        let (_, record) = signed_record(9, now);
        let source = PeerId::random();
        let id = libp2p::gossipsub::MessageId::from(&b"m1"[..]);
        let mut out = Vec::new();
        a.gossip(now, source, id.clone(), record.clone(), &mut out);
        let Some(Action::Job(job @ Job::Learn { .. })) = out.pop() else {
            panic!("a store job: {out:?}");
        };
        a.job_refused(job, &mut out);
        assert!(matches!(
            &out[..],
            [Action::ReportGossip { message_id, source: s, acceptance: libp2p::gossipsub::MessageAcceptance::Ignore }]
                if *message_id == id && *s == source
        ));
        out.clear();
        a.gossip(now, source, id, record, &mut out);
        assert!(
            matches!(&out[..], [Action::Job(Job::Learn { .. })]),
            "{out:?}"
        );
    }

    /// Streams that open between two ticks are noted as connected in the
    /// book by one store job at the next tick, each relay once.
    #[test]
    fn relays_connected_between_ticks_are_marked_in_one_job() {
        let mut a = fed(1);
        let peers: Vec<PeerId> = (10..30u8).map(|s| fed(s).me()).collect();
        let view = FakeView::with_streams(&peers);
        let marks = |out: &[Action]| -> Vec<Vec<RelayKey>> {
            out.iter()
                .filter_map(|a| match a {
                    Action::Job(Job::MarkConnected(k)) => Some(k.clone()),
                    _ => None,
                })
                .collect()
        };
        let mut out = Vec::new();
        for p in &peers {
            a.stream_opened(0, *p, &view, &mut out);
        }
        // A second stream of one of them changes nothing.
        a.stream_opened(1, peers[0], &view, &mut out);
        assert!(marks(&out).is_empty(), "no store write per stream");
        out.clear();
        a.tick(2, &[], &[], &view, &mut out);
        let jobs = marks(&out);
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        let mut want: Vec<RelayKey> = peers.iter().filter_map(RelayKey::from_peer).collect();
        want.sort_unstable_by_key(|k| k.0);
        assert_eq!(jobs[0], want);
        out.clear();
        a.tick(3, &[], &[], &view, &mut out);
        assert!(marks(&out).is_empty(), "noted once");
    }

    /// With the book held in memory a digest page is compared at once,
    /// and a record already on its way to the store is not asked for again.
    #[test]
    fn digest_pages_are_compared_in_memory_without_refetching() {
        let now = 1_800_000_000_000;
        let mut a = fed(1);
        let (p, other) = (fed(2).me(), fed(3).me());
        let view = FakeView::with_streams(&[p]);
        let mut out = Vec::new();
        a.job_done(now, JobDone::Held(Some(Vec::new())), &view, &mut out);
        // A record arrives by gossip; its store job has not finished.
        let (rp, record) = signed_record(9, now);
        let id = libp2p::gossipsub::MessageId::from(&b"m"[..]);
        a.gossip(now, other, id, record, &mut out);
        out.clear();
        let known = RelayKey::from_peer(&rp).expect("key").0;
        let fresh = [7u8; 32];
        a.frame(
            now,
            p,
            Frame::Digest {
                req: 1,
                more: false,
                entries: vec![(known, now), (fresh, now)],
            },
            &view,
            &mut out,
        );
        let pulls: Vec<&Vec<[u8; 32]>> = out
            .iter()
            .filter_map(|a| match a {
                Action::Send {
                    frame: Frame::Pull { keys, .. },
                    ..
                } => Some(keys),
                _ => None,
            })
            .collect();
        assert_eq!(pulls, vec![&vec![fresh]], "{out:?}");
        assert!(
            !out.iter()
                .any(|a| matches!(a, Action::Job(Job::CompareDigest { .. }))),
            "no store job"
        );
    }

    /// Two relays wired back to back through their actions: a routed
    /// packet, its ack, the deletion and the forget, with no Swarm.
    #[test]
    fn two_relays_route_a_packet_and_complete_it() {
        let mut a = fed(1);
        let mut b = fed(2);
        let (pa, pb) = (a.me(), b.me());
        let view_a = FakeView::with_streams(&[pb]);
        let mut view_b = FakeView::with_streams(&[pa]);
        let dest = DestHash([3; 8]);
        view_b.homed.insert(dest);
        let packet = bytes::Bytes::from(meshwhisper_behaviour::packet::build(
            1, dest, [0; 16], 7, b"x",
        ));
        let mut out = Vec::new();
        a.outbound(
            0,
            Federate {
                mailbox_id: Some(meshwhisper_storage::mailbox::MailboxId(9)),
                dest,
                packet,
                hint: Some(b.key().0),
                deadline_ms: 1_000_000,
            },
            &view_a,
            &mut out,
        );
        let Some(Action::Send { peer, frame }) = out.pop() else {
            panic!("a routed frame");
        };
        assert_eq!(peer, pb);
        let mut out_b = Vec::new();
        b.frame(1, pa, frame, &view_b, &mut out_b);
        let Some(Action::Job(Job::Store { packets, .. })) = out_b.pop() else {
            panic!("stored at b");
        };
        let (id, routed) = (packets[0].id, packets[0].routed);
        assert!(routed);
        b.job_done(
            2,
            JobDone::Stored {
                peer: pa,
                id,
                outcome: StoreOutcome::Stored,
                routed,
            },
            &view_b,
            &mut out_b,
        );
        let Some(Action::Send { frame: ack, .. }) = out_b.pop() else {
            panic!("an ack");
        };
        let mut out = Vec::new();
        a.frame(3, pb, ack, &view_a, &mut out);
        assert!(matches!(&out[0], Action::Job(Job::Delete(ids)) if ids.len() == 1));
        assert_eq!(a.forward.pending_len(), 0);
        out.clear();
        a.tick(4, &[], &[], &view_a, &mut out);
        assert!(out.iter().any(|x| matches!(x, Action::Send { peer, frame: Frame::Forget { ids } } if *peer == pb && ids == &vec![id])));
    }
}
