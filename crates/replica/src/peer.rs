//! Connections between servers outside the replication link: one election,
//! coordinator or fence message and its answer per connection (rare, so a
//! connection each is simpler than keeping one open), each authenticated both
//! ways with the cluster key first; and a new primary calling its clients back.

use crate::cluster::{self, unreached, ClusterAuth, ConnectError};
use crate::conn::{Client, Ctx, FrameWriter};
use crate::core::{ask, Event};
use crate::node::Unreached;
use crate::state::Session;
use crossbeam_channel::{unbounded, Sender};
use replibox_proto::auth::callback::callback_proof_hex;
use replibox_proto::auth::AuthMsg;
use replibox_proto::{read_frame, write_frame, Answer, Epoch, Msg, Purpose, ServerId, Who, PROTOCOL_VERSION};
use std::io::Read;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How long a new primary's call to a client may take, handshake included:
/// clients it cannot reach within it leave the session table.
pub const CALLBACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one message from another server (its hello said `Who::Peer`): the core
/// answers it, and the answer goes back stamped with the epoch the core decided
/// it in: read at write time, a primary's `primary` answer could go out with the
/// later epoch it stepped down for, and send a candidate after a former primary.
pub fn serve<R: Read>(reader: &mut R, writer: &FrameWriter, core: &Sender<Event>, from: ServerId, peer: &str) {
    let frame = match read_frame(reader) {
        Ok(Some(f)) => f,
        Ok(None) => return,
        Err(e) => {
            log::warn!("peer connection from id={from} peer={peer}: {e}");
            return;
        }
    };
    match &frame.msg {
        Msg::Election { .. } | Msg::Coordinator { .. } | Msg::Fence { .. } => {}
        other => {
            log::warn!("peer connection from id={from} peer={peer}: unexpected {}", other.kind());
            return;
        }
    }
    let Some((epoch, answer)) = ask(core, |reply| Event::Peer { from, epoch: frame.epoch, msg: frame.msg, reply })
    else {
        return;
    };
    let _ = writer.send_at(epoch, &Msg::Answer { answer }, &[]);
}

fn resolve(addr: &str) -> Option<SocketAddr> {
    addr.to_socket_addrs().ok()?.next()
}

/// Sends `msg` to server `to` at `addr` on a connection of its own, from a thread
/// of its own, and reports its answer (or that it could not be asked) to the core.
pub fn send(
    core: Sender<Event>,
    cluster: Arc<ClusterAuth>,
    to: ServerId,
    addr: String,
    epoch: Epoch,
    msg: Msg,
    timeout: Duration,
) {
    let kind = msg.kind();
    let spawned = std::thread::Builder::new().name(format!("peer-{kind}-{to}")).spawn(move || {
        let event = match exchange(&cluster, to, &addr, epoch, &msg, timeout) {
            Ok((epoch, answer)) => Event::PeerAnswer { to, epoch, answer },
            Err((how, why)) => {
                log::info!("could not reach server id={to} at {addr} with {}: {why}", msg.kind());
                Event::PeerUnreachable { to, how }
            }
        };
        let _ = core.send(event);
    });
    if let Err(e) = spawned {
        log::error!("cannot start a thread to reach server id={to}: {e}");
    }
}

/// One message and its answer, on a connection authenticated both ways with the
/// cluster key: an answer from a server that cannot prove the key (or that is
/// not server `to`) is never taken into account.
fn exchange(
    cluster: &ClusterAuth,
    to: ServerId,
    addr: &str,
    now: Epoch,
    msg: &Msg,
    timeout: Duration,
) -> Result<(Epoch, Answer), (Unreached, String)> {
    let me = cluster.me().unwrap_or_default();
    let (stream, proven) =
        cluster::connect(cluster, Some(me), addr, Purpose::Election, now, timeout).map_err(|e| match e {
            ConnectError::Unreachable { how, why } => (how, why),
            other => (Unreached::Silent, other.to_string()),
        })?;
    if proven.id != Some(to) {
        let why = format!("the server at {addr} proves the key as id {:?}, not id={to}", proven.id);
        return Err((Unreached::Silent, why));
    }
    let io_error = |e: &replibox_proto::ProtoError| match e {
        replibox_proto::ProtoError::Io(io) => unreached(io),
        _ => Unreached::Broken,
    };
    let mut w = &stream;
    let hello = Msg::Hello { version: PROTOCOL_VERSION, who: Who::Peer { id: me } };
    let sent = write_frame(&mut w, now, &hello, &[]).and_then(|_| write_frame(&mut w, now, msg, &[]));
    sent.map_err(|e| (io_error(&e), e.to_string()))?;
    let mut r = &stream;
    match read_frame(&mut r) {
        Ok(Some(f)) => match f.msg {
            Msg::Answer { answer } => Ok((f.epoch, answer)),
            other => Err((Unreached::Broken, format!("answered with {}", other.kind()))),
        },
        // Closed without an answer: it may have died on the way, or be alive
        // and unable to answer. The next try tells (a dead one refuses).
        Ok(None) => Err((Unreached::Broken, "closed without an answer".into())),
        Err(e) if e.is_timeout() => Err((Unreached::Silent, format!("no answer within {timeout:?}"))),
        Err(e) => Err((io_error(&e), e.to_string())),
    }
}

/// Calls a client back at its session's address, as the new primary of `epoch`
/// (from a thread of its own): proves it holds the session's token, and once the
/// client resumes, serves the session on that connection.
pub fn call_back(
    core: Sender<Event>,
    ctx: Ctx,
    me: ServerId,
    addr: String,
    epoch: replibox_proto::Epoch,
    session: Session,
) {
    let device = session.device.clone();
    let spawned =
        std::thread::Builder::new().name(format!("callback-{}", &device.0[..device.0.len().min(8)])).spawn(move || {
            if let Err(why) = callback(&core, &ctx, me, addr, epoch, &session) {
                let _ = core.send(Event::CallbackFailed { device: session.device.clone(), why });
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start a thread to call device={device} back: {e}");
    }
}

fn callback(
    core: &Sender<Event>,
    ctx: &Ctx,
    me: ServerId,
    addr: String,
    epoch: Epoch,
    s: &Session,
) -> Result<(), String> {
    let target = format!("{}:{}", s.ip, s.callback_port);
    let sock = resolve(&target).ok_or(format!("cannot resolve {target}"))?;
    let stream =
        TcpStream::connect_timeout(&sock, CALLBACK_TIMEOUT).map_err(|e| format!("cannot reach {target}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(CALLBACK_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CALLBACK_TIMEOUT));
    let writer = FrameWriter::new(stream.try_clone().map_err(|e| e.to_string())?, ctx.epoch.clone());
    let who = Who::Primary { id: me, addr: addr.clone(), device: s.device.clone() };
    writer.send(&Msg::Hello { version: PROTOCOL_VERSION, who }, &[]).map_err(|e| format!("{target}: {e}"))?;
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, stream);
    let next = |r: &mut std::io::BufReader<TcpStream>| match read_frame(r) {
        Ok(Some(f)) => Ok(f.msg),
        Ok(None) => Err(format!("{target} closed the connection")),
        Err(e) => Err(format!("{target}: {e}")),
    };
    let nonce = match next(&mut reader)? {
        Msg::Auth(AuthMsg::CallbackChallenge { nonce }) => nonce,
        Msg::Refused { reason } => return Err(format!("{target} refused the call: {reason}")),
        other => return Err(format!("{target} answered the call with {}", other.kind())),
    };
    let nonce: [u8; 32] = hex32(&nonce).ok_or(format!("{target} sent a malformed challenge"))?;
    let proof = callback_proof_hex(&s.token, &nonce, epoch, &s.device);
    let msg = Msg::Auth(AuthMsg::CallbackProof { epoch, device: s.device.clone(), proof });
    writer.send(&msg, &[]).map_err(|e| format!("{target}: {e}"))?;
    match next(&mut reader)? {
        Msg::Resume => {}
        Msg::Refused { reason } => return Err(format!("{target} refused the call: {reason}")),
        other => return Err(format!("{target} answered the proof with {}", other.kind())),
    }
    // The connection becomes the session.
    let conn = ctx.conns.fetch_add(1, Ordering::Relaxed) + 1 + (1 << 40);
    let (out_tx, out_rx) = unbounded::<Msg>();
    let stream = reader.get_ref().try_clone().ok();
    let device = s.device.clone();
    let answer =
        ask(core, |reply| Event::Resumed { conn, device, out: out_tx, stream, reply }).ok_or("the core stopped")?;
    let (user, welcome) = match answer {
        Ok(w) => w,
        Err(reason) => {
            let _ = writer.send(&Msg::Refused { reason: reason.clone() }, &[]);
            return Err(reason);
        }
    };
    let client = Client {
        conn,
        user,
        device: s.device.clone(),
        core: core.clone(),
        writer: writer.clone(),
        peer: target,
        ack_timeout: ctx.ack_timeout,
        temps: ctx.temps.clone(),
        route: ctx.route.clone(),
        devices: ctx.devices.clone(),
    };
    let welcome = Msg::Welcome { devices: welcome.devices, last_seq: welcome.last_seq };
    let end = match client.send(&welcome) {
        Err(e) => e,
        Ok(()) => {
            let _ = reader.get_ref().set_read_timeout(Some(crate::conn::READ_TIMEOUT));
            client.serve(&mut reader, out_rx)
        }
    };
    client.ended(&end);
    let _ = reader.get_ref().shutdown(std::net::Shutdown::Both);
    Ok(())
}

/// 64 hex digits as 32 bytes.
fn hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}
