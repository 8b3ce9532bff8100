//! `replibox-server --status HOST:PORT`: one status query, printed as one JSON line.

use replibox_proto::{read_frame, write_frame, Epoch, Msg, Who, PROTOCOL_VERSION};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// How a status query went, for a caller that must tell a stopped server from
/// a silent one.
#[derive(Debug, Clone)]
pub enum Probe {
    /// It answered with its status.
    Answered(serde_json::Value),
    /// Its port refused the connection: no server runs there.
    Down,
    /// Anything else (no answer in time, a reset, a refusal): it may be running.
    Silent(String),
}

/// Asks a server for its status, telling a stopped server from a silent one.
pub fn probe(addr: &str, timeout: Duration) -> Probe {
    match ask(addr, timeout) {
        Ok(status) => Probe::Answered(status),
        Err((true, _)) => Probe::Down,
        Err((false, why)) => Probe::Silent(why),
    }
}

/// Asks a server for its status.
pub fn query(addr: &str, timeout: Duration) -> Result<serde_json::Value, String> {
    ask(addr, timeout).map_err(|(_, why)| why)
}

/// The status, or (the port refused the connection, why not).
fn ask(addr: &str, timeout: Duration) -> Result<serde_json::Value, (bool, String)> {
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| (false, format!("cannot resolve {addr}: {e}")))?
        .next()
        .ok_or_else(|| (false, format!("cannot resolve {addr}")))?;
    let mut stream = TcpStream::connect_timeout(&sock, timeout)
        .map_err(|e| (crate::cluster::is_down(&e), format!("cannot reach {addr}: {e}")))?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    write_frame(&mut stream, Epoch(0), &Msg::Hello { version: PROTOCOL_VERSION, who: Who::Status }, &[])
        .map_err(|e| (false, format!("cannot query {addr}: {e}")))?;
    match read_frame(&mut stream) {
        Ok(Some(f)) => match f.msg {
            Msg::Status { status } => Ok(status),
            Msg::Refused { reason } => Err((false, format!("{addr} refused the status query: {reason}"))),
            other => Err((false, format!("{addr} answered a status query with {}", other.kind()))),
        },
        Ok(None) => Err((false, format!("{addr} closed the connection without answering"))),
        Err(e) => Err((false, format!("no status from {addr}: {e}"))),
    }
}
