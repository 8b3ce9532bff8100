//! Making many files durable at once. An fsync mostly waits on the disk, and the
//! file system's journal takes several flushes together faster than one after
//! another (on this project's test machine's ext4, 0.26 ms a file with eight
//! threads against 1-2 ms in turn): a server's group commit and a device's batch
//! of received files both sync this way.
//!
//! A large file arriving over the network is written through a [`WriteBehind`],
//! which keeps only its last few MiB in the page cache; one a server sends is read
//! through a [`ReadBehind`], for the same reason.

use std::borrow::Borrow;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::mpsc;
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

/// How many written bytes a [`WriteBehind`] leaves in the page cache before its
/// helper writes them to disk and drops them from the cache. Smaller windows cost
/// more syncs (on this project's test machine, with the writer itself syncing:
/// 1 GiB in 0.96 s with 8 MiB windows, 0.8 s with 32 MiB, no better beyond); the
/// cache holds at most about two windows per file.
pub const WRITE_BEHIND: u64 = 32 << 20;

/// A file written once, from its start to its end, that does not fill the page
/// cache: every [`WRITE_BEHIND`] bytes, a helper thread syncs what was written and
/// drops it from the cache while the writer goes on with the next bytes.
///
/// Why: an upload of 1 GiB is stored by three servers and a device, each into
/// pages the kernel must find and fill anew (on a virtual machine that hands freed
/// memory back to its host, slowly, as the test machine does: 2-4 s per GiB against
/// 0.7 s into pages just freed); a server also pushes other users' files out of its
/// cache, and the fsync that makes the file durable at commit would find the whole
/// file still to write while the group commit waits. Syncing on the writer's own
/// thread would stop it (and the stream feeding it) for every window; the helper
/// keeps the disk and the writer busy at once. Measured on the test machine, 1 GiB
/// written and synced: 0.56-0.75 s through a `WriteBehind`, 0.8-1.0 s with the
/// writer syncing each window itself, 1.6-4.0 s written plainly.
///
/// This is a hint, not durability: the file is still synced where it was before
/// (a group's flush, a device's batch). An error from an intermediate sync is
/// returned by a later `write` or by [`WriteBehind::finish`], which every writer
/// calls once the last byte is written, so that it is never lost to the final
/// sync (which may come through another descriptor). A file smaller than one
/// window never starts a helper.
pub struct WriteBehind<F: Borrow<File>> {
    file: F,
    /// Bytes written so far, from the file's start.
    written: u64,
    /// The helper was last asked to sync up to this offset.
    asked: u64,
    helper: Option<Helper>,
}

/// The thread that syncs and drops a [`WriteBehind`]'s windows.
struct Helper {
    /// Offsets to sync up to; a rendezvous, so the writer runs at most one window
    /// ahead of the helper.
    ask: Option<mpsc::SyncSender<u64>>,
    failed: mpsc::Receiver<io::Error>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Helper {
    fn start(file: &File) -> io::Result<Helper> {
        let file = file.try_clone()?;
        let (ask, asked) = mpsc::sync_channel::<u64>(0);
        let (fail, failed) = mpsc::sync_channel(1);
        let thread = thread::Builder::new().name("write-behind".into()).spawn(move || {
            let mut dropped = 0u64;
            for upto in asked {
                if let Err(e) = file.sync_data() {
                    let _ = fail.send(e);
                    return;
                }
                // Only a hint: if the kernel ignores it, the pages stay cached.
                let (from, len) = (dropped as i64, upto.saturating_sub(dropped) as i64);
                let _ =
                    nix::fcntl::posix_fadvise(&file, from, len, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
                dropped = upto;
            }
        })?;
        Ok(Helper { ask: Some(ask), failed, thread: Some(thread) })
    }

    /// Hands `upto` over, once the helper is done with the previous window.
    fn ask(&mut self, upto: u64) -> io::Result<()> {
        self.error()?;
        let sent = self.ask.as_ref().is_some_and(|ask| ask.send(upto).is_ok());
        if !sent {
            // The helper stopped: it failed, and says why.
            self.stop();
            return Err(self.failed.try_recv().unwrap_or_else(|_| io::Error::other("the write-behind helper stopped")));
        }
        Ok(())
    }

    fn error(&self) -> io::Result<()> {
        match self.failed.try_recv() {
            Ok(e) => Err(e),
            Err(_) => Ok(()),
        }
    }

    /// Waits for the helper to finish its last window (its error, if any, stays
    /// in `failed`).
    fn stop(&mut self) {
        self.ask = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.stop();
    }
}

impl<F: Borrow<File>> WriteBehind<F> {
    /// Writes through `file`, whose position is its start.
    pub fn new(file: F) -> Self {
        WriteBehind { file, written: 0, asked: 0, helper: None }
    }

    /// The file, to sync.
    pub fn get_ref(&self) -> &File {
        self.file.borrow()
    }

    /// Waits until the windows handed to the helper are synced, and returns the
    /// first error any of those syncs met. Call once the last byte is written.
    pub fn finish(&mut self) -> io::Result<()> {
        match self.helper.take() {
            Some(mut h) => {
                h.stop();
                h.error()
            }
            None => Ok(()),
        }
    }

    fn write_behind(&mut self) -> io::Result<()> {
        if self.helper.is_none() {
            match Helper::start(self.file.borrow()) {
                Ok(h) => self.helper = Some(h),
                // No thread to be had: sync here, the writer waiting.
                Err(_) => {
                    let file = self.file.borrow();
                    file.sync_data()?;
                    let len = (self.written - self.asked) as i64;
                    let advice = nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED;
                    let _ = nix::fcntl::posix_fadvise(file, self.asked as i64, len, advice);
                    self.asked = self.written;
                    return Ok(());
                }
            }
        }
        if let Some(h) = self.helper.as_mut() {
            h.ask(self.written)?;
        }
        self.asked = self.written;
        Ok(())
    }
}

impl<F: Borrow<File>> Write for WriteBehind<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Before the write, so that an error here means nothing of `buf` was written.
        if self.written - self.asked >= WRITE_BEHIND {
            self.write_behind()?;
        }
        let mut file: &File = self.file.borrow();
        let n = file.write(buf)?;
        self.written += n as u64;
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
            let (from, len) = (self.dropped as i64, (self.read - self.dropped) as i64);
            // Only a hint: if the kernel ignores it, the pages stay cached.
            let _ = nix::fcntl::posix_fadvise(file, from, len, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
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
        assert!(w.asked > 0 && w.asked < w.written, "asked for {} of {}", w.asked, w.written);
        w.finish().unwrap();
        w.get_ref().sync_all().unwrap();
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

    #[test]
    fn an_error_from_the_intermediate_sync_is_returned_and_nothing_is_written() {
        // /dev/null takes every write and refuses fsync (EINVAL).
        let file = File::options().write(true).open("/dev/null").unwrap();
        let mut w = WriteBehind::new(&file);
        w.write_all(&vec![0u8; WRITE_BEHIND as usize]).unwrap();
        // The helper starts, takes the first window and fails on it.
        w.write_all(b"x").unwrap();
        let failed = w.finish();
        assert!(failed.is_err(), "the failed sync was not returned");
        // Without finish: a later write that hands a window over returns it.
        let mut w = WriteBehind::new(&file);
        w.write_all(&vec![0u8; WRITE_BEHIND as usize]).unwrap();
        w.write_all(&vec![0u8; WRITE_BEHIND as usize]).unwrap();
        let written = w.written;
        assert!(w.write(b"x").is_err(), "the failed sync was not returned by a later write");
        assert_eq!(w.written, written, "a write that failed wrote nothing");
    }
}
