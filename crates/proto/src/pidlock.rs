//! An exclusive `flock` on a lock file, with the holder's pid inside: one server
//! per data dir, one client per sync dir.
//!
//! flock rather than a pid file: the kernel drops the lock when the process ends
//! in any way (SIGKILL and crashes included), so a stale lock never blocks a
//! restart, and no pid has to be checked for reuse. The pid is only for the
//! message a second process prints.

use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;

/// Why a lock was not taken.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds it; its pid when the file names one.
    Held(Option<u32>),
    /// The file could not be opened or locked (the message names it).
    Failed(String),
}

/// Takes the lock of `path` without waiting, creating the file if need be, and
/// writes this process's pid into it.
pub fn lock(path: &Path) -> Result<Flock<File>, LockError> {
    // Not truncated on open: the pid inside belongs to the holder until the lock
    // is ours.
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| LockError::Failed(format!("cannot open {}: {e}", path.display())))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            let _ = lock.set_len(0);
            let _ = lock.rewind();
            let _ = write!(lock, "{}", std::process::id());
            let _ = lock.flush();
            Ok(lock)
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            Err(LockError::Held(holder.trim().parse().ok()))
        }
        Err((_, e)) => Err(LockError::Failed(format!("cannot lock {}: {e}", path.display()))),
    }
}

/// "another NAME (pid N)", or without the pid when the file named none.
pub fn holder(name: &str, pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("another {name} (pid {pid})"),
        None => format!("another {name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid_and_taken_once_released() {
        let dir = std::env::temp_dir().join(format!("replibox-pidlock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lock");
        let first = lock(&path).unwrap_or_else(|e| panic!("{e:?}"));
        match lock(&path) {
            Err(LockError::Held(pid)) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("a second lock got {other:?}"),
        }
        drop(first);
        assert!(lock(&path).is_ok(), "the lock was not released");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
