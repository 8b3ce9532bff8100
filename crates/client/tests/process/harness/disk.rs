//! Disks that fill up or stop taking writes, for real (the tests run as root, as
//! CI does): a small tmpfs, and a folder made read-only in place.

use super::fail;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs mount(8) or umount(8) with `args`, then the paths `at`; panics with its
/// stderr if it fails.
fn mount(args: &[&str], at: &[&Path]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .args(at)
        .output()
        .unwrap_or_else(|e| fail(format!("cannot run {}: {e}", args[0])));
    if !out.status.success() {
        fail(format!(
            "{} at {} failed (these tests need root, as CI has): {}",
            args.join(" "),
            at.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
}

/// A small tmpfs mounted for one test: a disk that fills up for real. Unmounted
/// (lazily, so a process still inside cannot stop it) on drop.
pub struct SmallDisk {
    /// Where it is mounted.
    pub path: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (`2m`, `64m`) at `path`, made if missing.
    pub fn mount(path: PathBuf, size: &str) -> SmallDisk {
        std::fs::create_dir_all(&path).unwrap_or_else(|e| fail(format!("cannot create {}: {e}", path.display())));
        mount(&["mount", "-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"], &[&path]);
        SmallDisk { path }
    }

    /// Makes the disk bigger (room again).
    pub fn grow(&self, size: &str) {
        mount(&["mount", "-o", &format!("remount,size={size}")], &[&self.path]);
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A folder made read-only in place while processes use it: a bind mount of the
/// folder onto itself, remounted read-only. Whatever is opened, created, renamed
/// or removed under it from then on fails with EROFS (root included: mode bits
/// would not stop root); a file opened for writing before keeps its old mount
/// (the kernel refuses to make a mount read-only while files are open for writing
/// on it, which is why the folder gets a mount of its own). [`ReadOnly::undo`]
/// (or drop) makes it writable again.
pub struct ReadOnly {
    path: PathBuf,
    on: bool,
}

impl ReadOnly {
    /// Makes `path` (an existing folder) read-only.
    pub fn make(path: &Path) -> ReadOnly {
        mount(&["mount", "--bind"], &[path, path]);
        mount(&["mount", "-o", "remount,bind,ro"], &[path]);
        ReadOnly { path: path.to_path_buf(), on: true }
    }

    /// Writable again.
    pub fn undo(&mut self) {
        if std::mem::take(&mut self.on) {
            mount(&["umount"], &[&self.path]);
        }
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        if self.on {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}
