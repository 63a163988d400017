//! The guest's NIC in a COLO pair, and the host's port on the client network.
//!
//! [`NicPort`] is the NIC's backend: every frame the guest sends goes to the driver thread (which gives it
//! to the pair: comparator on the primary, rewriter and forwarding on the secondary), and frames the pair
//! hands back as `Output::ToGuest` wait in an [`RxQueue`] until the NIC takes them. The queue is part of
//! the checkpointed state (see [`super::vm::ColoVm`]): frames the primary's guest has not taken yet at a
//! checkpoint are exactly the frames the secondary's guest must find queued after loading it.
//!
//! [`SwitchPort`] is the host's port on the client network (the mini-VMM's Unix datagram switch): the
//! primary reads client frames from it and writes released output to it; the secondary attaches it only
//! when it is promoted.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::driver::Event;
use crate::devices::backend::NetBackend;

/// Most frames waiting for the guest; more are dropped (and counted) like a full NIC queue on a wire.
pub const MAX_RX_FRAMES: usize = 1024;
/// Most guest frames waiting for the driver; more are refused (the NIC counts a TX error, the guest's TCP
/// retransmits).
pub const MAX_TX_FRAMES: usize = 4096;
/// Largest frame kept in the receive queue or its saved state.
pub const MAX_FRAME: usize = 16 << 10;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Frames for the guest, waiting for the NIC.
#[derive(Debug)]
pub struct RxQueue {
    frames: Mutex<VecDeque<Bytes>>,
    ready: EventFd,
    dropped: AtomicU64,
}

impl RxQueue {
    /// An empty queue.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            frames: Mutex::new(VecDeque::new()),
            ready: EventFd::new(libc::EFD_NONBLOCK)?,
            dropped: AtomicU64::new(0),
        })
    }

    /// Queues a frame for the guest; false (and counted) if the queue is full or the frame too large.
    pub fn push(&self, frame: Bytes) -> bool {
        let mut q = lock(&self.frames);
        if q.len() >= MAX_RX_FRAMES || frame.len() > MAX_FRAME {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        q.push_back(frame);
        let _ = self.ready.write(1);
        true
    }

    fn pop_into(&self, buf: &mut [u8]) -> Option<usize> {
        let mut q = lock(&self.frames);
        let n = loop {
            match q.pop_front() {
                Some(f) if f.len() <= buf.len() => {
                    buf[..f.len()].copy_from_slice(&f);
                    break Some(f.len());
                }
                Some(_) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                None => break None,
            }
        };
        if q.is_empty() {
            // Reset the eventfd's counter (EAGAIN when already zero).
            let _ = self.ready.read();
        }
        n
    }

    /// The frames waiting now, oldest first.
    pub fn snapshot(&self) -> Vec<Bytes> {
        lock(&self.frames).iter().cloned().collect()
    }

    /// Replaces the waiting frames (loading a checkpoint).
    pub fn replace(&self, frames: Vec<Bytes>) {
        let mut q = lock(&self.frames);
        q.clear();
        q.extend(frames.into_iter().take(MAX_RX_FRAMES));
        if q.is_empty() {
            let _ = self.ready.read();
        } else {
            let _ = self.ready.write(1);
        }
    }

    /// Frames dropped because the queue was full or a frame too large.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Encodes the waiting frames: `u32` count, then per frame a `u32` length and the bytes.
    pub fn encode(frames: &[Bytes]) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + frames.iter().map(|f| f.len() + 4).sum::<usize>());
        out.extend_from_slice(&(frames.len() as u32).to_le_bytes());
        for f in frames {
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    /// Decodes [`RxQueue::encode`]'s output, refusing anything out of bounds or with trailing bytes.
    pub fn decode(mut b: &[u8]) -> Result<Vec<Bytes>, String> {
        fn u32_at(b: &mut &[u8]) -> Result<usize, String> {
            let (n, rest) = b.split_first_chunk::<4>().ok_or("truncated")?;
            *b = rest;
            Ok(u32::from_le_bytes(*n) as usize)
        }
        let count = u32_at(&mut b)?;
        if count > MAX_RX_FRAMES {
            return Err(format!("{count} queued frames (at most {MAX_RX_FRAMES})"));
        }
        let mut frames = Vec::with_capacity(count);
        for _ in 0..count {
            let len = u32_at(&mut b)?;
            if len > MAX_FRAME || len > b.len() {
                return Err(format!("frame of {len} bytes with {} left", b.len()));
            }
            let (f, rest) = b.split_at(len);
            frames.push(Bytes::copy_from_slice(f));
            b = rest;
        }
        if !b.is_empty() {
            return Err(format!("{} trailing bytes", b.len()));
        }
        Ok(frames)
    }
}

/// The NIC's backend in a pair: TX to the driver thread, RX from the [`RxQueue`].
#[derive(Debug)]
pub struct NicPort {
    events: Sender<Event>,
    tx_waiting: Arc<AtomicUsize>,
    rx: Arc<RxQueue>,
}

impl NicPort {
    /// A port that sends guest frames as [`Event::GuestTx`] on `events` (counting them in `tx_waiting`,
    /// which the driver decrements) and receives from `rx`.
    pub fn new(events: Sender<Event>, tx_waiting: Arc<AtomicUsize>, rx: Arc<RxQueue>) -> Self {
        Self {
            events,
            tx_waiting,
            rx,
        }
    }
}

impl NetBackend for NicPort {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.tx_waiting.load(Ordering::Relaxed) >= MAX_TX_FRAMES {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "COLO driver behind; frame refused",
            ));
        }
        self.tx_waiting.fetch_add(1, Ordering::Relaxed);
        self.events
            .send(Event::GuestTx(Bytes::copy_from_slice(frame)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "COLO driver gone"))
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(self.rx.pop_into(buf))
    }

    fn poll_fd(&self) -> RawFd {
        self.rx.ready.as_raw_fd()
    }
}

/// The host's port on the switch (client network).
#[derive(Debug)]
pub struct SwitchPort {
    sock: UnixDatagram,
    path: PathBuf,
    send_errors: AtomicU64,
    stop: Arc<AtomicBool>,
    /// Client frames handed to the driver and not taken yet.
    waiting: Arc<AtomicUsize>,
    /// Client frames dropped because too many were waiting (a full NIC queue on a wire; TCP retransmits).
    dropped: Arc<AtomicU64>,
}

impl SwitchPort {
    /// Binds `local` (a stale socket is replaced), attaches to the switch at `switch` and registers.
    pub fn connect(local: &Path, switch: &Path) -> io::Result<Self> {
        let _ = std::fs::remove_file(local);
        let sock = UnixDatagram::bind(local)?;
        sock.connect(switch)?;
        // An empty datagram registers the port with the switch.
        sock.send(&[])?;
        Ok(Self {
            sock,
            path: local.to_path_buf(),
            send_errors: AtomicU64::new(0),
            stop: Arc::new(AtomicBool::new(false)),
            waiting: Arc::default(),
            dropped: Arc::default(),
        })
    }

    /// Puts a frame on the client network. A frame the switch cannot take is lost like on a wire (TCP
    /// retransmits it) and counted.
    pub fn send(&self, frame: &[u8]) {
        if let Err(e) = self.sock.send(frame)
            && self.send_errors.fetch_add(1, Ordering::Relaxed) == 0
        {
            tracing::warn!("switch port: send failed: {e}");
        }
    }

    /// Frames that could not be sent.
    pub fn send_errors(&self) -> u64 {
        self.send_errors.load(Ordering::Relaxed)
    }

    /// Client frames dropped because the driver was [`MAX_RX_FRAMES`] behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The driver took one client frame.
    pub fn taken(&self) {
        self.waiting.fetch_sub(1, Ordering::Relaxed);
    }

    /// Starts a thread that hands every frame from the switch to the driver as [`Event::Client`] (the
    /// driver calls [`SwitchPort::taken`] for each).
    pub fn spawn_reader(&self, events: Sender<Event>) -> io::Result<()> {
        let sock = self.sock.try_clone()?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = self.stop.clone();
        let (waiting, dropped) = (self.waiting.clone(), self.dropped.clone());
        std::thread::Builder::new()
            .name("colo-switch".into())
            .spawn(move || {
                let mut buf = vec![0u8; MAX_FRAME];
                while !stop.load(Ordering::Relaxed) {
                    match sock.recv(&mut buf) {
                        Ok(0) => {} // the switch's keepalive
                        Ok(_) if waiting.load(Ordering::Relaxed) >= MAX_RX_FRAMES => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(n) => {
                            waiting.fetch_add(1, Ordering::Relaxed);
                            if events
                                .send(Event::Client(Bytes::copy_from_slice(&buf[..n])))
                                .is_err()
                            {
                                return;
                            }
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock
                                    | io::ErrorKind::TimedOut
                                    | io::ErrorKind::Interrupted
                            ) => {}
                        Err(e) => {
                            tracing::warn!("switch port: receive failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
        Ok(())
    }
}

impl Drop for SwitchPort {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_state_round_trips_and_bad_state_is_refused() {
        let frames = vec![
            Bytes::from_static(b"abc"),
            Bytes::new(),
            Bytes::from(vec![7u8; 1500]),
        ];
        let enc = RxQueue::encode(&frames);
        assert_eq!(RxQueue::decode(&enc).unwrap(), frames);
        for cut in 0..enc.len() {
            assert!(RxQueue::decode(&enc[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = enc.clone();
        trailing.push(0);
        assert!(RxQueue::decode(&trailing).is_err());
        assert!(RxQueue::decode(&u32::MAX.to_le_bytes()).is_err());
        let mut huge = 1u32.to_le_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(RxQueue::decode(&huge).is_err());
    }

    #[test]
    fn queue_feeds_the_nic_in_order_and_replace_loads_a_checkpoint() {
        let q = Arc::new(RxQueue::new().unwrap());
        let (tx, _rx) = std::sync::mpsc::channel();
        let mut port = NicPort::new(tx, Arc::default(), q.clone());
        assert!(q.push(Bytes::from_static(b"one")));
        assert!(q.push(Bytes::from_static(b"two")));
        let mut buf = [0u8; 64];
        assert_eq!(port.recv(&mut buf).unwrap(), Some(3));
        assert_eq!(&buf[..3], b"one");
        q.replace(vec![Bytes::from_static(b"x"), Bytes::from_static(b"yz")]);
        assert_eq!(q.snapshot().len(), 2);
        assert_eq!(port.recv(&mut buf).unwrap(), Some(1));
        assert_eq!(port.recv(&mut buf).unwrap(), Some(2));
        assert_eq!(port.recv(&mut buf).unwrap(), None);
        for _ in 0..MAX_RX_FRAMES {
            assert!(q.push(Bytes::from_static(b"f")));
        }
        assert!(!q.push(Bytes::from_static(b"f")), "a full queue refuses");
        assert_eq!(q.dropped(), 1);
    }
}
