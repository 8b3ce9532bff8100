//! The durable store: users' files byte for byte, and the history that explains them.
//!
//! Layout under the data dir:
//! - `users/<user>/<path>`: each user's current files, exactly as uploaded, and
//!   their folder entries as directories (an empty folder is an empty directory);
//! - `meta/snapshot.json`: the [`State`] at some position (written atomically);
//! - `meta/log.jsonl`: one [`Entry`] per line after the snapshot, fsynced before its
//!   file-system action runs (write-ahead);
//! - `tmp/`: uploads in flight, named by transfer id.
//!
//! Commit order for every entry: append it to the log and fsync, then perform its
//! file-system action (rename a temporary file into place, remove, move, make or
//! remove a folder entry's directory), then
//! apply it to the in-memory state.
//!
//! Group commit: entries that arrive together are appended one after the other
//! and made durable by one fsync ([`Store::append_deferred`], [`Store::flush`]);
//! then their actions run in order, and each folder they changed is fsynced once.
//! The core holds back every message that depends on them until the flush. A group
//! touches each path at most once and holds at most [`GROUP_MAX`] entries, so after
//! a crash only the entries of the last group can have unfinished actions, in any
//! state of completion, and redoing them in order is safe: start-up walks back from
//! the log's end while paths stay distinct (which covers the whole last group) and
//! redoes those entries. Every action is written so that redoing a finished one is
//! a no-op, and within such a window no later entry touches its paths.

use crate::state::{Change, Entry, State};
use crate::uploads::Temps;
use replibox_proto::pidlock::{self, LockError};
use replibox_proto::times::{from_ms, to_ms, FileTimes};
use replibox_proto::{ContentHash, Epoch, FileMeta, ServerId, Version};
use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// After this many log entries the state is written to a snapshot and the log emptied.
const COMPACT_AFTER: usize = 10_000;

/// The most entries one group commit holds (see the module's doc): start-up redoes
/// at most this many entries at the log's end.
pub const GROUP_MAX: usize = 256;

/// A store operation that failed, with what it was doing.
#[derive(Debug)]
pub struct StoreError {
    /// What was being done, and on which file.
    pub context: String,
    /// The cause.
    pub source: io::Error,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, self.source)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Walks `users/` depth first without following symlinks (a link to a folder
/// elsewhere is an entry, never entered), calling `visit(user, rel, entry, type)`
/// for everything but folders in each valid user's folder, and for each folder
/// that holds nothing (an empty folder is part of the user's tree), and
/// `stray(entry)` for anything else directly in `users/` (a file, a link, a
/// folder whose name is not a valid username).
fn walk_users(
    users: &Path,
    mut stray: impl FnMut(&fs::DirEntry),
    mut visit: impl FnMut(&str, String, &fs::DirEntry, fs::FileType) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for user_dir in fs::read_dir(users).context(|| format!("listing {}", users.display()))? {
        let user_dir = user_dir.context(|| format!("listing {}", users.display()))?;
        let user = user_dir.file_name().to_string_lossy().into_owned();
        let is_dir = user_dir.file_type().is_ok_and(|t| t.is_dir());
        if replibox_proto::validate_username(&user).is_err() || !is_dir {
            stray(&user_dir);
            continue;
        }
        let root = user_dir.path();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).context(|| format!("listing {}", dir.display()))? {
                let e = e.context(|| format!("listing {}", dir.display()))?;
                let ft = e.file_type().context(|| format!("inspecting {}", e.path().display()))?;
                let empty_dir = ft.is_dir() && fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_none());
                if ft.is_dir() && !empty_dir {
                    stack.push(e.path());
                    continue;
                }
                let path = e.path();
                let Ok(rel) = path.strip_prefix(&root) else { continue };
                visit(&user, rel.to_string_lossy().into_owned(), &e, ft)?;
            }
        }
    }
    Ok(())
}

/// Where a data dir keeps a user's file: `DATA/users/USER/PATH`.
pub fn user_file(data: &Path, user: &str, path: &str) -> PathBuf {
    data.join("users").join(user).join(path)
}

/// Makes a temporary file's bytes durable (a fetched copy about to be placed).
/// The temporary files that entries place are synced by the store instead, many
/// at once, with their group ([`Store::flush`]). Either way a large file, written
/// behind ([`replibox_proto::durable::WriteBehind`]), then leaves the page cache.
pub fn sync_temp(file: &File) -> io::Result<()> {
    file.sync_all()?;
    replibox_proto::durable::drop_synced(file);
    Ok(())
}

/// Fsyncs the bytes of every file in `paths`, several at once
/// ([`replibox_proto::durable`]).
fn sync_files(paths: &[PathBuf]) -> Result<(), StoreError> {
    replibox_proto::durable::sync_all(paths, |p| {
        let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", p.display()));
        let f = File::open(p).map_err(named)?;
        f.sync_data().map_err(named)?;
        replibox_proto::durable::drop_synced(&f);
        Ok(())
    })
    .context(|| "syncing temporary files".into())
}

/// Where a data dir keeps an incoming transfer until it is placed: `DATA/tmp/XFER`.
pub fn tmp_file(data: &Path, xfer: &str) -> PathBuf {
    data.join("tmp").join(xfer)
}

/// Why a commit failed, and whether the entry reached the log.
#[derive(Debug)]
pub enum CommitError {
    /// Nothing changed: the entry is not in the log.
    Unlogged(StoreError),
    /// The entry is in the log but its file-system action failed.
    Logged(StoreError),
}

impl fmt::Display for CommitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommitError::Unlogged(e) => write!(f, "entry not logged: {e}"),
            CommitError::Logged(e) => write!(f, "entry logged but not carried out: {e}"),
        }
    }
}

impl std::error::Error for CommitError {}

/// The disk (or the quota) is full: ENOSPC or EDQUOT.
pub fn is_full(e: &io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|n| n == Errno::ENOSPC as i32 || n == Errno::EDQUOT as i32)
}

/// The file system (or mount) is read-only: EROFS.
pub fn is_read_only(e: &io::Error) -> bool {
    e.raw_os_error() == Some(nix::errno::Errno::EROFS as i32)
}

/// What a client is told when the server cannot store its change: `the server
/// is out of space` for a full disk (or quota), a general sentence otherwise.
pub fn storage_trouble(e: &io::Error) -> String {
    if is_full(e) {
        "the server is out of space".to_string()
    } else if is_read_only(e) {
        "the server's data dir is read-only".to_string()
    } else {
        "the server cannot store changes right now".to_string()
    }
}

/// Adds context to an I/O result.
pub trait Context<T> {
    /// Wraps the error with a description of the failed step.
    fn context(self, what: impl FnOnce() -> String) -> Result<T, StoreError>;
}

impl<T> Context<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, StoreError> {
        self.map_err(|source| StoreError { context: what(), source })
    }
}

/// The data dir, its write-ahead log and its temporary files.
pub struct Store {
    root: PathBuf,
    log: File,
    log_entries: usize,
    /// Entries in the log that trigger a compaction ([`COMPACT_AFTER`]; tests
    /// lower it).
    compact_after: usize,
    /// Makes temporary files; shared with the connection threads.
    temps: Arc<Temps>,
    /// Entries appended but not yet fsynced: their actions, in log order.
    pending: Vec<Change>,
    /// The paths (user, path) the pending entries touch.
    pending_paths: HashSet<(String, String)>,
}

/// The paths (user, path) a change's file-system action touches.
fn paths_of(change: &Change) -> Vec<(String, String)> {
    match change {
        Change::Put { user, meta, .. } | Change::Delete { user, meta } => vec![(user.clone(), meta.path.clone())],
        Change::Rename { user, from, to } => {
            vec![(user.clone(), from.path.clone()), (user.clone(), to.path.clone())]
        }
        _ => Vec::new(),
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing ancestors, and fsyncs each new folder's parent,
/// so that a power loss cannot lose a folder that a logged entry's file lives in
/// (`create_dir_all` alone leaves the new folders' names in the page cache).
pub fn create_dirs_durably(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut d = dir;
    while !d.as_os_str().is_empty() && !d.exists() {
        missing.push(d.to_path_buf());
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
    for new in missing.iter().rev() {
        match fs::create_dir(new) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        let parent = new.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fsync_dir(parent)?;
    }
    Ok(())
}

impl Store {
    /// Opens (or creates) a data dir, recovers the state, and finishes or discards
    /// whatever a crash interrupted. Also returns the entries the log holds after
    /// the snapshot (the recent history, for backups that catch up from it).
    ///
    /// Only a torn *last* line of the log is dropped (the entry whose append a
    /// crash cut short, which was never acknowledged). A line that does not parse
    /// with entries after it is damage, not a crash: the store refuses to open
    /// rather than silently drop what follows.
    pub fn open(root: &Path) -> Result<(Store, State, Vec<Entry>), StoreError> {
        for dir in ["users", "meta", "tmp"] {
            let d = root.join(dir);
            create_dirs_durably(&d).context(|| format!("creating {}", d.display()))?;
        }
        let snapshot_path = root.join("meta/snapshot.json");
        let mut state = match fs::read(&snapshot_path) {
            Ok(bytes) => serde_json::from_slice::<State>(&bytes)
                .map_err(io::Error::other)
                .context(|| format!("reading {}", snapshot_path.display()))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e).context(|| format!("reading {}", snapshot_path.display())),
        };
        let log_path = root.join("meta/log.jsonl");
        let mut recent: Vec<Entry> = Vec::new();
        let mut log_entries = 0;
        let mut good_len: u64 = 0;
        if let Ok(f) = File::open(&log_path) {
            let mut reader = BufReader::new(f);
            let mut line = String::new();
            let mut line_no = 0u64;
            // A line that did not parse: an error unless nothing follows it.
            let mut bad: Option<(u64, String)> = None;
            loop {
                line.clear();
                let n = reader.read_line(&mut line).context(|| format!("reading {}", log_path.display()))?;
                if n == 0 {
                    break;
                }
                line_no += 1;
                if let Some((at, why)) = bad.take() {
                    return Err(StoreError {
                        context: format!("reading {}", log_path.display()),
                        source: io::Error::other(format!(
                            "line {at} is damaged ({why}) and entries follow it; refusing to start rather than \
                             drop them. Move the data dir aside, or start it with -b so that a primary refills it"
                        )),
                    });
                }
                if !line.ends_with('\n') {
                    // A torn last line: its entry was never acknowledged; drop it.
                    log::warn!("dropping torn log tail bytes={n} file={}", log_path.display());
                    break;
                }
                let entry: Entry = match serde_json::from_str(&line) {
                    Ok(e) => e,
                    Err(e) => {
                        bad = Some((line_no, e.to_string()));
                        continue;
                    }
                };
                good_len += n as u64;
                log_entries += 1;
                if entry.pos <= state.pos {
                    continue; // already in the snapshot (crash between snapshot and truncate)
                }
                state
                    .apply(&entry)
                    .map_err(io::Error::other)
                    .context(|| format!("replaying {}", log_path.display()))?;
                recent.push(entry);
            }
            if let Some((at, why)) = bad {
                log::warn!("dropping unreadable last log line={at} error={why} file={}", log_path.display());
            }
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .context(|| format!("opening {}", log_path.display()))?;
        log.set_len(good_len).context(|| format!("trimming {}", log_path.display()))?;
        let store = Store {
            root: root.to_path_buf(),
            log,
            log_entries,
            compact_after: COMPACT_AFTER,
            temps: Arc::new(Temps::new(root)),
            pending: Vec::new(),
            pending_paths: HashSet::new(),
        };
        // The last group's actions may be unfinished (see the module's doc).
        let mut seen = HashSet::new();
        let mut window = 0;
        for entry in recent.iter().rev().take(GROUP_MAX) {
            if !paths_of(&entry.change).into_iter().all(|p| seen.insert(p)) {
                break;
            }
            window += 1;
        }
        let window = &recent[recent.len() - window..];
        let file_xfer = |c: &Change| match c {
            Change::Put { meta, xfer, .. } if !meta.dir => Some(xfer.clone()),
            _ => None,
        };
        for (k, entry) in window.iter().enumerate() {
            // A transfer name that a later entry of the window uses again
            // ("adopted": a backup fetches each adopted file under that name, one
            // at a time, once the one before is in place) holds that later
            // entry's bytes: this one was carried out before them.
            if let Some(x) = file_xfer(&entry.change) {
                if window[k + 1..].iter().any(|e| file_xfer(&e.change).as_ref() == Some(&x)) {
                    continue;
                }
            }
            store.act(&state, &entry.change)?;
        }
        store.clear_tmp()?;
        Ok((store, state, recent))
    }

    /// The data dir may serve as primary: no install was left unfinished (its
    /// state would describe files it does not hold).
    pub fn check_primary(&self) -> Result<(), String> {
        if self.install_unfinished() {
            return Err(format!(
                "this data dir stopped while joining a cluster ({}/meta/installing): some files may be missing; \
                 start it with -b to finish catching up, or delete that file to start from what it holds",
                self.root.display()
            ));
        }
        Ok(())
    }

    /// The data dir.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a user's file lives.
    pub fn user_path(&self, user: &str, path: &str) -> PathBuf {
        user_file(&self.root, user, path)
    }

    /// Whether a user's path is a file on this disk (not a folder, not a link):
    /// what a rename's action would move.
    pub fn holds_file(&self, user: &str, path: &str) -> bool {
        fs::symlink_metadata(self.user_path(user, path)).is_ok_and(|m| m.is_file())
    }

    fn tmp_path(&self, xfer: &str) -> PathBuf {
        tmp_file(&self.root, xfer)
    }

    fn clear_tmp(&self) -> Result<(), StoreError> {
        let tmp = self.root.join("tmp");
        for entry in fs::read_dir(&tmp).context(|| format!("listing {}", tmp.display()))? {
            let entry = entry.context(|| format!("listing {}", tmp.display()))?;
            log::info!("removing abandoned temporary file={}", entry.path().display());
            let _ = fs::remove_file(entry.path());
        }
        Ok(())
    }

    /// The maker of temporary files, for the connection threads.
    pub fn temps(&self) -> Arc<Temps> {
        self.temps.clone()
    }

    /// Removes a temporary file whose transfer was abandoned.
    pub fn discard_temp(&self, xfer: &str) {
        let _ = fs::remove_file(self.tmp_path(xfer));
    }

    /// Makes an entry durable and performs its file-system action; the caller
    /// then applies it to the state (`state` is the state before it).
    ///
    /// `Err(Unlogged)`: the entry did not reach the log and nothing changed; the
    /// request can be refused and the server goes on. `Err(Logged)`: the entry is
    /// durable but its action failed, so disk and state disagree; the caller must
    /// stop (start-up redoes the action).
    pub fn persist(&mut self, state: &State, entry: &Entry) -> Result<(), CommitError> {
        self.flush(state).map_err(CommitError::Logged)?;
        if self.prepare(entry)? {
            if let Change::Put { xfer, .. } = &entry.change {
                sync_files(&[self.tmp_path(xfer)]).map_err(CommitError::Unlogged)?;
            }
            self.sync_tmp_dir().map_err(CommitError::Unlogged)?;
        }
        self.append(state, entry, true).map_err(CommitError::Unlogged)?;
        // The state before the entry serves: it differs from the state after it
        // only at the entry's own path, and folders are kept by their ancestors'.
        self.act(state, &entry.change).map_err(CommitError::Logged)
    }

    /// Whether entries wait for [`Store::flush`].
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether an entry waiting for [`Store::flush`] touches `path` of `user`.
    pub fn touches_pending(&self, user: &str, path: &str) -> bool {
        self.pending_paths.contains(&(user.to_string(), path.to_string()))
    }

    /// How many entries wait for [`Store::flush`].
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Whether the group waiting for [`Store::flush`] has room for more entries.
    pub fn can_grow(&self) -> bool {
        self.pending.len() < GROUP_MAX
    }

    /// Whether `change` may join the group waiting for [`Store::flush`]: the group
    /// has room, and touches none of its paths.
    pub fn can_defer(&self, change: &Change) -> bool {
        self.pending.len() < GROUP_MAX && paths_of(change).iter().all(|p| !self.pending_paths.contains(p))
    }

    /// Appends `entry` to the log without an fsync: it joins the group that
    /// [`Store::flush`] makes durable, and its action waits for that flush. The
    /// caller checked [`Store::can_defer`], and holds back everything that
    /// depends on the entry until the flush. `Err` is always `Unlogged`.
    pub fn append_deferred(&mut self, state: &State, entry: &Entry) -> Result<(), CommitError> {
        self.prepare(entry)?;
        self.append(state, entry, false).map_err(CommitError::Unlogged)?;
        self.pending_paths.extend(paths_of(&entry.change));
        self.pending.push(entry.change.clone());
        Ok(())
    }

    /// Makes the waiting group durable, then carries out its actions: the
    /// temporary files the entries move into place are fsynced (several at once),
    /// then `tmp/` (their names), then the log; then the actions run in log order
    /// and each folder they changed is fsynced once. An error leaves entries
    /// logged whose actions may not have run: the caller must stop (start-up
    /// redoes them). `state` holds the group's entries (applied after each was
    /// appended): it tells which folders are entries that the actions keep.
    pub fn flush(&mut self, state: &State) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        self.pending_paths.clear();
        let temps: Vec<PathBuf> = pending
            .iter()
            .filter_map(|c| match c {
                Change::Put { xfer, meta, .. } if !meta.dir => Some(self.tmp_path(xfer)),
                _ => None,
            })
            .filter(|p| p.exists())
            .collect();
        if !temps.is_empty() {
            sync_files(&temps)?;
            self.sync_tmp_dir()?;
        }
        let log_path = self.root.join("meta/log.jsonl");
        self.log.sync_data().context(|| format!("syncing {}", log_path.display()))?;
        let mut dirs = BTreeSet::new();
        for change in &pending {
            self.act_into(state, change, &mut dirs)?;
        }
        for dir in dirs {
            match fsync_dir(&dir) {
                // A later entry of the group emptied the folder and removed it:
                // the folder it was removed from is in `dirs` too (what
                // `prune_empty_dirs` returns), and syncing that makes it durable.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                other => other.context(|| format!("syncing directory {}", dir.display()))?,
            }
        }
        Ok(())
    }

    fn sync_tmp_dir(&self) -> Result<(), StoreError> {
        let tmp = self.root.join("tmp");
        fsync_dir(&tmp).context(|| format!("syncing directory {}", tmp.display()))
    }

    /// What must happen before an entry is logged; true when it places a
    /// temporary file (whose name must be durable first).
    fn prepare(&self, entry: &Entry) -> Result<bool, CommitError> {
        // A data dir that became read-only (a file system remounted so after an
        // error, a read-only mount) is found here, before the log, where the
        // change can still be refused: the log file, open from before, may still
        // take the line while the file action would fail after it (at the flush,
        // for a deferred entry), which stops the server. Both paths to the log,
        // `persist` and `append_deferred`, come through here.
        self.writable().map_err(CommitError::Unlogged)?;
        match &entry.change {
            // A folder entry places no temporary file (its transfer name is none).
            Change::Put { user, meta, .. } if meta.dir => {
                self.make_parent_early(user, &meta.path)?;
                Ok(false)
            }
            Change::Put { user, meta, xfer } if self.tmp_path(xfer).exists() => {
                // The temporary file, bytes and name, must be durable before the
                // entry is (redo after a power loss takes a missing temporary file
                // for a finished move): the caller syncs it and `tmp/` before the
                // log.
                self.make_parent_early(user, &meta.path)?;
                Ok(true)
            }
            Change::Rename { user, from, to } if self.user_path(user, &from.path).exists() => {
                self.make_parent_early(user, &to.path)?;
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    /// Fails with EROFS when the data dir cannot be written (a read-only file
    /// system or mount; root included). One access(2) call per entry: cheap
    /// beside the log line itself and the group's fsync.
    fn writable(&self) -> Result<(), StoreError> {
        use nix::unistd::{access, AccessFlags};
        match access(&self.root, AccessFlags::W_OK) {
            Err(nix::errno::Errno::EROFS) => Err(io::Error::from_raw_os_error(nix::errno::Errno::EROFS as i32)),
            _ => Ok(()),
        }
        .context(|| format!("writing to {}", self.root.display()))
    }

    /// Writes the state to a snapshot and empties the log once the log holds
    /// enough entries. A failed compaction leaves the log whole: not fatal.
    pub fn maybe_compact(&mut self, state: &State) {
        // Not while a group waits: its actions must run before the log that
        // would redo them is emptied.
        if self.log_entries >= self.compact_after && self.pending.is_empty() {
            if let Err(e) = self.compact(state) {
                log::error!("cannot compact the log: {e}");
            }
        }
    }

    /// [`Store::persist`], then applies the entry to `state` (tests and tools).
    pub fn commit(&mut self, state: &mut State, entry: Entry) -> Result<(), CommitError> {
        self.persist(state, &entry)?;
        state
            .apply(&entry)
            .map_err(io::Error::other)
            .context(|| "applying entry".into())
            .map_err(CommitError::Logged)?;
        self.maybe_compact(state);
        Ok(())
    }

    /// Appends an entry to the log, and fsyncs it when `sync`; on failure the log
    /// is cut back to where it was, so no torn line is left before later entries.
    fn append(&mut self, state: &State, entry: &Entry, sync: bool) -> Result<(), StoreError> {
        if entry.pos != state.pos.next() {
            return Err(StoreError {
                context: format!("committing entry pos={}", entry.pos),
                source: io::Error::other(format!("state is at pos={}", state.pos)),
            });
        }
        let mut line = serde_json::to_vec(entry).map_err(io::Error::other).context(|| "encoding entry".into())?;
        line.push(b'\n');
        let log_path = self.root.join("meta/log.jsonl");
        let before = self.log.metadata().map(|m| m.len()).context(|| format!("inspecting {}", log_path.display()))?;
        let written = self.log.write_all(&line).and_then(|_| if sync { self.log.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            let _ = self.log.set_len(before);
            return Err(e).context(|| format!("appending to {}", log_path.display()));
        }
        self.log_entries += 1;
        Ok(())
    }

    /// Makes `state` the snapshot and empties the log (in that order: a crash in
    /// between leaves log entries the snapshot already holds, which start-up skips).
    fn write_snapshot(&mut self, state: &State) -> Result<(), StoreError> {
        let path = self.root.join("meta/snapshot.json");
        let bytes = serde_json::to_vec(state).map_err(io::Error::other).context(|| "encoding snapshot".into())?;
        write_atomically(&path, &bytes)?;
        self.log.set_len(0).context(|| "truncating log".into())?;
        self.log.sync_all().context(|| "syncing log".into())?;
        self.log_entries = 0;
        Ok(())
    }

    /// Writes the state to a snapshot and empties the log.
    pub fn compact(&mut self, state: &State) -> Result<(), StoreError> {
        self.write_snapshot(state)?;
        log::info!("compacted log into snapshot pos={}", state.pos);
        Ok(())
    }

    /// The file-system side of a change. Redoing a finished action changes nothing.
    /// `state` tells which folders are entries of their own, which a file's
    /// removal must not take with it (see [`Store::act_into`]).
    fn act(&self, state: &State, change: &Change) -> Result<(), StoreError> {
        let mut dirs = BTreeSet::new();
        self.act_into(state, change, &mut dirs)?;
        for dir in dirs {
            fsync_dir(&dir).context(|| format!("syncing directory {}", dir.display()))?;
        }
        Ok(())
    }

    /// [`Store::act`], leaving the fsyncs of the folders it changed to the caller
    /// (added to `dirs`), so that a group syncs each folder once.
    ///
    /// `state` is the state after the change and after every other change of its
    /// group (or, at start-up, after the whole log; or, for an entry committed on
    /// its own, just before it). Which folders are entries is
    /// read there, not in the state just before the change: a group touches each
    /// path once, so a folder entry made or deleted by another change of the same
    /// group is made or removed by that change's own action, and the group ends
    /// with the same tree in either order.
    fn act_into(&self, state: &State, change: &Change, dirs: &mut BTreeSet<PathBuf>) -> Result<(), StoreError> {
        let parent = |p: &Path| p.parent().unwrap_or(&self.root).to_path_buf();
        match change {
            // Durable on its own (each folder it makes is synced in its parent),
            // as the folders a file's move makes are.
            Change::Put { user, meta, .. } if meta.dir => self.make_dir(user, &meta.path)?,
            Change::Put { user, meta, xfer } => {
                if !self.tmp_path(xfer).exists() {
                    return Ok(()); // already moved into place
                }
                let dest = self.move_temp(user, meta, xfer)?;
                dirs.insert(parent(&dest));
            }
            Change::Delete { user, meta } if meta.dir => {
                let path = self.user_path(user, &meta.path);
                match fs::remove_dir(&path) {
                    Ok(()) => {
                        dirs.insert(self.prune_empty_dirs(state, user, &path));
                    }
                    // Files (or folders) still inside keep it: they are entries
                    // of their own, and it goes once they are gone.
                    Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotADirectory => {}
                    Err(e) => return Err(e).context(|| format!("removing folder {}", path.display())),
                }
            }
            Change::Delete { user, meta } => {
                let path = self.user_path(user, &meta.path);
                match fs::remove_file(&path) {
                    Ok(()) => {
                        dirs.insert(self.prune_empty_dirs(state, user, &path));
                    }
                    // No file there: gone already, or, when a start-up redoes an
                    // old entry, a later entry made a folder of that name (or a
                    // file of a folder on its way).
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::IsADirectory | io::ErrorKind::NotADirectory
                        ) => {}
                    Err(e) => return Err(e).context(|| format!("removing {}", path.display())),
                }
            }
            Change::Rename { user, from, to } => {
                let src = self.user_path(user, &from.path);
                let dest = self.user_path(user, &to.path);
                // Only a file is moved: when a start-up redoes a finished rename,
                // its source may be a folder a later entry made since.
                if self.holds_file(user, &from.path) {
                    self.make_parent(user, &dest)?;
                    fs::rename(&src, &dest).context(|| format!("moving {} to {}", src.display(), dest.display()))?;
                    dirs.insert(parent(&dest));
                    dirs.insert(self.prune_empty_dirs(state, user, &src));
                }
            }
            Change::Login { .. }
            | Change::Logout { .. }
            | Change::ClearSessions
            | Change::NewEpoch { .. }
            | Change::Join { .. }
            | Change::Leave { .. }
            | Change::ReserveId { .. }
            | Change::Account { .. } => {}
        }
        Ok(())
    }

    /// Makes the folders of `path` before its entry is logged: on a full disk,
    /// making one fails here, where the change can still be refused, instead of
    /// after the entry is logged (which stops the server). Any other failure is
    /// left to the action itself, which meets it again after the log.
    fn make_parent_early(&self, user: &str, path: &str) -> Result<(), CommitError> {
        match self.make_parent(user, &self.user_path(user, path)) {
            Err(e) if is_full(&e.source) => Err(CommitError::Unlogged(e)),
            _ => Ok(()),
        }
    }

    fn make_parent(&self, user: &str, dest: &Path) -> Result<(), StoreError> {
        let parent = dest.parent().unwrap_or(&self.root);
        create_dirs_durably(parent).context(|| format!("creating {} for user {user}", parent.display()))
    }

    fn sync_parent(&self, path: &Path) -> Result<(), StoreError> {
        let parent = path.parent().unwrap_or(&self.root);
        fsync_dir(parent).context(|| format!("syncing directory {}", parent.display()))
    }

    /// Removes directories left empty below the user's directory, up to the
    /// first that is a folder entry of its own in `state` (an empty folder the
    /// user made stays, as on the devices). Returns the folder the removals
    /// ended in, which still exists and changed (the one that held `removed`, or
    /// the last pruned folder's parent): it must be synced.
    fn prune_empty_dirs(&self, state: &State, user: &str, removed: &Path) -> PathBuf {
        let top = self.root.join("users").join(user);
        let mut dir = removed.parent();
        while let Some(d) = dir {
            let kept = d
                .strip_prefix(&top)
                .ok()
                .and_then(|rel| rel.to_str())
                .is_some_and(|rel| state.live_dir(user, rel).is_some());
            if d == top || !d.starts_with(&top) || kept || fs::remove_dir(d).is_err() {
                return d.to_path_buf();
            }
            dir = d.parent();
        }
        self.root.clone()
    }

    /// Makes the folder entry `path` exist: its folders made durably, a file in
    /// its place removed first (a file that became a folder: the entry replaced
    /// it). Redoing it changes nothing.
    fn make_dir(&self, user: &str, path: &str) -> Result<(), StoreError> {
        let dest = self.user_path(user, path);
        if fs::symlink_metadata(&dest).is_ok_and(|m| !m.is_dir()) {
            fs::remove_file(&dest).context(|| format!("removing {} to make a folder there", dest.display()))?;
        }
        create_dirs_durably(&dest).context(|| format!("creating folder {} for user {user}", dest.display()))
    }

    /// Opens a user's file for reading. The handle keeps reading the version it
    /// opened even if a newer one is renamed over it meanwhile.
    pub fn open_file(&self, user: &str, path: &str) -> Result<File, StoreError> {
        let p = self.user_path(user, path);
        File::open(&p).context(|| format!("opening {}", p.display()))
    }

    /// Access and status-change times of a user's file, in ms.
    pub fn times(&self, user: &str, path: &str) -> (i64, i64) {
        let t = self.all_times(user, path);
        (t.atime_ms, t.ctime_ms)
    }

    /// Modification, access and status-change times of a user's file or folder
    /// (zeros when it cannot be read).
    pub fn all_times(&self, user: &str, path: &str) -> FileTimes {
        match fs::metadata(self.user_path(user, path)) {
            Ok(m) => FileTimes::of(&m),
            Err(_) => FileTimes { mtime_ms: 0, atime_ms: 0, ctime_ms: 0 },
        }
    }

    /// Compares `users/` with the state; returns the entries that make the state
    /// describe what is on disk (files added or changed by hand, or whose entry a
    /// crash lost). Missing files are reported, not tombstoned: a tombstone would
    /// make every device delete its copy.
    pub fn check_against(&self, state: &State) -> Result<Vec<(String, FileMeta)>, StoreError> {
        let mut found = Vec::new();
        let stray = |e: &fs::DirEntry| log::warn!("ignoring stray entry in users/: {}", e.path().display());
        walk_users(&self.root.join("users"), stray, |user, rel, e, ft| {
            if ft.is_dir() {
                // An empty folder: a folder entry unless the state knows it.
                if state.live_dir(user, &rel).is_some() || state.check_name_free(user, &rel).is_err() {
                    return Ok(()); // known, or the folder of files the state holds
                }
                if replibox_proto::validate_path(&rel).is_err() {
                    log::warn!("ignoring folder with an invalid name {}", e.path().display());
                    return Ok(());
                }
                log::warn!("adopting empty folder found on disk user={user} path={rel}");
                let version = state.next_version(user, &rel);
                let meta = FileMeta { dir: true, ..new_meta(&rel, version, 0, 0, ContentHash::default()) };
                found.push((user.to_string(), meta));
                return Ok(());
            }
            if !ft.is_file() {
                log::warn!("ignoring non-regular file {}", e.path().display());
                return Ok(());
            }
            if replibox_proto::validate_path(&rel).is_err() {
                log::warn!("ignoring file with an invalid name {}", e.path().display());
                return Ok(());
            }
            let md = e.metadata().context(|| format!("inspecting {}", e.path().display()))?;
            let mtime = md.modified().map(to_ms).unwrap_or(0);
            let known = state.live(user, &rel);
            if known.is_some_and(|m| m.size == md.len() && m.mtime_ms == mtime && m.exec == is_exec(&md)) {
                return Ok(());
            }
            let hash = ContentHash::of_file(&e.path()).context(|| format!("hashing {}", e.path().display()))?;
            let version = state.next_version(user, &rel);
            log::warn!("adopting file found on disk user={user} path={rel} size={}", md.len());
            let meta = FileMeta {
                path: rel,
                version,
                size: md.len(),
                mtime_ms: mtime,
                hash,
                deleted: false,
                atime_ms: 0,
                ctime_ms: 0,
                exec: is_exec(&md),
                dir: false,
            };
            found.push((user.to_string(), meta));
            Ok(())
        })?;
        for (user, files) in &state.files {
            for meta in files.values().filter(|m| !m.deleted) {
                let p = self.user_path(user, &meta.path);
                if meta.dir && !p.is_dir() {
                    log::error!(
                        "folder missing from the store user={user} path={} version={}",
                        meta.path,
                        meta.version
                    );
                } else if !meta.dir && !p.is_file() {
                    log::error!("file missing from the store user={user} path={} version={}", meta.path, meta.version);
                }
            }
        }
        Ok(found)
    }

    /// The change that records a file already in place (found by
    /// [`Store::check_against`]): a put whose temporary file does not exist, so its
    /// action finds nothing to move.
    pub fn adoption(user: String, meta: FileMeta) -> Change {
        Change::Put { user, meta, xfer: "adopted".into() }
    }
}

impl Store {
    /// Replaces the state with a primary's snapshot (a backup joining). Files the
    /// snapshot does not hold are removed; files it holds are kept when the old
    /// state had the same version and content and the disk copy still matches;
    /// every other file is returned, to be fetched from the primary.
    ///
    /// Until [`Store::finish_install`], `meta/installing` marks the data dir as
    /// describing files it may not hold yet: a server that stops meanwhile must not
    /// start as primary, and its next install checks every file by content.
    pub fn install(&mut self, old: &State, new: &State) -> Result<Vec<(String, FileMeta)>, StoreError> {
        let marker = self.root.join("meta/installing");
        let interrupted = marker.exists();
        write_atomically(&marker, b"joining a cluster: files are being fetched\n")?;
        // The old log first: its entries may belong to another history than the
        // new snapshot's, and must never be replayed on top of it.
        self.log.set_len(0).context(|| "truncating log".into())?;
        self.log.sync_all().context(|| "syncing log".into())?;
        self.write_snapshot(new)?;
        let mut needed = Vec::new();
        for (user, files) in &new.files {
            for meta in files.values().filter(|m| !m.deleted) {
                if meta.dir {
                    // A folder has no content to fetch.
                    self.make_dir(user, &meta.path)?;
                    continue;
                }
                let disk = self.user_path(user, &meta.path);
                let same = if interrupted {
                    // The old state came from an unfinished install: only the
                    // content itself can be trusted.
                    ContentHash::of_file(&disk).is_ok_and(|h| h == meta.hash)
                } else {
                    old.live(user, &meta.path).is_some_and(|o| o.version == meta.version && o.hash == meta.hash)
                };
                let on_disk = fs::metadata(&disk).is_ok_and(|md| {
                    md.is_file()
                        && md.len() == meta.size
                        && md.modified().map(to_ms).ok() == Some(meta.mtime_ms)
                        && is_exec(&md) == meta.exec
                });
                if !(same && on_disk) {
                    needed.push((user.clone(), meta.clone()));
                }
            }
        }
        // Remove what the primary does not hold (deleted meanwhile, or never
        // acknowledged here).
        let stray = |e: &fs::DirEntry| {
            let p = e.path();
            log::info!("removing stray entry the primary does not hold: {}", p.display());
            // remove_dir_all removes a symlink itself, never what it points to.
            let _ = if e.file_type().is_ok_and(|t| t.is_dir()) { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
        };
        walk_users(&self.root.join("users"), stray, |user, rel, e, ft| {
            if new.live(user, &rel).is_none() {
                let p = e.path();
                log::info!("removing what the primary does not hold: {}", p.display());
                let _ = if ft.is_dir() { fs::remove_dir(&p) } else { fs::remove_file(&p) };
                self.prune_empty_dirs(new, user, &p);
            }
            Ok(())
        })?;
        Ok(needed)
    }

    /// The installed snapshot's files are all in place (or dropped): the data dir
    /// describes what it holds again.
    pub fn finish_install(&self) -> Result<(), StoreError> {
        let marker = self.root.join("meta/installing");
        match fs::remove_file(&marker) {
            Ok(()) => {
                let meta = self.root.join("meta");
                fsync_dir(&meta).context(|| format!("syncing directory {}", meta.display()))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).context(|| format!("removing {}", marker.display())),
        }
    }

    /// Marks the data dir as describing a file it does not hold yet.
    pub fn mark_incomplete(&self) -> Result<(), StoreError> {
        write_atomically(&self.root.join("meta/installing"), b"a file's content is missing\n")
    }

    /// True when an install was interrupted: the state may describe files this data
    /// dir does not hold.
    pub fn install_unfinished(&self) -> bool {
        self.root.join("meta/installing").exists()
    }

    /// Removes a user's file without a log entry (a backup's copy whose content it
    /// could not get: the state keeps describing it until a later entry). An empty
    /// folder there goes too: the state says a file, so the folder is what an older
    /// state left (its files were removed with it), and it must not stay behind
    /// once a later entry deletes or renames the file.
    pub fn drop_content(&self, state: &State, user: &str, path: &str) {
        let p = self.user_path(user, path);
        let is_dir = fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir());
        let removed = if is_dir { fs::remove_dir(&p) } else { fs::remove_file(&p) };
        if removed.is_ok() {
            // Durable before anything that relies on it (the marker's removal).
            let _ = self.sync_parent(&p);
            self.prune_empty_dirs(state, user, &p);
        }
    }

    /// Puts the bytes of temporary file `xfer` in place as `meta` (mtime set, synced,
    /// renamed, directory synced). Also used without a log entry for a file a backup
    /// fetched: the state already describes it; only its content was missing.
    pub fn place_temp(&self, user: &str, meta: &FileMeta, xfer: &str) -> Result<(), StoreError> {
        let dest = self.move_temp(user, meta, xfer)?;
        self.sync_parent(&dest)
    }

    /// [`Store::place_temp`] but for the folder's fsync, left to the caller;
    /// returns where the file went.
    fn move_temp(&self, user: &str, meta: &FileMeta, xfer: &str) -> Result<PathBuf, StoreError> {
        let tmp = self.tmp_path(xfer);
        let dest = self.user_path(user, &meta.path);
        self.make_parent(user, &dest)?;
        if fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
            // A folder that became a file: the state holds nothing inside it
            // (the upload was refused otherwise), so it is empty.
            fs::remove_dir(&dest).context(|| format!("removing folder {} to put a file there", dest.display()))?;
        }
        let f = File::options().write(true).open(&tmp).context(|| format!("opening {}", tmp.display()))?;
        let _ = f.set_modified(from_ms(meta.mtime_ms));
        set_exec(&f, meta.exec).context(|| format!("setting the mode of {}", tmp.display()))?;
        // No fsync of the file here: whoever wrote it synced its bytes before
        // asking for this (the upload's end, a forwarded transfer's end, a
        // fetch's end). The mtime and the mode just set are metadata, which the
        // directory's fsync below commits with the rename (the journal keeps their
        // order). One fsync less per file stored, on every server.
        fs::rename(&tmp, &dest).context(|| format!("moving {} to {}", tmp.display(), dest.display()))?;
        Ok(dest)
    }
}

/// An exclusive lock on `DATA/lock` ([`pidlock`]), held for as long as the server
/// runs: two servers on one data dir would append two histories to one log.
pub struct DataDirLock {
    _lock: nix::fcntl::Flock<File>,
}

/// Takes the lock of data dir `root` (creating the folder if need be), without
/// waiting. Err says why, naming the other server's pid when it is known.
pub fn lock_data_dir(root: &Path) -> Result<DataDirLock, String> {
    create_dirs_durably(root).map_err(|e| format!("cannot create data dir {}: {e}", root.display()))?;
    match pidlock::lock(&root.join("lock")) {
        Ok(lock) => Ok(DataDirLock { _lock: lock }),
        Err(LockError::Held(pid)) => Err(format!(
            "data dir {} is in use by {}; one server per data dir (give this one its own --data)",
            root.display(),
            pidlock::holder("replibox-server", pid)
        )),
        Err(LockError::Failed(why)) => Err(why),
    }
}

/// Gives a stored file mode 0755 when `exec`, else 0644: the execute bit is
/// the only part of a file's mode that syncs, and the data dir holds each
/// user's files as they are on the devices.
fn set_exec(f: &File, exec: bool) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 }))
}

/// True when the file's owner may execute it.
fn is_exec(md: &fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    md.permissions().mode() & 0o100 != 0
}

/// Reads the server id recorded in a data dir.
pub fn load_id(root: &Path) -> Result<Option<ServerId>, StoreError> {
    let path = root.join("server.json");
    match fs::read(&path) {
        Ok(bytes) => {
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(io::Error::other)
                .context(|| format!("reading {}", path.display()))?;
            match v.get("id").and_then(|i| i.as_u64()) {
                Some(id) if id > 0 => Ok(Some(ServerId(id))),
                _ => Err(StoreError {
                    context: format!("reading {}", path.display()),
                    source: io::Error::other("no valid id"),
                }),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context(|| format!("reading {}", path.display())),
    }
}

/// The highest epoch this data dir's server has heard of (`meta/epoch`): a
/// primary started with `-p` takes the one after it, so that a server which
/// learned of a later epoch elsewhere never starts one that already had a primary.
pub fn load_epoch_seen(root: &Path) -> Epoch {
    fs::read_to_string(root.join("meta/epoch")).ok().and_then(|s| s.trim().parse().ok()).map_or(Epoch(0), Epoch)
}

/// Records the highest epoch heard of.
pub fn save_epoch_seen(root: &Path, epoch: Epoch) -> Result<(), StoreError> {
    write_atomically(&root.join("meta/epoch"), format!("{}\n", epoch.0).as_bytes())
}

/// Records a server id in a data dir.
pub fn save_id(root: &Path, id: ServerId) -> Result<(), StoreError> {
    fs::create_dir_all(root).context(|| format!("creating {}", root.display()))?;
    write_atomically(&root.join("server.json"), serde_json::json!({ "id": id.0 }).to_string().as_bytes())
}

/// Writes a small file atomically: temporary file, fsync, rename, fsync the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes).context(|| format!("writing {}", tmp.display()))?;
    f.sync_all().context(|| format!("syncing {}", tmp.display()))?;
    fs::rename(&tmp, path).context(|| format!("moving {} to {}", tmp.display(), path.display()))?;
    if let Some(parent) = path.parent() {
        fsync_dir(parent).context(|| format!("syncing directory {}", parent.display()))?;
    }
    Ok(())
}

/// Metadata for a new version of `path`.
pub fn new_meta(path: &str, version: Version, size: u64, mtime_ms: i64, hash: ContentHash) -> FileMeta {
    FileMeta {
        path: path.to_string(),
        version,
        size,
        mtime_ms,
        hash,
        deleted: false,
        atime_ms: 0,
        ctime_ms: 0,
        exec: false,
        dir: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tombstone;
    use replibox_proto::LogPos;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("replibox-store-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn put(store: &mut Store, state: &mut State, path: &str, bytes: &[u8]) {
        let (xfer, mut f) = store.temps().create().unwrap();
        f.write_all(bytes).unwrap();
        let meta = new_meta(path, state.next_version("u", path), bytes.len() as u64, 1_000, ContentHash::of(bytes));
        let entry = next_entry(state, Change::Put { user: "u".into(), meta, xfer });
        store.commit(state, entry).unwrap();
    }

    #[test]
    fn commit_then_reopen_gives_same_state_and_files() {
        let dir = TempDir::new("reopen");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        put(&mut store, &mut state, "a/b.txt", b"hello");
        put(&mut store, &mut state, "a/b.txt", b"hello again");
        put(&mut store, &mut state, "c", b"");
        let t = tombstone(state.live("u", "c").unwrap(), state.next_version("u", "c"));
        let entry = next_entry(&state, Change::Delete { user: "u".into(), meta: t });
        store.commit(&mut state, entry).unwrap();
        drop(store);
        let (store2, state2, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state2, state);
        assert_eq!(fs::read(store2.user_path("u", "a/b.txt")).unwrap(), b"hello again");
        assert!(!store2.user_path("u", "c").exists());
        assert!(store2.check_against(&state2).unwrap().is_empty());
    }

    #[test]
    fn crash_after_log_before_rename_is_redone_at_start() {
        let dir = TempDir::new("redo");
        let (mut store, _, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        let (xfer, mut f) = store.temps().create().unwrap();
        f.write_all(b"data").unwrap();
        let meta = new_meta("x", Version(1), 4, 5, ContentHash::of(b"data"));
        let entry = Entry {
            pos: LogPos(1),
            epoch: Epoch(0),
            change: Change::Put { user: "u".into(), meta, xfer },
            request: None,
        };
        // Simulate the crash: the entry reaches the log, the rename never happens.
        let mut line = serde_json::to_vec(&entry).unwrap();
        line.push(b'\n');
        store.log.write_all(&line).unwrap();
        drop(store);
        let (store, state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state.pos, LogPos(1));
        assert_eq!(fs::read(store.user_path("u", "x")).unwrap(), b"data");
    }

    #[test]
    fn torn_log_tail_and_abandoned_temporaries_are_dropped() {
        let dir = TempDir::new("torn");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        put(&mut store, &mut state, "keep", b"1");
        let (_xfer, mut f) = store.temps().create().unwrap();
        f.write_all(b"half an upload").unwrap();
        store.log.write_all(b"{\"pos\":2,\"chan").unwrap();
        drop(store);
        let (store, state2, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state2, state);
        assert_eq!(fs::read_dir(dir.0.join("tmp")).unwrap().count(), 0);
        assert!(store.user_path("u", "keep").exists());
        let users: Vec<_> = fs::read_dir(dir.0.join("users/u")).unwrap().collect();
        assert_eq!(users.len(), 1, "no partial file visible");
    }

    /// Only a torn last line may be dropped: a damaged line with entries after it
    /// is refused, loudly, instead of cutting off everything after it.
    #[test]
    fn a_damaged_line_inside_the_log_is_refused_not_cut_off() {
        let dir = TempDir::new("damaged");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        put(&mut store, &mut state, "a", b"1");
        put(&mut store, &mut state, "b", b"2");
        drop(store);
        let log = dir.0.join("meta/log.jsonl");
        let text = fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        fs::write(&log, format!("{{not an entry}}\n{}\n", lines[1])).unwrap();
        let err = Store::open(&dir.0).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("line 1 is damaged"), "{err}");
        // The same damage on the last line is a torn tail: dropped, the rest kept.
        fs::write(&log, format!("{}\n{{not an entry}}\n", lines[0])).unwrap();
        let (_, state2, recent) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state2.pos, LogPos(1));
        assert_eq!(recent.len(), 1, "the entries after the snapshot come back as the recent history");
    }

    /// New folders are made durable in their parents (a folder created for a file
    /// must survive a power loss as surely as the file's entry).
    #[test]
    fn new_folders_are_created_all_the_way_down() {
        let dir = TempDir::new("dirs");
        let deep = dir.0.join("a/b/c");
        create_dirs_durably(&deep).unwrap();
        assert!(deep.is_dir());
        create_dirs_durably(&deep).unwrap();
    }

    /// The lines of the data dir's log.
    fn log_lines(dir: &Path) -> usize {
        fs::read_to_string(dir.join("meta/log.jsonl")).unwrap().lines().count()
    }

    /// The state in the data dir's snapshot.
    fn snapshot(dir: &Path) -> State {
        serde_json::from_slice(&fs::read(dir.join("meta/snapshot.json")).unwrap()).unwrap()
    }

    /// A backup's lacking file whose path holds an empty folder (an older state's)
    /// is cleared, folder included; a rename must not take the folder for it.
    #[test]
    fn dropping_a_lacking_file_clears_an_empty_folder_at_its_path() {
        let dir = TempDir::new("drop-folder");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        put(&mut store, &mut state, "z", b"content");
        put(&mut store, &mut state, "keep", b"kept");
        let z = store.user_path("u", "z");
        fs::remove_file(&z).unwrap();
        fs::create_dir(&z).unwrap();
        assert!(!store.holds_file("u", "z"), "a folder is not a file a rename could move");
        store.drop_content(&state, "u", "z");
        assert!(fs::symlink_metadata(&z).is_err(), "the empty folder at a lacking file's path should be gone");
        store.drop_content(&state, "u", "keep");
        assert!(!store.user_path("u", "keep").exists(), "a lacking file's copy should be gone");
    }

    #[test]
    fn compaction_keeps_state() {
        let dir = TempDir::new("compact");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        put(&mut store, &mut state, "a", b"1");
        assert_eq!(log_lines(&dir.0), 1);
        store.compact(&state).unwrap();
        // The state moved into the snapshot, and the log holds nothing any more.
        assert_eq!(snapshot(&dir.0), state);
        assert_eq!(log_lines(&dir.0), 0);
        put(&mut store, &mut state, "b", b"2");
        assert_eq!(log_lines(&dir.0), 1, "after a compaction the log holds only what came later");
        drop(store);
        let (_s, state2, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state2, state);
    }

    /// The log is compacted by itself once it holds `compact_after` entries.
    #[test]
    fn the_log_is_compacted_when_it_reaches_its_bound() {
        let dir = TempDir::new("compact-trigger");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.compact_after, COMPACT_AFTER);
        store.compact_after = 3;
        put(&mut store, &mut state, "a", b"1");
        put(&mut store, &mut state, "b", b"2");
        assert_eq!(log_lines(&dir.0), 2);
        assert!(!dir.0.join("meta/snapshot.json").exists());
        put(&mut store, &mut state, "c", b"3");
        assert_eq!(log_lines(&dir.0), 0, "the third entry should have compacted the log");
        assert_eq!(snapshot(&dir.0), state);
        put(&mut store, &mut state, "d", b"4");
        assert_eq!(log_lines(&dir.0), 1);
        drop(store);
        let (store, state2, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state2, state);
        assert_eq!(store.log_entries, 1, "a reopened store counts the entries left in its log");
    }

    /// Writes an entry to the log as a crash right after the log's fsync would
    /// leave it: logged, its file-system action never carried out.
    fn log_only(store: &mut Store, entry: &Entry) {
        let mut line = serde_json::to_vec(entry).unwrap();
        line.push(b'\n');
        store.log.write_all(&line).unwrap();
    }

    #[test]
    fn a_delete_logged_but_not_carried_out_is_redone_at_start() {
        let dir = TempDir::new("redo-delete");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        put(&mut store, &mut state, "d/gone.txt", b"to be deleted");
        put(&mut store, &mut state, "kept", b"stays");
        let t = tombstone(state.live("u", "d/gone.txt").unwrap(), state.next_version("u", "d/gone.txt"));
        let entry = next_entry(&state, Change::Delete { user: "u".into(), meta: t });
        log_only(&mut store, &entry);
        state.apply(&entry).unwrap();
        assert!(store.user_path("u", "d/gone.txt").exists(), "the crash came before the file was removed");
        drop(store);
        let (store, state2, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state2, state);
        assert!(!store.user_path("u", "d/gone.txt").exists(), "the delete was not redone");
        assert!(!dir.0.join("users/u/d").exists(), "the folder it left empty should go too");
        assert_eq!(fs::read(store.user_path("u", "kept")).unwrap(), b"stays");
        assert!(store.check_against(&state2).unwrap().is_empty());
    }

    #[test]
    fn a_rename_logged_but_not_carried_out_is_redone_at_start() {
        let dir = TempDir::new("redo-rename");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        put(&mut store, &mut state, "a/from.txt", b"moving");
        let (from, to) = state.check_rename("u", "a/from.txt", "b/c/to.txt", None).unwrap();
        let entry = next_entry(&state, Change::Rename { user: "u".into(), from, to });
        log_only(&mut store, &entry);
        state.apply(&entry).unwrap();
        drop(store);
        let (store, state2, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state2, state);
        assert_eq!(fs::read(store.user_path("u", "b/c/to.txt")).unwrap(), b"moving", "the rename was not redone");
        assert!(!store.user_path("u", "a/from.txt").exists());
        assert!(!dir.0.join("users/u/a").exists(), "the folder it left empty should go too");
        // Redoing it once more (a second crash, before anything else) changes nothing.
        drop(store);
        let (store, state3, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state3, state);
        assert_eq!(fs::read(store.user_path("u", "b/c/to.txt")).unwrap(), b"moving");
    }

    /// A Put entry for `bytes` at `path`, its temporary file written and synced.
    fn put_entry(store: &Store, state: &State, path: &str, bytes: &[u8]) -> Entry {
        let (xfer, mut f) = store.temps().create().unwrap();
        f.write_all(bytes).unwrap();
        sync_temp(&f).unwrap();
        let meta = new_meta(path, state.next_version("u", path), bytes.len() as u64, 1_000, ContentHash::of(bytes));
        next_entry(state, Change::Put { user: "u".into(), meta, xfer })
    }

    /// The next entry of `state` with `change`, no request.
    fn next_entry(state: &State, change: Change) -> Entry {
        Entry { pos: state.pos.next(), epoch: state.epoch, change, request: None }
    }

    fn delete_entry(state: &State, path: &str) -> Entry {
        let t = tombstone(state.live("u", path).unwrap(), state.next_version("u", path));
        next_entry(state, Change::Delete { user: "u".into(), meta: t })
    }

    /// Group commit: entries appended together wait, then one flush makes them
    /// durable and carries out their actions; a group never touches a path twice.
    #[test]
    fn a_group_is_logged_then_carried_out_by_one_flush() {
        let dir = TempDir::new("group");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        put(&mut store, &mut state, "old", b"to be deleted");
        for (path, bytes) in [("a/1", &b"one"[..]), ("a/2", b"two"), ("b/3", b"three")] {
            let e = put_entry(&store, &state, path, bytes);
            assert!(store.can_defer(&e.change));
            store.append_deferred(&state, &e).unwrap();
            state.apply(&e).unwrap();
        }
        let d = delete_entry(&state, "old");
        store.append_deferred(&state, &d).unwrap();
        state.apply(&d).unwrap();
        assert!(store.has_pending());
        assert!(!store.user_path("u", "a/1").exists(), "an action ran before its group was durable");
        assert!(store.user_path("u", "old").exists());
        let again = put_entry(&store, &state, "a/2", b"two, again");
        assert!(!store.can_defer(&again.change), "a group may not touch a path twice");
        store.discard_temp(match &again.change {
            Change::Put { xfer, .. } => xfer,
            _ => unreachable!(),
        });
        store.flush(&state).unwrap();
        assert!(!store.has_pending());
        assert_eq!(fs::read(store.user_path("u", "b/3")).unwrap(), b"three");
        assert!(!store.user_path("u", "old").exists());
        drop(store);
        let (store, state2, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state2, state);
        assert!(store.check_against(&state2).unwrap().is_empty());
    }

    /// A crash after a group's fsync, in the middle of its actions: start-up
    /// redoes the whole group, not only the last entry.
    #[test]
    fn a_group_cut_short_by_a_crash_is_redone_whole_at_start() {
        let dir = TempDir::new("group-crash");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        put(&mut store, &mut state, "d/old", b"to be deleted");
        let mut group = Vec::new();
        for (path, bytes) in [("x/1", &b"one"[..]), ("x/2", b"two"), ("y", b"three")] {
            let e = put_entry(&store, &state, path, bytes);
            state.apply(&e).unwrap();
            group.push(e);
        }
        let d = delete_entry(&state, "d/old");
        state.apply(&d).unwrap();
        group.push(d);
        // The crash: every entry logged and synced, only the first action done.
        for e in &group {
            log_only(&mut store, e);
        }
        store.log.sync_data().unwrap();
        store.act(&state, &group[0].change).unwrap();
        drop(store);
        let (store, state2, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state2, state);
        assert_eq!(fs::read(store.user_path("u", "x/1")).unwrap(), b"one");
        assert_eq!(fs::read(store.user_path("u", "x/2")).unwrap(), b"two", "the group was not redone whole");
        assert_eq!(fs::read(store.user_path("u", "y")).unwrap(), b"three");
        assert!(!store.user_path("u", "d/old").exists());
        assert!(store.check_against(&state2).unwrap().is_empty());
    }

    /// Two deletes in one group, the second emptying the folder the first left
    /// behind (`d/e/b`, then `d/c`): the first's folder to sync, `d`, is gone by
    /// the flush. Found by the chaos test (a new primary stopped with "syncing
    /// directory ...: No such file or directory"); the flush must succeed.
    #[test]
    fn a_group_that_empties_a_folder_a_previous_entry_synced_flushes() {
        let dir = TempDir::new("group-nested-deletes");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        put(&mut store, &mut state, "d/e/b", b"b");
        put(&mut store, &mut state, "d/c", b"c");
        for path in ["d/e/b", "d/c"] {
            let e = delete_entry(&state, path);
            assert!(store.can_defer(&e.change));
            store.append_deferred(&state, &e).unwrap();
            state.apply(&e).unwrap();
        }
        store.flush(&state).unwrap_or_else(|e| panic!("{e}"));
        assert!(!store.user_path("u", "d").exists());
        drop(store);
        let (store, state2, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state2, state);
        assert!(store.check_against(&state2).unwrap().is_empty());
    }

    /// Redoing more than the last entry must never undo a later one: a file
    /// deleted, then uploaded again under the same name (two groups), keeps its
    /// new content across a restart.
    #[test]
    fn start_up_redo_never_undoes_a_later_entry_on_the_same_path() {
        let dir = TempDir::new("group-same-path");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        put(&mut store, &mut state, "p", b"first");
        let gone = delete_entry(&state, "p");
        store.append_deferred(&state, &gone).unwrap();
        state.apply(&gone).unwrap();
        let other = put_entry(&store, &state, "q", b"other");
        store.append_deferred(&state, &other).unwrap();
        state.apply(&other).unwrap();
        let again = put_entry(&store, &state, "p", b"second");
        assert!(!store.can_defer(&again.change), "p's delete is in the group: its upload starts the next one");
        store.flush(&state).unwrap();
        store.append_deferred(&state, &again).unwrap();
        state.apply(&again).unwrap();
        store.flush(&state).unwrap();
        drop(store);
        let (store, state2, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state2, state);
        assert_eq!(fs::read(store.user_path("u", "p")).unwrap(), b"second", "a redone delete removed the new upload");
        assert!(store.check_against(&state2).unwrap().is_empty());
    }

    /// Start-up redoes the log's last entries of distinct paths, finished or not:
    /// an old delete of a file `a`, or an old rename away from `r`, meets the
    /// folder of that name a later entry made. Both are done already; the server
    /// must start (it refused to: EISDIR) and move nothing.
    #[test]
    fn start_up_redo_of_an_old_delete_or_rename_meets_a_folder_made_since() {
        let dir = TempDir::new("redo-folder-since");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        put(&mut store, &mut state, "a", b"a file");
        put(&mut store, &mut state, "r", b"renamed away");
        let gone = delete_entry(&state, "a");
        store.commit(&mut state, gone).unwrap();
        let (from, to) = state.check_rename("u", "r", "c", None).unwrap();
        let moved = next_entry(&state, Change::Rename { user: "u".into(), from, to });
        store.commit(&mut state, moved).unwrap();
        put(&mut store, &mut state, "a/b", b"in the folder a");
        put(&mut store, &mut state, "r/x", b"in the folder r");
        drop(store);
        let (store, state2, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state2, state);
        assert_eq!(fs::read(store.user_path("u", "a/b")).unwrap(), b"in the folder a");
        assert_eq!(fs::read(store.user_path("u", "r/x")).unwrap(), b"in the folder r", "the folder r was moved");
        assert_eq!(fs::read(store.user_path("u", "c")).unwrap(), b"renamed away");
        assert!(store.check_against(&state2).unwrap().is_empty());
    }

    /// Every adopted file a backup fetches uses the transfer name "adopted", one
    /// at a time. After a crash, `tmp/adopted` holds the last one's bytes: redo
    /// places them under the last adopted path only, never an earlier one's.
    #[test]
    fn start_up_redo_gives_a_reused_transfer_name_to_its_last_entry_only() {
        let dir = TempDir::new("redo-adopted");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        let adopted = |store: &mut Store, state: &mut State, path: &str, bytes: &[u8], finish: bool| {
            let tmp = store.tmp_path("adopted");
            fs::write(&tmp, bytes).unwrap();
            let meta = new_meta(path, state.next_version("u", path), bytes.len() as u64, 1_000, ContentHash::of(bytes));
            let e = next_entry(state, Store::adoption("u".into(), meta));
            if finish {
                store.commit(state, e).unwrap();
            } else {
                log_only(store, &e);
                store.log.sync_data().unwrap();
                state.apply(&e).unwrap();
            }
        };
        adopted(&mut store, &mut state, "first", b"first's bytes", true);
        adopted(&mut store, &mut state, "second", b"second's bytes", false);
        drop(store);
        let (store, state2, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state2, state);
        assert_eq!(fs::read(store.user_path("u", "first")).unwrap(), b"first's bytes", "second's bytes went to first");
        assert_eq!(fs::read(store.user_path("u", "second")).unwrap(), b"second's bytes");
        assert!(store.check_against(&state2).unwrap().is_empty());
    }

    /// A crash after the snapshot was written and before the log was emptied
    /// leaves entries in the log that the snapshot already holds: start-up skips
    /// them instead of applying them twice (which `apply` would refuse).
    #[test]
    fn a_crash_between_the_snapshot_and_the_log_truncation_loses_nothing() {
        let dir = TempDir::new("snapshot-crash");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        put(&mut store, &mut state, "a", b"1");
        put(&mut store, &mut state, "b", b"2");
        write_atomically(&dir.0.join("meta/snapshot.json"), &serde_json::to_vec(&state).unwrap()).unwrap();
        assert_eq!(log_lines(&dir.0), 2, "the log was not truncated: the crash came first");
        drop(store);
        let (mut store, mut state2, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state2, state);
        // And the history goes on from there, across another restart.
        put(&mut store, &mut state2, "c", b"3");
        drop(store);
        let (store, state3, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state3, state2);
        assert_eq!(state3.pos, LogPos(3));
        assert_eq!(fs::read(store.user_path("u", "c")).unwrap(), b"3");
    }

    fn commit_change(store: &mut Store, state: &mut State, change: Change) {
        let entry = Entry { pos: state.pos.next(), epoch: state.epoch, change, request: None };
        store.commit(state, entry).unwrap();
    }

    fn mkdir_change(state: &State, path: &str) -> Change {
        let meta = state.check_mkdir("u", path, None).unwrap().unwrap();
        Change::Put { user: "u".into(), meta, xfer: "dir".into() }
    }

    /// A folder entry is an empty folder in `users/u/`: made, kept when the last
    /// file in it goes, removed by its delete (and the empty folders above it
    /// that are no entries), and a crash between the log and the action redoes
    /// either.
    #[test]
    fn folder_entries_are_folders_on_disk_and_are_redone_after_a_crash() {
        let dir = TempDir::new("folders");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        let change = mkdir_change(&state, "a/empty");
        commit_change(&mut store, &mut state, change);
        assert!(dir.0.join("users/u/a/empty").is_dir());
        put(&mut store, &mut state, "a/empty/f", b"x");
        let t = tombstone(state.live("u", "a/empty/f").unwrap(), state.next_version("u", "a/empty/f"));
        commit_change(&mut store, &mut state, Change::Delete { user: "u".into(), meta: t });
        assert!(dir.0.join("users/u/a/empty").is_dir(), "a folder entry outlives the last file in it");
        assert!(store.check_against(&state).unwrap().is_empty(), "a known empty folder is not adopted again");
        // Logged, not carried out: start-up removes it, and a, which is no entry.
        let t = tombstone(state.live("u", "a/empty").unwrap(), state.next_version("u", "a/empty"));
        let entry = next_entry(&state, Change::Delete { user: "u".into(), meta: t });
        log_only(&mut store, &entry);
        state.apply(&entry).unwrap();
        drop(store);
        let (mut store, state2, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state2, state);
        assert!(!dir.0.join("users/u/a").exists(), "the folder's delete was not redone");
        // A mkdir logged, not carried out, is redone too.
        let entry = next_entry(&state, mkdir_change(&state, "b/c"));
        log_only(&mut store, &entry);
        state.apply(&entry).unwrap();
        drop(store);
        let (store, state3, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state3, state);
        assert!(dir.0.join("users/u/b/c").is_dir(), "the mkdir was not redone");
        // An empty folder dropped in by hand is adopted as a folder entry.
        fs::create_dir_all(dir.0.join("users/u/by hand/inner")).unwrap();
        let found = store.check_against(&state3).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].1.dir && found[0].1.path == "by hand/inner");
    }

    /// A file that becomes a folder and a folder that becomes a file: each
    /// replaces the other on disk.
    #[test]
    fn a_folder_entry_replaces_a_file_and_the_reverse() {
        let dir = TempDir::new("folder-file");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        put(&mut store, &mut state, "x", b"file");
        let v = state.live("u", "x").unwrap().version;
        let meta = state.check_mkdir("u", "x", Some(v)).unwrap().unwrap();
        commit_change(&mut store, &mut state, Change::Put { user: "u".into(), meta, xfer: "dir".into() });
        assert!(dir.0.join("users/u/x").is_dir());
        put(&mut store, &mut state, "x", b"a file again");
        assert_eq!(fs::read(dir.0.join("users/u/x")).unwrap(), b"a file again");
    }

    fn entry_of(state: &State, change: Change) -> Entry {
        Entry { pos: state.pos.next(), epoch: state.epoch, change, request: None }
    }

    /// Folder entries in a group commit: a mkdir is logged and waits for the
    /// flush like a file, and the flush's actions keep the folders that are
    /// entries (by the state after the group) while pruning those that are not.
    #[test]
    fn a_group_makes_and_removes_folder_entries_at_its_flush() {
        let dir = TempDir::new("group-folders");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        let change = mkdir_change(&state, "kept");
        commit_change(&mut store, &mut state, change);
        put(&mut store, &mut state, "kept/f", b"in a folder entry");
        put(&mut store, &mut state, "plain/f", b"in a folder of files");
        let change = mkdir_change(&state, "gone/inner");
        commit_change(&mut store, &mut state, change);
        let mkdir = entry_of(&state, mkdir_change(&state, "new/deep"));
        assert!(store.can_defer(&mkdir.change));
        store.append_deferred(&state, &mkdir).unwrap();
        state.apply(&mkdir).unwrap();
        for path in ["kept/f", "plain/f", "gone/inner"] {
            let d = delete_entry(&state, path);
            assert!(store.can_defer(&d.change), "{path}");
            store.append_deferred(&state, &d).unwrap();
            state.apply(&d).unwrap();
        }
        assert!(!dir.0.join("users/u/new/deep").exists(), "a mkdir ran before its group was durable");
        assert!(dir.0.join("users/u/gone/inner").is_dir());
        let again = delete_entry(&state, "new/deep");
        assert!(!store.can_defer(&again.change), "a group may not touch a folder twice");
        store.flush(&state).unwrap();
        assert!(dir.0.join("users/u/new/deep").is_dir(), "the mkdir was not carried out by the flush");
        assert!(dir.0.join("users/u/kept").is_dir(), "a folder entry went with its last file");
        assert!(!dir.0.join("users/u/plain").exists(), "a folder that is no entry outlived its last file");
        assert!(!dir.0.join("users/u/gone").exists(), "a deleted folder entry (or its empty parent) stayed");
        drop(store);
        let (store, state2, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state2, state);
        assert!(store.check_against(&state2).unwrap().is_empty());
    }

    /// A crash after a group's fsync, before any of its actions: start-up redoes
    /// the group's mkdir and folder delete along with its files, and keeps a
    /// folder entry that a redone delete of its last file empties.
    #[test]
    fn a_mkdir_in_a_group_cut_short_by_a_crash_is_redone_at_start() {
        let dir = TempDir::new("group-mkdir-crash");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        let change = mkdir_change(&state, "kept");
        commit_change(&mut store, &mut state, change);
        put(&mut store, &mut state, "kept/f", b"in a folder entry");
        let change = mkdir_change(&state, "gone");
        commit_change(&mut store, &mut state, change);
        let mut group = vec![put_entry(&store, &state, "x/1", b"one")];
        state.apply(&group[0]).unwrap();
        let m = entry_of(&state, mkdir_change(&state, "m/n"));
        state.apply(&m).unwrap();
        group.push(m);
        for path in ["gone", "kept/f"] {
            let d = delete_entry(&state, path);
            state.apply(&d).unwrap();
            group.push(d);
        }
        for e in &group {
            log_only(&mut store, e);
        }
        store.log.sync_data().unwrap();
        drop(store);
        let (store, state2, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state2, state);
        assert_eq!(fs::read(store.user_path("u", "x/1")).unwrap(), b"one");
        assert!(dir.0.join("users/u/m/n").is_dir(), "the group's mkdir was not redone");
        assert!(!dir.0.join("users/u/gone").exists(), "the group's folder delete was not redone");
        assert!(!dir.0.join("users/u/kept/f").exists());
        assert!(dir.0.join("users/u/kept").is_dir(), "a redone delete took a folder entry with it");
        assert!(store.check_against(&state2).unwrap().is_empty());
    }

    #[test]
    fn files_dropped_in_by_hand_are_adopted() {
        let dir = TempDir::new("adopt");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        fs::create_dir_all(dir.0.join("users/u/d")).unwrap();
        fs::write(dir.0.join("users/u/d/new.txt"), b"by hand").unwrap();
        let found = store.check_against(&state).unwrap();
        assert_eq!(found.len(), 1);
        for (user, meta) in found {
            let entry = next_entry(&state, Store::adoption(user, meta));
            store.commit(&mut state, entry).unwrap();
        }
        assert_eq!(state.live("u", "d/new.txt").unwrap().hash, ContentHash::of(b"by hand"));
        assert!(store.check_against(&state).unwrap().is_empty());
    }

    /// Installing a snapshot removes what the primary does not hold, stray entries
    /// of `users/` included, but a symlink is removed as a link: the folder it
    /// points to, which may be anywhere, is never entered.
    #[test]
    fn an_install_removes_what_the_primary_does_not_hold_but_never_follows_a_symlink() {
        let dir = TempDir::new("install-symlink");
        let outside = TempDir::new("install-symlink-outside");
        fs::write(outside.0.join("precious"), b"not the store's").unwrap();
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        put(&mut store, &mut state, "kept", b"held by the primary");
        std::os::unix::fs::symlink(&outside.0, dir.0.join("users/u/link")).unwrap();
        std::os::unix::fs::symlink(&outside.0, dir.0.join("users/toplink")).unwrap();
        fs::write(dir.0.join("users/stray.txt"), b"in users/ itself").unwrap();
        fs::create_dir_all(dir.0.join("users/Not A User/d")).unwrap();
        fs::write(dir.0.join("users/Not A User/d/f"), b"under an invalid username").unwrap();
        let old = state.clone();
        store.install(&old, &state).unwrap();
        assert!(outside.0.join("precious").exists(), "the install deleted a file outside the data dir");
        for gone in ["users/u/link", "users/toplink", "users/stray.txt", "users/Not A User"] {
            assert!(fs::symlink_metadata(dir.0.join(gone)).is_err(), "{gone} is not held by the primary and should go");
        }
        assert!(store.user_path("u", "kept").exists());
    }
}
