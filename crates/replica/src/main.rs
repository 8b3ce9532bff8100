//! `replibox-server`: a replibox server, or a status query to one.

use clap::{ArgGroup, Parser};
use replibox_proto::{ClusterKey, KeyError, ServerId};
use replibox_replica::cluster::ClusterAuth;
use replibox_replica::core::{Core, Event, Fatal, Settings, Start};
use replibox_replica::node::Quorum;
use replibox_replica::store::{self, Store};
use replibox_replica::{probe, server, status};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
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
    /// The cluster key file (one line of 64 hex digits, mode 0600). -p without it
    /// uses DATA/cluster.key, and creates it the first time; a backup needs it
    /// until a primary has accepted it, and then keeps a copy in DATA/cluster.key.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// How often the primary sends a heartbeat to each backup, in milliseconds.
    #[arg(long, value_name = "N", default_value_t = 100)]
    heartbeat_ms: u64,
    /// How long the primary waits for a backup to acknowledge a change before it
    /// drops that backup from the membership, in milliseconds.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    ack_timeout_ms: u64,
    /// How long a backup hears nothing from the primary before it suspects it and
    /// starts an election, in milliseconds.
    #[arg(long, value_name = "N", default_value_t = 400)]
    failure_timeout_ms: u64,
    /// How long a candidate waits for the other servers' answers in an election
    /// (a primary whose host vanished is waited for this long), in milliseconds.
    #[arg(long, value_name = "N", default_value_t = 150)]
    election_timeout_ms: u64,
    /// When the primary acknowledges a change: `live` once every backup it counts
    /// on holds it (a primary cut off from all its backups goes on alone after
    /// fencing them, and may acknowledge what a new primary never sees);
    /// `majority` also only once a majority of the membership holds it (nothing
    /// acknowledged is lost under a partition; with a majority down, nothing is
    /// acknowledged). Give every server of a cluster the same value.
    #[arg(long, value_enum, default_value = "live")]
    quorum: QuorumArg,
    /// How many connections (clients, backups, status queries) are served at once;
    /// one more is told the server is busy and closed. The default fits the
    /// process's open-file limit (12 descriptors per connection, 64 kept aside).
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// With -p: start even though a server this data dir remembers did not
    /// answer, runs on without it, or holds a later history (this data dir
    /// becomes the truth; servers that join it drop what it lacks).
    #[arg(long, requires = "primary")]
    force: bool,
}

/// `--quorum`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum QuorumArg {
    /// Every live backup (the default).
    Live,
    /// Also a majority of the membership.
    Majority,
}

/// How the process ends: 0 after a clean stop, 1 when it could not start or was
/// refused by the cluster, 3 when an entry reached the log but its file action
/// failed (the next start redoes it), 70 when a thread panicked.
enum Exit {
    Start(String),
    Disk(String),
    Panic,
}

fn main() -> ExitCode {
    // Before any thread starts: see the module's account of the page faults saved.
    let kept = replibox_proto::malloc::keep_freed_memory();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    if !kept {
        log::debug!("the allocator's thresholds were left at their defaults");
    }
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Exit::Start(e)) => {
            eprintln!("replibox-server: {e}");
            ExitCode::FAILURE
        }
        Err(Exit::Disk(e)) => {
            eprintln!("replibox-server: stopped: {e}; the next start redoes the change");
            ExitCode::from(3)
        }
        Err(Exit::Panic) => {
            eprintln!("replibox-server: the core thread panicked (see above); stopping");
            ExitCode::from(70)
        }
    }
}

/// The port of a `HOST:PORT` given with `-b`, refusing what cannot work.
fn check_join_address(join: &str, listen: SocketAddr) -> Result<(), String> {
    let (host, port) = join
        .rsplit_once(':')
        .ok_or_else(|| format!("-b {join}: give the server as HOST:PORT (the port is missing)"))?;
    let port: u16 = port.parse().map_err(|_| format!("-b {join}: {port:?} is not a port"))?;
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> =
        (host, port).to_socket_addrs().map_err(|e| format!("-b {join}: cannot resolve {host}: {e}"))?.collect();
    let is_me = addrs.iter().any(|a| {
        a.port() == listen.port() && (a.ip() == listen.ip() || (listen.ip().is_unspecified() && a.ip().is_loopback()))
    });
    if is_me {
        return Err(format!("-b {join} is this server itself; give the address of another server of the cluster"));
    }
    Ok(())
}

/// The key file's name in the data dir.
const KEY_FILE: &str = "cluster.key";

/// The keys a start is given: `--key-file`'s and the data dir's, each if any.
struct Keys {
    given: Option<ClusterKey>,
    kept: Option<ClusterKey>,
}

/// Reads the cluster key files and refuses what cannot work, before the data dir
/// is touched: two different keys, or a backup with none.
fn read_keys(args: &Args) -> Result<Keys, String> {
    let key_path = args.data.join(KEY_FILE);
    let given = match &args.key_file {
        Some(p) => Some(ClusterKey::load(p).map_err(|e| format!("--key-file: {e}"))?),
        None => None,
    };
    let kept = match ClusterKey::load(&key_path) {
        Ok(k) => Some(k),
        Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.to_string()),
    };
    if let (Some(g), Some(k), Some(p)) = (&given, &kept, &args.key_file) {
        if g != k {
            return Err(format!(
                "the key does not match: --key-file {} holds key {}, but this data dir belongs to the cluster of \
                 key {} ({}); give that cluster's key, or another data dir",
                p.display(),
                g.fingerprint(),
                k.fingerprint(),
                key_path.display()
            ));
        }
    }
    if args.backup.is_some() && given.is_none() && kept.is_none() {
        return Err(format!(
            "a backup needs the cluster's key, and {} holds none: start it with --key-file PATH, PATH being a \
             copy of the primary's DATA/{KEY_FILE} (the primary logs the command when it creates the key)",
            args.data.display()
        ));
    }
    Ok(Keys { given, kept })
}

/// The key this server runs with, and whether its data dir holds it. A primary
/// keeps its key in its data dir (creating one the first time, and saying how to
/// start a backup with it); a backup keeps it once a primary has accepted it.
fn keep_key(args: &Args, keys: Keys, listen: SocketAddr) -> Result<(ClusterKey, bool), String> {
    let key_path = args.data.join(KEY_FILE);
    match (keys.kept, keys.given) {
        (Some(kept), _) => {
            log::info!("cluster key {} (fingerprint {})", key_path.display(), kept.fingerprint());
            Ok((kept, true))
        }
        (None, Some(given)) if args.primary => {
            given.save_new(&key_path).map_err(|e| e.to_string())?;
            log::info!("kept the cluster key in {} (fingerprint {})", key_path.display(), given.fingerprint());
            Ok((given, true))
        }
        (None, Some(given)) => Ok((given, false)),
        (None, None) => {
            let (key, created) = ClusterKey::load_or_create(&key_path).map_err(|e| e.to_string())?;
            if created {
                let shown = std::fs::canonicalize(&key_path).unwrap_or(key_path.clone());
                let at =
                    if listen.ip().is_unspecified() { format!("HOST:{}", listen.port()) } else { listen.to_string() };
                log::info!(
                    "created the cluster key {} (fingerprint {}); only servers holding it can join. Start each \
                     backup with: replibox-server -b {at} --key-file {} (plus its own --id, --bind, --port and \
                     --data); copy the file to another machine over a trusted channel, mode 0600",
                    shown.display(),
                    key.fingerprint(),
                    shown.display()
                );
            }
            Ok((key, true))
        }
    }
}

fn run(args: Args) -> Result<(), Exit> {
    if let Some(addr) = &args.status {
        let status = status::query(addr, Duration::from_secs(5)).map_err(Exit::Start)?;
        println!("{status}");
        return Ok(());
    }
    let fail = |e: String| Exit::Start(e);
    if let Some(id) = args.id {
        ServerId(id).validate().map_err(|e| fail(format!("--id: {e}")))?;
    }
    if args.heartbeat_ms == 0
        || args.ack_timeout_ms <= args.heartbeat_ms
        || args.failure_timeout_ms <= args.heartbeat_ms
    {
        return Err(fail("--heartbeat-ms must be positive and below --ack-timeout-ms and --failure-timeout-ms".into()));
    }
    if args.max_connections == Some(0) {
        return Err(fail("--max-connections must be at least 1".into()));
    }
    if args.election_timeout_ms == 0 || args.election_timeout_ms >= args.failure_timeout_ms {
        return Err(fail("--election-timeout-ms must be positive and below --failure-timeout-ms".into()));
    }
    let listen = SocketAddr::new(args.bind, args.port);
    if let Some(join) = &args.backup {
        check_join_address(join, listen).map_err(fail)?;
    }
    let data = &args.data;
    let keys = read_keys(&args).map_err(fail)?;
    let stored = store::load_id(data).map_err(|e| fail(e.to_string()))?;
    let id = match (args.id.map(ServerId), stored) {
        (Some(given), Some(kept)) if given != kept => {
            return Err(fail(format!(
                "data dir {} belongs to server id {kept}; start with --id {kept} or use another data dir",
                data.display()
            )))
        }
        (Some(given), _) => Some(given),
        (None, kept) => kept,
    };
    // Bind before touching the data dir: a port in use must not leave one behind.
    let listener = TcpListener::bind(listen).map_err(|e| fail(format!("cannot listen on {listen}: {e}")))?;
    let listen = listener.local_addr().map_err(|e| fail(e.to_string()))?;
    // Held until the process ends: a second server on this data dir is refused
    // before it reads or writes anything in it.
    let _lock = store::lock_data_dir(data).map_err(fail)?;
    let (store, state, recent) =
        Store::open(data).map_err(|e| fail(format!("cannot open data dir {}: {e}", data.display())))?;
    let start = if args.primary { Start::Primary } else { Start::Backup };
    let my_id = match start {
        Start::Primary => id.unwrap_or(ServerId(1)),
        // A backup without an id gets one from the primary when it joins.
        Start::Backup => id.unwrap_or_default(),
    };
    if start == Start::Primary {
        store.check_primary().map_err(|e| fail(format!("cannot start as primary: {e}")))?;
        let others: Vec<(ServerId, String)> =
            state.members.values().filter(|m| m.id != my_id).map(|m| (m.id, m.addr.clone())).collect();
        let me = listen.to_string();
        let heard = probe::ask_cluster(&others, my_id, &me);
        let heard_of = store::load_epoch_seen(data);
        let floor = match probe::judge((state.epoch, state.pos), heard_of, &heard, &me) {
            Ok(floor) => floor,
            Err(why) if args.force => {
                log::warn!("starting as primary although {why}");
                heard.iter().filter_map(|h| h.epoch()).max().unwrap_or_default()
            }
            Err(why) => return Err(fail(format!("not starting as primary: {why}"))),
        };
        if floor > heard_of {
            store::save_epoch_seen(data, floor).map_err(|e| fail(e.to_string()))?;
        }
    }
    // A backup records its id once the primary has accepted it (a refused one
    // must not leave an id behind in its data dir).
    if start == Start::Primary {
        store::save_id(data, my_id).map_err(|e| fail(e.to_string()))?;
    }
    let cluster = keep_key(&args, keys, listen).map_err(fail)?;
    let settings = Settings {
        id: my_id,
        listen,
        heartbeat: Duration::from_millis(args.heartbeat_ms),
        ack_timeout: Duration::from_millis(args.ack_timeout_ms),
        failure_timeout: Duration::from_millis(args.failure_timeout_ms),
        election_timeout: Duration::from_millis(args.election_timeout_ms),
        seed: args.backup.clone(),
        data: data.clone(),
        quorum: match args.quorum {
            QuorumArg::Live => Quorum::Live,
            QuorumArg::Majority => Quorum::Majority,
        },
        cluster: Arc::new(ClusterAuth {
            key: cluster.0,
            id: AtomicU64::new(my_id.0),
            bind: Some(listen.ip()).filter(|ip| !ip.is_unspecified()),
            key_path: data.join(KEY_FILE),
            kept: AtomicBool::new(cluster.1),
        }),
    };
    let core = Core::new(store, state, recent, settings);
    let fd_limit = server::raise_fd_limit();
    let max_connections = args.max_connections.unwrap_or_else(|| server::default_max_connections(fd_limit));
    log::info!("serving at most {max_connections} connections at once (open-file limit {fd_limit})");
    let running = server::start(listener, core, start, Duration::from_millis(args.heartbeat_ms), max_connections)
        .map_err(|e| fail(format!("cannot start threads: {e}")))?;
    match &args.backup {
        Some(join) => log::info!("serving as backup addr={listen} data={} joining={join}", data.display()),
        None => log::info!("serving as primary id={my_id} addr={listen} data={}", data.display()),
    }
    let events = running.events.clone();
    ctrlc::set_handler(move || {
        let _ = events.send(Event::Shutdown);
    })
    .map_err(|e| fail(format!("cannot install signal handler: {e}")))?;
    let ended = running.core.join();
    log::info!("stopped");
    match ended {
        Ok(Ok(())) => Ok(()),
        Ok(Err(Fatal::Refused(reason))) => {
            let via = args.backup.as_deref().unwrap_or("the cluster");
            Err(fail(format!("cannot join the cluster through {via}: {reason}")))
        }
        Ok(Err(Fatal::Disk(e))) => Err(Exit::Disk(e)),
        Err(_) => Err(Exit::Panic),
    }
}
