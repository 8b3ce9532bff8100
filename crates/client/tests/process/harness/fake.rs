//! Hostile peers: a fake server for a real client, and a fake primary for a real
//! backup, each saying what the test tells it to, bad paths included.

use super::raw::Raw;
use super::{fail, free_port, password_of, TestDir, DEADLINE};
use crossbeam_channel::{unbounded, Receiver};
use replibox_proto::auth::{accept_server, Frames, ScramServer, ServerStep};
use replibox_proto::{
    read_frame, write_frame, AuthMsg, ClusterKey, ContentHash, Epoch, FileMeta, Frame, Msg, Notice, Op, OpResult, Seq,
    StoredCredentials, Version, Who, CHUNK_SIZE,
};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// The metadata a fake peer gives `bytes` at `path`: version 1, a fixed mtime.
pub fn meta_of(path: &str, bytes: &[u8]) -> FileMeta {
    FileMeta {
        path: path.into(),
        version: Version(1),
        size: bytes.len() as u64,
        mtime_ms: 1_700_000_000_000,
        hash: ContentHash::of(bytes),
        deleted: false,
        atime_ms: 0,
        ctime_ms: 0,
        exec: false,
        dir: false,
    }
}

/// Sends `bytes` as a download (or fetch) answer to request `seq`.
fn stream(w: &Mutex<TcpStream>, seq: Seq, meta: FileMeta, bytes: &[u8]) -> bool {
    let mut w = w.lock().unwrap();
    let mut ok = write_frame(&mut *w, Epoch(1), &Msg::Reply { seq, result: OpResult::Data { meta } }, &[]).is_ok();
    for chunk in bytes.chunks(CHUNK_SIZE) {
        ok = ok && write_frame(&mut *w, Epoch(1), &Msg::Chunk { seq }, chunk).is_ok();
    }
    ok && write_frame(&mut *w, Epoch(1), &Msg::DownloadEnd { seq, hash: ContentHash::of(bytes) }, &[]).is_ok()
}

fn reply(w: &Mutex<TcpStream>, seq: Seq, result: OpResult) -> bool {
    write_frame(&mut *w.lock().unwrap(), Epoch(1), &Msg::Reply { seq, result }, &[]).is_ok()
}

/// A server for one client at a time: it holds every user's account with the
/// harness's password ([`password_of`]), as a server whose keys were stolen would,
/// so it can finish a login; it lists `files` (every path as a live version 1,
/// whatever the path), serves their bytes to downloads, refuses every change, and
/// pushes the notices the test gives it.
pub struct FakeServer {
    /// Where it listens.
    pub addr: SocketAddr,
    files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    client: Arc<Mutex<Option<Arc<Mutex<TcpStream>>>>>,
}

impl FakeServer {
    /// Listens on `ip`, serving `files`.
    pub fn start(ip: IpAddr, files: BTreeMap<String, Vec<u8>>) -> FakeServer {
        let listener = TcpListener::bind(SocketAddr::new(ip, free_port(ip))).unwrap();
        let addr = listener.local_addr().unwrap();
        let files = Arc::new(Mutex::new(files));
        let client: Arc<Mutex<Option<Arc<Mutex<TcpStream>>>>> = Arc::default();
        let (f, c) = (files.clone(), client.clone());
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let (f, c) = (f.clone(), c.clone());
                std::thread::spawn(move || serve_client(s, f, c));
            }
        });
        FakeServer { addr, files, client }
    }

    /// Adds (or replaces) a file it serves.
    pub fn add(&self, path: &str, bytes: &[u8]) {
        self.files.lock().unwrap().insert(path.into(), bytes.to_vec());
    }

    /// Pushes a notice to the logged-in client.
    pub fn push(&self, notice: Notice) {
        let w = self.client.lock().unwrap().clone().unwrap_or_else(|| fail("the fake server has no client"));
        let sent = write_frame(&mut *w.lock().unwrap(), Epoch(1), &Msg::Notice { notice }, &[]);
        sent.unwrap_or_else(|e| fail(format!("the fake server cannot push a notice: {e}")));
    }
}

fn serve_client(
    s: TcpStream,
    files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    client: Arc<Mutex<Option<Arc<Mutex<TcpStream>>>>>,
) {
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let w = Arc::new(Mutex::new(s));
    let Ok(Some(Frame { msg: Msg::Hello { .. }, .. })) = read_frame(&mut r) else { return };
    if !fake_login(&mut r, &w) {
        return;
    }
    let welcome = Msg::Welcome { devices: 1, last_seq: Seq(0) };
    if write_frame(&mut *w.lock().unwrap(), Epoch(1), &welcome, &[]).is_err() {
        return;
    }
    *client.lock().unwrap() = Some(w.clone());
    while let Ok(Some(frame)) = read_frame(&mut r) {
        let ok = match frame.msg {
            Msg::Ping => write_frame(&mut *w.lock().unwrap(), Epoch(1), &Msg::Pong, &[]).is_ok(),
            Msg::Request { seq, op: Op::List { .. } } => {
                let files = files.lock().unwrap().iter().map(|(p, b)| meta_of(p, b)).collect();
                reply(&w, seq, OpResult::Listing { files, more: false })
            }
            Msg::Request { seq, op: Op::Download { path } } => {
                let bytes = files.lock().unwrap().get(&path).cloned();
                match bytes {
                    Some(b) => stream(&w, seq, meta_of(&path, &b), &b),
                    None => reply(&w, seq, OpResult::Error { message: format!("no such file: {path}") }),
                }
            }
            Msg::Request { seq, op: Op::Upload { .. } | Op::Delete { .. } | Op::Rename { .. } } => {
                reply(&w, seq, OpResult::Error { message: "this fake server changes nothing".into() })
            }
            Msg::Bye => break,
            _ => false,
        };
        if !ok {
            break;
        }
    }
}

/// The server's side of a password login with the harness's password for the
/// user (few iterations: a client accepts 4096, and the test stays fast). False
/// when the login did not finish.
fn fake_login(r: &mut impl std::io::Read, w: &Mutex<TcpStream>) -> bool {
    let mut next = || match read_frame(r) {
        Ok(Some(Frame { msg: Msg::Auth(m), .. })) => Some(m),
        _ => None,
    };
    let Some(first) = next() else { return false };
    let Ok(mut login) = ScramServer::new(first) else { return false };
    let account = StoredCredentials::derive(&password_of(login.user()), b"a fake server's!", 4096).unwrap();
    let send = |m: AuthMsg| write_frame(&mut *w.lock().unwrap(), Epoch(1), &Msg::Auth(m), &[]).is_ok();
    if !send(login.challenge(Some(account)).unwrap()) {
        return false;
    }
    let Some(last) = next() else { return false };
    match login.step(last) {
        Ok(ServerStep::LoggedIn { reply, .. }) => send(reply),
        _ => false,
    }
}

/// A primary for one backup: it holds the test's cluster key (a compromised
/// member, or a bug: the backup's own checks are what is tested), runs the
/// accepting side of every connection's cluster handshake, hands the test each
/// replication link the backup opens (the backup's hello already read), and serves
/// every fetch with [`FakePrimary::CONTENT`] under the metadata [`meta_of`] gives it.
pub struct FakePrimary {
    /// Where it listens.
    pub addr: SocketAddr,
    links: Receiver<(Raw, Who)>,
}

impl FakePrimary {
    /// What every fetch gets.
    pub const CONTENT: &'static [u8] = b"bytes from a hostile primary";

    /// Listens on `ip`, with the test's cluster key.
    pub fn start(t: &TestDir, ip: IpAddr) -> FakePrimary {
        let listener = TcpListener::bind(SocketAddr::new(ip, free_port(ip))).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, links) = unbounded();
        let key = t.key();
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let _ = s.set_read_timeout(Some(DEADLINE));
                if !fake_accept(&s, &key) {
                    continue;
                }
                let Ok(Some(Frame { msg: Msg::Hello { who, .. }, .. })) = read_frame(&mut s) else { continue };
                match who {
                    Who::Fetch { .. } => {
                        std::thread::spawn(move || serve_fetches(s));
                    }
                    who => {
                        if tx.send((Raw::from_stream(s, "the backup's link"), who)).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        FakePrimary { addr, links }
    }

    /// The next link the backup opens.
    pub fn next_link(&self) -> (Raw, Who) {
        self.links.recv_timeout(DEADLINE).unwrap_or_else(|_| fail("the backup did not connect to the fake primary"))
    }
}

/// The accepting side of the cluster handshake, as id 1.
fn fake_accept(s: &TcpStream, key: &ClusterKey) -> bool {
    let mut t = Frames { reader: s, writer: s, epoch: Epoch(1) };
    let first = match read_frame(&mut &*s) {
        Ok(Some(Frame { msg: Msg::Auth(m), .. })) => m,
        _ => return false,
    };
    accept_server(&mut t, key, Some(replibox_proto::ServerId(1)), first).is_ok()
}

fn serve_fetches(s: TcpStream) {
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let w = Mutex::new(s);
    while let Ok(Some(frame)) = read_frame(&mut r) {
        let ok = match frame.msg {
            Msg::Fetch { path, .. } => stream(&w, Seq(0), meta_of(&path, FakePrimary::CONTENT), FakePrimary::CONTENT),
            Msg::Ping => write_frame(&mut *w.lock().unwrap(), Epoch(1), &Msg::Pong, &[]).is_ok(),
            _ => false,
        };
        if !ok {
            return;
        }
    }
}
