//! The client gateway: the reference relay's HTTP API and WebSocket
//! protocol on one port (see `../shared/docs/reference-protocol.md` and
//! docs/operations.md). Responses keep the reference's paths, JSON shapes,
//! status codes and CORS headers.

use crate::config::Config;
use crate::core::{Core, now_ms};
use crate::metrics::{Gauges, Metrics};
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts as _, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use futures::StreamExt as _;
use meshwhisper_storage::directory::{
    Registration, TransferAuth, TransferVerifier, UsernamePolicy,
};
use meshwhisper_storage::media::MediaId;
use ratelimit::{Bucket, RateLimiter};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub mod away;
mod directory;
mod files;
pub mod opk_binding;
pub mod quota;
pub mod ratelimit;
pub mod serve;
mod status;
pub mod ws;

use directory::{
    directory_get, directory_post, opks_claim, opks_delete, opks_post, policy_get, policy_post,
};
use files::{archive_get, archive_put, media_get, media_post};
pub use status::gauges;
use status::{events, health, metrics};

/// Standard base64 (padding optional on input).
pub(crate) const B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Everything handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The relay core.
    pub core: Arc<Core>,
    /// Configuration.
    pub cfg: Arc<Config>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Rate limits.
    pub limiter: Arc<RateLimiter>,
    /// Username transfer verification.
    pub verifier: Arc<dyn TransferVerifier>,
    /// Shutdown.
    pub cancel: CancellationToken,
    /// `/events` ticks.
    pub events: broadcast::Sender<String>,
    /// Start time.
    pub started: Instant,
    /// Open WebSockets.
    pub websockets: Arc<std::sync::atomic::AtomicUsize>,
    /// The node's libp2p PeerId (reported by /health).
    pub peer_id: Arc<str>,
    /// Client sessions (WebSocket and device): shutdown waits for them
    /// before closing the store.
    pub sessions: tokio_util::task::TaskTracker,
    /// Federation status from the Swarm task.
    pub federation: tokio::sync::watch::Receiver<crate::p2p::FedStatus>,
    /// Gateway connections, their caps and refusals.
    pub conns: Arc<serve::ConnLimiter>,
    /// Open WebSockets per client address (see `limits.max_websockets_per_ip`).
    pub ws_per_ip: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    /// Upload bytes per client address per day.
    pub uploads: Arc<crate::gateway::quota::UploadQuota>,
    /// Who may add unsigned one-time prekeys to which pool.
    pub opks: Arc<std::sync::Mutex<opk_binding::OpkBinding>>,
}

/// What the gateway needs to start.
pub struct Start<'a> {
    /// The bound client port.
    pub listener: tokio::net::TcpListener,
    /// Configuration.
    pub cfg: Arc<Config>,
    /// The relay core.
    pub core: Arc<Core>,
    /// The Swarm task's handles (PeerId, federation status).
    pub p2p: &'a crate::p2p::P2p,
    /// Shutdown.
    pub cancel: CancellationToken,
    /// Client sessions, waited for at shutdown.
    pub sessions: tokio_util::task::TaskTracker,
    /// When the node started.
    pub started: Instant,
    /// How long shutdown waits for requests in progress.
    pub drain: std::time::Duration,
}

/// Connections from loopback allowed beyond the cap (health checks).
const LOOPBACK_RESERVE: usize = 32;

/// Starts serving clients: the connection caps (below the file-descriptor
/// limit, which is raised first), the handlers' state and the accept loop.
/// Returns the server task and the `/events` sender for the ticker.
pub fn start(s: Start<'_>) -> (tokio::task::JoinHandle<()>, broadcast::Sender<String>) {
    let cfg = s.cfg;
    let l = &cfg.limits;
    let fd_room = serve::raise_fd_limit().map(|soft| {
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
    let conns = serve::ConnLimiter::new(serve::HttpLimits {
        header_read: std::time::Duration::from_secs(l.header_timeout_secs),
        body_idle: std::time::Duration::from_secs(l.body_idle_timeout_secs),
        body_total: std::time::Duration::from_secs(l.body_timeout_secs),
        write_stall: std::time::Duration::from_secs(l.write_stall_secs),
        per_ip: if cfg.trust_proxy {
            0
        } else {
            l.max_connections_per_ip
        },
        total,
        loopback_reserve: LOOPBACK_RESERVE,
        drain: s.drain,
    });
    tracing::debug!(connections = total, "client gateway connection cap");
    let (events, _) = broadcast::channel(64);
    let state = AppState {
        metrics: s.core.metrics.clone(),
        core: s.core,
        limiter: Arc::new(RateLimiter::new(
            [
                l.rate_limit_dir,
                l.rate_limit_media,
                l.rate_limit_read,
                l.rate_limit_archive,
            ],
            l.rate_limit_max_clients,
        )),
        verifier: Arc::new(meshwhisper_storage::directory::SignedTransferVerifier),
        cancel: s.cancel.clone(),
        events: events.clone(),
        started: s.started,
        websockets: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        peer_id: s.p2p.peer_id.to_string().into(),
        sessions: s.sessions,
        federation: s.p2p.federation.clone(),
        conns: conns.clone(),
        ws_per_ip: Default::default(),
        uploads: Arc::new(quota::UploadQuota::new(
            l.upload_bytes_per_ip_per_day,
            l.rate_limit_max_clients,
        )),
        opks: Arc::new(std::sync::Mutex::new(opk_binding::OpkBinding::new(
            l.rate_limit_max_clients,
            cfg.storage_config().opk_max_per_identity as usize,
        ))),
        cfg: cfg.clone(),
    };
    let app = router(state);
    let server = tokio::spawn(serve::serve(s.listener, app, conns, s.cancel));
    (server, events)
}

fn cors(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    resp
}

/// A counted JSON response with CORS, as the reference's `sendJson`.
fn json_resp(s: &AppState, status: StatusCode, body: Value) -> Response {
    s.metrics.count_response(status.as_u16());
    cors((status, axum::Json(body)).into_response())
}

fn error(s: &AppState, status: StatusCode, msg: &str) -> Response {
    json_resp(s, status, json!({ "error": msg }))
}

/// The client's IP: the socket's, or the first `X-Forwarded-For` entry
/// when the proxy is trusted.
fn client_ip(s: &AppState, headers: &HeaderMap, peer: SocketAddr) -> IpAddr {
    if s.cfg.trust_proxy
        && let Some(ip) = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok())
    {
        return ip;
    }
    peer.ip()
}

/// The client's IP address, as [`client_ip`] decides it.
pub struct ClientIp(pub IpAddr);

impl axum::extract::FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        Ok(ClientIp(client_ip(s, &parts.headers, peer)))
    }
}

fn limited(s: &AppState, bucket: Bucket, ip: IpAddr) -> Option<Response> {
    match s.limiter.check(bucket, ip, now_ms()) {
        Ok(()) => None,
        Err(retry) => {
            s.metrics.rate_limit_rejections[bucket as usize].fetch_add(1, Relaxed);
            let mut r = json_resp(
                s,
                StatusCode::TOO_MANY_REQUESTS,
                json!({ "error": "Too many requests", "retryAfter": retry }),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry));
            Some(r)
        }
    }
}

/// Builds the router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/events", get(events))
        .route("/directory", get(directory_get).post(directory_post))
        .route("/namespace-policy", get(policy_get).post(policy_post))
        .route("/opks", post(opks_post).delete(opks_delete))
        .route("/opks/claim", get(opks_claim))
        .route("/media", post(media_post))
        .route("/media/{id}", get(media_get))
        .route("/archive/{id}", get(archive_get).put(archive_put))
        .fallback(not_found)
        // JSON bodies: refused beyond `limits.max_json_body` before they are
        // buffered (uploads stream and check their own limits).
        .layer(axum::extract::DefaultBodyLimit::max(
            state.cfg.limits.max_json_body,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), front))
        .with_state(state)
}

/// Every error answers in the reference's shape (`{"error": "..."}`, CORS,
/// counted): axum's own rejections (a body over the limit, a body that
/// timed out) come as plain text and are rewritten here.
async fn json_errors(s: &AppState, r: Response) -> Response {
    let status = r.status();
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return r;
    }
    let text = match axum::body::to_bytes(r.into_body(), 4096).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).trim().to_string(),
        _ => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let text = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "Request body too large".to_string(),
        _ => text,
    };
    error(s, status, &text)
}

/// Before routing: WebSocket upgrades on any path become client sessions
/// (as in the reference), and OPTIONS on any path is a CORS preflight.
async fn front(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if req.method() == Method::OPTIONS {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, PUT, DELETE, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Content-Type, Authorization"),
        );
        return r;
    }
    let is_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !is_upgrade {
        return json_errors(&s, next.run(req).await).await;
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let ip = client_ip(&s, req.headers(), peer);
    let (mut parts, _) = req.into_parts();
    match axum::extract::ws::WebSocketUpgrade::from_request_parts(&mut parts, &s).await {
        Ok(upgrade) => ws::upgrade(s, upgrade, ip),
        Err(rejection) => rejection.into_response(),
    }
}

async fn not_found(State(s): State<AppState>) -> Response {
    error(&s, StatusCode::NOT_FOUND, "Not found")
}

fn internal(s: &AppState, e: meshwhisper_storage::Error) -> Response {
    match e {
        meshwhisper_storage::Error::DiskFull { .. } => {
            tracing::debug!(error = %e, "write refused: storage full");
            error(s, StatusCode::INSUFFICIENT_STORAGE, "Storage full")
        }
        _ => {
            tracing::error!(error = %e, kind = e.kind(), "storage error serving a request");
            error(s, StatusCode::INTERNAL_SERVER_ERROR, "Internal error")
        }
    }
}

/// 507: this address uploaded its day's share (`limits.upload_bytes_per_ip_per_day`).
fn over_quota(s: &AppState) -> Response {
    s.metrics.uploads_over_quota.fetch_add(1, Relaxed);
    error(
        s,
        StatusCode::INSUFFICIENT_STORAGE,
        "Upload quota for today used up",
    )
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .then(|| token.trim().to_string())
}
