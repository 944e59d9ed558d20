//! MeshWhisper's libp2p behaviour and wire codecs.
//!
//! State machines only: nothing here opens sockets, calls the store or
//! reads the clock. The node's event loop owns the Swarm and wires these
//! to storage.

pub mod client;
pub mod device;
pub mod federation;
pub mod nat;
pub mod node;
pub mod packet;
pub mod policy;
pub mod relay_key;
pub mod stream;
pub mod tls;
pub mod transport;
