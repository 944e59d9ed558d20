//! The node's libp2p `NetworkBehaviour` and wire codecs.
//!
//! State machines only: no sockets of their own, no storage calls, and time
//! is passed in. Filled in by the relay and federation work.
