//! The relay's configuration: defaults, then a TOML file, then environment
//! variables (ours and the reference relay's), then command-line flags.
//! Every limit is a field here with its default documented.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Why a configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("parsing config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("invalid setting {key}: {why}")]
    Invalid {
        /// The setting (file key or environment variable).
        key: String,
        /// Why.
        why: String,
    },
}

/// Durability of acknowledged writes (see docs/operations.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Survive process crashes (SQLite synchronous = NORMAL).
    #[default]
    Process,
    /// Survive power loss (synchronous = FULL).
    PowerLoss,
}

/// Relay configuration. Field names are the TOML keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Data directory: database, media, archives, node key. Default `./meshwhisper-data`.
    pub data_dir: PathBuf,
    /// Database file; default `<data_dir>/meshwhisper.db`. Env `DB_PATH`.
    pub db_path: Option<PathBuf>,
    /// Client gateway (HTTP + WebSocket) address. Default `0.0.0.0:8080`.
    /// Env `LISTEN_HOST` and `PORT` (reference), or `MESHWHISPER_HTTP`.
    pub http: String,
    /// Public base URL for media links; default `http://<Host header>`. Env `BASE_URL`.
    pub base_url: Option<String>,
    /// libp2p listen multiaddrs. Default TCP and QUIC on port 4001. The
    /// relay exits if one cannot be bound. Env `MESHWHISPER_LISTEN`.
    pub listen: Vec<String>,
    /// libp2p listen multiaddrs tried but not required: one that cannot
    /// be bound is skipped with a warning. Default none.
    pub listen_optional: Vec<String>,
    /// Trust `X-Forwarded-For` for client IPs (behind a proxy). Env `TRUST_PROXY`.
    pub trust_proxy: bool,
    /// Push wake webhook (http://). Env `PUSH_WEBHOOK_URL`.
    pub push_webhook_url: Option<String>,
    /// Log filter (tracing syntax), unless `RUST_LOG` is set. Default `info`.
    pub log: String,
    /// Storage limits.
    pub storage: StorageConfig,
    /// Rate limits and connection bounds.
    pub limits: Limits,
    /// Relay federation (see docs/federation.md).
    pub federation: Federation,
    /// Relays behind NAT: reachability, anchors, hole punching, the
    /// anchor service (see docs/nat.md).
    pub nat: Nat,
}

/// Whether this relay can be dialled from the internet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Reachability {
    /// AutoNAT v2 decides: other relays dial our observed addresses back.
    #[default]
    Auto,
    /// Reachable at its listen and external addresses: serves as an anchor,
    /// never anchors itself.
    Public,
    /// Behind NAT: anchors itself on `nat.anchors` public relays, never
    /// serves as one.
    Private,
}

impl std::str::FromStr for Reachability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "public" => Ok(Self::Public),
            "private" => Ok(Self::Private),
            other => Err(format!("{other:?} is not auto, public or private")),
        }
    }
}

/// Settings for relays behind NAT and for the public relays that anchor
/// them. Field names are the TOML keys under `[nat]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Nat {
    /// `auto`, `public` or `private`. Default `auto`. Env
    /// `MESHWHISPER_REACHABILITY`, flag `--reachability`.
    pub reachability: Reachability,
    /// Anchors a private relay keeps reservations on. Default 2; 0 keeps
    /// none (the relay is then reachable only through relays it dials).
    /// Flag `--anchors`.
    pub anchors: usize,
    /// Seconds before an anchor that refused or lost us is tried again.
    /// Default 30.
    pub anchor_retry_secs: u64,
    /// How often untested observed addresses are probed (AutoNAT v2), ms.
    /// Default 5000.
    pub probe_ms: u64,
    /// Failed probes, with none succeeding, before an `auto` relay takes
    /// itself for private. Default 1 (each observed address is probed
    /// once; a relay that listens on TCP only has one to probe).
    pub private_after: u32,
    /// Try hole punching (DCUtR) over circuits. Default true.
    pub hole_punch: bool,
    /// Serve as an anchor while public. Default true.
    pub serve: bool,
    /// Reservations held at once, all relays together. Default 256.
    pub max_reservations: usize,
    /// Reservations one relay may hold here. Default 2.
    pub max_reservations_per_peer: usize,
    /// Reservation lifetime, seconds (renewed at three quarters). Default 3600.
    pub reservation_secs: u64,
    /// Reservations (renewals included) one relay may make per minute. Default 10.
    pub reservations_per_peer_per_min: u32,
    /// Reservations per minute from one IP address. Default 30.
    pub reservations_per_ip_per_min: u32,
    /// Circuits open at once. Default 1024.
    pub max_circuits: usize,
    /// Circuits one relay may have open. Default 32.
    pub max_circuits_per_peer: usize,
    /// Longest life of a circuit, seconds. Default 21600 (6 h).
    pub circuit_secs: u64,
    /// Most bytes a circuit carries. Default 1073741824 (1 GiB).
    pub circuit_bytes: u64,
    /// Circuits one relay may open per minute. Default 60.
    pub circuits_per_peer_per_min: u32,
    /// Circuits per minute from one IP address. Default 120.
    pub circuits_per_ip_per_min: u32,
}

impl Default for Nat {
    fn default() -> Self {
        let l = meshwhisper_behaviour::nat::AnchorLimits::default();
        Self {
            reachability: Reachability::Auto,
            anchors: 2,
            anchor_retry_secs: 30,
            probe_ms: 5000,
            private_after: 1,
            hole_punch: true,
            serve: true,
            max_reservations: l.max_reservations,
            max_reservations_per_peer: l.max_reservations_per_peer,
            reservation_secs: l.reservation.as_secs(),
            reservations_per_peer_per_min: l.reservations_per_peer_per_min,
            reservations_per_ip_per_min: l.reservations_per_ip_per_min,
            max_circuits: l.max_circuits,
            max_circuits_per_peer: l.max_circuits_per_peer,
            circuit_secs: l.circuit_duration.as_secs(),
            circuit_bytes: l.circuit_bytes,
            circuits_per_peer_per_min: l.circuits_per_peer_per_min,
            circuits_per_ip_per_min: l.circuits_per_ip_per_min,
        }
    }
}

impl Nat {
    /// The anchor service's limits.
    pub fn anchor_limits(&self) -> meshwhisper_behaviour::nat::AnchorLimits {
        meshwhisper_behaviour::nat::AnchorLimits {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: self.max_reservations_per_peer,
            reservation: std::time::Duration::from_secs(self.reservation_secs),
            reservations_per_peer_per_min: self.reservations_per_peer_per_min,
            reservations_per_ip_per_min: self.reservations_per_ip_per_min,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            circuit_duration: std::time::Duration::from_secs(self.circuit_secs),
            circuit_bytes: self.circuit_bytes,
            circuits_per_peer_per_min: self.circuits_per_peer_per_min,
            circuits_per_ip_per_min: self.circuits_per_ip_per_min,
        }
    }

    /// The behaviour's NAT settings.
    pub fn settings(&self) -> meshwhisper_behaviour::nat::Settings {
        meshwhisper_behaviour::nat::Settings {
            serve: (self.serve && self.reachability != Reachability::Private)
                .then(|| self.anchor_limits()),
            probe: self.reachability == Reachability::Auto,
            probe_interval: std::time::Duration::from_millis(self.probe_ms.max(1)),
            hole_punch: self.hole_punch,
        }
    }
}

/// Storage limits (see `meshwhisper_storage::Config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// See [`Durability`]. Default `process`.
    pub durability: Durability,
    /// Queued packet lifetime in hours. Default 720. Env `BLOB_TTL_HOURS`.
    pub blob_ttl_hours: u64,
    /// Largest packet in bytes, header included. Default 262144. Env `MAX_BLOB_SIZE`.
    pub max_blob_size: usize,
    /// Queued packets per destination hash. Default 500. Env `MAX_BLOBS_PER_HASH`.
    pub max_blobs_per_hash: u32,
    /// Media lifetime in hours. Default 168. Env `MEDIA_TTL_HOURS`.
    pub media_ttl_hours: u64,
    /// Largest media blob in bytes. Default 52428800. Env `MAX_MEDIA_SIZE`.
    pub max_media_size: u64,
    /// Largest archive in bytes. Default 12582912.
    pub max_archive_size: u64,
    /// Largest prekey bundle in bytes. Default 16384.
    pub max_bundle_size: usize,
    /// Database size cap in bytes (0 = none). Default 0.
    pub max_db_bytes: u64,
    /// Writes that add data (packets, media, archives) are refused (507,
    /// or WebSocket close 1013) while the data directory's filesystem has
    /// less than this free. 0 = no check. Default 1073741824 (1 GiB).
    pub min_free_bytes: u64,
    /// Bytes per second of large packets (over 16 KiB) the store takes,
    /// relay-wide, so a flood of them cannot use all of the disk's
    /// bandwidth and stall everyone's writes (small packets are never
    /// paced); 0 = no limit. Default 67108864 (64 MiB/s).
    pub bulk_bytes_per_sec: u64,
    /// Archives neither written nor read for this many days are removed.
    /// Default 180.
    pub archive_ttl_days: u64,
    /// Expired rows removed per sweep. Default 5000.
    pub sweep_batch: u32,
    /// Seconds between sweeps. Default 300 (the reference prunes every 5 minutes).
    pub sweep_interval_secs: u64,
}

/// Rate limits (per client IP, per minute, fixed window as in the
/// reference) and connection bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// POST /media per minute. Default 20. Env `RATE_LIMIT_MEDIA`.
    pub rate_limit_media: u32,
    /// Directory and prekey writes per minute. Default 60. Env `RATE_LIMIT_DIR`.
    pub rate_limit_dir: u32,
    /// Reads per minute. Default 300. Env `RATE_LIMIT_READ`.
    pub rate_limit_read: u32,
    /// PUT /archive per minute. Default 30. Env `RATE_LIMIT_ARCHIVE`.
    pub rate_limit_archive: u32,
    /// Client IPs tracked by the rate limiter. Default 100000.
    pub rate_limit_max_clients: usize,
    /// Bytes one address (IPv6: one /64) may upload per UTC day as media
    /// and archives; beyond, uploads answer 507. 0 = no quota. Default
    /// 1073741824 (1 GiB).
    pub upload_bytes_per_ip_per_day: u64,
    /// Concurrent WebSocket clients. Default 10000.
    pub max_websockets: usize,
    /// Concurrent WebSocket clients from one address (IPv6: one /64; the
    /// forwarded address behind a trusted proxy). Default 256.
    pub max_websockets_per_ip: usize,
    /// Client gateway connections (HTTP and WebSocket) in total; 0 = as
    /// many as the file-descriptor limit allows after `fd_reserve`.
    /// Default 0.
    pub max_connections: usize,
    /// Gateway connections from one address (IPv6: one /64). Not applied
    /// with `trust_proxy` (every connection comes from the proxy then).
    /// Default 256.
    pub max_connections_per_ip: usize,
    /// File descriptors kept for everything but client connections (the
    /// store, libp2p, logs; loopback health checks get 32 of them).
    /// Default 1024.
    pub fd_reserve: usize,
    /// Request headers must arrive within this many seconds; also how long
    /// an idle keep-alive connection stays open. Default 10.
    pub header_timeout_secs: u64,
    /// Longest pause inside a request body, seconds. Default 30.
    pub body_idle_timeout_secs: u64,
    /// Longest a whole request body may take, seconds. Default 600.
    pub body_timeout_secs: u64,
    /// A connection whose writes make no progress this long (the client
    /// stopped reading) is closed, seconds. Default 60.
    pub write_stall_secs: u64,
    /// A WebSocket that leaves a ping unanswered this long is closed,
    /// seconds; idle sockets are pinged at a third of it. Default 90.
    pub ws_pong_timeout_secs: u64,
    /// Destination hashes one client may register. Default 4096 (the JS SDK registers 720).
    pub max_hashes_per_client: usize,
    /// Live deliveries queued to one connected client. Default 1024.
    /// Beyond this (or `client_queue_bytes`, or `live_queue_bytes` across
    /// all clients) packets stay stored and are drained to the client as
    /// soon as its queue empties.
    pub client_queue: usize,
    /// Bytes of live deliveries queued to one client. Default 1048576.
    pub client_queue_bytes: usize,
    /// Bytes of live deliveries queued across all clients. Default 268435456.
    pub live_queue_bytes: usize,
    /// Bytes of packets read from one client and being stored; the relay
    /// reads no more from it until they are. Default 4194304.
    pub client_inflight_bytes: usize,
    /// Bytes of packets being stored across all clients. Default 268435456.
    pub inflight_bytes: usize,
    /// Bytes a second one client (WebSocket or device) may store for
    /// recipients who are not connected here (a second's worth at once); beyond, its
    /// packets take the store writer's paced bulk lane, so that a flood
    /// for absent hashes cannot hold up everyone else's packets. 0: no
    /// limit. Default 1048576.
    pub client_away_bytes_per_sec: u64,
    /// Deliveries sent to one client and not yet confirmed (a WebSocket
    /// pong after them, a device's ack); beyond, delivery pauses. Default 4096.
    pub unconfirmed_deliveries: usize,
    /// Bytes of those deliveries. Default 8388608.
    pub unconfirmed_bytes: usize,
    /// Bytes of stored packets read per drain step. Default 1048576.
    pub drain_bytes: usize,
    /// Largest WebSocket text (control) frame. Default 262144.
    pub max_control_frame: usize,
    /// Largest JSON request body. Default 1048576.
    pub max_json_body: usize,
    /// Packets sent per drain (hello / pull). Default 1000.
    pub drain_batch: u32,
    /// Push wakes queued (each looked up, then a webhook call) before new
    /// ones are dropped (and counted). Default 1024.
    pub push_queue: usize,
    /// libp2p connections established in total. Default 10000.
    pub max_p2p_connections: u32,
    /// libp2p incoming connections still handshaking. Default 256.
    pub max_p2p_pending: u32,
    /// libp2p connections per peer. Default 4.
    pub max_p2p_per_peer: u32,
}

/// Federation admission mode (`--federation`, env `FEDERATION_MODE`): the
/// policy behaviour's own type.
pub use meshwhisper_behaviour::policy::Mode as FederationMode;

/// The mode as TOML spells it (`"open"`, `"allowlist"`, `"off"`).
mod mode_serde {
    use super::FederationMode;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &FederationMode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(m.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<FederationMode, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Relay federation settings. Relays are named by libp2p PeerId or by
/// their Ed25519 key in hex (64 digits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Federation {
    /// Admission mode. Default `open`.
    #[serde(with = "mode_serde")]
    pub mode: FederationMode,
    /// Relays to join through: multiaddrs ending in `/p2p/<PeerId>`. Env
    /// `FEDERATION_BOOTSTRAP` (comma-separated).
    pub bootstrap: Vec<String>,
    /// Relays admitted in `allowlist` mode.
    pub allowlist: Vec<String>,
    /// File of blocked relays (one per line, `#` comments). Re-read when it
    /// changes and on SIGHUP; connected peers on it are dropped at once.
    pub blocklist_file: Option<PathBuf>,
    /// Addresses to advertise in our record besides the listen addresses
    /// (e.g. a public address behind port forwarding).
    pub external_addrs: Vec<String>,
    /// Most admitted relays at once. Default 64. Env `FEDERATION_MAX_PEERS`.
    pub max_peers: usize,
    /// Transit-only: this relay dials only its bootstrap relays (its
    /// uplinks) and sends everything for other relays through them in
    /// `Transit` frames (docs/nat.md). Default false. Flag `--transit-only`.
    pub transit_only: bool,
    /// Most relays a transit frame may pass. Default 3.
    pub transit_hops: u8,
    /// Frames this relay carries for others at once. Default 8192.
    pub transit_max: usize,
    /// Of those, from one relay. Default 1024.
    pub transit_per_peer: usize,
    /// Send routed packets as onions through extra relays (docs/nat.md).
    /// Default false. Flag `--onion-transit`.
    pub onion_transit: bool,
    /// Extra relays on an onion path, 0 to 4. Default 1. Flag `--onion-hops`.
    pub onion_hops: u8,
    /// Onion replay tags remembered. Default 65 536.
    pub onion_replay_tags: usize,
    /// For how long, seconds. Default 600.
    pub onion_replay_secs: u64,
    /// Relays refused because `max_peers` is reached that may stay
    /// connected as guests at once, to walk this relay's address book (a
    /// newcomer that knows only this relay learns others to join). Default 16.
    pub max_guests: usize,
    /// How long a guest stays connected, seconds. Default 10.
    pub guest_secs: u64,
    /// Relays this relay dials on its own from the address book. Default 8.
    pub target_peers: usize,
    /// Federation frames (acks excepted) one relay may send per minute, with
    /// bursts of up to ten seconds' worth. Default 12000000 (200 000/s,
    /// above what one relay forwards to another on a 2-core machine, about
    /// 145 000/s: a peer relay carries many clients' traffic, so this only
    /// stops a misbehaving peer).
    pub frames_per_minute: u32,
    /// Most relays a flooded packet passes. Default 3.
    pub max_hops: u8,
    /// Floods remembered to drop repeats and send acks back along their
    /// path. Default 65536. (The home relay remembers the ids it stored
    /// until their senders have the acks, in the store: a resent packet is
    /// never stored twice.)
    pub dedup_entries: usize,
    /// How long a packet id is remembered, seconds: longer than a resend
    /// after a lost ack (60 s) plus a reconnect. Default 300 (at least 120).
    pub dedup_secs: u64,
    /// Packets waiting for a federation acknowledgement. Default 100000.
    pub max_pending: usize,
    /// Bytes of those packets held in memory. Default 268435456 (256 MiB).
    /// Beyond either bound a packet stays stored here only.
    pub max_pending_bytes: usize,
    /// Packets queued for one relay while it is being dialed. Default 1024.
    pub dial_queue: usize,
    /// Packets waiting for one relay's acknowledgement (sent or waiting for
    /// its window): a relay that never acknowledges cannot take the whole
    /// `max_pending`. Beyond, its packets stay stored here and are handed
    /// back once it is under half of this. Default 25000.
    pub max_pending_per_relay: usize,
    /// Routed packets sent to one relay and not yet acknowledged; the rest
    /// wait in order. Default 4096 (the receiver queues up to 4096 per
    /// store worker; its acks for connected recipients wait until they
    /// confirm delivery, so a busy link has many packets in flight).
    pub send_window: usize,
    /// Resend an unacknowledged packet after this long, ms; dials back off
    /// from here to 30 s. Default 2000.
    pub retry_ms: u64,
    /// Re-flood a packet no relay stored after this long, ms, doubling
    /// each time. Default 60000.
    pub flood_retry_ms: u64,
    /// Floods of one packet before giving up on finding its home relay
    /// (the stored copy stays here). Default 3.
    pub flood_attempts: u8,
    /// Re-sign our address record this often, hours (records expire after
    /// 7 days). Default 24.
    pub record_refresh_hours: u64,
    /// Publish records over gossipsub. Default true; off leaves
    /// convergence to anti-entropy alone.
    pub record_gossip: bool,
    /// Anti-entropy round with one peer every this many ms. Default 10000.
    pub anti_entropy_ms: u64,
    /// Digest entries per anti-entropy page. Default 256 (at most 1024).
    pub anti_entropy_page: u16,
    /// Relay records kept in the address book. Default 4096.
    pub address_book_max: u32,
    /// Destinations whose home relay is remembered from `Stored` acks (so
    /// later packets to them are routed, not flooded). Default 100000.
    pub learned_routes: usize,
    /// Workers doing federation's store work (storing packets from other
    /// relays, the address book). Default 2.
    pub store_workers: usize,
    /// Destination hashes remembered as homed here (about 100 bytes of
    /// memory each). Beyond, the least recently registered are forgotten.
    /// Default 1000000.
    pub homed_max: usize,
    /// Homed hashes kept for one client address (IPv6: one /64); beyond,
    /// that address's least recently registered are forgotten. The JS SDK
    /// registers 720 per client. Default 65536.
    pub homed_per_ip: usize,
    /// Homed-hash changes waiting to be written to the store (once a
    /// second, in commits of 4096). Beyond, a change is kept in memory only
    /// until the hash is registered again, so a registration flood cannot
    /// tie up the store. Default 65536.
    pub homed_dirty_max: usize,
    /// How long a registered hash stays homed here after its last
    /// registration, hours. Default 720 (the mailbox TTL).
    pub homed_hours: u64,
    /// Gossipsub mesh degree D. Default 2.
    pub gossip_mesh_n: usize,
    /// Gossipsub D_lo. Default 1.
    pub gossip_mesh_n_low: usize,
    /// Gossipsub D_hi. Default 4.
    pub gossip_mesh_n_high: usize,
    /// Gossipsub D_out. Default 1.
    pub gossip_mesh_outbound_min: usize,
    /// Gossipsub heartbeat, ms. Default 500.
    pub gossip_heartbeat_ms: u64,
}

impl Default for Federation {
    fn default() -> Self {
        Self {
            mode: FederationMode::Open,
            bootstrap: Vec::new(),
            allowlist: Vec::new(),
            blocklist_file: None,
            external_addrs: Vec::new(),
            max_peers: 64,
            transit_only: false,
            transit_hops: 3,
            transit_max: 8192,
            transit_per_peer: 1024,
            onion_transit: false,
            onion_hops: 1,
            onion_replay_tags: 65_536,
            onion_replay_secs: 600,
            target_peers: 8,
            frames_per_minute: 12_000_000,
            max_guests: 32,
            guest_secs: 10,
            max_hops: 3,
            dedup_entries: 65_536,
            dedup_secs: 300,
            max_pending: 100_000,
            max_pending_bytes: 256 * 1024 * 1024,
            dial_queue: 1024,
            max_pending_per_relay: 25_000,
            send_window: 4096,
            retry_ms: 2000,
            flood_retry_ms: 60_000,
            flood_attempts: 3,
            record_refresh_hours: 24,
            record_gossip: true,
            anti_entropy_ms: 10_000,
            anti_entropy_page: 256,
            address_book_max: 4096,
            learned_routes: 100_000,
            store_workers: 2,
            homed_max: 1_000_000,
            homed_per_ip: 65_536,
            homed_dirty_max: 65_536,
            homed_hours: 720,
            gossip_mesh_n: 2,
            gossip_mesh_n_low: 1,
            gossip_mesh_n_high: 4,
            gossip_mesh_outbound_min: 1,
            gossip_heartbeat_ms: 500,
        }
    }
}

impl Federation {
    /// The gossipsub parameters these settings imply.
    pub fn gossip_params(&self) -> meshwhisper_behaviour::node::GossipParams {
        meshwhisper_behaviour::node::GossipParams {
            mesh_n: self.gossip_mesh_n,
            mesh_n_low: self.gossip_mesh_n_low,
            mesh_n_high: self.gossip_mesh_n_high,
            mesh_outbound_min: self.gossip_mesh_outbound_min,
            heartbeat: std::time::Duration::from_millis(self.gossip_heartbeat_ms),
            ..Default::default()
        }
    }
}

/// Parses a relay name: a PeerId, or an Ed25519 key in hex.
pub fn parse_relay(s: &str) -> Option<libp2p::PeerId> {
    let s = s.trim();
    if let Ok(p) = s.parse::<libp2p::PeerId>() {
        return Some(p);
    }
    let bytes = hex::decode(s).ok()?;
    let key = libp2p::identity::ed25519::PublicKey::try_from_bytes(&bytes).ok()?;
    Some(libp2p::identity::PublicKey::from(key).to_peer_id())
}

/// Parses a blocklist or allowlist file: one relay per line, `#` starts a
/// comment, blank lines ignored. Lines that name no relay are errors.
pub fn parse_relay_list(text: &str) -> Result<std::collections::HashSet<libp2p::PeerId>, String> {
    let mut out = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        match parse_relay(line) {
            Some(p) => {
                out.insert(p);
            }
            None => {
                return Err(format!(
                    "line {}: {line:?} is not a PeerId or hex key",
                    i + 1
                ));
            }
        }
    }
    Ok(out)
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./meshwhisper-data"),
            db_path: None,
            http: "0.0.0.0:8080".into(),
            base_url: None,
            listen: vec![
                "/ip4/0.0.0.0/tcp/4001".into(),
                "/ip4/0.0.0.0/udp/4001/quic-v1".into(),
            ],
            listen_optional: Vec::new(),
            trust_proxy: false,
            push_webhook_url: None,
            log: "info".into(),
            storage: StorageConfig::default(),
            limits: Limits::default(),
            federation: Federation::default(),
            nat: Nat::default(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            durability: Durability::Process,
            blob_ttl_hours: 720,
            max_blob_size: 256 * 1024,
            max_blobs_per_hash: 500,
            media_ttl_hours: 168,
            max_media_size: 50 * 1024 * 1024,
            max_archive_size: 12 * 1024 * 1024,
            max_bundle_size: 16 * 1024,
            max_db_bytes: 0,
            min_free_bytes: 1024 * 1024 * 1024,
            bulk_bytes_per_sec: 64 * 1024 * 1024,
            archive_ttl_days: 180,
            sweep_batch: 5000,
            sweep_interval_secs: 300,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            rate_limit_media: 20,
            rate_limit_dir: 60,
            rate_limit_read: 300,
            rate_limit_archive: 30,
            rate_limit_max_clients: 100_000,
            upload_bytes_per_ip_per_day: 1024 * 1024 * 1024,
            max_websockets: 10_000,
            max_websockets_per_ip: 256,
            max_connections: 0,
            max_connections_per_ip: 256,
            fd_reserve: 1024,
            header_timeout_secs: 10,
            body_idle_timeout_secs: 30,
            body_timeout_secs: 600,
            write_stall_secs: 60,
            ws_pong_timeout_secs: 90,
            max_hashes_per_client: 4096,
            client_queue: 1024,
            client_queue_bytes: 1024 * 1024,
            live_queue_bytes: 256 * 1024 * 1024,
            client_inflight_bytes: 4 * 1024 * 1024,
            client_away_bytes_per_sec: 1024 * 1024,
            inflight_bytes: 256 * 1024 * 1024,
            unconfirmed_deliveries: 4096,
            unconfirmed_bytes: 8 * 1024 * 1024,
            drain_bytes: 1024 * 1024,
            max_control_frame: 256 * 1024,
            max_json_body: 1024 * 1024,
            drain_batch: 1000,
            push_queue: 1024,
            max_p2p_connections: 10_000,
            max_p2p_pending: 256,
            max_p2p_per_peer: 4,
        }
    }
}

/// Command-line overrides (highest precedence).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--http`.
    pub http: Option<String>,
    /// `--listen` (repeatable; replaces the list).
    pub listen: Vec<String>,
    /// `--listen-optional` (repeatable; replaces the list).
    pub listen_optional: Vec<String>,
    /// `--log`.
    pub log: Option<String>,
    /// `--federation`.
    pub federation: Option<FederationMode>,
    /// `--bootstrap` (repeatable; replaces the list).
    pub bootstrap: Vec<String>,
    /// `--blocklist`.
    pub blocklist_file: Option<PathBuf>,
    /// `--external-addr` (repeatable; replaces the list).
    pub external_addrs: Vec<String>,
    /// `--reachability`.
    pub reachability: Option<Reachability>,
    /// `--anchors`.
    pub anchors: Option<usize>,
    /// `--transit-only`.
    pub transit_only: bool,
    /// `--onion-transit`.
    pub onion_transit: bool,
    /// `--onion-hops`.
    pub onion_hops: Option<u8>,
}

fn parse_env<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, Error> {
    v.trim().parse().map_err(|_| Error::Invalid {
        key: key.into(),
        why: format!("cannot parse {v:?}"),
    })
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

impl Config {
    /// Builds the effective configuration: defaults, then `file` (if
    /// given), then `env` (a lookup, normally `std::env::var`), then
    /// `overrides`. Validates the result.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl Fn(&str) -> Option<String>,
        overrides: &Overrides,
    ) -> Result<Self, Error> {
        let mut cfg = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                toml::from_str::<Config>(&text).map_err(|e| Error::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?
            }
            None => Config::default(),
        };
        cfg.apply_env(&env)?;
        if let Some(d) = &overrides.data_dir {
            cfg.data_dir = d.clone();
        }
        if let Some(h) = &overrides.http {
            cfg.http = h.clone();
        }
        if !overrides.listen.is_empty() {
            cfg.listen = overrides.listen.clone();
        }
        if !overrides.listen_optional.is_empty() {
            cfg.listen_optional = overrides.listen_optional.clone();
        }
        if let Some(l) = &overrides.log {
            cfg.log = l.clone();
        }
        if let Some(m) = overrides.federation {
            cfg.federation.mode = m;
        }
        if !overrides.bootstrap.is_empty() {
            cfg.federation.bootstrap = overrides.bootstrap.clone();
        }
        if let Some(b) = &overrides.blocklist_file {
            cfg.federation.blocklist_file = Some(b.clone());
        }
        if !overrides.external_addrs.is_empty() {
            cfg.federation.external_addrs = overrides.external_addrs.clone();
        }
        if let Some(r) = overrides.reachability {
            cfg.nat.reachability = r;
        }
        if let Some(n) = overrides.anchors {
            cfg.nat.anchors = n;
        }
        if overrides.transit_only {
            cfg.federation.transit_only = true;
        }
        if overrides.onion_transit {
            cfg.federation.onion_transit = true;
        }
        if let Some(n) = overrides.onion_hops {
            cfg.federation.onion_hops = n;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn apply_env(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), Error> {
        if let Some(v) = env("MESHWHISPER_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env("DB_PATH") {
            self.db_path = Some(PathBuf::from(v));
        }
        // The reference listens on LISTEN_HOST:PORT.
        let host = env("LISTEN_HOST");
        let port = env("PORT");
        if host.is_some() || port.is_some() {
            let (cur_host, cur_port) = split_host_port(&self.http);
            let host = host.unwrap_or(cur_host);
            let port = port.unwrap_or(cur_port);
            let port: u16 = parse_env("PORT", &port)?;
            self.http = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            if self.http.parse::<std::net::SocketAddr>().is_err() {
                return Err(Error::Invalid {
                    key: "LISTEN_HOST".into(),
                    why: format!("{host:?} is not an IP address"),
                });
            }
        }
        if let Some(v) = env("MESHWHISPER_HTTP") {
            self.http = v;
        }
        if let Some(v) = env("MESHWHISPER_LISTEN") {
            self.listen = v
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(v) = env("BASE_URL") {
            self.base_url = Some(v).filter(|s| !s.is_empty());
        }
        if let Some(v) = env("TRUST_PROXY") {
            self.trust_proxy = truthy(&v);
        }
        if let Some(v) = env("PUSH_WEBHOOK_URL") {
            self.push_webhook_url = Some(v).filter(|s| !s.is_empty());
        }
        let s = &mut self.storage;
        if let Some(v) = env("BLOB_TTL_HOURS") {
            s.blob_ttl_hours = parse_env("BLOB_TTL_HOURS", &v)?;
        }
        if let Some(v) = env("MAX_BLOB_SIZE") {
            s.max_blob_size = parse_env("MAX_BLOB_SIZE", &v)?;
        }
        if let Some(v) = env("MAX_BLOBS_PER_HASH") {
            s.max_blobs_per_hash = parse_env("MAX_BLOBS_PER_HASH", &v)?;
        }
        if let Some(v) = env("MEDIA_TTL_HOURS") {
            s.media_ttl_hours = parse_env("MEDIA_TTL_HOURS", &v)?;
        }
        if let Some(v) = env("MAX_MEDIA_SIZE") {
            s.max_media_size = parse_env("MAX_MEDIA_SIZE", &v)?;
        }
        if let Some(v) = env("FEDERATION_MODE") {
            self.federation.mode = v.parse().map_err(|why| Error::Invalid {
                key: "FEDERATION_MODE".into(),
                why,
            })?;
        }
        if let Some(v) = env("FEDERATION_BOOTSTRAP") {
            self.federation.bootstrap = v
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(v) = env("MESHWHISPER_REACHABILITY") {
            self.nat.reachability = v.parse().map_err(|why| Error::Invalid {
                key: "MESHWHISPER_REACHABILITY".into(),
                why,
            })?;
        }
        if let Some(v) = env("FEDERATION_MAX_PEERS") {
            self.federation.max_peers = parse_env("FEDERATION_MAX_PEERS", &v)?;
        }
        let l = &mut self.limits;
        for (key, slot) in [
            ("RATE_LIMIT_MEDIA", &mut l.rate_limit_media),
            ("RATE_LIMIT_DIR", &mut l.rate_limit_dir),
            ("RATE_LIMIT_READ", &mut l.rate_limit_read),
            ("RATE_LIMIT_ARCHIVE", &mut l.rate_limit_archive),
        ] {
            if let Some(v) = env(key) {
                *slot = parse_env(key, &v)?;
            }
        }
        Ok(())
    }

    /// Checks ranges and formats.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |key: &str, why: &str| {
            Err(Error::Invalid {
                key: key.into(),
                why: why.into(),
            })
        };
        if self.http.parse::<std::net::SocketAddr>().is_err() {
            return bad("http", "must be HOST:PORT with an IP address host");
        }
        if let Err(why) = check_log_filter(&self.log) {
            return bad("log", &why);
        }
        for (key, list) in [
            ("listen", &self.listen),
            ("listen_optional", &self.listen_optional),
        ] {
            for a in list {
                if a.parse::<libp2p::Multiaddr>().is_err() {
                    return bad(
                        key,
                        &format!("{a:?} is not a multiaddr (e.g. /ip4/0.0.0.0/tcp/4001)"),
                    );
                }
            }
        }
        if self.listen.is_empty() && self.listen_optional.is_empty() {
            return bad("listen", "at least one libp2p listen address is needed");
        }
        if let Some(u) = &self.push_webhook_url
            && !u.starts_with("http://")
        {
            return bad("push_webhook_url", "only http:// URLs are supported");
        }
        let s = &self.storage;
        if s.max_blob_size < 31 {
            return bad(
                "storage.max_blob_size",
                "must be at least 31 (the packet header)",
            );
        }
        if s.max_blobs_per_hash == 0 || s.blob_ttl_hours == 0 || s.media_ttl_hours == 0 {
            return bad("storage", "counts and TTLs must be positive");
        }
        if s.archive_ttl_days == 0 {
            return bad("storage.archive_ttl_days", "must be positive");
        }
        if s.sweep_batch == 0 || s.sweep_interval_secs == 0 {
            return bad("storage.sweep_*", "must be positive");
        }
        let f = &self.federation;
        for b in &f.bootstrap {
            let ok = b.parse::<libp2p::Multiaddr>().ok().is_some_and(|a| {
                matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_)))
            });
            if !ok {
                return bad(
                    "federation.bootstrap",
                    &format!("{b:?} is not a multiaddr ending in /p2p/<PeerId>"),
                );
            }
        }
        if let Err(e) = self.nat.anchor_limits().validate() {
            return bad(&format!("nat.{}", e.0), "must be positive");
        }
        if self.nat.anchors > meshwhisper_crypto::address_record::MAX_ANCHORS {
            return bad(
                "nat.anchors",
                "must be at most 16 (an address record names 16 anchors)",
            );
        }
        if self.nat.probe_ms == 0 || self.nat.private_after == 0 || self.nat.anchor_retry_secs == 0
        {
            return bad(
                "nat",
                "probe_ms, private_after and anchor_retry_secs must be positive",
            );
        }
        for a in &f.external_addrs {
            if a.parse::<libp2p::Multiaddr>().is_err() {
                return bad(
                    "federation.external_addrs",
                    &format!("{a:?} is not a multiaddr"),
                );
            }
        }
        for a in &f.allowlist {
            if parse_relay(a).is_none() {
                return bad(
                    "federation.allowlist",
                    &format!("{a:?} is not a PeerId or hex key"),
                );
            }
        }
        if f.mode == FederationMode::Allowlist && f.allowlist.is_empty() {
            return bad(
                "federation.allowlist",
                "allowlist mode needs at least one relay",
            );
        }
        if f.transit_hops < 2
            || usize::from(f.transit_hops)
                > meshwhisper_behaviour::federation::codec::MAX_TRANSIT_DEPTH + 1
            || f.transit_max == 0
            || f.transit_per_peer == 0
        {
            return bad(
                "federation.transit_hops",
                "transit_hops must be 2 to 5, transit_max and transit_per_peer positive",
            );
        }
        if usize::from(f.onion_hops) >= meshwhisper_crypto::onion::MAX_HOPS
            || f.onion_replay_tags == 0
            || f.onion_replay_secs == 0
        {
            return bad(
                "federation.onion_hops",
                "onion_hops must be 0 to 4, onion_replay_tags and onion_replay_secs positive",
            );
        }
        if f.transit_only && f.bootstrap.is_empty() {
            return bad(
                "federation.transit_only",
                "a transit-only relay needs at least one bootstrap relay (its uplink)",
            );
        }
        if f.flood_attempts == 0
            || f.max_hops == 0
            || f.dedup_entries == 0
            || f.max_pending == 0
            || f.dial_queue == 0
            || f.max_pending_per_relay == 0
        {
            return bad(
                "federation",
                "max_hops, dedup_entries, max_pending, max_pending_per_relay and dial_queue must be positive",
            );
        }
        if f.dedup_secs < 120 {
            return bad(
                "federation.dedup_secs",
                "must be at least 120 (a resend after a lost ack comes after 60 s)",
            );
        }
        if f.store_workers == 0 || f.store_workers > 64 || f.learned_routes == 0 {
            return bad(
                "federation",
                "store_workers must be 1..=64 and learned_routes positive",
            );
        }
        if f.send_window == 0 || f.send_window > 4096 {
            return bad("federation.send_window", "must be 1..=4096");
        }
        if f.retry_ms == 0 || f.flood_retry_ms == 0 || f.anti_entropy_ms == 0 {
            return bad("federation", "intervals must be positive");
        }
        if f.record_refresh_hours == 0 || f.record_refresh_hours >= 7 * 24 {
            return bad(
                "federation.record_refresh_hours",
                "must be 1..167 (records expire after 7 days)",
            );
        }
        if f.anti_entropy_page == 0
            || f.anti_entropy_page as usize > meshwhisper_behaviour::federation::codec::MAX_DIGEST
        {
            return bad("federation.anti_entropy_page", "must be 1..=1024");
        }
        if let Err(e) = f.gossip_params().validate() {
            return bad("federation.gossip_*", e);
        }
        let l = &self.limits;
        if l.max_websockets == 0 || l.client_queue == 0 || l.max_hashes_per_client == 0 {
            return bad("limits", "bounds must be positive");
        }
        if l.unconfirmed_deliveries == 0 || l.drain_batch == 0 || l.max_websockets_per_ip == 0 {
            return bad("limits", "bounds must be positive");
        }
        if l.header_timeout_secs == 0
            || l.body_idle_timeout_secs == 0
            || l.body_timeout_secs == 0
            || l.write_stall_secs == 0
            || l.ws_pong_timeout_secs < 3
        {
            return bad(
                "limits.*_secs",
                "timeouts must be positive (ws_pong_timeout_secs at least 3)",
            );
        }
        let packet = s.max_blob_size;
        for (key, v) in [
            ("limits.client_queue_bytes", l.client_queue_bytes),
            ("limits.live_queue_bytes", l.live_queue_bytes),
            ("limits.client_inflight_bytes", l.client_inflight_bytes),
            ("limits.inflight_bytes", l.inflight_bytes),
            ("limits.unconfirmed_bytes", l.unconfirmed_bytes),
            ("limits.drain_bytes", l.drain_bytes),
        ] {
            if v < packet {
                return bad(
                    key,
                    &format!("must hold at least one packet (storage.max_blob_size = {packet})"),
                );
            }
        }
        Ok(())
    }

    /// The relay core's bounds.
    pub fn core_limits(&self) -> crate::core::CoreLimits {
        crate::core::CoreLimits {
            max_packet: self.storage.max_blob_size,
            client_queue: self.limits.client_queue,
            client_queue_bytes: self.limits.client_queue_bytes,
            live_queue_bytes: self.limits.live_queue_bytes,
            inflight_bytes: self.limits.inflight_bytes,
            mailbox_ttl_ms: self.storage.blob_ttl_hours.saturating_mul(3_600_000),
            max_hashes: self.limits.max_hashes_per_client,
            homed_ttl_ms: self.federation.homed_hours.saturating_mul(3_600_000),
            homed_max: self.federation.homed_max,
            homed_per_ip: self.federation.homed_per_ip,
            homed_dirty_max: self.federation.homed_dirty_max,
        }
    }

    /// A device session's bounds.
    pub fn device_bounds(&self) -> crate::device::session::Bounds {
        crate::device::session::Bounds {
            drain_batch: self.limits.drain_batch,
            drain_bytes: self.limits.drain_bytes,
            unacked: self.limits.unconfirmed_deliveries,
            unacked_bytes: self.limits.unconfirmed_bytes,
            inflight_bytes: self.limits.client_inflight_bytes,
            away_bytes_per_sec: self.limits.client_away_bytes_per_sec,
        }
    }

    /// The device protocol's settings on a relay.
    pub fn device_config(&self) -> meshwhisper_behaviour::device::Config {
        let mut c =
            meshwhisper_behaviour::device::Config::new(meshwhisper_behaviour::device::Role::Relay);
        c.max_frame = self.storage.max_blob_size + 64;
        c
    }

    /// Connection limits of the Swarm.
    pub fn p2p_limits(&self) -> meshwhisper_behaviour::node::Limits {
        meshwhisper_behaviour::node::Limits {
            max_connections: self.limits.max_p2p_connections,
            max_pending_incoming: self.limits.max_p2p_pending,
            max_per_peer: self.limits.max_p2p_per_peer,
        }
    }

    /// Federation admission, gossip and stream settings (the blocklist file
    /// read now; a file that cannot be read is logged and starts empty).
    pub fn federation_settings(&self) -> meshwhisper_behaviour::node::FederationSettings {
        let f = &self.federation;
        let allowlist = f.allowlist.iter().filter_map(|a| parse_relay(a)).collect();
        let blocklist = match &f.blocklist_file {
            Some(path) => crate::read_blocklist(path).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "blocklist not loaded");
                Default::default()
            }),
            None => Default::default(),
        };
        meshwhisper_behaviour::node::FederationSettings {
            policy: meshwhisper_behaviour::policy::Config {
                mode: f.mode,
                max_peers: f.max_peers,
                allowlist,
                blocklist,
                frames_per_minute: f.frames_per_minute,
                max_guests: f.max_guests,
                guest_ms: f.guest_secs.saturating_mul(1000),
            },
            gossip: f.gossip_params(),
            stream: meshwhisper_behaviour::federation::Config {
                max_frame: meshwhisper_behaviour::federation::codec::DEFAULT_MAX_FRAME
                    .max(self.storage.max_blob_size + 64),
                ..Default::default()
            },
            nat: self.nat.settings(),
            transit_only: f.transit_only,
        }
    }

    /// The storage configuration this implies.
    pub fn storage_config(&self) -> meshwhisper_storage::Config {
        let mut c = meshwhisper_storage::Config::new(&self.data_dir);
        c.db_path = self.db_path.clone();
        let s = &self.storage;
        c.durability = match s.durability {
            Durability::Process => meshwhisper_storage::Durability::Process,
            Durability::PowerLoss => meshwhisper_storage::Durability::PowerLoss,
        };
        c.mailbox_ttl_ms = s.blob_ttl_hours.saturating_mul(3_600_000);
        c.max_packet_bytes = s.max_blob_size;
        c.mailbox_max_per_dest = s.max_blobs_per_hash;
        c.media_ttl_ms = s.media_ttl_hours.saturating_mul(3_600_000);
        c.media_max_bytes = s.max_media_size;
        c.archive_max_bytes = s.max_archive_size;
        c.bundle_max_bytes = s.max_bundle_size;
        c.max_db_bytes = (s.max_db_bytes > 0).then_some(s.max_db_bytes);
        c.min_free_bytes = s.min_free_bytes;
        c.bulk_bytes_per_sec = s.bulk_bytes_per_sec;
        c.archive_ttl_ms = s.archive_ttl_days.saturating_mul(24 * 3_600_000);
        c.address_book_max = self.federation.address_book_max;
        c
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Checks a log filter: comma-separated directives, each a level (`info`)
/// or `target=level` (`meshwhisper_node=debug`). tracing would take a bare
/// word such as `verbose` as a target name and log nothing useful; here it
/// is an error.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let is_level = |l: &str| LEVELS.contains(&l.trim().to_ascii_lowercase().as_str());
    let mut any = false;
    for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        any = true;
        let ok = match d.rsplit_once('=') {
            Some((target, level)) => {
                !target.trim().is_empty()
                    && is_level(level)
                    && target.chars().all(|c| {
                        c.is_ascii_alphanumeric()
                            || matches!(c, '_' | ':' | '-' | '[' | ']' | '{' | '}' | '.')
                    })
            }
            None => is_level(d),
        };
        if !ok {
            return Err(format!(
                "{d:?} is not a level ({}) or target=level, e.g. meshwhisper_node=debug",
                LEVELS.join(", ")
            ));
        }
    }
    if !any {
        return Err("empty; use e.g. info".into());
    }
    Ok(())
}

fn split_host_port(s: &str) -> (String, String) {
    match s.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_start_matches('[').trim_end_matches(']').to_string(),
            p.to_string(),
        ),
        None => (s.to_string(), "8080".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn precedence_flags_over_env_over_file() {
        let dir = std::env::temp_dir().join(format!("mw-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("c.toml");
        std::fs::write(&file, "http = \"127.0.0.1:9000\"\n[storage]\nmax_blobs_per_hash = 7\n[limits]\nrate_limit_read = 5\n").expect("write");
        let c = Config::load(Some(&file), env(&[]), &Overrides::default()).expect("load");
        assert_eq!(
            (
                c.http.as_str(),
                c.storage.max_blobs_per_hash,
                c.limits.rate_limit_read
            ),
            ("127.0.0.1:9000", 7, 5)
        );
        let c = Config::load(
            Some(&file),
            env(&[
                ("PORT", "9100"),
                ("RATE_LIMIT_READ", "9"),
                ("TRUST_PROXY", "yes"),
            ]),
            &Overrides::default(),
        )
        .expect("load");
        assert_eq!(
            (c.http.as_str(), c.limits.rate_limit_read, c.trust_proxy),
            ("127.0.0.1:9100", 9, true)
        );
        let o = Overrides {
            http: Some("127.0.0.1:9200".into()),
            ..Default::default()
        };
        let c = Config::load(Some(&file), env(&[("PORT", "9100")]), &o).expect("load");
        assert_eq!(c.http, "127.0.0.1:9200");
        // Round trip through --print-config output.
        let back: Config = toml::from_str(&c.to_toml()).expect("parse printed");
        assert_eq!(back, c);
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let e = Config::load(
            None,
            env(&[("MAX_BLOB_SIZE", "big")]),
            &Overrides::default(),
        )
        .expect_err("bad");
        assert!(e.to_string().contains("MAX_BLOB_SIZE"), "{e}");
        let e = Config::load(None, env(&[("MAX_BLOB_SIZE", "10")]), &Overrides::default())
            .expect_err("bad");
        assert!(e.to_string().contains("max_blob_size"), "{e}");
        let dir = std::env::temp_dir().join(format!("mw-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("c.toml");
        std::fs::write(&file, "no_such_key = 1\n").expect("write");
        let e = Config::load(Some(&file), env(&[]), &Overrides::default()).expect_err("bad");
        assert!(e.to_string().contains("no_such_key"), "{e}");
    }

    #[test]
    fn federation_settings_are_checked() {
        let c = Config::load(
            None,
            env(&[("FEDERATION_MODE", "off"), ("FEDERATION_MAX_PEERS", "7")]),
            &Overrides::default(),
        )
        .expect("load");
        assert_eq!(
            (c.federation.mode, c.federation.max_peers),
            (FederationMode::Off, 7)
        );
        let e = Config::load(
            None,
            env(&[("FEDERATION_MODE", "sometimes")]),
            &Overrides::default(),
        )
        .expect_err("bad mode");
        assert!(e.to_string().contains("FEDERATION_MODE"), "{e}");
        let o = Overrides {
            bootstrap: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            ..Default::default()
        };
        let e = Config::load(None, env(&[]), &o).expect_err("no /p2p");
        assert!(e.to_string().contains("federation.bootstrap"), "{e}");
        let o = Overrides {
            federation: Some(FederationMode::Allowlist),
            ..Default::default()
        };
        assert!(
            Config::load(None, env(&[]), &o).is_err(),
            "allowlist mode needs entries"
        );
        let mut c = Config::default();
        c.federation.gossip_mesh_outbound_min = 2;
        let e = c.validate().expect_err("2·D_out > D");
        assert!(e.to_string().contains("gossip"), "{e}");
        let peer = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let list = parse_relay_list(&format!("# comment\n{peer}\n\n")).expect("list");
        assert!(list.contains(&peer));
        assert!(parse_relay_list("not-a-relay\n").is_err());
    }
}
