//! colo-bench: the checkpoint benchmark.
//!
//! `colo-bench checkpoint [--mem 256M|1G] [--dirty-pct N] [--checkpoints N] [--json]` runs a COLO primary
//! with a real KVM guest and a secondary as two processes over loopback TCP (this binary re-executes itself
//! as the hidden `secondary` subcommand), checkpoints the guest through colo-proto and colo-ram, and
//! reports the pause time, its phases and the RAM stream beside physical references measured on the same
//! pages in the same run. It fails if the secondary's memory does not end equal to the primary's.

#![warn(missing_docs)]

mod guest;
mod primary;
mod report;
mod secondary;

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clocks used here always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for both processes on the host.
pub fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CPU time of the calling thread in nanoseconds (CLOCK_THREAD_CPUTIME_ID): work done, whatever the
/// machine's load, for the per-byte CPU costs the benchmark reports beside its wall-clock figures.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// A memory size such as `256M`, `1G` or `16777216`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSize(pub u64);

impl FromStr for MemSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (num, shift) = match s.char_indices().last() {
            Some((i, 'K' | 'k')) => (&s[..i], 10),
            Some((i, 'M' | 'm')) => (&s[..i], 20),
            Some((i, 'G' | 'g')) => (&s[..i], 30),
            _ => (s, 0),
        };
        let n: u64 = num.parse().map_err(|e| format!("bad size {s:?}: {e}"))?;
        n.checked_shl(shift)
            .filter(|v| v >> shift == n)
            .map(MemSize)
            .ok_or_else(|| format!("size {s:?} overflows"))
    }
}

impl fmt::Display for MemSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Which KVM dirty log the primary reads (always OR-ed with vm-memory's bitmap of the VMM's own writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogKind {
    /// `KVM_GET_DIRTY_LOG` with manual protection (`KVM_CLEAR_DIRTY_LOG` of the dirty pages only).
    Manual,
    /// Plain `KVM_GET_DIRTY_LOG` (get and reset in one call).
    Plain,
}

/// Options of the checkpoint benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckpointArgs {
    /// Guest RAM (8M to 1G, a multiple of 2M).
    #[arg(long, default_value = "256M")]
    pub mem: MemSize,
    /// Share of guest RAM the guest writes per epoch, in percent.
    #[arg(long, default_value_t = 10.0)]
    pub dirty_pct: f64,
    /// Checkpoints to measure (one more runs first to complete the initial sync).
    #[arg(long, default_value_t = 10)]
    pub checkpoints: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Stop-and-copy: send every dirty page while the guest is paused (no pre-copy round).
    #[arg(long)]
    pub no_precopy: bool,
    /// Share of each epoch's pages the guest writes again while the pre-copy round is sent, in percent.
    #[arg(long, default_value_t = 10.0)]
    pub hot_pct: f64,
    /// KVM dirty log.
    #[arg(long, value_enum, default_value_t = LogKind::Manual)]
    pub log: LogKind,
    /// Threads the secondary's RAM cache flush uses (1 measured faster than 2 on the shared 2-core host).
    #[arg(long, default_value_t = 1)]
    pub flush_threads: usize,
    /// Back the secondary's RAM cache with transparent huge pages (`RamCache::advise_huge_pages`).
    #[arg(long)]
    pub cache_huge_pages: bool,
    /// Threads the secondary receives page frames on: 1 reads, checks, decodes and stores in turn (like the
    /// raw reference's sink; measured to cost less CPU per byte on the shared 2-core host), 2 pipelines a
    /// reader thread with the store.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub receive_threads: u8,
    /// Pages per RAM frame.
    #[arg(long, default_value_t = 256)]
    pub batch_pages: usize,
    /// Pages the primary collects (zero check, page CRCs) before writing them, in every round; 0 collects a
    /// whole round first. The default is colo-pair's `SEND_CHUNK_PAGES`.
    #[arg(long, default_value_t = 16384)]
    pub chunk_pages: usize,
    /// Seed of the guest's page choice.
    #[arg(long, default_value_t = 0x9e37_79b9_7f4a_7c15)]
    pub seed: u64,
}

#[derive(Debug, Parser)]
#[command(name = "colo-bench", about = "colo-rs checkpoint benchmark")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a primary (KVM guest) and a secondary process and measure checkpoints.
    Checkpoint(CheckpointArgs),
    /// The secondary process (started by `checkpoint`).
    #[command(hide = true)]
    Secondary {
        /// Guest RAM in bytes.
        #[arg(long)]
        mem: MemSize,
        /// RAM cache flush threads.
        #[arg(long, default_value_t = 2)]
        flush_threads: usize,
        /// Back the RAM cache with transparent huge pages.
        #[arg(long)]
        cache_huge_pages: bool,
        /// Receive threads (1 or 2).
        #[arg(long, default_value_t = 1)]
        receive_threads: u8,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Checkpoint(args) => {
            if !(0.0..=100.0).contains(&args.dirty_pct) || !(0.0..=100.0).contains(&args.hot_pct) {
                bail!("--dirty-pct and --hot-pct are percentages");
            }
            if args.checkpoints == 0 {
                bail!("--checkpoints must be at least 1");
            }
            let report = primary::run(&args)?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                report.print_text();
            }
            Ok(())
        }
        Cmd::Secondary {
            mem,
            flush_threads,
            cache_huge_pages,
            receive_threads,
        } => secondary::run(mem.0, flush_threads, cache_huge_pages, receive_threads > 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_sizes_parse_with_suffixes_and_reject_overflow() {
        assert_eq!("256M".parse::<MemSize>().unwrap().0, 256 << 20);
        assert_eq!("1G".parse::<MemSize>().unwrap().0, 1 << 30);
        assert_eq!("4096".parse::<MemSize>().unwrap().0, 4096);
        assert!("99999999999G".parse::<MemSize>().is_err());
        assert!("lots".parse::<MemSize>().is_err());
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(report::percentile(v.clone(), 0.5), 5.0);
        assert_eq!(report::percentile(v.clone(), 0.99), 10.0);
        assert_eq!(report::percentile(v, 0.0), 1.0);
    }
}
