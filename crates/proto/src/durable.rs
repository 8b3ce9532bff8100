//! Making many files durable at once. An fsync mostly waits on the disk, and the
//! file system's journal takes several flushes together faster than one after
//! another (on this project's test machine's ext4, 0.26 ms a file with eight
//! threads against 1-2 ms in turn): a server's group commit and a device's batch
//! of received files both sync this way.
//!
//! A large file arriving over the network is written through a [`WriteBehind`],
//! which has the kernel write it out and drop it from the page cache as it goes
//! ([`drop_synced`] drops the rest after the final fsync); one a server sends is
//! read through a [`ReadBehind`], for the same reason.

use std::borrow::Borrow;
use std::fs::File;
use std::io::{self, Read, Write};
use std::thread;

/// How many files are synced at once.
pub const SYNC_THREADS: usize = 8;

/// Runs `sync` on every item, spread over up to [`SYNC_THREADS`] threads; the
/// first error (in item order within each thread) is returned. One item (or
/// none) is synced on the calling thread.
pub fn sync_all<T: Sync>(items: &[T], sync: impl Fn(&T) -> io::Result<()> + Sync) -> io::Result<()> {
    if items.len() < 2 {
        return items.iter().try_for_each(&sync);
    }
    let share = items.len().div_ceil(SYNC_THREADS);
    let sync = &sync;
    thread::scope(|scope| {
        let workers: Vec<_> =
            items.chunks(share).map(|part| scope.spawn(move || part.iter().try_for_each(sync))).collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().unwrap_or_else(|_| Err(io::Error::other("a syncing thread panicked"))))
    })
}

/// How many bytes a [`WriteBehind`] or [`ReadBehind`] goes between two drops of
/// what it has done from the page cache.
pub const WRITE_BEHIND: u64 = 32 << 20;

/// Asks the kernel to write out the dirty pages of `file` in `[from, to)` and to
/// drop the clean ones from the page cache. Only a hint: the writeback it starts
/// is not waited for, pages still being written stay cached, and an error of that
/// writeback is left for the file's next fsync to report (nothing here sees it).
fn drop_range(file: &File, from: u64, to: u64) {
    let (from, len) = (from.min(i64::MAX as u64) as i64, to.saturating_sub(from).min(i64::MAX as u64) as i64);
    let _ = nix::fcntl::posix_fadvise(file, from, len, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}

/// Drops a file that was just synced from the page cache, when it is at least
/// [`WRITE_BEHIND`] bytes long (a small one costs nothing to keep). For the end
/// of a file written through a [`WriteBehind`], once its final fsync is done.
pub fn drop_synced(file: &File) {
    if file.metadata().is_ok_and(|m| m.len() >= WRITE_BEHIND) {
        drop_range(file, 0, u64::MAX);
    }
}

/// A file written once, from its start to its end, that does not fill the page
/// cache: every [`WRITE_BEHIND`] bytes, the kernel is asked to write out what was
/// written and to drop what is already on disk (`posix_fadvise(DONTNEED)`, which
/// starts writeback without waiting for it).
///
/// Why: an upload of 1 GiB is stored by three servers and a device, each into
/// pages the kernel must find and fill anew (on a virtual machine that hands freed
/// memory back to its host, slowly, as the test machine does: 1.6-4.0 s per GiB
/// against 0.7 s into pages just freed); a server also pushes other users' files
/// out of its cache, and the fsync that makes the file durable at commit would
/// find the whole file still to write while the group commit waits. Measured on
/// the test machine, 1 GiB written and then fsynced: 0.46-0.54 s through a
/// `WriteBehind`, 1.6-4.0 s written plainly.
///
/// The writer never waits for the disk here (only, as any writer, for the kernel
/// to take the I/O): a backup's follower, which also reads the primary's
/// heartbeats, must not stall on a slow disk. And no error is seen here: the
/// final fsync (a group's flush, a device's batch) reports any error of the
/// writeback started here, as it would have without it. [`drop_synced`] drops
/// the rest once that fsync is done.
pub struct WriteBehind<F: Borrow<File>> {
    file: F,
    /// Bytes written so far, from the file's start.
    written: u64,
    /// Where the next drop is due.
    next_drop: u64,
}

impl<F: Borrow<File>> WriteBehind<F> {
    /// Writes through `file`, whose position is its start.
    pub fn new(file: F) -> Self {
        WriteBehind { file, written: 0, next_drop: WRITE_BEHIND }
    }

    /// The file, to sync.
    pub fn get_ref(&self) -> &File {
        self.file.borrow()
    }
}

impl<F: Borrow<File>> Write for WriteBehind<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut file: &File = self.file.borrow();
        let n = file.write(buf)?;
        self.written += n as u64;
        if self.written >= self.next_drop {
            // From the start each time: a window whose writeback was still under
            // way at the last drop is dropped now (an empty range costs little).
            drop_range(file, 0, self.written);
            self.next_drop = self.written + WRITE_BEHIND;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut file: &File = self.file.borrow();
        file.flush()
    }
}

/// A file read once, from its start to its end, that does not fill the page
/// cache: every [`WRITE_BEHIND`] bytes, what was read is dropped from the cache.
///
/// Why: a server sending a large file (a download, a backup's fetch) reads it from
/// disk into pages the kernel must find anew, as [`WriteBehind`] explains; read
/// plainly, 1 GiB took 1.2-2.2 s on the test machine, dropped behind 0.5-0.6 s
/// (the freed pages are the next ones filled). The file's first and last window
/// may stay cached.
pub struct ReadBehind<F: Borrow<File>> {
    file: F,
    /// Bytes read so far, from the file's start.
    read: u64,
    /// Bytes before this offset were dropped from the cache.
    dropped: u64,
}

impl<F: Borrow<File>> ReadBehind<F> {
    /// Reads through `file`, whose position is its start.
    pub fn new(file: F) -> Self {
        ReadBehind { file, read: 0, dropped: 0 }
    }
}

impl<F: Borrow<File>> Read for ReadBehind<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut file: &File = self.file.borrow();
        let n = file.read(buf)?;
        self.read += n as u64;
        if self.read - self.dropped >= WRITE_BEHIND {
            drop_range(file, self.dropped, self.read);
            self.dropped = self.read;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_item_is_synced_once_and_an_error_is_returned() {
        let seen = AtomicUsize::new(0);
        let items: Vec<usize> = (0..100).collect();
        sync_all(&items, |_| {
            seen.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.load(Ordering::Relaxed), 100);
        let failed = sync_all(&items, |i| if *i == 57 { Err(io::Error::other("57 failed")) } else { Ok(()) });
        assert_eq!(failed.map_err(|e| e.to_string()), Err("57 failed".to_string()));
        assert!(sync_all(&[] as &[usize], |_| Err(io::Error::other("never called"))).is_ok());
    }

    #[test]
    fn a_file_written_behind_holds_every_byte_in_order_and_reads_back_behind() {
        let dir = std::env::temp_dir().join(format!("replibox-writebehind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let mut w = WriteBehind::new(File::create(&path).unwrap());
        // Chunks that straddle the window, so that several drops happen mid-file.
        let mut expected = Vec::new();
        let chunk: Vec<u8> = (0..(3 << 20) + 7).map(|i| (i % 251) as u8).collect();
        while (expected.len() as u64) < 3 * WRITE_BEHIND {
            w.write_all(&chunk).unwrap();
            expected.extend_from_slice(&chunk);
        }
        assert!(w.next_drop > 3 * WRITE_BEHIND, "no drop was made at the third window (next at {})", w.next_drop);
        w.get_ref().sync_all().unwrap();
        drop_synced(w.get_ref());
        assert!(std::fs::read(&path).unwrap() == expected, "the file holds other bytes than were written");
        // Read back behind, in pieces that straddle the windows too.
        let mut r = ReadBehind::new(File::open(&path).unwrap());
        let mut got = Vec::new();
        let mut piece = vec![0u8; (1 << 20) + 3];
        loop {
            let n = r.read(&mut piece).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&piece[..n]);
        }
        assert!(r.dropped > 0, "nothing was dropped behind the reader");
        assert!(got == expected, "reading behind gave other bytes than were written");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
