//! Per-checkpoint records and the summary the benchmark prints (text or one JSON object).

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use colo_ram::PAGE_SIZE;
use serde::Serialize;

use crate::CheckpointArgs;
use crate::secondary::SecondaryResult;

/// What the primary measured in one checkpoint (nanoseconds unless named otherwise).
#[derive(Debug, Default, Clone, Serialize)]
pub struct EpochRecord {
    /// Checkpoint epoch (1 completes the initial sync and is not counted).
    pub epoch: u64,
    /// When the pre-copy round started (CLOCK_MONOTONIC).
    pub precopy_start_ns: u64,
    /// When the pre-copy round's first frame was written (after its pages were copied out of the running
    /// guest), CLOCK_MONOTONIC.
    pub precopy_stream_start_ns: u64,
    /// Collecting, copying and writing the pre-copy round (the guest runs meanwhile).
    pub precopy_send_ns: u64,
    /// Data bytes sent in the pre-copy round.
    pub precopy_bytes: u64,
    /// Guest paused: from the secondary's reply to the resume.
    pub pause_ns: u64,
    /// Reading and resetting the dirty log (KVM OR vm-memory's bitmap).
    pub log_ns: u64,
    /// Walking the dirty set into runs borrowed from guest memory (zero-page check included).
    pub gather_ns: u64,
    /// Writing the checkpoint's page frames.
    pub send_ns: u64,
    /// When the page frames started (CLOCK_MONOTONIC).
    pub ram_send_start_ns: u64,
    /// Data bytes sent while paused.
    pub pause_bytes: u64,
    /// Reading the vCPU state and sending it.
    pub device_ns: u64,
    /// After the device state, until `VmstateReceived`.
    pub wait_received_ns: u64,
    /// After `VmstateReceived`, until `VmstateLoaded` (the secondary flushes and loads).
    pub wait_loaded_ns: u64,
    /// Resuming the guest.
    pub resume_ns: u64,
    /// Distinct data pages this checkpoint moved (pre-copy and paused).
    pub data_pages: u64,
    /// Reference: 4 KiB memcpy of those pages out of guest memory into one buffer.
    pub gather_ref_ns: u64,
    /// Reference: the same bytes over a plain loopback TCP connection between the two processes.
    pub raw_tcp_ns: u64,
    /// CPU time of the primary's thread writing the page frames (pre-copy and paused).
    pub stream_send_cpu_ns: u64,
    /// CPU time of the primary's thread collecting those pages before writing them: dirty set walk, zero
    /// check and the page CRCs (pre-copy and paused).
    pub collect_cpu_ns: u64,
    /// CPU time of the secondary reading, checking, decoding and storing the page frames.
    pub stream_receive_cpu_ns: u64,
    /// CPU time of the primary's thread writing the raw reference.
    pub raw_send_cpu_ns: u64,
    /// CPU time of the raw sink reading the raw reference.
    pub raw_receive_cpu_ns: u64,
    /// Reference: the pre-copy bytes and the paused bytes as two raw transfers, like the stream (0 with
    /// nothing sent).
    pub raw_tcp_split_ns: u64,
    /// Reference: 4 KiB memcpy of those pages from the buffer to their places in another mapping.
    pub scatter_ref_ns: u64,
    /// The RAM stream of this checkpoint, first byte written to last page in the secondary's cache
    /// (pre-copy and paused parts added).
    pub stream_ns: u64,
    /// The pre-copy part of `stream_ns`.
    pub precopy_stream_ns: u64,
    /// Secondary: storing the paused pages into the RAM cache.
    pub store_ns: u64,
    /// Secondary: receiving the paused pages (`VmstateSend` to `EndOfRam`).
    pub receive_ns: u64,
    /// Secondary: flushing the RAM cache into its guest memory.
    pub flush_ns: u64,
    /// Secondary: pages flushed.
    pub flushed_pages: u64,
    /// Secondary: decoding and loading the vCPU state.
    pub load_ns: u64,
}

/// Median phase times of the counted checkpoints, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Phases {
    /// Pre-copy round, collected and sent while the guest runs (not part of the pause).
    pub precopy_send: f64,
    /// Dirty log read and reset.
    pub dirty_log: f64,
    /// Walking the dirty set (pages borrowed, not copied).
    pub gather: f64,
    /// Writing the paused pages to the socket.
    pub send: f64,
    /// Secondary: `VmstateSend` to `EndOfRam` (overlaps `send`).
    pub receive: f64,
    /// Secondary: page stores into the RAM cache (part of `receive`).
    pub store: f64,
    /// Primary: device state read and sent.
    pub device_state: f64,
    /// Primary: waiting for `VmstateReceived` after the device state.
    pub wait_received: f64,
    /// Secondary: RAM cache flush into its guest memory.
    pub flush: f64,
    /// Secondary: vCPU state load.
    pub load: f64,
    /// Primary: waiting for `VmstateLoaded` after `VmstateReceived` (flush, load and a message).
    pub wait_loaded: f64,
    /// Primary: resuming the guest.
    pub resume: f64,
}

/// Median CPU time per KiB moved, stream and raw reference, by side (nanoseconds). Thread CPU time counts
/// the work done whatever else runs on the machine, so these are steadier than the wall-clock throughputs
/// on a loaded host.
#[derive(Debug, Serialize)]
pub struct CpuPerKib {
    /// Primary: writing the page frames (the socket writes; the CRCs were taken while collecting).
    pub stream_send: f64,
    /// Primary: collecting the pages before writing them (dirty set walk, zero check, page CRCs): the
    /// stream's counterpart of `gather_ref`.
    pub stream_collect: f64,
    /// Primary: writing the raw reference.
    pub raw_send: f64,
    /// Primary: the reference gather (4 KiB memcpy of each page into one buffer, before the raw send). Its
    /// wall time: one thread copying with nothing to wait for, so about its CPU time.
    pub gather_ref: f64,
    /// Secondary: reading, checking, decoding and storing the page frames into the RAM cache.
    pub stream_receive: f64,
    /// Secondary: reading the raw reference.
    pub raw_receive: f64,
}

/// The benchmark's summary.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Share of guest RAM the guest writes per epoch, in percent.
    pub dirty_pct: f64,
    /// Pages the guest writes per epoch.
    pub dirty_pages_per_epoch: usize,
    /// Of those, pages it writes again during the pre-copy round.
    pub hot_pages_per_epoch: usize,
    /// Whether dirty pages were pre-copied before the pause.
    pub precopy: bool,
    /// KVM dirty log flavour.
    pub dirty_log: String,
    /// Secondary flush threads.
    pub flush_threads: usize,
    /// Secondary receive threads (1: read and store in turn; 2: reader thread pipelined with the store).
    pub receive_threads: u8,
    /// Whether the secondary's RAM cache asked for transparent huge pages.
    pub cache_huge_pages: bool,
    /// Checkpoints counted (the first, which completes the initial sync, is not).
    pub checkpoints: usize,
    /// Median pause.
    pub pause_ms_p50: f64,
    /// 99th percentile pause (nearest rank: the largest below 100 checkpoints).
    pub pause_ms_p99: f64,
    /// Smallest pause.
    pub pause_ms_min: f64,
    /// Median phases.
    pub phases_ms: Phases,
    /// Median data bytes moved per checkpoint (pre-copy and paused).
    pub data_mib: f64,
    /// Median data bytes moved while paused.
    pub paused_data_mib: f64,
    /// Median of gather + raw TCP + scatter of each checkpoint's data pages.
    pub data_movement_ms: f64,
    /// Median gather reference.
    pub gather_ref_ms: f64,
    /// Median raw loopback TCP reference.
    pub raw_tcp_ms: f64,
    /// Median scatter reference.
    pub scatter_ref_ms: f64,
    /// `pause_ms_p50 / data_movement_ms`.
    pub pause_over_data_movement: f64,
    /// Median RAM stream throughput (data bytes over first write to last store in the cache).
    pub stream_gbps: f64,
    /// Median raw TCP throughput of the same bytes.
    pub raw_tcp_gbps: f64,
    /// `stream_gbps / raw_tcp_gbps`.
    pub stream_over_raw_tcp: f64,
    /// Median raw TCP throughput of the stream's bytes sent in the stream's two parts (pre-copy, paused),
    /// each a transfer of its own.
    pub raw_tcp_split_gbps: f64,
    /// `stream_gbps / raw_tcp_split_gbps`: the stream against raw TCP of the same transfers.
    pub stream_over_raw_tcp_split: f64,
    /// CPU cost of the stream and of the raw reference per KiB.
    pub cpu_ns_per_kib: CpuPerKib,
    /// CRC32 of both guest memories at the end (checked equal).
    pub memory_crc32: String,
    /// The secondary's memory equals the primary's.
    pub memory_equal: bool,
    /// Wall time of the checkpoint loop.
    pub seconds: f64,
    /// Every checkpoint, including the first.
    pub per_checkpoint: Vec<EpochRecord>,
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Nearest-rank percentile of `v` (sorted here).
pub fn percentile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

impl Report {
    /// Joins the two sides' records, checks memory equality and summarises.
    pub fn build(
        args: &CheckpointArgs,
        per_epoch: usize,
        hot: usize,
        mut records: Vec<EpochRecord>,
        sec: SecondaryResult,
        crc32: u32,
        elapsed: Duration,
    ) -> Result<Self> {
        if sec.crc32 != crc32 {
            bail!(
                "MEMORY MISMATCH: the secondary's guest memory (crc32 {:#010x}) differs from the primary's \
                 ({crc32:#010x})",
                sec.crc32
            );
        }
        ensure!(
            sec.epochs.len() == records.len(),
            "the secondary committed {} checkpoints, the primary {}",
            sec.epochs.len(),
            records.len()
        );
        for (r, s) in records.iter_mut().zip(&sec.epochs) {
            ensure!(
                r.epoch == s.epoch,
                "epochs out of step: {} vs {}",
                r.epoch,
                s.epoch
            );
            r.store_ns = s.store_ns;
            r.stream_receive_cpu_ns = s.receive_cpu_ns;
            r.receive_ns = s.ram_end_ns.saturating_sub(s.ram_start_ns);
            r.flush_ns = s.flush_ns;
            r.flushed_pages = s.flushed_pages;
            r.load_ns = s.load_ns;
            let pre = if s.precopy_pages > 0 && r.precopy_stream_start_ns > 0 {
                s.precopy_last_ns.saturating_sub(r.precopy_stream_start_ns)
            } else {
                0
            };
            r.precopy_stream_ns = pre;
            let paused = if s.ram_pages > 0 {
                s.ram_last_store_ns.saturating_sub(r.ram_send_start_ns)
            } else {
                0
            };
            r.stream_ns = pre + paused;
        }
        let counted: Vec<&EpochRecord> = records.iter().filter(|r| r.epoch > 1).collect();
        ensure!(!counted.is_empty(), "no checkpoint to report");
        let med = |f: &dyn Fn(&EpochRecord) -> f64| percentile(counted.iter().map(|r| f(r)).collect(), 0.5);
        let pauses: Vec<f64> = counted.iter().map(|r| ms(r.pause_ns)).collect();
        let movement = |r: &EpochRecord| ms(r.gather_ref_ns + r.raw_tcp_ns + r.scatter_ref_ns);
        let bytes = |r: &EpochRecord| (r.data_pages * PAGE_SIZE as u64) as f64;
        let data_movement_ms = med(&movement);
        let stream_kib = |r: &EpochRecord| ((r.precopy_bytes + r.pause_bytes) as f64 / 1024.0).max(1e-9);
        let pause_ms_p50 = percentile(pauses.clone(), 0.5);
        let stream_gbps = med(&|r| (r.precopy_bytes + r.pause_bytes) as f64 / r.stream_ns.max(1) as f64);
        let raw_tcp_gbps = med(&|r| bytes(r) / r.raw_tcp_ns.max(1) as f64);
        let raw_tcp_split_gbps =
            med(&|r| (r.precopy_bytes + r.pause_bytes) as f64 / r.raw_tcp_split_ns.max(1) as f64);
        Ok(Report {
            mem_bytes: args.mem.0,
            dirty_pct: args.dirty_pct,
            dirty_pages_per_epoch: per_epoch,
            hot_pages_per_epoch: hot,
            precopy: !args.no_precopy,
            dirty_log: format!("{:?}", args.log).to_lowercase(),
            flush_threads: args.flush_threads,
            receive_threads: args.receive_threads,
            cache_huge_pages: args.cache_huge_pages,
            checkpoints: counted.len(),
            pause_ms_p50,
            pause_ms_p99: percentile(pauses.clone(), 0.99),
            pause_ms_min: percentile(pauses, 0.0),
            phases_ms: Phases {
                precopy_send: med(&|r| ms(r.precopy_send_ns)),
                dirty_log: med(&|r| ms(r.log_ns)),
                gather: med(&|r| ms(r.gather_ns)),
                send: med(&|r| ms(r.send_ns)),
                receive: med(&|r| ms(r.receive_ns)),
                store: med(&|r| ms(r.store_ns)),
                device_state: med(&|r| ms(r.device_ns)),
                wait_received: med(&|r| ms(r.wait_received_ns)),
                flush: med(&|r| ms(r.flush_ns)),
                load: med(&|r| ms(r.load_ns)),
                wait_loaded: med(&|r| ms(r.wait_loaded_ns)),
                resume: med(&|r| ms(r.resume_ns)),
            },
            data_mib: med(&|r| bytes(r) / (1 << 20) as f64),
            paused_data_mib: med(&|r| r.pause_bytes as f64 / (1 << 20) as f64),
            data_movement_ms,
            gather_ref_ms: med(&|r| ms(r.gather_ref_ns)),
            raw_tcp_ms: med(&|r| ms(r.raw_tcp_ns)),
            scatter_ref_ms: med(&|r| ms(r.scatter_ref_ns)),
            pause_over_data_movement: pause_ms_p50 / data_movement_ms.max(1e-9),
            stream_gbps,
            raw_tcp_gbps,
            stream_over_raw_tcp: stream_gbps / raw_tcp_gbps.max(1e-9),
            raw_tcp_split_gbps,
            stream_over_raw_tcp_split: stream_gbps / raw_tcp_split_gbps.max(1e-9),
            cpu_ns_per_kib: CpuPerKib {
                stream_send: med(&|r| r.stream_send_cpu_ns as f64 / stream_kib(r)),
                stream_collect: med(&|r| r.collect_cpu_ns as f64 / stream_kib(r)),
                raw_send: med(&|r| r.raw_send_cpu_ns as f64 / (bytes(r) / 1024.0).max(1e-9)),
                gather_ref: med(&|r| r.gather_ref_ns as f64 / (bytes(r) / 1024.0).max(1e-9)),
                stream_receive: med(&|r| r.stream_receive_cpu_ns as f64 / stream_kib(r)),
                raw_receive: med(&|r| r.raw_receive_cpu_ns as f64 / (bytes(r) / 1024.0).max(1e-9)),
            },
            memory_crc32: format!("{crc32:#010x}"),
            memory_equal: true,
            seconds: elapsed.as_secs_f64(),
            per_checkpoint: records,
        })
    }

    /// A human-readable summary.
    pub fn print_text(&self) {
        let p = &self.phases_ms;
        println!(
            "checkpoint benchmark: {} MiB guest, {}% dirty ({} pages/epoch, {} hot), pre-copy {}, {} log, \
             {} flush threads, {} checkpoints in {:.1} s",
            self.mem_bytes >> 20,
            self.dirty_pct,
            self.dirty_pages_per_epoch,
            self.hot_pages_per_epoch,
            if self.precopy { "on" } else { "off" },
            self.dirty_log,
            self.flush_threads,
            self.checkpoints,
            self.seconds
        );
        println!(
            "pause p50 {:.3} ms, p99 {:.3} ms, min {:.3} ms; {:.1} MiB moved per checkpoint, {:.1} MiB while paused",
            self.pause_ms_p50, self.pause_ms_p99, self.pause_ms_min, self.data_mib, self.paused_data_mib
        );
        println!(
            "phases (median ms): pre-copy {:.3} (guest running) | dirty log {:.3}, gather {:.3}, send {:.3} \
             [secondary receive {:.3}, store {:.3}], device state {:.3}, wait received {:.3}, \
             [secondary flush {:.3}, load {:.3}], wait loaded {:.3}, resume {:.3}",
            p.precopy_send,
            p.dirty_log,
            p.gather,
            p.send,
            p.receive,
            p.store,
            p.device_state,
            p.wait_received,
            p.flush,
            p.load,
            p.wait_loaded,
            p.resume
        );
        println!(
            "physical references, same pages, same run: gather {:.3} ms + raw TCP {:.3} ms + scatter {:.3} ms \
             = data movement {:.3} ms",
            self.gather_ref_ms, self.raw_tcp_ms, self.scatter_ref_ms, self.data_movement_ms
        );
        println!(
            "pause / data movement = {:.2}; RAM stream {:.2} GB/s vs raw TCP {:.2} GB/s = {:.2} \
             (vs raw TCP in the stream's two transfers {:.2} GB/s = {:.2})",
            self.pause_over_data_movement,
            self.stream_gbps,
            self.raw_tcp_gbps,
            self.stream_over_raw_tcp,
            self.raw_tcp_split_gbps,
            self.stream_over_raw_tcp_split
        );
        let c = &self.cpu_ns_per_kib;
        println!(
            "CPU per KiB (ns): collect {:.0} vs gather reference {:.0}; send stream {:.0} vs raw {:.0}; \
             receive stream {:.0} vs raw {:.0}",
            c.stream_collect, c.gather_ref, c.stream_send, c.raw_send, c.stream_receive, c.raw_receive
        );
        println!(
            "secondary memory equals primary memory (crc32 {})",
            self.memory_crc32
        );
    }
}
