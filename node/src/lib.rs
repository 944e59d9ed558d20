//! The MeshWhisper node: a content-blind relay.
//!
//! [`start`] opens the store, starts the client gateway (HTTP + WebSocket),
//! the libp2p Swarm task, the push worker, the `/events` ticker and the
//! expiry sweeper, all under one cancellation token. [`Running::shutdown`]
//! stops accepting, closes WebSockets with 1001, lets in-flight writes
//! commit, and returns.

pub mod config;
pub mod core;
pub mod device_directory;
pub mod device_session;
pub mod events;
pub mod federation;
pub mod gateway;
pub mod homed;
pub mod live;
pub mod metrics;
pub mod p2p;
pub mod push;
pub mod quota;
pub mod ratelimit;

use crate::config::Config;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long shutdown waits for client sessions to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store could not be opened.
    #[error(transparent)]
    Storage(#[from] meshwhisper_storage::Error),
    /// The Swarm could not start.
    #[error(transparent)]
    P2p(#[from] p2p::Error),
    /// The gateway address could not be bound.
    #[error("cannot listen for clients (HTTP) on {addr}: {source}{}", p2p::listen_hint(source).replace("--listen", "--http"))]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A running node.
pub struct Running {
    /// The gateway's bound address.
    pub http_addr: SocketAddr,
    /// The libp2p side.
    pub p2p: p2p::P2p,
    /// Shared relay state (for tests and tools).
    pub core: Arc<core::Core>,
    cancel: CancellationToken,
    sessions: tokio_util::task::TaskTracker,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("http_addr", &self.http_addr)
            .field("peer_id", &self.p2p.peer_id)
            .finish()
    }
}

impl Running {
    /// A token cancelled when the node shuts down.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops the node and waits for every task; the store's writer commits
    /// everything queued before it closes.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        // Sessions finish storing what they read and deleting what they
        // sent before the store closes (bounded: a stuck socket cannot
        // hold shutdown forever).
        self.sessions.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "client sessions still running after {SHUTDOWN_GRACE:?}; closing the store"
            );
        }
        self.core.store.close().await;
    }

    /// Waits until the token is cancelled (by a signal handler), then shuts down.
    pub async fn wait(self) {
        self.cancel.cancelled().await;
        self.shutdown().await;
    }
}

/// Starts a relay with `cfg`.
pub async fn start(cfg: Config) -> Result<Running, Error> {
    let cfg = Arc::new(cfg);
    let cancel = CancellationToken::new();
    let started = Instant::now();
    // Ports first: a relay that cannot listen changes nothing on disk.
    let listener = tokio::net::TcpListener::bind(&cfg.http)
        .await
        .map_err(|source| Error::Bind {
            addr: cfg.http.clone(),
            source,
        })?;
    let http_addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: cfg.http.clone(),
        source,
    })?;
    let store = meshwhisper_storage::Store::open(cfg.storage_config()).await?;
    let metrics = Arc::new(metrics::Metrics::default());
    let push = match &cfg.push_webhook_url {
        Some(url) => push::PushSender::start(
            url.clone(),
            cfg.limits.push_queue,
            metrics.clone(),
            cancel.clone(),
        ),
        None => push::PushSender::disabled(),
    };
    let core = Arc::new(core::Core::new(
        store.clone(),
        metrics.clone(),
        push,
        core::CoreLimits {
            max_packet: cfg.storage.max_blob_size,
            client_queue: cfg.limits.client_queue,
            client_queue_bytes: cfg.limits.client_queue_bytes,
            live_queue_bytes: cfg.limits.live_queue_bytes,
            inflight_bytes: cfg.limits.inflight_bytes,
            mailbox_ttl_ms: cfg.storage.blob_ttl_hours.saturating_mul(3_600_000),
            max_hashes: cfg.limits.max_hashes_per_client,
            homed_ttl_ms: cfg.federation.homed_hours.saturating_mul(3_600_000),
            homed_max: cfg.federation.homed_max,
            homed_per_ip: cfg.federation.homed_per_ip,
        },
    ));

    let key = p2p::load_or_create_key(&cfg.data_dir)?;
    let mut device_cfg =
        meshwhisper_behaviour::device::Config::new(meshwhisper_behaviour::device::Role::Relay);
    device_cfg.max_frame = cfg.storage.max_blob_size + 64;
    let limits = meshwhisper_behaviour::node::Limits {
        max_connections: cfg.limits.max_p2p_connections,
        max_pending_incoming: cfg.limits.max_p2p_pending,
        max_per_peer: cfg.limits.max_p2p_per_peer,
    };
    let f = &cfg.federation;
    let mut allowlist = std::collections::HashSet::new();
    for a in &f.allowlist {
        if let Some(p) = config::parse_relay(a) {
            allowlist.insert(p);
        }
    }
    let blocklist = match &f.blocklist_file {
        Some(path) => read_blocklist(path).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "blocklist not loaded");
            Default::default()
        }),
        None => Default::default(),
    };
    let fed_settings = meshwhisper_behaviour::node::FederationSettings {
        policy: meshwhisper_behaviour::policy::Config {
            mode: f.mode,
            max_peers: f.max_peers,
            allowlist,
            blocklist,
            frames_per_minute: f.frames_per_minute,
        },
        gossip: f.gossip_params(),
        stream: meshwhisper_behaviour::federation::Config {
            max_frame: meshwhisper_behaviour::federation::codec::DEFAULT_MAX_FRAME
                .max(cfg.storage.max_blob_size + 64),
            ..Default::default()
        },
    };
    let loaded = core.load_homed().await?;
    tracing::debug!(hashes = loaded, "homed hashes loaded");
    let swarm = p2p::build_swarm(key.clone(), device_cfg, limits, fed_settings)?;
    let sessions = tokio_util::task::TaskTracker::new();
    let (p2p, swarm_task) = p2p::start(
        swarm,
        p2p::ListenAddrs {
            required: &cfg.listen,
            optional: &cfg.listen_optional,
        },
        core.clone(),
        device_session::Bounds {
            drain_batch: cfg.limits.drain_batch,
            drain_bytes: cfg.limits.drain_bytes,
            unacked: cfg.limits.unconfirmed_deliveries,
            unacked_bytes: cfg.limits.unconfirmed_bytes,
            inflight_bytes: cfg.limits.client_inflight_bytes,
        },
        cancel.clone(),
        sessions.clone(),
        p2p::FedStart {
            cfg: cfg.federation.clone(),
            key,
            mailbox_ttl_ms: cfg.storage.blob_ttl_hours.saturating_mul(3_600_000),
        },
    )?;
    let mut tasks_extra = Vec::new();
    // Packets stored for relays elsewhere before a restart go out again.
    let refed_core = core.clone();
    let max_pending = cfg.federation.max_pending;
    let mut fed_status = p2p.federation.clone();
    let refed_cancel = cancel.clone();
    tasks_extra.push(tokio::spawn(async move {
        // Once there is a relay to send them to (or after a minute).
        tokio::select! {
            _ = refed_cancel.cancelled() => return,
            _ = tokio::time::timeout(
                Duration::from_secs(60),
                fed_status.wait_for(|s| !s.connected.is_empty()),
            ) => {}
        }
        let n = refed_core.refederate_stored(max_pending).await;
        if n > 0 {
            tracing::info!(packets = n, "stored packets handed back to the federation");
        }
    }));
    // Homed hashes registered since the last second go to the store.
    let homed_core = core.clone();
    let homed_cancel = cancel.clone();
    tasks_extra.push(tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = homed_cancel.cancelled() => break,
                _ = every.tick() => homed_core.flush_homed().await,
            }
        }
        homed_core.flush_homed().await;
    }));
    if let Some(path) = cfg.federation.blocklist_file.clone() {
        tasks_extra.push(tokio::spawn(watch_blocklist(
            path,
            p2p.blocklist.clone(),
            cancel.clone(),
        )));
    }

    let l = &cfg.limits;
    let fd_room = gateway::serve::raise_fd_limit().map(|soft| {
        usize::try_from(soft)
            .unwrap_or(usize::MAX)
            .saturating_sub(l.fd_reserve)
            .max(64)
    });
    let total = match (l.max_connections, fd_room) {
        (0, Some(room)) => room,
        (0, None) => 65_536,
        (n, Some(room)) => n.min(room),
        (n, None) => n,
    };
    let conns = gateway::serve::ConnLimiter::new(gateway::serve::HttpLimits {
        header_read: Duration::from_secs(l.header_timeout_secs),
        body_idle: Duration::from_secs(l.body_idle_timeout_secs),
        body_total: Duration::from_secs(l.body_timeout_secs),
        write_stall: Duration::from_secs(l.write_stall_secs),
        per_ip: if cfg.trust_proxy {
            0
        } else {
            l.max_connections_per_ip
        },
        total,
        loopback_reserve: 32,
        drain: SHUTDOWN_GRACE,
    });
    tracing::debug!(connections = total, "client gateway connection cap");
    let (events_tx, _) = tokio::sync::broadcast::channel(64);
    let state = gateway::AppState {
        core: core.clone(),
        cfg: cfg.clone(),
        metrics: metrics.clone(),
        limiter: Arc::new(ratelimit::RateLimiter::new(
            [
                cfg.limits.rate_limit_dir,
                cfg.limits.rate_limit_media,
                cfg.limits.rate_limit_read,
                cfg.limits.rate_limit_archive,
            ],
            cfg.limits.rate_limit_max_clients,
        )),
        verifier: Arc::new(meshwhisper_storage::directory::SignedTransferVerifier),
        cancel: cancel.clone(),
        events: events_tx.clone(),
        started,
        websockets: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        peer_id: p2p.peer_id.to_string().into(),
        sessions: sessions.clone(),
        federation: p2p.federation.clone(),
        conns: conns.clone(),
        ws_per_ip: Default::default(),
        uploads: Arc::new(quota::UploadQuota::new(
            cfg.limits.upload_bytes_per_ip_per_day,
            cfg.limits.rate_limit_max_clients,
        )),
        opks: Arc::new(std::sync::Mutex::new(
            gateway::opk_binding::OpkBinding::new(
                cfg.limits.rate_limit_max_clients,
                cfg.storage_config().opk_max_per_identity as usize,
            ),
        )),
    };
    let app = gateway::router(state);
    let server = tokio::spawn(gateway::serve::serve(listener, app, conns, cancel.clone()));

    // `/events`: one ticker takes the counts every 250 ms.
    let ev = core.events.clone();
    let c = cancel.clone();
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                biased;
                _ = c.cancelled() => break,
                _ = tick.tick() => {
                    if let Some(line) = ev.take() {
                        let _ = events_tx.send(line);
                    }
                }
            }
        }
    });

    // Expiry sweeper: bounded work per call, repeated while there is more.
    let c = cancel.clone();
    let sweep_store = store.clone();
    let sweep_core = core.clone();
    let (batch, every) = (cfg.storage.sweep_batch, cfg.storage.sweep_interval_secs);
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(every));
        loop {
            tokio::select! {
                biased;
                _ = c.cancelled() => break,
                _ = tick.tick() => loop {
                    // Address records too old to be accepted, and homed
                    // hashes past their time, go too.
                    let now = core::now_ms();
                    let stale = now.saturating_sub(meshwhisper_crypto::address_record::MAX_AGE_MS);
                    if let Err(e) = sweep_store.address_book().expire(stale).await {
                        tracing::warn!(error = %e, "expiring address records");
                    }
                    sweep_core.expire_homed(now);
                    if let Err(e) = sweep_store.homed().expire(now).await {
                        tracing::warn!(error = %e, "expiring homed hashes");
                    }
                    match sweep_store.sweep(now, batch).await {
                        Ok(r) if r.more && !c.is_cancelled() => continue,
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
    });

    let mut tasks = vec![server, swarm_task, ticker, sweeper];
    tasks.extend(tasks_extra);
    Ok(Running {
        http_addr,
        p2p,
        core,
        cancel,
        sessions,
        tasks,
    })
}

/// Reads a blocklist file (see [`config::parse_relay_list`]).
pub fn read_blocklist(
    path: &std::path::Path,
) -> Result<std::collections::HashSet<libp2p::PeerId>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    config::parse_relay_list(&text)
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
        match read_blocklist(&path) {
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
