//! The relay core: which client connection holds which destination hash,
//! and what happens to a packet. Shared by the WebSocket gateway and the
//! libp2p device protocol, so a packet from either reaches a recipient on
//! either.
//!
//! A packet is always **stored first**. If its recipient is connected, it
//! is handed to that connection's bounded queue; the connection deletes the
//! stored copy only after its send succeeded. Otherwise it stays queued
//! until the recipient says hello or pulls, and a push wake is sent if the
//! recipient registered for one.

use crate::events::EventCounts;
use crate::homed::HomedSet;
use crate::live::{Budget, LiveQueue};
use crate::metrics::Metrics;
use crate::push::PushSender;
use bytes::Bytes;
use meshwhisper_behaviour::packet;
use meshwhisper_crypto::destination::DestHash;
use meshwhisper_storage::Store;
use meshwhisper_storage::mailbox::{MailboxId, StoredPacket};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// A client connection's id.
pub type ConnId = u64;

/// A packet on its way to a connected client.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The packet bytes.
    pub packet: Bytes,
    /// Its stored copy, to delete once sent.
    pub mailbox_id: Option<MailboxId>,
}

/// What kind of client a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// A WebSocket client (the JavaScript SDK).
    WebSocket,
    /// A native device over libp2p.
    Device,
}

struct Conn {
    queue: Arc<LiveQueue>,
    hashes: HashSet<DestHash>,
    kind: ConnKind,
    owner: crate::homed::Owner,
}

/// The bounds [`Core`] applies to client connections.
#[derive(Debug, Clone)]
pub struct CoreLimits {
    /// Largest packet.
    pub max_packet: usize,
    /// Live deliveries queued per connection.
    pub client_queue: usize,
    /// Bytes of live deliveries queued per connection.
    pub client_queue_bytes: usize,
    /// Bytes of live deliveries queued across all connections.
    pub live_queue_bytes: usize,
    /// Bytes of packets being stored across all connections.
    pub inflight_bytes: usize,
    /// How long a stored packet lives.
    pub mailbox_ttl_ms: u64,
    /// Destination hashes one connection may register.
    pub max_hashes: usize,
    /// How long a registered hash stays homed here.
    pub homed_ttl_ms: u64,
    /// Homed-hash changes waiting to be written; beyond, kept in memory only.
    pub homed_dirty_max: usize,
    /// Homed hashes kept in all.
    pub homed_max: usize,
    /// Homed hashes kept per client address.
    pub homed_per_ip: usize,
}

#[derive(Default)]
struct Registry {
    by_hash: HashMap<DestHash, ConnId>,
    conns: HashMap<ConnId, Conn>,
    next: ConnId,
}

/// Why a packet was refused.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// Not a routable packet (size).
    #[error(transparent)]
    Malformed(#[from] packet::Error),
    /// It could not be stored, so it was not accepted.
    #[error("storing the packet failed: {0}")]
    Store(Arc<meshwhisper_storage::Error>),
}

impl From<meshwhisper_storage::Error> for PacketError {
    fn from(e: meshwhisper_storage::Error) -> Self {
        PacketError::Store(Arc::new(e))
    }
}

/// A stored packet, ready to route.
#[derive(Debug)]
pub struct Accepted {
    dest: DestHash,
    frame: Bytes,
    id: MailboxId,
}

impl Accepted {
    /// The destination hash.
    pub fn dest(&self) -> DestHash {
        self.dest
    }

    /// The stored copy's id.
    pub fn id(&self) -> MailboxId {
        self.id
    }

    /// The packet.
    pub fn frame(&self) -> &Bytes {
        &self.frame
    }
}

/// What [`Core::away_bytes`] needs to know of the federation.
#[derive(Debug)]
struct FedGate {
    me: [u8; 32],
    pending_soft: u64,
}

/// A packet whose recipient is not homed here: the federation sends it on
/// and deletes the stored copy once the home relay has stored it.
#[derive(Debug)]
pub struct Federate {
    /// The stored copy here (`None`: held in memory only, see
    /// [`Core::hand_over`]).
    pub mailbox_id: Option<MailboxId>,
    /// Its destination.
    pub dest: DestHash,
    /// The packet.
    pub packet: Bytes,
    /// The home relay's Ed25519 key, when the sender named it.
    pub hint: Option<[u8; 32]>,
    /// When its stored copy expires, unix ms (forwarding stops then).
    pub deadline_ms: u64,
}

/// A claim a local client asked for at another relay (`ClaimAt`): the
/// federation asks `home` and answers on `reply`.
#[derive(Debug)]
pub struct RemoteClaim {
    /// The relay whose directory holds the bundle.
    pub home: [u8; 32],
    /// The directory namespace.
    pub namespace: String,
    /// The identity whose bundle is claimed.
    pub identity: [u8; 32],
    /// Where the answer goes: a status and the bundle with one prekey.
    pub reply: tokio::sync::oneshot::Sender<(meshwhisper_behaviour::device::codec::Status, Bytes)>,
}

/// Homed-hash rows written per store job. Each row is its own statement
/// (one round trip to SQLite's thread, ~40 µs), so 4096 kept the single
/// writer busy ~250 ms and every client's packet waited behind it (the
/// homed flood's control client saw p99 260 ms); 256 rows are ~10 ms.
const HOMED_WRITE_BATCH: usize = 256;

/// How long a claim at another relay may take.
pub const REMOTE_CLAIM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// The live queue of `dest`'s connection, unless it is `from` (a packet
/// never goes back to its sender).
fn live_queue(r: &Registry, from: ConnId, dest: &DestHash) -> Option<Arc<LiveQueue>> {
    r.by_hash
        .get(dest)
        .filter(|&&to| to != from)
        .and_then(|to| r.conns.get(to))
        .map(|c| c.queue.clone())
}

/// Clock in unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The shared relay state.
pub struct Core {
    /// The store.
    pub store: Store,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// `/events` counts.
    pub events: Arc<EventCounts>,
    push: PushSender,
    registry: Mutex<Registry>,
    homed: Mutex<HomedSet>,
    /// Homed hashes to write (`Some(expiry)`) or delete (`None`).
    homed_dirty: Mutex<HashMap<DestHash, Option<u64>>>,
    homed_dirty_max: usize,
    federation: std::sync::OnceLock<crate::handoff::HandoffTx>,
    claims: std::sync::OnceLock<mpsc::Sender<RemoteClaim>>,
    /// This relay's key and the federation's pending bound below which
    /// routed packets do not count as stored for absent recipients.
    fed_gate: std::sync::OnceLock<FedGate>,
    /// Home relays the federation learned for destinations (from acks):
    /// a client's unhinted packets for them go there like hinted ones.
    routes: Mutex<hashlink::LruCache<DestHash, [u8; 32], foldhash::fast::RandomState>>,
    max_packet: usize,
    client_queue: usize,
    client_queue_bytes: usize,
    live_budget: Arc<Budget>,
    inflight: Arc<tokio::sync::Semaphore>,
    inflight_max: usize,
    mailbox_ttl_ms: u64,
    max_hashes: usize,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").finish_non_exhaustive()
    }
}

impl Core {
    /// A core over `store`.
    pub fn new(
        store: Store,
        metrics: Arc<Metrics>,
        events: Arc<EventCounts>,
        push: PushSender,
        limits: CoreLimits,
    ) -> Self {
        Self {
            store,
            metrics,
            events,
            push,
            registry: Mutex::new(Registry::default()),
            homed: Mutex::new(HomedSet::new(
                limits.homed_ttl_ms,
                limits.homed_max,
                limits.homed_per_ip,
            )),
            homed_dirty: Mutex::new(HashMap::new()),
            homed_dirty_max: limits.homed_dirty_max.max(1),
            federation: std::sync::OnceLock::new(),
            claims: std::sync::OnceLock::new(),
            fed_gate: std::sync::OnceLock::new(),
            routes: Mutex::new(hashlink::LruCache::with_hasher(
                1,
                foldhash::fast::RandomState::default(),
            )),
            max_packet: limits.max_packet,
            client_queue: limits.client_queue.max(1),
            client_queue_bytes: limits.client_queue_bytes.max(1),
            live_budget: Budget::new(limits.live_queue_bytes),
            inflight: Arc::new(tokio::sync::Semaphore::new(
                limits
                    .inflight_bytes
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            inflight_max: limits
                .inflight_bytes
                .min(tokio::sync::Semaphore::MAX_PERMITS),
            mailbox_ttl_ms: limits.mailbox_ttl_ms,
            max_hashes: limits.max_hashes.max(1),
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        match self.registry.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn homed_set(&self) -> std::sync::MutexGuard<'_, HomedSet> {
        match self.homed.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Loads the homed hashes remembered in the store (streamed; the
    /// table keeps at most its bound, latest expiry first).
    pub async fn load_homed(&self) -> Result<usize, meshwhisper_storage::Error> {
        let max = self.homed_set().max();
        let rows = self
            .store
            .homed()
            .load(now_ms(), u32::try_from(max).unwrap_or(u32::MAX))
            .await?;
        let mut h = self.homed_set();
        for (hash, exp) in rows {
            h.load(hash, exp);
        }
        Ok(h.len())
    }

    /// Hands packets for relays elsewhere to the federation from now on,
    /// and claims at other relays. `me` is this relay's key; `max_pending`
    /// the federation's bound on packets waiting for an ack;
    /// `learned_routes` how many destinations' home relays are remembered.
    pub fn set_federation(
        &self,
        tx: crate::handoff::HandoffTx,
        claims: mpsc::Sender<RemoteClaim>,
        me: [u8; 32],
        max_pending: usize,
        learned_routes: usize,
    ) {
        self.learned_routes().set_capacity(learned_routes.max(1));
        let _ = self.federation.set(tx);
        let _ = self.claims.set(claims);
        let _ = self.fed_gate.set(FedGate {
            me,
            pending_soft: (max_pending / 2) as u64,
        });
    }

    /// Asks `home` (over federation) for an identity's bundle and one of
    /// its one-time prekeys; `None` when it cannot be asked or does not
    /// answer within [`REMOTE_CLAIM_TIMEOUT`].
    pub async fn claim_remote(
        &self,
        home: [u8; 32],
        namespace: String,
        identity: [u8; 32],
    ) -> Option<(meshwhisper_behaviour::device::codec::Status, Bytes)> {
        let tx = self.claims.get()?;
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.try_send(RemoteClaim {
            home,
            namespace,
            identity,
            reply,
        })
        .ok()?;
        tokio::time::timeout(REMOTE_CLAIM_TIMEOUT, rx)
            .await
            .ok()?
            .ok()
    }

    /// Whether `dest` belongs to a client of this relay: connected now, or
    /// registered here before and not expired.
    pub fn is_homed(&self, dest: &DestHash) -> bool {
        if self.registry().by_hash.contains_key(dest) {
            return true;
        }
        self.homed_set().contains(dest, now_ms())
    }

    /// Hands every stored packet whose recipient is not homed here back to
    /// the federation (routed where its sender named a home relay, else
    /// flooded): after a restart, or once the forwarding queue has room
    /// again after it overflowed. Packets already on their way are skipped
    /// by the federation, and so are packets for the relays in `full`
    /// (their queue has no room yet). Bounded by `max`; returns how many
    /// were handed over.
    pub async fn refederate_stored(
        &self,
        max: usize,
        skip: &foldhash::HashSet<MailboxId>,
        full: &foldhash::HashSet<[u8; 32]>,
    ) -> usize {
        let Some(fed) = self.federation.get().cloned() else {
            return 0;
        };
        let mut after = MailboxId(0);
        let mut n = 0;
        while n < max {
            let page = match self.store.mailbox().page_stored(after, now_ms(), 512).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "listing stored packets for federation");
                    break;
                }
            };
            let Some(last) = page.last() else { break };
            after = last.id;
            let mut batch = Vec::new();
            for p in page {
                let route = p
                    .route
                    .or_else(|| self.learned_routes().get(&p.dest).copied());
                if n >= max
                    || skip.contains(&p.id)
                    || route.is_some_and(|r| full.contains(&r))
                    || self.is_homed(&p.dest)
                {
                    continue;
                }
                batch.push(Federate {
                    mailbox_id: Some(p.id),
                    dest: p.dest,
                    packet: Bytes::from(p.packet),
                    // The route its sender named, kept with the packet.
                    hint: p.route,
                    deadline_ms: p.expires_ms,
                });
                n += 1;
            }
            if !batch.is_empty() && fed.send(batch).await.is_err() {
                return n;
            }
        }
        n
    }

    /// Destination hashes remembered as homed here.
    pub fn homed_count(&self) -> usize {
        self.homed_set().len()
    }

    /// Forgets homed hashes that expired (the sweeper calls this).
    pub fn expire_homed(&self, now: u64) -> usize {
        self.homed_set().expire(now)
    }

    /// Remembers `hashes` as homed here for `owner`; persists what is new
    /// or moved forward by more than an hour, and forgets what was evicted.
    fn remember_homed(&self, hashes: &[DestHash], owner: crate::homed::Owner) {
        let now = now_ms();
        let (changes, exp) = {
            let mut h = self.homed_set();
            (
                h.register(hashes, owner, now),
                now.saturating_add(h.ttl_ms()),
            )
        };
        if changes.remembered.is_empty() && changes.evicted.is_empty() {
            return;
        }
        if !changes.evicted.is_empty() {
            self.metrics
                .homed_evicted
                .fetch_add(changes.evicted.len() as u64, Relaxed);
        }
        // Persisted in the background, coalesced (see `flush_homed`), at
        // most `homed_dirty_max` changes at a time: beyond, a change is kept
        // in memory only (persistence is what a restart starts from, best
        // effort under a flood).
        let mut unsaved = 0u64;
        {
            let mut dirty = self.homed_dirty();
            let changes = changes
                .evicted
                .into_iter()
                .map(|d| (d, None))
                .chain(changes.remembered.into_iter().map(|d| (d, Some(exp))));
            for (d, v) in changes {
                if let Some(slot) = dirty.get_mut(&d) {
                    *slot = v;
                } else if dirty.len() < self.homed_dirty_max {
                    dirty.insert(d, v);
                } else {
                    unsaved += 1;
                }
            }
        }
        if unsaved > 0 {
            self.metrics.homed_unsaved.fetch_add(unsaved, Relaxed);
        }
    }

    fn homed_dirty(&self) -> std::sync::MutexGuard<'_, HashMap<DestHash, Option<u64>>> {
        match self.homed_dirty.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Writes the homed hashes registered or evicted since the last call
    /// (one task calls this every second): a flood of registrations costs
    /// one batch of writes, never a task each.
    pub async fn flush_homed(&self) {
        let dirty = std::mem::take(&mut *self.homed_dirty());
        if dirty.is_empty() {
            return;
        }
        let mut forget = Vec::new();
        let mut remember: HashMap<u64, Vec<DestHash>> = HashMap::new();
        for (d, exp) in dirty {
            match exp {
                Some(e) => remember.entry(e).or_default().push(d),
                None => forget.push(d),
            }
        }
        // In commits of at most HOMED_WRITE_BATCH rows, so other writers'
        // work goes between them.
        let homed = self.store.homed();
        for chunk in forget.chunks(HOMED_WRITE_BATCH) {
            if let Err(e) = homed.forget(chunk.to_vec()).await {
                tracing::warn!(error = %e, "could not forget evicted homed hashes");
            }
        }
        for (exp, hashes) in remember {
            for chunk in hashes.chunks(HOMED_WRITE_BATCH) {
                if let Err(e) = homed.remember(chunk.to_vec(), exp).await {
                    tracing::warn!(error = %e, "could not remember homed hashes");
                }
            }
        }
    }

    /// The most hashes one client may register.
    pub fn max_hashes(&self) -> usize {
        self.max_hashes
    }

    /// Registers a new connection; its live deliveries arrive on the
    /// returned queue.
    pub fn connect(&self, kind: ConnKind, owner: crate::homed::Owner) -> (ConnId, Arc<LiveQueue>) {
        let queue = Arc::new(LiveQueue::new(
            self.client_queue,
            self.client_queue_bytes,
            self.live_budget.clone(),
        ));
        let mut r = self.registry();
        r.next += 1;
        let id = r.next;
        r.conns.insert(
            id,
            Conn {
                queue: queue.clone(),
                hashes: HashSet::new(),
                kind,
                owner: owner.map(|ip| crate::gateway::ratelimit::client_key(ip.to_canonical())),
            },
        );
        (id, queue)
    }

    /// Bytes of live deliveries queued across all connections.
    pub fn live_bytes(&self) -> usize {
        self.live_budget.used()
    }

    /// Waits until `bytes` of packets read from a client may be stored
    /// (the relay-wide `limits.inflight_bytes`); the permit returns them.
    pub async fn inflight_permit(&self, bytes: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let n = u32::try_from(bytes.clamp(1, self.inflight_max)).unwrap_or(u32::MAX);
        self.inflight.clone().acquire_many_owned(n).await.ok()
    }

    /// Bytes of packets being stored now.
    pub fn inflight_bytes(&self) -> usize {
        self.inflight_max
            .saturating_sub(self.inflight.available_permits())
    }

    /// Forgets a connection and the hashes it held.
    pub fn disconnect(&self, id: ConnId) {
        let mut r = self.registry();
        if let Some(conn) = r.conns.remove(&id) {
            conn.queue.close();
            for h in conn.hashes {
                if r.by_hash.get(&h) == Some(&id) {
                    r.by_hash.remove(&h);
                }
            }
        }
    }

    /// Replaces the hashes `id` holds with `hashes` (at most
    /// [`Core::max_hashes`]; the caller checks). A hash held by another
    /// connection moves to this one (the last to register wins).
    pub fn register(&self, id: ConnId, hashes: &[DestHash]) {
        let mut r = self.registry();
        let Some(old) = r.conns.get_mut(&id).map(|c| std::mem::take(&mut c.hashes)) else {
            return;
        };
        for h in old {
            if r.by_hash.get(&h) == Some(&id) {
                r.by_hash.remove(&h);
            }
        }
        let mut mine = HashSet::with_capacity(hashes.len());
        for h in hashes {
            if let Some(prev) = r.by_hash.insert(*h, id)
                && prev != id
                && let Some(c) = r.conns.get_mut(&prev)
            {
                c.hashes.remove(h);
            }
            mine.insert(*h);
        }
        let mut owner = None;
        if let Some(c) = r.conns.get_mut(&id) {
            c.hashes = mine;
            owner = c.owner;
        }
        drop(r);
        self.remember_homed(hashes, owner);
    }

    /// Remembers `hashes` as homed here for connection `id`'s client
    /// (under its address's share) without delivering on them now.
    pub fn home(&self, id: ConnId, hashes: &[DestHash]) {
        let owner = self.registry().conns.get(&id).and_then(|c| c.owner);
        self.remember_homed(hashes, owner);
    }

    /// Destination hashes registered by connected clients.
    pub fn registered_hashes(&self) -> usize {
        self.registry().by_hash.len()
    }

    /// Open connections, and how many are devices.
    pub fn connections(&self) -> (usize, usize) {
        let r = self.registry();
        let devices = r
            .conns
            .values()
            .filter(|c| c.kind == ConnKind::Device)
            .count();
        (r.conns.len(), devices)
    }

    /// Validates and stores a packet. When this returns `Ok`, the packet is
    /// durable; [`Core::route`] then decides where it goes.
    pub async fn accept(&self, frame: Bytes) -> Result<Accepted, PacketError> {
        self.accept_many(vec![frame])
            .await
            .pop()
            .unwrap_or_else(|| Err(meshwhisper_storage::Error::Closed.into()))
    }

    /// Validates and stores several packets in one commit (one reply for
    /// the batch); results are in the order of `frames`.
    pub async fn accept_many(&self, frames: Vec<Bytes>) -> Vec<Result<Accepted, PacketError>> {
        self.accept_many_routed(
            frames.into_iter().map(|f| (f, None)).collect(),
            meshwhisper_storage::mailbox::Lane::Main,
        )
        .await
    }

    /// [`Core::accept_many`], each packet with the home relay its sender
    /// named (kept with the stored copy).
    pub async fn accept_many_routed(
        &self,
        frames: Vec<(Bytes, Option<[u8; 32]>)>,
        lane: meshwhisper_storage::mailbox::Lane,
    ) -> Vec<Result<Accepted, PacketError>> {
        self.accept_inner(frames, lane, true)
            .await
            .into_iter()
            .map(|r| {
                r.and_then(|a| {
                    a.ok_or_else(|| {
                        PacketError::Store(Arc::new(meshwhisper_storage::Error::Closed))
                    })
                })
            })
            .collect()
    }

    /// Stores packets other relays forwarded, each once under its
    /// federated id (remembered until `remember_until_ms`): `Ok(None)` for
    /// one stored before.
    pub async fn accept_federated(
        &self,
        items: Vec<(meshwhisper_storage::fed_seen::FedId, Bytes, bool)>,
        remember_until_ms: u64,
    ) -> (
        Vec<Result<Option<Accepted>, PacketError>>,
        Option<meshwhisper_storage::mailbox::Settled>,
    ) {
        let mut ids = Vec::with_capacity(items.len());
        let mut frames = Vec::with_capacity(items.len());
        for (id, frame, unlogged) in items {
            ids.push((id, unlogged));
            frames.push((frame, None));
        }
        self.accept_inner_settled(
            frames,
            Some((ids, remember_until_ms)),
            meshwhisper_storage::mailbox::Lane::Main,
            true,
        )
        .await
    }

    /// Hands packets a client sent for recipients homed at other relays
    /// straight to the federation, without storing them here first: each
    /// is held in memory until its home relay has stored it, and stored
    /// here only if that does not happen at once (see
    /// `federation::forward`). This relay then does no storage work for a
    /// packet that passes through, as a live delivery costs none either.
    /// A packet held so is lost if this relay dies (SIGKILL, power) before
    /// its home relay stores it, like one still in the socket's buffer:
    /// only for senders that get no acknowledgement (WebSocket clients).
    ///
    /// Taken only when every packet names a home relay other than this one
    /// and the federation has a relay connected and room; returns the
    /// packets not handed over (from the first one that was not, so that
    /// order is kept), to be stored as usual.
    pub fn hand_over(
        &self,
        mut frames: Vec<(Bytes, Option<[u8; 32]>)>,
    ) -> Vec<(Bytes, Option<[u8; 32]>)> {
        let (Some(gate), Some(tx)) = (self.fed_gate(), self.federation.get()) else {
            return frames;
        };
        // Each packet's destination, if it is one and its recipient is not
        // homed here (one look at the registry and one at the homed set).
        let mut dests: Vec<Option<DestHash>> = frames
            .iter()
            .map(|(f, _)| packet::destination(f, self.max_packet).ok())
            .collect();
        {
            let r = self.registry();
            for d in &mut dests {
                if d.is_some_and(|d| r.by_hash.contains_key(&d)) {
                    *d = None;
                }
            }
        }
        if dests.iter().all(Option::is_none) {
            return frames;
        }
        {
            let now = now_ms();
            let homed = self.homed_set();
            for d in &mut dests {
                if d.is_some_and(|d| homed.contains(&d, now)) {
                    *d = None;
                }
            }
        }
        // Packets the client named no relay for go where the federation
        // learned their destination lives (kept with a stored copy too).
        if frames.iter().any(|(_, h)| h.is_none()) {
            let mut routes = self.learned_routes();
            for ((_, hint), d) in frames.iter_mut().zip(&dests) {
                if hint.is_none()
                    && let Some(d) = d
                {
                    *hint = routes.get(d).copied();
                }
            }
        }
        if !frames
            .iter()
            .zip(&dests)
            .all(|((_, hint), d)| d.is_some() && hint.is_some_and(|h| h != gate.me))
        {
            return frames;
        }
        let deadline_ms = now_ms().saturating_add(self.mailbox_ttl_ms);
        // Every packet has a destination here (checked above).
        let batch: Vec<Federate> = frames
            .into_iter()
            .zip(dests)
            .filter_map(|((packet, hint), dest)| {
                dest.map(|dest| Federate {
                    mailbox_id: None,
                    dest,
                    packet,
                    hint,
                    deadline_ms,
                })
            })
            .collect();
        let handed = batch.len() as u64;
        // The batch goes whole or not at all (then it is stored as usual).
        match tx.try_send(batch) {
            Ok(()) => {
                self.metrics.packets_in.fetch_add(handed, Relaxed);
                self.events.inbound.fetch_add(handed, Relaxed);
                self.metrics.packets_queued.fetch_add(handed, Relaxed);
                self.events.queued.fetch_add(handed, Relaxed);
                self.metrics.federation.unstored.fetch_add(handed, Relaxed);
                Vec::new()
            }
            Err(crate::handoff::NotHanded(back)) => {
                back.into_iter().map(|f| (f.packet, f.hint)).collect()
            }
        }
    }

    fn learned_routes(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        hashlink::LruCache<DestHash, [u8; 32], foldhash::fast::RandomState>,
    > {
        match self.routes.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The federation learned `dest`'s home relay (`None`: forget it).
    pub fn set_route(&self, dest: DestHash, home: Option<[u8; 32]>) {
        let mut r = self.learned_routes();
        match home {
            Some(k) => {
                r.insert(dest, k);
            }
            None => {
                r.remove(&dest);
            }
        }
    }

    /// Stores packets that were held in memory on their way to another
    /// relay (see [`Core::hand_over`]), each with that relay's key as its
    /// route: their stored copies' ids, in order (`None`: not stored).
    pub async fn keep_copies(&self, items: Vec<(Bytes, [u8; 32])>) -> Vec<Option<MailboxId>> {
        self.accept_inner(
            items.into_iter().map(|(p, r)| (p, Some(r))).collect(),
            meshwhisper_storage::mailbox::Lane::Main,
            false,
        )
        .await
        .into_iter()
        .map(|r| r.ok().flatten().map(|a| a.id))
        .collect()
    }

    /// The federation's gate, when it is open: a relay connected and the
    /// pending queue under half full.
    fn fed_gate(&self) -> Option<&FedGate> {
        self.fed_gate.get().filter(|g| {
            let m = &self.metrics.federation;
            m.peers_connected.load(Relaxed) > 0 && m.pending.load(Relaxed) < g.pending_soft
        })
    }

    /// `counted`: new packets (counted in; not for copies of packets
    /// counted when they came).
    async fn accept_inner(
        &self,
        frames: Vec<(Bytes, Option<[u8; 32]>)>,
        lane: meshwhisper_storage::mailbox::Lane,
        counted: bool,
    ) -> Vec<Result<Option<Accepted>, PacketError>> {
        self.accept_inner_settled(frames, None, lane, counted)
            .await
            .0
    }

    /// `fed`: the packets' federated ids (each with whether it may be held
    /// unlogged) and until when they are remembered.
    async fn accept_inner_settled(
        &self,
        frames: Vec<(Bytes, Option<[u8; 32]>)>,
        fed: Option<(Vec<(meshwhisper_storage::fed_seen::FedId, bool)>, u64)>,
        lane: meshwhisper_storage::mailbox::Lane,
        counted: bool,
    ) -> (
        Vec<Result<Option<Accepted>, PacketError>>,
        Option<meshwhisper_storage::mailbox::Settled>,
    ) {
        let mut settled = None;
        let mut results: Vec<Option<Result<Option<Accepted>, PacketError>>> =
            Vec::with_capacity(frames.len());
        let mut valid = Vec::with_capacity(frames.len());
        for (i, (frame, route)) in frames.into_iter().enumerate() {
            match packet::destination(&frame, self.max_packet) {
                Ok(dest) => {
                    valid.push((i, dest, frame, route));
                    results.push(None);
                }
                Err(e) => {
                    self.metrics.packets_rejected.fetch_add(1, Relaxed);
                    results.push(Some(Err(e.into())));
                }
            }
        }
        if !valid.is_empty() {
            let n = valid.len() as u64;
            if counted {
                self.metrics.packets_in.fetch_add(n, Relaxed);
                self.events.inbound.fetch_add(n, Relaxed);
            }
            let mailbox = self.store.mailbox();
            let stored = match &fed {
                Some((ids, until)) => {
                    let items = valid
                        .iter()
                        .map(|(i, d, f, _)| {
                            let (id, unlogged) = ids.get(*i).copied().unwrap_or(([0; 16], false));
                            meshwhisper_storage::mailbox::Federated {
                                dest: *d,
                                packet: f.clone(),
                                id,
                                remember_until_ms: *until,
                                unlogged,
                            }
                        })
                        .collect();
                    mailbox
                        .enqueue_federated(items, now_ms())
                        .await
                        .map(|(enqueued, s)| {
                            settled = Some(s);
                            enqueued
                        })
                }
                None => {
                    let packets = valid
                        .iter()
                        .map(|(_, d, f, r)| (*d, f.clone(), *r))
                        .collect();
                    mailbox.enqueue_routed(packets, now_ms(), lane).await
                }
            };
            match stored {
                Ok(enqueued) => {
                    for ((i, dest, frame, _), e) in valid.into_iter().zip(enqueued) {
                        results[i] = Some(Ok((!e.duplicate).then_some(Accepted {
                            dest,
                            frame,
                            id: e.id,
                        })));
                    }
                }
                Err(e) => {
                    self.metrics.packets_store_failed.fetch_add(n, Relaxed);
                    tracing::warn!(error = %e, "could not store packets");
                    let e = Arc::new(e);
                    for (i, _, _, _) in valid {
                        results[i] = Some(Err(PacketError::Store(e.clone())));
                    }
                }
            }
        }
        let results = results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(PacketError::Store(Arc::new(
                        meshwhisper_storage::Error::Closed,
                    )))
                })
            })
            .collect();
        (results, settled)
    }

    /// Bytes of `frames` whose destination has no connection here and that
    /// would stay in the store: their recipients are away, or homed
    /// elsewhere with no route that takes them off at once. A packet the
    /// sender routes to another relay (a `route` hint) leaves the store as
    /// soon as that relay acknowledges it, like a live delivery, so it does
    /// not count while the federation has a relay connected and is under
    /// half its `max_pending` (a named relay that does not home the
    /// recipient still stores it in the end; see `federation::forward`).
    pub fn away_bytes(&self, frames: &[(Bytes, Option<[u8; 32]>)]) -> usize {
        let dest = |f: &Bytes| f.get(2..10).and_then(|d| <[u8; 8]>::try_from(d).ok());
        // (destination, length, route) of each packet not for a client here.
        type Absent = (Option<[u8; 8]>, usize, Option<[u8; 32]>);
        let absent: Vec<Absent> = {
            let r = self.registry();
            frames
                .iter()
                .map(|(f, hint)| (dest(f), f.len(), *hint))
                .filter(|(d, _, _)| d.is_none_or(|d| !r.by_hash.contains_key(&DestHash(d))))
                .collect()
        };
        let Some(gate) = self.fed_gate() else {
            return absent.iter().map(|(_, len, _)| len).sum();
        };
        let now = now_ms();
        let homed = self.homed_set();
        absent
            .iter()
            .filter(|(d, _, hint)| match (d, hint) {
                (Some(d), Some(h)) => *h == gate.me || homed.contains(&DestHash(*d), now),
                _ => true,
            })
            .map(|(_, len, _)| len)
            .sum()
    }

    /// Hands a stored packet to its connected recipient (not back to the
    /// sender); else, when the recipient is homed elsewhere, to the
    /// federation; else leaves it queued and sends a push wake.
    pub fn route(self: &Arc<Self>, from: ConnId, accepted: Accepted) {
        self.route_hinted(from, accepted, None);
    }

    /// [`Core::route`] with the sender's home-relay hint.
    pub fn route_hinted(
        self: &Arc<Self>,
        from: ConnId,
        accepted: Accepted,
        hint: Option<[u8; 32]>,
    ) {
        if let Some(fed) = self.federation.get()
            && !self.is_homed(&accepted.dest)
        {
            let f = Federate {
                mailbox_id: Some(accepted.id),
                dest: accepted.dest,
                packet: accepted.frame,
                hint,
                deadline_ms: now_ms().saturating_add(self.mailbox_ttl_ms),
            };
            if fed.try_send(vec![f]).is_err() {
                // The stored copy stays here for the recipient to fetch.
                self.metrics
                    .federation
                    .drops_queue_full
                    .fetch_add(1, Relaxed);
                tracing::debug!("federation queue full; packet kept locally");
            }
            self.metrics.packets_queued.fetch_add(1, Relaxed);
            self.events.queued.fetch_add(1, Relaxed);
            return;
        }
        self.route_local(from, accepted);
    }

    /// Delivers a stored packet to a connected local recipient or leaves it
    /// queued (push wake); never federates. Returns whether it went live.
    pub fn route_local(self: &Arc<Self>, from: ConnId, accepted: Accepted) -> bool {
        let target = live_queue(&self.registry(), from, &accepted.dest);
        self.offer_local(target, accepted)
    }

    /// Whether each of `dests` has a connection here (one look at the
    /// registry).
    pub fn connected_many(&self, dests: impl Iterator<Item = DestHash>) -> Vec<bool> {
        let r = self.registry();
        dests.map(|d| r.by_hash.contains_key(&d)).collect()
    }

    /// [`Core::route_local`] for a batch from another relay (one look at
    /// the registry): whether each went live, in order.
    pub fn route_local_many(self: &Arc<Self>, accepted: Vec<Accepted>) -> Vec<bool> {
        let targets: Vec<_> = {
            let r = self.registry();
            accepted
                .iter()
                .map(|a| live_queue(&r, 0, &a.dest))
                .collect()
        };
        accepted
            .into_iter()
            .zip(targets)
            .map(|(a, t)| self.offer_local(t, a))
            .collect()
    }

    /// Offers `accepted` to its recipient's live queue, if connected;
    /// else counts it queued and wakes the recipient by push.
    fn offer_local(self: &Arc<Self>, target: Option<Arc<LiveQueue>>, accepted: Accepted) -> bool {
        if let Some(queue) = target {
            let out = Outbound {
                packet: accepted.frame,
                mailbox_id: Some(accepted.id),
            };
            if queue.offer(out) {
                self.metrics.packets_delivered_live.fetch_add(1, Relaxed);
                self.events.forwarded.fetch_add(1, Relaxed);
                return true;
            }
            // The recipient's queue is full: it stays stored, and the
            // session drains it as soon as its queue is empty again.
            self.metrics.live_queue_full.fetch_add(1, Relaxed);
            return false;
        }
        self.metrics.packets_queued.fetch_add(1, Relaxed);
        self.events.queued.fetch_add(1, Relaxed);
        if self.push.enabled() && !self.push.wake(accepted.dest) {
            // The push queue is full: the wake is dropped (the packet stays).
            self.metrics.push_failed.fetch_add(1, Relaxed);
        }
        false
    }

    /// Stored packets for `hashes` with ids above `after` (the last id of
    /// the drain's previous page), oldest first, skipping ids already in
    /// flight on this connection: at most `limit` of them and about
    /// `max_bytes` (at least one).
    pub async fn pending(
        &self,
        hashes: &[DestHash],
        after: MailboxId,
        skip: &HashSet<MailboxId>,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Vec<StoredPacket>, meshwhisper_storage::Error> {
        if hashes.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        self.store
            .mailbox()
            .pending_within(hashes, after, now_ms(), limit, max_bytes, &|id| {
                skip.contains(&id)
            })
            .await
    }

    /// Deletes stored copies of packets that were sent.
    pub async fn delivered(&self, ids: Vec<MailboxId>) {
        if ids.is_empty() {
            return;
        }
        if let Err(e) = self.store.mailbox().delete(ids).await {
            tracing::warn!(error = %e, "could not delete delivered packets");
        }
    }
}
