//! The primary's side of a replication link: one per backup.
//!
//! Two queues feed a link's writer thread: a control queue (unbounded) for what the
//! core sends (entries, heartbeats, the snapshot) and a data queue (bounded) for
//! the chunks that upload threads forward as they arrive. The bound is what keeps
//! memory flat: a slow backup slows the upload that feeds it instead of piling
//! chunks up. An entry must never overtake the chunks of the upload it commits;
//! those chunks were queued before the entry was (the upload thread queues its
//! last chunk, then asks the core to commit), so before writing a control message
//! the writer drains what the data queue held at that moment (not more: a busy
//! upload must not starve heartbeats and entries).

use crossbeam_channel::{select, Receiver, Sender};
use replibox_proto::{write_frame, Epoch, Msg};
use std::io::BufWriter;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Chunks a link may hold before an upload thread feeding it waits.
pub const DATA_QUEUE: usize = 16;

/// One frame for a backup.
#[derive(Clone, Debug)]
pub struct LinkOut {
    /// The message.
    pub msg: Msg,
    /// Its payload, shared between the links it goes to.
    pub payload: Option<Arc<Vec<u8>>>,
}

impl LinkOut {
    /// A frame without payload.
    pub fn msg(msg: Msg) -> LinkOut {
        LinkOut { msg, payload: None }
    }
}

/// Writes a link's frames until its queues close or the socket fails; then shuts
/// the socket down so that the link's reader sees the end too.
pub fn writer(stream: TcpStream, ctl: Receiver<LinkOut>, data: Receiver<LinkOut>, epoch: Arc<AtomicU64>, peer: String) {
    let shut = stream.try_clone();
    let mut w = BufWriter::with_capacity(64 * 1024, stream);
    let mut write = |out: &LinkOut| -> bool {
        let payload = out.payload.as_deref().map(|v| v.as_slice()).unwrap_or(&[]);
        match write_frame(&mut w, Epoch(epoch.load(Ordering::Relaxed)), &out.msg, payload) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("link to backup {peer} failed while sending {}: {e}", out.msg.kind());
                false
            }
        }
    };
    // Upload threads drop their data senders at will; only the control queue
    // closing (the core letting go of the link) ends the writer.
    let mut data_open = true;
    'outer: loop {
        let next = if data_open {
            select! {
                recv(ctl) -> m => m.map(|m| (m, true)).map_err(|_| true),
                recv(data) -> d => d.map(|d| (d, false)).map_err(|_| false),
            }
        } else {
            ctl.recv().map(|m| (m, true)).map_err(|_| true)
        };
        let ok = match next {
            Err(true) => break,
            Err(false) => {
                data_open = false;
                continue;
            }
            Ok((m, true)) => {
                // Only what the data queue held when the control message arrived:
                // that includes every chunk queued before it, and an upload that
                // keeps the queue full cannot starve heartbeats and entries.
                for _ in 0..data.len() {
                    let Ok(d) = data.try_recv() else { break };
                    if !write(&d) {
                        break 'outer;
                    }
                }
                write(&m)
            }
            Ok((d, false)) => write(&d),
        };
        if !ok {
            break;
        }
    }
    if let Ok(s) = shut {
        let _ = s.shutdown(Shutdown::Both);
    }
}

/// The senders of a link, as upload threads hold them.
#[derive(Clone)]
pub struct DataSender {
    /// The backup's id, for logs.
    pub id: replibox_proto::ServerId,
    /// Its data queue.
    pub tx: Sender<LinkOut>,
}
