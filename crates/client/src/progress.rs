//! Progress of long transfers on a terminal: bytes and rate, on one stderr line,
//! once a transfer has run for a second.

use replibox_frontend::{FrontError, Frontend};
use replibox_proto::times::from_ms;
use replibox_proto::{FileMeta, OpResult};
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// Reports one transfer's progress.
pub struct Progress {
    label: String,
    total: u64,
    started: Instant,
    last_print: Option<Instant>,
    enabled: bool,
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
    /// Starts tracking a transfer of `total` bytes.
    pub fn new(label: impl Into<String>, total: u64) -> Progress {
        Progress {
            label: label.into(),
            total,
            started: Instant::now(),
            last_print: None,
            enabled: std::io::stderr().is_terminal(),
        }
    }

    /// `done` bytes have moved.
    pub fn update(&mut self, done: u64) {
        if !self.enabled || self.started.elapsed() < Duration::from_secs(1) {
            return;
        }
        if self.last_print.is_some_and(|t| t.elapsed() < Duration::from_millis(200)) {
            return;
        }
        self.last_print = Some(Instant::now());
        let rate = done as f64 / self.started.elapsed().as_secs_f64();
        let mut err = std::io::stderr();
        let _ = write!(err, "\r{}: {} / {} ({}/s)   ", self.label, bytes(done), bytes(self.total), bytes(rate as u64));
        let _ = err.flush();
    }

    /// The transfer ended.
    pub fn finish(self) {
        if self.last_print.is_some() {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// Downloads `path` through `front` into a new file at `tmp`, showing progress on
/// a terminal. Once it returns the server's metadata, the file is complete, synced
/// and carries the server's mtime; in every other case it is removed.
pub fn download_to(front: &Frontend, path: &str, tmp: &Path) -> Result<Result<FileMeta, OpResult>, FrontError> {
    let mut file = File::create(tmp).map_err(|e| FrontError::Local(format!("cannot create {}: {e}", tmp.display())))?;
    // The size is known only once the server answers: the line starts at the
    // first callback.
    let mut progress: Option<Progress> = None;
    let got = front.download(path, &mut file, &mut |done, total| {
        progress.get_or_insert_with(|| Progress::new(format!("downloading {path}"), total)).update(done)
    });
    if let Some(p) = progress {
        p.finish();
    }
    let got = match got {
        Ok(Ok(meta)) => {
            let _ = file.set_modified(from_ms(meta.mtime_ms));
            file.sync_all()
                .map(|()| Ok(meta))
                .map_err(|e| FrontError::Local(format!("cannot write {}: {e}", tmp.display())))
        }
        other => other,
    };
    if !matches!(got, Ok(Ok(_))) {
        let _ = std::fs::remove_file(tmp);
    }
    got
}
