//! The checkpoint channel between the two processes: one TCP connection carrying colo-proto frames.
//!
//! - [`SharedLink`] is the sending half colo-pair drives ([`colo_pair::Link`]); the same lock serialises a
//!   heartbeat thread, so heartbeats keep flowing while the driver thread is busy with something other than
//!   the link (a RAM cache flush, loading state, an arbiter call). A driver that makes no progress for
//!   [`STALL_LIMIT`] stops those heartbeats, so a wedged process is still detected.
//! - [`spawn_reader`] is the receiving half: a thread that hands each message to the driver, in order, and
//!   stops reading (TCP backpressure) while the driver is far behind.
//! - Fault injection for tests: the `kill_in_checkpoint` argument of [`SharedLink::new`] makes this process die by SIGKILL after
//!   sending about half of one checkpoint's pages.

use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use colo_pair::Link;
use colo_proto::{Channel, Message, PagePhase};

use super::driver::Event;

/// Most received messages waiting for the driver before the reader stops reading.
pub const MAX_PENDING_MESSAGES: usize = 64;
/// A driver thread that has not come round its loop for this long gets no more heartbeats sent for it.
pub const STALL_LIMIT: Duration = Duration::from_secs(10);
const PAGE: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The next [`SharedLink::id`].
static NEXT_LINK_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
struct Inner {
    /// Tells this link's messages from an earlier link's (a re-protected primary has had several).
    id: u64,
    chan: Mutex<Channel<TcpStream>>,
    socket: TcpStream,
    origin: Instant,
    /// Milliseconds since `origin` of the last write.
    last_send: AtomicU64,
    /// Milliseconds since `origin` when the driver last came round its loop.
    driver_tick: AtomicU64,
    closed: AtomicBool,
    kill_in_checkpoint: Option<u64>,
    heartbeats: AtomicU64,
    /// Milliseconds since `origin` (plus one) when the write now blocking began; 0 when none is.
    writing_since: AtomicU64,
    /// Milliseconds since `origin` of the last message received.
    last_recv: AtomicU64,
}

impl Inner {
    fn ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }
}

/// The sending half of the channel, shared by the driver (through colo-pair) and the heartbeat thread.
#[derive(Debug, Clone)]
pub struct SharedLink {
    inner: Arc<Inner>,
}

impl SharedLink {
    /// Wraps a channel whose handshake is done. `kill_in_checkpoint`: the test hook (see the module docs).
    pub fn new(chan: Channel<TcpStream>, kill_in_checkpoint: Option<u64>) -> std::io::Result<Self> {
        let socket = chan.get_ref().try_clone()?;
        let origin = Instant::now();
        Ok(Self {
            inner: Arc::new(Inner {
                id: NEXT_LINK_ID.fetch_add(1, Ordering::Relaxed),
                chan: Mutex::new(chan),
                socket,
                origin,
                last_send: AtomicU64::new(0),
                driver_tick: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                kill_in_checkpoint,
                heartbeats: AtomicU64::new(0),
                writing_since: AtomicU64::new(0),
                last_recv: AtomicU64::new(0),
            }),
        })
    }

    /// Shuts the connection down both ways (the peer sees the link closed; a blocked send or receive on
    /// either half returns at once). Idempotent.
    pub fn close(&self) {
        if !self.inner.closed.swap(true, Ordering::SeqCst) {
            let _ = self.inner.socket.shutdown(Shutdown::Both);
        }
    }

    /// This link's number, unique in the process: the reader tags what it receives with it.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Whether [`SharedLink::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// The driver came round its loop.
    pub fn driver_tick(&self) {
        self.inner.driver_tick.store(self.inner.ms(), Ordering::Relaxed);
    }

    /// Heartbeats the heartbeat thread sent.
    pub fn heartbeats(&self) -> u64 {
        self.inner.heartbeats.load(Ordering::Relaxed)
    }

    /// A message arrived from the peer (the reader thread calls this).
    pub fn received(&self) {
        self.inner.last_recv.store(self.inner.ms(), Ordering::Relaxed);
    }

    /// Starts the heartbeat thread: a heartbeat whenever nothing was sent for `interval`, as long as the
    /// driver is alive and the link open. It is also the watchdog of blocked writes: a write that has not
    /// finished for `silence` while nothing arrived from the peer for as long (a peer that stopped reading,
    /// or a host gone without a reset) closes the link, so the driver gets an error and fails over instead
    /// of hanging until the socket's send timeout.
    pub fn spawn_heartbeats(&self, interval: Duration, silence: Duration) -> std::io::Result<()> {
        let inner = self.inner.clone();
        let interval_ms = interval.as_millis().max(1) as u64;
        let silence_ms = silence.as_millis().max(1) as u64;
        let link = self.clone();
        std::thread::Builder::new()
            .name("colo-heartbeat".into())
            .spawn(move || {
                let mut seq = 1u64 << 48;
                while !inner.closed.load(Ordering::SeqCst) {
                    std::thread::sleep(interval / 2);
                    let now = inner.ms();
                    let since = inner.writing_since.load(Ordering::Relaxed);
                    if since != 0
                        && now.saturating_sub(since - 1) > silence_ms
                        && now.saturating_sub(inner.last_recv.load(Ordering::Relaxed)) > silence_ms
                    {
                        tracing::warn!(
                            "COLO: a write to the peer has been blocked for {} ms and the peer silent as long: \
                             closing the link",
                            now.saturating_sub(since - 1)
                        );
                        link.close();
                        return;
                    }
                    let stalled = now.saturating_sub(inner.driver_tick.load(Ordering::Relaxed))
                        > STALL_LIMIT.as_millis() as u64;
                    if stalled || now.saturating_sub(inner.last_send.load(Ordering::Relaxed)) < interval_ms {
                        continue;
                    }
                    // The driver holds the lock while it writes: then the peer hears from it anyway.
                    let Ok(mut chan) = inner.chan.try_lock() else {
                        continue;
                    };
                    if inner.closed.load(Ordering::SeqCst) {
                        return;
                    }
                    // Bytes still queued towards the peer: they reach it before a heartbeat would (and every
                    // message counts as one), and a heartbeat written into a full buffer would block this
                    // thread with the lock held (the driver stuck behind it, and no watchdog). Only write
                    // into an empty queue, which never blocks.
                    if !matches!(unsent_bytes(&inner.socket), Ok(0)) || chan.version() < 2 {
                        // (Protocol v1 has no heartbeat message.)
                        continue;
                    }
                    seq += 1;
                    inner.writing_since.store(inner.ms() + 1, Ordering::Relaxed);
                    let sent = chan.send(&Message::Heartbeat { seq });
                    inner.writing_since.store(0, Ordering::Relaxed);
                    drop(chan);
                    match sent {
                        Ok(()) => {
                            inner.last_send.store(inner.ms(), Ordering::Relaxed);
                            inner.heartbeats.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e @ colo_proto::Error::Io(_)) => {
                            // A failed write may have left part of a frame on the stream: nothing after it
                            // could be decoded. End the link (the peer sees a closed stream, not garbage).
                            tracing::warn!("COLO: heartbeat to the peer failed ({e}): closing the link");
                            link.close();
                            return;
                        }
                        Err(e) => tracing::warn!("COLO: heartbeat not sent: {e}"),
                    }
                }
            })?;
        Ok(())
    }

    /// Runs `f` on the channel under the lock, watched by the watchdog. A failed send closes the link: it
    /// may have written part of a frame, and the peer must see the stream end rather than decode whatever
    /// the next writer (driver or heartbeat thread) puts after it.
    fn with_chan(
        &self,
        f: impl FnOnce(&mut Channel<TcpStream>) -> Result<(), colo_proto::Error>,
    ) -> Result<(), colo_proto::Error> {
        self.check_open()?;
        let mut chan = lock(&self.inner.chan);
        self.inner
            .writing_since
            .store(self.inner.ms() + 1, Ordering::Relaxed);
        let r = f(&mut chan);
        self.inner.writing_since.store(0, Ordering::Relaxed);
        if matches!(r, Err(colo_proto::Error::Io(_))) {
            // Under the lock: no other writer can slip in between the failure and the shutdown. (Other
            // errors are refusals to encode, before anything was written.)
            self.close();
        }
        drop(chan);
        self.sent();
        r
    }

    fn check_open(&self) -> Result<(), colo_proto::Error> {
        if self.is_closed() {
            Err(colo_proto::Error::Closed)
        } else {
            Ok(())
        }
    }

    fn sent(&self) {
        self.inner.last_send.store(self.inner.ms(), Ordering::Relaxed);
    }

    fn die_after_half(
        &self,
        chan: &mut Channel<TcpStream>,
        epoch: u64,
        page_size: u32,
        pages: &[(u64, &[u8])],
    ) -> ! {
        let (half, sent, total) = first_half(pages);
        let _ = chan.send_pages(PagePhase::Checkpoint, epoch, page_size, &half);
        tracing::error!(
            "COLO: fault injection: dying by SIGKILL in checkpoint {epoch} after {sent} of {total} pages"
        );
        // SAFETY: raise() with a valid signal number; SIGKILL ends the process here, as a crash would.
        unsafe { libc::raise(libc::SIGKILL) };
        std::process::abort()
    }
}

/// Bytes written to `socket` that the peer has not acknowledged yet (Linux `SIOCOUTQ`).
fn unsent_bytes(socket: &TcpStream) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (the same request as SIOCOUTQ) on an open TCP socket writes one c_int through the
    // pointer, which points at `n`, alive for the whole call; the fd stays open as long as `socket`.
    let r = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// The first half (by pages, rounded down) of a page list whose entries are single pages, runs of whole
/// pages, or empty zero-page markers; returns it with its page count and the total.
fn first_half<'a>(pages: &[(u64, &'a [u8])]) -> (Vec<(u64, &'a [u8])>, usize, usize) {
    let total: usize = pages.iter().map(|(_, d)| (d.len() / PAGE).max(1)).sum();
    let mut half = Vec::new();
    let mut left = total / 2;
    for &(gpa, data) in pages {
        if left == 0 {
            break;
        }
        let n = (data.len() / PAGE).max(1);
        if n <= left {
            half.push((gpa, data));
            left -= n;
        } else {
            half.push((gpa, &data[..left * PAGE]));
            left = 0;
        }
    }
    (half, total / 2, total)
}

impl Link for SharedLink {
    fn send(&mut self, msg: &Message) -> Result<(), colo_proto::Error> {
        self.with_chan(|c| c.send(msg))
    }

    fn send_pages(
        &mut self,
        phase: PagePhase,
        epoch: u64,
        page_size: u32,
        pages: &[(u64, &[u8])],
        page_crcs: Option<&[u32]>,
    ) -> Result<(), colo_proto::Error> {
        self.with_chan(|chan| {
            if phase == PagePhase::Checkpoint && self.inner.kill_in_checkpoint == Some(epoch) {
                self.die_after_half(chan, epoch, page_size, pages);
            }
            // Pre-copy frames (v3) carry a CRC over their descriptors and one per page, so pages the running
            // guest writes while they are sent are reported torn, not refused (the dirty log sends them
            // again).
            match page_crcs {
                Some(crcs) => chan.send_pages_with_crcs(phase, epoch, page_size, pages, crcs),
                None => chan.send_pages(phase, epoch, page_size, pages),
            }
        })
    }

    fn send_vmstate(
        &mut self,
        epoch: u64,
        devices: &[(u32, &[u8])],
        chunk: usize,
    ) -> Result<(), colo_proto::Error> {
        self.with_chan(|c| c.send_vmstate(epoch, devices, chunk))
    }

    fn version(&self) -> u16 {
        lock(&self.inner.chan).version()
    }
}

/// Starts the receiving half: every message (or the error that ends the stream) goes to the driver as
/// [`Event::Peer`], tagged with `link`'s [`id`](SharedLink::id). `pending` counts messages the driver has not taken yet; the reader waits while it is
/// above [`MAX_PENDING_MESSAGES`].
pub fn spawn_reader(
    mut chan: Channel<TcpStream>,
    events: Sender<Event>,
    pending: Arc<AtomicUsize>,
    link: SharedLink,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("colo-reader".into())
        .spawn(move || {
            loop {
                while pending.load(Ordering::Relaxed) >= MAX_PENDING_MESSAGES {
                    if link.is_closed() {
                        return;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                let r = chan.recv();
                link.received();
                let end = r.is_err();
                pending.fetch_add(1, Ordering::Relaxed);
                let ev = Event::Peer {
                    link: link.id(),
                    msg: r,
                };
                if events.send(ev).is_err() || end {
                    return;
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    fn v3(s: TcpStream) -> Channel<TcpStream> {
        let mut c = Channel::new(s);
        c.set_version(colo_proto::PROTOCOL_VERSION);
        c
    }

    /// A link to a peer that accepted the connection and never reads, with the socket's send queue
    /// already full (so the next write blocks).
    fn link_to_a_frozen_peer() -> (SharedLink, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (peer, _) = l.accept().unwrap();
        // The send timeout the VMM sets: the watchdog must act long before it.
        ours.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut filler = ours.try_clone().unwrap();
        filler.set_nonblocking(true).unwrap();
        let chunk = [0u8; 64 << 10];
        // Loopback moves data on into the peer's (growing) receive buffer: fill until it stays full.
        let mut full_rounds = 0;
        while full_rounds < 5 {
            let mut wrote = false;
            while filler.write(&chunk).is_ok() {
                wrote = true;
            }
            full_rounds = if wrote { 0 } else { full_rounds + 1 };
            std::thread::sleep(Duration::from_millis(10));
        }
        filler.set_nonblocking(false).unwrap();
        (SharedLink::new(v3(ours), None).unwrap(), peer)
    }

    #[test]
    fn a_write_stuck_behind_a_silent_peer_is_ended_by_the_watchdog() {
        let (link, _peer) = link_to_a_frozen_peer();
        link.driver_tick();
        link.spawn_heartbeats(Duration::from_millis(20), Duration::from_millis(300))
            .unwrap();
        // Let the heartbeat thread come round a few times with the queue full: it must not block in a
        // write holding the lock (then nobody would watch the driver's write below).
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        let mut l = link.clone();
        let state = vec![7u8; 1 << 20];
        let r = l.send_vmstate(1, &[(1, &state)], 64 << 10);
        assert!(r.is_err(), "the blocked send fails");
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "the watchdog closed the link after {:?}, not the 10 s send timeout",
            t0.elapsed()
        );
        assert!(link.is_closed());
    }

    #[test]
    fn a_failed_send_closes_the_link() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (peer, _) = l.accept().unwrap();
        ours.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut link = SharedLink::new(v3(ours), None).unwrap();
        drop(peer);
        // Writes to a peer that is gone fail within a few attempts (RST, then EPIPE).
        let mut failed = false;
        for seq in 0..100 {
            if link.send(&Message::Heartbeat { seq }).is_err() {
                failed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(failed);
        assert!(
            link.is_closed(),
            "a failed write may leave half a frame: the link must end there"
        );
    }

    #[test]
    fn a_message_refused_before_writing_leaves_the_link_open() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _peer = l.accept().unwrap();
        // Protocol v1 has no heartbeat: the encoder refuses it and nothing reaches the stream.
        let mut link = SharedLink::new(Channel::new(ours), None).unwrap();
        assert!(link.send(&Message::Heartbeat { seq: 1 }).is_err());
        assert!(!link.is_closed());
    }

    #[test]
    fn the_fault_hook_sends_half_of_the_pages_splitting_a_run() {
        let run = vec![1u8; 4 * PAGE];
        let one = vec![2u8; PAGE];
        let pages: Vec<(u64, &[u8])> = vec![(0, &one), (0x1000, &[]), (0x10000, &run), (0x20000, &one)];
        let (half, sent, total) = first_half(&pages);
        assert_eq!((sent, total), (3, 7));
        assert_eq!(half.len(), 3);
        assert_eq!(half[2], (0x10000, &run[..PAGE]));
        let n: usize = half.iter().map(|(_, d)| (d.len() / PAGE).max(1)).sum();
        assert_eq!(n, 3);
        assert_eq!(first_half(&[]).0.len(), 0);
        assert_eq!(
            first_half(&[(0, &one[..])]).1,
            0,
            "one page: none sent, then the process dies"
        );
    }
}
