//! What the `status` command reports: whether this device is in sync, how many
//! changes wait and why, the server the session talks to, and its epoch.
//!
//! The sync engine can be blocked for a long while inside one request (the
//! server unreachable, a big upload), so `status` never asks it anything: the
//! engine publishes its counts into a shared [`Status`] as it works, and the
//! front-end's events are relayed through [`relay`], which records the state of
//! the connection before the engine even sees them.

use crate::console::Console;
use crate::timefmt;
use crossbeam_channel::{unbounded, Receiver};
use replibox_frontend::{FrontEvent, Frontend};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The state of the connection to the server, as far as the client knows.
///
/// New states (a failover in progress, waiting for a new primary's call) belong
/// here, with their line in [`Link::describe`] and their reason in
/// [`Snapshot::why_waiting`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Link {
    /// Logged in; requests are answered.
    Connected,
    /// The connection was lost at `since_ms` (Unix ms) for `why`; the front-end
    /// keeps trying to log in again.
    Unreachable {
        /// When the connection was lost.
        since_ms: i64,
        /// Why, as the front-end said.
        why: String,
    },
}

impl Link {
    /// A few words for the server line of `status`.
    fn describe(&self) -> String {
        match self {
            Link::Connected => "connected".into(),
            Link::Unreachable { since_ms, why } => {
                format!("unreachable since {} UTC: {why}", timefmt::datetime(*since_ms))
            }
        }
    }
}

/// The sync engine's counts of what waits locally.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Local {
    /// Local changes (uploads, deletes, renames) the engine has still to send.
    pub to_send: usize,
    /// Changed files left for later because they are still being written.
    pub settling: usize,
    /// Files the server refused, not sent again until they change.
    pub refused: usize,
    /// Conflicted copies made since the client started, newest last.
    pub conflicts: Vec<String>,
}

impl Local {
    /// How many changes wait in all.
    pub fn waiting(&self) -> usize {
        self.to_send + self.settling + self.refused
    }
}

/// Everything `status` shows, at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The connection.
    pub link: Link,
    /// The primary of the session (or the last one, while it is lost).
    pub server: String,
    /// This device's name (conflicted copies carry it).
    pub device_name: String,
    /// The first 8 hex digits of the device id.
    pub device_id: String,
    /// The sync dir.
    pub root: PathBuf,
    /// The engine's counts.
    pub local: Local,
}

impl Snapshot {
    /// Why the changes wait, in the order that matters to the user.
    fn why_waiting(&self) -> Vec<String> {
        let l = &self.local;
        let mut why = Vec::new();
        if l.to_send > 0 {
            why.push(match &self.link {
                Link::Connected => format!("{} being sent", l.to_send),
                Link::Unreachable { .. } => {
                    format!("{} to send once the server is back (it is unreachable)", l.to_send)
                }
            });
        }
        if l.settling > 0 {
            why.push(format!("{} still being written", l.settling));
        }
        if l.refused > 0 {
            why.push(format!("{} refused by the server (sent again once changed)", l.refused));
        }
        why
    }

    /// The `status` text: the summary first, then details; the last line always
    /// starts with `device ` (a script reading the output can stop there).
    pub fn render(&self, epoch: &Result<u64, String>, transfer: Option<String>) -> String {
        let waiting = self.local.waiting();
        let mut lines = vec![match (waiting, &self.link) {
            (0, Link::Connected) => "in sync".to_string(),
            (0, Link::Unreachable { .. }) => {
                "nothing to send; the server is unreachable, so changes from other devices wait".to_string()
            }
            (n, _) => format!("{n} change{} waiting: {}", plural(n), self.why_waiting().join(", ")),
        }];
        if let Some(t) = transfer {
            lines.push(format!("now {t}"));
        }
        let conflicts = &self.local.conflicts;
        if !conflicts.is_empty() {
            let shown: Vec<&str> = conflicts.iter().rev().take(3).map(String::as_str).collect();
            let more = conflicts.len() - shown.len();
            lines.push(format!(
                "{} conflict{} since start-up; this device's version kept as {}{}",
                conflicts.len(),
                plural(conflicts.len()),
                shown.join(", "),
                if more > 0 { format!(" and {more} more") } else { String::new() }
            ));
        }
        let epoch = match epoch {
            Ok(e) => format!("epoch {e}"),
            Err(why) => format!("epoch unknown ({why})"),
        };
        lines.push(format!("server {} ({}), {epoch}", self.server, self.link.describe()));
        lines.push(format!("device {} (id {}), sync dir {}", self.device_name, self.device_id, self.root.display()));
        lines.join("\n")
    }
}

/// `s` unless there is exactly one.
pub fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The shared status: cheap to clone, updated by the engine and the relay, read
/// by `status`.
#[derive(Clone)]
pub struct Status {
    inner: Arc<Mutex<Snapshot>>,
    /// Knows the session's primary and epoch.
    front: Option<Frontend>,
}

impl Status {
    /// The status of a session just logged in through `front`.
    pub fn new(front: Frontend, device_name: String, device_id: String, root: PathBuf) -> Status {
        Status {
            inner: Arc::new(Mutex::new(Snapshot {
                link: Link::Connected,
                server: front.server(),
                device_name,
                device_id,
                root,
                local: Local::default(),
            })),
            front: Some(front),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the state of the connection.
    pub fn set_link(&self, link: Link) {
        self.lock().link = link;
    }

    /// Records the primary the session goes on with.
    pub fn set_server(&self, server: String) {
        self.lock().server = server;
    }

    /// Updates the engine's counts.
    pub fn update_local(&self, change: impl FnOnce(&mut Local)) {
        change(&mut self.lock().local);
    }

    /// A copy of everything, now.
    pub fn snapshot(&self) -> Snapshot {
        self.lock().clone()
    }

    /// The `status` command's text: the primary and epoch come from the front-end,
    /// which tracks them (a new primary calling back changes both).
    pub fn report(&self, console: &Console) -> String {
        let mut snap = self.snapshot();
        let epoch = match &self.front {
            Some(f) => {
                snap.server = f.server();
                Ok(f.epoch())
            }
            None => Err("unknown".to_string()),
        };
        snap.render(&epoch, console.current_transfer())
    }
}

/// Passes the front-end's events on to the engine, recording the connection's
/// state in `status` and telling the user first: both then know the server is
/// unreachable at once, even while the engine is still blocked (for up to the
/// unavailability bound) in the request that found out.
pub fn relay(events: Receiver<FrontEvent>, status: Status, console: Console) -> std::io::Result<Receiver<FrontEvent>> {
    let (tx, rx) = unbounded();
    std::thread::Builder::new().name("front-events".into()).spawn(move || {
        for ev in events {
            match &ev {
                FrontEvent::Lost(why) => {
                    status.set_link(Link::Unreachable { since_ms: timefmt::now_ms(), why: why.clone() });
                    console.activity(format!(
                        "connection to the server lost ({why}); waiting for it, or for a new primary to call \
                         back (failover); local changes wait"
                    ));
                }
                FrontEvent::Reconnected { server, epoch, after, callback } => {
                    status.set_link(Link::Connected);
                    status.set_server(server.clone());
                    let ms = after.as_millis();
                    if *callback {
                        console.activity(format!(
                            "connection to the server is back: resumed with the new primary {server} (epoch {epoch}) \
                             after {ms} ms; catching up"
                        ));
                    } else {
                        console.activity(format!(
                            "connection to the server is back: {server} (epoch {epoch}) after {ms} ms; catching up"
                        ));
                    }
                }
                FrontEvent::NoPrimary { waited } => {
                    console.activity(format!(
                        "no primary for {} s: commands fail until one is back; local changes are kept and will be sent then",
                        waited.as_secs()
                    ));
                }
                FrontEvent::Notice(_) => {}
            }
            if tx.send(ev).is_err() {
                return;
            }
        }
    })?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(link: Link, local: Local) -> Snapshot {
        Snapshot {
            link,
            server: "127.0.0.1:4000".into(),
            device_name: "laptop".into(),
            device_id: "517c3f6c".into(),
            root: "/home/alice/laptop".into(),
            local,
        }
    }

    #[test]
    fn in_sync() {
        let text = snap(Link::Connected, Local::default()).render(&Ok(3), None);
        assert_eq!(
            text,
            "in sync\nserver 127.0.0.1:4000 (connected), epoch 3\ndevice laptop (id 517c3f6c), sync dir /home/alice/laptop"
        );
    }

    #[test]
    fn waiting_says_how_many_and_why() {
        let down = Link::Unreachable { since_ms: 0, why: "connection refused".into() };
        let local =
            Local { to_send: 2, settling: 1, refused: 1, conflicts: vec!["a (conflicted copy laptop x).txt".into()] };
        let text =
            snap(down, local).render(&Err("the server is unreachable".into()), Some("uploading a: 1 / 2".into()));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "4 changes waiting: 2 to send once the server is back (it is unreachable), 1 still being written, \
             1 refused by the server (sent again once changed)"
        );
        assert_eq!(lines[1], "now uploading a: 1 / 2");
        assert!(lines[2].starts_with("1 conflict since start-up; this device's version kept as a (conflicted"));
        assert_eq!(
            lines[3],
            "server 127.0.0.1:4000 (unreachable since 1970-01-01 00:00:00 UTC: connection refused), \
             epoch unknown (the server is unreachable)"
        );
        assert!(lines[4].starts_with("device laptop"));
        let one = Local { to_send: 1, ..Local::default() };
        assert!(snap(Link::Connected, one).render(&Ok(1), None).starts_with("1 change waiting: 1 being sent\n"));
    }
}
