//! The sync dir's own state in `.replibox/`: the lock that allows one client per
//! sync dir, the marker that tells a vanished or unmounted sync dir from one the
//! user emptied, the device id, and the device's name.

use nix::fcntl::Flock;
use replibox_proto::pidlock::{self, LockError};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The client's folder inside the sync dir.
pub const META: &str = ".replibox";

/// An exclusive lock on `.replibox/lock` ([`pidlock`]), held for as long as the
/// client runs.
pub struct SyncDirLock {
    lock: Flock<File>,
    path: PathBuf,
}

impl SyncDirLock {
    /// Takes the lock of the sync dir whose `.replibox/` is `meta`, without
    /// waiting. Err says why, naming the other client's pid when it is known.
    pub fn acquire(meta: &Path) -> Result<SyncDirLock, String> {
        let path = meta.join("lock");
        match pidlock::lock(&path) {
            Ok(lock) => Ok(SyncDirLock { lock, path }),
            Err(LockError::Held(pid)) => {
                let root = meta.parent().unwrap_or(meta);
                Err(format!(
                    "the sync dir {} is in use by {}; one client per sync dir (give this one its own --sync-dir)",
                    root.display(),
                    pidlock::holder("replibox-client", pid)
                ))
            }
            Err(LockError::Failed(why)) => Err(why),
        }
    }

    /// The folder marker of this sync dir: the lock file itself.
    pub fn marker(&self) -> io::Result<Marker> {
        let md = self.lock.metadata()?;
        Ok(Marker { path: self.path.clone(), dev: md.dev(), ino: md.ino() })
    }
}

/// The folder marker: `.replibox/lock`, the very file this client holds open.
///
/// Without a marker, a sync dir removed with `rm -rf`, or a file system unmounted
/// from under it, looks exactly like a sync dir whose user deleted every file,
/// and the engine would send every delete (Syncthing keeps its `.stfolder` marker
/// for the same reason). The lock file is a marker no one can fake by accident:
/// while the client holds it open, its inode cannot be reused, so a sync dir made
/// again at the same path (even one with a `.replibox/lock` of its own) never
/// passes for this one. Every sync dir has one, so no older sync dir needs
/// upgrading, and it goes away with the files it guards.
#[derive(Clone, Debug)]
pub struct Marker {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Marker {
    /// Ok while `.replibox/lock` is still the file this client locked; Err says
    /// what happened, for the user.
    pub fn check(&self) -> Result<(), String> {
        let meta = self.path.parent().unwrap_or(&self.path);
        let root = meta.parent().unwrap_or(meta).display();
        match fs::symlink_metadata(&self.path) {
            Ok(md) if md.dev() == self.dev && md.ino() == self.ino => Ok(()),
            Ok(_) => Err(format!("the sync dir {root} was replaced (removed and made again): its marker is not the one this client holds")),
            Err(_) => Err(format!(
                "the sync dir {root} is gone, or its file system is not mounted: its marker {} is missing",
                self.path.display()
            )),
        }
    }
}

/// Random bytes as lowercase hex, from the operating system's generator.
pub fn random_hex(bytes: usize) -> Result<String, String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| format!("no random bytes from the system: {e}"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Longest device name, in bytes: it goes into conflicted-copy names, which must
/// stay readable and within a file name's 255 bytes.
pub const MAX_DEVICE_NAME: usize = 64;

/// Checks a `--device-name`: 1 to 64 bytes of printable text without `/` or `\`
/// (it becomes part of a file name).
pub fn validate_device_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("a device name may not be empty".into());
    }
    if name.len() > MAX_DEVICE_NAME {
        return Err(format!("a device name has at most {MAX_DEVICE_NAME} bytes"));
    }
    if name.trim() != name {
        return Err("a device name may not start or end with a space".into());
    }
    if name.chars().any(|c| c == '/' || c == '\\' || c.is_control()) {
        return Err("a device name may not contain '/', '\\' or control characters".into());
    }
    Ok(())
}

/// The default device name: this machine's host name, without its domain
/// (`lab4.example.edu` is `lab4`); None when there is no usable one.
pub fn host_name() -> Option<String> {
    // Linux keeps it here; /etc/hostname is the same on most systems and a
    // fallback elsewhere.
    let raw = ["/proc/sys/kernel/hostname", "/etc/hostname"].iter().find_map(|p| fs::read_to_string(p).ok())?;
    short_host_name(&raw)
}

fn short_host_name(raw: &str) -> Option<String> {
    let short = raw.trim().split('.').next().unwrap_or("").to_string();
    validate_device_name(&short).ok().map(|()| short)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("replibox-syncdir-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(p.join(META)).unwrap();
        p
    }

    #[test]
    fn one_lock_at_a_time_and_released_on_drop() {
        let root = temp("lock");
        let first = SyncDirLock::acquire(&root.join(META)).unwrap();
        let err = SyncDirLock::acquire(&root.join(META)).err().expect("a second lock must be refused");
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        drop(first);
        SyncDirLock::acquire(&root.join(META)).expect("the lock is free again once dropped");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn the_marker_notices_a_removed_or_replaced_sync_dir() {
        let root = temp("marker");
        let lock = SyncDirLock::acquire(&root.join(META)).unwrap();
        let marker = lock.marker().unwrap();
        assert_eq!(marker.check(), Ok(()));
        fs::remove_dir_all(root.join(META)).unwrap();
        assert!(marker.check().unwrap_err().contains("is gone"));
        // Made again, lock file and all (by a second client, say).
        fs::create_dir(root.join(META)).unwrap();
        let second = SyncDirLock::acquire(&root.join(META)).expect("a new sync dir has a free lock");
        assert!(marker.check().unwrap_err().contains("was replaced"));
        assert_eq!(second.marker().unwrap().check(), Ok(()));
        drop(second);
        fs::remove_dir_all(&root).unwrap();
        assert!(marker.check().unwrap_err().contains("is gone"));
        drop(lock);
    }

    #[test]
    fn device_names() {
        assert_eq!(short_host_name("lab4.example.edu\n"), Some("lab4".into()));
        assert_eq!(short_host_name("\n"), None);
        assert!(validate_device_name("alice's laptop").is_ok());
        for bad in ["", " x", "a/b", "a\\b", "tab\there", &"x".repeat(65)] {
            assert!(validate_device_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(random_hex(8).unwrap().len(), 16);
    }
}
