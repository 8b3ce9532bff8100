//! `replibox-server`: a replibox server, or a status query to one.

use clap::{ArgGroup, Parser};
use replibox_replica::core::{Core, Event};
use replibox_replica::store::Store;
use replibox_replica::{server, status};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The replibox server.
///
/// Start one primary with `-p`; later backups join it with `-b HOST:PORT`.
/// Query any server with `--status HOST:PORT`.
#[derive(Parser, Debug)]
#[command(name = "replibox-server", version, about, long_about = None)]
#[command(group(ArgGroup::new("mode").required(true).args(["primary", "backup", "status"])))]
struct Args {
    /// Start as the primary of a new cluster.
    #[arg(short = 'p', long = "primary")]
    primary: bool,
    /// Start as a backup and join the cluster through the server at HOST:PORT.
    #[arg(short = 'b', long = "backup", value_name = "HOST:PORT")]
    backup: Option<String>,
    /// Print the status of the server at HOST:PORT as one JSON line, then exit.
    #[arg(long, value_name = "HOST:PORT")]
    status: Option<String>,
    /// TCP port to listen on, for clients and servers alike.
    #[arg(long, default_value_t = 4000)]
    port: u16,
    /// Local IP address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Data directory: users' files under DATA/users/, the server's own state beside it.
    #[arg(long, value_name = "DIR", default_value = "./replibox-data")]
    data: PathBuf,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replibox-server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    if let Some(addr) = &args.status {
        let status = status::query(addr, Duration::from_secs(5))?;
        println!("{status}");
        return Ok(());
    }
    if args.backup.is_some() {
        return Err("backups (-b) are not supported by this build yet".into());
    }
    let (store, state) =
        Store::open(&args.data).map_err(|e| format!("cannot open data dir {}: {e}", args.data.display()))?;
    let listen = SocketAddr::new(args.bind, args.port);
    let listener = TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let listen = listener.local_addr().map_err(|e| e.to_string())?;
    let mut core = Core::new(store, state, listen);
    core.start_as_primary().map_err(|e| format!("cannot check data dir {}: {e}", args.data.display()))?;
    let running = server::start(listener, core).map_err(|e| format!("cannot start threads: {e}"))?;
    let events = running.events.clone();
    ctrlc::set_handler(move || {
        let _ = events.send(Event::Shutdown);
    })
    .map_err(|e| format!("cannot install signal handler: {e}"))?;
    log::info!("serving as primary addr={listen} data={}", args.data.display());
    let _ = running.core.join();
    log::info!("stopped");
    Ok(())
}
