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
