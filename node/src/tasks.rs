//! The relay's background tasks, each stopped by the node's cancellation
//! token: stored packets handed back to federation after a start, homed
//! hashes written once a second, the expiry sweeper, the blocklist watcher
//! and the `/events` ticker.

use crate::config::Config;
use crate::core::{Core, now_ms};
use crate::events::EventCounts;
use crate::p2p::P2p;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a start waits for a first relay before handing stored packets
/// back to federation anyway.
const REFEDERATE_WAIT: Duration = Duration::from_secs(60);
/// How often `/events` takes the counts.
const EVENTS_EVERY: Duration = Duration::from_millis(250);

/// Starts every background task but the `/events` ticker.
pub(crate) fn spawn_all(
    cfg: &Config,
    core: &Arc<Core>,
    p2p: &P2p,
    cancel: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    let mut tasks = vec![
        tokio::spawn(refederate(
            core.clone(),
            p2p.federation.clone(),
            cfg.federation.max_pending,
            cancel.clone(),
        )),
        tokio::spawn(flush_homed(core.clone(), cancel.clone())),
        tokio::spawn(sweep(
            core.clone(),
            cfg.storage.sweep_batch,
            Duration::from_secs(cfg.storage.sweep_interval_secs),
            cancel.clone(),
        )),
    ];
    if let Some(path) = cfg.federation.blocklist_file.clone() {
        tasks.push(tokio::spawn(watch_blocklist(
            path,
            p2p.blocklist.clone(),
            cancel.clone(),
        )));
    }
    tasks
}

/// Packets stored for relays elsewhere before a restart go out again, once
/// there is a relay to send them to (or after [`REFEDERATE_WAIT`]).
async fn refederate(
    core: Arc<Core>,
    mut status: tokio::sync::watch::Receiver<crate::p2p::FedStatus>,
    max_pending: usize,
    cancel: CancellationToken,
) {
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = tokio::time::timeout(REFEDERATE_WAIT, status.wait_for(|s| !s.connected.is_empty())) => {}
    }
    let n = core
        .refederate_stored(max_pending, &Default::default(), &Default::default())
        .await;
    if n > 0 {
        tracing::info!(packets = n, "stored packets handed back to the federation");
    }
}

/// Homed hashes registered since the last second go to the store (and the
/// rest at shutdown).
async fn flush_homed(core: Arc<Core>, cancel: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = every.tick() => core.flush_homed().await,
        }
    }
    core.flush_homed().await;
}

/// Expiry: bounded work per call, repeated while there is more. Address
/// records too old to be accepted and homed hashes past their time go too.
async fn sweep(core: Arc<Core>, batch: u32, every: Duration, cancel: CancellationToken) {
    let store = core.store.clone();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tick.tick() => loop {
                let now = now_ms();
                let stale = now.saturating_sub(meshwhisper_crypto::address_record::MAX_AGE_MS);
                if let Err(e) = store.address_book().expire(stale).await {
                    tracing::warn!(error = %e, "expiring address records");
                }
                core.expire_homed(now);
                if let Err(e) = store.homed().expire(now).await {
                    tracing::warn!(error = %e, "expiring homed hashes");
                }
                match store.sweep(now, batch).await {
                    Ok(r) if r.more && !cancel.is_cancelled() => continue,
                    Ok(r) => {
                        if r.mailbox + r.media > 0 {
                            tracing::debug!(mailbox = r.mailbox, media = r.media, "expired");
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "expiry sweep failed");
                        break;
                    }
                }
            },
        }
    }
}

/// `/events`: one ticker takes the counts every [`EVENTS_EVERY`].
pub(crate) async fn events_ticker(
    counts: Arc<EventCounts>,
    tx: tokio::sync::broadcast::Sender<String>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(EVENTS_EVERY);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {
                if let Some(line) = counts.take() {
                    let _ = tx.send(line);
                }
            }
        }
    }
}

/// Re-reads the blocklist when the file changes (checked every second) and
/// on SIGHUP, and hands it to the Swarm task. A file that does not parse
/// keeps the previous list in force.
async fn watch_blocklist(
    path: std::path::PathBuf,
    tx: tokio::sync::mpsc::Sender<std::collections::HashSet<libp2p::PeerId>>,
    cancel: CancellationToken,
) {
    let stamp = |p: &std::path::Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut last = stamp(&path);
    let mut every = tokio::time::interval(Duration::from_secs(1));
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let forced = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = hangup => true,
            _ = every.tick() => false,
        };
        let now = stamp(&path);
        if !forced && now == last {
            continue;
        }
        last = now;
        match crate::read_blocklist(&path) {
            Ok(set) => {
                tracing::info!(path = %path.display(), entries = set.len(), "blocklist reloaded");
                if tx.send(set).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "blocklist not reloaded");
            }
        }
    }
}
