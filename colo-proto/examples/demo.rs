//! A primary and a secondary over loopback TCP: handshake, a pre-copy of synthetic guest RAM, then a few
//! COLO checkpoints through the session machines, printing what happens and the throughput. At the end the
//! secondary's RAM must equal the primary's, or the demo exits non-zero.
//!
//! `cargo run --release -p colo-proto --example demo [-- --mib 256 --checkpoints 5]`

use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use colo_proto::{
    Channel, LocalConfig, MemoryRegion, PagePhase, PrimaryAction, PrimarySession, Role, SecondaryAction,
    SecondarySession, SessionConfig,
};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const PAGE: usize = 4096;

/// A tiny deterministic generator for the synthetic guest's writes.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / 1e9
}

fn layout(mem: usize) -> Vec<MemoryRegion> {
    vec![MemoryRegion {
        gpa: 0,
        size: mem as u64,
    }]
}

/// The synthetic guest: RAM, plus a "dirty log" of pages written since the last checkpoint.
struct Guest {
    ram: Vec<u8>,
    dirty: Vec<bool>,
    rng: XorShift,
}

impl Guest {
    fn new(mem: usize) -> Self {
        let mut g = Guest {
            ram: vec![0u8; mem],
            dirty: vec![false; mem / PAGE],
            rng: XorShift(0x9e37_79b9_7f4a_7c15),
        };
        // A quarter of the guest stays zero; the rest gets content.
        for (i, page) in g.ram.chunks_mut(PAGE).enumerate() {
            if i % 4 != 0 {
                page.fill((i % 253) as u8 + 1);
                page[..8].copy_from_slice(&(i as u64).to_le_bytes());
            }
        }
        g
    }

    /// The guest runs for a while: writes `n` random pages (one in eight of them back to zeroes).
    fn run(&mut self, n: usize, epoch: u64) {
        let pages = self.dirty.len();
        for _ in 0..n {
            let r = self.rng.next();
            let i = (r as usize) % pages;
            let page = &mut self.ram[i * PAGE..][..PAGE];
            if r >> 61 == 0 {
                page.fill(0);
            } else {
                page.fill((r >> 32) as u8);
                page[..8].copy_from_slice(&epoch.to_le_bytes());
            }
            self.dirty[i] = true;
        }
    }

    /// Reads and clears the dirty log; returns the dirty pages as runs (see [`runs`]).
    fn take_dirty(&mut self) -> Vec<(u64, &[u8])> {
        let dirty: Vec<usize> = self
            .dirty
            .iter_mut()
            .enumerate()
            .filter_map(|(i, d)| std::mem::take(d).then_some(i))
            .collect();
        runs(&self.ram, dirty)
    }

    fn device_state(&self, epoch: u64) -> Vec<u8> {
        let mut s = vec![0u8; 64 << 10];
        for (i, b) in s.iter_mut().enumerate() {
            *b = (i as u64 ^ epoch) as u8;
        }
        s
    }
}

/// Whether a page is all zeroes (an OR over the page vectorises; an early-exit loop does not).
fn is_zero(page: &[u8]) -> bool {
    page.iter().fold(0u8, |acc, &b| acc | b) == 0
}

/// Turns page indices (ascending) into what `Channel::send_pages` takes: consecutive non-zero pages merged
/// into one run (one CRC update, one iovec), and an empty slice for each zero page.
fn runs(ram: &[u8], pages: impl IntoIterator<Item = usize>) -> Vec<(u64, &[u8])> {
    let slice = |first: usize, n: usize| ((first * PAGE) as u64, &ram[first * PAGE..(first + n) * PAGE]);
    let mut out = Vec::new();
    let mut open: Option<(usize, usize)> = None; // (first page, count) of the run being built
    for i in pages {
        if is_zero(&ram[i * PAGE..][..PAGE]) {
            if let Some((first, n)) = open.take() {
                out.push(slice(first, n));
            }
            out.push(((i * PAGE) as u64, &[][..]));
            continue;
        }
        open = match open {
            Some((first, n)) if first + n == i => Some((first, n + 1)),
            Some((first, n)) => {
                out.push(slice(first, n));
                Some((i, 1))
            }
            None => Some((i, 1)),
        };
    }
    if let Some((first, n)) = open {
        out.push(slice(first, n));
    }
    out
}

/// (pages, zero pages, bytes of data) of a run list.
fn stats(list: &[(u64, &[u8])]) -> (usize, usize, usize) {
    let zero = list.iter().filter(|p| p.1.is_empty()).count();
    let data: usize = list.iter().map(|p| p.1.len()).sum();
    (zero + data / PAGE, zero, data)
}

fn primary(stream: TcpStream, mem: usize, checkpoints: u64, dirty_per_epoch: usize) -> Res<u32> {
    let mut ch = Channel::from_tcp(stream)?;
    let local = LocalConfig::new(1, Role::Primary, PAGE as u32, layout(mem));
    let n = ch.handshake_connect(&local)?;
    println!(
        "[P] handshake: protocol v{}, capabilities {:#x}, peer node {} ({:?})",
        n.version, n.capabilities, n.peer_node_id, n.peer_role
    );
    let mut guest = Guest::new(mem);

    // Live migration: pre-copy the whole guest while it keeps running.
    let all = runs(&guest.ram, 0..mem / PAGE);
    let t = Instant::now();
    let (pages, zero, data) = stats(&all);
    ch.send_pages(PagePhase::Precopy, 0, PAGE as u32, &all)?;
    let d = t.elapsed();
    println!(
        "[P] pre-copy: {pages} pages ({zero} zero) in {} entries, {:.0} MiB of data in {:.1} ms = {:.2} GB/s",
        all.len(),
        mib(data),
        d.as_secs_f64() * 1e3,
        gbps(data, d)
    );
    drop(all);

    let mut sess = PrimarySession::new(SessionConfig::default(), Instant::now());
    let mut line = String::new();
    let mut released_after = Duration::ZERO;
    let mut pause_started = Instant::now();
    let mut total_pause = Duration::ZERO;
    loop {
        while let Some(action) = sess.poll_action() {
            match action {
                PrimaryAction::Send(m) => ch.send(&m)?,
                PrimaryAction::PauseGuest => pause_started = Instant::now(),
                PrimaryAction::SendRam { epoch } => {
                    let dirty = guest.take_dirty();
                    let t = Instant::now();
                    let (pages, zero, ram_bytes) = stats(&dirty);
                    ch.send_pages(PagePhase::Checkpoint, epoch, PAGE as u32, &dirty)?;
                    let ram_time = t.elapsed();
                    line = format!(
                        "[P] checkpoint {epoch}: {pages} dirty pages ({zero} zero), {:.1} MiB in {:.2} ms = {:.2} GB/s",
                        mib(ram_bytes),
                        ram_time.as_secs_f64() * 1e3,
                        gbps(ram_bytes, ram_time)
                    );
                    sess.ram_sent(Instant::now())?;
                }
                PrimaryAction::SendDeviceState { epoch } => {
                    let cpu = guest.device_state(epoch);
                    ch.send_vmstate(epoch, &[(0, &cpu), (1, b"serial: 115200 8N1")], 16 << 10)?;
                    sess.device_state_sent(Instant::now())?;
                }
                PrimaryAction::ReleaseOutput { .. } => released_after = pause_started.elapsed(),
                PrimaryAction::ResumeGuest => {}
                PrimaryAction::CheckpointDone { epoch, paused } => {
                    if epoch > 1 {
                        total_pause += paused;
                    } else {
                        line.push_str(" (completes the migration)");
                    }
                    println!(
                        "{line}; output released after {:.2} ms, guest paused {:.2} ms",
                        released_after.as_secs_f64() * 1e3,
                        paused.as_secs_f64() * 1e3
                    );
                    let _ = epoch;
                }
                PrimaryAction::PeerClosed(r) => return Err(format!("secondary left: {r:?}").into()),
                PrimaryAction::Failed(e) => return Err(e.into()),
            }
        }
        if sess.committed_epoch() == checkpoints && sess.is_idle() {
            break;
        }
        if sess.is_idle() {
            // The guest runs between checkpoints, then the periodic timer fires.
            guest.run(dirty_per_epoch, sess.committed_epoch() + 1);
            sess.start_checkpoint(Instant::now())?;
            continue;
        }
        let msg = ch.recv()?;
        sess.handle_message(Instant::now(), msg)?;
    }
    sess.close(Instant::now())?;
    while let Some(a) = sess.poll_action() {
        if let PrimaryAction::Send(m) = a {
            ch.send(&m)?;
        }
    }
    println!(
        "[P] {checkpoints} checkpoints committed; mean pause after the first: {:.2} ms",
        total_pause.as_secs_f64() * 1e3 / checkpoints.saturating_sub(1).max(1) as f64
    );
    Ok(crc32fast::hash(&guest.ram))
}

fn secondary(listener: TcpListener, mem: usize) -> Res<u32> {
    // The secondary's guest memory and its RAM cache, filled with a pattern (so the memory is really there
    // before the primary connects, and so that a page the primary never sent shows up as a mismatch).
    let mut ram = vec![0xa5u8; mem];
    let mut cache = vec![0xa5u8; mem];
    let (stream, peer) = listener.accept()?;
    let mut ch = Channel::from_tcp(stream)?;
    let local = LocalConfig::new(2, Role::Secondary, PAGE as u32, layout(mem));
    ch.handshake_accept(&local)?;
    println!("[S] accepted primary {peer}");
    // Which pages of the cache were received since the last flush.
    let mut cached = vec![false; mem / PAGE];
    let mut device_state = Vec::new();
    let mut sess = SecondarySession::new(SessionConfig::default(), Instant::now());
    loop {
        while let Some(action) = sess.poll_action() {
            match action {
                SecondaryAction::Send(m) => ch.send(&m)?,
                SecondaryAction::PauseGuest | SecondaryAction::ResumeGuest => {}
                SecondaryAction::StoreRam(batch) => {
                    for p in batch.pages {
                        let i = p.gpa as usize / PAGE;
                        let slot = cache
                            .get_mut(i * PAGE..(i + 1) * PAGE)
                            .ok_or("page outside guest memory")?;
                        if p.is_zero() {
                            slot.fill(0);
                        } else {
                            slot.copy_from_slice(&p.data);
                        }
                        cached[i] = true;
                    }
                }
                SecondaryAction::StoreDeviceState(chunk) => device_state.extend_from_slice(&chunk.data),
                SecondaryAction::FlushRamCache { epoch } => {
                    let mut n = 0;
                    for (i, c) in cached.iter_mut().enumerate() {
                        if std::mem::take(c) {
                            ram[i * PAGE..][..PAGE].copy_from_slice(&cache[i * PAGE..][..PAGE]);
                            n += 1;
                        }
                    }
                    println!("[S] checkpoint {epoch}: flushed {n} pages from the RAM cache");
                }
                SecondaryAction::LoadDeviceState { epoch } => {
                    let expected = 64 * 1024 + b"serial: 115200 8N1".len();
                    if device_state.len() != expected {
                        return Err(
                            format!("epoch {epoch}: {} bytes of device state", device_state.len()).into(),
                        );
                    }
                    device_state.clear();
                }
                SecondaryAction::CommitBlockCheckpoint { .. } => {}
                SecondaryAction::CheckpointDone { .. } => {}
                SecondaryAction::PeerClosed(reason) => {
                    println!("[S] primary closed the session ({reason:?})");
                    return Ok(crc32fast::hash(&ram));
                }
                SecondaryAction::Failed(e) => return Err(e.into()),
            }
        }
        if sess.state_name() == "loading the checkpoint" {
            sess.checkpoint_loaded(Instant::now())?;
            continue;
        }
        let msg = ch.recv()?;
        sess.handle_message(Instant::now(), msg)?;
    }
}

fn arg(name: &str, default: usize) -> Res<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args.get(i + 1).ok_or(format!("{name} needs a value"))?.parse()?),
        None => Ok(default),
    }
}

fn main() -> Res<()> {
    let mem = arg("--mib", 256)? << 20;
    let checkpoints = arg("--checkpoints", 5)? as u64;
    let dirty = arg("--dirty-pages", 4000)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    println!(
        "colo-proto demo: primary and secondary over {addr}, {} MiB guest, {checkpoints} checkpoints",
        mem >> 20
    );
    let t = Instant::now();
    let s = thread::Builder::new()
        .name("secondary".into())
        .spawn(move || secondary(listener, mem))?;
    let p = primary(TcpStream::connect(addr)?, mem, checkpoints, dirty);
    let s = s.join().map_err(|_| "secondary thread panicked")?;
    let (p, s) = (p?, s?);
    if p != s {
        return Err(format!("secondary RAM (crc32 {s:#010x}) differs from primary RAM ({p:#010x})").into());
    }
    println!(
        "secondary RAM equals primary RAM (crc32 {p:#010x}); done in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
