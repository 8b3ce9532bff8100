//! The host-loss lab: three network namespaces of the harness's own (`rbbench-s1`
//! to `-s3`), each with one veth whose other end is on a bridge of its own
//! (`rbbench-br`), on the private subnet 10.212.12.0/24. The servers live in the
//! namespaces at .1-.3; the devices stay in this namespace at .253 and .254, the
//! bridge's addresses. Cutting a host sets its veth down on the bridge side: its
//! packets go nowhere and nothing sends a FIN or a reset, as when a machine loses
//! power or its cable.
//!
//! Needs root (CAP_NET_ADMIN). Everything is removed when the lab is dropped, and
//! by the Ctrl-C handler if the run is interrupted.

use crate::cluster::Host;
use crate::procs::{forget_undo, register_undo, run};
use std::net::{IpAddr, Ipv4Addr};

/// The prefix of every name this lab creates.
pub const PREFIX: &str = "rbbench-";
const BRIDGE: &str = "rbbench-br";
const SUBNET: &str = "10.212.12.0/24";

fn ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 212, 12, n))
}

/// The namespaces and the bridge, while they exist.
pub struct Lab {
    servers: usize,
}

fn ns(i: usize) -> String {
    format!("{PREFIX}s{i}")
}

fn veth(i: usize) -> String {
    format!("{PREFIX}h{i}")
}

impl Lab {
    /// Why the lab cannot be set up here, if it cannot.
    pub fn unavailable() -> Option<String> {
        let uid = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().next()?.parse::<u32>().ok())
        });
        if uid != Some(0) {
            return Some("needs root for network namespaces (run as root, or skip case 2)".into());
        }
        if run(&["ip", "netns", "list"]).is_err() {
            return Some("`ip netns` does not work here (iproute2 missing?)".into());
        }
        None
    }

    /// Creates the bridge and `servers` namespaces. Refuses if any of its names
    /// or its subnet are in use (another run of the harness, or a network of
    /// this machine's).
    pub fn create(servers: usize) -> Result<Lab, String> {
        let out = std::process::Command::new("ip")
            .args(["-o", "addr", "show", "to", SUBNET])
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if !out.stdout.is_empty() {
            return Err(format!(
                "{SUBNET} is already in use here ({}); is another bench running? remove {BRIDGE} if it is left over",
                String::from_utf8_lossy(&out.stdout).trim()
            ));
        }
        let mut lab = Lab { servers: 0 };
        let add = |argv: &[&str], undo: &[&str]| -> Result<(), String> {
            run(argv)?;
            register_undo(undo);
            Ok(())
        };
        add(&["ip", "link", "add", BRIDGE, "type", "bridge"], &["ip", "link", "del", BRIDGE])?;
        run(&["ip", "addr", "add", &format!("{}/24", ip(254)), "dev", BRIDGE])?;
        run(&["ip", "addr", "add", &format!("{}/24", ip(253)), "dev", BRIDGE])?;
        run(&["ip", "link", "set", BRIDGE, "up"])?;
        for i in 1..=servers {
            let (ns, veth) = (ns(i), veth(i));
            add(&["ip", "netns", "add", &ns], &["ip", "netns", "del", &ns])?;
            lab.servers = i;
            add(
                &["ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns],
                &["ip", "link", "del", &veth],
            )?;
            run(&["ip", "link", "set", &veth, "master", BRIDGE, "up"])?;
            run(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", ip(i as u8)), "dev", "eth0"])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    /// The server hosts, in their namespaces.
    pub fn server_hosts(&self) -> Vec<Host> {
        (1..=self.servers).map(|i| Host { ip: ip(i as u8), netns: Some(ns(i)) }).collect()
    }

    /// Device `n` (1 or 2), in this namespace, on the bridge.
    pub fn device_host(&self, n: u8) -> Host {
        Host { ip: ip(255 - n), netns: None }
    }

    /// Cuts server `i` (0-based) off: no packet in or out, no FIN, no reset.
    pub fn cut(&self, i: usize) -> Result<(), String> {
        run(&["ip", "link", "set", &veth(i + 1), "down"])
    }

    /// Connects every server again.
    pub fn heal(&self) -> Result<(), String> {
        for i in 1..=self.servers {
            run(&["ip", "link", "set", &veth(i), "up"])?;
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 1..=self.servers {
            // The veth pair goes explicitly: the namespace itself lives on, without
            // a name, until the kernel frees the last socket of a killed server
            // (one cut off keeps retransmitting for a while), and the pair with it.
            let (ns, veth) = (ns(i), veth(i));
            let _ = run(&["ip", "link", "del", &veth]);
            forget_undo(&["ip", "link", "del", &veth]);
            let _ = run(&["ip", "netns", "del", &ns]);
            forget_undo(&["ip", "netns", "del", &ns]);
        }
        let _ = run(&["ip", "link", "del", BRIDGE]);
        forget_undo(&["ip", "link", "del", BRIDGE]);
    }
}
