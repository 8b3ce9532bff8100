//! A TCP proxy between clients and a server that loses a server's frames on purpose.
//!
//! It forwards the client's bytes as they are, and reads the server's side frame
//! by frame. A frame picked by [`Proxy::lose_next`] is not forwarded and the
//! connection is cut instead (both sockets shut down), as a network would lose a
//! reply when a connection dies; frames picked by [`Proxy::withhold`] are simply not
//! forwarded (a device that misses the server's notices). Frames are decoded and
//! encoded again, which the golden-frame tests show to give the same bytes.

use super::fail;
use replibox_proto::{read_frame, write_frame, Frame};
use std::io::{BufReader, BufWriter};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

type Rule = Box<dyn FnMut(&Frame) -> bool + Send>;

struct Shared {
    /// Picks the next server frame to lose; used once, then cleared.
    lose: Mutex<Option<Rule>>,
    /// Picks server frames not to forward, for as long as it is set.
    withhold: Mutex<Option<Rule>>,
    /// Picks server frames after which the connection is cut (the frame is
    /// forwarded first), for as long as it is set.
    cut_after: Mutex<Option<Rule>>,
    /// Connections cut so far.
    cuts: AtomicUsize,
    stop: AtomicBool,
}

/// A running proxy; it stops accepting when dropped.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Listens on `ip` (a free port) and forwards every connection to `target`.
    pub fn start(ip: IpAddr, target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(SocketAddr::new(ip, super::free_port(ip)))
            .unwrap_or_else(|e| fail(format!("the proxy cannot listen on {ip}: {e}")));
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            lose: Mutex::default(),
            withhold: Mutex::default(),
            cut_after: Mutex::default(),
            cuts: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || {
                for client in listener.incoming() {
                    if s.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect(target) else { continue };
                    let s = s.clone();
                    std::thread::spawn(move || relay(client, server, s));
                }
            })
            .unwrap();
        Proxy { addr, shared }
    }

    /// The next frame from the server for which `rule` holds is lost, and its
    /// connection cut.
    pub fn lose_next(&self, rule: impl FnMut(&Frame) -> bool + Send + 'static) {
        *self.shared.lose.lock().unwrap() = Some(Box::new(rule));
    }

    /// From now on, frames from the server for which `rule` holds are not
    /// forwarded (the connection stays up).
    pub fn withhold(&self, rule: impl FnMut(&Frame) -> bool + Send + 'static) {
        *self.shared.withhold.lock().unwrap() = Some(Box::new(rule));
    }

    /// From now on, every connection is cut right after the proxy forwarded a
    /// frame from the server for which `rule` holds (a network that breaks every
    /// connection soon after it is made).
    pub fn cut_after(&self, rule: impl FnMut(&Frame) -> bool + Send + 'static) {
        *self.shared.cut_after.lock().unwrap() = Some(Box::new(rule));
    }

    /// How many connections the proxy has cut (frames lost, or cut after).
    pub fn cuts(&self) -> usize {
        self.shared.cuts.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn relay(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (Ok(mut from_client), Ok(mut to_server)) = (client.try_clone(), server.try_clone()) else { return };
    let upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_client, &mut to_server);
        let _ = to_server.shutdown(Shutdown::Write);
    });
    let mut from_server = BufReader::new(&server);
    let mut to_client = BufWriter::new(&client);
    while let Ok(Some(frame)) = read_frame(&mut from_server) {
        let lose = {
            let mut rule = shared.lose.lock().unwrap();
            let hit = rule.as_mut().is_some_and(|r| r(&frame));
            if hit {
                *rule = None;
            }
            hit
        };
        if lose {
            shared.cuts.fetch_add(1, Ordering::Relaxed);
            break;
        }
        if shared.withhold.lock().unwrap().as_mut().is_some_and(|r| r(&frame)) {
            continue;
        }
        if write_frame(&mut to_client, frame.epoch, &frame.msg, &frame.payload).is_err() {
            break;
        }
        if shared.cut_after.lock().unwrap().as_mut().is_some_and(|r| r(&frame)) {
            use std::io::Write;
            let _ = to_client.flush();
            shared.cuts.fetch_add(1, Ordering::Relaxed);
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
    let _ = upstream.join();
}
