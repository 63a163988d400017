//! Live migration glue: moves a running [`Machine`] to another VMM process with colo-proto (the wire) and
//! colo-ram (dirty pages). This is the only module that knows those crates; another VMM can lift it by
//! providing the same few machine operations (pause, save/restore state, RAM, the KVM VM for the log).
//!
//! Source ([`send`]):
//! 1. connect, handshake (page size and RAM layout must match or the destination refuses);
//! 2. pre-copy: every page once, then rounds of the pages dirtied meanwhile (KVM dirty log OR the VMM's own
//!    writes through vm-memory's bitmap, via colo-ram's `UnionLog`), while the guest runs;
//! 3. a beacon the destination echoes once it has written every pre-copy page (so the pause does not
//!    include draining socket buffers);
//! 4. stop-and-copy: pause vCPU and devices, send the last dirty pages, `EndOfRam`, the machine state
//!    (vCPU + devices) as one device blob, and wait for `VmstateLoaded`. Downtime is measured from the
//!    pause to that answer.
//!
//! Destination ([`receive`]): write pages straight into guest RAM (nothing runs yet), assemble the state,
//! restore it, start the vCPU, announce the guest's MAC to the switch, answer `VmstateLoaded`.
//!
//! The disk image is shared, not copied: both processes open the same file (same host or shared storage).
//! The source's device thread is stopped before the final state is taken, so every write the guest was
//! told about is in the image before the destination starts.

use std::fmt;
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use colo_proto::{Channel, MemoryRegion, Message, PagePhase, Role};
use colo_ram::{
    AtomicBitmapLog, CollectOptions, Collection, GuestRam as RamView, KvmDirtyLog, PageRun, PrecopyPolicy,
    PrimaryRam, RamLayout, UnionLog,
};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{PAGE_SIZE, ram_size};
use crate::vm::{Machine, MachineState, RAM_SLOT, RunState};

/// Device id of the machine-state blob on the wire.
pub const MACHINE_STATE_ID: u32 = 1;
/// Largest machine state accepted.
pub const MAX_STATE: u64 = 1 << 20;
/// Log progress every this many pages (256 MiB).
const PROGRESS_EVERY: u64 = 65536;
/// Pages per `send_pages` call.
const BATCH_PAGES: usize = 256;

/// What can go wrong in a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The channel failed or the peer sent a bad frame.
    #[error("protocol: {0}")]
    Proto(#[from] colo_proto::Error),
    /// Dirty tracking or page collection failed.
    #[error("RAM: {0}")]
    Ram(#[from] colo_ram::RamError),
    /// The machine refused (state invalid, wrong run state).
    #[error("machine: {0}")]
    Machine(#[from] crate::Error),
    /// Socket errors.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something that does not fit.
    #[error("peer: {0}")]
    Peer(String),
}

/// Migration phase, for status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No migration yet.
    #[default]
    Idle,
    /// Sending (or receiving) pages while the guest runs.
    Precopy,
    /// Guest paused, sending the rest.
    StopAndCopy,
    /// Finished.
    Done,
}

/// Progress of a migration, shared with the control socket.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Progress {
    /// A migration is running.
    pub active: bool,
    /// Phase.
    pub phase: Phase,
    /// Pre-copy rounds completed.
    pub rounds: u32,
    /// Pages sent or received with data.
    pub pages: u64,
    /// Zero pages sent or received as markers.
    pub zero_pages: u64,
    /// Page bytes moved.
    pub bytes: u64,
    /// Pages of guest RAM.
    pub total_pages: u64,
    /// Dirty pages found by the last look at the log.
    pub last_dirty_pages: u64,
    /// Stop-and-copy pause, once known.
    pub downtime_us: Option<u64>,
    /// The last error.
    pub error: Option<String>,
}

fn update(progress: &Mutex<Progress>, f: impl FnOnce(&mut Progress)) {
    f(&mut progress.lock().unwrap_or_else(|e| e.into_inner()));
}

/// Figures from a finished migration.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    /// Pre-copy rounds (the first sends all of RAM).
    pub rounds: u32,
    /// Pages sent with data.
    pub pages: u64,
    /// Zero pages sent as markers.
    pub zero_pages: u64,
    /// Pages sent during stop-and-copy.
    pub final_pages: u64,
    /// Page bytes sent.
    pub bytes: u64,
    /// Time spent in pre-copy.
    pub precopy: Duration,
    /// Page bytes per second during pre-copy.
    pub precopy_bytes_per_sec: f64,
    /// Guest paused: from the pause to the destination's `VmstateLoaded`.
    pub downtime: Duration,
    /// Whole migration.
    pub total: Duration,
}

impl fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} rounds, {} pages + {} zero, {} in stop-and-copy, pre-copy {:.1} MB/s over {:?}, downtime {:?}, total {:?}",
            self.rounds,
            self.pages,
            self.zero_pages,
            self.final_pages,
            self.precopy_bytes_per_sec / 1e6,
            self.precopy,
            self.downtime,
            self.total
        )
    }
}

fn regions(m: &Machine) -> Vec<MemoryRegion> {
    vec![MemoryRegion {
        gpa: 0,
        size: ram_size(m.ram()),
    }]
}

fn count(batch: &[(u64, &[u8])]) -> (u64, u64) {
    let zero = batch.iter().filter(|(_, d)| d.is_empty()).count() as u64;
    (batch.len() as u64 - zero, zero)
}

/// Write one received batch into guest RAM; returns (data pages, zero pages). Public so that checkpoint
/// glue (which repeats this every epoch) can reuse it.
///
/// The destination's RAM starts all zero (fresh anonymous or memfd memory the VMM has not written), so a
/// zero page is written only if this migration put data there before (`written`, one bit per page). That
/// keeps untouched guest memory unallocated and the receiver ahead of the sender.
pub fn write_batch(
    machine: &Machine,
    batch: &colo_proto::PageBatch,
    zero: &[u8],
    written: &mut [u64],
) -> Result<(u64, u64), MigrationError> {
    let ram = machine.ram();
    let size = ram_size(ram);
    if u64::from(batch.page_size) != PAGE_SIZE {
        return Err(MigrationError::Peer(format!("page size {}", batch.page_size)));
    }
    let (mut d, mut z) = (0, 0);
    for p in &batch.pages {
        if p.gpa % PAGE_SIZE != 0 || p.gpa.checked_add(PAGE_SIZE).is_none_or(|e| e > size) {
            return Err(MigrationError::Peer(format!("page at {:#x} outside RAM", p.gpa)));
        }
        let (word, bit) = (
            (p.gpa / PAGE_SIZE / 64) as usize,
            1u64 << ((p.gpa / PAGE_SIZE) % 64),
        );
        let data: &[u8] = if p.is_zero() {
            z += 1;
            if written[word] & bit == 0 {
                continue;
            }
            written[word] &= !bit;
            zero
        } else if p.data.len() as u64 == PAGE_SIZE {
            d += 1;
            written[word] |= bit;
            &p.data
        } else {
            return Err(MigrationError::Peer(format!(
                "page of {} bytes at {:#x}",
                p.data.len(),
                p.gpa
            )));
        };
        ram.write_slice(data, GuestAddress(p.gpa))
            .map_err(|e| crate::Error::Memory {
                gpa: p.gpa,
                detail: e.to_string(),
            })?;
    }
    Ok((d, z))
}

/// Send one batch. While the guest runs (pre-copy) its pages can change between colo-proto's body CRC
/// and the socket write, which the receiver would rightly reject as corruption; so pre-copy pages are
/// first copied into `staging` (a memcpy, cheap next to the network) and sent from there. With the guest
/// paused, pages go straight from guest memory.
fn flush_batch(
    chan: &mut Channel<TcpStream>,
    phase: PagePhase,
    epoch: u64,
    batch: &mut Vec<(u64, &[u8])>,
    staging: &mut [u8],
    progress: &Mutex<Progress>,
) -> Result<(), MigrationError> {
    if batch.is_empty() {
        return Ok(());
    }
    let (d, z) = count(batch);
    if phase == PagePhase::Precopy {
        for ((_, src), dst) in batch.iter().zip(staging.chunks_mut(PAGE_SIZE as usize)) {
            if !src.is_empty() {
                dst.copy_from_slice(src);
            }
        }
        let staged: Vec<(u64, &[u8])> = batch
            .iter()
            .zip(staging.chunks(PAGE_SIZE as usize))
            .map(|(&(gpa, src), copy)| (gpa, if src.is_empty() { src } else { copy }))
            .collect();
        chan.send_pages(phase, epoch, PAGE_SIZE as u32, &staged)?;
    } else {
        chan.send_pages(phase, epoch, PAGE_SIZE as u32, batch)?;
    }
    batch.clear();
    update(progress, |p| {
        let before = (p.pages + p.zero_pages) / PROGRESS_EVERY;
        p.pages += d;
        p.zero_pages += z;
        p.bytes += d * PAGE_SIZE;
        if (p.pages + p.zero_pages) / PROGRESS_EVERY != before {
            tracing::info!(
                "RAM copy: {} pages sent ({} with data, {} MiB), round {}, {} pages in guest RAM",
                p.pages + p.zero_pages,
                p.pages,
                p.bytes >> 20,
                p.rounds + 1,
                p.total_pages
            );
        }
    });
    Ok(())
}

/// Send the runs of one colo-ram collection as colo-proto page batches of epoch `epoch`; returns (data
/// pages, zero pages). Public so that checkpoint glue can reuse it.
pub fn send_runs(
    chan: &mut Channel<TcpStream>,
    phase: PagePhase,
    epoch: u64,
    runs: Collection<'_>,
    progress: &Mutex<Progress>,
) -> Result<(u64, u64), MigrationError> {
    let (mut data_pages, mut zero_pages) = (0u64, 0u64);
    let mut batch: Vec<(u64, &[u8])> = Vec::with_capacity(BATCH_PAGES);
    let mut staging = vec![0u8; BATCH_PAGES * PAGE_SIZE as usize];
    for run in runs {
        let run = run?;
        for i in 0..run.pages() as u64 {
            let gpa = run.gpa() + i * PAGE_SIZE;
            let page: &[u8] = match run {
                PageRun::Data { data, .. } => {
                    data_pages += 1;
                    &data[(i * PAGE_SIZE) as usize..((i + 1) * PAGE_SIZE) as usize]
                }
                PageRun::Zero { .. } => {
                    zero_pages += 1;
                    &[]
                }
            };
            batch.push((gpa, page));
            if batch.len() == BATCH_PAGES {
                flush_batch(chan, phase, epoch, &mut batch, &mut staging, progress)?;
            }
        }
    }
    flush_batch(chan, phase, epoch, &mut batch, &mut staging, progress)?;
    Ok((data_pages, zero_pages))
}

/// Live-migrate `machine` to the VMM listening (`--incoming`) at `addr`. On success the guest runs there
/// and this machine stays paused (the caller quits it); on failure the caller may resume it.
pub fn send(
    addr: &str,
    machine: &Machine,
    progress: &Mutex<Progress>,
) -> Result<MigrationReport, MigrationError> {
    let t0 = Instant::now();
    let state = match machine.run_state() {
        RunState::Running | RunState::Paused => None,
        RunState::Created => Some("created"),
        RunState::Stopped => Some("stopped"),
    };
    if let Some(state) = state {
        return Err(crate::Error::WrongState { state, op: "migrate" }.into());
    }
    let mut chan = Channel::from_tcp(TcpStream::connect(addr)?)?;
    let local = colo_proto::LocalConfig::new(1, Role::Primary, PAGE_SIZE as u32, regions(machine));
    chan.handshake_connect(&local)?;
    chan.set_batch_pages(BATCH_PAGES);

    let ram = machine.ram();
    let layout = RamLayout::of(&**ram)?;
    let log = UnionLog::new(
        KvmDirtyLog::new(machine.vm_fd(), layout.clone(), vec![RAM_SLOT])?,
        AtomicBitmapLog::new(ram)?,
    );
    let mut primary = PrimaryRam::new(layout.clone(), log, CollectOptions::default());
    let view = RamView::new(&**ram)?;
    update(progress, |p| {
        *p = Progress {
            active: true,
            phase: Phase::Precopy,
            total_pages: layout.total_pages() as u64,
            ..Default::default()
        };
    });

    // Pre-copy: all of RAM, then what the guest dirtied meanwhile, until little is left.
    let policy = PrecopyPolicy {
        max_rounds: 20,
        pause_below_pages: 512,
    };
    primary.mark_all()?;
    let mut rounds = 0;
    let (mut pages, mut zero_pages) = (0, 0);
    let pre_t0 = Instant::now();
    loop {
        let (d, z) = send_runs(
            &mut chan,
            PagePhase::Precopy,
            0,
            primary.collect(&view)?,
            progress,
        )?;
        pages += d;
        zero_pages += z;
        rounds += 1;
        let pending = primary.take_log()?;
        update(progress, |p| {
            p.rounds = rounds;
            p.last_dirty_pages = pending as u64;
        });
        tracing::info!("pre-copy round {rounds}: {d} pages + {z} zero sent, {pending} dirty since");
        if !policy.another_round(rounds, pending) {
            break;
        }
    }
    // Wait until the destination has consumed every pre-copy page (it echoes the beacon in stream order),
    // so the pause does not include draining socket buffers.
    chan.send(&Message::Heartbeat {
        seq: u64::from(rounds),
    })?;
    match chan.recv()? {
        Message::Heartbeat { seq } if seq == u64::from(rounds) => {}
        other => {
            return Err(MigrationError::Peer(format!(
                "expected the pre-copy echo, got {:?}",
                other.kind()
            )));
        }
    }
    let precopy = pre_t0.elapsed();
    let precopy_bytes = pages * PAGE_SIZE;

    // Stop-and-copy.
    let pause_t0 = Instant::now();
    update(progress, |p| p.phase = Phase::StopAndCopy);
    let paused_in = machine.pause()?;
    let pending = primary.take_log()?;
    let (d, z) = send_runs(
        &mut chan,
        PagePhase::Checkpoint,
        0,
        primary.collect(&view)?,
        progress,
    )?;
    chan.send(&Message::EndOfRam { epoch: 0 })?;
    let pages_at = pause_t0.elapsed();
    let state = machine.save_state()?.to_bytes()?;
    chan.send_vmstate(0, &[(MACHINE_STATE_ID, &state)], 64 << 10)?;
    let state_at = pause_t0.elapsed();
    match chan.recv()? {
        Message::VmstateLoaded { .. } => {}
        other => {
            return Err(MigrationError::Peer(format!(
                "expected VmstateLoaded, got {:?}",
                other.kind()
            )));
        }
    }
    let downtime = pause_t0.elapsed();
    tracing::info!(
        "stop-and-copy: paused in {paused_in:?}, {} pages sent by {pages_at:?}, state ({} bytes) sent by \
         {state_at:?}, destination running after {downtime:?}",
        d + z,
        state.len()
    );
    update(progress, |p| {
        p.phase = Phase::Done;
        p.active = false;
        p.last_dirty_pages = pending as u64;
        p.downtime_us = Some(downtime.as_micros() as u64);
    });
    Ok(MigrationReport {
        rounds,
        pages: pages + d,
        zero_pages: zero_pages + z,
        final_pages: d + z,
        bytes: (pages + d) * PAGE_SIZE,
        precopy,
        precopy_bytes_per_sec: precopy_bytes as f64 / precopy.as_secs_f64().max(1e-9),
        downtime,
        total: t0.elapsed(),
    })
}

/// Receive a migration on an accepted connection into `machine` (made with
/// [`Machine::prepare_incoming`], not started), then start it.
pub fn receive(
    stream: TcpStream,
    machine: &Machine,
    progress: &Mutex<Progress>,
) -> Result<MigrationReport, MigrationError> {
    let t0 = Instant::now();
    let mut chan = Channel::from_tcp(stream)?;
    let local = colo_proto::LocalConfig::new(2, Role::Secondary, PAGE_SIZE as u32, regions(machine));
    chan.handshake_accept(&local)?;
    let size = ram_size(machine.ram());
    update(progress, |p| {
        *p = Progress {
            active: true,
            phase: Phase::Precopy,
            total_pages: size / PAGE_SIZE,
            ..Default::default()
        };
    });
    let zero = vec![0u8; PAGE_SIZE as usize];
    let mut written = vec![0u64; (size / PAGE_SIZE).div_ceil(64) as usize];
    let (mut pages, mut zero_pages, mut final_pages) = (0u64, 0u64, 0u64);
    let mut state: Option<(u64, Vec<u8>)> = None;
    let mut end_of_ram = false;
    loop {
        match chan.recv()? {
            msg @ (Message::PrecopyPages(_) | Message::RamPages(_)) if !end_of_ram => {
                let (b, last) = match msg {
                    Message::RamPages(b) => (b, true),
                    Message::PrecopyPages(b) => (b, false),
                    _ => unreachable_batch()?,
                };
                let (d, z) = write_batch(machine, &b, &zero, &mut written)?;
                pages += d;
                zero_pages += z;
                if last {
                    final_pages += d + z;
                }
                update(progress, |pr| {
                    pr.pages = pages;
                    pr.zero_pages = zero_pages;
                    pr.bytes = pages * PAGE_SIZE;
                });
            }
            Message::Heartbeat { seq } if !end_of_ram => chan.send(&Message::Heartbeat { seq })?,
            Message::EndOfRam { .. } if !end_of_ram => {
                end_of_ram = true;
                update(progress, |p| p.phase = Phase::StopAndCopy);
            }
            Message::VmstateSize { size, .. } if end_of_ram && state.is_none() => {
                if size > MAX_STATE {
                    return Err(MigrationError::Peer(format!("machine state of {size} bytes")));
                }
                state = Some((size, Vec::with_capacity(size as usize)));
            }
            Message::DeviceState(c) => {
                let Some((total, buf)) = state.as_mut() else {
                    return Err(MigrationError::Peer("device state before its size".into()));
                };
                if c.device_id != MACHINE_STATE_ID || c.total != *total || c.offset != buf.len() as u64 {
                    return Err(MigrationError::Peer(format!(
                        "device chunk id {} offset {} total {} (have {} of {})",
                        c.device_id,
                        c.offset,
                        c.total,
                        buf.len(),
                        total
                    )));
                }
                if buf.len() as u64 + c.data.len() as u64 > *total {
                    return Err(MigrationError::Peer("device state longer than announced".into()));
                }
                buf.extend_from_slice(&c.data);
                if buf.len() as u64 == *total {
                    break;
                }
            }
            other => return Err(MigrationError::Peer(format!("unexpected {:?}", other.kind()))),
        }
    }
    let (_, bytes) = state.ok_or_else(|| MigrationError::Peer("no machine state".into()))?;
    let t_state = Instant::now();
    let st = MachineState::from_bytes(&bytes)?;
    machine.restore_state(&st)?;
    let restored = t_state.elapsed();
    machine.start(false)?;
    chan.send(&Message::VmstateLoaded { epoch: 0 })?;
    if let Err(e) = machine.announce() {
        tracing::warn!("announcing the guest's MAC: {e}");
    }
    tracing::info!(
        "state restored in {restored:?}, guest started after {:?}",
        t_state.elapsed()
    );
    update(progress, |p| {
        p.phase = Phase::Done;
        p.active = false;
    });
    Ok(MigrationReport {
        rounds: 0,
        pages,
        zero_pages,
        final_pages,
        bytes: pages * PAGE_SIZE,
        precopy: Duration::ZERO,
        precopy_bytes_per_sec: 0.0,
        downtime: Duration::ZERO,
        total: t0.elapsed(),
    })
}

fn unreachable_batch() -> Result<(colo_proto::PageBatch, bool), MigrationError> {
    Err(MigrationError::Peer("not a page batch".into()))
}
