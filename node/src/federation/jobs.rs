//! Store work for federation, on a fixed set of workers.
//!
//! The Swarm task never awaits the store: it hands [`Job`]s to this pool
//! (bounded queues, never a task per message) and hears [`JobDone`] back.
//! A peer's `Store` jobs always go to the same worker, which stores what is
//! queued in one commit, in arrival order. A full queue refuses the job
//! (the caller answers `Refused`, and the sender resends).

use super::action::{Job, JobDone, StoreOutcome, ToStore};
use super::announce::News;
use crate::core::{Core, now_ms};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt as _, StreamExt as _};
use libp2p::gossipsub::MessageAcceptance;
use libp2p::{Multiaddr, PeerId};
use meshwhisper_behaviour::federation::codec::{Frame, MAX_RECORDS, PacketId};
use meshwhisper_behaviour::relay_key::RelayKey;
use meshwhisper_crypto::address_record::AddressRecord;
use meshwhisper_storage::address_book::Upsert;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Jobs queued per worker, counting each packet of a `Store` job.
pub const WORKER_QUEUE: usize = 4096;
/// Most packets stored in one commit.
const STORE_BATCH: usize = 256;
/// Stored batches a worker holds while their packets are settling (it
/// takes no new work past this).
const MAX_SETTLING: usize = 64;
/// Most packets the driver joins into one `Store` job.
pub const STORE_JOIN: usize = STORE_BATCH;

/// One worker's queue, and how much is in it (a `Store` job counts as
/// its packets, so the bound holds however the driver joins them).
#[derive(Debug)]
struct Worker {
    tx: mpsc::Sender<Job>,
    queued: Arc<AtomicUsize>,
}

/// What a job counts for in its worker's queue.
fn weight(job: &Job) -> usize {
    match job {
        Job::Store { packets, .. } => packets.len().max(1),
        _ => 1,
    }
}
/// Records from further `Learn` jobs taken into one commit (up to).
const LEARN_BATCH: usize = MAX_RECORDS;

/// The pool.
#[derive(Debug)]
pub struct Pool {
    workers: Vec<Worker>,
    next: usize,
    /// Picks a peer's worker (the same one for all its packets).
    by_peer: foldhash::fast::RandomState,
}

impl Pool {
    /// Starts `n` workers over `core`; results arrive on the returned
    /// receiver. `remember_ms`: how long stored federated ids are kept.
    pub fn start(
        core: Arc<Core>,
        n: usize,
        me: [u8; 32],
        remember_ms: u64,
        cancel: CancellationToken,
    ) -> (Self, mpsc::Receiver<JobDone>) {
        let (done_tx, done_rx) = mpsc::channel(WORKER_QUEUE);
        let workers = (0..n.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(WORKER_QUEUE);
                let queued = Arc::new(AtomicUsize::new(0));
                tokio::spawn(worker(
                    core.clone(),
                    Queue {
                        rx,
                        queued: queued.clone(),
                    },
                    done_tx.clone(),
                    me,
                    remember_ms,
                    cancel.clone(),
                ));
                Worker { tx, queued }
            })
            .collect();
        (
            Self {
                workers,
                next: 0,
                by_peer: foldhash::fast::RandomState::default(),
            },
            done_rx,
        )
    }

    /// Queues a job; gives it back if its worker's queue is full.
    pub fn submit(&mut self, job: Job) -> Result<(), Box<Job>> {
        let i = match &job {
            Job::Store { peer, .. } => {
                (std::hash::BuildHasher::hash_one(&self.by_peer, peer) as usize)
                    % self.workers.len()
            }
            _ => {
                self.next = (self.next + 1) % self.workers.len();
                self.next
            }
        };
        let w = &self.workers[i];
        let n = weight(&job);
        if w.queued.load(Relaxed) + n > WORKER_QUEUE {
            return Err(Box::new(job));
        }
        w.queued.fetch_add(n, Relaxed);
        w.tx.try_send(job).map_err(|e| {
            w.queued.fetch_sub(n, Relaxed);
            match e {
                mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => {
                    Box::new(j)
                }
            }
        })
    }
}

/// A worker's end of its queue.
struct Queue {
    rx: mpsc::Receiver<Job>,
    queued: Arc<AtomicUsize>,
}

impl Queue {
    fn took(&self, job: &Job) {
        self.queued.fetch_sub(weight(job), Relaxed);
    }

    async fn recv(&mut self) -> Option<Job> {
        let job = self.rx.recv().await?;
        self.took(&job);
        Some(job)
    }

    fn try_recv(&mut self) -> Option<Job> {
        let job = self.rx.try_recv().ok()?;
        self.took(&job);
        Some(job)
    }
}

async fn worker(
    core: Arc<Core>,
    mut rx: Queue,
    done: mpsc::Sender<JobDone>,
    me: [u8; 32],
    remember_ms: u64,
    cancel: CancellationToken,
) {
    let mut carried: Option<Job> = None;
    // Stored batches whose acks wait until their packets are logged or
    // delivered (see `Core::accept_federated`), in order.
    let mut settling: FuturesOrdered<BoxFuture<'static, Vec<JobDone>>> = FuturesOrdered::new();
    loop {
        let job = match carried.take() {
            Some(j) => j,
            None => tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    // Copies of packets held in memory are this relay's
                    // only ones: stored before it stops.
                    rx.rx.close();
                    while let Some(job) = rx.try_recv() {
                        if let Job::KeepCopy(keeps) = job {
                            keep(&core, keeps).await;
                        }
                    }
                    break;
                }
                Some(acks) = settling.next(), if !settling.is_empty() => {
                    if send_done(&done, acks).await.is_err() {
                        return;
                    }
                    continue;
                }
                j = rx.recv(), if settling.len() < MAX_SETTLING => match j {
                    Some(j) => j,
                    None => break,
                },
            },
        };
        let results = match job {
            Job::Store { peer, packets } => {
                // What else is queued for storing goes in the same commit.
                let mut batch: Vec<(PeerId, ToStore)> =
                    packets.into_iter().map(|p| (peer, p)).collect();
                while batch.len() < STORE_BATCH {
                    match rx.try_recv() {
                        Some(Job::Store { peer, packets }) => {
                            batch.extend(packets.into_iter().map(|p| (peer, p)))
                        }
                        Some(other) => {
                            carried = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                settling.push_back(store(&core, batch, remember_ms).await);
                continue;
            }
            Job::Learn {
                records,
                gossip,
                from,
            } => {
                // Records queued behind it are checked and stored in the
                // same transaction (a forming mesh pushes them one by one).
                let mut n = records.len();
                let mut jobs = vec![(records, gossip, from)];
                while n < LEARN_BATCH {
                    match rx.try_recv() {
                        Some(Job::Learn {
                            records,
                            gossip,
                            from,
                        }) => {
                            n += records.len();
                            jobs.push((records, gossip, from));
                        }
                        Some(other) => {
                            carried = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                learn_jobs(&core, jobs, me).await
            }
            other => run(&core, other, me).await,
        };
        if send_done(&done, results).await.is_err() {
            return;
        }
    }
}

/// Sends what one job found as one message (a batch of stored packets is
/// one hand-off back, not one per packet); `Err` once nobody listens.
async fn send_done(done: &mpsc::Sender<JobDone>, results: Vec<JobDone>) -> Result<(), ()> {
    let out = match results.len() {
        0 => return Ok(()),
        1 => results.into_iter().next(),
        _ => Some(JobDone::Many(results)),
    };
    match out {
        Some(r) => done.send(r).await.map_err(|_| ()),
        None => Ok(()),
    }
}

/// Stores packets from other relays, each once under its id, and delivers
/// the new ones to connected recipients. Those go in unlogged (their
/// senders hold them until acked; see `Mailbox::enqueue_federated`), so
/// the acks are a future: they may go once every packet of the batch is
/// logged or delivered; if the store fails first, they say `Refused`.
async fn store(
    core: &Arc<Core>,
    batch: Vec<(PeerId, ToStore)>,
    remember_ms: u64,
) -> BoxFuture<'static, Vec<JobDone>> {
    let until = now_ms().saturating_add(remember_ms);
    let connected = core.connected_many(batch.iter().map(|(_, p)| p.dest));
    let items: Vec<(PacketId, Bytes, bool)> = batch
        .iter()
        .zip(connected)
        .map(|((_, p), c)| (p.id, p.packet.clone(), c))
        .collect();
    let (results, settled) = core.accept_federated(items, until).await;
    let m = &core.metrics.federation;
    // What each came to; new packets go to their connected recipients
    // (one look at the registry for the whole batch).
    let mut fresh = Vec::new();
    let outcomes: Vec<Option<StoreOutcome>> = results
        .into_iter()
        .map(|r| match r {
            Ok(Some(acc)) => {
                fresh.push(acc);
                None
            }
            // Stored before under this id: acknowledged again, not
            // stored (or delivered) twice.
            Ok(None) => {
                m.drops_duplicate.fetch_add(1, Relaxed);
                Some(StoreOutcome::Stored)
            }
            Err(crate::core::PacketError::Malformed(_)) => Some(StoreOutcome::Malformed),
            Err(_) => Some(StoreOutcome::Refused),
        })
        .collect();
    let mut live = core.route_local_many(fresh).into_iter();
    let acks: Vec<JobDone> = batch
        .into_iter()
        .zip(outcomes)
        .map(|((peer, p), outcome)| {
            let outcome = outcome.unwrap_or_else(|| {
                if live.next().unwrap_or(false) {
                    m.delivered_locally.fetch_add(1, Relaxed);
                } else {
                    m.stored_locally.fetch_add(1, Relaxed);
                }
                StoreOutcome::Stored
            });
            JobDone::Stored {
                peer,
                id: p.id,
                outcome,
                routed: p.routed,
            }
        })
        .collect();
    async move {
        let held = match settled {
            Some(s) => s.wait().await,
            None => true,
        };
        if held {
            return acks;
        }
        // Not known to be kept here: the senders send them again.
        acks.into_iter()
            .map(|a| match a {
                JobDone::Stored {
                    peer,
                    id,
                    outcome: StoreOutcome::Stored,
                    routed,
                } => JobDone::Stored {
                    peer,
                    id,
                    outcome: StoreOutcome::Refused,
                    routed,
                },
                other => other,
            })
            .collect()
    }
    .boxed()
}

/// Stores copies of packets held in memory (see `forward`): what became
/// of the pending ones.
async fn keep(core: &Core, keeps: Vec<super::forward::Keep>) -> Vec<JobDone> {
    let ids = core
        .keep_copies(keeps.iter().map(|k| (k.packet.clone(), k.route)).collect())
        .await;
    let mut kept = Vec::new();
    for (k, m) in keeps.iter().zip(ids) {
        match (k.id, m) {
            (Some(id), m) => kept.push((id, m)),
            (None, None) => tracing::warn!("could not store a packet held for another relay"),
            (None, Some(_)) => {}
        }
    }
    if kept.is_empty() {
        Vec::new()
    } else {
        vec![JobDone::Kept(kept)]
    }
}

fn relay_entry(r: &AddressRecord) -> Option<(PeerId, Vec<Multiaddr>, u64)> {
    let peer = RelayKey(r.relay_key().to_bytes()).to_peer()?;
    let addrs = r
        .contents()
        .addrs
        .iter()
        .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
        .collect();
    Some((peer, addrs, r.timestamp_ms()))
}

/// What [`learn`] found: the relays whose records were new or newer,
/// whether one of them was new to us, the changes among them (key,
/// encoded, [`News::Change`]; see [`super::announce`]), and what could not
/// be stored.
#[derive(Default)]
struct Learnt {
    relays: Vec<(PeerId, Vec<Multiaddr>, u64)>,
    new_relay: bool,
    news: Vec<([u8; 32], Bytes, News)>,
    /// Good records the store did not take (it failed, or the book is full).
    unstored: Vec<Bytes>,
    topology: Vec<(PeerId, super::transit::Node)>,
}

/// Checks the records of several `Learn` jobs and stores the good ones in
/// one transaction; what each job's records came to, in order.
async fn learn(core: &Core, groups: &[&[Bytes]], me: [u8; 32]) -> Vec<Learnt> {
    let m = &core.metrics.federation;
    let now = now_ms();
    let total: usize = groups.iter().map(|g| g.len()).sum();
    let mut good = Vec::with_capacity(total);
    // (job, encoded) for each good record.
    let mut encoded = Vec::with_capacity(total);
    for (g, records) in groups.iter().enumerate() {
        for bytes in records.iter() {
            match AddressRecord::accept(bytes, now) {
                Ok(r) if r.relay_key().to_bytes() == me => {}
                Ok(r) => {
                    good.push(r);
                    encoded.push((g, bytes.clone()));
                }
                Err(e) => m.reject_record(e.kind()),
            }
        }
    }
    let mut out: Vec<Learnt> = groups.iter().map(|_| Learnt::default()).collect();
    if good.is_empty() {
        return out;
    }
    let outcomes = match core
        .store
        .address_book()
        .upsert_many(good.clone(), now)
        .await
    {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "storing address records");
            for (g, bytes) in encoded {
                out[g].unstored.push(bytes);
            }
            return out;
        }
    };
    for ((r, outcome), (g, bytes)) in good.iter().zip(outcomes).zip(encoded) {
        let l = &mut out[g];
        match outcome {
            Ok(u @ (Upsert::Inserted | Upsert::Replaced)) => {
                m.records_learned.fetch_add(1, Relaxed);
                l.relays.extend(relay_entry(r));
                if let Some(p) = RelayKey(r.relay_key().to_bytes()).to_peer() {
                    l.topology.push((p, super::transit::Node::of(r)));
                }
                l.new_relay |= u == Upsert::Inserted;
                if u == Upsert::Replaced {
                    l.news.push((r.relay_key().to_bytes(), bytes, News::Change));
                }
            }
            Ok(Upsert::Unchanged) => {}
            Err(_) => {
                m.reject_record("book_full");
                l.unstored.push(bytes);
            }
        }
    }
    out
}

/// One `Learn` job's records and where they came from.
type LearnJob = (
    Vec<Bytes>,
    Option<(libp2p::gossipsub::MessageId, PeerId)>,
    Option<PeerId>,
);

/// Learns several jobs' records in one store transaction and reports on
/// each job.
async fn learn_jobs(core: &Core, jobs: Vec<LearnJob>, me: [u8; 32]) -> Vec<JobDone> {
    let groups: Vec<&[Bytes]> = jobs.iter().map(|(r, _, _)| r.as_slice()).collect();
    let learnt = learn(core, &groups, me).await;
    jobs.into_iter()
        .zip(learnt)
        .map(|((_, gossip, from), l)| {
            let Learnt {
                relays,
                new_relay,
                news,
                unstored,
                topology,
            } = l;
            let gossip = gossip.map(|(id, source)| {
                let acceptance = if relays.is_empty() {
                    MessageAcceptance::Ignore
                } else {
                    MessageAcceptance::Accept
                };
                (id, source, acceptance)
            });
            JobDone::Learned {
                relays,
                gossip,
                new_relay,
                news,
                from,
                unstored,
                topology,
            }
        })
        .collect()
}

async fn run(core: &Core, job: Job, me: [u8; 32]) -> Vec<JobDone> {
    let book = core.store.address_book();
    match job {
        Job::Store { .. } => Vec::new(),
        Job::Delete(ids) => {
            core.delivered(ids).await;
            Vec::new()
        }
        Job::KeepCopy(keeps) => keep(core, keeps).await,
        Job::Forget(ids) => {
            if let Err(e) = core.store.mailbox().forget_federated(ids).await {
                tracing::warn!(error = %e, "forgetting federated ids");
            }
            Vec::new()
        }
        Job::StoreOwnRecord(r) => {
            if let Err(e) = book.upsert_own(&r, now_ms()).await {
                tracing::warn!(error = %e, "storing our own address record");
            }
            Vec::new()
        }
        Job::MarkConnected(keys) => {
            let keys: Vec<[u8; 32]> = keys.iter().map(|k| *k.bytes()).collect();
            if let Err(e) = book.mark_connected(keys, now_ms()).await {
                tracing::debug!(error = %e, "marking a relay connected");
            }
            Vec::new()
        }
        Job::Learn {
            records,
            gossip,
            from,
        } => learn_jobs(core, vec![(records, gossip, from)], me).await,
        Job::LoadHeld { limit } => match book.digest(None, limit).await {
            Ok(entries) => vec![JobDone::Held(Some(entries))],
            Err(e) => {
                tracing::warn!(error = %e, "reading the address book");
                vec![JobDone::Held(None)]
            }
        },
        Job::ServeDigest {
            peer,
            req,
            after,
            limit,
        } => {
            let limit = u32::from(limit);
            match book.digest(after, limit + 1).await {
                Ok(mut entries) => {
                    let more = entries.len() > limit as usize;
                    entries.truncate(limit as usize);
                    vec![JobDone::Send {
                        peer,
                        frames: vec![Frame::Digest { req, more, entries }],
                    }]
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the address book");
                    vec![JobDone::ServeDone(peer)]
                }
            }
        }
        Job::CompareDigest {
            peer,
            more,
            entries,
        } => {
            let keys: Vec<[u8; 32]> = entries.iter().map(|(k, _)| *k).collect();
            let Ok(ours) = book.timestamps(&keys).await else {
                return Vec::new();
            };
            let want = entries
                .iter()
                .filter(|(k, ts)| *k != me && ours.get(k).is_none_or(|o| o < ts))
                .map(|(k, _)| *k)
                .collect();
            let next_after = if more {
                entries.last().map(|(k, _)| *k)
            } else {
                None
            };
            vec![JobDone::Compared {
                peer,
                want,
                next_after,
            }]
        }
        Job::ServePull { peer, req, keys } => {
            let records: Vec<Bytes> = match book.encoded(&keys).await {
                Ok(r) => r.into_iter().map(Bytes::from).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "reading the address book");
                    Vec::new()
                }
            };
            let frames = records
                .chunks(MAX_RECORDS)
                .map(|c| Frame::Records {
                    req,
                    records: c.to_vec(),
                })
                .collect();
            vec![JobDone::Send { peer, frames }]
        }
        Job::ServeClaim {
            peer,
            req,
            namespace,
            identity,
        } => {
            let (status, body) = crate::device::directory::claim(core, &namespace, identity).await;
            vec![JobDone::Send {
                peer,
                frames: vec![Frame::ClaimReply { req, status, body }],
            }]
        }
        Job::LookupAddrs(peer) => {
            let record = match RelayKey::from_peer(&peer) {
                Some(k) => book.get(k.bytes()).await.ok().flatten(),
                None => None,
            };
            let addrs = record
                .as_ref()
                .and_then(relay_entry)
                .map(|(_, a, _)| a)
                .unwrap_or_default();
            let node = record.as_ref().map(super::transit::Node::of);
            vec![JobDone::Addrs { peer, addrs, node }]
        }
        Job::Discover { want_peers, cursor } => {
            if let Ok(n) = book.count().await {
                core.metrics.federation.records_known.store(n, Relaxed);
            }
            if !want_peers {
                return Vec::new();
            }
            // From a random point of the book, wrapping around.
            let mut page = book.page(Some(cursor), 64).await.unwrap_or_default();
            if page.len() < 64 {
                page.extend(
                    book.page(None, 64 - page.len() as u32)
                        .await
                        .unwrap_or_default(),
                );
            }
            let found = page
                .iter()
                .filter(|r| r.relay_key().to_bytes() != me)
                .filter_map(relay_entry)
                .collect();
            vec![JobDone::Discovered(found)]
        }
    }
}
