//! Process tests: the real `replibox-server` and `replibox-client` binaries on
//! loopback addresses, checked on disk.
//!
//! The server listens on 127.0.0.1; a user's two devices connect from 127.0.0.4
//! and 127.0.0.5 (a third from 127.0.0.6), so that each looks like its own machine.
//! Every test has its own directory under `target/tmp/process/` (kept when it fails)
//! and its own port, so the tests run in parallel.
//!
//! Run `cargo build --workspace` first: cargo builds only the client's binary for
//! the client's tests, and the server binary is taken from the same directory.
//!
//! Modules by topic:
//! - [`sync`]: live sync between two devices; a slow writer; echo suppression.
//! - [`offline`]: reconciliation at login, conflicted copies.
//! - [`devices`]: the two-device limit; a client killed mid-upload.
//! - [`edges`]: bursts, files becoming folders, symlinks, long names.
//! - [`restart`]: a server restarted on its data dir.
//! - [`memory`]: peak memory while a big file crosses.
//! - [`bad_input`]: hostile bytes on the server port; paths escaping a user's dir.
//! - [`random_input`]: thousands of seeded random cases (mutated protocol samples,
//!   garbage) on every handler of a live server.
//! - [`cli`]: the commands read from stdin.
//! - [`rules`]: the sync engine's documented rules, one by one.
//! - [`replication`]: three servers and more: backups first, catch-up, joins,
//!   stalled backups, redirects, duplicate ids, misbehaving peers.
//! - [`client_ux`]: the client as a new user meets it: ignore rules, device
//!   names, one client per sync dir, `download` under a free name, `status`,
//!   signals while a command waits, a vanished sync dir, the status pane, a
//!   terminal session, bursts summarised.
//! - [`slow_peers`]: connections trickling a byte at a time on every kind of
//!   connection, and a client that never reads, while the cluster syncs, fails
//!   over and rejoins.
//! - [`server`]: the server's exit codes, its clean stop on signals, `--status`.
//! - [`epochs`]: a new epoch per start as primary, no state taken from a lower
//!   epoch, backups cut off past the failure timeout.
//! - [`guarantees`]: backups first against a stalled backup, at most once across a
//!   lost reply, bounded memory with backups.
//! - [`chaos`]: random SIGKILLs of servers under a random workload, then a ledger
//!   of acknowledged changes checked against what every server and device holds.
//! - [`hostile`]: a fake server and a fake primary sending paths that leave the
//!   sync dir or the data dir; a backup's ack comes after its log and rename.
//! - [`resources`]: a data dir in use, full disks on the primary, a backup and a
//!   device, read-only data dirs on the primary and a backup, file descriptors
//!   running out, too many connections, a trickling peer, and retries that back
//!   off.
//! - [`security`]: the cluster key (joins, fetches, impostors at a backup's or a
//!   dead primary's address) and passwords (first login, wrong ones, the
//!   failed-login throttle, a session taken over, `passwd`).
//! - [`lab`]: five hosts in network namespaces (as root; skipped otherwise): the
//!   primary's host cut off without a FIN, then back.

#[allow(dead_code)] // not every test binary module uses every helper
mod harness;

mod bad_input;
mod chaos;
mod cli;
mod client_ux;
mod devices;
mod early;
mod edges;
mod epochs;
mod failover;
mod folders;
mod guarantees;
mod hostile;
mod lab;
mod memory;
mod offline;
mod random_input;
mod replication;
mod resources;
mod restart;
mod rules;
mod scale;
mod security;
mod server;
mod slow_peers;
mod sync;
