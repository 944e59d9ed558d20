//! `/health`, `/metrics` and `/events`.

use super::*;

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
        store_unlogged_delivered: store.unlogged_stats().0,
        store_unlogged_logged: store.unlogged_stats().1,
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

pub(super) async fn health(State(s): State<AppState>) -> Response {
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
            "nat": nat_json(&s),
        }),
    )
}

/// `/health`'s `nat`: what the relay takes itself for (`public`: it
/// serves as an anchor; `anchored`: behind NAT, reached through `anchors`;
/// `private`: behind NAT with no anchor yet; `unknown`: not probed yet).
fn nat_json(s: &AppState) -> serde_json::Value {
    let f = s.federation.borrow();
    let n = &f.nat;
    let state = match n.reachability {
        _ if s.cfg.federation.transit_only => "transit-only",
        "private" if !n.anchors.is_empty() => "anchored",
        other => other,
    };
    let names = |v: &[libp2p::PeerId]| v.iter().map(|p| p.to_string()).collect::<Vec<_>>();
    json!({
        "reachability": n.reachability,
        "setting": match s.cfg.nat.reachability {
            crate::config::Reachability::Auto => "auto",
            crate::config::Reachability::Public => "public",
            crate::config::Reachability::Private => "private",
        },
        "state": state,
        "servingAnchors": n.reachability == "public" && s.cfg.nat.serve && s.cfg.federation.mode != crate::config::FederationMode::Off,
        "anchors": names(&n.anchors),
        "peersViaCircuit": names(&n.via_circuit),
    })
}

pub(super) async fn metrics(State(s): State<AppState>) -> Response {
    let g = gauges(&s).await;
    let body = s.metrics.render(&g);
    let mut r = body.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

pub(super) async fn events(State(s): State<AppState>, ClientIp(ip): ClientIp) -> Response {
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
