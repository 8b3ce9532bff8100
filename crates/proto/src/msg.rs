//! Every message kind, for every kind of connection.
//!
//! One server port serves clients, other servers and status queries; the first
//! frame of every connection is a [`Msg::Hello`] saying which of them is speaking.

use crate::hash::ContentHash;
use crate::ids::{DeviceId, Seq, ServerId, Version};
use crate::repl::Entry;
use serde::{Deserialize, Serialize};

/// Who opens a connection, and what it brings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Who {
    /// One device of a user.
    Client {
        /// The user, checked by [`crate::validate_username`].
        user: String,
        /// The device, stable across runs of the client on one sync dir.
        device: DeviceId,
        /// The port the client listens on for a new primary's call after a failover.
        callback_port: u16,
    },
    /// A one-shot status query (`replibox-server --status`).
    Status,
    /// A server joining the cluster (or rejoining after a restart). The connection
    /// becomes its replication link.
    Server {
        /// Its id, if it has one (from `--id` or its data dir).
        id: Option<ServerId>,
        /// The IP it listens on, when it was bound to one; otherwise the primary
        /// takes the IP it sees the connection come from.
        ip: Option<String>,
        /// The port it listens on.
        port: u16,
        /// The last entry it applied.
        seq: Seq,
    },
    /// A backup fetching file contents it lacks (a connection of its own, so that
    /// a long transfer never delays the replication link).
    Fetch {
        /// The backup's id.
        id: ServerId,
    },
}

/// A file's metadata as the server holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// Path inside the user's directory.
    pub path: String,
    /// Bumped by every put, delete and rename of this path.
    pub version: Version,
    /// Size in bytes (0 for a tombstone).
    pub size: u64,
    /// Modification time the uploading device reported, ms since the Unix epoch.
    pub mtime_ms: i64,
    /// Hash of the content.
    pub hash: ContentHash,
    /// True for a tombstone: the file was deleted at this version.
    #[serde(default)]
    pub deleted: bool,
    /// Access time of the server's copy, ms since the Unix epoch (listings only).
    #[serde(default)]
    pub atime_ms: i64,
    /// Status-change time of the server's copy, ms since the Unix epoch (listings only).
    #[serde(default)]
    pub ctime_ms: i64,
}

/// A request from a client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// One page of the user's files and tombstones, in path order: those after
    /// `after` (from the first when None). A user may hold far more files than one
    /// frame header can carry, so a listing comes in pages (see
    /// [`OpResult::Listing`]`::more`).
    List {
        /// The last path of the previous page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
    },
    /// Store a file; after [`Msg::Proceed`], the client sends its bytes as
    /// [`Msg::Chunk`] frames and ends with [`Msg::UploadEnd`].
    Upload {
        /// Destination path.
        path: String,
        /// Exact size that will follow.
        size: u64,
        /// Modification time to record, ms since the Unix epoch.
        mtime_ms: i64,
        /// The version the device last saw at this path (None: it saw none, or a
        /// tombstone). A different current version is a conflict.
        base: Option<Version>,
    },
    /// Read a file: the server answers [`OpResult::Data`], then chunks, then
    /// [`Msg::DownloadEnd`].
    Download {
        /// Path to read.
        path: String,
    },
    /// Delete a file, leaving a tombstone.
    Delete {
        /// Path to delete.
        path: String,
        /// The version the device last saw; None deletes whatever is there.
        base: Option<Version>,
    },
    /// Move a file to a path that holds no live file.
    Rename {
        /// Current path.
        from: String,
        /// New path.
        to: String,
        /// The version of `from` the device last saw.
        base: Option<Version>,
    },
}

/// The outcome of a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum OpResult {
    /// The change was stored; this is the path's new metadata.
    Done {
        /// New metadata (a tombstone after a delete; the new path after a rename).
        meta: FileMeta,
    },
    /// One page of the user's files and tombstones.
    Listing {
        /// Sorted by path.
        files: Vec<FileMeta>,
        /// More follow: ask again with `after` set to the last path of this page.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
    },
    /// A download starts: chunks follow.
    Data {
        /// The version being sent.
        meta: FileMeta,
    },
    /// The path changed on the server since the device's base version.
    Conflict {
        /// What the server holds now (None: nothing, not even a tombstone).
        current: Option<FileMeta>,
    },
    /// Answer to a backup's fetch: that file is no longer on the server (deleted,
    /// or moved on to another name) — unlike an error, which says nothing of it.
    Gone {
        /// The path asked for.
        path: String,
    },
    /// The request was refused; nothing changed.
    Error {
        /// A sentence for the user.
        message: String,
    },
}

/// A change pushed to a user's other device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Notice {
    /// A file was created or replaced.
    Put {
        /// Its new metadata.
        meta: FileMeta,
    },
    /// A file was deleted.
    Delete {
        /// The tombstone.
        meta: FileMeta,
    },
    /// A file was moved.
    Rename {
        /// Its old path (now a tombstone).
        from: String,
        /// Its metadata at the new path.
        meta: FileMeta,
    },
}

/// Every message kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Msg {
    /// First frame of every connection.
    Hello {
        /// Must equal [`crate::PROTOCOL_VERSION`].
        version: u32,
        /// Who is speaking.
        who: Who,
    },
    /// A client's login was accepted.
    Welcome {
        /// Secret a new primary shows when it calls the client back.
        token: String,
        /// How many devices of this user are connected now, this one included.
        devices: u32,
        /// The last request seq of this device the server answered; the device
        /// numbers its next requests after it.
        last_seq: Seq,
    },
    /// The connection is refused; the server closes it after this frame.
    Refused {
        /// A sentence for the user or operator.
        reason: String,
    },
    /// This server is not the primary; the primary listens at this address.
    Redirect {
        /// `IP:PORT` of the primary.
        primary: String,
    },
    /// A client request.
    Request {
        /// The device's sequence number for it.
        seq: Seq,
        /// What to do.
        op: Op,
    },
    /// The server accepts an upload; the client may send its chunks.
    Proceed {
        /// The upload's request.
        seq: Seq,
    },
    /// File bytes for an upload or download, in the payload.
    Chunk {
        /// The transfer's request.
        seq: Seq,
    },
    /// The last chunk of an upload was sent.
    UploadEnd {
        /// The upload's request.
        seq: Seq,
        /// Hash of all the bytes sent.
        hash: ContentHash,
    },
    /// The last chunk of a download was sent.
    DownloadEnd {
        /// The download's request.
        seq: Seq,
        /// Hash of all the bytes sent.
        hash: ContentHash,
    },
    /// The outcome of a request.
    Reply {
        /// The request answered.
        seq: Seq,
        /// Its outcome.
        result: OpResult,
    },
    /// A change made by another device of the same user.
    Notice {
        /// What changed.
        notice: Notice,
    },
    /// The answer to a status query: one JSON object.
    Status {
        /// The server's status.
        status: serde_json::Value,
    },
    /// The primary accepted a joining server; the snapshot follows.
    Joined {
        /// The joiner's id (assigned now if it had none).
        id: ServerId,
        /// The primary's id.
        primary: ServerId,
    },
    /// Part of the primary's state as JSON, in the payload.
    SnapshotChunk,
    /// The snapshot is complete; it is the state after entry `seq`.
    SnapshotEnd {
        /// Seq of the last entry the snapshot includes.
        seq: Seq,
    },
    /// Bytes of an upload in flight, forwarded to a backup as they arrive (payload).
    XferChunk {
        /// The transfer (also the name of its temporary file).
        xfer: String,
    },
    /// The forwarded upload is complete.
    XferEnd {
        /// The transfer.
        xfer: String,
        /// Its size.
        size: u64,
        /// Hash of its bytes.
        hash: crate::hash::ContentHash,
    },
    /// The forwarded upload was abandoned; its temporary file can go.
    XferAbort {
        /// The transfer.
        xfer: String,
    },
    /// The next entry of the history.
    Apply {
        /// The entry (boxed: it is by far the largest message).
        entry: Box<Entry>,
    },
    /// The primary is alive and has applied up to `seq`.
    Heartbeat {
        /// The primary's last seq.
        seq: Seq,
    },
    /// A backup has applied (durably, content included) every entry up to `seq`.
    Ack {
        /// Its last seq.
        seq: Seq,
    },
    /// A joining backup has caught up to `seq` and holds every file's content.
    CaughtUp {
        /// Its last seq.
        seq: Seq,
    },
    /// On a fetch connection: send the current content of a user's file
    /// (answered like a download, with seq 0).
    Fetch {
        /// Owner.
        user: String,
        /// Path.
        path: String,
    },
    /// Keep-alive; answered with [`Msg::Pong`].
    Ping,
    /// Answer to [`Msg::Ping`].
    Pong,
    /// The sender ends the connection cleanly.
    Bye,
}

impl Msg {
    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "hello",
            Msg::Welcome { .. } => "welcome",
            Msg::Refused { .. } => "refused",
            Msg::Redirect { .. } => "redirect",
            Msg::Request { .. } => "request",
            Msg::Proceed { .. } => "proceed",
            Msg::Chunk { .. } => "chunk",
            Msg::UploadEnd { .. } => "upload_end",
            Msg::DownloadEnd { .. } => "download_end",
            Msg::Reply { .. } => "reply",
            Msg::Notice { .. } => "notice",
            Msg::Status { .. } => "status",
            Msg::Joined { .. } => "joined",
            Msg::SnapshotChunk => "snapshot_chunk",
            Msg::SnapshotEnd { .. } => "snapshot_end",
            Msg::XferChunk { .. } => "xfer_chunk",
            Msg::XferEnd { .. } => "xfer_end",
            Msg::XferAbort { .. } => "xfer_abort",
            Msg::Apply { .. } => "apply",
            Msg::Heartbeat { .. } => "heartbeat",
            Msg::Ack { .. } => "ack",
            Msg::CaughtUp { .. } => "caught_up",
            Msg::Fetch { .. } => "fetch",
            Msg::Ping => "ping",
            Msg::Pong => "pong",
            Msg::Bye => "bye",
        }
    }
}
