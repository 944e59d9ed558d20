//! One WebSocket client session.
//!
//! Binary frames are packets; text frames are JSON control messages
//! (`hello`, `pull`, `route`). Packets from the socket are stored in order
//! with several commits in flight (the store groups them), then routed.
//! Packets for this client arrive on its [`LiveQueue`] and are sent; `hello`
//! and `pull` drain what is stored for the client's hashes, and so does a
//! queue that had to turn packets away once it is empty again.
//!
//! Every bound is per connection and relay-wide (docs/operations.md):
//! packets read and being stored (`limits.client_inflight_bytes`,
//! `limits.inflight_bytes`; the socket is not read while they are full),
//! live deliveries queued (`limits.client_queue*`, `limits.live_queue_bytes`),
//! and deliveries sent but not yet confirmed (`limits.unconfirmed_*`).
//!
//! A delivery's stored copy is deleted only once the client is known to
//! have it: after each burst the relay sends a ping, and the client's pong
//! (which RFC 6455 requires, and which the client's TCP stream can only
//! carry after every frame before the ping was read) confirms the burst.
//! A client that goes away before answering gets those packets again on
//! its next `hello`.
//!
//! Close codes: 1001 at shutdown (as the reference), 1002 for a WebSocket
//! protocol violation, 1007 for a malformed packet (short, unknown version,
//! wrong length field) or a text frame that is not UTF-8, 1008 for too many
//! destination hashes, 1009 for a frame over the limit, 1013 when the relay
//! cannot store packets (try again later). A text frame that is not JSON is
//! ignored and counted, as the reference ignores it.

use super::AppState;
use crate::core::{Accepted, ConnId, ConnKind, Outbound, PacketError};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use futures::stream::FuturesOrdered;
use futures::{FutureExt as _, SinkExt as _, StreamExt as _};
use meshwhisper_crypto::destination::DestHash;
use meshwhisper_storage::mailbox::{Lane, MailboxId};
use serde_json::Value;
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use tokio_tungstenite::tungstenite;

/// Batches of packets being stored at once per connection.
const IN_FLIGHT: usize = 8;
/// Packets already waiting on the socket taken into one batch.
const BATCH: usize = 64;
/// Sent packets whose stored copies are deleted in one go (at the latest).
const DELETE_BATCH: usize = 256;
/// Deliveries written per flush, in count and bytes.
const DELIVER_BATCH: usize = 32;
const DELIVER_BYTES: usize = 256 * 1024;
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
    let Some(slot) = WsSlot::take(&s, ip) else {
        s.metrics.websockets_refused_per_ip.fetch_add(1, Relaxed);
        return (
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "too many connections from your address",
        )
            .into_response();
    };
    // Smaller buffers than tungstenite's 128 KiB each way: they grow for
    // large frames, and most packets are a few KiB. The read buffer stays
    // small because tungstenite zero-fills all of its free room before
    // every read attempt (tungstenite-rs #547); a 64 KiB write buffer
    // sends a delivery burst in fewer writes (3-4 % more packets a second
    // at window 32 than 16 KiB, docs/benchmarks.md). Writes are bounded by
    // the delivery bursts; the cap is a second guard.
    ws.read_buffer_size(16 * 1024)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(DELIVER_BYTES + 2 * max_frame + 64 * 1024)
        .max_message_size(max_frame.saturating_mul(2))
        .max_frame_size(max_frame.saturating_mul(2))
        .on_upgrade(move |socket| async move {
            let _slot = slot;
            s.websockets.fetch_add(1, Relaxed);
            s.metrics.websocket_connections.fetch_add(1, Relaxed);
            tracing::debug!(%ip, "websocket session");
            let tracker = s.sessions.clone();
            tracker.track_future(session(s.clone(), socket, ip)).await;
            s.websockets.fetch_sub(1, Relaxed);
        })
}

/// One open WebSocket counted against its client address.
struct WsSlot {
    map: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
    key: IpAddr,
}

impl WsSlot {
    fn take(s: &AppState, ip: IpAddr) -> Option<Self> {
        let key = crate::gateway::ratelimit::client_key(ip.to_canonical());
        let mut m = match s.ws_per_ip.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let n = m.entry(key).or_insert(0);
        if *n >= s.cfg.limits.max_websockets_per_ip {
            return None;
        }
        *n += 1;
        Some(Self {
            map: s.ws_per_ip.clone(),
            key,
        })
    }
}

impl Drop for WsSlot {
    fn drop(&mut self) {
        let mut m = match self.map.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(n) = m.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// Why reading the socket failed, as a close code and reason.
fn read_error(e: &axum::Error) -> (u16, &'static str) {
    let inner = std::error::Error::source(e).and_then(|s| s.downcast_ref::<tungstenite::Error>());
    match inner {
        Some(tungstenite::Error::Capacity(_)) => (1009, "frame too large"),
        Some(tungstenite::Error::Utf8(_)) => (1007, "text frame is not UTF-8"),
        Some(tungstenite::Error::Protocol(_)) => (1002, "protocol error"),
        _ => (1002, "protocol error"),
    }
}

/// A stored batch, the budget it held while being stored and the writer
/// lane it took.
type Stored = (
    Vec<Result<Accepted, PacketError>>,
    usize,
    Option<tokio::sync::OwnedSemaphorePermit>,
    Lane,
);

struct Session {
    s: AppState,
    id: ConnId,
    hashes: Vec<DestHash>,
    /// Sent and not yet deleted: a drain must not send these again.
    in_flight: HashSet<MailboxId>,
    /// Sent since the last ping (id, bytes).
    unconfirmed: Vec<(MailboxId, usize)>,
    /// The ping in flight: its sequence number and what it confirms.
    ping: Option<(u64, Vec<(MailboxId, usize)>)>,
    /// When that ping was sent.
    ping_sent: tokio::time::Instant,
    next_ping: u64,
    /// Unconfirmed deliveries in total (both lists), count and bytes.
    waiting: (usize, usize),
    /// Confirmed; their stored copies are deleted in one go.
    sent: Vec<MailboxId>,
    /// Deletions of confirmed packets' stored copies, running in the
    /// background so sending never waits for a commit. Their ids stay in
    /// `in_flight` (so a drain does not send them again) until they complete.
    deleting: tokio::task::JoinSet<Vec<MailboxId>>,
    /// Stored packets still to send (hello, pull, or a queue that was full).
    draining: bool,
    /// The last id the drain sent: the next page starts after it. Back to
    /// the start on `hello` (new hashes) and `pull`.
    drained_to: MailboxId,
    /// Bytes read from the socket and being stored.
    storing_bytes: usize,
    /// Home relays named by `route` frames, by destination hash.
    hints: std::collections::HashMap<DestHash, [u8; 32]>,
    hint_order: std::collections::VecDeque<DestHash>,
    /// What this client may store for recipients who are away.
    away: super::away::AwayPacer,
}

enum Step {
    Continue,
    Close(u16, &'static str),
    Closed,
}

async fn session(s: AppState, mut socket: WebSocket, ip: IpAddr) {
    let (id, queue) = s.core.connect(ConnKind::WebSocket, Some(ip));
    let mut sess = Session {
        s: s.clone(),
        id,
        hashes: Vec::new(),
        in_flight: HashSet::new(),
        unconfirmed: Vec::new(),
        ping: None,
        ping_sent: tokio::time::Instant::now(),
        next_ping: 1,
        waiting: (0, 0),
        sent: Vec::new(),
        deleting: tokio::task::JoinSet::new(),
        draining: false,
        drained_to: MailboxId(0),
        storing_bytes: 0,
        hints: std::collections::HashMap::new(),
        hint_order: std::collections::VecDeque::new(),
        away: super::away::AwayPacer::new(
            s.cfg.limits.client_away_bytes_per_sec,
            std::time::Instant::now(),
        ),
    };
    let mut storing: FuturesOrdered<_> = FuturesOrdered::new();
    // Liveness: idle sockets are pinged, and one that leaves a ping
    // unanswered for `limits.ws_pong_timeout_secs` is closed.
    let pong_timeout = std::time::Duration::from_secs(s.cfg.limits.ws_pong_timeout_secs);
    let mut keepalive = tokio::time::interval(pong_timeout / 3);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    keepalive.reset();
    // A message read while collecting a batch, handled next.
    let mut stashed: Option<Option<Result<Message, axum::Error>>> = None;
    let end = loop {
        // Confirmed deliveries are deleted in one go.
        if !sess.sent.is_empty() && (queue.is_empty() || sess.sent.len() >= DELETE_BATCH) {
            sess.flush_sent();
        }
        // Deliveries sent while the last ping was out get a ping of their own.
        if sess.ping.is_none() && !sess.unconfirmed.is_empty() {
            match sess.ask_confirmation(&mut socket).await {
                Step::Continue => {}
                Step::Close(code, reason) => break Some((code, reason)),
                Step::Closed => break None,
            }
        }
        // A queue that turned packets away catches up from the store.
        if queue.take_behind() {
            sess.draining = true;
        }
        if sess.draining && sess.room() {
            match sess.drain_page(&mut socket).await {
                Step::Continue => {}
                Step::Close(code, reason) => break Some((code, reason)),
                Step::Closed => break None,
            }
        }
        let limits = &s.cfg.limits;
        let can_read =
            storing.len() < IN_FLIGHT && sess.storing_bytes < limits.client_inflight_bytes;
        let step = if let Some(msg) = stashed.take() {
            sess.incoming(&mut socket, msg).await
        } else {
            tokio::select! {
                biased;
                // Shutdown first: close politely.
                _ = s.cancel.cancelled() => Step::Close(1001, "Node shutting down"),
                // Then finish storing what we read, in order, and route it.
                Some(r) = storing.next(), if !storing.is_empty() => sess.stored(r),
                // Forget ids whose stored copies are gone.
                Some(Ok(ids)) = sess.deleting.join_next(), if !sess.deleting.is_empty() => {
                    sess.deleted(ids);
                    Step::Continue
                }
                // Then deliver to this client, while it confirms what it got.
                batch = queue.next_batch(DELIVER_BATCH, DELIVER_BYTES), if sess.room() && !sess.draining => {
                    sess.deliver(&mut socket, batch).await
                }
                _ = keepalive.tick() => sess.keepalive(&mut socket, pong_timeout).await,
                // The next page of a drain, before reading more (pongs are
                // read once the unconfirmed room is used up).
                _ = std::future::ready(()), if sess.draining && sess.room() => Step::Continue,
                // Then read, unless too much of this client's is being stored.
                msg = socket.recv(), if can_read => match msg {
                    Some(Ok(Message::Binary(frame))) => {
                        // Take every packet already waiting into one batch:
                        // one commit and one reply for all of them.
                        let mut bytes = frame.len();
                        let mut batch = vec![frame];
                        while batch.len() < BATCH && bytes < limits.client_inflight_bytes {
                            match socket.recv().now_or_never() {
                                Some(Some(Ok(Message::Binary(f)))) => {
                                    bytes += f.len();
                                    batch.push(f);
                                }
                                Some(other) => {
                                    stashed = Some(other);
                                    break;
                                }
                                None => break,
                            }
                        }
                        // Each with the home relay a `route` frame named for
                        // its destination, kept with the stored copy.
                        let batch = batch.into_iter().map(|f| {
                            let route = f
                                .get(2..10)
                                .and_then(|d| <[u8; 8]>::try_from(d).ok())
                                .and_then(|d| sess.hints.get(&DestHash(d)).copied());
                            (f, route)
                        }).collect::<Vec<_>>();
                        // Packets routed to a relay elsewhere go on from
                        // memory (stored here only if it does not store
                        // them at once); not while earlier ones are still
                        // being stored, which would overtake them.
                        let batch = if storing.is_empty() { s.core.hand_over(batch) } else { batch };
                        if batch.is_empty() {
                            continue;
                        }
                        let bytes = batch.iter().map(|(f, _)| f.len()).sum();
                        // The relay-wide budget: wait for room (this client
                        // is not read meanwhile).
                        let permit = s.core.inflight_permit(bytes).await;
                        sess.storing_bytes += bytes;
                        let core = s.core.clone();
                        let lane = sess.away.lane(core.away_bytes(&batch), std::time::Instant::now());
                        if lane == Lane::Bulk {
                            s.metrics.packets_paced_away.fetch_add(batch.len() as u64, Relaxed);
                        }
                        storing.push_back(async move { (core.accept_many_routed(batch, lane).await, bytes, permit, lane) });
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
    /// Whether more may be sent before the client confirms what it has.
    fn room(&self) -> bool {
        let l = &self.s.cfg.limits;
        self.waiting.0 < l.unconfirmed_deliveries && self.waiting.1 < l.unconfirmed_bytes
    }

    /// Routes a stored batch in order. Every packet that was stored is
    /// routed; the first refusal then closes the connection.
    fn stored(&mut self, (batch, bytes, permit, lane): Stored) -> Step {
        self.storing_bytes = self.storing_bytes.saturating_sub(bytes);
        self.away.stored(lane);
        drop(permit);
        let mut refusal = None;
        for r in batch {
            match r {
                Ok(acc) => {
                    let hint = self.hints.get(&acc.dest()).copied();
                    self.s.core.route_hinted(self.id, acc, hint)
                }
                Err(e) if refusal.is_none() => {
                    refusal = Some(match e {
                        PacketError::Malformed(
                            meshwhisper_behaviour::packet::Error::TooLarge { .. },
                        ) => (1009, "packet too large"),
                        PacketError::Malformed(_) => (1007, "malformed packet"),
                        PacketError::Store(_) => (1013, "relay storage unavailable"),
                    });
                }
                Err(_) => {}
            }
        }
        match refusal {
            Some((code, reason)) => Step::Close(code, reason),
            None => Step::Continue,
        }
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
                self.stored((vec![r], 0, None, Lane::Main))
            }
            Some(Ok(Message::Text(text))) => self.control(text.as_str()).await,
            Some(Ok(Message::Pong(payload))) => {
                self.pong(&payload);
                Step::Continue
            }
            Some(Ok(Message::Close(_))) | None => Step::Closed,
            Some(Ok(Message::Ping(_))) => {
                // tungstenite queued the pong; send it now.
                if socket.flush().await.is_err() {
                    return Step::Closed;
                }
                Step::Continue
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "websocket read failed");
                let (code, reason) = read_error(&e);
                Step::Close(code, reason)
            }
        }
    }

    /// Sends a burst of live deliveries with one flush, then a ping that
    /// will confirm them.
    async fn deliver(&mut self, socket: &mut WebSocket, batch: Vec<Outbound>) -> Step {
        let mut any = false;
        for out in batch {
            let id = match out.mailbox_id {
                // Already sent by a drain.
                Some(id) if !self.in_flight.insert(id) => continue,
                other => other,
            };
            let len = out.packet.len();
            if socket.feed(Message::Binary(out.packet)).await.is_err() {
                return Step::Closed;
            }
            if let Some(id) = id {
                self.unconfirmed.push((id, len));
                self.waiting.0 += 1;
                self.waiting.1 += len;
            }
            any = true;
        }
        if any {
            self.ask_confirmation(socket).await
        } else {
            Step::Continue
        }
    }

    /// Pings an idle socket; closes one whose ping went unanswered.
    async fn keepalive(&mut self, socket: &mut WebSocket, timeout: std::time::Duration) -> Step {
        if self.ping.is_some() {
            if self.ping_sent.elapsed() >= timeout {
                self.s.metrics.websocket_timeouts.fetch_add(1, Relaxed);
                return Step::Closed;
            }
            return Step::Continue;
        }
        let seq = self.next_ping;
        self.next_ping += 1;
        self.ping = Some((seq, Vec::new()));
        self.ping_sent = tokio::time::Instant::now();
        if socket
            .send(Message::Ping(seq.to_be_bytes().to_vec().into()))
            .await
            .is_err()
        {
            return Step::Closed;
        }
        Step::Continue
    }

    /// Feeds a ping after what was sent (unless one is out already) and
    /// flushes.
    async fn ask_confirmation(&mut self, socket: &mut WebSocket) -> Step {
        if self.ping.is_none() && !self.unconfirmed.is_empty() {
            let seq = self.next_ping;
            self.next_ping += 1;
            let covered = std::mem::take(&mut self.unconfirmed);
            if socket
                .feed(Message::Ping(seq.to_be_bytes().to_vec().into()))
                .await
                .is_err()
            {
                return Step::Closed;
            }
            self.ping = Some((seq, covered));
            self.ping_sent = tokio::time::Instant::now();
        }
        if socket.flush().await.is_err() {
            return Step::Closed;
        }
        Step::Continue
    }

    /// A pong: what its ping covered reached the client.
    fn pong(&mut self, payload: &[u8]) {
        let Ok(seq) = <[u8; 8]>::try_from(payload).map(u64::from_be_bytes) else {
            return;
        };
        if self.ping.as_ref().is_none_or(|(s, _)| *s != seq) {
            return;
        }
        if let Some((_, covered)) = self.ping.take() {
            for (id, len) in covered {
                self.waiting.0 = self.waiting.0.saturating_sub(1);
                self.waiting.1 = self.waiting.1.saturating_sub(len);
                self.sent.push(id);
            }
        }
    }

    /// Starts deleting the stored copies of what was confirmed.
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

    /// Waits for every deletion (at the end of the session). Deliveries
    /// not confirmed stay stored for the next session.
    async fn finish_deletes(&mut self) {
        self.flush_sent();
        while let Some(r) = self.deleting.join_next().await {
            if let Ok(ids) = r {
                self.deleted(ids);
            }
        }
    }

    async fn control(&mut self, text: &str) -> Step {
        if text.len() > self.s.cfg.limits.max_control_frame {
            return Step::Close(1009, "control frame too large");
        }
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            // The reference ignores what it cannot parse.
            self.s.metrics.bad_control_frames.fetch_add(1, Relaxed);
            return Step::Continue;
        };
        match v.get("type").and_then(Value::as_str) {
            Some("hello") => self.hello(&v).await,
            Some("pull") => {
                self.draining = true;
                self.drained_to = MailboxId(0);
                Step::Continue
            }
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

    async fn hello(&mut self, v: &Value) -> Step {
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
        if let Some(reg) = push_registration(v)
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
        self.draining = true;
        self.drained_to = MailboxId(0);
        Step::Continue
    }

    /// Sends one page of what is stored for this client's hashes (bounded
    /// by `limits.drain_batch`, `limits.drain_bytes` and the unconfirmed
    /// room), then asks for confirmation; an empty page ends the drain.
    async fn drain_page(&mut self, socket: &mut WebSocket) -> Step {
        let l = &self.s.cfg.limits;
        let room_count = l.unconfirmed_deliveries.saturating_sub(self.waiting.0);
        let room_bytes = l.unconfirmed_bytes.saturating_sub(self.waiting.1);
        let limit = (l.drain_batch as usize).min(room_count).max(1) as u32;
        let pending = match self
            .s
            .core
            .pending(
                &self.hashes,
                self.drained_to,
                &self.in_flight,
                limit,
                l.drain_bytes.min(room_bytes.max(1)),
            )
            .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "could not list stored packets");
                self.draining = false;
                return Step::Continue;
            }
        };
        if pending.is_empty() {
            self.draining = false;
            return Step::Continue;
        }
        for p in pending {
            self.drained_to = self.drained_to.max(p.id);
            self.in_flight.insert(p.id);
            let len = p.packet.len();
            if socket.feed(Message::Binary(p.packet.into())).await.is_err() {
                return Step::Closed;
            }
            self.unconfirmed.push((p.id, len));
            self.waiting.0 += 1;
            self.waiting.1 += len;
            self.s.metrics.packets_drained.fetch_add(1, Relaxed);
            self.s.core.events.drain.fetch_add(1, Relaxed);
        }
        self.ask_confirmation(socket).await
    }
}

/// A push registration in a `hello`, if it carries one.
fn push_registration(v: &Value) -> Option<meshwhisper_storage::push::Registration> {
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
    match (platform, token, sub) {
        (Some("webpush"), _, Some(sub)) => Some(meshwhisper_storage::push::Registration {
            platform: "webpush".into(),
            token: sub.clone(),
            topic: None,
            subscription: Some(sub),
        }),
        (Some(p @ ("apns" | "fcm")), Some(t), _) => Some(meshwhisper_storage::push::Registration {
            platform: p.into(),
            token: t.into(),
            topic,
            subscription: None,
        }),
        _ => None,
    }
}
