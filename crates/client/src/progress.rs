//! Progress of long transfers on a terminal: bytes and rate, on one stderr line,
//! once a transfer has run for a second.

use replibox_frontend::{FrontError, Frontend};
use replibox_proto::{FileMeta, OpResult};
use std::fs::File;
use std::io::{IsTerminal, Write};
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

/// Downloads `path` into `dest` through `front`, showing progress on a terminal.
/// The size is known only once the server answers, hence the progress line is
/// created on the first callback.
pub fn download(front: &Frontend, path: &str, dest: &mut File) -> Result<Result<FileMeta, OpResult>, FrontError> {
    let mut progress: Option<Progress> = None;
    let got = front.download(path, dest, &mut |done, total| {
        progress.get_or_insert_with(|| Progress::new(format!("downloading {path}"), total)).update(done)
    });
    if let Some(p) = progress {
        p.finish();
    }
    got
}
