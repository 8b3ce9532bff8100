//! The listener: accepts connections and hands each to its own thread.

use crate::conn;
use crate::core::{Core, Event};
use crossbeam_channel::{unbounded, Sender};
use std::net::TcpListener;
use std::thread::JoinHandle;

/// A running server: its core thread and its accept thread.
pub struct Running {
    /// Feeds the core.
    pub events: Sender<Event>,
    /// The core thread; it ends after [`Event::Shutdown`].
    pub core: JoinHandle<()>,
}

/// Starts the core and the accept loop on an already-bound listener (tests bind
/// port 0 and pass the listener in).
pub fn start(listener: TcpListener, core: Core) -> std::io::Result<Running> {
    let (events, rx) = unbounded();
    let core = std::thread::Builder::new().name("core".into()).spawn(move || core.run(rx))?;
    let accept_events = events.clone();
    std::thread::Builder::new().name("accept".into()).spawn(move || {
        let mut next: u64 = 0;
        for stream in listener.incoming() {
            match stream {
                Ok(stream) => {
                    next += 1;
                    let conn = next;
                    let core = accept_events.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("conn-{conn}"))
                        .spawn(move || conn::serve(stream, conn, core));
                    if let Err(e) = spawned {
                        log::error!("cannot start a connection thread: {e}");
                    }
                }
                Err(e) => log::warn!("accept failed: {e}"),
            }
        }
    })?;
    Ok(Running { events, core })
}
