//! Blocking framed channel over a byte stream (TCP, Unix stream socket, or any `Read + Write`).
//!
//! Sending: every frame goes out in one vectored write of the header, the small body prefix (descriptors)
//! and the borrowed bulk slices (pages, device state); nothing is staged in an intermediate buffer. The body
//! CRC is computed just before the write, batch by batch, so the page data is still in cache when the kernel
//! copies it.
//!
//! Receiving: the header is read and validated (including the body cap) before anything is allocated for
//! the body; bodies are read into buffers taken from a small pool and handed out as zero-copy `Bytes`. A
//! buffer returns to the pool when the last `Bytes` slice of it is dropped, so a receiver that drops pages
//! promptly (after copying them into its RAM cache) reuses the same few buffers forever.
//!
//! A `Channel` serves one direction at a time. For full duplex on a socket, clone the socket
//! (`TcpStream::try_clone`) and make one channel per direction.

use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::frame::{DEFAULT_MAX_BODY, FrameHeader, HEADER_LEN, Kind, MIN_PROTOCOL_VERSION};
use crate::handshake::{self, LocalConfig, Negotiated};
use crate::message::{self, DeviceStateChunk, Message};

/// The most slices one `writev` takes on Linux.
const IOV_MAX: usize = 1024;
/// Default number of pages per batch frame: 256 pages of 4 KiB = 1 MiB, about one L2 cache, so the kernel
/// copies page data that the CRC pass has just brought into cache. (Measured with the `wire_throughput`
/// example: 64 to 1022 pages per frame are within the machine's noise of each other; small frames cost more
/// syscalls, frames much larger than L2 leave the CRC pass and the copy to meet in L3.)
pub const DEFAULT_BATCH_PAGES: usize = 256;
/// Most pages per batch frame (one writev: header, prefix and the pages).
pub const MAX_BATCH_PAGES: usize = IOV_MAX - 2;
/// Receive buffers kept for reuse.
const POOL_SIZE: usize = 8;
/// Buffers larger than this (a rare huge device-state chunk) are freed instead of pooled, so the pool holds
/// at most `POOL_SIZE * POOL_MAX_BUF` bytes.
const POOL_MAX_BUF: usize = 8 << 20;

/// Which kind of page batch [`Channel::send_pages`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagePhase {
    /// [`Message::RamPages`]: inside a checkpoint, guests paused.
    Checkpoint,
    /// [`Message::PrecopyPages`]: while the guests run (protocol v2).
    Precopy,
}

impl PagePhase {
    /// The frame kind of this phase's page batches.
    pub fn kind(self) -> Kind {
        match self {
            PagePhase::Checkpoint => Kind::RamPages,
            PagePhase::Precopy => Kind::PrecopyPages,
        }
    }

    /// Whether frames of this phase carry a CRC32 per page in protocol `version` (pre-copy from version 3,
    /// checkpoint from version 4): the pages' CRCs ([`crate::page_crc`]) are then worth taking where they
    /// are first read, for [`Channel::send_pages_with_crcs`].
    pub fn carries_page_crcs(self, version: u16) -> bool {
        crate::frame::carries_page_crcs(self.kind(), version)
    }
}

type Pool = Arc<Mutex<Vec<Vec<u8>>>>;

/// A receive buffer that goes back to its pool when the last `Bytes` referring to it is dropped.
struct PooledBuf {
    buf: Vec<u8>,
    len: usize,
    pool: Pool,
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.len() <= POOL_MAX_BUF
            && let Ok(mut pool) = self.pool.lock()
            && pool.len() < POOL_SIZE
        {
            pool.push(buf);
        }
    }
}

/// A framed, blocking COLO channel.
#[derive(Debug)]
pub struct Channel<S> {
    stream: S,
    version: u16,
    negotiated: bool,
    max_body: u32,
    batch_pages: usize,
    prefix: Vec<u8>,
    pool: Pool,
}

impl Channel<TcpStream> {
    /// Connects over TCP and sets `TCP_NODELAY` (small control messages must never wait).
    pub fn connect_tcp(addr: impl ToSocketAddrs) -> Result<Self> {
        Self::from_tcp(TcpStream::connect(addr)?)
    }

    /// Wraps a connected TCP stream and sets `TCP_NODELAY`.
    pub fn from_tcp(stream: TcpStream) -> Result<Self> {
        stream.set_nodelay(true)?;
        Ok(Self::new(stream))
    }
}

impl Channel<UnixStream> {
    /// Connects to a Unix stream socket.
    pub fn connect_unix(path: impl AsRef<Path>) -> Result<Self> {
        Ok(Self::new(UnixStream::connect(path)?))
    }
}

impl<S: Read + Write> Channel<S> {
    /// Wraps a stream. Frames are written in [`MIN_PROTOCOL_VERSION`] until a handshake (or
    /// [`Channel::set_version`]) picks the version.
    pub fn new(stream: S) -> Self {
        Channel {
            stream,
            version: MIN_PROTOCOL_VERSION,
            negotiated: false,
            max_body: DEFAULT_MAX_BODY,
            batch_pages: DEFAULT_BATCH_PAGES,
            prefix: Vec::with_capacity(64 + 8 * MAX_BATCH_PAGES),
            pool: Arc::default(),
        }
    }

    /// Sets the receive body cap (default 64 MiB).
    pub fn set_max_body(&mut self, max_body: u32) {
        self.max_body = max_body;
    }

    /// Sets how many pages [`Channel::send_pages`] puts in one frame (clamped to `1..=MAX_BATCH_PAGES`).
    pub fn set_batch_pages(&mut self, pages: usize) {
        self.batch_pages = pages.clamp(1, MAX_BATCH_PAGES);
    }

    /// Fixes the protocol version: frames are written in it, and received frames must use it.
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
        self.negotiated = true;
    }

    /// The version frames are written in.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The underlying stream, mutably (for socket options).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Unwraps the stream.
    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Sends one message in one vectored write.
    pub fn send(&mut self, msg: &Message) -> Result<()> {
        self.prefix.clear();
        let mut data = Vec::new();
        let header = msg.encode_vectored(self.version, &mut self.prefix, &mut data)?;
        write_frame(&mut self.stream, &header, &self.prefix, &data)
    }

    /// Sends guest pages straight from guest memory: `(gpa, bytes)` entries, where `bytes` is one page, a run
    /// of whole pages at consecutive addresses starting at `gpa`, or an empty slice marking one zero page.
    ///
    /// Pages are split into frames of the configured batch size (a run may span frames); each frame is one
    /// vectored write of borrowed slices, never copied. Pass dirty runs whole where you have them (one iovec
    /// per run). Where the frames carry a CRC per page (pre-copy from protocol version 3, checkpoint from 4)
    /// each page is hashed here, just before the write; [`Channel::send_pages_with_crcs`] takes CRCs taken
    /// earlier instead.
    pub fn send_pages(
        &mut self,
        phase: PagePhase,
        epoch: u64,
        page_size: u32,
        pages: &[(u64, &[u8])],
    ) -> Result<()> {
        self.send_pages_inner(phase, epoch, page_size, pages, None)
    }

    /// [`Channel::send_pages`] with the CRC32 of every data page (`crc32fast::hash`), one per data page in
    /// order, computed by the caller where it first read the pages (colo-ram's collection does this with
    /// `Collection::with_page_crcs`). Page frames with one CRC per page (pre-copy frames from protocol
    /// version 3, checkpoint frames from version 4) take these instead of reading every page once more just
    /// before the socket copies it: on a scattered dirty set that second pass over cold memory is most of
    /// what checksumming costs. Frames whose body CRC covers the pages (older versions) ignore them.
    ///
    /// A count that does not match the data pages is an [`Error::Encode`] before anything is written. In a
    /// pre-copy frame, a CRC that does not match its page (the guest wrote the page after it was collected)
    /// makes the receiver report the page torn, as it would had the guest written it during the send: the
    /// dirty log has it, and the pause sends it again. In a checkpoint frame the receiver refuses it
    /// ([`Error::PageCrc`]): take checkpoint CRCs with the guest paused.
    pub fn send_pages_with_crcs(
        &mut self,
        phase: PagePhase,
        epoch: u64,
        page_size: u32,
        pages: &[(u64, &[u8])],
        page_crcs: &[u32],
    ) -> Result<()> {
        self.send_pages_inner(phase, epoch, page_size, pages, Some(page_crcs))
    }

    fn send_pages_inner(
        &mut self,
        phase: PagePhase,
        epoch: u64,
        page_size: u32,
        pages: &[(u64, &[u8])],
        page_crcs: Option<&[u32]>,
    ) -> Result<()> {
        let kind = phase.kind();
        message::check_page_size(kind, page_size)?;
        let ps = page_size as usize;
        if let Some(crcs) = page_crcs {
            // Before anything is written (each frame checks its own share again).
            message::check_page_crc_count(kind, page_size, pages, crcs)?;
        }
        // The CRCs of the frame being filled start here in `page_crcs`.
        let mut crc_at = 0;
        let mut frame_data_pages = 0;
        let mut frame: Vec<(u64, &[u8])> = Vec::with_capacity(self.batch_pages.min(pages.len()));
        let mut data: Vec<&[u8]> = Vec::with_capacity(frame.capacity());
        let mut room = self.batch_pages;
        for &(gpa, bytes) in pages {
            let (mut gpa, mut rest) = (gpa, bytes);
            loop {
                let take = if rest.is_empty() {
                    0
                } else {
                    (rest.len() / ps).clamp(1, room) * ps
                };
                let take = take.min(rest.len());
                frame.push((gpa, &rest[..take]));
                room -= (take / ps).max(1);
                frame_data_pages += take / ps;
                rest = &rest[take..];
                gpa = gpa.wrapping_add(take as u64);
                if room == 0 {
                    let crcs = page_crcs.map(|c| &c[crc_at..crc_at + frame_data_pages]);
                    self.send_page_frame(kind, epoch, page_size, &frame, crcs, &mut data)?;
                    frame.clear();
                    crc_at += frame_data_pages;
                    frame_data_pages = 0;
                    room = self.batch_pages;
                }
                if rest.is_empty() {
                    break;
                }
            }
        }
        if !frame.is_empty() {
            let crcs = page_crcs.map(|c| &c[crc_at..crc_at + frame_data_pages]);
            self.send_page_frame(kind, epoch, page_size, &frame, crcs, &mut data)?;
        }
        Ok(())
    }

    fn send_page_frame<'a>(
        &mut self,
        kind: Kind,
        epoch: u64,
        page_size: u32,
        frame: &[(u64, &'a [u8])],
        page_crcs: Option<&[u32]>,
        data: &mut Vec<&'a [u8]>,
    ) -> Result<()> {
        self.prefix.clear();
        data.clear();
        let (version, prefix) = (self.version, &mut self.prefix);
        let header = match page_crcs {
            Some(crcs) => message::encode_page_frame_with_crcs(
                kind, version, epoch, page_size, frame, crcs, prefix, data,
            )?,
            None => message::encode_page_frame(kind, version, epoch, page_size, frame, prefix, data)?,
        };
        write_frame(&mut self.stream, &header, &self.prefix, data)
    }

    /// Sends the device state of a checkpoint: [`Message::VmstateSize`] with the total, then each device's
    /// blob in chunks of at most `chunk` bytes, borrowed and not copied.
    pub fn send_vmstate(&mut self, epoch: u64, devices: &[(u32, &[u8])], chunk: usize) -> Result<()> {
        let size = devices.iter().map(|(_, d)| d.len() as u64).sum();
        self.send(&Message::VmstateSize { epoch, size })?;
        let chunk = chunk.clamp(1, (self.max_body as usize / 2).max(1));
        for &(device_id, blob) in devices {
            let total = blob.len() as u64;
            let mut offset = 0usize;
            loop {
                let end = (offset + chunk).min(blob.len());
                self.prefix.clear();
                let part = &blob[offset..end];
                let msg = Message::DeviceState(DeviceStateChunk {
                    epoch,
                    device_id,
                    total,
                    offset: offset as u64,
                    data: Bytes::new(),
                });
                msg.encode_body(&mut self.prefix, &mut Vec::new())?;
                let data = [part];
                let header = message::body_header(Kind::DeviceState, self.version, &self.prefix, &data)?;
                write_frame(&mut self.stream, &header, &self.prefix, &data)?;
                offset = end;
                if offset >= blob.len() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Receives one message, blocking. A clean end of stream between frames is [`Error::Closed`]; an end
    /// inside a frame is [`Error::Truncated`].
    pub fn recv(&mut self) -> Result<Message> {
        let mut raw = [0u8; HEADER_LEN];
        match read_full(&mut self.stream, &mut raw)? {
            0 => return Err(Error::Closed),
            HEADER_LEN => {}
            n => {
                return Err(Error::Truncated {
                    buffered: n as u64,
                    needed: HEADER_LEN as u64,
                });
            }
        }
        let header = FrameHeader::decode(&raw, self.max_body)?;
        if self.negotiated && header.version != self.version {
            return Err(Error::UnsupportedVersion {
                found: header.version,
                min: self.version,
                max: self.version,
            });
        }
        let len = header.body_len as usize;
        let mut buf = self
            .pool
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default();
        if buf.len() < len {
            // Grows (and zeroes) only past the buffer's high-water mark; reused buffers stay initialised.
            buf.resize(len, 0);
        }
        let got = read_full(&mut self.stream, &mut buf[..len])?;
        if got < len {
            return Err(Error::Truncated {
                buffered: (HEADER_LEN + got) as u64,
                needed: header.frame_len() as u64,
            });
        }
        header.check_body(&buf[..len])?;
        let body = Bytes::from_owner(PooledBuf {
            buf,
            len,
            pool: self.pool.clone(),
        });
        Message::decode(&header, body)
    }

    /// Connecting side of the handshake: sends our [`crate::Hello`], waits for the answer, and switches to the
    /// negotiated version.
    pub fn handshake_connect(&mut self, local: &LocalConfig) -> Result<Negotiated> {
        self.version = local.min_version;
        self.send(&Message::Hello(local.hello()))?;
        let answer = self.recv()?;
        let negotiated = handshake::complete(local, answer)?;
        self.set_version(negotiated.version);
        Ok(negotiated)
    }

    /// Accepting side of the handshake: waits for a [`crate::Hello`], answers with a welcome or a refusal, and
    /// switches to the negotiated version.
    pub fn handshake_accept(&mut self, local: &LocalConfig) -> Result<Negotiated> {
        let hello = match self.recv()? {
            Message::Hello(h) => h,
            other => {
                return Err(Error::Unexpected {
                    state: "waiting for hello",
                    kind: other.kind(),
                });
            }
        };
        match handshake::accept(local, &hello) {
            Ok((welcome, negotiated)) => {
                self.set_version(negotiated.version);
                self.send(&Message::Welcome(welcome))?;
                Ok(negotiated)
            }
            Err(refusal) => {
                self.version = hello
                    .min_version
                    .clamp(MIN_PROTOCOL_VERSION, local.max_version.max(MIN_PROTOCOL_VERSION));
                // Best effort: the peer learns why; our caller gets the typed reason either way.
                let _ = self.send(&handshake::refusal_message(&refusal));
                Err(Error::Refused(refusal))
            }
        }
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn write_frame<W: Write>(w: &mut W, header: &FrameHeader, prefix: &[u8], data: &[&[u8]]) -> Result<()> {
    let head = header.encode();
    let mut slices = Vec::with_capacity(2 + data.len());
    slices.push(IoSlice::new(&head));
    slices.push(IoSlice::new(prefix));
    slices.extend(data.iter().map(|d| IoSlice::new(d)));
    write_all_vectored(w, &mut slices)?;
    Ok(())
}

fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = bufs.len().min(IOV_MAX);
        match w.write_vectored(&bufs[..n]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "peer stopped accepting frame bytes",
                ));
            }
            Ok(k) => IoSlice::advance_slices(&mut bufs, k),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::PROTOCOL_VERSION;

    /// A stream that accepts at most `step` bytes per write and reads from a fixed buffer.
    struct Trickle {
        out: Vec<u8>,
        input: io::Cursor<Vec<u8>>,
        step: usize,
        writes: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.step);
            self.input.read(&mut buf[..n])
        }
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes += 1;
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.writes += 1;
            let mut left = self.step;
            let mut done = 0;
            for b in bufs {
                let n = b.len().min(left);
                self.out.extend_from_slice(&b[..n]);
                left -= n;
                done += n;
                if left == 0 {
                    break;
                }
            }
            Ok(done)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn pages_survive_short_writes_and_reads() {
        let pages: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 4096]).collect();
        let list: Vec<(u64, &[u8])> = pages
            .iter()
            .enumerate()
            .map(|(i, p)| ((i as u64) << 12, if i == 2 { &[][..] } else { &p[..] }))
            .collect();
        let t = Trickle {
            out: Vec::new(),
            input: io::Cursor::new(Vec::new()),
            step: 1000,
            writes: 0,
        };
        let mut tx = Channel::new(t);
        tx.set_version(PROTOCOL_VERSION);
        tx.set_batch_pages(2);
        tx.send_pages(PagePhase::Checkpoint, 4, 4096, &list).unwrap();
        let wire = tx.into_inner().out;
        let t = Trickle {
            out: Vec::new(),
            input: io::Cursor::new(wire),
            step: 333,
            writes: 0,
        };
        let mut rx = Channel::new(t);
        let mut seen = Vec::new();
        for _ in 0..3 {
            let Message::RamPages(b) = rx.recv().unwrap() else {
                panic!("not pages")
            };
            assert_eq!(b.epoch, 4);
            seen.extend(b.pages);
        }
        assert!(matches!(rx.recv(), Err(Error::Closed)));
        assert_eq!(seen.len(), 5);
        for (i, p) in seen.iter().enumerate() {
            assert_eq!(p.gpa, (i as u64) << 12);
            assert_eq!(&p.data[..], list[i].1);
        }
    }

    #[test]
    fn runs_of_pages_are_split_across_frames() {
        let mem: Vec<u8> = (0..10 * 4096).map(|i| (i / 4096) as u8 + 1).collect();
        // Pages 0..7 as one run, a zero page at 0x20000, pages 8..9 as a run at 0x30000.
        let list: Vec<(u64, &[u8])> =
            vec![(0, &mem[..7 * 4096]), (0x20000, &[]), (0x30000, &mem[8 * 4096..])];
        let t = Trickle {
            out: Vec::new(),
            input: io::Cursor::new(Vec::new()),
            step: 5000,
            writes: 0,
        };
        let mut tx = Channel::new(t);
        tx.set_batch_pages(3);
        tx.send_pages(PagePhase::Checkpoint, 2, 4096, &list).unwrap();
        assert!(
            tx.send_pages(PagePhase::Checkpoint, 2, 4096, &[(0, &mem[..100])])
                .is_err()
        );
        let wire = tx.into_inner().out;
        let t = Trickle {
            out: Vec::new(),
            input: io::Cursor::new(wire),
            step: usize::MAX,
            writes: 0,
        };
        let mut rx = Channel::new(t);
        let mut seen = Vec::new();
        loop {
            match rx.recv() {
                Ok(Message::RamPages(b)) => {
                    assert!(b.pages.len() <= 3);
                    seen.extend(b.pages);
                }
                Err(Error::Closed) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        let gpas: Vec<u64> = seen.iter().map(|p| p.gpa).collect();
        let mut want: Vec<u64> = (0..7).map(|i| i * 4096).collect();
        want.extend([0x20000, 0x30000, 0x31000]);
        assert_eq!(gpas, want);
        for p in &seen[..7] {
            assert_eq!(&p.data[..], &mem[p.gpa as usize..p.gpa as usize + 4096]);
        }
        assert!(seen[7].is_zero());
        assert_eq!(&seen[9].data[..], &mem[9 * 4096..]);
    }

    #[test]
    fn small_message_is_one_write() {
        let t = Trickle {
            out: Vec::new(),
            input: io::Cursor::new(Vec::new()),
            step: usize::MAX,
            writes: 0,
        };
        let mut tx = Channel::new(t);
        tx.send(&Message::CheckpointRequest { epoch: 1 }).unwrap();
        assert_eq!(tx.get_ref().writes, 1);
    }

    #[test]
    fn receive_buffers_are_reused() {
        let mut wire = Vec::new();
        for _ in 0..4 {
            Message::Error {
                code: 3,
                text: "x".repeat(5000),
            }
            .encode(MIN_PROTOCOL_VERSION, &mut wire)
            .unwrap();
        }
        let t = Trickle {
            out: Vec::new(),
            input: io::Cursor::new(wire),
            step: usize::MAX,
            writes: 0,
        };
        let mut rx = Channel::new(t);
        for _ in 0..4 {
            rx.recv().unwrap();
            assert_eq!(
                rx.pool.lock().unwrap().len(),
                1,
                "body buffer went back to the pool"
            );
        }
    }
}
