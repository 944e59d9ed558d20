//! One native device's session: the counterpart of a WebSocket session for
//! `/meshwhisper/device/1` streams. The Swarm task moves frames between the
//! stream and this task; this task talks to the relay core.
//!
//! Unlike the WebSocket protocol, both directions are acknowledged: a
//! device's packet is answered `Stored` once durable, and the relay deletes
//! a delivered packet only when the device acks it.

use crate::core::{ConnKind, Core, PacketError};
use futures::StreamExt as _;
use futures::stream::FuturesOrdered;
use meshwhisper_behaviour::device::codec::{Frame, RefusedCode};
use meshwhisper_crypto::destination::DestHash;
use meshwhisper_storage::mailbox::MailboxId;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Packets being stored at once per device (their commits are grouped).
const IN_FLIGHT: usize = 64;
/// Acks collected before their stored copies are deleted in one go.
const ACK_BATCH: usize = 256;
/// Live deliveries taken from the queue at once.
const DELIVER_BATCH: usize = 32;
/// Claims at other relays one device may have in progress at once.
const REMOTE_CLAIMS: usize = 4;

/// A device session's bounds (from `[limits]`).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Stored packets read per drain step.
    pub drain_batch: u32,
    /// Bytes read per drain step.
    pub drain_bytes: usize,
    /// Deliveries the device may leave unacknowledged; beyond, delivery
    /// pauses (flow control for slow devices).
    pub unacked: usize,
    /// Bytes of those deliveries (they sit in the stream's queues).
    pub unacked_bytes: usize,
    /// Bytes of the device's packets being stored.
    pub inflight_bytes: usize,
    /// Bytes a second the device may store for recipients not connected
    /// here before its packets take the writer's bulk lane (0: no limit;
    /// `crate::gateway::away`).
    pub away_bytes_per_sec: u64,
}

/// Sent and not yet acknowledged deliveries.
#[derive(Default)]
struct Unacked {
    ids: HashMap<MailboxId, usize>,
    bytes: usize,
}

impl Unacked {
    fn room(&self, b: &Bounds) -> bool {
        self.ids.len() < b.unacked && self.bytes < b.unacked_bytes
    }

    fn insert(&mut self, id: MailboxId, len: usize) -> bool {
        if self.ids.insert(id, len).is_some() {
            return false;
        }
        self.bytes += len;
        true
    }

    fn remove(&mut self, id: &MailboxId) {
        if let Some(len) = self.ids.remove(id) {
            self.bytes = self.bytes.saturating_sub(len);
        }
    }
}

/// Runs until the stream closes (`inbound` ends) or the node stops.
/// `queued` counts the bytes of packets the Swarm task has put into
/// `inbound` and this session has not taken yet.
pub async fn run(
    core: Arc<Core>,
    owner: crate::homed::Owner,
    mut inbound: mpsc::Receiver<Frame>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    to_device: mpsc::Sender<Frame>,
    cancel: CancellationToken,
    bounds: Bounds,
) {
    let (id, queue) = core.connect(ConnKind::Device, owner);
    core.metrics.devices_connected.fetch_add(1, Relaxed);
    let mut hashes: Vec<DestHash> = Vec::new();
    let mut in_flight = Unacked::default();
    let mut acked: Vec<MailboxId> = Vec::new();
    let mut storing = FuturesOrdered::new();
    let mut storing_bytes = 0usize;
    let mut draining = false;
    // The last id a drain sent: the next page starts after it (back to the
    // start when the hashes change or the device asks for a drain).
    let mut drained_to = MailboxId(0);
    // What the device may store for recipients who are away.
    let mut away =
        crate::gateway::away::AwayPacer::new(bounds.away_bytes_per_sec, std::time::Instant::now());
    let mut deleting: tokio::task::JoinSet<Vec<MailboxId>> = tokio::task::JoinSet::new();
    // Claims at other relays take a federation round trip: answered in
    // the background, a few at a time.
    let mut claiming: tokio::task::JoinSet<Option<Frame>> = tokio::task::JoinSet::new();
    loop {
        if queue.take_behind() {
            draining = true;
        }
        if draining && in_flight.room(&bounds) {
            match drain(
                &core,
                &hashes,
                &mut drained_to,
                &mut in_flight,
                &to_device,
                &bounds,
            )
            .await
            {
                Some(more) => draining = more,
                None => break,
            }
        }
        if !acked.is_empty() && (inbound.is_empty() || acked.len() >= ACK_BATCH) {
            // Delete in the background; the ids stay in flight (not sent
            // again by a drain) until their stored copies are gone.
            let ids = std::mem::take(&mut acked);
            let c = core.clone();
            deleting.spawn(async move {
                c.delivered(ids.clone()).await;
                ids
            });
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some((seq, hint, r, len, permit, lane)) = storing.next(), if !storing.is_empty() => {
                storing_bytes -= len;
                away.stored(lane);
                drop(permit);
                let reply = match r {
                    Ok(acc) => {
                        core.route_hinted(id, acc, hint);
                        Frame::Stored(seq)
                    }
                    Err(PacketError::Malformed(e)) => Frame::Refused { seq, code: RefusedCode::Malformed, reason: e.to_string() },
                    Err(PacketError::Store(_)) => Frame::Refused { seq, code: RefusedCode::Unavailable, reason: "relay storage unavailable".into() },
                };
                if to_device.send(reply).await.is_err() {
                    break;
                }
            }
            Some(Ok(answer)) = claiming.join_next(), if !claiming.is_empty() => {
                if let Some(r) = answer
                    && to_device.send(r).await.is_err()
                {
                    break;
                }
            }
            Some(Ok(ids)) = deleting.join_next(), if !deleting.is_empty() => {
                for i in ids {
                    in_flight.remove(&i);
                }
            }
            batch = queue.next_batch(DELIVER_BATCH, bounds.drain_bytes), if in_flight.room(&bounds) && !draining => {
                let mut gone = false;
                for out in batch {
                    let Some(mid) = out.mailbox_id else { continue };
                    if !in_flight.insert(mid, out.packet.len()) {
                        continue;
                    }
                    if to_device.send(Frame::Deliver { id: mid.0 as u64, packet: out.packet }).await.is_err() {
                        gone = true;
                        break;
                    }
                }
                if gone {
                    break;
                }
            }
            // The next drain step before reading more.
            _ = std::future::ready(()), if draining && in_flight.room(&bounds) => {}
            frame = inbound.recv(), if storing.len() < IN_FLIGHT && storing_bytes < bounds.inflight_bytes => {
                let Some(frame) = frame else { break };
                if let Frame::Packet { packet, .. } | Frame::PacketTo { packet, .. } = &frame {
                    let _ = queued.fetch_update(Relaxed, Relaxed, |q| Some(q.saturating_sub(packet.len())));
                }
                match frame {
                    Frame::Home(list) => {
                        if list.len() > core.max_hashes() {
                            let _ = to_device.send(Frame::Refused { seq: 0, code: RefusedCode::Malformed, reason: "too many destination hashes".into() }).await;
                            break;
                        }
                        let list: Vec<DestHash> = list.into_iter().map(DestHash).collect();
                        core.home(id, &list);
                    }
                    Frame::Register(list) => {
                        if list.len() > core.max_hashes() {
                            let _ = to_device.send(Frame::Refused { seq: 0, code: RefusedCode::Malformed, reason: "too many destination hashes".into() }).await;
                            break;
                        }
                        hashes = list.into_iter().map(DestHash).collect();
                        hashes.sort_unstable();
                        hashes.dedup();
                        core.register(id, &hashes);
                        draining = true;
                        drained_to = MailboxId(0);
                    }
                    f @ (Frame::Packet { .. } | Frame::PacketTo { .. }) => {
                        let (seq, hint, packet) = match f {
                            Frame::PacketTo { seq, home, packet } => (seq, Some(home), packet),
                            Frame::Packet { seq, packet } => (seq, None, packet),
                            _ => continue,
                        };
                        core.metrics.device_packets_in.fetch_add(1, Relaxed);
                        let len = packet.len();
                        let permit = core.inflight_permit(len).await;
                        storing_bytes += len;
                        let c = core.clone();
                        let batch = vec![(packet, hint)];
                        let lane = away.lane(core.away_bytes(&batch), std::time::Instant::now());
                        if lane == meshwhisper_storage::mailbox::Lane::Bulk {
                            core.metrics.packets_paced_away.fetch_add(1, Relaxed);
                        }
                        storing.push_back(async move {
                            let r = c.accept_many_routed(batch, lane).await.pop()
                                .unwrap_or_else(|| Err(crate::core::PacketError::Store(Arc::new(meshwhisper_storage::Error::Closed))));
                            (seq, hint, r, len, permit, lane)
                        });
                    }
                    // Only what this session delivered: an ack left over
                    // from an earlier connection must not delete anything.
                    Frame::Ack(mid) => {
                        let mid = MailboxId(mid as i64);
                        if in_flight.ids.contains_key(&mid) && !acked.contains(&mid) {
                            acked.push(mid);
                        }
                    }
                    Frame::Drain => {
                        draining = true;
                        drained_to = MailboxId(0);
                    }
                    f @ (Frame::Publish { .. } | Frame::Prekeys { .. } | Frame::Claim { .. }) => {
                        if let Some(r) = crate::device::directory::serve(&core, f).await
                            && to_device.send(r).await.is_err()
                        {
                            break;
                        }
                    }
                    Frame::ClaimAt { req, .. } if claiming.len() >= REMOTE_CLAIMS => {
                        let busy = Frame::Reply {
                            req,
                            status: meshwhisper_behaviour::device::codec::Status::Unavailable,
                            body: bytes::Bytes::from_static(b"too many claims in progress; retry later"),
                        };
                        if to_device.send(busy).await.is_err() {
                            break;
                        }
                    }
                    f @ Frame::ClaimAt { .. } => {
                        let c = core.clone();
                        claiming.spawn(async move { crate::device::directory::serve(&c, f).await });
                    }
                    // Relay-to-device frames from a device are a protocol violation.
                    Frame::Stored(_) | Frame::Deliver { .. } | Frame::Refused { .. } | Frame::Reply { .. } => {
                        core.metrics.protocol_closes.fetch_add(1, Relaxed);
                        break;
                    }
                }
            }
        }
    }
    while let Some((seq, hint, r, _, _, _)) = storing.next().await {
        if let Ok(acc) = r {
            core.route_hinted(id, acc, hint);
            let _ = to_device.try_send(Frame::Stored(seq));
        }
    }
    claiming.abort_all();
    core.delivered(acked).await;
    while deleting.join_next().await.is_some() {}
    core.disconnect(id);
    core.metrics.devices_connected.fetch_sub(1, Relaxed);
}

/// Sends one step of stored packets not yet in flight (deleted when
/// acked). `Some(more)`: whether to go on; `None`: the device is gone.
async fn drain(
    core: &Core,
    hashes: &[DestHash],
    drained_to: &mut MailboxId,
    in_flight: &mut Unacked,
    to_device: &mpsc::Sender<Frame>,
    b: &Bounds,
) -> Option<bool> {
    let room = b.unacked.saturating_sub(in_flight.ids.len());
    let room_bytes = b.unacked_bytes.saturating_sub(in_flight.bytes).max(1);
    let limit = (b.drain_batch as usize).min(room).max(1) as u32;
    let skip: HashSet<MailboxId> = in_flight.ids.keys().copied().collect();
    let pending = match core
        .pending(
            hashes,
            *drained_to,
            &skip,
            limit,
            b.drain_bytes.min(room_bytes),
        )
        .await
    {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "could not list stored packets");
            return Some(false);
        }
    };
    if pending.is_empty() {
        return Some(false);
    }
    for p in pending {
        *drained_to = (*drained_to).max(p.id);
        in_flight.insert(p.id, p.packet.len());
        core.metrics.packets_drained.fetch_add(1, Relaxed);
        core.events.drain.fetch_add(1, Relaxed);
        if to_device
            .send(Frame::Deliver {
                id: p.id.0 as u64,
                packet: p.packet.into(),
            })
            .await
            .is_err()
        {
            return None;
        }
    }
    Some(true)
}
