//! The client gateway: the reference relay's HTTP API and WebSocket
//! protocol on one port (see `../shared/docs/reference-protocol.md` and
//! docs/operations.md). Responses keep the reference's paths, JSON shapes,
//! status codes and CORS headers.

use crate::config::Config;
use crate::core::{Core, now_ms};
use crate::metrics::{Gauges, Metrics};
use crate::ratelimit::{Bucket, RateLimiter};
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
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub mod opk_binding;
pub mod serve;
pub mod ws;

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
    pub uploads: Arc<crate::quota::UploadQuota>,
    /// Who may add unsigned one-time prekeys to which pool.
    pub opks: Arc<std::sync::Mutex<opk_binding::OpkBinding>>,
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

/// Gauges read now.
pub async fn gauges(s: &AppState) -> Gauges {
    let store = &s.core.store;
    let (connections, _) = s.core.connections();
    if let Ok(n) = store.address_book().count().await {
        s.metrics.federation.records_known.store(n, Relaxed);
    }
    Gauges {
        uptime_seconds: s.started.elapsed().as_secs(),
        clients_connected: s.core.registered_hashes() as u64,
        connections: connections as u64,
        stored_blobs: store.mailbox().count().await.unwrap_or(0),
        prekey_entries: store.directory().count().await.unwrap_or(0),
        push_registrations: store.push().count().await.unwrap_or(0),
        media_entries: store.media().count().await.unwrap_or(0),
        opk_entries: store.directory().one_time_prekey_count().await.unwrap_or(0),
        archive_entries: store.archive().count().await.unwrap_or(0),
        federation_peers_configured: s.federation.borrow().configured as u64,
        federation_peers_connected: s.federation.borrow().connected.len() as u64,
        store_commits: store.commit_stats().0,
        store_writes: store.commit_stats().1,
        gateway_connections: s.conns.open() as u64,
        connections_refused_per_ip: s.conns.stats.refused_per_ip.load(Relaxed),
        connections_refused_total: s.conns.stats.refused_total.load(Relaxed),
        connection_timeouts: s.conns.stats.timed_out.load(Relaxed),
        accept_errors: s.conns.stats.accept_errors.load(Relaxed),
        live_queue_bytes: s.core.live_bytes() as u64,
        inflight_bytes: s.core.inflight_bytes() as u64,
    }
}

/// One word on federation for `/health`: `off`, `no peers` (federating
/// with no one: check the bootstrap addresses and the firewall) or
/// `connected`.
fn fed_state(s: &AppState, connected: u64) -> &'static str {
    match (s.cfg.federation.mode, connected) {
        (crate::config::FederationMode::Off, _) => "off",
        (_, 0) => "no peers",
        _ => "connected",
    }
}

async fn health(State(s): State<AppState>) -> Response {
    let g = gauges(&s).await;
    let (_, devices) = s.core.connections();
    json_resp(
        &s,
        StatusCode::OK,
        json!({
            "status": "ok",
            "clients": g.clients_connected,
            "storedBlobs": g.stored_blobs,
            "prekeyEntries": g.prekey_entries,
            "pushRegistrations": g.push_registrations,
            "mediaEntries": g.media_entries,
            "opkEntries": g.opk_entries,
            "archiveEntries": g.archive_entries,
            "federationPeersConfigured": g.federation_peers_configured,
            "federationPeersConnected": g.federation_peers_connected,
            "connections": g.connections,
            "devices": devices,
            "peerId": &*s.peer_id,
            "federation": {
                "mode": s.cfg.federation.mode.as_str(),
                "relayKey": s.peer_id.parse::<libp2p::PeerId>().ok()
                    .and_then(|p| crate::federation::key_of(&p)).map(hex::encode),
                "peers": s.federation.borrow().connected.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                "addressRecords": s.metrics.federation.records_known.load(Relaxed),
                "homedHashes": s.core.homed_count(),
                "pending": s.metrics.federation.pending.load(Relaxed),
                "status": fed_state(&s, g.federation_peers_connected),
                "bootstrapErrors": s.federation.borrow().bootstrap_errors.clone(),
            },
        }),
    )
}

async fn metrics(State(s): State<AppState>) -> Response {
    let g = gauges(&s).await;
    let body = s.metrics.render(&g);
    let mut r = body.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

async fn events(State(s): State<AppState>, ClientIp(ip): ClientIp) -> Response {
    if let Some(r) = limited(&s, Bucket::Read, ip) {
        return r;
    }
    let rx = s.events.subscribe();
    let cancel = s.cancel.clone();
    let ticks = tokio_stream_from(rx, cancel);
    let body = Body::from_stream(ticks);
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store"),
    );
    h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    cors(r)
}

/// `: connected`, then each broadcast tick as a `data:` line, with a
/// heartbeat comment every 15 s; ends at shutdown.
fn tokio_stream_from(
    rx: broadcast::Receiver<String>,
    cancel: CancellationToken,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::convert::Infallible>> {
    let first = futures::stream::once(async { Ok(bytes::Bytes::from_static(b": connected\n\n")) });
    let rest = futures::stream::unfold((rx, cancel), |(mut rx, cancel)| async move {
        let hb = tokio::time::sleep(std::time::Duration::from_secs(15));
        tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            m = rx.recv() => match m {
                Ok(line) => Some((Ok(bytes::Bytes::from(format!("data: {line}\n\n"))), (rx, cancel))),
                Err(broadcast::error::RecvError::Lagged(_)) => Some((Ok(bytes::Bytes::from_static(b": lagged\n\n")), (rx, cancel))),
                Err(broadcast::error::RecvError::Closed) => None,
            },
            _ = hb => Some((Ok(bytes::Bytes::from_static(b": hb\n\n")), (rx, cancel))),
        }
    });
    first.chain(rest)
}

fn str_field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// The rate limit of `bucket`, then the JSON object body: what every JSON
/// write endpoint checks first, in the reference's order.
fn limited_json(
    s: &AppState,
    bucket: Bucket,
    ip: IpAddr,
    body: &[u8],
) -> Result<Value, Box<Response>> {
    if let Some(r) = limited(s, bucket, ip) {
        return Err(Box::new(r));
    }
    parse_json(s, body)
}

fn parse_json(s: &AppState, body: &[u8]) -> Result<Value, Box<Response>> {
    if body.len() > s.cfg.limits.max_json_body {
        return Err(Box::new(error(
            s,
            StatusCode::PAYLOAD_TOO_LARGE,
            "Request body too large",
        )));
    }
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| Box::new(error(s, StatusCode::BAD_REQUEST, "Invalid JSON body")))
}

/// The identity key a directory entry is registered under: `publicKey`
/// as 64 hex digits (the Ed25519 identity key, as the JavaScript SDK and
/// our client send it).
pub(crate) fn identity_key(pk: &str) -> Option<[u8; 32]> {
    if pk.len() != 64 {
        return None;
    }
    hex::decode(pk).ok()?.try_into().ok()
}

/// Checks a prekey bundle against the key it is registered under, so
/// nobody can publish a bundle for someone else's identity. The
/// JavaScript SDK's formats (`version ‖ flags ‖ IK ‖ SPK ‖ sig(SPK)`, then
/// for 0x02 the ML-KEM-768 key) must carry `pk` as IK, a valid signature,
/// no embedded one-time prekey and their exact length; ours (0x81) must
/// decode, verify and name `pk`. Anything else is refused.
pub(crate) fn check_bundle(b: &[u8], pk: &[u8; 32]) -> Result<(), &'static str> {
    use meshwhisper_crypto::primitives::Ed25519Public;
    match b.first() {
        Some(v @ (0x01 | 0x02)) => {
            let want = if *v == 0x01 { 130 } else { 1314 };
            if b.len() != want {
                return Err("prekey bundle has the wrong length for its version");
            }
            if b[1] != 0 {
                return Err("prekey bundle must not embed a one-time prekey");
            }
            let (Ok(ik), Ok(sig)) = (
                <[u8; 32]>::try_from(&b[2..34]),
                <[u8; 64]>::try_from(&b[66..130]),
            ) else {
                return Err("prekey bundle is truncated");
            };
            if ik != *pk {
                return Err(
                    "prekey bundle identity key is not the publicKey it is registered under",
                );
            }
            let Ok(key) = Ed25519Public::from_bytes(&ik) else {
                return Err("prekey bundle identity key is invalid");
            };
            key.verify_lenient(&b[34..66], &sig)
                .map_err(|_| "prekey bundle signature is invalid")
        }
        Some(&meshwhisper_crypto::pqxdh::BUNDLE_VERSION) => {
            match meshwhisper_crypto::pqxdh::PrekeyBundle::decode(b) {
                Ok(bundle) if bundle.identity().to_bytes() == *pk => Ok(()),
                Ok(_) => {
                    Err("prekey bundle identity key is not the publicKey it is registered under")
                }
                Err(_) => Err("prekey bundle signature or encoding is invalid"),
            }
        }
        _ => Err("prekey bundle version is not one this relay knows"),
    }
}

async fn directory_post(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    body: bytes::Bytes,
) -> Response {
    let v = match limited_json(&s, Bucket::Dir, ip, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let (Some(ns), Some(pk), Some(bundle)) = (
        str_field(&v, "namespace"),
        str_field(&v, "publicKey"),
        str_field(&v, "bundle"),
    ) else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Missing required fields: namespace, publicKey, bundle",
        );
    };
    let Some(key) = identity_key(pk) else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Invalid publicKey: 64 hex digits (the Ed25519 identity key)",
        );
    };
    let Ok(bundle) = B64.decode(bundle) else {
        return error(&s, StatusCode::BAD_REQUEST, "Invalid bundle: not base64");
    };
    if let Err(why) = check_bundle(&bundle, &key) {
        s.metrics.bundles_refused.fetch_add(1, Relaxed);
        return error(&s, StatusCode::BAD_REQUEST, why);
    }
    // Our own format names its signed prekey: never roll back to an older one.
    if bundle.first() == Some(&meshwhisper_crypto::pqxdh::BUNDLE_VERSION)
        && let Ok(Some(old)) = s.core.store.directory().by_key(ns, pk).await
        && crate::device_directory::is_stale(&old.bundle, &bundle)
    {
        return error(
            &s,
            StatusCode::CONFLICT,
            "prekey bundle is older than the one published",
        );
    }
    let js_format = matches!(bundle.first(), Some(0x01 | 0x02));
    let username = match v.get("username") {
        None | Some(Value::Null) => None,
        Some(Value::String(u)) => {
            if meshwhisper_storage::directory::normalize_username(u).is_none() {
                return error(
                    &s,
                    StatusCode::BAD_REQUEST,
                    "Invalid username: 3–30 chars, a–z 0–9 _ -",
                );
            }
            Some(u.clone())
        }
        Some(_) => {
            return error(
                &s,
                StatusCode::BAD_REQUEST,
                "Invalid username: 3–30 chars, a–z 0–9 _ -",
            );
        }
    };
    let transfer = match v.get("transferAuth") {
        None | Some(Value::Null) => None,
        Some(t) => {
            let from = str_field(t, "fromPublicKey");
            let exp = t.get("expiresAt").and_then(Value::as_f64);
            let sig = str_field(t, "signature").and_then(|x| B64.decode(x).ok());
            match (from, exp, sig) {
                (Some(from), Some(exp), Some(sig)) if exp >= 0.0 => Some(TransferAuth {
                    from_public_key: from.to_string(),
                    expires_at_ms: exp as u64,
                    signature: sig,
                }),
                _ => return error(&s, StatusCode::BAD_REQUEST, "Invalid transferAuth shape"),
            }
        }
    };
    let reg = Registration {
        namespace: ns.to_string(),
        public_key: pk.to_string(),
        bundle,
        username,
        transfer,
    };
    use meshwhisper_storage::Error as E;
    match s
        .core
        .store
        .directory()
        .register(reg, s.verifier.clone(), now_ms())
        .await
    {
        Ok(()) => {
            // The publisher may add unsigned one-time prekeys now, and the
            // ones it uploaded just before are promoted.
            if js_format {
                let parked = s.opks.lock().map_or_else(
                    |p| p.into_inner().published(ns, pk, ip, now_ms()),
                    |mut b| b.published(ns, pk, ip, now_ms()),
                );
                if !parked.is_empty()
                    && let Err(e) = s
                        .core
                        .store
                        .directory()
                        .add_one_time_prekeys(ns, pk, parked)
                        .await
                {
                    tracing::debug!(error = %e, "parked one-time prekeys not stored");
                }
            }
            json_resp(&s, StatusCode::OK, json!({ "ok": true }))
        }
        Err(E::UsernameTaken) => error(
            &s,
            StatusCode::CONFLICT,
            "Username already claimed by a different identity in this namespace",
        ),
        Err(E::TransferRejected(_)) => error(
            &s,
            StatusCode::FORBIDDEN,
            "transferAuth invalid: signature, expiry, or sender mismatch",
        ),
        Err(E::TooLarge { .. }) => {
            error(&s, StatusCode::PAYLOAD_TOO_LARGE, "Prekey bundle too large")
        }
        Err(E::Invalid { why, .. }) => error(&s, StatusCode::BAD_REQUEST, why),
        Err(e) => internal(&s, e),
    }
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

async fn directory_get(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = limited(&s, Bucket::Read, ip) {
        return r;
    }
    let Some(ns) = q.get("namespace").filter(|x| !x.is_empty()) else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Missing query param: namespace",
        );
    };
    let d = s.core.store.directory();
    if let Some(u) = q.get("username").filter(|x| !x.is_empty()) {
        return match d.by_username(ns, u).await {
            Ok(Some(e)) => json_resp(
                &s,
                StatusCode::OK,
                json!({ "bundle": B64.encode(&e.bundle), "publicKey": e.public_key, "username": e.username }),
            ),
            Ok(None) => error(&s, StatusCode::NOT_FOUND, "User not found"),
            Err(meshwhisper_storage::Error::Invalid { .. }) => {
                error(&s, StatusCode::BAD_REQUEST, "Invalid username")
            }
            Err(e) => internal(&s, e),
        };
    }
    let Some(pk) = q.get("publicKey").filter(|x| !x.is_empty()) else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Missing query param: publicKey or username",
        );
    };
    match d.by_key(ns, pk).await {
        Ok(Some(e)) => {
            let mut body = json!({ "bundle": B64.encode(&e.bundle) });
            if let Some(u) = e.username {
                body["username"] = Value::String(u);
            }
            json_resp(&s, StatusCode::OK, body)
        }
        Ok(None) => error(&s, StatusCode::NOT_FOUND, "Prekey bundle not found"),
        Err(e) => internal(&s, e),
    }
}

async fn policy_post(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    body: bytes::Bytes,
) -> Response {
    let v = match limited_json(&s, Bucket::Dir, ip, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let Some(ns) = str_field(&v, "namespace") else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Missing required field: namespace",
        );
    };
    let Some(policy) = str_field(&v, "usernamePolicy").and_then(UsernamePolicy::parse) else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "usernamePolicy must be 'signed-transfer' or 'last-writer-wins'",
        );
    };
    match s.core.store.directory().set_policy(ns, policy).await {
        Ok(()) => json_resp(
            &s,
            StatusCode::OK,
            json!({ "ok": true, "usernamePolicy": policy.as_str() }),
        ),
        Err(meshwhisper_storage::Error::PolicyConflict { current }) => json_resp(
            &s,
            StatusCode::CONFLICT,
            json!({ "error": "Namespace policy already set to a different value", "currentPolicy": current.as_str() }),
        ),
        Err(
            meshwhisper_storage::Error::Invalid { why, .. }
            | meshwhisper_storage::Error::TooLarge { what: why, .. },
        ) => error(&s, StatusCode::BAD_REQUEST, why),
        Err(e) => internal(&s, e),
    }
}

async fn policy_get(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = limited(&s, Bucket::Read, ip) {
        return r;
    }
    let Some(ns) = q.get("namespace").filter(|x| !x.is_empty()) else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Missing query param: namespace",
        );
    };
    match s.core.store.directory().policy(ns).await {
        Ok(p) => json_resp(
            &s,
            StatusCode::OK,
            json!({ "namespace": ns, "usernamePolicy": p.as_str() }),
        ),
        Err(e) => internal(&s, e),
    }
}

async fn opks_post(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    body: bytes::Bytes,
) -> Response {
    let v = match limited_json(&s, Bucket::Dir, ip, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let (Some(ns), Some(pk), Some(list)) = (
        str_field(&v, "namespace"),
        str_field(&v, "publicKey"),
        v.get("opks").and_then(Value::as_array),
    ) else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Missing required fields: namespace, publicKey, opks[]",
        );
    };
    if identity_key(pk).is_none() {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Invalid publicKey: 64 hex digits (the Ed25519 identity key)",
        );
    }
    // As the reference: the first `opk_max_per_upload` entries, minus empty
    // and non-string ones; each an X25519 public key.
    let max = s.core.store.config().opk_max_per_upload;
    let mut keys = Vec::new();
    for item in list.iter().take(max) {
        let Some(text) = item.as_str().filter(|t| !t.is_empty()) else {
            continue;
        };
        match B64.decode(text) {
            Ok(k) if k.len() == 32 => keys.push(k),
            Ok(_) => {
                return error(
                    &s,
                    StatusCode::BAD_REQUEST,
                    "Invalid opk: not a 32-byte X25519 public key",
                );
            }
            Err(_) => return error(&s, StatusCode::BAD_REQUEST, "Invalid opk: not base64"),
        }
    }
    if keys.is_empty() {
        return error(&s, StatusCode::BAD_REQUEST, "Invalid opks: none given");
    }
    // Bound to the identity's publisher (see `opk_binding`); identities of
    // our own format upload signed batches over the device protocol.
    let published = match s.core.store.directory().by_key(ns, pk).await {
        Ok(e) => e.map(|e| e.bundle.first().copied()),
        Err(e) => return internal(&s, e),
    };
    if published == Some(Some(meshwhisper_crypto::pqxdh::BUNDLE_VERSION)) {
        return error(
            &s,
            StatusCode::FORBIDDEN,
            "this identity uploads signed one-time prekey batches",
        );
    }
    let n = keys.len();
    let decision = {
        let mut b = match s.opks.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        b.upload(ns, pk, ip, now_ms(), published.is_some(), keys.clone())
    };
    match decision {
        opk_binding::Decision::Accept => {}
        opk_binding::Decision::Parked => {
            return json_resp(&s, StatusCode::OK, json!({ "ok": true, "stored": n }));
        }
        opk_binding::Decision::Refuse(why) => {
            s.metrics.opk_uploads_refused.fetch_add(1, Relaxed);
            return error(&s, StatusCode::FORBIDDEN, why);
        }
    }
    match s
        .core
        .store
        .directory()
        .add_one_time_prekeys(ns, pk, keys)
        .await
    {
        Ok(stored) => json_resp(&s, StatusCode::OK, json!({ "ok": true, "stored": stored })),
        Err(meshwhisper_storage::Error::TooLarge { .. }) => {
            error(&s, StatusCode::BAD_REQUEST, "Invalid opk: too large")
        }
        Err(meshwhisper_storage::Error::Invalid { why, .. }) => {
            error(&s, StatusCode::BAD_REQUEST, why)
        }
        Err(e) => internal(&s, e),
    }
}

async fn opks_claim(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = limited(&s, Bucket::Dir, ip) {
        return r;
    }
    let (Some(ns), Some(pk)) = (
        q.get("namespace").filter(|x| !x.is_empty()),
        q.get("publicKey").filter(|x| !x.is_empty()),
    ) else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Missing query params: namespace, publicKey",
        );
    };
    match s.core.store.directory().claim_one_time_prekey(ns, pk).await {
        Ok(Some(k)) => json_resp(&s, StatusCode::OK, json!({ "opk": B64.encode(k) })),
        Ok(None) => error(&s, StatusCode::NOT_FOUND, "No one-time pre-keys available"),
        Err(e) => internal(&s, e),
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .then(|| token.trim().to_string())
}

async fn opks_delete(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    if let Some(r) = limited(&s, Bucket::Dir, ip) {
        return r;
    }
    let Some(token) = bearer(&headers) else {
        return error(&s, StatusCode::UNAUTHORIZED, "Missing bearer token");
    };
    let v = match parse_json(&s, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let (Some(ns), Some(pk)) = (str_field(&v, "namespace"), str_field(&v, "publicKey")) else {
        return error(
            &s,
            StatusCode::BAD_REQUEST,
            "Missing required fields: namespace, publicKey",
        );
    };
    match s
        .core
        .store
        .directory()
        .purge_one_time_prekeys(ns, pk, &token)
        .await
    {
        Ok(n) => json_resp(&s, StatusCode::OK, json!({ "ok": true, "deleted": n })),
        Err(meshwhisper_storage::Error::Unauthorized { .. }) => {
            error(&s, StatusCode::FORBIDDEN, "Invalid OPK pool token")
        }
        Err(e) => internal(&s, e),
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

async fn media_post(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(r) = limited(&s, Bucket::Media, ip) {
        return r;
    }
    let max = s.core.store.config().media_max_bytes;
    let too_large = |s: &AppState| {
        error(
            s,
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("Payload too large (max {max} bytes)"),
        )
    };
    if content_length(&headers).is_some_and(|n| n > max) {
        return too_large(&s);
    }
    let mut upload = match s.core.store.media().begin().await {
        Ok(u) => u,
        Err(e) => return internal(&s, e),
    };
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return error(&s, StatusCode::BAD_REQUEST, "Upload interrupted");
        };
        if !s.uploads.take(ip, chunk.len() as u64, now_ms()) {
            return over_quota(&s);
        }
        match upload.write(&chunk).await {
            Ok(()) => {}
            Err(meshwhisper_storage::Error::TooLarge { .. }) => return too_large(&s),
            Err(e) => return internal(&s, e),
        }
    }
    let meta = match upload.finish(now_ms()).await {
        Ok(m) => m,
        Err(e) => return internal(&s, e),
    };
    let base = match &s.cfg.base_url {
        Some(b) => b.strip_suffix('/').unwrap_or(b).to_string(),
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
                .unwrap_or_else(|| {
                    format!(
                        "localhost:{}",
                        s.cfg.http.rsplit(':').next().unwrap_or("8080")
                    )
                });
            format!("http://{host}")
        }
    };
    json_resp(
        &s,
        StatusCode::OK,
        json!({ "id": meta.id.as_str(), "url": format!("{base}/media/{}", meta.id), "expiresAt": meta.expires_ms }),
    )
}

async fn media_get(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
) -> Response {
    let Some(id) = MediaId::parse(&id) else {
        return error(&s, StatusCode::NOT_FOUND, "Not found");
    };
    if let Some(r) = limited(&s, Bucket::Read, ip) {
        return r;
    }
    match s.core.store.media().open(&id, now_ms()).await {
        Ok(Some((meta, file))) => {
            let stream = tokio_util::io::ReaderStream::new(file);
            let mut r = Response::new(Body::from_stream(stream));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=604800"),
            );
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.size));
            cors(r)
        }
        Ok(None) => error(&s, StatusCode::NOT_FOUND, "Media not found or expired"),
        Err(e) => internal(&s, e),
    }
}

fn archive_owner(id: &str) -> Option<[u8; 32]> {
    if id.len() != 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    hex::decode(id).ok()?.try_into().ok()
}

async fn archive_put(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    let Some(owner) = archive_owner(&id) else {
        return error(&s, StatusCode::NOT_FOUND, "Not found");
    };
    if let Some(r) = limited(&s, Bucket::Archive, ip) {
        return r;
    }
    let Some(token) = bearer(&headers) else {
        return error(&s, StatusCode::UNAUTHORIZED, "Missing Authorization header");
    };
    let max = s.core.store.config().archive_max_bytes;
    let too_large = |s: &AppState| {
        error(
            s,
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("Archive too large (max {max} bytes)"),
        )
    };
    if content_length(&headers).is_some_and(|n| n > max) {
        return too_large(&s);
    }
    let refused = |s: &AppState, e: meshwhisper_storage::Error| match e {
        meshwhisper_storage::Error::Unauthorized { .. } => {
            error(s, StatusCode::FORBIDDEN, "Invalid archive token")
        }
        meshwhisper_storage::Error::TooLarge { .. } => too_large(s),
        e => internal(s, e),
    };
    // The token first: a client without it is refused before its body is
    // read. Then the body streams to a file.
    let mut upload = match s.core.store.archive().begin(owner, &token).await {
        Ok(u) => u,
        Err(e) => return refused(&s, e),
    };
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return error(&s, StatusCode::BAD_REQUEST, "Upload interrupted");
        };
        if !s.uploads.take(ip, chunk.len() as u64, now_ms()) {
            return over_quota(&s);
        }
        if let Err(e) = upload.write(&chunk).await {
            return refused(&s, e);
        }
    }
    match upload.finish(now_ms()).await {
        Ok(size) => json_resp(&s, StatusCode::OK, json!({ "ok": true, "size": size })),
        Err(e) => refused(&s, e),
    }
}

async fn archive_get(
    State(s): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
) -> Response {
    let Some(owner) = archive_owner(&id) else {
        return error(&s, StatusCode::NOT_FOUND, "Not found");
    };
    if let Some(r) = limited(&s, Bucket::Read, ip) {
        return r;
    }
    match s.core.store.archive().get(owner, now_ms()).await {
        Ok(Some(bytes)) => {
            let mut r = Response::new(Body::from(bytes));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            cors(r)
        }
        Ok(None) => error(&s, StatusCode::NOT_FOUND, "Archive not found"),
        Err(e) => internal(&s, e),
    }
}
