//! Receiving: each delivered packet goes through four steps, inside one
//! transaction per batch of deliveries:
//!
//! 1. **open**: the packet's payload through the packet codec, unsealed
//!    (who sent it), its content parsed;
//! 2. **session**: the ratchet session it belongs to, found, or
//!    established from a first message (adding the sender as a contact);
//! 3. **decrypt**: the ratchet step, and the envelope it reveals;
//! 4. **apply**: the ratchet state saved, the consumed one-time prekey
//!    deleted, and what the envelope says written (a text, or receipts).
//!
//! What must wait for the commit (events, our prekeys in memory, acks,
//! receipts, messages that can now go) is collected in [`Received`].

use super::tx::Tx;
use super::{Ctx, Engine, session_id};
use crate::db::{self, Conn, SessionRow};
use crate::envelope::{Content, Envelope, Kind};
use crate::invite::Invite;
use crate::net::{Command, NetEvent};
use crate::{Contact, Error, Event, Message, MessageStatus, ReceiptKind, profile};
use bytes::Bytes;
use libp2p::PeerId;
use meshwhisper_behaviour::device::codec::Frame;
use meshwhisper_behaviour::packet;
use meshwhisper_crypto::identity::{IdentityKeyPair, IdentityPublic};
use meshwhisper_crypto::pqxdh::{self, InitialMessage};
use meshwhisper_crypto::ratchet::{self, Session};
use meshwhisper_crypto::sealed;
use std::collections::HashSet;

/// What a batch of deliveries changes once it is committed.
#[derive(Default)]
pub(super) struct Received {
    events: Vec<Event>,
    used_opks: Vec<u32>,
    receipts_due: HashSet<i64>,
    new_sessions: HashSet<i64>,
}

/// A delivery: the relay, its delivery id (to ack), the packet.
type Delivery = (PeerId, u64, Bytes);

/// The session a message belongs to.
struct Found {
    contact: Contact,
    s: SessionRow,
    /// Our one-time prekey a first message used (deleted once applied).
    fresh_opk: Option<u32>,
}

fn malformed(why: &str) -> Error {
    Error::InvalidInput(format!("received packet: {why}"))
}

/// Step 1, open: the packet's payload, unsealed.
fn open(identity: &IdentityKeyPair, pkt: &[u8]) -> Result<sealed::Opened, Error> {
    let payload = packet::payload(pkt).map_err(|e| match e {
        packet::Error::TooShort(_) => malformed("shorter than its header"),
        _ => malformed("payload length past the end"),
    })?;
    sealed::open(identity, payload).map_err(|e| malformed(&e.to_string()))
}

/// The ratchet message content carries.
fn ratchet_message<'a>(content: &Content<'a>) -> &'a [u8] {
    match content {
        Content::Initial { message, .. } | Content::Session { message, .. } => message,
    }
}

/// Step 2 for a message in a session we know.
async fn known_session(
    conn: &mut Conn,
    sender: &IdentityPublic,
    sid: [u8; 8],
) -> Result<Found, Error> {
    let key = sender.to_bytes();
    let row = db::contact_by(conn, "identity", key.as_slice())
        .await?
        .ok_or_else(|| malformed("from an unknown sender"))?;
    let contact = Contact::from_row(row)?;
    let s = db::sessions(conn, contact.id)
        .await?
        .into_iter()
        .find(|s| s.session_id == sid)
        .ok_or_else(|| malformed("for an unknown session"))?;
    Ok(Found {
        contact,
        s,
        fresh_opk: None,
    })
}

/// Step 4, a text or receipts: writes it, and the event it makes (none
/// for a text we have, or receipts that change nothing).
async fn store_envelope(
    conn: &mut Conn,
    contact: &Contact,
    env: &Envelope,
    now: u64,
) -> Result<Option<Event>, Error> {
    match env.kind {
        Kind::Text => {
            let new = db::insert_message(
                conn,
                contact.id,
                false,
                &env.id,
                Kind::Text as u8,
                &env.body,
                env.sent_ms,
                now,
            )
            .await?
            .is_some();
            Ok(new.then(|| {
                Event::Message(Message {
                    contact: contact.name.clone(),
                    id: env.id,
                    outgoing: false,
                    sent_ms: env.sent_ms,
                    body: env.body.clone(),
                    status: MessageStatus::Queued,
                })
            }))
        }
        Kind::Delivered | Kind::Read => {
            let (status, kind) = if env.kind == Kind::Read {
                (3, ReceiptKind::Read)
            } else {
                (2, ReceiptKind::Delivered)
            };
            let changed = db::raise_status(conn, contact.id, &env.receipt_ids(), status).await?;
            Ok((!changed.is_empty()).then(|| Event::Receipt {
                contact: contact.name.clone(),
                kind,
                ids: changed,
            }))
        }
    }
}

impl Engine {
    /// Deliveries: this one and every other already waiting are processed
    /// in one transaction, then acknowledged (one commit per batch).
    pub(super) async fn deliveries(&mut self, relay: PeerId, id: u64, packet: Bytes) {
        let (batch, other) = self.waiting_deliveries(vec![(relay, id, packet)]);
        match self.receive_batch(&batch).await {
            Ok((out, acks)) => self.after_commit(out, acks).await,
            // Nothing is acked: the relay delivers it all again later.
            Err(e) => tracing::warn!(error = %e, "could not store received messages"),
        }
        if let Some(e) = other {
            Box::pin(self.on_net(e)).await;
        }
    }

    /// `batch` and the deliveries already waiting behind it (up to the
    /// batch size), and the first other network event met.
    fn waiting_deliveries(
        &mut self,
        mut batch: Vec<Delivery>,
    ) -> (Vec<Delivery>, Option<NetEvent>) {
        while batch.len() < self.cfg.batch as usize {
            match self.net_events.try_recv() {
                Ok(NetEvent::Deliver { relay, id, packet }) => batch.push((relay, id, packet)),
                Ok(e) => return (batch, Some(e)),
                Err(_) => break,
            }
        }
        (batch, None)
    }

    /// Receives a batch in one transaction: what it changes and the
    /// deliveries to ack once committed. A packet that cannot be read is
    /// dropped (and acked); a database failure rolls the batch back.
    async fn receive_batch(
        &mut self,
        batch: &[Delivery],
    ) -> Result<(Received, Vec<(PeerId, u64)>), Error> {
        let (conn, mut ctx) = self.split();
        let mut tx = Tx::begin(conn, "begin receiving").await?;
        let mut out = Received::default();
        let mut acks = Vec::with_capacity(batch.len());
        for (relay, id, packet) in batch {
            match ctx.receive(&mut tx, packet, &mut out).await {
                Ok(()) => acks.push((*relay, *id)),
                Err(e @ (Error::Database { .. } | Error::Io { .. })) => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "dropped an undecryptable packet");
                    acks.push((*relay, *id));
                }
            }
        }
        tx.commit("commit received messages").await?;
        Ok((out, acks))
    }

    /// A received batch is committed: forget used one-time prekeys, tell
    /// the application, ack, and send what waited for a session.
    async fn after_commit(&mut self, out: Received, acks: Vec<(PeerId, u64)>) {
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
}

impl Ctx<'_> {
    /// Receives one delivered packet inside the caller's transaction;
    /// what must wait for the commit goes to `out`.
    async fn receive(
        &mut self,
        tx: &mut Tx<'_>,
        pkt: &[u8],
        out: &mut Received,
    ) -> Result<(), Error> {
        let opened = open(self.identity, pkt)?;
        let content = Content::decode(&opened.content)?;
        let found = match content {
            Content::Initial { card, initial, .. } => {
                self.first_contact(tx, &opened.sender, card, initial, out)
                    .await?
            }
            Content::Session { session_id, .. } => {
                known_session(tx, &opened.sender, session_id).await?
            }
        };
        let Some((session, env)) = self.decrypt(&found.s, ratchet_message(&content))? else {
            return Ok(()); // already processed
        };
        self.apply(tx, found, session, env, out).await
    }

    /// Step 2 for a first message: the sender as a contact, and the
    /// session it starts (already known if it was delivered before).
    async fn first_contact(
        &mut self,
        conn: &mut Conn,
        sender: &IdentityPublic,
        card: &[u8],
        initial: &[u8],
        out: &mut Received,
    ) -> Result<Found, Error> {
        let card = Invite::from_bytes(card)?;
        let im = InitialMessage::decode(initial).map_err(|e| malformed(&e.to_string()))?;
        if card.identity != *sender || im.identity != *sender {
            return Err(malformed("first message names another sender"));
        }
        let contact = self.contact_for(conn, &card, out).await?;
        let sid = session_id(initial);
        let known = db::sessions(conn, contact.id)
            .await?
            .into_iter()
            .find(|s| s.session_id == sid);
        let (s, fresh_opk) = match known {
            Some(s) => (s, None),
            None => (self.respond(&im, sid, sender)?, im.one_time_prekey_id),
        };
        Ok(Found {
            contact,
            s,
            fresh_opk,
        })
    }

    /// PQXDH as the responder: the session a first message starts
    /// (inactive until `apply` decides).
    fn respond(
        &self,
        im: &InitialMessage,
        sid: [u8; 8],
        sender: &IdentityPublic,
    ) -> Result<SessionRow, Error> {
        let agreement = pqxdh::respond(self.identity, self.prekeys, im)
            .map_err(|e| malformed(&e.to_string()))?;
        let spk = self
            .prekeys
            .signed
            .iter()
            .find(|(i, _)| *i == im.signed_prekey_id)
            .map(|(_, k)| k.clone())
            .ok_or_else(|| malformed("unknown signed prekey"))?;
        let session = Session::responder(&agreement.shared_key, spk, &agreement.associated_data)
            .map_err(|e| malformed(&e.to_string()))?;
        Ok(SessionRow {
            session_id: sid,
            state: session.to_bytes(),
            initial: None,
            initiator: sender.to_bytes(),
            active: false,
        })
    }

    /// Step 3, decrypt: the ratchet step (not saved yet) and the envelope;
    /// `None` for a message already processed.
    fn decrypt(
        &mut self,
        s: &SessionRow,
        message: &[u8],
    ) -> Result<Option<(Session, Envelope)>, Error> {
        let mut session = Session::from_bytes(&s.state).map_err(|e| malformed(&e.to_string()))?;
        let plain = match session.decrypt(self.rng, message) {
            Ok(p) => zeroize::Zeroizing::new(p),
            Err(ratchet::Error::DuplicateOrExpired) => return Ok(None),
            Err(e) => return Err(malformed(e.kind())),
        };
        let env = Envelope::decode(&plain)?;
        Ok(Some((session, env)))
    }

    /// Step 4, apply: saves the ratchet step, deletes the consumed
    /// one-time prekey, writes the text or receipts, and notes what
    /// follows the commit.
    async fn apply(
        &mut self,
        tx: &mut Tx<'_>,
        found: Found,
        session: Session,
        env: Envelope,
        out: &mut Received,
    ) -> Result<(), Error> {
        let Found {
            contact,
            mut s,
            fresh_opk,
        } = found;
        let new_session = fresh_opk.is_some()
            || db::sessions(tx, contact.id)
                .await?
                .iter()
                .all(|x| x.session_id != s.session_id);
        s.state = session.to_bytes();
        let answered = s.initial.take().is_some();
        let now = self.now();
        self.save_step(tx, contact.id, &mut s, new_session, now)
            .await?;
        if let Some(id) = fresh_opk {
            db::delete_prekey(tx, db::ONE_TIME, id).await?;
        }
        let event = store_envelope(tx, &contact, &env, now).await?;
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

    /// Saves a session after a ratchet step; a new one becomes the one
    /// we send with, or not.
    async fn save_step(
        &self,
        conn: &mut Conn,
        contact: i64,
        s: &mut SessionRow,
        new_session: bool,
        now: u64,
    ) -> Result<(), Error> {
        if new_session {
            // Which session we send with when both sides started one at
            // once: the one started by the lower identity key, on both
            // sides. A confirmed older session gives way to a new one (the
            // peer started over).
            let current = db::sessions(conn, contact)
                .await?
                .into_iter()
                .find(|x| x.active);
            s.active = match current {
                None => true,
                Some(cur) if cur.initial.is_some() => s.initiator < cur.initiator,
                Some(_) => true,
            };
        }
        db::save_session(conn, contact, s, now).await?;
        if s.active {
            db::activate_session(
                conn,
                contact,
                &s.session_id,
                self.cfg.max_sessions_per_contact,
            )
            .await?;
        }
        Ok(())
    }

    /// The contact who sent a first message: known, or added from the card
    /// they sent (named after the card, made unique).
    async fn contact_for(
        &mut self,
        conn: &mut Conn,
        card: &Invite,
        out: &mut Received,
    ) -> Result<Contact, Error> {
        let key = card.identity.to_bytes();
        let bytes = card.to_bytes()?;
        if let Some(row) = db::contact_by(conn, "identity", key.as_slice()).await? {
            if row.card != bytes && card.namespace == self.namespace {
                db::update_card(conn, row.id, &bytes).await?;
            }
            let mut row = row;
            row.card = bytes;
            return Contact::from_row(row);
        }
        if card.namespace != self.namespace {
            return Err(Error::InvalidInput(
                "first message from another namespace".into(),
            ));
        }
        let base = if profile::check_name(&card.name).is_ok() {
            card.name.clone()
        } else {
            format!("contact-{}", &hex::encode(key)[..8])
        };
        let mut name = base.clone();
        let mut n = 2;
        while db::contact_by(conn, "name", name.as_str()).await?.is_some() {
            name = format!("{base}-{n}");
            n += 1;
        }
        let now = self.now();
        db::insert_contact(conn, &name, &key, &bytes, now).await?;
        let c = profile::contact_named(conn, &name).await?;
        out.events.push(Event::ContactAdded(Box::new(c.clone())));
        Ok(c)
    }
}
