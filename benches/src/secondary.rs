//! The secondary process: receives checkpoints through colo-proto's [`SecondarySession`] into colo-ram's
//! [`RamCache`], flushes the cache into its own guest memory at each commit, loads the vCPU state, and
//! sinks the raw-TCP reference stream. At the end it prints its timings and a CRC32 of its guest memory as
//! one `RESULT {json}` line on stdout.

use std::io::{BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use colo_proto::{
    Channel, LocalConfig, MemoryRegion, Message, Role, SecondaryAction, SecondarySession, SessionConfig,
};
use colo_ram::{AtomicBitmapLog, FlushOptions, GuestRam, PAGE_SIZE, RamCache, RamLayout};
use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;

use crate::guest::{CpuState, Mem};
use crate::{mono_ns, thread_cpu_ns};

/// Decoded messages queued between the reader thread and the store (each up to one 1 MiB page frame). With
/// the frame being read and the batch being stored this keeps at most 8 receive buffers in flight, the size
/// of colo-proto's buffer pool: more would make the channel allocate fresh buffers (page faults, zeroing)
/// and free them again (unmapping) while the queue is full.
const RECV_QUEUE: usize = 6;

/// Largest device state this secondary buffers for one checkpoint.
const MAX_DEVICE_STATE: usize = 1 << 20;

/// The secondary's view of one checkpoint (timestamps are CLOCK_MONOTONIC nanoseconds, comparable with
/// the primary's on the same host).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SecondaryEpoch {
    /// Checkpoint epoch.
    pub epoch: u64,
    /// Pages stored from pre-copy batches of this epoch.
    pub precopy_pages: u64,
    /// When the last pre-copy page of this epoch was in the cache.
    pub precopy_last_ns: u64,
    /// When `VmstateSend` arrived.
    pub ram_start_ns: u64,
    /// When `EndOfRam` arrived (every checkpoint page stored in the cache).
    pub ram_end_ns: u64,
    /// When the last checkpoint page of this epoch was in the cache (0: none arrived while paused).
    pub ram_last_store_ns: u64,
    /// Pages stored from checkpoint batches.
    pub ram_pages: u64,
    /// CPU time reading, checking and decoding page frames of this epoch and storing their pages.
    pub receive_cpu_ns: u64,
    /// Time spent inside `RamCache::receive` for checkpoint pages.
    pub store_ns: u64,
    /// `RamCache::flush` time.
    pub flush_ns: u64,
    /// Pages the flush copied.
    pub flushed_pages: u64,
    /// Decoding and applying the vCPU state.
    pub load_ns: u64,
}

/// What the secondary prints at the end.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SecondaryResult {
    /// CRC32 of the secondary's guest memory after the last checkpoint.
    pub crc32: u32,
    /// One entry per checkpoint.
    pub epochs: Vec<SecondaryEpoch>,
}

/// Runs the secondary: binds two loopback listeners (checkpoint channel, raw reference), announces them on
/// stdout, and serves one primary until it says goodbye.
pub fn run(mem_bytes: u64, flush_threads: usize, huge_cache: bool, pipelined: bool) -> Result<()> {
    let svm = Mem::from_ranges(&[(GuestAddress(0), mem_bytes as usize)]).context("SVM memory")?;
    let layout = RamLayout::of(&svm)?;
    let mut cache = RamCache::new(
        layout.clone(),
        FlushOptions {
            threads: flush_threads.max(1),
            ..FlushOptions::default()
        },
    )?;
    if huge_cache {
        cache.advise_huge_pages()?;
    }
    // The SVM's own writes (none in this benchmark, which runs no secondary guest) would come from here.
    let mut svm_log = AtomicBitmapLog::new(&svm)?;
    let mut sram = GuestRam::new(&svm)?;

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let raw_listener = TcpListener::bind("127.0.0.1:0")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "LISTEN {} {}",
            listener.local_addr()?.port(),
            raw_listener.local_addr()?.port()
        )?;
        out.flush()?;
    }
    let (stream, _) = listener.accept()?;
    let (raw, _) = raw_listener.accept()?;
    let sink = std::thread::Builder::new()
        .name("raw-sink".into())
        .spawn(move || raw_sink(raw))?;

    let mut ch = Channel::from_tcp(stream)?;
    let local = LocalConfig::new(
        2,
        Role::Secondary,
        PAGE_SIZE as u32,
        vec![MemoryRegion {
            gpa: 0,
            size: mem_bytes,
        }],
    );
    ch.handshake_accept(&local)?;
    // Either a reader thread reads frames, checks their CRC and decodes them while this thread stores the
    // previous batch into the RAM cache (messages reach the session machine in arrival order; the queue is
    // bounded, so a slow store pushes back on the socket), or this thread does it all, like the raw sink.
    let mut reader = None;
    let mut msg_rx = None;
    if pipelined {
        let mut rx = Channel::from_tcp(ch.get_ref().try_clone()?)?;
        rx.set_version(ch.version());
        let (msg_tx, queue) = std::sync::mpsc::sync_channel::<(colo_proto::Result<Message>, u64)>(RECV_QUEUE);
        reader = Some(
            std::thread::Builder::new()
                .name("checkpoint-rx".into())
                .spawn(move || {
                    loop {
                        let cpu = thread_cpu_ns();
                        let msg = rx.recv();
                        let cpu = thread_cpu_ns() - cpu;
                        let stop = msg.is_err();
                        if msg_tx.send((msg, cpu)).is_err() || stop {
                            return;
                        }
                    }
                })?,
        );
        msg_rx = Some(queue);
    }
    let mut sess = SecondarySession::new(SessionConfig::default(), Instant::now());
    let mut epochs: Vec<SecondaryEpoch> = Vec::new();
    let mut cur = SecondaryEpoch::default();
    let mut device_state: Vec<u8> = Vec::new();
    let mut cpu = CpuState::default();
    // CPU time of receiving the message being handled (counted for page frames only).
    let mut recv_cpu = 0;
    loop {
        while let Some(action) = sess.poll_action() {
            match action {
                SecondaryAction::Send(m) => ch.send(&m)?,
                SecondaryAction::PauseGuest | SecondaryAction::ResumeGuest => {}
                SecondaryAction::StoreRam(batch) => {
                    let t = mono_ns();
                    let store_cpu = thread_cpu_ns();
                    for p in &batch.pages {
                        if p.is_zero() {
                            cache.receive_zero(p.gpa, 1)?;
                        } else {
                            cache.receive(p.gpa, &p.data)?;
                        }
                    }
                    let now = mono_ns();
                    let batch_cpu = std::mem::take(&mut recv_cpu) + thread_cpu_ns() - store_cpu;
                    if batch.epoch == cur.epoch && cur.ram_start_ns != 0 {
                        cur.store_ns += now - t;
                        cur.ram_pages += batch.pages.len() as u64;
                        cur.ram_last_store_ns = now;
                        cur.receive_cpu_ns += batch_cpu;
                    } else {
                        // A pre-copy batch for the coming checkpoint.
                        if batch.epoch != cur.epoch {
                            ensure!(batch.epoch > cur.epoch, "pre-copy for past epoch {}", batch.epoch);
                            cur = SecondaryEpoch {
                                epoch: batch.epoch,
                                ..Default::default()
                            };
                        }
                        cur.precopy_pages += batch.pages.len() as u64;
                        cur.precopy_last_ns = now;
                        cur.receive_cpu_ns += batch_cpu;
                    }
                }
                SecondaryAction::StoreDeviceState(chunk) => {
                    ensure!(
                        device_state.len() + chunk.data.len() <= MAX_DEVICE_STATE,
                        "device state over {MAX_DEVICE_STATE} bytes"
                    );
                    device_state.extend_from_slice(&chunk.data);
                }
                SecondaryAction::FlushRamCache { .. } => {
                    let t = mono_ns();
                    let stats = cache.flush(&mut sram, &mut svm_log)?;
                    cur.flush_ns = mono_ns() - t;
                    cur.flushed_pages = stats.flushed_pages as u64;
                }
                SecondaryAction::LoadDeviceState { epoch } => {
                    let t = mono_ns();
                    cpu = CpuState::decode(&device_state).with_context(|| format!("epoch {epoch}"))?;
                    device_state.clear();
                    cur.load_ns = mono_ns() - t;
                }
                SecondaryAction::CommitBlockCheckpoint { .. } => {}
                SecondaryAction::CheckpointDone { epoch } => {
                    ensure!(
                        epoch == cur.epoch,
                        "committed epoch {epoch}, measured {}",
                        cur.epoch
                    );
                    epochs.push(std::mem::take(&mut cur));
                    cur.epoch = epoch;
                }
                SecondaryAction::PeerClosed(_) => {
                    // The reader thread holds a clone of the socket: shut it down so its recv returns.
                    let _ = ch.get_ref().shutdown(std::net::Shutdown::Both);
                    drop(ch);
                    drop(msg_rx);
                    if let Some(reader) = reader {
                        reader
                            .join()
                            .map_err(|_| anyhow::anyhow!("reader thread panicked"))?;
                    }
                    sink.join().map_err(|_| anyhow::anyhow!("raw sink panicked"))??;
                    let crc32 = crc_of(&sram, mem_bytes)?;
                    ensure!(
                        cpu.regs.rip != 0 && cpu.sregs.cr3 != 0,
                        "vCPU state never loaded: {:x?}",
                        cpu.regs
                    );
                    let result = SecondaryResult { crc32, epochs };
                    let mut out = BufWriter::new(std::io::stdout().lock());
                    writeln!(out, "RESULT {}", serde_json::to_string(&result)?)?;
                    out.flush()?;
                    return Ok(());
                }
                SecondaryAction::Failed(e) => return Err(e.into()),
            }
        }
        if sess.state_name() == "loading the checkpoint" {
            sess.checkpoint_loaded(Instant::now())?;
            continue;
        }
        let msg = match &msg_rx {
            Some(queue) => {
                let (msg, cpu) = queue
                    .recv()
                    .map_err(|_| anyhow::anyhow!("the reader thread stopped"))?;
                recv_cpu = cpu;
                msg?
            }
            None => {
                let cpu = thread_cpu_ns();
                let msg = ch.recv();
                recv_cpu = thread_cpu_ns() - cpu;
                msg?
            }
        };
        match &msg {
            Message::VmstateSend { epoch } => {
                if *epoch != cur.epoch {
                    cur = SecondaryEpoch {
                        epoch: *epoch,
                        ..Default::default()
                    };
                }
                cur.ram_start_ns = mono_ns();
            }
            Message::EndOfRam { .. } => cur.ram_end_ns = mono_ns(),
            _ => {}
        }
        sess.handle_message(Instant::now(), msg)?;
    }
}

/// CRC32 of all of `ram` (one region from 0).
pub fn crc_of(ram: &GuestRam<'_>, mem_bytes: u64) -> Result<u32> {
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut gpa = 0;
    while gpa < mem_bytes {
        let n = buf.len().min((mem_bytes - gpa) as usize);
        ram.read(gpa, &mut buf[..n])?;
        h.update(&buf[..n]);
        gpa += n as u64;
    }
    Ok(h.finalize())
}

/// The raw-TCP reference sink: for each `len` (u64 LE) read and discard `len` bytes, then answer with the
/// CLOCK_MONOTONIC time the last byte arrived and the CPU time the reads took (u64 LE each).
fn raw_sink(mut s: TcpStream) -> Result<()> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let mut len = [0u8; 8];
        match s.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let cpu = thread_cpu_ns();
        let mut left = u64::from_le_bytes(len);
        while left > 0 {
            let n = buf.len().min(left as usize);
            let got = s.read(&mut buf[..n])?;
            if got == 0 {
                bail!("raw reference stream closed with {left} bytes to go");
            }
            left -= got as u64;
        }
        let end = mono_ns();
        let cpu = thread_cpu_ns() - cpu;
        let mut answer = [0u8; 16];
        answer[..8].copy_from_slice(&end.to_le_bytes());
        answer[8..].copy_from_slice(&cpu.to_le_bytes());
        s.write_all(&answer)?;
    }
}
