//! The listener: accepts connections and hands each to its own thread; starts
//! the core.
//!
//! Two limits keep a flood of connections from taking the server down: at most
//! `max_connections` are served at once (one more is told so in a `refused` frame
//! and closed, without a thread), and an accept that fails (out of file
//! descriptors, most often) is retried after a pause that doubles up to
//! [`ACCEPT_PAUSE_MAX`], instead of at once in a loop.

use crate::conn::{self, Ctx};
use crate::core::{Core, Event, Fatal, Start};
use crossbeam_channel::{unbounded, Sender};
use replibox_proto::{write_frame, Epoch, Msg};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The first pause after a failed accept; it doubles while accepts keep failing.
pub const ACCEPT_PAUSE_FIRST: Duration = Duration::from_millis(10);
/// The longest pause between two accepts that fail.
pub const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// File descriptors a connection may hold at once: its socket, the two clones
/// its reader and writers share, a file being received, and the files of the
/// downloads opened ahead ([`crate::conn::DOWNLOADS_AHEAD`]).
pub const FDS_PER_CONNECTION: u64 = 4 + crate::conn::DOWNLOADS_AHEAD as u64;
/// File descriptors kept for everything else: the listener, the log, the
/// snapshot, outgoing links, fetches and callbacks, a refused connection.
pub const FDS_RESERVED: u64 = 64;

/// Raises this process's soft limit on open files to its hard limit (a server
/// holds a few per connection), and returns the limit it runs with.
pub fn raise_fd_limit() -> u64 {
    replibox_proto::fdlimit::raise_open_files().unwrap_or_else(|e| {
        log::warn!("{e}; assuming 1024");
        1024
    })
}

/// The default `--max-connections` for an open-file limit: what fits in it
/// beside [`FDS_RESERVED`], at least 1.
pub fn default_max_connections(fd_limit: u64) -> usize {
    (fd_limit.saturating_sub(FDS_RESERVED) / FDS_PER_CONNECTION).clamp(1, 1_000_000) as usize
}

/// A running server: its core thread and its accept thread.
pub struct Running {
    /// Feeds the core.
    pub events: Sender<Event>,
    /// The core thread; it ends after [`Event::Shutdown`], or early with why.
    pub core: JoinHandle<Result<(), Fatal>>,
}

/// Counts a connection as open until dropped (at the end of its thread).
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Tells a connection over the limit why it is closed, without blocking the
/// accept loop: the frame is small enough for an empty socket buffer, and if it
/// does not fit the peer learns from the close alone.
fn refuse_busy(stream: TcpStream, max: usize) {
    let _ = stream.set_nonblocking(true);
    let reason = format!("the server is serving its limit of {max} connections; try again later");
    let _ = write_frame(&mut &stream, Epoch(0), &Msg::Refused { reason }, &[]);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Starts the core (as `start` says) and the accept loop on an already-bound
/// listener (tests bind port 0 and pass the listener in), serving at most
/// `max_connections` connections at once.
pub fn start(
    listener: TcpListener,
    core: Core,
    start: Start,
    heartbeat: Duration,
    max_connections: usize,
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
        cluster: core.cluster(),
        temps: core.temps(),
        route: core.upload_route(),
        devices: Arc::new(crate::early::Devices::default()),
    };
    let (tx, core_ctx) = (events.clone(), ctx.clone());
    let core = std::thread::Builder::new().name("core".into()).spawn(move || core.run(start, tx, rx, core_ctx))?;
    std::thread::Builder::new().name("accept".into()).spawn(move || accept_loop(listener, ctx, max_connections))?;
    Ok(Running { events, core })
}

fn accept_loop(listener: TcpListener, ctx: Ctx, max_connections: usize) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut pause = ACCEPT_PAUSE_FIRST;
    // Accepts failed in a row, and when that streak began: one log line per
    // streak (and one a minute while it lasts), not one per failure.
    let mut failed: u64 = 0;
    let mut failing_since = Instant::now();
    let mut said_at = Instant::now();
    let mut refused: u64 = 0;
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                if failed == 0 {
                    failing_since = Instant::now();
                    said_at = failing_since;
                    log::warn!("accept failed: {e}; pausing {pause:?} before the next accept, doubling to {ACCEPT_PAUSE_MAX:?}");
                } else if said_at.elapsed() >= Duration::from_secs(60) {
                    said_at = Instant::now();
                    log::warn!("accept still failing: {e} ({} failures in {:?})", failed + 1, failing_since.elapsed());
                }
                failed += 1;
                std::thread::sleep(pause);
                pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
                continue;
            }
        };
        if failed > 0 {
            log::info!("accepting again after {failed} failed accepts in {:?}", failing_since.elapsed());
            failed = 0;
        }
        if open.load(Ordering::Relaxed) >= max_connections {
            refused += 1;
            if refused == 1 || refused.is_multiple_of(100) {
                let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
                log::warn!(
                    "refused connection peer={peer}: serving the limit of {max_connections} connections \
                     (--max-connections); {refused} refused so far"
                );
            }
            refuse_busy(stream, max_connections);
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let guard = Open(open.clone());
        let conn = ctx.conns.fetch_add(1, Ordering::Relaxed) + 1;
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new().name(format!("conn-{conn}")).spawn(move || {
            let _guard = guard;
            conn::serve(stream, conn, ctx)
        });
        if let Err(e) = spawned {
            // The closure (and with it the guard and the socket) is dropped. Out
            // of threads, the next connections would fail alike: pause too.
            log::error!("cannot start a connection thread: {e}; pausing {pause:?}");
            std::thread::sleep(pause);
            pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
        } else {
            pause = ACCEPT_PAUSE_FIRST;
        }
    }
}
