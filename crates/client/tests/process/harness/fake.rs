//! Hostile peers: a fake server for a real client, and a fake primary for a real
//! backup, each saying what the test tells it to, bad paths included.

use super::raw::Raw;
use super::{fail, free_port, DEADLINE};
use crossbeam_channel::{unbounded, Receiver};
use replibox_proto::{
    read_frame, write_frame, ContentHash, Epoch, FileMeta, Frame, Msg, Notice, Op, OpResult, Seq, Version, Who,
    CHUNK_SIZE,
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

/// A server for one client at a time: it welcomes any login, lists `files` (every
/// path as a live version 1, whatever the path), serves their bytes to downloads,
/// refuses every change, and pushes the notices the test gives it.
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
    let welcome = Msg::Welcome { token: "fake".into(), devices: 1, last_seq: Seq(0) };
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

/// A primary for one backup: it hands the test each replication link the backup
/// opens (the backup's hello already read), and serves every fetch with
/// [`FakePrimary::CONTENT`] under the metadata [`meta_of`] gives it.
pub struct FakePrimary {
    /// Where it listens.
    pub addr: SocketAddr,
    links: Receiver<(Raw, Who)>,
}

impl FakePrimary {
    /// What every fetch gets.
    pub const CONTENT: &'static [u8] = b"bytes from a hostile primary";

    /// Listens on `ip`.
    pub fn start(ip: IpAddr) -> FakePrimary {
        let listener = TcpListener::bind(SocketAddr::new(ip, free_port(ip))).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, links) = unbounded();
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let _ = s.set_read_timeout(Some(DEADLINE));
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
