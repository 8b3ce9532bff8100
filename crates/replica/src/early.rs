//! Early copies: the primary sends a large upload's bytes on to the user's other
//! connected devices as they arrive, while the servers store them, so that a
//! device told of the file (once the backups have it, as before) already holds
//! it instead of downloading it then. See `docs/protocol.md`, "Early copies".
//!
//! Best effort, and never much in the way: each device gets a thread of its
//! own and a bounded queue. The upload waits for a device whose queue is full
//! (a device a little slower than the servers, as on one machine whose two
//! cores all five processes share, would otherwise always be left out), but
//! only so long: once it has waited [`GRACE`] or a [`HOLD_BACK`]th of the
//! upload's time for that device, whichever is more, the device is left out of
//! this upload and downloads the file as before. A device on a slow link thus
//! slows a large upload by at most about a quarter while its bytes flow, never
//! to its own pace. At the end, the commit waits for the device to take the
//! rest of its queue (at most 16 MiB) for as long as it keeps taking chunks,
//! and gives up on one that takes none for [`GRACE`]: a stopped device costs
//! an upload [`GRACE`] there, not the commit's whole deadline.

use crate::conn::FrameWriter;
use crate::core::ConnId;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender, TrySendError};
use replibox_proto::{ContentHash, DeviceId, Msg};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How many chunks a device's early copy may be behind the upload (16 MiB, as
/// a backup link's queue).
const QUEUE_CHUNKS: usize = 64;

/// The least an upload may wait, in all, for one device's full queue.
pub const GRACE: Duration = Duration::from_millis(250);

/// An upload may also wait for one device up to this share (1/N) of the time it
/// has taken so far.
pub const HOLD_BACK: u32 = 4;

/// A logged-in session: its connection, its device and its write side.
type Session = (ConnId, DeviceId, FrameWriter);

/// The logged-in sessions of each user on this server, with their write sides.
#[derive(Default)]
pub struct Devices {
    by_user: Mutex<HashMap<String, Vec<Session>>>,
}

impl Devices {
    /// Records a session of `device` serving `user` on `conn` until the guard
    /// is dropped. It replaces any earlier session of that device, which the
    /// core no longer sends anything either.
    pub fn join(self: &Arc<Self>, user: &str, conn: ConnId, device: &DeviceId, writer: FrameWriter) -> Joined {
        let mut map = self.lock();
        let sessions = map.entry(user.to_string()).or_default();
        sessions.retain(|(_, d, _)| d != device);
        sessions.push((conn, device.clone(), writer));
        Joined { devices: self.clone(), user: user.to_string(), conn }
    }

    /// The connections and write sides of `user`'s devices other than
    /// `device`, each on its latest session: not the uploading device itself,
    /// which holds the bytes already.
    pub fn others(&self, user: &str, device: &DeviceId) -> Vec<(ConnId, FrameWriter)> {
        let map = self.lock();
        let sessions = map.get(user).map(Vec::as_slice).unwrap_or_default();
        sessions.iter().filter(|(_, d, _)| d != device).map(|(c, _, w)| (*c, w.clone())).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Session>>> {
        self.by_user.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A session's place in [`Devices`]; leaves it when dropped.
pub struct Joined {
    devices: Arc<Devices>,
    user: String,
    conn: ConnId,
}

impl Drop for Joined {
    fn drop(&mut self) {
        let mut map = self.devices.lock();
        if let Some(v) = map.get_mut(&self.user) {
            v.retain(|(c, _, _)| *c != self.conn);
            if v.is_empty() {
                map.remove(&self.user);
            }
        }
    }
}

enum Piece {
    Chunk(Arc<Vec<u8>>),
    End(ContentHash),
}

/// One device's early copy of one upload, sent by a thread of its own. Dropped
/// before [`EarlyOut::finish`], the device is told to let the copy go, and the
/// thread writes none of the chunks still queued.
pub struct EarlyOut {
    conn: ConnId,
    tx: Sender<Piece>,
    /// Set when the copy is let go: the thread writes no further frame of it
    /// but `early_abort`.
    cancelled: Arc<AtomicBool>,
    /// Closed by the thread when it ends.
    done: Receiver<()>,
    /// Set by the thread once `early_end` is written.
    ended: Arc<AtomicBool>,
    /// When the upload began, and how long it has waited for this device.
    began: Instant,
    waited: Duration,
}

impl EarlyOut {
    /// Starts sending `path` (`size` bytes, transfer `xfer`) to the device
    /// behind `writer`; None if no thread could be started.
    pub fn start(conn: ConnId, writer: FrameWriter, xfer: &str, path: &str, size: u64) -> Option<EarlyOut> {
        let (tx, rx) = bounded::<Piece>(QUEUE_CHUNKS);
        let (done_tx, done) = bounded::<()>(0);
        let cancelled = Arc::new(AtomicBool::new(false));
        let begin = Msg::EarlyBegin { xfer: xfer.to_string(), path: path.to_string(), size };
        let xfer = xfer.to_string();
        let stop = cancelled.clone();
        let ended = Arc::new(AtomicBool::new(false));
        let end_written = ended.clone();
        let spawned = std::thread::Builder::new().name(format!("early-{conn}")).spawn(move || {
            let _done = done_tx;
            // A frame of the copy is written only while the copy is not let go
            // (the upload failed, or `finish` gave up on this device), checked
            // with the socket held: `finish` gives up, and the commit and its
            // notice follow, either before a frame's check or after that frame
            // is written, ahead of the notice. Some(written), or None when the
            // write failed (or timed out) and may have left part of a frame:
            // nothing more can follow it on this connection.
            let send = |msg: &Msg, payload: &[u8]| match writer.send_if(|| !stop.load(Ordering::Relaxed), msg, payload)
            {
                Ok(written) => Some(written),
                Err(_) => {
                    writer.shutdown();
                    None
                }
            };
            if send(&begin, &[]) != Some(true) {
                return;
            }
            let chunk = Msg::EarlyChunk { xfer: xfer.clone() };
            for piece in &rx {
                let (sent, end) = match piece {
                    Piece::Chunk(bytes) => (send(&chunk, &bytes), false),
                    Piece::End(hash) => (send(&Msg::EarlyEnd { xfer: xfer.clone(), hash }, &[]), true),
                };
                match sent {
                    Some(true) if end => {
                        end_written.store(true, Ordering::Relaxed);
                        return;
                    }
                    Some(true) => {}
                    Some(false) => break,
                    None => return,
                }
            }
            if writer.send(&Msg::EarlyAbort { xfer }, &[]).is_err() {
                writer.shutdown();
            }
        });
        match spawned {
            Ok(_) => Some(EarlyOut { conn, tx, cancelled, done, ended, began: Instant::now(), waited: Duration::ZERO }),
            Err(e) => {
                log::warn!("no early copy of {path} for conn={conn}: cannot start its thread: {e}");
                None
            }
        }
    }

    /// Queues a chunk, waiting for room within the allowance (see the module);
    /// false when the device is left out (and it is told to let the copy go).
    pub fn push(&mut self, chunk: &Arc<Vec<u8>>) -> bool {
        let piece = match self.tx.try_send(Piece::Chunk(chunk.clone())) {
            Ok(()) => return true,
            Err(TrySendError::Disconnected(_)) => return false,
            Err(TrySendError::Full(piece)) => piece,
        };
        let allowance = GRACE.max(self.began.elapsed() / HOLD_BACK).saturating_sub(self.waited);
        let since = Instant::now();
        let queued = self.tx.send_timeout(piece, allowance);
        self.waited += since.elapsed();
        match queued {
            Ok(()) => true,
            Err(SendTimeoutError::Timeout(_)) => {
                log::info!(
                    "conn={} fell behind the early copy (the upload waited {} ms for it); it downloads the file once told",
                    self.conn,
                    self.waited.as_millis()
                );
                false
            }
            Err(SendTimeoutError::Disconnected(_)) => false,
        }
    }

    /// Ends the copy with the upload's hash and waits for its last frame to be
    /// written, so that the notice of the change, which follows the commit,
    /// finds the copy whole on the device. The wait lasts while the device
    /// keeps taking the queued chunks: it ends at `deadline`, or once the
    /// device has taken none for [`GRACE`]. True if the copy went out whole;
    /// otherwise the device is told to let it go, and downloads the file once
    /// told.
    pub fn finish(self, hash: ContentHash, deadline: Instant) -> bool {
        let began = Instant::now();
        let mut end = Some(Piece::End(hash));
        // Pieces still to go (the end included), and when that last fell.
        let mut left = self.tx.len() + 1;
        let mut moved = began;
        let whole = loop {
            let until = (moved + GRACE).min(deadline);
            if let Some(piece) = end.take() {
                match self.tx.send_deadline(piece, until) {
                    Ok(()) => {}
                    Err(SendTimeoutError::Timeout(piece)) => end = Some(piece),
                    Err(SendTimeoutError::Disconnected(_)) => break false,
                }
            }
            if end.is_none() && matches!(self.done.recv_deadline(until), Err(RecvTimeoutError::Disconnected)) {
                break self.ended.load(Ordering::Relaxed);
            }
            let now_left = self.tx.len() + usize::from(end.is_some());
            if now_left < left {
                (left, moved) = (now_left, Instant::now());
            } else if Instant::now() >= until {
                break false;
            }
        };
        if !whole {
            log::info!(
                "conn={} did not take the rest of the early copy ({} ms after the upload ended, {left} chunks left); \
                 it downloads the file once told",
                self.conn,
                began.elapsed().as_millis()
            );
        }
        whole
    }
}

impl Drop for EarlyOut {
    fn drop(&mut self) {
        // After `finish` the thread has ended, or is past its deadline: the
        // device then downloads the file, and the rest of the copy is let go.
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replibox_proto::read_frame;
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::AtomicU64;
    use std::sync::mpsc;

    /// A server-side writer and the device's end of a loopback connection,
    /// with small socket buffers: what the device has not read holds the
    /// queue's thread back at once, whatever the system's defaults.
    fn pair() -> (FrameWriter, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let device = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        socket2::SockRef::from(&server).set_send_buffer_size(32 << 10).unwrap();
        socket2::SockRef::from(&device).set_recv_buffer_size(32 << 10).unwrap();
        (FrameWriter::new(server, Arc::new(AtomicU64::new(1))), device)
    }

    /// Runs `finish` on a thread: its answer, or None if it has not come by a
    /// deadline far beyond any allowance.
    fn finish_within(out: EarlyOut, deadline: Instant) -> Option<bool> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(out.finish(ContentHash(7), deadline)));
        rx.recv_timeout(Duration::from_secs(30)).ok()
    }

    #[test]
    fn a_copy_given_up_on_ends_with_early_abort_never_early_end() {
        // The device reads nothing until `finish` has given up: the thread is
        // still writing the last chunk, with the end queued behind it. The
        // commit's notice may follow at once, so the end must not.
        let (writer, device) = pair();
        let mut out = EarlyOut::start(4, writer, "x-4", "big.bin", 1 << 20).unwrap();
        // One chunk larger than the small socket buffers hold: its write blocks.
        assert!(out.push(&Arc::new(vec![5u8; 1 << 20])));
        assert_eq!(finish_within(out, Instant::now() + Duration::from_secs(60)), Some(false));
        let mut r = std::io::BufReader::new(device);
        let mut kinds = Vec::new();
        while let Ok(Some(frame)) = read_frame(&mut r) {
            kinds.push(frame.msg.kind());
            if matches!(frame.msg, Msg::EarlyAbort { .. } | Msg::EarlyEnd { .. }) {
                break;
            }
        }
        assert_eq!(kinds.last().copied(), Some("early_abort"), "{kinds:?}");
        assert!(!kinds.contains(&"early_end"), "{kinds:?}");
    }

    #[test]
    fn copies_go_to_the_latest_session_of_each_other_device() {
        let devices = Arc::new(Devices::default());
        let (laptop, phone) = (DeviceId("laptop".into()), DeviceId("phone".into()));
        let (w, _keep1) = pair();
        let _a = devices.join("alice", 1, &laptop, w.clone());
        let _b = devices.join("alice", 2, &phone, w.clone());
        let stale = devices.join("alice", 3, &laptop, w.clone());
        let latest = devices.join("alice", 4, &laptop, w.clone());
        let _other_user = devices.join("bob", 5, &phone, w.clone());
        let conns = |user: &str, device: &DeviceId| {
            let mut c: Vec<ConnId> = devices.others(user, device).into_iter().map(|(c, _)| c).collect();
            c.sort();
            c
        };
        assert_eq!(conns("alice", &phone), vec![4], "the laptop's latest session only");
        assert_eq!(conns("alice", &laptop), vec![2], "never a session of the uploading device");
        assert_eq!(conns("bob", &phone), Vec::<ConnId>::new());
        drop(stale);
        assert_eq!(conns("alice", &phone), vec![4], "a replaced session ending takes nothing with it");
        drop(latest);
        assert_eq!(conns("alice", &phone), Vec::<ConnId>::new(), "never a replaced session: the core sends it nothing");
    }

    #[test]
    fn a_device_that_reads_gets_the_whole_copy_before_the_commit() {
        let (writer, device) = pair();
        let reading = std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(device);
            let mut kinds = Vec::new();
            while let Ok(Some(frame)) = read_frame(&mut r) {
                kinds.push(frame.msg.kind());
                if matches!(frame.msg, Msg::EarlyEnd { .. }) {
                    break;
                }
            }
            kinds
        });
        let mut out = EarlyOut::start(1, writer, "x-1", "big.bin", 8 << 18).unwrap();
        let chunk = Arc::new(vec![5u8; 1 << 18]);
        for _ in 0..8 {
            assert!(out.push(&chunk));
        }
        assert_eq!(finish_within(out, Instant::now() + Duration::from_secs(60)), Some(true));
        let kinds = reading.join().unwrap();
        assert_eq!(kinds.first().copied(), Some("early_begin"));
        assert_eq!(kinds.iter().filter(|k| **k == "early_chunk").count(), 8);
        assert_eq!(kinds.last().copied(), Some("early_end"));
    }

    #[test]
    fn a_slow_device_that_keeps_reading_gets_the_whole_copy() {
        // The device takes a chunk every 50 ms: 1.2 s in all, far past GRACE,
        // but never GRACE without taking one.
        let (writer, device) = pair();
        let reading = std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(device);
            let mut chunks = 0;
            while let Ok(Some(frame)) = read_frame(&mut r) {
                match frame.msg {
                    Msg::EarlyChunk { .. } => {
                        chunks += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Msg::EarlyEnd { .. } => return Some(chunks),
                    _ => {}
                }
            }
            None
        });
        let mut out = EarlyOut::start(3, writer, "x-3", "big.bin", 24 << 18).unwrap();
        let chunk = Arc::new(vec![5u8; 1 << 18]);
        for _ in 0..24 {
            assert!(out.push(&chunk));
        }
        assert_eq!(
            finish_within(out, Instant::now() + Duration::from_secs(60)),
            Some(true),
            "finish gave up on a device that kept taking its copy"
        );
        assert_eq!(reading.join().unwrap(), Some(24), "the device did not get every chunk and the end");
    }

    #[test]
    fn a_stopped_device_holds_the_commit_for_its_allowance_only() {
        // The device never reads: its socket fills, then the queue's thread
        // waits on it. The commit's deadline (a minute) is far beyond the
        // allowance: finish must give up on the device well before it.
        let (writer, device) = pair();
        let mut out = EarlyOut::start(2, writer, "x-2", "big.bin", 16 << 18).unwrap();
        let chunk = Arc::new(vec![5u8; 1 << 18]);
        for _ in 0..16 {
            assert!(out.push(&chunk), "16 chunks fit the queue without a wait");
        }
        assert_eq!(
            finish_within(out, Instant::now() + Duration::from_secs(60)),
            Some(false),
            "finish waited past its allowance for a device that does not read"
        );
        drop(device);
    }
}
