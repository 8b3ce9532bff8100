//! Walking the sync dir: every regular file and every folder with a valid name
//! that the ignore rules do not exclude, never following symlinks, never entering
//! the client's own `.replibox` entries.

use crate::rules::Rules;
use replibox_proto::names::is_reserved;
use replibox_proto::validate_path;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::UNIX_EPOCH;

/// A local file (or folder) as the scanner saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalFile {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the Unix epoch.
    pub mtime_ns: i128,
    /// Its owner's execute bit is set: the only part of the mode that syncs.
    pub exec: bool,
    /// A folder: size, mtime and mode are 0 and false (a folder's mtime changes
    /// with what happens inside it; it does not sync).
    pub dir: bool,
}

impl LocalFile {
    /// The file whose metadata is `md`.
    pub fn of(md: &fs::Metadata) -> LocalFile {
        use std::os::unix::fs::PermissionsExt;
        LocalFile { size: md.len(), mtime_ns: mtime_ns(md), exec: md.permissions().mode() & 0o100 != 0, dir: false }
    }

    /// A folder.
    pub const DIR: LocalFile = LocalFile { size: 0, mtime_ns: 0, exec: false, dir: true };
}

/// Gives a file the mode a synced file has: read and write for its owner and
/// what the umask leaves of read for others, plus execute for all who may read
/// it when `exec`. Only the execute bit syncs; everything else is the local
/// default, as Syncthing and Dropbox do.
pub fn set_exec(file: &fs::File, exec: bool) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = file.metadata()?.permissions().mode() & 0o777;
    let want = if exec { mode | ((mode & 0o444) >> 2) | 0o100 } else { mode & !0o111 };
    if want != mode {
        file.set_permissions(fs::Permissions::from_mode(want))?;
    }
    Ok(())
}

/// The mtime of a file's metadata in ns since the Unix epoch.
pub fn mtime_ns(md: &fs::Metadata) -> i128 {
    match md.modified() {
        Ok(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        },
        Err(_) => 0,
    }
}

/// True when every folder between `root` and `rel` is a real folder, or does not
/// exist yet (it will be created as one): nothing read, written, moved or removed
/// at `rel` goes through a symlink, which could lead outside the sync dir.
pub fn confined(root: &Path, rel: &str) -> bool {
    let mut dir = root.to_path_buf();
    let mut parts: Vec<&str> = rel.split('/').collect();
    parts.pop();
    for part in parts {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(md) if md.file_type().is_dir() => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
            // A symlink, or a file where a folder should be.
            _ => return false,
        }
    }
    true
}

/// Stats one path inside the sync dir; None when it is not a regular file, or
/// when a folder on its way is a symlink (never followed).
pub fn stat(root: &Path, rel: &str) -> Option<LocalFile> {
    if !confined(root, rel) {
        return None;
    }
    let md = fs::symlink_metadata(root.join(rel)).ok()?;
    md.file_type().is_file().then(|| LocalFile::of(&md))
}

/// Stats one path inside the sync dir like [`stat`], a folder included (as
/// [`LocalFile::DIR`]).
pub fn stat_any(root: &Path, rel: &str) -> Option<LocalFile> {
    if !confined(root, rel) {
        return None;
    }
    let md = fs::symlink_metadata(root.join(rel)).ok()?;
    if md.file_type().is_dir() {
        return Some(LocalFile::DIR);
    }
    md.file_type().is_file().then(|| LocalFile::of(&md))
}

/// Every syncable file and folder under `root`, by relative path. An ignored folder is not
/// entered (gitignore's rule: nothing under an excluded folder can be included
/// again), an ignored file is left out.
pub fn scan(root: &Path, rules: &Rules) -> BTreeMap<String, LocalFile> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                log::warn!("cannot list {}: {e}", dir.display());
                continue;
            }
        };
        for entry in entries.flatten() {
            let name = match entry.file_name().into_string() {
                Ok(n) => n,
                Err(n) => {
                    log::warn!("skipping a name that is not UTF-8: {n:?} in {}", dir.display());
                    continue;
                }
            };
            if is_reserved(&name) {
                continue;
            }
            let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
            let Ok(md) = fs::symlink_metadata(entry.path()) else { continue };
            let ft = md.file_type();
            if ft.is_dir() {
                if rules.ignores_dir(&rel) {
                    continue;
                }
                if let Err(e) = validate_path(&rel) {
                    log::warn!("not syncing folder {rel} nor anything in it: {e}");
                    continue;
                }
                out.insert(rel.clone(), LocalFile::DIR);
                stack.push((entry.path(), rel));
            } else if ft.is_file() {
                if rules.ignores_file(&rel) {
                    continue;
                }
                if let Err(e) = validate_path(&rel) {
                    log::warn!("not syncing {rel}: {e}");
                    continue;
                }
                out.insert(rel, LocalFile::of(&md));
            } else if ft.is_symlink() {
                log::debug!("not following symlink {rel}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_files_and_folders_are_left_out() {
        let root = std::env::temp_dir().join(format!("replibox-scan-ignored-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("build/deep")).unwrap();
        fs::create_dir_all(root.join("src")).unwrap();
        fs::write(root.join(crate::rules::RULES_FILE), "build/\n*.log\n!keep.log\n").unwrap();
        for f in ["build/deep/a.o", "src/main.rs", "src/.main.rs.swp", "x.log", "keep.log", "notes~"] {
            fs::write(root.join(f), b"x").unwrap();
        }
        let found: Vec<String> = scan(&root, &Rules::load(&root)).into_keys().collect();
        assert_eq!(found, ["keep.log", "src", "src/main.rs"], "folders are found too, ignored ones are not");
        assert!(scan(&root, &Rules::load(&root))["src"].dir);
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn symlinked_folders_are_not_confined() {
        let root = std::env::temp_dir().join(format!("replibox-scan-confined-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let outside = root.with_extension("outside");
        fs::create_dir_all(root.join("real/sub")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("f"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        fs::write(root.join("file"), b"x").unwrap();
        assert!(confined(&root, "top.txt"));
        assert!(confined(&root, "real/sub/x"));
        assert!(confined(&root, "new/folders/x"));
        assert!(!confined(&root, "link/f"));
        assert!(!confined(&root, "link/deeper/f"));
        assert!(!confined(&root, "file/x"));
        assert!(stat(&root, "link/f").is_none(), "stat must not follow a symlinked folder");
        assert!(!scan(&root, &Rules::load(&root)).contains_key("link/f"));
        let _ = fs::remove_dir_all(&root);
        let _ = fs::remove_dir_all(&outside);
    }
}
