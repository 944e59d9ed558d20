//! Metrics as one documented struct of atomic counters, exposed in the
//! Prometheus text format with the reference relay's names (plus ours).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Rate-limit buckets, in the reference's order.
pub const BUCKETS: [&str; 4] = ["dir", "media", "read", "archive"];
/// HTTP status families counted.
pub const STATUS_FAMILIES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "429"];

/// Every counter the relay keeps. Gauges derived from the store are read at
/// scrape time and passed to [`Metrics::render`].
#[derive(Debug, Default)]
pub struct Metrics {
    /// HTTP requests answered with JSON (as the reference counts them).
    pub http_requests: AtomicU64,
    /// HTTP responses by status family (see [`STATUS_FAMILIES`]).
    pub http_responses: [AtomicU64; 5],
    /// Requests refused by each rate-limit bucket (see [`BUCKETS`]).
    pub rate_limit_rejections: [AtomicU64; 4],
    /// WebSocket connections accepted.
    pub websocket_connections: AtomicU64,
    /// Packets accepted from clients.
    pub packets_in: AtomicU64,
    /// Packets delivered to a connected recipient as they arrived.
    pub packets_delivered_live: AtomicU64,
    /// Packets stored for an offline recipient.
    pub packets_queued: AtomicU64,
    /// Stored packets sent on hello or pull.
    pub packets_drained: AtomicU64,
    /// Packets refused as malformed or too large.
    pub packets_rejected: AtomicU64,
    /// Packets refused because storing them failed.
    pub packets_store_failed: AtomicU64,
    /// Push wake webhooks sent.
    pub push_sent: AtomicU64,
    /// Push wake webhooks that failed or were dropped (queue full).
    pub push_failed: AtomicU64,
    /// WebSocket connections closed for protocol violations.
    pub protocol_closes: AtomicU64,
    /// Native devices connected over libp2p (gauge).
    pub devices_connected: AtomicU64,
    /// Packets received from native devices.
    pub device_packets_in: AtomicU64,
    /// Directory requests from native devices (publish, prekeys, claim).
    pub device_directory_requests: AtomicU64,
    /// Device directory requests that failed on storage.
    pub device_directory_failed: AtomicU64,
    /// Prekey bundles stored in a format the relay cannot verify.
    pub unknown_bundles: AtomicU64,
}

/// Values read from the store and registry at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gauges {
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// Destination hashes registered by connected clients.
    pub clients_connected: u64,
    /// Open client connections (WebSocket and device).
    pub connections: u64,
    /// Queued packets.
    pub stored_blobs: u64,
    /// Prekey bundles.
    pub prekey_entries: u64,
    /// Push registrations.
    pub push_registrations: u64,
    /// Media blobs.
    pub media_entries: u64,
    /// One-time prekeys.
    pub opk_entries: u64,
    /// Archives.
    pub archive_entries: u64,
    /// Federation peers configured.
    pub federation_peers_configured: u64,
    /// Federation peers connected.
    pub federation_peers_connected: u64,
    /// Store transactions committed (group commits).
    pub store_commits: u64,
    /// Writes in those transactions.
    pub store_writes: u64,
}

/// Federation counters with the reference's names, all zero until the
/// federation issue lands (kept so dashboards find them).
const FEDERATION_COUNTERS: [(&str, &str); 10] = [
    (
        "forwards_sent_total",
        "Packets forwarded to federation peers",
    ),
    (
        "forwards_received_total",
        "Packets received from federation peers",
    ),
    (
        "delivered_locally_total",
        "Federated packets delivered to a local client",
    ),
    (
        "stored_locally_total",
        "Federated packets stored for a local client",
    ),
    (
        "forwarded_onward_total",
        "Federated packets forwarded onward",
    ),
    (
        "drops_duplicate_total",
        "Federated packets dropped as duplicates",
    ),
    (
        "drops_ttl_total",
        "Federated packets dropped at the hop limit",
    ),
    (
        "handshake_failures_total",
        "Federation handshakes that failed",
    ),
    (
        "drops_rate_limited_total",
        "Federated packets dropped by the per-peer rate limit",
    ),
    (
        "handshake_rejections_blocked_total",
        "Federation handshakes refused by the blocklist",
    ),
];

impl Metrics {
    /// Counts an HTTP response as the reference does.
    pub fn count_response(&self, status: u16) {
        self.http_requests.fetch_add(1, Relaxed);
        let family = match status {
            200..=299 => 0,
            300..=399 => 1,
            400..=499 => 2,
            _ => 3,
        };
        self.http_responses[family].fetch_add(1, Relaxed);
        if status == 429 {
            self.http_responses[4].fetch_add(1, Relaxed);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let mut gauge = |name: &str, help: &str, v: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            );
        };
        gauge(
            "meshwhisper_uptime_seconds",
            "Seconds since the relay started",
            g.uptime_seconds,
        );
        gauge(
            "meshwhisper_clients_connected",
            "Destination hashes registered by connected clients",
            g.clients_connected,
        );
        gauge(
            "meshwhisper_stored_blobs",
            "Packets queued for offline recipients",
            g.stored_blobs,
        );
        gauge(
            "meshwhisper_prekey_entries",
            "Prekey bundles in the directory",
            g.prekey_entries,
        );
        gauge(
            "meshwhisper_push_registrations",
            "Push wake registrations",
            g.push_registrations,
        );
        gauge(
            "meshwhisper_media_entries",
            "Media blobs stored",
            g.media_entries,
        );
        gauge(
            "meshwhisper_opk_entries",
            "One-time prekeys stored",
            g.opk_entries,
        );
        gauge(
            "meshwhisper_archive_entries",
            "Archives stored",
            g.archive_entries,
        );
        gauge(
            "meshwhisper_federation_peers_configured",
            "Federation peers configured",
            g.federation_peers_configured,
        );
        gauge(
            "meshwhisper_federation_peers_connected",
            "Federation peers connected",
            g.federation_peers_connected,
        );
        gauge(
            "meshwhisper_connections",
            "Open client connections (WebSocket and libp2p devices)",
            g.connections,
        );
        gauge(
            "meshwhisper_devices_connected",
            "Native devices connected over libp2p",
            self.devices_connected.load(Relaxed),
        );

        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            );
        };
        counter(
            "meshwhisper_store_commits_total",
            "Store transactions committed (each groups many writes)",
            g.store_commits,
        );
        counter(
            "meshwhisper_store_writes_total",
            "Writes committed by the store",
            g.store_writes,
        );
        counter(
            "meshwhisper_http_requests_total",
            "HTTP requests answered",
            self.http_requests.load(Relaxed),
        );
        counter(
            "meshwhisper_websocket_connections_total",
            "WebSocket connections accepted",
            self.websocket_connections.load(Relaxed),
        );
        counter(
            "meshwhisper_packets_in_total",
            "Packets accepted from clients",
            self.packets_in.load(Relaxed),
        );
        counter(
            "meshwhisper_packets_delivered_live_total",
            "Packets delivered to a connected recipient on arrival",
            self.packets_delivered_live.load(Relaxed),
        );
        counter(
            "meshwhisper_packets_queued_total",
            "Packets stored for an offline recipient",
            self.packets_queued.load(Relaxed),
        );
        counter(
            "meshwhisper_packets_drained_total",
            "Stored packets sent on hello or pull",
            self.packets_drained.load(Relaxed),
        );
        counter(
            "meshwhisper_packets_rejected_total",
            "Packets refused as malformed or too large",
            self.packets_rejected.load(Relaxed),
        );
        counter(
            "meshwhisper_packets_store_failed_total",
            "Packets refused because storing them failed",
            self.packets_store_failed.load(Relaxed),
        );
        counter(
            "meshwhisper_push_sent_total",
            "Push wake webhooks sent",
            self.push_sent.load(Relaxed),
        );
        counter(
            "meshwhisper_push_failed_total",
            "Push wake webhooks failed or dropped",
            self.push_failed.load(Relaxed),
        );
        counter(
            "meshwhisper_protocol_closes_total",
            "Client connections closed for protocol violations",
            self.protocol_closes.load(Relaxed),
        );
        counter(
            "meshwhisper_device_packets_in_total",
            "Packets received from libp2p devices",
            self.device_packets_in.load(Relaxed),
        );
        counter(
            "meshwhisper_device_directory_requests_total",
            "Directory requests from libp2p devices",
            self.device_directory_requests.load(Relaxed),
        );
        counter(
            "meshwhisper_device_directory_failed_total",
            "Device directory requests that failed on storage",
            self.device_directory_failed.load(Relaxed),
        );
        for (name, help) in FEDERATION_COUNTERS {
            counter(&format!("meshwhisper_federation_{name}"), help, 0);
        }

        let _ = write!(
            out,
            "# HELP meshwhisper_http_responses_total HTTP responses by status family\n# TYPE meshwhisper_http_responses_total counter\n"
        );
        for (i, fam) in STATUS_FAMILIES.iter().enumerate() {
            let _ = writeln!(
                out,
                "meshwhisper_http_responses_total{{status=\"{fam}\"}} {}",
                self.http_responses[i].load(Relaxed)
            );
        }
        let _ = write!(
            out,
            "# HELP meshwhisper_rate_limit_rejections_total Requests refused by rate limits\n# TYPE meshwhisper_rate_limit_rejections_total counter\n"
        );
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "meshwhisper_rate_limit_rejections_total{{bucket=\"{b}\"}} {}",
                self.rate_limit_rejections[i].load(Relaxed)
            );
        }
        out
    }
}
