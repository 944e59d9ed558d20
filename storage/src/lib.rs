//! MeshWhisper's durable state: SQLite through sqlx (embedded by default).
//!
//! Filled in by the storage work: mailbox, directory, media, archive, push
//! registrations, address book and the expiry sweeper.
