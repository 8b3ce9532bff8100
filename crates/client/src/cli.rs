//! The commands a user types (or a script feeds on stdin), and their output.
//!
//! Every command prints its outcome on stdout once it has finished, so a script can
//! wait for that line; errors go to stderr.

use crate::engine::Command;
use crate::progress::{self, bytes};
use crate::scan;
use crate::timefmt::datetime;
use crossbeam_channel::{bounded, Sender};
use replibox_frontend::Frontend;
use replibox_proto::times::FileTimes;
use replibox_proto::{FileMeta, OpResult};
use std::fs;
use std::path::{Path, PathBuf};

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    /// `upload PATH`
    Upload(PathBuf),
    /// `download NAME`
    Download(String),
    /// `delete NAME`
    Delete(String),
    /// `list_server`
    ListServer,
    /// `list_client`
    ListClient,
    /// `get_sync_dir`
    GetSyncDir,
    /// `exit`
    Exit,
    /// `help`
    Help,
}

/// The help text.
pub const HELP: &str = "commands:
  upload PATH     put a file from anywhere into the sync dir, on the server and on every device
  download NAME   copy a file from the server into the current directory (that copy is not synced)
  delete NAME     delete a file from the server and from every device
  list_server     list the files on the server (name, size, mtime, atime, ctime)
  list_client     list the files in this device's sync dir
  get_sync_dir    bring the sync dir and the server into agreement now
  exit            log out and quit";

fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return s[1..s.len() - 1].to_string();
        }
    }
    s.to_string()
}

/// Parses one input line; `Ok(None)` for a blank line.
pub fn parse(line: &str) -> Result<Option<Cmd>, String> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(None);
    }
    let (word, rest) = match line.split_once(char::is_whitespace) {
        Some((w, r)) => (w, unquote(r)),
        None => (line, String::new()),
    };
    let need = |what: &str| -> Result<String, String> {
        if rest.is_empty() {
            Err(format!("usage: {word} {what}"))
        } else {
            Ok(rest.clone())
        }
    };
    let none = |cmd: Cmd| -> Result<Option<Cmd>, String> {
        if rest.is_empty() {
            Ok(Some(cmd))
        } else {
            Err(format!("{word} takes no argument"))
        }
    };
    match word {
        "upload" => Ok(Some(Cmd::Upload(PathBuf::from(need("PATH")?)))),
        "download" => Ok(Some(Cmd::Download(need("NAME")?))),
        "delete" => Ok(Some(Cmd::Delete(need("NAME")?))),
        "list_server" => none(Cmd::ListServer),
        "list_client" => none(Cmd::ListClient),
        "get_sync_dir" => none(Cmd::GetSyncDir),
        "exit" | "quit" => none(Cmd::Exit),
        "help" | "?" => none(Cmd::Help),
        other => Err(format!("unknown command {other:?}; type help for the list")),
    }
}

/// Runs commands against one session.
pub struct Shell {
    /// The front-end, for commands that do not touch the sync dir.
    pub front: Frontend,
    /// The engine, for commands that do.
    pub engine: Sender<Command>,
    /// The sync dir.
    pub root: PathBuf,
}

fn table(rows: Vec<(String, u64, i64, i64, i64)>) -> String {
    let width = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(4).max(4);
    let mut out = format!(
        "{:<width$}  {:>12}  {:<19}  {:<19}  {:<19}\n",
        "NAME", "SIZE", "MTIME (UTC)", "ATIME (UTC)", "CTIME (UTC)"
    );
    let n = rows.len();
    for (name, size, m, a, c) in rows {
        let pad = width - name.chars().count();
        out.push_str(&format!(
            "{name}{}  {size:>12}  {}  {}  {}\n",
            " ".repeat(pad),
            datetime(m),
            datetime(a),
            datetime(c)
        ));
    }
    out.push_str(&format!("{n} file{}", if n == 1 { "" } else { "s" }));
    out
}

impl Shell {
    fn ask(&self, make: impl FnOnce(Sender<Result<String, String>>) -> Command) -> Result<String, String> {
        let (tx, rx) = bounded(1);
        self.engine.send(make(tx)).map_err(|_| "the sync engine has stopped".to_string())?;
        rx.recv().map_err(|_| "the sync engine has stopped".to_string())?
    }

    /// Runs one command; Ok is the outcome for stdout, Err the message for stderr.
    pub fn run(&self, cmd: Cmd) -> Result<String, String> {
        match cmd {
            Cmd::Upload(source) => self.ask(|reply| Command::Upload { source, reply }),
            Cmd::Delete(name) => self.ask(|reply| Command::Delete { name, reply }),
            Cmd::GetSyncDir => self.ask(|reply| Command::SyncAll { reply }),
            Cmd::Download(name) => self.download(&name),
            Cmd::ListServer => Ok(table(
                self.front
                    .list_all()
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .filter(|m: &FileMeta| !m.deleted)
                    .map(|m| (m.path, m.size, m.mtime_ms, m.atime_ms, m.ctime_ms))
                    .collect(),
            )),
            Cmd::ListClient => {
                let rows = scan::scan(&self.root)
                    .into_keys()
                    .filter_map(|p| {
                        let md = fs::symlink_metadata(self.root.join(&p)).ok()?;
                        let t = FileTimes::of(&md);
                        Some((p, md.len(), t.mtime_ms, t.atime_ms, t.ctime_ms))
                    })
                    .collect();
                Ok(table(rows))
            }
            Cmd::Help => Ok(HELP.to_string()),
            Cmd::Exit => Ok("bye".into()),
        }
    }

    fn download(&self, name: &str) -> Result<String, String> {
        replibox_proto::validate_path(name).map_err(|e| e.to_string())?;
        let file_name = Path::new(name).file_name().and_then(|n| n.to_str()).unwrap_or(name).to_string();
        let dest =
            std::env::current_dir().map_err(|e| format!("cannot find the current directory: {e}"))?.join(&file_name);
        let tmp = dest.with_file_name(format!(".{file_name}.replibox-download"));
        match progress::download_to(&self.front, name, &tmp) {
            Ok(Ok(meta)) => match fs::rename(&tmp, &dest) {
                Ok(()) => Ok(format!("downloaded {name} to {} ({})", dest.display(), bytes(meta.size))),
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    Err(format!("cannot write {}: {e}", dest.display()))
                }
            },
            Ok(Err(OpResult::Error { message })) => Err(message),
            Ok(Err(other)) => Err(format!("unexpected answer: {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(parse("  upload /tmp/a b.txt ").unwrap(), Some(Cmd::Upload("/tmp/a b.txt".into())));
        assert_eq!(parse("download \"x y\"").unwrap(), Some(Cmd::Download("x y".into())));
        assert_eq!(parse("list_server").unwrap(), Some(Cmd::ListServer));
        assert_eq!(parse("").unwrap(), None);
        assert!(parse("upload").is_err());
        assert!(parse("list_client now").is_err());
        assert!(parse("frobnicate").is_err());
    }
}
