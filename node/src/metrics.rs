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
    /// Live deliveries that found their connection's queue (or the
    /// relay-wide budget) full and stayed stored for a drain.
    pub live_queue_full: AtomicU64,
    /// Packets a WebSocket client sent through the store writer's bulk
    /// lane, being over `limits.client_away_bytes_per_sec`.
    pub packets_paced_away: AtomicU64,
    /// WebSocket text frames that were not JSON (ignored).
    pub bad_control_frames: AtomicU64,
    /// WebSocket upgrades refused: the address had `max_websockets_per_ip`.
    pub websockets_refused_per_ip: AtomicU64,
    /// WebSockets closed for leaving a ping unanswered.
    pub websocket_timeouts: AtomicU64,
    /// Uploads refused: the address used up its daily quota.
    pub uploads_over_quota: AtomicU64,
    /// Homed hashes forgotten to make room (a full table or address share).
    pub homed_evicted: AtomicU64,
    /// Homed-hash changes kept in memory only: too many were waiting to be
    /// written (`federation.homed_dirty_max`).
    pub homed_unsaved: AtomicU64,
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
    /// Prekey bundles refused: unknown format, bad signature, or an
    /// identity key other than the one they are registered under.
    pub bundles_refused: AtomicU64,
    /// Unsigned one-time prekey uploads refused: not from the identity's
    /// bundle publisher.
    pub opk_uploads_refused: AtomicU64,
    /// Federation (shared with its state machines).
    pub federation: std::sync::Arc<FederationMetrics>,
    /// Reachability, anchors and hole punching.
    pub nat: NatMetrics,
}

/// Reachability, anchoring, the anchor service and hole punching
/// (`meshwhisper_nat_*`).
#[derive(Debug, Default)]
pub struct NatMetrics {
    /// 0 unknown, 1 public, 2 private (gauge).
    pub reachability: AtomicU64,
    /// Anchors holding a reservation for this relay (gauge).
    pub anchors_held: AtomicU64,
    /// Times this relay re-anchored after losing an anchor.
    pub reanchors: AtomicU64,
    /// Reachability probes of our addresses that succeeded (AutoNAT v2).
    pub probes_ok: AtomicU64,
    /// Reachability probes of our addresses that failed.
    pub probes_failed: AtomicU64,
    /// Reservations this relay holds for relays behind NAT (gauge).
    pub reservations_served: AtomicU64,
    /// Reservation requests refused (limits, rate, not public).
    pub reservations_refused: AtomicU64,
    /// Circuits through this relay open now (gauge).
    pub circuits_open: AtomicU64,
    /// Circuit requests refused (limits, rate, no reservation).
    pub circuits_refused: AtomicU64,
    /// Hole punches tried (DCUtR, either end).
    pub hole_punch_attempts: AtomicU64,
    /// Hole punches that gave a direct connection.
    pub hole_punch_successes: AtomicU64,
    /// Federation peers whose stream goes through a circuit (gauge).
    pub peers_via_circuit: AtomicU64,
}

impl NatMetrics {
    fn counters(&self) -> [(&'static str, &'static str, &AtomicU64); 7] {
        [
            (
                "reanchors_total",
                "Times this relay re-anchored after losing an anchor",
                &self.reanchors,
            ),
            (
                "probes_ok_total",
                "Reachability probes of our addresses that succeeded",
                &self.probes_ok,
            ),
            (
                "probes_failed_total",
                "Reachability probes of our addresses that failed",
                &self.probes_failed,
            ),
            (
                "reservations_refused_total",
                "Reservation requests refused by the anchor service",
                &self.reservations_refused,
            ),
            (
                "circuits_refused_total",
                "Circuit requests refused by the anchor service",
                &self.circuits_refused,
            ),
            (
                "hole_punch_attempts_total",
                "Hole punches tried",
                &self.hole_punch_attempts,
            ),
            (
                "hole_punch_successes_total",
                "Hole punches that gave a direct connection",
                &self.hole_punch_successes,
            ),
        ]
    }

    fn gauges(&self) -> [(&'static str, &'static str, &AtomicU64); 5] {
        [
            (
                "reachability",
                "Reachability: 0 unknown, 1 public, 2 private",
                &self.reachability,
            ),
            (
                "anchors_held",
                "Anchors holding a reservation for this relay",
                &self.anchors_held,
            ),
            (
                "reservations_served",
                "Reservations held here for relays behind NAT",
                &self.reservations_served,
            ),
            (
                "circuits_open",
                "Circuits through this relay open now",
                &self.circuits_open,
            ),
            (
                "peers_via_circuit",
                "Federation peers reached through a circuit",
                &self.peers_via_circuit,
            ),
        ]
    }
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
    /// Packets from other relays delivered before they were written.
    pub store_unlogged_delivered: u64,
    /// Packets from other relays held unlogged and written after all.
    pub store_unlogged_logged: u64,
    /// Open gateway connections (HTTP and WebSocket).
    pub gateway_connections: u64,
    /// Gateway connections refused: the address had its share.
    pub connections_refused_per_ip: u64,
    /// Gateway connections refused: no room left (file descriptors).
    pub connections_refused_total: u64,
    /// Gateway connections closed for slow headers, bodies or reads.
    pub connection_timeouts: u64,
    /// Accepts that failed (e.g. out of file descriptors).
    pub accept_errors: u64,
    /// Bytes of live deliveries queued.
    pub live_queue_bytes: u64,
    /// Bytes of client packets being stored.
    pub inflight_bytes: u64,
}

/// Federation counters and gauges. The first ten keep the reference
/// relay's `meshwhisper_federation_*` names; the rest are ours.
#[derive(Debug, Default)]
pub struct FederationMetrics {
    /// Packets this relay sent to federation peers (floods count once per peer).
    pub forwards_sent: AtomicU64,
    /// Packets received from federation peers (Forward and Routed frames).
    pub forwards_received: AtomicU64,
    /// Federated packets delivered to a connected local client at once.
    pub delivered_locally: AtomicU64,
    /// Federated packets stored here for a homed client.
    pub stored_locally: AtomicU64,
    /// Flooded packets passed on to other relays.
    pub forwarded_onward: AtomicU64,
    /// Federated packets dropped as duplicates (packet-id cache).
    pub drops_duplicate: AtomicU64,
    /// Flooded packets stopped by the hop cap.
    pub drops_ttl: AtomicU64,
    /// Federation streams that failed to open or closed with an error.
    pub handshake_failures: AtomicU64,
    /// Frames refused by the per-peer rate limit.
    pub drops_rate_limited: AtomicU64,
    /// Connections refused or closed because of the blocklist.
    pub handshake_rejections_blocked: AtomicU64,
    /// Packets sent straight to a hinted home relay (Routed frames).
    pub routed_forwards: AtomicU64,
    /// Routed packets the home relay acknowledged as stored.
    pub routed_acked: AtomicU64,
    /// Packets resent because no acknowledgement came in time.
    pub retries: AtomicU64,
    /// Packets given up on: TTL passed, or the pending or dial queue was full.
    pub drops_expired: AtomicU64,
    /// Packets not forwarded because a queue was full.
    pub drops_queue_full: AtomicU64,
    /// Floods no relay claimed after every attempt (chaff, unknown recipients).
    pub floods_unclaimed: AtomicU64,
    /// Malformed frames or packets received from peers.
    pub drops_malformed: AtomicU64,
    /// Relays refused admission (mode, allowlist, max peers).
    pub admissions_refused: AtomicU64,
    /// Refused relays kept as guests to walk our address book.
    pub guests: AtomicU64,
    /// Address records learned (new relay or newer record).
    pub records_learned: AtomicU64,
    /// Changed address records pushed on to every open stream (each counted
    /// once, however many relays it went to).
    pub records_pushed: AtomicU64,
    /// Address records rejected, by reason (see [`RECORD_REJECTIONS`]).
    pub records_rejected: [AtomicU64; 6],
    /// Dials to relays found in the address book or by Kademlia.
    pub discovered_dials: AtomicU64,
    /// Anti-entropy rounds started.
    pub anti_entropy_rounds: AtomicU64,
    /// Own address record signed (start, refresh, address change).
    pub records_signed: AtomicU64,
    /// Admitted relays with an open federation stream (gauge).
    pub peers_connected: AtomicU64,
    /// Relays in the address book (gauge, refreshed every anti-entropy tick).
    pub records_known: AtomicU64,
    /// Routed packets whose named relay did not home the recipient (then
    /// flooded).
    pub stale_hints: AtomicU64,
    /// Store jobs refused because the workers' queues were full.
    pub jobs_refused: AtomicU64,
    /// Directory claims sent to other relays for our devices.
    pub claims_sent: AtomicU64,
    /// Directory claims answered for other relays.
    pub claims_served: AtomicU64,
    /// Claims for our devices that found no room, no relay or no answer.
    pub claims_failed: AtomicU64,
    /// Packets waiting for a federation acknowledgement (gauge).
    pub pending: AtomicU64,
    /// Packets handed to the federation without a stored copy here (held
    /// in memory until their home relay stores them).
    pub unstored: AtomicU64,
    /// Of those (and of packets refused at once), copies stored here after
    /// all: the home relay did not store them at once.
    pub kept: AtomicU64,
    /// Frames carried on for other relays (Transit).
    pub transit_relayed: AtomicU64,
    /// Transit frames refused: over the hop cap, malformed, the table
    /// full, no way on in time.
    pub transit_refused: AtomicU64,
    /// Frames this relay sent through another relay (it could not dial
    /// their target).
    pub transit_sent: AtomicU64,
    /// Paths searched for such frames.
    pub paths_searched: AtomicU64,
    /// Onions this relay built and sent (onion transit).
    pub onion_sent: AtomicU64,
    /// Onion layers peeled here and sent on to the next relay.
    pub onion_relayed: AtomicU64,
    /// Onions whose last layer was ours: packets delivered here.
    pub onion_delivered: AtomicU64,
    /// Onion layers refused: did not open, malformed inside, table full,
    /// no answer from the next relay in time.
    pub onion_refused: AtomicU64,
    /// Onion layers dropped as replays (their tag seen before).
    pub onion_replays: AtomicU64,
}

/// Labels of [`FederationMetrics::records_rejected`], in order.
pub const RECORD_REJECTIONS: [&str; 6] = [
    "malformed",
    "bad_key",
    "bad_signature",
    "stale",
    "future",
    "book_full",
];

impl FederationMetrics {
    /// Counts a rejected record by its label.
    pub fn reject_record(&self, label: &str) {
        if let Some(i) = RECORD_REJECTIONS.iter().position(|l| *l == label) {
            self.records_rejected[i].fetch_add(1, Relaxed);
        }
    }

    fn counters(&self) -> [(&'static str, &'static str, &AtomicU64); 39] {
        [
            (
                "onion_sent_total",
                "Onions built and sent",
                &self.onion_sent,
            ),
            (
                "onion_relayed_total",
                "Onion layers peeled here and sent on",
                &self.onion_relayed,
            ),
            (
                "onion_delivered_total",
                "Onions whose last layer was ours",
                &self.onion_delivered,
            ),
            (
                "onion_refused_total",
                "Onion layers refused (did not open, malformed, table full, no answer)",
                &self.onion_refused,
            ),
            (
                "onion_replays_total",
                "Onion layers dropped as replays",
                &self.onion_replays,
            ),
            (
                "transit_relayed_total",
                "Frames carried on for other relays",
                &self.transit_relayed,
            ),
            (
                "transit_refused_total",
                "Transit frames refused (hop cap, malformed, table full, no way on)",
                &self.transit_refused,
            ),
            (
                "transit_sent_total",
                "Frames sent through another relay",
                &self.transit_sent,
            ),
            (
                "paths_searched_total",
                "Paths searched for frames sent through another relay",
                &self.paths_searched,
            ),
            (
                "claims_sent_total",
                "Directory claims sent to other relays for our devices",
                &self.claims_sent,
            ),
            (
                "claims_served_total",
                "Directory claims answered for other relays",
                &self.claims_served,
            ),
            (
                "claims_failed_total",
                "Claims for our devices that found no room, no relay or no answer in time",
                &self.claims_failed,
            ),
            (
                "unstored_total",
                "Packets sent on to their home relay held in memory, without a stored copy here",
                &self.unstored,
            ),
            (
                "kept_total",
                "Packets held for another relay that were stored here after all (no prompt ack)",
                &self.kept,
            ),
            (
                "stale_hints_total",
                "Routed packets whose named relay did not home the recipient (flooded instead)",
                &self.stale_hints,
            ),
            (
                "jobs_refused_total",
                "Federation store jobs refused: the workers' queues were full",
                &self.jobs_refused,
            ),
            (
                "forwards_sent_total",
                "Packets forwarded to federation peers",
                &self.forwards_sent,
            ),
            (
                "forwards_received_total",
                "Packets received from federation peers",
                &self.forwards_received,
            ),
            (
                "delivered_locally_total",
                "Federated packets delivered to a local client",
                &self.delivered_locally,
            ),
            (
                "stored_locally_total",
                "Federated packets stored for a local client",
                &self.stored_locally,
            ),
            (
                "forwarded_onward_total",
                "Federated packets forwarded onward",
                &self.forwarded_onward,
            ),
            (
                "drops_duplicate_total",
                "Federated packets dropped as duplicates",
                &self.drops_duplicate,
            ),
            (
                "drops_ttl_total",
                "Federated packets dropped at the hop limit",
                &self.drops_ttl,
            ),
            (
                "handshake_failures_total",
                "Federation streams that failed",
                &self.handshake_failures,
            ),
            (
                "drops_rate_limited_total",
                "Federation frames dropped by the per-peer rate limit",
                &self.drops_rate_limited,
            ),
            (
                "handshake_rejections_blocked_total",
                "Connections refused by the blocklist",
                &self.handshake_rejections_blocked,
            ),
            (
                "routed_forwards_total",
                "Packets sent straight to the hinted home relay",
                &self.routed_forwards,
            ),
            (
                "routed_acked_total",
                "Routed packets acknowledged as stored by the home relay",
                &self.routed_acked,
            ),
            (
                "retries_total",
                "Federated packets resent for want of an acknowledgement",
                &self.retries,
            ),
            (
                "drops_expired_total",
                "Federated packets given up on (TTL)",
                &self.drops_expired,
            ),
            (
                "drops_queue_full_total",
                "Packets not federated because a queue was full",
                &self.drops_queue_full,
            ),
            (
                "floods_unclaimed_total",
                "Floods no relay stored after every attempt",
                &self.floods_unclaimed,
            ),
            (
                "drops_malformed_total",
                "Malformed federation frames or packets",
                &self.drops_malformed,
            ),
            (
                "admissions_refused_total",
                "Relays refused admission by the peer policy",
                &self.admissions_refused,
            ),
            (
                "guests_total",
                "Relays refused for lack of room kept as guests to walk our address book",
                &self.guests,
            ),
            (
                "address_records_learned_total",
                "Address records learned or updated",
                &self.records_learned,
            ),
            (
                "address_records_pushed_total",
                "Changed address records pushed on to connected relays",
                &self.records_pushed,
            ),
            (
                "discovered_dials_total",
                "Dials to relays found in the book or the DHT",
                &self.discovered_dials,
            ),
            (
                "anti_entropy_rounds_total",
                "Address-book anti-entropy rounds started",
                &self.anti_entropy_rounds,
            ),
        ]
    }
}

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
            "meshwhisper_gateway_connections",
            "Open gateway connections (HTTP and WebSocket)",
            g.gateway_connections,
        );
        gauge(
            "meshwhisper_live_queue_bytes",
            "Bytes of live deliveries queued to clients",
            g.live_queue_bytes,
        );
        gauge(
            "meshwhisper_inflight_bytes",
            "Bytes of client packets being stored",
            g.inflight_bytes,
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
            "meshwhisper_connections_refused_per_ip_total",
            "Gateway connections refused: the address had its share",
            g.connections_refused_per_ip,
        );
        counter(
            "meshwhisper_connections_refused_total",
            "Gateway connections refused: no room (file descriptors)",
            g.connections_refused_total,
        );
        counter(
            "meshwhisper_connection_timeouts_total",
            "Gateway connections closed for slow headers, bodies or reads",
            g.connection_timeouts,
        );
        counter(
            "meshwhisper_accept_errors_total",
            "Accepts that failed (e.g. out of file descriptors)",
            g.accept_errors,
        );
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
            "meshwhisper_store_unlogged_delivered_total",
            "Packets from other relays delivered before they were written to disk",
            g.store_unlogged_delivered,
        );
        counter(
            "meshwhisper_store_unlogged_logged_total",
            "Packets from other relays held unlogged and written after all (not delivered in time)",
            g.store_unlogged_logged,
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
            "meshwhisper_live_queue_full_total",
            "Live deliveries that found a full queue and stayed stored for a drain",
            self.live_queue_full.load(Relaxed),
        );
        counter(
            "meshwhisper_packets_paced_away_total",
            "Packets stored through the writer's bulk lane: their client was over its rate for absent recipients",
            self.packets_paced_away.load(Relaxed),
        );
        counter(
            "meshwhisper_websockets_refused_per_ip_total",
            "WebSocket upgrades refused: the address had its share",
            self.websockets_refused_per_ip.load(Relaxed),
        );
        counter(
            "meshwhisper_websocket_timeouts_total",
            "WebSockets closed for leaving a ping unanswered",
            self.websocket_timeouts.load(Relaxed),
        );
        counter(
            "meshwhisper_uploads_over_quota_total",
            "Uploads refused: the address used up its daily quota",
            self.uploads_over_quota.load(Relaxed),
        );
        counter(
            "meshwhisper_homed_evicted_total",
            "Homed hashes forgotten to make room",
            self.homed_evicted.load(Relaxed),
        );
        counter(
            "meshwhisper_homed_unsaved_total",
            "Homed-hash changes kept in memory only: too many were waiting to be written",
            self.homed_unsaved.load(Relaxed),
        );
        counter(
            "meshwhisper_bundles_refused_total",
            "Prekey bundles refused (format, signature, or not the registered identity)",
            self.bundles_refused.load(Relaxed),
        );
        counter(
            "meshwhisper_opk_uploads_refused_total",
            "Unsigned one-time prekey uploads refused (not from the bundle's publisher)",
            self.opk_uploads_refused.load(Relaxed),
        );
        counter(
            "meshwhisper_bad_control_frames_total",
            "WebSocket text frames that were not JSON (ignored)",
            self.bad_control_frames.load(Relaxed),
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
        let f = &self.federation;
        for (name, help, v) in f.counters() {
            counter(
                &format!("meshwhisper_federation_{name}"),
                help,
                v.load(Relaxed),
            );
        }
        counter(
            "meshwhisper_federation_records_signed_total",
            "Own address record signed",
            f.records_signed.load(Relaxed),
        );
        for (name, help, v) in [
            (
                "address_records_known",
                "Relays in the address book",
                &f.records_known,
            ),
            (
                "pending",
                "Packets waiting for a federation acknowledgement",
                &f.pending,
            ),
        ] {
            let _ = write!(
                out,
                "# HELP meshwhisper_federation_{name} {help}\n# TYPE meshwhisper_federation_{name} gauge\nmeshwhisper_federation_{name} {}\n",
                v.load(Relaxed)
            );
        }
        for (name, help, v) in self.nat.counters() {
            let _ = write!(
                out,
                "# HELP meshwhisper_nat_{name} {help}\n# TYPE meshwhisper_nat_{name} counter\nmeshwhisper_nat_{name} {}\n",
                v.load(Relaxed)
            );
        }
        for (name, help, v) in self.nat.gauges() {
            let _ = write!(
                out,
                "# HELP meshwhisper_nat_{name} {help}\n# TYPE meshwhisper_nat_{name} gauge\nmeshwhisper_nat_{name} {}\n",
                v.load(Relaxed)
            );
        }
        let _ = write!(
            out,
            "# HELP meshwhisper_federation_address_records_rejected_total Address records rejected by reason\n# TYPE meshwhisper_federation_address_records_rejected_total counter\n"
        );
        for (i, r) in RECORD_REJECTIONS.iter().enumerate() {
            let _ = writeln!(
                out,
                "meshwhisper_federation_address_records_rejected_total{{reason=\"{r}\"}} {}",
                f.records_rejected[i].load(Relaxed)
            );
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
