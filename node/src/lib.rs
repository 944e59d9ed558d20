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
pub mod gateway;
pub mod metrics;
pub mod p2p;
pub mod push;
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
    #[error("binding the client gateway to {addr}: {source}")]
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
        cfg.storage.max_blob_size,
        cfg.limits.client_queue,
        cfg.limits.max_hashes_per_client,
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
    let swarm = p2p::build_swarm(key, device_cfg, limits)?;
    let sessions = tokio_util::task::TaskTracker::new();
    let (p2p, swarm_task) = p2p::start(
        swarm,
        &cfg.listen,
        core.clone(),
        cfg.limits.drain_batch,
        cancel.clone(),
        sessions.clone(),
    )?;

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
    };
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
    // Packets are small and latency-sensitive: never let Nagle's algorithm
    // hold one back waiting for an ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    let app = gateway::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let c = cancel.clone();
    let server = tokio::spawn(async move {
        let shutdown = c.clone();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
        {
            tracing::error!(error = %e, "client gateway failed");
        }
    });

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
    let (batch, every) = (cfg.storage.sweep_batch, cfg.storage.sweep_interval_secs);
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(every));
        loop {
            tokio::select! {
                biased;
                _ = c.cancelled() => break,
                _ = tick.tick() => loop {
                    match sweep_store.sweep(core::now_ms(), batch).await {
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

    Ok(Running {
        http_addr,
        p2p,
        core,
        cancel,
        sessions,
        tasks: vec![server, swarm_task, ticker, sweeper],
    })
}
