//! One WebSocket client session.
//!
//! Binary frames are packets; text frames are JSON control messages
//! (`hello`, `pull`, `route`). Packets from the socket are stored in order
//! with several commits in flight (the store groups them), then routed.
//! Packets for this client arrive on the core's queue and are sent; their
//! stored copies are deleted once the send succeeded. `hello` and `pull`
//! drain what is stored for the client's hashes.
//!
//! Close codes: 1001 at shutdown (as the reference), 1009 for a packet or
//! control frame over the limit, 1007 for an undersized packet or a control
//! frame that is not JSON, 1008 for too many destination hashes, 1013 when
//! the relay cannot store packets (try again later).

use super::AppState;
use crate::core::{Accepted, ConnId, ConnKind, Outbound, PacketError};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use futures::stream::FuturesOrdered;
use futures::{FutureExt as _, SinkExt as _, StreamExt as _};
use meshwhisper_crypto::destination::DestHash;
use meshwhisper_storage::mailbox::MailboxId;
use serde_json::Value;
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::mpsc;

/// Batches of packets being stored at once per connection.
const IN_FLIGHT: usize = 8;
/// Packets already waiting on the socket taken into one batch.
const BATCH: usize = 64;
/// Sent packets whose stored copies are deleted in one go (at the latest).
const DELETE_BATCH: usize = 256;
/// Deliveries written per flush.
const DELIVER_BATCH: usize = 32;
/// Home-relay hints (`route` frames) one socket keeps; beyond this the
/// oldest are forgotten.
const MAX_HINTS: usize = 1024;

/// Accepts the upgrade if the relay has room.
pub fn upgrade(s: AppState, ws: WebSocketUpgrade, ip: IpAddr) -> Response {
    let max_frame = s
        .cfg
        .storage
        .max_blob_size
        .max(s.cfg.limits.max_control_frame);
    if s.websockets.load(Relaxed) >= s.cfg.limits.max_websockets {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "too many connections",
        )
            .into_response();
    }
    // Small socket buffers (tungstenite defaults to 128 KiB each way):
    // they grow for large frames, and most packets are a few KiB.
    ws.read_buffer_size(16 * 1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(max_frame.saturating_mul(2))
        .max_frame_size(max_frame.saturating_mul(2))
        .on_upgrade(move |socket| async move {
            s.websockets.fetch_add(1, Relaxed);
            s.metrics.websocket_connections.fetch_add(1, Relaxed);
            let span = tracing::debug_span!("ws", %ip);
            let _enter = span.enter();
            drop(_enter);
            let tracker = s.sessions.clone();
            tracker.track_future(session(s.clone(), socket)).await;
            s.websockets.fetch_sub(1, Relaxed);
        })
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

struct Session {
    s: AppState,
    id: ConnId,
    hashes: Vec<DestHash>,
    in_flight: HashSet<MailboxId>,
    sent: Vec<MailboxId>,
    /// Deletions of sent packets' stored copies, running in the background
    /// so sending never waits for a commit. Their ids stay in `in_flight`
    /// (so a drain does not send them again) until they complete.
    deleting: tokio::task::JoinSet<Vec<MailboxId>>,
    /// Home relays named by `route` frames, by destination hash.
    hints: std::collections::HashMap<DestHash, [u8; 32]>,
    hint_order: std::collections::VecDeque<DestHash>,
}

enum Step {
    Continue,
    Close(u16, &'static str),
    Closed,
}

async fn session(s: AppState, mut socket: WebSocket) {
    let (id, mut outbound) = s.core.connect(ConnKind::WebSocket);
    let mut sess = Session {
        s: s.clone(),
        id,
        hashes: Vec::new(),
        in_flight: HashSet::new(),
        sent: Vec::new(),
        deleting: tokio::task::JoinSet::new(),
        hints: std::collections::HashMap::new(),
        hint_order: std::collections::VecDeque::new(),
    };
    let mut storing: FuturesOrdered<_> = FuturesOrdered::new();
    // A message read while collecting a batch, handled next.
    let mut stashed: Option<Option<Result<Message, axum::Error>>> = None;
    let end = loop {
        // Deliveries whose sends completed are deleted in one go.
        if !sess.sent.is_empty() && (outbound.is_empty() || sess.sent.len() >= DELETE_BATCH) {
            sess.flush_sent();
        }
        let step = if let Some(msg) = stashed.take() {
            sess.incoming(&mut socket, msg).await
        } else {
            tokio::select! {
                biased;
                // Shutdown first: close politely.
                _ = s.cancel.cancelled() => Step::Close(1001, "Node shutting down"),
                // Then finish storing what we read, in order, and route it.
                Some(r) = storing.next(), if !storing.is_empty() => sess.stored(r),
                // Then deliver to this client.
                Some(out) = outbound.recv() => sess.deliver(&mut socket, out, &mut outbound).await,
                // Forget ids whose stored copies are gone.
                Some(Ok(ids)) = sess.deleting.join_next(), if !sess.deleting.is_empty() => {
                    sess.deleted(ids);
                    Step::Continue
                }
                // Then read, unless too much is being stored.
                msg = socket.recv(), if storing.len() < IN_FLIGHT => match msg {
                    Some(Ok(Message::Binary(frame))) => {
                        // Take every packet already waiting into one batch:
                        // one commit and one reply for all of them.
                        let mut batch = vec![frame];
                        while batch.len() < BATCH {
                            match socket.recv().now_or_never() {
                                Some(Some(Ok(Message::Binary(f)))) => batch.push(f),
                                Some(other) => {
                                    stashed = Some(other);
                                    break;
                                }
                                None => break,
                            }
                        }
                        let core = s.core.clone();
                        storing.push_back(async move { core.accept_many(batch).await });
                        Step::Continue
                    }
                    other => sess.incoming(&mut socket, other).await,
                },
            }
        };
        match step {
            Step::Continue => {}
            Step::Close(code, reason) => break Some((code, reason)),
            Step::Closed => break None,
        }
    };
    // Packets already read are stored and routed before we go.
    while let Some(r) = storing.next().await {
        let _ = sess.stored(r);
    }
    sess.finish_deletes().await;
    s.core.disconnect(id);
    if let Some((code, reason)) = end {
        if code != 1001 {
            s.metrics.protocol_closes.fetch_add(1, Relaxed);
        }
        let _ = socket.send(close(code, reason)).await;
    }
}

impl Session {
    /// Routes a stored batch in order; the first refused packet closes the
    /// connection (the packets before it were stored and are routed).
    fn stored(&mut self, batch: Vec<Result<Accepted, PacketError>>) -> Step {
        for r in batch {
            match r {
                Ok(acc) => {
                    let hint = self.hints.get(&acc.dest()).copied();
                    self.s.core.route_hinted(self.id, acc, hint)
                }
                Err(PacketError::Malformed(meshwhisper_behaviour::packet::Error::TooLarge {
                    ..
                })) => return Step::Close(1009, "packet too large"),
                Err(PacketError::Malformed(_)) => {
                    return Step::Close(1007, "packet shorter than its header");
                }
                Err(PacketError::Store(_)) => {
                    return Step::Close(1013, "relay storage unavailable");
                }
            }
        }
        Step::Continue
    }

    /// A non-packet message (or the end of the socket).
    async fn incoming(
        &mut self,
        socket: &mut WebSocket,
        msg: Option<Result<Message, axum::Error>>,
    ) -> Step {
        match msg {
            Some(Ok(Message::Binary(frame))) => {
                // Only reached for a stashed packet: store it alone.
                let r = self.s.core.accept(frame).await;
                self.stored(vec![r])
            }
            Some(Ok(Message::Text(text))) => self.control(socket, text.as_str()).await,
            Some(Ok(Message::Close(_))) | None => Step::Closed,
            Some(Ok(_)) => Step::Continue,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "websocket read failed");
                // Usually a frame over the size limit.
                Step::Close(1009, "frame too large")
            }
        }
    }

    /// Sends `out` and every delivery already queued behind it (up to
    /// [`DELIVER_BATCH`]) with one flush: one write for the burst. Their
    /// stored copies are deleted only once the flush succeeded.
    async fn deliver(
        &mut self,
        socket: &mut WebSocket,
        out: Outbound,
        outbound: &mut mpsc::Receiver<Outbound>,
    ) -> Step {
        let mut ids = Vec::new();
        let mut next = Some(out);
        let mut n = 0;
        while let Some(out) = next.take() {
            let fresh = match out.mailbox_id {
                Some(id) => self.in_flight.insert(id).then_some(Some(id)),
                None => Some(None),
            };
            // `None`: already sent by a drain.
            if let Some(id) = fresh {
                if socket.feed(Message::Binary(out.packet)).await.is_err() {
                    return self.failed(ids, id);
                }
                ids.extend(id);
                n += 1;
            }
            if n < DELIVER_BATCH {
                next = outbound.try_recv().ok();
            }
        }
        if n > 0 && socket.flush().await.is_err() {
            return self.failed(ids, None);
        }
        self.sent.extend(ids);
        Step::Continue
    }

    fn failed(&mut self, ids: Vec<MailboxId>, also: Option<MailboxId>) -> Step {
        for id in ids.into_iter().chain(also) {
            self.in_flight.remove(&id);
        }
        Step::Closed
    }

    /// Starts deleting the stored copies of what was sent.
    fn flush_sent(&mut self) {
        if self.sent.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.sent);
        let core = self.s.core.clone();
        self.deleting.spawn(async move {
            core.delivered(ids.clone()).await;
            ids
        });
    }

    fn deleted(&mut self, ids: Vec<MailboxId>) {
        for id in ids {
            self.in_flight.remove(&id);
        }
    }

    /// Waits for every deletion (at the end of the session).
    async fn finish_deletes(&mut self) {
        self.flush_sent();
        while let Some(r) = self.deleting.join_next().await {
            if let Ok(ids) = r {
                self.deleted(ids);
            }
        }
    }

    async fn control(&mut self, socket: &mut WebSocket, text: &str) -> Step {
        if text.len() > self.s.cfg.limits.max_control_frame {
            return Step::Close(1009, "control frame too large");
        }
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return Step::Close(1007, "control frame is not JSON");
        };
        match v.get("type").and_then(Value::as_str) {
            Some("hello") => self.hello(socket, &v).await,
            Some("pull") => self.drain(socket).await,
            // Which relay homes a destination: federation sends packets
            // for it straight there. A malformed hint is ignored.
            Some("route") => {
                self.route_hint(&v);
                Step::Continue
            }
            // Unknown types are ignored, as the reference does.
            _ => Step::Continue,
        }
    }

    fn route_hint(&mut self, v: &Value) {
        let dest = v
            .get("destHash")
            .and_then(Value::as_str)
            .and_then(DestHash::from_hex);
        let relay = v
            .get("homeRelay")
            .and_then(Value::as_str)
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok());
        let (Some(dest), Some(relay)) = (dest, relay) else {
            return;
        };
        if self.hints.insert(dest, relay).is_none() {
            self.hint_order.push_back(dest);
            if self.hint_order.len() > MAX_HINTS
                && let Some(old) = self.hint_order.pop_front()
            {
                self.hints.remove(&old);
            }
        }
    }

    async fn hello(&mut self, socket: &mut WebSocket, v: &Value) -> Step {
        let list = v.get("destHashes").and_then(Value::as_array);
        let mut hashes = Vec::new();
        for item in list.into_iter().flatten() {
            // The reference accepts exactly 16 lower-case hex digits.
            if let Some(h) = item
                .as_str()
                .filter(|s| {
                    s.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                })
                .and_then(DestHash::from_hex)
            {
                hashes.push(h);
            }
        }
        hashes.sort_unstable();
        hashes.dedup();
        if hashes.len() > self.s.core.max_hashes() {
            return Step::Close(1008, "too many destination hashes");
        }
        self.s.core.register(self.id, &hashes);
        self.hashes = hashes;
        let platform = v.get("pushPlatform").and_then(Value::as_str);
        let token = v
            .get("pushToken")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty());
        let topic = v
            .get("pushTopic")
            .and_then(Value::as_str)
            .map(str::to_string);
        let sub = v
            .get("pushSubscription")
            .and_then(Value::as_str)
            .map(str::to_string);
        let reg = match (platform, token, &sub) {
            (Some("webpush"), _, Some(sub)) => Some(meshwhisper_storage::push::Registration {
                platform: "webpush".into(),
                token: sub.clone(),
                topic: None,
                subscription: Some(sub.clone()),
            }),
            (Some(p @ ("apns" | "fcm")), Some(t), _) => {
                Some(meshwhisper_storage::push::Registration {
                    platform: p.into(),
                    token: t.into(),
                    topic,
                    subscription: None,
                })
            }
            _ => None,
        };
        if let Some(reg) = reg
            && !self.hashes.is_empty()
            && let Err(e) = self
                .s
                .core
                .store
                .push()
                .register(self.hashes.clone(), reg, crate::core::now_ms())
                .await
        {
            tracing::warn!(error = %e, "could not record a push registration");
        }
        self.drain(socket).await
    }

    /// Sends what is stored for this client's hashes, batch by batch.
    async fn drain(&mut self, socket: &mut WebSocket) -> Step {
        let batch = self.s.cfg.limits.drain_batch.max(1);
        loop {
            let pending = match self
                .s
                .core
                .pending(&self.hashes, &self.in_flight, batch)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "could not list stored packets");
                    return Step::Continue;
                }
            };
            let n = pending.len();
            for p in pending {
                self.in_flight.insert(p.id);
                if socket.send(Message::Binary(p.packet.into())).await.is_err() {
                    self.in_flight.remove(&p.id);
                    return Step::Closed;
                }
                self.sent.push(p.id);
                self.s.metrics.packets_drained.fetch_add(1, Relaxed);
                self.s.core.events.drain.fetch_add(1, Relaxed);
            }
            // Sent packets must be deleted before the next page is read, or
            // the page would contain them again.
            self.finish_deletes().await;
            if n < batch as usize {
                return Step::Continue;
            }
        }
    }
}
