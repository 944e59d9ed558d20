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
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Packets being stored at once per device (their commits are grouped).
const IN_FLIGHT: usize = 64;
/// Acks collected before their stored copies are deleted in one go.
const ACK_BATCH: usize = 256;
/// Deliveries a device may leave unacknowledged; beyond, packets stay
/// stored until it acks and drains (flow control for slow devices).
const MAX_UNACKED: usize = 4096;

/// Runs until the stream closes (`inbound` ends) or the node stops.
pub async fn run(
    core: Arc<Core>,
    mut inbound: mpsc::Receiver<Frame>,
    to_device: mpsc::Sender<Frame>,
    cancel: CancellationToken,
    drain_batch: u32,
) {
    let (id, mut outbound) = core.connect(ConnKind::Device);
    core.metrics.devices_connected.fetch_add(1, Relaxed);
    let mut hashes: Vec<DestHash> = Vec::new();
    let mut in_flight: HashSet<MailboxId> = HashSet::new();
    let mut acked: Vec<MailboxId> = Vec::new();
    let mut storing = FuturesOrdered::new();
    let mut deleting: tokio::task::JoinSet<Vec<MailboxId>> = tokio::task::JoinSet::new();
    loop {
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
            Some((seq, hint, r)) = storing.next(), if !storing.is_empty() => {
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
            Some(Ok(ids)) = deleting.join_next(), if !deleting.is_empty() => {
                for i in ids {
                    in_flight.remove(&i);
                }
            }
            Some(out) = outbound.recv() => {
                let Some(mid) = out.mailbox_id else { continue };
                if in_flight.len() >= MAX_UNACKED || !in_flight.insert(mid) {
                    continue;
                }
                if to_device.send(Frame::Deliver { id: mid.0 as u64, packet: out.packet }).await.is_err() {
                    break;
                }
            }
            frame = inbound.recv(), if storing.len() < IN_FLIGHT => {
                let Some(frame) = frame else { break };
                match frame {
                    Frame::Register(list) => {
                        if list.len() > core.max_hashes() {
                            let _ = to_device.send(Frame::Refused { seq: 0, code: RefusedCode::Malformed, reason: "too many destination hashes".into() }).await;
                            break;
                        }
                        hashes = list.into_iter().map(DestHash).collect();
                        hashes.sort_unstable();
                        hashes.dedup();
                        core.register(id, &hashes);
                        if !drain(&core, &hashes, &mut in_flight, &to_device, drain_batch).await {
                            break;
                        }
                    }
                    f @ (Frame::Packet { .. } | Frame::PacketTo { .. }) => {
                        let (seq, hint, packet) = match f {
                            Frame::PacketTo { seq, home, packet } => (seq, Some(home), packet),
                            Frame::Packet { seq, packet } => (seq, None, packet),
                            _ => continue,
                        };
                        core.metrics.device_packets_in.fetch_add(1, Relaxed);
                        let c = core.clone();
                        storing.push_back(async move { (seq, hint, c.accept(packet).await) });
                    }
                    // Only what this session delivered: an ack left over
                    // from an earlier connection must not delete anything.
                    Frame::Ack(mid) => {
                        let mid = MailboxId(mid as i64);
                        if in_flight.contains(&mid) && !acked.contains(&mid) {
                            acked.push(mid);
                        }
                    }
                    Frame::Drain => {
                        if !drain(&core, &hashes, &mut in_flight, &to_device, drain_batch).await {
                            break;
                        }
                    }
                    f @ (Frame::Publish { .. } | Frame::Prekeys { .. } | Frame::Claim { .. }) => {
                        if let Some(r) = crate::device_directory::serve(&core, f).await
                            && to_device.send(r).await.is_err()
                        {
                            break;
                        }
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
    while let Some((seq, hint, r)) = storing.next().await {
        if let Ok(acc) = r {
            core.route_hinted(id, acc, hint);
            let _ = to_device.try_send(Frame::Stored(seq));
        }
    }
    core.delivered(acked).await;
    while deleting.join_next().await.is_some() {}
    core.disconnect(id);
    core.metrics.devices_connected.fetch_sub(1, Relaxed);
}

/// Sends stored packets not yet in flight; they are deleted when acked.
async fn drain(
    core: &Core,
    hashes: &[DestHash],
    in_flight: &mut HashSet<MailboxId>,
    to_device: &mpsc::Sender<Frame>,
    batch: u32,
) -> bool {
    loop {
        let room = MAX_UNACKED.saturating_sub(in_flight.len()) as u32;
        let batch = batch.min(room);
        if batch == 0 {
            return true;
        }
        let pending = match core.pending(hashes, in_flight, batch).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "could not list stored packets");
                return true;
            }
        };
        let n = pending.len();
        for p in pending {
            in_flight.insert(p.id);
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
                return false;
            }
        }
        if n < batch as usize {
            return true;
        }
    }
}
