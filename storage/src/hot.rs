//! The mailbox's hot tier: an append-only log in front of SQLite.
//!
//! Most packets a relay stores are delivered and deleted within
//! milliseconds. Writing each into SQLite's B-trees (table and index, WAL
//! and checkpoint) only to delete it again is what bounds a relay's
//! throughput. So the writer appends new packets to this log instead — one
//! `write` per group commit (and `fdatasync` with power-loss durability),
//! which makes them exactly as durable as a committed SQLite row — and keeps
//! them in memory. A delivered packet is a tombstone record in the log.
//! Every `hot_spill_ms` (default 500 ms), whatever is still undelivered is
//! inserted into SQLite (same ids) in the group's transaction; after that
//! commit the log is truncated to zero.
//!
//! At open, a log left by a crash is replayed: its live packets go into
//! SQLite (`INSERT OR IGNORE`, so a crash between a spill's commit and the
//! truncation repeats nothing), then the log is truncated.
//!
//! ```text
//! record   = length (u32 BE, of what follows) ‖ kind (u8) ‖ id (i64 BE) ‖ body
//!            ‖ checksum (CRC-32 of kind ‖ id ‖ body: catches torn writes,
//!              not tampering — the log is as trusted as the database)
//! kind 1   packet: dest (8) ‖ received ms (u64) ‖ expires ms (u64) ‖ packet
//! kind 2   tombstone (empty body)
//! kind 3   packet with extras: flags (u8) ‖ [federated id (16) ‖ remembered
//!          until ms (u64), if flags & 1] ‖ [route: home relay key (32), if
//!          flags & 2] ‖ then as kind 1
//! kind 4   federated id (16) ‖ remembered until ms (u64): a packet that was
//!          delivered before it was ever logged (see below)
//! ```
//!
//! **Unlogged packets.** A packet another relay sent us is that relay's
//! until we acknowledge it: it holds it and sends it again if no ack
//! comes. Such a packet, for a recipient connected here, is added
//! *unlogged* (`add_unlogged`): in memory, visible to readers, not yet in
//! the log. If it is delivered (deleted) first, it is never written: only
//! its federated id is, as a kind-4 record. Otherwise it is logged by the
//! first group after `unlogged_for` (a duplicate of it arriving, a forced
//! spill, or a shutdown log it at once). The caller learns through the
//! packet's [`Settle`] when each of its packets is logged or delivered,
//! and only then acknowledges it: a crash before that loses nothing the
//! sender was told is stored.
//! A federated id in a kind-3 record counts even when its packet was
//! deleted since: the id must be remembered (see `fed_seen`) until the
//! spill that moves it into SQLite.
//! Replay stops at the first short or damaged record (a torn tail).

use crate::mailbox::{MailboxId, StoredPacket};
use meshwhisper_crypto::destination::DestHash;
use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The log file, beside the database.
pub(crate) const LOG_SUFFIX: &str = "-hot.log";

const PACKET: u8 = 1;
const TOMBSTONE: u8 = 2;
const PACKET_EXTRA: u8 = 3;
const FED_ID: u8 = 4;

/// Tells an enqueue's caller when every unlogged packet of it is logged
/// or delivered (and the enqueue itself committed): one count per packet
/// and one for the commit; a dropped `Settle` (a failed group) reads as an
/// error on the caller's side.
#[derive(Debug)]
pub(crate) struct Settle {
    left: std::sync::atomic::AtomicUsize,
    tx: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Settle {
    /// Waiting for the enqueue's commit.
    pub(crate) fn new(tx: tokio::sync::oneshot::Sender<()>) -> Arc<Self> {
        Arc::new(Self {
            left: std::sync::atomic::AtomicUsize::new(1),
            tx: Mutex::new(Some(tx)),
        })
    }

    /// One more packet to wait for.
    fn more(&self) {
        self.left.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// One packet (or the commit) is done.
    pub(crate) fn done(&self) {
        if self.left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            let tx = match self.tx.lock() {
                Ok(mut g) => g.take(),
                Err(p) => p.into_inner().take(),
            };
            if let Some(tx) = tx {
                let _ = tx.send(());
            }
        }
    }
}

/// A packet held unlogged.
#[derive(Debug)]
struct Unlogged {
    fed: Option<(crate::fed_seen::FedId, u64)>,
    settle: Arc<Settle>,
    at: std::time::Instant,
}

/// A packet held in the hot tier.
#[derive(Debug, Clone)]
pub(crate) struct HotRow {
    pub(crate) dest: [u8; 8],
    /// Shared with the writer's op and the spill (no copies).
    pub(crate) packet: bytes::Bytes,
    pub(crate) received_ms: u64,
    pub(crate) expires_ms: u64,
    /// The home relay the sender named (kept across restarts).
    pub(crate) route: Option<[u8; 32]>,
    /// When it entered the tier (not logged: a recovered row is old).
    pub(crate) at: Option<std::time::Instant>,
}

/// Writes a packet record: kind 1, or kind 3 with a route or federated id.
fn encode_packet(
    buf: &mut Vec<u8>,
    id: i64,
    row: &HotRow,
    fed: Option<(crate::fed_seen::FedId, u64)>,
) {
    let received = row.received_ms.to_be_bytes();
    let expires = row.expires_ms.to_be_bytes();
    if row.route.is_none() && fed.is_none() {
        encode(
            buf,
            PACKET,
            id,
            &[&row.dest, &received, &expires, &row.packet],
        );
        return;
    }
    let flags = [u8::from(fed.is_some()) | (u8::from(row.route.is_some()) << 1)];
    let (fid, fexp) = fed.map_or(([0u8; 16], [0u8; 8]), |(i, e)| (i, e.to_be_bytes()));
    let empty: &[u8] = &[];
    let route = row.route.as_ref().map_or(empty, |r| r.as_slice());
    let (fid, fexp): (&[u8], &[u8]) = if fed.is_some() {
        (&fid, &fexp)
    } else {
        (empty, empty)
    };
    encode(
        buf,
        PACKET_EXTRA,
        id,
        &[
            &flags,
            fid,
            fexp,
            route,
            &row.dest,
            &received,
            &expires,
            &row.packet,
        ],
    );
}

/// The hot packets, shared with readers (who merge them into `pending`).
#[derive(Debug, Default)]
pub(crate) struct HotRows {
    by_id: BTreeMap<i64, HotRow>,
    per_dest: HashMap<[u8; 8], u32>,
    bytes: usize,
}

impl HotRows {
    fn insert(&mut self, id: i64, row: HotRow) {
        *self.per_dest.entry(row.dest).or_insert(0) += 1;
        self.bytes += row.packet.len();
        self.by_id.insert(id, row);
    }

    fn remove(&mut self, id: i64) -> Option<HotRow> {
        let row = self.by_id.remove(&id)?;
        self.bytes = self.bytes.saturating_sub(row.packet.len());
        if let Some(c) = self.per_dest.get_mut(&row.dest) {
            *c = c.saturating_sub(1);
            if *c == 0 {
                self.per_dest.remove(&row.dest);
            }
        }
        Some(row)
    }

    /// Hot packets of `dest`.
    pub(crate) fn count_for(&self, dest: &[u8; 8]) -> u32 {
        self.per_dest.get(dest).copied().unwrap_or(0)
    }

    /// All hot packets.
    pub(crate) fn count(&self) -> u64 {
        self.by_id.len() as u64
    }

    /// Ids and sizes of up to `limit` unexpired packets for `dests` that
    /// `skip` does not exclude, oldest first.
    pub(crate) fn pending_ids(
        &self,
        dests: &[DestHash],
        after: i64,
        now_ms: u64,
        limit: usize,
        skip: &dyn Fn(i64) -> bool,
    ) -> Vec<(i64, usize)> {
        let wanted: std::collections::HashSet<[u8; 8]> = dests
            .iter()
            .map(|d| d.0)
            .filter(|d| self.per_dest.contains_key(d))
            .collect();
        if wanted.is_empty() {
            return Vec::new();
        }
        self.by_id
            .range(after.saturating_add(1)..)
            .filter(|(id, r)| r.expires_ms > now_ms && wanted.contains(&r.dest) && !skip(**id))
            .take(limit)
            .map(|(id, r)| (*id, r.packet.len()))
            .collect()
    }

    /// Up to `limit` unexpired packets with ids above `after`, in id order.
    pub(crate) fn page(&self, after: i64, now_ms: u64, limit: usize) -> Vec<StoredPacket> {
        self.by_id
            .range(after.saturating_add(1)..)
            .filter(|(_, r)| r.expires_ms > now_ms)
            .take(limit)
            .filter_map(|(id, _)| self.get(*id))
            .collect()
    }

    /// One hot packet, if it is still here.
    pub(crate) fn get(&self, id: i64) -> Option<StoredPacket> {
        self.by_id.get(&id).map(|r| StoredPacket {
            id: MailboxId(id),
            dest: DestHash(r.dest),
            packet: r.packet.to_vec(),
            received_ms: r.received_ms,
            expires_ms: r.expires_ms,
            route: r.route,
        })
    }

    fn oldest_of(&self, dest: &[u8; 8]) -> Option<i64> {
        self.by_id
            .iter()
            .find(|(_, r)| r.dest == *dest)
            .map(|(id, _)| *id)
    }
}

/// What a log left by an earlier run holds.
pub(crate) struct Recovered {
    /// Packets not delivered, in id order.
    pub(crate) live: Vec<(i64, HotRow)>,
    /// The highest id any record names.
    pub(crate) max_id: i64,
    /// Federated ids of the packets it stored (delivered ones too).
    pub(crate) fed_ids: Vec<(crate::fed_seen::FedId, u64)>,
}

/// Federated ids of unlogged packets a failed group touched.
#[derive(Debug, Default)]
pub(crate) struct RolledBack {
    /// Their packets are unlogged again.
    pub(crate) unlogged_again: Vec<crate::fed_seen::FedId>,
    /// Their packets are gone (added unlogged by the failed group).
    pub(crate) gone: Vec<crate::fed_seen::FedId>,
    /// Logged packets the failed group added are gone too: their ids must
    /// not answer a resend as stored.
    pub(crate) gone_logged: Vec<crate::fed_seen::FedId>,
}

/// The writer's side of the hot tier.
pub(crate) struct HotLog {
    file: std::fs::File,
    path: PathBuf,
    sync: bool,
    buf: Vec<u8>,
    pub(crate) rows: Arc<Mutex<HotRows>>,
    pub(crate) next_id: i64,
    /// Changes of the group in progress, undone if it fails.
    added: Vec<i64>,
    /// Federated ids of the packets it added (logged ones).
    added_fed: Vec<crate::fed_seen::FedId>,
    removed: Vec<(i64, HotRow)>,
    /// Rows the group moved into SQLite (dropped from memory after commit).
    spilled: Vec<i64>,
    pub(crate) spill_every: std::time::Duration,
    pub(crate) last_spill: std::time::Instant,
    force: bool,
    spill_ran: bool,
    /// The last spill stopped at its step: spill again with the next group.
    more_due: bool,
    /// Bytes in the log file now (rewritten when mostly dead).
    log_len: usize,
    /// Packets held in memory only, by id (oldest first).
    unlogged: BTreeMap<i64, Unlogged>,
    /// How long a packet may stay unlogged.
    pub(crate) unlogged_for: std::time::Duration,
    /// Packets the group logged or delivered (settled at its commit), and
    /// the state to restore if it fails: (id, its unlogged entry, its row
    /// if the group removed it).
    settling: Vec<(i64, Unlogged, Option<HotRow>)>,
}

/// Packet bytes one group moves into SQLite (unless everything must go):
/// a spill never holds the writer for long.
const SPILL_STEP_BYTES: usize = 2 * 1024 * 1024;
/// Rows one group moves into SQLite (unless everything must go).
const SPILL_STEP_ROWS: usize = 16_384;
/// The log is rewritten once it holds this much more than twice its live
/// packets (spilled and delivered ones are dead weight until then).
const COMPACT_SLACK: usize = 8 * 1024 * 1024;

/// A log this long makes the next group spill (and so compact the log)
/// before the schedule: a relay moving hundreds of thousands of packets a
/// second appends hundreds of MB in one period, and the pages of that much
/// log are expensive to free all at once.
const LOG_SPILL_BYTES: usize = 64 * 1024 * 1024;
/// A log at least this long is emptied by replacing the file (its pages are
/// freed on another thread) rather than truncated in place.
const REPLACE_BYTES: usize = 1024 * 1024;

/// Hot packets held before a spill is forced regardless of the schedule.
const MAX_ROWS: usize = 65_536;
/// Packet bytes held before a spill is forced regardless of the schedule
/// (large packets arriving fast spill often; small ones rarely reach it).
const MAX_BYTES: usize = 16 * 1024 * 1024;

/// Closes a replaced log file on a thread of its own: it is the file's
/// last handle (its name is gone), so closing it frees its page-cache
/// pages, tens of MB at high rates, which held the writer (and every
/// packet waiting for it) for tens of milliseconds.
fn drop_elsewhere(old: std::fs::File) {
    // When no thread can be started, the file is closed here.
    if let Err(e) = std::thread::Builder::new()
        .name("hot-log-close".into())
        .spawn(move || drop(old))
    {
        tracing::debug!(error = %e, "closed the old hot log on the writer's thread");
    }
}

fn checksum(kind: u8, id: i64, body: &[u8]) -> [u8; 4] {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(&id.to_be_bytes());
    h.update(body);
    h.finalize().to_be_bytes()
}

fn encode(buf: &mut Vec<u8>, kind: u8, id: i64, body: &[&[u8]]) {
    let body_len: usize = body.iter().map(|b| b.len()).sum();
    let len = 1 + 8 + body_len + 4;
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    let start = buf.len();
    buf.push(kind);
    buf.extend_from_slice(&id.to_be_bytes());
    for b in body {
        buf.extend_from_slice(b);
    }
    let sum = checksum(kind, id, &buf[start + 9..]);
    buf.extend_from_slice(&sum);
}

/// Live packets of a log, in id order. Stops at the first damaged record.
#[cfg(test)]
fn replay(bytes: &[u8]) -> Vec<(i64, HotRow)> {
    replay_all(bytes).live
}

/// Splits a packet body (kind 1 layout) into a row.
fn packet_body(body: &[u8], route: Option<[u8; 32]>) -> Option<HotRow> {
    if body.len() < 24 {
        return None;
    }
    let mut dest = [0u8; 8];
    dest.copy_from_slice(&body[..8]);
    let mut t = [0u8; 8];
    t.copy_from_slice(&body[8..16]);
    let received_ms = u64::from_be_bytes(t);
    t.copy_from_slice(&body[16..24]);
    Some(HotRow {
        dest,
        packet: bytes::Bytes::copy_from_slice(&body[24..]),
        received_ms,
        expires_ms: u64::from_be_bytes(t),
        route,
        at: None,
    })
}

/// A federated id and its remembered-until time (24 bytes) at the start
/// of `b`, if it is that long.
fn fed_id(b: &[u8]) -> Option<(crate::fed_seen::FedId, u64)> {
    let fid: crate::fed_seen::FedId = b.get(..16)?.try_into().ok()?;
    let until: [u8; 8] = b.get(16..24)?.try_into().ok()?;
    Some((fid, u64::from_be_bytes(until)))
}

/// Everything a log holds: live packets, the highest id any record names
/// (deleted ones too, so ids are never handed out twice across a
/// restart), and the federated ids of every packet it stored.
pub(crate) fn replay_all(bytes: &[u8]) -> Recovered {
    let mut max_id = 0i64;
    let mut fed_ids = Vec::new();
    let mut live: BTreeMap<i64, HotRow> = BTreeMap::new();
    let mut rest = bytes;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 1 + 8 + 4 || rest.len() < 4 + len {
            break;
        }
        let rec = &rest[4..4 + len];
        rest = &rest[4 + len..];
        let kind = rec[0];
        let mut idb = [0u8; 8];
        idb.copy_from_slice(&rec[1..9]);
        let id = i64::from_be_bytes(idb);
        let body = &rec[9..len - 4];
        if checksum(kind, id, body) != rec[len - 4..] {
            break;
        }
        max_id = max_id.max(id);
        match kind {
            PACKET => match packet_body(body, None) {
                Some(row) => {
                    live.insert(id, row);
                }
                None => break,
            },
            PACKET_EXTRA if !body.is_empty() => {
                let flags = body[0];
                let mut rest = &body[1..];
                if flags & 1 != 0 {
                    let Some(fed) = fed_id(rest) else {
                        break;
                    };
                    fed_ids.push(fed);
                    rest = &rest[24..];
                }
                let mut route = None;
                if flags & 2 != 0 {
                    if rest.len() < 32 {
                        break;
                    }
                    let mut r = [0u8; 32];
                    r.copy_from_slice(&rest[..32]);
                    route = Some(r);
                    rest = &rest[32..];
                }
                match packet_body(rest, route) {
                    Some(row) => {
                        live.insert(id, row);
                    }
                    None => break,
                }
            }
            TOMBSTONE => {
                live.remove(&id);
            }
            FED_ID => match fed_id(body) {
                Some(fed) => fed_ids.push(fed),
                None => break,
            },
            _ => break,
        }
    }
    Recovered {
        live: live.into_iter().collect(),
        max_id,
        fed_ids,
    }
}

/// The log path for a database file.
pub(crate) fn log_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(LOG_SUFFIX);
    PathBuf::from(s)
}

impl HotLog {
    /// Opens (creating) the log; returns it and the live packets a crash
    /// left in it, which the caller moves into SQLite before calling
    /// [`HotLog::truncate`].
    pub(crate) fn open(
        path: PathBuf,
        sync: bool,
        spill_every: std::time::Duration,
    ) -> std::io::Result<(Self, Recovered)> {
        let old = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let recovered = replay_all(&old);
        // A rewrite interrupted before its rename: the old log is complete.
        let mut next = path.clone().into_os_string();
        next.push(".next");
        let _ = std::fs::remove_file(PathBuf::from(next));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        Ok((
            Self {
                file,
                path,
                sync,
                buf: Vec::new(),
                rows: Arc::new(Mutex::new(HotRows::default())),
                next_id: 1,
                added: Vec::new(),
                added_fed: Vec::new(),
                removed: Vec::new(),
                spilled: Vec::new(),
                spill_every,
                last_spill: std::time::Instant::now(),
                force: false,
                spill_ran: false,
                more_due: false,
                log_len: old.len(),
                unlogged: BTreeMap::new(),
                unlogged_for: std::time::Duration::from_millis(50),
                settling: Vec::new(),
            },
            recovered,
        ))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, HotRows> {
        match self.rows.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Adds a packet (logged at the group's flush), with the federated id
    /// it was stored under, if any.
    pub(crate) fn add(&mut self, row: HotRow, fed: Option<(crate::fed_seen::FedId, u64)>) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        encode_packet(&mut self.buf, id, &row, fed);
        self.rows().insert(id, row);
        self.added.push(id);
        if let Some((fid, _)) = fed {
            self.added_fed.push(fid);
        }
        id
    }

    /// Adds a packet another relay holds until it is acknowledged, for a
    /// recipient connected here: in memory only until it is delivered or
    /// `unlogged_for` passes (see the module's notes). `settle` hears when.
    pub(crate) fn add_unlogged(
        &mut self,
        row: HotRow,
        fed: Option<(crate::fed_seen::FedId, u64)>,
        settle: &Arc<Settle>,
    ) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        settle.more();
        self.unlogged.insert(
            id,
            Unlogged {
                fed,
                settle: settle.clone(),
                at: std::time::Instant::now(),
            },
        );
        self.rows().insert(id, row);
        self.added.push(id);
        id
    }

    /// Removes a hot packet; `Some(dest)` if it was hot. An unlogged one
    /// leaves only its federated id in the log (`fed` gets it).
    pub(crate) fn remove(
        &mut self,
        id: i64,
        fed: &mut Vec<crate::fed_seen::FedId>,
    ) -> Option<[u8; 8]> {
        let row = self.rows().remove(id)?;
        let dest = row.dest;
        if let Some(u) = self.unlogged.remove(&id) {
            if let Some((fid, until)) = u.fed {
                encode(&mut self.buf, FED_ID, id, &[&fid, &until.to_be_bytes()]);
                fed.push(fid);
            }
            self.settling.push((id, u, Some(row)));
            return Some(dest);
        }
        encode(&mut self.buf, TOMBSTONE, id, &[]);
        self.removed.push((id, row));
        Some(dest)
    }

    /// Logs the unlogged packets held `unlogged_for` (all of them when a
    /// spill is forced, and `also`, if it is one); their federated ids go
    /// to `fed`.
    pub(crate) fn log_due(&mut self, also: Option<i64>, fed: &mut Vec<crate::fed_seen::FedId>) {
        if self.unlogged.is_empty() {
            return;
        }
        let every = self.unlogged_for;
        let force = self.force;
        let due: Vec<i64> = self
            .unlogged
            .iter()
            .take_while(|(_, u)| force || u.at.elapsed() >= every)
            .map(|(id, _)| *id)
            .chain(also.filter(|id| self.unlogged.contains_key(id)))
            .collect();
        for id in due {
            let Some(u) = self.unlogged.remove(&id) else {
                continue;
            };
            let row = self.rows().by_id.get(&id).cloned();
            if let Some(row) = &row {
                encode_packet(&mut self.buf, id, row, u.fed);
            }
            if let Some((fid, _)) = u.fed {
                fed.push(fid);
            }
            self.settling.push((id, u, None));
        }
    }

    /// The unlogged packet of federated id `fid`, if one is.
    pub(crate) fn unlogged_of(&self, fid: &crate::fed_seen::FedId) -> Option<i64> {
        self.unlogged
            .iter()
            .find(|(_, u)| u.fed.is_some_and(|(f, _)| f == *fid))
            .map(|(id, _)| *id)
    }

    /// When the oldest unlogged packet is due to be logged.
    pub(crate) fn next_log_due(&self) -> Option<std::time::Instant> {
        self.unlogged
            .values()
            .next()
            .map(|u| u.at + self.unlogged_for)
    }

    /// The oldest hot packet of `dest`.
    pub(crate) fn oldest_of(&self, dest: &[u8; 8]) -> Option<i64> {
        self.rows().oldest_of(dest)
    }

    pub(crate) fn count_for(&self, dest: &[u8; 8]) -> u32 {
        self.rows().count_for(dest)
    }

    /// Up to `max` hot packets expired at `now_ms`: (id, dest).
    pub(crate) fn expired(&self, now_ms: u64, max: usize) -> Vec<(i64, [u8; 8])> {
        self.rows()
            .by_id
            .iter()
            .filter(|(_, r)| r.expires_ms <= now_ms)
            .take(max)
            .map(|(id, r)| (*id, r.dest))
            .collect()
    }

    /// The hot packets that stayed a whole period (the oldest first, when
    /// the tier holds too much), for a spill into SQLite inside the group:
    /// at most a step's worth ([`SPILL_STEP_BYTES`], [`SPILL_STEP_ROWS`]),
    /// the rest with the next groups; everything when forced. The younger
    /// ones are usually delivered within milliseconds and stay hot. After
    /// the commit the spilled ones are tombstoned in the log.
    ///
    /// A tier over its bounds ([`MAX_ROWS`], [`MAX_BYTES`]) spills down to
    /// a step below them, however much that is: packets for
    /// clients that are away can arrive faster than a step a group moves,
    /// and the tier (memory, and the log) must not grow with them.
    pub(crate) fn take_for_spill(&mut self) -> Vec<(i64, HotRow)> {
        let every = self.spill_every;
        let over = self.over_bounds();
        let force = self.force;
        let rows = self.rows();
        // Over the bounds: down to a step below them.
        let (over_rows, over_bytes) = if over {
            (
                rows.by_id.len().saturating_sub(MAX_ROWS - SPILL_STEP_ROWS),
                rows.bytes.saturating_sub(MAX_BYTES - SPILL_STEP_BYTES),
            )
        } else {
            (0, 0)
        };
        let mut out: Vec<(i64, HotRow)> = Vec::new();
        let mut bytes = 0usize;
        let mut more = false;
        for (id, r) in rows.by_id.iter() {
            if !(force || over || r.at.is_none_or(|t| t.elapsed() >= every)) {
                continue;
            }
            // Unlogged packets are logged first (by the group's start, or
            // soon): their ids must not reach the table before them.
            if self.unlogged.contains_key(id) {
                continue;
            }
            let back_in_bounds = out.len() >= over_rows && bytes >= over_bytes;
            if !force
                && back_in_bounds
                && (bytes >= SPILL_STEP_BYTES || out.len() >= SPILL_STEP_ROWS)
            {
                more = true;
                break;
            }
            bytes += r.packet.len();
            out.push((*id, r.clone()));
        }
        drop(rows);
        self.more_due = more;
        self.spilled.extend(out.iter().map(|(id, _)| *id));
        self.spill_ran = true;
        out
    }

    /// Whether a spill is due (on schedule, or the tier holds too much).
    pub(crate) fn spill_due(&self) -> bool {
        self.force
            || self.more_due
            || self.last_spill.elapsed() >= self.spill_every
            || self.log_len >= LOG_SPILL_BYTES
            || self.over_bounds()
    }

    fn over_bounds(&self) -> bool {
        let rows = self.rows();
        rows.by_id.len() >= MAX_ROWS || rows.bytes >= MAX_BYTES
    }

    /// Makes the next group spill everything.
    pub(crate) fn force_spill(&mut self) {
        self.force = true;
    }

    /// Writes the group's records; called before the group's COMMIT.
    pub(crate) fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.buf)?;
        if self.sync {
            self.file.sync_data()?;
        }
        self.log_len += self.buf.len();
        self.buf.clear();
        Ok(())
    }

    /// The group committed. The unlogged packets it settled are counted
    /// in `stats` (before their callers hear of it).
    pub(crate) fn committed(&mut self, stats: &crate::writer::WriterStats) {
        self.added.clear();
        self.added_fed.clear();
        self.removed.clear();
        let delivered = self.settling.iter().filter(|(_, _, r)| r.is_some()).count() as u64;
        let logged = self.settling.len() as u64 - delivered;
        stats
            .unlogged_delivered
            .fetch_add(delivered, std::sync::atomic::Ordering::Relaxed);
        stats
            .unlogged_logged
            .fetch_add(logged, std::sync::atomic::Ordering::Relaxed);
        for (_, u, _) in self.settling.drain(..) {
            u.settle.done();
        }
        if self.spill_ran {
            self.spill_ran = false;
            let spilled = std::mem::take(&mut self.spilled);
            let mut rows = self.rows();
            for id in &spilled {
                rows.remove(*id);
            }
            let (empty, live) = (rows.by_id.is_empty(), rows.bytes);
            drop(rows);
            self.last_spill = std::time::Instant::now();
            self.force = false;
            // The spilled rows are in SQLite now: tombstones keep a replay
            // from bringing them back (if this append is lost, the replay
            // inserts them OR IGNOREs them: nothing was deleted between).
            // The log is rewritten only once it is mostly dead weight.
            let result = if empty {
                self.truncate()
            } else if self.log_len > live.saturating_mul(2).saturating_add(COMPACT_SLACK) {
                let mut fresh = Vec::new();
                for (id, r) in self.rows().by_id.iter() {
                    // Unlogged packets stay out of the log until they are
                    // logged (a delivered one leaves no tombstone).
                    if !self.unlogged.contains_key(id) {
                        encode_packet(&mut fresh, *id, r, None);
                    }
                }
                self.replace_with(&fresh)
            } else {
                for id in &spilled {
                    encode(&mut self.buf, TOMBSTONE, *id, &[]);
                }
                self.flush()
            };
            if let Err(e) = result {
                // The old log still holds everything: recovery repeats
                // nothing (the spilled rows are inserted OR IGNOREd).
                tracing::warn!(error = %e, "could not update the hot log after a spill");
            }
        }
    }

    /// Replaces the log with `records` (the packets still hot).
    fn replace_with(&mut self, records: &[u8]) -> std::io::Result<()> {
        if records.is_empty() {
            return self.truncate();
        }
        self.replace_file(records)
    }

    /// Writes `records` to a new file, syncs it, renames it over the log
    /// and closes the old one elsewhere ([`drop_elsewhere`]).
    fn replace_file(&mut self, records: &[u8]) -> std::io::Result<()> {
        let mut next = self.path.clone().into_os_string();
        next.push(".next");
        let next = PathBuf::from(next);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&next)?;
        f.write_all(records)?;
        if self.sync {
            f.sync_data()?;
        }
        drop(f);
        self.log_len = records.len();
        std::fs::rename(&next, &self.path)?;
        if self.sync
            && let Some(dir) = self.path.parent().filter(|p| !p.as_os_str().is_empty())
        {
            // The rename itself must survive power loss, or appends to the
            // new file would be lost with it.
            std::fs::File::open(dir)?.sync_all()?;
        }
        let old = std::mem::replace(
            &mut self.file,
            std::fs::OpenOptions::new().append(true).open(&self.path)?,
        );
        drop_elsewhere(old);
        Ok(())
    }

    /// The group failed: undo its changes in memory (the log may hold
    /// records of it if the failure came after the flush; compensate).
    /// Returns what happened to federated ids of unlogged packets: those
    /// to count as unlogged again, and those whose packets are gone.
    pub(crate) fn rolled_back(&mut self) -> RolledBack {
        let added = std::mem::take(&mut self.added);
        let removed = std::mem::take(&mut self.removed);
        let gone_logged = std::mem::take(&mut self.added_fed);
        self.spilled.clear();
        self.spill_ran = false;
        let flushed = self.buf.is_empty();
        self.buf.clear();
        let mut undone = RolledBack {
            gone_logged,
            ..RolledBack::default()
        };
        for (id, u, row) in std::mem::take(&mut self.settling) {
            if flushed {
                // Its record is in the log: logged (or delivered) after all.
                u.settle.done();
                continue;
            }
            if let Some((fid, _)) = u.fed {
                undone.unlogged_again.push(fid);
            }
            if let Some(row) = row {
                self.rows().insert(id, row);
            }
            self.unlogged.insert(id, u);
        }
        for id in &added {
            if let Some(u) = self.unlogged.remove(id)
                && let Some((fid, _)) = u.fed
            {
                undone.gone.push(fid);
            }
        }
        let mut rows = self.rows();
        for id in &added {
            rows.remove(*id);
        }
        for (id, row) in &removed {
            rows.insert(*id, row.clone());
        }
        drop(rows);
        if flushed {
            for id in &added {
                encode(&mut self.buf, TOMBSTONE, *id, &[]);
            }
            for (id, row) in &removed {
                encode_packet(&mut self.buf, *id, row, None);
            }
            if let Err(e) = self.flush() {
                tracing::warn!(error = %e, "could not record a failed group in the hot log");
            }
        }
        undone
    }

    /// Empties the log (everything in it is in SQLite or gone).
    pub(crate) fn truncate(&mut self) -> std::io::Result<()> {
        if self.log_len >= REPLACE_BYTES {
            return self.replace_file(&[]);
        }
        self.file.set_len(0)?;
        self.log_len = 0;
        if self.sync {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unlogged packet is not written by a compaction of the log (it
    /// would come back after a crash once delivered, with no tombstone),
    /// and once delivered only its id is in the log; the enqueue settles
    /// at the commit after that.
    #[test]
    fn an_unlogged_packet_stays_out_of_a_rewritten_log() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("x-hot.log");
        let (mut log, _) =
            HotLog::open(path.clone(), false, std::time::Duration::from_secs(3600)).expect("open");
        log.unlogged_for = std::time::Duration::from_secs(3600);
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let settle = Settle::new(tx);
        let secret = HotRow {
            packet: bytes::Bytes::from(vec![0xEE; 64]),
            ..row(Some(std::time::Instant::now()))
        };
        let held = log.add_unlogged(secret, Some(([9; 16], 5)), &settle);
        settle.done(); // the enqueue's commit
        log.committed(&crate::writer::WriterStats::default());
        // Enough delivered packets to make the spill rewrite the log.
        let big = HotRow {
            packet: bytes::Bytes::from(vec![7u8; 1024 * 1024]),
            ..row(Some(std::time::Instant::now()))
        };
        while log.log_len < LOG_SPILL_BYTES {
            let id = log.add(big.clone(), None);
            log.flush().expect("flush");
            log.remove(id, &mut Vec::new());
        }
        let _ = log.take_for_spill();
        log.flush().expect("flush");
        log.committed(&crate::writer::WriterStats::default());
        let bytes = std::fs::read(&path).expect("read");
        assert!(
            !bytes.windows(64).any(|w| w == [0xEE; 64]),
            "written unlogged"
        );
        assert!(rx.try_recv().is_err(), "settled before delivery");
        let mut fed = Vec::new();
        assert!(log.remove(held, &mut fed).is_some());
        assert_eq!(fed, vec![[9; 16]]);
        log.flush().expect("flush");
        log.committed(&crate::writer::WriterStats::default());
        assert!(rx.try_recv().is_ok(), "settled once delivered");
        let rec = replay_all(&std::fs::read(&path).expect("read"));
        assert!(rec.live.is_empty());
        assert!(rec.fed_ids.contains(&([9; 16], 5)));
        assert!(rec.max_id >= held);
    }

    /// A failed group gives back the federated ids of the packets it
    /// added (logged or not) and of the unlogged ones it logged or
    /// delivered, and puts those back as they were.
    #[test]
    fn a_failed_group_gives_back_its_federated_ids() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut log, _) = HotLog::open(
            dir.path().join("x-hot.log"),
            false,
            std::time::Duration::from_secs(3600),
        )
        .expect("open");
        log.unlogged_for = std::time::Duration::from_secs(3600);
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let settle = Settle::new(tx);
        let earlier = log.add_unlogged(row(None), Some(([1; 16], 5)), &settle);
        log.committed(&crate::writer::WriterStats::default());
        // The failing group: adds one of each kind, delivers the earlier one.
        log.add(row(None), Some(([2; 16], 5)));
        log.add_unlogged(row(None), Some(([3; 16], 5)), &settle);
        let mut fed = Vec::new();
        log.remove(earlier, &mut fed);
        assert_eq!(fed, vec![[1; 16]]);
        let undone = log.rolled_back();
        assert_eq!(undone.gone_logged, vec![[2; 16]]);
        assert_eq!(undone.gone, vec![[3; 16]]);
        assert_eq!(undone.unlogged_again, vec![[1; 16]]);
        assert_eq!(
            log.unlogged_of(&[1; 16]),
            Some(earlier),
            "held unlogged again"
        );
        assert_eq!(log.rows().count(), 1);
    }

    fn row(at: Option<std::time::Instant>) -> HotRow {
        HotRow {
            dest: [1; 8],
            packet: bytes::Bytes::from_static(b"pkt"),
            received_ms: 1,
            expires_ms: u64::MAX,
            route: None,
            at,
        }
    }

    #[test]
    fn a_partial_spill_tombstones_what_went_to_sqlite() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("x-hot.log");
        let (mut log, _) =
            HotLog::open(path.clone(), false, std::time::Duration::from_secs(3600)).expect("open");
        // One old packet (due for a spill), one that just arrived.
        let old = log.add(row(None), None);
        let young = log.add(row(Some(std::time::Instant::now())), None);
        log.flush().expect("flush");
        let spilled = log.take_for_spill();
        assert_eq!(
            spilled.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![old]
        );
        log.committed(&crate::writer::WriterStats::default());
        // A restart replays only the packet still hot: the spilled one is
        // SQLite's now (and may be delivered and deleted there).
        let live = replay(&std::fs::read(&path).expect("read"));
        assert_eq!(
            live.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![young]
        );
        // Once nothing is hot, the log is emptied.
        log.force_spill();
        assert_eq!(log.take_for_spill().len(), 1);
        log.committed(&crate::writer::WriterStats::default());
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 0);
    }

    /// Packets for clients that are away, arriving faster than a step a
    /// group: a tier over its bounds spills everything over them (and a
    /// step) in one go, so its memory stays bounded.
    #[test]
    fn a_tier_over_its_bounds_spills_back_under_them() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("x-hot.log");
        let (mut log, _) =
            HotLog::open(path.clone(), false, std::time::Duration::from_secs(3600)).expect("open");
        log.last_spill = std::time::Instant::now();
        let kib = HotRow {
            packet: bytes::Bytes::from(vec![7u8; 1024]),
            ..row(Some(std::time::Instant::now()))
        };
        // Three times the byte bound, all young.
        for _ in 0..3 * MAX_BYTES / 1024 {
            log.add(kib.clone(), None);
        }
        log.flush().expect("flush");
        assert!(log.spill_due());
        let spilled = log.take_for_spill();
        assert!(
            spilled.len() * 1024 >= 2 * MAX_BYTES + SPILL_STEP_BYTES,
            "spilled {} KiB",
            spilled.len()
        );
        log.committed(&crate::writer::WriterStats::default());
        assert!(!log.over_bounds(), "back under the bounds");
        // And the log was rewritten with what is still hot.
        assert!(log.log_len < MAX_BYTES, "log {} bytes", log.log_len);
        // The oldest went.
        let first_left = log.rows().by_id.keys().next().copied().expect("some left");
        assert!(spilled.iter().all(|(id, _)| *id < first_left));
    }

    /// A fast relay's log grows by hundreds of MB a period: past
    /// `LOG_SPILL_BYTES` a spill is due before the schedule, and a long
    /// log is emptied by replacing the file, keeping what is still hot.
    #[test]
    fn a_long_log_spills_early_and_is_replaced() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("x-hot.log");
        let (mut log, _) =
            HotLog::open(path.clone(), false, std::time::Duration::from_secs(3600)).expect("open");
        log.last_spill = std::time::Instant::now();
        let young = log.add(row(Some(std::time::Instant::now())), None);
        let big = HotRow {
            packet: bytes::Bytes::from(vec![7u8; 1024 * 1024]),
            ..row(Some(std::time::Instant::now()))
        };
        let mut delivered = Vec::new();
        while log.log_len < LOG_SPILL_BYTES {
            assert!(!log.spill_due(), "not due at {} bytes", log.log_len);
            delivered.push(log.add(big.clone(), None));
            log.flush().expect("flush");
            for id in delivered.drain(..) {
                log.remove(id, &mut Vec::new());
            }
        }
        assert!(log.spill_due(), "due once the log is long");
        assert!(log.take_for_spill().is_empty(), "nothing old enough");
        log.flush().expect("flush");
        log.committed(&crate::writer::WriterStats::default());
        // Rewritten with the one packet still hot.
        let live = replay(&std::fs::read(&path).expect("read"));
        assert_eq!(
            live.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![young]
        );
        assert!(log.log_len < REPLACE_BYTES);
        assert!(!log.spill_due());
    }

    #[test]
    fn replay_keeps_live_packets_and_stops_at_a_torn_tail() {
        let mut buf = Vec::new();
        for id in 1..=3 {
            encode(
                &mut buf,
                PACKET,
                id,
                &[
                    &[id as u8; 8],
                    &1u64.to_be_bytes(),
                    &2u64.to_be_bytes(),
                    b"pkt",
                ],
            );
        }
        encode(&mut buf, TOMBSTONE, 2, &[]);
        let live = replay(&buf);
        assert_eq!(live.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(live[1].1.packet.as_ref(), b"pkt");
        assert_eq!(live[1].1.expires_ms, 2);
        // A torn or damaged tail: what came before is kept.
        let whole = buf.len();
        encode(
            &mut buf,
            PACKET,
            4,
            &[&[4; 8], &1u64.to_be_bytes(), &2u64.to_be_bytes(), b"x"],
        );
        assert_eq!(replay(&buf[..buf.len() - 1]).len(), 2);
        let mut bad = buf.clone();
        bad[whole + 20] ^= 1;
        assert_eq!(replay(&bad).len(), 2);
        assert_eq!(replay(&buf).len(), 3);
        assert!(replay(&[0xff; 7]).is_empty());
    }
}
