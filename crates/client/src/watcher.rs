//! The sync dir watcher: inotify events (through `notify`) turned into hints for
//! the engine. The engine rescans rather than trusting event details, so a lost or
//! merged event costs only latency; what the events add is knowing when a writer
//! still has a file open (a modify without its close-write yet).
//!
//! At most [`QUEUE`] hints wait for the engine. While it is busy for long (a
//! fresh device's first reconciliation places 100,000 files, each giving a hint
//! of its own), the hints beyond that are dropped and the `lost` channel says so
//! once: the engine then rescans, as it does after any lost event. Unbounded,
//! that queue held some 18 MiB of hints the engine would have ignored (its own
//! placed files) by the end of such a reconciliation.

use crate::rules::RULES_FILE;
use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use replibox_proto::names::is_reserved;
use std::path::{Path, PathBuf};

/// A hint for the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// Something changed; rescan soon.
    Changed,
    /// A file is being written (relative path).
    Writing(String),
    /// A writer closed a file (relative path).
    Closed(String),
    /// `.replibox-ignore` changed: read the rules again.
    RulesChanged,
}

/// What an event at `p` is about.
enum Subject {
    /// A path the engine syncs (relative).
    Synced(String),
    /// The sync dir itself (removed or moved, for instance): the next pass checks
    /// the folder marker.
    Root,
    /// The ignore rules.
    Rules,
    /// The client's own state, or outside the sync dir.
    Other,
}

fn subject(root: &Path, p: &Path) -> Subject {
    let Some(s) = p.strip_prefix(root).ok().and_then(|r| r.to_str()) else { return Subject::Other };
    if s.is_empty() {
        Subject::Root
    } else if s == RULES_FILE {
        Subject::Rules
    } else if s.split('/').any(is_reserved) {
        Subject::Other
    } else {
        Subject::Synced(s.to_string())
    }
}

/// How many hints may wait for the engine (see the module's doc).
pub const QUEUE: usize = 4096;

/// Where the watcher's hints go: `hints`, of at most [`QUEUE`] (it is never
/// waited on), and `lost`, of one, which says that hints were dropped since the
/// engine last took it.
pub struct Hints {
    /// The hints.
    pub hints: Sender<WatchEvent>,
    /// Hints were dropped: rescan.
    pub lost: Sender<()>,
}

/// The watcher's ends ([`Hints`], for [`watch`]) and the engine's: the hints,
/// and the word that some were dropped.
pub fn hints() -> (Hints, (Receiver<WatchEvent>, Receiver<()>)) {
    let (hints, queued) = bounded(QUEUE);
    let (lost, told) = bounded(1);
    (Hints { hints, lost }, (queued, told))
}

impl Hints {
    fn send(&self, hint: WatchEvent) {
        if let Err(TrySendError::Full(_)) = self.hints.try_send(hint) {
            // Already said when full: one rescan stands for every hint dropped
            // before the engine takes it.
            let _ = self.lost.try_send(());
        }
    }
}

/// Starts watching `root` recursively; keep the returned watcher alive.
pub fn watch(root: PathBuf, out: Hints) -> notify::Result<RecommendedWatcher> {
    let base = root.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let event = match res {
            Ok(e) => e,
            Err(e) => {
                log::warn!("watcher error: {e}; rescanning");
                out.send(WatchEvent::Changed);
                return;
            }
        };
        for (i, p) in event.paths.iter().enumerate() {
            let rel = match subject(&base, p) {
                Subject::Synced(rel) => rel,
                Subject::Root => {
                    // Not reads: the engine's own scans open the folder.
                    if !matches!(event.kind, EventKind::Access(_)) {
                        out.send(WatchEvent::Changed);
                    }
                    continue;
                }
                Subject::Rules => {
                    if !matches!(event.kind, EventKind::Access(_)) {
                        out.send(WatchEvent::RulesChanged);
                    }
                    continue;
                }
                Subject::Other => continue,
            };
            let hint = match event.kind {
                EventKind::Create(CreateKind::File) | EventKind::Modify(ModifyKind::Data(_)) => {
                    WatchEvent::Writing(rel)
                }
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => WatchEvent::Closed(rel),
                // A file renamed into place (the way editors save: written under
                // another name, then renamed) is whole at once: a rename is atomic,
                // so it need not wait for its mtime to settle.
                EventKind::Modify(ModifyKind::Name(RenameMode::To)) => WatchEvent::Closed(rel),
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)) if i == 1 => WatchEvent::Closed(rel),
                EventKind::Access(_) => continue,
                _ => WatchEvent::Changed,
            };
            out.send(hint);
        }
        if event.paths.is_empty() {
            out.send(WatchEvent::Changed);
        }
    })?;
    watcher.watch(&root, RecursiveMode::Recursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_beyond_the_queue_are_dropped_and_said_lost_once() {
        // A queue of 2 for the test (`hints()` gives the real one).
        let (hints, queued) = bounded(2);
        let (lost, told) = bounded(1);
        let out = Hints { hints, lost };
        out.send(WatchEvent::Writing("a".into()));
        out.send(WatchEvent::Closed("a".into()));
        assert!(told.try_recv().is_err(), "nothing lost while the queue has room");
        out.send(WatchEvent::Closed("b".into()));
        out.send(WatchEvent::Closed("c".into()));
        assert_eq!(
            queued.try_iter().collect::<Vec<_>>(),
            [WatchEvent::Writing("a".into()), WatchEvent::Closed("a".into())]
        );
        assert!(told.try_recv().is_ok(), "the engine is told that hints were dropped");
        assert!(told.try_recv().is_err(), "once, however many were");
        // Taken, it is told again for the next drop.
        out.send(WatchEvent::Changed);
        out.send(WatchEvent::Changed);
        out.send(WatchEvent::Changed);
        assert!(told.try_recv().is_ok());
    }

    #[test]
    fn the_real_queue_holds_its_size_and_one_word_of_loss() {
        let (out, (queued, told)) = hints();
        for _ in 0..QUEUE + 10 {
            out.send(WatchEvent::Changed);
        }
        assert_eq!(queued.len(), QUEUE);
        assert_eq!(told.len(), 1);
    }
}
