//! What the federation state machines ask for, and what they may ask of
//! the network and the store.

use bytes::Bytes;
use libp2p::gossipsub::{MessageAcceptance, MessageId};
use libp2p::{Multiaddr, PeerId};
use meshwhisper_behaviour::federation::codec::{Frame, PacketId};
use meshwhisper_behaviour::relay_key::RelayKey;
use meshwhisper_crypto::address_record::AddressRecord;
use meshwhisper_crypto::destination::DestHash;
use meshwhisper_storage::mailbox::MailboxId;

/// One thing to do, as decided by a state machine. The driver carries
/// actions out against the Swarm (frames, dials, gossip) or hands them to
/// the bounded pool of store workers ([`Job`]).
#[derive(Debug)]
pub enum Action {
    /// Send a frame on `peer`'s federation stream.
    Send {
        /// The relay.
        peer: PeerId,
        /// The frame.
        frame: Frame,
    },
    /// Open our side of the federation stream to an admitted relay.
    OpenStream(PeerId),
    /// Dial a relay at these addresses.
    Dial {
        /// The relay.
        peer: PeerId,
        /// Where.
        addrs: Vec<Multiaddr>,
    },
    /// Tell Kademlia where a relay is.
    KadAddAddress {
        /// The relay.
        peer: PeerId,
        /// Its address.
        addr: Multiaddr,
    },
    /// Ask the DHT where a relay is.
    KadFindPeer(PeerId),
    /// Refresh the DHT.
    KadBootstrap,
    /// Publish our signed address record over gossip.
    Publish(Vec<u8>),
    /// Tell gossipsub what a message was worth.
    ReportGossip {
        /// The message.
        message_id: MessageId,
        /// Who forwarded it to us.
        source: PeerId,
        /// Accept (forward it on), ignore or reject (penalise the source).
        acceptance: MessageAcceptance,
    },
    /// A destination's home relay was learned from an ack (`Some`), or
    /// turned out not to be its home (`None`): sessions route a client's
    /// unhinted packets there too.
    Route(DestHash, Option<RelayKey>),
    /// Start reaching a relay we must send to (look its record up, dial).
    Reach(PeerId),
    /// Store work.
    Job(Job),
}

/// A packet from another relay to store here.
#[derive(Debug)]
pub struct ToStore {
    /// Its federated id.
    pub id: PacketId,
    /// The packet.
    pub packet: Bytes,
    /// Its destination.
    pub dest: DestHash,
    /// It came routed to this relay (not flooded): its sender knows
    /// where it went, so the ack need not say.
    pub routed: bool,
}

/// Store work, run by a fixed set of workers (never a task per message).
#[derive(Debug)]
pub enum Job {
    /// Store packets another relay sent us for recipients homed here,
    /// each once under its id. Jobs of one peer are stored in arrival
    /// order (the driver joins a peer's consecutive ones into one).
    Store {
        /// The relay that sent them (the acks go back there).
        peer: PeerId,
        /// The packets, in order.
        packets: Vec<ToStore>,
    },
    /// Delete our stored copies: their home relays have them.
    Delete(Vec<MailboxId>),
    /// Store here packets that were held in memory only (each with the
    /// relay it is routed to); answered with [`JobDone::Kept`].
    KeepCopy(Vec<super::forward::Keep>),
    /// Forget federated ids whose senders have the acks.
    Forget(Vec<PacketId>),
    /// Keep our own new record in our book.
    StoreOwnRecord(Box<AddressRecord>),
    /// Check and store records (gossip or anti-entropy); `gossip` names the
    /// message to report on.
    Learn {
        /// Encoded records.
        records: Vec<Bytes>,
        /// The gossip message they came in, if any.
        gossip: Option<(MessageId, PeerId)>,
        /// The relay they came from (not pushed back to it).
        from: Option<PeerId>,
    },
    /// Answer a digest request.
    ServeDigest {
        /// Who asked.
        peer: PeerId,
        /// Their request id.
        req: u64,
        /// Keys after this.
        after: Option<[u8; 32]>,
        /// At most this many.
        limit: u16,
    },
    /// Compare a peer's digest page with our book.
    CompareDigest {
        /// Whose digest.
        peer: PeerId,
        /// Whether more pages follow.
        more: bool,
        /// Their entries.
        entries: Vec<([u8; 32], u64)>,
    },
    /// Answer a pull.
    ServePull {
        /// Who asked.
        peer: PeerId,
        /// Their request id.
        req: u64,
        /// The relays wanted.
        keys: Vec<[u8; 32]>,
    },
    /// Answer another relay's claim for one of its devices.
    ServeClaim {
        /// Who asked.
        peer: PeerId,
        /// Their request id.
        req: u64,
        /// Directory namespace.
        namespace: String,
        /// Whose bundle.
        identity: [u8; 32],
    },
    /// Look up a relay's addresses in the book.
    LookupAddrs(PeerId),
    /// Read a page of the book from a random point (relays to dial) and
    /// the book's size.
    Discover {
        /// Whether relays to dial are wanted (else only the size).
        want_peers: bool,
        /// Where to start.
        cursor: [u8; 32],
    },
    /// Note that we are connected to these relays (their records are
    /// proven: the book prefers them when full).
    MarkConnected(Vec<RelayKey>),
    /// Read every record's key and timestamp (at most `limit`), for the
    /// in-memory index ([`super::held`]).
    LoadHeld {
        /// The most entries to read.
        limit: u32,
    },
}

/// What a job found, back to the state machines.
#[derive(Debug)]
pub enum JobDone {
    /// A stored packet's outcome.
    Stored {
        /// Who sent it.
        peer: PeerId,
        /// Its id.
        id: PacketId,
        /// Whether the store took it (or had it already).
        outcome: StoreOutcome,
        /// It came routed (see [`ToStore::routed`]).
        routed: bool,
    },
    /// Several results of one job, in order.
    Many(Vec<JobDone>),
    /// Records checked: the relays that were new or newer.
    Learned {
        /// Relay, addresses, record timestamp.
        relays: Vec<(PeerId, Vec<Multiaddr>, u64)>,
        /// The gossip message to report on, and what it was worth.
        gossip: Option<(MessageId, PeerId, MessageAcceptance)>,
        /// Whether one of them was new to us.
        new_relay: bool,
        /// The changes among them (key, encoded, worth), pushed on.
        news: Vec<([u8; 32], Bytes, super::announce::News)>,
        /// The relay they came from.
        from: Option<PeerId>,
        /// Records that passed the checks but were not stored (the store
        /// failed, or the book is full).
        unstored: Vec<Bytes>,
        /// What the new records say about reaching their relays.
        topology: Vec<(PeerId, super::transit::Node)>,
    },
    /// Frames to send (digest pages, records).
    Send {
        /// To whom.
        peer: PeerId,
        /// The frames.
        frames: Vec<Frame>,
    },
    /// A digest page compared: keys to pull, and where the walk goes on.
    Compared {
        /// Whose digest.
        peer: PeerId,
        /// Keys newer there.
        want: Vec<[u8; 32]>,
        /// The next page starts after this key, if there is one.
        next_after: Option<[u8; 32]>,
    },
    /// A relay's addresses from the book (empty: not there).
    Addrs {
        /// The relay.
        peer: PeerId,
        /// Its addresses.
        addrs: Vec<Multiaddr>,
        /// How it is reached (`None`: not in the book).
        node: Option<super::transit::Node>,
    },
    /// Relays from the book worth dialing.
    Discovered(Vec<(PeerId, Vec<Multiaddr>, u64)>),
    /// A request could not be served (answer the peer with nothing).
    ServeDone(PeerId),
    /// The book's keys and timestamps (`None`: the store failed).
    Held(Option<Vec<([u8; 32], u64)>>),
    /// Pending packets' copies stored here (`None`: the store failed).
    Kept(Vec<(PacketId, Option<MailboxId>)>),
}

/// What storing a federated packet came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Stored now (or before, under the same id): acknowledge `Stored`.
    Stored,
    /// Not a packet: never resend.
    Malformed,
    /// Not now (storage full or failing): resend later.
    Refused,
}
