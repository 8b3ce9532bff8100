//! Progress of long transfers on a terminal: bytes and rate on one line, drawn
//! through the [`Console`] once a transfer of at least 1 MiB has run for a second,
//! and erased when it ends.

use crate::console::Console;
use replibox_frontend::{FrontError, Frontend};
use replibox_proto::times::from_ms;
use replibox_proto::{FileMeta, OpResult};
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

/// Transfers smaller than this get no progress line: they are over before a
/// line would help, and a burst of small files would only make it flicker.
pub const PROGRESS_MIN: u64 = 1024 * 1024;
/// A transfer shows its progress once it has run this long.
const PROGRESS_AFTER: Duration = Duration::from_secs(1);
/// The line is redrawn at most this often.
const REDRAW_EVERY: Duration = Duration::from_millis(200);

/// Reports one transfer's progress.
pub struct Progress {
    console: Console,
    id: u64,
    label: String,
    total: u64,
    started: Instant,
    last_print: Option<Instant>,
}

/// Human-readable bytes.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl Progress {
    /// Starts tracking a transfer of `total` bytes, shown as `label`.
    pub fn new(console: &Console, label: impl Into<String>, total: u64) -> Progress {
        Progress {
            console: console.clone(),
            id: console.progress_id(),
            label: label.into(),
            total,
            started: Instant::now(),
            last_print: None,
        }
    }

    /// `done` bytes have moved.
    pub fn update(&mut self, done: u64) {
        let elapsed = self.started.elapsed();
        if self.total < PROGRESS_MIN || elapsed < PROGRESS_AFTER {
            return;
        }
        if self.last_print.is_some_and(|t| t.elapsed() < REDRAW_EVERY) {
            return;
        }
        self.last_print = Some(Instant::now());
        self.console.progress(self.id, line(&self.label, done, self.total, elapsed));
    }

    /// The transfer ended: its line is erased, not left behind.
    pub fn finish(self) {}
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.console.end_progress(self.id);
    }
}

/// The progress line: `LABEL: DONE / TOTAL (RATE/s)`.
fn line(label: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
    format!("{label}: {} / {} ({}/s)", bytes(done), bytes(total), bytes(rate as u64))
}

/// Downloads `path` through `front` into a new file at `tmp`, showing progress on
/// a terminal. Once it returns the server's metadata, the file is complete, synced
/// and carries the server's mtime and execute bit; in every other case it is
/// removed.
pub fn download_to(
    front: &Frontend,
    console: &Console,
    path: &str,
    tmp: &Path,
) -> Result<Result<FileMeta, OpResult>, FrontError> {
    let mut file =
        File::create(tmp).map_err(|e| FrontError::local_io(format_args!("cannot create {}", tmp.display()), &e))?;
    // The size is known only once the server answers: the line starts at the
    // first callback.
    let mut progress: Option<Progress> = None;
    let got = front.download(path, &mut file, &mut |done, total| {
        progress.get_or_insert_with(|| Progress::new(console, format!("downloading {path}"), total)).update(done)
    });
    if let Some(p) = progress {
        p.finish();
    }
    let got = match got {
        Ok(Ok(meta)) => settle(&file, tmp, &meta)
            .map(|()| Ok(meta))
            .map_err(|e| FrontError::local_io(format_args!("cannot write {}", tmp.display()), &e)),
        other => other,
    };
    if !matches!(got, Ok(Ok(_))) {
        let _ = std::fs::remove_file(tmp);
    }
    got
}

/// Makes a file received whole (at `tmp`) ready to be placed: the version's
/// times and execute bit, then an fsync. It was written behind (a download, an
/// early copy); the rest of it leaves the page cache now.
pub fn settle(file: &File, tmp: &Path, meta: &FileMeta) -> std::io::Result<()> {
    stamp(file, tmp, meta);
    file.sync_all()?;
    replibox_proto::durable::drop_synced(file);
    Ok(())
}

/// Gives a received file (at `tmp`) the version's modification time and
/// execute bit; the caller syncs it.
pub fn stamp(file: &File, tmp: &Path, meta: &FileMeta) {
    let _ = file.set_modified(from_ms(meta.mtime_ms));
    if let Err(e) = crate::scan::set_exec(file, meta.exec) {
        log::warn!("cannot set the execute bit of {}: {e}", tmp.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_lines() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(
            line("uploading a", 1024 * 1024, 4 * 1024 * 1024, Duration::from_secs(2)),
            "uploading a: 1.0 MiB / 4.0 MiB (512.0 KiB/s)"
        );
    }

    #[test]
    fn small_transfers_never_report_and_a_finished_one_is_forgotten() {
        let console = Console::plain();
        let mut small = Progress::new(&console, "tiny", PROGRESS_MIN - 1);
        small.started -= Duration::from_secs(5);
        small.update(10);
        assert_eq!(console.current_transfer(), None, "a small file must get no progress line");
        let mut big = Progress::new(&console, "big", 10 * PROGRESS_MIN);
        big.update(1);
        assert_eq!(console.current_transfer(), None, "nothing in the first second");
        big.started -= Duration::from_secs(5);
        big.update(PROGRESS_MIN);
        assert!(console.current_transfer().is_some_and(|t| t.starts_with("big: 1.0 MiB / 10.0 MiB")));
        big.finish();
        assert_eq!(console.current_transfer(), None, "a finished transfer leaves nothing behind");
    }
}
