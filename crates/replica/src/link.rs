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

use crate::conn::Ctx;
use crate::core::{Event, NewLink};
use crate::node::{JoinRequest, LinkNo};
use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};
use replibox_proto::{read_frame, write_frame, Epoch, LogPos, Msg, ServerId};
use std::io::{BufReader, BufWriter};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Chunks a link may hold before an upload thread feeding it waits.
pub const DATA_QUEUE: usize = 16;

/// One frame for a backup.
#[derive(Clone, Debug)]
pub struct LinkOut {
    /// The epoch it carries: the sender's when it decided to send. Never read
    /// at write time: a primary that steps down lets its links send what they
    /// hold, and those frames belong to the epoch it held then.
    pub epoch: Epoch,
    /// The message.
    pub msg: Msg,
    /// Its payload, shared between the links it goes to.
    pub payload: Option<Arc<Vec<u8>>>,
}

impl LinkOut {
    /// A frame without payload.
    pub fn msg(epoch: Epoch, msg: Msg) -> LinkOut {
        LinkOut { epoch, msg, payload: None }
    }
}

/// Writes a link's frames until its queues close or the socket fails; then shuts
/// the socket down so that the link's reader sees the end too. When the link has
/// been idle for `keepalive` it writes a ping of its own: the backup hears that
/// the primary's process is alive even while its core is busy with the disk (the
/// core's heartbeats, which carry what backups act on, may then come late). A
/// ping carries the epoch of the frame before it (`first` until there is one).
pub fn writer(
    stream: TcpStream,
    ctl: Receiver<LinkOut>,
    data: Receiver<LinkOut>,
    first: Epoch,
    peer: String,
    keepalive: Duration,
) {
    let shut = stream.try_clone();
    let mut w = BufWriter::with_capacity(64 * 1024, stream);
    let last = std::cell::Cell::new(first);
    let mut write = |out: &LinkOut| -> bool {
        let payload = out.payload.as_deref().map(|v| v.as_slice()).unwrap_or(&[]);
        last.set(out.epoch);
        match write_frame(&mut w, out.epoch, &out.msg, payload) {
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
        let ping = || Ok((LinkOut::msg(last.get(), Msg::Ping), true));
        let next = if data_open {
            select! {
                recv(ctl) -> m => m.map(|m| (m, true)).map_err(|_| true),
                recv(data) -> d => d.map(|d| (d, false)).map_err(|_| false),
                default(keepalive) => ping(),
            }
        } else {
            select! {
                recv(ctl) -> m => m.map(|m| (m, true)).map_err(|_| true),
                default(keepalive) => ping(),
            }
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
    /// The epoch of the primary that began the upload, for its frames.
    pub epoch: Epoch,
    /// Its data queue.
    pub tx: Sender<LinkOut>,
}

/// How long the primary lets a joining backup's link stay silent (it pings every
/// second, even while it fetches files).
const JOINING_SILENCE: Duration = Duration::from_secs(10);

/// Primary side: serves a server that said hello as a joining backup. The core
/// decides (through its node) what to answer; this thread then reads the
/// backup's acks until the link ends.
pub fn serve_link(stream: TcpStream, ctx: Ctx, hello_epoch: Epoch, request: Hello, peer: String) {
    let Hello { id, ip, port, pos, last_epoch, member } = request;
    let no: LinkNo = ctx.links.fetch_add(1, Ordering::Relaxed) + 1;
    let (Ok(peer_addr), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else { return };
    // A member's address is where its authenticated connection comes from: one it
    // merely claims could send a real backup's share of the traffic (elections,
    // fences) elsewhere. Servers connect from the address they listen on.
    let claimed = ip.map(|s| s.parse::<IpAddr>().map_err(|_| s)).transpose();
    let ip = match claimed {
        Ok(Some(ip)) if ip.is_unspecified() || ip == peer_addr.ip() => peer_addr.ip(),
        Ok(None) => peer_addr.ip(),
        Ok(Some(ip)) => {
            return refuse_link(
                &stream,
                &peer,
                Epoch(ctx.epoch.load(Ordering::Relaxed)),
                format!(
                    "the joining server says it listens on {ip}, but its connection comes from {}; a server must \
                 connect from the address it listens on",
                    peer_addr.ip()
                ),
            )
        }
        Err(text) => {
            return refuse_link(
                &stream,
                &peer,
                Epoch(ctx.epoch.load(Ordering::Relaxed)),
                format!("the joining server's address {text:?} is not an IP"),
            )
        }
    };
    let addr = SocketAddr::new(ip, port).to_string();
    let (ctl_tx, ctl_rx) = unbounded();
    let (data_tx, data_rx) = bounded(DATA_QUEUE);
    let (Ok(write_half), Ok(shut_half)) = (stream.try_clone(), stream.try_clone()) else { return };
    let (epoch, label, keepalive) = (Epoch(ctx.epoch.load(Ordering::Relaxed)), addr.clone(), ctx.heartbeat);
    let spawned = std::thread::Builder::new()
        .name(format!("link-{no}-writer"))
        .spawn(move || writer(write_half, ctl_rx, data_rx, epoch, label, keepalive));
    if spawned.is_err() {
        return;
    }
    // A primary bound to every address learns its own from the link.
    let local_addr = ctx.bound_to_any.then(|| SocketAddr::new(local.ip(), ctx.port).to_string());
    let request = JoinRequest { id, addr: addr.clone(), pos, last_epoch, epoch: hello_epoch, local_addr, member };
    let link = NewLink { no, request, peer_ip: peer_addr.ip(), ctl: ctl_tx, data: data_tx, stream: shut_half };
    if ctx.core.send(Event::LinkUp { link: Box::new(link) }).is_err() {
        return;
    }
    log::info!("replication link up no={no} addr={addr} their_pos={pos} their_epoch={last_epoch} peer={peer}");
    // A joining backup may fetch files for a long while before it acks anything,
    // but it pings every second; once caught up, its heartbeat acks pace it too.
    let _ = stream.set_read_timeout(Some(ctx.ack_timeout.max(JOINING_SILENCE)));
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let why = loop {
        let frame = match read_frame(&mut reader) {
            Ok(Some(f)) => f,
            Ok(None) => break "closed by the backup".to_string(),
            Err(e) if e.is_timeout() => {
                let silence = reader.get_ref().read_timeout().ok().flatten().unwrap_or(ctx.ack_timeout);
                break format!("silent for {silence:?}");
            }
            Err(e) => break e.to_string(),
        };
        match frame.msg {
            Msg::Ack { .. } | Msg::CaughtUp { .. } | Msg::Ping => {}
            other => break format!("unexpected {} from the backup", other.kind()),
        }
        if ctx.core.send(Event::LinkMsg { no, epoch: frame.epoch, msg: frame.msg }).is_err() {
            return;
        }
    };
    let _ = ctx.core.send(Event::LinkDown { no, why });
}

/// Refuses a join before it reaches the core (logged, and told to the joiner).
fn refuse_link(stream: &TcpStream, peer: &str, epoch: Epoch, reason: String) {
    log::warn!("refused a joining server peer={peer}: {reason}");
    let mut w = stream;
    let _ = write_frame(&mut w, epoch, &Msg::Refused { reason }, &[]);
}

/// What a joining server's hello says.
pub struct Hello {
    /// Its id, if it has one.
    pub id: Option<ServerId>,
    /// The IP it listens on, if it said.
    pub ip: Option<String>,
    /// The port it listens on.
    pub port: u16,
    /// The position of its last entry.
    pub pos: LogPos,
    /// That entry's epoch.
    pub last_epoch: Epoch,
    /// It counts itself a member that may stand.
    pub member: bool,
}
