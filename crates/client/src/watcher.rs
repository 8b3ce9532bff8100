//! The sync dir watcher: inotify events (through `notify`) turned into hints for
//! the engine. The engine rescans rather than trusting event details, so a lost or
//! merged event costs only latency; what the events add is knowing when a writer
//! still has a file open (a modify without its close-write yet).

use crossbeam_channel::Sender;
use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
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
}

fn relative(root: &Path, p: &Path) -> Option<String> {
    let rel = p.strip_prefix(root).ok()?;
    let s = rel.to_str()?.to_string();
    if s.is_empty() || s.split('/').any(is_reserved) {
        return None;
    }
    Some(s)
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
        let mut any = false;
        for p in &event.paths {
            let Some(rel) = relative(&base, p) else { continue };
            any = true;
            let hint = match event.kind {
                EventKind::Create(CreateKind::File) | EventKind::Modify(ModifyKind::Data(_)) => {
                    WatchEvent::Writing(rel)
                }
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => WatchEvent::Closed(rel),
                EventKind::Access(_) => continue,
                _ => WatchEvent::Changed,
            };
            let _ = out.send(hint);
        }
        if !any && event.paths.is_empty() {
            let _ = out.send(WatchEvent::Changed);
        }
    })?;
    watcher.watch(&root, RecursiveMode::Recursive)?;
    Ok(watcher)
}
