//! The MeshWhisper node: a content-blind relay.
//!
//! [`start`] opens the store, starts the client gateway (HTTP + WebSocket),
//! the libp2p Swarm task, the push worker, the `/events` ticker and the
//! expiry sweeper, all under one cancellation token. [`Running::shutdown`]
//! stops accepting, closes WebSockets with 1001, lets in-flight writes
//! commit, and returns.

pub mod config;
pub mod core;
pub mod device;
pub mod events;
pub mod federation;
pub mod gateway;
pub mod handoff;
pub mod homed;
pub mod live;
pub mod metrics;
pub mod nat;
pub mod p2p;
pub mod push;
mod tasks;

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

/// Starts a relay with `cfg`: ports first (a relay that cannot listen
/// changes nothing on disk), then the store, the relay core, the Swarm
/// task, the background tasks and the client gateway.
pub async fn start(cfg: Config) -> Result<Running, Error> {
    let cfg = Arc::new(cfg);
    let cancel = CancellationToken::new();
    let started = Instant::now();
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
    let events = Arc::new(events::EventCounts::default());
    let push = match &cfg.push_webhook_url {
        Some(url) => push::PushSender::start(
            url.clone(),
            cfg.limits.push_queue,
            store.clone(),
            metrics.clone(),
            events.clone(),
            cancel.clone(),
        ),
        None => push::PushSender::disabled(),
    };
    let core = Arc::new(core::Core::new(
        store.clone(),
        metrics.clone(),
        events,
        push,
        cfg.core_limits(),
    ));
    let loaded = core.load_homed().await?;
    tracing::debug!(hashes = loaded, "homed hashes loaded");

    let key = p2p::load_or_create_key(&cfg.data_dir)?;
    let swarm = p2p::build_swarm(
        key.clone(),
        cfg.device_config(),
        cfg.p2p_limits(),
        cfg.federation_settings(),
    )?;
    let sessions = tokio_util::task::TaskTracker::new();
    let (p2p, swarm_task) = p2p::start(
        swarm,
        p2p::ListenAddrs {
            required: &cfg.listen,
            optional: &cfg.listen_optional,
        },
        core.clone(),
        cfg.device_bounds(),
        cancel.clone(),
        sessions.clone(),
        p2p::FedStart {
            cfg: cfg.federation.clone(),
            key,
            mailbox_ttl_ms: cfg.storage.blob_ttl_hours.saturating_mul(3_600_000),
            nat: crate::config::Nat {
                // A transit-only relay is reached through its uplinks, not
                // through reservations it holds.
                anchors: if cfg.federation.transit_only {
                    0
                } else {
                    cfg.nat.anchors
                },
                ..cfg.nat.clone()
            },
        },
    )?;

    let mut tasks = vec![swarm_task];
    tasks.extend(tasks::spawn_all(&cfg, &core, &p2p, &cancel));
    let (server, events) = gateway::start(gateway::Start {
        listener,
        cfg: cfg.clone(),
        core: core.clone(),
        p2p: &p2p,
        cancel: cancel.clone(),
        sessions: sessions.clone(),
        started,
        drain: SHUTDOWN_GRACE,
    });
    tasks.push(server);
    tasks.push(tokio::spawn(tasks::events_ticker(
        core.events.clone(),
        events,
        cancel.clone(),
    )));
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
