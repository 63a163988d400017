//! Deterministic simulation of a COLO pair: two in-process fake guests (vm-memory RAM, a colo-block disk,
//! UDP frames), the drivers of this crate, an in-memory channel carrying real colo-proto frames, a client
//! with its own model of the guest's key-value store, and a switch. Virtual time, seeded divergence.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use colo_block::{
    BlockBackend, CompletionMode, InitialSync, MemBackend, MemStore, PrimaryConfig, PrimaryDisk,
    SecondaryDisk, WriteId, WriteStatus,
};
use colo_failover::{Arbiter, ArbiterError, Decision, FenceGate, FenceToken, Grant, NoArbiter};
use colo_net::build::{Endpoint, TcpSpec, tcp, udp};
use colo_net::packet::tcp_flags;
use colo_pair::{
    DeviceState, Output, PairConfig, Phase, PrimaryPair, Release, SecondaryPair, SharedPrimaryDisk,
    SharedSecondaryDisk, Vm, VmError,
};
use colo_proto::{BlockWrite, Channel, Message, PROTOCOL_VERSION, PagePhase};
use colo_ram::AtomicBitmapLog;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryMmap};

const RAM: usize = 1 << 20;
const DISK: u64 = 1 << 20;
const KEYS: u8 = 64;
const PAGE: u64 = 4096;
const NOISE_EVERY: u64 = 37;
const GUEST: Endpoint = Endpoint {
    mac: [2, 0, 0, 0, 0, 2],
    ip: [10, 0, 0, 2],
    port: 7,
};
const CLIENT: Endpoint = Endpoint {
    mac: [2, 0, 0, 0, 0, 1],
    ip: [10, 0, 0, 1],
    port: 40000,
};
const PAYLOAD_AT: usize = 14 + 20 + 8;
const TCP_PORT: u16 = 80;
const CLIENT_ISN: u32 = 0xfff0_0000;

// ---------- an in-memory byte pipe (both directions), closable from either side ----------

#[derive(Default)]
struct PipeState {
    data: [VecDeque<u8>; 2],
    closed: [bool; 2],
}

#[derive(Clone)]
struct End {
    state: Arc<Mutex<PipeState>>,
    side: usize,
}

fn pipe() -> (End, End) {
    let state = Arc::new(Mutex::new(PipeState::default()));
    (
        End {
            state: state.clone(),
            side: 0,
        },
        End { state, side: 1 },
    )
}

impl End {
    fn lock(&self) -> MutexGuard<'_, PipeState> {
        self.state.lock().unwrap()
    }
    fn available(&self) -> usize {
        self.lock().data[1 - self.side].len()
    }
    fn peer_closed(&self) -> bool {
        self.lock().closed[1 - self.side]
    }
    fn close(&self) {
        self.lock().closed[self.side] = true;
    }
    /// Loses whatever is in flight to this end.
    fn discard_incoming(&self) {
        self.lock().data[1 - self.side].clear();
    }

    /// Flips one byte in flight to the peer (`at` counts from the oldest byte not yet read).
    fn flip_outgoing(&self, at: usize) {
        let mut s = self.lock();
        s.data[self.side][at] ^= 0xff;
    }

    /// Bytes in flight to the peer.
    fn outgoing(&self) -> Vec<u8> {
        self.lock().data[self.side].iter().copied().collect()
    }

    /// A crash in the middle of a write: the peer gets only the first half of what is in flight to it.
    fn tear_outgoing(&self) {
        let mut s = self.lock();
        let q = &mut s.data[self.side];
        let keep = q.len() / 2;
        q.truncate(keep);
    }
}

impl Read for End {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.lock();
        let q = &mut s.data[1 - self.side];
        if q.is_empty() {
            return if s.closed[1 - self.side] {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(q.len());
        for (d, b) in buf.iter_mut().zip(q.drain(..n)) {
            *d = b;
        }
        Ok(n)
    }
}

impl Write for End {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.lock();
        if s.closed[1 - self.side] || s.closed[self.side] {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        s.data[self.side].extend(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn channel(end: &End) -> Channel<End> {
    let mut ch = Channel::new(end.clone());
    ch.set_version(PROTOCOL_VERSION);
    // Small page frames, so that a torn checkpoint leaves whole page frames in the secondary's RAM cache.
    ch.set_batch_pages(4);
    ch
}

// ---------- the fake guest: a key-value service whose whole state lives in RAM and on disk ----------

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

enum Port {
    Primary(SharedPrimaryDisk<MemBackend>),
    Secondary(SharedSecondaryDisk<MemBackend, MemStore, MemStore>),
}

/// Registers (device state): everything else is in guest RAM.
#[derive(Debug, Clone, Default, PartialEq)]
struct Regs {
    steps: u64,
    rx: VecDeque<Vec<u8>>,
}

impl Regs {
    fn encode(&self) -> Vec<u8> {
        let mut v = self.steps.to_le_bytes().to_vec();
        v.extend((self.rx.len() as u32).to_le_bytes());
        for f in &self.rx {
            v.extend((f.len() as u32).to_le_bytes());
            v.extend(f);
        }
        v
    }
    fn decode(b: &[u8]) -> Result<Regs, VmError> {
        let take = |b: &mut &[u8], n: usize| -> Result<Vec<u8>, VmError> {
            if b.len() < n {
                return Err("short device state".into());
            }
            let (h, t) = b.split_at(n);
            *b = t;
            Ok(h.to_vec())
        };
        let mut b = b;
        let steps = u64::from_le_bytes(take(&mut b, 8)?.try_into().map_err(|_| "steps")?);
        let n = u32::from_le_bytes(take(&mut b, 4)?.try_into().map_err(|_| "count")?);
        let mut rx = VecDeque::new();
        for _ in 0..n {
            let len = u32::from_le_bytes(take(&mut b, 4)?.try_into().map_err(|_| "len")?);
            rx.push_back(take(&mut b, len as usize)?);
        }
        if !b.is_empty() {
            return Err("trailing device state".into());
        }
        Ok(Regs { steps, rx })
    }
}

struct FakeVm {
    mem: GuestMemoryMmap<AtomicBitmap>,
    regs: Regs,
    running: bool,
    /// Host-side nondeterminism (a clock the guest reads): seeded differently per side, not guest state.
    entropy: XorShift,
    disk: Port,
    tx: Vec<Bytes>,
    shutdown: bool,
    noise: bool,
    /// Disk writes waiting for the secondary's ack (Sync completion mode): the guest's output waits for
    /// them, as a service answers only once its write is durable.
    awaiting: Vec<WriteId>,
    /// Output held behind `awaiting`.
    held_tx: Vec<Bytes>,
    /// Writes that had to wait for an ack.
    waited: u64,
    /// The first write that had to wait for an ack since the current secondary was attached: its id is the
    /// one the secondary numbers 0.
    first_awaiting: Option<WriteId>,
    /// Host timing: the guest opens its TCP connection to the client at this step (the SVM's vCPU may
    /// reach that point later than the PVM's).
    connect_at: Option<u64>,
    /// `check_state` refuses the peer's device state (a corrupt blob) and records the RAM it saw.
    refuse_state: bool,
    /// Refusals so far.
    refusals: Mutex<u64>,
    /// With `refuse_state`: RAM when the guest was paused next (for the checkpoint).
    at_pause: Option<Vec<u8>>,
    /// Device state loads so far.
    loads: u64,
}

impl FakeVm {
    fn new(seed: u64, disk: Port) -> Self {
        FakeVm {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap(),
            regs: Regs::default(),
            running: false,
            entropy: XorShift(seed | 1),
            disk,
            tx: Vec::new(),
            shutdown: false,
            noise: true,
            awaiting: Vec::new(),
            held_tx: Vec::new(),
            waited: 0,
            first_awaiting: None,
            connect_at: None,
            refuse_state: false,
            refusals: Mutex::new(0),
            at_pause: None,
            loads: 0,
        }
    }

    /// A guest-opened connection: SYN when the guest gets there, again every 300 steps until answered.
    /// The state shares page 80 with the server side (3: SYN sent, 2: established).
    fn connect(&mut self) {
        let base = 80 * PAGE;
        let steps = self.regs.steps;
        if self.connect_at.is_none_or(|at| steps < at) {
            return;
        }
        match self.read_u64(base) {
            0 => {
                let isn = self.entropy.next() as u32;
                self.write_u64(base, 3);
                self.write_u64(base + 8, isn as u64);
                self.write_u64(base + 16, isn.wrapping_add(1) as u64);
                self.write_u64(base + 40, steps);
                self.tcp_out(isn, 0, tcp_flags::SYN, &[]);
            }
            3 if steps >= self.read_u64(base + 40) + 300 => {
                self.write_u64(base + 40, steps);
                let isn = self.read_u64(base + 8) as u32;
                self.tcp_out(isn, 0, tcp_flags::SYN, &[]);
            }
            _ => {}
        }
    }

    /// Output leaves in order, after every write it may depend on completed.
    fn send(&mut self, frame: Bytes) {
        if self.awaiting.is_empty() && self.held_tx.is_empty() {
            self.tx.push(frame);
        } else {
            self.held_tx.push(frame);
        }
    }

    /// Sync completion mode: these writes completed.
    fn complete(&mut self, ids: &[WriteId]) {
        self.awaiting.retain(|id| !ids.contains(id));
        if self.awaiting.is_empty() {
            self.tx.append(&mut self.held_tx);
        }
    }

    fn read_u64(&self, gpa: u64) -> u64 {
        self.mem.read_obj(GuestAddress(gpa)).unwrap()
    }

    fn write_u64(&self, gpa: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(gpa)).unwrap();
    }

    /// Writes a block; `false`: the disk refused it for now (the epoch or overlay is full), retry later.
    fn disk_write(&mut self, offset: u64, fill: u64) -> bool {
        let mut block = vec![0u8; PAGE as usize];
        for c in block.chunks_mut(8) {
            c.copy_from_slice(&fill.to_le_bytes());
        }
        let r = match &self.disk {
            Port::Primary(d) => d.write(offset, Bytes::from(block)).map(|status| {
                if let WriteStatus::AwaitingAck(id) = status {
                    self.first_awaiting.get_or_insert(id);
                    self.awaiting.push(id);
                    self.waited += 1;
                }
            }),
            Port::Secondary(d) => d.write(offset, &block),
        };
        match r {
            Ok(()) => true,
            Err(colo_block::Error::EpochFull { .. } | colo_block::Error::OverlayFull { .. }) => false,
            Err(e) => panic!("guest disk write: {e}"),
        }
    }

    fn emit(&mut self, port: u16, payload: &[u8]) {
        let mut src = GUEST;
        src.port = port;
        // The IP id comes from the step counter: the two guests choose different ones.
        let frame = Bytes::from(udp(src, CLIENT, self.regs.steps as u16, payload));
        self.send(frame);
    }

    /// Runs one step of the guest, if it runs.
    fn step(&mut self) {
        if !self.running || self.shutdown {
            return;
        }
        self.regs.steps += 1;
        let steps = self.regs.steps;
        // Background work: a scratch page per step (the SVM's own dirty pages, rolled back at checkpoints).
        self.write_u64((128 + steps % 64) * PAGE, steps);
        if self.noise && steps.is_multiple_of(NOISE_EVERY) {
            // Reads the clock: PVM and SVM see different values, write them and send them out.
            let noise = self.entropy.next();
            if self.disk_write(200 * PAGE, noise) {
                self.write_u64(250 * PAGE, noise);
                self.emit(9, &noise.to_le_bytes());
            }
        }
        self.connect();
        if let Some(frame) = self.regs.rx.pop_front() {
            self.serve(&frame);
        }
    }

    fn serve(&mut self, frame: &[u8]) {
        if frame.get(23) == Some(&6) {
            return self.serve_tcp(frame);
        }
        let Some(p) = frame.get(PAYLOAD_AT..PAYLOAD_AT + 18) else {
            return;
        };
        match self.kv(p) {
            Kv::Answer(resp) => self.emit(7, &resp),
            Kv::Retry => self.regs.rx.push_front(frame.to_vec()),
            Kv::Ignore => {}
        }
    }

    /// The key-value service: one 18-byte request in, a 17-byte answer out.
    fn kv(&mut self, p: &[u8]) -> Kv {
        let seq = u64::from_le_bytes(p[0..8].try_into().unwrap());
        let (op, key) = (p[8], p[9] % KEYS);
        let value = u64::from_le_bytes(p[10..18].try_into().unwrap());
        let last = self.read_u64(0);
        if seq < last {
            return Kv::Ignore;
        }
        if seq == last {
            // A retransmission: answer again with the stored response.
            return Kv::Answer(self.last_response());
        }
        let v = match op {
            1 => {
                if !self.disk_write(PAGE * key as u64, value) {
                    // The device holds the request; the guest retries it at its next step.
                    return Kv::Retry;
                }
                self.write_u64(PAGE * (1 + key as u64), value);
                value
            }
            2 => {
                self.shutdown = true;
                0
            }
            _ => self.read_u64(PAGE * (1 + key as u64)),
        };
        let mut resp = [0u8; 17];
        resp[0..8].copy_from_slice(&seq.to_le_bytes());
        resp[8] = key;
        resp[9..17].copy_from_slice(&v.to_le_bytes());
        self.write_u64(0, seq);
        self.mem.write_slice(&resp, GuestAddress(64)).unwrap();
        Kv::Answer(resp)
    }

    fn last_response(&self) -> [u8; 17] {
        let mut resp = [0u8; 17];
        self.mem.read_slice(&mut resp, GuestAddress(64)).unwrap();
        resp
    }

    fn tcp_out(&mut self, seq: u32, ack: u32, flags: u8, payload: &[u8]) {
        let mut src = GUEST;
        src.port = TCP_PORT;
        let mut spec = TcpSpec::data(src, CLIENT, seq, ack, payload);
        spec.flags = flags;
        spec.ip_id = self.regs.steps as u16;
        self.send(Bytes::from(tcp(&spec)));
    }

    /// A minimal TCP server for one client connection; its state lives in guest RAM (page 80). The ISN
    /// comes from the host clock, so the PVM and the SVM choose different ones.
    fn serve_tcp(&mut self, frame: &[u8]) {
        if frame.len() < 54 || u16::from_be_bytes([frame[36], frame[37]]) != TCP_PORT {
            return;
        }
        let seq = u32::from_be_bytes(frame[38..42].try_into().unwrap());
        let ack = u32::from_be_bytes(frame[42..46].try_into().unwrap());
        let doff = usize::from(frame[46] >> 4) * 4;
        let flags = frame[47];
        let payload = frame.get(34 + doff..).unwrap_or(&[]);
        let base = 80 * PAGE;
        let (mut state, isn, mut snd_nxt, mut rcv_nxt) = (
            self.read_u64(base),
            self.read_u64(base + 8) as u32,
            self.read_u64(base + 16) as u32,
            self.read_u64(base + 24) as u32,
        );
        let last_seq = self.read_u64(base + 32) as u32;
        if flags & tcp_flags::SYN != 0 && flags & tcp_flags::ACK != 0 {
            // The client's answer to the guest's own SYN.
            if state == 3 && ack == isn.wrapping_add(1) {
                self.write_u64(base, 2);
                self.write_u64(base + 24, seq.wrapping_add(1) as u64);
            }
            if state >= 2 {
                let rcv = self.read_u64(base + 24) as u32;
                self.tcp_out(snd_nxt, rcv, tcp_flags::ACK, &[]);
            }
            return;
        }
        if flags & tcp_flags::SYN != 0 {
            let isn = if state == 0 {
                let isn = self.entropy.next() as u32;
                self.write_u64(base, 1);
                self.write_u64(base + 8, isn as u64);
                self.write_u64(base + 16, isn.wrapping_add(1) as u64);
                self.write_u64(base + 24, seq.wrapping_add(1) as u64);
                isn
            } else {
                isn
            };
            let rcv = self.read_u64(base + 24) as u32;
            self.tcp_out(isn, rcv, tcp_flags::SYN | tcp_flags::ACK, &[]);
            return;
        }
        if state == 1 && flags & tcp_flags::ACK != 0 && ack == isn.wrapping_add(1) {
            state = 2;
            self.write_u64(base, 2);
        }
        if state != 2 || payload.len() < 18 {
            return;
        }
        if seq == rcv_nxt {
            match self.kv(&payload[..18]) {
                Kv::Retry => self.regs.rx.push_front(frame.to_vec()),
                Kv::Ignore => {}
                Kv::Answer(resp) => {
                    rcv_nxt = rcv_nxt.wrapping_add(18);
                    self.tcp_out(snd_nxt, rcv_nxt, tcp_flags::ACK | tcp_flags::PSH, &resp);
                    self.write_u64(base + 32, snd_nxt as u64);
                    snd_nxt = snd_nxt.wrapping_add(17);
                    self.write_u64(base + 16, snd_nxt as u64);
                    self.write_u64(base + 24, rcv_nxt as u64);
                }
            }
        } else if colo_net::tcp::seq_lt(seq, rcv_nxt) && snd_nxt != isn.wrapping_add(1) {
            // The client retransmits a request whose answer it lost: send the answer again.
            let resp = self.last_response();
            self.tcp_out(last_seq, rcv_nxt, tcp_flags::ACK | tcp_flags::PSH, &resp);
        }
    }

    fn store(&self) -> Vec<u64> {
        (0..KEYS).map(|k| self.read_u64(PAGE * (1 + k as u64))).collect()
    }

    fn ram(&self) -> Vec<u8> {
        let mut v = vec![0u8; RAM];
        self.mem.read_slice(&mut v, GuestAddress(0)).unwrap();
        v
    }
}

impl Vm for FakeVm {
    type Memory = GuestMemoryMmap<AtomicBitmap>;
    fn memory(&self) -> &Self::Memory {
        &self.mem
    }
    fn pause(&mut self) -> Result<(), VmError> {
        if self.refuse_state && self.at_pause.is_none() {
            self.at_pause = Some(self.ram());
        }
        self.running = false;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.running = true;
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<DeviceState>, VmError> {
        Ok(vec![DeviceState {
            id: 0,
            data: self.regs.encode(),
        }])
    }
    fn load_state(&mut self, state: &[DeviceState]) -> Result<(), VmError> {
        match state {
            [DeviceState { id: 0, data }] => {
                self.regs = Regs::decode(data)?;
                self.loads += 1;
                Ok(())
            }
            _ => Err(format!("expected one device, got {}", state.len()).into()),
        }
    }
    fn check_state(&self, state: &[DeviceState]) -> Result<(), VmError> {
        if self.refuse_state {
            *self.refusals.lock().unwrap() += 1;
            return Err("device 0: corrupt blob".into());
        }
        match state {
            [DeviceState { id: 0, data }] => Regs::decode(data).map(|_| ()),
            _ => Err(format!("expected one device, got {}", state.len()).into()),
        }
    }
}

enum Kv {
    Answer([u8; 17]),
    Retry,
    Ignore,
}

// ---------- the client: one request at a time, retransmits, checks every answer ----------

struct Pending {
    tcp_seq: u32,
    seq: u64,
    op: u8,
    key: u8,
    value: u64,
    sent: u64,
    first_sent: u64,
}

struct Client {
    model: HashMap<u8, u64>,
    next_seq: u64,
    pending: Option<Pending>,
    rng: XorShift,
    answered: u64,
    answered_after_failover: u64,
    retransmits: u64,
    gate: FenceGate,
    ticks_seen: u64,
    shutdown_requested: bool,
    /// Speak TCP (one connection for the whole run) instead of UDP.
    tcp: Option<TcpClient>,
}

/// The client's end of its one TCP connection to the guest.
struct TcpClient {
    established: bool,
    syn_sent: Option<u64>,
    /// Next sequence number of the client's stream.
    nxt: u32,
    /// Next byte expected from the guest (in the PVM's sequence space, whoever answers).
    rcv: u32,
    /// Pure ACKs to send.
    out: Vec<Bytes>,
    /// Guest segments beyond what was expected (a wrong sequence translation would show here).
    out_of_window: u64,
    /// The guest opens the connection; the client answers its SYN.
    guest_opens: bool,
}

impl TcpClient {
    fn new() -> Self {
        TcpClient {
            established: false,
            syn_sent: None,
            nxt: CLIENT_ISN.wrapping_add(1),
            rcv: 0,
            out: Vec::new(),
            out_of_window: 0,
            guest_opens: false,
        }
    }

    fn segment(&self, seq: u32, flags: u8, payload: &[u8]) -> Bytes {
        let mut dst = GUEST;
        dst.port = TCP_PORT;
        let mut spec = TcpSpec::data(CLIENT, dst, seq, self.rcv, payload);
        spec.flags = flags;
        Bytes::from(tcp(&spec))
    }

    /// A segment from the guest: the in-order payload, if any.
    fn receive(&mut self, frame: &[u8]) -> Option<Vec<u8>> {
        let seq = u32::from_be_bytes(frame[38..42].try_into().unwrap());
        let flags = frame[47];
        let doff = usize::from(frame[46] >> 4) * 4;
        let payload = &frame[34 + doff..];
        if flags & tcp_flags::SYN != 0 {
            if !self.established {
                self.rcv = seq.wrapping_add(1);
                self.established = true;
            }
            let answer = if self.guest_opens {
                self.segment(CLIENT_ISN, tcp_flags::SYN | tcp_flags::ACK, &[])
            } else {
                self.segment(self.nxt, tcp_flags::ACK, &[])
            };
            self.out.push(answer);
            return None;
        }
        if payload.is_empty() {
            return None;
        }
        if seq == self.rcv {
            self.rcv = self.rcv.wrapping_add(payload.len() as u32);
            let ack = self.segment(self.nxt, tcp_flags::ACK, &[]);
            self.out.push(ack);
            return Some(payload.to_vec());
        }
        if colo_net::tcp::seq_lt(seq, self.rcv) {
            let ack = self.segment(self.nxt, tcp_flags::ACK, &[]);
            self.out.push(ack);
        } else {
            self.out_of_window += 1;
        }
        None
    }
}

impl Client {
    fn new(seed: u64) -> Self {
        Client {
            model: HashMap::new(),
            next_seq: 1,
            pending: None,
            rng: XorShift(0x1234_5678_9abc_def1 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            answered: 0,
            answered_after_failover: 0,
            retransmits: 0,
            gate: FenceGate::new(),
            ticks_seen: 0,
            shutdown_requested: false,
            tcp: None,
        }
    }

    fn frame(&self, p: &Pending) -> Bytes {
        let mut payload = p.seq.to_le_bytes().to_vec();
        payload.push(p.op);
        payload.push(p.key);
        payload.extend(p.value.to_le_bytes());
        match &self.tcp {
            Some(c) => c.segment(p.tcp_seq, tcp_flags::ACK | tcp_flags::PSH, &payload),
            None => Bytes::from(udp(CLIENT, GUEST, 1, &payload)),
        }
    }

    /// What the client sends at `t` (ms), if anything.
    fn tick(&mut self, t: u64, quiet: bool) -> Option<Bytes> {
        if let Some(c) = &mut self.tcp
            && !c.established
        {
            if c.guest_opens {
                return None;
            }
            // Connect (and retry the SYN) first.
            if t >= 50 && c.syn_sent.is_none_or(|at| t >= at + 300) {
                c.syn_sent = Some(t);
                return Some(c.segment(CLIENT_ISN, tcp_flags::SYN, &[]));
            }
            return None;
        }
        if let Some(p) = &mut self.pending
            && t >= p.sent + 300
        {
            p.sent = t;
            self.retransmits += 1;
            let p = self.pending.as_ref()?;
            return Some(self.frame(p));
        }
        match &mut self.pending {
            Some(_) => None,
            None if quiet || !t.is_multiple_of(2) => None,
            None => {
                let r = self.rng.next();
                let shutdown = self.shutdown_requested;
                let p = Pending {
                    seq: self.next_seq,
                    op: if shutdown { 2 } else { !r.is_multiple_of(3) as u8 },
                    key: ((r >> 8) % KEYS as u64) as u8,
                    value: r >> 16,
                    sent: t,
                    first_sent: t,
                    tcp_seq: self.tcp.as_ref().map_or(0, |c| c.nxt),
                };
                if let Some(c) = &mut self.tcp {
                    c.nxt = c.nxt.wrapping_add(18);
                }
                self.next_seq += 1;
                let f = self.frame(&p);
                self.pending = Some(p);
                Some(f)
            }
        }
    }

    fn receive(&mut self, frame: &[u8], failed_over: bool) {
        let port = u16::from_be_bytes([frame[34], frame[35]]);
        if port == 9 {
            self.ticks_seen += 1;
            return;
        }
        let payload = if let Some(c) = &mut self.tcp {
            assert_eq!(port, TCP_PORT, "frame from an unknown port");
            match c.receive(frame) {
                Some(p) => p,
                None => return,
            }
        } else {
            assert_eq!(port, 7, "frame from an unknown port");
            frame[PAYLOAD_AT..].to_vec()
        };
        let seq = u64::from_le_bytes(payload[0..8].try_into().unwrap());
        let key = payload[8];
        let v = u64::from_le_bytes(payload[9..17].try_into().unwrap());
        let Some(p) = &self.pending else { return };
        if seq != p.seq {
            assert!(seq < p.seq, "answer to a request never sent: {seq}");
            return; // a late duplicate
        }
        assert_eq!(key, p.key, "answer for the wrong key");
        match p.op {
            1 => {
                assert_eq!(v, p.value, "SET acknowledged with another value");
                self.model.insert(key, v);
            }
            0 => assert_eq!(
                v,
                self.model.get(&key).copied().unwrap_or(0),
                "GET contradicts the client's model (seq {seq}, key {key})"
            ),
            _ => {}
        }
        let _ = p.first_sent;
        self.pending = None;
        self.answered += 1;
        if failed_over {
            self.answered_after_failover += 1;
        }
    }
}

// ---------- a simulated arbiter with witness/etcd semantics (one holder, growing tokens) ----------

#[derive(Default)]
struct ArbiterState {
    holder: Option<(&'static str, FenceToken)>,
    next: u64,
    /// Grants are leases of this many ms (etcd-like), counted on `clock`; `None`: held until released.
    ttl_ms: Option<u64>,
    /// The simulation's time (ms), set at every step.
    clock: u64,
    /// When the holder's lease runs out.
    expires: u64,
}

#[derive(Clone, Default)]
struct SimArbiter(Arc<Mutex<ArbiterState>>);

impl SimArbiter {
    fn client(&self, node: &'static str) -> SimArbiterClient {
        SimArbiterClient {
            shared: self.clone(),
            node,
        }
    }
}

struct SimArbiterClient {
    shared: SimArbiter,
    node: &'static str,
}

impl Arbiter for SimArbiterClient {
    fn acquire(&mut self) -> Result<Decision, ArbiterError> {
        let mut s = self.shared.0.lock().unwrap();
        if s.ttl_ms.is_some() && s.expires <= s.clock {
            // The holder's lease ran out (a dead node renews nothing).
            s.holder = None;
        }
        let ttl = s.ttl_ms.map(Duration::from_millis);
        let token = match s.holder {
            Some((n, token)) if n == self.node => token,
            Some((_, token)) => return Ok(Decision::Denied { holder: Some(token) }),
            None => {
                s.next += 1;
                let token = FenceToken(s.next);
                s.holder = Some((self.node, token));
                token
            }
        };
        s.expires = s.clock + s.ttl_ms.unwrap_or(0);
        Ok(Decision::Granted(Grant { token, ttl }))
    }
    fn renew(&mut self) -> Result<Decision, ArbiterError> {
        self.acquire()
    }
    fn release(&mut self) -> Result<(), ArbiterError> {
        let mut s = self.shared.0.lock().unwrap();
        if s.holder.is_some_and(|(n, _)| n == self.node) {
            s.holder = None;
        }
        Ok(())
    }
}

// ---------- the harness ----------

type Primary = PrimaryPair<FakeVm, MemBackend>;
type Secondary = SecondaryPair<FakeVm, MemBackend, MemStore, MemStore>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    /// The process dies: its socket closes.
    Crash,
    /// The machine freezes or the link is cut: nothing more from it, its socket stays open.
    Silent,
}

struct Sim {
    base: Instant,
    cfg: PairConfig,
    /// The arbiter both nodes ask, if shared (else each has its own `NoArbiter`).
    arbiter: Option<SimArbiter>,
    t: u64,
    primary: Option<Primary>,
    secondary: Option<Secondary>,
    p_end: End,
    s_end: End,
    p_rx: Channel<End>,
    s_rx: Channel<End>,
    p_link_down: bool,
    s_link_down: bool,
    client: Client,
    /// (port, payload) the SVM has sent, to check compared releases against.
    svm_sent: HashMap<(u16, Vec<u8>), usize>,
    /// Who gets the client's frames.
    client_to_secondary: bool,
    failed_over: bool,
    checked_checkpoints: u64,
    released: HashMap<&'static str, u64>,
    shutdown_seen: [bool; 2],
    /// Kill the primary mid-checkpoint once its session is in this state.
    tear_when: Option<&'static str>,
    /// Damage one byte of a checkpoint page on the wire once the primary's session is in this state.
    damage_ram_page_when: Option<&'static str>,
    /// Kill the secondary as soon as the comparator holds PVM output.
    kill_secondary_when_held: Option<Kill>,
    /// Kill the secondary once the primary's session is in this state.
    kill_secondary_in: Option<&'static str>,
    /// The link between the two is cut: bytes are lost in both directions, both nodes live on.
    partitioned: bool,
    promoted: bool,
    stopped: [bool; 2],
    /// Sync-mode writes completed (each checked against the secondary's applied writes).
    writes_completed: u64,
    /// When (ms) the secondary received a primary ISN.
    isn_notices: Vec<u64>,
    /// Block acks the primary received.
    acks_seen: u64,
}

/// Variations of the pair's disks.
#[derive(Default)]
struct Opts {
    /// The secondary's disk starts empty and the primary's holds data: an initial sync runs first.
    sync: bool,
    /// Capacity of the secondary's active overlay in blocks (default 256).
    active_blocks: Option<usize>,
}

fn config() -> PairConfig {
    let mut cfg = PairConfig {
        checkpoint_interval: Duration::from_millis(200),
        ..PairConfig::default()
    };
    cfg.compare.datagram_window = 1;
    cfg.flush.threads = 1;
    cfg
}

impl Sim {
    fn new(cfg: PairConfig) -> Sim {
        Self::with(cfg, 0, None)
    }

    /// A pair with guests and client seeded by `seed`; `arbiter`: both nodes ask this one (else each has
    /// its own `NoArbiter`).
    fn with(cfg: PairConfig, seed: u64, arbiter: Option<SimArbiter>) -> Sim {
        Self::with_disk(cfg, seed, arbiter, PrimaryConfig::default())
    }

    fn with_disk(cfg: PairConfig, seed: u64, arbiter: Option<SimArbiter>, disk: PrimaryConfig) -> Sim {
        Self::build(cfg, seed, arbiter, disk, Opts::default())
    }

    fn build(
        cfg: PairConfig,
        seed: u64,
        arbiter: Option<SimArbiter>,
        disk: PrimaryConfig,
        opts: Opts,
    ) -> Sim {
        let base = Instant::now();
        let (p_end, s_end) = pipe();
        let mut pbackend = MemBackend::new(DISK).unwrap();
        if opts.sync {
            // Data beyond the key blocks that only the primary's disk holds.
            for block in KEYS as u64..DISK / PAGE {
                pbackend
                    .write_at(block * PAGE, &[block as u8 ^ 0x5a; PAGE as usize])
                    .unwrap();
            }
        }
        let mut pdisk = PrimaryDisk::new(pbackend, disk);
        if opts.sync {
            pdisk.start_sync(InitialSync::new(DISK, PAGE).unwrap()).unwrap();
        }
        let pdisk = SharedPrimaryDisk::new(pdisk);
        let (hidden, active) = (
            MemStore::new(PAGE as usize, 256).unwrap(),
            MemStore::new(PAGE as usize, opts.active_blocks.unwrap_or(256)).unwrap(),
        );
        let sbackend = MemBackend::new(DISK).unwrap();
        let sdisk = SharedSecondaryDisk::new(if opts.sync {
            SecondaryDisk::new_syncing(sbackend, hidden, active).unwrap()
        } else {
            SecondaryDisk::new(sbackend, hidden, active, 0).unwrap()
        });
        let mut pvm = FakeVm::new(0x9e37_79b9 ^ seed, Port::Primary(pdisk.clone()));
        pvm.running = true;
        // The PVM booted before protection started: some RAM already written.
        for k in 0..KEYS as u64 {
            pvm.write_u64(PAGE * (100 + k % 8), k);
        }
        let svm = FakeVm::new(0x7f4a_7c15 ^ seed.rotate_left(17), Port::Secondary(sdisk.clone()));
        let (p_arb, s_arb): (Box<dyn Arbiter + Send>, Box<dyn Arbiter + Send>) = match &arbiter {
            Some(a) => (Box::new(a.client("primary")), Box::new(a.client("secondary"))),
            None => (
                Box::new(NoArbiter::unsafe_under_partitions()),
                Box::new(NoArbiter::unsafe_under_partitions()),
            ),
        };
        let plog = AtomicBitmapLog::new(&pvm.mem).unwrap();
        let slog = AtomicBitmapLog::new(&svm.mem).unwrap();
        let secondary = SecondaryPair::new(
            cfg.clone(),
            base,
            svm,
            Box::new(slog),
            sdisk,
            Box::new(channel(&s_end)),
            s_arb,
        )
        .unwrap();
        let primary = PrimaryPair::new(
            cfg.clone(),
            base,
            pvm,
            Box::new(plog),
            pdisk,
            Box::new(channel(&p_end)),
            p_arb,
        )
        .unwrap();
        Sim {
            base,
            cfg,
            arbiter,
            t: 0,
            primary: Some(primary),
            secondary: Some(secondary),
            p_rx: channel(&p_end),
            s_rx: channel(&s_end),
            p_end,
            s_end,
            p_link_down: false,
            s_link_down: false,
            client: Client::new(seed),
            svm_sent: HashMap::new(),
            client_to_secondary: false,
            failed_over: false,
            checked_checkpoints: 0,
            released: HashMap::new(),
            shutdown_seen: [false; 2],
            tear_when: None,
            damage_ram_page_when: None,
            kill_secondary_when_held: None,
            kill_secondary_in: None,
            partitioned: false,
            promoted: false,
            stopped: [false; 2],
            writes_completed: 0,
            isn_notices: Vec::new(),
            acks_seen: 0,
        }
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.t)
    }

    fn secondary_epoch(&self) -> Option<u64> {
        self.secondary.as_ref().map(|s| s.status().epoch)
    }

    fn release_to_client(&mut self, frame: Bytes, token: colo_failover::FenceToken, release: Release) {
        self.client
            .gate
            .check(token)
            .expect("released output carries a current fencing token");
        let key = port_payload(&frame);
        match release {
            Release::Compared if frame[23] == 6 => {
                // TCP: a retransmission is released on the strength of the bytes compared before.
                assert!(
                    self.svm_sent.contains_key(&key),
                    "a compared release the SVM never produced"
                );
                *self.released.entry("compared").or_default() += 1;
            }
            Release::Compared => {
                let n = self.svm_sent.get_mut(&key).filter(|n| **n > 0);
                *n.expect("a compared release the SVM never produced") -= 1;
                *self.released.entry("compared").or_default() += 1;
            }
            Release::Checkpoint { epoch } => {
                // The secondary holds (and has loaded) the checkpoint that produced this output, unless it
                // stopped: a secondary that refused the checkpoint after receiving it all (the primary
                // releases on `VmstateReceived`) never takes over, and the primary goes on alone.
                let live = self
                    .secondary
                    .as_ref()
                    .is_some_and(|s| s.phase() != Phase::Stopped);
                if let Some(e) = self.secondary_epoch().filter(|_| live) {
                    assert!(e >= epoch, "released at checkpoint {epoch}, secondary at {e}");
                }
                *self.released.entry("checkpoint").or_default() += 1;
            }
            Release::Failover => *self.released.entry("failover").or_default() += 1,
            Release::Alone => {
                assert!(
                    self.failed_over,
                    "output released alone while the pair was healthy"
                );
                *self.released.entry("alone").or_default() += 1;
            }
        }
        let failed_over = self.failed_over;
        self.client.receive(&frame, failed_over);
    }

    fn step(&mut self, quiet: bool) {
        self.t += 1;
        let now = self.now();
        if let Some(a) = &self.arbiter {
            a.0.lock().unwrap().clock = self.t;
        }
        // The client, through the switch.
        let mut frames: Vec<Bytes> = self.client.tick(self.t, quiet).into_iter().collect();
        if let Some(c) = &mut self.client.tcp {
            frames.append(&mut c.out);
        }
        for f in frames {
            if self.client_to_secondary {
                if let Some(s) = &mut self.secondary {
                    s.client_input(now, f).unwrap();
                }
            } else if let Some(p) = &mut self.primary {
                p.client_input(now, f).unwrap();
            }
        }
        self.step_primary(now);
        if let Some(when) = self.tear_when
            && self.primary.as_ref().is_some_and(|p| p.session_state() == when)
        {
            // The primary dies in the middle of writing the checkpoint: half of it reaches the secondary.
            self.p_end.tear_outgoing();
            self.kill_primary(Kill::Crash);
            self.tear_when = None;
        }
        if let Some(when) = self.damage_ram_page_when
            && self.primary.as_ref().is_some_and(|p| p.session_state() == when)
            && let Some(at) = first_page_byte(&self.p_end.outgoing(), colo_proto::Kind::RamPages)
        {
            // Damage in transit: the guest is paused, nothing wrote the page.
            self.p_end.flip_outgoing(at.0 + 7);
            self.damage_ram_page_when = None;
        }
        if let Some(when) = self.kill_secondary_in
            && self.primary.as_ref().is_some_and(|p| p.session_state() == when)
        {
            self.kill_secondary(Kill::Crash);
            self.kill_secondary_in = None;
        }
        if let Some(how) = self.kill_secondary_when_held
            && self.primary.is_some()
            && pvm_held(self) > 0
        {
            // The PVM's output waits for the SVM's, which will never come.
            self.kill_secondary(how);
            self.kill_secondary_when_held = None;
        }
        self.step_secondary(now);
        self.check_checkpoint();
    }

    fn step_primary(&mut self, now: Instant) {
        let Some(p) = &mut self.primary else { return };
        let done = p.disk().take_completed();
        if !done.is_empty() {
            if let Some(s) = &self.secondary
                && !self.failed_over
            {
                // Protocol C: a write completes only once the secondary has applied it. The secondary
                // numbers the writes it applies from 0; the primary's ids go on across secondaries.
                let base = p.vm().first_awaiting.map_or(0, |w| w.0);
                let applied = s.disk().lock().last_applied().map(|w| base + w.0);
                for id in &done {
                    assert!(
                        applied >= Some(id.0),
                        "{id:?} completed, secondary applied {applied:?}"
                    );
                }
            }
            self.writes_completed += done.len() as u64;
            p.vm_mut().complete(&done);
        }
        p.vm_mut().step();
        for f in std::mem::take(&mut p.vm_mut().tx) {
            p.guest_output(now, f).unwrap();
        }
        if p.vm().shutdown && !matches!(p.phase(), Phase::ShutDown) {
            p.guest_shutdown(now).unwrap();
        }
        if p.poll_timeout().is_some_and(|d| d <= now) {
            p.handle_timeout(now).unwrap();
        }
        if self.partitioned {
            self.p_end.discard_incoming();
        }
        while !self.p_link_down && self.p_end.available() > 0 {
            match self.p_rx.recv() {
                Ok(m) => {
                    self.acks_seen += matches!(m, Message::BlockAck { .. }) as u64;
                    p.handle_message(now, m).unwrap()
                }
                Err(e) => {
                    self.p_link_down = true;
                    p.channel_error(now, &e).unwrap();
                }
            }
        }
        if !self.p_link_down && self.p_end.peer_closed() && self.p_end.available() == 0 {
            self.p_link_down = true;
            p.link_failed(now, "secondary closed the channel").unwrap();
        }
        while let Some(o) = self.primary.as_mut().and_then(|p| p.poll_output()) {
            match o {
                Output::ToClient {
                    frame,
                    token,
                    release,
                } => self.release_to_client(frame, token, release),
                Output::ToGuest(f) => {
                    if let Some(p) = &mut self.primary {
                        p.vm_mut().regs.rx.push_back(f.to_vec());
                    }
                }
                Output::ContinuedAlone { .. } => self.failed_over = true,
                Output::GuestShutdown => self.shutdown_seen[0] = true,
                Output::StopGuest => self.stopped[0] = true,
                Output::Promoted { .. } => panic!("unexpected {o:?} on the primary"),
            }
        }
    }

    fn step_secondary(&mut self, now: Instant) {
        let Some(s) = &mut self.secondary else { return };
        s.vm_mut().step();
        for f in std::mem::take(&mut s.vm_mut().tx) {
            *self.svm_sent.entry(port_payload(&f)).or_default() += 1;
            s.guest_output(now, f).unwrap();
        }
        if s.poll_timeout().is_some_and(|d| d <= now) {
            s.handle_timeout(now).unwrap();
        }
        if self.partitioned {
            self.s_end.discard_incoming();
        }
        while !self.s_link_down && self.s_end.available() > 0 {
            match self.s_rx.recv() {
                Ok(m) => {
                    if matches!(m, Message::PrimaryIsn(_)) {
                        self.isn_notices.push(self.t);
                    }
                    match s.handle_message(now, m) {
                        Ok(()) => {}
                        // A message a secondary never accepts: typed, and the secondary stopped.
                        Err(colo_pair::PairError::Unexpected { .. }) if s.phase() == Phase::Stopped => {}
                        Err(e) => panic!("secondary: {e}"),
                    }
                }
                Err(e) => {
                    self.s_link_down = true;
                    s.channel_error(now, &e).unwrap();
                }
            }
        }
        if !self.s_link_down && self.s_end.peer_closed() && self.s_end.available() == 0 {
            self.s_link_down = true;
            s.link_failed(now, "primary closed the channel").unwrap();
        }
        while let Some(o) = self.secondary.as_mut().and_then(|s| s.poll_output()) {
            match o {
                Output::ToClient {
                    frame,
                    token,
                    release,
                } => self.release_to_client(frame, token, release),
                Output::ToGuest(f) => {
                    if let Some(s) = &mut self.secondary {
                        s.vm_mut().regs.rx.push_back(f.to_vec());
                    }
                }
                Output::Promoted { .. } => {
                    // The switch now sends the client's frames to the promoted secondary.
                    self.failed_over = true;
                    self.promoted = true;
                    self.client_to_secondary = true;
                }
                Output::GuestShutdown => self.shutdown_seen[1] = true,
                Output::StopGuest => self.stopped[1] = true,
                Output::ContinuedAlone { .. } => panic!("unexpected {o:?} on the secondary"),
            }
        }
    }

    /// Right after the secondary committed a checkpoint (the primary is still paused, waiting for
    /// `VmstateLoaded`), both guests must be identical: RAM, registers, disk as each guest sees it.
    fn check_checkpoint(&mut self) {
        let (Some(p), Some(s)) = (&self.primary, &self.secondary) else {
            return;
        };
        let committed = s.status().checkpoints;
        if committed == self.checked_checkpoints || s.phase() != Phase::Colo {
            return;
        }
        self.checked_checkpoints = committed;
        assert!(
            !p.vm().running,
            "the primary resumes only after the secondary loaded"
        );
        let epoch = s.status().epoch;
        assert!(
            p.vm().ram() == s.vm().ram(),
            "RAM differs after checkpoint {epoch}"
        );
        assert_eq!(
            p.vm().regs.steps,
            s.vm().regs.steps,
            "registers differ after checkpoint {epoch}"
        );
        let (mut a, mut b) = (vec![0u8; DISK as usize], vec![0u8; DISK as usize]);
        p.disk().read(0, &mut a).unwrap();
        s.disk().read(0, &mut b).unwrap();
        assert!(a == b, "disk differs after checkpoint {epoch}");
    }

    fn run(&mut self, ms: u64) {
        for _ in 0..ms {
            self.step(false);
        }
    }

    /// Stops new requests and runs until the client's last one is answered.
    fn drain(&mut self) {
        for _ in 0..5000 {
            if self.client.pending.is_none() {
                return;
            }
            self.step(true);
        }
        panic!("the client's last request was never answered");
    }

    fn kill_primary(&mut self, how: Kill) {
        let p = self.primary.take().expect("primary alive");
        if how == Kill::Crash {
            self.p_end.close();
        }
        drop(p);
        self.p_link_down = true;
    }

    fn kill_secondary(&mut self, how: Kill) {
        let s = self.secondary.take().expect("secondary alive");
        if how == Kill::Crash {
            self.s_end.close();
        }
        drop(s);
        self.s_link_down = true;
    }

    /// Re-protection: a fresh secondary (empty disk, guest never run) on a new link, and the primary, which
    /// runs alone, told to protect its guest again with a full disk sync. The harness's per-secondary
    /// bookkeeping starts over (the checkpoint checks, the SVM's output, the failover flags).
    fn reprotect(&mut self, seed: u64) -> colo_pair::Result<()> {
        let now = self.now();
        let (p_end, s_end) = pipe();
        let sdisk = SharedSecondaryDisk::new(
            SecondaryDisk::new_syncing(
                MemBackend::new(DISK).unwrap(),
                MemStore::new(PAGE as usize, 256).unwrap(),
                MemStore::new(PAGE as usize, 256).unwrap(),
            )
            .unwrap(),
        );
        let svm = FakeVm::new(0x51f1_5eed ^ seed.rotate_left(29), Port::Secondary(sdisk.clone()));
        let slog = AtomicBitmapLog::new(&svm.mem).unwrap();
        let s_arb: Box<dyn Arbiter + Send> = match &self.arbiter {
            Some(a) => Box::new(a.client("secondary")),
            None => Box::new(NoArbiter::unsafe_under_partitions()),
        };
        let p = self.primary.as_mut().expect("primary alive");
        p.vm_mut().first_awaiting = None;
        p.reprotect(
            now,
            Box::new(channel(&p_end)),
            Some(InitialSync::new(DISK, PAGE).unwrap()),
        )?;
        let secondary = SecondaryPair::new(
            self.cfg.clone(),
            now,
            svm,
            Box::new(slog),
            sdisk,
            Box::new(channel(&s_end)),
            s_arb,
        )
        .unwrap();
        self.secondary = Some(secondary);
        self.p_rx = channel(&p_end);
        self.s_rx = channel(&s_end);
        self.p_end = p_end;
        self.s_end = s_end;
        self.p_link_down = false;
        self.s_link_down = false;
        self.svm_sent.clear();
        self.checked_checkpoints = 0;
        self.failed_over = false;
        self.promoted = false;
        self.client_to_secondary = false;
        self.stopped[1] = false;
        Ok(())
    }

    /// The survivor's key-value store and disk equal the client's model.
    fn check_survivor(&self) {
        type DiskRead<'a> = Box<dyn Fn(u64, &mut [u8]) + 'a>;
        let (vm, disk_read): (&FakeVm, DiskRead<'_>) = match (&self.primary, &self.secondary) {
            (Some(p), None) => (p.vm(), Box::new(|o, b: &mut [u8]| p.disk().read(o, b).unwrap())),
            (None, Some(s)) => (s.vm(), Box::new(|o, b: &mut [u8]| s.disk().read(o, b).unwrap())),
            (Some(_), Some(s)) if s.phase() == Phase::Alone => {
                (s.vm(), Box::new(|o, b: &mut [u8]| s.disk().read(o, b).unwrap()))
            }
            (Some(p), Some(_)) => (p.vm(), Box::new(|o, b: &mut [u8]| p.disk().read(o, b).unwrap())),
            (None, None) => panic!("nobody survived"),
        };
        let store = vm.store();
        for k in 0..KEYS {
            let want = self.client.model.get(&k).copied().unwrap_or(0);
            assert_eq!(store[k as usize], want, "key {k} in guest RAM");
            let mut block = [0u8; 512];
            disk_read(PAGE * k as u64, &mut block);
            let got = u64::from_le_bytes(block[..8].try_into().unwrap());
            assert_eq!(got, want, "key {k} on the guest's disk");
        }
    }
}

#[test]
fn checkpoints_keep_the_pair_identical_and_release_only_compared_or_committed_output() {
    let mut sim = Sim::new(config());
    sim.run(3000);
    sim.drain();
    let p = sim.primary.as_ref().unwrap().status();
    let s = sim.secondary.as_ref().unwrap().status();
    eprintln!("primary {p:?}\nsecondary {s:?}\nreleased {:?}", sim.released);
    assert_eq!(p.phase, Phase::Colo);
    assert_eq!(s.phase, Phase::Colo);
    assert!(p.checkpoints >= 20, "{} checkpoints", p.checkpoints);
    assert!(p.mismatch_checkpoints >= 10, "noise must force checkpoints");
    assert!(sim.checked_checkpoints >= 20);
    assert!(sim.released.get("compared").copied().unwrap_or(0) > 100);
    assert!(sim.released.get("checkpoint").copied().unwrap_or(0) > 10);
    assert!(sim.client.answered > 500, "{} answers", sim.client.answered);
    assert!(sim.client.ticks_seen > 10);
    assert!(p.bytes_sent > RAM as u64, "at least the initial RAM went out");
    assert!(p.compare.unwrap().mismatches > 0);
    assert!(p.pause_p50 <= p.p99_pause && s.pause_p50 <= s.p99_pause);
    sim.check_survivor();
}

/// The guest port and the payload of a UDP or TCP frame.
fn port_payload(frame: &[u8]) -> (u16, Vec<u8>) {
    let port = u16::from_be_bytes([frame[34], frame[35]]);
    let at = if frame[23] == 6 {
        34 + usize::from(frame[46] >> 4) * 4
    } else {
        PAYLOAD_AT
    };
    (port, frame[at..].to_vec())
}

/// PVM frames the comparator holds now.
fn pvm_held(sim: &Sim) -> u64 {
    let Some(p) = &sim.primary else { return 0 };
    let c = p.status().compare.unwrap();
    c.primary_frames
        - c.released_compared
        - c.released_at_checkpoint
        - c.primary_malformed
        - c.primary_unsupported
        - c.primary_refused
}

/// Runs until the secondary has committed a few checkpoints and the client made progress.
fn warmed_up() -> Sim {
    let mut sim = Sim::new(config());
    sim.run(1000);
    assert!(sim.checked_checkpoints >= 5);
    assert!(sim.client.answered > 100);
    sim
}

fn warmed_up_with(seed: u64) -> Sim {
    let mut sim = Sim::with(config(), seed, Some(SimArbiter::default()));
    sim.run(1000);
    assert!(sim.checked_checkpoints >= 5);
    sim
}

fn primary_killed(how: Kill) {
    for seed in 0..3 {
        primary_killed_seeded(how, seed);
    }
}

fn primary_killed_seeded(how: Kill, seed: u64) {
    let mut sim = warmed_up_with(seed);
    let before = sim.client.answered;
    sim.kill_primary(how);
    sim.run(2000);
    sim.drain();
    let s = sim.secondary.as_ref().unwrap().status();
    eprintln!("secondary {s:?}\nreleased {:?}", sim.released);
    assert_eq!(s.phase, Phase::Alone);
    assert_eq!(s.failover.role, colo_failover::Role::Primary);
    assert_eq!(s.failover.failover, colo_failover::FailoverStatus::Completed);
    assert_eq!(s.failover.last_mode, colo_failover::Role::Secondary);
    assert!(s.exit_detail.is_some());
    assert!(sim.failed_over);
    assert!(
        sim.client.answered_after_failover > 100,
        "the client goes on with the promoted secondary"
    );
    assert!(sim.client.answered > before);
    assert!(sim.released.get("alone").copied().unwrap_or(0) > 0);
    sim.check_survivor();
}

#[test]
fn primary_crash_the_secondary_takes_over_from_its_own_state() {
    primary_killed(Kill::Crash);
}

#[test]
fn primary_silent_the_secondary_takes_over_after_the_heartbeat_timeout() {
    primary_killed(Kill::Silent);
}

fn secondary_killed(how: Kill) {
    for seed in 0..3 {
        secondary_killed_seeded(how, seed);
    }
}

fn secondary_killed_seeded(how: Kill, seed: u64) {
    let mut sim = warmed_up_with(seed);
    // Kill the secondary while the comparator holds PVM output waiting for the SVM's.
    sim.kill_secondary_when_held = Some(how);
    sim.run(2000);
    assert!(sim.secondary.is_none());
    sim.drain();
    let p = sim.primary.as_ref().unwrap().status();
    eprintln!("primary {p:?}\nreleased {:?}", sim.released);
    assert_eq!(p.phase, Phase::Alone);
    assert_eq!(p.failover.failover, colo_failover::FailoverStatus::Completed);
    assert!(sim.failed_over);
    assert!(
        sim.released.get("failover").copied().unwrap_or(0) > 0,
        "the queued output is released"
    );
    assert!(sim.client.answered_after_failover > 100);
    sim.check_survivor();
}

#[test]
fn secondary_crash_the_primary_continues_alone_and_releases_queued_output() {
    secondary_killed(Kill::Crash);
}

#[test]
fn secondary_silent_the_primary_continues_alone_after_the_heartbeat_timeout() {
    secondary_killed(Kill::Silent);
}

fn primary_killed_in_checkpoint(state: &'static str) {
    for seed in 0..3 {
        primary_killed_in_checkpoint_seeded(state, seed);
    }
}

fn primary_killed_in_checkpoint_seeded(state: &'static str, seed: u64) {
    let mut sim = warmed_up_with(seed);
    let committed = sim.checked_checkpoints;
    sim.tear_when = Some(state);
    sim.run(2000);
    assert!(sim.primary.is_none(), "the primary was killed in state {state}");
    sim.drain();
    let s = sim.secondary.as_ref().unwrap().status();
    eprintln!("secondary {s:?}\nreleased {:?}", sim.released);
    assert_eq!(s.phase, Phase::Alone);
    assert!(sim.checked_checkpoints >= committed);
    assert!(!sim.secondary.as_ref().unwrap().is_paused(), "the SVM runs again");
    assert!(sim.client.answered_after_failover > 100);
    sim.check_survivor();
}

#[test]
fn primary_killed_while_sending_a_checkpoint() {
    primary_killed_in_checkpoint("waiting for vmstate-received");
}

#[test]
fn primary_killed_after_the_secondary_paused_for_a_checkpoint() {
    primary_killed_in_checkpoint("waiting for checkpoint-reply");
}

#[test]
fn guest_shutdown_on_the_primary_is_mirrored() {
    let mut sim = warmed_up();
    sim.client.shutdown_requested = true;
    sim.drain(); // the pending request
    for _ in 0..2000 {
        if sim.shutdown_seen == [true, true] {
            break;
        }
        sim.step(false);
    }
    assert_eq!(sim.shutdown_seen, [true, true]);
    assert_eq!(sim.primary.as_ref().unwrap().phase(), Phase::ShutDown);
    assert_eq!(sim.secondary.as_ref().unwrap().phase(), Phase::ShutDown);
    // Nobody fails over after a shutdown.
    sim.run(1000);
    assert!(!sim.failed_over);
}

#[test]
fn operator_failover_on_the_primary_stops_the_secondary() {
    let mut sim = warmed_up();
    let now = sim.now();
    sim.primary.as_mut().unwrap().failover_now(now).unwrap();
    sim.run(1000);
    sim.drain();
    let p = sim.primary.as_ref().unwrap().status();
    let s = sim.secondary.as_ref().unwrap().status();
    assert_eq!(p.phase, Phase::Alone);
    assert_eq!(p.failover.reason, colo_failover::ExitReason::Request);
    assert_eq!(
        s.phase,
        Phase::Stopped,
        "a secondary told so stops instead of promoting"
    );
    assert!(sim.client.answered_after_failover > 100);
    sim.check_survivor();
}

#[test]
fn operator_failover_on_the_secondary_promotes_it() {
    let mut sim = warmed_up();
    let now = sim.now();
    sim.secondary.as_mut().unwrap().failover_now(now).unwrap();
    // The operator fences the old primary (as QEMU's lost-heartbeat command presumes).
    sim.kill_primary(Kill::Crash);
    sim.run(1000);
    sim.drain();
    let s = sim.secondary.as_ref().unwrap().status();
    assert_eq!(s.phase, Phase::Alone);
    assert_eq!(s.failover.reason, colo_failover::ExitReason::Request);
    assert!(sim.client.answered_after_failover > 100);
    sim.check_survivor();
    // A second command is refused with a typed error and changes nothing.
    assert!(sim.secondary.as_mut().unwrap().failover_now(sim.base).is_err());
}

#[test]
fn changing_the_interval_checkpoints_at_once_and_then_periodically() {
    let mut cfg = config();
    cfg.checkpoint_interval = Duration::from_secs(3600);
    let mut sim = Sim::new(cfg);
    sim.run(100);
    let before = sim.primary.as_ref().unwrap().status().checkpoints;
    let now = sim.now();
    let p = sim.primary.as_mut().unwrap();
    p.set_checkpoint_interval(now, Duration::from_millis(10)).unwrap();
    assert_eq!(p.last_trigger(), Some(colo_pair::Trigger::Command));
    assert_eq!(p.status().checkpoint_interval, Duration::from_millis(10));
    sim.run(500);
    let st = sim.primary.as_ref().unwrap().status();
    assert!(st.checkpoints >= before + 20, "{} -> {}", before, st.checkpoints);
    assert!(st.checkpoints > st.mismatch_checkpoints + 10, "periodic ones too");
}

#[test]
fn checkpoints_hold_for_other_seeds() {
    for seed in 1..4 {
        let mut sim = Sim::with(config(), seed, None);
        sim.run(1500);
        sim.drain();
        assert!(sim.checked_checkpoints >= 10, "seed {seed}");
        assert!(sim.client.answered > 200, "seed {seed}");
        sim.check_survivor();
    }
}

#[test]
fn a_cut_link_gives_one_primary_the_arbiter_fences_the_other() {
    let mut sim = Sim::with(config(), 7, Some(SimArbiter::default()));
    sim.run(1000);
    sim.partitioned = true;
    // Both lose their partner and ask the arbiter; whoever asks first wins and runs alone, the other is
    // refused until its patience (5 s) runs out, then stops its guest. Output stamped with the loser's
    // token would be rejected by the client's fence gate.
    sim.run(6000);
    sim.drain();
    let p = sim.primary.as_ref().unwrap().status();
    let s = sim.secondary.as_ref().unwrap().status();
    eprintln!("primary {p:?}\nsecondary {s:?}");
    let winners = [p.phase, s.phase]
        .iter()
        .filter(|&&ph| ph == Phase::Alone)
        .count();
    assert_eq!(winners, 1, "exactly one side runs the guest");
    if p.phase == Phase::Alone {
        assert_eq!(s.phase, Phase::Stopped);
        assert!(!sim.promoted && sim.stopped[1]);
    } else {
        assert_eq!(p.phase, Phase::Stopped);
        assert!(sim.promoted && sim.stopped[0]);
    }
    assert!(sim.client.answered_after_failover > 100);
    sim.check_survivor();
}

/// An arbiter that handed out tokens up to `floor` in earlier pairs (its failovers), and a client gate that
/// kept that floor (a long-lived switch, a gate in front of shared storage).
fn sim_after_earlier_failovers(floor: u64) -> (Sim, SimArbiter) {
    let arbiter = SimArbiter::default();
    arbiter.0.lock().unwrap().next = floor;
    let mut sim = Sim::with(config(), 3, Some(arbiter.clone()));
    sim.client.gate = FenceGate::with_floor(FenceToken(floor));
    (sim, arbiter)
}

#[test]
fn a_new_pair_takes_the_arbiters_token_at_start_so_a_gate_with_an_old_floor_passes_its_output() {
    let (mut sim, arbiter) = sim_after_earlier_failovers(40);
    let p = sim.primary.as_ref().unwrap();
    assert_eq!(
        p.start_token(),
        Some(FenceToken(41)),
        "a real grant at pair start"
    );
    assert!(
        arbiter.0.lock().unwrap().holder.is_none(),
        "the start grant is given back at once (the secondary must be able to win it)"
    );
    sim.run(1500);
    // Every release went through the client's gate (`release_to_client` checks each token).
    assert_eq!(sim.client.gate.rejected(), 0);
    assert_eq!(sim.client.gate.highest(), FenceToken(41));
    assert!(
        sim.released.get("compared").copied().unwrap_or(0) > 50,
        "{:?}",
        sim.released
    );
    assert!(sim.client.answered > 100, "{} answers", sim.client.answered);
    // The primary dies: the secondary wins the next token and the same gate orders it after the primary.
    sim.kill_primary(Kill::Crash);
    sim.run(2000);
    sim.drain();
    let s = sim.secondary.as_ref().unwrap().status();
    assert_eq!(s.phase, Phase::Alone);
    assert_eq!(s.failover.token, Some(FenceToken(42)));
    assert_eq!(sim.client.gate.highest(), FenceToken(42));
    assert_eq!(sim.client.gate.rejected(), 0);
    assert!(sim.client.answered_after_failover > 100);
    sim.check_survivor();
}

#[test]
fn a_new_pair_whose_arbiter_is_held_elsewhere_keeps_token_zero() {
    // Another node holds the arbiter at the start: no grant, so the output keeps token zero, which a gate
    // that saw the holder drops (never less safe than before); a fresh gate still passes it.
    let arbiter = SimArbiter::default();
    arbiter.0.lock().unwrap().holder = Some(("elsewhere", FenceToken(7)));
    arbiter.0.lock().unwrap().next = 7;
    let sim = Sim::with(config(), 3, Some(arbiter.clone()));
    assert_eq!(sim.primary.as_ref().unwrap().start_token(), None);
    assert_eq!(
        arbiter.0.lock().unwrap().holder,
        Some(("elsewhere", FenceToken(7)))
    );
    // Without an arbiter (`NoArbiter`) nothing is asked: the pair releases with token zero as before.
    let mut sim = Sim::new(config());
    assert_eq!(sim.primary.as_ref().unwrap().start_token(), None);
    sim.run(1000);
    assert_eq!(sim.client.gate.highest(), FenceToken::ZERO);
    assert!(sim.released.get("compared").copied().unwrap_or(0) > 0);
}

#[test]
fn secondary_killed_while_the_primary_is_paused_in_a_checkpoint() {
    for seed in 0..3 {
        let mut sim = warmed_up_with(seed);
        sim.kill_secondary_in = Some("waiting for vmstate-received");
        sim.run(1500);
        assert!(sim.secondary.is_none());
        sim.drain();
        let p = sim.primary.as_ref().unwrap();
        assert_eq!(p.phase(), Phase::Alone);
        assert!(p.vm().running, "the primary's guest runs again");
        assert!(sim.client.answered_after_failover > 100);
        sim.check_survivor();
    }
}

#[test]
fn a_page_batch_of_the_wrong_page_size_stops_the_secondary_with_a_typed_error() {
    let mut sim = warmed_up();
    // Stand in for the primary on its end of the channel.
    sim.kill_primary(Kill::Silent);
    let e = sim.secondary.as_ref().unwrap().status().epoch + 1;
    let mut fake = channel(&sim.p_end);
    fake.send(&Message::CheckpointRequest { epoch: e }).unwrap();
    fake.send(&Message::VmstateSend { epoch: e }).unwrap();
    fake.send_pages(PagePhase::Checkpoint, e, 512, &[(0, &[1u8; 512][..])])
        .unwrap();
    sim.step(true);
    let s = sim.secondary.as_ref().unwrap();
    assert_eq!(s.phase(), Phase::Stopped);
    let detail = s.status().exit_detail.unwrap();
    assert!(detail.contains("512-byte pages"), "{detail}");
    assert!(sim.stopped[1]);
    assert!(!sim.promoted, "a secondary that gave up does not promote");
    // The primary's end is told why.
    let mut told = false;
    while sim.p_end.available() > 0 {
        if let Message::Error { code, .. } = sim.p_rx.recv().unwrap() {
            told = code == colo_pair::SECONDARY_FAILED;
        }
    }
    assert!(told);
}

#[test]
fn a_message_the_primary_never_accepts_is_a_typed_error_and_changes_nothing() {
    let mut sim = warmed_up();
    let now = sim.now();
    let p = sim.primary.as_mut().unwrap();
    let bogus = Message::BlockWrite(BlockWrite {
        epoch: 1,
        disk: 0,
        offset: 0,
        data: Bytes::from_static(&[0; 512]),
    });
    assert!(matches!(
        p.handle_message(now, bogus),
        Err(colo_pair::PairError::Unexpected { .. })
    ));
    assert_eq!(p.phase(), Phase::Colo);
    sim.run(500);
    sim.drain();
    assert_eq!(sim.primary.as_ref().unwrap().phase(), Phase::Colo);
    sim.check_survivor();
}

#[test]
fn operator_takeover_on_the_secondary_stops_the_live_primary_first() {
    let mut sim = warmed_up();
    let now = sim.now();
    sim.secondary.as_mut().unwrap().ask_primary_to_stop(now).unwrap();
    sim.run(50);
    assert_eq!(sim.primary.as_ref().unwrap().phase(), Phase::Stopped);
    assert!(!sim.primary.as_ref().unwrap().vm().running);
    // The primary has stopped (its VMM closes the link): the secondary takes over.
    let now = sim.now();
    let s = sim.secondary.as_mut().unwrap();
    s.failover_now(now).unwrap();
    sim.run(1000);
    sim.drain();
    let s = sim.secondary.as_ref().unwrap().status();
    assert_eq!(s.phase, Phase::Alone);
    assert_eq!(s.failover.reason, colo_failover::ExitReason::Request);
    assert!(sim.client.answered_after_failover > 100);
    assert_eq!(sim.primary.as_ref().unwrap().phase(), Phase::Stopped);
    sim.check_survivor();
    // Only a secondary in COLO can ask.
    let now = sim.now();
    assert!(sim.secondary.as_mut().unwrap().ask_primary_to_stop(now).is_err());
}

#[test]
fn a_secondary_taking_over_by_command_makes_the_primary_stop_and_release_nothing_more() {
    let mut sim = warmed_up();
    let now = sim.now();
    let p = sim.primary.as_mut().unwrap();
    let notice = Message::FailoverNotice {
        reason: colo_proto::Reason::Operator,
    };
    p.handle_message(now, notice).unwrap();
    assert_eq!(p.phase(), Phase::Stopped);
    assert!(!p.vm().running, "the primary's guest is paused for good");
    let outs: Vec<Output> = std::iter::from_fn(|| p.poll_output()).collect();
    assert!(outs.contains(&Output::StopGuest), "{outs:?}");
    assert!(
        !outs.iter().any(|o| matches!(o, Output::ToClient { .. })),
        "nothing held is released: the new primary produces that output itself"
    );
    // What still arrives changes nothing; the link's end is not a reason to run alone.
    p.guest_output(now, Bytes::from_static(&[0; 60])).unwrap();
    p.link_failed(now, "the secondary closed the link").unwrap();
    p.handle_timeout(now + Duration::from_secs(10)).unwrap();
    assert_eq!(p.phase(), Phase::Stopped);
    assert!(!p.vm().running);
    assert!(p.poll_output().is_none());
    let st = p.status();
    assert!(st.exit_detail.unwrap_or_default().contains("takes over"));
}

// ---------- the same drivers on real threads and sockets, run as the README's loop ----------

type Received = Result<Message, colo_proto::Error>;

/// The VMM's reader thread: every message (or the error that ends the stream) goes to the driver's thread.
fn reader(mut ch: Channel<std::os::unix::net::UnixStream>, tx: std::sync::mpsc::Sender<Received>) {
    loop {
        let r = ch.recv();
        let end = r.is_err();
        if tx.send(r).is_err() || end {
            return;
        }
    }
}

fn socket_channel(s: std::os::unix::net::UnixStream) -> Channel<std::os::unix::net::UnixStream> {
    let mut ch = Channel::new(s);
    ch.set_version(PROTOCOL_VERSION);
    ch
}

#[test]
fn threads_and_unix_sockets_checkpoint_then_fail_over() {
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc::{self, RecvTimeoutError};
    use std::thread;

    let (a, b) = UnixStream::pair().unwrap();
    let mut cfg = config();
    cfg.checkpoint_interval = Duration::from_millis(20);
    let scfg = cfg.clone();
    let limit = Duration::from_secs(20);

    let secondary = thread::spawn(move || {
        let sdisk = SharedSecondaryDisk::new(
            SecondaryDisk::new(
                MemBackend::new(DISK).unwrap(),
                MemStore::new(PAGE as usize, 256).unwrap(),
                MemStore::new(PAGE as usize, 256).unwrap(),
                0,
            )
            .unwrap(),
        );
        let svm = FakeVm::new(5, Port::Secondary(sdisk.clone()));
        let slog = AtomicBitmapLog::new(&svm.mem).unwrap();
        let (tx, rx) = mpsc::channel();
        let rch = socket_channel(b.try_clone().unwrap());
        thread::spawn(move || reader(rch, tx));
        let mut s = SecondaryPair::new(
            scfg,
            Instant::now(),
            svm,
            Box::new(slog),
            sdisk,
            Box::new(socket_channel(b)),
            Box::new(NoArbiter::unsafe_under_partitions()),
        )
        .unwrap();
        let started = Instant::now();
        while started.elapsed() < limit {
            let now = Instant::now();
            s.vm_mut().step();
            for f in std::mem::take(&mut s.vm_mut().tx) {
                s.guest_output(now, f).unwrap();
            }
            let wait = s
                .poll_timeout()
                .map_or(Duration::from_millis(1), |d| d.saturating_duration_since(now))
                .min(Duration::from_millis(1));
            match rx.recv_timeout(wait) {
                Ok(Ok(m)) => s.handle_message(Instant::now(), m).unwrap(),
                Ok(Err(e)) => s.link_failed(Instant::now(), &e.to_string()).unwrap(),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
            }
            if s.poll_timeout().is_some_and(|d| d <= Instant::now()) {
                s.handle_timeout(Instant::now()).unwrap();
            }
            while let Some(o) = s.poll_output() {
                match o {
                    Output::ToGuest(f) => s.vm_mut().regs.rx.push_back(f.to_vec()),
                    Output::Promoted { .. } => return Some(s.status()),
                    _ => {}
                }
            }
        }
        None
    });

    let primary = thread::spawn(move || {
        let pdisk = SharedPrimaryDisk::new(PrimaryDisk::new(
            MemBackend::new(DISK).unwrap(),
            PrimaryConfig::default(),
        ));
        let mut pvm = FakeVm::new(3, Port::Primary(pdisk.clone()));
        pvm.running = true;
        let plog = AtomicBitmapLog::new(&pvm.mem).unwrap();
        let (tx, rx) = mpsc::channel();
        let rch = socket_channel(a.try_clone().unwrap());
        let control = a.try_clone().unwrap();
        thread::spawn(move || reader(rch, tx));
        let mut p = PrimaryPair::new(
            cfg,
            Instant::now(),
            pvm,
            Box::new(plog),
            pdisk,
            Box::new(socket_channel(a)),
            Box::new(NoArbiter::unsafe_under_partitions()),
        )
        .unwrap();
        let started = Instant::now();
        while p.status().checkpoints < 15 && started.elapsed() < limit {
            let now = Instant::now();
            p.vm_mut().step();
            for f in std::mem::take(&mut p.vm_mut().tx) {
                p.guest_output(now, f).unwrap();
            }
            let wait = p
                .poll_timeout()
                .map_or(Duration::from_millis(1), |d| d.saturating_duration_since(now))
                .min(Duration::from_millis(1));
            match rx.recv_timeout(wait) {
                Ok(Ok(m)) => p.handle_message(Instant::now(), m).unwrap(),
                Ok(Err(e)) => p.link_failed(Instant::now(), &e.to_string()).unwrap(),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
            }
            if p.poll_timeout().is_some_and(|d| d <= Instant::now()) {
                p.handle_timeout(Instant::now()).unwrap();
            }
            while let Some(o) = p.poll_output() {
                if let Output::ToGuest(f) = o {
                    p.vm_mut().regs.rx.push_back(f.to_vec());
                }
            }
        }
        // The primary process dies: every descriptor of its socket closes.
        let status = p.status();
        let _ = control.shutdown(std::net::Shutdown::Both);
        drop(p);
        status
    });

    let p = primary.join().unwrap();
    let s = secondary.join().unwrap().expect("the secondary promoted itself");
    eprintln!("primary {p:?}\nsecondary {s:?}");
    assert!(p.checkpoints >= 15, "{} checkpoints", p.checkpoints);
    assert!(p.mismatch_checkpoints > 0);
    assert_eq!(s.phase, Phase::Alone);
    assert!(
        s.epoch >= p.epoch,
        "the secondary committed every checkpoint the primary saw committed"
    );
    assert!(s.exit_detail.is_some());
}

#[test]
fn a_full_disk_epoch_forces_a_checkpoint_and_the_held_write_completes() {
    let disk = PrimaryConfig {
        epoch_limit: Some(colo_block::EpochLimit {
            block_size: PAGE,
            max_blocks: 3,
        }),
        ..PrimaryConfig::default()
    };
    let mut cfg = config();
    cfg.checkpoint_interval = Duration::from_secs(3600);
    let mut sim = Sim::with_disk(cfg, 11, None, disk);
    let mut epoch_full = 0;
    for _ in 0..2000 {
        let before = sim.primary.as_ref().unwrap().status().checkpoints;
        sim.step(false);
        let p = sim.primary.as_ref().unwrap();
        if p.status().checkpoints > before && p.last_trigger() == Some(colo_pair::Trigger::EpochFull) {
            epoch_full += 1;
        }
    }
    sim.drain();
    assert!(epoch_full >= 5, "{epoch_full} checkpoints for a full disk epoch");
    assert!(sim.client.answered > 200);
    sim.check_survivor();
}

fn tcp_sim(seed: u64, noise: bool) -> Sim {
    let mut cfg = config();
    if !noise {
        // No checkpoint after the first: the rewriter's offsets stay in force until the failover.
        cfg.checkpoint_interval = Duration::from_secs(3600);
    }
    let mut sim = Sim::with(cfg, seed, Some(SimArbiter::default()));
    sim.client.tcp = Some(TcpClient::new());
    for vm in [
        sim.primary.as_mut().unwrap().vm_mut(),
        sim.secondary.as_mut().unwrap().vm_mut(),
    ] {
        vm.noise = noise;
    }
    sim
}

fn tcp_primary_killed(noise: bool) {
    for seed in 0..3 {
        let mut sim = tcp_sim(seed, noise);
        sim.run(1000);
        assert!(sim.client.tcp.as_ref().unwrap().established);
        assert!(
            sim.client.answered > 100,
            "{} answers over TCP",
            sim.client.answered
        );
        sim.kill_primary(Kill::Crash);
        sim.run(1500);
        sim.drain();
        let c = sim.client.tcp.as_ref().unwrap();
        eprintln!("released {:?}", sim.released);
        assert_eq!(
            c.out_of_window, 0,
            "the promoted SVM answers in the PVM's sequence space"
        );
        assert!(
            sim.client.answered_after_failover > 100,
            "the same connection goes on"
        );
        let s = sim.secondary.as_ref().unwrap().status();
        assert_eq!(s.phase, Phase::Alone);
        if !noise {
            assert_eq!(
                s.checkpoints, 1,
                "only the initial checkpoint: offsets were in use"
            );
        }
        sim.check_survivor();
    }
}

#[test]
fn tcp_through_the_rewriter_the_same_connection_survives_a_primary_crash() {
    tcp_primary_killed(false);
}

#[test]
fn tcp_with_checkpoints_the_same_connection_survives_a_primary_crash() {
    tcp_primary_killed(true);
}

#[test]
fn secondary_lost_before_the_first_checkpoint_the_primary_runs_alone() {
    let mut sim = Sim::new(config());
    sim.kill_secondary(Kill::Crash);
    sim.run(1000);
    sim.drain();
    let p = sim.primary.as_ref().unwrap().status();
    assert_eq!(p.phase, Phase::Alone);
    assert_eq!(p.checkpoints, 0);
    assert!(sim.client.answered > 100);
    sim.check_survivor();
}

#[test]
fn primary_lost_before_the_first_checkpoint_the_secondary_has_nothing_to_run() {
    let mut sim = Sim::new(config());
    sim.kill_primary(Kill::Crash);
    sim.run(1000);
    let s = sim.secondary.as_ref().unwrap();
    assert_eq!(s.phase(), Phase::Stopped);
    assert!(s.is_paused(), "a guest without a consistent copy never runs");
    assert!(!sim.promoted);
}

// ---------- protocol v3: disk sync, block acks, early checkpoints, protocol errors ----------

#[test]
fn initial_disk_sync_brings_an_empty_secondary_disk_to_the_primary_while_the_guest_writes() {
    let mut cfg = config();
    cfg.disk_sync_burst = PAGE;
    let opts = Opts {
        sync: true,
        ..Opts::default()
    };
    let mut sim = Sim::build(cfg, 5, None, PrimaryConfig::default(), opts);
    let (mut resent, mut synced_at, mut answered_during_sync) = (0, None, 0);
    for _ in 0..3000 {
        sim.step(false);
        let p = sim.primary.as_ref().unwrap();
        let reported = p.status().disk_sync;
        assert_eq!(reported, p.disk().lock().sync_progress());
        match reported {
            Some(progress) => {
                resent = resent.max(progress.resent_bytes);
                assert_eq!(
                    p.status().checkpoints,
                    0,
                    "no checkpoint before the disk is synced"
                );
                answered_during_sync = sim.client.answered;
            }
            None if synced_at.is_none() => synced_at = Some(sim.t),
            None => {}
        }
    }
    let synced_at = synced_at.expect("the sync finished");
    eprintln!("synced at {synced_at} ms, {resent} bytes re-sent, {answered_during_sync} answers meanwhile");
    // 256 chunks, about one per step: the sync spans many steps, and the guest kept writing (its noise
    // block, at 200 * PAGE, every 37 steps).
    assert!(synced_at >= 200, "synced at {synced_at}");
    assert!(
        resent > 0,
        "guest writes during the sync re-dirtied chunks already sent"
    );
    let p = sim.primary.as_ref().unwrap().status();
    assert_eq!(p.phase, Phase::Colo);
    // Every checkpoint compared the whole disks (check_checkpoint): the data only the primary had is there.
    assert!(
        sim.checked_checkpoints >= 10,
        "{} checkpoints",
        sim.checked_checkpoints
    );
    let mut block = vec![0u8; PAGE as usize];
    sim.secondary
        .as_ref()
        .unwrap()
        .disk()
        .lock()
        .disk()
        .read_at(150 * PAGE, &mut block)
        .unwrap();
    assert!(block.iter().all(|&b| b == 150u8 ^ 0x5a));
    sim.drain();
    sim.check_survivor();
    // The synced secondary can take over.
    sim.kill_primary(Kill::Crash);
    sim.run(1500);
    sim.drain();
    assert!(sim.promoted && sim.client.answered_after_failover > 100);
    sim.check_survivor();
}

#[test]
fn a_v2_link_refuses_an_initial_disk_sync_with_a_typed_error() {
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
    let log = AtomicBitmapLog::new(&mem).unwrap();
    let mut pdisk = PrimaryDisk::new(MemBackend::new(DISK).unwrap(), PrimaryConfig::default());
    pdisk.start_sync(InitialSync::new(DISK, PAGE).unwrap()).unwrap();
    let (p_end, _s_end) = pipe();
    let mut ch = channel(&p_end);
    ch.set_version(2);
    let vm = FakeVm::new(
        1,
        Port::Primary(SharedPrimaryDisk::new(PrimaryDisk::new(
            MemBackend::new(DISK).unwrap(),
            PrimaryConfig::default(),
        ))),
    );
    let r = PrimaryPair::new(
        config(),
        Instant::now(),
        FakeVm { mem, ..vm },
        Box::new(log),
        SharedPrimaryDisk::new(pdisk),
        Box::new(ch),
        Box::new(NoArbiter::unsafe_under_partitions()),
    );
    assert!(matches!(
        r,
        Err(colo_pair::PairError::NeedsVersion { version: 2, .. })
    ));
}

fn sync_mode() -> PrimaryConfig {
    PrimaryConfig {
        mode: CompletionMode::Sync,
        ..PrimaryConfig::default()
    }
}

#[test]
fn sync_mode_writes_complete_only_after_the_secondary_acks_them() {
    let mut sim = Sim::build(config(), 3, None, sync_mode(), Opts::default());
    sim.run(3000);
    sim.drain();
    let p = sim.primary.as_ref().unwrap();
    let waited = p.vm().waited;
    eprintln!("{waited} writes waited, {} completed", sim.writes_completed);
    assert!(waited > 100, "{waited} writes waited for an ack");
    assert!(sim.acks_seen >= waited);
    assert!(
        sim.writes_completed + 2 >= waited,
        "every write but the last ones completed"
    );
    assert!(sim.client.answered > 300);
    assert!(sim.checked_checkpoints >= 10);
    sim.check_survivor();
}

#[test]
fn sync_mode_survives_either_side_being_killed() {
    for how in [Kill::Crash, Kill::Silent] {
        let mut sim = Sim::build(config(), 4, None, sync_mode(), Opts::default());
        sim.run(1500);
        sim.kill_primary(how);
        sim.run(1500);
        sim.drain();
        assert!(sim.promoted, "{how:?}");
        assert!(sim.client.answered_after_failover > 100);
        sim.check_survivor();

        let mut sim = Sim::build(config(), 4, None, sync_mode(), Opts::default());
        sim.run(1500);
        sim.kill_secondary(how);
        sim.run(1500);
        sim.drain();
        let p = sim.primary.as_ref().unwrap();
        assert_eq!(p.phase(), Phase::Alone, "{how:?}");
        // The writes that waited for the lost secondary completed: the guest's answers came out.
        assert!(p.vm().awaiting.is_empty() && p.vm().held_tx.is_empty());
        assert!(sim.client.answered_after_failover > 100);
        sim.check_survivor();
    }
}

#[test]
fn a_full_secondary_overlay_asks_the_primary_for_an_early_checkpoint() {
    let mut cfg = config();
    cfg.checkpoint_interval = Duration::from_secs(3600);
    let opts = Opts {
        active_blocks: Some(3),
        ..Opts::default()
    };
    let mut sim = Sim::build(cfg, 8, None, PrimaryConfig::default(), opts);
    for vm in [
        sim.primary.as_mut().unwrap().vm_mut(),
        sim.secondary.as_mut().unwrap().vm_mut(),
    ] {
        vm.noise = false;
    }
    let mut asked = 0;
    for _ in 0..3000 {
        let before = sim.primary.as_ref().unwrap().status().checkpoints;
        sim.step(false);
        let p = sim.primary.as_ref().unwrap();
        if p.status().checkpoints > before
            && p.last_trigger() == Some(colo_pair::Trigger::Secondary(colo_proto::WantReason::OverlayFull))
        {
            asked += 1;
        }
    }
    sim.drain();
    let p = sim.primary.as_ref().unwrap().status();
    eprintln!(
        "{asked} asked-for checkpoints of {}; {} answers",
        p.checkpoints, sim.client.answered
    );
    assert!(asked >= 10, "{asked} checkpoints asked for by the secondary");
    assert!(sim.client.answered > 100);
    sim.check_survivor();
}

#[test]
fn a_protocol_error_from_a_live_primary_stops_the_secondary_instead_of_promoting_it() {
    for case in 0..3u64 {
        let mut sim = warmed_up_with(case);
        let mut wire = Vec::new();
        match case {
            // Bytes that are no frame, between two frames of a living primary.
            0 => wire.extend_from_slice(&[0xde; 64]),
            // A valid frame the session cannot accept: a checkpoint far in the future.
            1 => Message::VmstateSend { epoch: 999 }
                .encode(PROTOCOL_VERSION, &mut wire)
                .unwrap(),
            // A message only a secondary sends.
            _ => Message::BlockAck { disk: 0, id: 0 }
                .encode(PROTOCOL_VERSION, &mut wire)
                .unwrap(),
        }
        sim.p_end.write_all(&wire).unwrap();
        sim.run(2000);
        sim.drain();
        assert_secondary_stopped_for_a_protocol_error(&sim, "", case);
    }
}

/// The secondary stopped for the primary's protocol error (exit detail with "protocol error" and `detail`),
/// was never promoted, and the primary went on alone, serving the client.
fn assert_secondary_stopped_for_a_protocol_error(sim: &Sim, detail: &str, case: u64) {
    let s = sim.secondary.as_ref().unwrap();
    assert_eq!(s.phase(), Phase::Stopped, "case {case}");
    let exit = s.status().exit_detail.unwrap();
    assert!(exit.contains("protocol error") && exit.contains(detail), "{exit}");
    assert!(!sim.promoted, "never promoted next to a living primary");
    assert!(sim.stopped[1]);
    let p = sim.primary.as_ref().unwrap();
    assert_eq!(p.phase(), Phase::Alone, "case {case}: the primary goes on alone");
    assert!(sim.client.answered_after_failover > 100);
    sim.check_survivor();
}

#[test]
fn device_state_the_secondary_refuses_stops_it_before_the_checkpoint_touches_the_guest() {
    for seed in 0..3u64 {
        let mut sim = warmed_up_with(seed);
        let (epoch, loads) = {
            let s = sim.secondary.as_mut().unwrap();
            s.vm_mut().refuse_state = true;
            (s.status().epoch, s.vm().loads)
        };
        assert!(loads >= 1, "seed {seed}: checkpoints were loaded before");
        sim.run(2000);
        sim.drain();
        let s = sim.secondary.as_ref().unwrap();
        assert_eq!(*s.vm().refusals.lock().unwrap(), 1, "seed {seed}");
        let ram = s
            .vm()
            .at_pause
            .clone()
            .expect("paused for the refused checkpoint");
        // Nothing of the refused checkpoint reached the guest: RAM as when it paused for that checkpoint (the
        // cache was never flushed; the guest stayed paused) and no device state loaded. (Frames the client
        // sent meanwhile still reach the paused guest's receive queue, as on a real NIC.)
        assert!(
            s.vm().ram() == ram,
            "seed {seed}: SVM RAM changed after the refusal"
        );
        assert_eq!(s.vm().loads, loads, "seed {seed}");
        assert!(!s.vm().running);
        assert_eq!(
            s.status().epoch,
            epoch,
            "seed {seed}: the refused checkpoint was not committed"
        );
        // Phases: the secondary stops (a protocol error of a living primary), the primary goes on alone.
        assert_secondary_stopped_for_a_protocol_error(&sim, "device state", seed);
    }
}

#[test]
fn a_guest_opened_tcp_connection_survives_a_primary_crash_through_the_rewriter() {
    for seed in 0..3 {
        let mut sim = tcp_sim(seed, false);
        sim.client.tcp.as_mut().unwrap().guest_opens = true;
        // The SVM's vCPU reaches the connect 30 steps after the PVM's.
        sim.primary.as_mut().unwrap().vm_mut().connect_at = Some(60);
        sim.secondary.as_mut().unwrap().vm_mut().connect_at = Some(90);
        sim.run(1000);
        assert!(sim.client.tcp.as_ref().unwrap().established);
        assert!(sim.client.answered > 100, "{} answers", sim.client.answered);
        // The PVM's ISN reached the rewriter before the SVM's SYN did.
        let svm_syn_at = sim.t - (sim.primary.as_ref().unwrap().vm().regs.steps - 90);
        assert!(
            sim.isn_notices.first().is_some_and(|&t| t < svm_syn_at),
            "primary ISN notices at {:?}, SVM SYN at about {svm_syn_at}",
            sim.isn_notices
        );
        let s = sim.secondary.as_ref().unwrap().status();
        assert!(s.rewrite.unwrap().offsets_learned >= 1);
        sim.kill_primary(Kill::Crash);
        sim.run(1500);
        sim.drain();
        let c = sim.client.tcp.as_ref().unwrap();
        assert_eq!(
            c.out_of_window, 0,
            "the promoted SVM answers in the PVM's sequence space"
        );
        assert!(
            sim.client.answered_after_failover > 100,
            "the same connection goes on"
        );
        let s = sim.secondary.as_ref().unwrap().status();
        assert_eq!(s.phase, Phase::Alone);
        assert_eq!(
            s.checkpoints, 1,
            "only the initial checkpoint: the offset was in use"
        );
        sim.check_survivor();
    }
}

#[test]
fn an_async_primary_can_do_without_block_acks() {
    let mut cfg = config();
    cfg.block_acks = false;
    let mut sim = Sim::new(cfg);
    sim.run(2000);
    sim.drain();
    assert_eq!(sim.acks_seen, 0, "no BlockAck on the wire");
    assert!(sim.checked_checkpoints >= 5 && sim.client.answered > 300);
    sim.check_survivor();
    // With the default, every applied write is acknowledged.
    let mut sim = Sim::new(config());
    sim.run(1000);
    assert!(sim.acks_seen > 50, "{} acks", sim.acks_seen);
}

/// Offset, in the bytes in flight, of the first page data byte of the pre-copy, and that page's address.
fn first_precopy_page_byte(wire: &[u8]) -> (usize, u64) {
    first_page_byte(wire, colo_proto::Kind::PrecopyPages).expect("a pre-copy data page on the wire")
}

/// Offset and address of the first data page of the first `kind` page frame in `wire` (which starts at a
/// frame boundary), in a frame carrying a CRC per page (pre-copy from protocol v3, checkpoint from v4).
fn first_page_byte(wire: &[u8], kind: colo_proto::Kind) -> Option<(usize, u64)> {
    let mut at = 0;
    while wire.len() >= at + 24 {
        let frame = &wire[at..];
        assert_eq!(&frame[..4], b"COLO");
        let body_len = u32::from_le_bytes(frame[12..16].try_into().unwrap()) as usize;
        if u16::from_le_bytes([frame[6], frame[7]]) == kind as u16 {
            let count = u32::from_le_bytes(frame[24 + 12..24 + 16].try_into().unwrap()) as usize;
            // Header, fixed part, descriptors and one CRC per page, then the data pages.
            let data_at = 24 + 16 + 12 * count;
            if body_len + 24 > data_at {
                let descs = &frame[24 + 16..24 + 16 + 8 * count];
                let first = descs
                    .chunks_exact(8)
                    .map(|d| u64::from_le_bytes(d.try_into().unwrap()))
                    .find(|d| d & 1 == 0)?;
                return Some((at + data_at, first));
            }
        }
        at += 24 + body_len;
    }
    None
}

#[test]
fn a_precopy_page_torn_by_a_guest_write_is_sent_again_and_the_pair_stays_identical() {
    let mut sim = Sim::new(config());
    // The page changes under the send: what arrives is not what the page CRC saw, and the guest's write
    // made the page dirty.
    let (at, gpa) = first_precopy_page_byte(&sim.p_end.outgoing());
    sim.p_end.flip_outgoing(at + 5);
    let p = sim.primary.as_mut().unwrap();
    p.vm_mut().write_u64(gpa, 0xfeed);
    sim.run(1000);
    sim.drain();
    let s = sim.secondary.as_ref().unwrap();
    assert_eq!(s.phase(), Phase::Colo);
    // check_checkpoint compared the RAM of both guests at every checkpoint, the torn page included.
    assert!(sim.checked_checkpoints >= 3);
    assert_eq!(s.vm().read_u64(gpa), 0xfeed);
    sim.check_survivor();
}

#[test]
fn a_precopy_page_damaged_in_transit_is_caught_at_the_first_checkpoint() {
    let mut sim = Sim::new(config());
    // The same damage without a guest write: the page is not dirty and never comes again.
    let (at, _) = first_precopy_page_byte(&sim.p_end.outgoing());
    sim.p_end.flip_outgoing(at + 5);
    sim.run(1500);
    sim.drain();
    let s = sim.secondary.as_ref().unwrap();
    assert_eq!(
        s.phase(),
        Phase::Stopped,
        "the secondary never loads a damaged copy"
    );
    assert_eq!(s.status().checkpoints, 0);
    assert!(!sim.promoted);
    let detail = s.status().exit_detail.unwrap();
    assert!(detail.contains("torn pre-copy pages"), "{detail}");
    assert_eq!(sim.primary.as_ref().unwrap().phase(), Phase::Alone);
    sim.check_survivor();
}

#[test]
fn a_checkpoint_page_damaged_in_transit_fails_that_checkpoint_and_the_primary_goes_on_alone() {
    let mut sim = warmed_up_with(0);
    let committed = sim.checked_checkpoints;
    // Protocol v4: the checkpoint's pages carry their own CRCs (taken when the paused primary collected
    // them). The page frames are on the wire once the primary waits for the secondary's answer.
    sim.damage_ram_page_when = Some("waiting for vmstate-received");
    sim.run(2000);
    assert!(
        sim.damage_ram_page_when.is_none(),
        "a checkpoint page was damaged"
    );
    sim.drain();
    let s = sim.secondary.as_ref().unwrap();
    assert_eq!(
        s.phase(),
        Phase::Stopped,
        "the secondary never loads the damaged checkpoint"
    );
    assert!(!sim.promoted);
    let detail = s.status().exit_detail.unwrap();
    assert!(detail.contains("checksum mismatch"), "{detail}");
    assert_eq!(sim.primary.as_ref().unwrap().phase(), Phase::Alone);
    assert!(sim.checked_checkpoints >= committed);
    sim.check_survivor();
}

#[test]
fn rewriter_evictions_ask_the_primary_for_an_early_checkpoint() {
    let mut cfg = config();
    cfg.checkpoint_interval = Duration::from_secs(3600);
    cfg.rewriter.max_connections = 2;
    let mut sim = Sim::new(cfg);
    for vm in [
        sim.primary.as_mut().unwrap().vm_mut(),
        sim.secondary.as_mut().unwrap().vm_mut(),
    ] {
        vm.noise = false;
    }
    sim.run(300);
    let before = sim.primary.as_ref().unwrap().status().checkpoints;
    assert!(before >= 1);
    // Clients open more connections (to a port the guest does not serve) than the rewriter may track.
    let now = sim.now();
    for i in 0..8 {
        let mut src = CLIENT;
        src.port = 40000 + i;
        let mut dst = GUEST;
        dst.port = TCP_PORT + 1;
        let mut spec = TcpSpec::data(src, dst, 1000, 0, &[]);
        spec.flags = tcp_flags::SYN;
        let p = sim.primary.as_mut().unwrap();
        p.client_input(now, Bytes::from(tcp(&spec))).unwrap();
    }
    let mut asked = false;
    for _ in 0..500 {
        sim.step(false);
        let p = sim.primary.as_ref().unwrap();
        asked |= p.last_trigger()
            == Some(colo_pair::Trigger::Secondary(
                colo_proto::WantReason::RewriterFull,
            ));
    }
    let s = sim.secondary.as_ref().unwrap().status();
    assert!(s.rewrite.unwrap().evictions > 0);
    assert!(
        asked,
        "the secondary asked for a checkpoint after evicting connections"
    );
    sim.drain();
    sim.check_survivor();
}

// ---------- re-protection: a primary running alone gets a new secondary ----------

/// How the primary came to run alone before it is re-protected.
#[derive(Clone, Copy, Debug)]
enum Lost {
    Killed(Kill),
    /// The operator's failover command on the primary (the old secondary is told to stop).
    Command,
}

/// A warmed-up pair whose arbiter hands out leases (so a dead holder's grant runs out) loses its
/// secondary as `lost` says; the primary runs alone, then is re-protected with a new one.
fn reprotected(lost: Lost, seed: u64) -> Sim {
    let arbiter = SimArbiter::default();
    arbiter.0.lock().unwrap().ttl_ms = Some(1000);
    let mut sim = Sim::with(config(), seed, Some(arbiter));
    sim.run(1000);
    assert!(sim.checked_checkpoints >= 5);
    match lost {
        Lost::Killed(how) => sim.kill_secondary_when_held = Some(how),
        Lost::Command => {
            let now = sim.now();
            sim.primary.as_mut().unwrap().failover_now(now).unwrap();
        }
    }
    sim.run(1500);
    let p = sim.primary.as_ref().unwrap().status();
    assert_eq!(p.phase, Phase::Alone, "{lost:?}");
    assert!(sim.failed_over);
    if let Lost::Command = lost {
        assert_eq!(sim.secondary.as_ref().unwrap().phase(), Phase::Stopped);
    }
    let (epoch_alone, checkpoints_alone) = (p.epoch, p.checkpoints);
    let answered_alone = sim.client.answered;
    assert!(sim.client.answered_after_failover > 50, "{lost:?}");

    sim.reprotect(seed).unwrap();
    let p = sim.primary.as_ref().unwrap().status();
    assert_eq!(p.phase, Phase::Syncing);
    assert_eq!(p.epoch, 0, "the new secondary's session starts from checkpoint 1");
    assert!(p.exit_detail.is_none());
    assert!(p.disk_sync.is_some(), "the disk is synced again");
    // The old secondary's comparator was emptied (released once, as `Failover`) when it was lost; the new
    // one starts empty, so nothing of it can be released again.
    let c = p.compare.unwrap();
    assert_eq!((c.primary_frames, c.queued, c.released_compared), (0, 0, 0));
    let failover_releases = sim.released.get("failover").copied().unwrap_or(0);
    let mut synced = false;
    for _ in 0..3000 {
        sim.step(false);
        let p = sim.primary.as_ref().unwrap();
        if p.status().disk_sync.is_none() {
            synced = true;
        } else {
            assert_eq!(p.status().epoch, 0, "no checkpoint before the disk is synced");
        }
    }
    assert!(synced);
    let p = sim.primary.as_ref().unwrap().status();
    let s = sim.secondary.as_ref().unwrap().status();
    eprintln!(
        "{lost:?}: primary {p:?}\nsecondary {s:?}\nreleased {:?}",
        sim.released
    );
    assert_eq!((p.phase, s.phase), (Phase::Colo, Phase::Colo), "{lost:?}");
    assert!(p.failover.protected && s.failover.protected);
    assert_eq!(p.epoch, s.epoch);
    // Every checkpoint of the new pair compared RAM, registers and whole disks (`check_checkpoint`).
    assert!(
        sim.checked_checkpoints >= 5,
        "{} checkpoints",
        sim.checked_checkpoints
    );
    assert_eq!(
        p.checkpoints,
        checkpoints_alone + s.checkpoints,
        "counts go on across secondaries"
    );
    assert!(epoch_alone >= 5);
    assert!(!sim.failed_over, "nothing released alone once re-protected");
    assert_eq!(
        sim.released.get("failover").copied().unwrap_or(0),
        failover_releases,
        "nothing more released as the old secondary's held output"
    );
    assert!(sim.client.answered > answered_alone + 100, "the client goes on");
    assert_eq!(sim.client.gate.rejected(), 0);
    sim
}

fn reprotected_then_primary_killed(lost: Lost, seed: u64) {
    let mut sim = reprotected(lost, seed);
    let token_alone = sim.client.gate.highest();
    assert!(
        token_alone > FenceToken::ZERO,
        "the primary won the arbiter when it went alone"
    );
    sim.drain();
    sim.check_survivor();
    // The new secondary takes over from the last checkpoint once the dead primary's lease runs out.
    sim.kill_primary(Kill::Crash);
    sim.run(4000);
    sim.drain();
    let s = sim.secondary.as_ref().unwrap().status();
    eprintln!("{lost:?}: new secondary {s:?}");
    assert_eq!(s.phase, Phase::Alone, "{lost:?}");
    assert!(sim.promoted);
    assert!(sim.client.answered_after_failover > 100);
    assert!(
        sim.client.gate.highest() > token_alone,
        "the next token orders it after the primary"
    );
    assert_eq!(sim.client.gate.rejected(), 0);
    sim.check_survivor();
}

#[test]
fn a_primary_alone_after_a_secondary_crash_is_reprotected_and_the_new_secondary_takes_over() {
    for seed in 0..2 {
        reprotected_then_primary_killed(Lost::Killed(Kill::Crash), seed);
    }
}

#[test]
fn a_primary_alone_after_a_silent_secondary_is_reprotected_and_the_new_secondary_takes_over() {
    reprotected_then_primary_killed(Lost::Killed(Kill::Silent), 1);
}

#[test]
fn a_primary_alone_after_an_operator_failover_is_reprotected_and_the_new_secondary_takes_over() {
    reprotected_then_primary_killed(Lost::Command, 2);
}

#[test]
fn a_reprotected_primary_losing_its_new_secondary_runs_alone_again_and_is_reprotected_again() {
    let mut sim = reprotected(Lost::Killed(Kill::Crash), 4);
    sim.kill_secondary_when_held = Some(Kill::Crash);
    sim.run(1500);
    assert_eq!(sim.primary.as_ref().unwrap().phase(), Phase::Alone);
    assert!(sim.released.get("failover").copied().unwrap_or(0) > 0);
    sim.reprotect(5).unwrap();
    sim.run(2500);
    let p = sim.primary.as_ref().unwrap().status();
    assert_eq!(p.phase, Phase::Colo);
    assert!(sim.checked_checkpoints >= 3);
    sim.drain();
    sim.check_survivor();
}

#[test]
fn a_new_secondary_lost_during_the_resync_leaves_the_primary_alone() {
    // One disk page per driver entry: the sync spans many steps.
    let mut cfg = config();
    cfg.disk_sync_burst = PAGE;
    let mut sim = Sim::new(cfg);
    sim.run(1000);
    sim.kill_secondary(Kill::Crash);
    sim.run(1000);
    sim.reprotect(6).unwrap();
    sim.run(50);
    let p = sim.primary.as_ref().unwrap().status();
    assert_eq!(p.phase, Phase::Syncing);
    assert!(p.disk_sync.is_some_and(|s| s.sent_bytes > 0));
    let answered = sim.client.answered;
    sim.kill_secondary(Kill::Crash);
    sim.run(1000);
    sim.drain();
    let p = sim.primary.as_ref().unwrap().status();
    assert_eq!(p.phase, Phase::Alone);
    assert!(sim.primary.as_ref().unwrap().vm().running);
    assert!(p.disk_sync.is_none(), "the sync was given up");
    assert!(sim.client.answered > answered + 100);
    sim.check_survivor();
}

#[test]
fn a_renewal_refused_during_a_resync_gives_the_sync_up_and_output_flows_again() {
    let arbiter = SimArbiter::default();
    arbiter.0.lock().unwrap().ttl_ms = Some(1000);
    // One disk page per driver entry: the resync spans several lease renewals.
    let mut cfg = config();
    cfg.disk_sync_burst = PAGE;
    let mut sim = Sim::with(cfg, 3, Some(arbiter.clone()));
    sim.run(1000);
    sim.kill_secondary_when_held = Some(Kill::Crash);
    sim.run(1500);
    assert_eq!(sim.primary.as_ref().unwrap().phase(), Phase::Alone);
    sim.reprotect(3).unwrap();
    // The arbiter forgets the primary (a restarted witness, a lost etcd lease): another node holds the key.
    {
        let mut a = arbiter.0.lock().unwrap();
        a.next += 1;
        a.holder = Some(("intruder", FenceToken(a.next)));
        a.expires = u64::MAX;
    }
    let mut gave_up = false;
    for _ in 0..3000 {
        sim.step(false);
        let p = sim.primary.as_ref().unwrap().status();
        assert!(
            p.phase != Phase::Colo,
            "the resync finished before a renewal was refused"
        );
        if p.phase != Phase::Syncing {
            gave_up = true;
            break;
        }
    }
    assert!(gave_up, "a refused renewal ends the resync");
    // The key comes free again: the primary wins it back and its output, held meanwhile, flows.
    arbiter.0.lock().unwrap().holder = None;
    let answered = sim.client.answered;
    sim.run(2000);
    sim.drain();
    let p = sim.primary.as_ref().unwrap().status();
    assert_eq!(p.phase, Phase::Alone);
    assert!(sim.primary.as_ref().unwrap().vm().running);
    assert!(sim.client.answered > answered + 100, "output flows again");
    assert_eq!(sim.client.gate.rejected(), 0);
    sim.check_survivor();
}

#[test]
fn a_failover_notice_from_a_secondary_still_syncing_loses_the_link_not_the_guest() {
    // One disk page per driver entry: the initial sync spans many steps.
    let mut cfg = config();
    cfg.disk_sync_burst = PAGE;
    let mut sim = Sim::new(cfg);
    assert_eq!(sim.primary.as_ref().unwrap().phase(), Phase::Syncing);
    // A misbehaving secondary claims to take over before it has a copy of the guest.
    channel(&sim.s_end)
        .send(&Message::FailoverNotice {
            reason: colo_proto::Reason::Operator,
        })
        .unwrap();
    sim.run(1000);
    let p = sim.primary.as_ref().unwrap();
    assert_eq!(p.phase(), Phase::Alone, "the primary keeps the only copy running");
    assert!(p.vm().running);
    assert!(p.status().exit_detail.unwrap().contains("still syncing"));
}

#[test]
fn reprotect_is_refused_unless_the_primary_runs_alone() {
    use colo_pair::PairError;
    // A new pair still syncing, and a protected one.
    let mut sim = Sim::new(config());
    let refused = |sim: &mut Sim| {
        let now = sim.now();
        let (p_end, _s_end) = pipe();
        let p = sim.primary.as_mut().unwrap();
        p.reprotect(
            now,
            Box::new(channel(&p_end)),
            Some(InitialSync::new(DISK, PAGE).unwrap()),
        )
    };
    assert!(matches!(
        refused(&mut sim),
        Err(PairError::BadCommand { state: "syncing", .. })
    ));
    sim.run(1000);
    assert!(matches!(
        refused(&mut sim),
        Err(PairError::BadCommand { state: "colo", .. })
    ));
    // The refusals changed nothing: the pair goes on checkpointing.
    let before = sim.checked_checkpoints;
    sim.run(500);
    assert!(sim.checked_checkpoints > before);
    assert_eq!(sim.primary.as_ref().unwrap().phase(), Phase::Colo);
    // Alone, but over a version-2 link a disk sync is impossible: typed, and the primary stays alone.
    sim.kill_secondary(Kill::Crash);
    sim.run(1000);
    let now = sim.now();
    let (p_end, _s_end) = pipe();
    let mut v2 = channel(&p_end);
    v2.set_version(2);
    let p = sim.primary.as_mut().unwrap();
    let r = p.reprotect(now, Box::new(v2), Some(InitialSync::new(DISK, PAGE).unwrap()));
    assert!(matches!(r, Err(PairError::NeedsVersion { version: 2, .. })));
    assert_eq!(p.phase(), Phase::Alone);
    sim.run(500);
    sim.drain();
    sim.check_survivor();
    // A guest that shut down is not protected again.
    sim.client.shutdown_requested = true;
    sim.run(1000);
    assert_eq!(sim.primary.as_ref().unwrap().phase(), Phase::ShutDown);
    assert!(matches!(
        sim.reprotect(7),
        Err(PairError::BadCommand {
            state: "shut down",
            ..
        })
    ));
}

#[test]
fn reprotect_is_refused_to_a_primary_that_stopped_for_a_takeover() {
    // The secondary took the guest over by command: this copy stopped for good and is not protected again.
    let mut sim = warmed_up();
    let now = sim.now();
    let notice = Message::FailoverNotice {
        reason: colo_proto::Reason::Operator,
    };
    sim.primary.as_mut().unwrap().handle_message(now, notice).unwrap();
    let r = sim.reprotect(8);
    assert!(matches!(
        r,
        Err(colo_pair::PairError::BadCommand { state: "stopped", .. })
    ));
    let p = sim.primary.as_ref().unwrap();
    assert_eq!(p.phase(), Phase::Stopped);
    assert!(!p.vm().running);
}

#[test]
fn sync_mode_writes_of_a_reprotected_primary_complete_on_the_new_secondarys_acks() {
    // The new secondary numbers its acks from 0 while the primary's write ids go on: every completion is
    // checked against what the new secondary applied (`step_primary`), and the guest, whose answers wait
    // for its writes, keeps answering.
    let mut sim = Sim::build(config(), 3, None, sync_mode(), Opts::default());
    sim.run(1000);
    sim.kill_secondary(Kill::Crash);
    sim.run(1000);
    assert_eq!(sim.primary.as_ref().unwrap().phase(), Phase::Alone);
    sim.reprotect(9).unwrap();
    let (completed, waited, answered) = (
        sim.writes_completed,
        sim.primary.as_ref().unwrap().vm().waited,
        sim.client.answered,
    );
    sim.run(2000);
    let p = sim.primary.as_ref().unwrap();
    assert_eq!(p.phase(), Phase::Colo);
    assert!(p.vm().first_awaiting.is_some_and(|w| w.0 > 0), "the ids went on");
    assert!(
        p.vm().waited > waited + 10,
        "writes waited for the new secondary's acks"
    );
    assert!(sim.writes_completed > completed + 10);
    assert!(sim.client.answered > answered + 100);
    assert!(sim.checked_checkpoints >= 5);
    sim.drain();
    sim.check_survivor();
}
