//! Sending: `send` calls in batches, a contact's queue encrypted into the
//! outbox in the transaction that saves the ratchet step, and receipts.

use super::outbox::relay_text;
use super::tx::Tx;
use super::{Cmd, Ctx, Engine};
use crate::db::{self, Conn, MessageRow, SessionRow};
use crate::envelope::{Content, Envelope, Kind, MessageId};
use crate::invite::Invite;
use crate::profile;
use crate::{Error, envelope};
use libp2p::PeerId;
use meshwhisper_behaviour::packet;
use meshwhisper_behaviour::packet::flags;
use meshwhisper_crypto::destination::{self, DestHash};
use meshwhisper_crypto::primitives;
use meshwhisper_crypto::ratchet::Session;
use meshwhisper_crypto::sealed;
use tokio::sync::oneshot;

/// Hops a packet may take (the relay header's TTL).
const PACKET_TTL: u8 = 8;

/// What encrypting a contact's queue produced.
pub(super) enum Pumped {
    /// No such contact.
    Nothing,
    /// No session yet: claim their prekeys.
    Claim(i64, Box<Invite>),
    /// Outbox rows (id, packet) for the contact's home relay.
    Packets(PeerId, Vec<(i64, Vec<u8>)>),
}

/// A `send` call: contact name, body, and where its answer goes.
type SendCall = (String, Vec<u8>, oneshot::Sender<Result<MessageId, Error>>);

/// How one contact's packets are framed while one session and one hour
/// last.
struct Framing<'a> {
    /// The contact's name (for errors).
    name: &'a str,
    /// Their invite.
    card: &'a Invite,
    /// Their destination hash this hour.
    dest: DestHash,
    /// Our invite, binary (first-contact content carries it).
    my_card: &'a [u8],
    /// The session: while `initial` is set (unconfirmed), first-contact
    /// content.
    session: &'a SessionRow,
}

fn session_error(contact: &str, e: impl std::fmt::Display) -> Error {
    Error::Session {
        contact: contact.to_string(),
        why: e.to_string(),
    }
}

impl Engine {
    /// Stores an outgoing message and sends what can be sent.
    pub(super) async fn queue(
        &mut self,
        name: &str,
        kind: Kind,
        body: Vec<u8>,
    ) -> Result<MessageId, Error> {
        let c = self.p.contact(name).await?;
        let (conn, mut ctx) = self.split();
        let id = ctx.store_outgoing(conn, c.id, kind, body).await?;
        self.pump(c.id).await?;
        Ok(id)
    }

    /// `send` calls, batched: this one and every other already waiting are
    /// stored in one transaction, answered, then encrypted per contact in
    /// the same transaction (one commit per batch instead of two per
    /// message).
    pub(super) async fn sends(
        &mut self,
        name: String,
        body: Vec<u8>,
        reply: oneshot::Sender<Result<MessageId, Error>>,
    ) {
        let (batch, other) = self.waiting_sends(vec![(name, body, reply)]);
        let mut results = Vec::with_capacity(batch.len());
        let mut work = Vec::new();
        let committed = self.store_sends(&batch, &mut results, &mut work).await;
        let stored = matches!(committed, Ok(true));
        let why = match &committed {
            Err(e) => e.to_string(),
            Ok(_) => "the profile database refused the batch".to_string(),
        };
        // Calls without a result (the transaction did not begin) are told
        // why nothing was stored.
        let mut results = results.into_iter();
        for (_, _, reply) in batch {
            let r = results
                .next()
                .unwrap_or_else(|| Err(Error::NotStored(why.clone())));
            let r = match r {
                Ok(_) if !stored => Err(Error::NotStored(why.clone())),
                Err(Error::Database { .. }) => Err(Error::NotStored(why.clone())),
                r => r,
            };
            let _ = reply.send(r);
        }
        if stored {
            for w in work {
                self.dispatch(w);
            }
        }
        if let Some(c) = other {
            Box::pin(self.on_cmd(c)).await;
        }
    }

    /// `batch` and the `send` calls already waiting behind it (up to the
    /// batch size), and the first other command met.
    fn waiting_sends(&mut self, mut batch: Vec<SendCall>) -> (Vec<SendCall>, Option<Cmd>) {
        while batch.len() < self.cfg.batch as usize {
            match self.cmds.try_recv() {
                Ok(Cmd::Send { name, body, reply }) => batch.push((name, body, reply)),
                Ok(c) => return (batch, Some(c)),
                Err(_) => break,
            }
        }
        (batch, None)
    }

    /// Stores a batch of sent messages and encrypts their contacts' queues
    /// in one transaction, one result per call in `results`. `Ok(true)`
    /// once committed, `Ok(false)` when part of it failed and it was all
    /// rolled back, `Err` when the transaction could not begin or commit.
    async fn store_sends(
        &mut self,
        batch: &[SendCall],
        results: &mut Vec<Result<MessageId, Error>>,
        work: &mut Vec<Pumped>,
    ) -> Result<bool, Error> {
        let (conn, mut ctx) = self.split();
        let mut tx = Tx::begin(conn, "begin storing sent messages").await?;
        let mut ok = true;
        let mut contacts = Vec::new();
        for (name, body, _) in batch {
            let r = match profile::contact_named(&mut tx, name).await {
                Ok(c) => {
                    if !contacts.contains(&c.id) {
                        contacts.push(c.id);
                    }
                    ctx.store_outgoing(&mut tx, c.id, Kind::Text, body.clone())
                        .await
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
            match ctx.encrypt_unsent(&mut tx, *c).await {
                Ok(w) => work.push(w),
                Err(e) => {
                    tracing::warn!(error = %e, "could not encrypt queued messages");
                    ok = false;
                }
            }
        }
        if !ok {
            return Ok(false); // `tx` rolls back
        }
        tx.commit("commit sent messages").await?;
        Ok(true)
    }

    /// Encrypts and sends a contact's unsent messages, starting first
    /// contact (claiming their prekeys) when there is no session yet.
    pub(super) async fn pump(&mut self, contact: i64) -> Result<(), Error> {
        let (conn, mut ctx) = self.split();
        let mut tx = Tx::begin(conn, "begin encrypting").await?;
        let work = ctx.encrypt_unsent(&mut tx, contact).await?;
        tx.commit("commit encrypted messages").await?;
        self.dispatch(work);
        Ok(())
    }

    /// Sends packets that were just committed to the outbox, and starts
    /// first contact where there is no session.
    pub(super) fn dispatch(&mut self, work: Pumped) {
        match work {
            Pumped::Claim(contact, card) => self.claim(contact, &card),
            Pumped::Packets(peer, packets) => {
                let home = self.home_of(peer);
                for (id, p) in packets {
                    self.transmit(id, home, p.into());
                }
            }
            Pumped::Nothing => {}
        }
    }

    pub(super) async fn send_receipts(&mut self) {
        let due: Vec<i64> = self.receipts_due.drain().collect();
        for cid in due {
            if let Err(e) = self.send_receipts_to(cid).await {
                tracing::warn!(error = %e, "could not queue delivery receipts");
            }
        }
    }

    /// Queues delivery receipts for everything received from `contact`
    /// and not yet receipted, then sends them.
    async fn send_receipts_to(&mut self, contact: i64) -> Result<(), Error> {
        loop {
            let ids =
                db::unreceipted(self.conn(), contact, envelope::MAX_RECEIPT_IDS as u32).await?;
            if ids.is_empty() {
                break;
            }
            let body: Vec<u8> = ids.iter().flat_map(|(_, id)| *id).collect();
            let id: MessageId = primitives::random_array(&mut self.rng);
            let now = self.now();
            let mut tx = Tx::begin(&mut self.p.conn, "begin a transaction").await?;
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
            tx.commit("commit").await?;
        }
        self.pump(contact).await
    }
}

impl Ctx<'_> {
    /// Stores an outgoing message (status queued).
    async fn store_outgoing(
        &mut self,
        conn: &mut Conn,
        contact: i64,
        kind: Kind,
        body: Vec<u8>,
    ) -> Result<MessageId, Error> {
        let env = Envelope {
            kind,
            id: primitives::random_array(self.rng),
            sent_ms: self.now(),
            body,
        };
        env.encode()?; // size check before anything is stored
        let now = env.sent_ms;
        db::insert_message(
            conn,
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

    /// Encrypts a contact's unsent messages into outbox rows, inside the
    /// caller's transaction (the ratchet state is saved with them).
    async fn encrypt_unsent(&mut self, tx: &mut Tx<'_>, contact: i64) -> Result<Pumped, Error> {
        let Some(row) = db::contact_by(tx, "id", contact).await? else {
            return Ok(Pumped::Nothing);
        };
        let card = Invite::from_bytes(&row.card)?;
        let sessions = db::sessions(tx, contact).await?;
        let Some(mut s) = sessions.into_iter().find(|s| s.active) else {
            return Ok(Pumped::Claim(contact, Box::new(card)));
        };
        let relay = relay_text(card.relay, &card.addrs);
        let my_card = self.me.to_bytes()?;
        let mut rows = Vec::new();
        loop {
            let unsent = db::unsent(tx, contact).await?;
            if unsent.is_empty() {
                return Ok(Pumped::Packets(card.relay, rows));
            }
            let mut session =
                Session::from_bytes(&s.state).map_err(|e| session_error(&row.name, e))?;
            let now = self.now();
            let hour = destination::epoch_hour(now);
            let to = Framing {
                name: &row.name,
                card: &card,
                dest: DestHash::derive(&card.namespace, &card.identity.x25519(), hour),
                my_card: &my_card,
                session: &s,
            };
            for m in unsent.iter().take(self.cfg.batch as usize) {
                let p = self.packet(&to, &mut session, m)?;
                let id = db::insert_outbox(tx, &relay, &p, m.seq, now).await?;
                rows.push((id, p));
            }
            s.state = session.to_bytes();
            db::save_session(tx, contact, &s, now).await?;
        }
    }

    /// One queued message as a packet: its envelope encrypted by the
    /// session (advancing it), framed as first-contact or session content,
    /// sealed to the contact.
    fn packet(
        &mut self,
        to: &Framing<'_>,
        session: &mut Session,
        m: &MessageRow,
    ) -> Result<Vec<u8>, Error> {
        let env = Envelope {
            kind: Kind::from_u8(m.kind).unwrap_or(Kind::Text),
            id: m.msg_id,
            sent_ms: m.sent_ms,
            body: m.body.clone(),
        };
        let message = session
            .encrypt(&env.encode()?)
            .map_err(|e| session_error(to.name, e))?;
        let content = match &to.session.initial {
            Some(initial) => Content::Initial {
                card: to.my_card,
                initial,
                message: &message,
            },
            None => Content::Session {
                session_id: to.session.session_id,
                message: &message,
            },
        };
        let sealed = sealed::seal(
            self.rng,
            self.identity,
            &to.card.identity,
            &content.encode(),
        )
        .map_err(|e| session_error(to.name, e))?;
        let flags = if to.session.initial.is_some() {
            flags::HANDSHAKE
        } else {
            flags::DATA
        };
        let sender: [u8; 16] = primitives::random_array(self.rng);
        Ok(packet::build(flags, to.dest, sender, PACKET_TTL, &sealed))
    }
}
