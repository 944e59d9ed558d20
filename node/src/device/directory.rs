//! The prekey directory for native devices: `Publish`, `Prekeys` and
//! `Claim` frames of `/meshwhisper/device/1`, answered with `Reply`.
//!
//! Stricter than the HTTP directory, which must accept the JavaScript SDK's
//! opaque bundles: a bundle here must be a MeshWhisper PQXDH bundle whose
//! signatures verify (its identity is the directory key, so nobody can
//! publish for someone else), a bundle whose signed prekey id is lower than
//! the stored one is refused as stale (no rollback to old prekeys), and a
//! batch of one-time prekeys must carry its owner's signature (nobody can
//! fill someone's pool with keys they cannot use).

use crate::core::{Core, now_ms};
use bytes::{BufMut as _, Bytes, BytesMut};
use meshwhisper_behaviour::device::codec::{Frame, PREKEY_LEN, Status};
use meshwhisper_crypto::identity::IdentityPublic;
use meshwhisper_crypto::pqxdh::{self, OneTimePrekey, PrekeyBundle};
use meshwhisper_storage::directory::{Registration, SignedTransferVerifier};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

fn reply(req: u64, status: Status, body: impl Into<Bytes>) -> Frame {
    Frame::Reply {
        req,
        status,
        body: body.into(),
    }
}

fn failed(core: &Core, req: u64, e: meshwhisper_storage::Error) -> Frame {
    use meshwhisper_storage::Error as E;
    match e {
        E::TooLarge { what, .. } | E::Invalid { what, .. } => {
            reply(req, Status::Invalid, format!("{what}: refused"))
        }
        e => {
            core.metrics.device_directory_failed.fetch_add(1, Relaxed);
            tracing::error!(error = %e, kind = e.kind(), "storage error serving a device directory request");
            reply(req, Status::Unavailable, "relay storage unavailable")
        }
    }
}

async fn left(core: &Core, req: u64, namespace: &str, key: &str) -> Frame {
    match core
        .store
        .directory()
        .one_time_prekeys_left(namespace, key)
        .await
    {
        Ok(n) => reply(
            req,
            Status::Ok,
            (n.min(u64::from(u32::MAX)) as u32).to_be_bytes().to_vec(),
        ),
        Err(e) => failed(core, req, e),
    }
}

/// Whether `new` (a bundle of our format) names an older signed prekey
/// than the stored `old`: publishing it would roll prekeys back.
pub fn is_stale(old: &[u8], new: &[u8]) -> bool {
    match (PrekeyBundle::decode(old), PrekeyBundle::decode(new)) {
        (Ok(old), Ok(new)) => old.signed_prekey().0 > new.signed_prekey().0,
        _ => false,
    }
}

/// Answers one directory frame; `None` for frames that are not requests.
pub async fn serve(core: &Core, frame: Frame) -> Option<Frame> {
    core.metrics.device_directory_requests.fetch_add(1, Relaxed);
    Some(match frame {
        Frame::Publish {
            req,
            namespace,
            bundle,
        } => {
            let parsed = match PrekeyBundle::decode(&bundle) {
                Ok(b) => b,
                Err(e) => return Some(reply(req, Status::Invalid, e.to_string())),
            };
            let key = hex::encode(parsed.identity().to_bytes());
            let dir = core.store.directory();
            match dir.by_key(&namespace, &key).await {
                Ok(Some(old)) => {
                    if is_stale(&old.bundle, &bundle) {
                        return Some(reply(
                            req,
                            Status::Stale,
                            "a bundle with a newer signed prekey is stored",
                        ));
                    }
                }
                Ok(None) => {}
                Err(e) => return Some(failed(core, req, e)),
            }
            let reg = Registration {
                namespace: namespace.clone(),
                public_key: key.clone(),
                bundle: bundle.to_vec(),
                username: None,
                transfer: None,
            };
            if let Err(e) = dir
                .register(reg, Arc::new(SignedTransferVerifier), now_ms())
                .await
            {
                return Some(failed(core, req, e));
            }
            left(core, req, &namespace, &key).await
        }
        Frame::Prekeys {
            req,
            namespace,
            identity,
            signature,
            keys,
        } => {
            let Ok(owner) = IdentityPublic::from_bytes(&identity) else {
                return Some(reply(req, Status::Invalid, "invalid identity key"));
            };
            let parsed: Result<Vec<OneTimePrekey>, _> = keys
                .chunks_exact(PREKEY_LEN)
                .map(OneTimePrekey::decode)
                .collect();
            let Ok(parsed) = parsed else {
                return Some(reply(req, Status::Invalid, "malformed one-time prekey"));
            };
            if let Err(e) =
                pqxdh::verify_one_time_prekeys(&owner, namespace.as_bytes(), &parsed, &signature)
            {
                return Some(reply(req, Status::Invalid, e.to_string()));
            }
            let key = hex::encode(identity);
            let raw = parsed.iter().map(|k| k.encode().to_vec()).collect();
            if let Err(e) = core
                .store
                .directory()
                .add_one_time_prekeys(&namespace, &key, raw)
                .await
            {
                return Some(failed(core, req, e));
            }
            left(core, req, &namespace, &key).await
        }
        Frame::Claim {
            req,
            namespace,
            identity,
        } => {
            let (status, body) = claim(core, &namespace, identity).await;
            reply(req, status, body)
        }
        Frame::ClaimAt {
            req,
            home,
            namespace,
            identity,
        } => {
            // The identity's home relay answers, asked by us over
            // federation: the device talks only to its own relay.
            let (status, body) = match core.claim_remote(home, namespace, identity).await {
                Some(answer) => answer,
                None => (
                    Status::Unavailable,
                    Bytes::from_static(b"the contact's relay could not be reached; retry later"),
                ),
            };
            reply(req, status, body)
        }
        _ => return None,
    })
}

/// Claims `identity`'s bundle and one of its one-time prekeys here: the
/// answer to a device's `Claim` and to another relay's federated `Claim`.
pub async fn claim(core: &Core, namespace: &str, identity: [u8; 32]) -> (Status, Bytes) {
    let key = hex::encode(identity);
    let dir = core.store.directory();
    let entry = match dir.by_key(namespace, &key).await {
        Ok(Some(e)) => e,
        Ok(None) => return (Status::NotFound, Bytes::from_static(b"no such identity")),
        Err(e) => return unavailable(core, e),
    };
    let opk = match dir.claim_one_time_prekey(namespace, &key).await {
        Ok(o) => o,
        Err(e) => return unavailable(core, e),
    };
    let mut body = BytesMut::with_capacity(4 + entry.bundle.len() + PREKEY_LEN);
    body.put_u32(entry.bundle.len() as u32);
    body.put_slice(&entry.bundle);
    if let Some(o) = opk {
        body.put_slice(&o);
    }
    (Status::Ok, body.freeze())
}

fn unavailable(core: &Core, e: meshwhisper_storage::Error) -> (Status, Bytes) {
    core.metrics.device_directory_failed.fetch_add(1, Relaxed);
    tracing::error!(error = %e, kind = e.kind(), "storage error serving a claim");
    (
        Status::Unavailable,
        Bytes::from_static(b"relay storage unavailable"),
    )
}
