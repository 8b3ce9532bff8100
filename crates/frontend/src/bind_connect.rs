//! Connecting from a chosen local address.
//!
//! `std::net::TcpStream` cannot bind before it connects; `socket2` can, without
//! hand-written `unsafe` FFI (the alternative turned down).

use socket2::{Domain, Socket, Type};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

/// Connects to `to` from `ip` (any free port).
pub fn connect(ip: IpAddr, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let domain = if to.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let socket = Socket::new(domain, Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(ip, 0).into())?;
    socket.connect_timeout(&to.into(), timeout)?;
    Ok(socket.into())
}
