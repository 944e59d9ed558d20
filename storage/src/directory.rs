//! The prekey and username directory.
//!
//! Opaque prekey bundles are kept per (namespace, identity public key), with
//! an optional username unique within the namespace. Who may take a
//! username that another identity holds depends on the namespace's
//! [`UsernamePolicy`], fixed by the first writer. One-time prekeys live in a
//! per-identity pool from which each key is handed out once.

use crate::error::{Error, Result};
use crate::{Store, ms};
use meshwhisper_crypto::primitives::{self, Ed25519Public};
use sqlx::Row as _;
use std::sync::Arc;

/// Longest namespace or public key string accepted.
pub const MAX_KEY_LEN: usize = 256;

/// Who may take a username held by another identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsernamePolicy {
    /// Only with a transfer signed by the current holder (the default).
    #[default]
    SignedTransfer,
    /// Whoever registers it last.
    LastWriterWins,
}

impl UsernamePolicy {
    /// The wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            UsernamePolicy::SignedTransfer => "signed-transfer",
            UsernamePolicy::LastWriterWins => "last-writer-wins",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "signed-transfer" => Some(UsernamePolicy::SignedTransfer),
            "last-writer-wins" => Some(UsernamePolicy::LastWriterWins),
            _ => None,
        }
    }
}

impl std::fmt::Display for UsernamePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lower-cases and trims a username and checks it is 3-30 of `[a-z0-9_-]`.
pub fn normalize_username(raw: &str) -> Option<String> {
    let u = raw.trim().to_lowercase();
    let ok = (3..=30).contains(&u.len())
        && u.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    ok.then_some(u)
}

/// A directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The namespace.
    pub namespace: String,
    /// The identity public key, as registered (hex in practice).
    pub public_key: String,
    /// The opaque prekey bundle.
    pub bundle: Vec<u8>,
    /// The username, if any.
    pub username: Option<String>,
    /// Last update, unix ms.
    pub updated_ms: u64,
}

/// A username transfer authorisation, signed by the current holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferAuth {
    /// The current holder's public key (hex).
    pub from_public_key: String,
    /// Until when it is valid, unix ms.
    pub expires_at_ms: u64,
    /// Ed25519 signature (64 bytes).
    pub signature: Vec<u8>,
}

/// What a verifier is asked to check.
#[derive(Debug)]
pub struct TransferRequest<'a> {
    /// The namespace.
    pub namespace: &'a str,
    /// The (normalized) username.
    pub username: &'a str,
    /// The identity holding it now, from the directory.
    pub current_owner: &'a str,
    /// The identity asking for it.
    pub new_owner: &'a str,
    /// The authorisation presented.
    pub auth: &'a TransferAuth,
    /// The time now, unix ms.
    pub now_ms: u64,
}

/// Checks username transfers. The directory calls it inside the write that
/// moves the username, with the holder read in the same transaction.
pub trait TransferVerifier: Send + Sync {
    /// `Ok` if the transfer is authorised; otherwise why not.
    fn verify(&self, request: &TransferRequest<'_>) -> Result<(), &'static str>;
}

/// The reference protocol's check: an Ed25519 signature by the current
/// holder over the UTF-8 lines `meshwhisper.username-transfer.v1`,
/// namespace, username, new owner key hex and decimal expiry, joined by
/// `\n`; not expired; and naming the current holder.
#[derive(Debug, Default, Clone, Copy)]
pub struct SignedTransferVerifier;

impl SignedTransferVerifier {
    /// The signed text.
    pub fn message(namespace: &str, username: &str, new_owner: &str, expires_at_ms: u64) -> String {
        format!(
            "meshwhisper.username-transfer.v1\n{namespace}\n{username}\n{new_owner}\n{expires_at_ms}"
        )
    }
}

impl TransferVerifier for SignedTransferVerifier {
    fn verify(&self, r: &TransferRequest<'_>) -> Result<(), &'static str> {
        if !r.auth.from_public_key.eq_ignore_ascii_case(r.current_owner) {
            return Err("sender is not the current holder");
        }
        if r.now_ms > r.auth.expires_at_ms {
            return Err("authorisation expired");
        }
        let key = hex::decode(r.current_owner).map_err(|_| "holder key is not hex")?;
        let key: [u8; 32] = key.try_into().map_err(|_| "holder key is not 32 bytes")?;
        let key = Ed25519Public::from_bytes(&key).map_err(|_| "holder key is invalid")?;
        let sig: [u8; 64] = r
            .auth
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| "signature is not 64 bytes")?;
        let msg = Self::message(r.namespace, r.username, r.new_owner, r.auth.expires_at_ms);
        key.verify_lenient(msg.as_bytes(), &sig)
            .map_err(|_| "signature does not verify")
    }
}

/// A bundle registration.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The namespace.
    pub namespace: String,
    /// The identity public key.
    pub public_key: String,
    /// The opaque bundle.
    pub bundle: Vec<u8>,
    /// A username to claim (raw; normalized here). `None` keeps the current one.
    pub username: Option<String>,
    /// A transfer authorisation, when the username is held by someone else.
    pub transfer: Option<TransferAuth>,
}

fn check_key(what: &'static str, s: &str) -> Result<()> {
    if s.is_empty() {
        return Err(Error::Invalid { what, why: "empty" });
    }
    if s.len() > MAX_KEY_LEN {
        return Err(Error::TooLarge {
            what,
            got: s.len() as u64,
            max: MAX_KEY_LEN as u64,
        });
    }
    Ok(())
}

fn row_to_entry(r: &sqlx::sqlite::SqliteRow) -> Result<Entry, sqlx::Error> {
    Ok(Entry {
        namespace: r.try_get("namespace")?,
        public_key: r.try_get("public_key")?,
        bundle: r.try_get("bundle")?,
        username: r.try_get("username")?,
        updated_ms: r.try_get::<i64, _>("updated_ms")?.max(0) as u64,
    })
}

/// The directory API of a [`Store`].
#[derive(Debug, Clone, Copy)]
pub struct Directory<'a> {
    pub(crate) store: &'a Store,
}

impl Directory<'_> {
    /// Registers or replaces a bundle, claiming a username if given.
    ///
    /// Errors: [`Error::Invalid`] (bad username or keys),
    /// [`Error::TooLarge`] (bundle), [`Error::UsernameTaken`] (held by
    /// another identity and no transfer presented),
    /// [`Error::TransferRejected`] (transfer did not verify).
    pub async fn register(
        &self,
        reg: Registration,
        verifier: Arc<dyn TransferVerifier>,
        now_ms: u64,
    ) -> Result<()> {
        check_key("namespace", &reg.namespace)?;
        check_key("public key", &reg.public_key)?;
        let max = self.store.config().bundle_max_bytes;
        if reg.bundle.len() > max {
            return Err(Error::TooLarge {
                what: "prekey bundle (bundle_max_bytes)",
                got: reg.bundle.len() as u64,
                max: max as u64,
            });
        }
        let username = match &reg.username {
            None => None,
            Some(raw) => Some(normalize_username(raw).ok_or(Error::Invalid {
                what: "username",
                why: "3-30 characters of a-z 0-9 _ -",
            })?),
        };
        self.store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    if let Some(name) = &username {
                        let holder: Option<String> = sqlx::query_scalar(
                            "SELECT public_key FROM directory WHERE namespace = ? AND username = ?",
                        )
                        .bind(&reg.namespace)
                        .bind(name)
                        .fetch_optional(&mut ctx.conn)
                        .await
                        .map_err(|e| ctx.db_err("find username", e))?;
                        if let Some(holder) = holder.filter(|h| *h != reg.public_key) {
                            let policy: Option<String> = sqlx::query_scalar(
                                "SELECT policy FROM namespace_policy WHERE namespace = ?",
                            )
                            .bind(&reg.namespace)
                            .fetch_optional(&mut ctx.conn)
                            .await
                            .map_err(|e| ctx.db_err("read policy", e))?;
                            let policy = policy
                                .as_deref()
                                .and_then(UsernamePolicy::parse)
                                .unwrap_or_default();
                            if policy == UsernamePolicy::SignedTransfer {
                                let auth = reg.transfer.as_ref().ok_or(Error::UsernameTaken)?;
                                verifier
                                    .verify(&TransferRequest {
                                        namespace: &reg.namespace,
                                        username: name,
                                        current_owner: &holder,
                                        new_owner: &reg.public_key,
                                        auth,
                                        now_ms,
                                    })
                                    .map_err(Error::TransferRejected)?;
                            }
                            sqlx::query(
                                "UPDATE directory SET username = NULL WHERE namespace = ? AND public_key = ?",
                            )
                            .bind(&reg.namespace)
                            .bind(&holder)
                            .execute(&mut ctx.conn)
                            .await
                            .map_err(|e| ctx.db_err("release username", e))?;
                        }
                    }
                    sqlx::query(
                        "INSERT INTO directory (namespace, public_key, bundle, username, updated_ms) \
                         VALUES (?, ?, ?, ?, ?) \
                         ON CONFLICT (namespace, public_key) DO UPDATE SET bundle = excluded.bundle, \
                         username = COALESCE(excluded.username, directory.username), \
                         updated_ms = excluded.updated_ms",
                    )
                    .bind(&reg.namespace)
                    .bind(&reg.public_key)
                    .bind(&reg.bundle)
                    .bind(&username)
                    .bind(ms(now_ms))
                    .execute(&mut ctx.conn)
                    .await
                    .map_err(|e| {
                        if let sqlx::Error::Database(d) = &e
                            && d.kind() == sqlx::error::ErrorKind::UniqueViolation
                        {
                            return Error::UsernameTaken;
                        }
                        ctx.db_err("register bundle", e)
                    })?;
                    Ok(())
                })
            }))
            .await
    }

    /// The entry of an identity.
    pub async fn by_key(&self, namespace: &str, public_key: &str) -> Result<Option<Entry>> {
        self.entry(
            "SELECT * FROM directory WHERE namespace = ? AND public_key = ?",
            namespace,
            public_key,
        )
        .await
    }

    async fn entry(&self, sql: &'static str, namespace: &str, key: &str) -> Result<Option<Entry>> {
        let row = sqlx::query(sql)
            .bind(namespace)
            .bind(key)
            .fetch_optional(self.store.readers())
            .await
            .map_err(|e| self.store.db_err("read directory", e))?;
        row.as_ref()
            .map(row_to_entry)
            .transpose()
            .map_err(|e| self.store.db_err("read directory", e))
    }

    /// The entry holding a username (normalized first).
    pub async fn by_username(&self, namespace: &str, username: &str) -> Result<Option<Entry>> {
        let Some(name) = normalize_username(username) else {
            return Err(Error::Invalid {
                what: "username",
                why: "3-30 characters of a-z 0-9 _ -",
            });
        };
        self.entry(
            "SELECT * FROM directory WHERE namespace = ? AND username = ?",
            namespace,
            &name,
        )
        .await
    }

    /// Number of bundles stored.
    pub async fn count(&self) -> Result<u64> {
        self.store.count("SELECT COUNT(*) FROM directory").await
    }

    /// Sets a namespace's policy. The first writer wins: setting the same
    /// policy again is fine, another one is [`Error::PolicyConflict`].
    pub async fn set_policy(&self, namespace: &str, policy: UsernamePolicy) -> Result<()> {
        check_key("namespace", namespace)?;
        let ns = namespace.to_string();
        self.store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO namespace_policy (namespace, policy) VALUES (?, ?) \
                         ON CONFLICT (namespace) DO NOTHING",
                    )
                    .bind(&ns)
                    .bind(policy.as_str())
                    .execute(&mut ctx.conn)
                    .await
                    .map_err(|e| ctx.db_err("set policy", e))?;
                    let current: String = sqlx::query_scalar(
                        "SELECT policy FROM namespace_policy WHERE namespace = ?",
                    )
                    .bind(&ns)
                    .fetch_one(&mut ctx.conn)
                    .await
                    .map_err(|e| ctx.db_err("read policy", e))?;
                    let current = UsernamePolicy::parse(&current).unwrap_or_default();
                    if current == policy {
                        Ok(())
                    } else {
                        Err(Error::PolicyConflict { current })
                    }
                })
            }))
            .await
    }

    /// A namespace's policy (the default when none was set).
    pub async fn policy(&self, namespace: &str) -> Result<UsernamePolicy> {
        let p: Option<String> =
            sqlx::query_scalar("SELECT policy FROM namespace_policy WHERE namespace = ?")
                .bind(namespace)
                .fetch_optional(self.store.readers())
                .await
                .map_err(|e| self.store.db_err("read policy", e))?;
        Ok(p.as_deref()
            .and_then(UsernamePolicy::parse)
            .unwrap_or_default())
    }

    /// Adds one-time prekeys to an identity's pool: at most
    /// `opk_max_per_upload` per call ([`Error::TooLarge`] beyond), and the
    /// pool keeps at most `opk_max_per_identity`; keys past that are not
    /// stored. Returns how many of the given keys are in the pool
    /// (duplicates of pooled keys count, as in the reference).
    pub async fn add_one_time_prekeys(
        &self,
        namespace: &str,
        public_key: &str,
        keys: Vec<Vec<u8>>,
    ) -> Result<u32> {
        check_key("namespace", namespace)?;
        check_key("public key", public_key)?;
        let cfg = self.store.config();
        if keys.len() > cfg.opk_max_per_upload {
            return Err(Error::TooLarge {
                what: "one-time prekeys per upload (opk_max_per_upload)",
                got: keys.len() as u64,
                max: cfg.opk_max_per_upload as u64,
            });
        }
        if let Some(k) = keys
            .iter()
            .find(|k| k.is_empty() || k.len() > cfg.opk_max_bytes)
        {
            return Err(Error::TooLarge {
                what: "one-time prekey (opk_max_bytes, non-empty)",
                got: k.len() as u64,
                max: cfg.opk_max_bytes as u64,
            });
        }
        let cap = i64::from(cfg.opk_max_per_identity);
        let (ns, pk) = (namespace.to_string(), public_key.to_string());
        self.store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    let mut have: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM opks WHERE namespace = ? AND public_key = ?",
                    )
                    .bind(&ns)
                    .bind(&pk)
                    .fetch_one(&mut ctx.conn)
                    .await
                    .map_err(|e| ctx.db_err("count opks", e))?;
                    let mut stored = 0u32;
                    for key in keys {
                        let r = sqlx::query(
                            "INSERT INTO opks (namespace, public_key, opk) SELECT ?, ?, ? \
                             WHERE ? < ? ON CONFLICT DO NOTHING",
                        )
                        .bind(&ns)
                        .bind(&pk)
                        .bind(&key)
                        .bind(have)
                        .bind(cap)
                        .execute(&mut ctx.conn)
                        .await
                        .map_err(|e| ctx.db_err("add opk", e))?;
                        if r.rows_affected() == 1 {
                            have += 1;
                            stored += 1;
                        } else {
                            let dup: Option<i64> = sqlx::query_scalar(
                                "SELECT id FROM opks WHERE namespace = ? AND public_key = ? AND opk = ?",
                            )
                            .bind(&ns)
                            .bind(&pk)
                            .bind(&key)
                            .fetch_optional(&mut ctx.conn)
                            .await
                            .map_err(|e| ctx.db_err("find opk", e))?;
                            if dup.is_some() {
                                stored += 1;
                            }
                        }
                    }
                    Ok(stored)
                })
            }))
            .await
    }

    /// Removes and returns one one-time prekey of an identity, oldest first.
    /// Each key is handed out at most once, whatever the concurrency.
    pub async fn claim_one_time_prekey(
        &self,
        namespace: &str,
        public_key: &str,
    ) -> Result<Option<Vec<u8>>> {
        let (ns, pk) = (namespace.to_string(), public_key.to_string());
        self.store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    sqlx::query_scalar(
                        "DELETE FROM opks WHERE id = (SELECT id FROM opks WHERE namespace = ? \
                         AND public_key = ? ORDER BY id LIMIT 1) RETURNING opk",
                    )
                    .bind(&ns)
                    .bind(&pk)
                    .fetch_optional(&mut ctx.conn)
                    .await
                    .map_err(|e| ctx.db_err("claim opk", e))
                })
            }))
            .await
    }

    /// Deletes an identity's whole pool in `namespace`, authorised by a
    /// bearer token: the first call pins SHA-256(token) for the identity
    /// (across namespaces); later calls must present the same token
    /// ([`Error::Unauthorized`] otherwise, deleting nothing).
    pub async fn purge_one_time_prekeys(
        &self,
        namespace: &str,
        public_key: &str,
        token: &str,
    ) -> Result<u64> {
        if token.is_empty() {
            return Err(Error::Unauthorized {
                what: "one-time prekey pool",
            });
        }
        let hash = primitives::sha256(&[token.as_bytes()]);
        let (ns, pk) = (namespace.to_string(), public_key.to_string());
        self.store
            .writer()
            .run(Box::new(move |ctx| {
                Box::pin(async move {
                    let pinned: Option<Vec<u8>> = sqlx::query_scalar(
                        "SELECT token_hash FROM opk_tokens WHERE public_key = ?",
                    )
                    .bind(&pk)
                    .fetch_optional(&mut ctx.conn)
                    .await
                    .map_err(|e| ctx.db_err("read pool token", e))?;
                    match pinned {
                        Some(p) if !primitives::ct_eq(&p, &hash) => {
                            return Err(Error::Unauthorized {
                                what: "one-time prekey pool",
                            });
                        }
                        Some(_) => {}
                        None => {
                            sqlx::query(
                                "INSERT INTO opk_tokens (public_key, token_hash) VALUES (?, ?)",
                            )
                            .bind(&pk)
                            .bind(hash.as_slice())
                            .execute(&mut ctx.conn)
                            .await
                            .map_err(|e| ctx.db_err("pin pool token", e))?;
                        }
                    }
                    let r = sqlx::query("DELETE FROM opks WHERE namespace = ? AND public_key = ?")
                        .bind(&ns)
                        .bind(&pk)
                        .execute(&mut ctx.conn)
                        .await
                        .map_err(|e| ctx.db_err("purge opks", e))?;
                    Ok(r.rows_affected())
                })
            }))
            .await
    }

    /// One-time prekeys stored in total.
    pub async fn one_time_prekey_count(&self) -> Result<u64> {
        self.store.count("SELECT COUNT(*) FROM opks").await
    }

    /// One-time prekeys left for an identity.
    pub async fn one_time_prekeys_left(&self, namespace: &str, public_key: &str) -> Result<u64> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM opks WHERE namespace = ? AND public_key = ?")
                .bind(namespace)
                .bind(public_key)
                .fetch_one(self.store.readers())
                .await
                .map_err(|e| self.store.db_err("count opks", e))?;
        Ok(n.max(0) as u64)
    }
}
