//! `meshwhisper bench federation`: N relays in one process join a mesh
//! through one bootstrap relay; measures how long until every relay's
//! address book holds all N signed records.

use anyhow::Context as _;
use meshwhisper_node::config::Config;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct FederationBench {
    /// Relays (the first is everyone's bootstrap).
    #[arg(long, default_value_t = 50)]
    relays: usize,
    /// Anti-entropy interval, ms.
    #[arg(long, default_value_t = 10_000)]
    anti_entropy_ms: u64,
    /// Publish records over gossipsub (off: anti-entropy alone).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    gossip: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(b: FederationBench) -> anyhow::Result<()> {
    anyhow::ensure!(b.relays >= 2, "--relays must be at least 2");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(converge(b))
}

async fn converge(b: FederationBench) -> anyhow::Result<()> {
    let root = tempfile::tempdir().context("temporary directory")?;
    let config = |i: usize, bootstrap: Option<String>| {
        let mut c = Config {
            data_dir: root.path().join(format!("relay-{i}")),
            http: "127.0.0.1:0".into(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
            ..Config::default()
        };
        c.federation.anti_entropy_ms = b.anti_entropy_ms;
        c.federation.record_gossip = b.gossip;
        c.federation.bootstrap = bootstrap.into_iter().collect();
        c
    };
    let started = Instant::now();
    let first = meshwhisper_node::start(config(0, None))
        .await
        .context("starting relay 0")?;
    let mut addrs = first.p2p.listen_addrs.clone();
    let addr = tokio::time::timeout(Duration::from_secs(10), addrs.wait_for(|a| !a.is_empty()))
        .await
        .context("relay 0 did not listen")?
        .context("relay 0 stopped")?[0]
        .clone();
    let boot = format!("{addr}/p2p/{}", first.p2p.peer_id);
    let mut relays = vec![first];
    for i in 1..b.relays {
        relays.push(
            meshwhisper_node::start(config(i, Some(boot.clone())))
                .await
                .with_context(|| format!("starting relay {i}"))?,
        );
    }
    let all_started = started.elapsed();
    let want = b.relays as u64;
    let deadline = Instant::now() + Duration::from_secs(b.timeout);
    let mut every = tokio::time::interval(Duration::from_millis(200));
    let mut next_report = Instant::now();
    let (converged, min_known) = loop {
        every.tick().await;
        let mut min = u64::MAX;
        let mut sum = 0;
        for r in &relays {
            let n = r.core.store.address_book().count().await.unwrap_or(0);
            min = min.min(n);
            sum += n;
        }
        if !b.json && Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            println!(
                "t={:5.1}s  records known: min {min}, mean {:.1}",
                started.elapsed().as_secs_f64(),
                sum as f64 / relays.len() as f64
            );
        }
        if min >= want {
            break (Some(started.elapsed()), min);
        }
        if Instant::now() > deadline {
            break (None, min);
        }
    };
    let learned: u64 = relays
        .iter()
        .map(|r| {
            r.core
                .metrics
                .federation
                .records_learned
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    for r in relays {
        r.shutdown().await;
    }
    let summary = serde_json::json!({
        "relays": b.relays,
        "anti_entropy_ms": b.anti_entropy_ms,
        "gossip": b.gossip,
        "all_started_s": all_started.as_secs_f64(),
        "converged_s": converged.map(|d| d.as_secs_f64()),
        "converged_after_last_start_s": converged.map(|d| d.saturating_sub(all_started).as_secs_f64()),
        "min_records_known": min_known,
        "records_learned_total": learned,
    });
    if b.json {
        println!("{summary}");
    } else {
        println!(
            "relays={} gossip={} anti_entropy_ms={}",
            b.relays, b.gossip, b.anti_entropy_ms
        );
        println!("all_started_s={:.2}", all_started.as_secs_f64());
        match converged {
            Some(d) => println!(
                "converged_s={:.2} (after the last relay started: {:.2})",
                d.as_secs_f64(),
                d.saturating_sub(all_started).as_secs_f64()
            ),
            None => println!(
                "not converged within {} s: min records known {min_known}",
                b.timeout
            ),
        }
        println!("records_learned_total={learned}");
    }
    anyhow::ensure!(converged.is_some(), "the address books did not converge");
    Ok(())
}
