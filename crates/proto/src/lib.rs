//! The replibox wire protocol.
//!
//! # Layout
//! - [`frame`]: the codec. A frame is a 4-byte big-endian header length, a JSON
//!   header, then an optional binary payload of the length the header declares.
//!   Limits are checked before anything is allocated.
//! - [`msg`]: every message kind, for every kind of connection.
//! - [`ids`]: newtypes for identities and counters that cross module boundaries.
//! - [`repl`]: the replicated history (entries, changes, sessions, members).
//! - [`names`]: validation of usernames and of paths inside a user's directory.
//! - [`hash`]: the content hash carried with every file version.
//! - [`receipt`]: the checks every receiver of a chunked transfer makes.
//! - [`times`]: file times in milliseconds, as [`FileMeta`] carries them.
//! - [`error`]: the protocol error type.
//! - [`malloc`]: the C allocator's thresholds, set first thing by both binaries
//!   (chunk buffers freed on another thread no longer fault in anew).
//! - [`auth`]: the cluster key, server-to-server and user authentication, the
//!   failed-login throttle and the callback proof (issue 8).

pub mod auth;
pub mod durable;
pub mod error;
pub mod fdlimit;
pub mod frame;
pub mod hash;
pub mod ids;
pub mod malloc;
pub mod msg;
pub mod names;
pub mod pidlock;
pub mod receipt;
pub mod repl;
pub mod rng;
pub mod times;

pub use auth::{AuthError, AuthMsg, ClusterKey, KeyError, Purpose, StoredCredentials};
pub use error::ProtoError;
pub use frame::{read_frame, write_frame, Frame};
pub use hash::{ContentHash, Hasher};
pub use ids::{DeviceId, Epoch, LogPos, Seq, ServerId, Version};
pub use msg::*;
pub use names::{validate_path, validate_username, NameError};
pub use receipt::{Damaged, Receipt};

/// Version of the protocol; a hello (or a server's challenge) with any other version
/// is refused. Version 2 (issue 8): clients log in with a password, servers
/// authenticate each other with the cluster key. Version 3 (issue 7): a device
/// keeps up to 64 requests in flight ([`REQUEST_WINDOW`]), and an upload may be
/// eager, its bytes following the request at once ([`SMALL_UPLOAD`]). Version 4
/// (issue 7): a device may be sent the bytes of another device's large upload
/// while the servers store them ([`Msg::EarlyBegin`], at least [`EARLY_MIN`]).
pub const PROTOCOL_VERSION: u32 = 4;
/// Uploads at least this large are sent on to the user's other devices as they
/// arrive ([`Msg::EarlyBegin`]); a smaller one is quicker to download once told.
pub const EARLY_MIN: u64 = 8 << 20;
/// Largest JSON header accepted, in bytes.
pub const MAX_HEADER: usize = 64 * 1024;
/// Largest binary payload accepted in one frame, in bytes.
pub const MAX_PAYLOAD: usize = 1024 * 1024;
/// Size of the file chunks senders use; below [`MAX_PAYLOAD`].
pub const CHUNK_SIZE: usize = 256 * 1024;
/// How many requests a device may have in flight at once (sent, not yet
/// answered). The server's request table keeps each device's last this many
/// changing requests with their results, so that every one of them, resent after
/// a lost connection or a failover, gets its first answer.
pub const REQUEST_WINDOW: u64 = 64;
/// The front-end sends an upload of fewer bytes than this eagerly ([`Op::Upload`]'s
/// `eager`): its bytes follow the request at once, since a round trip per file
/// would set the pace of a burst. A larger one waits for [`Msg::Proceed`], so
/// that a refusal (a conflict, say) saves sending it.
pub const SMALL_UPLOAD: u64 = 1 << 20;
