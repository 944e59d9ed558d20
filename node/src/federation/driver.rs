//! Carries the federation state machines' actions out against the Swarm,
//! and feeds them what the Swarm and the store workers report. The only
//! federation code that touches libp2p or the store.

use super::action::{Action, Job, JobDone, ToStore};
use super::jobs::{Pool, STORE_JOIN};
use super::{Federation, View};
use crate::core::{Core, Federate, now_ms};
use libp2p::gossipsub::{self, IdentTopic};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, Swarm};
use meshwhisper_behaviour::federation::codec::{AckStatus, FederationWire, Frame, MAX_BATCH};
use meshwhisper_behaviour::node::{Behaviour, RECORDS_TOPIC};
use meshwhisper_behaviour::policy;
use meshwhisper_behaviour::stream::CloseReason;
use meshwhisper_crypto::destination::DestHash;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::mpsc;

/// The network and the core, as the state machines see them.
struct SwarmView<'a> {
    swarm: &'a Swarm<Behaviour>,
    core: &'a Core,
}

impl View for SwarmView<'_> {
    fn is_admitted(&self, p: &PeerId) -> bool {
        self.swarm.behaviour().policy.is_admitted(p)
    }
    fn stream_open(&self, p: &PeerId) -> bool {
        self.swarm.behaviour().federation.is_open(p)
    }
    fn is_connected(&self, p: &PeerId) -> bool {
        self.swarm.is_connected(p)
    }
    fn admitted_count(&self) -> usize {
        self.swarm.behaviour().policy.admitted_count()
    }
    fn has_room(&self) -> bool {
        self.swarm.behaviour().policy.has_room()
    }
    fn peers(&self) -> Vec<PeerId> {
        let b = self.swarm.behaviour();
        b.federation
            .peers()
            .filter(|p| b.policy.is_admitted(p))
            .copied()
            .collect()
    }
    fn is_homed(&self, d: &DestHash) -> bool {
        self.core.is_homed(d)
    }
}

/// Federation as the Swarm task drives it.
pub struct Driver {
    fed: Federation,
    core: Arc<Core>,
    pool: Pool,
    topic: IdentTopic,
    /// Devices waiting for claims at other relays, by request id.
    claim_replies: std::collections::HashMap<
        u64,
        tokio::sync::oneshot::Sender<(meshwhisper_behaviour::device::codec::Status, bytes::Bytes)>,
    >,
    /// A hand-back of stored packets (after the queue overflowed) is running.
    handing_back: Arc<std::sync::atomic::AtomicBool>,
    /// The last hand-back filled the room it had: there may be more.
    hand_back_more: Arc<std::sync::atomic::AtomicBool>,
    /// Bootstrap relays connected but not admitted, since when.
    bootstrap_stalled: std::collections::HashMap<PeerId, u64>,
    /// How long the next stalled bootstrap connection is waited for.
    bootstrap_stall_ms: u64,
    /// Relays whose last dial failed: dialled from a fresh local port
    /// until one succeeds (see [`Driver::dial_failed`]).
    fresh_port: hashlink::LruCache<PeerId, ()>,
}

/// Relays remembered as needing a fresh local port (the oldest forgotten
/// first).
const FRESH_PORT_MAX: usize = 4096;

/// How long a connection to a bootstrap relay may stay unadmitted (with
/// no other relay admitted) before it is closed and dialled again.
const BOOTSTRAP_STALL_MS: u64 = 5_000;
/// The longest a stalled bootstrap connection is waited for: the wait
/// doubles after each reconnection (a slow machine or a busy bootstrap
/// relay may need longer than 5 s), up to this.
const BOOTSTRAP_STALL_MAX_MS: u64 = 60_000;

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("fed", &self.fed).finish()
    }
}

impl Driver {
    /// A driver for `fed`, with store workers over `core`.
    pub fn new(fed: Federation, core: Arc<Core>, pool: Pool) -> Self {
        Self {
            fed,
            core,
            pool,
            topic: IdentTopic::new(RECORDS_TOPIC),
            claim_replies: std::collections::HashMap::new(),
            handing_back: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            hand_back_more: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            bootstrap_stalled: std::collections::HashMap::new(),
            bootstrap_stall_ms: BOOTSTRAP_STALL_MS,
            fresh_port: hashlink::LruCache::new(FRESH_PORT_MAX),
        }
    }

    /// Routed packets sent on open streams and not yet acknowledged.
    pub fn in_flight(&self, swarm: &Swarm<Behaviour>) -> usize {
        self.fed.in_flight(&SwarmView {
            swarm,
            core: &self.core,
        })
    }

    /// Packets held in memory for other relays (pending, or still in
    /// `queued`, the channel sessions hand them over on), each with its
    /// route: what must be stored before this relay stops.
    pub fn take_unstored(
        &mut self,
        queued: &mut crate::handoff::HandoffRx,
    ) -> Vec<(bytes::Bytes, [u8; 32])> {
        let me = self.fed.key().0;
        let mut all: Vec<(bytes::Bytes, [u8; 32])> = self
            .fed
            .take_unstored()
            .into_iter()
            .map(|k| (k.packet, k.route))
            .collect();
        for f in queued.close() {
            if f.mailbox_id.is_none() {
                all.push((f.packet, f.hint.unwrap_or(me)));
            }
        }
        all
    }

    /// Bootstrap relays configured.
    pub fn bootstrap_count(&self) -> usize {
        self.fed.dials.bootstrap_count()
    }

    /// The configured address of bootstrap relay `peer`.
    pub fn bootstrap_addr(&self, peer: &PeerId) -> Option<&Multiaddr> {
        self.fed.dials.bootstrap_addr(peer)
    }

    fn metrics(&self) -> &crate::metrics::FederationMetrics {
        &self.core.metrics.federation
    }

    /// Runs `f` against the state machines with a view of `swarm`, then
    /// carries out what they decided.
    fn with(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        f: impl FnOnce(&mut Federation, &dyn View, &mut Vec<Action>),
    ) {
        let mut out = Vec::new();
        {
            let view = SwarmView {
                swarm: &*swarm,
                core: &self.core,
            };
            f(&mut self.fed, &view, &mut out);
        }
        self.apply(swarm, out);
        for (req, answer) in self.fed.claims.take_finished() {
            let reply = self.claim_replies.remove(&req);
            match answer {
                Some(a) => {
                    if let Some(reply) = reply {
                        let _ = reply.send(a);
                    }
                }
                None => {
                    self.core
                        .metrics
                        .federation
                        .claims_failed
                        .fetch_add(1, Relaxed);
                }
            }
        }
        self.update_gauges(swarm);
    }

    fn apply(&mut self, swarm: &mut Swarm<Behaviour>, actions: Vec<Action>) {
        // Frames go out per peer, batched; deletions go to the store as one.
        let mut sends = Sends::default();
        let mut deletes = Vec::new();
        // A peer's packets to store, joined while consecutive (one job,
        // one commit, one hand-off per batch of frames).
        let mut stores: Vec<(PeerId, Vec<ToStore>)> = Vec::new();
        let mut actions = actions;
        // A refused job may ask for more (a gossip report): one more pass.
        while !actions.is_empty() {
            let mut more = Vec::new();
            for a in actions {
                match a {
                    Action::Send { peer, frame } => sends.push(peer, frame),
                    Action::OpenStream(peer) => swarm.behaviour_mut().federation.open(peer),
                    Action::Dial { peer, addrs } => self.dial(swarm, peer, addrs),
                    Action::KadAddAddress { peer, addr } => {
                        if let Some(kad) = swarm.behaviour_mut().kad.as_mut() {
                            kad.add_address(&peer, addr);
                        }
                    }
                    Action::KadFindPeer(peer) => {
                        if let Some(kad) = swarm.behaviour_mut().kad.as_mut() {
                            kad.get_closest_peers(peer);
                        }
                    }
                    Action::KadBootstrap => {
                        if let Some(kad) = swarm.behaviour_mut().kad.as_mut() {
                            let _ = kad.bootstrap();
                        }
                    }
                    Action::Publish(data) => {
                        let Some(gossip) = swarm.behaviour_mut().gossipsub.as_mut() else {
                            continue;
                        };
                        match gossip.publish(self.topic.clone(), data) {
                            Ok(_) | Err(gossipsub::PublishError::Duplicate) => {
                                self.fed.own.published()
                            }
                            // No subscriber seen yet: offered again next tick.
                            Err(e) => tracing::trace!(error = %e, "record not published yet"),
                        }
                    }
                    Action::ReportGossip {
                        message_id,
                        source,
                        acceptance,
                    } => {
                        if let Some(gossip) = swarm.behaviour_mut().gossipsub.as_mut() {
                            let _ = gossip.report_message_validation_result(
                                &message_id,
                                &source,
                                acceptance,
                            );
                        }
                    }
                    Action::Route(dest, home) => self.core.set_route(dest, home.map(|k| k.0)),
                    // Turned into dial work by the composition already.
                    Action::Reach(_) => {}
                    Action::Job(Job::Delete(ids)) => deletes.extend(ids),
                    Action::Job(Job::Store { peer, packets }) => match stores.last_mut() {
                        Some((p, joined)) if *p == peer && joined.len() < STORE_JOIN => {
                            joined.extend(packets)
                        }
                        _ => stores.push((peer, packets)),
                    },
                    Action::Job(job) => self.submit(job, &mut sends, &mut more),
                }
            }
            actions = more;
        }
        for (peer, packets) in stores {
            self.submit(Job::Store { peer, packets }, &mut sends, &mut Vec::new());
        }
        if !deletes.is_empty() {
            self.submit(Job::Delete(deletes), &mut sends, &mut Vec::new());
        }
        let mut unsent = Vec::new();
        for (peer, frames) in sends.0 {
            if !swarm.behaviour().federation.is_open(&peer) {
                unsent.extend(frames.into_iter().map(|f| (peer, f)));
                continue;
            }
            for frame in batched(frames) {
                swarm.behaviour_mut().federation.send(peer, frame);
            }
        }
        let now = now_ms();
        for (peer, frame) in unsent {
            self.fed.unsent(now, peer, &frame);
        }
    }

    /// Hands `job` to the store workers; a packet they have no room for is
    /// answered `Refused` (its sender resends it), and records they have no
    /// room for are forgotten (see [`Federation::job_refused`]).
    fn submit(&mut self, job: Job, sends: &mut Sends, more: &mut Vec<Action>) {
        let Err(job) = self.pool.submit(job) else {
            return;
        };
        self.metrics().jobs_refused.fetch_add(1, Relaxed);
        match *job {
            Job::Store { peer, packets } => {
                for p in packets {
                    sends.push(
                        peer,
                        Frame::Ack {
                            id: p.id,
                            status: AckStatus::Refused,
                            home: None,
                        },
                    );
                }
            }
            job => self.fed.job_refused(job, more),
        }
    }

    fn dial(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId, addrs: Vec<Multiaddr>) {
        if swarm.is_connected(&peer) || swarm.behaviour().policy.is_blocked(&peer) {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing);
        let opts = if self.fresh_port.contains_key(&peer) {
            opts.allocate_new_port().build()
        } else {
            opts.build()
        };
        match swarm.dial(opts) {
            Ok(()) => {
                self.metrics().discovered_dials.fetch_add(1, Relaxed);
            }
            Err(e) => tracing::debug!(%peer, error = %e, "dial failed"),
        }
    }

    /// A dial of `peer` failed. TCP dials leave from our listening port
    /// (so that the address a peer observes is one it can dial back); the
    /// connection 4-tuple to a relay we were just connected to can still be
    /// in TIME_WAIT, and then every dial fails with "address in use" until
    /// it expires (a minute on Linux), which libp2p does not retry. Until a
    /// dial succeeds, `peer` is dialled from a fresh port instead.
    pub fn dial_failed(&mut self, peer: PeerId) {
        self.fresh_port.insert(peer, ());
    }

    /// The relays anchoring us changed: our record names them (signed
    /// and announced at the next tick).
    pub fn set_anchors(&mut self, anchors: &[PeerId]) {
        self.fed
            .own
            .set_anchors(anchors.iter().filter_map(super::key_of).collect());
    }

    /// A connection to `peer` was established.
    pub fn connected(&mut self, peer: &PeerId) {
        self.fresh_port.remove(peer);
    }

    fn update_gauges(&self, swarm: &Swarm<Behaviour>) {
        let open = swarm.behaviour().federation.peers().count() as u64;
        self.metrics().peers_connected.store(open, Relaxed);
        self.metrics()
            .pending
            .store(self.fed.forward.pending_len() as u64, Relaxed);
    }

    // ---- admission ---------------------------------------------------------

    /// Admits `peer` as a relay if the policy allows (and opens our side
    /// of the federation stream); whether it is admitted. A peer that opens
    /// a federation stream or sends federation frames has shown it is a
    /// relay as surely as identify would, so this is also asked then.
    fn ensure_admitted(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId) -> bool {
        let b = swarm.behaviour_mut();
        if b.policy.is_admitted(&peer) {
            return true;
        }
        if b.policy.is_guest(&peer) && !b.policy.has_room() {
            return false;
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
                if swarm.behaviour().policy.is_guest(&peer) {
                    self.metrics().guests.fetch_add(1, Relaxed);
                    tracing::info!(%peer, reason = r.label(), "relay refused; a guest for a while, to learn other relays from our address book");
                } else {
                    tracing::info!(%peer, reason = r.label(), "relay refused");
                }
                false
            }
        }
    }

    /// identify told us what `peer` speaks.
    pub fn on_identified(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        info: &libp2p::identify::Info,
    ) {
        let fed = libp2p::StreamProtocol::new(meshwhisper_behaviour::federation::codec::PROTOCOL);
        if !info.protocols.contains(&fed) {
            return;
        }
        if let Some(kad) = swarm.behaviour_mut().kad.as_mut() {
            for a in &info.listen_addrs {
                kad.add_address(&peer, a.clone());
            }
        }
        // Also for an admitted relay: a new connection we dialed gets its
        // stream.
        if self.ensure_admitted(swarm, peer) {
            swarm.behaviour_mut().federation.open(peer);
        }
    }

    /// The policy is closing a peer's connections.
    pub fn on_policy(&mut self, ev: policy::Event) {
        let policy::Event::Disconnecting { peer, reason } = ev;
        if reason == policy::Refusal::Blocked {
            self.metrics()
                .handshake_rejections_blocked
                .fetch_add(1, Relaxed);
        }
        tracing::info!(%peer, reason = reason.label(), "disconnecting relay");
    }

    // ---- streams -------------------------------------------------------------

    /// The first federation stream to `peer` opened.
    pub fn on_opened(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId) {
        if !self.ensure_admitted(swarm, peer) {
            return;
        }
        let now = now_ms();
        self.with(swarm, |fed, view, out| {
            fed.stream_opened(now, peer, view, out)
        });
    }

    /// A stream to `peer` closed (`last`: no other is open).
    pub fn on_closed(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        reason: &CloseReason,
        last: bool,
    ) {
        self.fed.stream_closed(now_ms(), peer, last);
        if reason.is_failure() {
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

    /// A frame could not be queued for `peer`.
    pub fn on_unsent(&mut self, peer: PeerId, frame: Frame) {
        let now = now_ms();
        match frame {
            Frame::Batch(frames) => {
                for f in &frames {
                    self.fed.unsent(now, peer, f);
                }
            }
            f => self.fed.unsent(now, peer, &f),
        }
    }

    /// A frame from `peer`.
    pub fn on_frame(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId, frame: Frame) {
        let now = now_ms();
        if !swarm.behaviour().policy.is_admitted(&peer) {
            self.ensure_admitted(swarm, peer);
        }
        let b = swarm.behaviour_mut();
        // Not admitted, or over its rate: packets are refused (the sender
        // retries), anything else dropped. Acks and forgets answer our own
        // sends (bounded by them) and are never rate-limited, or a busy
        // peer's acks would be lost and everything resent. A batch counts
        // as the frames in it.
        let admitted = b.policy.is_admitted(&peer);
        let guest = !admitted && b.policy.is_guest(&peer);
        let frames = match frame {
            Frame::Batch(frames) => frames,
            f => vec![f],
        };
        let mut allowed = Vec::with_capacity(frames.len());
        let mut refused = Vec::new();
        for f in frames {
            // A guest may walk our address book, nothing else (serving is
            // bounded per peer by anti-entropy).
            if guest && matches!(f, Frame::DigestRequest { .. } | Frame::Pull { .. }) {
                allowed.push(f);
                continue;
            }
            let exempt = matches!(f, Frame::Ack { .. } | Frame::Forget { .. });
            let limited = admitted && !exempt && !b.policy.allow_frame(&peer, now);
            if admitted && !limited {
                allowed.push(f);
                continue;
            }
            if limited {
                self.core
                    .metrics
                    .federation
                    .drops_rate_limited
                    .fetch_add(1, Relaxed);
            }
            if let Frame::Forward { id, .. } | Frame::Routed { id, .. } = f {
                refused.push(Frame::Ack {
                    id,
                    status: AckStatus::Refused,
                    home: None,
                });
            }
        }
        for f in batched(refused) {
            b.federation.send(peer, f);
        }
        if allowed.is_empty() {
            return;
        }
        self.with(swarm, |fed, view, out| {
            for f in allowed {
                fed.frame(now, peer, f, view, out);
            }
        });
    }

    /// A gossiped address record.
    pub fn on_gossip(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        source: PeerId,
        message_id: gossipsub::MessageId,
        data: Vec<u8>,
    ) {
        let now = now_ms();
        self.with(swarm, |fed, _, out| {
            fed.gossip(now, source, message_id, data, out)
        });
    }

    /// Store jobs finished (all that were waiting: their frames go out
    /// together).
    pub fn on_job_done(&mut self, swarm: &mut Swarm<Behaviour>, done: Vec<JobDone>) {
        let now = now_ms();
        self.with(swarm, |fed, view, out| {
            for d in done {
                fed.job_done(now, d, view, out);
            }
        });
    }

    /// Packets to federate (all that were waiting: their frames go out
    /// together).
    pub fn on_outbound(&mut self, swarm: &mut Swarm<Behaviour>, packets: Vec<Federate>) {
        let now = now_ms();
        self.with(swarm, |fed, view, out| {
            for f in packets {
                fed.outbound(now, f, view, out);
            }
        });
    }

    /// A device of ours wants a claim made at another relay.
    pub fn on_remote_claim(&mut self, swarm: &mut Swarm<Behaviour>, c: crate::core::RemoteClaim) {
        let now = now_ms();
        let mut req = None;
        let home = meshwhisper_behaviour::relay_key::RelayKey(c.home);
        if home == self.fed.key() {
            // Asked of us: the device should have claimed here; answer it.
            let core = self.core.clone();
            tokio::spawn(async move {
                let answer = crate::device::directory::claim(&core, &c.namespace, c.identity).await;
                let _ = c.reply.send(answer);
            });
            return;
        }
        let (namespace, identity) = (c.namespace, c.identity);
        self.with(swarm, |fed, view, out| {
            req = fed.claim(now, home, namespace, identity, view, out);
        });
        if let Some(r) = req {
            self.claim_replies.insert(r, c.reply);
        }
    }

    /// A new blocklist.
    pub fn on_blocklist(&mut self, swarm: &mut Swarm<Behaviour>, set: HashSet<PeerId>) {
        let n = swarm.behaviour_mut().policy.set_blocklist(set);
        tracing::info!(disconnected = n, "blocklist updated");
    }

    /// The DHT found peers.
    pub fn on_kad_peers(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peers: Vec<libp2p::kad::PeerInfo>,
    ) {
        let found = peers.into_iter().map(|p| (p.peer_id, p.addrs)).collect();
        self.with(swarm, |fed, _, out| fed.kad_found(found, out));
    }

    /// Timers.
    pub fn tick(&mut self, swarm: &mut Swarm<Behaviour>) {
        let now = now_ms();
        swarm.behaviour_mut().policy.expire_guests(now);
        self.unstick_bootstrap(swarm, now);
        let listen: Vec<Multiaddr> = swarm.listeners().cloned().collect();
        let external: Vec<Multiaddr> = swarm.external_addresses().cloned().collect();
        self.with(swarm, |fed, view, out| {
            fed.tick(now, &listen, &external, view, out)
        });
        self.hand_back_if_room();
    }

    /// Bootstrap dials stop while a connection to a bootstrap relay
    /// exists, and admission waits for identify (or a federation stream).
    /// A connection on which neither came within [`BOOTSTRAP_STALL_MS`]
    /// (identify failed under load, say) would leave a relay that has no
    /// other peer alone for good: it is closed and the bootstrap relays
    /// dialled again at once. Each time, the next connection gets twice as
    /// long (up to [`BOOTSTRAP_STALL_MAX_MS`]), so that a machine too slow
    /// for 5 s is not caught in a loop of reconnections.
    fn unstick_bootstrap(&mut self, swarm: &mut Swarm<Behaviour>, now: u64) {
        if swarm.behaviour().policy.admitted_count() > 0 {
            self.bootstrap_stalled.clear();
            self.bootstrap_stall_ms = BOOTSTRAP_STALL_MS;
            return;
        }
        let b = swarm.behaviour();
        let stalled: Vec<PeerId> = self
            .fed
            .dials
            .bootstrap_peers()
            .filter(|p| swarm.is_connected(p) && !b.policy.is_admitted(p) && !b.policy.is_guest(p))
            .copied()
            .collect();
        self.bootstrap_stalled.retain(|p, _| stalled.contains(p));
        let mut closed = false;
        for peer in stalled {
            let since = *self.bootstrap_stalled.entry(peer).or_insert(now);
            if now.saturating_sub(since) >= self.bootstrap_stall_ms {
                tracing::info!(%peer, waited_ms = self.bootstrap_stall_ms, "connected to a bootstrap relay but not admitted; reconnecting");
                let _ = swarm.disconnect_peer_id(peer);
                self.bootstrap_stalled.remove(&peer);
                closed = true;
            }
        }
        if closed {
            self.bootstrap_stall_ms = self
                .bootstrap_stall_ms
                .saturating_mul(2)
                .min(BOOTSTRAP_STALL_MAX_MS);
            self.fed.dials.bootstrap_soon();
        }
    }

    /// Packets that found the forwarding queue full stayed stored here;
    /// once there is room again they are handed back (one pass at a time).
    fn hand_back_if_room(&mut self) {
        if !self.fed.forward.has_room() || self.handing_back.load(Relaxed) {
            return;
        }
        let overflowed = self.fed.forward.take_overflow();
        if !self.hand_back_more.swap(false, Relaxed) && !overflowed {
            return;
        }
        self.handing_back.store(true, Relaxed);
        let core = self.core.clone();
        let flag = self.handing_back.clone();
        let more = self.hand_back_more.clone();
        // As many as fit now, skipping those already on their way; a pass
        // that fills the queue again sets the overflow flag for the next.
        let room = self.fed.forward.room();
        let skip = self.fed.forward.pending_mailboxes();
        let full = self.fed.forward.full_relays();
        tokio::spawn(async move {
            let n = core.refederate_stored(room, &skip, &full).await;
            if n >= room {
                more.store(true, Relaxed);
            }
            if n > 0 {
                tracing::debug!(packets = n, "stored packets handed back to the federation");
            }
            flag.store(false, Relaxed);
        });
    }
}

/// The results channel of the pool, for the Swarm task's select.
pub type Done = mpsc::Receiver<JobDone>;

/// Frames to send, per peer, in the order they were decided.
#[derive(Default)]
struct Sends(Vec<(PeerId, Vec<Frame>)>);

impl Sends {
    fn push(&mut self, peer: PeerId, frame: Frame) {
        // Runs of frames for one peer are the common case: look there first.
        if let Some((p, frames)) = self.0.last_mut()
            && *p == peer
        {
            frames.push(frame);
            return;
        }
        match self.0.iter_mut().find(|(p, _)| *p == peer) {
            Some((_, frames)) => frames.push(frame),
            None => self.0.push((peer, vec![frame])),
        }
    }
}

/// Bytes of frames put in one batch (a larger frame goes alone).
const BATCH_BYTES: usize = 256 * 1024;

/// `frames` as few frames as possible: runs of them in `Batch`es of at
/// most [`MAX_BATCH`] frames and [`BATCH_BYTES`], in order; a lone frame
/// goes as it is.
fn batched(frames: Vec<Frame>) -> Vec<Frame> {
    use meshwhisper_behaviour::stream::Wire as _;
    let wire_len = |f: &Frame| 4 + FederationWire::body_len(f);
    let mut out = Vec::new();
    let mut run: Vec<Frame> = Vec::new();
    let mut bytes = 0;
    let close = |run: &mut Vec<Frame>, out: &mut Vec<Frame>| match run.len() {
        0 => {}
        1 => out.append(run),
        _ => out.push(Frame::Batch(std::mem::take(run))),
    };
    for f in frames {
        let n = wire_len(&f);
        if !run.is_empty() && (run.len() >= MAX_BATCH || bytes + n > BATCH_BYTES) {
            close(&mut run, &mut out);
            bytes = 0;
        }
        bytes += n;
        run.push(f);
    }
    close(&mut run, &mut out);
    out
}
