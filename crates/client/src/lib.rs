//! The replibox client.
//!
//! # Layout
//! - [`engine`]: the sync engine thread (index, reconciliation, live sync, notices).
//! - [`reconcile`]: the pure per-path decision and conflicted-copy naming.
//! - [`pass`]: the pure plan of a local pass (moves, deletes, uploads, in order).
//! - [`index`]: what was last in sync, kept in `.replibox/index.json`.
//! - [`scan`]: walking the sync dir.
//! - [`rules`]: ignore rules (built-in defaults and `.replibox-ignore`).
//! - [`syncdir`]: the sync dir's lock, folder marker, device id and device name.
//! - [`watcher`]: inotify hints for the engine.
//! - [`session`]: reading commands (line editing on a terminal), running them,
//!   ending on exit, end of input or a signal.
//! - [`cli`]: parsing and running the commands.
//! - [`password`]: where the password comes from (file, environment, prompt).
//! - [`status`]: what the `status` command reports, and the relay that keeps it
//!   current.
//! - [`console`]: every line the user sees, progress lines and the prompt kept
//!   apart; [`activity`]: the engine's routine lines, summarised in bursts.
//! - [`progress`], [`timefmt`]: output helpers.

pub mod activity;
pub mod cli;
pub mod console;
pub mod engine;
pub mod index;
pub mod pass;
pub mod password;
pub mod progress;
pub mod reconcile;
pub mod rules;
pub mod scan;
pub mod session;
pub mod status;
pub mod syncdir;
pub mod timefmt;
pub mod watcher;
