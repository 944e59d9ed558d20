//! Federation, as driven by the Swarm task: admission on identify, the
//! relay's own signed address record (gossiped, re-signed), the address
//! book (gossip validation, anti-entropy), dialing relays by key, and
//! forwarding packets to their home relay (routed with a hint, flooded
//! without) with acknowledgements, retries and dedup.
//!
//! [`Fed`] is owned by the Swarm task and never blocks it: store work runs
//! in spawned tasks that report back on a bounded channel ([`Internal`]).

use crate::config::{self, FederationMode};
use crate::core::{Core, Federate, now_ms};
use bytes::Bytes;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, Swarm, identity};
use meshwhisper_behaviour::federation::codec::{AckStatus, Frame, MAX_PULL, MAX_RECORDS, PacketId};
use meshwhisper_behaviour::node::{Behaviour, RECORDS_TOPIC};
use meshwhisper_behaviour::{packet, policy};
use meshwhisper_crypto::address_record::{self, AddressRecord, Contents};
use meshwhisper_crypto::identity::IdentityKeyPair;
use meshwhisper_storage::address_book::Upsert;
use meshwhisper_storage::mailbox::MailboxId;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::mpsc;

/// Results of spawned work, back to the Swarm task.
#[derive(Debug)]
pub(crate) enum Internal {
    /// Send a frame to a peer.
    Send { peer: PeerId, frame: Frame },
    /// An incoming packet was handled by the store.
    Stored {
        peer: PeerId,
        id: PacketId,
        status: AckStatus,
    },
    /// A gossiped record was checked against the book.
    Validated {
        message_id: MessageId,
        source: PeerId,
        acceptance: MessageAcceptance,
    },
    /// Relays whose records are in the book (maybe worth dialing).
    Known(Vec<(PeerId, Vec<Multiaddr>, u64)>),
    /// The record lookup for a relay we must reach.
    DialTarget { peer: PeerId, addrs: Vec<Multiaddr> },
    /// A new blocklist (file changed or SIGHUP).
    Blocklist(HashSet<PeerId>),
}

/// A routed packet sent on a live stream is resent if no ack came in this
/// long (the peer may have lost it without closing the stream).
const ACK_TIMEOUT_MS: u64 = 60_000;

/// Anti-entropy requests served for one peer at a time.
const AE_SERVING: usize = 4;

/// A held anti-entropy serving slot.
struct AeSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for AeSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// How often the DHT is refreshed (kad's own default period).
const KAD_REFRESH_MS: u64 = 5 * 60_000;

/// Capacity of the [`Internal`] channel.
pub(crate) const INTERNAL_QUEUE: usize = 4096;
/// Capacity of the channel from the core (packets to federate).
pub(crate) const OUTBOUND_QUEUE: usize = 8192;

/// The Ed25519 key inside an Ed25519 PeerId.
pub fn key_of(peer: &PeerId) -> Option<[u8; 32]> {
    let mh: &libp2p::multihash::Multihash<64> = peer.as_ref();
    if mh.code() != 0 {
        return None;
    }
    let pk = identity::PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    Some(pk.try_into_ed25519().ok()?.to_bytes())
}

/// The PeerId of an Ed25519 key.
pub fn peer_of(key: &[u8; 32]) -> Option<PeerId> {
    let k = identity::ed25519::PublicKey::try_from_bytes(key).ok()?;
    Some(identity::PublicKey::from(k).to_peer_id())
}

fn random_cursor() -> [u8; 32] {
    let mut c = [0u8; 32];
    c[..16].copy_from_slice(&random_id());
    c
}

fn random_id() -> PacketId {
    let mut id = [0u8; 16];
    if getrandom::fill(&mut id).is_err() {
        // No OS randomness: fall back to time (ids only need to be unique).
        id[..8].copy_from_slice(&now_ms().to_be_bytes());
    }
    id
}

struct Pending {
    /// Order of arrival (packets to one relay go out in this order).
    seq: u64,
    /// Our stored copy (deleted once the home relay stored it).
    mailbox_id: MailboxId,
    /// The home relay, or `None` for a flood.
    target: Option<PeerId>,
    target_key: Option<[u8; 32]>,
    packet: Bytes,
    deadline_ms: u64,
    next_ms: u64,
    /// Floods that reached at least one relay.
    floods: u32,
    /// Floods tried (the backoff grows with each).
    tries: u32,
    /// The stream generation a routed packet was last sent on, and when:
    /// a reliable stream delivers it, so it is resent only when that
    /// stream is gone, the target refused it, or no ack came for a minute.
    sent: Option<(u64, u64)>,
    /// Waiting in its target's backlog for room in the send window.
    backlogged: bool,
}

struct Seen {
    at_ms: u64,
    /// Who sent it to us (acks go back there).
    upstream: Option<PeerId>,
    /// Stored here (a repeated Routed is acked `Stored` again).
    stored: bool,
    /// A `Stored` ack already went upstream.
    acked: bool,
}

/// Packet ids seen recently, bounded by count and age.
struct Dedup {
    map: HashMap<PacketId, Seen>,
    order: VecDeque<(PacketId, u64)>,
    max: usize,
    ttl_ms: u64,
}

impl Dedup {
    fn evict(&mut self, now: u64) {
        while let Some(&(id, at)) = self.order.front() {
            if self.order.len() > self.max || at + self.ttl_ms <= now {
                self.order.pop_front();
                if self.map.get(&id).is_some_and(|s| s.at_ms == at) {
                    self.map.remove(&id);
                }
            } else {
                break;
            }
        }
    }

    fn insert(&mut self, id: PacketId, upstream: Option<PeerId>, now: u64) {
        self.map.insert(
            id,
            Seen {
                at_ms: now,
                upstream,
                stored: false,
                acked: false,
            },
        );
        self.order.push_back((id, now));
        self.evict(now);
    }
}

struct DialState {
    next_ms: u64,
    backoff_ms: u64,
}

/// Federation state of the Swarm task.
pub(crate) struct Fed {
    cfg: config::Federation,
    core: Arc<Core>,
    me: PeerId,
    my_key: [u8; 32],
    identity: IdentityKeyPair,
    tx: mpsc::Sender<Internal>,
    dedup: Dedup,
    pending: HashMap<PacketId, Pending>,
    dials: HashMap<PeerId, DialState>,
    bootstrap: Vec<(PeerId, Multiaddr)>,
    next_bootstrap_ms: u64,
    bootstrap_backoff_ms: u64,
    own: Option<(AddressRecord, Vec<Vec<u8>>)>,
    unpublished: bool,
    next_sign_ms: u64,
    next_ae_ms: u64,
    ae_turn: usize,
    next_req: Arc<std::sync::atomic::AtomicU64>,
    next_seq: u64,
    /// Routed packets sent and not yet acknowledged, per target.
    inflight: HashMap<PeerId, HashSet<PacketId>>,
    /// Routed packets waiting for room in the window, per target, in order.
    backlog: HashMap<PeerId, VecDeque<PacketId>>,
    /// Stored copies with a pending packet (one federation per copy).
    by_mailbox: HashSet<MailboxId>,
    /// Old ids of re-flooded packets, to their current id.
    aliases: HashMap<PacketId, PacketId>,
    /// Anti-entropy requests being served, per peer.
    ae_serving: HashMap<PeerId, Arc<std::sync::atomic::AtomicUsize>>,
    /// Bytes of packets held in `pending`.
    pending_bytes: usize,
    /// Pending packets per target relay.
    queued_for: HashMap<PeerId, usize>,
    /// When the DHT is refreshed next.
    next_kad_ms: u64,
    /// Anti-entropy walks in progress, per peer, since when.
    ae_walks: HashMap<PeerId, u64>,
    /// Stream generation per peer (bumped when its stream opens or closes).
    gens: HashMap<PeerId, u64>,
    /// Relays dialed from the book recently (not dialed again for a minute).
    discovered_at: HashMap<PeerId, u64>,
    /// Newest record timestamp per relay key seen here.
    known_ts: HashMap<[u8; 32], u64>,
    /// Per-peer tasks storing packets for homed recipients, in order.
    storers: HashMap<PeerId, mpsc::Sender<(PacketId, Bytes)>>,
    mailbox_ttl_ms: u64,
    topic: IdentTopic,
}

impl Fed {
    /// State for the relay whose libp2p key is `key`.
    pub(crate) fn new(
        cfg: config::Federation,
        core: Arc<Core>,
        key: &identity::Keypair,
        tx: mpsc::Sender<Internal>,
        mailbox_ttl_ms: u64,
    ) -> Option<Self> {
        let ed = key.clone().try_into_ed25519().ok()?;
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(ed.secret().as_ref());
        let identity = IdentityKeyPair::from_seed(&seed);
        let me = key.public().to_peer_id();
        let bootstrap = cfg
            .bootstrap
            .iter()
            .filter_map(|b| {
                let a: Multiaddr = b.parse().ok()?;
                match a.iter().last() {
                    Some(libp2p::multiaddr::Protocol::P2p(p)) if p != me => Some((p, a)),
                    _ => None,
                }
            })
            .collect();
        Some(Self {
            dedup: Dedup {
                map: HashMap::new(),
                order: VecDeque::new(),
                max: cfg.dedup_entries,
                ttl_ms: cfg.dedup_secs.saturating_mul(1000),
            },
            cfg,
            core,
            me,
            my_key: ed.public().to_bytes(),
            identity,
            tx,
            pending: HashMap::new(),
            dials: HashMap::new(),
            bootstrap,
            next_bootstrap_ms: 0,
            bootstrap_backoff_ms: 500,
            own: None,
            unpublished: false,
            next_sign_ms: 0,
            next_ae_ms: 0,
            ae_turn: 0,
            next_req: Arc::new(std::sync::atomic::AtomicU64::new(1)),
            next_seq: 0,
            known_ts: HashMap::new(),
            discovered_at: HashMap::new(),
            gens: HashMap::new(),
            ae_walks: HashMap::new(),
            next_kad_ms: 0,
            queued_for: HashMap::new(),
            pending_bytes: 0,
            by_mailbox: HashSet::new(),
            aliases: HashMap::new(),
            ae_serving: HashMap::new(),
            inflight: HashMap::new(),
            backlog: HashMap::new(),
            storers: HashMap::new(),
            mailbox_ttl_ms,
            topic: IdentTopic::new(RECORDS_TOPIC),
        })
    }

    /// Removes a pending packet, keeping the per-target counts and the
    /// send window.
    fn take_pending(&mut self, id: &PacketId) -> Option<Pending> {
        let p = self.pending.remove(id)?;
        self.pending_bytes = self.pending_bytes.saturating_sub(p.packet.len());
        self.by_mailbox.remove(&p.mailbox_id);
        if let Some(t) = p.target {
            if let Some(n) = self.queued_for.get_mut(&t) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.queued_for.remove(&t);
                    // Nothing waits for it any more: stop trying to reach it.
                    self.dials.remove(&t);
                }
            }
            if let Some(w) = self.inflight.get_mut(&t) {
                w.remove(id);
            }
        }
        Some(p)
    }

    /// Sends backlogged packets to `peer` while its window has room.
    fn pump(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId) {
        let now = now_ms();
        while self.inflight.get(&peer).map_or(0, HashSet::len) < self.cfg.send_window {
            let Some(next) = self.backlog.get_mut(&peer).and_then(VecDeque::pop_front) else {
                self.backlog.remove(&peer);
                break;
            };
            if let Some(p) = self.pending.get_mut(&next)
                && p.backlogged
            {
                p.backlogged = false;
                self.dispatch(swarm, next, now);
            }
        }
    }

    fn metrics(&self) -> &crate::metrics::FederationMetrics {
        &self.core.metrics.federation
    }

    /// Bootstrap peers configured.
    pub(crate) fn bootstrap_count(&self) -> usize {
        self.bootstrap.len()
    }

    /// The configured bootstrap address of `peer`, if it is one.
    pub(crate) fn bootstrap_addr(&self, peer: &PeerId) -> Option<&Multiaddr> {
        self.bootstrap
            .iter()
            .find(|(p, _)| p == peer)
            .map(|(_, a)| a)
    }

    fn spawn_send(&self, fut: impl std::future::Future<Output = Vec<Internal>> + Send + 'static) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            for m in fut.await {
                if tx.send(m).await.is_err() {
                    break;
                }
            }
        });
    }

    fn update_gauges(&self, swarm: &Swarm<Behaviour>) {
        let open = swarm.behaviour().federation.peers().count() as u64;
        self.metrics().peers_connected.store(open, Relaxed);
        self.metrics()
            .pending
            .store(self.pending.len() as u64, Relaxed);
    }

    // ---- admission -------------------------------------------------------

    /// identify told us what `peer` speaks.
    pub(crate) fn on_identified(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        info: &libp2p::identify::Info,
    ) {
        let fed = libp2p::StreamProtocol::new(meshwhisper_behaviour::federation::codec::PROTOCOL);
        if !info.protocols.contains(&fed) {
            return;
        }
        for a in &info.listen_addrs {
            swarm.behaviour_mut().kad.add_address(&peer, a.clone());
        }
        // Also for an admitted relay: a new connection we dialed gets its
        // stream.
        if self.ensure_admitted(swarm, peer) {
            swarm.behaviour_mut().federation.open(peer);
        }
    }

    /// Admits `peer` as a relay if the policy allows (and opens our side
    /// of the federation stream); whether it is admitted. A peer that opens
    /// a federation stream or sends federation frames has shown it is a
    /// relay as surely as identify would, so this is also asked then: a
    /// slow or failed identify never leaves two relays connected but not
    /// federated.
    fn ensure_admitted(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId) -> bool {
        let b = swarm.behaviour_mut();
        if b.policy.is_admitted(&peer) {
            return true;
        }
        match b.policy.admit(peer, now_ms()) {
            Ok(()) => {
                b.federation.open(peer);
                tracing::info!(%peer, "relay admitted");
                true
            }
            Err(r) => {
                if r != policy::Refusal::Blocked {
                    self.metrics().admissions_refused.fetch_add(1, Relaxed);
                }
                tracing::info!(%peer, reason = r.label(), "relay refused");
                false
            }
        }
    }

    /// The policy is closing a peer's connections.
    pub(crate) fn on_policy(&mut self, ev: policy::Event) {
        let policy::Event::Disconnecting { peer, reason } = ev;
        if reason == policy::Refusal::Blocked {
            self.metrics()
                .handshake_rejections_blocked
                .fetch_add(1, Relaxed);
        }
        tracing::info!(%peer, reason = reason.label(), "disconnecting relay");
    }

    // ---- streams ---------------------------------------------------------

    pub(crate) fn on_opened(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId) {
        if !self.ensure_admitted(swarm, peer) {
            return;
        }
        self.dials.remove(&peer);
        *self.gens.entry(peer).or_default() += 1;
        // Packets waiting for this relay go now.
        let now = now_ms();
        let mut ids: Vec<(u64, PacketId)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.target == Some(peer))
            .map(|(id, p)| (p.seq, *id))
            .collect();
        ids.sort_unstable();
        for (_, id) in ids {
            self.dispatch(swarm, id, now);
        }
        // Reconcile address books with a new peer right away.
        self.anti_entropy_with(swarm, peer);
        self.update_gauges(swarm);
    }

    /// A stream to `peer` closed (`last`: no other is open).
    pub(crate) fn on_closed(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        reason: &str,
        last: bool,
    ) {
        if last {
            // Its storing task finishes what it holds, then ends.
            self.storers.remove(&peer);
            self.ae_walks.remove(&peer);
            self.ae_serving.remove(&peer);
        }
        // Frames queued on it are lost: routed packets are resent.
        *self.gens.entry(peer).or_default() += 1;
        let now = now_ms();
        for id in self.inflight.remove(&peer).unwrap_or_default() {
            if let Some(p) = self.pending.get_mut(&id) {
                p.sent = None;
                p.next_ms = now;
            }
        }
        if !reason.contains("connection closed") && !reason.contains("closed by peer") {
            self.metrics().handshake_failures.fetch_add(1, Relaxed);
            // The connection may still be up: open a new stream on the
            // connections we dialed (the peer does the same on its own).
            if swarm.behaviour().policy.is_admitted(&peer) {
                swarm.behaviour_mut().federation.open(peer);
            }
        }
        tracing::debug!(%peer, %reason, last, "federation stream closed");
        self.update_gauges(swarm);
    }

    /// A slot for serving one anti-entropy request of `peer` (at most
    /// [`AE_SERVING`] at once; beyond that requests are dropped and the
    /// peer asks again next round). Freed when the guard drops.
    fn ae_slot(&mut self, peer: PeerId) -> Option<AeSlot> {
        let n = self.ae_serving.entry(peer).or_default().clone();
        if n.load(Relaxed) >= AE_SERVING {
            self.metrics().drops_rate_limited.fetch_add(1, Relaxed);
            return None;
        }
        n.fetch_add(1, Relaxed);
        Some(AeSlot(n))
    }

    /// A frame could not be queued for `peer`: what we keep is retried.
    pub(crate) fn on_unsent(&mut self, peer: PeerId, frame: Frame) {
        let now = now_ms();
        self.metrics().drops_queue_full.fetch_add(1, Relaxed);
        match frame {
            Frame::Routed { id, .. } => {
                if let Some(p) = self.pending.get_mut(&id) {
                    p.sent = None;
                    p.next_ms = now + self.cfg.retry_ms;
                }
                if let Some(w) = self.inflight.get_mut(&peer) {
                    w.remove(&id);
                }
            }
            Frame::Forward { id, .. } => {
                if let Some(p) = self.pending.get_mut(&id) {
                    p.next_ms = p.next_ms.min(now + self.cfg.retry_ms);
                }
            }
            // An unsent ack or anti-entropy frame: the other side resends
            // or asks again.
            _ => {}
        }
    }

    // ---- outbound packets -------------------------------------------------

    /// A packet accepted here whose recipient is homed elsewhere.
    pub(crate) fn on_outbound(&mut self, swarm: &mut Swarm<Behaviour>, f: Federate) {
        if self.cfg.mode == FederationMode::Off {
            return;
        }
        if self.by_mailbox.contains(&f.mailbox_id) {
            // Already on its way (a restart's hand-back met a live one).
            return;
        }
        if self.pending.len() >= self.cfg.max_pending
            || self.pending_bytes + f.packet.len() > self.cfg.max_pending_bytes
        {
            // The stored copy stays here for the recipient to fetch.
            self.metrics().drops_queue_full.fetch_add(1, Relaxed);
            return;
        }
        let target = f.hint.and_then(|k| peer_of(&k).map(|p| (p, k)));
        if target.is_some_and(|(p, _)| p == self.me) {
            // Named us: it is stored here already.
            return;
        }
        if let Some((p, _)) = target
            && !swarm.behaviour().federation.is_open(&p)
            && self.queued_for.get(&p).copied().unwrap_or(0) >= self.cfg.dial_queue
        {
            self.metrics().drops_queue_full.fetch_add(1, Relaxed);
            return;
        }
        let id = random_id();
        let now = now_ms();
        self.next_seq += 1;
        if let Some((p, _)) = target {
            *self.queued_for.entry(p).or_default() += 1;
        }
        self.pending_bytes += f.packet.len();
        self.by_mailbox.insert(f.mailbox_id);
        self.pending.insert(
            id,
            Pending {
                seq: self.next_seq,
                mailbox_id: f.mailbox_id,
                target: target.map(|(p, _)| p),
                target_key: target.map(|(_, k)| k),
                packet: f.packet,
                deadline_ms: f.at_ms.saturating_add(self.mailbox_ttl_ms),
                next_ms: now,
                floods: 0,
                tries: 0,
                sent: None,
                backlogged: false,
            },
        );
        self.dedup.insert(id, None, now);
        self.dispatch(swarm, id, now);
        self.update_gauges(swarm);
    }

    /// Sends (or re-sends) a pending packet, or starts reaching its target.
    fn dispatch(&mut self, swarm: &mut Swarm<Behaviour>, id: PacketId, now: u64) {
        let core = self.core.clone();
        let m = &core.metrics.federation;
        let Some(p) = self.pending.get_mut(&id) else {
            return;
        };
        match (p.target, p.target_key) {
            (Some(target), Some(key)) => {
                let generation = self.gens.get(&target).copied().unwrap_or(0);
                if swarm.behaviour().federation.is_open(&target)
                    && p.sent
                        .is_some_and(|(g, at)| g == generation && now < at + ACK_TIMEOUT_MS)
                {
                    // On its way over a live stream: wait for the ack.
                    p.next_ms = now + self.cfg.retry_ms;
                } else if swarm.behaviour().federation.is_open(&target) {
                    let window = self.inflight.entry(target).or_default();
                    if window.len() >= self.cfg.send_window && !window.contains(&id) {
                        // The window is full: wait in order for an ack.
                        if !p.backlogged {
                            p.backlogged = true;
                            self.backlog.entry(target).or_default().push_back(id);
                        }
                        p.next_ms = now + ACK_TIMEOUT_MS;
                        return;
                    }
                    window.insert(id);
                    p.backlogged = false;
                    if p.sent.is_some() {
                        m.retries.fetch_add(1, Relaxed);
                    }
                    p.sent = Some((generation, now));
                    let frame = Frame::Routed {
                        id,
                        hops: 1,
                        target: key,
                        packet: p.packet.clone(),
                    };
                    p.next_ms = now + self.cfg.retry_ms;
                    if swarm.behaviour_mut().federation.send(target, frame) {
                        m.forwards_sent.fetch_add(1, Relaxed);
                        m.routed_forwards.fetch_add(1, Relaxed);
                    }
                } else {
                    p.next_ms = now + self.cfg.retry_ms;
                    self.reach(swarm, target, now);
                }
            }
            _ => {
                let frame = Frame::Forward {
                    id,
                    hops: 1,
                    packet: p.packet.clone(),
                };
                let sent = self.flood(swarm, frame, None);
                if let Some(p) = self.pending.get_mut(&id) {
                    // Unclaimed floods back off: 1, 2, 4... × flood_retry_ms
                    // (× retry_ms while there is no relay to flood to).
                    let base = if sent == 0 {
                        self.cfg.retry_ms
                    } else {
                        self.cfg.flood_retry_ms
                    };
                    p.next_ms = now + (base << p.tries.min(16));
                    p.tries += 1;
                    // A try with nobody to flood to counts too, so a relay
                    // alone (or one whose peers are all away) does not keep
                    // every unclaimed packet in memory.
                    p.floods += 1;
                }
            }
        }
    }

    /// Sends `frame` to every admitted relay with a stream except `except`.
    fn flood(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        frame: Frame,
        except: Option<PeerId>,
    ) -> usize {
        let b = swarm.behaviour_mut();
        let peers: Vec<PeerId> = b
            .federation
            .peers()
            .filter(|p| Some(**p) != except && b.policy.is_admitted(p))
            .copied()
            .collect();
        let mut n = 0;
        for p in peers {
            if b.federation.send(p, frame.clone()) {
                n += 1;
            }
        }
        self.metrics().forwards_sent.fetch_add(n as u64, Relaxed);
        n
    }

    /// Starts reaching `peer` (known by key): dial its record's addresses,
    /// or ask the DHT. Backs off between attempts.
    fn reach(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId, now: u64) {
        if swarm.is_connected(&peer) {
            // Connected but no stream yet: identify and admission follow.
            return;
        }
        let d = self.dials.entry(peer).or_insert(DialState {
            next_ms: 0,
            backoff_ms: self.cfg.retry_ms,
        });
        if d.next_ms > now {
            return;
        }
        d.next_ms = now + d.backoff_ms;
        d.backoff_ms = (d.backoff_ms * 2).min(30_000);
        let Some(key) = key_of(&peer) else {
            return;
        };
        let core = self.core.clone();
        self.spawn_send(async move {
            let addrs = match core.store.address_book().get(&key).await {
                Ok(Some(r)) => r
                    .contents()
                    .addrs
                    .iter()
                    .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
                    .collect(),
                _ => Vec::new(),
            };
            vec![Internal::DialTarget { peer, addrs }]
        });
    }

    fn dial(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId, addrs: Vec<Multiaddr>) {
        if swarm.is_connected(&peer) || swarm.behaviour().policy.is_blocked(&peer) {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        match swarm.dial(opts) {
            Ok(()) => {
                self.metrics().discovered_dials.fetch_add(1, Relaxed);
            }
            Err(e) => tracing::debug!(%peer, error = %e, "dial failed"),
        }
    }

    // ---- inbound frames ---------------------------------------------------

    pub(crate) fn on_frame(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId, frame: Frame) {
        let now = now_ms();
        if !swarm.behaviour().policy.is_admitted(&peer) {
            self.ensure_admitted(swarm, peer);
        }
        let b = swarm.behaviour_mut();
        // Not admitted, or over its rate: packets are refused (the
        // sender retries), anything else dropped. Acks answer our own sends
        // (bounded by them) and are never rate-limited, or a busy peer's
        // acks would be lost and everything resent.
        let admitted = b.policy.is_admitted(&peer);
        let limited =
            admitted && !matches!(frame, Frame::Ack { .. }) && !b.policy.allow_frame(&peer, now);
        if !admitted || limited {
            if limited {
                self.metrics().drops_rate_limited.fetch_add(1, Relaxed);
            }
            if let Frame::Forward { id, .. } | Frame::Routed { id, .. } = frame {
                let status = AckStatus::Refused;
                b.federation.send(peer, Frame::Ack { id, status });
            }
            return;
        }
        match frame {
            Frame::Forward { id, hops, packet } => {
                self.on_packet(swarm, peer, id, hops, None, packet, now)
            }
            Frame::Routed {
                id,
                hops,
                target,
                packet,
            } => self.on_packet(swarm, peer, id, hops, Some(target), packet, now),
            Frame::Ack { id, status } => self.on_ack(swarm, peer, id, status),
            Frame::DigestRequest { req, after, limit } => {
                let Some(serving) = self.ae_slot(peer) else {
                    return;
                };
                let core = self.core.clone();
                self.spawn_send(async move {
                    let _serving = serving;
                    let limit = u32::from(limit);
                    match core.store.address_book().digest(after, limit + 1).await {
                        Ok(mut entries) => {
                            let more = entries.len() > limit as usize;
                            entries.truncate(limit as usize);
                            vec![Internal::Send {
                                peer,
                                frame: Frame::Digest { req, more, entries },
                            }]
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reading the address book");
                            Vec::new()
                        }
                    }
                });
            }
            Frame::Digest { more, entries, .. } => {
                if !more {
                    self.ae_walks.remove(&peer);
                }
                let core = self.core.clone();
                let next = self.next_req.clone();
                let page = self.cfg.anti_entropy_page;
                let me = self.my_key;
                self.spawn_send(async move {
                    let keys: Vec<[u8; 32]> = entries.iter().map(|(k, _)| *k).collect();
                    let Ok(ours) = core.store.address_book().timestamps(&keys).await else {
                        return Vec::new();
                    };
                    let want: Vec<[u8; 32]> = entries
                        .iter()
                        .filter(|(k, ts)| *k != me && ours.get(k).is_none_or(|o| o < ts))
                        .map(|(k, _)| *k)
                        .collect();
                    let mut out: Vec<Internal> = want
                        .chunks(MAX_PULL)
                        .map(|c| Internal::Send {
                            peer,
                            frame: Frame::Pull {
                                req: next.fetch_add(1, Relaxed),
                                keys: c.to_vec(),
                            },
                        })
                        .collect();
                    if more && let Some((last, _)) = entries.last() {
                        out.push(Internal::Send {
                            peer,
                            frame: Frame::DigestRequest {
                                req: next.fetch_add(1, Relaxed),
                                after: Some(*last),
                                limit: page,
                            },
                        });
                    }
                    out
                });
            }
            Frame::Pull { req, keys } => {
                let Some(serving) = self.ae_slot(peer) else {
                    return;
                };
                let core = self.core.clone();
                self.spawn_send(async move {
                    let _serving = serving;
                    let recs: Vec<Bytes> = match core.store.address_book().encoded(&keys).await {
                        Ok(r) => r.into_iter().map(Bytes::from).collect(),
                        Err(e) => {
                            tracing::warn!(error = %e, "reading the address book");
                            Vec::new()
                        }
                    };
                    recs.chunks(MAX_RECORDS)
                        .map(|c| Internal::Send {
                            peer,
                            frame: Frame::Records {
                                req,
                                records: c.to_vec(),
                            },
                        })
                        .collect()
                });
            }
            Frame::Records { records, .. } => {
                let core = self.core.clone();
                let me = self.my_key;
                self.spawn_send(async move {
                    let mut learned = Vec::new();
                    for bytes in records {
                        if let Some(x) = learn(&core, &bytes, me).await {
                            learned.push(x);
                        }
                    }
                    if learned.is_empty() {
                        Vec::new()
                    } else {
                        vec![Internal::Known(learned)]
                    }
                });
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_packet(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        id: PacketId,
        hops: u8,
        target: Option<[u8; 32]>,
        packet: Bytes,
        now: u64,
    ) {
        self.metrics().forwards_received.fetch_add(1, Relaxed);
        let ack = |swarm: &mut Swarm<Behaviour>, status| {
            swarm
                .behaviour_mut()
                .federation
                .send(peer, Frame::Ack { id, status });
        };
        if let Some(t) = target
            && t != self.my_key
        {
            ack(swarm, AckStatus::NotTarget);
            return;
        }
        if let Some(seen) = self.dedup.map.get(&id) {
            self.metrics().drops_duplicate.fetch_add(1, Relaxed);
            let status = if seen.stored {
                AckStatus::Stored
            } else {
                AckStatus::Duplicate
            };
            ack(swarm, status);
            return;
        }
        let dest = match packet::destination(&packet, usize::MAX) {
            Ok(d) => d,
            Err(_) => {
                self.metrics().drops_malformed.fetch_add(1, Relaxed);
                ack(swarm, AckStatus::Malformed);
                return;
            }
        };
        self.dedup.insert(id, Some(peer), now);
        if target.is_some() || self.core.is_homed(&dest) {
            // Stored in arrival order per peer, many per commit.
            let tx = self
                .storers
                .entry(peer)
                .or_insert_with(|| spawn_storer(self.core.clone(), peer, self.tx.clone()));
            if tx.try_send((id, packet)).is_err() {
                self.dedup.map.remove(&id);
                self.metrics().drops_queue_full.fetch_add(1, Relaxed);
                ack(swarm, AckStatus::Refused);
            }
            return;
        }
        if hops >= self.cfg.max_hops {
            self.metrics().drops_ttl.fetch_add(1, Relaxed);
            ack(swarm, AckStatus::NotHome);
            return;
        }
        let n = self.flood(
            swarm,
            Frame::Forward {
                id,
                hops: hops + 1,
                packet,
            },
            Some(peer),
        );
        self.metrics()
            .forwarded_onward
            .fetch_add(u64::from(n > 0), Relaxed);
        ack(
            swarm,
            if n > 0 {
                AckStatus::Relayed
            } else {
                AckStatus::NotHome
            },
        );
    }

    /// The store handled a packet a peer sent us.
    pub(crate) fn on_stored(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        id: PacketId,
        status: AckStatus,
    ) {
        match status {
            AckStatus::Stored => {
                if let Some(s) = self.dedup.map.get_mut(&id) {
                    s.stored = true;
                    s.acked = true;
                }
            }
            // Let a retry through.
            _ => {
                self.dedup.map.remove(&id);
            }
        }
        swarm
            .behaviour_mut()
            .federation
            .send(peer, Frame::Ack { id, status });
    }

    fn on_ack(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        id: PacketId,
        status: AckStatus,
    ) {
        match status {
            AckStatus::Stored => {
                let id = match self.aliases.remove(&id) {
                    Some(newer) if !self.pending.contains_key(&id) => newer,
                    _ => id,
                };
                if let Some(p) = self.take_pending(&id) {
                    if let Some(t) = p.target {
                        self.metrics().routed_acked.fetch_add(1, Relaxed);
                        self.pump(swarm, t);
                    }
                    let core = self.core.clone();
                    tokio::spawn(async move { core.delivered(vec![p.mailbox_id]).await });
                } else if let Some(s) = self.dedup.map.get_mut(&id)
                    && !s.acked
                    && let Some(up) = s.upstream
                {
                    // We relayed this flood: tell whoever sent it to us.
                    s.acked = true;
                    swarm
                        .behaviour_mut()
                        .federation
                        .send(up, Frame::Ack { id, status });
                }
            }
            AckStatus::Malformed | AckStatus::NotTarget => {
                if let Some(p) = self.pending.get(&id)
                    && p.target == Some(peer)
                {
                    // Never accepted there: keep our stored copy, stop sending.
                    self.take_pending(&id);
                    self.metrics().drops_malformed.fetch_add(1, Relaxed);
                    self.pump(swarm, peer);
                }
            }
            AckStatus::Refused => {
                // A flood a relay could not take now (rate limit, storage):
                // flood again sooner (still one of its bounded attempts).
                if let Some(p) = self.pending.get_mut(&id)
                    && p.target.is_none()
                {
                    let soon = now_ms() + (self.cfg.retry_ms << p.tries.min(16));
                    p.next_ms = p.next_ms.min(soon);
                }
                // Not taken now: resend after retry_ms, let others through.
                if let Some(p) = self.pending.get_mut(&id)
                    && p.target == Some(peer)
                {
                    p.sent = None;
                    p.next_ms = now_ms() + self.cfg.retry_ms;
                    if let Some(w) = self.inflight.get_mut(&peer) {
                        w.remove(&id);
                    }
                    self.pump(swarm, peer);
                }
            }
            AckStatus::Relayed | AckStatus::Duplicate | AckStatus::NotHome => {}
        }
    }

    // ---- address records --------------------------------------------------

    /// A gossiped record arrived: check it, then let the store decide.
    pub(crate) fn on_gossip(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        source: PeerId,
        message_id: MessageId,
        data: Vec<u8>,
    ) {
        match AddressRecord::accept(&data, now_ms()) {
            Err(e) => {
                self.metrics().reject_record(e.kind());
                let _ = swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(
                        &message_id,
                        &source,
                        MessageAcceptance::Reject,
                    );
            }
            Ok(rec)
                if self
                    .known_ts
                    .get(&rec.relay_key().to_bytes())
                    .is_some_and(|&ts| ts >= rec.timestamp_ms()) =>
            {
                // Already known (as new or newer): no store round trip.
                let _ = swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(
                        &message_id,
                        &source,
                        MessageAcceptance::Ignore,
                    );
            }
            Ok(_) => {
                let core = self.core.clone();
                let me = self.my_key;
                self.spawn_send(async move {
                    let learned = learn(&core, &data, me).await;
                    let acceptance = if learned.is_some() {
                        MessageAcceptance::Accept
                    } else {
                        MessageAcceptance::Ignore
                    };
                    let mut out = vec![Internal::Validated {
                        message_id,
                        source,
                        acceptance,
                    }];
                    if let Some(l) = learned {
                        out.push(Internal::Known(vec![l]));
                    }
                    out
                });
            }
        }
    }

    /// Signs a fresh record when the addresses changed or the refresh time
    /// came, stores it in our own book and publishes it.
    fn maintain_record(&mut self, swarm: &mut Swarm<Behaviour>, now: u64) {
        let mut addrs: Vec<Vec<u8>> = Vec::new();
        let listen = swarm.listeners().cloned().collect::<Vec<_>>();
        let external = swarm.external_addresses().cloned().collect::<Vec<_>>();
        let configured = self
            .cfg
            .external_addrs
            .iter()
            .filter_map(|a| a.parse::<Multiaddr>().ok())
            .collect::<Vec<_>>();
        for a in configured.into_iter().chain(external).chain(listen) {
            let bytes = a.to_vec();
            if bytes.len() <= address_record::MAX_ADDR_LEN
                && !addrs.contains(&bytes)
                && addrs.len() < address_record::MAX_ADDRS
            {
                addrs.push(bytes);
            }
        }
        if addrs.is_empty() {
            return;
        }
        let changed = self.own.as_ref().is_none_or(|(_, a)| *a != addrs);
        if changed || now >= self.next_sign_ms {
            let ts = self
                .own
                .as_ref()
                .map_or(now, |(r, _)| now.max(r.timestamp_ms() + 1));
            let contents = Contents {
                timestamp_ms: ts,
                onion_key: self.identity.public().x25519(),
                addrs: addrs.clone(),
                anchors: Vec::new(),
            };
            match AddressRecord::sign(&self.identity, contents) {
                Ok(r) => {
                    self.metrics().records_signed.fetch_add(1, Relaxed);
                    let store_rec = r.clone();
                    let core = self.core.clone();
                    tokio::spawn(async move {
                        if let Err(e) = core.store.address_book().upsert(&store_rec, now_ms()).await
                        {
                            tracing::warn!(error = %e, "storing our own address record");
                        }
                    });
                    self.own = Some((r, addrs));
                    self.unpublished = self.cfg.record_gossip;
                    self.next_sign_ms =
                        now + self.cfg.record_refresh_hours.saturating_mul(3_600_000);
                    tracing::debug!("signed a new address record");
                }
                Err(e) => tracing::warn!(error = %e, "cannot sign our address record"),
            }
        }
        if self.unpublished
            && let Some((r, _)) = &self.own
        {
            match swarm
                .behaviour_mut()
                .gossipsub
                .publish(self.topic.clone(), r.encode())
            {
                Ok(_) => self.unpublished = false,
                // No subscriber seen yet (or a duplicate): retry next tick.
                Err(gossipsub::PublishError::Duplicate) => self.unpublished = false,
                Err(e) => tracing::trace!(error = %e, "record not published yet"),
            }
        }
    }

    /// Remembers the newest record timestamp seen for a relay (bounded),
    /// so gossip repeats are ignored without a store round trip.
    fn note_known(&mut self, peer: &PeerId, ts: u64) {
        let Some(key) = key_of(peer) else { return };
        if self.known_ts.len() >= 2 * self.cfg.address_book_max as usize
            && !self.known_ts.contains_key(&key)
        {
            self.known_ts.clear();
        }
        let e = self.known_ts.entry(key).or_insert(ts);
        *e = (*e).max(ts);
    }

    fn anti_entropy_with(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId) {
        // One walk through a peer's book at a time (a walk of thousands of
        // records takes several pages); a stuck one is given up after a minute.
        let now = now_ms();
        if self
            .ae_walks
            .get(&peer)
            .is_some_and(|&t| t + ACK_TIMEOUT_MS > now)
        {
            return;
        }
        self.ae_walks.insert(peer, now);
        let frame = Frame::DigestRequest {
            req: self.next_req.fetch_add(1, Relaxed),
            after: None,
            limit: self.cfg.anti_entropy_page,
        };
        if swarm.behaviour_mut().federation.send(peer, frame) {
            self.metrics().anti_entropy_rounds.fetch_add(1, Relaxed);
        }
    }

    // ---- results of spawned work -------------------------------------------

    pub(crate) fn on_internal(&mut self, swarm: &mut Swarm<Behaviour>, m: Internal) {
        match m {
            Internal::Send { peer, frame } => {
                swarm.behaviour_mut().federation.send(peer, frame);
            }
            Internal::Stored { peer, id, status } => self.on_stored(swarm, peer, id, status),
            Internal::Validated {
                message_id,
                source,
                acceptance,
            } => {
                let _ = swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &source, acceptance);
            }
            Internal::Known(relays) => {
                let now = now_ms();
                let mut candidates = Vec::new();
                for (peer, addrs, ts) in relays {
                    self.note_known(&peer, ts);
                    for a in &addrs {
                        swarm.behaviour_mut().kad.add_address(&peer, a.clone());
                    }
                    if peer != self.me && !swarm.is_connected(&peer) {
                        candidates.push((peer, addrs));
                    }
                }
                self.dial_some(swarm, candidates, now);
            }
            Internal::DialTarget { peer, addrs } => {
                if addrs.is_empty() {
                    // Not in the book: ask the DHT.
                    swarm.behaviour_mut().kad.get_closest_peers(peer);
                } else {
                    self.dial(swarm, peer, addrs);
                }
            }
            Internal::Blocklist(set) => {
                let n = swarm.behaviour_mut().policy.set_blocklist(set);
                tracing::info!(disconnected = n, "blocklist updated");
            }
        }
    }

    fn wants_more_peers(&self, swarm: &Swarm<Behaviour>) -> bool {
        let p = &swarm.behaviour().policy;
        p.has_room() && p.admitted_count() < self.cfg.target_peers
    }

    /// Dials a few of `candidates` (from a random offset, so relays do not
    /// all pick the same ones) while below `target_peers`; a relay dialed
    /// this way is not dialed again for a minute.
    fn dial_some(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        candidates: Vec<(PeerId, Vec<Multiaddr>)>,
        now: u64,
    ) {
        if !self.wants_more_peers(swarm) || candidates.is_empty() {
            return;
        }
        self.discovered_at.retain(|_, t| *t + 60_000 > now);
        let p = &swarm.behaviour().policy;
        let mut budget = self
            .cfg
            .target_peers
            .saturating_sub(p.admitted_count() + self.discovered_at.len());
        let r = random_id();
        let start = u16::from_be_bytes([r[0], r[1]]) as usize % candidates.len();
        let n = candidates.len();
        let mut list = candidates;
        list.rotate_left(start);
        for (peer, addrs) in list.into_iter().take(n) {
            if budget == 0 {
                break;
            }
            if self.discovered_at.contains_key(&peer) {
                continue;
            }
            self.discovered_at.insert(peer, now);
            self.dial(swarm, peer, addrs);
            budget -= 1;
        }
    }

    /// A DHT lookup found peers: dial the ones we are trying to reach.
    pub(crate) fn on_kad_peers(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peers: Vec<libp2p::kad::PeerInfo>,
    ) {
        for p in peers {
            if self.dials.contains_key(&p.peer_id) && !p.addrs.is_empty() {
                self.dial(swarm, p.peer_id, p.addrs);
            }
        }
    }

    // ---- timers -------------------------------------------------------------

    pub(crate) fn tick(&mut self, swarm: &mut Swarm<Behaviour>) {
        let now = now_ms();
        if self.cfg.mode == FederationMode::Off {
            return;
        }
        self.dedup.evict(now);
        self.maintain_record(swarm, now);

        // Bootstrap until some relay is admitted.
        if swarm.behaviour().policy.admitted_count() == 0
            && !self.bootstrap.is_empty()
            && now >= self.next_bootstrap_ms
        {
            for (peer, addr) in self.bootstrap.clone() {
                swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                self.dial(swarm, peer, vec![addr]);
            }
            self.next_bootstrap_ms = now + self.bootstrap_backoff_ms;
            self.bootstrap_backoff_ms = (self.bootstrap_backoff_ms * 2).min(30_000);
        } else if swarm.behaviour().policy.admitted_count() > 0 {
            self.bootstrap_backoff_ms = 500;
        }

        // Pending packets: expire, resend, reach.
        let mut due: Vec<(u64, PacketId)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.next_ms <= now || p.deadline_ms <= now)
            .map(|(id, p)| (p.seq, *id))
            .collect();
        due.sort_unstable();
        for (_, id) in due {
            let expired = self.pending.get(&id).is_some_and(|p| p.deadline_ms <= now);
            if expired {
                self.take_pending(&id);
                self.metrics().drops_expired.fetch_add(1, Relaxed);
                continue;
            }
            let flood = self.pending.get(&id).is_some_and(|p| p.target.is_none());
            let unclaimed = self.pending.get(&id).is_some_and(|p| {
                p.target.is_none() && p.floods >= u32::from(self.cfg.flood_attempts)
            });
            if unclaimed {
                // No relay homes it (chaff, or a recipient never seen): the
                // stored copy here stays for the recipient to fetch.
                self.take_pending(&id);
                self.metrics().floods_unclaimed.fetch_add(1, Relaxed);
                continue;
            }
            if flood {
                // Re-flood under a new id: the old one is in every dedup
                // cache and would be taken for a duplicate.
                if let Some(p) = self.pending.remove(&id) {
                    let nid = random_id();
                    self.pending.insert(nid, p);
                    self.dedup.insert(nid, None, now);
                    // A late Stored for the old id still completes it.
                    if self.aliases.len() >= self.cfg.max_pending {
                        self.aliases.clear();
                    }
                    self.aliases.insert(id, nid);
                    self.metrics().retries.fetch_add(1, Relaxed);
                    self.dispatch(swarm, nid, now);
                }
            } else {
                self.dispatch(swarm, id, now);
            }
        }

        // Refresh the DHT's view every five minutes while federated.
        if now >= self.next_kad_ms && swarm.behaviour().policy.admitted_count() > 0 {
            self.next_kad_ms = now + KAD_REFRESH_MS;
            let _ = swarm.behaviour_mut().kad.bootstrap();
        }

        // Anti-entropy with the next peer in turn; dial relays from the book
        // while below the target.
        if now >= self.next_ae_ms {
            self.next_ae_ms = now + self.cfg.anti_entropy_ms;
            let peers: Vec<PeerId> = swarm.behaviour().federation.peers().copied().collect();
            if !peers.is_empty() {
                self.ae_turn = (self.ae_turn + 1) % peers.len();
                let peer = peers[self.ae_turn];
                self.anti_entropy_with(swarm, peer);
            }
            let core = self.core.clone();
            let want = self.wants_more_peers(swarm);
            let me = self.my_key;
            self.spawn_send(async move {
                let book = core.store.address_book();
                if let Ok(n) = book.count().await {
                    core.metrics.federation.records_known.store(n, Relaxed);
                }
                if !want {
                    return Vec::new();
                }
                // From a random point of the book, so relays spread their
                // dials (and every relay gets its turn), wrapping around.
                let mut page = book
                    .page(Some(random_cursor()), 64)
                    .await
                    .unwrap_or_default();
                if page.len() < 64 {
                    page.extend(
                        book.page(None, 64 - page.len() as u32)
                            .await
                            .unwrap_or_default(),
                    );
                }
                let known = page
                    .iter()
                    .filter(|r| r.relay_key().to_bytes() != me)
                    .filter_map(relay_entry)
                    .collect::<Vec<_>>();
                vec![Internal::Known(known)]
            });
        }
        self.update_gauges(swarm);
    }
}

/// Packets from one peer waiting to be stored (above any sender's window).
const STORE_QUEUE: usize = 4096;
/// Most packets stored in one commit.
const STORE_BATCH: usize = 256;

/// A task that stores one peer's packets in arrival order, batching what
/// is queued into one commit, then reports each outcome (for the ack).
fn spawn_storer(
    core: Arc<Core>,
    peer: PeerId,
    out: mpsc::Sender<Internal>,
) -> mpsc::Sender<(PacketId, Bytes)> {
    let (tx, mut rx) = mpsc::channel::<(PacketId, Bytes)>(STORE_QUEUE);
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < STORE_BATCH {
                match rx.try_recv() {
                    Ok(x) => batch.push(x),
                    Err(_) => break,
                }
            }
            let (ids, packets): (Vec<PacketId>, Vec<Bytes>) = batch.into_iter().unzip();
            let results = core.accept_many(packets).await;
            let m = &core.metrics.federation;
            for (id, r) in ids.into_iter().zip(results) {
                let status = match r {
                    Ok(acc) => {
                        if core.route_local(0, acc) {
                            m.delivered_locally.fetch_add(1, Relaxed);
                        } else {
                            m.stored_locally.fetch_add(1, Relaxed);
                        }
                        AckStatus::Stored
                    }
                    Err(crate::core::PacketError::Malformed(_)) => AckStatus::Malformed,
                    Err(_) => AckStatus::Refused,
                };
                if out
                    .send(Internal::Stored { peer, id, status })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    tx
}

fn relay_entry(r: &AddressRecord) -> Option<(PeerId, Vec<Multiaddr>, u64)> {
    let peer = peer_of(&r.relay_key().to_bytes())?;
    let addrs = r
        .contents()
        .addrs
        .iter()
        .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
        .collect();
    Some((peer, addrs, r.timestamp_ms()))
}

/// Checks and stores one record; returns the relay when it is new or newer.
async fn learn(core: &Core, bytes: &[u8], me: [u8; 32]) -> Option<(PeerId, Vec<Multiaddr>, u64)> {
    let m = &core.metrics.federation;
    let r = match AddressRecord::accept(bytes, now_ms()) {
        Ok(r) => r,
        Err(e) => {
            m.reject_record(e.kind());
            return None;
        }
    };
    if r.relay_key().to_bytes() == me {
        return None;
    }
    match core.store.address_book().upsert(&r, now_ms()).await {
        Ok(Upsert::Inserted | Upsert::Replaced) => {
            m.records_learned.fetch_add(1, Relaxed);
            relay_entry(&r)
        }
        Ok(Upsert::Unchanged) => None,
        Err(meshwhisper_storage::Error::BookFull { .. }) => {
            m.reject_record("book_full");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "storing an address record");
            None
        }
    }
}
