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

/// `bytes` random bytes from the kernel, as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
    if read.is_err() {
        // No /dev/urandom: fall back to time and pid, still unique per call.
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
                ^ ((std::process::id() as u128) << 64);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (seed >> ((i % 16) * 8)) as u8 ^ i as u8;
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
