//! Failure detection and leader election for replibox, as pure state machines.
//!
//! # Layout
//! - [`detector`]: the heartbeat failure detector a backup runs against its primary.

pub mod detector;
