//! The replicated history: entries, the changes they carry, and the records the
//! replicated state is made of. These travel between servers, so they live here.

use crate::auth::StoredCredentials;
use crate::ids::{DeviceId, Epoch, LogPos, Seq, ServerId};
use crate::msg::{FileMeta, OpResult};
use serde::{Deserialize, Serialize};

/// A server of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its id (unique, positive; the Bully election orders servers by it).
    pub id: ServerId,
    /// `IP:PORT` where it listens.
    pub addr: String,
}

/// A logged-in device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Its user.
    pub user: String,
    /// The device.
    pub device: DeviceId,
    /// The client's IP as the server saw it.
    pub ip: String,
    /// The port the client listens on for a new primary's call.
    pub callback_port: u16,
    /// Secret a new primary proves it holds when calling back: the login's
    /// session key as hex (see [`crate::auth::SessionKey`]), never sent.
    pub token: String,
}

/// The last request a device made that changed something, and its result, so that a
/// resent request is answered instead of applied twice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastRequest {
    /// The request's sequence number.
    pub seq: Seq,
    /// What it was answered.
    pub result: OpResult,
}

/// One change to the replicated state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// A file's new content sits in the temporary file `xfer` and becomes `meta`.
    Put {
        /// Owner.
        user: String,
        /// New metadata.
        meta: FileMeta,
        /// Name of the temporary file holding the bytes.
        xfer: String,
    },
    /// A file is deleted; `meta` is its tombstone.
    Delete {
        /// Owner.
        user: String,
        /// Tombstone.
        meta: FileMeta,
    },
    /// A file moves: `from` becomes a tombstone, `to` its new metadata.
    Rename {
        /// Owner.
        user: String,
        /// Tombstone left at the old path.
        from: FileMeta,
        /// Metadata at the new path.
        to: FileMeta,
    },
    /// A device logs in.
    Login {
        /// Its session.
        session: Session,
    },
    /// A device logs out or is gone.
    Logout {
        /// The device.
        device: DeviceId,
    },
    /// Forget every session (a lone server restarting: nobody is connected).
    ClearSessions,
    /// A primary starts a new epoch with these members (itself included).
    NewEpoch {
        /// The new epoch.
        epoch: Epoch,
        /// The primary of that epoch.
        primary: ServerId,
        /// The membership from now on.
        members: Vec<Member>,
    },
    /// A server joined the cluster as a backup (it has caught up).
    Join {
        /// The new member.
        member: Member,
    },
    /// A server left the membership (dead, stalled, or rejoining).
    Leave {
        /// Its id.
        id: ServerId,
    },
    /// An id was handed to a joining server: it is never handed out again, even
    /// if that server dies before it has caught up.
    ReserveId {
        /// The id.
        id: ServerId,
    },
    /// A user's account: created at its first login, or given a new password.
    /// Only the derived keys travel and are kept, never the password.
    Account {
        /// The user.
        user: String,
        /// Salt, iteration count, StoredKey and ServerKey.
        credentials: StoredCredentials,
    },
}

/// A change with its position in the history, and the request it answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Position: entries apply in strictly increasing order with no gap.
    #[serde(alias = "seq")]
    pub pos: LogPos,
    /// The epoch of the primary that made it. Two entries at the same position and
    /// epoch are the same entry (one primary per epoch), so a server whose last
    /// entry has the position and epoch of one in the primary's log holds a prefix
    /// of that log, and can catch up from there instead of taking a snapshot.
    #[serde(default)]
    pub epoch: Epoch,
    /// What changes.
    pub change: Change,
    /// The device request this entry answers, recorded for at-most-once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<(DeviceId, LastRequest)>,
}
