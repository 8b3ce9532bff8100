//! The replibox server.
//!
//! # Layout
//! - [`state`]: the replicated state and the pure rules that change it.
//! - [`store`]: the data dir: users' files, write-ahead log, snapshot, temporaries,
//!   and recovery at start-up.
//! - [`core`]: the core thread, sole owner of the state and the store.
//! - [`link`]: the primary's queues and writer thread for one backup.
//! - [`follow`]: both ends of a replication link: the primary's reader, the
//!   backup's follower (join, snapshot, fetch, live stream, acks).
//! - [`replicate`]: the "backups first" rule as a pure state machine.
//! - [`conn`]: one thread per connection: handshake, requests, transfers.
//! - [`server`]: the listener and the threads' start-up.
//! - [`status`]: the `--status` query.

pub mod conn;
pub mod core;
pub mod follow;
pub mod link;
pub mod replicate;
pub mod server;
pub mod state;
pub mod status;
pub mod store;
