//! The core thread: the one owner of the state and the store.
//!
//! Connection threads send it [`Event`]s and wait on a reply channel; it never
//! blocks on a socket (pushes to other devices go through each connection's writer
//! channel) and it commits one entry at a time, which is what the store's recovery
//! relies on.

use crate::state::{Change, Entry, LastRequest, Session, State, MAX_DEVICES};
use crate::store::{new_meta, CommitError, Store};
use crossbeam_channel::{Receiver, Sender};
use replibox_proto::{ContentHash, DeviceId, Epoch, FileMeta, Msg, Notice, OpResult, Seq, Version};
use serde_json::json;
use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;

/// Identifies one connection to the server.
pub type ConnId = u64;

/// A logged-in connection as the core sees it.
struct Live {
    user: String,
    device: DeviceId,
    out: Sender<Msg>,
}

/// What a connection asks of the core.
pub enum Event {
    /// A client says hello.
    Login {
        /// The connection.
        conn: ConnId,
        /// The session it asks for (token filled in by the core).
        user: String,
        /// Its device.
        device: DeviceId,
        /// Its IP as seen by this server.
        ip: String,
        /// Its callback port.
        callback_port: u16,
        /// Where the core sends pushes for this connection.
        out: Sender<Msg>,
        /// The answer: (token, devices connected, last seq answered) or a refusal.
        reply: Sender<Result<(String, u32, Seq), String>>,
    },
    /// A connection ended.
    Disconnect {
        /// The connection.
        conn: ConnId,
    },
    /// A request of a logged-in client.
    Request {
        /// The connection.
        conn: ConnId,
        /// The request's sequence number.
        seq: Seq,
        /// What it asks.
        req: CoreRequest,
    },
    /// Create a temporary file for an incoming upload.
    NewTemp {
        /// Its id and handle, or why not.
        reply: Sender<Result<(String, File), String>>,
    },
    /// Remove an abandoned upload's temporary file.
    DiscardTemp {
        /// Its id.
        xfer: String,
    },
    /// A status query.
    Status {
        /// The answer.
        reply: Sender<serde_json::Value>,
    },
    /// Stop the core.
    Shutdown,
}

/// A request of a logged-in client.
pub enum CoreRequest {
    /// Every file of the user.
    List {
        /// The answer.
        reply: Sender<OpResult>,
    },
    /// Open a file for a download.
    Open {
        /// Path.
        path: String,
        /// The metadata and an open handle, or the reason why not.
        reply: Sender<Result<(FileMeta, File), OpResult>>,
    },
    /// May an upload start? `None` means go ahead.
    BeginUpload {
        /// Path.
        path: String,
        /// Base version.
        base: Option<Version>,
        /// The answer.
        reply: Sender<Option<OpResult>>,
    },
    /// An upload's bytes are durable in temporary file `xfer`.
    CommitUpload {
        /// Path.
        path: String,
        /// Base version.
        base: Option<Version>,
        /// Temporary file id.
        xfer: String,
        /// Size of the bytes.
        size: u64,
        /// Modification time to record.
        mtime_ms: i64,
        /// Their hash.
        hash: ContentHash,
        /// The answer.
        reply: Sender<OpResult>,
    },
    /// Delete a file.
    Delete {
        /// Path.
        path: String,
        /// Base version.
        base: Option<Version>,
        /// The answer.
        reply: Sender<OpResult>,
    },
    /// Rename a file.
    Rename {
        /// Old path.
        from: String,
        /// New path.
        to: String,
        /// Base version.
        base: Option<Version>,
        /// The answer.
        reply: Sender<OpResult>,
    },
}

/// The core's state.
pub struct Core {
    state: State,
    store: Store,
    live: BTreeMap<ConnId, Live>,
    listen: SocketAddr,
    epoch: Epoch,
}

impl Core {
    /// A core over a recovered store.
    pub fn new(store: Store, state: State, listen: SocketAddr) -> Core {
        Core { state, store, live: BTreeMap::new(), listen, epoch: Epoch(0) }
    }

    /// Brings the state in line with what start-up found, as a lone primary.
    pub fn start_as_primary(&mut self) -> Result<(), String> {
        if !self.state.sessions.is_empty() {
            // Nobody is connected to a server that just started.
            let entry = Entry { seq: self.state.seq.next(), change: Change::ClearSessions, request: None };
            self.store.commit(&mut self.state, entry).map_err(|e| e.to_string())?;
        }
        for (user, meta) in self.store.check_against(&self.state).map_err(|e| e.to_string())? {
            self.store.adopt(&mut self.state, user, meta).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Runs until [`Event::Shutdown`] or until every sender is gone.
    pub fn run(mut self, events: Receiver<Event>) {
        for event in events {
            match event {
                Event::Shutdown => break,
                Event::Login { conn, user, device, ip, callback_port, out, reply } => {
                    let answer = self.login(conn, user, device, ip, callback_port, out);
                    let _ = reply.send(answer);
                }
                Event::Disconnect { conn } => self.disconnect(conn),
                Event::Request { conn, seq, req } => self.request(conn, seq, req),
                Event::NewTemp { reply } => {
                    let _ = reply.send(self.store.create_temp().map_err(|e| {
                        log::error!("cannot create temporary file: {e}");
                        "the server cannot store uploads right now".to_string()
                    }));
                }
                Event::DiscardTemp { xfer } => self.store.discard_temp(&xfer),
                Event::Status { reply } => {
                    let _ = reply.send(self.status());
                }
            }
        }
        log::info!("core stopped seq={}", self.state.seq);
    }

    fn status(&self) -> serde_json::Value {
        json!({
            "id": 1,
            "role": "primary",
            "epoch": self.epoch.0,
            "primary": self.listen.to_string(),
            "members": [{"id": 1, "addr": self.listen.to_string(), "role": "primary"}],
            "seq": self.state.seq.0,
            "sessions": self.state.sessions.len(),
        })
    }

    /// Commits an entry. An entry that did not reach the log changed nothing and is
    /// refused; one that reached the log but whose action failed leaves the disk
    /// and the state disagreeing, so the server stops rather than serve a lie
    /// (start-up redoes the action).
    fn commit(&mut self, change: Change, request: Option<(DeviceId, LastRequest)>) -> Result<(), OpResult> {
        let entry = Entry { seq: self.state.seq.next(), change, request };
        match self.store.commit(&mut self.state, entry) {
            Ok(()) => Ok(()),
            Err(CommitError::Unlogged(e)) => {
                log::error!("cannot commit: {e}");
                Err(OpResult::Error { message: "the server cannot store changes right now".into() })
            }
            Err(e @ CommitError::Logged(_)) => {
                log::error!("stopping: {e}");
                std::process::exit(3);
            }
        }
    }

    fn login(
        &mut self,
        conn: ConnId,
        user: String,
        device: DeviceId,
        ip: String,
        callback_port: u16,
        out: Sender<Msg>,
    ) -> Result<(String, u32, Seq), String> {
        let others = self.state.devices_of(&user, &device);
        if others >= MAX_DEVICES {
            log::warn!("refused login user={user} device={device}: {others} devices already connected");
            return Err(format!(
                "user {user} already has {MAX_DEVICES} devices connected; log out of one of them first"
            ));
        }
        // The same device logging in again (a restarted client whose old connection
        // is not yet known to be dead) replaces its old connection.
        let stale: Vec<ConnId> = self.live.iter().filter(|(_, l)| l.device == device).map(|(c, _)| *c).collect();
        for c in stale {
            log::info!("replacing old connection conn={c} of device={device}");
            self.live.remove(&c);
        }
        let token = crate::random_hex(16);
        let session = Session { user: user.clone(), device: device.clone(), ip, callback_port, token: token.clone() };
        self.commit(Change::Login { session }, None)
            .map_err(|_| "the server cannot store sessions right now".to_string())?;
        self.live.insert(conn, Live { user: user.clone(), device: device.clone(), out });
        let devices = self.state.devices_of(&user, &DeviceId(String::new())) as u32;
        let last = self.state.requests.get(&device).map(|l| l.seq).unwrap_or_default();
        log::info!("logged in user={user} device={device} conn={conn} devices={devices}");
        Ok((token, devices, last))
    }

    fn disconnect(&mut self, conn: ConnId) {
        let Some(live) = self.live.remove(&conn) else {
            return;
        };
        let still_connected = self.live.values().any(|l| l.device == live.device);
        if !still_connected && self.state.sessions.contains_key(&live.device) {
            let _ = self.commit(Change::Logout { device: live.device.clone() }, None);
        }
        log::info!("logged out user={} device={} conn={conn}", live.user, live.device);
    }

    fn request(&mut self, conn: ConnId, seq: Seq, req: CoreRequest) {
        let Some(live) = self.live.get(&conn) else {
            log::warn!("request from unknown conn={conn}; dropped");
            return;
        };
        let (user, device) = (live.user.clone(), live.device.clone());
        match req {
            CoreRequest::List { reply } => {
                let mut files: Vec<FileMeta> =
                    self.state.files.get(&user).map(|f| f.values().cloned().collect()).unwrap_or_default();
                for m in files.iter_mut().filter(|m| !m.deleted) {
                    (m.atime_ms, m.ctime_ms) = self.store.times(&user, &m.path);
                }
                let _ = reply.send(OpResult::Listing { files });
            }
            CoreRequest::Open { path, reply } => {
                let answer = match self.state.live(&user, &path) {
                    None => Err(OpResult::Error { message: format!("no such file on the server: {path}") }),
                    Some(meta) => self.store.open_file(&user, &path).map(|f| (meta.clone(), f)).map_err(|e| {
                        log::error!("cannot open stored file user={user}: {e}");
                        OpResult::Error { message: format!("the server cannot read {path}") }
                    }),
                };
                let _ = reply.send(answer);
            }
            CoreRequest::BeginUpload { path, base, reply } => {
                let answer = self
                    .state
                    .already_answered(&device, seq)
                    .or_else(|| self.state.check_upload(&user, &path, base).err());
                let _ = reply.send(answer);
            }
            CoreRequest::CommitUpload { path, base, xfer, size, mtime_ms, hash, reply } => {
                if let Some(answer) = self.state.already_answered(&device, seq) {
                    self.store.discard_temp(&xfer);
                    let _ = reply.send(answer);
                    return;
                }
                if let Err(answer) = self.state.check_upload(&user, &path, base) {
                    self.store.discard_temp(&xfer);
                    let _ = reply.send(answer);
                    return;
                }
                let meta = new_meta(&path, self.state.next_version(&user, &path), size, mtime_ms, hash);
                let result = OpResult::Done { meta: meta.clone() };
                let change = Change::Put { user: user.clone(), meta: meta.clone(), xfer: xfer.clone() };
                if let Err(refusal) =
                    self.commit(change, Some((device.clone(), LastRequest { seq, result: result.clone() })))
                {
                    self.store.discard_temp(&xfer);
                    let _ = reply.send(refusal);
                    return;
                }
                log::info!("stored user={user} path={path} version={} size={size} device={device}", meta.version);
                let _ = reply.send(result);
                self.push(conn, &user, Notice::Put { meta });
            }
            CoreRequest::Delete { path, base, reply } => {
                if let Some(answer) = self.state.already_answered(&device, seq) {
                    let _ = reply.send(answer);
                    return;
                }
                match self.state.check_delete(&user, &path, base) {
                    Err(answer) => {
                        let _ = reply.send(answer);
                    }
                    Ok(meta) => {
                        let result = OpResult::Done { meta: meta.clone() };
                        let change = Change::Delete { user: user.clone(), meta: meta.clone() };
                        if let Err(refusal) =
                            self.commit(change, Some((device.clone(), LastRequest { seq, result: result.clone() })))
                        {
                            let _ = reply.send(refusal);
                            return;
                        }
                        log::info!("deleted user={user} path={path} version={} device={device}", meta.version);
                        let _ = reply.send(result);
                        self.push(conn, &user, Notice::Delete { meta });
                    }
                }
            }
            CoreRequest::Rename { from, to, base, reply } => {
                if let Some(answer) = self.state.already_answered(&device, seq) {
                    let _ = reply.send(answer);
                    return;
                }
                match self.state.check_rename(&user, &from, &to, base) {
                    Err(answer) => {
                        let _ = reply.send(answer);
                    }
                    Ok((gone, moved)) => {
                        let result = OpResult::Done { meta: moved.clone() };
                        let change = Change::Rename { user: user.clone(), from: gone, to: moved.clone() };
                        if let Err(refusal) =
                            self.commit(change, Some((device.clone(), LastRequest { seq, result: result.clone() })))
                        {
                            let _ = reply.send(refusal);
                            return;
                        }
                        log::info!("renamed user={user} from={from} to={to} device={device}");
                        let _ = reply.send(result);
                        self.push(conn, &user, Notice::Rename { from, meta: moved });
                    }
                }
            }
        }
    }

    /// Tells the user's other connected devices about a change.
    fn push(&self, from: ConnId, user: &str, notice: Notice) {
        for (c, live) in &self.live {
            if *c != from && live.user == user {
                let _ = live.out.send(Msg::Notice { notice: notice.clone() });
            }
        }
    }
}
