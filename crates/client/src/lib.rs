//! The replibox client.
//!
//! # Layout
//! - [`engine`]: the sync engine thread (index, reconciliation, live sync, notices).
//! - [`reconcile`]: the pure per-path decision and conflicted-copy naming.
//! - [`index`]: what was last in sync, kept in `.replibox/index.json`.
//! - [`scan`]: walking the sync dir.
//! - [`watcher`]: inotify hints for the engine.
//! - [`cli`]: the commands read from stdin.
//! - [`progress`], [`timefmt`]: output helpers.

pub mod cli;
pub mod engine;
pub mod index;
pub mod progress;
pub mod reconcile;
pub mod scan;
pub mod timefmt;
pub mod watcher;

/// The system time of milliseconds since the Unix epoch.
pub fn from_ms(ms: i64) -> std::time::SystemTime {
    use std::time::{Duration, UNIX_EPOCH};
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// `bytes` random bytes from the kernel, as lowercase hex.
pub fn random_hex(bytes: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
