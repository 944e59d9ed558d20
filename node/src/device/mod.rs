//! Devices on libp2p: our Rust client's `/meshwhisper/device/1` sessions
//! (packets in, deliveries out, confirmed deletes) and the directory
//! requests they make (publish, prekeys, claims here and, over federation,
//! at a contact's relay).

pub mod directory;
pub mod session;
