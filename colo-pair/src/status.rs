//! Status reports and commands shared by both drivers.

use std::collections::VecDeque;
use std::time::Duration;

/// Which side a driver runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Runs the guest whose output reaches the client.
    Primary,
    /// Runs the shadow.
    Secondary,
}

/// Where a driver stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before the first checkpoint (the end of the initial migration).
    Syncing,
    /// Checkpointing: the guest is protected.
    Colo,
    /// Failover decided; waiting for the arbiter or the takeover.
    FailingOver,
    /// Running alone (a primary that lost its secondary, or a promoted secondary).
    Alone,
    /// Fenced by the arbiter, or a secondary that lost its primary before it had a consistent copy.
    Stopped,
    /// The guest shut down on the primary.
    ShutDown,
}

impl Phase {
    /// A short name for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Syncing => "syncing",
            Phase::Colo => "colo",
            Phase::FailingOver => "failing over",
            Phase::Alone => "alone",
            Phase::Stopped => "stopped",
            Phase::ShutDown => "shut down",
        }
    }
}

/// Why the last checkpoint was started (primary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The first checkpoint, which completes the initial migration.
    Initial,
    /// The periodic timer.
    Periodic,
    /// The comparator: outputs differ, a frame went stale, a queue or the table filled up.
    Compare(colo_net::CheckpointReason),
    /// The disk's epoch limit (the secondary's hidden store would overflow).
    EpochFull,
    /// The secondary asked for it (its active overlay is full, or its rewriter table under pressure).
    Secondary(colo_proto::WantReason),
    /// An operator command (or a changed interval).
    Command,
}

/// The status of one side of a pair (the control socket's COLO status).
#[derive(Debug, Clone)]
pub struct PairStatus {
    /// Our side.
    pub side: Side,
    /// Where the driver stands.
    pub phase: Phase,
    /// The failover machine's view (role, mode, failover status, exit reason, token).
    pub failover: colo_failover::Status,
    /// The last committed checkpoint epoch.
    pub epoch: u64,
    /// Checkpoints committed.
    pub checkpoints: u64,
    /// Checkpoints the comparator asked for (mismatch, stale, queue full...). Primary only.
    pub mismatch_checkpoints: u64,
    /// Guest pause of the last checkpoint (primary: request to resume; secondary: pause to resume).
    pub last_pause: Duration,
    /// 99th percentile (nearest rank) of the pauses of the last 1024 checkpoints.
    pub p99_pause: Duration,
    /// Median (50th percentile, nearest rank) of the pauses of the same last 1024 checkpoints.
    pub pause_p50: Duration,
    /// Bytes of message bodies and page data handed to the link.
    pub bytes_sent: u64,
    /// Comparator counters (primary only).
    pub compare: Option<colo_net::Stats>,
    /// TCP rewriter counters (secondary only).
    pub rewrite: Option<colo_net::rewriter::RewriterStats>,
    /// Why COLO ended, if it did (a channel error's text, "operator", "heartbeat lost").
    pub exit_detail: Option<String>,
    /// The checkpoint interval in force.
    pub checkpoint_interval: Duration,
}

/// The last pauses, for percentiles.
#[derive(Debug, Default)]
pub(crate) struct Pauses {
    last: VecDeque<Duration>,
}

impl Pauses {
    const KEEP: usize = 1024;

    pub(crate) fn push(&mut self, d: Duration) {
        if self.last.len() == Self::KEEP {
            self.last.pop_front();
        }
        self.last.push_back(d);
    }

    pub(crate) fn last(&self) -> Duration {
        self.last.back().copied().unwrap_or_default()
    }

    /// The nearest-rank percentile `p` (0..=100).
    pub(crate) fn percentile(&self, p: u32) -> Duration {
        if self.last.is_empty() {
            return Duration::ZERO;
        }
        let mut v: Vec<Duration> = self.last.iter().copied().collect();
        v.sort_unstable();
        let rank = (v.len() * p.min(100) as usize).div_ceil(100).max(1);
        v[rank - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_is_nearest_rank() {
        let mut p = Pauses::default();
        assert_eq!(p.percentile(99), Duration::ZERO);
        for ms in 1..=100 {
            p.push(Duration::from_millis(ms));
        }
        assert_eq!(p.percentile(99), Duration::from_millis(99));
        assert_eq!(p.percentile(50), Duration::from_millis(50));
        assert_eq!(p.last(), Duration::from_millis(100));
        for _ in 0..2000 {
            p.push(Duration::from_millis(1));
        }
        assert_eq!(
            p.percentile(99),
            Duration::from_millis(1),
            "only the last 1024 count"
        );
    }

    #[test]
    fn p50_is_nearest_rank_over_the_same_window() {
        let mut p = Pauses::default();
        assert_eq!(p.percentile(50), Duration::ZERO);
        for ms in [100, 1, 2] {
            p.push(Duration::from_millis(ms));
        }
        // Ranks: 1, 2, 100; the nearest rank of 50% of 3 is the 2nd.
        assert_eq!(p.percentile(50), Duration::from_millis(2));
        p.push(Duration::from_millis(3));
        // 1, 2, 3, 100: 50% of 4 is exactly the 2nd.
        assert_eq!(p.percentile(50), Duration::from_millis(2));
        for _ in 0..Pauses::KEEP {
            p.push(Duration::from_millis(7));
        }
        assert_eq!(
            p.percentile(50),
            Duration::from_millis(7),
            "only the last 1024 count"
        );
    }
}
