//! The listener: accepts connections and hands each to its own thread; starts
//! the core.

use crate::conn::{self, Ctx};
use crate::core::{Core, Event, Fatal, Start};
use crossbeam_channel::{unbounded, Sender};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A running server: its core thread and its accept thread.
pub struct Running {
    /// Feeds the core.
    pub events: Sender<Event>,
    /// The core thread; it ends after [`Event::Shutdown`], or early with why.
    pub core: JoinHandle<Result<(), Fatal>>,
}

/// Starts the core (as `start` says) and the accept loop on an already-bound
/// listener (tests bind port 0 and pass the listener in).
pub fn start(
    listener: TcpListener,
    core: Core,
    start: Start,
    heartbeat: std::time::Duration,
) -> std::io::Result<Running> {
    let (events, rx) = unbounded();
    let local = listener.local_addr()?;
    let ctx = Ctx {
        core: events.clone(),
        epoch: core.epoch_handle(),
        ack_timeout: core.ack_timeout(),
        heartbeat,
        links: Arc::new(AtomicU64::new(0)),
        conns: Arc::new(AtomicU64::new(0)),
        bound_to_any: local.ip().is_unspecified(),
        port: local.port(),
    };
    let (tx, core_ctx) = (events.clone(), ctx.clone());
    let core = std::thread::Builder::new().name("core".into()).spawn(move || core.run(start, tx, rx, core_ctx))?;
    std::thread::Builder::new().name("accept".into()).spawn(move || {
        for stream in listener.incoming() {
            match stream {
                Ok(stream) => {
                    let conn = ctx.conns.fetch_add(1, Ordering::Relaxed) + 1;
                    let ctx = ctx.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("conn-{conn}"))
                        .spawn(move || conn::serve(stream, conn, ctx));
                    if let Err(e) = spawned {
                        log::error!("cannot start a connection thread: {e}");
                    }
                }
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    // Out of file descriptors, say: do not spin.
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
    })?;
    Ok(Running { events, core })
}
