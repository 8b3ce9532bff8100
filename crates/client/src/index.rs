//! The local index: for each synced path, the server version its local copy
//! matches and the local file's size, mtime and execute bit at that moment. A file
//! whose size, mtime or execute bit differs from its entry was changed locally; a path with an entry and no
//! file was deleted locally; a file with no entry is new.

use crate::scan::LocalFile;
use replibox_proto::{ContentHash, Version};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// What was in sync at one path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Synced {
    /// The server version the local copy matches.
    pub version: Version,
    /// Local size then.
    pub size: u64,
    /// Local mtime then, in ns since the Unix epoch.
    pub mtime_ns: i128,
    /// Content hash.
    pub hash: ContentHash,
    /// The local file's execute bit then (absent in an index from before it:
    /// false, so an executable file there is sent once more, with its bit).
    #[serde(default)]
    pub exec: bool,
    /// A folder (absent in an index from before folders synced: false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dir: bool,
}

impl Synced {
    /// The local file `l` is in sync with server `version`, whose content is `hash`.
    pub fn of(version: Version, hash: ContentHash, l: &LocalFile) -> Synced {
        Synced { version, size: l.size, mtime_ns: l.mtime_ns, hash, exec: l.exec, dir: l.dir }
    }

    /// True when `l` is still the file this entry recorded (same size, mtime and
    /// execute bit: a `chmod +x` changes no mtime, yet it is a change to sync).
    pub fn matches(&self, l: &LocalFile) -> bool {
        self.size == l.size && self.mtime_ns == l.mtime_ns && self.exec == l.exec && self.dir == l.dir
    }
}

/// The index, kept in `.replibox/index.json`.
#[derive(Debug, Default)]
pub struct Index {
    /// Entries by path.
    pub entries: BTreeMap<String, Synced>,
    file: PathBuf,
    dirty: bool,
}

impl Index {
    /// Loads the index (empty when missing; an unreadable one is set aside and
    /// rebuilt by reconciliation, which then treats every file as new).
    pub fn load(file: PathBuf) -> Index {
        let entries = match std::fs::read(&file) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(e) => e,
                Err(err) => {
                    log::warn!("index {} is unreadable ({err}); rebuilding it", file.display());
                    let _ = std::fs::rename(&file, file.with_extension("json.bad"));
                    BTreeMap::new()
                }
            },
            Err(_) => BTreeMap::new(),
        };
        Index { entries, file, dirty: false }
    }

    /// The entry at `path`.
    pub fn get(&self, path: &str) -> Option<&Synced> {
        self.entries.get(path)
    }

    /// Records that `path` is in sync.
    pub fn set(&mut self, path: &str, synced: Synced) {
        self.entries.insert(path.to_string(), synced);
        self.dirty = true;
    }

    /// Forgets `path`.
    pub fn remove(&mut self, path: &str) -> Option<Synced> {
        let old = self.entries.remove(path);
        self.dirty |= old.is_some();
        old
    }

    /// The file it is kept in.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// True when entries changed since the last save.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Writes the index if it changed (temporary file, fsync, rename).
    pub fn save(&mut self) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&self.entries).map_err(io::Error::other)?;
        write_atomically(&self.file, &bytes)?;
        self.dirty = false;
        Ok(())
    }
}

/// Writes a small file atomically and durably: temporary file, fsync, rename, then
/// fsync of the folder, without which a crash could bring back the old file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => std::fs::File::open(parent)?.sync_all(),
        Some(_) => std::fs::File::open(".")?.sync_all(),
        None => Ok(()),
    }
}
