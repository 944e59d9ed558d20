//! The MeshWhisper client SDK: end-to-end encrypted messaging through
//! content-blind relays, post-quantum from the first message.
//!
//! A [`Profile`] is a directory: identity key, contacts, sessions, prekeys,
//! history and outbox in its own SQLite file. [`Client::start`] opens one
//! and connects to its home relay over libp2p (`/meshwhisper/device/1`),
//! publishing a signed prekey bundle and one-time prekeys, registering the
//! destination hashes it receives on, and reconnecting by itself.
//!
//! First contact claims the other person's bundle from *their* home relay
//! (named by their [`Invite`]), runs PQXDH (X25519 + ML-KEM-768) and starts
//! a Double Ratchet; the first messages carry what the other side needs to
//! complete the agreement. Every packet's sender is sealed
//! ([`meshwhisper_crypto::sealed`]) so relays see only a destination hash
//! that changes every hour. See `envelope` for the layers.
//!
//! | module | what |
//! |---|---|
//! | [`invite`] | invite strings and QR codes |
//! | [`envelope`] | message envelopes, padding, content framing |
//! | [`profile`] | the profile directory, offline operations |
//! | `engine` | the task that owns a running profile |
//! | `net` | the task that owns the libp2p Swarm |
//! | `db` | the profile database |

mod db;
mod engine;
pub mod envelope;
pub mod invite;
mod net;
pub mod profile;

pub use envelope::MessageId;
pub use invite::Invite;
pub use net::NetError;
pub use profile::Profile;

use libp2p::PeerId;
use meshwhisper_crypto::identity::IdentityPublic;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No profile in that directory.
    #[error("no profile in {0} (create one with `meshwhisper id new`)")]
    NoProfile(PathBuf),
    /// A profile already exists there.
    #[error("a profile already exists in {0}")]
    ProfileExists(PathBuf),
    /// Another process has the profile open.
    #[error("the profile in {} is in use by another meshwhisper process{}", .dir.display(), .pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    ProfileInUse {
        /// The profile.
        dir: PathBuf,
        /// That process, if known.
        pid: Option<u32>,
    },
    /// The profile's files are damaged.
    #[error("the profile is damaged: {0}")]
    CorruptProfile(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database failed.
    #[error("profile database: {what}: {source}")]
    Database {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// The database schema could not be migrated.
    #[error("profile database migration: {0}")]
    Migrate(String),
    /// An argument was not acceptable.
    #[error("{0}")]
    InvalidInput(String),
    /// An invite was malformed.
    #[error(transparent)]
    Invite(#[from] invite::Error),
    /// A message was malformed or too large.
    #[error(transparent)]
    Envelope(#[from] envelope::Error),
    /// No contact by that name.
    #[error("no contact named {0:?}")]
    NoSuchContact(String),
    /// A contact by that name exists already.
    #[error("a contact named {0:?} already exists (choose another with --name)")]
    NameTaken(String),
    /// The network failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Encryption state could not be used.
    #[error("session with {contact}: {why}")]
    Session {
        /// The contact.
        contact: String,
        /// Why.
        why: String,
    },
    /// A message could not be stored in the profile (nothing was sent).
    #[error("message not stored: {0}")]
    NotStored(String),
    /// The client has stopped.
    #[error("the client has stopped")]
    Stopped,
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    pub(crate) id: i64,
    /// The name we know them by.
    pub name: String,
    /// Their identity key.
    pub identity: IdentityPublic,
    /// Their home relay.
    pub relay: PeerId,
    /// Whether we marked their safety number as verified.
    pub verified: bool,
    /// When we added them (unix ms).
    pub added_ms: u64,
}

impl Contact {
    pub(crate) fn from_row(r: db::ContactRow) -> Result<Self, Error> {
        let card = Invite::from_bytes(&r.card)?;
        Ok(Self {
            id: r.id,
            name: r.name,
            identity: card.identity,
            relay: card.relay,
            verified: r.verified,
            added_ms: r.added_ms,
        })
    }
}

/// Where one of our messages is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MessageStatus {
    /// Encrypted and queued here (or received, for incoming messages).
    Queued,
    /// Stored by the recipient's relay.
    AtRelay,
    /// The recipient's device has it.
    Delivered,
    /// The recipient read it.
    Read,
}

impl MessageStatus {
    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Queued,
            1 => Self::AtRelay,
            2 => Self::Delivered,
            _ => Self::Read,
        }
    }
}

/// A message in the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The contact.
    pub contact: String,
    /// Its id.
    pub id: MessageId,
    /// Ours (true) or theirs.
    pub outgoing: bool,
    /// When the sender wrote it (their clock).
    pub sent_ms: u64,
    /// The body.
    pub body: Vec<u8>,
    /// Delivery state of our messages.
    pub status: MessageStatus,
}

/// The home relay connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connected and registered.
    Connected,
    /// Lost; reconnecting with backoff.
    Disconnected,
}

/// Which receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptKind {
    /// Their device received the messages.
    Delivered,
    /// They read them.
    Read,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message arrived (once per message id).
    Message(Message),
    /// A relay stored one of our messages.
    Sent {
        /// To whom.
        contact: String,
        /// Which.
        id: MessageId,
    },
    /// Receipts for our messages.
    Receipt {
        /// From whom.
        contact: String,
        /// Which receipt.
        kind: ReceiptKind,
        /// The messages.
        ids: Vec<MessageId>,
    },
    /// The home relay holds our prekey bundle and this many one-time
    /// prekeys (after each publish and each upload of new ones).
    PrekeysPublished {
        /// One-time prekeys at the relay.
        one_time: u32,
    },
    /// Someone with our invite wrote to us; they are now a contact.
    ContactAdded(Box<Contact>),
    /// The home relay connection changed.
    Connection(ConnectionState),
    /// A relay could not be reached (said once, then at most every 30 s
    /// while it stays unreachable). Messages wait in the outbox and go
    /// when it is back.
    Unreachable {
        /// The relay.
        relay: PeerId,
        /// Its addresses as dialled.
        addrs: Vec<libp2p::Multiaddr>,
        /// Whether it is our home relay (else a contact's).
        home: bool,
        /// Why (the operating system's reason).
        reason: String,
        /// When the next attempt is (for a kept relay).
        retry_in: Option<Duration>,
    },
    /// Something failed that no call could report (e.g. a contact's
    /// prekeys could not be fetched); the client keeps retrying.
    Problem {
        /// The contact concerned, if any.
        contact: Option<String>,
        /// What happened.
        message: String,
    },
}

/// Settings of a running client; every bound has a default.
#[derive(Debug, Clone)]
pub struct Config {
    /// The profile directory.
    pub profile_dir: PathBuf,
    /// Register destination hashes and receive (false for one-shot senders,
    /// so they leave deliveries to the profile's listener).
    pub receive: bool,
    /// One-time prekeys kept at the relay. Default 100 (the relay's cap).
    pub opk_target: u32,
    /// Refill below this many. Default 25.
    pub opk_low: u32,
    /// Signed prekeys are replaced after this long. Default 7 days.
    pub rotate_after: Duration,
    /// Replaced prekeys' secrets are kept this long for late first
    /// messages. Default 30 days.
    pub prekey_grace: Duration,
    /// Hours of destination hashes registered after being offline, so what
    /// was sent meanwhile is drained. Default 168 (the relay's retention).
    pub catch_up_hours: u64,
    /// Hours of future destination hashes named to the home relay at each
    /// connection (and daily while connected), so it keeps packets for us
    /// while we are offline and answers for us as our home. Default 720
    /// (the relay's `homed_hours`).
    pub home_hours: u64,
    /// Sessions kept per contact. Default 3.
    pub max_sessions_per_contact: u32,
    /// Events queued for the application before the client waits for it.
    /// Default 1024.
    pub events_queue: usize,
    /// How long a directory request may take. Default 15 s.
    pub request_timeout: Duration,
    /// How long a relay may take to store a packet. Default 30 s.
    pub store_timeout: Duration,
    /// Messages encrypted per batch. Default 256.
    pub batch: u32,
    /// Where the client reads the time (unix ms): the system clock, or a
    /// test's. Destination hashes, hour roll-over and prekey rotation
    /// follow it.
    pub clock: Clock,
}

/// A source of unix-millisecond time.
#[derive(Clone)]
pub struct Clock(std::sync::Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self(std::sync::Arc::new(now_ms))
    }

    /// A clock that reads `f`.
    pub fn from_fn(f: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(f))
    }

    /// The time now.
    pub fn now_ms(&self) -> u64 {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({})", self.now_ms())
    }
}

impl Config {
    /// Defaults for the profile in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            profile_dir: dir.into(),
            receive: true,
            opk_target: 100,
            opk_low: 25,
            rotate_after: Duration::from_secs(7 * 24 * 3600),
            prekey_grace: Duration::from_secs(30 * 24 * 3600),
            catch_up_hours: 168,
            home_hours: 720,
            max_sessions_per_contact: 3,
            events_queue: 1024,
            request_timeout: Duration::from_secs(15),
            store_timeout: Duration::from_secs(30),
            batch: 256,
            clock: Clock::system(),
        }
    }
}

/// A running client. Cheap to clone; stops when [`Client::shutdown`] is
/// called or the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    cmds: mpsc::Sender<engine::Cmd>,
    identity: IdentityPublic,
    invite: Invite,
    cancel: CancellationToken,
    done: std::sync::Arc<tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Client {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> engine::Cmd,
    ) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(make(reply))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Opens the profile and starts the client; events arrive on the
    /// returned receiver (read it, or the client stalls once
    /// `events_queue` are waiting).
    pub async fn start(cfg: Config) -> Result<(Self, mpsc::Receiver<Event>), Error> {
        let profile = Profile::open(&cfg.profile_dir).await?;
        let identity = *profile.identity();
        let invite = profile.invite();
        let cancel = CancellationToken::new();
        let (cmds, events, task) = engine::start(profile, cfg, cancel.clone()).await?;
        Ok((
            Self {
                cmds,
                identity,
                invite,
                cancel,
                done: std::sync::Arc::new(tokio::sync::Mutex::new(Some(task))),
            },
            events,
        ))
    }

    /// Our identity key.
    pub fn identity(&self) -> &IdentityPublic {
        &self.identity
    }

    /// Our invite.
    pub fn invite(&self) -> &Invite {
        &self.invite
    }

    /// Adds a contact from an invite.
    pub async fn add_contact(
        &self,
        invite: Invite,
        name: Option<String>,
    ) -> Result<Contact, Error> {
        self.call(|reply| engine::Cmd::AddContact {
            invite: Box::new(invite),
            name,
            reply,
        })
        .await
    }

    /// All contacts.
    pub async fn contacts(&self) -> Result<Vec<Contact>, Error> {
        self.call(|reply| engine::Cmd::Contacts { reply }).await
    }

    /// The safety number shared with a contact (60 digits).
    pub async fn safety_number(&self, contact: &str) -> Result<String, Error> {
        self.call(|reply| engine::Cmd::SafetyNumber {
            name: contact.to_string(),
            reply,
        })
        .await
    }

    /// Marks a contact as verified (after comparing safety numbers), or not.
    pub async fn set_verified(&self, contact: &str, verified: bool) -> Result<(), Error> {
        self.call(|reply| engine::Cmd::SetVerified {
            name: contact.to_string(),
            verified,
            reply,
        })
        .await
    }

    /// Sends `body` to a contact; returns once it is encrypted-ready and
    /// durable in the profile (it is then sent, and sent again after
    /// reconnects or a restart, until a relay stores it).
    pub async fn send(&self, contact: &str, body: Vec<u8>) -> Result<MessageId, Error> {
        self.call(|reply| engine::Cmd::Send {
            name: contact.to_string(),
            body,
            reply,
        })
        .await
    }

    /// Tells a contact we read these messages.
    pub async fn mark_read(&self, contact: &str, ids: Vec<MessageId>) -> Result<(), Error> {
        self.call(|reply| engine::Cmd::MarkRead {
            name: contact.to_string(),
            ids,
            reply,
        })
        .await
    }

    /// The last `limit` text messages with a contact, oldest first.
    pub async fn history(&self, contact: &str, limit: u32) -> Result<Vec<Message>, Error> {
        self.call(|reply| engine::Cmd::History {
            name: contact.to_string(),
            limit,
            reply,
        })
        .await
    }

    /// Waits until every message sent so far is stored by a relay.
    pub async fn flush(&self) -> Result<(), Error> {
        self.call(|reply| engine::Cmd::Flush { reply }).await
    }

    /// Stops the client: the network task and the engine end, the profile
    /// is closed (and unlocked).
    pub async fn shutdown(self) {
        self.cancel.cancel();
        if let Some(t) = self.done.lock().await.take() {
            let _ = t.await;
        }
    }
}

/// Current time in Unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The operating system's random number generator.
pub(crate) fn os_rng() -> rand_core::UnwrapErr<getrandom::SysRng> {
    rand_core::UnwrapErr(getrandom::SysRng)
}
