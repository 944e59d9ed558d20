//! Packets this relay sends to other relays.
//!
//! A packet whose recipient is homed elsewhere is **routed** when a home
//! relay is known — named by the sender (a `route` hint, a device's
//! `PacketTo`, the stored copy's route after a restart) or learned from an
//! earlier `Stored` ack for the same destination — and **flooded**
//! otherwise. Routed packets go out over a per-target send window, in
//! arrival order, with an ordered backlog; a packet is resent only when its
//! stream is lost, the target refused it, or no ack came within
//! `ack_timeout`. A flood is retried with the same id and a higher
//! `attempt` (relays let a new attempt through; the home relay stores the
//! id once). The home relay's `Stored` ack completes a packet: our stored
//! copy goes, the destination's home is learned, and the home relay is
//! told it may forget the id.
//!
//! A packet a WebSocket client sent for a relay that is up may come
//! **unstored** (`Federate::mailbox_id` is `None`): it is held here in
//! memory only, and stored here after all (`KeepCopy`, with its route) the
//! moment anything but a prompt `Stored` ack happens to it: it could not
//! be sent at once, its stream closed, the frame was not queued, its ack
//! is late, or the relay refused it or does not home the recipient. The
//! packet goes on being forwarded meanwhile under the same id; a `Stored`
//! ack that comes while its copy is being written deletes the copy once
//! it is written.
//!
//! A hint can be stale: a home relay that does not home the recipient
//! answers `NotHome`, and the packet is flooded instead; if no relay claims
//! it, it goes back to the named relay to be stored there anyway (the
//! recipient may simply not have connected yet).
//!
//! Pure state: time, randomness and the network are passed in.

use super::action::{Action, Job};

use super::Ctx;
use crate::core::Federate;

use bytes::Bytes;
use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};
use libp2p::PeerId;
use meshwhisper_behaviour::federation::codec::{AckStatus, Frame, PacketId, ROUTED_STORE_ANYWAY};
use meshwhisper_behaviour::relay_key::{PeerMap, RelayKey};
use meshwhisper_crypto::destination::DestHash;
use meshwhisper_storage::mailbox::MailboxId;
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;

/// Relay keys whose PeerIds are remembered.
const PEER_CACHE: usize = 4096;

/// Bounds and timing (from `[federation]`).
#[derive(Debug, Clone, Copy)]
pub struct ForwardConfig {
    /// Routed packets in flight to one relay.
    pub send_window: usize,
    /// Resend and dial backoff base, ms.
    pub retry_ms: u64,
    /// Re-flood delay base, ms (doubling).
    pub flood_retry_ms: u64,
    /// Floods of one packet before it goes back to a named relay, or stays here.
    pub flood_attempts: u8,
    /// Packets waiting for an ack.
    pub max_pending: usize,
    /// Their bytes.
    pub max_pending_bytes: usize,
    /// Packets waiting for one relay that is being reached.
    pub dial_queue: usize,
    /// Packets waiting for one relay's ack (its stream open).
    pub max_per_relay: usize,
    /// A routed packet on a live stream is resent after this long without
    /// an ack, ms.
    pub ack_timeout_ms: u64,
    /// Destinations whose home relay is remembered from acks.
    pub learned_routes: usize,
    /// Ids per Forget frame.
    pub forget_batch: usize,
    /// Never dial a target: send through a connected relay (Transit).
    pub transit_only: bool,
    /// Most relays on a transit path (`federation.transit_hops`).
    pub transit_hops: usize,
    /// Extra relays on an onion path; 0: no onions
    /// (`federation.onion_transit`, `federation.onion_hops`).
    pub onion_hops: usize,
}

/// A relay's place in [`Relays`]. Pending packets name their relay by it:
/// a step then costs an index, not the hashing and comparing of an
/// 80-byte PeerId, and a pending packet stays small (this state is walked
/// once or twice per packet, at full speed).
type Slot = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// To this relay.
    Routed { to: Slot, store_anyway: bool },
    /// To every peer; back to `fallback` (a stale hint) if nobody claims it.
    Flood { fallback: Option<Slot> },
}

impl Mode {
    /// The relay this packet names (holding a reference to its slot).
    fn named(self) -> Option<Slot> {
        match self {
            Mode::Routed { to, .. } => Some(to),
            Mode::Flood { fallback } => fallback,
        }
    }

    fn routed_to(self) -> Option<Slot> {
        match self {
            Mode::Routed { to, .. } => Some(to),
            Mode::Flood { .. } => None,
        }
    }
}

/// Where a pending packet's copy is, besides in [`Pending::packet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copy {
    /// Stored here under this id.
    Stored(MailboxId),
    /// Nowhere else yet: lost if this relay stops before its home relay
    /// stores it (or before it is kept).
    Memory,
    /// Being stored here (a `KeepCopy` job is out).
    Keeping,
}

/// A packet to store here after all: `id` names the pending packet that
/// goes on being forwarded (`None`: it is not pending, the copy only stays).
#[derive(Debug, Clone)]
pub struct Keep {
    /// The pending packet, if it still is.
    pub id: Option<PacketId>,
    /// The packet.
    pub packet: Bytes,
    /// The home relay the sender named (kept with the copy).
    pub route: [u8; 32],
}

#[derive(Debug)]
struct Pending {
    /// Arrival order (packets to one relay go out in this order).
    seq: u64,
    copy: Copy,
    dest: DestHash,
    packet: Bytes,
    mode: Mode,
    deadline_ms: u64,
    next_ms: u64,
    /// Floods sent (the backoff grows with each).
    attempt: u8,
    /// Waiting in its target's backlog for room in the window.
    backlogged: bool,
    /// Sent and counted in its target's window (until acked or given up).
    in_window: bool,
    /// The stream generation a routed packet was last sent on, and when.
    sent: Option<(u64, u64)>,
}

/// What the sender keeps per relay (its window, backlog, stream generation
/// and forgets). Kept while a pending packet names it or ids are to be
/// forgotten there.
#[derive(Debug)]
struct Relay {
    peer: PeerId,
    key: RelayKey,
    /// Pending packets that name it (routed to it, or falling back to it).
    refs: usize,
    /// Pending packets routed to it.
    queued: usize,
    /// Of those, sent and not yet acknowledged (the packets themselves
    /// are marked `in_window`).
    inflight: usize,
    /// Packets waiting for room in the window, in order.
    backlog: VecDeque<PacketId>,
    /// Its stream generation (bumped when its stream opens or closes).
    generation: u64,
    /// Ids to tell it it may forget.
    forget: Vec<PacketId>,
}

/// The relays pending packets name, by slot (freed slots are reused).
#[derive(Debug, Default)]
struct Relays {
    slots: Vec<Option<Relay>>,
    free: Vec<Slot>,
    by_peer: PeerMap<Slot>,
    by_key: HashMap<RelayKey, Slot>,
}

impl Relays {
    fn get(&self, s: Slot) -> Option<&Relay> {
        self.slots.get(s as usize).and_then(Option::as_ref)
    }

    fn get_mut(&mut self, s: Slot) -> Option<&mut Relay> {
        self.slots.get_mut(s as usize).and_then(Option::as_mut)
    }

    fn is(&self, s: Slot, peer: &PeerId) -> bool {
        self.get(s).is_some_and(|r| r.peer == *peer)
    }

    fn key(&self, s: Slot) -> Option<RelayKey> {
        self.get(s).map(|r| r.key)
    }

    fn of_peer(&self, peer: &PeerId) -> Option<Slot> {
        self.by_peer.get(peer).copied()
    }

    fn of_key(&self, key: &RelayKey) -> Option<Slot> {
        self.by_key.get(key).copied()
    }

    /// The slot of relay `key` (`peer`), made if it has none.
    fn slot(&mut self, peer: PeerId, key: RelayKey) -> Slot {
        if let Some(s) = self.of_key(&key) {
            return s;
        }
        let r = Relay {
            peer,
            key,
            refs: 0,
            queued: 0,
            inflight: 0,
            backlog: VecDeque::new(),
            generation: 0,
            forget: Vec::new(),
        };
        let s = match self.free.pop() {
            Some(s) => {
                if let Some(slot) = self.slots.get_mut(s as usize) {
                    *slot = Some(r);
                }
                s
            }
            None => {
                self.slots.push(Some(r));
                (self.slots.len() - 1) as Slot
            }
        };
        self.by_peer.insert(peer, s);
        self.by_key.insert(key, s);
        s
    }

    /// Frees `s` if nothing names it and it has nothing to send (its
    /// backlog then holds only ids already done).
    fn release_if_unused(&mut self, s: Slot) {
        let Some(slot) = self.slots.get_mut(s as usize) else {
            return;
        };
        if slot
            .as_ref()
            .is_some_and(|r| r.refs == 0 && r.forget.is_empty())
            && let Some(r) = slot.take()
        {
            self.by_peer.remove(&r.peer);
            self.by_key.remove(&r.key);
            self.free.push(s);
        }
    }

    /// A pending packet no longer names `s`.
    fn unref(&mut self, s: Slot) {
        if let Some(r) = self.get_mut(s) {
            r.refs = r.refs.saturating_sub(1);
        }
        self.release_if_unused(s);
    }

    fn iter(&self) -> impl Iterator<Item = (Slot, &Relay)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().map(|r| (i as Slot, r)))
    }
}

/// The sending side of federation.
#[derive(Debug)]
pub struct Forward {
    cfg: ForwardConfig,
    me: RelayKey,
    pending: HashMap<PacketId, Pending>,
    next_seq: u64,
    /// The relays pending packets name.
    relays: Relays,
    /// Stored copies with a pending packet (one federation per copy).
    by_mailbox: HashSet<MailboxId>,
    pending_bytes: usize,
    /// Home relays learned from `Stored` acks, by destination.
    routes: hashlink::LruCache<DestHash, RelayKey, foldhash::fast::RandomState>,
    /// PeerIds of relay keys (validating a key costs tens of microseconds).
    peers: hashlink::LruCache<RelayKey, Option<PeerId>, foldhash::fast::RandomState>,
    /// A packet found no room since the last [`Forward::take_overflow`].
    overflow: bool,
    /// Packets acked while their copy was being kept: the copy goes once
    /// it is written.
    drop_when_kept: HashSet<PacketId>,
    /// Packets whose `KeepCopy` job is out (destination and bytes): a
    /// stored copy handed back to us before the job reports (a walk of
    /// the store after an overflow) is recognised as theirs.
    keeping: HashMap<PacketId, (DestHash, Bytes)>,
    /// Copies whose `KeepCopy` job the workers refused (sent again each tick).
    unkept: Vec<Keep>,
    /// Relays whose queue was full when a packet for them came: their
    /// stored packets are not handed back until they are under half.
    full: HashMap<PeerId, RelayKey>,
    /// Packets last sent through another relay (transit-only), by id:
    /// their acks come from it.
    vias: HashMap<PacketId, PeerId>,
    /// Carriers that failed a packet (`NoPath`, a closed stream): the next
    /// path avoids them (at most [`MAX_AVOID`] each).
    avoid: HashMap<PacketId, Vec<PeerId>>,
    /// How relays are reached, from their records (anchors, dialable).
    topo: hashlink::LruCache<PeerId, super::transit::Node, foldhash::fast::RandomState>,
    /// Randomness for onions (ephemeral keys, paths, hop ids).
    onion_rng: rand_chacha::ChaCha20Rng,
    /// Onions we sent, by their hop id: the answer names the packet.
    onion_mine: hashlink::LruCache<[u8; 16], PacketId, foldhash::fast::RandomState>,
}

/// Carriers remembered as failed per packet (then the oldest is tried again).
const MAX_AVOID: usize = 4;

type Topo = hashlink::LruCache<PeerId, super::transit::Node, foldhash::fast::RandomState>;

/// An onion path to `target`: a relay we have a stream to (not in
/// `avoid`), then `extra - 1` more relays from the book that anyone can
/// dial, all distinct and chosen at random, then `target`; each with its
/// onion key. `None` when the book does not know enough relays.
fn onion_path(
    extra: usize,
    topo: &Topo,
    rng: &mut rand_chacha::ChaCha20Rng,
    peers: &[PeerId],
    target: PeerId,
    avoid: &[PeerId],
) -> Option<Vec<(PeerId, meshwhisper_crypto::primitives::X25519Public)>> {
    let pick = |rng: &mut rand_chacha::ChaCha20Rng, n: usize| {
        (rand_core::Rng::next_u64(rng) % n.max(1) as u64) as usize
    };
    let key = |p: &PeerId| topo.peek(p).map(|n| n.onion_key);
    let firsts: Vec<PeerId> = peers
        .iter()
        .filter(|p| **p != target && !avoid.contains(p) && key(p).is_some())
        .copied()
        .collect();
    if firsts.is_empty() {
        return None;
    }
    let first = firsts[pick(rng, firsts.len())];
    let mut path = vec![(first, key(&first)?)];
    let mut others: Vec<PeerId> = topo
        .iter()
        .filter(|(p, n)| n.dialable && **p != target && **p != first)
        .map(|(p, _)| *p)
        .collect();
    for _ in 1..extra {
        if others.is_empty() {
            return None;
        }
        let next = others.swap_remove(pick(rng, others.len()));
        path.push((next, key(&next)?));
    }
    path.push((target, key(&target)?));
    Some(path)
}

/// The onion layer of `routed` for `hops` (the home relay last).
fn build_onion(
    rng: &mut rand_chacha::ChaCha20Rng,
    hops: &[(PeerId, meshwhisper_crypto::primitives::X25519Public)],
    routed: Frame,
) -> Option<Bytes> {
    use meshwhisper_crypto::onion::{Hop, OnionBuilder as _, v2};
    let hops: Vec<Hop> = hops
        .iter()
        .map(|(p, k)| {
            Some(Hop {
                relay_key: RelayKey::from_peer(p)?.0,
                onion_key: *k,
            })
        })
        .collect::<Option<_>>()?;
    let payload = super::onion::encode(routed);
    v2::Sender.build(rng, &hops, &payload).ok().map(Bytes::from)
}

/// See [`Forward::path`].
fn find_path(
    cfg: &ForwardConfig,
    topo: &hashlink::LruCache<PeerId, super::transit::Node, foldhash::fast::RandomState>,
    peers: &[PeerId],
    target: PeerId,
    avoid: &[PeerId],
    m: &crate::metrics::FederationMetrics,
) -> Option<Vec<PeerId>> {
    let dialable = topo.peek(&target).is_none_or(|n| n.dialable);
    if dialable && !cfg.transit_only {
        return None;
    }
    m.paths_searched.fetch_add(1, Relaxed);
    super::transit::search(
        peers,
        target,
        |p| topo.peek(p).cloned(),
        avoid,
        cfg.transit_hops,
    )
}

impl Forward {
    /// A sender for the relay `me`.
    pub fn new(cfg: ForwardConfig, me: RelayKey) -> Self {
        Self {
            routes: hashlink::LruCache::with_hasher(
                cfg.learned_routes.max(1),
                foldhash::fast::RandomState::default(),
            ),
            peers: hashlink::LruCache::with_hasher(
                PEER_CACHE,
                foldhash::fast::RandomState::default(),
            ),
            cfg,
            me,
            pending: HashMap::new(),
            relays: Relays::default(),
            next_seq: 0,
            by_mailbox: HashSet::new(),
            pending_bytes: 0,
            overflow: false,
            drop_when_kept: HashSet::new(),
            keeping: HashMap::new(),
            full: HashMap::new(),
            unkept: Vec::new(),
            vias: HashMap::new(),
            avoid: HashMap::new(),
            topo: hashlink::LruCache::with_hasher(
                PEER_CACHE,
                foldhash::fast::RandomState::default(),
            ),
            onion_rng: <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::from_seed([0; 32]),
            onion_mine: hashlink::LruCache::with_hasher(
                cfg.max_pending.max(1),
                foldhash::fast::RandomState::default(),
            ),
        }
    }

    /// Seeds the randomness onions are built with (before the first).
    pub fn seed_onions(&mut self, seed: [u8; 32]) {
        self.onion_rng = <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::from_seed(seed);
    }

    /// The packet an `OnionAck` under `hop` answers, if it is one of ours.
    pub fn onion_answer(&mut self, hop: &[u8; 16]) -> Option<PacketId> {
        self.onion_mine.remove(hop)
    }

    /// What `peer`'s record says about reaching it.
    pub fn learn_node(&mut self, peer: PeerId, node: super::transit::Node) {
        self.topo.insert(peer, node);
    }

    /// A path to `target` through relays we have streams to (`peers`), if
    /// we must not or cannot dial it: we are transit-only, or its record
    /// says only its anchors reach it.
    pub fn path(
        &self,
        peers: &[PeerId],
        target: PeerId,
        avoid: &[PeerId],
        m: &crate::metrics::FederationMetrics,
    ) -> Option<Vec<PeerId>> {
        find_path(&self.cfg, &self.topo, peers, target, avoid, m)
    }

    /// Routed packets sent on a stream that is still open and not yet
    /// acknowledged.
    pub fn in_flight(&self, view: &dyn super::View) -> usize {
        self.relays
            .iter()
            .filter(|(_, r)| view.stream_open(&r.peer))
            .map(|(_, r)| r.inflight)
            .sum()
    }

    /// Packets waiting for an ack.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Whether another packet fits.
    pub fn has_room(&self) -> bool {
        self.pending.len() < self.cfg.max_pending && self.pending_bytes < self.cfg.max_pending_bytes
    }

    /// How many more packets fit (by count).
    pub fn room(&self) -> usize {
        self.cfg.max_pending.saturating_sub(self.pending.len())
    }

    /// The stored copies with a packet pending here.
    pub fn pending_mailboxes(&self) -> HashSet<MailboxId> {
        self.by_mailbox.clone()
    }

    /// Relays whose stored packets are not to be handed back yet (their
    /// queue was full and is not under half of it).
    pub fn full_relays(&self) -> HashSet<[u8; 32]> {
        self.full.values().map(|k| k.0).collect()
    }

    /// Whether a packet found no room since the last call (its stored copy
    /// stays here, to be handed back once there is room).
    pub fn take_overflow(&mut self) -> bool {
        std::mem::take(&mut self.overflow)
    }

    /// The slot of relay key `k` (`None`: not an Ed25519 key).
    fn slot_of(&mut self, k: RelayKey) -> Option<Slot> {
        if let Some(s) = self.relays.of_key(&k) {
            return Some(s);
        }
        let p = match self.peers.get(&k) {
            Some(p) => *p,
            None => {
                let p = k.to_peer();
                self.peers.insert(k, p);
                p
            }
        };
        p.map(|p| self.relays.slot(p, k))
    }

    /// The home relay learned for `dest`, if any.
    pub fn learned_route(&mut self, dest: &DestHash) -> Option<RelayKey> {
        self.routes.get(dest).copied()
    }

    fn take_pending(&mut self, id: &PacketId) -> Option<Pending> {
        if !self.vias.is_empty() {
            self.vias.remove(id);
        }
        if !self.avoid.is_empty() {
            self.avoid.remove(id);
        }
        let p = self.pending.remove(id)?;
        self.pending_bytes = self.pending_bytes.saturating_sub(p.packet.len());
        if let Copy::Stored(m) = p.copy {
            self.by_mailbox.remove(&m);
        }
        if let Mode::Routed { to, .. } = p.mode {
            self.unqueue(to, p.in_window);
        }
        if let Some(s) = p.mode.named() {
            self.relays.unref(s);
        }
        Some(p)
    }

    /// A packet for `to` is no longer queued for it (and no longer in
    /// its window, if it was).
    fn unqueue(&mut self, to: Slot, in_window: bool) {
        let Some(r) = self.relays.get_mut(to) else {
            return;
        };
        r.queued = r.queued.saturating_sub(1);
        if in_window {
            r.inflight = r.inflight.saturating_sub(1);
        }
        if !self.full.is_empty()
            && r.queued <= self.cfg.max_per_relay.min(self.cfg.dial_queue) / 2
            && self.full.remove(&r.peer).is_some()
        {
            // Room for what stayed stored for it.
            self.overflow = true;
        }
    }

    fn leave_window(&mut self, to: Slot) {
        if let Some(r) = self.relays.get_mut(to) {
            r.inflight = r.inflight.saturating_sub(1);
        }
    }

    /// A packet accepted here whose recipient is homed elsewhere.
    pub fn outbound(&mut self, now: u64, f: Federate, id: PacketId, cx: &mut Ctx<'_>) {
        if let Some(m) = f.mailbox_id
            && (self.by_mailbox.contains(&m) || self.is_being_kept(m, &f, cx))
        {
            // Already on its way (a restart's hand-back met a live one).
            return;
        }
        if !self.has_room() || self.pending_bytes + f.packet.len() > self.cfg.max_pending_bytes {
            // The stored copy stays here; it is handed back when room frees.
            cx.m.drops_queue_full.fetch_add(1, Relaxed);
            self.overflow = true;
            if f.mailbox_id.is_none() {
                self.keep(None, f.packet, f.hint, cx);
            }
            return;
        }
        let key = f
            .hint
            .map(RelayKey)
            .or_else(|| self.routes.get(&f.dest).copied());
        if key == Some(self.me) {
            // Named us: it is stored here already (or is now).
            if f.mailbox_id.is_none() {
                self.keep(None, f.packet, f.hint, cx);
            }
            return;
        }
        let to = key.and_then(|k| self.slot_of(k));
        if let Some(s) = to
            && let Some(r) = self.relays.get_mut(s)
        {
            // One look at the relay's record: full, or one more queued.
            let cap = if cx.view.stream_open(&r.peer) {
                self.cfg.max_per_relay
            } else {
                self.cfg.dial_queue
            };
            if r.queued >= cap {
                self.full.insert(r.peer, r.key);
                cx.m.drops_queue_full.fetch_add(1, Relaxed);
                self.overflow = true;
                self.relays.release_if_unused(s);
                if f.mailbox_id.is_none() {
                    self.keep(None, f.packet, f.hint, cx);
                }
                return;
            }
            r.queued += 1;
            r.refs += 1;
        }
        self.next_seq += 1;
        let mode = match to {
            Some(to) => Mode::Routed {
                to,
                store_anyway: false,
            },
            None => Mode::Flood { fallback: None },
        };
        self.pending_bytes += f.packet.len();
        let copy = match f.mailbox_id {
            Some(m) => {
                self.by_mailbox.insert(m);
                Copy::Stored(m)
            }
            None => Copy::Memory,
        };
        self.pending.insert(
            id,
            Pending {
                seq: self.next_seq,
                copy,
                dest: f.dest,
                packet: f.packet,
                mode,
                deadline_ms: f.deadline_ms,
                next_ms: now,
                attempt: 0,
                sent: None,
                backlogged: false,
                in_window: false,
            },
        );
        let on_its_way = self.dispatch(now, id, cx);
        if copy == Copy::Memory && !on_its_way {
            // Not on its way (nor next in line for a live stream): it
            // waits here, stored.
            self.keep_pending(id, cx);
        }
    }

    /// Asks for a packet to be stored here (`id`: the pending packet it is).
    fn keep(
        &mut self,
        id: Option<PacketId>,
        packet: Bytes,
        route: Option<[u8; 32]>,
        cx: &mut Ctx<'_>,
    ) {
        // Unstored packets always name their relay; without one the copy
        // is kept unrouted.
        let route = route.unwrap_or(self.me.0);
        cx.m.kept.fetch_add(1, Relaxed);
        cx.out
            .push(Action::Job(Job::KeepCopy(vec![Keep { id, packet, route }])));
    }

    /// Whether stored copy `m` of `f` is the copy a `KeepCopy` job wrote
    /// for a packet on its way (handed back before the job reported): then
    /// it is that packet's copy from now on (or deleted, if the packet was
    /// acked meanwhile), not a packet to send again under another id.
    fn is_being_kept(&mut self, m: MailboxId, f: &Federate, cx: &mut Ctx<'_>) -> bool {
        if self.keeping.is_empty() {
            return false;
        }
        let Some(id) = self
            .keeping
            .iter()
            .find(|(_, (dest, packet))| *dest == f.dest && *packet == f.packet)
            .map(|(id, _)| *id)
        else {
            return false;
        };
        self.keeping.remove(&id);
        if self.drop_when_kept.remove(&id) {
            cx.out.push(Action::Job(Job::Delete(vec![m])));
        } else if let Some(p) = self
            .pending
            .get_mut(&id)
            .filter(|p| p.copy == Copy::Keeping)
        {
            p.copy = Copy::Stored(m);
            self.by_mailbox.insert(m);
        }
        true
    }

    /// The key of the relay a packet in `mode` names, as a route to keep.
    fn route_of(&self, mode: Mode) -> Option<[u8; 32]> {
        mode.named().and_then(|s| self.relays.key(s)).map(|k| k.0)
    }

    /// Stores a pending packet held only in memory (no-op otherwise).
    fn keep_pending(&mut self, id: PacketId, cx: &mut Ctx<'_>) {
        let Some(p) = self.pending.get_mut(&id).filter(|p| p.copy == Copy::Memory) else {
            return;
        };
        p.copy = Copy::Keeping;
        let (mode, dest, packet) = (p.mode, p.dest, p.packet.clone());
        let route = self.route_of(mode);
        self.keeping.insert(id, (dest, packet.clone()));
        self.keep(Some(id), packet, route, cx);
    }

    /// A `KeepCopy` job stored `id`'s copy under `mailbox` (`None`: the
    /// store failed, and it is tried again at the next setback).
    pub fn kept(&mut self, id: PacketId, mailbox: Option<MailboxId>, cx: &mut Ctx<'_>) {
        if self.keeping.remove(&id).is_none() {
            // Recognised when its copy was handed back (or already done).
            return;
        }
        if self.drop_when_kept.remove(&id) {
            if let Some(m) = mailbox {
                cx.out.push(Action::Job(Job::Delete(vec![m])));
            }
            return;
        }
        if let Some(p) = self
            .pending
            .get_mut(&id)
            .filter(|p| p.copy == Copy::Keeping)
        {
            match mailbox {
                Some(m) => {
                    p.copy = Copy::Stored(m);
                    self.by_mailbox.insert(m);
                }
                None => p.copy = Copy::Memory,
            }
        }
        // Otherwise it was given up on (expired, refused as malformed):
        // the copy stays, as a stored packet's would.
    }

    /// A `KeepCopy` job the workers could not take: tried again next tick.
    pub fn keep_refused(&mut self, keeps: Vec<Keep>) {
        self.unkept.extend(keeps);
    }

    /// Every packet held only in memory (and copies not yet kept), to be
    /// stored before this relay stops.
    pub fn take_unstored(&mut self) -> Vec<Keep> {
        let mut all = std::mem::take(&mut self.unkept);
        for (id, p) in &mut self.pending {
            if p.copy == Copy::Memory {
                p.copy = Copy::Keeping;
                let route = p
                    .mode
                    .named()
                    .and_then(|s| self.relays.key(s))
                    .unwrap_or(self.me);
                all.push(Keep {
                    id: Some(*id),
                    packet: p.packet.clone(),
                    route: route.0,
                });
            }
        }
        all
    }

    /// Sends (or resends) a pending packet, or starts reaching its target.
    /// Whether it is on its way: sent, or next in line for its relay's
    /// window on a live stream.
    fn dispatch(&mut self, now: u64, id: PacketId, cx: &mut Ctx<'_>) -> bool {
        let Some(p) = self.pending.get_mut(&id) else {
            return false;
        };
        match p.mode {
            Mode::Routed { to, store_anyway } => {
                let Some(relay) = self.relays.get_mut(to) else {
                    return false;
                };
                let mut path = None;
                let mut onion = None;
                if self.cfg.onion_hops > 0 && self.topo.peek(&relay.peer).is_none_or(|n| n.dialable)
                {
                    // Through random relays, wrapped in layers: wait until
                    // the book knows enough of them (never in the clear).
                    cx.m.paths_searched.fetch_add(1, Relaxed);
                    let avoid = self.avoid.get(&id).map_or(&[][..], |v| v.as_slice());
                    onion = onion_path(
                        self.cfg.onion_hops,
                        &self.topo,
                        &mut self.onion_rng,
                        &cx.view.peers(),
                        relay.peer,
                        avoid,
                    );
                    if onion.is_none() {
                        // Its record (and onion key) may not be known yet:
                        // looked up (and dialled, unless transit-only).
                        p.next_ms = now + self.cfg.retry_ms;
                        cx.out.push(Action::Reach(relay.peer));
                        return false;
                    }
                } else if !cx.view.stream_open(&relay.peer) {
                    // Through relays we are connected to, when we may not
                    // or cannot dial it (a new path each time one failed).
                    let avoid = self.avoid.get(&id).map_or(&[][..], |v| v.as_slice());
                    path = find_path(
                        &self.cfg,
                        &self.topo,
                        &cx.view.peers(),
                        relay.peer,
                        avoid,
                        cx.m,
                    );
                    if !self.cfg.transit_only {
                        // Dialled too: a direct stream is better from then on.
                        cx.out.push(Action::Reach(relay.peer));
                    }
                    if path.is_none() {
                        p.next_ms = now + self.cfg.retry_ms;
                        return false;
                    }
                }
                let generation = relay.generation;
                if p.sent.is_some_and(|(g, at)| {
                    g == generation && now < at.saturating_add(self.cfg.ack_timeout_ms)
                }) {
                    // On its way over a live stream: wait for the ack.
                    p.next_ms = now + self.cfg.retry_ms;
                    return true;
                }
                if relay.inflight >= self.cfg.send_window && !p.in_window {
                    // The window is full: wait in order for an ack.
                    if !p.backlogged {
                        p.backlogged = true;
                        relay.backlog.push_back(id);
                    }
                    p.next_ms = now + self.cfg.ack_timeout_ms;
                    return true;
                }
                if !p.in_window {
                    relay.inflight += 1;
                    p.in_window = true;
                }
                p.backlogged = false;
                if p.sent.is_some() {
                    cx.m.retries.fetch_add(1, Relaxed);
                }
                p.sent = Some((generation, now));
                p.next_ms = now + self.cfg.retry_ms;
                cx.m.forwards_sent.fetch_add(1, Relaxed);
                cx.m.routed_forwards.fetch_add(1, Relaxed);
                let frame = Frame::Routed {
                    id,
                    flags: if store_anyway { ROUTED_STORE_ANYWAY } else { 0 },
                    hops: 1,
                    target: relay.key.0,
                    packet: p.packet.clone(),
                };
                let wrapped = match onion {
                    Some(hops) => {
                        let layer = build_onion(&mut self.onion_rng, &hops, frame.clone());
                        let first = hops.first().map(|(p, _)| *p);
                        match (layer, first) {
                            (Some(layer), Some(first)) => {
                                let mut hop = [0u8; 16];
                                rand_core::Rng::fill_bytes(&mut self.onion_rng, &mut hop);
                                self.onion_mine.insert(hop, id);
                                cx.m.onion_sent.fetch_add(1, Relaxed);
                                Some((first, Frame::Onion { hop, layer }))
                            }
                            _ => None,
                        }
                    }
                    None => path.and_then(|p| super::transit::wrap_path(&p, frame.clone())),
                };
                match wrapped {
                    Some((v, wrapped)) => {
                        if !matches!(wrapped, Frame::Onion { .. }) {
                            cx.m.transit_sent.fetch_add(1, Relaxed);
                        }
                        self.vias.insert(id, v);
                        cx.out.push(Action::Send {
                            peer: v,
                            frame: wrapped,
                        });
                    }
                    None => {
                        if !self.vias.is_empty() {
                            self.vias.remove(&id);
                        }
                        cx.out.push(Action::Send {
                            peer: relay.peer,
                            frame,
                        });
                    }
                }
                true
            }
            Mode::Flood { .. } => {
                let attempt = p.attempt;
                cx.dedup.insert((id, attempt), None, now);
                let peers = cx.view.peers();
                for peer in &peers {
                    cx.out.push(Action::Send {
                        peer: *peer,
                        frame: Frame::Forward {
                            id,
                            attempt,
                            hops: 1,
                            packet: p.packet.clone(),
                        },
                    });
                }
                cx.m.forwards_sent.fetch_add(peers.len() as u64, Relaxed);
                // Unclaimed floods back off: 1, 2, 4... × flood_retry_ms
                // (× retry_ms while there is no relay to flood to). A try
                // with nobody to flood to counts too, so a relay alone does
                // not keep every unclaimed packet in memory.
                let base = if peers.is_empty() {
                    self.cfg.retry_ms
                } else {
                    self.cfg.flood_retry_ms
                };
                p.next_ms = now + (base << p.attempt.min(16));
                p.attempt = p.attempt.saturating_add(1);
                false
            }
        }
    }

    /// Sends backlogged packets to relay `to` while its window has room.
    fn pump(&mut self, now: u64, to: Slot, cx: &mut Ctx<'_>) {
        while let Some(next) = self
            .relays
            .get_mut(to)
            .filter(|r| r.inflight < self.cfg.send_window)
            .and_then(|r| r.backlog.pop_front())
        {
            if let Some(p) = self.pending.get_mut(&next)
                && p.backlogged
            {
                p.backlogged = false;
                self.dispatch(now, next, cx);
            }
        }
    }

    /// An ack for a packet of ours; false if `id` is not ours (a flood we
    /// relayed for someone else).
    pub fn ack(
        &mut self,
        now: u64,
        from: PeerId,
        id: PacketId,
        status: AckStatus,
        home: Option<[u8; 32]>,
        cx: &mut Ctx<'_>,
    ) -> bool {
        let Some(mode) = self.pending.get(&id).map(|p| p.mode) else {
            return false;
        };
        let routed_to = mode.routed_to();
        let via = self.vias.get(&id).copied();
        let from_target = routed_to.filter(|s| self.relays.is(*s, &from) || via == Some(from));
        let status = match status {
            // A carrier could not take it on: another path, after retry_ms.
            AckStatus::NoPath if via == Some(from) => {
                let a = self.avoid.entry(id).or_default();
                if a.len() >= MAX_AVOID {
                    a.remove(0);
                }
                a.push(from);
                self.vias.remove(&id);
                AckStatus::Refused
            }
            s => s,
        };
        match status {
            AckStatus::Stored => {
                // The routed target's key, read before the packet lets go
                // of its slot.
                let target_key = routed_to.and_then(|s| self.relays.key(s));
                let Some(p) = self.take_pending(&id) else {
                    return true;
                };
                match p.copy {
                    Copy::Stored(m) => cx.out.push(Action::Job(Job::Delete(vec![m]))),
                    Copy::Keeping => {
                        self.drop_when_kept.insert(id);
                    }
                    Copy::Memory => {}
                }
                if let Some(t) = routed_to {
                    cx.m.routed_acked.fetch_add(1, Relaxed);
                    self.pump(now, t, cx);
                }
                // The home relay: remember it for this destination, and
                // tell it that it may forget the id.
                if let Some(k) = home.map(RelayKey).or(target_key) {
                    // Usually known already (one lookup instead of an
                    // insert and a move to the front).
                    if self.routes.get(&p.dest) != Some(&k) {
                        self.routes.insert(p.dest, k);
                        cx.out.push(Action::Route(p.dest, Some(k)));
                    }
                    self.forget_at(k, id, cx);
                }
            }
            AckStatus::NotHome => {
                if let Some(to) = from_target {
                    // A stale hint: the named relay does not home the
                    // recipient. Flood it; if nobody claims it, it goes
                    // back there (the slot stays named, as the fallback).
                    self.keep_pending(id, cx);
                    let mut in_window = false;
                    let mut dest = None;
                    if let Some(p) = self.pending.get_mut(&id) {
                        p.mode = Mode::Flood { fallback: Some(to) };
                        p.sent = None;
                        p.backlogged = false;
                        in_window = std::mem::take(&mut p.in_window);
                        dest = Some(p.dest);
                    }
                    self.unqueue(to, in_window);
                    cx.m.stale_hints.fetch_add(1, Relaxed);
                    if let Some(dest) = dest
                        && self.routes.remove(&dest).is_some()
                    {
                        cx.out.push(Action::Route(dest, None));
                    }
                    self.dispatch(now, id, cx);
                    self.pump(now, to, cx);
                }
            }
            AckStatus::Malformed | AckStatus::NotTarget => {
                if let Some(to) = from_target {
                    // Never accepted there: keep our stored copy, stop sending.
                    let route = self.route_of(mode);
                    if let Some(p) = self.take_pending(&id)
                        && p.copy == Copy::Memory
                    {
                        self.keep(None, p.packet, route, cx);
                    }
                    cx.m.drops_malformed.fetch_add(1, Relaxed);
                    self.pump(now, to, cx);
                }
            }
            AckStatus::Refused => {
                self.keep_pending(id, cx);
                let mut pump = None;
                if let Some(p) = self.pending.get_mut(&id) {
                    match p.mode {
                        Mode::Routed { to, .. } if Some(to) == from_target => {
                            // Not taken now: resend after retry_ms, let
                            // others through.
                            p.sent = None;
                            p.next_ms = now + self.cfg.retry_ms;
                            if std::mem::take(&mut p.in_window)
                                && let Some(r) = self.relays.get_mut(to)
                            {
                                r.inflight = r.inflight.saturating_sub(1);
                            }
                            pump = Some(to);
                        }
                        Mode::Flood { .. } => {
                            // A relay could not take the flood now: flood
                            // again sooner (still one of its bounded attempts).
                            let soon = now + (self.cfg.retry_ms << p.attempt.min(16));
                            p.next_ms = p.next_ms.min(soon);
                        }
                        Mode::Routed { .. } => {}
                    }
                }
                if let Some(to) = pump {
                    self.pump(now, to, cx);
                }
            }
            _ => {}
        }
        true
    }

    /// Tells home relay `k` (batched) that it may forget `id`.
    fn forget_at(&mut self, k: RelayKey, id: PacketId, cx: &mut Ctx<'_>) {
        let Some(s) = self.slot_of(k) else {
            return;
        };
        let batch_full = self.cfg.forget_batch;
        let Some(r) = self.relays.get_mut(s) else {
            return;
        };
        if cx.view.stream_open(&r.peer) {
            r.forget.push(id);
            if r.forget.len() >= batch_full {
                cx.out.push(Action::Send {
                    peer: r.peer,
                    frame: Frame::Forget {
                        ids: std::mem::take(&mut r.forget),
                    },
                });
            }
        }
        self.relays.release_if_unused(s);
    }

    /// A stream to `peer` opened: what waits for it goes now.
    pub fn stream_opened(&mut self, now: u64, peer: PeerId, cx: &mut Ctx<'_>) {
        let Some(s) = self.relays.of_peer(&peer) else {
            // No packet names it.
            return;
        };
        if let Some(r) = self.relays.get_mut(s) {
            r.generation += 1;
        }
        let mut ids: Vec<(u64, PacketId)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.mode.routed_to() == Some(s))
            .map(|(id, p)| (p.seq, *id))
            .collect();
        ids.sort_unstable();
        for (_, id) in ids {
            self.dispatch(now, id, cx);
        }
    }

    /// A stream to `peer` closed: what was in flight on it is resent.
    pub fn stream_closed(&mut self, now: u64, peer: PeerId) {
        self.carrier_lost(now, &peer);
        let Some(s) = self.relays.of_peer(&peer) else {
            return;
        };
        let Some(relay) = self.relays.get_mut(s) else {
            return;
        };
        relay.generation += 1;
        relay.forget.clear();
        if std::mem::take(&mut relay.inflight) > 0 {
            for p in self.pending.values_mut() {
                if p.in_window && p.mode.routed_to() == Some(s) {
                    p.in_window = false;
                    p.sent = None;
                    p.next_ms = now;
                }
            }
        }
        self.relays.release_if_unused(s);
    }

    /// Packets sent through `peer` (transit) go again, another way.
    fn carrier_lost(&mut self, now: u64, peer: &PeerId) {
        if self.vias.is_empty() {
            return;
        }
        let lost: Vec<PacketId> = self
            .vias
            .iter()
            .filter(|(_, v)| *v == peer)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            self.vias.remove(&id);
            let a = self.avoid.entry(id).or_default();
            if a.len() >= MAX_AVOID {
                a.remove(0);
            }
            a.push(*peer);
            let mut left = None;
            if let Some(p) = self.pending.get_mut(&id) {
                p.sent = None;
                p.next_ms = now;
                if std::mem::take(&mut p.in_window) {
                    left = p.mode.routed_to();
                }
            }
            if let Some(s) = left {
                self.leave_window(s);
            }
        }
    }

    /// A frame could not be queued for `peer`: what we keep is retried.
    pub fn unsent(&mut self, now: u64, peer: PeerId, frame: &Frame) {
        match frame {
            Frame::Routed { id, .. } => {
                let mut left = None;
                if let Some(p) = self.pending.get_mut(id) {
                    p.sent = None;
                    p.next_ms = now + self.cfg.retry_ms;
                    if std::mem::take(&mut p.in_window) {
                        left = p.mode.routed_to();
                    }
                }
                if let Some(s) = left.filter(|s| self.relays.is(*s, &peer)) {
                    self.leave_window(s);
                }
            }
            Frame::Forward { id, .. } => {
                if let Some(p) = self.pending.get_mut(id) {
                    p.next_ms = p.next_ms.min(now + self.cfg.retry_ms);
                }
            }
            _ => {}
        }
    }

    /// Expires, resends and re-floods what is due; flushes Forget batches.
    pub fn tick(&mut self, now: u64, cx: &mut Ctx<'_>) {
        if !self.unkept.is_empty() {
            cx.out
                .push(Action::Job(Job::KeepCopy(std::mem::take(&mut self.unkept))));
        }
        let mut due: Vec<(u64, PacketId)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.next_ms <= now || p.deadline_ms <= now)
            .map(|(id, p)| (p.seq, *id))
            .collect();
        due.sort_unstable();
        for (_, id) in due {
            if self.pending.get(&id).is_some_and(|p| p.deadline_ms > now) {
                // Due before its ack came (a late ack, a closed stream, a
                // frame not queued): stored here from now on.
                self.keep_pending(id, cx);
            }
            let Some(p) = self.pending.get_mut(&id) else {
                continue;
            };
            if p.deadline_ms <= now {
                self.take_pending(&id);
                cx.m.drops_expired.fetch_add(1, Relaxed);
                continue;
            }
            if let Mode::Flood { fallback } = p.mode
                && p.attempt >= self.cfg.flood_attempts
            {
                match fallback {
                    // Nobody claimed it: store it where it was sent first
                    // (the packet names that slot already).
                    Some(to) => {
                        p.mode = Mode::Routed {
                            to,
                            store_anyway: true,
                        };
                        if let Some(r) = self.relays.get_mut(to) {
                            r.queued += 1;
                        }
                    }
                    None => {
                        // No relay homes it (chaff, or a recipient never
                        // seen): the stored copy here stays.
                        self.take_pending(&id);
                        cx.m.floods_unclaimed.fetch_add(1, Relaxed);
                        continue;
                    }
                }
            } else if matches!(p.mode, Mode::Flood { .. }) && p.attempt > 0 {
                cx.m.retries.fetch_add(1, Relaxed);
            }
            self.dispatch(now, id, cx);
        }
        let mut unused = Vec::new();
        for s in 0..self.relays.slots.len() as Slot {
            let Some(r) = self.relays.get_mut(s) else {
                continue;
            };
            if !r.forget.is_empty() {
                cx.out.push(Action::Send {
                    peer: r.peer,
                    frame: Frame::Forget {
                        ids: std::mem::take(&mut r.forget),
                    },
                });
            }
            if r.refs == 0 {
                unused.push(s);
            }
        }
        for s in unused {
            self.relays.release_if_unused(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::FakeView;
    use super::*;
    use crate::federation::dedup::Dedup;
    use crate::metrics::FederationMetrics;

    fn cx<'a>(
        view: &'a FakeView,
        dedup: &'a mut Dedup,
        m: &'a FederationMetrics,
        out: &'a mut Vec<Action>,
    ) -> Ctx<'a> {
        Ctx {
            view,
            dedup,
            m,
            out,
        }
    }

    fn cfg() -> ForwardConfig {
        ForwardConfig {
            send_window: 2,
            retry_ms: 100,
            flood_retry_ms: 1000,
            flood_attempts: 2,
            max_pending: 100,
            max_pending_bytes: 1 << 20,
            dial_queue: 10,
            max_per_relay: 10,
            ack_timeout_ms: 5000,
            learned_routes: 100,
            forget_batch: 3,
            transit_only: false,
            transit_hops: 3,
            onion_hops: 0,
        }
    }

    fn key() -> (PeerId, RelayKey) {
        let p = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        (p, RelayKey::from_peer(&p).expect("ed25519"))
    }

    fn fed(n: i64, hint: Option<RelayKey>) -> Federate {
        Federate {
            mailbox_id: Some(MailboxId(n)),
            dest: DestHash([n as u8; 8]),
            packet: Bytes::from(vec![n as u8; 40]),
            hint: hint.map(|k| k.0),
            deadline_ms: 1_000_000,
        }
    }

    fn sends(out: &[Action]) -> Vec<(PeerId, &Frame)> {
        out.iter()
            .filter_map(|a| match a {
                Action::Send { peer, frame } => Some((*peer, frame)),
                _ => None,
            })
            .collect()
    }

    fn routed_ids(out: &[Action]) -> Vec<PacketId> {
        sends(out)
            .iter()
            .filter_map(|(_, f)| match f {
                Frame::Routed { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_transit_only_relay_sends_through_a_carrier_and_tries_another_when_one_fails() {
        let (c1, _) = key();
        let (c2, _) = key();
        let mut s = Sender::with(
            ForwardConfig {
                transit_only: true,
                ..cfg()
            },
            &[c1, c2],
        );
        // The target is not connected, and a transit-only relay never dials.
        s.view.streams.retain(|p| *p != s.t);
        let (t, tk) = (s.t, s.tk);
        s.run(|f, cx| f.outbound(0, fed(1, Some(tk)), [1; 16], cx));
        assert!(
            !s.out.iter().any(|a| matches!(a, Action::Reach(_))),
            "no dial"
        );
        let first = sends(&s.out);
        assert_eq!(first.len(), 1);
        let (via, frame) = first[0];
        assert_eq!(via, c1);
        let Frame::Transit { to, hops, inner } = frame else {
            panic!("a transit frame: {frame:?}")
        };
        assert_eq!((*to, *hops), (tk.0, 1));
        assert!(
            matches!(**inner, Frame::Routed { id, target, .. } if id == [1; 16] && target == tk.0)
        );
        assert_eq!(s.m.transit_sent.load(Relaxed), 1);
        // The first carrier cannot go on: the next try avoids it.
        s.out.clear();
        s.run(|f, cx| f.ack(10, c1, [1; 16], AckStatus::NoPath, None, cx));
        s.run(|f, cx| f.tick(200, cx));
        let second = sends(&s.out);
        assert_eq!(second.len(), 1, "{:?}", s.out);
        assert_eq!(second[0].0, c2);
        // An ack from the first carrier now means nothing; the home
        // relay's Stored, passed back by the second, completes the packet.
        s.out.clear();
        s.run(|f, cx| f.ack(300, c2, [1; 16], AckStatus::Stored, None, cx));
        assert_eq!(s.f.pending_len(), 0);
        assert_eq!(deletes(&s.out), vec![MailboxId(1)]);
        let _ = t;
    }

    #[test]
    fn with_onion_transit_a_packet_goes_out_only_in_layers_and_the_answer_completes_it() {
        let (c1, _) = key();
        let mut s = Sender::with(
            ForwardConfig {
                onion_hops: 1,
                ..cfg()
            },
            &[c1],
        );
        let node = |b: u8| super::super::transit::Node {
            anchors: vec![],
            dialable: true,
            onion_key: meshwhisper_crypto::identity::IdentityKeyPair::from_seed(&[b; 32])
                .public()
                .x25519(),
        };
        let tk = s.tk;
        // Nothing known about the relays yet: the packet waits.
        s.run(|f, cx| f.outbound(0, fed(1, Some(tk)), [1; 16], cx));
        assert!(sends(&s.out).is_empty(), "never in the clear");
        assert!(
            s.out.iter().any(|a| matches!(a, Action::Reach(_))),
            "its record looked up"
        );
        s.f.learn_node(s.t, node(1));
        s.f.learn_node(c1, node(2));
        s.run(|f, cx| f.tick(200, cx));
        let out = sends(&s.out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, c1, "through the other relay, not to the target");
        let Frame::Onion { hop, layer } = out[0].1.clone() else {
            panic!("{:?}", out[0].1)
        };
        assert_eq!(
            Some(layer.len()),
            meshwhisper_crypto::onion::v2::onion_len(40 + 1 + 16 + 2 + 32)
        );
        assert_eq!(s.m.onion_sent.load(Relaxed), 1);
        let id = s.f.onion_answer(&hop).expect("ours");
        s.out.clear();
        s.run(|f, cx| f.ack(300, c1, id, AckStatus::Stored, None, cx));
        assert_eq!(s.f.pending_len(), 0);
    }

    #[test]
    fn a_packet_whose_carrier_goes_away_is_sent_by_another() {
        let (c1, _) = key();
        let (c2, _) = key();
        let mut s = Sender::with(
            ForwardConfig {
                transit_only: true,
                ..cfg()
            },
            &[c1, c2],
        );
        s.view.streams.retain(|p| *p != s.t);
        let tk = s.tk;
        s.run(|f, cx| f.outbound(0, fed(1, Some(tk)), [1; 16], cx));
        assert_eq!(sends(&s.out)[0].0, c1);
        s.out.clear();
        s.view.streams.retain(|p| *p != c1);
        s.f.stream_closed(50, c1);
        s.run(|f, cx| f.tick(60, cx));
        let again = sends(&s.out);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].0, c2);
    }

    #[test]
    fn routed_packets_respect_the_window_and_go_in_order() {
        let (me_p, me) = key();
        let _ = me_p;
        let (t, tk) = key();
        let mut f = Forward::new(cfg(), me);
        let view = FakeView::with_streams(&[t]);
        let (mut d, m) = (Dedup::new(100, 1000), FederationMetrics::default());
        let mut out = Vec::new();
        for n in 1..=4u8 {
            f.outbound(
                0,
                fed(i64::from(n), Some(tk)),
                [n; 16],
                &mut cx(&view, &mut d, &m, &mut out),
            );
        }
        // Two in the window, two backlogged.
        assert_eq!(routed_ids(&out), vec![[1; 16], [2; 16]]);
        out.clear();
        f.ack(
            1,
            t,
            [1; 16],
            AckStatus::Stored,
            Some(tk.0),
            &mut cx(&view, &mut d, &m, &mut out),
        );
        assert_eq!(routed_ids(&out), vec![[3; 16]], "the next in order");
        assert!(matches!(out[0], Action::Job(Job::Delete(ref ids)) if ids == &vec![MailboxId(1)]));
        // A lost stream resends what was in flight, once it is back.
        out.clear();
        f.stream_closed(2, t);
        f.stream_opened(3, t, &mut cx(&view, &mut d, &m, &mut out));
        assert_eq!(routed_ids(&out), vec![[2; 16], [3; 16]]);
    }

    #[test]
    fn a_stored_ack_teaches_the_route_and_batches_forgets() {
        let (_, me) = key();
        let (home, hk) = key();
        let mut f = Forward::new(cfg(), me);
        let view = FakeView::with_streams(&[home]);
        let (mut d, m) = (Dedup::new(100, 1000), FederationMetrics::default());
        let mut out = Vec::new();
        // Unhinted: flooded.
        f.outbound(
            0,
            fed(1, None),
            [1; 16],
            &mut cx(&view, &mut d, &m, &mut out),
        );
        assert!(matches!(
            sends(&out)[0].1,
            Frame::Forward { attempt: 0, .. }
        ));
        f.ack(
            1,
            home,
            [1; 16],
            AckStatus::Stored,
            Some(hk.0),
            &mut cx(&view, &mut d, &m, &mut out),
        );
        assert_eq!(f.learned_route(&DestHash([1; 8])), Some(hk));
        assert!(
            out.iter().any(
                |a| matches!(a, Action::Route(d, Some(k)) if *d == DestHash([1; 8]) && *k == hk)
            ),
            "sessions are told the route"
        );
        // The next packet for that destination is routed.
        out.clear();
        let mut again = fed(2, None);
        again.dest = DestHash([1; 8]);
        f.outbound(2, again, [2; 16], &mut cx(&view, &mut d, &m, &mut out));
        assert_eq!(routed_ids(&out), vec![[2; 16]]);
        // Forgets go out in batches (3) or at the next tick.
        out.clear();
        f.ack(
            3,
            home,
            [2; 16],
            AckStatus::Stored,
            Some(hk.0),
            &mut cx(&view, &mut d, &m, &mut out),
        );
        assert!(
            sends(&out)
                .iter()
                .all(|(_, f)| !matches!(f, Frame::Forget { .. }))
        );
        f.tick(4, &mut cx(&view, &mut d, &m, &mut out));
        let forgets: Vec<_> = sends(&out)
            .into_iter()
            .filter_map(|(p, f)| match f {
                Frame::Forget { ids } => Some((p, ids.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(forgets, vec![(home, vec![[1; 16], [2; 16]])]);
    }

    #[test]
    fn a_relays_slot_lives_while_a_packet_names_it_and_is_reused_after() {
        let (_, me) = key();
        let relays: Vec<_> = (0..3).map(|_| key()).collect();
        let peers: Vec<_> = relays.iter().map(|(p, _)| *p).collect();
        let mut f = Forward::new(cfg(), me);
        let view = FakeView::with_streams(&peers);
        let (mut d, m) = (Dedup::new(100, 1000), FederationMetrics::default());
        let mut out = Vec::new();
        for (i, (_, k)) in relays.iter().enumerate() {
            let n = i as u8 + 1;
            f.outbound(
                0,
                fed(n.into(), Some(*k)),
                [n; 16],
                &mut cx(&view, &mut d, &m, &mut out),
            );
        }
        assert_eq!(f.relays.iter().count(), 3);
        // Relay 0 acks: its slot stays for the id to forget, then goes
        // with the tick that sends the Forget.
        f.ack(
            1,
            peers[0],
            [1; 16],
            AckStatus::Stored,
            Some(relays[0].1.0),
            &mut cx(&view, &mut d, &m, &mut out),
        );
        assert!(
            f.relays.of_peer(&peers[0]).is_some(),
            "an id to forget there"
        );
        f.tick(2, &mut cx(&view, &mut d, &m, &mut out));
        assert!(f.relays.of_peer(&peers[0]).is_none());
        assert_eq!(f.relays.iter().count(), 2);
        // A stale hint floods the packet, still naming relay 1 as its
        // fallback: the slot stays while it does.
        f.ack(
            3,
            peers[1],
            [2; 16],
            AckStatus::NotHome,
            None,
            &mut cx(&view, &mut d, &m, &mut out),
        );
        f.tick(4, &mut cx(&view, &mut d, &m, &mut out));
        assert!(f.relays.of_peer(&peers[1]).is_some());
        // A new relay takes the freed slot: the table does not grow.
        let (_, k4) = key();
        f.outbound(
            5,
            fed(9, Some(k4)),
            [9; 16],
            &mut cx(&view, &mut d, &m, &mut out),
        );
        assert_eq!(f.relays.slots.len(), 3);
        assert_eq!(f.relays.iter().count(), 3);
    }

    #[test]
    fn a_stale_hint_floods_and_falls_back_to_the_named_relay() {
        let (_, me) = key();
        let (named, nk) = key();
        let (other, _) = key();
        let mut f = Forward::new(cfg(), me);
        let view = FakeView::with_streams(&[named, other]);
        let (mut d, m) = (Dedup::new(100, 1000), FederationMetrics::default());
        let mut out = Vec::new();
        f.outbound(
            0,
            fed(1, Some(nk)),
            [1; 16],
            &mut cx(&view, &mut d, &m, &mut out),
        );
        out.clear();
        f.ack(
            1,
            named,
            [1; 16],
            AckStatus::NotHome,
            None,
            &mut cx(&view, &mut d, &m, &mut out),
        );
        let floods = sends(&out)
            .iter()
            .filter(|(_, f)| matches!(f, Frame::Forward { .. }))
            .count();
        assert_eq!(floods, 2, "flooded to every peer");
        // Nobody claims it through the attempts (the second flood at
        // 1 + 1000 ms): stored at the named relay (next due 2000 ms later).
        out.clear();
        f.tick(1_001, &mut cx(&view, &mut d, &m, &mut out));
        let reflooded = sends(&out)
            .iter()
            .filter(|(_, f)| matches!(f, Frame::Forward { attempt: 1, .. }))
            .count();
        assert_eq!(reflooded, 2, "second attempt to every peer");
        out.clear();
        f.tick(3_001, &mut cx(&view, &mut d, &m, &mut out));
        let routed: Vec<_> = sends(&out)
            .into_iter()
            .filter_map(|(p, f)| match f {
                Frame::Routed { flags, .. } => Some((p, *flags)),
                _ => None,
            })
            .collect();
        assert_eq!(routed, vec![(named, ROUTED_STORE_ANYWAY)]);
    }

    #[test]
    fn re_floods_keep_the_id_and_count_attempts_then_give_up() {
        let (_, me) = key();
        let (peer, _) = key();
        let mut f = Forward::new(cfg(), me);
        let view = FakeView::with_streams(&[peer]);
        let (mut d, m) = (Dedup::new(100, 1000), FederationMetrics::default());
        let mut out = Vec::new();
        f.outbound(
            0,
            fed(1, None),
            [7; 16],
            &mut cx(&view, &mut d, &m, &mut out),
        );
        f.tick(5_000, &mut cx(&view, &mut d, &m, &mut out));
        let attempts: Vec<u8> = sends(&out)
            .iter()
            .filter_map(|(_, f)| match f {
                Frame::Forward { id, attempt, .. } if *id == [7; 16] => Some(*attempt),
                _ => None,
            })
            .collect();
        assert_eq!(attempts, vec![0, 1]);
        f.tick(100_000, &mut cx(&view, &mut d, &m, &mut out));
        assert_eq!(f.pending_len(), 0);
        assert_eq!(m.floods_unclaimed.load(Relaxed), 1);
    }

    #[test]
    fn a_full_queue_overflows_and_says_so() {
        let (_, me) = key();
        let mut c = cfg();
        c.max_pending = 1;
        let mut f = Forward::new(c, me);
        let view = FakeView::with_streams(&[]);
        let (mut d, m) = (Dedup::new(100, 1000), FederationMetrics::default());
        let mut out = Vec::new();
        f.outbound(
            0,
            fed(1, None),
            [1; 16],
            &mut cx(&view, &mut d, &m, &mut out),
        );
        f.outbound(
            0,
            fed(2, None),
            [2; 16],
            &mut cx(&view, &mut d, &m, &mut out),
        );
        assert!(f.take_overflow());
        assert!(!f.take_overflow());
        assert!(!f.has_room());
    }

    /// A relay that never acks cannot take the whole pending queue: past
    /// `max_per_relay` its packets stay stored, other relays' still go,
    /// and its own are handed back once it is under half.
    #[test]
    fn one_relay_cannot_take_the_whole_pending_queue() {
        let (other, ok) = key();
        let mut s = Sender::with(
            ForwardConfig {
                max_per_relay: 4,
                ..cfg()
            },
            &[other],
        );
        let sk = s.tk;
        for n in 1..=6u8 {
            s.run(|f, cx| f.outbound(0, fed(i64::from(n), Some(sk)), [n; 16], cx));
        }
        assert_eq!(s.f.pending_len(), 4, "four wait for the silent relay");
        assert!(s.f.take_overflow());
        assert_eq!(
            s.f.full_relays().into_iter().collect::<Vec<_>>(),
            vec![sk.0]
        );
        s.out.clear();
        s.run(|f, cx| f.outbound(0, fed(7, Some(ok)), [7; 16], cx));
        assert_eq!(
            routed_ids(&s.out),
            vec![[7; 16]],
            "another relay's packet goes"
        );
        // Two acks: the silent relay is under half its share again.
        for n in 1..=2u8 {
            s.stored(1, n);
        }
        assert!(s.f.full_relays().is_empty());
        assert!(s.f.take_overflow(), "its stored packets are handed back");
    }

    /// An unstored packet: held in memory, not stored here.
    fn held(n: u8, hint: RelayKey) -> Federate {
        Federate {
            mailbox_id: None,
            ..fed(i64::from(n), Some(hint))
        }
    }

    /// The `KeepCopy` asks among `out`: (pending id, route).
    fn keeps(out: &[Action]) -> Vec<(Option<PacketId>, [u8; 32])> {
        out.iter()
            .filter_map(|a| match a {
                Action::Job(Job::KeepCopy(k)) => Some(k),
                _ => None,
            })
            .flatten()
            .map(|k| (k.id, k.route))
            .collect()
    }

    fn deletes(out: &[Action]) -> Vec<MailboxId> {
        out.iter()
            .filter_map(|a| match a {
                Action::Job(Job::Delete(ids)) => Some(ids.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// A sender with one relay `t` (its stream open), and what it was
    /// asked to do.
    struct Sender {
        f: Forward,
        view: FakeView,
        d: Dedup,
        m: FederationMetrics,
        out: Vec<Action>,
        t: PeerId,
        tk: RelayKey,
    }

    impl Sender {
        fn new() -> Self {
            Self::with(cfg(), &[])
        }

        /// With `cfg`, and streams open to `others` too.
        fn with(cfg: ForwardConfig, others: &[PeerId]) -> Self {
            let (_, me) = key();
            let (t, tk) = key();
            let mut streams = vec![t];
            streams.extend_from_slice(others);
            Self {
                f: Forward::new(cfg, me),
                view: FakeView::with_streams(&streams),
                d: Dedup::new(100, 1000),
                m: FederationMetrics::default(),
                out: Vec::new(),
                t,
                tk,
            }
        }

        /// Runs `op` on the sender with a context over its view and output.
        fn run<R>(&mut self, op: impl FnOnce(&mut Forward, &mut Ctx<'_>) -> R) -> R {
            op(
                &mut self.f,
                &mut cx(&self.view, &mut self.d, &self.m, &mut self.out),
            )
        }

        /// Unstored packets `1..=n` for `t`, at time 0.
        fn hold(&mut self, n: u8) {
            let tk = self.tk;
            for i in 1..=n {
                self.run(|f, cx| f.outbound(0, held(i, tk), [i; 16], cx));
            }
        }

        /// `t`'s `Stored` ack for packet `n`.
        fn stored(&mut self, now: u64, n: u8) {
            let (t, tk) = (self.t, self.tk);
            self.run(|f, cx| f.ack(now, t, [n; 16], AckStatus::Stored, Some(tk.0), cx));
        }
    }

    #[test]
    fn an_unstored_packet_acked_at_once_is_never_stored_here() {
        let mut s = Sender::new();
        s.hold(3);
        // Two sent, one waiting for the window: none stored.
        assert_eq!(routed_ids(&s.out), vec![[1; 16], [2; 16]]);
        assert!(keeps(&s.out).is_empty());
        s.out.clear();
        for n in 1..=3u8 {
            s.stored(1, n);
        }
        assert_eq!(
            routed_ids(&s.out),
            vec![[3; 16]],
            "the third went when room freed"
        );
        assert!(keeps(&s.out).is_empty() && deletes(&s.out).is_empty());
        assert_eq!(s.f.pending_len(), 0);
        s.run(|f, cx| f.tick(10_000, cx));
        assert!(keeps(&s.out).is_empty());
        assert_eq!(s.m.kept.load(Relaxed), 0);
    }

    #[test]
    fn an_unstored_packet_is_stored_here_at_its_first_setback() {
        let (_, me) = key();
        let (t, tk) = key();
        let (mut d, m) = (Dedup::new(100, 1000), FederationMetrics::default());
        let mut out = Vec::new();
        type Setback = fn(&mut Forward, PeerId, &mut Ctx<'_>);
        let setbacks: [(&str, Setback); 5] = [
            ("a late ack", |f, _, cx| f.tick(200, cx)),
            ("a closed stream", |f, t, cx| {
                f.stream_closed(50, t);
                f.tick(60, cx);
            }),
            ("an unqueued frame", |f, t, cx| {
                let frame = Frame::Routed {
                    id: [1; 16],
                    flags: 0,
                    hops: 1,
                    target: [0; 32],
                    packet: Bytes::new(),
                };
                f.unsent(50, t, &frame);
                f.tick(200, cx);
            }),
            ("a refusal", |f, t, cx| {
                f.ack(50, t, [1; 16], AckStatus::Refused, None, cx);
            }),
            ("a stale hint", |f, t, cx| {
                f.ack(50, t, [1; 16], AckStatus::NotHome, None, cx);
            }),
        ];
        for (what, setback) in setbacks {
            let mut f = Forward::new(cfg(), me);
            let view = FakeView::with_streams(&[t]);
            out.clear();
            f.outbound(
                0,
                held(1, tk),
                [1; 16],
                &mut cx(&view, &mut d, &m, &mut out),
            );
            assert!(keeps(&out).is_empty(), "{what}");
            out.clear();
            setback(&mut f, t, &mut cx(&view, &mut d, &m, &mut out));
            assert_eq!(
                keeps(&out),
                vec![(Some([1; 16]), tk.0)],
                "{what}: stored with its route"
            );
            // Asked once, however many setbacks follow.
            out.clear();
            f.tick(100_000, &mut cx(&view, &mut d, &m, &mut out));
            assert!(keeps(&out).is_empty(), "{what}: asked again");
            // Stored: it is now a stored packet like any other, deleted
            // once its home relay stores it.
            f.kept(
                [1; 16],
                Some(MailboxId(77)),
                &mut cx(&view, &mut d, &m, &mut out),
            );
            assert_eq!(
                f.pending_mailboxes().into_iter().collect::<Vec<_>>(),
                vec![MailboxId(77)]
            );
            out.clear();
            f.ack(
                100_001,
                t,
                [1; 16],
                AckStatus::Stored,
                Some(tk.0),
                &mut cx(&view, &mut d, &m, &mut out),
            );
            assert_eq!(deletes(&out), vec![MailboxId(77)], "{what}");
        }
    }

    #[test]
    fn an_ack_while_the_copy_is_written_deletes_it_once_written() {
        let mut s = Sender::new();
        s.hold(1);
        s.run(|f, cx| f.tick(200, cx));
        assert_eq!(keeps(&s.out).len(), 1);
        s.out.clear();
        s.stored(201, 1);
        assert!(deletes(&s.out).is_empty(), "nothing to delete yet");
        s.run(|f, cx| f.kept([1; 16], Some(MailboxId(5)), cx));
        assert_eq!(deletes(&s.out), vec![MailboxId(5)]);
        assert!(s.f.pending_mailboxes().is_empty());
    }

    #[test]
    fn an_unstored_packet_that_cannot_go_at_once_is_stored_and_a_failed_store_is_asked_again() {
        let (_, me) = key();
        let (_, tk) = key();
        let mut f = Forward::new(cfg(), me);
        // No stream to its relay: it waits, so it is stored.
        let view = FakeView::with_streams(&[]);
        let (mut d, m) = (Dedup::new(100, 1000), FederationMetrics::default());
        let mut out = Vec::new();
        f.outbound(
            0,
            held(1, tk),
            [1; 16],
            &mut cx(&view, &mut d, &m, &mut out),
        );
        assert_eq!(keeps(&out), vec![(Some([1; 16]), tk.0)]);
        // The store failed: asked again at the next setback.
        out.clear();
        f.kept([1; 16], None, &mut cx(&view, &mut d, &m, &mut out));
        f.tick(150, &mut cx(&view, &mut d, &m, &mut out));
        assert_eq!(keeps(&out), vec![(Some([1; 16]), tk.0)]);
        // The workers refused the job: sent again at the next tick.
        out.clear();
        f.keep_refused(vec![Keep {
            id: Some([1; 16]),
            packet: Bytes::from_static(b"p"),
            route: tk.0,
        }]);
        f.tick(151, &mut cx(&view, &mut d, &m, &mut out));
        assert_eq!(keeps(&out), vec![(Some([1; 16]), tk.0)]);
        // A relay named as us, or no room: stored, not pending.
        out.clear();
        let mut full = Forward::new(
            ForwardConfig {
                max_pending: 0,
                ..cfg()
            },
            me,
        );
        full.outbound(
            0,
            held(2, tk),
            [2; 16],
            &mut cx(&view, &mut d, &m, &mut out),
        );
        f.outbound(
            0,
            held(3, me),
            [3; 16],
            &mut cx(&view, &mut d, &m, &mut out),
        );
        assert_eq!(keeps(&out), vec![(None, tk.0), (None, me.0)]);
        assert!(full.take_overflow());
    }

    /// A walk of the store (after an overflow) can hand back the copy a
    /// `KeepCopy` job just wrote before the job reports: it is recognised
    /// as the pending packet's, not sent again under another id.
    #[test]
    fn a_kept_copy_handed_back_early_is_the_pending_packets_copy() {
        let mut s = Sender::new();
        let tk = s.tk;
        s.hold(2);
        s.run(|f, cx| f.tick(200, cx));
        assert_eq!(keeps(&s.out).len(), 2);
        // Packet 2 is acked while its copy is written.
        s.stored(201, 2);
        s.out.clear();
        // Both copies come back from the store before the job reports.
        let copy = |n: u8, id: i64| Federate {
            mailbox_id: Some(MailboxId(id)),
            ..held(n, tk)
        };
        s.run(|f, cx| f.outbound(202, copy(1, 41), [9; 16], cx));
        s.run(|f, cx| f.outbound(202, copy(2, 42), [8; 16], cx));
        assert!(routed_ids(&s.out).is_empty(), "sent again under another id");
        assert_eq!(
            deletes(&s.out),
            vec![MailboxId(42)],
            "the acked one's copy goes"
        );
        assert_eq!(s.f.pending_len(), 1);
        assert_eq!(
            s.f.pending_mailboxes().into_iter().collect::<Vec<_>>(),
            vec![MailboxId(41)]
        );
        // The job's report changes nothing more.
        s.out.clear();
        s.run(|f, cx| f.kept([1; 16], Some(MailboxId(41)), cx));
        s.run(|f, cx| f.kept([2; 16], Some(MailboxId(42)), cx));
        assert!(deletes(&s.out).is_empty());
        // Another packet's stored copy is not mistaken for one of them.
        s.run(|f, cx| f.outbound(203, fed(7, Some(tk)), [7; 16], cx));
        assert_eq!(s.f.pending_len(), 2);
    }

    #[test]
    fn stopping_takes_every_packet_held_only_in_memory() {
        let mut s = Sender::new();
        let tk = s.tk;
        s.hold(3);
        s.run(|f, cx| f.outbound(0, fed(4, Some(tk)), [4; 16], cx));
        let taken: Vec<_> =
            s.f.take_unstored()
                .into_iter()
                .map(|k| (k.id, k.route))
                .collect();
        let mut ids: Vec<_> = taken.iter().map(|(id, _)| id.expect("pending")).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![[1; 16], [2; 16], [3; 16]], "not the stored one");
        assert!(taken.iter().all(|(_, r)| *r == tk.0));
        assert!(s.f.take_unstored().is_empty(), "taken once");
    }
}
