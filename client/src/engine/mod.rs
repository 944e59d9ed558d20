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
//!
//! | part | what |
//! |---|---|
//! | this module | the `Engine` state, its event loop, and the dispatch of commands, network events and internal results |
//! | `tx` | `Tx`, the one way a transaction is opened (`BEGIN IMMEDIATE`, explicit commit, rollback on drop) |
//! | `send` | `send` calls in batches, encrypting a contact's queue into the outbox, receipts |
//! | `outbox` | transmitting outbox rows, resending them, recording what relays stored, `flush` |
//! | `receive` | deliveries, each one open → session → decrypt → apply, one transaction per batch |
//! | `claims` | first contact: claiming a contact's prekeys and starting a session |
//! | `prekeys` | our prekeys: loading, rotating, publishing the bundle, refilling one-time prekeys |
//! | `register` | registering the destination hashes we receive on |

mod claims;
mod outbox;
mod prekeys;
mod receive;
mod register;
mod send;
mod tx;

use crate::db::{self, Conn};
use crate::envelope::{Kind, MessageId};
use crate::invite::Invite;
use crate::net::{self, Command, NetError, NetEvent};
use crate::profile::Profile;
use crate::{Config, ConnectionState, Contact, Error, Event, Message};
use bytes::Bytes;
use libp2p::{Multiaddr, PeerId};
use meshwhisper_behaviour::device::codec::{Frame, Status};
use meshwhisper_crypto::destination::{self, NamespaceId};
use meshwhisper_crypto::identity::IdentityKeyPair;
use meshwhisper_crypto::pqxdh::MemoryPrekeyStore;
use meshwhisper_crypto::primitives;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// A relay that stays unreachable is mentioned again after this long.
const UNREACHABLE_REPEAT_MS: u64 = 30_000;

/// The engine's random number generator.
type Rng = rand_core::UnwrapErr<getrandom::SysRng>;

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
        homed_hour: None,
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
    /// When we last named our future hashes to the relay (epoch hour).
    homed_hour: Option<u64>,
    /// Prekey uploads awaiting their reply.
    refilling: usize,
    /// Contacts whose delivery receipts are waiting to be sent.
    receipts_due: HashSet<i64>,
    flush_waiters: Vec<oneshot::Sender<Result<(), Error>>>,
    rng: Rng,
    cancel: CancellationToken,
}

/// What work inside a transaction uses besides the transaction: the
/// engine's state, borrowed apart from the profile connection that the
/// transaction holds (see [`Engine::split`]).
struct Ctx<'e> {
    identity: &'e IdentityKeyPair,
    namespace: NamespaceId,
    /// Our invite (first messages carry it).
    me: Invite,
    prekeys: &'e MemoryPrekeyStore,
    cfg: &'e Config,
    rng: &'e mut Rng,
}

impl Ctx<'_> {
    fn now(&self) -> u64 {
        self.cfg.clock.now_ms()
    }
}

/// The id both sides give the session a PQXDH initial message starts.
fn session_id(initial: &[u8]) -> [u8; 8] {
    let h = primitives::sha256(&[b"meshwhisper/session-id", initial]);
    let mut id = [0u8; 8];
    id.copy_from_slice(&h[..8]);
    id
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

    /// The profile connection, to open a [`tx::Tx`] on, and beside it the
    /// rest of the state the work inside that transaction uses.
    fn split(&mut self) -> (&mut Conn, Ctx<'_>) {
        let me = self.p.invite();
        (
            &mut self.p.conn,
            Ctx {
                identity: &self.p.identity,
                namespace: self.p.namespace,
                me,
                prekeys: &self.prekeys,
                cfg: &self.cfg,
                rng: &mut self.rng,
            },
        )
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

    /// Hands a directory request to the network task; a small task awaits
    /// the answer (or the timeout) and reports it as `done(answer)`.
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

    // --- events ----------------------------------------------------------

    async fn on_net(&mut self, e: NetEvent) {
        match e {
            NetEvent::Up(peer) => self.on_up(peer).await,
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
            } => self.on_unreachable(peer, reason, retry_in).await,
        }
    }

    async fn on_up(&mut self, peer: PeerId) {
        self.up.insert(peer);
        self.unreachable_said.remove(&peer);
        if peer == self.p.relay {
            self.registered_hour = None;
            self.homed_hour = None;
            self.announce_home();
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

    async fn on_unreachable(&mut self, peer: PeerId, reason: String, retry_in: Option<Duration>) {
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
            Internal::Published(r) => self.on_published(r).await,
            Internal::PrekeysAdded(r) => {
                self.on_prekeys_added(r).await;
                Ok(())
            }
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "handling a network result failed");
        }
    }

    async fn on_tick(&mut self) {
        let now = self.now();
        if self.up.contains(&self.p.relay) {
            self.announce_home();
        }
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
}
