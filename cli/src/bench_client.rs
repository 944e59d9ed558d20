//! `meshwhisper bench client`: messages per second between two clients
//! through one relay on loopback (encrypted, padded, sealed, with delivery
//! receipts), and first-contact (claim + PQXDH + first message) latency.
//!
//! Everything runs in this process on the same cores: a relay on embedded
//! defaults in a temporary directory, two client profiles, and for
//! first-contact latency a fresh profile per measurement.

use crate::bench::percentile;
use anyhow::Context as _;
use libp2p::multiaddr::Protocol;
use meshwhisper_client::{Client, Config, ConnectionState, Event, Profile, ReceiptKind};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};

#[derive(Debug, clap::Args)]
pub struct ClientBench {
    /// Messages Alice sends Bob.
    #[arg(long, default_value_t = 2000)]
    msgs: u32,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Messages in flight (sent, not yet received).
    #[arg(long, default_value_t = 64)]
    window: u32,
    /// First contacts to time (fresh profiles writing to Bob).
    #[arg(long, default_value_t = 20)]
    first_contacts: u32,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

async fn wait(
    events: &mut mpsc::Receiver<Event>,
    mut f: impl FnMut(&Event) -> bool,
) -> anyhow::Result<Event> {
    loop {
        let e = events.recv().await.context("client stopped")?;
        if f(&e) {
            return Ok(e);
        }
    }
}

async fn start(dir: &std::path::Path) -> anyhow::Result<(Client, mpsc::Receiver<Event>)> {
    let mut cfg = Config::new(dir);
    cfg.events_queue = 65_536;
    let (c, mut e) = Client::start(cfg).await?;
    wait(&mut e, |e| {
        matches!(e, Event::Connection(ConnectionState::Connected))
    })
    .await?;
    Ok((c, e))
}

pub fn run(b: ClientBench) -> anyhow::Result<()> {
    anyhow::ensure!(
        b.msgs > 0 && b.window > 0 && b.size <= meshwhisper_client::envelope::MAX_BODY,
        "--msgs and --window must be positive and --size at most {}",
        meshwhisper_client::envelope::MAX_BODY
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let timeout = Duration::from_secs(b.timeout);
    rt.block_on(async move {
        tokio::time::timeout(timeout, bench(b))
            .await
            .context("benchmark timed out")?
    })
}

async fn bench(b: ClientBench) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir().context("temporary directory")?;
    let cfg = meshwhisper_node::config::Config {
        data_dir: tmp.path().join("relay"),
        http: "127.0.0.1:0".into(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        ..Default::default()
    };
    let relay = meshwhisper_node::start(cfg).await?;
    let mut addrs = relay.p2p.listen_addrs.clone();
    let addr = addrs
        .wait_for(|a| !a.is_empty())
        .await
        .context("relay listening")?[0]
        .clone()
        .with(Protocol::P2p(relay.p2p.peer_id));
    let relay_addr = [addr];
    let (a, bob_dir) = (tmp.path().join("alice"), tmp.path().join("bob"));
    Profile::create(&a, &relay_addr, "alice").await?;
    let bob_invite = Profile::create(&bob_dir, &relay_addr, "bob")
        .await?
        .invite();
    let (bob, mut bob_ev) = start(&bob_dir).await?;
    wait(&mut bob_ev, |e| {
        matches!(e, Event::PrekeysPublished { one_time: 100 })
    })
    .await?;

    // First contact: a fresh profile each time, timed from `send` to Bob's
    // message event (claim, PQXDH, encrypt, relay, decrypt).
    let mut first = Vec::new();
    for i in 0..b.first_contacts {
        let dir = tmp.path().join(format!("carol{i}"));
        Profile::create(&dir, &relay_addr, &format!("carol{i}")).await?;
        let (carol, _carol_ev) = start(&dir).await?;
        carol.add_contact(bob_invite.clone(), None).await?;
        let t0 = Instant::now();
        carol.send("bob", b"hello".to_vec()).await?;
        wait(
            &mut bob_ev,
            |e| matches!(e, Event::Message(m) if m.contact.starts_with("carol")),
        )
        .await?;
        first.push(t0.elapsed().as_micros() as u64);
        carol.shutdown().await;
    }

    // Throughput: Alice keeps `window` messages in flight to Bob; done when
    // Bob has all and Alice has every delivery receipt.
    let (alice, mut alice_ev) = start(&a).await?;
    alice.add_contact(bob_invite, None).await?;
    let window = Arc::new(Semaphore::new(b.window as usize));
    let body: Vec<u8> = (0..b.size).map(|i| b'a' + (i % 26) as u8).collect();
    let t0 = Instant::now();
    let sender = {
        let (alice, window) = (alice.clone(), window.clone());
        let n = b.msgs;
        tokio::spawn(async move {
            // Sends are issued concurrently (up to the window), as an app
            // sending from several tasks would; the client batches them.
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..n {
                window.acquire().await?.forget();
                let (alice, body) = (alice.clone(), body.clone());
                tasks.spawn(async move { alice.send("bob", body).await });
            }
            while let Some(r) = tasks.join_next().await {
                r??;
            }
            anyhow::Ok(())
        })
    };
    let mut lat = Vec::with_capacity(b.msgs as usize);
    let mut received = 0;
    let mut receipts = 0usize;
    while received < b.msgs || receipts < b.msgs as usize {
        tokio::select! {
            e = bob_ev.recv() => {
                if let Some(Event::Message(m)) = e && m.contact == "alice" {
                    received += 1;
                    window.add_permits(1);
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
                    lat.push(now.saturating_sub(m.sent_ms) * 1000);
                }
            }
            e = alice_ev.recv() => {
                if let Some(Event::Receipt { kind: ReceiptKind::Delivered, ids, .. }) = e {
                    receipts += ids.len();
                }
            }
        }
    }
    let elapsed = t0.elapsed();
    sender.await??;
    lat.sort_unstable();
    first.sort_unstable();
    let rate = f64::from(b.msgs) / elapsed.as_secs_f64();
    let summary = serde_json::json!({
        "msgs": b.msgs, "size": b.size, "window": b.window, "seconds": elapsed.as_secs_f64(),
        "msgs_per_sec": rate, "p50_ms": percentile(&lat, 0.5) as f64 / 1000.0,
        "p99_ms": percentile(&lat, 0.99) as f64 / 1000.0,
        "first_contacts": first.len(),
        "first_contact_p50_ms": percentile(&first, 0.5) as f64 / 1000.0,
        "first_contact_max_ms": first.last().copied().unwrap_or(0) as f64 / 1000.0,
    });
    if b.json {
        println!("{summary}");
    } else {
        println!("msgs={} size={} window={}", b.msgs, b.size, b.window);
        println!(
            "seconds={:.2} msgs_per_sec={rate:.0} (all received and all receipts back)",
            elapsed.as_secs_f64()
        );
        println!(
            "latency_p50_ms={:.1} latency_p99_ms={:.1}",
            percentile(&lat, 0.5) as f64 / 1000.0,
            percentile(&lat, 0.99) as f64 / 1000.0
        );
        println!(
            "first_contact n={} p50_ms={:.1} max_ms={:.1}",
            first.len(),
            percentile(&first, 0.5) as f64 / 1000.0,
            first.last().copied().unwrap_or(0) as f64 / 1000.0
        );
    }
    alice.shutdown().await;
    bob.shutdown().await;
    relay.shutdown().await;
    Ok(())
}
