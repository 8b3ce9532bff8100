//! The heartbeat failure detector: a backup suspects its primary when no heartbeat
//! arrived for `timeout`, or at once when the primary's connection closed.
//!
//! Time is an input (milliseconds from any fixed origin), never read from a clock,
//! so tests advance it by hand.

/// What the detector concludes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The primary was heard from recently enough.
    Alive,
    /// The primary is suspected dead.
    Suspected,
}

/// Tracks one primary's heartbeats.
#[derive(Clone, Debug)]
pub struct Detector {
    timeout_ms: u64,
    last_heard_ms: u64,
    closed: bool,
}

impl Detector {
    /// A detector that heard from the primary at `now_ms`.
    pub fn new(timeout_ms: u64, now_ms: u64) -> Detector {
        Detector { timeout_ms, last_heard_ms: now_ms, closed: false }
    }

    /// A heartbeat (or any message) arrived from the primary.
    pub fn heard(&mut self, now_ms: u64) {
        self.last_heard_ms = self.last_heard_ms.max(now_ms);
        self.closed = false;
    }

    /// The primary's connection closed.
    pub fn closed(&mut self) {
        self.closed = true;
    }

    /// The verdict at `now_ms`.
    pub fn tick(&self, now_ms: u64) -> Verdict {
        if self.closed || now_ms.saturating_sub(self.last_heard_ms) > self.timeout_ms {
            Verdict::Suspected
        } else {
            Verdict::Alive
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspects_after_silence_and_at_once_on_close() {
        let mut d = Detector::new(500, 1_000);
        assert_eq!(d.tick(1_500), Verdict::Alive);
        assert_eq!(d.tick(1_501), Verdict::Suspected);
        d.heard(1_400);
        assert_eq!(d.tick(1_900), Verdict::Alive);
        d.closed();
        assert_eq!(d.tick(1_400), Verdict::Suspected);
    }

    #[test]
    fn late_heartbeat_never_moves_time_back() {
        let mut d = Detector::new(100, 0);
        d.heard(90);
        d.heard(10);
        assert_eq!(d.tick(180), Verdict::Alive);
    }
}
