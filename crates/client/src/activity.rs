//! The sync engine's routine activity lines (`uploaded a.txt (12 B)`, `received
//! b.pdf (1.2 MiB)`, ...), collected for a moment so that a burst of many files
//! reads as one summary line per kind instead of a screenful.
//!
//! A batch is printed once nothing was added to it for [`QUIET`], and at the
//! latest [`MAX_AGE`] after its first line, so a long burst still shows signs of
//! life. Up to [`SUMMARY_OVER`] files of one kind keep a line each. Problems
//! (refusals, conflicts, a lost connection) never wait here: the engine prints
//! them at once.

use crate::progress::bytes;
use crate::status::plural;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A batch is printed once nothing was added to it for this long.
pub const QUIET: Duration = Duration::from_millis(300);
/// ... or this long after its first line, whichever comes first.
pub const MAX_AGE: Duration = Duration::from_secs(2);
/// More files than this of one kind in a batch are summarised on one line.
pub const SUMMARY_OVER: usize = 5;
/// A summary names this many of its files.
const NAMED: usize = 3;

/// What the engine did to one path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Done {
    /// A local file was stored on the server.
    Uploaded,
    /// A file from the server was put in place here.
    Received,
    /// A local deletion reached the server.
    DeletedThere,
    /// A deletion made on another device was carried out here.
    DeletedHere,
    /// A local rename reached the server.
    RenamedThere,
    /// A rename made on another device was carried out here.
    RenamedHere,
    /// A local folder was made on the server.
    MadeThere,
    /// A folder made on another device was made here.
    MadeHere,
}

impl Done {
    /// The line for one path (`what` is the path, or `FROM to TO` for renames).
    fn one(self, what: &str, size: u64) -> String {
        match self {
            Done::Uploaded => format!("uploaded {what} ({})", bytes(size)),
            Done::Received => format!("received {what} ({})", bytes(size)),
            Done::DeletedThere => format!("deleted {what} on the server"),
            Done::DeletedHere => format!("deleted {what} (deleted on another device)"),
            Done::RenamedThere => format!("renamed {what} on the server"),
            Done::RenamedHere => format!("renamed {what} (renamed on another device)"),
            Done::MadeThere => format!("made folder {what} on the server"),
            Done::MadeHere => format!("made folder {what} (made on another device)"),
        }
    }

    /// The summary line for many paths.
    fn many(self, kind: &Kind) -> String {
        let (n, total) = (kind.count, kind.total);
        let files = format!("{n} file{}", plural(n));
        let head = match self {
            Done::Uploaded => format!("uploaded {files} ({})", bytes(total)),
            Done::Received => format!("received {files} ({})", bytes(total)),
            Done::DeletedThere => format!("deleted {files} on the server"),
            Done::DeletedHere => format!("deleted {files} (deleted on another device)"),
            Done::RenamedThere => format!("renamed {files} on the server"),
            Done::RenamedHere => format!("renamed {files} (renamed on another device)"),
            Done::MadeThere => format!("made {n} folder{} on the server", plural(n)),
            Done::MadeHere => format!("made {n} folder{} (made on another device)", plural(n)),
        };
        let named: Vec<&str> = kind.first.iter().take(NAMED).map(|(w, _)| w.as_str()).collect();
        format!("{head}: {} and {} more", named.join(", "), n - named.len())
    }
}

/// What a batch holds of one kind: the first [`SUMMARY_OVER`] paths, which is all
/// that its lines ever name, and the count and total size of them all. A fresh
/// device's first reconciliation adds 100,000 files in one go, before the batch
/// can be printed.
#[derive(Default)]
struct Kind {
    first: Vec<(String, u64)>,
    count: usize,
    total: u64,
}

/// The lines not printed yet.
#[derive(Default)]
pub struct Batch {
    items: BTreeMap<Done, Kind>,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Batch {
    /// Records that `kind` was done to `what` (`size` bytes; 0 where it does not
    /// apply).
    pub fn add(&mut self, kind: Done, what: String, size: u64) {
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
        let entry = self.items.entry(kind).or_default();
        entry.count += 1;
        entry.total += size;
        if entry.first.len() < SUMMARY_OVER {
            entry.first.push((what, size));
        }
    }

    /// When the batch should be printed; None while it is empty.
    pub fn due(&self) -> Option<Instant> {
        Some((self.last? + QUIET).min(self.first? + MAX_AGE))
    }

    /// Empties the batch into the lines to print.
    pub fn take_lines(&mut self) -> Vec<String> {
        self.first = None;
        self.last = None;
        let mut lines = Vec::new();
        for (done, kind) in std::mem::take(&mut self.items) {
            if kind.count > SUMMARY_OVER {
                lines.push(done.many(&kind));
            } else {
                lines.extend(kind.first.iter().map(|(what, size)| done.one(what, *size)));
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_files_keep_their_lines_and_a_burst_is_summarised() {
        let mut b = Batch::default();
        assert_eq!(b.due(), None);
        b.add(Done::Uploaded, "a.txt".into(), 12);
        b.add(Done::DeletedHere, "old.txt".into(), 0);
        assert!(b.due().is_some());
        assert_eq!(b.take_lines(), ["uploaded a.txt (12 B)", "deleted old.txt (deleted on another device)"]);
        assert_eq!(b.due(), None);
        for i in 0..20 {
            b.add(Done::Received, format!("f{i:02}.txt"), 1024);
        }
        assert_eq!(b.take_lines(), ["received 20 files (20.0 KiB): f00.txt, f01.txt, f02.txt and 17 more"]);
        // One more than a line each, and exactly that many.
        for i in 0..=SUMMARY_OVER {
            b.add(Done::Uploaded, format!("u{i}"), 1);
        }
        assert_eq!(b.take_lines(), ["uploaded 6 files (6 B): u0, u1, u2 and 3 more"]);
        for i in 0..SUMMARY_OVER {
            b.add(Done::Uploaded, format!("u{i}"), 1);
        }
        assert_eq!(b.take_lines().len(), SUMMARY_OVER);
    }
}
