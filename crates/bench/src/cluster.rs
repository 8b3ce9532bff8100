//! Three servers and the devices of a user, started the way a user would start them.
//!
//! Every command line the harness gives a server or a client is built here, and
//! everything a process needs to be let in comes from [`Credentials`]: when the
//! cluster gains a key and users passwords, that struct is the one place to change.

use crate::procs::Proc;
use crate::sys::{self, wait_for};
use replibox_frontend::{Config, Frontend, SharedPassword};
use replibox_proto::{DeviceId, OpResult};
use std::ffi::OsString;
use std::fs;
use std::io::{Cursor, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::time::Duration;

/// How long a start-up step may take before the case gives up.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// What servers and clients need to be let in: the cluster key and the users'
/// passwords (issue 8).
///
/// The primary makes `DATA/cluster.key` when started with `-p`; once it is up,
/// [`Credentials::after_primary`] copies it to `ROOT/cluster.key`, which every
/// backup is given with `--key-file` (as an operator copies it to the other
/// machines). Each user's password is made up from the user name: a client gets
/// it in `REPLIBOX_PASSWORD`, an in-process front-end in its configuration, and a
/// user's first login creates the account with it.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// Where the shared key file lives for this cluster.
    pub root: PathBuf,
}

impl Credentials {
    /// Credentials for a cluster whose files live under `root`.
    pub fn new(root: &Path) -> Credentials {
        Credentials { root: root.to_path_buf() }
    }

    fn key_file(&self) -> PathBuf {
        self.root.join("cluster.key")
    }

    fn password(user: &str) -> String {
        format!("{user}'s bench password")
    }

    /// Extra arguments for a server (`primary`: started with `-p`, which keeps or
    /// makes the key in its data dir and needs none).
    pub fn server_args(&self, _data: &Path, primary: bool) -> Vec<OsString> {
        if primary {
            Vec::new()
        } else {
            vec!["--key-file".into(), self.key_file().into_os_string()]
        }
    }

    /// Called once the primary is up, before any backup starts: copies the key
    /// that `-p` made for the backups.
    pub fn after_primary(&self, primary_data: &Path) -> Result<(), String> {
        let made = primary_data.join("cluster.key");
        fs::copy(&made, self.key_file()).map(|_| ()).map_err(|e| {
            format!("cannot copy the cluster key {} to {}: {e}", made.display(), self.key_file().display())
        })
    }

    /// Environment for a client of `user`.
    pub fn client_env(&self, user: &str) -> Vec<(String, String)> {
        vec![("REPLIBOX_PASSWORD".to_string(), Credentials::password(user))]
    }

    /// The in-process front-end's configuration for one device of `user`.
    pub fn frontend_config(&self, user: &str, device: &str, server: &str, bind: IpAddr) -> Config {
        Config {
            user: user.to_string(),
            device: DeviceId(device.to_string()),
            server: server.to_string(),
            bind: Some(bind),
            callback_port: 0,
            failover_wait: Duration::from_secs(30),
            password: SharedPassword::new(Credentials::password(user)),
            create_account: true,
        }
    }
}

/// Where a process runs: an address, and the network namespace it is in (None:
/// this one).
#[derive(Clone, Debug)]
pub struct Host {
    /// Its address.
    pub ip: IpAddr,
    /// Its namespace.
    pub netns: Option<String>,
}

impl Host {
    /// 127.0.0.`n`, in this namespace.
    pub fn loopback(n: u8) -> Host {
        Host { ip: IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)), netns: None }
    }

    /// A command for `program` on this host.
    fn command(&self, program: &Path) -> Command {
        match &self.netns {
            None => Command::new(program),
            Some(ns) => {
                // `ip netns exec` execs the program: the child's pid is the server's.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
        }
    }
}

/// A port free on every given loopback host (for namespaces any port is free).
pub fn free_port(hosts: &[Host]) -> Result<u16, String> {
    for _ in 0..200 {
        let Ok(l) = TcpListener::bind("127.0.0.1:0") else { continue };
        let Ok(port) = l.local_addr().map(|a| a.port()) else { continue };
        drop(l);
        if hosts.iter().filter(|h| h.netns.is_none()).all(|h| TcpListener::bind((h.ip, port)).is_ok()) {
            return Ok(port);
        }
    }
    Err("no port is free on every server address".into())
}

/// A server's status, or None when it does not answer.
pub fn status(addr: &str) -> Option<serde_json::Value> {
    replibox_replica::status::query(addr, Duration::from_millis(500)).ok()
}

/// A cluster of three servers: server 1 started with `-p`, 2 and 3 joining it.
pub struct Cluster {
    /// The servers, None once killed.
    pub servers: Vec<Option<Proc>>,
    /// `IP:PORT` of each.
    pub addrs: Vec<String>,
    /// Data dir of each.
    pub data: Vec<PathBuf>,
}

impl Cluster {
    /// Starts three servers on `hosts` at `port`, with data and logs under `root`,
    /// and waits until every one lists three members.
    pub fn start(root: &Path, hosts: &[Host], port: u16, creds: &Credentials) -> Result<Cluster, String> {
        let server = sys::bin("replibox-server")?;
        fs::create_dir_all(root.join("logs")).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        let addrs: Vec<String> = hosts.iter().map(|h| format!("{}:{port}", h.ip)).collect();
        let mut c = Cluster {
            servers: Vec::new(),
            addrs: addrs.clone(),
            data: (1..=hosts.len()).map(|i| root.join(format!("s{i}"))).collect(),
        };
        for (i, host) in hosts.iter().enumerate() {
            let primary = i == 0;
            let mut cmd = host.command(&server);
            if primary {
                cmd.args(["-p", "--id", "1"]);
            } else {
                cmd.args(["-b", &addrs[0], "--id", &(i + 1).to_string()]);
            }
            cmd.args(["--bind", &host.ip.to_string(), "--port", &port.to_string(), "--data"])
                .arg(&c.data[i])
                .args(creds.server_args(&c.data[i], primary));
            let log = fs::File::create(root.join(format!("logs/s{}.log", i + 1))).map_err(|e| e.to_string())?;
            cmd.env("RUST_LOG", std::env::var("BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            c.servers.push(Some(Proc::spawn(&format!("server {}", i + 1), cmd)?));
            if primary {
                wait_for("server 1 to answer", START_DEADLINE, Duration::from_millis(20), || status(&addrs[0]))?;
                creds.after_primary(&c.data[0])?;
            }
        }
        let n = hosts.len();
        wait_for(&format!("{n} members on every server"), START_DEADLINE, Duration::from_millis(20), || {
            addrs
                .iter()
                .all(|a| {
                    status(a).is_some_and(|s| {
                        s["members"].as_array().is_some_and(|m| m.len() == n)
                            && matches!(s["phase"].as_str(), Some("serving" | "following"))
                    })
                })
                .then_some(())
        })
        .map_err(|e| format!("{e}; see {}", root.join("logs").display()))?;
        Ok(c)
    }

    /// The primary's address.
    pub fn primary(&self) -> &str {
        &self.addrs[0]
    }

    /// Where server `i` (0-based) keeps `user`'s files.
    pub fn user_dir(&self, i: usize, user: &str) -> PathBuf {
        self.data[i].join("users").join(user)
    }

    /// The pid of server `i` (0-based) if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.servers[i].as_ref().map(Proc::pid)
    }

    /// Kills server `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        drop(self.servers[i].take());
    }
}

/// One device: a real `replibox-client`, headless, or reading commands from the
/// harness ([`Device::start_console`]).
pub struct Device {
    /// The process.
    pub proc: Option<Proc>,
    /// Its sync dir.
    pub dir: PathBuf,
    /// Where its stdout goes (what its commands print).
    pub out: PathBuf,
    /// Where its stderr goes (their errors).
    pub err: PathBuf,
    /// Its stdin, for a device that reads commands.
    stdin: Option<ChildStdin>,
}

impl Device {
    /// Starts a headless client of `user` on `host` (bound to its address) with the
    /// sync dir `root/NAME`, and waits until its login-time reconciliation is done.
    pub fn start(
        root: &Path,
        name: &str,
        user: &str,
        server: &str,
        host: &Host,
        creds: &Credentials,
    ) -> Result<Device, String> {
        Device::spawn(root, name, user, server, host, creds, None)
    }

    /// Starts a client as [`Device::start`] does, but one that reads commands
    /// ([`Device::command`]) as a user at its prompt would type them, and allows
    /// `deadline` for its login-time reconciliation (a fresh device of a user of
    /// many files receives them all before it).
    pub fn start_console(
        root: &Path,
        name: &str,
        user: &str,
        server: &str,
        host: &Host,
        creds: &Credentials,
        deadline: Duration,
    ) -> Result<Device, String> {
        Device::spawn(root, name, user, server, host, creds, Some(deadline))
    }

    /// `console`: None for a headless client, or the deadline of a client that
    /// reads commands.
    fn spawn(
        root: &Path,
        name: &str,
        user: &str,
        server: &str,
        host: &Host,
        creds: &Credentials,
        console: Option<Duration>,
    ) -> Result<Device, String> {
        let deadline = console.unwrap_or(START_DEADLINE);
        let client = sys::bin("replibox-client")?;
        let dir = root.join(name);
        let logs = root.join("logs");
        fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
        let (ip, port) = server.rsplit_once(':').ok_or("server address without a port")?;
        let out_path = logs.join(format!("{name}.out"));
        let out = fs::File::create(&out_path).map_err(|e| e.to_string())?;
        let err_path = logs.join(format!("{name}.err"));
        let err = fs::File::create(&err_path).map_err(|e| e.to_string())?;
        let mut cmd = host.command(&client);
        cmd.args([user, ip, port, "--device-name", name, "--bind", &host.ip.to_string()])
            .arg("--sync-dir")
            .arg(&dir)
            .envs(creds.client_env(user))
            .env("RUST_LOG", "warn")
            .stdin(if console.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(out)
            .stderr(err);
        if console.is_none() {
            cmd.arg("--headless");
        }
        let mut proc = Proc::spawn(name, cmd)?;
        let stdin = proc.take_stdin();
        // Polled every 20 ms for a quick start, less often for a long one (the
        // output grows with what the device receives).
        let every = if deadline > START_DEADLINE { Duration::from_millis(250) } else { Duration::from_millis(20) };
        wait_for(&format!("{name} to log in"), deadline, every, || {
            if proc.exited().is_some() {
                return Some(Err(format!("{name} exited at start-up; see {}", logs.display())));
            }
            fs::read_to_string(&out_path).ok().filter(|s| s.contains("in sync with the server")).map(|_| Ok(()))
        })??;
        Ok(Device { proc: Some(proc), dir, out: out_path, err: err_path, stdin })
    }

    /// Types `line` at a device started with [`Device::start_console`].
    pub fn command(&mut self, line: &str) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("this device reads no commands (it runs headless)")?;
        writeln!(stdin, "{line}").and_then(|_| stdin.flush()).map_err(|e| format!("cannot type {line:?}: {e}"))
    }

    /// The pid of the client.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Err if the client has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.proc.as_mut().map(|p| (p.name.clone(), p.exited())) {
            Some((name, Some(status))) => Err(format!("{name} exited ({status})")),
            _ => Ok(()),
        }
    }

    /// Logs out (SIGTERM) and waits for it to end.
    pub fn stop(mut self) {
        if let Some(p) = self.proc.take() {
            p.stop(Duration::from_secs(5));
        }
    }
}

/// One device driven in-process through the client's own front-end, so that each
/// change's acknowledgement can be timed.
pub struct FrontDevice {
    /// The front-end.
    pub front: Frontend,
}

impl FrontDevice {
    /// Logs in device `device` (16 hex digits) of `user` at `server`, from `bind`.
    pub fn connect(
        creds: &Credentials,
        user: &str,
        device: &str,
        server: &str,
        bind: IpAddr,
    ) -> Result<FrontDevice, String> {
        let cfg = creds.frontend_config(user, device, server, bind);
        // Events (notices, reconnections) are not needed: dropping the receiver
        // makes the front-end's sends to it no-ops.
        let (front, _events, _login) =
            Frontend::connect(cfg).map_err(|e| format!("device {device} of {user} cannot log in: {e}"))?;
        Ok(FrontDevice { front })
    }
}

/// Uploads `body` as `name` through `front`; Ok once the primary acknowledged it
/// (stored on every backup first).
pub fn upload_small(front: &Frontend, name: &str, body: &[u8]) -> Result<(), String> {
    let mut src = Cursor::new(body);
    match front.upload(name, &mut src, body.len() as u64, 0, None, false, &mut |_| {}) {
        Ok(OpResult::Done { .. }) => Ok(()),
        Ok(other) => Err(format!("{name} was answered {other:?}")),
        Err(e) => Err(format!("{name} failed: {e}")),
    }
}
