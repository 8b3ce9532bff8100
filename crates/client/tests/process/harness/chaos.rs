//! Tools of the chaos suite (`chaos.rs`): a seeded die, the devices' ledger of
//! acknowledged changes, the servers' replicated file table read from their data
//! dirs, the primaries each epoch had (from the servers' logs), and trees compared
//! by content hash.
//!
//! Kept apart from the rest of the harness: the chaos test reads things no other
//! test needs (the data dir's `meta/`, debug log lines of the client's ledger).

use super::files::{self, Rng};
use replibox_proto::ContentHash;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// The client's log target for acknowledged changes (`replibox::ledger`), at
/// debug; see `replibox_client::engine::LEDGER_TARGET`.
pub const LEDGER_LOG: &str = "info,replibox::ledger=debug";

/// A seeded die: the same seed makes the same decisions in the same order.
pub struct Dice(Rng);

impl Dice {
    /// A die for `seed`.
    pub fn new(seed: u64) -> Dice {
        Dice(Rng::new(seed))
    }

    /// The next 64 bits.
    pub fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// True with probability `percent` in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// One of `items` (None when empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            items.get(self.below(items.len() as u64) as usize)
        }
    }
}

/// One change a device reported acknowledged by the server (a line of its
/// ledger log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The device's name in the test.
    pub device: String,
    /// Its user.
    pub user: String,
    /// `upload`, `delete` or `rename`.
    pub op: String,
    /// For a rename, the path it came from.
    pub from: Option<String>,
    /// The path the metadata is of (the new path of a rename).
    pub path: String,
    /// The version the server gave.
    pub version: u64,
    /// A tombstone (a delete).
    pub deleted: bool,
    /// Size in bytes.
    pub size: u64,
    /// Content hash (16 hex digits).
    pub hash: String,
}

/// A `key="quoted"` value as Rust's `{:?}` writes a string, and what follows it.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.strip_prefix('"')?.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 2..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// The value of `key=` in `line` (quoted or a bare word).
fn field(line: &str, key: &str) -> Option<String> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[at..];
    if rest.starts_with('"') {
        return quoted(rest).map(|(v, _)| v);
    }
    Some(rest.split_whitespace().next().unwrap_or("").to_string())
}

/// The acknowledged changes in a device's log (its stderr), oldest first.
pub fn ledger(device: &str, user: &str, log: &str) -> Vec<Ack> {
    log.lines()
        .filter(|l| l.contains("replibox::ledger") && l.contains("] acknowledged op="))
        .filter_map(|l| {
            let l = &l[l.find("] acknowledged")? + 1..];
            Some(Ack {
                device: device.to_string(),
                user: user.to_string(),
                op: field(l, "op")?,
                from: field(l, "from"),
                path: field(l, "path")?,
                version: field(l, "version")?.parse().ok()?,
                deleted: field(l, "deleted")? == "true",
                size: field(l, "size")?.parse().ok()?,
                hash: field(l, "hash")?,
            })
        })
        .collect()
}

/// A file or tombstone in a server's replicated state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rec {
    /// Its version.
    pub version: u64,
    /// A tombstone.
    pub deleted: bool,
    /// Size in bytes.
    pub size: u64,
    /// Content hash (16 hex digits).
    pub hash: String,
    /// A folder entry (docs/sync.md, "Folders"): a directory on disk, no content.
    pub dir: bool,
}

fn rec(meta: &Value) -> Option<(String, Rec)> {
    Some((
        meta["path"].as_str()?.to_string(),
        Rec {
            version: meta["version"].as_u64()?,
            deleted: meta["deleted"].as_bool().unwrap_or(false),
            size: meta["size"].as_u64().unwrap_or(0),
            hash: meta["hash"].as_str().unwrap_or("").to_string(),
            dir: meta["dir"].as_bool().unwrap_or(false),
        },
    ))
}

/// User -> path -> file or tombstone.
pub type Files = BTreeMap<String, BTreeMap<String, Rec>>;

/// The replicated file table of a server's data dir: `meta/snapshot.json` and
/// the entries of `meta/log.jsonl` after it (files, tombstones and versions
/// only). Read while the server is quiet: a compaction meanwhile would race it.
pub fn replicated_files(data: &Path) -> Result<Files, String> {
    let mut files: Files = BTreeMap::new();
    let mut pos = 0;
    let snap = data.join("meta/snapshot.json");
    match fs::read(&snap) {
        Ok(bytes) => {
            let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", snap.display()))?;
            pos = v["pos"].as_u64().or(v["seq"].as_u64()).unwrap_or(0);
            for (user, paths) in v["files"].as_object().into_iter().flatten() {
                let table = files.entry(user.clone()).or_default();
                for meta in paths.as_object().into_iter().flatten().map(|(_, m)| m) {
                    let (p, r) = rec(meta).ok_or_else(|| format!("{}: a file without metadata", snap.display()))?;
                    table.insert(p, r);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", snap.display())),
    }
    let log = data.join("meta/log.jsonl");
    let text = fs::read_to_string(&log).unwrap_or_default();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<Value>(line) else { continue };
        if e["pos"].as_u64().or(e["seq"].as_u64()).unwrap_or(0) <= pos {
            continue;
        }
        let c = &e["change"];
        let Some(user) = c["user"].as_str() else { continue };
        let table = files.entry(user.to_string()).or_default();
        match c["change"].as_str() {
            Some("put") | Some("delete") => {
                if let Some((p, r)) = rec(&c["meta"]) {
                    table.insert(p, r);
                }
            }
            Some("rename") => {
                for side in ["from", "to"] {
                    if let Some((p, r)) = rec(&c[side]) {
                        table.insert(p, r);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(files)
}

/// Every `became primary id=I epoch=E` line of the servers' logs under `logs`
/// (files whose name starts with `prefix`): epoch -> the ids that became its
/// primary.
pub fn primaries_by_epoch(logs: &Path, prefix: &str) -> BTreeMap<u64, BTreeSet<u64>> {
    let mut out: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let Ok(dir) = fs::read_dir(logs) else { return out };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(prefix) || !name.ends_with(".stderr") {
            continue;
        }
        let text = fs::read_to_string(e.path()).unwrap_or_default();
        for l in text.lines() {
            let Some(at) = l.find("became primary id=") else { continue };
            let rest = &l[at..];
            let (Some(id), Some(epoch)) = (field(rest, "id"), field(rest, "epoch")) else { continue };
            if let (Ok(id), Ok(epoch)) = (id.parse(), epoch.parse()) {
                out.entry(epoch).or_default().insert(id);
            }
        }
    }
    out
}

/// Every file under `root` (the client's `.replibox` left out): path -> (size,
/// content hash).
pub fn hashes(root: &Path) -> BTreeMap<String, (u64, String)> {
    files::tree(root)
        .files
        .into_iter()
        .filter_map(|(p, size)| {
            let h = ContentHash::of_file(&root.join(&p)).ok()?;
            Some((p, (size, h.to_string())))
        })
        .collect()
}

/// The differences between two trees of [`hashes`], for a message (None when
/// equal).
pub fn diff(a: &BTreeMap<String, (u64, String)>, b: &BTreeMap<String, (u64, String)>) -> Option<String> {
    if a == b {
        return None;
    }
    let only_a: Vec<&String> = a.keys().filter(|k| !b.contains_key(*k)).collect();
    let only_b: Vec<&String> = b.keys().filter(|k| !a.contains_key(*k)).collect();
    let differ: Vec<&String> = a.keys().filter(|k| b.get(*k).is_some_and(|v| v != &a[*k])).collect();
    Some(format!("only in the first: {only_a:?}; only in the second: {only_b:?}; different bytes: {differ:?}"))
}

/// True for a name the client gives a conflicted copy.
pub fn is_conflicted_copy(path: &str) -> bool {
    path.contains(" (conflicted copy ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_lines_parse() {
        let log = "[2026-01-01T00:00:00Z DEBUG replibox::ledger] acknowledged op=upload path=\"d0/f1.bin\" \
                   version=4294967299 deleted=false size=12 hash=26c7827d889f6da3\n\
                   [2026-01-01T00:00:00Z DEBUG replibox::ledger] acknowledged op=rename from=\"a \\\"b\\\"\" \
                   path=\"c\" version=7 deleted=false size=0 hash=ef46db3751d8e999\n\
                   uploaded d0/f1.bin (12 B)\n";
        let l = ledger("d", "u", log);
        assert_eq!(l.len(), 2, "{l:?}");
        assert_eq!((l[0].op.as_str(), l[0].path.as_str(), l[0].version), ("upload", "d0/f1.bin", 4294967299));
        assert_eq!(l[1].from.as_deref(), Some("a \"b\""));
        assert_eq!(l[1].path, "c");
    }
}
