//! Early copies on the device's side: the bytes of a large upload another device
//! of this user is making, received while the servers store it
//! (`Msg::EarlyBegin` to `EarlyEnd`). A copy is only ever bytes set aside: the
//! sync engine places one for a notice of the same path, size and hash
//! ([`crate::Frontend::take_early`]), and downloads as before otherwise.
//!
//! What a server sends here is checked as a download is: names are validated,
//! no more bytes than announced are taken, and the hash must match. Anything
//! wrong drops that copy only; the connection goes on.

use replibox_proto::durable::WriteBehind;
use replibox_proto::{validate_path, ContentHash, Hasher};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Numbers the copies' files: a name the server chose never picks the file.
static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

/// How many copies a device holds whole, and how many may be arriving on one
/// connection: a transfer begun beyond it is ignored (the file is downloaded
/// once told), and a whole copy beyond it pushes out the oldest.
pub const MAX_COPIES: usize = 4;

/// Room an early copy must leave free on the device's disk beyond its own bytes
/// (and the rest of those still arriving): a copy never takes the last of the
/// space the user's own files need.
pub const FREE_MARGIN: u64 = 256 << 20;

/// The bytes free for this user on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Result<u64, String> {
    let fs =
        nix::sys::statvfs::statvfs(dir).map_err(|e| format!("cannot read the free space of {}: {e}", dir.display()))?;
    Ok((fs.blocks_available() as u64).saturating_mul(fs.fragment_size() as u64))
}

/// A whole early copy waiting for the notice that tells of its file.
#[derive(Debug)]
pub struct Copy {
    /// The path uploaded.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// The hash the primary received.
    pub hash: ContentHash,
    /// Where its bytes are (synced only when taken).
    pub file: PathBuf,
}

/// Which paths the device takes early copies of (true: taken).
pub type Wanted = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The whole copies of a front-end, where copies go (none until the engine
/// says: early transfers before that are ignored), and of which paths.
#[derive(Default)]
pub struct Held {
    dir: Option<PathBuf>,
    wanted: Option<Wanted>,
    whole: VecDeque<Copy>,
}

impl Held {
    /// Copies go to `dir` from now on.
    pub fn keep_in(&mut self, dir: PathBuf) {
        self.dir = Some(dir);
    }

    /// From now on, copies are taken only of the paths `wanted` says yes to
    /// (the device's ignore rules: a path it never receives is not worth
    /// writing).
    pub fn want_only(&mut self, wanted: Wanted) {
        self.wanted = Some(wanted);
    }

    /// Where a copy of `path` goes, or why it is not taken: copies go nowhere
    /// yet, or the device does not want this path.
    pub fn dir_for(&self, path: &str) -> Result<PathBuf, String> {
        let dir = self.dir.clone().ok_or("the client is not syncing yet")?;
        match &self.wanted {
            Some(wanted) if !wanted(path) => Err("the device's rules leave it out".into()),
            _ => Ok(dir),
        }
    }

    /// Holds a whole copy; one of the same path before it goes, and the oldest
    /// beyond [`MAX_COPIES`].
    pub fn put(&mut self, copy: Copy) {
        self.drop_where(|c| c.path == copy.path);
        self.whole.push_back(copy);
        while self.whole.len() > MAX_COPIES {
            if let Some(old) = self.whole.pop_front() {
                let _ = std::fs::remove_file(&old.file);
            }
        }
    }

    /// The copy of `path` with this size and hash, now the caller's to place. A
    /// copy of `path` with another content goes: the notice asking for this one
    /// is newer than it.
    pub fn take(&mut self, path: &str, size: u64, hash: ContentHash) -> Option<PathBuf> {
        let at = self.whole.iter().position(|c| c.path == path && c.size == size && c.hash == hash);
        let taken = at.and_then(|at| self.whole.remove(at)).map(|c| c.file);
        self.drop_where(|c| c.path == path);
        taken
    }

    /// How many whole copies are held.
    pub fn len(&self) -> usize {
        self.whole.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.whole.is_empty()
    }

    fn drop_where(&mut self, stale: impl Fn(&Copy) -> bool) {
        self.whole.retain(|c| {
            if stale(c) {
                let _ = std::fs::remove_file(&c.file);
                false
            } else {
                true
            }
        });
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.drop_where(|_| true);
    }
}

struct Arriving {
    path: String,
    size: u64,
    file: WriteBehind<File>,
    at: PathBuf,
    hash: Hasher,
}

/// The copies arriving on one connection, owned by its reader thread; those not
/// whole when it ends are deleted.
#[derive(Default)]
pub struct Arrivals {
    xfers: HashMap<String, Arriving>,
}

impl Arrivals {
    /// A copy begins, into `dir`. Refused (with the reason, for the log) when
    /// the names are not valid, [`MAX_COPIES`] copies are arriving already, or
    /// the disk has not room for it and the rest of those arriving with
    /// [`FREE_MARGIN`] to spare.
    pub fn begin(&mut self, dir: &Path, xfer: &str, path: &str, size: u64) -> Result<(), String> {
        if !replibox_proto::names::is_transfer_name(xfer) {
            return Err(format!("invalid transfer name {xfer:?}"));
        }
        validate_path(path).map_err(|e| format!("{path:?}: {e}"))?;
        self.abort(xfer);
        if self.xfers.len() >= MAX_COPIES {
            return Err(format!("{MAX_COPIES} copies are arriving already"));
        }
        let arriving: u64 = self.xfers.values().map(|a| a.size.saturating_sub(a.hash.bytes_hashed())).sum();
        let free = free_bytes(dir)?;
        if size.saturating_add(arriving).saturating_add(FREE_MARGIN) > free {
            return Err(format!(
                "{size} bytes do not fit: {free} are free, {arriving} more are arriving and {FREE_MARGIN} stay spare"
            ));
        }
        let n = NEXT_FILE.fetch_add(1, Ordering::Relaxed);
        let at = dir.join(format!("early-{}-{n}", std::process::id()));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&at)
            .map_err(|e| format!("cannot create {}: {e}", at.display()))?;
        let file = WriteBehind::new(file);
        self.xfers.insert(xfer.to_string(), Arriving { path: path.to_string(), size, file, at, hash: Hasher::new() });
        Ok(())
    }

    /// Bytes of a copy: written, or the copy dropped (too many bytes, a failed
    /// write: the reason is returned). Bytes of an unknown copy are ignored.
    pub fn chunk(&mut self, xfer: &str, bytes: &[u8]) -> Result<(), String> {
        let Some(a) = self.xfers.get_mut(xfer) else { return Ok(()) };
        let why = if a.hash.bytes_hashed() + bytes.len() as u64 > a.size {
            format!("more bytes than the {} announced", a.size)
        } else {
            match a.file.write_all(bytes) {
                Ok(()) => {
                    a.hash.update(bytes);
                    return Ok(());
                }
                Err(e) => format!("cannot write {}: {e}", a.at.display()),
            }
        };
        self.abort(xfer);
        Err(why)
    }

    /// The copy is whole: returned if every announced byte came with `hash`;
    /// otherwise dropped, with the reason.
    pub fn end(&mut self, xfer: &str, hash: ContentHash) -> Result<Option<Copy>, String> {
        let Some(a) = self.xfers.remove(xfer) else { return Ok(None) };
        let got = a.hash.bytes_hashed();
        if got != a.size || a.hash.finish() != hash {
            let _ = std::fs::remove_file(&a.at);
            return Err(format!("{} arrived damaged ({got} of {} bytes)", a.path, a.size));
        }
        Ok(Some(Copy { path: a.path, size: a.size, hash, file: a.at }))
    }

    /// The copy stops: its bytes go.
    pub fn abort(&mut self, xfer: &str) {
        if let Some(a) = self.xfers.remove(xfer) {
            let _ = std::fs::remove_file(&a.at);
        }
    }
}

impl Drop for Arrivals {
    fn drop(&mut self) {
        for (_, a) in self.xfers.drain() {
            let _ = std::fs::remove_file(&a.at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("replibox-early-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn files(d: &Path) -> usize {
        std::fs::read_dir(d).unwrap().count()
    }

    #[test]
    fn a_whole_copy_is_taken_only_for_its_path_size_and_hash() {
        let d = dir("whole");
        let mut arriving = Arrivals::default();
        let mut held = Held::default();
        arriving.begin(&d, "x1", "big.bin", 6).unwrap();
        arriving.chunk("x1", b"abc").unwrap();
        arriving.chunk("x1", b"def").unwrap();
        let copy = arriving.end("x1", ContentHash::of(b"abcdef")).unwrap().unwrap();
        held.put(copy);
        assert!(held.take("other.bin", 6, ContentHash::of(b"abcdef")).is_none(), "another path");
        let file = held.take("big.bin", 6, ContentHash::of(b"abcdef")).expect("the copy");
        assert_eq!(std::fs::read(&file).unwrap(), b"abcdef");
        assert!(held.is_empty());
        // A notice of the path with another content lets the copy go.
        arriving.begin(&d, "x2", "big.bin", 6).unwrap();
        arriving.chunk("x2", b"abcdef").unwrap();
        held.put(arriving.end("x2", ContentHash::of(b"abcdef")).unwrap().unwrap());
        assert!(held.take("big.bin", 7, ContentHash::of(b"abcdefg")).is_none(), "another content");
        assert!(held.is_empty(), "a copy older than the notice of its path stayed");
        assert_eq!(files(&d), 1, "only the copy taken first is left, the caller's");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_damaged_short_or_overlong_copy_is_dropped_with_its_file() {
        let d = dir("damaged");
        let mut arriving = Arrivals::default();
        arriving.begin(&d, "x1", "a", 3).unwrap();
        arriving.chunk("x1", b"abc").unwrap();
        assert!(arriving.end("x1", ContentHash::of(b"abd")).is_err(), "wrong hash");
        arriving.begin(&d, "x2", "a", 3).unwrap();
        arriving.chunk("x2", b"ab").unwrap();
        assert!(arriving.end("x2", ContentHash::of(b"ab")).is_err(), "short");
        arriving.begin(&d, "x3", "a", 3).unwrap();
        assert!(arriving.chunk("x3", b"abcd").is_err(), "too long");
        assert_eq!(arriving.end("x3", ContentHash::of(b"abcd")).unwrap().map(|c| c.size), None, "already dropped");
        assert_eq!(files(&d), 0, "a dropped copy's file stayed");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn copies_go_nowhere_until_told_and_only_for_wanted_paths() {
        let mut held = Held::default();
        assert_eq!(held.dir_for("a.bin"), Err("the client is not syncing yet".into()), "before the engine says where");
        held.keep_in(PathBuf::from("/sync/.replibox/tmp"));
        assert_eq!(held.dir_for("a.iso"), Ok(PathBuf::from("/sync/.replibox/tmp")), "every path, until told");
        held.want_only(Arc::new(|p: &str| !p.ends_with(".iso")));
        assert_eq!(held.dir_for("a.iso"), Err("the device's rules leave it out".into()));
        assert_eq!(held.dir_for("a.bin"), Ok(PathBuf::from("/sync/.replibox/tmp")));
    }

    #[test]
    fn a_copy_that_would_not_fit_on_the_disk_is_refused() {
        let d = dir("space");
        let mut arriving = Arrivals::default();
        let err = arriving.begin(&d, "x1", "huge.bin", u64::MAX / 4).unwrap_err();
        assert!(err.contains("do not fit"), "{err}");
        assert_eq!(files(&d), 0, "a refused copy left a file");
        // Copies still arriving count: two that fit one at a time, not together.
        let room = free_bytes(&d).unwrap().saturating_sub(FREE_MARGIN);
        assert!(room > 1 << 30, "this test needs a GiB free in {}", d.display());
        arriving.begin(&d, "x2", "a.bin", room / 3 * 2).unwrap();
        let err = arriving.begin(&d, "x3", "b.bin", room / 3 * 2).unwrap_err();
        assert!(err.contains("more are arriving"), "{err}");
        arriving.abort("x2");
        arriving.begin(&d, "x3", "b.bin", room / 3 * 2).unwrap();
        drop(arriving);
        assert_eq!(files(&d), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_names_are_refused_and_copies_are_capped() {
        let d = dir("names");
        let mut arriving = Arrivals::default();
        assert!(arriving.begin(&d, "../x", "a", 1).is_err());
        assert!(arriving.begin(&d, "x", "../a", 1).is_err());
        assert!(arriving.begin(&d, "x", "/etc/passwd", 1).is_err());
        for i in 0..MAX_COPIES {
            arriving.begin(&d, &format!("x{i}"), "a", 1).unwrap();
        }
        assert!(arriving.begin(&d, "one-more", "a", 1).is_err(), "beyond the cap");
        // The same transfer begun again starts over, in a file of its own.
        arriving.chunk("x0", b"z").unwrap();
        arriving.begin(&d, "x0", "a", 1).unwrap();
        assert_eq!(files(&d), MAX_COPIES, "a transfer begun again left its first file");
        drop(arriving);
        assert_eq!(files(&d), 0, "copies still arriving when the connection ended stayed");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_newer_copy_of_a_path_replaces_the_older_and_the_oldest_goes_beyond_the_cap() {
        let d = dir("cap");
        let mut held = Held::default();
        let mut put = |name: &str, path: &str, bytes: &[u8]| {
            let file = d.join(name);
            std::fs::write(&file, bytes).unwrap();
            held.put(Copy { path: path.into(), size: bytes.len() as u64, hash: ContentHash::of(bytes), file });
        };
        put("1", "a", b"1");
        put("2", "a", b"22");
        for (i, p) in ["b", "c", "d", "e"].iter().enumerate() {
            put(&format!("p{i}"), p, b"x");
        }
        assert_eq!(held.len(), MAX_COPIES);
        assert_eq!(files(&d), MAX_COPIES, "a replaced or pushed-out copy's file stayed");
        assert!(held.take("a", 2, ContentHash::of(b"22")).is_none(), "the oldest was pushed out");
        assert!(held.take("e", 1, ContentHash::of(b"x")).is_some());
        drop(held);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
