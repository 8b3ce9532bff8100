//! Failure detection and leader election for replibox, as pure state machines.
//!
//! # Layout
//! - [`detector`]: the heartbeat failure detector a backup runs against its primary.
//! - [`bully`]: the Bully election that a backup runs when it suspects its primary.
//!
//! Neither reads a clock, opens a socket, spawns a thread or draws a random
//! number: time is an input, and outputs are data for the caller to carry out, so
//! that a seeded simulation can drive them (see `replibox-replica`'s `sim`).

pub mod bully;
pub mod detector;

pub use bully::{Bully, Candidate, Out, Rank, Reply, Setback, Status, View};
pub use detector::{Detector, Verdict};
