//! Our prekeys: loaded from the profile at start, the signed ones rotated
//! on schedule, the bundle published at our home relay, and one-time
//! prekeys generated, stored and uploaded whenever the relay runs low.

use super::tx::Tx;
use super::{Engine, Internal};
use crate::net::NetError;
use crate::{Error, Event, db};
use bytes::{Buf as _, Bytes};
use meshwhisper_behaviour::device::codec::{Frame, Status};
use meshwhisper_crypto::pqxdh::{self, MemoryPrekeyStore, OneTimePrekey, PrekeyBundle};
use meshwhisper_crypto::primitives::{MlKemSecret, X25519Secret};

/// One-time prekeys per upload (the relay's `opk_max_per_upload`).
const OPK_BATCH: usize = 20;

impl Engine {
    /// Loads our prekey secrets (creating the first signed prekeys) and
    /// builds the bundle.
    pub(super) async fn load_prekeys(&mut self) -> Result<(), Error> {
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
        let mut tx = Tx::begin(&mut self.p.conn, "begin a transaction").await?;
        db::insert_prekey(&mut tx, db::SIGNED, id, spk.to_bytes().as_ref(), now).await?;
        db::insert_prekey(&mut tx, db::PQ, id, pq.seed(), now).await?;
        tx.commit("commit").await?;
        self.prekeys.signed.push((id, spk));
        self.prekeys.pq.push((id, pq));
        self.spk = (id, now);
        self.pq_id = id;
        Ok(())
    }

    /// Replaces the signed prekeys when due and forgets replaced ones past
    /// the grace period.
    pub(super) async fn rotate(&mut self, now: u64) -> Result<(), Error> {
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

    fn namespace_text(&self) -> String {
        hex::encode(self.p.namespace.as_bytes())
    }

    /// Publishes our bundle at our home relay.
    pub(super) fn publish(&self) {
        let frame = Frame::Publish {
            req: 0,
            namespace: self.namespace_text(),
            bundle: self.bundle.clone().into(),
        };
        self.request(self.p.relay, Vec::new(), frame, Internal::Published);
    }

    /// The relay holds our bundle and `one_time` prekeys: refill if low.
    pub(super) async fn on_published(
        &mut self,
        r: Result<(Status, Bytes), NetError>,
    ) -> Result<(), Error> {
        match r {
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
        }
    }

    /// Generates and uploads one-time prekeys until the relay holds the
    /// target number.
    async fn refill(&mut self, left: u32) -> Result<(), Error> {
        if left >= self.cfg.opk_low || self.refilling > 0 {
            return Ok(());
        }
        let n = self.cfg.opk_target.saturating_sub(left) as usize;
        let public = self.new_one_time_prekeys(n).await?;
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

    /// `n` new one-time prekeys, stored (with the counter that names them)
    /// before anyone sees them; their public halves.
    async fn new_one_time_prekeys(&mut self, n: usize) -> Result<Vec<OneTimePrekey>, Error> {
        let now = self.now();
        let mut fresh = Vec::with_capacity(n);
        let mut tx = Tx::begin(&mut self.p.conn, "begin a transaction").await?;
        let mut id = self.next_opk;
        for _ in 0..n {
            let s = X25519Secret::generate(&mut self.rng);
            db::insert_prekey(&mut tx, db::ONE_TIME, id, s.to_bytes().as_ref(), now).await?;
            fresh.push((id, s));
            id = id.wrapping_add(1).max(1);
        }
        db::meta_set_u64(&mut tx, "next_opk", u64::from(id)).await?;
        tx.commit("commit").await?;
        self.next_opk = id;
        let public = fresh
            .iter()
            .map(|(id, s)| OneTimePrekey {
                id: *id,
                key: s.public(),
            })
            .collect();
        self.prekeys.one_time.extend(fresh);
        Ok(public)
    }

    /// An upload of one-time prekeys was answered.
    pub(super) async fn on_prekeys_added(&mut self, r: Result<(Status, Bytes), NetError>) {
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
    }
}
