//! What a connection thread needs to begin receiving an upload without waiting
//! for the core: where its temporary file goes, and the backups its chunks are
//! streamed to.
//!
//! The core fsyncs each group commit on its own thread; an upload that asked it
//! for a temporary file and for the backups' queues waited out that flush before
//! its client could send a byte, and a burst of small files went one flush per
//! file. Now the temporary file is made here, and the core publishes the
//! backups' queues after every round of events ([`UploadRoute::publish`]).
//!
//! A published route may be a round old. That costs no safety: the commit goes
//! through the core, which checks the upload again (conflict, resend, role) and
//! refuses or answers it from its request table; a backup that became live after
//! the route was read lacks the temporary file and fetches the file when the
//! entry reaches it, as it does for an upload that began before it joined.

use crate::link::DataSender;
use crate::store::{tmp_file, Context, StoreError};
use replibox_proto::{Epoch, ServerId};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// Makes the temporary files of incoming transfers, `DATA/tmp/XFER`, under
/// names unique to this process: shared by the store (the core) and the
/// connection threads.
#[derive(Debug)]
pub struct Temps {
    data: PathBuf,
    next: AtomicU64,
}

impl Temps {
    /// Temporary files under `data`'s `tmp/`.
    pub fn new(data: &Path) -> Temps {
        Temps { data: data.to_path_buf(), next: AtomicU64::new(0) }
    }

    /// Creates a temporary file for an incoming transfer; returns its id and handle.
    pub fn create(&self) -> Result<(String, File), StoreError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let xfer = format!("x{}-{nanos}-{n}", std::process::id());
        let path = tmp_file(&self.data, &xfer);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .context(|| format!("creating {}", path.display()))?;
        Ok((xfer, file))
    }
}

/// The live backups' data queues, as the core last published them; none while
/// this server is not a serving primary.
#[derive(Default)]
pub struct UploadRoute {
    backups: RwLock<Option<Vec<DataSender>>>,
}

impl UploadRoute {
    /// The backups an upload begun now streams to, with the epoch their frames
    /// carry; None when the core must be asked (not a serving primary).
    pub fn backups(&self) -> Option<Vec<DataSender>> {
        self.backups.read().ok().and_then(|b| b.clone())
    }

    /// Publishes the route (the core, after every round of events). Cheap when
    /// nothing changed: the lock is taken for writing only on a change.
    pub fn publish(&self, now: Option<Vec<DataSender>>) {
        let key = |b: &Option<Vec<DataSender>>| -> Option<Vec<(ServerId, Epoch)>> {
            b.as_ref().map(|v| v.iter().map(|s| (s.id, s.epoch)).collect())
        };
        let same = self.backups.read().map(|held| key(&held) == key(&now)).unwrap_or(false);
        if !same {
            if let Ok(mut held) = self.backups.write() {
                *held = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::unbounded;

    #[test]
    fn temporary_files_get_names_of_their_own() {
        let dir = std::env::temp_dir().join(format!("replibox-temps-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let temps = Temps::new(&dir);
        let (a, _) = temps.create().unwrap();
        let (b, _) = temps.create().unwrap();
        assert_ne!(a, b);
        assert!(tmp_file(&dir, &a).exists() && tmp_file(&dir, &b).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_route_is_what_was_published_last() {
        let route = UploadRoute::default();
        assert!(route.backups().is_none(), "nothing published: ask the core");
        let (tx, _rx) = unbounded();
        route.publish(Some(vec![DataSender { id: ServerId(2), epoch: Epoch(3), tx }]));
        let got = route.backups().unwrap();
        assert_eq!(got.iter().map(|s| (s.id, s.epoch)).collect::<Vec<_>>(), vec![(ServerId(2), Epoch(3))]);
        route.publish(Some(Vec::new()));
        assert_eq!(route.backups().unwrap().len(), 0, "no backups live: stream to none");
        route.publish(None);
        assert!(route.backups().is_none(), "stepped down: ask the core");
    }
}
