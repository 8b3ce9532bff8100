//! Every message kind, for every kind of connection.
//!
//! One server port serves clients, other servers and status queries; the first
//! frame of every connection is a [`Msg::Hello`] saying which of them is speaking.

use crate::hash::ContentHash;
use crate::ids::{DeviceId, Epoch, LogPos, Seq, ServerId, Version};
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
    /// A server joining the cluster (or rejoining after a restart or a failover).
    /// The connection becomes its replication link.
    Server {
        /// Its id, if it has one (from `--id` or its data dir).
        id: Option<ServerId>,
        /// The IP it listens on, when it was bound to one; otherwise the primary
        /// takes the IP it sees the connection come from.
        ip: Option<String>,
        /// The port it listens on.
        port: u16,
        /// The position of the last entry it applied.
        pos: LogPos,
        /// The epoch of that entry: with `pos`, it tells the primary whether the
        /// joiner's history is a prefix of its own.
        last_epoch: Epoch,
        /// The joiner counts itself a caught-up member that may stand (a member
        /// rejoining after a failover); a server that restarted, was paused or was
        /// fenced says false, and joins as a newcomer.
        #[serde(default)]
        member: bool,
    },
    /// Another server, for one election message and its answer.
    Peer {
        /// The sender's id.
        id: ServerId,
    },
    /// A new primary calling a client back on its callback port after a failover.
    /// The client challenges it to prove that it holds the session's token.
    Primary {
        /// The new primary's id.
        id: ServerId,
        /// Where it serves clients (`IP:PORT`).
        addr: String,
        /// The device whose session it resumes.
        device: DeviceId,
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
    /// The file is executable (its owner's execute bit was set on the device that
    /// uploaded it). The only part of a file's mode that syncs; left out of the
    /// JSON when false, so entries and data dirs from before it read as before.
    #[serde(default, skip_serializing_if = "is_false")]
    pub exec: bool,
    /// A folder, not a file: size 0, no content, no mtime of its own (a folder's
    /// mtime changes with whatever happens inside it, so it does not sync). A
    /// folder entry says the folder exists even with nothing in it; a file's
    /// folders exist because of the file. Left out of the JSON when false, so
    /// entries and data dirs from before folders synced read as before.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dir: bool,
}

/// For `skip_serializing_if`: a `false` flag is left out.
fn is_false(b: &bool) -> bool {
    !*b
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
    /// Store a file; the client sends its bytes as [`Msg::Chunk`] frames and
    /// ends with [`Msg::UploadEnd`]: after [`Msg::Proceed`], or right after the
    /// request when `eager`.
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
        /// The file is executable ([`FileMeta::exec`]); absent means false.
        #[serde(default, skip_serializing_if = "is_false")]
        exec: bool,
        /// The bytes follow the request at once, with no [`Msg::Proceed`]; a
        /// server that refuses the upload reads them and drops them, then
        /// answers. Absent means false. The front-end sets it for files under
        /// [`crate::SMALL_UPLOAD`].
        #[serde(default, skip_serializing_if = "is_false")]
        eager: bool,
    },
    /// Create a folder (a [`FileMeta::dir`] entry). Answered with
    /// [`OpResult::Done`]; a folder that exists already is no conflict (two
    /// devices making the same folder agree), its current entry is the answer.
    Mkdir {
        /// The folder's path.
        path: String,
        /// The version the device last saw at this path, when a file was there
        /// that the folder replaces (None: none, or a tombstone). A live file
        /// at another version is a conflict.
        #[serde(default, skip_serializing_if = "Option::is_none")]
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
    /// Change the user's password: the account's new credentials, derived from
    /// the new password on the client (never the password itself). Answered with
    /// [`OpResult::PasswordChanged`].
    Passwd {
        /// Salt, iteration count and derived keys of the new password.
        credentials: crate::auth::StoredCredentials,
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
    /// The user's password was changed (the answer to [`Op::Passwd`]).
    PasswordChanged,
    /// The request was refused; nothing changed.
    Error {
        /// A sentence for the user.
        message: String,
    },
    /// The server cannot take the change now (its disk is full, say); nothing
    /// changed. Unlike [`OpResult::Error`], which refuses the request itself, the
    /// same request may succeed later: a client tries again, backing off.
    Unavailable {
        /// A sentence for the user (`the server is out of space`).
        message: String,
    },
}

/// Where a server stands in a Bully election: the most up-to-date server ranks
/// highest (the epoch of its last entry, then its log position), and among equals
/// the highest id. Compared field by field, in that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Rank {
    /// The epoch of its last entry.
    pub epoch: Epoch,
    /// The position of its last entry.
    pub pos: LogPos,
    /// Its id.
    pub id: ServerId,
}

/// The answer to an [`Msg::Election`] or a [`Msg::Coordinator`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    /// I rank higher than you and may stand: I take the election over.
    Ok,
    /// I rank lower (or may not stand): I promise not to become primary of that
    /// epoch, nor to follow anyone else in it.
    Promise {
        /// I am a caught-up member of the membership I hold.
        member: bool,
    },
    /// I am the primary, alive, serving there (the frame's epoch is mine).
    Primary {
        /// Where I serve.
        addr: String,
    },
    /// I still hear my primary, alive, at that address.
    Following {
        /// Its address.
        addr: String,
    },
    /// Your epoch is behind mine (the frame's epoch): you are out of date.
    Stale,
    /// I already promised that epoch to another candidate.
    Promised {
        /// That candidate.
        to: ServerId,
    },
    /// I follow you as the primary of that epoch.
    Accepted,
    /// (To a fence) I know you dropped me: I will not stand in an election until
    /// I have joined again and caught up.
    Fenced,
    /// (To an election, under `--quorum majority`) My history goes further than
    /// yours and I may not stand now: I cannot promise you the epoch (you may
    /// lack a change a majority acknowledged); stand again later.
    Ahead,
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
    /// A client's login was accepted (after the server proved itself with
    /// `scram_server_final`), or a called-back session resumed. It carries no
    /// secret: the session's token is the login's session key, which both ends
    /// derive (see [`crate::auth::SessionKey`]).
    Welcome {
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
    /// To a joining server: this server is not the primary (it knows none now, or
    /// it has just stepped down); try again later.
    NotPrimary {
        /// Why, for the joiner's log.
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
    /// The server accepts an upload that is not eager; the client may send its
    /// chunks.
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
    /// The first frame of an early copy: another device of the same user is
    /// uploading `path` (a large file), and the primary sends its bytes on to
    /// this device as they arrive, while the servers store them. Nothing here is
    /// a change: the device keeps the bytes aside and places them only for a
    /// [`Msg::Notice`] of that path with the same size and hash, which comes
    /// once the backups have the file (or downloads as before without it).
    EarlyBegin {
        /// The transfer (the upload's temporary name on the primary).
        xfer: String,
        /// The path being uploaded.
        path: String,
        /// Its size in bytes.
        size: u64,
    },
    /// Bytes of an early copy, in order (payload).
    EarlyChunk {
        /// The transfer.
        xfer: String,
    },
    /// The early copy is whole: the primary received every byte, with this hash.
    EarlyEnd {
        /// The transfer.
        xfer: String,
        /// Hash of its bytes.
        hash: crate::hash::ContentHash,
    },
    /// The early copy stops here (the upload failed, or this device fell
    /// behind); its bytes can go.
    EarlyAbort {
        /// The transfer.
        xfer: String,
    },
    /// The answer to a status query: one JSON object.
    Status {
        /// The server's status.
        status: serde_json::Value,
    },
    /// The primary accepted a joining server. A snapshot follows when
    /// `snapshot` is true; otherwise the joiner's history is a prefix of the
    /// primary's, and the entries after it follow.
    Joined {
        /// The joiner's id (assigned now if it had none).
        id: ServerId,
        /// The primary's id.
        primary: ServerId,
        /// Whether a snapshot follows.
        #[serde(default)]
        snapshot: bool,
        /// The joiner is a member whose acks the primary waits for from now on
        /// (a member coming back with a prefix of the history, after a failover
        /// say); otherwise it sends `caught_up` once it holds everything.
        #[serde(default)]
        member: bool,
    },
    /// Part of the primary's state as JSON, in the payload.
    SnapshotChunk,
    /// The snapshot is complete; it is the state after entry `pos`.
    SnapshotEnd {
        /// Position of the last entry the snapshot includes.
        pos: LogPos,
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
    /// The primary is alive and has applied up to `pos`.
    Heartbeat {
        /// The primary's last position.
        pos: LogPos,
        /// Every entry up to here is stored on every live backup (acknowledged).
        #[serde(default)]
        committed: LogPos,
    },
    /// A backup has applied (durably, content included) every entry up to `pos`.
    Ack {
        /// Its last position with content.
        pos: LogPos,
    },
    /// A joining backup has caught up to `pos` and holds every file's content.
    CaughtUp {
        /// Its last position.
        pos: LogPos,
    },
    /// The primary stops waiting for this backup (it fell silent or behind). Sent
    /// on a [`Who::Peer`] connection, answered with [`Answer::Fenced`] (or
    /// [`Answer::Stale`] by a server that knows a later epoch): until then, or
    /// until the backup's port refuses connections, the primary completes nothing
    /// without it, so that a backup that could still win an election never lacks
    /// an acknowledged change.
    Fence {
        /// Why, for the backup's log.
        reason: String,
        /// The primary's last position when it began to fence: only a `join` of
        /// the backup after it makes the backup a member again (one before it may
        /// reach the backup after the fence).
        pos: LogPos,
    },
    /// A server suspects the primary and stands for `target`, the epoch it would
    /// start. Sent on a [`Who::Peer`] connection; answered with [`Msg::Answer`].
    Election {
        /// The epoch the candidate would start.
        target: Epoch,
        /// The candidate's rank.
        rank: Rank,
    },
    /// The winner of an election announces itself as primary of `epoch`.
    Coordinator {
        /// The new epoch.
        epoch: Epoch,
        /// The new primary.
        id: ServerId,
        /// Where it serves (`IP:PORT`).
        addr: String,
    },
    /// The answer to an election message.
    Answer {
        /// What the server says.
        answer: Answer,
    },
    /// A step of an authentication handshake (see [`crate::auth`]): the cluster
    /// key's challenge-response that opens every server-to-server connection, a
    /// client's password login after its hello, and a new primary's proof to a
    /// client it calls back.
    Auth(crate::auth::AuthMsg),
    /// The client accepts the new primary that called it back; the connection
    /// becomes its session (answered with [`Msg::Welcome`]).
    Resume,
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
            Msg::NotPrimary { .. } => "not_primary",
            Msg::Redirect { .. } => "redirect",
            Msg::Request { .. } => "request",
            Msg::Proceed { .. } => "proceed",
            Msg::Chunk { .. } => "chunk",
            Msg::UploadEnd { .. } => "upload_end",
            Msg::DownloadEnd { .. } => "download_end",
            Msg::Reply { .. } => "reply",
            Msg::Notice { .. } => "notice",
            Msg::EarlyBegin { .. } => "early_begin",
            Msg::EarlyChunk { .. } => "early_chunk",
            Msg::EarlyEnd { .. } => "early_end",
            Msg::EarlyAbort { .. } => "early_abort",
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
            Msg::Fence { .. } => "fence",
            Msg::Election { .. } => "election",
            Msg::Coordinator { .. } => "coordinator",
            Msg::Answer { .. } => "answer",
            Msg::Auth(_) => "auth",
            Msg::Resume => "resume",
            Msg::Ping => "ping",
            Msg::Pong => "pong",
            Msg::Bye => "bye",
        }
    }
}
