//! File helpers: seeded content, comparisons, tree snapshots.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::Path;

/// Seeded bytes and choices: the same seed, the same content.
pub use replibox_proto::rng::SplitMix64 as Rng;

/// `len` seeded bytes.
pub fn seeded(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// Writes `len` seeded bytes to `path` in 1 MiB pieces (the same bytes as
/// [`seeded`] with the same seed).
pub fn write_seeded(path: &Path, seed: u64, len: u64) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    let mut rng = Rng::new(seed);
    let mut w = BufWriter::new(File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display())));
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    // Fill whole multiples of 8 so that piecewise output equals `seeded`.
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    w.flush().unwrap();
    w.into_inner().unwrap().sync_all().unwrap();
}

/// Writes a small file, creating its folders.
pub fn put(path: &Path, bytes: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
    }
    fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// True when the file at `path` holds exactly `bytes` (its size is checked first,
/// so polling a file still on its way is cheap).
pub fn holds(path: &Path, bytes: &[u8]) -> bool {
    match fs::symlink_metadata(path) {
        Ok(md) if md.is_file() && md.len() == bytes.len() as u64 => {}
        _ => return false,
    }
    fs::read(path).map(|b| b == bytes).unwrap_or(false)
}

/// True when two files have the same bytes (size first, then streamed).
pub fn same_file(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (fs::metadata(a), fs::metadata(b)) else { return false };
    if !ma.is_file() || !mb.is_file() || ma.len() != mb.len() {
        return false;
    }
    let (Ok(mut fa), Ok(mut fb)) = (File::open(a), File::open(b)) else { return false };
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    loop {
        let (Ok(n), Ok(m)) = (read_full(&mut fa, &mut ba), read_full(&mut fb, &mut bb)) else { return false };
        if n != m || ba[..n] != bb[..n] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read(&mut buf[done..])? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// What a tree holds: files (relative path -> size) and folders, never entering
/// the client's own `.replibox` at the top.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    /// Regular files and their sizes.
    pub files: BTreeMap<String, u64>,
    /// Folders.
    pub dirs: BTreeSet<String>,
    /// Anything else (symlinks, ...).
    pub other: BTreeSet<String>,
}

/// Walks `root` (a missing root is an empty tree).
pub fn tree(root: &Path) -> Tree {
    let mut t = Tree::default();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if prefix.is_empty() && name == ".replibox" {
                continue;
            }
            let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            let Ok(md) = fs::symlink_metadata(e.path()) else { continue };
            if md.is_dir() {
                t.dirs.insert(rel.clone());
                stack.push((e.path(), rel));
            } else if md.is_file() {
                t.files.insert(rel, md.len());
            } else {
                t.other.insert(rel);
            }
        }
    }
    t
}

/// The folders a set of file paths needs.
pub fn dirs_of<'a>(paths: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
    let mut dirs = BTreeSet::new();
    for p in paths {
        for (i, _) in p.match_indices('/') {
            dirs.insert(p[..i].to_string());
        }
    }
    dirs
}

/// Whether `root` holds exactly `expected` (paths and bytes), with no other file
/// and no folder that the files do not need. `Err` says the first difference.
pub fn check_tree(root: &Path, expected: &BTreeMap<String, Vec<u8>>) -> Result<(), String> {
    let t = tree(root);
    let want_sizes: BTreeMap<String, u64> = expected.iter().map(|(p, b)| (p.clone(), b.len() as u64)).collect();
    if t.files != want_sizes {
        let missing: Vec<_> = want_sizes.keys().filter(|p| !t.files.contains_key(*p)).collect();
        let extra: Vec<_> = t.files.keys().filter(|p| !want_sizes.contains_key(*p)).collect();
        let sized: Vec<_> = want_sizes
            .iter()
            .filter(|(p, s)| t.files.get(*p).is_some_and(|got| got != *s))
            .map(|(p, s)| format!("{p} ({} of {s} bytes)", t.files[p]))
            .collect();
        return Err(format!("{}: missing {missing:?}, unexpected {extra:?}, wrong size {sized:?}", root.display()));
    }
    let want_dirs = dirs_of(expected.keys());
    if t.dirs != want_dirs || !t.other.is_empty() {
        return Err(format!(
            "{}: folders {:?}, expected {:?}; other entries {:?}",
            root.display(),
            t.dirs,
            want_dirs,
            t.other
        ));
    }
    for (p, bytes) in expected {
        if !holds(&root.join(p), bytes) {
            return Err(format!("{}: {p} has other bytes than expected", root.display()));
        }
    }
    Ok(())
}

/// Like [`check_tree`], with `empty` (and the folders on their way) as the
/// folders the tree holds besides those its files need.
pub fn check_layout(root: &Path, expected: &BTreeMap<String, Vec<u8>>, empty: &[&str]) -> Result<(), String> {
    let t = tree(root);
    let mut want_dirs = dirs_of(expected.keys());
    for e in empty {
        want_dirs.insert(e.to_string());
        want_dirs.extend(dirs_of([&e.to_string()]));
    }
    if t.dirs != want_dirs {
        return Err(format!("{}: folders {:?}, expected {:?}", root.display(), t.dirs, want_dirs));
    }
    if t.files.keys().ne(expected.keys()) || !t.other.is_empty() {
        return Err(format!(
            "{}: files {:?}, expected {:?}; other entries {:?}",
            root.display(),
            t.files.keys(),
            expected.keys(),
            t.other
        ));
    }
    for (p, bytes) in expected {
        if !holds(&root.join(p), bytes) {
            return Err(format!("{}: {p} has other bytes than expected", root.display()));
        }
    }
    Ok(())
}

/// Every file's bytes under `root` (for small trees).
pub fn contents(root: &Path) -> BTreeMap<String, Vec<u8>> {
    tree(root).files.into_keys().filter_map(|p| fs::read(root.join(&p)).ok().map(|b| (p, b))).collect()
}

/// A listing of everything under `root` with sizes, for failure reports.
pub fn listing(root: &Path, max: usize) -> String {
    let mut out = String::new();
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    let mut all = Vec::new();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(md) = fs::symlink_metadata(&p) else { continue };
            let rel = p.strip_prefix(root).unwrap_or(&p).display().to_string();
            if md.is_dir() {
                all.push(format!("{rel}/"));
                stack.push(p);
            } else {
                all.push(format!("{rel}  ({} bytes)", md.len()));
            }
        }
    }
    all.sort();
    for l in all {
        n += 1;
        if n > max {
            out.push_str("    ...\n");
            break;
        }
        out.push_str("    ");
        out.push_str(&l);
        out.push('\n');
    }
    out
}
