//! The listener: accepts connections and hands each to its own thread.

use crate::conn::{self, Ctx};
use crate::core::{Core, Event};
use crossbeam_channel::{unbounded, Sender};
use std::net::TcpListener;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;

/// A running server: its core thread and its accept thread.
pub struct Running {
    /// Feeds the core.
    pub events: Sender<Event>,
    /// The core thread; it ends after [`Event::Shutdown`].
    pub core: JoinHandle<()>,
    /// The epoch frames carry (shared with the follower of a backup).
    pub epoch: Arc<AtomicU64>,
}

/// Starts the core and the accept loop on an already-bound listener (tests bind
/// port 0 and pass the listener in).
pub fn start(listener: TcpListener, core: Core) -> std::io::Result<Running> {
    let (events, rx) = unbounded();
    let epoch = core.epoch_handle();
    let ack_timeout = core.ack_timeout();
    let core = std::thread::Builder::new().name("core".into()).spawn(move || core.run(rx))?;
    let ctx = Ctx { core: events.clone(), epoch: epoch.clone(), ack_timeout, links: Arc::new(AtomicU64::new(0)) };
    std::thread::Builder::new().name("accept".into()).spawn(move || {
        let mut next: u64 = 0;
        for stream in listener.incoming() {
            match stream {
                Ok(stream) => {
                    next += 1;
                    let conn = next;
                    let ctx = ctx.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("conn-{conn}"))
                        .spawn(move || conn::serve(stream, conn, ctx));
                    if let Err(e) = spawned {
                        log::error!("cannot start a connection thread: {e}");
                    }
                }
                Err(e) => log::warn!("accept failed: {e}"),
            }
        }
    })?;
    Ok(Running { events, core, epoch })
}
