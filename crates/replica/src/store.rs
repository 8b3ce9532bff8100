//! The durable store: users' files byte for byte, and the history that explains them.
//!
//! Layout under the data dir:
//! - `users/<user>/<path>`: each user's current files, exactly as uploaded;
//! - `meta/snapshot.json`: the [`State`] at some position (written atomically);
//! - `meta/log.jsonl`: one [`Entry`] per line after the snapshot, fsynced before its
//!   file-system action runs (write-ahead);
//! - `tmp/`: uploads in flight, named by transfer id.
//!
//! Commit order for every entry: append it to the log and fsync, then perform its
//! file-system action (rename a temporary file into place, remove, move), then
//! apply it to the in-memory state. Entries are committed one at a time, so after a
//! crash only the last entry of the log can have an unfinished action; start-up
//! redoes it, and every action is written so that redoing a finished one is a no-op.

use crate::state::{Change, Entry, State};
use replibox_proto::times::{from_ms, to_ms, FileTimes};
use replibox_proto::{ContentHash, Epoch, FileMeta, ServerId, Version};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// After this many log entries the state is written to a snapshot and the log emptied.
const COMPACT_AFTER: usize = 10_000;

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
/// for everything but folders in each valid user's folder, and `stray(entry)` for
/// anything else directly in `users/` (a file, a link, a folder whose name is not
/// a valid username).
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
                if ft.is_dir() {
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
    next_xfer: AtomicU64,
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
            next_xfer: AtomicU64::new(0),
        };
        if let Some(entry) = recent.last() {
            store.act(&entry.change)?;
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

    /// Creates a temporary file for an incoming transfer; returns its id and handle.
    pub fn create_temp(&self) -> Result<(String, File), StoreError> {
        let n = self.next_xfer.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let xfer = format!("x{}-{nanos}-{n}", std::process::id());
        let path = self.tmp_path(&xfer);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .context(|| format!("creating {}", path.display()))?;
        Ok((xfer, file))
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
        if let Change::Put { xfer, .. } = &entry.change {
            // The temporary file's name must be durable before the entry is: redo
            // after a power loss takes a missing temporary file for a finished move.
            if self.tmp_path(xfer).exists() {
                let tmp = self.root.join("tmp");
                fsync_dir(&tmp)
                    .context(|| format!("syncing directory {}", tmp.display()))
                    .map_err(CommitError::Unlogged)?;
            }
        }
        self.append(state, entry).map_err(CommitError::Unlogged)?;
        self.act(&entry.change).map_err(CommitError::Logged)
    }

    /// Writes the state to a snapshot and empties the log once the log holds
    /// enough entries. A failed compaction leaves the log whole: not fatal.
    pub fn maybe_compact(&mut self, state: &State) {
        if self.log_entries >= self.compact_after {
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

    /// Appends an entry to the log and fsyncs it; on failure the log is cut back
    /// to where it was, so no torn line is left before later entries.
    fn append(&mut self, state: &State, entry: &Entry) -> Result<(), StoreError> {
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
        let written = self.log.write_all(&line).and_then(|_| self.log.sync_data());
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
    fn act(&self, change: &Change) -> Result<(), StoreError> {
        match change {
            Change::Put { user, meta, xfer } => {
                if !self.tmp_path(xfer).exists() {
                    return Ok(()); // already moved into place
                }
                self.place_temp(user, meta, xfer)?;
            }
            Change::Delete { user, meta } => {
                let path = self.user_path(user, &meta.path);
                match fs::remove_file(&path) {
                    Ok(()) => {
                        self.sync_parent(&path)?;
                        self.prune_empty_dirs(user, &path);
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).context(|| format!("removing {}", path.display())),
                }
            }
            Change::Rename { user, from, to } => {
                let src = self.user_path(user, &from.path);
                let dest = self.user_path(user, &to.path);
                if src.exists() {
                    self.make_parent(user, &dest)?;
                    fs::rename(&src, &dest).context(|| format!("moving {} to {}", src.display(), dest.display()))?;
                    self.sync_parent(&dest)?;
                    self.sync_parent(&src)?;
                    self.prune_empty_dirs(user, &src);
                }
            }
            Change::Login { .. }
            | Change::Logout { .. }
            | Change::ClearSessions
            | Change::NewEpoch { .. }
            | Change::Join { .. }
            | Change::Leave { .. }
            | Change::ReserveId { .. } => {}
        }
        Ok(())
    }

    fn make_parent(&self, user: &str, dest: &Path) -> Result<(), StoreError> {
        let parent = dest.parent().unwrap_or(&self.root);
        create_dirs_durably(parent).context(|| format!("creating {} for user {user}", parent.display()))
    }

    fn sync_parent(&self, path: &Path) -> Result<(), StoreError> {
        let parent = path.parent().unwrap_or(&self.root);
        fsync_dir(parent).context(|| format!("syncing directory {}", parent.display()))
    }

    /// Removes directories left empty below the user's directory.
    fn prune_empty_dirs(&self, user: &str, removed: &Path) {
        let top = self.root.join("users").join(user);
        let mut dir = removed.parent();
        while let Some(d) = dir {
            if d == top || !d.starts_with(&top) || fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
    }

    /// Opens a user's file for reading. The handle keeps reading the version it
    /// opened even if a newer one is renamed over it meanwhile.
    pub fn open_file(&self, user: &str, path: &str) -> Result<File, StoreError> {
        let p = self.user_path(user, path);
        File::open(&p).context(|| format!("opening {}", p.display()))
    }

    /// Access and status-change times of a user's file, in ms.
    pub fn times(&self, user: &str, path: &str) -> (i64, i64) {
        match fs::metadata(self.user_path(user, path)) {
            Ok(m) => {
                let t = FileTimes::of(&m);
                (t.atime_ms, t.ctime_ms)
            }
            Err(_) => (0, 0),
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
            if known.is_some_and(|m| m.size == md.len() && m.mtime_ms == mtime) {
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
            };
            found.push((user.to_string(), meta));
            Ok(())
        })?;
        for (user, files) in &state.files {
            for meta in files.values().filter(|m| !m.deleted) {
                if !self.user_path(user, &meta.path).is_file() {
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
                let disk = self.user_path(user, &meta.path);
                let same = if interrupted {
                    // The old state came from an unfinished install: only the
                    // content itself can be trusted.
                    ContentHash::of_file(&disk).is_ok_and(|h| h == meta.hash)
                } else {
                    old.live(user, &meta.path).is_some_and(|o| o.version == meta.version && o.hash == meta.hash)
                };
                let on_disk = fs::metadata(&disk).is_ok_and(|md| {
                    md.is_file() && md.len() == meta.size && md.modified().map(to_ms).ok() == Some(meta.mtime_ms)
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
        walk_users(&self.root.join("users"), stray, |user, rel, e, _| {
            if new.live(user, &rel).is_none() {
                let p = e.path();
                log::info!("removing file the primary does not hold: {}", p.display());
                let _ = fs::remove_file(&p);
                self.prune_empty_dirs(user, &p);
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
    /// could not get: the state keeps describing it until a later entry).
    pub fn drop_content(&self, user: &str, path: &str) {
        let p = self.user_path(user, path);
        if fs::remove_file(&p).is_ok() {
            // Durable before anything that relies on it (the marker's removal).
            let _ = self.sync_parent(&p);
            self.prune_empty_dirs(user, &p);
        }
    }

    /// Puts the bytes of temporary file `xfer` in place as `meta` (mtime set, synced,
    /// renamed, directory synced). Also used without a log entry for a file a backup
    /// fetched: the state already describes it; only its content was missing.
    pub fn place_temp(&self, user: &str, meta: &FileMeta, xfer: &str) -> Result<(), StoreError> {
        let tmp = self.tmp_path(xfer);
        let dest = self.user_path(user, &meta.path);
        self.make_parent(user, &dest)?;
        let f = File::options().write(true).open(&tmp).context(|| format!("opening {}", tmp.display()))?;
        let _ = f.set_modified(from_ms(meta.mtime_ms));
        f.sync_all().context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, &dest).context(|| format!("moving {} to {}", tmp.display(), dest.display()))?;
        self.sync_parent(&dest)
    }
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
    FileMeta { path: path.to_string(), version, size, mtime_ms, hash, deleted: false, atime_ms: 0, ctime_ms: 0 }
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
        let (xfer, mut f) = store.create_temp().unwrap();
        f.write_all(bytes).unwrap();
        let meta = new_meta(path, state.next_version("u", path), bytes.len() as u64, 1_000, ContentHash::of(bytes));
        let entry = Entry {
            pos: state.pos.next(),
            epoch: state.epoch,
            change: Change::Put { user: "u".into(), meta, xfer },
            request: None,
        };
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
        let entry = Entry {
            pos: state.pos.next(),
            epoch: state.epoch,
            change: Change::Delete { user: "u".into(), meta: t },
            request: None,
        };
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
        let (xfer, mut f) = store.create_temp().unwrap();
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
        let (_xfer, mut f) = store.create_temp().unwrap();
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
        let entry = Entry {
            pos: state.pos.next(),
            epoch: state.epoch,
            change: Change::Delete { user: "u".into(), meta: t },
            request: None,
        };
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
        let entry = Entry {
            pos: state.pos.next(),
            epoch: state.epoch,
            change: Change::Rename { user: "u".into(), from, to },
            request: None,
        };
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

    #[test]
    fn files_dropped_in_by_hand_are_adopted() {
        let dir = TempDir::new("adopt");
        let (mut store, mut state, _) = Store::open(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        fs::create_dir_all(dir.0.join("users/u/d")).unwrap();
        fs::write(dir.0.join("users/u/d/new.txt"), b"by hand").unwrap();
        let found = store.check_against(&state).unwrap();
        assert_eq!(found.len(), 1);
        for (user, meta) in found {
            let entry =
                Entry { pos: state.pos.next(), epoch: state.epoch, change: Store::adoption(user, meta), request: None };
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
