//! Clusters: a primary on 127.0.0.1, backups on 127.0.0.2 and up, and the
//! membership they report through `--status`.
//!
//! Timers: the servers' defaults (ack bound 2 s, failure timeout 1 s) are meant for
//! an idle machine. On a loaded 2-core machine a core blocked on fsync can miss
//! them, a backup is dropped, and every "at once" check after it fails for no fault
//! of the code. So [`primary`] and [`backup`] give the servers timers that fit a
//! loaded machine ([`PATIENT_ACK_MS`], [`PATIENT_FAILURE_MS`]) unless a test passes
//! its own: a test about dropping or detecting a silent server says which bounds it
//! exercises.

use super::files::check_tree;
use super::{fail, wait_for, wait_until, Server, ServerOpts, TestDir, Want, DEADLINE};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// `--ack-timeout-ms` of a primary whose test does not say otherwise.
pub const PATIENT_ACK_MS: &str = "10000";
/// `--failure-timeout-ms` of a backup whose test does not say otherwise.
pub const PATIENT_FAILURE_MS: &str = "5000";

/// 127.0.0.`last`.
pub fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// `extra` as owned arguments, with `flag value` added unless `extra` sets `flag`.
fn with_default(extra: &[&str], flag: &str, value: &str) -> Vec<String> {
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    if !extra.contains(&flag) {
        args.extend([flag.to_string(), value.to_string()]);
    }
    args
}

/// The options of a backup named `name` on 127.0.0.`last`, joining through `via`.
pub fn backup_opts(name: &str, last: u8, via: SocketAddr, id: Option<u64>, extra: &[&str]) -> ServerOpts {
    let mut mode = vec!["-b".to_string(), via.to_string()];
    if let Some(id) = id {
        mode.extend(["--id".to_string(), id.to_string()]);
    }
    let extra = with_default(extra, "--failure-timeout-ms", PATIENT_FAILURE_MS);
    ServerOpts { name: name.into(), ip: ip(last), port: None, data: None, mode, extra }
}

/// A backup named `name` on 127.0.0.`last`, joining through `via`.
pub fn backup(t: &TestDir, name: &str, last: u8, via: SocketAddr, id: Option<u64>, extra: &[&str]) -> Server {
    Server::start(t, backup_opts(name, last, via, id, extra))
}

/// The options of primary `s1` with id 1 on 127.0.0.1.
pub fn primary_opts(extra: &[&str]) -> ServerOpts {
    let mut opts = ServerOpts::primary("s1");
    opts.mode.extend(["--id".to_string(), "1".to_string()]);
    opts.extra = with_default(extra, "--ack-timeout-ms", PATIENT_ACK_MS);
    opts
}

/// A primary `s1` with id 1 on 127.0.0.1.
pub fn primary(t: &TestDir, extra: &[&str]) -> Server {
    Server::start(t, primary_opts(extra))
}

/// The reference set-up: primary s1 (with `primary_extra` options) and backups s2
/// and s3 on 127.0.0.1-3, once all three report the same membership.
pub fn three_servers(t: &TestDir, primary_extra: &[&str]) -> (Server, Server, Server) {
    let s1 = primary(t, primary_extra);
    let s2 = backup(t, "s2", 2, s1.addr, Some(2), &[]);
    let s3 = backup(t, "s3", 3, s1.addr, Some(3), &[]);
    wait_members(&[&s1, &s2, &s3], &[1, 2, 3]);
    (s1, s2, s3)
}

/// The member ids in a status.
pub fn member_ids(status: &serde_json::Value) -> Option<Vec<u64>> {
    let mut ids: Vec<u64> = status["members"].as_array()?.iter().filter_map(|m| m["id"].as_u64()).collect();
    ids.sort();
    Some(ids)
}

/// The member ids a server reports.
pub fn members(s: &Server) -> Option<Vec<u64>> {
    member_ids(&s.try_status()?)
}

/// Waits until every server reports exactly the members `want`, all at one seq.
#[track_caller]
pub fn wait_members(servers: &[&Server], want: &[u64]) {
    wait_until(DEADLINE, &format!("every server to report members {want:?} at one seq, each eligible"), || {
        let seqs: Option<Vec<u64>> = servers
            .iter()
            .map(|s| {
                let v = s.try_status()?;
                // A backup that applied its own join but has not yet heard that
                // every member stored it may not stand: a test that kills the
                // primary next would wait for an election that cannot come.
                let eligible = v["eligible"].as_bool() == Some(true);
                (member_ids(&v)? == want && eligible).then(|| v["seq"].as_u64()).flatten()
            })
            .collect();
        seqs.is_some_and(|s| s.windows(2).all(|w| w[0] == w[1]))
    });
}

/// The `dropping backup ...` lines of a primary's log.
pub fn drops(primary: &Server) -> Vec<String> {
    primary.log().lines().filter(|l| l.contains("dropping backup id=")).map(str::to_string).collect()
}

/// Asserts, without waiting, that every server's `users/alice` holds exactly `want`
/// (the first server is the primary). A failure says whether the primary dropped a
/// backup meanwhile: on a loaded machine that points at the test's timers.
#[track_caller]
pub fn assert_on_all(servers: &[&Server], want: &Want, when: &str) {
    for s in servers {
        if let Err(e) = check_tree(&s.user_dir("alice"), want) {
            let dropped = servers.first().map(|p| drops(p)).unwrap_or_default();
            fail(format!(
                "{when}: {} does not hold the acknowledged state: {e}\nbackups the primary dropped: {dropped:?}",
                s.opts.name
            ));
        }
    }
}

/// The epoch and role a server reports.
pub fn role(s: &Server) -> Option<(String, u64, Option<String>)> {
    let v = s.try_status()?;
    Some((v["role"].as_str()?.to_string(), v["epoch"].as_u64()?, v["primary"].as_str().map(str::to_string)))
}

/// Waits until exactly one of `servers` is primary, of `epoch`, and every other
/// one follows it; returns its index.
#[track_caller]
pub fn wait_new_primary(servers: &[&Server], epoch: u64) -> usize {
    wait_for(DEADLINE, &format!("exactly one primary of epoch {epoch}, followed by the others"), || {
        let roles: Vec<(String, u64, Option<String>)> = servers.iter().map(|s| role(s)).collect::<Option<_>>()?;
        let primaries: Vec<usize> = (0..roles.len()).filter(|i| roles[*i].0 == "primary").collect();
        let [p] = primaries[..] else { return None };
        let addr = servers[p].addr.to_string();
        let all_follow = roles.iter().all(|(_, e, primary)| *e == epoch && primary.as_deref() == Some(addr.as_str()));
        all_follow.then_some(p)
    })
}

/// Restarts a killed server as a backup joining through `via`, on its address
/// and data dir.
pub fn restart_as_backup(t: &TestDir, s: &Server, via: SocketAddr) -> Server {
    let opts = ServerOpts {
        name: format!("{}-again", s.opts.name),
        ip: s.opts.ip,
        port: s.opts.port,
        data: Some(s.data.clone()),
        mode: vec!["-b".into(), via.to_string()],
        extra: vec![],
    };
    Server::start(t, opts)
}
