//! The device side: MeshWhisper's Rust SDK (identity, contacts, sessions and
//! the device protocol to a home relay).
