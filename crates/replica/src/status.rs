//! `replibox-server --status HOST:PORT`: one status query, printed as one JSON line.

use replibox_proto::{read_frame, write_frame, Epoch, Msg, Who, PROTOCOL_VERSION};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Asks a server for its status.
pub fn query(addr: &str, timeout: Duration) -> Result<serde_json::Value, String> {
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {addr}"))?;
    let mut stream = TcpStream::connect_timeout(&sock, timeout).map_err(|e| format!("cannot reach {addr}: {e}"))?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    write_frame(&mut stream, Epoch(0), &Msg::Hello { version: PROTOCOL_VERSION, who: Who::Status }, &[])
        .map_err(|e| format!("cannot query {addr}: {e}"))?;
    match read_frame(&mut stream) {
        Ok(Some(f)) => match f.msg {
            Msg::Status { status } => Ok(status),
            Msg::Refused { reason } => Err(format!("{addr} refused the status query: {reason}")),
            other => Err(format!("{addr} answered a status query with {}", other.kind())),
        },
        Ok(None) => Err(format!("{addr} closed the connection without answering")),
        Err(e) => Err(format!("no status from {addr}: {e}")),
    }
}
