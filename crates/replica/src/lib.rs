//! The replibox server.
//!
//! # Layout
//! - [`state`]: the replicated state and the pure rules that change it.
//! - [`node`]: the replication protocol as a pure state machine: roles, epochs,
//!   entries, acks, membership, fences, and the Bully election inside.
//! - [`replicate`]: the "backups first" rule, `Acks`, that the node's primary uses.
//! - `sim` (tests): the seeded simulation of nodes over a fake network.
//! - [`store`]: the data dir: users' files, write-ahead log, snapshot, temporaries,
//!   and recovery at start-up.
//! - [`core`]: the core thread, the node's driver: it owns the node and the store
//!   and carries out the node's outputs.
//! - [`link`]: the primary's side of a replication link (writer, reader).
//! - [`follow`]: the backup's side: the follower session the core starts and stops
//!   (join, snapshot, fetches, the live stream's content).
//! - [`peer`]: election, coordinator and fence messages between servers; a new
//!   primary calling its clients back.
//! - [`cluster`]: server-to-server connections: from this server's own address,
//!   opened with the cluster key's mutual handshake.
//! - [`conn`]: one thread per connection: the opening (a server's cluster
//!   handshake, a client's password login), requests, transfers.
//! - [`uploads`]: what a connection thread needs to begin an upload without the
//!   core: temporary files, and the backups' queues the core publishes.
//! - [`server`]: the listener and the threads' start-up.
//! - [`status`]: the `--status` query.

pub mod cluster;
pub mod conn;
pub mod core;
pub mod early;
pub mod follow;
pub mod link;
pub mod node;
pub mod peer;
pub mod probe;
pub mod replicate;
pub mod server;
#[cfg(test)]
mod sim;
pub mod state;
pub mod status;
pub mod store;
pub mod uploads;
