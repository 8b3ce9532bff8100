//! The commands a user types (or a script feeds on stdin), and their output.
//!
//! Every command prints its outcome on stdout once it has finished, so a script can
//! wait for that line; errors go to stderr.

use crate::console::Console;
use crate::engine::Command;
use crate::progress::{self, bytes};
use crate::rules::Rules;
use crate::scan;
use crate::status::Status;
use crate::timefmt::datetime;
use crossbeam_channel::{bounded, Sender};
use replibox_frontend::Frontend;
use replibox_proto::times::FileTimes;
use replibox_proto::{FileMeta, OpResult};
use std::collections::BTreeSet;
use std::fs;
use std::io;
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
    /// `status`
    Status,
    /// `passwd [FILE]`
    Passwd(Option<PathBuf>),
    /// `exit` or `quit`
    Exit,
    /// `help`
    Help,
}

impl Cmd {
    /// The command's word, for messages about it.
    pub fn word(&self) -> &'static str {
        match self {
            Cmd::Upload(_) => "upload",
            Cmd::Download(_) => "download",
            Cmd::Delete(_) => "delete",
            Cmd::ListServer => "list_server",
            Cmd::ListClient => "list_client",
            Cmd::GetSyncDir => "get_sync_dir",
            Cmd::Status => "status",
            Cmd::Passwd(_) => "passwd",
            Cmd::Exit => "exit",
            Cmd::Help => "help",
        }
    }
}

/// The help text.
pub const HELP: &str = "commands:
  upload PATH     put a file from anywhere into the sync dir, on the server and on every device
  download NAME   copy a file from the server into the current directory (that copy is not synced);
                  a file already there keeps its name, and the copy gets a free one: NAME (1).EXT
  delete NAME     delete a file from the server and from every device
  list_server     list the files on the server (name, size, mtime, atime, ctime); empty folders: NAME/
  list_client     list the files in this device's sync dir (ignored files left out)
  get_sync_dir    bring the sync dir and the server into agreement now
  status          in sync or not, what waits and why, the server, its epoch and this device
  passwd [FILE]   change the password: asked twice (no echo) on a terminal, or the first line of FILE;
                  every device logs in with the new one from then on
  help            this list
  exit, quit      log out and quit (end of input and Ctrl-C at the prompt do the same)
A name with spaces can be typed as it is (upload /tmp/my notes.txt) or quoted as in a
shell (download \"my notes.txt\", or 'my notes.txt'); a backslash keeps the next character
as it is (it\\'s.txt). A quote left open is an error.";

/// The argument after the command word: taken as it is (so that `upload /tmp/my
/// notes.txt` works, as it always has), unless it has quotes or backslashes; then
/// it is split as a shell would (shlex) and must be one word. None when empty.
fn argument(word: &str, rest: &str) -> Result<Option<String>, String> {
    let rest = rest.trim();
    if rest.is_empty() {
        return Ok(None);
    }
    if !rest.contains(['"', '\'', '\\']) {
        return Ok(Some(rest.to_string()));
    }
    let words = shlex::split(rest).ok_or_else(|| {
        format!(
            "a quote is left open in {rest:?}; close it, or put a backslash before a quote that is part of the name"
        )
    })?;
    match words.len() {
        0 => Ok(None),
        1 => Ok(words.into_iter().next().filter(|w| !w.is_empty())),
        n => Err(format!("{word} takes one argument, not {n}; put quotes around a name that has spaces")),
    }
}

/// Parses one input line; `Ok(None)` for a blank line.
pub fn parse(line: &str) -> Result<Option<Cmd>, String> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(None);
    }
    let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let arg = argument(word, rest)?;
    let need = |what: &str| -> Result<String, String> { arg.clone().ok_or_else(|| format!("usage: {word} {what}")) };
    let none = |cmd: Cmd| -> Result<Option<Cmd>, String> {
        match arg {
            None => Ok(Some(cmd)),
            Some(_) => Err(format!("{word} takes no argument")),
        }
    };
    match word {
        "upload" => Ok(Some(Cmd::Upload(PathBuf::from(need("PATH")?)))),
        "download" => Ok(Some(Cmd::Download(need("NAME")?))),
        "delete" => Ok(Some(Cmd::Delete(need("NAME")?))),
        "list_server" => none(Cmd::ListServer),
        "list_client" => none(Cmd::ListClient),
        "get_sync_dir" => none(Cmd::GetSyncDir),
        "status" => none(Cmd::Status),
        "passwd" => Ok(Some(Cmd::Passwd(arg.map(PathBuf::from)))),
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
    /// Where output goes.
    pub console: Console,
    /// What `status` reports.
    pub status: Status,
}

/// One row of a listing: name, size (None for a folder), mtime, atime, ctime.
type Row = (String, Option<u64>, i64, i64, i64);

/// The rows of `entries` (path, is a folder, size, times): every file, and the
/// folders that hold nothing (shown as `name/`): a folder with files in it
/// shows in their paths already.
fn rows(entries: Vec<(String, bool, u64, i64, i64, i64)>) -> Vec<Row> {
    let paths: BTreeSet<String> = entries.iter().map(|e| e.0.clone()).collect();
    let holds_something = |dir: &str| {
        let prefix = format!("{dir}/");
        paths.range(prefix.clone()..).next().is_some_and(|p| p.starts_with(&prefix))
    };
    entries
        .into_iter()
        .filter(|e| !e.1 || !holds_something(&e.0))
        .map(|(p, dir, size, m, a, c)| if dir { (format!("{p}/"), None, m, a, c) } else { (p, Some(size), m, a, c) })
        .collect()
}

fn table(rows: Vec<Row>) -> String {
    let width = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(4).max(4);
    let mut out = format!(
        "{:<width$}  {:>12}  {:<19}  {:<19}  {:<19}\n",
        "NAME", "SIZE", "MTIME (UTC)", "ATIME (UTC)", "CTIME (UTC)"
    );
    let folders = rows.iter().filter(|r| r.1.is_none()).count();
    let n = rows.len() - folders;
    for (name, size, m, a, c) in rows {
        let pad = width - name.chars().count();
        let size = size.map_or_else(|| "-".to_string(), |s| s.to_string());
        out.push_str(&format!(
            "{name}{}  {size:>12}  {}  {}  {}\n",
            " ".repeat(pad),
            datetime(m),
            datetime(a),
            datetime(c)
        ));
    }
    out.push_str(&format!("{n} file{}", if n == 1 { "" } else { "s" }));
    if folders > 0 {
        out.push_str(&format!(", {folders} empty folder{}", if folders == 1 { "" } else { "s" }));
    }
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
            Cmd::ListServer => Ok(table(rows(
                self.front
                    .list_all()
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .filter(|m: &FileMeta| !m.deleted)
                    .map(|m| (m.path, m.dir, m.size, m.mtime_ms, m.atime_ms, m.ctime_ms))
                    .collect(),
            ))),
            Cmd::ListClient => {
                // The rules as they are on disk now: the engine may not have
                // looked at them yet.
                let rules = Rules::load(&self.root);
                let entries = scan::scan(&self.root, &rules)
                    .into_iter()
                    .filter_map(|(p, l)| {
                        let md = fs::symlink_metadata(self.root.join(&p)).ok()?;
                        let t = FileTimes::of(&md);
                        Some((p, l.dir, md.len(), t.mtime_ms, t.atime_ms, t.ctime_ms))
                    })
                    .collect();
                Ok(table(rows(entries)))
            }
            Cmd::Status => Ok(self.status.report(&self.console)),
            Cmd::Passwd(file) => {
                let new = crate::password::new_password(file.as_deref())?;
                match self.front.change_password(&new).map_err(|e| e.to_string())? {
                    OpResult::PasswordChanged => {
                        Ok("password changed; log in with the new one from now on, on every device".into())
                    }
                    OpResult::Error { message } => Err(message),
                    other => Err(format!("unexpected answer: {other:?}")),
                }
            }
            Cmd::Help => Ok(HELP.to_string()),
            Cmd::Exit => Ok("bye".into()),
        }
    }

    fn download(&self, name: &str) -> Result<String, String> {
        replibox_proto::validate_path(name).map_err(|e| e.to_string())?;
        let file_name = Path::new(name).file_name().and_then(|n| n.to_str()).unwrap_or(name).to_string();
        let dir = std::env::current_dir().map_err(|e| format!("cannot find the current directory: {e}"))?;
        let tmp = dir.join(format!(".{file_name}.replibox-download"));
        match progress::download_to(&self.front, &self.console, name, &tmp) {
            Ok(Ok(meta)) => {
                let placed = place_without_overwriting(&tmp, &dir, &file_name);
                if placed.is_err() {
                    let _ = fs::remove_file(&tmp);
                }
                let dest = placed.map_err(|e| format!("cannot write {}: {e}", dir.join(&file_name).display()))?;
                let mut out = format!("downloaded {name} to {} ({})", dest.display(), bytes(meta.size));
                if dest.file_name().and_then(|n| n.to_str()) != Some(file_name.as_str()) {
                    out.push_str(&format!(
                        "; {} was already there and is left as it was",
                        dir.join(&file_name).display()
                    ));
                }
                Ok(out)
            }
            Ok(Err(OpResult::Error { message })) => Err(message),
            Ok(Err(other)) => Err(format!("unexpected answer: {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// `name` with ` (n)` before its extension, as browsers name a second download:
/// `notes (1).txt`; a leading dot is part of the name (`.bashrc (1)`).
pub fn numbered(name: &str, n: u32) -> String {
    match name.rfind('.') {
        Some(i) if i > 0 => format!("{} ({n}){}", &name[..i], &name[i..]),
        _ => format!("{name} ({n})"),
    }
}

/// Moves the finished download `tmp` into `dir` as `file_name`, or as the first
/// free `numbered` name if that one is taken. Never replaces anything: a hard
/// link fails when its name exists, atomically, so a file created meanwhile by
/// someone else is safe too. On a file system without hard links, it falls back
/// to a rename after checking the name is free.
fn place_without_overwriting(tmp: &Path, dir: &Path, file_name: &str) -> io::Result<PathBuf> {
    for n in 0..10_000 {
        let dest = dir.join(if n == 0 { file_name.to_string() } else { numbered(file_name, n) });
        match fs::hard_link(tmp, &dest) {
            Ok(()) => {
                // The copy is in place; a temporary name left behind is only
                // clutter, not a failed download.
                let _ = fs::remove_file(tmp);
                return Ok(dest);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(_) if fs::symlink_metadata(&dest).is_err() => {
                fs::rename(tmp, &dest)?;
                return Ok(dest);
            }
            Err(_) => continue,
        }
    }
    Err(io::Error::other("no free name left"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(parse("  upload /tmp/a b.txt ").unwrap(), Some(Cmd::Upload("/tmp/a b.txt".into())));
        assert_eq!(parse("download \"x y\"").unwrap(), Some(Cmd::Download("x y".into())));
        assert_eq!(parse("download 'it''s'").unwrap(), Some(Cmd::Download("its".into())));
        assert_eq!(parse("download it\\'s.txt").unwrap(), Some(Cmd::Download("it's.txt".into())));
        assert_eq!(parse("download \"dir/my notes.txt\"").unwrap(), Some(Cmd::Download("dir/my notes.txt".into())));
        assert_eq!(parse("list_server").unwrap(), Some(Cmd::ListServer));
        assert_eq!(parse("status").unwrap(), Some(Cmd::Status));
        assert_eq!(parse("quit").unwrap(), Some(Cmd::Exit));
        assert_eq!(parse("").unwrap(), None);
        assert!(parse("upload").is_err());
        assert!(parse("upload \"\"").is_err(), "an empty quoted name is a missing argument");
        assert!(parse("list_client now").is_err());
        assert!(parse("frobnicate").is_err());
    }

    #[test]
    fn an_open_quote_is_an_error() {
        for line in ["download \"my notes.txt", "upload 'a b", "delete x\"y"] {
            let e = parse(line).unwrap_err();
            assert!(e.contains("quote is left open"), "{line}: {e}");
        }
        let e = parse("delete \"a b\" c").unwrap_err();
        assert!(e.contains("one argument"), "{e}");
    }

    #[test]
    fn help_lists_every_command_and_quoting() {
        for word in [
            "upload",
            "download",
            "delete",
            "list_server",
            "list_client",
            "get_sync_dir",
            "status",
            "passwd",
            "help",
            "exit",
            "quit",
            "quote",
        ] {
            assert!(HELP.contains(word), "help should mention {word}");
        }
    }

    #[test]
    fn downloads_never_replace_a_file() {
        assert_eq!(numbered("notes.txt", 1), "notes (1).txt");
        assert_eq!(numbered(".bashrc", 2), ".bashrc (2)");
        assert_eq!(numbered("README", 3), "README (3)");
        let dir = std::env::temp_dir().join(format!("replibox-cli-place-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("a.txt"), b"mine").unwrap();
        fs::write(dir.join("a (1).txt"), b"mine too").unwrap();
        fs::write(dir.join(".tmp1"), b"new").unwrap();
        let got = place_without_overwriting(&dir.join(".tmp1"), &dir, "a.txt").unwrap();
        assert_eq!(got, dir.join("a (2).txt"));
        assert_eq!(fs::read(dir.join("a.txt")).unwrap(), b"mine");
        assert_eq!(fs::read(dir.join("a (1).txt")).unwrap(), b"mine too");
        assert_eq!(fs::read(&got).unwrap(), b"new");
        assert!(!dir.join(".tmp1").exists());
        fs::write(dir.join(".tmp2"), b"free").unwrap();
        assert_eq!(place_without_overwriting(&dir.join(".tmp2"), &dir, "b.txt").unwrap(), dir.join("b.txt"));
        let _ = fs::remove_dir_all(&dir);
    }
}
