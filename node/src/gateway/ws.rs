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
use futures::StreamExt as _;
use futures::stream::FuturesOrdered;
use meshwhisper_crypto::destination::DestHash;
use meshwhisper_storage::mailbox::MailboxId;
use serde_json::Value;
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;

/// Packets being stored at once per connection (their commits are grouped).
const IN_FLIGHT: usize = 64;

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
            session(s.clone(), socket).await;
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
    };
    let mut storing: FuturesOrdered<_> = FuturesOrdered::new();
    let end = loop {
        // Deliveries whose sends completed are deleted in one go.
        if !sess.sent.is_empty() && outbound.is_empty() {
            sess.flush_sent().await;
        }
        let step = tokio::select! {
            biased;
            // Shutdown first: close politely.
            _ = s.cancel.cancelled() => Step::Close(1001, "Node shutting down"),
            // Then finish storing what we read, in order, and route it.
            Some(r) = storing.next(), if !storing.is_empty() => sess.stored(r),
            // Then deliver to this client.
            Some(out) = outbound.recv() => sess.deliver(&mut socket, out).await,
            // Then read, unless too many packets are being stored.
            msg = socket.recv(), if storing.len() < IN_FLIGHT => match msg {
                Some(Ok(Message::Binary(frame))) => {
                    let core = s.core.clone();
                    storing.push_back(async move { core.accept(frame).await });
                    Step::Continue
                }
                Some(Ok(Message::Text(text))) => sess.control(&mut socket, text.as_str()).await,
                Some(Ok(Message::Close(_))) | None => Step::Closed,
                Some(Ok(_)) => Step::Continue,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "websocket read failed");
                    // Usually a frame over the size limit.
                    Step::Close(1009, "frame too large")
                }
            },
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
    sess.flush_sent().await;
    s.core.disconnect(id);
    if let Some((code, reason)) = end {
        if code != 1001 {
            s.metrics.protocol_closes.fetch_add(1, Relaxed);
        }
        let _ = socket.send(close(code, reason)).await;
    }
}

impl Session {
    fn stored(&mut self, r: Result<Accepted, PacketError>) -> Step {
        match r {
            Ok(acc) => {
                self.s.core.route(self.id, acc);
                Step::Continue
            }
            Err(PacketError::Malformed(meshwhisper_behaviour::packet::Error::TooLarge {
                ..
            })) => Step::Close(1009, "packet too large"),
            Err(PacketError::Malformed(_)) => Step::Close(1007, "packet shorter than its header"),
            Err(PacketError::Store(_)) => Step::Close(1013, "relay storage unavailable"),
        }
    }

    async fn deliver(&mut self, socket: &mut WebSocket, out: Outbound) -> Step {
        if let Some(id) = out.mailbox_id
            && !self.in_flight.insert(id)
        {
            return Step::Continue; // already sent by a drain
        }
        match socket.send(Message::Binary(out.packet)).await {
            Ok(()) => {
                if let Some(id) = out.mailbox_id {
                    self.sent.push(id);
                }
                Step::Continue
            }
            Err(_) => {
                if let Some(id) = out.mailbox_id {
                    self.in_flight.remove(&id);
                }
                Step::Closed
            }
        }
    }

    async fn flush_sent(&mut self) {
        let ids = std::mem::take(&mut self.sent);
        self.s.core.delivered(ids.clone()).await;
        for id in ids {
            self.in_flight.remove(&id);
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
            // A routing hint for the next packet: used by federation.
            Some("route") => Step::Continue,
            // Unknown types are ignored, as the reference does.
            _ => Step::Continue,
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
            self.flush_sent().await;
            if n < batch as usize {
                return Step::Continue;
            }
        }
    }
}
