//! `replibox-server`: a replibox server, or a status query to one.

use clap::{ArgGroup, Parser};
use replibox_proto::ServerId;
use replibox_replica::core::{Core, Event, Role, Settings};
use replibox_replica::follow::{self, FollowConfig};
use replibox_replica::store::{self, Store};
use replibox_replica::{server, status};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The replibox server.
///
/// Start one primary with `-p`; backups join it with `-b HOST:PORT` (the primary,
/// or any member, which points the joiner at the primary). Query any server with
/// `--status HOST:PORT`.
#[derive(Parser, Debug)]
#[command(name = "replibox-server", version)]
#[command(group(ArgGroup::new("mode").required(true).args(["primary", "backup", "status"])))]
struct Args {
    /// Start as the primary of a new cluster (a new epoch; backups join it).
    #[arg(short = 'p', long = "primary")]
    primary: bool,
    /// Start as a backup and join the cluster through the server at HOST:PORT.
    #[arg(short = 'b', long = "backup", value_name = "HOST:PORT")]
    backup: Option<String>,
    /// Print the status of the server at HOST:PORT as one JSON line, then exit.
    #[arg(long, value_name = "HOST:PORT")]
    status: Option<String>,
    /// This server's id, a unique positive integer (default: the one recorded in
    /// the data dir; else 1 for a primary, and the next free one for a backup).
    #[arg(long, value_name = "N")]
    id: Option<u64>,
    /// TCP port to listen on, for clients and servers alike.
    #[arg(long, default_value_t = 4000)]
    port: u16,
    /// Local IP address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Data directory: users' files under DATA/users/, the server's own state beside it.
    #[arg(long, value_name = "DIR", default_value = "./replibox-data")]
    data: PathBuf,
    /// How often the primary sends a heartbeat to each backup, in milliseconds.
    #[arg(long, value_name = "N", default_value_t = 100)]
    heartbeat_ms: u64,
    /// How long the primary waits for a backup to acknowledge a change before it
    /// drops that backup from the membership, in milliseconds.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    ack_timeout_ms: u64,
    /// How long a backup hears nothing from the primary before it considers the
    /// link lost, in milliseconds.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    failure_timeout_ms: u64,
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
    if args.id == Some(0) {
        return Err("--id must be a positive integer".into());
    }
    if args.heartbeat_ms == 0
        || args.ack_timeout_ms <= args.heartbeat_ms
        || args.failure_timeout_ms <= args.heartbeat_ms
    {
        return Err("--heartbeat-ms must be positive and below --ack-timeout-ms and --failure-timeout-ms".into());
    }
    let data = &args.data;
    let stored = store::load_id(data).map_err(|e| e.to_string())?;
    let id = match (args.id.map(ServerId), stored) {
        (Some(given), Some(kept)) if given != kept => {
            return Err(format!(
                "data dir {} belongs to server id {kept}; start with --id {kept} or use another data dir",
                data.display()
            ))
        }
        (Some(given), _) => Some(given),
        (None, kept) => kept,
    };
    let (store, state) = Store::open(data).map_err(|e| format!("cannot open data dir {}: {e}", data.display()))?;
    let listen = SocketAddr::new(args.bind, args.port);
    let listener = TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let listen = listener.local_addr().map_err(|e| e.to_string())?;
    let ack_timeout = Duration::from_millis(args.ack_timeout_ms);
    let role = if args.primary { Role::Primary } else { Role::Backup };
    let my_id = match role {
        Role::Primary => id.unwrap_or(ServerId(1)),
        // A backup without an id gets one from the primary when it joins.
        Role::Backup => id.unwrap_or_default(),
    };
    // A backup records its id once the primary has accepted it (a refused one
    // must not leave an id behind in its data dir).
    if role == Role::Primary {
        store::save_id(data, my_id).map_err(|e| e.to_string())?;
    }
    let settings = Settings { id: my_id, listen, heartbeat: Duration::from_millis(args.heartbeat_ms), ack_timeout };
    let mut core = Core::new(store, state, settings, role);
    if role == Role::Primary {
        core.start_as_primary().map_err(|e| format!("cannot start as primary on {}: {e}", data.display()))?;
    }
    let running = server::start(listener, core).map_err(|e| format!("cannot start threads: {e}"))?;
    if let Some(join) = &args.backup {
        let cfg = FollowConfig {
            join: join.clone(),
            ip: Some(args.bind).filter(|i| !i.is_unspecified()),
            port: listen.port(),
            id,
            failure_timeout: Duration::from_millis(args.failure_timeout_ms),
            data: data.clone(),
        };
        let (events, epoch) = (running.events.clone(), running.epoch.clone());
        std::thread::Builder::new()
            .name("follower".into())
            .spawn(move || follow::follow(cfg, events, epoch))
            .map_err(|e| format!("cannot start the follower: {e}"))?;
        log::info!("serving as backup addr={listen} data={} joining={join}", data.display());
    } else {
        log::info!("serving as primary id={my_id} addr={listen} data={}", data.display());
    }
    let events = running.events.clone();
    ctrlc::set_handler(move || {
        let _ = events.send(Event::Shutdown);
    })
    .map_err(|e| format!("cannot install signal handler: {e}"))?;
    let _ = running.core.join();
    log::info!("stopped");
    Ok(())
}
