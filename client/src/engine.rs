//! The engine: the one task that owns a running profile (its database,
//! identity, prekeys and sessions). It answers the [`crate::Client`]'s
//! commands, processes what relays deliver, and drives the network task.
//!
//! Ordering rules that keep keys single-use and messages durable:
//! - A message is stored (status queued) before `send` returns.
//! - Encrypting commits the new ratchet state together with the outbox row
//!   holding the ciphertext, before the packet leaves; after a crash the
//!   same ciphertext is sent again, never re-encrypted.
//! - Decrypting commits the new ratchet state with the received message
//!   (and the consumed one-time prekey's deletion) before the relay's
//!   delivery is acknowledged; a crash before that means the relay
//!   delivers again and the same state decrypts it again.
//!
//! Network waits never block this task: packets and directory requests are
//! awaited by small tasks that report back on an internal channel.

use crate::db::{self, Conn, SessionRow};
use crate::envelope::{Content, Envelope, Kind, MessageId};
use crate::invite::Invite;
use crate::net::{self, Command, NetError, NetEvent};
use crate::profile::{Profile, split_relay};
use crate::{Config, ConnectionState, Contact, Error, Event, Message, MessageStatus, ReceiptKind};
use bytes::{Buf as _, Bytes};
use libp2p::{Multiaddr, PeerId};
use meshwhisper_behaviour::device::codec::{Frame, PREKEY_LEN, Status};
use meshwhisper_behaviour::packet;
use meshwhisper_crypto::destination::{self, DestHash};
use meshwhisper_crypto::pqxdh::{
    self, InitialMessage, MemoryPrekeyStore, OneTimePrekey, PrekeyBundle,
};
use meshwhisper_crypto::primitives::{self, MlKemSecret, X25519Secret};
use meshwhisper_crypto::ratchet::{self, Session};
use meshwhisper_crypto::sealed;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Hops a packet may take (the relay header's TTL).
const PACKET_TTL: u8 = 8;
/// One-time prekeys per upload (the relay's `opk_max_per_upload`).
const OPK_BATCH: usize = 20;
/// Retry delay for a contact whose prekeys could not be claimed.
const CLAIM_RETRY_MS: u64 = 10_000;
/// A relay that stays unreachable is mentioned again after this long.
const UNREACHABLE_REPEAT_MS: u64 = 30_000;

/// Commands from [`crate::Client`].
#[derive(Debug)]
pub(crate) enum Cmd {
    AddContact {
        invite: Box<Invite>,
        name: Option<String>,
        reply: oneshot::Sender<Result<Contact, Error>>,
    },
    Contacts {
        reply: oneshot::Sender<Result<Vec<Contact>, Error>>,
    },
    SafetyNumber {
        name: String,
        reply: oneshot::Sender<Result<String, Error>>,
    },
    SetVerified {
        name: String,
        verified: bool,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Send {
        name: String,
        body: Vec<u8>,
        reply: oneshot::Sender<Result<MessageId, Error>>,
    },
    MarkRead {
        name: String,
        ids: Vec<MessageId>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    History {
        name: String,
        limit: u32,
        reply: oneshot::Sender<Result<Vec<Message>, Error>>,
    },
    Flush {
        reply: oneshot::Sender<Result<(), Error>>,
    },
}

/// Results of network waits.
enum Internal {
    Stored {
        outbox_id: i64,
        result: Result<(), NetError>,
    },
    Claimed {
        contact: i64,
        result: Result<(Status, Bytes), NetError>,
    },
    Published(Result<(Status, Bytes), NetError>),
    PrekeysAdded(Result<(Status, Bytes), NetError>),
}

/// What encrypting a contact's queue produced.
enum Pumped {
    /// No such contact.
    Nothing,
    /// No session yet: claim their prekeys.
    Claim(i64, Box<Invite>),
    /// Outbox rows (id, packet) for the contact's home relay.
    Packets(PeerId, Vec<(i64, Vec<u8>)>),
}

/// What a batch of deliveries changes once it is committed.
#[derive(Default)]
struct Received {
    events: Vec<Event>,
    used_opks: Vec<u32>,
    receipts_due: HashSet<i64>,
    new_sessions: HashSet<i64>,
}

/// Starts the network task and the engine.
pub(crate) async fn start(
    profile: Profile,
    cfg: Config,
    cancel: CancellationToken,
) -> Result<
    (
        mpsc::Sender<Cmd>,
        mpsc::Receiver<Event>,
        tokio::task::JoinHandle<()>,
    ),
    Error,
> {
    let swarm = net::build_swarm()
        .map_err(|e| Error::Net(NetError::Refused(format!("libp2p transport: {e}"))))?;
    let (net_tx, net_rx) = mpsc::channel(8192);
    let (nev_tx, nev_rx) = mpsc::channel(1024);
    let net_task = tokio::spawn(
        net::Net::new(
            swarm,
            net::NetConfig::default(),
            net_rx,
            nev_tx,
            cancel.child_token(),
        )
        .run(),
    );
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let (ev_tx, ev_rx) = mpsc::channel(cfg.events_queue.max(1));
    let (int_tx, int_rx) = mpsc::channel(4096);
    let mut engine = Engine {
        p: profile,
        cfg,
        net: net_tx,
        net_events: nev_rx,
        cmds: cmd_rx,
        internal_tx: int_tx,
        internal: int_rx,
        events: ev_tx,
        prekeys: MemoryPrekeyStore::default(),
        spk: (0, 0),
        pq_id: 0,
        next_opk: 1,
        bundle: Vec::new(),
        in_flight: HashSet::new(),
        claiming: HashSet::new(),
        claim_after: HashMap::new(),
        up: HashSet::new(),
        unreachable_said: HashMap::new(),
        registered_hour: None,
        refilling: 0,
        receipts_due: HashSet::new(),
        flush_waiters: Vec::new(),
        rng: crate::os_rng(),
        cancel: cancel.clone(),
    };
    engine.load_prekeys().await?;
    let task = tokio::spawn(async move {
        engine.run().await;
        cancel.cancel();
        let _ = net_task.await;
    });
    Ok((cmd_tx, ev_rx, task))
}

struct Engine {
    p: Profile,
    cfg: Config,
    net: mpsc::Sender<Command>,
    net_events: mpsc::Receiver<NetEvent>,
    cmds: mpsc::Receiver<Cmd>,
    internal_tx: mpsc::Sender<Internal>,
    internal: mpsc::Receiver<Internal>,
    events: mpsc::Sender<Event>,
    /// Our prekey secrets (mirrors the database).
    prekeys: MemoryPrekeyStore,
    /// Newest signed prekey: id and creation time.
    spk: (u32, u64),
    pq_id: u32,
    next_opk: u32,
    bundle: Vec<u8>,
    /// Outbox rows handed to the network and not yet answered.
    in_flight: HashSet<i64>,
    claiming: HashSet<i64>,
    claim_after: HashMap<i64, u64>,
    up: HashSet<PeerId>,
    /// Relays we said were unreachable, and when (engine ms).
    unreachable_said: HashMap<PeerId, u64>,
    registered_hour: Option<u64>,
    /// Prekey uploads awaiting their reply.
    refilling: usize,
    /// Contacts whose delivery receipts are waiting to be sent.
    receipts_due: HashSet<i64>,
    flush_waiters: Vec<oneshot::Sender<Result<(), Error>>>,
    rng: rand_core::UnwrapErr<getrandom::SysRng>,
    cancel: CancellationToken,
}

fn session_id(initial: &[u8]) -> [u8; 8] {
    let h = primitives::sha256(&[b"meshwhisper/session-id", initial]);
    let mut id = [0u8; 8];
    id.copy_from_slice(&h[..8]);
    id
}

fn relay_text(peer: PeerId, addrs: &[Multiaddr]) -> String {
    addrs
        .iter()
        .map(|a| {
            a.clone()
                .with(libp2p::multiaddr::Protocol::P2p(peer))
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn parse_relay(text: &str) -> Option<(PeerId, Vec<Multiaddr>)> {
    let addrs: Vec<Multiaddr> = text.lines().filter_map(|l| l.parse().ok()).collect();
    split_relay(&addrs).ok()
}

impl Engine {
    async fn run(&mut self) {
        self.keep_home();
        if let Err(e) = self.resume().await {
            tracing::warn!(error = %e, "could not resume queued work");
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                Some(i) = self.internal.recv() => match i {
                    Internal::Stored { outbox_id, result } => self.on_stored(outbox_id, result).await,
                    i => self.on_internal(i).await,
                },
                Some(e) = self.net_events.recv() => self.on_net(e).await,
                cmd = self.cmds.recv() => match cmd {
                    Some(Cmd::Send { name, body, reply }) => self.sends(name, body, reply).await,
                    Some(c) => self.on_cmd(c).await,
                    None => break,
                },
                _ = tick.tick() => self.on_tick().await,
            }
            if self.net_events.is_empty() && !self.receipts_due.is_empty() {
                self.send_receipts().await;
            }
            if !self.flush_waiters.is_empty() {
                self.check_flush().await;
            }
        }
        for w in self.flush_waiters.drain(..) {
            let _ = w.send(Err(Error::Stopped));
        }
    }

    fn now(&self) -> u64 {
        self.cfg.clock.now_ms()
    }

    fn conn(&mut self) -> &mut Conn {
        &mut self.p.conn
    }

    async fn emit(&self, e: Event) {
        // The application went away: nothing to tell.
        let _ = self.events.send(e).await;
    }

    async fn problem(&self, contact: Option<String>, message: String) {
        tracing::warn!(contact = contact.as_deref().unwrap_or(""), %message, "problem");
        self.emit(Event::Problem { contact, message }).await;
    }

    fn net_cmd(&self, c: Command) -> bool {
        // Never block on the network task (it may be waiting for us).
        self.net.try_send(c).is_ok()
    }

    fn keep_home(&self) {
        self.net_cmd(Command::Keep {
            peer: self.p.relay,
            addrs: self.p.relay_addrs.clone(),
        });
    }

    /// After a start: finish what a previous run left queued.
    async fn resume(&mut self) -> Result<(), Error> {
        for cid in db::contacts_with_work(self.conn()).await? {
            self.receipts_due.insert(cid);
            self.pump(cid).await?;
        }
        self.retry_outbox().await
    }

    // --- prekeys ---------------------------------------------------------

    async fn load_prekeys(&mut self) -> Result<(), Error> {
        let now = self.now();
        if db::prekeys(self.conn(), db::SIGNED).await?.is_empty() {
            self.new_signed_prekeys(1, now).await?;
        }
        let signed = db::prekeys(self.conn(), db::SIGNED).await?;
        let pq = db::prekeys(self.conn(), db::PQ).await?;
        let opks = db::prekeys(self.conn(), db::ONE_TIME).await?;
        let mut store = MemoryPrekeyStore::default();
        for (id, s, created) in &signed {
            let Ok(b) = <[u8; 32]>::try_from(s.as_slice()) else {
                continue;
            };
            store.signed.push((*id, X25519Secret::from_bytes(b)));
            if *id >= self.spk.0 {
                self.spk = (*id, *created);
            }
        }
        for (id, s, _) in &pq {
            let Ok(b) = <[u8; 64]>::try_from(s.as_slice()) else {
                continue;
            };
            store.pq.push((*id, MlKemSecret::from_seed(&b)));
            self.pq_id = self.pq_id.max(*id);
        }
        for (id, s, _) in &opks {
            let Ok(b) = <[u8; 32]>::try_from(s.as_slice()) else {
                continue;
            };
            store.one_time.push((*id, X25519Secret::from_bytes(b)));
        }
        self.next_opk = db::meta_u64(self.conn(), "next_opk")
            .await?
            .unwrap_or(1)
            .clamp(1, u64::from(u32::MAX)) as u32;
        self.prekeys = store;
        self.rebuild_bundle()
    }

    fn rebuild_bundle(&mut self) -> Result<(), Error> {
        let spk = self.prekeys.signed.iter().find(|(i, _)| *i == self.spk.0);
        let pq = self.prekeys.pq.iter().find(|(i, _)| *i == self.pq_id);
        let (Some((_, spk)), Some((_, pq))) = (spk, pq) else {
            return Err(Error::CorruptProfile("signed prekeys missing".into()));
        };
        self.bundle = PrekeyBundle::sign(
            &self.p.identity,
            self.spk.0,
            &spk.public(),
            self.pq_id,
            &pq.public(),
        )
        .encode();
        Ok(())
    }

    async fn new_signed_prekeys(&mut self, id: u32, now: u64) -> Result<(), Error> {
        let spk = X25519Secret::generate(&mut self.rng);
        let pq = MlKemSecret::generate(&mut self.rng);
        let mut tx = db::begin(&mut self.p.conn).await?;
        db::insert_prekey(&mut tx, db::SIGNED, id, spk.to_bytes().as_ref(), now).await?;
        db::insert_prekey(&mut tx, db::PQ, id, pq.seed(), now).await?;
        db::commit(tx).await?;
        self.prekeys.signed.push((id, spk));
        self.prekeys.pq.push((id, pq));
        self.spk = (id, now);
        self.pq_id = id;
        Ok(())
    }

    /// Replaces the signed prekeys when due and forgets replaced ones past
    /// the grace period.
    async fn rotate(&mut self, now: u64) -> Result<(), Error> {
        if now.saturating_sub(self.spk.1) < self.cfg.rotate_after.as_millis() as u64 {
            return Ok(());
        }
        let id = self.spk.0.max(self.pq_id).saturating_add(1);
        self.new_signed_prekeys(id, now).await?;
        self.rebuild_bundle()?;
        let grace = self.cfg.prekey_grace.as_millis() as u64;
        for kind in [db::SIGNED, db::PQ] {
            for (old, _, created) in db::prekeys(self.conn(), kind).await? {
                if old != id && now.saturating_sub(created) > grace {
                    db::delete_prekey(self.conn(), kind, old).await?;
                    self.prekeys
                        .signed
                        .retain(|(i, _)| kind != db::SIGNED || *i != old);
                    self.prekeys.pq.retain(|(i, _)| kind != db::PQ || *i != old);
                }
            }
        }
        tracing::info!(id, "rotated signed prekeys");
        self.publish();
        Ok(())
    }

    fn request(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        frame: Frame,
        done: impl FnOnce(Result<(Status, Bytes), NetError>) -> Internal + Send + 'static,
    ) {
        let (reply, rx) = oneshot::channel();
        let internal = self.internal_tx.clone();
        let timeout = self.cfg.request_timeout;
        if !self.net_cmd(Command::Request {
            peer,
            addrs,
            frame,
            reply,
        }) {
            let _ = internal.try_send(done(Err(NetError::Busy(peer))));
            return;
        }
        tokio::spawn(async move {
            let r = match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(NetError::Stopped),
                Err(_) => Err(NetError::Unreachable(peer)),
            };
            let _ = internal.send(done(r)).await;
        });
    }

    fn namespace_text(&self) -> String {
        hex::encode(self.p.namespace.as_bytes())
    }

    fn publish(&self) {
        let frame = Frame::Publish {
            req: 0,
            namespace: self.namespace_text(),
            bundle: self.bundle.clone().into(),
        };
        self.request(self.p.relay, Vec::new(), frame, Internal::Published);
    }

    /// Generates and uploads one-time prekeys until the relay holds the
    /// target number.
    async fn refill(&mut self, left: u32) -> Result<(), Error> {
        if left >= self.cfg.opk_low || self.refilling > 0 {
            return Ok(());
        }
        let n = self.cfg.opk_target.saturating_sub(left) as usize;
        let now = self.now();
        let mut fresh = Vec::with_capacity(n);
        let mut tx = db::begin(&mut self.p.conn).await?;
        let mut id = self.next_opk;
        for _ in 0..n {
            let s = X25519Secret::generate(&mut self.rng);
            db::insert_prekey(&mut tx, db::ONE_TIME, id, s.to_bytes().as_ref(), now).await?;
            fresh.push((id, s));
            id = id.wrapping_add(1).max(1);
        }
        db::meta_set_u64(&mut tx, "next_opk", u64::from(id)).await?;
        db::commit(tx).await?;
        self.next_opk = id;
        let public: Vec<OneTimePrekey> = fresh
            .iter()
            .map(|(id, s)| OneTimePrekey {
                id: *id,
                key: s.public(),
            })
            .collect();
        self.prekeys.one_time.extend(fresh);
        let ns = self.namespace_text();
        for chunk in public.chunks(OPK_BATCH) {
            let signature = pqxdh::sign_one_time_prekeys(&self.p.identity, ns.as_bytes(), chunk);
            let keys: Vec<u8> = chunk.iter().flat_map(|k| k.encode()).collect();
            let frame = Frame::Prekeys {
                req: 0,
                namespace: ns.clone(),
                identity: self.p.identity.public().to_bytes(),
                signature,
                keys: keys.into(),
            };
            self.refilling += 1;
            self.request(self.p.relay, Vec::new(), frame, Internal::PrekeysAdded);
        }
        Ok(())
    }

    // --- registration ----------------------------------------------------

    /// Registers the hashes we receive on: the current and previous hour,
    /// and after time offline, every hour since (up to `catch_up_hours`),
    /// so the relay drains what was sent meanwhile.
    async fn register(&mut self) -> Result<(), Error> {
        if !self.cfg.receive {
            return Ok(());
        }
        let now = self.now();
        let hour = destination::epoch_hour(now);
        let back = match (
            self.registered_hour,
            db::meta_u64(self.conn(), "online_hour").await?,
        ) {
            (Some(_), _) => 1,
            (None, Some(last)) if last < hour => {
                (hour - last + 1).min(self.cfg.catch_up_hours.max(1))
            }
            _ => 1,
        };
        if self.registered_hour.is_some_and(|h| h != hour) {
            // We stayed connected across the hour: everything older is drained.
            db::meta_set_u64(self.conn(), "online_hour", hour).await?;
        } else if self.registered_hour.is_none()
            && db::meta_u64(self.conn(), "online_hour").await?.is_none()
        {
            db::meta_set_u64(self.conn(), "online_hour", hour).await?;
        }
        let hashes: Vec<[u8; 8]> = destination::window(
            &self.p.namespace,
            &self.p.identity.public().x25519(),
            now,
            back,
            0,
        )
        .into_iter()
        .map(|(_, h)| h.0)
        .collect();
        self.registered_hour = Some(hour);
        self.net_cmd(Command::Frame {
            peer: self.p.relay,
            frame: Frame::Register(hashes),
        });
        Ok(())
    }

    // --- events ----------------------------------------------------------

    async fn on_net(&mut self, e: NetEvent) {
        match e {
            NetEvent::Up(peer) => {
                self.up.insert(peer);
                self.unreachable_said.remove(&peer);
                if peer == self.p.relay {
                    self.registered_hour = None;
                    if let Err(e) = self.register().await {
                        tracing::warn!(error = %e, "could not register");
                    }
                    self.publish();
                    self.emit(Event::Connection(ConnectionState::Connected))
                        .await;
                }
                // Everything outstanding to this relay failed when it went
                // down; send it again.
                if let Err(e) = self.retry_outbox().await {
                    tracing::warn!(error = %e, "could not resend queued packets");
                }
            }
            NetEvent::Down(peer) => {
                self.up.remove(&peer);
                if peer == self.p.relay {
                    self.emit(Event::Connection(ConnectionState::Disconnected))
                        .await;
                }
            }
            NetEvent::Deliver { relay, id, packet } => self.deliveries(relay, id, packet).await,
            NetEvent::Unreachable {
                peer,
                reason,
                retry_in,
            } => {
                let now = self.now();
                if self
                    .unreachable_said
                    .get(&peer)
                    .is_some_and(|t| now.saturating_sub(*t) < UNREACHABLE_REPEAT_MS)
                {
                    return;
                }
                self.unreachable_said.insert(peer, now);
                let home = peer == self.p.relay;
                let addrs = if home {
                    self.p.relay_addrs.clone()
                } else {
                    self.contact_relay_addrs(peer).await
                };
                tracing::info!(%peer, %reason, "relay unreachable");
                self.emit(Event::Unreachable {
                    relay: peer,
                    addrs,
                    home,
                    reason,
                    retry_in,
                })
                .await;
            }
        }
    }

    /// The addresses a contact's invite gives for their relay `peer`.
    async fn contact_relay_addrs(&mut self, peer: PeerId) -> Vec<Multiaddr> {
        let rows = db::contacts(self.conn()).await.unwrap_or_default();
        rows.iter()
            .filter_map(|r| Invite::from_bytes(&r.card).ok())
            .find(|card| card.relay == peer)
            .map(|card| card.addrs)
            .unwrap_or_default()
    }

    async fn on_internal(&mut self, i: Internal) {
        let r = match i {
            Internal::Stored { outbox_id, result } => {
                self.on_stored(outbox_id, result).await;
                Ok(())
            }
            Internal::Claimed { contact, result } => self.on_claimed(contact, result).await,
            Internal::Published(r) => match r {
                Ok((Status::Ok, mut body)) if body.len() == 4 => {
                    let left = body.get_u32();
                    self.emit(Event::PrekeysPublished { one_time: left }).await;
                    self.refill(left).await
                }
                Ok((status, body)) => {
                    self.problem(
                        None,
                        format!(
                            "home relay refused our prekey bundle ({status:?}): {}",
                            String::from_utf8_lossy(&body)
                        ),
                    )
                    .await;
                    Ok(())
                }
                Err(e) => {
                    tracing::debug!(error = %e, "publishing the prekey bundle failed; retried on reconnect");
                    Ok(())
                }
            },
            Internal::PrekeysAdded(r) => {
                self.refilling = self.refilling.saturating_sub(1);
                match r {
                    Ok((Status::Ok, mut body)) if body.len() == 4 => {
                        let left = body.get_u32();
                        self.emit(Event::PrekeysPublished { one_time: left }).await;
                    }
                    Ok((status, body)) => {
                        self.problem(
                            None,
                            format!(
                                "home relay refused one-time prekeys ({status:?}): {}",
                                String::from_utf8_lossy(&body)
                            ),
                        )
                        .await;
                    }
                    Err(e) => tracing::debug!(error = %e, "uploading one-time prekeys failed"),
                }
                Ok(())
            }
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "handling a network result failed");
        }
    }

    async fn on_tick(&mut self) {
        let now = self.now();
        if self.up.contains(&self.p.relay)
            && self
                .registered_hour
                .is_some_and(|h| h != destination::epoch_hour(now))
        {
            // A new hour: new destination hashes, and a fresh look at how
            // many one-time prekeys others have claimed (refilled if low).
            if let Err(e) = self.register().await {
                tracing::warn!(error = %e, "could not re-register");
            }
            self.publish();
        }
        if let Err(e) = self.rotate(now).await {
            tracing::warn!(error = %e, "could not rotate prekeys");
        }
        let due: Vec<i64> = self
            .claim_after
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(c, _)| *c)
            .collect();
        for c in due {
            self.claim_after.remove(&c);
            if let Err(e) = self.pump(c).await {
                tracing::warn!(error = %e, "could not send queued messages");
            }
        }
        if let Err(e) = self.retry_outbox().await {
            tracing::warn!(error = %e, "could not resend queued packets");
        }
    }

    async fn on_cmd(&mut self, c: Cmd) {
        match c {
            Cmd::AddContact {
                invite,
                name,
                reply,
            } => {
                let r = self.p.add_contact(&invite, name.as_deref()).await;
                let _ = reply.send(r);
            }
            Cmd::Contacts { reply } => {
                let _ = reply.send(self.p.contacts().await);
            }
            Cmd::SafetyNumber { name, reply } => {
                let _ = reply.send(self.p.safety_number(&name).await);
            }
            Cmd::SetVerified {
                name,
                verified,
                reply,
            } => {
                let _ = reply.send(self.p.set_verified(&name, verified).await);
            }
            Cmd::History { name, limit, reply } => {
                let _ = reply.send(self.p.history(&name, limit).await);
            }
            Cmd::Send { name, body, reply } => self.sends(name, body, reply).await,
            Cmd::MarkRead { name, ids, reply } => {
                let body: Vec<u8> = ids.iter().flatten().copied().collect();
                let r = self.queue(&name, Kind::Read, body).await.map(|_| ());
                let _ = reply.send(r);
            }
            Cmd::Flush { reply } => self.flush_waiters.push(reply),
        }
    }

    async fn check_flush(&mut self) {
        let pending = db::count(
            self.conn(),
            "SELECT (SELECT COUNT(*) FROM outbox) + (SELECT COUNT(*) FROM messages \
             WHERE outgoing = 1 AND status = 0)",
        )
        .await;
        match pending {
            Ok(0) => {
                for w in self.flush_waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not check the outbox");
            }
        }
    }

    // --- sending ---------------------------------------------------------

    /// Stores an outgoing message and sends what can be sent.
    async fn queue(&mut self, name: &str, kind: Kind, body: Vec<u8>) -> Result<MessageId, Error> {
        let c = self.p.contact(name).await?;
        let id = self.store_outgoing(c.id, kind, body).await?;
        self.pump(c.id).await?;
        Ok(id)
    }

    async fn store_outgoing(
        &mut self,
        contact: i64,
        kind: Kind,
        body: Vec<u8>,
    ) -> Result<MessageId, Error> {
        let env = Envelope {
            kind,
            id: primitives::random_array(&mut self.rng),
            sent_ms: self.now(),
            body,
        };
        env.encode()?; // size check before anything is stored
        let now = env.sent_ms;
        db::insert_message(
            self.conn(),
            contact,
            true,
            &env.id,
            kind as u8,
            &env.body,
            env.sent_ms,
            now,
        )
        .await?;
        Ok(env.id)
    }

    /// `send` calls, batched: this one and every other already waiting are
    /// stored in one transaction, answered, then encrypted per contact in
    /// one more (two commits per batch instead of two per message).
    async fn sends(
        &mut self,
        name: String,
        body: Vec<u8>,
        reply: oneshot::Sender<Result<MessageId, Error>>,
    ) {
        let mut batch = vec![(name, body, reply)];
        let mut other = None;
        while batch.len() < self.cfg.batch as usize {
            match self.cmds.try_recv() {
                Ok(Cmd::Send { name, body, reply }) => batch.push((name, body, reply)),
                Ok(c) => {
                    other = Some(c);
                    break;
                }
                Err(_) => break,
            }
        }
        let mut contacts = Vec::new();
        let began = self.begin_raw("begin storing sent messages").await;
        let mut results = Vec::with_capacity(batch.len());
        let mut work = Vec::new();
        let mut ok = began.is_ok();
        if ok {
            for (name, body, _) in &batch {
                let r = match self.p.contact(name).await {
                    Ok(c) => {
                        if !contacts.contains(&c.id) {
                            contacts.push(c.id);
                        }
                        self.store_outgoing(c.id, Kind::Text, body.clone()).await
                    }
                    Err(e) => Err(e),
                };
                if matches!(r, Err(Error::Database { .. })) {
                    ok = false;
                }
                results.push(r);
            }
            // Encrypt in the same transaction: one commit for the batch.
            for c in &contacts {
                match self.encrypt_unsent(*c).await {
                    Ok(w) => work.push(w),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not encrypt queued messages");
                        ok = false;
                    }
                }
            }
        }
        let committed = match began {
            Ok(()) => self.end_raw(ok, "commit sent messages").await.map(|()| ok),
            Err(e) => Err(e),
        };
        let stored = matches!(committed, Ok(true));
        let why = match &committed {
            Err(e) => e.to_string(),
            Ok(_) => "the profile database refused the batch".to_string(),
        };
        for ((_, _, reply), r) in batch.into_iter().zip(results) {
            let r = match r {
                Ok(_) if !stored => Err(Error::NotStored(why.clone())),
                Err(Error::Database { .. }) => Err(Error::NotStored(why.clone())),
                r => r,
            };
            let _ = reply.send(r);
        }
        if matches!(committed, Ok(true)) {
            for w in work {
                self.dispatch(w);
            }
        }
        if let Some(c) = other {
            Box::pin(self.on_cmd(c)).await;
        }
    }

    /// Encrypts and sends a contact's unsent messages, starting first
    /// contact (claiming their prekeys) when there is no session yet.
    async fn pump(&mut self, contact: i64) -> Result<(), Error> {
        self.begin_raw("begin encrypting").await?;
        let r = self.encrypt_unsent(contact).await;
        self.end_raw(r.is_ok(), "commit encrypted messages").await?;
        let packets = r?;
        self.dispatch(packets);
        Ok(())
    }

    /// `BEGIN IMMEDIATE` on the profile connection, for work spanning
    /// several helpers (which then write without their own transaction).
    async fn begin_raw(&mut self, what: &'static str) -> Result<(), Error> {
        sqlx::query("BEGIN IMMEDIATE")
            .execute(self.conn())
            .await
            .map_err(|source| Error::Database { what, source })?;
        Ok(())
    }

    /// Commits (or, when `ok` is false or the commit fails, rolls back).
    async fn end_raw(&mut self, ok: bool, what: &'static str) -> Result<(), Error> {
        if ok {
            match sqlx::query("COMMIT").execute(self.conn()).await {
                Ok(_) => return Ok(()),
                Err(source) => {
                    let _ = sqlx::query("ROLLBACK").execute(self.conn()).await;
                    return Err(Error::Database { what, source });
                }
            }
        }
        let _ = sqlx::query("ROLLBACK").execute(self.conn()).await;
        Ok(())
    }

    /// Sends packets that were just committed to the outbox, and starts
    /// first contact where there is no session.
    fn dispatch(&mut self, work: Pumped) {
        match work {
            Pumped::Claim(contact, card) => {
                if !self.claiming.contains(&contact) && !self.claim_after.contains_key(&contact) {
                    self.claiming.insert(contact);
                    let namespace = hex::encode(card.namespace.as_bytes());
                    let identity = card.identity.to_bytes();
                    // Asked of our own relay, which asks theirs: we never
                    // talk to the contact's relay.
                    let frame = match self.home_of(card.relay) {
                        Some(home) => Frame::ClaimAt {
                            req: 0,
                            home,
                            namespace,
                            identity,
                        },
                        None => Frame::Claim {
                            req: 0,
                            namespace,
                            identity,
                        },
                    };
                    self.request(self.p.relay, Vec::new(), frame, move |result| {
                        Internal::Claimed { contact, result }
                    });
                }
            }
            Pumped::Packets(peer, packets) => {
                let home = self.home_of(peer);
                for (id, p) in packets {
                    self.transmit(id, home, p.into());
                }
            }
            Pumped::Nothing => {}
        }
    }

    /// Encrypts a contact's unsent messages into outbox rows, inside the
    /// caller's transaction (the ratchet state is saved with them).
    async fn encrypt_unsent(&mut self, contact: i64) -> Result<Pumped, Error> {
        let Some(row) = db::contact_by(self.conn(), "id", contact).await? else {
            return Ok(Pumped::Nothing);
        };
        let card = Invite::from_bytes(&row.card)?;
        let sessions = db::sessions(self.conn(), contact).await?;
        let Some(mut s) = sessions.into_iter().find(|s| s.active) else {
            return Ok(Pumped::Claim(contact, Box::new(card)));
        };
        let relay = relay_text(card.relay, &card.addrs);
        let my_card = self.p.invite().to_bytes()?;
        let mut rows = Vec::new();
        loop {
            let unsent = db::unsent(self.conn(), contact).await?;
            if unsent.is_empty() {
                return Ok(Pumped::Packets(card.relay, rows));
            }
            let mut session = Session::from_bytes(&s.state).map_err(|e| Error::Session {
                contact: row.name.clone(),
                why: e.to_string(),
            })?;
            let now = self.now();
            let hour = destination::epoch_hour(now);
            let dest = DestHash::derive(&card.namespace, &card.identity.x25519(), hour);
            for m in unsent.iter().take(self.cfg.batch as usize) {
                let env = Envelope {
                    kind: Kind::from_u8(m.kind).unwrap_or(Kind::Text),
                    id: m.msg_id,
                    sent_ms: m.sent_ms,
                    body: m.body.clone(),
                };
                let message = session
                    .encrypt(&env.encode()?)
                    .map_err(|e| Error::Session {
                        contact: row.name.clone(),
                        why: e.to_string(),
                    })?;
                let content = match &s.initial {
                    Some(initial) => Content::Initial {
                        card: &my_card,
                        initial,
                        message: &message,
                    },
                    None => Content::Session {
                        session_id: s.session_id,
                        message: &message,
                    },
                };
                let sealed = sealed::seal(
                    &mut self.rng,
                    &self.p.identity,
                    &card.identity,
                    &content.encode(),
                )
                .map_err(|e| Error::Session {
                    contact: row.name.clone(),
                    why: e.to_string(),
                })?;
                let flags = if s.initial.is_some() { 0x04 } else { 0x01 };
                let sender: [u8; 16] = primitives::random_array(&mut self.rng);
                let p = packet::build(flags, dest, sender, PACKET_TTL, &sealed);
                let id = db::insert_outbox(self.conn(), &relay, &p, m.seq, now).await?;
                rows.push((id, p));
            }
            s.state = session.to_bytes();
            db::save_session(self.conn(), contact, &s, now).await?;
        }
    }

    /// The relay key to name in a `PacketTo`/`ClaimAt` for a contact homed
    /// at `relay`: `None` when that is our own relay.
    fn home_of(&self, relay: PeerId) -> Option<[u8; 32]> {
        if relay == self.p.relay {
            return None;
        }
        meshwhisper_behaviour::relay_key::RelayKey::from_peer(&relay).map(|k| k.0)
    }

    /// Sends a packet through our home relay (naming the recipient's home
    /// relay when it is another one).
    fn transmit(&mut self, outbox_id: i64, home: Option<[u8; 32]>, packet: Bytes) {
        if !self.in_flight.insert(outbox_id) {
            return;
        }
        let peer = self.p.relay;
        let (reply, rx) = oneshot::channel();
        if !self.net_cmd(Command::Packet {
            peer,
            addrs: Vec::new(),
            home,
            packet,
            reply,
        }) {
            self.in_flight.remove(&outbox_id);
            return;
        }
        let internal = self.internal_tx.clone();
        let timeout = self.cfg.store_timeout;
        tokio::spawn(async move {
            let result = match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(NetError::Stopped),
                Err(_) => Err(NetError::Unreachable(peer)),
            };
            let _ = internal.send(Internal::Stored { outbox_id, result }).await;
        });
    }

    /// Sends queued packets that are not on their way, once our home
    /// relay is connected (the network task redials it).
    async fn retry_outbox(&mut self) -> Result<(), Error> {
        if !self.up.contains(&self.p.relay) {
            return Ok(());
        }
        let rows = db::outbox(self.conn(), 4096).await?;
        for r in rows {
            if self.in_flight.contains(&r.id) {
                continue;
            }
            let Some((peer, _)) = parse_relay(&r.relay) else {
                continue;
            };
            let home = self.home_of(peer);
            self.transmit(r.id, home, r.packet.into());
        }
        Ok(())
    }

    /// A relay answered packets: this one and every other answer already
    /// waiting are recorded in one transaction.
    async fn on_stored(&mut self, outbox_id: i64, result: Result<(), NetError>) {
        let mut stored = Vec::new();
        let mut next = Some((outbox_id, result));
        let mut other = None;
        while let Some((id, r)) = next.take() {
            self.in_flight.remove(&id);
            match r {
                Ok(()) => stored.push(id),
                Err(e) => tracing::debug!(error = %e, "packet not stored yet; will retry"),
            }
            if stored.len() >= self.cfg.batch as usize {
                break;
            }
            match self.internal.try_recv() {
                Ok(Internal::Stored { outbox_id, result }) => next = Some((outbox_id, result)),
                Ok(i) => other = Some(i),
                Err(_) => {}
            }
        }
        if !stored.is_empty()
            && let Err(e) = self.record_stored(&stored).await
        {
            tracing::warn!(error = %e, "could not record stored packets");
        }
        if let Some(i) = other {
            Box::pin(self.on_internal(i)).await;
        }
    }

    async fn record_stored(&mut self, ids: &[i64]) -> Result<(), Error> {
        let mut seqs = Vec::with_capacity(ids.len());
        let mut tx = db::begin(&mut self.p.conn).await?;
        for id in ids {
            if let Some(seq) = db::delete_outbox(&mut tx, *id).await? {
                db::set_status_by_seq(&mut tx, seq, 1).await?;
                seqs.push(seq);
            }
        }
        db::commit(tx).await?;
        for seq in seqs {
            if let Some(m) = db::message_by_seq(self.conn(), seq).await?
                && m.kind == Kind::Text as u8
                && let Some(c) = db::contact_by(self.conn(), "id", m.contact_id).await?
            {
                self.emit(Event::Sent {
                    contact: c.name,
                    id: m.msg_id,
                })
                .await;
            }
        }
        Ok(())
    }

    async fn on_claimed(
        &mut self,
        contact: i64,
        result: Result<(Status, Bytes), NetError>,
    ) -> Result<(), Error> {
        self.claiming.remove(&contact);
        let Some(row) = db::contact_by(self.conn(), "id", contact).await? else {
            return Ok(());
        };
        let (status, body) = match result {
            Ok(r) => r,
            Err(e) => {
                self.claim_after
                    .insert(contact, self.now() + CLAIM_RETRY_MS);
                self.problem(
                    Some(row.name),
                    format!("could not reach their relay for first contact ({e}); retrying"),
                )
                .await;
                return Ok(());
            }
        };
        if status != Status::Ok {
            self.claim_after
                .insert(contact, self.now() + CLAIM_RETRY_MS);
            self.problem(
                Some(row.name),
                format!(
                    "their relay has no prekeys for them ({status:?}: {}); retrying",
                    String::from_utf8_lossy(&body)
                ),
            )
            .await;
            return Ok(());
        }
        if db::sessions(self.conn(), contact)
            .await?
            .iter()
            .any(|s| s.active)
        {
            // They wrote first meanwhile: use that session.
            return self.pump(contact).await;
        }
        let mut b = body;
        let bad = |why: &str| Error::Session {
            contact: row.name.clone(),
            why: why.to_string(),
        };
        if b.len() < 4 {
            return Err(bad("relay sent a malformed claim reply"));
        }
        let n = b.get_u32() as usize;
        if b.len() < n {
            return Err(bad("relay sent a malformed claim reply"));
        }
        let bundle = PrekeyBundle::decode(&b.split_to(n))
            .map_err(|e| bad(&format!("their prekey bundle is invalid: {e}")))?;
        if bundle.identity().to_bytes() != row.identity {
            return Err(bad("the relay returned someone else's prekey bundle"));
        }
        let opk = match b.len() {
            0 => None,
            PREKEY_LEN => {
                Some(OneTimePrekey::decode(&b).map_err(|_| bad("malformed one-time prekey"))?)
            }
            _ => return Err(bad("relay sent a malformed claim reply")),
        };
        let (agreement, initial) =
            pqxdh::initiate(&mut self.rng, &self.p.identity, &bundle, opk.as_ref())
                .map_err(|e| bad(&e.to_string()))?;
        let session = Session::initiator(
            &mut self.rng,
            &agreement.shared_key,
            &bundle.signed_prekey().1,
            &agreement.associated_data,
        )
        .map_err(|e| bad(&e.to_string()))?;
        let initial = initial.encode();
        let s = SessionRow {
            session_id: session_id(&initial),
            state: session.to_bytes(),
            initial: Some(initial),
            initiator: self.p.identity.public().to_bytes(),
            active: true,
        };
        let now = self.now();
        let mut tx = db::begin(&mut self.p.conn).await?;
        db::save_session(&mut tx, contact, &s, now).await?;
        db::activate_session(
            &mut tx,
            contact,
            &s.session_id,
            self.cfg.max_sessions_per_contact,
        )
        .await?;
        db::commit(tx).await?;
        self.pump(contact).await
    }

    async fn send_receipts(&mut self) {
        let due: Vec<i64> = self.receipts_due.drain().collect();
        for cid in due {
            if let Err(e) = self.send_receipts_to(cid).await {
                tracing::warn!(error = %e, "could not queue delivery receipts");
            }
        }
    }

    async fn send_receipts_to(&mut self, contact: i64) -> Result<(), Error> {
        loop {
            let ids = db::unreceipted(
                self.conn(),
                contact,
                crate::envelope::MAX_RECEIPT_IDS as u32,
            )
            .await?;
            if ids.is_empty() {
                break;
            }
            let body: Vec<u8> = ids.iter().flat_map(|(_, id)| *id).collect();
            let id: MessageId = primitives::random_array(&mut self.rng);
            let now = self.now();
            let mut tx = db::begin(&mut self.p.conn).await?;
            db::insert_message(
                &mut tx,
                contact,
                true,
                &id,
                Kind::Delivered as u8,
                &body,
                now,
                now,
            )
            .await?;
            for (seq, _) in &ids {
                db::set_status_by_seq(&mut tx, *seq, 1).await?;
            }
            db::commit(tx).await?;
        }
        self.pump(contact).await
    }

    // --- receiving -------------------------------------------------------

    /// Decrypts one delivered packet and writes what it changes, inside the
    /// caller's transaction; what must wait for the commit (events, memory,
    /// follow-up sends) is returned.
    async fn receive(&mut self, pkt: &[u8], out: &mut Received) -> Result<(), Error> {
        let malformed = |why: &str| Error::InvalidInput(format!("received packet: {why}"));
        if pkt.len() < packet::HEADER_LEN {
            return Err(malformed("shorter than its header"));
        }
        let len = u32::from_be_bytes([pkt[27], pkt[28], pkt[29], pkt[30]]) as usize;
        let payload = pkt
            .get(packet::HEADER_LEN..packet::HEADER_LEN + len)
            .ok_or_else(|| malformed("payload length past the end"))?;
        let opened =
            sealed::open(&self.p.identity, payload).map_err(|e| malformed(&e.to_string()))?;
        let content = Content::decode(&opened.content)?;
        let (contact, mut s, fresh_opk) = match content {
            Content::Initial { card, initial, .. } => {
                let card = Invite::from_bytes(card)?;
                let im = InitialMessage::decode(initial).map_err(|e| malformed(&e.to_string()))?;
                if card.identity != opened.sender || im.identity != opened.sender {
                    return Err(malformed("first message names another sender"));
                }
                let contact = self.contact_for(&card, out).await?;
                let sid = session_id(initial);
                match db::sessions(self.conn(), contact.id)
                    .await?
                    .into_iter()
                    .find(|s| s.session_id == sid)
                {
                    Some(s) => (contact, s, None),
                    None => {
                        let agreement = pqxdh::respond(&self.p.identity, &self.prekeys, &im)
                            .map_err(|e| malformed(&e.to_string()))?;
                        let spk = self
                            .prekeys
                            .signed
                            .iter()
                            .find(|(i, _)| *i == im.signed_prekey_id)
                            .map(|(_, k)| k.clone())
                            .ok_or_else(|| malformed("unknown signed prekey"))?;
                        let session = Session::responder(
                            &agreement.shared_key,
                            spk,
                            &agreement.associated_data,
                        )
                        .map_err(|e| malformed(&e.to_string()))?;
                        let s = SessionRow {
                            session_id: sid,
                            state: session.to_bytes(),
                            initial: None,
                            initiator: opened.sender.to_bytes(),
                            active: false,
                        };
                        (contact, s, im.one_time_prekey_id)
                    }
                }
            }
            Content::Session {
                session_id: sid, ..
            } => {
                let key = opened.sender.to_bytes();
                let row = db::contact_by(self.conn(), "identity", key.as_slice())
                    .await?
                    .ok_or_else(|| malformed("from an unknown sender"))?;
                let contact = Contact::from_row(row)?;
                let s = db::sessions(self.conn(), contact.id)
                    .await?
                    .into_iter()
                    .find(|s| s.session_id == sid)
                    .ok_or_else(|| malformed("for an unknown session"))?;
                (contact, s, None)
            }
        };
        let message = match content {
            Content::Initial { message, .. } | Content::Session { message, .. } => message,
        };
        let mut session = Session::from_bytes(&s.state).map_err(|e| malformed(&e.to_string()))?;
        let plain = match session.decrypt(&mut self.rng, message) {
            Ok(p) => zeroize::Zeroizing::new(p),
            Err(ratchet::Error::DuplicateOrExpired) => return Ok(()), // already processed
            Err(e) => return Err(malformed(e.kind())),
        };
        let env = Envelope::decode(&plain)?;
        let new_session = fresh_opk.is_some()
            || db::sessions(self.conn(), contact.id)
                .await?
                .iter()
                .all(|x| x.session_id != s.session_id);
        s.state = session.to_bytes();
        let answered = s.initial.take().is_some();
        let now = self.now();
        let tx = &mut self.p.conn;
        if new_session {
            // Which session we send with when both sides started one at
            // once: the one started by the lower identity key, on both
            // sides. A confirmed older session gives way to a new one (the
            // peer started over).
            let current = db::sessions(tx, contact.id)
                .await?
                .into_iter()
                .find(|x| x.active);
            s.active = match current {
                None => true,
                Some(cur) if cur.initial.is_some() => s.initiator < cur.initiator,
                Some(_) => true,
            };
        }
        db::save_session(tx, contact.id, &s, now).await?;
        if s.active {
            db::activate_session(
                tx,
                contact.id,
                &s.session_id,
                self.cfg.max_sessions_per_contact,
            )
            .await?;
        }
        if let Some(id) = fresh_opk {
            db::delete_prekey(tx, db::ONE_TIME, id).await?;
        }
        let mut event = None;
        match env.kind {
            Kind::Text => {
                if db::insert_message(
                    tx,
                    contact.id,
                    false,
                    &env.id,
                    Kind::Text as u8,
                    &env.body,
                    env.sent_ms,
                    now,
                )
                .await?
                .is_some()
                {
                    event = Some(Event::Message(Message {
                        contact: contact.name.clone(),
                        id: env.id,
                        outgoing: false,
                        sent_ms: env.sent_ms,
                        body: env.body.clone(),
                        status: MessageStatus::Queued,
                    }));
                }
            }
            Kind::Delivered | Kind::Read => {
                let (status, kind) = if env.kind == Kind::Read {
                    (3, ReceiptKind::Read)
                } else {
                    (2, ReceiptKind::Delivered)
                };
                let changed = db::raise_status(tx, contact.id, &env.receipt_ids(), status).await?;
                if !changed.is_empty() {
                    event = Some(Event::Receipt {
                        contact: contact.name.clone(),
                        kind,
                        ids: changed,
                    });
                }
            }
        }
        if let Some(id) = fresh_opk {
            out.used_opks.push(id);
        }
        if answered {
            tracing::debug!(contact = %contact.name, "first contact confirmed");
        }
        if env.kind == Kind::Text {
            out.receipts_due.insert(contact.id);
        }
        out.events.extend(event);
        if new_session {
            out.new_sessions.insert(contact.id);
        }
        Ok(())
    }

    /// Deliveries: this one and every other already waiting are processed
    /// in one transaction, then acknowledged (one commit per batch).
    async fn deliveries(&mut self, relay: PeerId, id: u64, packet: Bytes) {
        let mut batch = vec![(relay, id, packet)];
        let mut other = None;
        while batch.len() < self.cfg.batch as usize {
            match self.net_events.try_recv() {
                Ok(NetEvent::Deliver { relay, id, packet }) => batch.push((relay, id, packet)),
                Ok(e) => {
                    other = Some(e);
                    break;
                }
                Err(_) => break,
            }
        }
        let mut out = Received::default();
        let mut acks = Vec::with_capacity(batch.len());
        let mut failed = None;
        if let Err(source) = sqlx::query("BEGIN IMMEDIATE").execute(self.conn()).await {
            failed = Some(Error::Database {
                what: "begin receiving",
                source,
            });
        }
        for (relay, id, packet) in &batch {
            if failed.is_some() {
                break;
            }
            match self.receive(packet, &mut out).await {
                Ok(()) => acks.push((*relay, *id)),
                Err(e @ (Error::Database { .. } | Error::Io { .. })) => failed = Some(e),
                Err(e) => {
                    tracing::debug!(error = %e, "dropped an undecryptable packet");
                    acks.push((*relay, *id));
                }
            }
        }
        if failed.is_none()
            && let Err(source) = sqlx::query("COMMIT").execute(self.conn()).await
        {
            failed = Some(Error::Database {
                what: "commit received messages",
                source,
            });
        }
        if let Some(e) = failed {
            // Nothing is acked: the relay delivers it all again later.
            let _ = sqlx::query("ROLLBACK").execute(self.conn()).await;
            tracing::warn!(error = %e, "could not store received messages");
        } else {
            self.prekeys
                .one_time
                .retain(|(i, _)| !out.used_opks.contains(i));
            self.receipts_due.extend(out.receipts_due);
            for e in out.events {
                self.emit(e).await;
            }
            for (relay, id) in acks {
                self.net_cmd(Command::Frame {
                    peer: relay,
                    frame: Frame::Ack(id),
                });
            }
            for c in out.new_sessions {
                // Messages queued while we waited for their prekeys can now go.
                self.claim_after.remove(&c);
                if let Err(e) = self.pump(c).await {
                    tracing::warn!(error = %e, "could not send queued messages");
                }
            }
        }
        if let Some(e) = other {
            Box::pin(self.on_net(e)).await;
        }
    }

    /// The contact who sent a first message: known, or added from the card
    /// they sent (named after the card, made unique).
    async fn contact_for(&mut self, card: &Invite, out: &mut Received) -> Result<Contact, Error> {
        let key = card.identity.to_bytes();
        let bytes = card.to_bytes()?;
        if let Some(row) = db::contact_by(self.conn(), "identity", key.as_slice()).await? {
            if row.card != bytes && card.namespace == self.p.namespace {
                db::update_card(self.conn(), row.id, &bytes).await?;
            }
            let mut row = row;
            row.card = bytes;
            return Contact::from_row(row);
        }
        if card.namespace != self.p.namespace {
            return Err(Error::InvalidInput(
                "first message from another namespace".into(),
            ));
        }
        let base = if crate::profile::check_name(&card.name).is_ok() {
            card.name.clone()
        } else {
            format!("contact-{}", &hex::encode(key)[..8])
        };
        let mut name = base.clone();
        let mut n = 2;
        while db::contact_by(self.conn(), "name", name.as_str())
            .await?
            .is_some()
        {
            name = format!("{base}-{n}");
            n += 1;
        }
        let now = self.now();
        db::insert_contact(self.conn(), &name, &key, &bytes, now).await?;
        let c = self.p.contact(&name).await?;
        out.events.push(Event::ContactAdded(Box::new(c.clone())));
        Ok(c)
    }
}
