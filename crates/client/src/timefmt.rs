//! Dates for listings and conflicted-copy names: UTC civil time from Unix
//! milliseconds, through `jiff` (already in the build for env_logger's
//! timestamps) instead of a hand-written days-to-civil conversion.

use jiff::Timestamp;

/// Formats `ms` (since the Unix epoch) in UTC with a strftime pattern; a time
/// outside jiff's range (years -9999 to 9999) shows as `?`, which only a
/// corrupt mtime can produce.
fn format(ms: i64, pattern: &str) -> String {
    match Timestamp::from_millisecond(ms) {
        Ok(t) => t.strftime(pattern).to_string(),
        Err(_) => "?".to_string(),
    }
}

/// `YYYY-MM-DD` (UTC).
pub fn date(ms: i64) -> String {
    format(ms, "%Y-%m-%d")
}

/// `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn datetime(ms: i64) -> String {
    format(ms, "%Y-%m-%d %H:%M:%S")
}

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> i64 {
    Timestamp::now().as_millisecond()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(datetime(0), "1970-01-01 00:00:00");
        assert_eq!(datetime(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(datetime(1_795_651_199_000), "2026-11-25 23:59:59");
        assert_eq!(date(-86_400_000), "1969-12-31");
        // Before the epoch, a partial second still belongs to the earlier second.
        assert_eq!(datetime(-1), "1969-12-31 23:59:59");
        assert_eq!(datetime(i64::MAX), "?");
    }
}
