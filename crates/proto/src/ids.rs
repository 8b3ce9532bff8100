//! Newtypes for identities and counters, so that an epoch is never mistaken for a
//! sequence number when it crosses a module boundary.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! counter {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The value after this one. Saturates rather than wrapping: a counter
            /// that came from a peer must not overflow into a panic or into 0.
            pub fn next(self) -> Self {
                $name(self.0.saturating_add(1))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

counter!(
    /// A server's identity in the cluster: a unique positive integer, at most
    /// [`ServerId::MAX`].
    ServerId
);

impl ServerId {
    /// The highest id a server may have: ids come from the network (a joiner's
    /// hello) and the next free one is computed from them, so they are bounded far
    /// below `u64::MAX`.
    pub const MAX: u64 = 1_000_000;

    /// Checks that an id is in `1..=MAX`.
    pub fn validate(self) -> Result<ServerId, String> {
        if (1..=Self::MAX).contains(&self.0) {
            Ok(self)
        } else {
            Err(format!("server id {} is outside 1..={}", self.0, Self::MAX))
        }
    }
}
counter!(
    /// The primary's term. A new primary takes epoch+1; lower epochs are refused.
    Epoch
);
counter!(
    /// A per-device request number: each device numbers its requests 1, 2, 3, ...
    Seq
);
counter!(
    /// A position in the replicated history: entry N is the Nth change applied.
    /// Not a request number ([`Seq`]): the two used to share one type.
    LogPos
);
counter!(
    /// A file's version on the server; every put, delete or rename bumps it.
    Version
);

/// A device (one client installation, one sync dir), named by a random hex string
/// that the client keeps in its sync dir.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceId(pub String);

impl DeviceId {
    /// Checks that a device id is 8 to 64 lowercase hex digits.
    pub fn validate(&self) -> Result<(), String> {
        let ok = (8..=64).contains(&self.0.len())
            && self.0.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(())
        } else {
            Err(format!("invalid device id {:?}: want 8 to 64 lowercase hex digits", self.0))
        }
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
