//! A profile on disk: the identity key, the database, and a lock so only
//! one process uses it at a time.
//!
//! ```text
//! <dir>/identity.key   32-byte Ed25519 seed, mode 0600
//! <dir>/profile.db     contacts, sessions, prekey secrets, history, outbox
//! <dir>/lock           held (flock) while a process uses the profile; holds its pid
//! ```
//!
//! The directory is 0700 and every file 0600; a profile found with looser
//! modes is tightened (with a warning) when it is opened for use.
//!
//! Everything here works offline; [`crate::Client`] adds the network.

use crate::db::{self, Conn};
use crate::invite::Invite;
use crate::{Contact, Error, Message, MessageStatus};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use meshwhisper_crypto::destination::NamespaceId;
use meshwhisper_crypto::identity::{IdentityKeyPair, IdentityPublic};
use meshwhisper_crypto::safety_number;
use meshwhisper_storage::lock::{DirLock, LockError};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The identity key file.
pub const IDENTITY_FILE: &str = "identity.key";
/// The database file.
pub const DB_FILE: &str = "profile.db";
/// The lock file.
pub const LOCK_FILE: &str = "lock";
/// The application namespace the CLI's profiles use.
pub const DEFAULT_APP: &str = "org.meshwhisper.cli";
/// Longest contact name.
pub const MAX_NAME: usize = 64;

/// The namespace of [`DEFAULT_APP`].
pub fn default_namespace() -> NamespaceId {
    NamespaceId::derive(DEFAULT_APP, &[])
}

/// The relay's PeerId and its addresses (without the `/p2p` suffix).
pub fn split_relay(addrs: &[Multiaddr]) -> Result<(PeerId, Vec<Multiaddr>), Error> {
    let mut peer = None;
    let mut out = Vec::new();
    for a in addrs {
        let mut a = a.clone();
        match a.pop() {
            Some(Protocol::P2p(p)) => {
                if peer.is_some_and(|q| q != p) {
                    return Err(Error::InvalidInput(
                        "relay addresses name different PeerIds".into(),
                    ));
                }
                peer = Some(p);
                out.push(a);
            }
            _ => {
                return Err(Error::InvalidInput(format!(
                    "relay address {a} must end with /p2p/<PeerId>"
                )));
            }
        }
    }
    let peer = peer.ok_or_else(|| Error::InvalidInput("no relay address given".into()))?;
    Ok((peer, out))
}

/// A contact name a person can type: 1-64 characters, no control
/// characters or whitespace at either end.
pub fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || name.trim() != name
        || name.chars().any(char::is_control)
    {
        return Err(Error::InvalidInput(format!(
            "contact name {name:?}: 1-64 characters, no control characters or surrounding spaces"
        )));
    }
    Ok(())
}

/// The contact called `name`, read on `conn` (the profile's connection or
/// a transaction on it).
pub(crate) async fn contact_named(conn: &mut Conn, name: &str) -> Result<Contact, Error> {
    let row = db::contact_by(conn, "name", name)
        .await?
        .ok_or_else(|| Error::NoSuchContact(name.to_string()))?;
    Contact::from_row(row)
}

/// An open profile.
pub struct Profile {
    pub(crate) dir: PathBuf,
    pub(crate) identity: IdentityKeyPair,
    pub(crate) namespace: NamespaceId,
    pub(crate) relay: PeerId,
    pub(crate) relay_addrs: Vec<Multiaddr>,
    pub(crate) name: String,
    pub(crate) conn: Conn,
    /// Held by a profile opened for use; `None` when opened read-only.
    lock: Option<DirLock>,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("dir", &self.dir)
            .field("identity", self.identity.public())
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

fn lock(dir: &Path) -> Result<DirLock, Error> {
    DirLock::acquire(dir, LOCK_FILE).map_err(|e| match e {
        LockError::Held { pid, .. } => Error::ProfileInUse {
            dir: dir.to_path_buf(),
            pid,
        },
        LockError::Io { path, source } => Error::io(&path, source),
    })
}

/// Creates the profile directory owner-only (0700).
fn create_dir(dir: &Path) -> Result<(), Error> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::InvalidInput(format!(
            "{} is a file, not a profile directory",
            dir.display()
        )));
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        b.mode(0o700);
    }
    b.create(dir).map_err(|e| Error::io(dir, e))?;
    tighten(dir, 0o700)
}

/// Files of a profile that hold secrets or history.
const PRIVATE_FILES: [&str; 5] = [
    IDENTITY_FILE,
    DB_FILE,
    "profile.db-wal",
    "profile.db-shm",
    LOCK_FILE,
];

/// Makes `path` accessible to its owner only (`mode` 0700 for the
/// directory, 0600 for files), saying so when it was looser. A profile
/// that belongs to someone else is refused.
fn tighten(path: &Path, mode: u32) -> Result<(), Error> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(path, e)),
        };
        let uid = rustix::process::geteuid().as_raw();
        if meta.uid() != uid && uid != 0 {
            return Err(Error::InvalidInput(format!(
                "{} belongs to another user (uid {}); a profile must be yours alone",
                path.display(),
                meta.uid()
            )));
        }
        let current = meta.permissions().mode() & 0o777;
        if current & !mode != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io(path, e))?;
            tracing::warn!(
                path = %path.display(),
                "permissions were {current:o}, readable by others; tightened to {mode:o}"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// Tightens the profile directory and every private file in it.
fn tighten_all(dir: &Path) -> Result<(), Error> {
    tighten(dir, 0o700)?;
    for f in PRIVATE_FILES {
        tighten(&dir.join(f), 0o600)?;
    }
    Ok(())
}

/// Creates the (empty) database file owner-only before SQLite opens it:
/// SQLite gives its -wal and -shm files the database file's mode.
fn create_db_file(path: &Path) -> Result<(), Error> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    opts.open(path).map_err(|e| Error::io(path, e))?;
    tighten(path, 0o600)
}

impl Profile {
    /// Creates a profile in `dir` (which must not hold one) with a new
    /// identity, homed on the relay at `relay` (addresses ending in
    /// `/p2p/<PeerId>`).
    pub async fn create(dir: &Path, relay: &[Multiaddr], name: &str) -> Result<Self, Error> {
        let (peer, addrs) = split_relay(relay)?;
        if !name.is_empty() {
            check_name(name)?;
        }
        create_dir(dir)?;
        let key_path = dir.join(IDENTITY_FILE);
        if key_path.exists() {
            return Err(Error::ProfileExists(dir.to_path_buf()));
        }
        let lock = lock(dir)?;
        let identity = IdentityKeyPair::generate(&mut crate::os_rng());
        meshwhisper_storage::secret_file::create(&key_path, identity.seed().as_ref())
            .map_err(|e| Error::io(&key_path, e))?;
        let db_path = dir.join(DB_FILE);
        create_db_file(&db_path)?;
        let mut conn = db::open(&db_path).await?;
        let relay_text = relay
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        db::meta_set(&mut conn, "relay", relay_text.as_bytes()).await?;
        db::meta_set(&mut conn, "name", name.as_bytes()).await?;
        let namespace = default_namespace();
        db::meta_set(&mut conn, "namespace", namespace.as_bytes()).await?;
        Ok(Self {
            dir: dir.to_path_buf(),
            identity,
            namespace,
            relay: peer,
            relay_addrs: addrs,
            name: name.to_string(),
            conn,
            lock: Some(lock),
        })
    }

    /// Opens the profile in `dir` for use: only one process at a time
    /// (another gets [`Error::ProfileInUse`]).
    pub async fn open(dir: &Path) -> Result<Self, Error> {
        Self::open_with(dir, false).await
    }

    /// Opens the profile in `dir` to read it (contacts, invite, safety
    /// numbers, history), also while another process uses it. Changes are
    /// refused.
    pub async fn open_read_only(dir: &Path) -> Result<Self, Error> {
        Self::open_with(dir, true).await
    }

    /// Whether this handle may change the profile.
    pub fn is_read_only(&self) -> bool {
        self.lock.is_none()
    }

    fn writable(&self) -> Result<(), Error> {
        if self.is_read_only() {
            return Err(Error::InvalidInput(
                "the profile was opened read-only".into(),
            ));
        }
        Ok(())
    }

    async fn open_with(dir: &Path, read_only: bool) -> Result<Self, Error> {
        if dir.exists() && !dir.is_dir() {
            return Err(Error::InvalidInput(format!(
                "{} is a file, not a profile directory",
                dir.display()
            )));
        }
        let key_path = dir.join(IDENTITY_FILE);
        let seed = match std::fs::read(&key_path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NoProfile(dir.to_path_buf()));
            }
            Err(e) => return Err(Error::io(&key_path, e)),
        };
        let seed: &[u8; 32] = seed.as_slice().try_into().map_err(|_| {
            Error::CorruptProfile(format!("{} is not a 32-byte seed", key_path.display()))
        })?;
        let identity = IdentityKeyPair::from_seed(seed);
        let lock = if read_only { None } else { Some(lock(dir)?) };
        tighten_all(dir)?;
        let mut conn = if read_only {
            db::open_read_only(&dir.join(DB_FILE)).await?
        } else {
            db::open(&dir.join(DB_FILE)).await?
        };
        let relay_text = db::meta_get(&mut conn, "relay")
            .await?
            .ok_or_else(|| Error::CorruptProfile("no home relay recorded".into()))?;
        let relay: Vec<Multiaddr> = String::from_utf8_lossy(&relay_text)
            .lines()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|_| Error::CorruptProfile("home relay address unreadable".into()))?;
        let (peer, addrs) = split_relay(&relay)?;
        let name = db::meta_get(&mut conn, "name")
            .await?
            .map(|n| String::from_utf8_lossy(&n).into_owned())
            .unwrap_or_default();
        let namespace = db::meta_get(&mut conn, "namespace")
            .await?
            .and_then(|n| <[u8; 32]>::try_from(n.as_slice()).ok())
            .map(NamespaceId)
            .ok_or_else(|| Error::CorruptProfile("no namespace recorded".into()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            identity,
            namespace,
            relay: peer,
            relay_addrs: addrs,
            name,
            conn,
            lock,
        })
    }

    /// The profile's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Our identity key.
    pub fn identity(&self) -> &IdentityPublic {
        self.identity.public()
    }

    /// Our home relay.
    pub fn relay(&self) -> (PeerId, &[Multiaddr]) {
        (self.relay, &self.relay_addrs)
    }

    /// Our 30-digit fingerprint (half of every safety number).
    pub fn fingerprint(&self) -> String {
        safety_number::fingerprint(self.identity.public())
    }

    /// Our invite.
    pub fn invite(&self) -> Invite {
        Invite {
            identity: *self.identity.public(),
            namespace: self.namespace,
            relay: self.relay,
            addrs: self.relay_addrs.clone(),
            name: self.name.clone(),
        }
    }

    /// Adds a contact from their invite, named `name` (or the name the
    /// invite suggests). Adding the same identity again only updates its
    /// home relay.
    pub async fn add_contact(
        &mut self,
        invite: &Invite,
        name: Option<&str>,
    ) -> Result<Contact, Error> {
        self.writable()?;
        if invite.identity == *self.identity.public() {
            return Err(Error::InvalidInput("that invite is your own".into()));
        }
        if invite.namespace != self.namespace {
            return Err(Error::InvalidInput(
                "that invite belongs to another application namespace".into(),
            ));
        }
        let card = invite.to_bytes()?;
        let key = invite.identity.to_bytes();
        if let Some(existing) = db::contact_by(&mut self.conn, "identity", key.as_slice()).await? {
            db::update_card(&mut self.conn, existing.id, &card).await?;
            return self.contact(&existing.name).await;
        }
        let name = match name {
            Some(n) => n.to_string(),
            None if !invite.name.is_empty() => invite.name.clone(),
            None => {
                return Err(Error::InvalidInput(
                    "the invite has no name: give one with --name".into(),
                ));
            }
        };
        check_name(&name)?;
        if db::contact_by(&mut self.conn, "name", name.as_str())
            .await?
            .is_some()
        {
            return Err(Error::NameTaken(name));
        }
        db::insert_contact(&mut self.conn, &name, &key, &card, crate::now_ms()).await?;
        self.contact(&name).await
    }

    /// All contacts, by name.
    pub async fn contacts(&mut self) -> Result<Vec<Contact>, Error> {
        db::contacts(&mut self.conn)
            .await?
            .into_iter()
            .map(Contact::from_row)
            .collect()
    }

    /// One contact.
    pub async fn contact(&mut self, name: &str) -> Result<Contact, Error> {
        contact_named(&mut self.conn, name).await
    }

    /// The 60-digit safety number shared with `name`.
    pub async fn safety_number(&mut self, name: &str) -> Result<String, Error> {
        let c = self.contact(name).await?;
        Ok(safety_number::safety_number(
            self.identity.public(),
            &c.identity,
        ))
    }

    /// Marks `name` as verified (after comparing safety numbers).
    pub async fn set_verified(&mut self, name: &str, verified: bool) -> Result<(), Error> {
        self.writable()?;
        let c = self.contact(name).await?;
        db::set_verified(&mut self.conn, c.id, verified).await
    }

    /// The last `limit` text messages with `name`, oldest first.
    pub async fn history(&mut self, name: &str, limit: u32) -> Result<Vec<Message>, Error> {
        let c = self.contact(name).await?;
        Ok(db::history(&mut self.conn, c.id, limit)
            .await?
            .into_iter()
            .map(|m| Message {
                contact: c.name.clone(),
                id: m.msg_id,
                outgoing: m.outgoing,
                sent_ms: m.sent_ms,
                body: m.body,
                status: MessageStatus::from_u8(m.status),
            })
            .collect())
    }
}
