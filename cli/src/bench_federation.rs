//! `meshwhisper bench federation`: N relays in one process join a mesh
//! through one bootstrap relay; measures how long until every relay's
//! address book holds all N signed records (cold convergence), then, with
//! `--changes K`, restarts K relays one at a time on new ports and measures
//! how long each changed record takes to reach every other relay of the
//! warm mesh.

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
    /// After converging, restart this many relays (one at a time, on new
    /// ports) and time each new record's spread to every other relay.
    #[arg(long, default_value_t = 0)]
    changes: usize,
    /// Before the first change, wait this long after the books converged,
    /// seconds: a mesh that just converged is still dialling and
    /// reconciling, and on this one machine that load is every relay's
    /// (the changes are timed on a warm, settled mesh).
    #[arg(long, default_value_t = 20)]
    settle_s: u64,
    /// Pause between two changes, ms (the mesh settles in between).
    #[arg(long, default_value_t = 1000)]
    change_pause_ms: u64,
    /// `federation.max_peers` of every relay. With the default (64) and
    /// more relays than that, the bootstrap refuses the later ones and
    /// keeps them only as guests, to learn the others from its book.
    #[arg(long, default_value_t = 64)]
    max_peers: usize,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(b: FederationBench) -> anyhow::Result<()> {
    anyhow::ensure!(b.relays >= 2, "--relays must be at least 2");
    // The relays' logs, as RUST_LOG asks (nothing by default), on stderr.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
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
        c.federation.max_peers = b.max_peers;
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
    // Every 25 ms; a relay's book is counted (a store read) only once it
    // has learned enough records to be complete, and not again after.
    let mut every = tokio::time::interval(Duration::from_millis(25));
    let mut next_report = Instant::now();
    let mut counts = vec![0u64; relays.len()];
    let (converged, min_known) = loop {
        every.tick().await;
        for (r, n) in relays.iter().zip(counts.iter_mut()) {
            let learned = r
                .core
                .metrics
                .federation
                .records_learned
                .load(std::sync::atomic::Ordering::Relaxed);
            if *n < want && learned + 1 >= want {
                *n = r.core.store.address_book().count().await.unwrap_or(0);
            } else if *n < want {
                *n = learned + 1;
            }
        }
        let min = counts.iter().copied().min().unwrap_or(0);
        let sum: u64 = counts.iter().sum();
        if !b.json && Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            let total = |f: fn(&meshwhisper_node::metrics::FederationMetrics) -> u64| -> u64 {
                relays.iter().map(|r| f(&r.core.metrics.federation)).sum()
            };
            let incomplete = counts.iter().filter(|&&n| n < want).count();
            println!(
                "t={:5.2}s  incomplete {incomplete} records known: min {min}, mean {:.1}; learned {}, rounds {}, peers {}, dials {}",
                started.elapsed().as_secs_f64(),
                sum as f64 / relays.len() as f64,
                total(|f| f.records_learned.load(std::sync::atomic::Ordering::Relaxed)),
                total(|f| f
                    .anti_entropy_rounds
                    .load(std::sync::atomic::Ordering::Relaxed)),
                total(|f| f.peers_connected.load(std::sync::atomic::Ordering::Relaxed)),
                total(|f| f
                    .discovered_dials
                    .load(std::sync::atomic::Ordering::Relaxed)),
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
    let spread = if converged.is_some() && b.changes > 0 {
        tokio::time::sleep(Duration::from_secs(b.settle_s)).await;
        changes(&b, &boot, &mut relays, &config).await?
    } else {
        Vec::new()
    };
    for r in relays {
        r.shutdown().await;
    }
    let pct = |q: f64| -> Option<f64> {
        let mut v = spread.clone();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1])
    };
    let summary = serde_json::json!({
        "changes": spread.len(),
        "change_spread_s": spread,
        "change_p50_s": pct(0.50),
        "change_p99_s": pct(0.99),
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
        if !spread.is_empty() {
            println!(
                "changes={} spread p50={:.3}s p99={:.3}s max={:.3}s",
                spread.len(),
                pct(0.50).unwrap_or(0.0),
                pct(0.99).unwrap_or(0.0),
                spread.iter().copied().fold(0.0, f64::max)
            );
        }
    }
    anyhow::ensure!(converged.is_some(), "the address books did not converge");
    Ok(())
}

/// Restarts relays 1, 2, ... (cycling) one at a time on a new port; for
/// each, the seconds from the restart until every other relay's book holds
/// its new record (with the new port).
async fn changes(
    b: &FederationBench,
    boot: &str,
    relays: &mut Vec<meshwhisper_node::Running>,
    config: &impl Fn(usize, Option<String>) -> Config,
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(b.changes);
    for k in 0..b.changes {
        tokio::time::sleep(Duration::from_millis(b.change_pause_ms)).await;
        let i = 1 + k % (relays.len() - 1);
        let key =
            meshwhisper_node::federation::key_of(&relays[i].p2p.peer_id).context("relay key")?;
        let old_port = port_of(&relays[i]).await;
        // Stop relay i and start it again on its data directory (same key).
        relays.remove(i).shutdown().await;
        let t0 = Instant::now();
        let restarted = meshwhisper_node::start(config(i, Some(boot.to_string())))
            .await
            .with_context(|| format!("restarting relay {i}"))?;
        relays.insert(i, restarted);
        let new_port = port_of(&relays[i]).await;
        anyhow::ensure!(new_port != old_port, "relay {i} got its old port back");
        let deadline = t0 + Duration::from_secs(b.timeout);
        let needle = format!("/tcp/{new_port}");
        // Only the relays still without it are read again (99 reads every
        // 10 ms would load the machine the relays run on).
        let mut missing: Vec<usize> = (0..relays.len()).filter(|&j| j != i).collect();
        let mut every = tokio::time::interval(Duration::from_millis(10));
        while !missing.is_empty() {
            every.tick().await;
            let mut still = Vec::with_capacity(missing.len());
            for j in missing {
                let has = match relays[j].core.store.address_book().get(&key).await {
                    Ok(Some(rec)) => rec.addrs().iter().any(|a| {
                        libp2p::Multiaddr::try_from(a.clone())
                            .is_ok_and(|m| m.to_string().contains(&needle))
                    }),
                    _ => false,
                };
                if !has {
                    still.push(j);
                }
            }
            missing = still;
            anyhow::ensure!(
                missing.is_empty() || Instant::now() < deadline,
                "change {k}: relay {i}'s new record did not reach relays {missing:?}"
            );
        }
        let took = t0.elapsed().as_secs_f64();
        if !b.json {
            println!("change {k}: relay {i} on port {new_port}: everywhere after {took:.3} s");
        }
        out.push(took);
    }
    Ok(out)
}

/// The TCP port a relay listens on.
async fn port_of(r: &meshwhisper_node::Running) -> u16 {
    let mut addrs = r.p2p.listen_addrs.clone();
    let list = match tokio::time::timeout(
        Duration::from_secs(10),
        addrs.wait_for(|a| !a.is_empty()),
    )
    .await
    {
        Ok(Ok(a)) => a.clone(),
        _ => return 0,
    };
    list.iter()
        .flat_map(|a| a.iter())
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .unwrap_or(0)
}
