//! The primary process: a real KVM guest that dirties a share of its RAM each epoch, checkpointed to the
//! secondary process through colo-proto's [`PrimarySession`] and colo-ram's [`PrimaryRam`], with the
//! physical references (scattered memcpy, raw loopback TCP) measured on the same pages in the same run.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail, ensure};
use colo_proto::{
    Channel, LocalConfig, MemoryRegion, PagePhase, PrimaryAction, PrimarySession, Role, SessionConfig,
};
use colo_ram::{
    AtomicBitmapLog, CollectOptions, DirtyBitmap, DirtyLog, GuestRam, KvmDirtyLog, KvmManualDirtyLog,
    PAGE_SIZE, PrimaryRam, RamLayout, UnionLog,
};
use kvm_ioctls::Kvm;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::guest::{FIRST_TARGET, Guest, MAX_TARGETS};
use crate::report::{EpochRecord, Report};
use crate::secondary::{SecondaryResult, crc_of};
use crate::{CheckpointArgs, LogKind, mono_ns, thread_cpu_ns};

/// One `Channel::send_pages` entry: a run of pages at a guest address, or an empty slice for a zero page.
type Entry<'r> = (u64, &'r [u8]);

type Log = UnionLog<Box<dyn DirtyLog + Send>, AtomicBitmapLog>;

/// A small deterministic generator for the guest's choice of pages.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `n` distinct random pages of guest RAM at or above [`FIRST_TARGET`], in random order.
fn pick_pages(rng: &mut XorShift, mem_bytes: u64, n: usize) -> Vec<u64> {
    let first = (FIRST_TARGET / PAGE_SIZE as u64) as usize;
    let pages = (mem_bytes / PAGE_SIZE as u64) as usize - first;
    let n = n.min(pages);
    let mut taken = vec![false; pages];
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let i = (rng.next() % pages as u64) as usize;
        if !std::mem::replace(&mut taken[i], true) {
            out.push(((first + i) * PAGE_SIZE) as u64);
        }
    }
    out
}

/// The secondary child process; killed if the primary gives up early.
struct Secondary {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Secondary {
    fn spawn(args: &CheckpointArgs) -> Result<(Self, u16, u16)> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut cmd = Command::new(exe);
        cmd.arg("secondary")
            .arg("--mem")
            .arg(args.mem.to_string())
            .arg("--flush-threads")
            .arg(args.flush_threads.to_string());
        if args.cache_huge_pages {
            cmd.arg("--cache-huge-pages");
        }
        cmd.arg("--receive-threads").arg(args.receive_threads.to_string());
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the secondary process")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout pipe"))?;
        let mut sec = Secondary {
            child,
            stdout: BufReader::new(stdout),
        };
        let line = sec.line()?;
        let mut it = line.strip_prefix("LISTEN ").unwrap_or("").split(' ');
        let (Some(a), Some(b)) = (it.next(), it.next()) else {
            bail!("unexpected first line from the secondary: {line:?}");
        };
        Ok((sec, a.parse()?, b.parse()?))
    }

    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the secondary exited early");
        }
        Ok(line.trim_end().to_owned())
    }

    fn finish(mut self) -> Result<SecondaryResult> {
        let line = self.line()?;
        let json = line
            .strip_prefix("RESULT ")
            .ok_or_else(|| anyhow!("unexpected line from the secondary: {line:?}"))?;
        let result = serde_json::from_str(json)?;
        let status = self.child.wait()?;
        ensure!(status.success(), "the secondary failed: {status}");
        Ok(result)
    }
}

impl Drop for Secondary {
    fn drop(&mut self) {
        // Give a failing secondary a moment to report its own error before it is killed.
        for _ in 0..50 {
            match self.child.try_wait() {
                Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
                _ => return,
            }
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Per-checkpoint physical references, measured on exactly the data pages the checkpoint moved.
struct References {
    buf: Vec<u8>,
    scratch: Vec<u8>,
}

impl References {
    fn new(mem_bytes: u64) -> Self {
        // Touched up front, as the secondary's memory is by the initial sync.
        References {
            buf: Vec::new(),
            scratch: vec![1u8; mem_bytes as usize],
        }
    }

    /// (gather ns, raw TCP ns, scatter ns) for the pages of `set`, copied from guest memory at `base`.
    fn measure(
        &mut self,
        base: &[u8],
        set: &DirtyBitmap,
        raw: &mut TcpStream,
    ) -> Result<(u64, RawTransfer, u64)> {
        let n = set.count();
        self.buf.resize(n * PAGE_SIZE, 0);
        let t = mono_ns();
        for (k, page) in set.iter_pages().enumerate() {
            let off = page * PAGE_SIZE;
            self.buf[k * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(&base[off..off + PAGE_SIZE]);
        }
        let gather = mono_ns() - t;
        let raw_tcp = raw_transfer(raw, &self.buf)?;
        let t = mono_ns();
        for (k, page) in set.iter_pages().enumerate() {
            let off = page * PAGE_SIZE;
            self.scratch[off..off + PAGE_SIZE].copy_from_slice(&self.buf[k * PAGE_SIZE..][..PAGE_SIZE]);
        }
        let scatter = mono_ns() - t;
        std::hint::black_box(&self.scratch);
        Ok((gather, raw_tcp, scatter))
    }
}

/// One raw reference transfer.
struct RawTransfer {
    /// From the first write to the sink's read of the last byte.
    ns: u64,
    /// CPU time the writing thread spent writing.
    send_cpu_ns: u64,
    /// CPU time the sink spent reading.
    receive_cpu_ns: u64,
}

/// Writes `buf` over the raw reference connection and waits for the sink's answer.
fn raw_transfer(raw: &mut TcpStream, buf: &[u8]) -> Result<RawTransfer> {
    let t = mono_ns();
    let cpu = thread_cpu_ns();
    raw.write_all(&(buf.len() as u64).to_le_bytes())?;
    raw.write_all(buf)?;
    let send_cpu_ns = thread_cpu_ns() - cpu;
    let mut done = [0u8; 16];
    raw.read_exact(&mut done)?;
    let (end, sink_cpu) = done.split_at(8);
    Ok(RawTransfer {
        ns: u64::from_le_bytes(end.try_into()?).saturating_sub(t),
        send_cpu_ns,
        receive_cpu_ns: u64::from_le_bytes(sink_cpu.try_into()?),
    })
}

/// What [`stream_pages`] did.
struct Streamed {
    bytes: u64,
    gather_ns: u64,
    send_ns: u64,
    send_cpu_ns: u64,
    /// CPU time collecting (dirty set walk, zero check, page CRCs), the rest of the round's thread time.
    collect_cpu_ns: u64,
    first_send_ns: u64,
}

/// One round, pipelined as colo-pair sends: collects `chunk_pages` pending pages (zero check and, where the
/// phase's frames carry them, page CRCs, in one pass over each page), writes them while they are in cache,
/// collects the next chunk while the socket drains. `chunk_pages` 0 collects the whole round first. Marks
/// the data pages in `sent`.
fn stream_pages(
    primary: &mut PrimaryRam<Log>,
    ram: &GuestRam<'_>,
    sent: &mut DirtyBitmap,
    ch: &mut Channel<TcpStream>,
    phase: PagePhase,
    epoch: u64,
    chunk_pages: usize,
) -> Result<Streamed> {
    let mut out = Streamed {
        bytes: 0,
        gather_ns: 0,
        send_ns: 0,
        send_cpu_ns: 0,
        collect_cpu_ns: 0,
        first_send_ns: 0,
    };
    let round_cpu = thread_cpu_ns();
    let with_crcs = phase.carries_page_crcs(ch.version());
    let mut runs = primary.collect(ram)?;
    if with_crcs {
        runs = runs.with_page_crcs(colo_proto::page_crc);
    }
    let chunk_pages = if chunk_pages == 0 { usize::MAX } else { chunk_pages };
    let (mut entries, mut crcs): (Vec<Entry<'_>>, Vec<u32>) = (Vec::new(), Vec::new());
    loop {
        let t = mono_ns();
        entries.clear();
        crcs.clear();
        let done = runs.fill(chunk_pages, &mut entries, &mut crcs)?;
        for &(gpa, data) in &entries {
            let first = gpa as usize / PAGE_SIZE;
            sent.set_range(first..first + data.len() / PAGE_SIZE)?;
            out.bytes += data.len() as u64;
        }
        let now = mono_ns();
        out.gather_ns += now - t;
        if !entries.is_empty() {
            if out.first_send_ns == 0 {
                out.first_send_ns = now;
            }
            let cpu = thread_cpu_ns();
            if with_crcs {
                ch.send_pages_with_crcs(phase, epoch, PAGE_SIZE as u32, &entries, &crcs)?;
            } else {
                ch.send_pages(phase, epoch, PAGE_SIZE as u32, &entries)?;
            }
            out.send_cpu_ns += thread_cpu_ns() - cpu;
            out.send_ns += mono_ns() - now;
        }
        if done {
            if out.first_send_ns == 0 {
                out.first_send_ns = mono_ns();
            }
            out.collect_cpu_ns = (thread_cpu_ns() - round_cpu).saturating_sub(out.send_cpu_ns);
            return Ok(out);
        }
    }
}

/// Runs the whole benchmark on the primary side and returns the report.
pub fn run(args: &CheckpointArgs) -> Result<Report> {
    let mem_bytes = args.mem.0;
    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let (mut guest, kvm_log) = Guest::new(&kvm, mem_bytes, |vm, mem| {
        let layout = RamLayout::of(mem)?;
        Ok(match args.log {
            LogKind::Manual => {
                Box::new(KvmManualDirtyLog::new(Arc::clone(vm), layout, vec![0])?) as Box<dyn DirtyLog + Send>
            }
            LogKind::Plain => Box::new(KvmDirtyLog::new(Arc::clone(vm), layout, vec![0])?),
        })
    })?;
    let layout = RamLayout::of(&guest.mem)?;
    let log = UnionLog::new(kvm_log, AtomicBitmapLog::new(&guest.mem)?);
    let mut primary = PrimaryRam::new(layout.clone(), log, CollectOptions::default());
    let total_pages = layout.total_pages();
    let per_epoch = ((total_pages as f64 * args.dirty_pct / 100.0).round() as usize).clamp(1, MAX_TARGETS);
    let hot = ((per_epoch as f64 * args.hot_pct / 100.0).round() as usize).clamp(1, per_epoch);

    let (secondary, port, raw_port) = Secondary::spawn(args)?;
    let mut ch = Channel::from_tcp(TcpStream::connect(("127.0.0.1", port))?)?;
    ch.set_batch_pages(args.batch_pages);
    let mut raw = TcpStream::connect(("127.0.0.1", raw_port))?;
    raw.set_nodelay(true)?;
    let regions = vec![MemoryRegion {
        gpa: 0,
        size: mem_bytes,
    }];
    ch.handshake_connect(&LocalConfig::new(1, Role::Primary, PAGE_SIZE as u32, regions))?;
    let mut refs = References::new(mem_bytes);
    let base_ptr = guest
        .mem
        .get_host_address(GuestAddress(0))
        .context("guest memory has no host mapping")?;

    // Initial sync (live migration): all of RAM as pre-copy; checkpoint 1 completes it.
    let mut rng = XorShift(args.seed | 1);
    primary.mark_all()?;
    let mut sent = DirtyBitmap::new(total_pages);
    {
        let ram = GuestRam::new(&guest.mem)?;
        stream_pages(
            &mut primary,
            &ram,
            &mut sent,
            &mut ch,
            PagePhase::Precopy,
            1,
            args.chunk_pages,
        )?;
    }

    let mut sess = PrimarySession::new(SessionConfig::default(), Instant::now());
    while !sess.is_idle() {
        let msg = ch.recv()?;
        sess.handle_message(Instant::now(), msg)?;
        if let Some(PrimaryAction::Failed(e)) = sess.poll_action() {
            return Err(e.into());
        }
    }
    let mut records = Vec::new();
    let started = Instant::now();
    for epoch in 1..=u64::from(args.checkpoints) + 1 {
        let mut rec = EpochRecord {
            epoch,
            ..Default::default()
        };
        sent.clear_all();
        if epoch > 1 {
            // The guest runs: writes its share of pages, then (during the pre-copy round, if any) writes
            // the hot part of them again with a new marker.
            let pages = pick_pages(&mut rng, mem_bytes, per_epoch);
            guest.prepare_run(&pages, epoch)?;
            Guest::run(&mut guest.vcpu)?;
            guest.prepare_run(&pages[..hot], epoch | 1 << 63)?;
            if args.no_precopy {
                Guest::run(&mut guest.vcpu)?;
            } else {
                let Guest { mem, vcpu, .. } = &mut guest;
                let ram = GuestRam::new(&*mem)?;
                rec.precopy_start_ns = mono_ns();
                primary.take_log()?;
                std::thread::scope(|s| -> Result<()> {
                    // The guest writes its hot pages again after the round's log was read: they are dirty
                    // again for the pause, with new contents.
                    let vcpu_thread = s.spawn(|| Guest::run(vcpu));
                    // The guest writes while this round is read: a pre-copy frame's CRC covers its
                    // descriptors and each page has its own CRC (protocol v3 on), taken when the page was
                    // collected, so the pages go straight from guest memory (a page written since is torn,
                    // dirty again and re-sent paused).
                    let s = stream_pages(
                        &mut primary,
                        &ram,
                        &mut sent,
                        &mut ch,
                        PagePhase::Precopy,
                        epoch,
                        args.chunk_pages,
                    )?;
                    rec.precopy_stream_start_ns = s.first_send_ns;
                    rec.stream_send_cpu_ns = s.send_cpu_ns;
                    rec.collect_cpu_ns = s.collect_cpu_ns;
                    rec.precopy_send_ns = mono_ns() - rec.precopy_start_ns;
                    rec.precopy_bytes = s.bytes;
                    vcpu_thread
                        .join()
                        .map_err(|_| anyhow!("vCPU thread panicked"))??;
                    Ok(())
                })?;
            }
        }

        // The checkpoint, driven by the session machine.
        sess.start_checkpoint(Instant::now())?;
        let mut pause_start = 0;
        let mut awaiting_since = 0;
        'checkpoint: loop {
            while let Some(action) = sess.poll_action() {
                match action {
                    PrimaryAction::Send(m) => ch.send(&m)?,
                    PrimaryAction::PauseGuest => pause_start = mono_ns(),
                    PrimaryAction::SendRam { epoch } => {
                        let t = mono_ns();
                        primary.take_log()?;
                        rec.log_ns = mono_ns() - t;
                        let ram = GuestRam::new(&guest.mem)?;
                        let s = stream_pages(
                            &mut primary,
                            &ram,
                            &mut sent,
                            &mut ch,
                            PagePhase::Checkpoint,
                            epoch,
                            args.chunk_pages,
                        )?;
                        (rec.gather_ns, rec.send_ns) = (s.gather_ns, s.send_ns);
                        rec.ram_send_start_ns = s.first_send_ns;
                        rec.pause_bytes = s.bytes;
                        rec.stream_send_cpu_ns += s.send_cpu_ns;
                        rec.collect_cpu_ns += s.collect_cpu_ns;
                        sess.ram_sent(Instant::now())?;
                    }
                    PrimaryAction::SendDeviceState { epoch } => {
                        let t = mono_ns();
                        let cpu = guest.cpu_state()?;
                        ch.send_vmstate(epoch, &[(0, &cpu)], 64 << 10)?;
                        sess.device_state_sent(Instant::now())?;
                        rec.device_ns = mono_ns() - t;
                        awaiting_since = mono_ns();
                    }
                    PrimaryAction::ReleaseOutput { .. } => {
                        let now = mono_ns();
                        rec.wait_received_ns = now - awaiting_since;
                        awaiting_since = now;
                    }
                    PrimaryAction::ResumeGuest => {
                        let t = mono_ns();
                        rec.wait_loaded_ns = t - awaiting_since;
                        // The vCPU re-enters the guest with the state it had (KVM_RUN in the next epoch);
                        // nothing to restore on the primary.
                        rec.resume_ns = mono_ns() - t;
                        rec.pause_ns = mono_ns() - pause_start;
                    }
                    PrimaryAction::CheckpointDone { .. } => break 'checkpoint,
                    PrimaryAction::PeerClosed(r) => bail!("the secondary left: {r:?}"),
                    PrimaryAction::Failed(e) => return Err(e.into()),
                }
            }
            let msg = ch.recv()?;
            sess.handle_message(Instant::now(), msg)?;
        }
        rec.data_pages = sent.count() as u64;
        if epoch > 1 {
            // SAFETY: `base_ptr` maps all `mem_bytes` of guest RAM (one region from 0) for as long as `guest`
            // lives; the vCPU is stopped, so nothing writes the pages while the references read them.
            let base = unsafe { std::slice::from_raw_parts(base_ptr as *const u8, mem_bytes as usize) };
            let raw_tcp;
            (rec.gather_ref_ns, raw_tcp, rec.scatter_ref_ns) = refs.measure(base, &sent, &mut raw)?;
            rec.raw_tcp_ns = raw_tcp.ns;
            rec.raw_send_cpu_ns = raw_tcp.send_cpu_ns;
            rec.raw_receive_cpu_ns = raw_tcp.receive_cpu_ns;
            // The same shape as the stream: the pre-copy bytes and the paused bytes as two transfers, each
            // waited for (a secondary figure; the headline reference above is one transfer).
            let pre = (rec.precopy_bytes as usize).min(refs.buf.len());
            let paused = (rec.pause_bytes as usize).min(refs.buf.len());
            rec.raw_tcp_split_ns = 0;
            for len in [pre, paused] {
                if len > 0 {
                    rec.raw_tcp_split_ns += raw_transfer(&mut raw, &refs.buf[..len])?.ns;
                }
            }
        }
        records.push(rec);
    }
    let elapsed = started.elapsed();

    sess.close(Instant::now())?;
    while let Some(a) = sess.poll_action() {
        if let PrimaryAction::Send(m) = a {
            ch.send(&m)?;
        }
    }
    drop(raw);
    let crc32 = crc_of(&GuestRam::new(&guest.mem)?, mem_bytes)?;
    let sec = secondary.finish()?;
    drop(ch);
    Report::build(args, per_epoch, hot, records, sec, crc32, elapsed)
}
