//! The sync dir watcher: inotify events (through `notify`) turned into hints for
//! the engine. The engine rescans rather than trusting event details, so a lost or
//! merged event costs only latency; what the events add is knowing when a writer
//! still has a file open (a modify without its close-write yet).

use crate::rules::RULES_FILE;
use crossbeam_channel::Sender;
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

/// Starts watching `root` recursively; keep the returned watcher alive.
pub fn watch(root: PathBuf, out: Sender<WatchEvent>) -> notify::Result<RecommendedWatcher> {
    let base = root.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let event = match res {
            Ok(e) => e,
            Err(e) => {
                log::warn!("watcher error: {e}; rescanning");
                let _ = out.send(WatchEvent::Changed);
                return;
            }
        };
        for (i, p) in event.paths.iter().enumerate() {
            let rel = match subject(&base, p) {
                Subject::Synced(rel) => rel,
                Subject::Root => {
                    // Not reads: the engine's own scans open the folder.
                    if !matches!(event.kind, EventKind::Access(_)) {
                        let _ = out.send(WatchEvent::Changed);
                    }
                    continue;
                }
                Subject::Rules => {
                    if !matches!(event.kind, EventKind::Access(_)) {
                        let _ = out.send(WatchEvent::RulesChanged);
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
            let _ = out.send(hint);
        }
        if event.paths.is_empty() {
            let _ = out.send(WatchEvent::Changed);
        }
    })?;
    watcher.watch(&root, RecursiveMode::Recursive)?;
    Ok(watcher)
}
