//! The outbox: committed packets handed to our home relay (naming the
//! recipient's home relay when it is another), sent again until a relay
//! stores them, and `flush`.

use super::tx::Tx;
use super::{Engine, Internal};
use crate::db;
use crate::envelope::Kind;
use crate::net::{Command, NetError};
use crate::profile::split_relay;
use crate::{Error, Event};
use bytes::Bytes;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::oneshot;

/// A relay's addresses as the outbox keeps them: one `/p2p/` address a
/// line.
pub(super) fn relay_text(peer: PeerId, addrs: &[Multiaddr]) -> String {
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
    /// The relay key to name in a `PacketTo`/`ClaimAt` for a contact homed
    /// at `relay`: `None` when that is our own relay.
    pub(super) fn home_of(&self, relay: PeerId) -> Option<[u8; 32]> {
        if relay == self.p.relay {
            return None;
        }
        meshwhisper_behaviour::relay_key::RelayKey::from_peer(&relay).map(|k| k.0)
    }

    /// Sends a packet through our home relay (naming the recipient's home
    /// relay when it is another one).
    pub(super) fn transmit(&mut self, outbox_id: i64, home: Option<[u8; 32]>, packet: Bytes) {
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
    pub(super) async fn retry_outbox(&mut self) -> Result<(), Error> {
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
    pub(super) async fn on_stored(&mut self, outbox_id: i64, result: Result<(), NetError>) {
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

    /// Removes stored packets from the outbox and marks their messages
    /// as at the relay, then says so for text messages.
    async fn record_stored(&mut self, ids: &[i64]) -> Result<(), Error> {
        let mut seqs = Vec::with_capacity(ids.len());
        let mut tx = Tx::begin(&mut self.p.conn, "begin a transaction").await?;
        for id in ids {
            if let Some(seq) = db::delete_outbox(&mut tx, *id).await? {
                db::set_status_by_seq(&mut tx, seq, 1).await?;
                seqs.push(seq);
            }
        }
        tx.commit("commit").await?;
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

    /// Answers `flush` calls once nothing is left to send.
    pub(super) async fn check_flush(&mut self) {
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
}
