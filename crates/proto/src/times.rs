//! File times as the protocol carries them: milliseconds since the Unix epoch,
//! negative before 1970.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch of a system time (negative before 1970).
pub fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// The system time of milliseconds since the Unix epoch.
pub fn from_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// A file's modification, access and status-change times, in ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileTimes {
    /// Last modification of the content.
    pub mtime_ms: i64,
    /// Last access.
    pub atime_ms: i64,
    /// Last status change (content, name or permissions).
    pub ctime_ms: i64,
}

impl FileTimes {
    /// The times in `md`, read from the raw stat fields so that none can fail.
    pub fn of(md: &Metadata) -> FileTimes {
        let ms = |secs: i64, nsecs: i64| secs * 1000 + nsecs.div_euclid(1_000_000);
        FileTimes {
            mtime_ms: ms(md.mtime(), md.mtime_nsec()),
            atime_ms: ms(md.atime(), md.atime_nsec()),
            ctime_ms: ms(md.ctime(), md.ctime_nsec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ms_round_trip_on_both_sides_of_1970() {
        for ms in [-1_500_000_000_123, -1, 0, 1, 1_700_000_000_456] {
            assert_eq!(to_ms(from_ms(ms)), ms);
        }
    }

    #[test]
    fn file_times_agree_with_the_system_times() {
        let path = std::env::temp_dir().join(format!("replibox-times-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(from_ms(-86_400_000 + 250)).unwrap();
        let md = std::fs::metadata(&path).unwrap();
        let t = FileTimes::of(&md);
        assert_eq!(t.mtime_ms, -86_400_000 + 250);
        assert_eq!(t.mtime_ms, to_ms(md.modified().unwrap()));
        assert_eq!(t.atime_ms, to_ms(md.accessed().unwrap()));
        std::fs::remove_file(&path).unwrap();
    }
}
