//! `meshwhisper bench abuse`: replays the attacks the relay was hardened
//! against, one after the other, against a relay process it starts itself,
//! and prints per attack whether the relay stayed within its memory budget
//! and kept serving a well-behaved client.
//!
//! - The relay is a child process (this binary, or `--relay-bin`) on a
//!   temporary data directory, loopback only, federation off, with a
//!   generated configuration (a few limits lowered so the run is short; see
//!   [`BENCH_CONFIG`]).
//! - A control client on 127.0.0.1 keeps two WebSockets: B registers a hash,
//!   A sends 200-byte packets to it one at a time; the round trip is the
//!   time until B has the packet. Measured without attack (the baseline)
//!   and during every attack.
//! - Attackers use other loopback addresses (Linux routes all of
//!   127.0.0.0/8 to `lo`; sockets are bound to 127.x.y.z before
//!   connecting), so per-address caps never touch the control client.
//! - The relay's VmRSS is sampled every 100 ms. Each attack has a memory
//!   budget: the RSS just before it, a fixed slack, and terms computed from
//!   the relay's settings and the attack's size (connections × a
//!   per-connection allowance, the queue bounds the attack can fill, the
//!   hot tier, table entries; printed with every result).
//! - An attack passes when the peak RSS stayed within its budget, the
//!   control client was served (p99 during the attack within
//!   `--p99-factor` × the baseline p99 or `--p99-floor-ms`, whichever is
//!   larger; no packet later than 2 s and no failed socket until it is
//!   back to normal, which it must be within `--recover-secs` of the
//!   attack's end) and the relay's specific defence held (the outcome
//!   column: connections closed, caps applied, quotas enforced).

use anyhow::Context as _;
use futures::{SinkExt as _, StreamExt as _};
use meshwhisper_crypto::destination::DestHash;
use meshwhisper_node::config::Config;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// What the bench changes in the relay's defaults, so that the run takes
/// minutes. Everything else is the relay's default.
const BENCH_CONFIG: &str = r#"log = "warn"

[limits]
# 64 MiB per address per day instead of 1 GiB: the disk-fill attack
# reaches the quota after five archives.
upload_bytes_per_ip_per_day = 67108864
# 5 s / 15 s instead of 30 s / 600 s: stalled uploads are closed sooner.
body_idle_timeout_secs = 5
body_timeout_secs = 15
# 20 000 (bucket, address) windows instead of 100 000: the rate-limit
# table fills with 20 000 addresses.
rate_limit_max_clients = 20000
# 12 000 WebSockets instead of 10 000: room for a 10 000-connection churn
# round beside the control client.
max_websockets = 12000
"#;

/// Memory allowances of the budget formula (see docs/benchmarks.md).
/// Fixed slack: allocator fragmentation, SQLite page caches, thread stacks.
const SLACK: u64 = 32 * MIB;
/// One open gateway connection that has not upgraded (hyper's buffers, the
/// task, the accept loop's bookkeeping): about twice the ~16 KiB measured
/// with 1 500 slowloris connections.
const TCP_CONN: u64 = 32 * KIB;
/// One WebSocket session (tungstenite's 16 KiB read and write buffers, the
/// session state, its live queue's bookkeeping): about twice the ~23-26 KiB
/// measured with 10 000 idle sessions.
const WS_CONN: u64 = 48 * KIB;
/// One request body being streamed to disk (hyper's read buffer, ~400 KiB
/// at most, and the chunk being written).
const UPLOAD: u64 = 512 * KIB;
/// One entry of an in-memory table (homed hashes: "about 100 bytes" in
/// docs/operations.md; rate-limit windows), doubled for hash-map growth.
const TABLE_ENTRY: u64 = 256;
/// Packets the mailbox's hot tier holds in memory before a spill is forced
/// (storage/src/hot.rs `MAX_BYTES`).
const HOT_TIER: u64 = 64 * MIB;
/// The relay's WebSocket write buffer cap (node/src/gateway/ws.rs:
/// `DELIVER_BYTES + 2 × max frame + 64 KiB`).
fn ws_write_max(cfg: &Config) -> u64 {
    let frame = cfg.storage.max_blob_size.max(cfg.limits.max_control_frame) as u64;
    256 * KIB + 2 * frame + 64 * KIB
}

/// Every attack, in the order they run.
const ATTACKS: [&str; 9] = [
    "slow-readers",
    "slowloris",
    "idle-flood",
    "ws-slots",
    "stalled-uploads",
    "rate-table",
    "homed",
    "disk-fill",
    "churn",
];

#[derive(Debug, clap::Args)]
pub struct AbuseBench {
    /// Run only these attacks (comma-separated): slow-readers, slowloris,
    /// idle-flood, ws-slots, stalled-uploads, rate-table, homed, disk-fill,
    /// churn.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The relay binary to start (default: this one). For comparing builds,
    /// e.g. allocators.
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Override a relay setting in the generated configuration, e.g.
    /// `--set limits.client_queue_bytes=65536` (repeatable; TOML values).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Slow readers: clients that register a hash on a second socket and
    /// never read it while their first socket sends 256 KiB packets to it.
    #[arg(long, default_value_t = 4)]
    slow_readers: usize,
    /// MiB each slow reader's sender sends (at most, within
    /// --slow-reader-secs).
    #[arg(long, default_value_t = 96)]
    slow_reader_mib: u64,
    /// The readers' second sockets: `stalled` (the attack: registered,
    /// never read), `reading` (registered and read: the same traffic to
    /// well-behaved recipients) or `offline` (no second socket: the
    /// packets wait in the store for recipients that are away).
    #[arg(long, default_value = "stalled")]
    slow_reader_mode: String,
    /// Packet size the slow readers' senders send, bytes (default: the
    /// relay's largest, `storage.max_blob_size`).
    #[arg(long)]
    slow_reader_packet: Option<usize>,
    /// Destination hashes each slow reader's sender spreads its packets
    /// over (the reader registers them all): with `offline`, many small
    /// packets to many hashes is the flood that must not grow the relay's
    /// memory (each hash keeps at most `storage.max_blobs_per_hash`).
    #[arg(long, default_value_t = 1)]
    slow_reader_hashes: usize,
    /// Slowloris connections (headers sent one line every 2 s), spread
    /// over addresses below the per-address cap.
    #[arg(long, default_value_t = 1500)]
    slowloris: usize,
    /// Idle TCP connections from one address (capped by the file
    /// descriptors this process has).
    #[arg(long, default_value_t = 20_000)]
    idle: usize,
    /// WebSocket upgrades attempted from one address.
    #[arg(long, default_value_t = 10_000)]
    ws_slots: usize,
    /// Stalled archive uploads (PUT /archive with a 12 MiB Content-Length):
    /// half send 64 KiB and stop, half trickle 4 KiB a second.
    #[arg(long, default_value_t = 30)]
    stalled_uploads: usize,
    /// Addresses that each make one request, to fill the rate-limit table.
    #[arg(long, default_value_t = 25_000)]
    rate_addrs: usize,
    /// Homed-table flood: hellos from one address...
    #[arg(long, default_value_t = 250)]
    homed_hellos: usize,
    /// ...of this many random hashes each.
    #[arg(long, default_value_t = 4096)]
    homed_hashes: usize,
    /// Disk fill: archives of the largest size from one address...
    #[arg(long, default_value_t = 30)]
    archives: usize,
    /// ...then 1 MiB media uploads from the same address.
    #[arg(long, default_value_t = 20)]
    media: usize,
    /// Churn: WebSockets opened (each registers one hash) and closed per
    /// round...
    #[arg(long, default_value_t = 10_000)]
    churn: usize,
    /// ...and rounds.
    #[arg(long, default_value_t = 3)]
    churn_rounds: usize,
    /// Longest the slow readers' senders send, seconds.
    #[arg(long, default_value_t = 15)]
    slow_reader_secs: u64,
    /// Control-client baseline before the first attack, seconds.
    #[arg(long, default_value_t = 5)]
    baseline_secs: u64,
    /// Seconds after each attack before "RSS after" is read.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// How long after an attack the control client may take to be back to
    /// normal; the next attack waits for it.
    #[arg(long, default_value_t = 60)]
    recover_secs: u64,
    /// The control client is served if its p99 under attack is at most
    /// this many times the baseline p99...
    #[arg(long, default_value_t = 10.0)]
    p99_factor: f64,
    /// ...or at most this many ms.
    #[arg(long, default_value_t = 100.0)]
    p99_floor_ms: f64,
    /// Print the summary as one JSON object (progress goes to stderr).
    #[arg(long)]
    json: bool,
}

pub fn run(b: AbuseBench) -> anyhow::Result<()> {
    anyhow::ensure!(
        ["stalled", "reading", "offline"].contains(&b.slow_reader_mode.as_str()),
        "--slow-reader-mode is stalled, reading or offline"
    );
    anyhow::ensure!(
        (1..=4096).contains(&b.slow_reader_hashes),
        "--slow-reader-hashes is 1 to 4096 (a client registers at most that many)"
    );
    anyhow::ensure!(
        b.slow_reader_packet.is_none_or(|p| p >= 47),
        "--slow-reader-packet is at least 47 bytes"
    );
    for a in &b.only {
        anyhow::ensure!(
            ATTACKS.contains(&a.as_str()),
            "unknown attack {a:?} (one of {})",
            ATTACKS.join(", ")
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(abuse(b))
}

// ---------------------------------------------------------------------------
// The relay under test

struct Relay {
    child: std::process::Child,
    pid: u32,
    http: SocketAddr,
    data_dir: PathBuf,
    cfg: Config,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The generated configuration with `--set` overrides applied.
fn config_text(sets: &[String]) -> anyhow::Result<String> {
    let mut table: toml::Table = toml::from_str(BENCH_CONFIG).context("bench config")?;
    for s in sets {
        let (key, value) = s
            .split_once('=')
            .with_context(|| format!("--set {s:?}: expected KEY=VALUE"))?;
        let value = match toml::from_str::<toml::Table>(&format!("v = {}", value.trim())) {
            Ok(mut t) => t.remove("v").context("value")?,
            Err(_) => toml::Value::String(value.trim().to_string()),
        };
        let mut parts: Vec<&str> = key.trim().split('.').collect();
        let last = parts.pop().context("empty key")?;
        let mut t = &mut table;
        for p in parts {
            t = t
                .entry(p)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .with_context(|| format!("--set {s:?}: {p} is not a table"))?;
        }
        t.insert(last.to_string(), value);
    }
    toml::to_string(&table).context("writing the relay config")
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn start_relay(bin: &Path, sets: &[String]) -> anyhow::Result<Relay> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, config_text(sets)?).context("writing relay.toml")?;
    // The effective settings, as the relay itself reads them.
    let out = std::process::Command::new(bin)
        .args(["relay", "--print-config", "--config"])
        .arg(&config)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "relay --print-config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: Config = toml::from_str(&String::from_utf8_lossy(&out.stdout))
        .context("reading the relay's effective configuration")?;
    let data_dir = dir.path().join("data");
    let log = dir.path().join("relay.log");
    let port = free_port()?;
    let mut child = std::process::Command::new(bin)
        .arg("relay")
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--http", &format!("127.0.0.1:{port}")])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--federation", "off"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).context("relay log")?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    let stdout = child.stdout.take().context("relay stdout")?;
    // Wait (bounded) for the `http=` line; keep draining stdout after it.
    let (tx, rx) = std::sync::mpsc::sync_channel::<String>(1);
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(url) = line.strip_prefix("http=")
                && let Some(t) = tx.take()
            {
                let _ = t.send(url.to_string());
            }
        }
    });
    let url = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(u) => u,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "the relay did not print http= within 60 s: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    };
    let http: SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("relay printed http={url}"))?;
    Ok(Relay {
        child,
        pid,
        http,
        data_dir,
        cfg,
        log,
        _dir: dir,
    })
}

impl Relay {
    /// SIGTERM, then (after 20 s) SIGKILL; the exit status.
    fn stop(&mut self) -> String {
        if let Ok(Some(st)) = self.child.try_wait() {
            return format!("had exited already: {st}");
        }
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.to_string();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(st) => format!("killed after 20 s: {st}"),
            Err(e) => format!("killed: {e}"),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// VmRSS samples every 100 ms.
struct Rss {
    samples: Mutex<Vec<(Instant, u64)>>,
    stop: AtomicBool,
}

impl Rss {
    fn start(pid: u32) -> Arc<Self> {
        let r = Arc::new(Self {
            samples: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let r2 = r.clone();
        std::thread::spawn(move || {
            while !r2.stop.load(Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    lock(&r2.samples).push((Instant::now(), kib * KIB));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        r
    }

    /// The highest sample in `[from, to]`.
    fn peak(&self, from: Instant, to: Instant) -> u64 {
        lock(&self.samples)
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|(_, v)| *v)
            .max()
            .unwrap_or(0)
    }

    /// The highest sample of each second in `[from, to]`.
    fn timeline(&self, from: Instant, to: Instant) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for (t, v) in lock(&self.samples).iter() {
            if *t < from || *t > to {
                continue;
            }
            let i = t.duration_since(from).as_secs() as usize;
            if out.len() <= i {
                out.resize(i + 1, 0);
            }
            out[i] = out[i].max(*v);
        }
        out
    }

    /// The median of the samples of the last `window`.
    fn now(&self, window: Duration) -> u64 {
        let s = lock(&self.samples);
        let since = Instant::now().checked_sub(window);
        let mut v: Vec<u64> = s
            .iter()
            .filter(|(t, _)| since.is_none_or(|f| *t >= f))
            .map(|(_, v)| *v)
            .collect();
        if v.is_empty() {
            return s.last().map(|(_, v)| *v).unwrap_or(0);
        }
        v.sort_unstable();
        v[v.len() / 2]
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

// ---------------------------------------------------------------------------
// Clients

/// Source addresses 127.1.0.1, 127.1.0.2, ... (never 127.0.0.1, the
/// control client's), each used by one attacker.
struct Addrs(AtomicU32);

impl Addrs {
    fn take(&self) -> IpAddr {
        let n = self.0.fetch_add(1, Relaxed);
        let d = n % 254 + 1;
        let c = (n / 254) % 256;
        let b = 1 + (n / (254 * 256)) % 254;
        IpAddr::V4(Ipv4Addr::new(127, b as u8, c as u8, d as u8))
    }
}

/// A small non-cryptographic generator (splitmix64) for random hashes.
struct Rng(AtomicU64);

impl Rng {
    fn next(&self) -> u64 {
        let mut z = self.0.fetch_add(0x9e37_79b9_7f4a_7c15, Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn hash(&self) -> DestHash {
        DestHash(self.next().to_be_bytes())
    }
    fn hex32(&self) -> String {
        (0..4).map(|_| format!("{:016x}", self.next())).collect()
    }
}

async fn tcp_from(from: IpAddr, to: SocketAddr, rcvbuf: Option<u32>) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from, 0))?;
    s.set_nodelay(true)?;
    if let Some(n) = rcvbuf {
        s.set_recv_buffer_size(n)?;
    }
    tokio::time::timeout(Duration::from_secs(10), s.connect(to))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

type Ws = WebSocketStream<TcpStream>;

/// Why a WebSocket could not be opened.
#[derive(Debug)]
enum WsFail {
    /// The relay answered the upgrade with this status.
    Status(u16),
    /// The connection was closed or reset during the handshake (refused
    /// at accept).
    Closed,
    /// Anything else (connect failed, timeout).
    Other(String),
}

async fn ws_from(from: IpAddr, to: SocketAddr, rcvbuf: Option<u32>) -> Result<Ws, WsFail> {
    let tcp = tcp_from(from, to, rcvbuf)
        .await
        .map_err(|e| WsFail::Other(e.to_string()))?;
    let url = format!("ws://{to}/");
    match tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async_with_config(url, tcp, None),
    )
    .await
    {
        Err(_) => Err(WsFail::Other("handshake timed out".into())),
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tungstenite::Error::Http(r))) => Err(WsFail::Status(r.status().as_u16())),
        Ok(Err(
            tungstenite::Error::Io(_)
            | tungstenite::Error::ConnectionClosed
            | tungstenite::Error::AlreadyClosed
            | tungstenite::Error::Protocol(_),
        )) => Err(WsFail::Closed),
        Ok(Err(e)) => Err(WsFail::Other(e.to_string())),
    }
}

fn hello(hashes: &[DestHash]) -> Message {
    let list: Vec<String> = hashes.iter().map(|h| h.to_hex()).collect();
    Message::Text(
        json!({"type": "hello", "destHashes": list})
            .to_string()
            .into(),
    )
}

/// Drops a WebSocket with an abortive close (RST): no TIME_WAIT here, and
/// the relay sees the client gone at once.
fn abort(ws: Ws) {
    let _ = ws.get_ref().set_zero_linger();
}

/// One HTTP/1.1 request with `Connection: close`; the status and body.
async fn http(
    from: Option<IpAddr>,
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = match from {
        Some(ip) => tcp_from(ip, to, None).await?,
        None => TcpStream::connect(to).await?,
    };
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let resp = tokio::time::timeout(Duration::from_secs(30), async {
        s.write_all(req.as_bytes()).await?;
        s.write_all(body).await?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await?;
        std::io::Result::Ok(resp)
    })
    .await
    .context("request timed out")??;
    let status = status_of(&resp).with_context(|| format!("{method} {path}: no HTTP answer"))?;
    let body = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| resp[i + 4..].to_vec())
        .unwrap_or_default();
    Ok((status, body))
}

fn status_of(resp: &[u8]) -> Option<u16> {
    let line = resp.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut it = text.split_whitespace();
    it.next().filter(|v| v.starts_with("HTTP/"))?;
    it.next()?.parse().ok()
}

/// An upload whose response is read while the body is still being sent
/// (the relay may answer 507 or 413 before it has read it all). `None`:
/// the connection ended without an answer.
async fn upload(from: IpAddr, to: SocketAddr, head: String, len: u64) -> Option<u16> {
    let s = tcp_from(from, to, None).await.ok()?;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5a_u8; 64 * 1024];
        w.write_all(head.as_bytes()).await?;
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            w.write_all(&chunk[..n]).await?;
            left -= n as u64;
        }
        // Keep the write half open until the answer arrives.
        std::future::pending::<()>().await;
        std::io::Result::Ok(())
    });
    let status = tokio::time::timeout(Duration::from_secs(60), async {
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        loop {
            match r.read(&mut tmp).await {
                Ok(0) | Err(_) => return status_of(&buf),
                Ok(n) => {
                    buf.extend_from_slice(&tmp[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        return status_of(&buf);
                    }
                }
            }
        }
    })
    .await
    .ok()
    .flatten();
    writer.abort();
    status
}

struct Ctx {
    relay: SocketAddr,
    pid: u32,
    data_dir: PathBuf,
    cfg: Config,
    addrs: Addrs,
    rng: Rng,
    /// Connections this process may hold at once.
    fd_room: usize,
}

impl Ctx {
    /// `/metrics` as name (with labels) → value.
    async fn metrics(&self) -> HashMap<String, f64> {
        let mut out = HashMap::new();
        if let Ok((200, body)) = http(None, self.relay, "GET", "/metrics", &[], b"").await {
            for line in String::from_utf8_lossy(&body).lines() {
                if line.starts_with('#') {
                    continue;
                }
                if let Some((k, v)) = line.rsplit_once(' ')
                    && let Ok(v) = v.trim().parse::<f64>()
                {
                    out.insert(k.trim().to_string(), v);
                }
            }
        }
        out
    }

    async fn health(&self) -> Option<Value> {
        match http(None, self.relay, "GET", "/health", &[], b"").await {
            Ok((200, body)) => serde_json::from_slice(&body).ok(),
            _ => None,
        }
    }

    async fn homed(&self) -> u64 {
        self.health()
            .await
            .and_then(|h| h["federation"]["homedHashes"].as_u64())
            .unwrap_or(0)
    }

    /// A new client from a fresh address can open a WebSocket and
    /// register, and `/health` answers to a fresh address.
    async fn newcomer(&self) -> (bool, bool) {
        let ws_ok = match ws_from(self.addrs.take(), self.relay, None).await {
            Ok(mut ws) => {
                let ok = ws.send(hello(&[self.rng.hash()])).await.is_ok();
                abort(ws);
                ok
            }
            Err(_) => false,
        };
        let health_ok = matches!(
            http(
                Some(self.addrs.take()),
                self.relay,
                "GET",
                "/health",
                &[],
                b""
            )
            .await,
            Ok((200, _))
        );
        (ws_ok, health_ok)
    }
}

fn metric(m: &HashMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

fn delta(a: &HashMap<String, f64>, b: &HashMap<String, f64>, name: &str) -> f64 {
    metric(b, name) - metric(a, name)
}

/// Runs `n` jobs with at most `width` at once; their results in order of
/// completion.
async fn fan_out<T, F, Fut>(n: usize, width: usize, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(width.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let fut = f(i);
        set.spawn(async move {
            let r = fut.await;
            drop(permit);
            r
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            out.push(r);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The control client

/// Round trips, timeouts and disconnects of the control client in a
/// time window.
#[derive(Debug, Default, Clone)]
struct PhaseStats {
    lat_us: Vec<u64>,
    timeouts: u64,
    disconnects: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Event {
    /// A round trip, µs.
    Trip(u64),
    /// A packet not received within [`CONTROL_TIMEOUT`].
    Timeout,
    /// A socket failed (or could not be opened); the client reconnects.
    Disconnect,
}

struct Control {
    /// Every event, by the time its packet was sent.
    events: Mutex<Vec<(Instant, Event)>>,
    stop: AtomicBool,
    delivered: AtomicU64,
}

/// A packet not received within this counts as a timeout.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

impl Control {
    fn record(&self, at: Instant, e: Event) {
        lock(&self.events).push((at, e));
    }

    /// The events in `[from, to]`.
    fn stats(&self, from: Instant, to: Instant) -> PhaseStats {
        let mut s = PhaseStats::default();
        for (t, e) in lock(&self.events).iter() {
            if *t < from || *t > to {
                continue;
            }
            match e {
                Event::Trip(us) => s.lat_us.push(*us),
                Event::Timeout => s.timeouts += 1,
                Event::Disconnect => s.disconnects += 1,
            }
        }
        s
    }

    /// The slowest round trip sent in each second of `[from, to]`, ms (a
    /// timeout or disconnect counts as the timeout).
    fn timeline(&self, from: Instant, to: Instant) -> Vec<f64> {
        let mut out: Vec<f64> = Vec::new();
        for (t, e) in lock(&self.events).iter() {
            if *t < from || *t > to {
                continue;
            }
            let ms = match e {
                Event::Trip(us) => *us as f64 / 1000.0,
                _ => CONTROL_TIMEOUT.as_secs_f64() * 1000.0,
            };
            let i = t.duration_since(from).as_secs() as usize;
            if out.len() <= i {
                out.resize(i + 1, 0.0);
            }
            out[i] = out[i].max(ms);
        }
        out
    }

    /// When, after `since`, the control client's round trips were back to
    /// normal for good: the start of the trailing run of at least `run`
    /// round trips within `limit_ms` (None: not yet).
    fn recovered(&self, since: Instant, limit_ms: f64, run: usize) -> Option<Instant> {
        let ev = lock(&self.events);
        let mut start = None;
        let mut n = 0;
        for (t, e) in ev.iter().filter(|(t, _)| *t >= since) {
            match e {
                Event::Trip(us) if *us as f64 / 1000.0 <= limit_ms => {
                    if n == 0 {
                        start = Some(*t);
                    }
                    n += 1;
                }
                _ => n = 0,
            }
        }
        if n >= run { start } else { None }
    }
}

async fn control_loop(c: Arc<Control>, relay: SocketAddr, seed: u64) {
    let url = format!("ws://{relay}/");
    let mut seq: u64 = 0;
    let mut round = 0u64;
    'connect: while !c.stop.load(Relaxed) {
        round += 1;
        let connect = || tokio_tungstenite::connect_async_with_config(url.clone(), None, true);
        let (a, b) = match tokio::time::timeout(Duration::from_secs(5), async {
            Ok::<_, tungstenite::Error>((connect().await?.0, connect().await?.0))
        })
        .await
        {
            Ok(Ok(ab)) => ab,
            _ => {
                c.record(Instant::now(), Event::Disconnect);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let dest = DestHash((seed ^ round.rotate_left(32)).to_be_bytes());
        let (mut a_tx, mut a_rx) = a.split();
        let (mut b_tx, mut b_rx) = b.split();
        if b_tx.send(hello(&[dest])).await.is_err() {
            continue;
        }
        // Both sockets are read all the time (pings are answered).
        let a_reader = tokio::spawn(async move { while let Some(Ok(_)) = a_rx.next().await {} });
        let (got_tx, mut got) = tokio::sync::mpsc::channel::<u64>(1024);
        let b_reader = tokio::spawn(async move {
            while let Some(Ok(m)) = b_rx.next().await {
                if let Message::Binary(p) = m
                    && p.len() >= 39
                {
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&p[31..39]);
                    let _ = got_tx.try_send(u64::from_be_bytes(s));
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut payload = vec![0u8; 200 - 31];
        let mut misses = 0;
        let end = loop {
            if c.stop.load(Relaxed) {
                break false;
            }
            seq += 1;
            payload[..8].copy_from_slice(&seq.to_be_bytes());
            let pkt = meshwhisper_behaviour::packet::build(1, dest, [0x43; 16], 7, &payload);
            let t0 = Instant::now();
            let deadline = tokio::time::Instant::now() + CONTROL_TIMEOUT;
            match tokio::time::timeout_at(deadline, a_tx.send(Message::Binary(pkt.into()))).await {
                Ok(Ok(())) => {}
                _ => break true,
            }
            let arrived = loop {
                match tokio::time::timeout_at(deadline, got.recv()).await {
                    Ok(Some(s)) if s == seq => break Some(t0.elapsed()),
                    Ok(Some(_)) => continue,
                    Ok(None) => break None,
                    Err(_) => break None,
                }
            };
            match arrived {
                Some(d) => {
                    misses = 0;
                    c.delivered.fetch_add(1, Relaxed);
                    c.record(t0, Event::Trip(d.as_micros() as u64));
                }
                None => {
                    misses += 1;
                    c.record(t0, Event::Timeout);
                    if b_reader.is_finished() || misses >= 3 {
                        break true;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        a_reader.abort();
        b_reader.abort();
        if end {
            c.record(Instant::now(), Event::Disconnect);
            continue 'connect;
        }
    }
}

// ---------------------------------------------------------------------------
// Attacks

/// What an attack reports.
#[derive(Debug, Default)]
struct Outcome {
    /// Budget terms beyond the RSS before the attack and the slack.
    budget: Vec<(String, u64)>,
    /// Whether the relay's specific defence held.
    defended: bool,
    /// One line for the table.
    summary: String,
    /// Everything measured, for --json.
    details: serde_json::Map<String, Value>,
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

/// The slow readers' shape: how many, how much each sends, for how long,
/// the readers' mode, packet size (`None`: the largest) and hashes each.
struct SlowReaders<'a> {
    n: usize,
    mib_each: u64,
    secs: u64,
    mode: &'a str,
    packet: Option<usize>,
    hashes: usize,
}

async fn slow_readers(ctx: &Ctx, sr: SlowReaders<'_>) -> anyhow::Result<Outcome> {
    let SlowReaders {
        n,
        mib_each,
        secs,
        mode,
        packet,
        hashes,
    } = sr;
    let cfg = &ctx.cfg;
    let l = &cfg.limits;
    let size = packet
        .unwrap_or(cfg.storage.max_blob_size)
        .min(cfg.storage.max_blob_size);
    let m0 = ctx.metrics().await;
    let mut readers = Vec::new();
    let mut reading = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..n {
        let ip = ctx.addrs.take();
        let dest: Vec<DestHash> = (0..hashes).map(|_| ctx.rng.hash()).collect();
        // The second socket: registers the hashes, then is never read,
        // with a small receive buffer so the backlog builds in the relay.
        if mode != "offline" {
            let mut r = ws_from(ip, ctx.relay, Some(4096))
                .await
                .map_err(|e| anyhow::anyhow!("slow reader: {e:?}"))?;
            r.send(hello(&dest)).await.context("slow reader hello")?;
            if mode == "reading" {
                reading.push(tokio::spawn(async move {
                    while let Some(Ok(_)) = r.next().await {}
                }));
            } else {
                readers.push(r);
            }
        }
        let s = ws_from(ip, ctx.relay, None)
            .await
            .map_err(|e| anyhow::anyhow!("slow reader's sender: {e:?}"))?;
        senders.push((s, dest));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (s, dest) in senders {
        let sent = sent.clone();
        let budget = mib_each * MIB;
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = s.split();
            let drain = tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
            let mut payload = vec![0u8; size - 31];
            let mut bytes = 0u64;
            let mut k = 0u64;
            while bytes < budget {
                k += 1;
                payload[..8].copy_from_slice(&k.to_be_bytes());
                let to = dest[k as usize % dest.len()];
                let pkt = meshwhisper_behaviour::packet::build(1, to, [0x44; 16], 7, &payload);
                let len = pkt.len() as u64;
                match tokio::time::timeout_at(deadline, tx.send(Message::Binary(pkt.into()))).await
                {
                    Ok(Ok(())) => {
                        bytes += len;
                        sent.fetch_add(len, Relaxed);
                    }
                    _ => break,
                }
            }
            drain.abort();
        }));
    }
    // Watch the relay's queues while the senders run.
    let mut live_max = 0.0f64;
    let mut inflight_max = 0.0f64;
    loop {
        let m = ctx.metrics().await;
        live_max = live_max.max(metric(&m, "meshwhisper_live_queue_bytes"));
        inflight_max = inflight_max.max(metric(&m, "meshwhisper_inflight_bytes"));
        if tasks.iter().all(|t| t.is_finished()) || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed();
    let m1 = ctx.metrics().await;
    for r in readers {
        abort(r);
    }
    for r in reading {
        r.abort();
    }
    let sent = sent.load(Relaxed);
    let queue_bound = (n as u64 * l.client_queue_bytes as u64).min(l.live_queue_bytes as u64);
    // A connection is read while less than client_inflight_bytes of its
    // packets are being stored, and one read batch takes up to that much
    // more (plus one frame).
    let inflight_bound =
        (n as u64 * (2 * l.client_inflight_bytes + size) as u64).min(l.inflight_bytes as u64);
    let full = delta(&m0, &m1, "meshwhisper_live_queue_full_total");
    let mut o = Outcome {
        defended: live_max <= queue_bound as f64 && inflight_max <= inflight_bound as f64,
        summary: format!(
            "{n} readers ({mode}), {:.0} MiB sent in {:.1} s; live queue max {:.1} MiB (bound {:.0}), storing max {:.1} MiB (bound {:.0}); queue full {full:.0}×",
            mib(sent),
            elapsed.as_secs_f64(),
            live_max / MIB as f64,
            mib(queue_bound),
            inflight_max / MIB as f64,
            mib(inflight_bound),
        ),
        budget: vec![
            (
                format!("{n} stalled writers × (client_queue_bytes + ws write buffer cap)"),
                queue_bound + n as u64 * ws_write_max(cfg),
            ),
            (
                format!("{n} senders × (2 × client_inflight_bytes + 3 frames)"),
                inflight_bound + n as u64 * 2 * size as u64,
            ),
            ("hot tier".into(), HOT_TIER),
            (format!("{} WebSockets", 2 * n), 2 * n as u64 * WS_CONN),
        ],
        details: serde_json::Map::new(),
    };
    o.details.insert("readers".into(), json!(n));
    o.details.insert("mode".into(), json!(mode));
    o.details.insert("packet_bytes".into(), json!(size));
    o.details.insert("hashes_each".into(), json!(hashes));
    o.details.insert("sent_bytes".into(), json!(sent));
    o.details
        .insert("seconds".into(), json!(elapsed.as_secs_f64()));
    o.details
        .insert("live_queue_bytes_max".into(), json!(live_max));
    o.details
        .insert("inflight_bytes_max".into(), json!(inflight_max));
    o.details.insert("live_queue_full".into(), json!(full));
    Ok(o)
}

async fn slowloris(ctx: &Ctx, n: usize) -> anyhow::Result<Outcome> {
    let header = Duration::from_secs(ctx.cfg.limits.header_timeout_secs);
    let per_addr = 200.min(ctx.cfg.limits.max_connections_per_ip.max(1));
    let addrs: Vec<IpAddr> = (0..n.div_ceil(per_addr))
        .map(|_| ctx.addrs.take())
        .collect();
    let m0 = ctx.metrics().await;
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + header + Duration::from_secs(10);
    let relay = ctx.relay;
    let connects = Arc::new(Semaphore::new(256));
    // Some(close time) when the relay closed it; None: still open at the
    // deadline; Err: could not connect.
    let results = fan_out(n, n, |i| {
        let ip = addrs[i / per_addr];
        let connects = connects.clone();
        async move {
            let permit = connects.acquire_owned().await;
            let mut s = match tcp_from(ip, relay, None).await {
                Ok(s) => s,
                Err(e) => return Err::<Option<Duration>, String>(e.to_string()),
            };
            drop(permit);
            let t0 = Instant::now();
            if s.write_all(b"GET /health HTTP/1.1\r\nHost: relay\r\n")
                .await
                .is_err()
            {
                return Ok(Some(t0.elapsed()));
            }
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            let mut buf = [0u8; 1024];
            let mut k = 0;
            loop {
                tokio::select! {
                    r = s.read(&mut buf) => match r {
                        Ok(0) | Err(_) => return Ok(Some(t0.elapsed())),
                        Ok(_) => {} // an answer (408); the close follows
                    },
                    _ = tick.tick() => {
                        k += 1;
                        if s.write_all(format!("X-Slow-{k}: 1\r\n").as_bytes()).await.is_err() {
                            return Ok(Some(t0.elapsed()));
                        }
                    }
                    () = tokio::time::sleep_until(deadline) => {
                        let _ = s.set_zero_linger();
                        return Ok(None);
                    }
                }
            }
        }
    })
    .await;
    let m1 = ctx.metrics().await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    let mut closed: Vec<u64> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied().flatten())
        .map(|d| d.as_millis() as u64)
        .collect();
    closed.sort_unstable();
    let open = results.iter().filter(|r| matches!(r, Ok(None))).count();
    let p50 = crate::bench::percentile(&closed, 0.5) as f64 / 1000.0;
    let max = closed.last().copied().unwrap_or(0) as f64 / 1000.0;
    let timeouts = delta(&m0, &m1, "meshwhisper_connection_timeouts_total");
    let mut o = Outcome {
        defended: open == 0
            && failed == 0
            && max <= header.as_secs_f64() + 3.0
            && closed.len() == n,
        summary: format!(
            "{n} conns from {} addresses: {} closed by the relay after {p50:.1} s (max {max:.1} s), {open} still open, {failed} not connected; timeouts metric +{timeouts:.0}",
            addrs.len(),
            closed.len()
        ),
        budget: vec![(format!("{n} connections"), n as u64 * TCP_CONN)],
        details: serde_json::Map::new(),
    };
    o.details.insert("connections".into(), json!(n));
    o.details.insert("closed".into(), json!(closed.len()));
    o.details.insert("close_p50_s".into(), json!(p50));
    o.details.insert("close_max_s".into(), json!(max));
    o.details.insert("open_at_deadline".into(), json!(open));
    o.details.insert("connect_failed".into(), json!(failed));
    o.details.insert("timeouts_metric".into(), json!(timeouts));
    o.details
        .insert("seconds".into(), json!(start.elapsed().as_secs_f64()));
    Ok(o)
}

/// Whether the relay has closed this stream (EOF or reset), without
/// waiting.
fn is_closed(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    match s.try_read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

async fn idle_flood(ctx: &Ctx, want: usize) -> anyhow::Result<Outcome> {
    let n = want.min(ctx.fd_room);
    let l = &ctx.cfg.limits;
    let header = Duration::from_secs(l.header_timeout_secs);
    let ip = ctx.addrs.take();
    let relay = ctx.relay;
    let gauge = "meshwhisper_gateway_connections";
    let m0 = ctx.metrics().await;
    let start = Instant::now();
    let results = fan_out(n, 256, |_| async move { tcp_from(ip, relay, None).await }).await;
    let connect_secs = start.elapsed().as_secs_f64();
    let last_connect = Instant::now();
    let failed = results.iter().filter(|r| r.is_err()).count();
    let mut streams: Vec<TcpStream> = results.into_iter().filter_map(Result::ok).collect();
    let connected = streams.len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    streams.retain(|s| !is_closed(s));
    let open_here = streams.len();
    let m1 = ctx.metrics().await;
    // What the relay holds (its gauge; the control client's sockets and
    // the metrics request are in both readings). Connections this side
    // still sees open beyond that never reached the relay: the kernel's
    // listen queue overflowed and dropped them (SYN cookies).
    let held = (metric(&m1, gauge) - metric(&m0, gauge)).max(0.0) as usize;
    let (ws_ok, health_ok) = ctx.newcomer().await;
    // The held ones sent nothing: the header timeout closes them.
    tokio::time::sleep_until((last_connect + header + Duration::from_secs(3)).into()).await;
    let m2 = ctx.metrics().await;
    let left = (metric(&m2, gauge) - metric(&m0, gauge)).max(0.0) as usize;
    for s in &streams {
        let _ = s.set_zero_linger();
    }
    drop(streams);
    let refused_metric = delta(&m0, &m1, "meshwhisper_connections_refused_per_ip_total");
    let per_ip = l.max_connections_per_ip;
    let mut o = Outcome {
        defended: held <= per_ip && ws_ok && health_ok && left == 0,
        summary: format!(
            "{n} of {want} idle conns from one address in {connect_secs:.1} s{}: the relay held {held} (cap {per_ip}) and closed {refused_metric:.0} at once ({} never reached it: listen queue overflow), {failed} not connected; after {} s it holds {left}; newcomer WebSocket {}, /health {}",
            if n < want {
                " (capped by this process's fds)"
            } else {
                ""
            },
            open_here.saturating_sub(held),
            header.as_secs() + 3,
            if ws_ok { "ok" } else { "FAILED" },
            if health_ok { "ok" } else { "FAILED" },
        ),
        budget: vec![(
            format!("{} connections", n.min(per_ip)),
            n.min(per_ip) as u64 * TCP_CONN,
        )],
        details: serde_json::Map::new(),
    };
    o.details.insert("requested".into(), json!(want));
    o.details.insert("attempted".into(), json!(n));
    o.details.insert("connected".into(), json!(connected));
    o.details.insert("held_by_relay".into(), json!(held));
    o.details
        .insert("open_client_side".into(), json!(open_here));
    o.details
        .insert("refused_per_ip_metric".into(), json!(refused_metric));
    o.details.insert("connect_failed".into(), json!(failed));
    o.details
        .insert("connect_seconds".into(), json!(connect_secs));
    o.details
        .insert("held_after_header_timeout".into(), json!(left));
    o.details.insert("newcomer_websocket".into(), json!(ws_ok));
    o.details.insert("newcomer_health".into(), json!(health_ok));
    Ok(o)
}

async fn ws_slots(ctx: &Ctx, want: usize) -> anyhow::Result<Outcome> {
    let n = want.min(ctx.fd_room);
    let l = &ctx.cfg.limits;
    let ip = ctx.addrs.take();
    let relay = ctx.relay;
    let m0 = ctx.metrics().await;
    let start = Instant::now();
    let results = fan_out(n, 256, |_| async move { ws_from(ip, relay, None).await }).await;
    let secs = start.elapsed().as_secs_f64();
    let m1 = ctx.metrics().await;
    let mut open = Vec::new();
    let (mut by_status, mut closed, mut other) = (BTreeMap::<u16, usize>::new(), 0usize, 0usize);
    let mut other_example = None;
    for r in results {
        match r {
            Ok(ws) => open.push(ws),
            Err(WsFail::Status(s)) => *by_status.entry(s).or_default() += 1,
            Err(WsFail::Closed) => closed += 1,
            Err(WsFail::Other(e)) => {
                other += 1;
                other_example.get_or_insert(e);
            }
        }
    }
    let got = open.len();
    let (ws_ok, health_ok) = ctx.newcomer().await;
    for ws in open {
        abort(ws);
    }
    let cap = l.max_websockets_per_ip.min(l.max_connections_per_ip.max(1));
    let ws_refused = delta(&m0, &m1, "meshwhisper_websockets_refused_per_ip_total");
    let conn_refused = delta(&m0, &m1, "meshwhisper_connections_refused_per_ip_total");
    let mut o = Outcome {
        defended: got <= cap && ws_ok && health_ok,
        summary: format!(
            "{n} upgrades from one address in {secs:.1} s: {got} open (cap {cap}), refused {} by status {by_status:?}, {closed} at accept, {other} other (metrics: ws +{ws_refused:.0}, conn +{conn_refused:.0}); newcomer WebSocket {}, /health {}",
            by_status.values().sum::<usize>(),
            if ws_ok { "ok" } else { "FAILED" },
            if health_ok { "ok" } else { "FAILED" },
        ),
        budget: vec![(
            format!("{} WebSockets", n.min(cap)),
            n.min(cap) as u64 * WS_CONN,
        )],
        details: serde_json::Map::new(),
    };
    o.details.insert("attempted".into(), json!(n));
    o.details.insert("open".into(), json!(got));
    o.details.insert("seconds".into(), json!(secs));
    o.details.insert(
        "refused_by_status".into(),
        json!(
            by_status
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<BTreeMap<_, _>>()
        ),
    );
    o.details.insert("refused_at_accept".into(), json!(closed));
    o.details.insert("other_errors".into(), json!(other));
    o.details
        .insert("other_error_example".into(), json!(other_example));
    o.details.insert("newcomer_websocket".into(), json!(ws_ok));
    o.details.insert("newcomer_health".into(), json!(health_ok));
    Ok(o)
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).count())
        .unwrap_or(0)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

async fn stalled_uploads(ctx: &Ctx, n: usize) -> anyhow::Result<Outcome> {
    let l = &ctx.cfg.limits;
    let max = ctx.cfg.storage.max_archive_size;
    let idle = Duration::from_secs(l.body_idle_timeout_secs);
    let total = Duration::from_secs(l.body_timeout_secs);
    let per_addr = (l.rate_limit_archive as usize).max(1);
    let addrs: Vec<IpAddr> = (0..n.div_ceil(per_addr))
        .map(|_| ctx.addrs.take())
        .collect();
    let deadline = tokio::time::Instant::now() + idle.max(total) + Duration::from_secs(10);
    let relay = ctx.relay;
    let m0 = ctx.metrics().await;
    let start = Instant::now();
    let jobs: Vec<(IpAddr, String, String)> = (0..n)
        .map(|i| (addrs[i / per_addr], ctx.rng.hex32(), ctx.rng.hex32()))
        .collect();
    let jobs = Arc::new(jobs);
    // (trickle?, status answered, close time or None if still open)
    let results = fan_out(n, n, |i| {
        let jobs = jobs.clone();
        async move {
            let (ip, owner, token) = jobs[i].clone();
            let trickle = i % 2 == 1;
            let mut s = match tcp_from(ip, relay, None).await {
                Ok(s) => s,
                Err(_) => return (trickle, None, Some(Duration::ZERO)),
            };
            let t0 = Instant::now();
            let head = format!(
                "PUT /archive/{owner} HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {token}\r\nContent-Length: {max}\r\n\r\n"
            );
            let first = if trickle { 4096 } else { 64 * 1024 };
            if s.write_all(head.as_bytes()).await.is_err()
                || s.write_all(&vec![0x33; first]).await.is_err()
            {
                return (trickle, None, Some(t0.elapsed()));
            }
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut buf = Vec::new();
            let mut tmp = [0u8; 2048];
            loop {
                tokio::select! {
                    r = s.read(&mut tmp) => match r {
                        Ok(0) | Err(_) => return (trickle, status_of(&buf), Some(t0.elapsed())),
                        Ok(k) => buf.extend_from_slice(&tmp[..k]),
                    },
                    _ = tick.tick(), if trickle => {
                        if s.write_all(&[0x33; 4096]).await.is_err() {
                            return (trickle, status_of(&buf), Some(t0.elapsed()));
                        }
                    }
                    () = tokio::time::sleep_until(deadline) => {
                        let _ = s.set_zero_linger();
                        return (trickle, status_of(&buf), None);
                    }
                }
            }
        }
    })
    .await;
    let m1 = ctx.metrics().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tmp_left = count_files(&ctx.data_dir.join("tmp"));
    let summarize = |trickle: bool| {
        let mut times: Vec<u64> = results
            .iter()
            .filter(|r| r.0 == trickle)
            .filter_map(|r| r.2)
            .map(|d| d.as_millis() as u64)
            .collect();
        times.sort_unstable();
        let mut statuses = BTreeMap::<String, usize>::new();
        for r in results.iter().filter(|r| r.0 == trickle) {
            let k = r.1.map_or("none".to_string(), |s| s.to_string());
            *statuses.entry(k).or_default() += 1;
        }
        let open = results
            .iter()
            .filter(|r| r.0 == trickle && r.2.is_none())
            .count();
        (times, statuses, open)
    };
    let (st_times, st_status, st_open) = summarize(false);
    let (tr_times, tr_status, tr_open) = summarize(true);
    let max_s = |t: &[u64]| t.last().copied().unwrap_or(0) as f64 / 1000.0;
    let p50_s = |t: &[u64]| crate::bench::percentile(t, 0.5) as f64 / 1000.0;
    let timeouts = delta(&m0, &m1, "meshwhisper_connection_timeouts_total");
    let mut o = Outcome {
        defended: st_open == 0
            && tr_open == 0
            && max_s(&st_times) <= idle.as_secs_f64() + 3.0
            && max_s(&tr_times) <= total.as_secs_f64() + 3.0
            && tmp_left == 0,
        summary: format!(
            "{n} PUT /archive of {:.0} MiB declared: {} stalled closed after {:.1} s (max {:.1}, body_idle {}s) answers {st_status:?}; {} trickling closed after {:.1} s (max {:.1}, body total {}s) answers {tr_status:?}; {} still open; {tmp_left} temp files left",
            mib(max),
            st_times.len(),
            p50_s(&st_times),
            max_s(&st_times),
            idle.as_secs(),
            tr_times.len(),
            p50_s(&tr_times),
            max_s(&tr_times),
            total.as_secs(),
            st_open + tr_open,
        ),
        budget: vec![(
            format!("{n} uploads × (upload buffer + connection)"),
            n as u64 * (UPLOAD + TCP_CONN),
        )],
        details: serde_json::Map::new(),
    };
    o.details.insert("uploads".into(), json!(n));
    o.details
        .insert("stalled_close_max_s".into(), json!(max_s(&st_times)));
    o.details.insert("stalled_answers".into(), json!(st_status));
    o.details
        .insert("trickle_close_max_s".into(), json!(max_s(&tr_times)));
    o.details.insert("trickle_answers".into(), json!(tr_status));
    o.details
        .insert("still_open".into(), json!(st_open + tr_open));
    o.details.insert("tmp_files_left".into(), json!(tmp_left));
    o.details.insert("timeouts_metric".into(), json!(timeouts));
    o.details
        .insert("seconds".into(), json!(start.elapsed().as_secs_f64()));
    Ok(o)
}

async fn rate_table(ctx: &Ctx, k: usize) -> anyhow::Result<Outcome> {
    let l = &ctx.cfg.limits;
    let relay = ctx.relay;
    let path = format!("/archive/{}", "0".repeat(64));
    let ips: Arc<Vec<IpAddr>> = Arc::new((0..k).map(|_| ctx.addrs.take()).collect());
    let start = Instant::now();
    let results = fan_out(k, 128, |i| {
        let (ips, path) = (ips.clone(), path.clone());
        async move {
            http(Some(ips[i]), relay, "GET", &path, &[], b"")
                .await
                .map(|r| r.0)
                .ok()
        }
    })
    .await;
    let secs = start.elapsed().as_secs_f64();
    let mut statuses = BTreeMap::<String, usize>::new();
    for r in &results {
        *statuses
            .entry(r.map_or("error".into(), |s| s.to_string()))
            .or_default() += 1;
    }
    let flood_429 = statuses.get("429").copied().unwrap_or(0);
    // A newcomer after the table is full...
    let newcomer = http(Some(ctx.addrs.take()), relay, "GET", &path, &[], b"")
        .await
        .map(|r| r.0)
        .ok();
    // ...and the limiter still limits: one address over its read limit.
    let heavy = ctx.addrs.take();
    let over = 5usize;
    let heavy_results = fan_out(l.rate_limit_read as usize + over, 8, |_| {
        let path = path.clone();
        async move {
            http(Some(heavy), relay, "GET", &path, &[], b"")
                .await
                .map(|r| r.0)
                .ok()
        }
    })
    .await;
    let heavy_429 = heavy_results.iter().filter(|r| **r == Some(429)).count();
    let cap = l.rate_limit_max_clients;
    let mut o = Outcome {
        defended: flood_429 == 0 && newcomer.is_some_and(|s| s != 429) && heavy_429 >= over,
        summary: format!(
            "{k} addresses × 1 read in {secs:.1} s (table holds {cap}): answers {statuses:?}; then a new address got {}, and one address over its limit of {} got {heavy_429} × 429",
            newcomer.map_or("no answer".into(), |s| s.to_string()),
            l.rate_limit_read,
        ),
        budget: vec![
            (
                format!("{} table entries", k.min(cap)),
                k.min(cap) as u64 * TABLE_ENTRY,
            ),
            ("128 connections".into(), 128 * TCP_CONN),
        ],
        details: serde_json::Map::new(),
    };
    o.details.insert("addresses".into(), json!(k));
    o.details.insert("table_cap".into(), json!(cap));
    o.details.insert("seconds".into(), json!(secs));
    o.details.insert("answers".into(), json!(statuses));
    o.details.insert("newcomer_status".into(), json!(newcomer));
    o.details.insert("over_limit_429".into(), json!(heavy_429));
    Ok(o)
}

async fn homed(ctx: &Ctx, hellos: usize, per_hello: usize) -> anyhow::Result<Outcome> {
    let f = &ctx.cfg.federation;
    let per_hello = per_hello.min(ctx.cfg.limits.max_hashes_per_client);
    let conns = hellos.clamp(1, 10);
    let ip = ctx.addrs.take();
    let before = ctx.homed().await;
    let m0 = ctx.metrics().await;
    let mut sockets = Vec::new();
    for _ in 0..conns {
        sockets.push(
            ws_from(ip, ctx.relay, None)
                .await
                .map_err(|e| anyhow::anyhow!("homed flood: {e:?}"))?,
        );
    }
    // The frames, built before the clock starts.
    let frames: Vec<Vec<Message>> = (0..conns)
        .map(|c| {
            (c..hellos)
                .step_by(conns)
                .map(|_| {
                    let hs: Vec<DestHash> = (0..per_hello).map(|_| ctx.rng.hash()).collect();
                    hello(&hs)
                })
                .collect()
        })
        .collect();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (mut ws, frames) in sockets.into_iter().zip(frames) {
        tasks.push(tokio::spawn(async move {
            for m in frames {
                ws.send(m).await.ok()?;
            }
            // The pong comes after every hello before it was handled.
            ws.send(Message::Ping(b"done".to_vec().into())).await.ok()?;
            let done = tokio::time::timeout(Duration::from_secs(120), async {
                while let Some(Ok(m)) = ws.next().await {
                    if matches!(&m, Message::Pong(p) if &p[..] == b"done") {
                        return true;
                    }
                }
                false
            })
            .await
            .unwrap_or(false);
            abort(ws);
            Some(done)
        }));
    }
    let mut all_done = true;
    for t in tasks {
        all_done &= matches!(t.await, Ok(Some(true)));
    }
    let secs = start.elapsed().as_secs_f64();
    // Persisted once a second; read after that.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = ctx.homed().await;
    let m1 = ctx.metrics().await;
    let evicted = delta(&m0, &m1, "meshwhisper_homed_evicted_total");
    let sent = (hellos * per_hello) as u64;
    let bound = before + f.homed_per_ip as u64;
    let mut o = Outcome {
        defended: all_done && after <= bound && after <= f.homed_max as u64,
        summary: format!(
            "{hellos} hellos × {per_hello} hashes from one address over {conns} sockets in {secs:.1} s ({sent} hashes): homed {before} → {after} (bound {before} + homed_per_ip {}), evicted {evicted:.0}{}",
            f.homed_per_ip,
            if all_done {
                ""
            } else {
                "; NOT all hellos confirmed"
            },
        ),
        budget: vec![
            (
                format!("{} homed entries", sent.min(f.homed_per_ip as u64)),
                sent.min(f.homed_per_ip as u64) * TABLE_ENTRY,
            ),
            (
                format!("{conns} WebSockets × (session + 2 control frames)"),
                conns as u64 * (WS_CONN + 2 * ctx.cfg.limits.max_control_frame as u64),
            ),
        ],
        details: serde_json::Map::new(),
    };
    o.details.insert("hellos".into(), json!(hellos));
    o.details
        .insert("hashes_per_hello".into(), json!(per_hello));
    o.details.insert("seconds".into(), json!(secs));
    o.details.insert("homed_before".into(), json!(before));
    o.details.insert("homed_after".into(), json!(after));
    o.details.insert("homed_bound".into(), json!(bound));
    o.details.insert("evicted_metric".into(), json!(evicted));
    o.details.insert("all_confirmed".into(), json!(all_done));
    Ok(o)
}

async fn disk_fill(ctx: &Ctx, archives: usize, media: usize) -> anyhow::Result<Outcome> {
    let l = &ctx.cfg.limits;
    let max = ctx.cfg.storage.max_archive_size;
    let quota = l.upload_bytes_per_ip_per_day;
    let ip = ctx.addrs.take();
    let relay = ctx.relay;
    let m0 = ctx.metrics().await;
    let used0 = dir_bytes(&ctx.data_dir.join("archive")) + dir_bytes(&ctx.data_dir.join("media"));
    let start = Instant::now();
    let mut statuses = BTreeMap::<String, usize>::new();
    let mut accepted = 0u64;
    for _ in 0..archives {
        let head = format!(
            "PUT /archive/{} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Length: {max}\r\n\r\n",
            ctx.rng.hex32(),
            ctx.rng.hex32()
        );
        let st = upload(ip, relay, head, max).await;
        if st == Some(200) {
            accepted += max;
        }
        *statuses
            .entry(format!(
                "archive {}",
                st.map_or("none".into(), |s| s.to_string())
            ))
            .or_default() += 1;
    }
    let media_size = MIB;
    for _ in 0..media {
        let head = format!(
            "POST /media HTTP/1.1\r\nHost: relay\r\nConnection: close\r\nContent-Length: {media_size}\r\n\r\n"
        );
        let st = upload(ip, relay, head, media_size).await;
        if st == Some(200) {
            accepted += media_size;
        }
        *statuses
            .entry(format!(
                "media {}",
                st.map_or("none".into(), |s| s.to_string())
            ))
            .or_default() += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    // Another address is not affected by this one's quota.
    let other = upload(
        ctx.addrs.take(),
        relay,
        format!(
            "POST /media HTTP/1.1\r\nHost: relay\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            64 * KIB
        ),
        64 * KIB,
    )
    .await;
    let m1 = ctx.metrics().await;
    let used1 = dir_bytes(&ctx.data_dir.join("archive")) + dir_bytes(&ctx.data_dir.join("media"));
    let over = delta(&m0, &m1, "meshwhisper_uploads_over_quota_total");
    let mut o = Outcome {
        defended: (quota == 0 || accepted <= quota) && other == Some(200),
        summary: format!(
            "{archives} × {:.0} MiB archives then {media} × 1 MiB media from one address in {secs:.1} s: {:.0} MiB accepted (quota {:.0} MiB/day), answers {statuses:?}; over-quota metric +{over:.0}; disk +{:.0} MiB; another address's upload: {}",
            mib(max),
            mib(accepted),
            mib(quota),
            mib(used1.saturating_sub(used0)),
            other.map_or("no answer".into(), |s| s.to_string()),
        ),
        budget: vec![("1 upload".into(), UPLOAD + TCP_CONN)],
        details: serde_json::Map::new(),
    };
    o.details.insert("archives".into(), json!(archives));
    o.details.insert("media".into(), json!(media));
    o.details.insert("accepted_bytes".into(), json!(accepted));
    o.details.insert("quota_bytes".into(), json!(quota));
    o.details.insert("answers".into(), json!(statuses));
    o.details.insert("over_quota_metric".into(), json!(over));
    o.details.insert(
        "disk_bytes_added".into(),
        json!(used1.saturating_sub(used0)),
    );
    o.details
        .insert("other_address_status".into(), json!(other));
    o.details.insert("seconds".into(), json!(secs));
    Ok(o)
}

async fn churn(ctx: &Ctx, want: usize, rounds: usize, rss: &Rss) -> anyhow::Result<Outcome> {
    let n = want.min(ctx.fd_room);
    let per_addr = 200.min(ctx.cfg.limits.max_websockets_per_ip.max(1));
    let relay = ctx.relay;
    let start = Instant::now();
    let mut opened = Vec::new();
    let mut held_rss = Vec::new();
    let mut after_rss = Vec::new();
    for _ in 0..rounds {
        let addrs: Arc<Vec<IpAddr>> = Arc::new(
            (0..n.div_ceil(per_addr))
                .map(|_| ctx.addrs.take())
                .collect(),
        );
        let hashes: Arc<Vec<DestHash>> = Arc::new((0..n).map(|_| ctx.rng.hash()).collect());
        let results = fan_out(n, 256, |i| {
            let (addrs, hashes) = (addrs.clone(), hashes.clone());
            async move {
                let mut ws = ws_from(addrs[i / per_addr], relay, None).await.ok()?;
                ws.send(hello(&[hashes[i]])).await.ok()?;
                Some(ws)
            }
        })
        .await;
        let open: Vec<Ws> = results.into_iter().flatten().collect();
        opened.push(open.len());
        tokio::time::sleep(Duration::from_secs(1)).await;
        held_rss.push(rss.now(Duration::from_millis(300)));
        for ws in open {
            abort(ws);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        after_rss.push(rss.now(Duration::from_millis(300)));
    }
    let secs = start.elapsed().as_secs_f64();
    let m = ctx.metrics().await;
    let conns_left = metric(&m, "meshwhisper_gateway_connections");
    let mut o = Outcome {
        defended: opened.iter().all(|&k| k == n) && conns_left <= 8.0,
        summary: format!(
            "{rounds} rounds × {n} WebSockets (1 hash each) from {} addresses in {secs:.1} s: opened {opened:?}; relay RSS with them open {:?} MiB, 2 s after closing {:?} MiB; gateway connections left {conns_left:.0}",
            n.div_ceil(per_addr),
            held_rss
                .iter()
                .map(|b| (mib(*b) * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
            after_rss
                .iter()
                .map(|b| (mib(*b) * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
        ),
        budget: vec![(
            format!("{n} WebSockets + homed entries"),
            n as u64 * (WS_CONN + TABLE_ENTRY),
        )],
        details: serde_json::Map::new(),
    };
    o.details.insert("rounds".into(), json!(rounds));
    o.details.insert("per_round".into(), json!(n));
    o.details.insert("opened".into(), json!(opened));
    o.details.insert("rss_open_bytes".into(), json!(held_rss));
    o.details
        .insert("rss_closed_bytes".into(), json!(after_rss));
    o.details
        .insert("gateway_connections_left".into(), json!(conns_left));
    o.details.insert("seconds".into(), json!(secs));
    Ok(o)
}

// ---------------------------------------------------------------------------
// The run

struct Row {
    name: &'static str,
    timeline: Vec<u64>,
    control_timeline: Vec<f64>,
    rss_before: u64,
    rss_peak: u64,
    rss_after: u64,
    budget: u64,
    terms: Vec<(String, u64)>,
    control: PhaseStats,
    /// After the attack until the control client was back to normal.
    aftermath: PhaseStats,
    recovery_s: Option<f64>,
    p50_ms: f64,
    p99_ms: f64,
    served: bool,
    outcome: Outcome,
    pass: bool,
    error: Option<String>,
}

/// Round trips in a row within the limit that count as recovered.
const RECOVERY_RUN: usize = 20;

fn recovery_text(r: Option<f64>) -> String {
    match r {
        Some(s) if s < 0.5 => "back to normal at once".into(),
        Some(s) => format!("back to normal {s:.1} s after"),
        None => "NOT back to normal in time".into(),
    }
}

fn pct_ms(lat: &[u64], p: f64) -> f64 {
    let mut v = lat.to_vec();
    v.sort_unstable();
    crate::bench::percentile(&v, p) as f64 / 1000.0
}

/// Raises this process's soft fd limit to the hard one; the limit now.
fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
    getrlimit(Resource::Nofile).current.unwrap_or(1 << 20)
}

fn say(json: bool, line: &str) {
    if json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
    let _ = std::io::stdout().flush();
}

async fn abuse(b: AbuseBench) -> anyhow::Result<()> {
    let fds = raise_fd_limit();
    // Keep 2 048 descriptors for the control client, metrics requests and
    // the runtime.
    let fd_room = (fds as usize).saturating_sub(2048);
    let bin = match &b.relay_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("finding this binary")?,
    };
    let mut relay = start_relay(&bin, &b.set)?;
    let rss = Rss::start(relay.pid);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let ctx = Ctx {
        relay: relay.http,
        pid: relay.pid,
        data_dir: relay.data_dir.clone(),
        cfg: relay.cfg.clone(),
        addrs: Addrs(AtomicU32::new(0)),
        rng: Rng(AtomicU64::new(seed)),
        fd_room,
    };
    let cfg = &ctx.cfg;
    say(
        b.json,
        &format!(
            "relay pid {} on {} ({}); this process may hold {fd_room} connections (fd limit {fds})",
            ctx.pid,
            ctx.relay,
            bin.display()
        ),
    );
    say(
        b.json,
        &format!(
            "budget = RSS before the attack + {:.0} MiB slack + the attack's terms (per TCP connection {} KiB, per WebSocket {} KiB, per upload {} KiB, per table entry {} B, hot tier {:.0} MiB, stalled writer client_queue_bytes {:.1} MiB + write buffer cap {:.2} MiB)",
            mib(SLACK),
            TCP_CONN / KIB,
            WS_CONN / KIB,
            UPLOAD / KIB,
            TABLE_ENTRY,
            mib(HOT_TIER),
            mib(cfg.limits.client_queue_bytes as u64),
            mib(ws_write_max(cfg)),
        ),
    );
    let control = Arc::new(Control {
        events: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        delivered: AtomicU64::new(0),
    });
    let control_task = tokio::spawn(control_loop(control.clone(), ctx.relay, seed));
    // Warm up until the control client gets its packets (bounded).
    let warm = Instant::now();
    while control.delivered.load(Relaxed) < 20 {
        anyhow::ensure!(
            warm.elapsed() < Duration::from_secs(20),
            "the control client got no deliveries within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let base_start = Instant::now();
    tokio::time::sleep(Duration::from_secs(b.baseline_secs)).await;
    let baseline = control.stats(base_start, Instant::now());
    let base_rss = rss.peak(base_start, Instant::now());
    let base_p50 = pct_ms(&baseline.lat_us, 0.5);
    let base_p99 = pct_ms(&baseline.lat_us, 0.99);
    let p99_limit = (base_p99 * b.p99_factor).max(b.p99_floor_ms);
    say(
        b.json,
        &format!(
            "baseline: {} round trips, p50 {base_p50:.2} ms, p99 {base_p99:.2} ms; relay RSS {:.1} MiB; the control client is served if its p99 during the attack is <= {p99_limit:.1} ms, no packet takes {} s or more and no socket fails until it is back to normal ({RECOVERY_RUN} round trips in a row within {p99_limit:.1} ms, at most {} s after the attack)",
            baseline.lat_us.len(),
            mib(base_rss),
            CONTROL_TIMEOUT.as_secs(),
            b.recover_secs,
        ),
    );

    let mut rows = Vec::new();
    for name in ATTACKS.iter() {
        if !b.only.is_empty() && !b.only.iter().any(|o| o == name) {
            continue;
        }
        let rss_before = rss.now(Duration::from_millis(500));
        let t0 = Instant::now();
        // Every wait inside an attack is bounded; this bounds the sum.
        let limit = Duration::from_secs(b.slow_reader_secs.max(60) * 5);
        let run = async {
            match *name {
                "slow-readers" => {
                    slow_readers(
                        &ctx,
                        SlowReaders {
                            n: b.slow_readers,
                            mib_each: b.slow_reader_mib,
                            secs: b.slow_reader_secs,
                            mode: &b.slow_reader_mode,
                            packet: b.slow_reader_packet,
                            hashes: b.slow_reader_hashes,
                        },
                    )
                    .await
                }
                "slowloris" => slowloris(&ctx, b.slowloris).await,
                "idle-flood" => idle_flood(&ctx, b.idle).await,
                "ws-slots" => ws_slots(&ctx, b.ws_slots).await,
                "stalled-uploads" => stalled_uploads(&ctx, b.stalled_uploads).await,
                "rate-table" => rate_table(&ctx, b.rate_addrs).await,
                "homed" => homed(&ctx, b.homed_hellos, b.homed_hashes).await,
                "disk-fill" => disk_fill(&ctx, b.archives, b.media).await,
                _ => churn(&ctx, b.churn, b.churn_rounds, &rss).await,
            }
        };
        let result = match tokio::time::timeout(limit, run).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!(
                "did not finish within {} s",
                limit.as_secs()
            )),
        };
        let t_end = Instant::now();
        tokio::time::sleep(Duration::from_secs(b.settle_secs)).await;
        let rss_after = rss.now(Duration::from_millis(500));
        // Wait (bounded) until the control client is back to normal.
        let give_up = t_end + Duration::from_secs(b.recover_secs);
        let recovered_at = loop {
            if let Some(t) = control.recovered(t_end, p99_limit, RECOVERY_RUN) {
                break Some(t);
            }
            if Instant::now() >= give_up {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let t_done = Instant::now();
        let stats = control.stats(t0, t_end);
        let aftermath = control.stats(t_end, recovered_at.unwrap_or(t_done));
        let recovery_s = recovered_at.map(|t| t.saturating_duration_since(t_end).as_secs_f64());
        let rss_peak = rss.peak(t0, t_done);
        let timeline = rss.timeline(t0, t_done);
        let control_timeline = control.timeline(t0, t_done);
        let (outcome, error) = match result {
            Ok(o) => (o, None),
            Err(e) => (Outcome::default(), Some(crate::report(&e))),
        };
        let mut terms = vec![
            ("RSS before".to_string(), rss_before),
            ("slack".to_string(), SLACK),
        ];
        terms.extend(outcome.budget.iter().cloned());
        let budget: u64 = terms.iter().map(|t| t.1).sum();
        let p50_ms = pct_ms(&stats.lat_us, 0.5);
        let p99_ms = pct_ms(&stats.lat_us, 0.99);
        let served = stats.timeouts + aftermath.timeouts == 0
            && stats.disconnects + aftermath.disconnects == 0
            && p99_ms <= p99_limit
            && recovery_s.is_some();
        let pass = error.is_none() && rss_peak <= budget && served && outcome.defended;
        let row = Row {
            name,
            timeline,
            control_timeline,
            rss_before,
            rss_peak,
            rss_after,
            budget,
            terms,
            p50_ms,
            p99_ms,
            served,
            pass,
            recovery_s,
            aftermath,
            control: stats,
            outcome,
            error,
        };
        say(
            b.json,
            &format!(
                "[{}] {name}: RSS {:.1} → peak {:.1} (budget {:.1}) → after {:.1} MiB; control p50/p99 {p50_ms:.2}/{p99_ms:.2} ms over {} (timeouts {}, disconnects {}), {}; {}",
                if row.pass { "PASS" } else { "FAIL" },
                mib(row.rss_before),
                mib(row.rss_peak),
                mib(row.budget),
                mib(row.rss_after),
                row.control.lat_us.len(),
                row.control.timeouts + row.aftermath.timeouts,
                row.control.disconnects + row.aftermath.disconnects,
                recovery_text(row.recovery_s),
                row.error.as_deref().unwrap_or(&row.outcome.summary),
            ),
        );
        rows.push(row);
    }

    control.stop.store(true, Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(5), control_task).await;
    let final_rss = rss.now(Duration::from_millis(500));
    let peak_all = rss.peak(base_start, Instant::now());
    rss.stop.store(true, Relaxed);
    let exit = relay.stop();
    let all_pass = rows.iter().all(|r| r.pass);
    if b.json {
        let attacks: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({
                    "attack": r.name,
                    "pass": r.pass,
                    "error": r.error,
                    "rss_before_mib": mib(r.rss_before),
                    "rss_peak_mib": mib(r.rss_peak),
                    "rss_after_mib": mib(r.rss_after),
                    "budget_mib": mib(r.budget),
                    "budget_terms_mib": r.terms.iter().map(|(k, v)| json!([k, mib(*v)])).collect::<Vec<_>>(),
                    "within_budget": r.rss_peak <= r.budget,
                    "control_max_ms_each_second": r.control_timeline,
                    "rss_each_second_mib": r.timeline.iter().map(|v| (mib(*v) * 10.0).round() / 10.0).collect::<Vec<_>>(),
                    "control": {
                        "samples": r.control.lat_us.len(),
                        "recovered_after_s": r.recovery_s,
                        "aftermath_timeouts": r.aftermath.timeouts,
                        "aftermath_disconnects": r.aftermath.disconnects,
                        "aftermath_max_ms": r.aftermath.lat_us.iter().max().map(|u| *u as f64 / 1000.0),
                        "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
                        "timeouts": r.control.timeouts,
                        "disconnects": r.control.disconnects,
                        "served": r.served,
                    },
                    "defended": r.outcome.defended,
                    "outcome": r.outcome.summary,
                    "details": Value::Object(r.outcome.details.clone()),
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "relay_bin": bin.display().to_string(),
                "relay_exit": exit,
                "config_overrides": BENCH_CONFIG.lines().filter(|l| l.contains('=')).collect::<Vec<_>>(),
                "set": b.set,
                "fd_room": fd_room,
                "baseline": {
                    "samples": baseline.lat_us.len(),
                    "p50_ms": base_p50, "p99_ms": base_p99,
                    "rss_mib": mib(base_rss),
                    "p99_limit_ms": p99_limit,
                },
                "attacks": attacks,
                "final_rss_mib": mib(final_rss),
                "peak_rss_mib": mib(peak_all),
                "pass": all_pass,
            })
        );
    } else {
        println!();
        println!(
            "| attack | RSS before / peak / after MiB | budget MiB | within | control p50 / p99 ms (baseline {base_p50:.2} / {base_p99:.2}) | control >2 s / disconnects | control back to normal | defended | result |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {:.1} / {:.1} / {:.1} | {:.1} | {} | {:.2} / {:.2} | {} / {} | {} | {} | {} |",
                r.name,
                mib(r.rss_before),
                mib(r.rss_peak),
                mib(r.rss_after),
                mib(r.budget),
                if r.rss_peak <= r.budget {
                    "yes"
                } else {
                    "**no**"
                },
                r.p50_ms,
                r.p99_ms,
                r.control.timeouts + r.aftermath.timeouts,
                r.control.disconnects + r.aftermath.disconnects,
                match r.recovery_s {
                    Some(s) if s < 0.5 => "at once".to_string(),
                    Some(s) => format!("after {s:.1} s"),
                    None => "**no**".to_string(),
                },
                if r.outcome.defended { "yes" } else { "**no**" },
                if r.pass { "PASS" } else { "**FAIL**" },
            );
        }
        println!();
        for r in &rows {
            println!(
                "{}: {}",
                r.name,
                r.error.as_deref().unwrap_or(&r.outcome.summary)
            );
            let terms: Vec<String> = r
                .terms
                .iter()
                .map(|(k, v)| format!("{k} {:.1}", mib(*v)))
                .collect();
            println!("  budget {:.1} MiB = {}", mib(r.budget), terms.join(" + "));
        }
        println!();
        println!(
            "relay RSS: baseline {:.1} MiB, peak {:.1} MiB, at the end {:.1} MiB; relay exit: {exit}",
            mib(base_rss),
            mib(peak_all),
            mib(final_rss)
        );
        println!("{}", if all_pass { "PASS" } else { "FAIL" });
    }
    if !all_pass {
        eprintln!("relay log: {}", relay.log.display());
        let log = std::fs::read_to_string(&relay.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        for l in tail.iter().rev() {
            eprintln!("  {l}");
        }
        anyhow::bail!("at least one attack failed");
    }
    Ok(())
}
