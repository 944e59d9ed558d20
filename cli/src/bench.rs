//! `meshwhisper bench relay`: a load generator speaking the reference
//! WebSocket protocol, so the same run measures our relay and the
//! reference relay.
//!
//! P sender/receiver pairs; each receiver registers its own destination
//! hash; each sender keeps at most W packets in flight (sent, not yet
//! received) and sends M packets of S bytes. Every payload carries its
//! sequence number and send time, so the receiver counts losses and
//! duplicates and measures latency.
//!
//! With `--offline`, the receivers are away while the senders send: each
//! sender sends its M packets (spread over the `--dests` hashes of its
//! receiver, W per write) and closes, which the relay answers once it has
//! stored everything it read; then the receivers connect and drain. The
//! store and drain phases are timed apart.

use anyhow::Context as _;
use futures::{SinkExt as _, StreamExt as _};
use meshwhisper_crypto::destination::DestHash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Load a relay over its WebSocket protocol.
    Relay(RelayBench),
    /// Two clients messaging through an in-process relay, and
    /// first-contact latency.
    Client(crate::bench_client::ClientBench),
    /// Federation: address-book convergence of N in-process relays from
    /// one bootstrap.
    Federation(crate::bench_federation::FederationBench),
    /// Abuse resistance: replays attacks against a relay it starts and
    /// reports memory against a budget and a control client's latency.
    Abuse(crate::bench_abuse::AbuseBench),
    /// A minimal WebSocket forwarder that stores nothing: the practical
    /// limit `bench relay` measures a relay against
    /// (scripts/bench-limit.sh runs both side by side).
    Forwarder(crate::bench_forwarder::ForwarderBench),
    /// One hole punch through a relay's anchor service (run on both ends
    /// by scripts/bench-holepunch.sh in testnet/nat.sh's namespaces).
    Holepunch(crate::bench_holepunch::HolepunchBench),
    /// Onion transit per packet against its primitives, in one run.
    Onion(crate::bench_onion::OnionBench),
}

/// The value at fraction `p` of a sorted slice (0 when empty).
pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0)
}

#[derive(Debug, clap::Args)]
pub struct RelayBench {
    /// The relay's WebSocket URL, e.g. ws://127.0.0.1:8080/ (receivers
    /// connect here, and senders too unless --sender-url is given).
    #[arg(long)]
    url: String,
    /// Senders connect to this relay instead (federation: packets cross
    /// from it to --url's relay).
    #[arg(long)]
    sender_url: Option<String>,
    /// Senders name the receivers' home relay (hex Ed25519 key) in a
    /// `route` frame, so federation sends packets straight there.
    #[arg(long, value_name = "HEX")]
    home_relay: Option<String>,
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 50)]
    pairs: u32,
    /// Packets per pair.
    #[arg(long, default_value_t = 2000)]
    msgs: u32,
    /// Packet size in bytes (header included, at least 47).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Packets in flight per pair.
    #[arg(long, default_value_t = 16)]
    window: u32,
    /// Give up waiting for stragglers after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Load generator threads (0: one per core; 1: a single-threaded
    /// runtime).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// PID of the relay, to report its resident memory and the CPU time
    /// it spent during the run (Linux).
    #[arg(long)]
    relay_pid: Option<u32>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// The offline path: store everything while the receivers are away,
    /// then drain it (see the module docs).
    #[arg(long)]
    offline: bool,
    /// Destination hashes per receiver (`--offline`): a relay keeps a
    /// bounded number of packets per hash (`storage.max_blobs_per_hash`),
    /// so M packets need at least M / that many hashes.
    #[arg(long, default_value_t = 1)]
    dests: u32,
}

struct PairResult {
    delivered: u64,
    duplicates: u64,
    latencies_us: Vec<u64>,
    /// When the last packet arrived (before the receiver said goodbye).
    finished: Option<Instant>,
}

/// Every receiver's result, and the CPU time the relay (`pid`) spent since
/// `cpu_before`.
async fn gather(
    tasks: Vec<tokio::task::JoinHandle<PairResult>>,
    pid: Option<u32>,
    cpu_before: Option<f64>,
) -> anyhow::Result<(Vec<PairResult>, Option<f64>)> {
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.context("receiver task")?);
    }
    let cpu = pid
        .and_then(cpu_seconds)
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    Ok((results, cpu))
}

/// Packets delivered and duplicates, over all receivers.
fn totals(results: &[PairResult]) -> (u64, u64) {
    results
        .iter()
        .fold((0, 0), |(d, u), r| (d + r.delivered, u + r.duplicates))
}

/// When the last of the receivers had all it was going to get.
fn finished(results: &[PairResult], started: Instant) -> Duration {
    results
        .iter()
        .filter_map(|r| r.finished)
        .max()
        .map_or(Duration::ZERO, |t| t.saturating_duration_since(started))
}

/// A process's user + system CPU time so far, in seconds (Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from its ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // In clock ticks of USER_HZ, which Linux fixes at 100 on every
    // architecture it exports /proc for (sysconf(_SC_CLK_TCK)).
    Some(ticks as f64 / 100.0)
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let b = match cmd {
        BenchCommand::Relay(b) => b,
        BenchCommand::Client(b) => return crate::bench_client::run(b),
        BenchCommand::Federation(b) => return crate::bench_federation::run(b),
        BenchCommand::Abuse(b) => return crate::bench_abuse::run(b),
        BenchCommand::Forwarder(b) => return crate::bench_forwarder::run(b),
        BenchCommand::Holepunch(b) => return crate::bench_holepunch::run(b),
        BenchCommand::Onion(b) => return crate::bench_onion::run(b),
    };
    anyhow::ensure!(
        b.size >= 47,
        "--size must be at least 47 (31-byte header + 16-byte stamp)"
    );
    anyhow::ensure!(
        b.pairs > 0 && b.msgs > 0 && b.window > 0 && b.dests > 0,
        "--pairs, --msgs, --window and --dests must be positive"
    );
    anyhow::ensure!(b.offline || b.dests == 1, "--dests is for --offline runs");
    let rt = match b.threads {
        // One thread, like an independent single-threaded load generator.
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
    .context("starting the runtime")?;
    if b.offline {
        rt.block_on(offline(b))
    } else {
        rt.block_on(relay(b))
    }
}

async fn connect(url: &str) -> anyhow::Result<Ws> {
    let (s, _) = tokio::time::timeout(
        Duration::from_secs(30),
        // TCP_NODELAY, as any latency-sensitive client would.
        tokio_tungstenite::connect_async_with_config(url, None, true),
    )
    .await
    .context("connect timed out")?
    .with_context(|| format!("connecting to {url}"))?;
    Ok(s)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One receiver: counts its pair's packets (by sequence number) until it
/// has all `msgs` or `deadline` passes, returning a window permit for
/// each, then closes the socket.
async fn receive(
    mut rx: Ws,
    msgs: u32,
    deadline: Instant,
    window: Option<Arc<Semaphore>>,
    epoch: Instant,
) -> PairResult {
    let mut seen = vec![false; msgs as usize];
    let mut r = PairResult {
        delivered: 0,
        duplicates: 0,
        latencies_us: Vec::with_capacity(msgs as usize),
        finished: None,
    };
    while r.delivered < u64::from(msgs) {
        let next = tokio::time::timeout_at(deadline.into(), rx.next()).await;
        let Ok(Some(Ok(m))) = next else { break };
        let Message::Binary(p) = m else { continue };
        if p.len() < 47 {
            continue;
        }
        let seq = u32::from_be_bytes([p[31], p[32], p[33], p[34]]) as usize;
        let sent_us = u64::from_be_bytes([p[35], p[36], p[37], p[38], p[39], p[40], p[41], p[42]]);
        if seq >= seen.len() {
            continue;
        }
        if seen[seq] {
            r.duplicates += 1;
            continue;
        }
        seen[seq] = true;
        r.delivered += 1;
        r.latencies_us
            .push((epoch.elapsed().as_micros() as u64).saturating_sub(sent_us));
        if let Some(w) = &window {
            w.add_permits(1);
        }
    }
    r.finished = Some(Instant::now());
    // The relay pings after each burst of deliveries and deletes their
    // stored copies once our pong confirms them: answer its pings until
    // it has none left to send (a quiet 200 ms), then close politely.
    // Leaving at once would leave the last bursts stored, to be sent
    // again on the next `hello`, and their deletion uncounted.
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(200), rx.next()).await {
        if matches!(m, Message::Ping(_)) && rx.flush().await.is_err() {
            break;
        }
    }
    if rx.close(None).await.is_ok() {
        let end = Instant::now() + Duration::from_secs(10);
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(end.into(), rx.next()).await {}
    }
    r
}

/// The destination hashes of one pair (`dests` of them).
fn pair_dests(run_id: u64, pair: u32, dests: u32) -> Vec<DestHash> {
    (0..dests)
        .map(|d| {
            DestHash(
                (run_id ^ (u64::from(pair) << 40) ^ (u64::from(d) << 20) ^ 0x5a5a_0000)
                    .to_be_bytes(),
            )
        })
        .collect()
}

/// A packet carrying `seq` and the send time.
fn stamped(payload: &mut [u8], dest: DestHash, seq: u32, epoch: Instant) -> Vec<u8> {
    payload[..4].copy_from_slice(&seq.to_be_bytes());
    payload[4..12].copy_from_slice(&(epoch.elapsed().as_micros() as u64).to_be_bytes());
    meshwhisper_behaviour::packet::build(1, dest, [0x42; 16], 7, payload)
}

/// `--offline`: store everything with the receivers away, then drain.
async fn offline(b: RelayBench) -> anyhow::Result<()> {
    let epoch = Instant::now();
    let run_id: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let dests: Vec<Vec<DestHash>> = (0..b.pairs)
        .map(|p| pair_dests(run_id, p, b.dests))
        .collect();
    let mut senders = Vec::new();
    for _ in 0..b.pairs {
        senders.push(connect(b.sender_url.as_deref().unwrap_or(&b.url)).await?);
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(b.timeout);
    let cpu_before = b.relay_pid.and_then(cpu_seconds);
    let mut tx_tasks = Vec::new();
    for (mut tx, to) in senders.into_iter().zip(dests.clone()) {
        let (msgs, size, window) = (b.msgs, b.size, b.window);
        tx_tasks.push(tokio::spawn(async move {
            let mut payload = vec![0u8; size - 31];
            let mut sent = 0u64;
            for seq in 0..msgs {
                let dest = to[seq as usize % to.len()];
                let pkt = stamped(&mut payload, dest, seq, epoch);
                if tx.feed(Message::Binary(pkt.into())).await.is_err() {
                    return sent;
                }
                sent += 1;
                if (seq + 1) % window == 0 && tx.flush().await.is_err() {
                    return sent;
                }
            }
            // The relay closes once everything it read is stored.
            if tx.close(None).await.is_ok() {
                while let Ok(Some(Ok(_))) =
                    tokio::time::timeout_at(deadline.into(), tx.next()).await
                {}
            }
            sent
        }));
    }
    let mut sent = 0;
    for t in tx_tasks {
        sent += t.await.context("sender task")?;
    }
    let stored_in = start.elapsed();
    let drain_start = Instant::now();
    let mut rx_tasks = Vec::new();
    for to in &dests {
        let mut rx = connect(&b.url).await?;
        let hashes: Vec<String> = to.iter().map(DestHash::to_hex).collect();
        let hello = serde_json::json!({"type": "hello", "destHashes": hashes}).to_string();
        rx.send(Message::Text(hello.into()))
            .await
            .context("hello")?;
        rx_tasks.push(tokio::spawn(receive(rx, b.msgs, deadline, None, epoch)));
    }
    let (results, relay_cpu_s) = gather(rx_tasks, b.relay_pid, cpu_before).await?;
    let drained_in = finished(&results, drain_start);
    let expected = u64::from(b.pairs) * u64::from(b.msgs);
    let (delivered, duplicates) = totals(&results);
    let per_sec = |n: u64, d: Duration| n as f64 / d.as_secs_f64();
    let summary = serde_json::json!({
        "offline": true, "pairs": b.pairs, "msgs": b.msgs, "size": b.size,
        "window": b.window, "dests": b.dests,
        "sent": sent, "expected": expected, "delivered": delivered,
        "lost": expected - delivered, "duplicates": duplicates,
        "store_seconds": stored_in.as_secs_f64(), "store_msgs_per_sec": per_sec(sent, stored_in),
        "drain_seconds": drained_in.as_secs_f64(), "drain_msgs_per_sec": per_sec(delivered, drained_in),
        "seconds": (stored_in + drained_in).as_secs_f64(),
        "msgs_per_sec": per_sec(delivered, stored_in + drained_in),
        "relay_cpu_s": relay_cpu_s,
        "relay_cpu_s_per_million": relay_cpu_s.filter(|_| delivered > 0).map(|c| c * 1e6 / delivered as f64),
        "relay_rss_kib": b.relay_pid.and_then(|p| rss_kib(p, "VmRSS:")),
        "relay_peak_rss_kib": b.relay_pid.and_then(|p| rss_kib(p, "VmHWM:")),
    });
    if b.json {
        println!("{summary}");
    } else {
        println!(
            "offline pairs={} msgs={} size={} dests={}",
            b.pairs, b.msgs, b.size, b.dests
        );
        println!(
            "delivered={delivered} lost={} duplicates={duplicates}",
            expected - delivered
        );
        println!(
            "store: seconds={:.2} msgs_per_sec={:.0}",
            stored_in.as_secs_f64(),
            per_sec(sent, stored_in)
        );
        println!(
            "drain: seconds={:.2} msgs_per_sec={:.0}",
            drained_in.as_secs_f64(),
            per_sec(delivered, drained_in)
        );
        if let Some(c) = relay_cpu_s {
            println!("relay_cpu_s={c:.2}");
        }
    }
    Ok(())
}

async fn relay(b: RelayBench) -> anyhow::Result<()> {
    let epoch = Instant::now();
    let run_id: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    let sent_total = Arc::new(AtomicU64::new(0));
    for pair in 0..b.pairs {
        let dest = pair_dests(run_id, pair, 1)[0];
        let mut rx = connect(&b.url).await?;
        let hello = serde_json::json!({"type": "hello", "destHashes": [dest.to_hex()]}).to_string();
        rx.send(Message::Text(hello.into()))
            .await
            .context("hello")?;
        let mut tx = connect(b.sender_url.as_deref().unwrap_or(&b.url)).await?;
        if let Some(home) = &b.home_relay {
            let route =
                serde_json::json!({"type": "route", "destHash": dest.to_hex(), "homeRelay": home});
            tx.send(Message::Text(route.to_string().into()))
                .await
                .context("route")?;
        }
        let window = Arc::new(Semaphore::new(b.window as usize));
        receivers.push((rx, window.clone(), dest));
        senders.push((tx, window, dest));
    }
    // Let every hello register before the first packet (bounded).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    let cpu_before = b.relay_pid.and_then(cpu_seconds);
    let deadline = start + Duration::from_secs(b.timeout);
    let mut rx_tasks = Vec::new();
    for (rx, window, _) in receivers {
        let msgs = b.msgs;
        rx_tasks.push(tokio::spawn(receive(
            rx,
            msgs,
            deadline,
            Some(window),
            epoch,
        )));
    }
    let mut tx_tasks = Vec::new();
    for (mut tx, window, dest) in senders {
        let (msgs, size, sent_total) = (b.msgs, b.size, sent_total.clone());
        tx_tasks.push(tokio::spawn(async move {
            let mut payload = vec![0u8; size - 31];
            let mut seq = 0u32;
            'send: while seq < msgs {
                // Wait for room, then send all the window allows in one
                // write (a flush per packet would make the load generator,
                // not the relay, the bottleneck).
                let Ok(Ok(permit)) =
                    tokio::time::timeout_at(deadline.into(), window.acquire()).await
                else {
                    break;
                };
                permit.forget();
                let mut room = 1 + window.available_permits().min((msgs - seq - 1) as usize);
                if room > 1 {
                    if let Ok(more) = window.try_acquire_many((room - 1) as u32) {
                        more.forget();
                    } else {
                        room = 1;
                    }
                }
                for _ in 0..room {
                    let pkt = stamped(&mut payload, dest, seq, epoch);
                    if tx.feed(Message::Binary(pkt.into())).await.is_err() {
                        break 'send;
                    }
                    seq += 1;
                }
                if tx.flush().await.is_err() {
                    break;
                }
                sent_total.fetch_add(room as u64, Relaxed);
            }
            tx
        }));
    }
    let (results, relay_cpu_s) = gather(rx_tasks, b.relay_pid, cpu_before).await?;
    let elapsed = finished(&results, start);
    for t in tx_tasks {
        let _ = t.await;
    }
    let expected = u64::from(b.pairs) * u64::from(b.msgs);
    let (delivered, duplicates) = totals(&results);
    let mut lat: Vec<u64> = results.into_iter().flat_map(|r| r.latencies_us).collect();
    lat.sort_unstable();
    let pct = |p: f64| percentile(&lat, p);
    let rate = delivered as f64 / elapsed.as_secs_f64();
    let rss = b.relay_pid.and_then(|p| rss_kib(p, "VmRSS:"));
    let hwm = b.relay_pid.and_then(|p| rss_kib(p, "VmHWM:"));
    let summary = serde_json::json!({
        "pairs": b.pairs, "msgs": b.msgs, "size": b.size, "window": b.window,
        "sent": sent_total.load(Relaxed), "expected": expected, "delivered": delivered,
        "lost": expected - delivered, "duplicates": duplicates,
        "seconds": elapsed.as_secs_f64(), "msgs_per_sec": rate,
        "p50_ms": pct(0.50) as f64 / 1000.0, "p99_ms": pct(0.99) as f64 / 1000.0,
        "p999_ms": pct(0.999) as f64 / 1000.0,
        "relay_cpu_s": relay_cpu_s,
        "relay_cpu_s_per_million": relay_cpu_s.filter(|_| delivered > 0).map(|c| c * 1e6 / delivered as f64),
        "relay_rss_kib": rss, "relay_peak_rss_kib": hwm,
    });
    if b.json {
        println!("{summary}");
    } else {
        println!(
            "pairs={} msgs={} size={} window={}",
            b.pairs, b.msgs, b.size, b.window
        );
        println!(
            "delivered={delivered} lost={} duplicates={duplicates}",
            expected - delivered
        );
        println!(
            "seconds={:.2} msgs_per_sec={rate:.0}",
            elapsed.as_secs_f64()
        );
        println!(
            "p50_ms={:.2} p99_ms={:.2} p999_ms={:.2}",
            pct(0.50) as f64 / 1000.0,
            pct(0.99) as f64 / 1000.0,
            pct(0.999) as f64 / 1000.0
        );
        if let Some(c) = relay_cpu_s {
            println!("relay_cpu_s={c:.2}");
        }
        if let (Some(r), Some(h)) = (rss, hwm) {
            println!("relay_rss_kib={r} relay_peak_rss_kib={h}");
        }
    }
    Ok(())
}
