//! First contact: claiming a contact's prekey bundle (and a one-time
//! prekey) through our home relay, and starting the session PQXDH gives.

use super::tx::Tx;
use super::{Engine, Internal, session_id};
use crate::Error;
use crate::db::{self, SessionRow};
use crate::invite::Invite;
use crate::net::NetError;
use bytes::{Buf as _, Bytes};
use meshwhisper_behaviour::device::codec::{Frame, PREKEY_LEN, Status};
use meshwhisper_crypto::pqxdh::{self, OneTimePrekey, PrekeyBundle};
use meshwhisper_crypto::ratchet::Session;

/// Retry delay for a contact whose prekeys could not be claimed.
const CLAIM_RETRY_MS: u64 = 10_000;

/// A claim reply: the length-prefixed bundle, then a one-time prekey or
/// nothing. Errors say why it is not one (for [`Error::Session`]).
fn parse_claim(
    mut b: Bytes,
    identity: &[u8; 32],
) -> Result<(PrekeyBundle, Option<OneTimePrekey>), String> {
    let malformed = || "relay sent a malformed claim reply".to_string();
    if b.len() < 4 {
        return Err(malformed());
    }
    let n = b.get_u32() as usize;
    if b.len() < n {
        return Err(malformed());
    }
    let bundle = PrekeyBundle::decode(&b.split_to(n))
        .map_err(|e| format!("their prekey bundle is invalid: {e}"))?;
    if bundle.identity().to_bytes() != *identity {
        return Err("the relay returned someone else's prekey bundle".into());
    }
    let opk = match b.len() {
        0 => None,
        PREKEY_LEN => {
            Some(OneTimePrekey::decode(&b).map_err(|_| "malformed one-time prekey".to_string())?)
        }
        _ => return Err(malformed()),
    };
    Ok((bundle, opk))
}

impl Engine {
    /// Asks for a contact's prekeys, unless a claim is under way or
    /// waiting for its retry.
    pub(super) fn claim(&mut self, contact: i64, card: &Invite) {
        if self.claiming.contains(&contact) || self.claim_after.contains_key(&contact) {
            return;
        }
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

    /// A claim was answered: start the session and send what waits, or
    /// say why not and retry later.
    pub(super) async fn on_claimed(
        &mut self,
        contact: i64,
        result: Result<(Status, Bytes), NetError>,
    ) -> Result<(), Error> {
        self.claiming.remove(&contact);
        let Some(row) = db::contact_by(self.conn(), "id", contact).await? else {
            return Ok(());
        };
        let body = match result {
            Ok((Status::Ok, body)) => body,
            Ok((status, body)) => {
                let why = format!(
                    "their relay has no prekeys for them ({status:?}: {}); retrying",
                    String::from_utf8_lossy(&body)
                );
                return self.retry_claim(contact, row.name, why).await;
            }
            Err(e) => {
                let why = format!("could not reach their relay for first contact ({e}); retrying");
                return self.retry_claim(contact, row.name, why).await;
            }
        };
        if db::sessions(self.conn(), contact)
            .await?
            .iter()
            .any(|s| s.active)
        {
            // They wrote first meanwhile: use that session.
            return self.pump(contact).await;
        }
        let bad = |why: String| Error::Session {
            contact: row.name.clone(),
            why,
        };
        let (bundle, opk) = parse_claim(body, &row.identity).map_err(bad)?;
        let s = self.initiate(&bundle, opk.as_ref()).map_err(bad)?;
        let now = self.now();
        let mut tx = Tx::begin(&mut self.p.conn, "begin a transaction").await?;
        db::save_session(&mut tx, contact, &s, now).await?;
        db::activate_session(
            &mut tx,
            contact,
            &s.session_id,
            self.cfg.max_sessions_per_contact,
        )
        .await?;
        tx.commit("commit").await?;
        self.pump(contact).await
    }

    async fn retry_claim(&mut self, contact: i64, name: String, why: String) -> Result<(), Error> {
        self.claim_after
            .insert(contact, self.now() + CLAIM_RETRY_MS);
        self.problem(Some(name), why).await;
        Ok(())
    }

    /// Runs PQXDH with a claimed bundle and starts the ratchet: the new
    /// session, active, carrying the initial message until answered.
    fn initiate(
        &mut self,
        bundle: &PrekeyBundle,
        opk: Option<&OneTimePrekey>,
    ) -> Result<SessionRow, String> {
        let (agreement, initial) = pqxdh::initiate(&mut self.rng, &self.p.identity, bundle, opk)
            .map_err(|e| e.to_string())?;
        let session = Session::initiator(
            &mut self.rng,
            &agreement.shared_key,
            &bundle.signed_prekey().1,
            &agreement.associated_data,
        )
        .map_err(|e| e.to_string())?;
        let initial = initial.encode();
        Ok(SessionRow {
            session_id: session_id(&initial),
            state: session.to_bytes(),
            initial: Some(initial),
            initiator: self.p.identity.public().to_bytes(),
            active: true,
        })
    }
}
