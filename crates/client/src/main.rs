//! `replibox-client USER HOST PORT`: one device of a user.

use clap::Parser;
use crossbeam_channel::{select, unbounded};
use replibox_client::cli::{self, Cmd, Shell};
use replibox_client::engine::{Command, Engine};
use replibox_client::watcher;
use replibox_frontend::{Config, FrontError, Frontend};
use replibox_proto::{random_hex, validate_username, DeviceId};
use std::io::{BufRead, IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// A replibox device: keeps `sync_dir_USER` in sync with the server and the
/// user's other device, and reads commands from stdin.
///
/// Commands (one per line on stdin; each prints its outcome on stdout when done):
///   upload PATH     put a file from anywhere into the sync dir, the server and every device
///   download NAME   copy a file from the server into the current directory (not synced)
///   delete NAME     delete a file from the server and every device
///   list_server     the server's files: name, size, mtime, atime, ctime
///   list_client     this device's files, the same way
///   get_sync_dir    reconcile the sync dir with the server now (runs by itself at login)
///   exit            log out and quit (end of input does the same)
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
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
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
    let id = DeviceId(random_hex(8).map_err(|e| format!("cannot read /dev/urandom: {e}"))?);
    replibox_client::index::write_atomically(&file, id.0.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    Ok(id)
}

fn run(args: Args) -> Result<ExitCode, String> {
    validate_username(&args.user).map_err(|e| e.to_string())?;
    let root = args.sync_dir.clone().unwrap_or_else(|| PathBuf::from(format!("sync_dir_{}", args.user)));
    std::fs::create_dir_all(root.join(".replibox")).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    let root = std::fs::canonicalize(&root).map_err(|e| format!("cannot resolve {}: {e}", root.display()))?;
    let device = device_id(&root.join(".replibox"))?;
    // The callback listener: announced now; a new primary will call it after a
    // failover.
    let callback = TcpListener::bind((args.bind.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), 0))
        .map_err(|e| format!("cannot open the callback port: {e}"))?;
    let callback_port = callback.local_addr().map_err(|e| e.to_string())?.port();
    let cfg = Config {
        user: args.user.clone(),
        device: device.clone(),
        server: format!("{}:{}", args.host, args.port),
        bind: args.bind,
        callback_port,
        unavailable_after: Duration::from_secs(30),
    };
    let (front, front_events, login) = match Frontend::connect(cfg) {
        Ok(x) => x,
        Err(FrontError::Refused(reason)) => return Err(format!("login refused: {reason}")),
        Err(e) => return Err(e.to_string()),
    };
    eprintln!(
        "logged in as {} at {} (device {}, {} of 2 devices connected); syncing {}",
        args.user,
        login.server,
        &device.0[..8],
        login.devices,
        root.display()
    );
    let (watch_tx, watch_rx) = unbounded();
    let _watcher =
        watcher::watch(root.clone(), watch_tx).map_err(|e| format!("cannot watch {}: {e}", root.display()))?;
    let engine = Engine::new(root.clone(), front.clone(), device.0[..8].to_string())
        .map_err(|e| format!("cannot prepare {}: {e}", root.display()))?;
    let (cmd_tx, cmd_rx) = unbounded();
    let engine_thread = std::thread::Builder::new()
        .name("sync-engine".into())
        .spawn(move || engine.run(cmd_rx, front_events, watch_rx))
        .map_err(|e| e.to_string())?;
    let shell = Shell { front: front.clone(), engine: cmd_tx.clone(), root: root.clone() };

    let (sig_tx, sig_rx) = unbounded();
    ctrlc::set_handler(move || {
        let _ = sig_tx.send(());
    })
    .map_err(|e| format!("cannot install signal handler: {e}"))?;

    let mut failed = false;
    // get_sync_dir runs by itself at login.
    match shell.run(Cmd::GetSyncDir) {
        Ok(out) => println!("{out}"),
        Err(e) => {
            eprintln!("error: get_sync_dir: {e}");
            failed = true;
        }
    }
    if args.headless {
        let _ = sig_rx.recv();
    } else {
        let (line_tx, line_rx) = unbounded();
        let interactive = std::io::stdin().is_terminal();
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    match line {
                        Ok(l) => {
                            if line_tx.send(l).is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        loop {
            if interactive {
                print!("replibox> ");
                let _ = std::io::stdout().flush();
            }
            let line = select! {
                recv(line_rx) -> l => match l { Ok(l) => l, Err(_) => break },
                recv(sig_rx) -> _ => break,
            };
            let cmd = match cli::parse(&line) {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    eprintln!("error: {e}");
                    failed = true;
                    continue;
                }
            };
            let exit = cmd == Cmd::Exit;
            match shell.run(cmd) {
                Ok(out) => println!("{out}"),
                Err(e) => {
                    eprintln!("error: {e}");
                    failed = true;
                }
            }
            let _ = std::io::stdout().flush();
            if exit {
                break;
            }
        }
    }
    // Log out first: a request waiting for an unreachable server gives up at once
    // instead of holding the exit for the unavailability bound.
    front.logout();
    let _ = cmd_tx.send(Command::Stop);
    let _ = engine_thread.join();
    drop(callback);
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
