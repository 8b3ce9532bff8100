//! What `-p` checks before it starts a new epoch on a data dir that remembers
//! other servers: that the cluster does not run on without this server, and that
//! no server it can reach holds a later history than its own. Starting anyway
//! would make two primaries of one epoch with different histories, or make the
//! servers that join this one drop changes they had acknowledged.
//!
//! [`judge`] is the decision, pure; [`ask_cluster`] asks the servers (their
//! `--status`), following the memberships they report.

use crate::status::{self, Probe};
use replibox_proto::{Epoch, LogPos, ServerId};
use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

/// How long `-p` waits for each server to answer its status query.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(2000);

/// At most this many servers are asked (the memberships reported are followed).
const MAX_ASKED: usize = 32;

/// What one server said, as `-p` sees it.
#[derive(Debug, Clone)]
pub struct Heard {
    /// The server's id, when known.
    pub id: Option<ServerId>,
    /// Where it was asked.
    pub addr: String,
    /// Its answer.
    pub probe: Probe,
}

impl Heard {
    /// The highest epoch it said it heard of, if it answered.
    pub fn epoch(&self) -> Option<Epoch> {
        match &self.probe {
            Probe::Answered(status) => status["epoch"].as_u64().map(Epoch),
            _ => None,
        }
    }
}

/// The decision: Ok with the highest epoch heard of (the new epoch must be above
/// it), or why `-p` must not start. `ours` is this data dir's history: the epoch
/// of its last entry and its position; `heard_of` is the highest epoch it has
/// heard of (`meta/epoch`). Every epoch a server hears of was taken by a primary,
/// so a data dir that heard of a later epoch than its history's lacks that
/// primary's entries, wherever they are now.
pub fn judge(ours: (Epoch, LogPos), heard_of: Epoch, heard: &[Heard], listen: &str) -> Result<Epoch, String> {
    let mut floor = Epoch(0);
    for h in heard {
        let who = match h.id {
            Some(id) => format!("server id={id} at {}", h.addr),
            None => format!("the server at {}", h.addr),
        };
        let status = match &h.probe {
            Probe::Down => continue,
            Probe::Silent(why) => {
                return Err(format!(
                    "{who} did not answer ({why}): it may be running. If it is, start this server with \
                     -b {} to rejoin the cluster; if you know it is down, start it with -p --force",
                    h.addr
                ))
            }
            Probe::Answered(status) => status,
        };
        let epoch = Epoch(status["epoch"].as_u64().unwrap_or(0));
        floor = floor.max(epoch);
        let phase = status["phase"].as_str().unwrap_or("");
        let doing = match (status["role"].as_str(), phase) {
            (Some("primary"), _) => Some(format!("serves as primary of epoch {epoch}")),
            (_, "no primary") | (_, "joining") => None,
            (_, "") => Some(format!("is running (epoch {epoch})")),
            (_, phase) => Some(format!("is {phase} (epoch {epoch})")),
        };
        if let Some(doing) = doing {
            // A backup that has not noticed yet that this server went away still
            // names it as its primary: rejoin through that backup instead.
            let via = status["primary"].as_str().filter(|p| *p != listen).unwrap_or(&h.addr);
            return Err(format!(
                "{who} {doing}: the cluster runs without this server; start it with -b {via} to rejoin \
                 it (its files come from the cluster)"
            ));
        }
        let theirs = (Epoch(status["last_epoch"].as_u64().unwrap_or(0)), LogPos(status["seq"].as_u64().unwrap_or(0)));
        if theirs > ours {
            return Err(format!(
                "{who} holds a later history (epoch {} position {}) than this data dir (epoch {} position {}): \
                 starting here would make it drop changes it may have acknowledged. Start that server with -p \
                 instead, and this one with -b; or, to make this data dir the truth anyway, add --force",
                theirs.0, theirs.1, ours.0, ours.1
            ));
        }
    }
    if heard_of > ours.0 {
        return Err(format!(
            "this data dir has heard of epoch {heard_of}, but its history ends in epoch {}: another server holds a \
             later history. Start that one with -p (its --status shows last_epoch), and this one with -b; or, to \
             make this data dir the truth anyway, add --force",
            ours.0
        ));
    }
    Ok(floor)
}

/// Asks `first` (the servers this data dir remembers) and every server their
/// answers list as members, each once, skipping `me` and `listen`.
pub fn ask_cluster(first: &[(ServerId, String)], me: ServerId, listen: &str) -> Vec<Heard> {
    let mut queue: VecDeque<(Option<ServerId>, String)> =
        first.iter().map(|(id, addr)| (Some(*id), addr.clone())).collect();
    let mut seen: BTreeSet<String> = first.iter().map(|(_, a)| a.clone()).collect();
    let mut heard = Vec::new();
    while let Some((id, addr)) = queue.pop_front() {
        if heard.len() >= MAX_ASKED {
            break;
        }
        let probe = status::probe(&addr, PROBE_TIMEOUT);
        if let Probe::Answered(status) = &probe {
            for m in status["members"].as_array().into_iter().flatten() {
                let (Some(mid), Some(maddr)) = (m["id"].as_u64(), m["addr"].as_str()) else { continue };
                if mid == me.0 || maddr == listen || !seen.insert(maddr.to_string()) {
                    continue;
                }
                queue.push_back((Some(ServerId(mid)), maddr.to_string()));
            }
        }
        heard.push(Heard { id, addr, probe });
    }
    heard
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answered(id: u64, v: serde_json::Value) -> Heard {
        Heard { id: Some(ServerId(id)), addr: format!("10.0.0.{id}:4000"), probe: Probe::Answered(v) }
    }

    const ME: &str = "10.0.0.1:4000";

    #[test]
    fn down_servers_and_servers_waiting_with_no_later_history_let_it_start_above_their_epochs() {
        let heard = [
            Heard { id: Some(ServerId(2)), addr: "10.0.0.2:4000".into(), probe: Probe::Down },
            answered(3, json!({"role": "backup", "phase": "no primary", "epoch": 7, "last_epoch": 2, "seq": 40})),
            answered(4, json!({"role": "backup", "phase": "joining", "epoch": 0, "last_epoch": 0, "seq": 0})),
        ];
        assert_eq!(judge((Epoch(2), LogPos(40)), Epoch(2), &heard, ME), Ok(Epoch(7)));
    }

    #[test]
    fn a_running_cluster_a_silent_server_or_a_later_history_stop_it() {
        let ours = (Epoch(2), LogPos(40));
        let primary =
            answered(3, json!({"role": "primary", "phase": "serving", "epoch": 3, "primary": "10.0.0.3:4000"}));
        let e = judge(ours, Epoch(2), &[primary], ME).unwrap_err();
        assert!(e.contains("serves as primary of epoch 3") && e.contains("-b 10.0.0.3:4000"), "{e}");

        // A backup still following this server's old self: rejoin through it.
        let stale = answered(2, json!({"role": "backup", "phase": "following", "epoch": 2, "primary": ME}));
        let e = judge(ours, Epoch(2), &[stale], ME).unwrap_err();
        assert!(e.contains("-b 10.0.0.2:4000"), "{e}");

        let silent =
            Heard { id: Some(ServerId(2)), addr: "10.0.0.2:4000".into(), probe: Probe::Silent("timed out".into()) };
        let e = judge(ours, Epoch(2), &[silent], ME).unwrap_err();
        assert!(e.contains("did not answer") && e.contains("--force"), "{e}");

        for later in [json!({"epoch": 3, "last_epoch": 3, "seq": 12}), json!({"epoch": 2, "last_epoch": 2, "seq": 41})]
        {
            let mut v = later.clone();
            v["role"] = json!("backup");
            v["phase"] = json!("no primary");
            let e = judge(ours, Epoch(2), &[answered(2, v)], ME).unwrap_err();
            assert!(e.contains("later history"), "{later}: {e}");
        }
        let same = json!({"role": "backup", "phase": "no primary", "epoch": 2, "last_epoch": 2, "seq": 40});
        assert_eq!(judge(ours, Epoch(2), &[answered(2, same)], ME), Ok(Epoch(2)));
        // Nobody answers, but this data dir heard of epoch 3 and holds only 2.
        let e = judge(ours, Epoch(3), &[], ME).unwrap_err();
        assert!(e.contains("heard of epoch 3") && e.contains("--force"), "{e}");
    }
}
