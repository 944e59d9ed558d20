//! The composed behaviour of a relay node. Fields are polled in declaration
//! order; each is documented.

use crate::{device, federation, nat, policy};
use libp2p::{
    StreamProtocol, autonat, connection_limits, dcutr, gossipsub, identify,
    identity::Keypair,
    kad, ping, relay,
    swarm::{NetworkBehaviour, behaviour::toggle::Toggle},
};
use std::time::Duration;

/// Protocol name advertised by identify.
pub const PROTOCOL_VERSION: &str = "/meshwhisper/0.1.0";
/// The Kademlia protocol name of MeshWhisper relays.
pub const KAD_PROTOCOL: &str = "/meshwhisper/kad/1";
/// The gossipsub topic carrying signed address records.
pub const RECORDS_TOPIC: &str = "meshwhisper/address-records/1";

/// Gossipsub mesh parameters. The defaults suit meshes from 2 relays up
/// (libp2p's own defaults assume a dozen peers and leave a 3-relay mesh
/// permanently "low").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GossipParams {
    /// Target mesh degree D. Default 2.
    pub mesh_n: usize,
    /// Lower bound D_lo. Default 1.
    pub mesh_n_low: usize,
    /// Upper bound D_hi. Default 4.
    pub mesh_n_high: usize,
    /// Outbound peers kept in the mesh, D_out. Default 1.
    pub mesh_outbound_min: usize,
    /// Peers gossiped to outside the mesh. Default 2.
    pub gossip_lazy: usize,
    /// Heartbeat. Default 500 ms.
    pub heartbeat: Duration,
    /// Largest message. Default 64 KiB (a record is at most ~4 KiB).
    pub max_transmit: usize,
}

impl Default for GossipParams {
    fn default() -> Self {
        Self {
            mesh_n: 2,
            mesh_n_low: 1,
            mesh_n_high: 4,
            mesh_outbound_min: 1,
            gossip_lazy: 2,
            heartbeat: Duration::from_millis(500),
            max_transmit: 64 * 1024,
        }
    }
}

impl GossipParams {
    /// Checks what gossipsub's builder no longer checks:
    /// `D_out ≤ D_lo ≤ D ≤ D_hi`, `2·D_out ≤ D`, all positive.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.mesh_n == 0 || self.mesh_n_low == 0 || self.mesh_outbound_min == 0 {
            return Err("gossip mesh degrees must be positive");
        }
        if !(self.mesh_outbound_min <= self.mesh_n_low
            && self.mesh_n_low <= self.mesh_n
            && self.mesh_n <= self.mesh_n_high)
        {
            return Err("gossip mesh degrees must satisfy D_out <= D_lo <= D <= D_hi");
        }
        if 2 * self.mesh_outbound_min > self.mesh_n {
            return Err("gossip mesh_outbound_min must be at most mesh_n / 2");
        }
        if self.heartbeat.is_zero() || self.max_transmit < 4096 {
            return Err("gossip heartbeat must be positive and max_transmit at least 4096");
        }
        Ok(())
    }
}

/// Why the behaviour could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The gossipsub settings are inconsistent.
    #[error("gossipsub settings: {0}")]
    Gossip(String),
}

/// Federation settings of the behaviour.
#[derive(Debug, Clone, Default)]
pub struct FederationSettings {
    /// Admission policy.
    pub policy: policy::Config,
    /// Gossipsub mesh parameters.
    pub gossip: GossipParams,
    /// Federation stream limits.
    pub stream: federation::Config,
    /// Reachability probes, the anchor service, hole punching.
    pub nat: nat::Settings,
    /// A transit-only relay dials no one but its uplinks: no Kademlia
    /// (whose lookups would dial relays).
    pub transit_only: bool,
}

/// Connection bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Established connections in total. Default 10 000.
    pub max_connections: u32,
    /// Incoming connections still handshaking. Default 256.
    pub max_pending_incoming: u32,
    /// Established connections per peer. Default 4 (at least 2 for hole punching).
    pub max_per_peer: u32,
}

impl Limits {
    /// The connection-limits behaviour enforcing these bounds.
    pub fn behaviour(&self) -> connection_limits::Behaviour {
        connection_limits::Behaviour::new(
            connection_limits::ConnectionLimits::default()
                .with_max_established(Some(self.max_connections))
                .with_max_pending_incoming(Some(self.max_pending_incoming))
                .with_max_established_per_peer(Some(self.max_per_peer)),
        )
    }
}

/// identify for `key`, announcing [`PROTOCOL_VERSION`] (relays and devices).
pub fn identify_behaviour(key: &Keypair) -> identify::Behaviour {
    identify::Behaviour::new(identify::Config::new(PROTOCOL_VERSION.into(), key.public()))
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_pending_incoming: 256,
            max_per_peer: 4,
        }
    }
}

/// The node's behaviour.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Caps connections; first, so it decides before anything else sees a
    /// connection.
    pub limits: connection_limits::Behaviour,
    /// Denies blocklisted peers and admits relays; second, so a blocked
    /// peer's connection is refused before any protocol handler exists.
    pub policy: policy::Behaviour,
    /// The anchor service (circuit relay v2 server) a public relay runs
    /// for relays behind NAT; enabled only while this relay is public
    /// (the Swarm owner sets its status). Not built when federation is off
    /// or the relay never serves.
    pub relay_server: Toggle<relay::Behaviour>,
    /// Reservations on anchors, and dialing relays through their
    /// anchors' circuits (the transport half is in the Swarm's transport).
    pub relay_client: relay::client::Behaviour,
    /// Hole punching: upgrades a connection that came through a circuit
    /// to a direct one. After the limits (which must see, and may deny,
    /// the direct connection before DCUtR reports it), before the rest.
    pub dcutr: Toggle<dcutr::Behaviour>,
    /// Asks relays to dial our observed addresses back (AutoNAT v2):
    /// whether this relay is publicly reachable.
    pub autonat: Toggle<autonat::v2::client::Behaviour>,
    /// Dials other relays' addresses back for them (AutoNAT v2).
    pub autonat_server: Toggle<autonat::v2::server::Behaviour>,
    /// Tells peers our listen addresses and protocols, and learns theirs:
    /// its protocol list is how a relay is told from a device.
    pub identify: identify::Behaviour,
    /// Keeps connections measured and detects dead ones.
    pub ping: ping::Behaviour,
    /// Spreads signed address records (topic [`RECORDS_TOPIC`]); messages
    /// are validated by the Swarm owner before they are forwarded. Not
    /// built when federation is off.
    pub gossipsub: Toggle<gossipsub::Behaviour>,
    /// Finds relays not yet in the address book (server mode always: a
    /// LAN-only mesh never confirms an external address). Not built when
    /// federation is off.
    pub kad: Toggle<kad::Behaviour<kad::store::MemoryStore>>,
    /// Relay-to-relay packet forwarding and anti-entropy
    /// (`/meshwhisper/federation/2`).
    pub federation: federation::Behaviour,
    /// Native devices' long-lived streams (`/meshwhisper/device/1`).
    pub device: device::Behaviour,
}

impl Behaviour {
    /// The behaviour for `key`, speaking the device protocol in
    /// `device.role`; `relay_client` comes from the Swarm's transport.
    pub fn new(
        key: &Keypair,
        relay_client: relay::client::Behaviour,
        device: device::Config,
        limits: Limits,
        fed: FederationSettings,
    ) -> Result<Self, BuildError> {
        let federating = fed.policy.mode != policy::Mode::Off;
        let peer_id = key.public().to_peer_id();
        let n = fed.nat;
        let relay_server = match n.serve {
            Some(l) if federating => {
                let mut r = relay::Behaviour::new(peer_id, l.relay_config());
                // Off until the Swarm owner finds (or is told) this relay
                // is public: a relay behind NAT, whose only addresses are
                // circuits, must never offer itself as an anchor.
                r.set_status(Some(relay::Status::Disable));
                Some(r)
            }
            _ => None,
        };
        let autonat = (federating && n.probe).then(|| {
            autonat::v2::client::Behaviour::new(
                rand::make_rng::<rand::rngs::StdRng>(),
                autonat::v2::client::Config::default().with_probe_interval(n.probe_interval),
            )
        });
        let autonat_server = federating
            .then(|| autonat::v2::server::Behaviour::new(rand::make_rng::<rand::rngs::StdRng>()));
        let (gossipsub, kad) = if federating {
            let (g, k) = federation_protocols(key, &fed.gossip)?;
            (Some(g), Some(k).filter(|_| !fed.transit_only))
        } else {
            (None, None)
        };
        Ok(Self {
            limits: limits.behaviour(),
            identify: identify_behaviour(key),
            policy: policy::Behaviour::new(fed.policy),
            relay_server: relay_server.into(),
            relay_client,
            dcutr: (federating && n.hole_punch)
                .then(|| dcutr::Behaviour::new(peer_id))
                .into(),
            autonat: autonat.into(),
            autonat_server: autonat_server.into(),
            ping: ping::Behaviour::new(ping::Config::new()),
            gossipsub: gossipsub.into(),
            kad: kad.into(),
            federation: federation::Behaviour::new(fed.stream).with_local(peer_id),
            device: device::Behaviour::new(device),
        })
    }
}

/// Gossipsub (subscribed to [`RECORDS_TOPIC`]) and Kademlia for a
/// federating relay.
fn federation_protocols(
    key: &Keypair,
    g: &GossipParams,
) -> Result<
    (
        gossipsub::Behaviour,
        kad::Behaviour<kad::store::MemoryStore>,
    ),
    BuildError,
> {
    {
        g.validate().map_err(|e| BuildError::Gossip(e.into()))?;
        let gossip_cfg = gossipsub::ConfigBuilder::default()
            .mesh_n(g.mesh_n)
            .mesh_n_low(g.mesh_n_low)
            .mesh_n_high(g.mesh_n_high)
            .mesh_outbound_min(g.mesh_outbound_min)
            .gossip_lazy(g.gossip_lazy)
            .heartbeat_interval(g.heartbeat)
            .max_transmit_size(g.max_transmit)
            .validation_mode(gossipsub::ValidationMode::Strict)
            .validate_messages()
            .build()
            .map_err(|e| BuildError::Gossip(e.to_string()))?;
        let mut gossipsub = gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(key.clone()),
            gossip_cfg,
        )
        .map_err(|e| BuildError::Gossip(e.to_string()))?;
        gossipsub
            .subscribe(&gossipsub::IdentTopic::new(RECORDS_TOPIC))
            .map_err(|e| BuildError::Gossip(e.to_string()))?;
        let peer_id = key.public().to_peer_id();
        let mut kad_cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
        // No timer-driven bootstrap: it fails (and warns) on a relay that
        // knows no one yet. The Swarm owner bootstraps once relays are
        // admitted, and kad bootstraps by itself when its table grows.
        kad_cfg.set_periodic_bootstrap_interval(None);
        let mut kad =
            kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_cfg);
        kad.set_mode(Some(kad::Mode::Server));
        Ok((gossipsub, kad))
    }
}
