//! `replibox-client USER HOST PORT`: one device of a user.

use clap::Parser;
use crossbeam_channel::unbounded;
use replibox_client::cli::Shell;
use replibox_client::engine::{Command, Engine, Setup};
use replibox_client::session::{self, Ended};
use replibox_client::status::{self, Status};
use replibox_client::syncdir::{self, SyncDirLock, META};
use replibox_client::{password, watcher};
use replibox_frontend::{Config, FrontError, Frontend, SharedPassword};
use replibox_proto::{validate_username, DeviceId};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// A replibox device: keeps `sync_dir_USER` in sync with the server and the
/// user's other device, and reads commands from stdin.
///
/// Commands (one per line on stdin; each prints its outcome on stdout when done):
///   upload PATH     put a file from anywhere into the sync dir, the server and every device
///   download NAME   copy a file from the server into the current directory (not synced;
///                   never over an existing file: the copy gets a free name, NAME (1).EXT)
///   delete NAME     delete a file from the server and every device
///   list_server     the server's files: name, size, mtime, atime, ctime (empty folders: NAME/)
///   list_client     this device's files, the same way
///   get_sync_dir    reconcile the sync dir with the server now (runs by itself at login)
///   status          in sync or not, what waits and why, the server and its epoch
///   passwd [FILE]   change the password (asked twice on a terminal, or read from FILE)
///   help            the list of commands
///   exit, quit      log out and quit (end of input, and Ctrl-C at the prompt, do the same)
/// A name with spaces may be typed as it is or quoted as in a shell ("my notes.txt").
///
/// Files matching the rules in SYNC_DIR/.replibox-ignore (gitignore syntax) or the
/// built-in ones (*.swp, *~, .#*, .DS_Store, Thumbs.db, desktop.ini; undo one with
/// !PATTERN) are neither sent, received nor deleted.
///
/// The password comes from --password-file, else the REPLIBOX_PASSWORD environment
/// variable, else a prompt on the terminal. The first login of a user creates the
/// account with it; it never crosses the network.
#[derive(Parser, Debug)]
#[command(name = "replibox-client", version, verbatim_doc_comment)]
struct Args {
    /// The user to log in as ([A-Za-z0-9_.-], 1 to 64 characters, not starting with a dot).
    user: String,
    /// Host name or IP address of a server of the cluster.
    host: String,
    /// Its port.
    port: u16,
    /// The directory to keep in sync [default: ./sync_dir_USER].
    #[arg(long, value_name = "DIR")]
    sync_dir: Option<PathBuf>,
    /// Local IP address to connect from and to listen on for the server's callback.
    #[arg(long, value_name = "IP")]
    bind: Option<IpAddr>,
    /// Ignore stdin and sync until SIGINT or SIGTERM, then log out cleanly.
    #[arg(long)]
    headless: bool,
    /// This device's name, shown in conflicted copies ("report (conflicted copy
    /// NAME 2026-12-01).txt") and by `status` [default: the host name].
    #[arg(long, value_name = "NAME", value_parser = device_name)]
    device_name: Option<String>,
    /// The port to listen on (at --bind) for a new primary's call after a
    /// failover; 0 takes any free port. The port is announced at login.
    #[arg(long, value_name = "N", default_value_t = 0)]
    callback_port: u16,
    /// How long to wait for a primary (the lost one back, or a new one calling)
    /// before commands fail; local changes are kept and sent once one is back.
    #[arg(long, value_name = "N", default_value_t = 30)]
    failover_wait_s: u64,
    /// A file whose first line is the user's password [default: the
    /// REPLIBOX_PASSWORD environment variable, else a prompt on the terminal].
    #[arg(long, value_name = "PATH")]
    password_file: Option<PathBuf>,
}

/// The file in `.replibox/` that says this device has logged in (its user).
const ACCOUNT_MARK: &str = "account";

/// clap's check of `--device-name`.
fn device_name(s: &str) -> Result<String, String> {
    syncdir::validate_device_name(s).map(|()| s.to_string())
}

fn main() -> ExitCode {
    // Before any thread starts: see the module's account of the page faults saved.
    let kept = replibox_proto::malloc::keep_freed_memory();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    if !kept {
        log::debug!("the allocator's thresholds were left at their defaults");
    }
    let args = Args::parse();
    // A batch of uploads keeps its files open (engine::upload_batch_files).
    if let Err(e) = replibox_proto::fdlimit::raise_open_files() {
        log::warn!("{e}");
    }
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("replibox-client: {e}");
            ExitCode::from(2)
        }
    }
}

/// The device id kept in the sync dir, created at first use.
fn device_id(meta: &Path) -> Result<DeviceId, String> {
    let file = meta.join("device");
    if let Ok(s) = std::fs::read_to_string(&file) {
        let id = DeviceId(s.trim().to_string());
        if id.validate().is_ok() {
            return Ok(id);
        }
        log::warn!("device id in {} is invalid; making a new one", file.display());
    }
    let id = DeviceId(syncdir::random_hex(8)?);
    replibox_client::index::write_atomically(&file, id.0.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    Ok(id)
}

fn run(args: Args) -> Result<ExitCode, String> {
    validate_username(&args.user).map_err(|e| e.to_string())?;
    let root = args.sync_dir.clone().unwrap_or_else(|| PathBuf::from(format!("sync_dir_{}", args.user)));
    std::fs::create_dir_all(root.join(META)).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    let root = std::fs::canonicalize(&root).map_err(|e| format!("cannot resolve {}: {e}", root.display()))?;
    // Before anything else is written, or the server hears of this device: a
    // second client on this sync dir must leave the first one alone.
    let lock = SyncDirLock::acquire(&root.join(META))?;
    let marker = lock.marker().map_err(|e| format!("cannot read the lock of {}: {e}", root.display()))?;
    let device = device_id(&root.join(META))?;
    let device_name = match args.device_name.clone().or_else(syncdir::host_name) {
        Some(name) => name,
        None => device.0[..8].to_string(),
    };
    let password = password::for_login(args.password_file.as_deref(), &args.user)?;
    // A device that has logged in before knows the account exists: a server
    // that has none is not to be given a new one (see ACCOUNT_MARK).
    let mark = root.join(META).join(ACCOUNT_MARK);
    let known = mark.exists();
    // The front-end listens for a new primary's call on --bind, port
    // --callback-port, and announces the port at login.
    let cfg = Config {
        user: args.user.clone(),
        device: device.clone(),
        server: format!("{}:{}", args.host, args.port),
        bind: args.bind,
        callback_port: args.callback_port,
        failover_wait: Duration::from_secs(args.failover_wait_s),
        password: SharedPassword::new(password),
        create_account: !known,
    };
    let (front, front_events, login) = match Frontend::connect(cfg) {
        Ok(x) => x,
        Err(FrontError::WrongPassword) => return Err("login refused: wrong password".into()),
        Err(FrontError::NoAccount(reason)) if known => {
            return Err(format!(
                "login refused: {reason}; this device has logged in as {} before ({}), so the server should know \
                 the account: it lost its data, or it is not the real server. If the cluster was started afresh, \
                 delete that file to create the account again",
                args.user,
                mark.display()
            ))
        }
        Err(FrontError::Refused(reason) | FrontError::NoAccount(reason)) => {
            return Err(format!("login refused: {reason}"))
        }
        Err(e) => return Err(e.to_string()),
    };
    if !known {
        let text = format!("{}\n", args.user);
        if let Err(e) = replibox_client::index::write_atomically(&mark, text.as_bytes()) {
            log::warn!("cannot write {}: {e}", mark.display());
        }
    }
    if login.created {
        eprintln!("created the account {} with the password given; log in with it from now on", args.user);
    }
    eprintln!(
        "logged in as {} at {} (device {device_name}, id {}, {} of 2 devices connected); syncing {}",
        args.user,
        login.server,
        &device.0[..8],
        login.devices,
        root.display()
    );
    let status = Status::new(front.clone(), device_name.clone(), device.0[..8].to_string(), root.clone());
    // The reader comes before the engine: on a terminal, the console it gives
    // prints background lines above the prompt.
    let (reader, console) = if args.headless {
        (None, replibox_client::console::Console::plain())
    } else {
        let (reader, console) = session::start_reader()?;
        (Some(reader), console)
    };
    let front_events = status::relay(front_events, status.clone(), console.clone()).map_err(|e| e.to_string())?;
    let (hints, watch_rx) = watcher::hints();
    let _watcher = watcher::watch(root.clone(), hints).map_err(|e| format!("cannot watch {}: {e}", root.display()))?;
    let (stopped_tx, stopped_rx) = unbounded();
    let setup = Setup {
        front: front.clone(),
        device_name,
        console: console.clone(),
        status: status.clone(),
        marker,
        stopped: stopped_tx,
    };
    let engine = Engine::new(root.clone(), setup).map_err(|e| format!("cannot prepare {}: {e}", root.display()))?;
    let (cmd_tx, cmd_rx) = unbounded();
    let engine_thread = std::thread::Builder::new()
        .name("sync-engine".into())
        .spawn(move || engine.run(cmd_rx, front_events, watch_rx))
        .map_err(|e| e.to_string())?;
    let shell = Shell { front: front.clone(), engine: cmd_tx.clone(), root, console: console.clone(), status };

    let (sig_tx, sig_rx) = unbounded();
    ctrlc::set_handler(move || {
        let _ = sig_tx.send(());
    })
    .map_err(|e| format!("cannot install signal handler: {e}"))?;

    let outcome = session::run(shell, &console, reader.as_ref(), &sig_rx, &stopped_rx)?;
    // Log out first: a request waiting for an unreachable server gives up at once
    // instead of holding the exit for the unavailability bound.
    front.logout();
    outcome.worker.finish(&sig_rx);
    let _ = cmd_tx.send(Command::Stop);
    let _ = engine_thread.join();
    drop(reader);
    drop(lock);
    console.leave_prompt();
    let failed = match outcome.ended {
        Ended::Stopped(why) => {
            console.error(&why);
            true
        }
        Ended::Exit | Ended::Signal => {
            console.outcome("bye");
            outcome.failed
        }
    };
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
