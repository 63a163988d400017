//! Tunables of a pair.

use std::time::Duration;

/// Tunables shared by both drivers.
#[derive(Debug, Clone)]
pub struct PairConfig {
    /// Time between periodic checkpoints (QEMU's `x-checkpoint-delay`; each checkpoint re-arms it).
    pub checkpoint_interval: Duration,
    /// Timeouts and limits of the checkpoint transaction.
    pub session: colo_proto::SessionConfig,
    /// The primary's comparator.
    pub compare: colo_net::Config,
    /// The secondary's TCP rewriter.
    pub rewriter: colo_net::RewriterConfig,
    /// Heartbeat and failover timing.
    pub failover: colo_failover::Config,
    /// How the primary collects dirty pages.
    pub collect: colo_ram::CollectOptions,
    /// How the secondary flushes its RAM cache.
    pub flush: colo_ram::FlushOptions,
    /// Largest device-state chunk on the wire.
    pub device_chunk: usize,
    /// The interface id carried in forwarded frames.
    pub interface: u32,
    /// Initial disk sync: the most bytes of the disk the primary sends per driver entry (each
    /// `handle_timeout` while the sync runs), so that the guest and the other timers get their turn.
    pub disk_sync_burst: u64,
}

impl Default for PairConfig {
    fn default() -> Self {
        PairConfig {
            checkpoint_interval: Duration::from_secs(5),
            session: colo_proto::SessionConfig::default(),
            compare: colo_net::Config::default(),
            rewriter: colo_net::RewriterConfig::default(),
            failover: colo_failover::Config::default(),
            collect: colo_ram::CollectOptions::default(),
            flush: colo_ram::FlushOptions::default(),
            device_chunk: 1 << 20,
            interface: 0,
            disk_sync_burst: 8 << 20,
        }
    }
}
