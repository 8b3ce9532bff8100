//! The sync engine: one thread that owns the index and the sync dir's state.
//!
//! It reacts to three inputs: commands from the CLI, events from the front-end
//! (notices pushed by the server, connection lost and regained) and events from
//! the watcher. Because one thread does all of it, a file the engine is placing
//! from the server is recorded in the index before the watcher's event for it is
//! looked at, which is what keeps received changes from bouncing back (echo
//! suppression): the scan finds the file exactly as the index says.
//!
//! Two guards stand before anything is sent or removed: the ignore rules (an
//! ignored path is left alone in both directions) and the folder marker (a sync
//! dir that vanished or was unmounted stops the engine instead of reading as
//! "every file was deleted").

use crate::activity::{Batch, Done};
use crate::console::Console;
use crate::index::{Index, Synced};
use crate::pass;
use crate::progress::{self, Progress};
use crate::reconcile::{conflicted_name, decide, locally_changed, Action};
use crate::rules::{Rules, RULES_FILE};
use crate::scan::{self, LocalFile};
use crate::status::{plural, Status};
use crate::syncdir::Marker;
use crate::timefmt;
use crate::watcher::WatchEvent;
use crossbeam_channel::{select, Receiver, Sender};
use replibox_frontend::{DownloadItem, FrontError, FrontEvent, Frontend, UploadItem};
use replibox_proto::{ContentHash, FileMeta, Notice, Op, OpResult, Version};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The index is written at most this often. Writing it is a whole file and two
/// fsyncs: after every received file, 10,000 files arriving one by one cost
/// minutes (the file grows with each). An index that lags by this much after a
/// crash is harmless: reconciliation compares by content what it does not know,
/// as it does for a device that lost its index.
const INDEX_SAVE_EVERY: Duration = Duration::from_millis(500);
/// Files smaller than this go up and come down in batches, several requests in
/// flight at once.
const BATCH_FILE_MAX: u64 = 1 << 20;
/// Files per batch of downloads (each has its temporary file open until the
/// batch is placed).
const BATCH_FILES: usize = 256;
/// Most files per batch of uploads. A batch waits for its last answers before
/// the next one starts (a gap of one replication, tens of ms, in a burst), so
/// the bigger the better; each of its files is open until the batch ends, so
/// it takes at most a quarter of the open-file limit ([`upload_batch_files`]).
const UPLOAD_BATCH_MAX: usize = 2048;
/// Notices taken off the queue at once, so that a burst's files come down in
/// batches instead of one round trip and one fsync after another.
const NOTICES_AT_ONCE: usize = 4 * BATCH_FILES;
/// Quiet time after the last watcher event before the sync dir is scanned. Not
/// below [`CLOSE_MARGIN`]: a pass sooner would only postpone the file just
/// closed. (20 ms until issue 7: the 10 ms more were half of a small file's trip
/// to the other device, 27 -> 18 ms median in the same-machine benchmark.)
const DEBOUNCE: Duration = Duration::from_millis(10);
/// Longest a scan waits after the first event it is for, however many follow (a
/// file written without pause must not hold back every other change).
const DEBOUNCE_MAX: Duration = Duration::from_millis(200);
/// A file modified more recently than this is still being written: wait.
const SETTLE: Duration = Duration::from_millis(200);
/// A file its writer has closed is settled once its mtime is this old.
const CLOSE_MARGIN: Duration = Duration::from_millis(10);
/// A file still open for writing this long after its last event is taken as is.
const WRITER_GRACE: Duration = Duration::from_secs(5);
/// A full rescan runs this often even without events, in case any were lost.
const RESCAN_EVERY: Duration = Duration::from_secs(30);
/// The pause before a failed pass is tried again; it doubles after each failure
/// in a row, up to [`RETRY_MAX`], and a pass that succeeds starts it over.
const RETRY_FIRST: Duration = Duration::from_millis(500);
/// The longest pause between two passes that fail.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Local deletions are sent only once no new one has been seen for this long.
/// `rm -rf` of a whole sync dir removes `.replibox/` (the marker) at some point of
/// its walk, possibly last: while files keep vanishing, the engine waits, and
/// once the marker is gone it stops without sending a single delete.
const DELETE_GRACE: Duration = Duration::from_secs(1);
/// Sets the rescan period in milliseconds instead, for tests only: a period longer
/// than a test's deadlines shows a live-sync test that passes only thanks to the
/// rescan (a lost watcher event), and a short one tests the rescan itself.
pub const RESCAN_ENV: &str = "REPLIBOX_RESCAN_MS";

/// The rescan period: [`RESCAN_EVERY`], or what [`RESCAN_ENV`] says (at most a
/// week, so that adding it to an `Instant` cannot overflow).
fn rescan_period() -> Duration {
    let Ok(value) = std::env::var(RESCAN_ENV) else { return RESCAN_EVERY };
    match value.parse::<u64>() {
        Ok(ms) if ms > 0 => Duration::from_millis(ms.min(7 * 24 * 3600 * 1000)),
        _ => {
            log::warn!("ignoring {RESCAN_ENV}={value:?}: not a positive number of milliseconds");
            RESCAN_EVERY
        }
    }
}

/// A command for the engine from the CLI.
pub enum Command {
    /// `upload PATH`: put a file from anywhere into the sync dir and the server.
    Upload {
        /// The file to upload.
        source: PathBuf,
        /// Outcome line, or error line.
        reply: Sender<Result<String, String>>,
    },
    /// `delete NAME`.
    Delete {
        /// Path inside the sync dir.
        name: String,
        /// Outcome.
        reply: Sender<Result<String, String>>,
    },
    /// `get_sync_dir`: reconcile everything with the server now.
    SyncAll {
        /// Outcome.
        reply: Sender<Result<String, String>>,
    },
    /// End the engine.
    Stop,
}

/// Counts of what a reconciliation did.
#[derive(Default, Debug)]
struct Tally {
    uploaded: usize,
    downloaded: usize,
    deleted_remote: usize,
    deleted_local: usize,
    conflicts: usize,
    failed: usize,
    /// Local deletions held back by [`DELETE_GRACE`].
    deferred: usize,
}

impl Tally {
    /// The `get_sync_dir` outcome's counts.
    fn summary(&self) -> String {
        let mut out = format!(
            "{} uploaded, {} downloaded, {} deleted there, {} deleted here, {} conflict{}",
            self.uploaded,
            self.downloaded,
            self.deleted_remote,
            self.deleted_local,
            self.conflicts,
            plural(self.conflicts)
        );
        if self.failed > 0 {
            out.push_str(&format!(", {} refused", self.failed));
        }
        if self.deferred > 0 {
            out.push_str(&format!(", {} deletion{} to send in a moment", self.deferred, plural(self.deferred)));
        }
        out
    }
}

/// What the engine needs besides its sync dir.
pub struct Setup {
    /// The front-end, shared with the CLI.
    pub front: Frontend,
    /// This device's name, for conflicted copies.
    pub device_name: String,
    /// Where activity lines and progress go.
    pub console: Console,
    /// Where the engine publishes what waits.
    pub status: Status,
    /// The sync dir as it was at start-up.
    pub marker: Marker,
    /// Told once, with the reason, when the engine stops on its own (the sync dir
    /// vanished).
    pub stopped: Sender<String>,
}

/// The engine.
pub struct Engine {
    root: PathBuf,
    tmp: PathBuf,
    front: Frontend,
    index: Index,
    device_name: String,
    console: Console,
    status: Status,
    marker: Marker,
    rules: Arc<Rules>,
    /// Routine activity lines waiting to be printed together.
    batch: Batch,
    /// Indexed paths seen without a file (deleted here, not yet sent).
    missing: BTreeSet<String>,
    /// When a path last joined `missing`.
    last_new_missing: Option<Instant>,
    /// The login's reconciliation is done: later ones hold deletions back.
    reconciled_once: bool,
    /// Why the engine must stop (the sync dir vanished), once known.
    stop: Option<String>,
    stopped_tx: Sender<String>,
    /// Local states the server refused; not retried until the file changes again.
    refused: BTreeMap<String, LocalFile>,
    /// Paths with a write in progress (an inotify modify without its close-write yet).
    writing: HashMap<String, Instant>,
    /// Paths whose writer closed them after their last modification: settled now,
    /// whatever their mtime says.
    closed: BTreeSet<String>,
    /// Paths not synced because a folder on their way is a symlink (reported once).
    unconfined: BTreeSet<String>,
    /// Folders deleted on another device that could not be removed here because
    /// something is still inside (files this device has not synced, ignored
    /// files, or synced files whose deletes have not arrived yet). Their index
    /// entry stays, so that they are not sent back up as new folders; they go
    /// when the last thing inside goes ([`Engine::prune`]), or stay for good
    /// when what is inside does.
    doomed: BTreeSet<String>,
    /// When the next local pass is due.
    pass_due: Option<Instant>,
    /// The first watcher event the next pass is for.
    dirty_since: Option<Instant>,
    /// Set when notices may have been missed: reconcile with a full listing.
    need_full: bool,
    last_full: Instant,
    /// How often a full reconciliation runs when nothing else is due.
    rescan_every: Duration,
    /// Passes that failed in a row: the next retry waits longer.
    failed_passes: u32,
    /// When the index was last written (or, after a failure, a later time that
    /// puts the next try off).
    index_saved: Instant,
    /// Why the index could not be saved, said once, until it can again.
    index_trouble: Option<String>,
}

/// `what path: error`, said as `this device is out of space: ...` when it is.
fn io_err(what: &str, path: &Path, e: io::Error) -> String {
    let out = if replibox_frontend::out_of_space(&e) { "this device is out of space: " } else { "" };
    format!("{out}{what} {}: {e}", path.display())
}

/// The log target of [`acknowledged`]: one line per change of this device that
/// the server reported stored, for fault-injection tests that keep a ledger of
/// them (`RUST_LOG=replibox::ledger=debug`). Activity lines are no ledger: they
/// are batched and summarised.
pub const LEDGER_TARGET: &str = "replibox::ledger";

/// Logs (at debug, under [`LEDGER_TARGET`]) that the server acknowledged `op` on
/// a path with `meta` as its new metadata.
fn acknowledged(op: &str, meta: &FileMeta) {
    log::debug!(
        target: LEDGER_TARGET,
        "acknowledged op={op} path={:?} version={} deleted={} size={} hash={}",
        meta.path,
        meta.version,
        meta.deleted,
        meta.size,
        meta.hash
    );
}

fn mtime_ms_of(ns: i128) -> i64 {
    (ns.div_euclid(1_000_000)) as i64
}

/// Counts the outcomes of uploads in a pass (and what is left to send); the first
/// failure stops the pass, after every outcome before and after it is counted (a
/// batch's later files may be stored although an earlier one could not be).
fn count_outcomes(
    engine: &mut Engine,
    uploads: &mut usize,
    to_send: &mut usize,
    outcomes: Vec<Result<Option<bool>, FrontError>>,
) -> Result<(), FrontError> {
    let mut first_error = None;
    for outcome in outcomes {
        match outcome {
            Ok(Some(true)) => *uploads += 1,
            Ok(Some(false)) => engine.status.update_local(|s| s.refused += 1),
            Ok(None) => {}
            Err(e) => {
                first_error.get_or_insert(e);
                continue;
            }
        }
        *to_send = to_send.saturating_sub(1);
    }
    let left = *to_send;
    engine.status.update_local(|s| s.to_send = left);
    first_error.map_or(Ok(()), Err)
}

/// Checks a path the server sent before it is joined to the sync dir.
fn trusted_path(path: &str) -> bool {
    match replibox_proto::validate_path(path) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("ignoring a change from the server: {e}");
            false
        }
    }
}

impl Engine {
    /// An engine over `root` (the sync dir, which must exist).
    pub fn new(root: PathBuf, setup: Setup) -> io::Result<Engine> {
        let meta = root.join(".replibox");
        let tmp = meta.join("tmp");
        fs::create_dir_all(&tmp)?;
        for e in fs::read_dir(&tmp)?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        // Only after the clean-up above, which would take their files away.
        setup.front.keep_early_in(tmp.clone());
        let index = Index::load(meta.join("index.json"));
        let rules = Arc::new(Rules::load(&root));
        for problem in &rules.problems {
            setup.console.activity(problem.clone());
        }
        setup.front.want_early_only(early_wanted(&rules));
        Ok(Engine {
            root,
            tmp,
            front: setup.front,
            index,
            device_name: setup.device_name,
            console: setup.console,
            status: setup.status,
            marker: setup.marker,
            rules,
            batch: Batch::default(),
            missing: BTreeSet::new(),
            last_new_missing: None,
            reconciled_once: false,
            stop: None,
            stopped_tx: setup.stopped,
            refused: BTreeMap::new(),
            writing: HashMap::new(),
            closed: BTreeSet::new(),
            dirty_since: None,
            unconfined: BTreeSet::new(),
            doomed: BTreeSet::new(),
            pass_due: None,
            need_full: false,
            last_full: Instant::now(),
            rescan_every: rescan_period(),
            failed_passes: 0,
            index_saved: Instant::now(),
            index_trouble: None,
        })
    }

    /// Runs until [`Command::Stop`], until the command channel closes, or until
    /// the sync dir vanishes (then `Setup::stopped` is told why). `watch` and
    /// `lost` are the receiving ends of the watcher's [`crate::watcher::Hints`].
    pub fn run(
        mut self,
        commands: Receiver<Command>,
        front: Receiver<FrontEvent>,
        (watch, lost): (Receiver<WatchEvent>, Receiver<()>),
    ) {
        loop {
            if let Some(why) = self.stop.take() {
                self.flush_activity();
                // The index is not saved: its folder is gone, or belongs to
                // another sync dir now.
                let _ = self.stopped_tx.send(why);
                return;
            }
            let now = Instant::now();
            if self.batch.due().is_some_and(|at| at <= now) {
                self.flush_activity();
            }
            let due = self.pass_due.unwrap_or(self.last_full + self.rescan_every);
            let mut wait = due.saturating_duration_since(now);
            if let Some(at) = self.batch.due() {
                wait = wait.min(at.saturating_duration_since(now));
            }
            if self.index.is_dirty() {
                let at = self.index_saved + INDEX_SAVE_EVERY;
                if at <= now {
                    self.save_index();
                } else {
                    wait = wait.min(at - now);
                }
            }
            select! {
                recv(commands) -> cmd => match cmd {
                    Ok(Command::Stop) | Err(_) => break,
                    Ok(cmd) => self.command(cmd),
                },
                recv(front) -> ev => match ev {
                    Ok(FrontEvent::Notice(n)) => {
                        // A burst's notices are taken together: its files come
                        // down in batches.
                        let mut notices = vec![n];
                        let mut next = None;
                        while notices.len() < NOTICES_AT_ONCE {
                            match front.try_recv() {
                                Ok(FrontEvent::Notice(n)) => notices.push(n),
                                Ok(ev) => {
                                    next = Some(ev);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        self.notices(notices);
                        if let Some(ev) = next {
                            self.front_event(ev);
                        }
                    }
                    Ok(ev) => self.front_event(ev),
                    Err(_) => {}
                },
                recv(watch) -> ev => if let Ok(ev) = ev { self.watched(ev) },
                recv(lost) -> ev => if ev.is_ok() { self.hints_lost(&watch) },
                default(wait) => {
                    if Instant::now() < due {
                        continue; // woken to print the activity batch
                    }
                    self.dirty_since = None;
                    self.reload_rules();
                    if self.need_full || self.pass_due.is_none() {
                        if let Err(e) = self.sync_all() {
                            // The retry is a full pass again: a local pass would
                            // not fetch what this one could not (and, succeeding,
                            // would cut the back-off short).
                            self.need_full = true;
                            self.postponed(e);
                        }
                    } else {
                        self.pass_due = None;
                        self.local_pass();
                    }
                }
            }
        }
        self.flush_activity();
        let _ = self.index.save();
    }

    /// Handles what the front-end says besides notices.
    fn front_event(&mut self, ev: FrontEvent) {
        match ev {
            FrontEvent::Notice(n) => self.notices(vec![n]),
            // The relay in status.rs has told the user already.
            FrontEvent::Lost(_) | FrontEvent::NoPrimary { .. } => {}
            FrontEvent::Reconnected { .. } => {
                self.need_full = true;
                // Now, unless a failed pass set a back-off: a request that
                // failed part-way drops the connection, and its retry must
                // not come back at once to fail again.
                let now = Instant::now();
                self.pass_due = Some(self.pass_due.map_or(now, |due| due.max(now)));
            }
        }
    }

    /// Writes the index now (it is written at most every [`INDEX_SAVE_EVERY`]).
    /// A failure is said once (again only if it changes), and tried again after
    /// [`RETRY_MAX`] rather than every [`INDEX_SAVE_EVERY`]: a full disk must not
    /// fill the log with one line every half second.
    fn save_index(&mut self) {
        self.index_saved = Instant::now();
        match self.index.save() {
            Ok(()) => {
                if self.index_trouble.take().is_some() {
                    log::info!("the index is saved again");
                }
            }
            Err(e) => {
                let why = io_err("cannot save the index", self.index.file(), e);
                if self.index_trouble.as_ref() != Some(&why) {
                    log::error!("{why}; trying again every {} s", RETRY_MAX.as_secs());
                    self.index_trouble = Some(why);
                }
                self.index_saved += RETRY_MAX.saturating_sub(INDEX_SAVE_EVERY);
            }
        }
    }

    /// Prints the routine activity lines collected so far.
    fn flush_activity(&mut self) {
        for line in self.batch.take_lines() {
            self.console.activity(line);
        }
    }

    /// A pass could not finish (the server unreachable or out of space, most
    /// often): the local changes stay where they are, and it is tried again
    /// after a pause that doubles with each failure in a row.
    fn postponed(&mut self, e: FrontError) {
        if self.stop.is_some() {
            return;
        }
        let pause = self.retry_pause();
        self.console.activity(format!("sync postponed: {e}; trying again in {:.1} s", pause.as_secs_f64()));
        self.pass_due = Some(Instant::now() + pause);
    }

    /// The pause before the next try after one more failure in a row.
    fn retry_pause(&mut self) -> Duration {
        let pause = RETRY_FIRST.saturating_mul(1 << self.failed_passes.min(8)).min(RETRY_MAX);
        self.failed_passes = self.failed_passes.saturating_add(1);
        pause
    }

    /// True while the sync dir is the one the client started on. Otherwise it
    /// records why the engine must stop, says so, and returns false: nothing may
    /// be sent, written or removed from then on.
    fn guard(&mut self) -> bool {
        if self.stop.is_some() {
            return false;
        }
        match self.marker.check() {
            Ok(()) => true,
            Err(why) => {
                // Said once, by the session, as its last line.
                self.stop = Some(format!("{why}; stopped syncing, and no deletion was sent to the server"));
                false
            }
        }
    }

    /// Reads `.replibox-ignore` again if it changed, and then reconciles fully: a
    /// path no longer ignored must be brought into agreement both ways.
    fn reload_rules(&mut self) {
        if !self.rules.stale(&self.root) {
            return;
        }
        self.rules = Arc::new(Rules::load(&self.root));
        self.front.want_early_only(early_wanted(&self.rules));
        for problem in &self.rules.problems {
            self.console.activity(problem.clone());
        }
        self.console.activity(format!("ignore rules reloaded from {RULES_FILE}"));
        self.need_full = true;
    }

    fn watched(&mut self, ev: WatchEvent) {
        match ev {
            WatchEvent::Writing(p) => {
                if self.rules.ignores(&p, false) {
                    return; // an editor's swap file is written all the time
                }
                self.closed.remove(&p);
                self.writing.insert(p, Instant::now());
            }
            WatchEvent::Closed(p) => {
                if self.rules.ignores(&p, false) {
                    return;
                }
                self.writing.remove(&p);
                let indexed =
                    self.index.get(&p).is_some_and(|i| scan::stat(&self.root, &p).is_some_and(|l| i.matches(&l)));
                if indexed {
                    // Nothing to send: most often the hint of a file the engine
                    // itself renamed into place, which the index holds already.
                    // A pass for it would rescan the whole sync dir, once per
                    // received file: a burst of n files cost n scans of n files.
                    // (Not a path the index does not hold: a folder moved in
                    // gives one hint, for the folder.)
                    return;
                }
                self.closed.insert(p);
            }
            WatchEvent::Changed | WatchEvent::RulesChanged => {}
        }
        let now = Instant::now();
        let first = *self.dirty_since.get_or_insert(now);
        // The cap bounds the debounce only: a later pass set on purpose (a back-off
        // after a failure, a settle wait) stays as it is.
        let due = (now + DEBOUNCE).min(first + DEBOUNCE_MAX);
        self.pass_due = Some(self.pass_due.map_or(due, |d| d.max(due)));
    }

    /// The watcher dropped hints while this thread was busy. The hints still
    /// queued came before the drop and are taken first. Then what is known of
    /// writers is forgotten, since a dropped `Writing` or `Closed` hint may
    /// have changed it: every changed file settles by its mtime alone (the 200 ms
    /// of a file whose events were lost), never by a close that a later write
    /// undid, nor waits on a writer whose close went missing. A pass then finds
    /// whatever the dropped hints said.
    fn hints_lost(&mut self, watch: &Receiver<WatchEvent>) {
        for ev in watch.try_iter() {
            self.watched(ev);
        }
        self.closed.clear();
        self.writing.clear();
        self.watched(WatchEvent::Changed);
    }

    fn command(&mut self, cmd: Command) {
        // Lines from before the command come out before its outcome.
        self.flush_activity();
        let gone = |e: &Option<String>| e.clone().unwrap_or_default();
        match cmd {
            Command::Upload { source, reply } => {
                let answer = if self.guard() { self.upload_from(&source) } else { Err(gone(&self.stop)) };
                let _ = reply.send(answer);
            }
            Command::Delete { name, reply } => {
                let answer = if self.guard() { self.delete_named(&name) } else { Err(gone(&self.stop)) };
                let _ = reply.send(answer);
            }
            Command::SyncAll { reply } => {
                self.reload_rules();
                let answer = self
                    .sync_all()
                    .map(|t| format!("sync dir {}: in sync with the server ({})", self.root.display(), t.summary()))
                    .map_err(|e| e.to_string());
                self.flush_activity();
                let _ = reply.send(answer);
            }
            Command::Stop => {}
        }
    }

    /// Notes which indexed paths have no file now. A path not seen missing before
    /// restarts the deletion grace.
    fn note_missing(&mut self, deleted: &BTreeSet<String>) {
        for d in deleted {
            if !self.missing.contains(d) {
                self.missing.insert(d.clone());
                self.last_new_missing = Some(Instant::now());
            }
        }
        self.missing.retain(|p| deleted.contains(p));
    }

    /// None when local deletions may be sent now; otherwise how long they must
    /// still wait. The login's reconciliation sends at once what was deleted while
    /// the client was not running: the marker was checked just before.
    fn deletes_wait(&self) -> Option<Duration> {
        if !self.reconciled_once {
            return None;
        }
        let age = self.last_new_missing?.elapsed();
        (age < DELETE_GRACE).then(|| DELETE_GRACE - age)
    }

    /// Indexed paths with no local file, the ignored ones left out (they are left
    /// alone, never deleted anywhere).
    fn deleted_here(&self, local: &BTreeMap<String, LocalFile>) -> BTreeSet<String> {
        self.index
            .entries
            .iter()
            .filter(|(p, i)| !local.contains_key(*p) && !self.rules.ignores(p, i.dir))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Leaves out of a scan the folders that sync as their contents only: a
    /// folder with something in it exists everywhere because of what is in it,
    /// so it becomes an entry of its own only when it is empty (a folder the
    /// user made, or emptied), or when it is one already (in the index, or on
    /// the server: `server`). A folder made here to hold a received file thus
    /// never goes back up as a new folder.
    fn folders_that_sync(&self, local: &mut BTreeMap<String, LocalFile>, server: Option<&BTreeMap<String, FileMeta>>) {
        let holding: Vec<String> = local
            .iter()
            .filter(|(p, l)| {
                let prefix = format!("{p}/");
                l.dir && local.range(prefix.clone()..).next().is_some_and(|(q, _)| q.starts_with(&prefix))
            })
            .map(|(p, _)| p.clone())
            .collect();
        for p in holding {
            let known = self.index.get(&p).is_some_and(|i| i.dir)
                || server.and_then(|s| s.get(&p)).is_some_and(|m| m.dir && !m.deleted);
            if !known {
                local.remove(&p);
            }
        }
    }

    fn abs(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Reconciles every path with a full listing from the server.
    fn sync_all(&mut self) -> Result<Tally, FrontError> {
        // The scan comes first: a vanished sync dir is found before the server is
        // asked anything, and `status` can count local changes while the listing
        // waits for a server that does not answer.
        let scanned = scan::scan(&self.root, &self.rules);
        if !self.guard() {
            return Err(FrontError::Local(self.stop.clone().unwrap_or_default()));
        }
        // This copy of the scan goes before the listing comes: with 100,000
        // files, each of the maps here holds some 15 MiB (the copies of a full
        // pass once made a device's peak memory).
        {
            let mut local = scanned.clone();
            self.folders_that_sync(&mut local, None);
            let deleted = self.deleted_here(&local);
            self.note_missing(&deleted);
            let changed = local.iter().filter(|(p, l)| locally_changed(Some(l), self.index.get(p))).count();
            self.status.update_local(|s| s.to_send = changed + deleted.len());
        }
        let files = self.front.list_all()?;
        self.need_full = false;
        self.last_full = Instant::now();
        // Paths from the server are checked like any input from a peer: one that
        // could reach outside the sync dir is ignored. So is one the rules ignore.
        let server: BTreeMap<String, FileMeta> = files
            .into_iter()
            .filter(|m| trusted_path(&m.path) && !self.rules.ignores(&m.path, m.dir))
            .map(|m| (m.path.clone(), m))
            .collect();
        // The listing may know folders that the index does not yet.
        let mut local = scanned;
        self.folders_that_sync(&mut local, Some(&server));
        // An ignored path's entry is forgotten: if the rules change back, the path
        // is compared afresh (by content), and nothing deleted while it was
        // ignored is ever deleted anywhere else.
        let ignored: Vec<String> =
            self.index.entries.iter().filter(|(p, i)| self.rules.ignores(p, i.dir)).map(|(p, _)| p.clone()).collect();
        for p in ignored {
            self.index.remove(&p);
        }
        let paths: BTreeSet<String> =
            server.keys().chain(local.keys()).chain(self.index.entries.keys()).cloned().collect();
        let mut tally = Tally::default();
        let hold_deletes = self.deletes_wait();
        // Deletes first, so that a file replaced by a folder (or the reverse) frees
        // its name before the new content needs it.
        let mut later = Vec::new();
        // Folders to remove here, removed after the files in them, deepest first.
        let mut folders_gone = Vec::new();
        for path in paths {
            let action = decide(server.get(&path), local.get(&path), self.index.get(&path));
            match action {
                Action::DeleteRemote { .. } if hold_deletes.is_some() => tally.deferred += 1,
                Action::DeleteLocal if local.get(&path).is_some_and(|l| l.dir) => folders_gone.push(path),
                Action::DeleteRemote { .. } | Action::DeleteLocal | Action::ForgetIndex => {
                    self.carry_out(&path, action, server.get(&path), &mut tally)?
                }
                Action::Nothing => {}
                _ => later.push((path, action)),
            }
        }
        for path in folders_gone.into_iter().rev() {
            self.carry_out(&path, Action::DeleteLocal, server.get(&path), &mut tally)?;
        }
        // Small files to fetch come down in batches, after the rest (a folder is
        // made, never fetched).
        let mut fetches = Vec::new();
        for (path, action) in later {
            match action {
                Action::Download if server.get(&path).is_some_and(|m| !m.dir && m.size < BATCH_FILE_MAX) => {
                    fetches.push(path)
                }
                _ => self.carry_out(&path, action, server.get(&path), &mut tally)?,
            }
        }
        // Neither is needed any more, and the fetches and the local pass below
        // take memory of their own.
        drop(server);
        drop(local);
        for batch in fetches.chunks(BATCH_FILES) {
            self.fetch_many(batch)?;
            tally.downloaded += batch.len();
        }
        if let Some(wait) = hold_deletes.filter(|_| tally.deferred > 0) {
            self.pass_due = Some(Instant::now() + wait);
        }
        self.reconciled_once = true;
        // Conflicted copies made above are new local files: send them now.
        tally.uploaded += self.local_pass();
        if self.stop.is_some() {
            return Err(FrontError::Local(self.stop.clone().unwrap_or_default()));
        }
        Ok(tally)
    }

    fn carry_out(
        &mut self,
        path: &str,
        action: Action,
        server: Option<&FileMeta>,
        t: &mut Tally,
    ) -> Result<(), FrontError> {
        match action {
            Action::Nothing => {}
            Action::ForgetIndex => {
                self.index.remove(path);
                self.doomed.remove(path);
            }
            Action::Adopt => {
                if let Some(s) = server {
                    self.doomed.remove(path);
                    self.index.set(path, Synced::of(s.version, s.hash, &LocalFile::DIR));
                }
            }
            Action::Upload { base } => match self.upload(path, base)? {
                Some(true) => t.uploaded += 1,
                Some(false) => t.failed += 1,
                None => {}
            },
            Action::DeleteRemote { base } => {
                self.delete_remote(path, Some(base))?;
                t.deleted_remote += 1;
            }
            Action::Download => {
                match server.filter(|s| s.dir) {
                    Some(folder) => self.make_dir_here(folder),
                    None => self.fetch(path)?,
                }
                t.downloaded += 1;
            }
            Action::DeleteLocal => {
                self.delete_local(path);
                t.deleted_local += 1;
            }
            Action::Conflict => {
                if let Some(current) = server {
                    if self.conflict(path, current)? {
                        // The server's version was fetched, and this device's
                        // kept aside (it goes up with the local pass).
                        t.conflicts += 1;
                        t.downloaded += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Looks for local changes and sends them. Returns how many uploads were made.
    fn local_pass(&mut self) -> usize {
        // A writer whose close never came counts no longer (see `still_writing`
        // below); its entry would only take room.
        self.writing.retain(|_, since| since.elapsed() < WRITER_GRACE);
        let mut local = scan::scan(&self.root, &self.rules);
        // After the scan: a sync dir removed meanwhile scans as empty, and must not
        // be taken for a user who deleted everything.
        if !self.guard() {
            return 0;
        }
        self.folders_that_sync(&mut local, None);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
        let deleted = self.deleted_here(&local);
        self.note_missing(&deleted);
        let mut changed = Vec::new();
        let mut postponed = 0;
        let mut refused = 0;
        // How soon the earliest postponed file may have settled.
        let mut recheck: Option<Duration> = None;
        for (path, l) in &local {
            if !locally_changed(Some(l), self.index.get(path)) {
                continue;
            }
            if self.refused.get(path) == Some(l) {
                refused += 1;
                continue;
            }
            let still_writing = self.writing.get(path).is_some_and(|t| t.elapsed() < WRITER_GRACE);
            // A writer that closed the file settles it, once its mtime is a little
            // old (a new writer's first event may still be on its way). Without a
            // close-write seen, a fresh mtime may be a writer that is not done (or
            // one whose events were lost): let it settle.
            let age = now - l.mtime_ns;
            let needed = if self.closed.contains(path) { CLOSE_MARGIN } else { SETTLE };
            let unsettled = age < needed.as_nanos() as i128;
            if unsettled {
                let left = Duration::from_nanos((needed.as_nanos() as i128 - age).max(0) as u64);
                recheck = Some(recheck.map_or(left, |r: Duration| r.min(left)));
            }
            if still_writing || unsettled {
                // A file moved here keeps the size and mtime it had under its old
                // name: a fresh mtime then says nothing about a write in progress,
                // and postponing it while its old name's deletion goes ahead would
                // turn the move into a delete and a new upload.
                let moved_here = self.index.get(path).is_none()
                    && deleted.iter().any(|d| self.index.get(d).is_some_and(|i| i.matches(l)));
                if still_writing || !moved_here {
                    postponed += 1;
                    continue;
                }
            }
            changed.push(path.clone());
        }
        let hold_deletes = self.deletes_wait();
        let mut to_send = changed.len() + deleted.len();
        self.status.update_local(|s| {
            s.to_send = to_send;
            s.settling = postponed;
            s.refused = refused;
        });
        let mut uploads = 0;
        let hold = hold_deletes.is_some();
        let root = self.root.clone();
        let mut plan = pass::plan(&changed, &deleted, &local, &self.index.entries, hold, |p| {
            ContentHash::of_file(&root.join(p)).ok()
        });
        let result = (|| -> Result<(), FrontError> {
            // Folders first, parents before children (the order of the scan): a
            // file may go in them after.
            for path in std::mem::take(&mut plan.folders) {
                let base = self.index.get(&path).map(|i| i.version);
                let outcome = self.mkdir_remote(&path, base);
                count_outcomes(self, &mut uploads, &mut to_send, vec![outcome])?;
            }
            for (from, to) in std::mem::take(&mut plan.moves) {
                if self.rename_remote(&from, &to)? {
                    to_send = to_send.saturating_sub(2);
                    self.status.update_local(|s| s.to_send = to_send);
                } else {
                    plan.move_refused(&from, &to, hold);
                }
            }
            for path in std::mem::take(&mut plan.deletes) {
                let base = self.index.get(&path).map(|i| i.version);
                self.delete_remote(&path, base)?;
                to_send = to_send.saturating_sub(1);
                self.status.update_local(|s| s.to_send = to_send);
            }
            // Small files go up in batches, several in flight at once; a big one
            // alone, with its progress shown.
            let mut small: Vec<String> = Vec::new();
            for path in std::mem::take(&mut plan.uploads) {
                if local.get(&path).is_some_and(|l| l.size < BATCH_FILE_MAX) {
                    small.push(path);
                    if small.len() >= upload_batch_files() {
                        let outcomes = self.upload_batch(std::mem::take(&mut small));
                        count_outcomes(self, &mut uploads, &mut to_send, outcomes)?;
                    }
                    continue;
                }
                let base = self.index.get(&path).map(|i| i.version);
                let outcome = self.upload(&path, base);
                count_outcomes(self, &mut uploads, &mut to_send, vec![outcome])?;
            }
            let outcomes = self.upload_batch(small);
            count_outcomes(self, &mut uploads, &mut to_send, outcomes)?;
            Ok(())
        })();
        if let Err(e) = result {
            self.postponed(e);
            // A retry waits for the mtime to settle rather than trust old closes.
            self.closed.clear();
        } else {
            self.failed_passes = 0;
            let mut wait: Option<Duration> = None;
            if postponed > 0 {
                wait = Some(recheck.unwrap_or(SETTLE));
            }
            if let Some(hold) = hold_deletes.filter(|_| !plan.held.is_empty()) {
                wait = Some(wait.map_or(hold, |w| w.min(hold)));
            }
            if let Some(w) = wait {
                let at = Instant::now() + w.max(Duration::from_millis(5));
                self.pass_due = Some(self.pass_due.map_or(at, |d| d.min(at)));
            }
        }
        // Forget close-writes of files now in sync (or gone); keep those still waiting.
        let index = &self.index;
        self.closed.retain(|p| local.get(p).is_some_and(|l| locally_changed(Some(l), index.get(p))));
        uploads
    }

    /// Sends small files with several requests in flight (see
    /// [`Frontend::upload_batch`]); one outcome per path, as [`Engine::upload`]
    /// gives them (those with nothing to send last), or a single error for a
    /// batch the connection lost.
    fn upload_batch(&mut self, paths: Vec<String>) -> Vec<Result<Option<bool>, FrontError>> {
        let mut items = Vec::new();
        let mut locals = Vec::new();
        // A path with nothing to send (vanished, or no longer a regular file)
        // has the outcome `upload` gives it: Ok(None), so that it is counted.
        let mut nothing = Vec::new();
        for path in paths {
            let opened = File::open(self.abs(&path)).and_then(|f| f.metadata().map(|md| (f, md)));
            let (file, md) = match opened {
                Ok((f, md)) if md.is_file() => (f, md),
                _ => {
                    nothing.push(Ok(None));
                    continue;
                }
            };
            let l = LocalFile::of(&md);
            let base = self.index.get(&path).map(|i| i.version);
            items.push(UploadItem {
                path: path.clone(),
                file,
                size: l.size,
                mtime_ms: mtime_ms_of(l.mtime_ns),
                exec: l.exec,
                base,
            });
            locals.push((path, l));
        }
        if items.is_empty() {
            return nothing;
        }
        let mut outcomes = match self.front.upload_batch(&mut items) {
            Err(e) => vec![Err(e)],
            Ok(answers) => locals.into_iter().zip(answers).map(|((path, l), a)| self.uploaded(&path, l, a)).collect(),
        };
        outcomes.extend(nothing);
        outcomes
    }

    /// Sends the local file at `path`. Some(true): stored; Some(false): refused;
    /// None: nothing to send (the file vanished, or the conflict was resolved).
    fn upload(&mut self, path: &str, base: Option<Version>) -> Result<Option<bool>, FrontError> {
        let abs = self.abs(path);
        let Ok(mut file) = File::open(&abs) else { return Ok(None) };
        let Ok(md) = file.metadata() else { return Ok(None) };
        if md.is_dir() && scan::stat_any(&self.root, path).is_some_and(|l| l.dir) {
            return self.mkdir_remote(path, base);
        }
        if !md.is_file() {
            return Ok(None);
        }
        let l = LocalFile::of(&md);
        let mut progress = Progress::new(&self.console, format!("uploading {path}"), l.size);
        let result = self
            .front
            .upload(path, &mut file, l.size, mtime_ms_of(l.mtime_ns), base, l.exec, &mut |n| progress.update(n));
        progress.finish();
        self.uploaded(path, l, result?)
    }

    /// Records the server's answer to the upload of `path` (as `l` was sent).
    fn uploaded(&mut self, path: &str, l: LocalFile, answer: OpResult) -> Result<Option<bool>, FrontError> {
        match answer {
            OpResult::Done { meta } => {
                acknowledged("upload", &meta);
                self.refused.remove(path);
                self.index.set(path, Synced::of(meta.version, meta.hash, &l));
                self.batch.add(Done::Uploaded, path.to_string(), l.size);
                Ok(Some(true))
            }
            OpResult::Conflict { current: Some(current) } => {
                self.conflict(path, &current)?;
                Ok(None)
            }
            // Not a refusal of this file: the pass stops and is tried again later.
            OpResult::Unavailable { message } => Err(FrontError::Busy(message)),
            OpResult::Error { message } => {
                self.console.activity(format!("the server refused {path}: {message}"));
                self.refused.insert(path.to_string(), l);
                self.closed.remove(path);
                Ok(Some(false))
            }
            other => Err(FrontError::Protocol(format!("upload answered with {other:?}"))),
        }
    }

    fn delete_remote(&mut self, path: &str, base: Option<Version>) -> Result<(), FrontError> {
        // Once more, right before the request: a removal of the whole sync dir may
        // have reached `.replibox/` since the pass began.
        if !self.guard() {
            return Err(FrontError::Local(self.stop.clone().unwrap_or_default()));
        }
        match self.front.request(Op::Delete { path: path.to_string(), base })? {
            OpResult::Done { meta } => {
                acknowledged("delete", &meta);
                self.index.remove(path);
                self.batch.add(Done::DeletedThere, path.to_string(), 0);
            }
            OpResult::Conflict { current: Some(_) } => {
                // Changed elsewhere since this device saw it: the edit wins, fetch it.
                self.index.remove(path);
                self.fetch(path)?;
            }
            OpResult::Unavailable { message } => return Err(FrontError::Busy(message)),
            _ => {
                self.index.remove(path);
            }
        }
        Ok(())
    }

    /// Renames on the server; false when the server would not (the caller falls
    /// back to delete and upload).
    fn rename_remote(&mut self, from: &str, to: &str) -> Result<bool, FrontError> {
        let base = self.index.get(from).map(|i| i.version);
        let Some(l) = scan::stat(&self.root, to) else { return Ok(false) };
        match self.front.request(Op::Rename { from: from.to_string(), to: to.to_string(), base })? {
            OpResult::Done { meta } => {
                acknowledged(&format!("rename from={from:?}"), &meta);
                self.index.remove(from);
                self.index.set(to, Synced::of(meta.version, meta.hash, &l));
                self.batch.add(Done::RenamedThere, format!("{from} to {to}"), l.size);
                Ok(true)
            }
            OpResult::Unavailable { message } => Err(FrontError::Busy(message)),
            _ => Ok(false),
        }
    }

    /// Both sides changed `path`; the server holds `current`. Returns true when a
    /// conflicted copy was made (false: the contents were equal after all).
    fn conflict(&mut self, path: &str, current: &FileMeta) -> Result<bool, FrontError> {
        let abs = self.abs(path);
        if current.deleted {
            return Ok(false);
        }
        match (scan::stat_any(&self.root, path).map(|l| l.dir), current.dir) {
            (Some(true), true) => {
                self.index.set(path, Synced::of(current.version, current.hash, &LocalFile::DIR));
                return Ok(false);
            }
            // A folder here, a file there: the file comes in if the folder is
            // empty; what is in it is never removed for it.
            (Some(true), false) => {
                if let Err(e) = fs::remove_dir(&abs) {
                    self.console.activity(format!(
                        "cannot receive {path}: a folder of that name here still holds files ({e}); rename one of them"
                    ));
                    return Ok(false);
                }
                self.index.remove(path);
                self.fetch(path)?;
                return Ok(true);
            }
            // A file here, a folder there: the file is kept as a conflicted copy.
            (Some(false), true) => {
                self.make_dir_here(current);
                self.pass_due = Some(Instant::now());
                return Ok(true);
            }
            _ => {}
        }
        if let (Ok(hash), Some(l)) = (ContentHash::of_file(&abs), scan::stat(&self.root, path)) {
            if hash == current.hash {
                // Equal bytes: the server's execute bit wins, as its version does.
                if l.exec != current.exec {
                    if let Err(e) = File::open(&abs).and_then(|f| scan::set_exec(&f, current.exec)) {
                        log::warn!("cannot set the execute bit of {}: {e}", abs.display());
                    }
                }
                let l = scan::stat(&self.root, path).unwrap_or(l);
                self.index.set(path, Synced::of(current.version, hash, &l));
                return Ok(false);
            }
        }
        if self.set_aside(path).is_none() && scan::stat(&self.root, path).is_some() {
            // This device's version could not be moved aside: keep it rather than
            // fetch the server's over it; the next full sync tries again.
            return Ok(false);
        }
        self.fetch(path)?;
        // The conflicted copy is a new local file: the next local pass sends it.
        self.pass_due = Some(Instant::now());
        Ok(true)
    }

    /// Moves the local file at `path` to a conflicted-copy name.
    fn set_aside(&mut self, path: &str) -> Option<String> {
        let abs = self.abs(path);
        scan::stat(&self.root, path)?;
        let date = timefmt::date(timefmt::now_ms());
        let root = self.root.clone();
        let copy = conflicted_name(path, &self.device_name, &date, |c| root.join(c).exists());
        match fs::rename(&abs, self.abs(&copy)) {
            Ok(()) => {
                self.console.activity(format!("conflict on {path}: this device's version is kept as {copy}"));
                self.status.update_local(|s| s.conflicts.push(copy.clone()));
                Some(copy)
            }
            Err(e) => {
                log::error!("{}", io_err("cannot set aside", &abs, e));
                None
            }
        }
    }

    /// Fetches the server's version of `path` and puts it in place.
    fn fetch(&mut self, path: &str) -> Result<(), FrontError> {
        if !self.may_receive(path) {
            return Ok(());
        }
        let tmp_path = self.tmp.join(format!("dl-{}", std::process::id()));
        match progress::download_to(&self.front, &self.console, path, &tmp_path)? {
            Ok(meta) => self.place(path, &tmp_path, &meta),
            Err(refusal) => {
                log::info!("not fetching {path}: {refusal:?}");
                Ok(())
            }
        }
    }

    /// Whether `path` may be written here: not ignored, and no symlinked folder
    /// on its way (said once).
    fn may_receive(&mut self, path: &str) -> bool {
        if self.rules.ignores(path, false) {
            return false;
        }
        if !scan::confined(&self.root, path) {
            self.not_confined(path);
            return false;
        }
        true
    }

    /// Fetches several small files at once: their downloads pipelined on the
    /// connection, their bytes synced together, then each moved into place in
    /// order (as [`Engine::fetch`] does for one).
    fn fetch_many(&mut self, paths: &[String]) -> Result<(), FrontError> {
        let wanted: Vec<String> = paths.iter().filter(|p| self.may_receive(p)).cloned().collect();
        let mut items = Vec::new();
        let mut tmps = Vec::new();
        let forget = |tmps: &[PathBuf]| {
            for t in tmps {
                let _ = fs::remove_file(t);
            }
        };
        for (k, path) in wanted.into_iter().enumerate() {
            let tmp = self.tmp.join(format!("dl-{}-{k}", std::process::id()));
            match File::create(&tmp) {
                Ok(file) => items.push(DownloadItem { path, file }),
                Err(e) => {
                    forget(&tmps);
                    return Err(FrontError::local_io(format_args!("cannot create {}", tmp.display()), &e));
                }
            }
            tmps.push(tmp);
        }
        let asked = Instant::now();
        let answers = match self.front.download_batch(&mut items) {
            Ok(a) => a,
            Err(e) => {
                forget(&tmps);
                return Err(e);
            }
        };
        let mut received = Vec::new();
        for (k, answer) in answers.into_iter().enumerate() {
            match answer {
                Ok(meta) => {
                    progress::stamp(&items[k].file, &tmps[k], &meta);
                    received.push((k, meta));
                }
                Err(refusal) => {
                    log::info!("not fetching {}: {refusal:?}", items[k].path);
                    let _ = fs::remove_file(&tmps[k]);
                }
            }
        }
        let downloaded = Instant::now();
        let files: Vec<&File> = received.iter().map(|(k, _)| &items[*k].file).collect();
        let synced = replibox_proto::durable::sync_all(&files, |f| f.sync_all());
        let synced_at = Instant::now();
        if let Err(e) = synced {
            forget(&tmps);
            return Err(FrontError::local_io(
                format_args!("cannot write the files received into {}", self.tmp.display()),
                &e,
            ));
        }
        let n = received.len();
        for (k, meta) in received {
            self.place(&items[k].path, &tmps[k], &meta)?;
        }
        // One line per batch: where a burst's time goes on the receiving device.
        log::debug!(
            "received {n} files: downloaded in {:?}, synced in {:?}, placed in {:?}",
            downloaded - asked,
            synced_at - downloaded,
            synced_at.elapsed()
        );
        Ok(())
    }

    /// Says (once per path) that `path` is not touched because a folder on its way
    /// is a symlink.
    fn not_confined(&mut self, path: &str) {
        if self.unconfined.insert(path.to_string()) {
            self.console.activity(format!(
                "not syncing {path} here: a folder on its way is a symbolic link, which is not followed"
            ));
        }
    }

    /// Moves a received file into place, keeping any local edit that appeared
    /// meanwhile as a conflicted copy.
    fn place(&mut self, path: &str, tmp_path: &Path, meta: &FileMeta) -> Result<(), FrontError> {
        let dest = self.abs(path);
        if !scan::confined(&self.root, path) {
            let _ = fs::remove_file(tmp_path);
            self.not_confined(path);
            return Ok(());
        }
        if locally_changed(scan::stat_any(&self.root, path).as_ref(), self.index.get(path)) && dest.exists() {
            let same = ContentHash::of_file(&dest).map(|h| h == meta.hash).unwrap_or(false);
            if !same && self.set_aside(path).is_none() {
                // Never replace a local version that could not be kept aside.
                let _ = fs::remove_file(tmp_path);
                self.console.activity(format!(
                    "cannot receive {path}: this device's version could not be set aside, so it stays"
                ));
                return Ok(());
            }
        }
        if let Some(parent) = dest.parent() {
            if let Err(e) = fs::create_dir_all(parent) {
                let _ = fs::remove_file(tmp_path);
                self.console.activity(format!("cannot receive {path}: {}", io_err("cannot create", parent, e)));
                return Ok(());
            }
        }
        if fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
            // A folder that became a file elsewhere: it goes if nothing is in it;
            // what is in it (not synced yet, or ignored) is never removed for it.
            if let Err(e) = fs::remove_dir(&dest) {
                let _ = fs::remove_file(tmp_path);
                self.console.activity(format!(
                    "cannot receive {path}: a folder of that name here still holds files ({e}); rename one of them"
                ));
                return Ok(());
            }
            self.doomed.remove(path);
        }
        if let Err(e) = fs::rename(tmp_path, &dest) {
            let _ = fs::remove_file(tmp_path);
            self.console.activity(format!("cannot receive {path}: {}", io_err("cannot write", &dest, e)));
            return Ok(());
        }
        if let Some(l) = scan::stat(&self.root, path) {
            self.index.set(path, Synced::of(meta.version, meta.hash, &l));
        }
        self.batch.add(Done::Received, path.to_string(), meta.size);
        Ok(())
    }

    /// Deletes `path` here because it was deleted on another device.
    fn delete_local(&mut self, path: &str) {
        let is_dir = scan::stat_any(&self.root, path).is_some_and(|l| l.dir);
        if self.rules.ignores(path, is_dir) {
            return;
        }
        if self.remove_here(path) {
            let shown = if is_dir { format!("{path}/") } else { path.to_string() };
            self.batch.add(Done::DeletedHere, shown, 0);
        }
    }

    /// Removes the file at `path`, its index entry, and the folders it leaves
    /// empty. True when a file was removed.
    fn remove_here(&mut self, path: &str) -> bool {
        let abs = self.abs(path);
        if !scan::confined(&self.root, path) {
            self.index.remove(path);
            self.not_confined(path);
            return false;
        }
        if fs::symlink_metadata(&abs).is_ok_and(|m| m.is_dir()) {
            return match fs::remove_dir(&abs) {
                Ok(()) => {
                    self.index.remove(path);
                    self.doomed.remove(path);
                    self.prune(&abs);
                    true
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.index.remove(path);
                    false
                }
                Err(_) => {
                    // Something is inside: the folder stays while it does.
                    self.doomed.insert(path.to_string());
                    false
                }
            };
        }
        let removed = match fs::remove_file(&abs) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => {
                log::warn!("{}", io_err("cannot delete", &abs, e));
                false
            }
        };
        self.index.remove(path);
        self.prune(&abs);
        removed
    }

    /// Removes folders left empty by a delete, up to the sync dir, stopping at a
    /// synced folder (one the user has, which goes only by a delete of its own),
    /// unless that folder's delete is waiting for it to be empty.
    fn prune(&mut self, removed: &Path) {
        let mut dir = removed.parent();
        while let Some(d) = dir {
            if d == self.root || !d.starts_with(&self.root) {
                break;
            }
            let Some(rel) = d.strip_prefix(&self.root).ok().and_then(|r| r.to_str()).map(str::to_string) else {
                break;
            };
            let kept = self.index.get(&rel).is_some_and(|i| i.dir) && !self.doomed.contains(&rel);
            if kept || fs::remove_dir(d).is_err() {
                break;
            }
            if self.doomed.remove(&rel) {
                self.index.remove(&rel);
                self.batch.add(Done::DeletedHere, format!("{rel}/"), 0);
            }
            dir = d.parent();
        }
    }

    /// Makes the folder `meta` (made on another device) here, replacing a file
    /// of that name that is in sync, or setting aside one that was changed here.
    fn make_dir_here(&mut self, meta: &FileMeta) {
        let path = meta.path.as_str();
        if self.rules.ignores(path, true) {
            return;
        }
        if !scan::confined(&self.root, path) {
            self.not_confined(path);
            return;
        }
        let abs = self.abs(path);
        if let Some(l) = scan::stat_any(&self.root, path).filter(|l| !l.dir) {
            let kept = if locally_changed(Some(&l), self.index.get(path)) {
                self.set_aside(path).is_some()
            } else {
                fs::remove_file(&abs).is_ok()
            };
            if !kept {
                self.console.activity(format!("cannot make folder {path}: the file of that name here stays"));
                return;
            }
        }
        let existed = abs.is_dir();
        if let Err(e) = fs::create_dir_all(&abs) {
            self.console.activity(format!("cannot make folder {path}: {}", io_err("cannot create", &abs, e)));
            return;
        }
        self.doomed.remove(path);
        self.index.set(path, Synced::of(meta.version, meta.hash, &LocalFile::DIR));
        if !existed {
            self.batch.add(Done::MadeHere, format!("{path}/"), 0);
        }
    }

    /// Makes the local folder `path` on the server (replacing the file the
    /// device saw there at `base`, if any). Outcomes as [`Engine::upload`]'s.
    fn mkdir_remote(&mut self, path: &str, base: Option<Version>) -> Result<Option<bool>, FrontError> {
        match self.front.request(Op::Mkdir { path: path.to_string(), base })? {
            OpResult::Done { meta } => {
                acknowledged("mkdir", &meta);
                self.refused.remove(path);
                self.doomed.remove(path);
                self.index.set(path, Synced::of(meta.version, meta.hash, &LocalFile::DIR));
                self.batch.add(Done::MadeThere, format!("{path}/"), 0);
                Ok(Some(true))
            }
            OpResult::Conflict { current: Some(current) } => {
                self.conflict(path, &current)?;
                Ok(None)
            }
            OpResult::Unavailable { message } => Err(FrontError::Busy(message)),
            OpResult::Error { message } => {
                self.console.activity(format!("the server refused folder {path}: {message}"));
                self.refused.insert(path.to_string(), LocalFile::DIR);
                Ok(Some(false))
            }
            other => Err(FrontError::Protocol(format!("mkdir answered with {other:?}"))),
        }
    }

    /// Applies notices in order; files put by the other device that are small
    /// enough come down in batches (a batch is fetched before any other notice is
    /// applied, so the order holds).
    fn notices(&mut self, notices: Vec<Notice>) {
        let mut puts: Vec<String> = Vec::new();
        for n in notices {
            if let Notice::Put { meta } = &n {
                if !meta.dir && meta.size < BATCH_FILE_MAX && self.wants(meta) {
                    // A later put of the same path: the download gets the latest.
                    if !puts.contains(&meta.path) {
                        puts.push(meta.path.clone());
                    }
                    continue;
                }
            }
            self.fetch_noticed(&mut puts);
            self.notice(n);
        }
        self.fetch_noticed(&mut puts);
    }

    /// Whether a put notice of a file means fetching it (what [`Engine::notice`] and
    /// [`Engine::remote_put`] check before they fetch).
    fn wants(&mut self, meta: &FileMeta) -> bool {
        self.guard()
            && trusted_path(&meta.path)
            && !self.rules.ignores(&meta.path, false)
            && self.index.get(&meta.path).is_none_or(|i| i.version < meta.version)
    }

    /// Fetches the files of the put notices gathered so far.
    fn fetch_noticed(&mut self, puts: &mut Vec<String>) {
        if puts.is_empty() {
            return;
        }
        let paths = std::mem::take(puts);
        for batch in paths.chunks(BATCH_FILES) {
            if let Err(e) = self.fetch_many(batch) {
                self.could_not_apply(e);
                return;
            }
        }
    }

    /// A notice could not be applied: a full pass catches up, after a pause.
    fn could_not_apply(&mut self, e: FrontError) {
        self.console.activity(format!("could not apply a change from the server: {e}; will catch up"));
        self.need_full = true;
        let pause = self.retry_pause();
        self.pass_due = Some(Instant::now() + pause);
    }

    /// A change pushed by the server.
    fn notice(&mut self, notice: Notice) {
        if !self.guard() {
            return;
        }
        let paths_ok = match &notice {
            Notice::Put { meta } | Notice::Delete { meta } => trusted_path(&meta.path),
            Notice::Rename { from, meta } => trusted_path(from) && trusted_path(&meta.path),
        };
        if !paths_ok {
            return;
        }
        let result = match notice {
            // An ignored path is not received, nor deleted here; an early copy
            // of it goes.
            Notice::Put { meta } | Notice::Delete { meta } if self.rules.ignores(&meta.path, meta.dir) => {
                if let Some(copy) = self.front.take_early(&meta.path, meta.size, meta.hash) {
                    log::info!("letting the early copy of {} go: this device ignores the path", meta.path);
                    let _ = fs::remove_file(copy);
                }
                Ok(())
            }
            Notice::Put { meta } => self.remote_put(&meta),
            Notice::Delete { meta } => {
                self.remote_delete(&meta);
                Ok(())
            }
            Notice::Rename { from, meta } => self.remote_rename(&from, &meta),
        };
        if let Err(e) = result {
            self.could_not_apply(e);
        }
    }

    fn remote_put(&mut self, meta: &FileMeta) -> Result<(), FrontError> {
        if self.index.get(&meta.path).is_some_and(|i| i.version >= meta.version) {
            // An early copy of a version this device has already goes.
            if let Some(copy) = self.front.take_early(&meta.path, meta.size, meta.hash) {
                let _ = fs::remove_file(copy);
            }
            return Ok(());
        }
        if meta.dir {
            self.make_dir_here(meta);
            return Ok(());
        }
        if let Some(copy) = self.front.take_early(&meta.path, meta.size, meta.hash) {
            return self.place_early(meta, &copy);
        }
        self.fetch(&meta.path)
    }

    /// Places the early copy of `meta` (its bytes, received while the servers
    /// stored them, already checked against its hash) as a download is placed;
    /// downloads the file if the copy cannot be made durable.
    fn place_early(&mut self, meta: &FileMeta, copy: &Path) -> Result<(), FrontError> {
        if !self.may_receive(&meta.path) {
            let _ = fs::remove_file(copy);
            return Ok(());
        }
        let synced = File::options().write(true).open(copy).and_then(|f| progress::settle(&f, copy, meta));
        if let Err(e) = synced {
            let _ = fs::remove_file(copy);
            log::warn!("cannot keep the early copy of {}: {e}; downloading it", meta.path);
            return self.fetch(&meta.path);
        }
        log::info!("placing the early copy of {} (received while the servers stored it)", meta.path);
        self.place(&meta.path, copy, meta)
    }

    fn remote_delete(&mut self, meta: &FileMeta) {
        let path = meta.path.as_str();
        let Some(i) = self.index.get(path).cloned() else { return };
        if i.version < meta.version {
            self.drop_local(path, &i);
        }
    }

    /// The server no longer holds `path` (deleted or renamed away), last in sync
    /// here as `i`: removes this device's copy, unless it was edited since.
    fn drop_local(&mut self, path: &str, i: &Synced) {
        let l = scan::stat_any(&self.root, path);
        if locally_changed(l.as_ref(), Some(i)) {
            // Edited here: the edit survives and goes back up as a new file.
            self.index.remove(path);
            self.pass_due = Some(Instant::now());
        } else {
            self.delete_local(path);
        }
    }

    fn remote_rename(&mut self, from: &str, meta: &FileMeta) -> Result<(), FrontError> {
        let (from_ignored, to_ignored) = (self.rules.ignores(from, false), self.rules.ignores(&meta.path, false));
        if from_ignored || to_ignored {
            // Half of the rename is outside what this device syncs: the old name
            // left the synced files (deleted here), the new one joined them.
            if let Some(i) = self.index.get(from).cloned().filter(|_| !from_ignored) {
                self.drop_local(from, &i);
            }
            return if to_ignored { Ok(()) } else { self.remote_put(meta) };
        }
        // The file here must be the content that was renamed: a put of `from`
        // this device has not fetched yet (its download refused, the path gone
        // by then) leaves an older content here, which must not be recorded as
        // the renamed version.
        let unchanged = self
            .index
            .get(from)
            .is_some_and(|i| i.hash == meta.hash && !locally_changed(scan::stat(&self.root, from).as_ref(), Some(i)));
        let to_free = scan::confined(&self.root, &meta.path)
            && scan::stat(&self.root, &meta.path).is_none()
            && self.index.get(&meta.path).is_none_or(|i| i.version < meta.version);
        if unchanged && to_free {
            let dest = self.abs(&meta.path);
            let moved =
                dest.parent().map_or(Ok(()), fs::create_dir_all).and_then(|_| fs::rename(self.abs(from), &dest));
            if moved.is_ok() {
                let old = self.index.remove(from);
                let from_abs = self.abs(from);
                self.prune(&from_abs);
                if let (Some(l), Some(old)) = (scan::stat(&self.root, &meta.path), old) {
                    self.index.set(&meta.path, Synced::of(meta.version, old.hash, &l));
                }
                let size = scan::stat(&self.root, &meta.path).map_or(0, |l| l.size);
                self.batch.add(Done::RenamedHere, format!("{from} to {}", meta.path), size);
                return Ok(());
            }
        }
        if let Some(i) = self.index.get(from).cloned() {
            self.drop_local(from, &i);
        }
        self.remote_put(meta)
    }

    /// `upload PATH`: sends a file from anywhere and puts a copy in the sync dir.
    fn upload_from(&mut self, source: &Path) -> Result<String, String> {
        let mut file = File::open(source).map_err(|e| io_err("cannot open", source, e))?;
        let md = file.metadata().map_err(|e| io_err("cannot read", source, e))?;
        if !md.is_file() {
            return Err(format!("{} is not a regular file", source.display()));
        }
        let name = source
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("{} has no usable file name", source.display()))?
            .to_string();
        replibox_proto::validate_path(&name).map_err(|e| e.to_string())?;
        self.reload_rules();
        if self.rules.ignores(&name, false) {
            return Err(format!(
                "{name} matches an ignore rule (a built-in one or one in {RULES_FILE}), and ignored files are never \
                 sent; rename it, or add !{name} to {RULES_FILE}"
            ));
        }
        let mtime_ns = scan::mtime_ns(&md);
        let inside = fs::canonicalize(source).ok() == fs::canonicalize(self.abs(&name)).ok();
        // An explicit upload replaces whatever the server holds under that name.
        let mut base = self.index.get(&name).map(|i| i.version);
        let mut progress = Progress::new(&self.console, format!("uploading {name}"), md.len());
        let meta = loop {
            let result = self
                .front
                .upload(&name, &mut file, md.len(), mtime_ms_of(mtime_ns), base, LocalFile::of(&md).exec, &mut |n| {
                    progress.update(n)
                })
                .map_err(|e| e.to_string())?;
            match result {
                OpResult::Done { meta } => {
                    acknowledged("upload", &meta);
                    break meta;
                }
                OpResult::Conflict { current: Some(c) } if base != Some(c.version) => base = Some(c.version),
                OpResult::Error { message } | OpResult::Unavailable { message } => return Err(message),
                other => return Err(format!("unexpected answer: {other:?}")),
            }
        };
        progress.finish();
        if !inside {
            // Copy into the sync dir through a temporary file, then record it so the
            // watcher's event for it is not sent back up.
            let tmp_path = self.tmp.join(format!("up-{}", std::process::id()));
            fs::copy(source, &tmp_path).map_err(|e| io_err("cannot copy", source, e))?;
            if let Ok(f) = File::options().write(true).open(&tmp_path) {
                let _ = f.set_modified(replibox_proto::times::from_ms(meta.mtime_ms));
            }
            let dest = self.abs(&name);
            if locally_changed(scan::stat(&self.root, &name).as_ref(), self.index.get(&name))
                && dest.exists()
                && self.set_aside(&name).is_none()
            {
                let _ = fs::remove_file(&tmp_path);
                return Err(format!(
                    "uploaded {name} to the server, but {} was changed here and could not be set aside, so it stays",
                    dest.display()
                ));
            }
            fs::rename(&tmp_path, &dest).map_err(|e| io_err("cannot write", &dest, e))?;
        }
        if let Some(l) = scan::stat(&self.root, &name) {
            self.index.set(&name, Synced::of(meta.version, meta.hash, &l));
        }
        Ok(format!("uploaded {name} ({} bytes)", meta.size))
    }

    /// `delete NAME`: deletes on the server and in the sync dir.
    fn delete_named(&mut self, name: &str) -> Result<String, String> {
        replibox_proto::validate_path(name).map_err(|e| e.to_string())?;
        match self.front.request(Op::Delete { path: name.to_string(), base: None }).map_err(|e| e.to_string())? {
            OpResult::Done { meta } => {
                acknowledged("delete", &meta);
                // Typed here: the outcome line says it, not an activity line about
                // another device.
                self.remove_here(name);
                Ok(format!("deleted {name}"))
            }
            OpResult::Error { message } | OpResult::Unavailable { message } => Err(message),
            other => Err(format!("unexpected answer: {other:?}")),
        }
    }
}

/// Files per batch of uploads: [`UPLOAD_BATCH_MAX`], or a quarter of the
/// open-file limit (which `main` raises to its hard limit at start-up), at
/// least [`BATCH_FILES`]. Read once: the limit does not change afterwards.
fn upload_batch_files() -> usize {
    static FILES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *FILES.get_or_init(|| ((replibox_proto::fdlimit::open_files() / 4) as usize).clamp(BATCH_FILES, UPLOAD_BATCH_MAX))
}

/// The paths to take early copies of: those `rules` do not ignore (a copy
/// of an ignored path would only be let go when its notice comes).
fn early_wanted(rules: &Arc<Rules>) -> replibox_frontend::early::Wanted {
    let rules = rules.clone();
    Arc::new(move |path: &str| !rules.ignores(path, false))
}
