//! The message set of a COLO session and the layout of each body.
//!
//! Control messages (handshake, checkpoint steps, notices) are small and go through serde + bincode 2 with a
//! fixed-int little-endian configuration and a byte limit ([`CONTROL_LIMIT`]). Messages that carry bulk data
//! (RAM pages, device state, block writes, output frames) have a fixed little-endian layout of their own: the
//! encoder gathers borrowed slices (no copy), and the decoder hands out `Bytes` slices of the received frame
//! (no copy either).
//!
//! Page batch body:
//!
//! ```text
//! epoch u64 | page_size u32 | count u32 | count x descriptor u64 | data of every non-zero page, in order
//! descriptor = guest physical address | 1 if the page is all zeroes (no data follows for it)
//! ```
//!
//! From version 3 a pre-copy batch carries a CRC32 per page after the descriptors (0 for a zero page), and the
//! frame CRC covers only `epoch .. per-page CRCs` (see [`crate::frame::flags::PREFIX_CRC`]): a page written by
//! the guest while it was sent is reported in [`PageBatch::torn`] instead of failing the frame. Up to version 3
//! a checkpoint batch's frame CRC covers the whole body; from version 4 a checkpoint batch has the pre-copy
//! layout too, and a page that fails its own CRC fails the frame ([`Error::PageCrc`]: the guest was paused,
//! so the page was damaged, not torn).
//!
//! ```text
//! v3 pre-copy, v4 both: epoch u64 | page_size u32 | count u32 | count x descriptor u64 | count x crc32 u32 | data
//! ```
//!
//! Version-3 messages (all little-endian):
//!
//! ```text
//! DiskSyncChunk    disk u32 | reserved u32 (0) | offset u64 | data (1 ..= MAX_DISK_CHUNK bytes, sector multiple)
//! DiskSyncDone     bincode: disk u32, epoch u64, disk_len u64, bytes u64
//! BlockAck         bincode: disk u32, id u64
//! BlockDiscard     bincode: epoch u64, disk u32, offset u64, len u64
//! CheckpointWanted bincode: reason (u32 variant index of WantReason)
//! PrimaryIsn       bincode: src u128, dst u128, src_port u16, dst_port u16, vlan u32, ipv6 bool, isn u32
//! ```

use bytes::Bytes;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::error::{Error, Result};
use crate::frame::{FrameHeader, HEADER_LEN, Kind, allowed_flags, carries_page_crcs, flags};

/// Byte limit for the bincode body of a control message.
pub const CONTROL_LIMIT: usize = 1 << 20;

/// Smallest page size a batch may use.
pub const MIN_PAGE_SIZE: u32 = 512;
/// Largest page size a batch may use (2 MiB huge pages).
pub const MAX_PAGE_SIZE: u32 = 2 << 20;

/// Disk sectors: offsets and lengths of disk sync chunks and discards are multiples of this.
pub const SECTOR_SIZE: u64 = 512;
/// Largest data of one [`DiskSyncChunk`] (a VMM splits larger sync chunks into several messages).
pub const MAX_DISK_CHUNK: usize = 16 << 20;

/// Descriptor bit marking a zero page.
const ZERO_FLAG: u64 = 1;
/// Fixed part of a page batch body.
const BATCH_FIXED: usize = 16;

/// The role a node plays in the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Runs the guest that clients see; sends checkpoints.
    Primary,
    /// Runs the shadow guest; receives checkpoints.
    Secondary,
}

/// One contiguous range of guest physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest physical start address.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
}

/// Handshake offer sent by the connecting side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Oldest protocol version the sender speaks.
    pub min_version: u16,
    /// Newest protocol version the sender speaks.
    pub max_version: u16,
    /// Capability bits the sender supports (see [`crate::handshake::caps`]).
    pub capabilities: u64,
    /// The sender's node id.
    pub node_id: u64,
    /// The sender's role.
    pub role: Role,
    /// Guest page size in bytes.
    pub page_size: u32,
    /// Guest memory layout.
    pub regions: Vec<MemoryRegion>,
}

/// Handshake acceptance: the negotiated version and capabilities, and the acceptor's view of the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version both sides now use.
    pub version: u16,
    /// Capabilities both sides support.
    pub capabilities: u64,
    /// The acceptor's node id.
    pub node_id: u64,
    /// The acceptor's role.
    pub role: Role,
    /// Guest page size in bytes (equal to the offer's).
    pub page_size: u32,
    /// Guest memory layout (equal to the offer's).
    pub regions: Vec<MemoryRegion>,
}

/// Why a side fails over or leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    /// Orderly end of replication.
    Normal,
    /// The guest shut down.
    Shutdown,
    /// An operator asked for it.
    Operator,
    /// Heartbeats from the peer stopped.
    HeartbeatLost,
    /// The peer misbehaved (protocol error, bad data).
    ProtocolError,
    /// A local failure (disk, memory, device).
    LocalFailure,
    /// The arbiter decided against this side.
    Fenced,
}

/// One guest page in a batch. Empty `data` marks a page of zeroes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamPage {
    /// Guest physical address (page aligned).
    pub gpa: u64,
    /// Page contents, a zero-copy slice of the received frame; empty for a zero page.
    pub data: Bytes,
}

impl RamPage {
    /// Whether this is a zero-page marker.
    pub fn is_zero(&self) -> bool {
        self.data.is_empty()
    }
}

/// A batch of guest pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBatch {
    /// Checkpoint epoch the pages belong to (the epoch being built).
    pub epoch: u64,
    /// Page size in bytes; every non-zero page has exactly this length.
    pub page_size: u32,
    /// The pages in send order.
    pub pages: Vec<RamPage>,
    /// Received only (ignored when encoding): addresses of pages of a pre-copy frame (version 3 on) whose own
    /// CRC did not match, left out of `pages` (a checkpoint frame never has any: from version 4 such a page
    /// fails the frame with [`Error::PageCrc`]). The guest wrote them while they were sent, so they are dirty and
    /// must arrive again, intact, before the end of the next checkpoint's RAM; the secondary session fails
    /// with [`Error::TornPages`] otherwise (then they were damaged in transit).
    pub torn: Vec<u64>,
}

/// A chunk of one device's state. Chunks of a device arrive in order; `total` is the device's full size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStateChunk {
    /// Checkpoint epoch.
    pub epoch: u64,
    /// The VMM's id for the device.
    pub device_id: u32,
    /// Total size of this device's state.
    pub total: u64,
    /// Offset of this chunk within the device's state.
    pub offset: u64,
    /// The bytes.
    pub data: Bytes,
}

/// A primary disk write forwarded to the secondary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockWrite {
    /// Epoch during which the guest wrote.
    pub epoch: u64,
    /// The VMM's id for the disk.
    pub disk: u32,
    /// Byte offset on the disk.
    pub offset: u64,
    /// The bytes written.
    pub data: Bytes,
}

/// Initial disk sync: the primary's content of `data.len()` bytes at `offset` (protocol v3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSyncChunk {
    /// The VMM's id for the disk.
    pub disk: u32,
    /// Byte offset on the disk (a multiple of [`SECTOR_SIZE`]).
    pub offset: u64,
    /// The bytes (a non-zero multiple of [`SECTOR_SIZE`], at most [`MAX_DISK_CHUNK`]).
    pub data: Bytes,
}

/// Initial disk sync finished: the secondary now holds the primary's disk, and replicated writes of `epoch`
/// follow (protocol v3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSyncDone {
    /// The VMM's id for the disk.
    pub disk: u32,
    /// The replication epoch the secondary starts at.
    pub epoch: u64,
    /// The primary's disk length in bytes (the secondary's must be equal).
    pub disk_len: u64,
    /// Bytes of [`DiskSyncChunk`] data sent for this disk, re-sends included (the secondary checks that it
    /// received exactly this many).
    pub bytes: u64,
}

/// A primary disk discard forwarded to the secondary: the range reads as zeros once applied (protocol v3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDiscard {
    /// Epoch during which the guest discarded.
    pub epoch: u64,
    /// The VMM's id for the disk.
    pub disk: u32,
    /// Byte offset (a multiple of [`SECTOR_SIZE`]).
    pub offset: u64,
    /// Length in bytes (a multiple of [`SECTOR_SIZE`]).
    pub len: u64,
}

/// Why the secondary wants a checkpoint before the next periodic one (protocol v3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WantReason {
    /// The SVM's active disk overlay is full: its writes wait for the next checkpoint.
    OverlayFull,
    /// The TCP rewriter's connection table is under pressure (it evicts connections).
    RewriterFull,
}

/// One direction of a TCP connection, as the guest sends it (guest -> client), in the form of colo-net's
/// flow key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TcpFlow {
    /// Source address (IPv4 in the low 32 bits).
    pub src: u128,
    /// Destination address.
    pub dst: u128,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// VLAN ids as the VMM's packet parser reports them.
    pub vlan: u32,
    /// IPv6 (else IPv4).
    pub ipv6: bool,
}

/// The PVM's initial sequence number on a TCP connection it opened (protocol v3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryIsn {
    /// The guest -> client direction of the connection.
    pub flow: TcpFlow,
    /// The PVM's ISN.
    pub isn: u32,
}

/// An output frame of the secondary guest, forwarded to the primary's comparator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFrame {
    /// The VMM's id for the network interface.
    pub interface: u32,
    /// The Ethernet frame.
    pub data: Bytes,
}

/// Every message of a COLO session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Handshake offer.
    Hello(Hello),
    /// Handshake acceptance.
    Welcome(Welcome),
    /// Secondary is ready for checkpoints (secondary to primary).
    CheckpointReady,
    /// Primary asks for checkpoint `epoch`.
    CheckpointRequest {
        /// Epoch being built.
        epoch: u64,
    },
    /// Secondary has paused its guest (secondary to primary).
    CheckpointReply {
        /// Epoch being built.
        epoch: u64,
    },
    /// Primary has paused and starts sending the VM state.
    VmstateSend {
        /// Epoch being built.
        epoch: u64,
    },
    /// Dirty pages of a checkpoint (sent while both guests are paused).
    RamPages(PageBatch),
    /// Pages sent while the guests run (live-migration pre-copy, or ahead of a checkpoint). Protocol v2.
    PrecopyPages(PageBatch),
    /// All RAM of the checkpoint has been sent.
    EndOfRam {
        /// Epoch being built.
        epoch: u64,
    },
    /// Total size of the device state that follows.
    VmstateSize {
        /// Epoch being built.
        epoch: u64,
        /// Sum of all devices' `total`.
        size: u64,
    },
    /// A chunk of device state.
    DeviceState(DeviceStateChunk),
    /// Secondary has received the whole checkpoint (secondary to primary).
    VmstateReceived {
        /// Epoch being built.
        epoch: u64,
    },
    /// Secondary has loaded the checkpoint and resumed (secondary to primary).
    VmstateLoaded {
        /// Epoch now committed.
        epoch: u64,
    },
    /// The secondary asks for a checkpoint soon (secondary to primary). Protocol v3.
    CheckpointWanted {
        /// Why.
        reason: WantReason,
    },
    /// Initial disk sync data (primary to secondary). Protocol v3.
    DiskSyncChunk(DiskSyncChunk),
    /// Initial disk sync finished (primary to secondary). Protocol v3.
    DiskSyncDone(DiskSyncDone),
    /// The secondary applied every replicated write and discard up to and including `id` (secondary to
    /// primary). Writes and discards are numbered in the order the primary sends them, from 0 when
    /// replication starts (after the initial sync, if any). Protocol v3.
    BlockAck {
        /// The VMM's id for the disk.
        disk: u32,
        /// The highest write id applied.
        id: u64,
    },
    /// A forwarded primary disk discard. Protocol v3.
    BlockDiscard(BlockDiscard),
    /// The PVM's ISN of a TCP connection (primary to secondary). Protocol v3.
    PrimaryIsn(PrimaryIsn),
    /// Liveness beacon. Protocol v2.
    Heartbeat {
        /// Sender's sequence number.
        seq: u64,
    },
    /// The guest shut down.
    GuestShutdown,
    /// A forwarded primary disk write.
    BlockWrite(BlockWrite),
    /// All block writes of `epoch` have been sent.
    BlockBarrier {
        /// Epoch whose writes are complete.
        epoch: u64,
    },
    /// A forwarded secondary output frame.
    OutputFrame(OutputFrame),
    /// The sender is failing over.
    FailoverNotice {
        /// Why.
        reason: Reason,
    },
    /// The sender leaves the session.
    Goodbye {
        /// Why.
        reason: Reason,
    },
    /// The sender reports an error.
    Error {
        /// Error code (see [`crate::handshake::REFUSED`] for handshake refusals).
        code: u32,
        /// Human-readable explanation.
        text: String,
    },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<CONTROL_LIMIT>()
}

fn put_ctl<T: Serialize>(kind: Kind, value: &T, prefix: &mut Vec<u8>) -> Result<()> {
    bincode::serde::encode_into_std_write(value, prefix, config())
        .map(|_| ())
        .map_err(|e| Error::Encode {
            kind,
            what: e.to_string(),
        })
}

fn get_ctl<T: DeserializeOwned>(kind: Kind, body: &[u8]) -> Result<T> {
    let (value, used) =
        bincode::serde::decode_from_slice::<T, _>(body, config()).map_err(|e| Error::Malformed {
            kind,
            what: e.to_string(),
        })?;
    if used != body.len() {
        return Err(Error::Malformed {
            kind,
            what: format!("{} trailing bytes", body.len() - used),
        });
    }
    Ok(value)
}

fn malformed(kind: Kind, what: impl Into<String>) -> Error {
    Error::Malformed {
        kind,
        what: what.into(),
    }
}

/// A little-endian reader over a body that reports short bodies as `Malformed`.
struct Cursor<'a> {
    kind: Kind,
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        let end = self.pos.checked_add(N).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| malformed(self.kind, "body too short"))?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.pos..end]);
        self.pos = end;
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32> {
        self.take::<4>().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64> {
        self.take::<8>().map(u64::from_le_bytes)
    }
}

/// Checks that a disk range is whole sectors and does not wrap.
fn check_sectors(offset: u64, len: u64) -> std::result::Result<(), String> {
    if !offset.is_multiple_of(SECTOR_SIZE) || !len.is_multiple_of(SECTOR_SIZE) {
        return Err(format!(
            "range {len} bytes at {offset} is not whole {SECTOR_SIZE}-byte sectors"
        ));
    }
    if offset.checked_add(len).is_none() {
        return Err(format!("range {len} bytes at {offset} wraps"));
    }
    Ok(())
}

/// Checks the range of a disk sync chunk: whole sectors, not empty, at most [`MAX_DISK_CHUNK`].
fn check_sync_chunk(offset: u64, len: usize) -> std::result::Result<(), String> {
    if len == 0 || len > MAX_DISK_CHUNK {
        return Err(format!("{len} bytes of sync data (1..={MAX_DISK_CHUNK})"));
    }
    check_sectors(offset, len as u64)
}

/// Checks a page size.
pub(crate) fn check_page_size(kind: Kind, page_size: u32) -> Result<()> {
    if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
        return Err(Error::Encode {
            kind,
            what: format!("page size {page_size} not a power of two in range"),
        });
    }
    Ok(())
}

/// The checksum of one page in a page frame that carries per-page CRCs ([`flags::PREFIX_CRC`]: pre-copy
/// frames from protocol version 3, checkpoint frames from version 4): CRC32 (IEEE, `crc32fast`) of the
/// page's bytes. A sender that takes the checksums where it first reads the pages (colo-ram's
/// `Collection::with_page_crcs(colo_proto::page_crc)`) hands them to [`crate::Channel::send_pages_with_crcs`].
pub fn page_crc(page: &[u8]) -> u32 {
    crc32fast::hash(page)
}

/// The per-page CRC32s of a page batch frame.
#[derive(Clone, Copy, Debug)]
pub(crate) enum PageCrcs<'c> {
    /// The frame carries none (its body CRC covers the pages).
    None,
    /// Computed while encoding, page by page.
    Compute,
    /// Computed by the caller when it first read the pages: one per data page, in order.
    Given(&'c [u32]),
    /// Zeros in their place: the frame's length without reading the pages ([`encoded_len`]).
    Placeholder,
}

impl PageCrcs<'_> {
    fn present(&self) -> bool {
        !matches!(self, PageCrcs::None)
    }
}

/// Appends the prefix of a page batch (fixed part, one descriptor per page and, unless `crcs` is
/// [`PageCrcs::None`], one CRC32 per page) and collects the data slices.
///
/// Each entry is a run: `bytes` holds one or more whole pages starting at `gpa` (one data slice, one CRC
/// update and one iovec for the whole run), or is empty for a single zero page.
pub(crate) fn encode_pages<'a, I>(
    kind: Kind,
    epoch: u64,
    page_size: u32,
    runs: I,
    crcs: PageCrcs<'_>,
    prefix: &mut Vec<u8>,
    data: &mut Vec<&'a [u8]>,
) -> Result<()>
where
    I: Iterator<Item = (u64, &'a [u8])> + Clone,
{
    check_page_size(kind, page_size)?;
    let ps = page_size as usize;
    let mut count = 0usize;
    for (gpa, bytes) in runs.clone() {
        if bytes.len() % ps != 0 {
            return Err(Error::Encode {
                kind,
                what: format!(
                    "run at {gpa:#x} has {} bytes, not a multiple of the page size {ps}",
                    bytes.len()
                ),
            });
        }
        count += (bytes.len() / ps).max(1);
    }
    // `PageCrcs::Given` holds one CRC per data page: `check_page_crc_count` ran before.
    let page_crcs = crcs.present();
    let count = u32::try_from(count).map_err(|_| Error::Encode {
        kind,
        what: "more than u32::MAX pages".into(),
    })?;
    let per_page = if page_crcs { 12 } else { 8 };
    prefix.reserve(BATCH_FIXED + per_page * count as usize);
    prefix.extend_from_slice(&epoch.to_le_bytes());
    prefix.extend_from_slice(&page_size.to_le_bytes());
    prefix.extend_from_slice(&count.to_le_bytes());
    // Per-page CRCs in descriptor order (0 for a zero page), appended after the descriptors.
    let mut crc_bytes: Vec<u8> = Vec::with_capacity(if page_crcs { 4 * count as usize } else { 0 });
    let mut given = match crcs {
        PageCrcs::Given(g) => g.iter(),
        _ => [].iter(),
    };
    let mask = u64::from(page_size) - 1;
    for (gpa, bytes) in runs {
        if gpa & mask != 0 {
            return Err(Error::Encode {
                kind,
                what: format!("gpa {gpa:#x} not page aligned"),
            });
        }
        if bytes.is_empty() {
            prefix.extend_from_slice(&(gpa | ZERO_FLAG).to_le_bytes());
            if page_crcs {
                crc_bytes.extend_from_slice(&0u32.to_le_bytes());
            }
            continue;
        }
        let pages = (bytes.len() / ps) as u64;
        let last = gpa.checked_add((pages - 1) * u64::from(page_size));
        if last.is_none() {
            return Err(Error::Encode {
                kind,
                what: format!("run at {gpa:#x} wraps the address space"),
            });
        }
        for i in 0..pages {
            prefix.extend_from_slice(&(gpa + i * u64::from(page_size)).to_le_bytes());
        }
        match crcs {
            PageCrcs::None => {}
            PageCrcs::Compute => {
                for page in bytes.chunks_exact(ps) {
                    crc_bytes.extend_from_slice(&page_crc(page).to_le_bytes());
                }
            }
            PageCrcs::Given(_) => {
                // Counted above: exactly one per data page.
                for crc in given.by_ref().take(pages as usize) {
                    crc_bytes.extend_from_slice(&crc.to_le_bytes());
                }
            }
            PageCrcs::Placeholder => crc_bytes.resize(crc_bytes.len() + 4 * pages as usize, 0),
        }
        data.push(bytes);
    }
    prefix.extend_from_slice(&crc_bytes);
    Ok(())
}

/// Decodes a page batch body. With `page_crcs` (a frame carrying [`flags::PREFIX_CRC`]) a CRC32 per page
/// follows the descriptors; a pre-copy data page whose CRC does not match goes to `torn`, not to `pages`, and
/// a checkpoint page that does not match fails the frame.
fn decode_pages(kind: Kind, body: Bytes, page_crcs: bool) -> Result<PageBatch> {
    let mut c = Cursor {
        kind,
        buf: &body,
        pos: 0,
    };
    let epoch = c.u64()?;
    let page_size = c.u32()?;
    let count = c.u32()? as usize;
    check_page_size(kind, page_size).map_err(|_| malformed(kind, format!("bad page size {page_size}")))?;
    let per_page = if page_crcs { 12 } else { 8 };
    let meta_len = count
        .checked_mul(per_page)
        .filter(|&l| l <= body.len() - BATCH_FIXED);
    let meta_len =
        meta_len.ok_or_else(|| malformed(kind, format!("{count} descriptors overrun the body")))?;
    let descs = &body[BATCH_FIXED..BATCH_FIXED + 8 * count];
    let crcs = &body[BATCH_FIXED + 8 * count..BATCH_FIXED + meta_len];
    let mask = u64::from(page_size) - 1;
    let data_pages = descs
        .chunks_exact(8)
        .filter(|d| d[0] & ZERO_FLAG as u8 == 0)
        .count();
    let data_start = BATCH_FIXED + meta_len;
    let expected = data_pages as u64 * u64::from(page_size);
    if (body.len() - data_start) as u64 != expected {
        return Err(malformed(
            kind,
            format!(
                "{data_pages} data pages need {expected} bytes, body has {}",
                body.len() - data_start
            ),
        ));
    }
    let mut pages = Vec::with_capacity(count);
    let mut torn = Vec::new();
    let mut off = data_start;
    for (i, d) in descs.chunks_exact(8).enumerate() {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(d);
        let desc = u64::from_le_bytes(raw);
        let gpa = desc & !ZERO_FLAG;
        if gpa & mask != 0 {
            return Err(malformed(kind, format!("descriptor {desc:#x} not page aligned")));
        }
        let data = if desc & ZERO_FLAG != 0 {
            Bytes::new()
        } else {
            let end = off + page_size as usize;
            let s = body.slice(off..end);
            off = end;
            if page_crcs {
                let want =
                    u32::from_le_bytes([crcs[4 * i], crcs[4 * i + 1], crcs[4 * i + 2], crcs[4 * i + 3]]);
                let computed = page_crc(&s);
                if computed != want {
                    if kind == Kind::RamPages {
                        // The guest is paused during a checkpoint: this page was damaged, not torn.
                        return Err(Error::PageCrc {
                            kind,
                            gpa,
                            expected: want,
                            computed,
                        });
                    }
                    torn.push(gpa);
                    continue;
                }
            }
            s
        };
        pages.push(RamPage { gpa, data });
    }
    Ok(PageBatch {
        epoch,
        page_size,
        pages,
        torn,
    })
}

impl Message {
    /// The message's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Welcome(_) => Kind::Welcome,
            Message::CheckpointReady => Kind::CheckpointReady,
            Message::CheckpointRequest { .. } => Kind::CheckpointRequest,
            Message::CheckpointReply { .. } => Kind::CheckpointReply,
            Message::VmstateSend { .. } => Kind::VmstateSend,
            Message::RamPages(_) => Kind::RamPages,
            Message::PrecopyPages(_) => Kind::PrecopyPages,
            Message::EndOfRam { .. } => Kind::EndOfRam,
            Message::VmstateSize { .. } => Kind::VmstateSize,
            Message::DeviceState(_) => Kind::DeviceState,
            Message::VmstateReceived { .. } => Kind::VmstateReceived,
            Message::VmstateLoaded { .. } => Kind::VmstateLoaded,
            Message::Heartbeat { .. } => Kind::Heartbeat,
            Message::GuestShutdown => Kind::GuestShutdown,
            Message::BlockWrite(_) => Kind::BlockWrite,
            Message::BlockBarrier { .. } => Kind::BlockBarrier,
            Message::CheckpointWanted { .. } => Kind::CheckpointWanted,
            Message::DiskSyncChunk(_) => Kind::DiskSyncChunk,
            Message::DiskSyncDone(_) => Kind::DiskSyncDone,
            Message::BlockAck { .. } => Kind::BlockAck,
            Message::BlockDiscard(_) => Kind::BlockDiscard,
            Message::PrimaryIsn(_) => Kind::PrimaryIsn,
            Message::OutputFrame(_) => Kind::OutputFrame,
            Message::FailoverNotice { .. } => Kind::FailoverNotice,
            Message::Goodbye { .. } => Kind::Goodbye,
            Message::Error { .. } => Kind::Error,
        }
    }

    /// Encodes the body as a prefix (copied into `prefix`) followed by borrowed `data` slices, without
    /// copying bulk data. The body is `prefix ++ data[0] ++ data[1] ++ ...`, in the layout of
    /// [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION) (see [`Message::encode_vectored`] for another version).
    pub fn encode_body<'a>(&'a self, prefix: &mut Vec<u8>, data: &mut Vec<&'a [u8]>) -> Result<()> {
        self.encode_body_in(crate::frame::PROTOCOL_VERSION, prefix, data)
    }

    /// [`Message::encode_body`] in the layout of protocol `version` (page frames carry a CRC per page:
    /// pre-copy from version 3, both kinds from version 4).
    fn encode_body_in<'a>(
        &'a self,
        version: u16,
        prefix: &mut Vec<u8>,
        data: &mut Vec<&'a [u8]>,
    ) -> Result<()> {
        self.encode_body_as(version, false, prefix, data)
    }

    /// The body; with `length_only` per-page CRCs are left zero (the pages are not read).
    fn encode_body_as<'a>(
        &'a self,
        version: u16,
        length_only: bool,
        prefix: &mut Vec<u8>,
        data: &mut Vec<&'a [u8]>,
    ) -> Result<()> {
        let kind = self.kind();
        match self {
            Message::Hello(h) => put_ctl(kind, h, prefix),
            Message::Welcome(w) => put_ctl(kind, w, prefix),
            Message::CheckpointReady | Message::GuestShutdown => Ok(()),
            Message::CheckpointRequest { epoch }
            | Message::CheckpointReply { epoch }
            | Message::VmstateSend { epoch }
            | Message::EndOfRam { epoch }
            | Message::VmstateReceived { epoch }
            | Message::VmstateLoaded { epoch }
            | Message::BlockBarrier { epoch } => put_ctl(kind, epoch, prefix),
            Message::Heartbeat { seq } => put_ctl(kind, seq, prefix),
            Message::VmstateSize { epoch, size } => put_ctl(kind, &(epoch, size), prefix),
            Message::FailoverNotice { reason } | Message::Goodbye { reason } => put_ctl(kind, reason, prefix),
            Message::Error { code, text } => put_ctl(kind, &(code, text), prefix),
            Message::CheckpointWanted { reason } => put_ctl(kind, reason, prefix),
            Message::DiskSyncDone(d) => put_ctl(kind, d, prefix),
            Message::BlockAck { disk, id } => put_ctl(kind, &(disk, id), prefix),
            Message::BlockDiscard(d) => {
                check_sectors(d.offset, d.len).map_err(|what| Error::Encode { kind, what })?;
                put_ctl(kind, d, prefix)
            }
            Message::PrimaryIsn(i) => put_ctl(kind, i, prefix),
            Message::DiskSyncChunk(c) => {
                check_sync_chunk(c.offset, c.data.len()).map_err(|what| Error::Encode { kind, what })?;
                prefix.extend_from_slice(&c.disk.to_le_bytes());
                prefix.extend_from_slice(&0u32.to_le_bytes());
                prefix.extend_from_slice(&c.offset.to_le_bytes());
                data.push(&c.data);
                Ok(())
            }
            Message::RamPages(b) | Message::PrecopyPages(b) => encode_pages(
                kind,
                b.epoch,
                b.page_size,
                b.pages.iter().map(|p| (p.gpa, &p.data[..])),
                match (carries_page_crcs(kind, version), length_only) {
                    (false, _) => PageCrcs::None,
                    (true, false) => PageCrcs::Compute,
                    (true, true) => PageCrcs::Placeholder,
                },
                prefix,
                data,
            ),
            Message::DeviceState(c) => {
                let end = c
                    .offset
                    .checked_add(c.data.len() as u64)
                    .filter(|&e| e <= c.total);
                if end.is_none() {
                    return Err(Error::Encode {
                        kind,
                        what: "chunk extends past the device's total".into(),
                    });
                }
                prefix.extend_from_slice(&c.epoch.to_le_bytes());
                prefix.extend_from_slice(&c.device_id.to_le_bytes());
                prefix.extend_from_slice(&0u32.to_le_bytes());
                prefix.extend_from_slice(&c.total.to_le_bytes());
                prefix.extend_from_slice(&c.offset.to_le_bytes());
                data.push(&c.data);
                Ok(())
            }
            Message::BlockWrite(w) => {
                prefix.extend_from_slice(&w.epoch.to_le_bytes());
                prefix.extend_from_slice(&w.disk.to_le_bytes());
                prefix.extend_from_slice(&0u32.to_le_bytes());
                prefix.extend_from_slice(&w.offset.to_le_bytes());
                data.push(&w.data);
                Ok(())
            }
            Message::OutputFrame(f) => {
                prefix.extend_from_slice(&f.interface.to_le_bytes());
                data.push(&f.data);
                Ok(())
            }
        }
    }

    /// Encodes the frame without copying bulk data: like [`Message::encode_body`], and returns the header
    /// (with the body CRC). The frame is `header.encode() ++ prefix ++ data...`.
    pub fn encode_vectored<'a>(
        &'a self,
        version: u16,
        prefix: &mut Vec<u8>,
        data: &mut Vec<&'a [u8]>,
    ) -> Result<FrameHeader> {
        self.encode_body_in(version, prefix, data)?;
        body_header(self.kind(), version, prefix, data)
    }

    /// Encodes the whole frame (header and body) in protocol `version`, appending it to `out`.
    ///
    /// This copies bulk data; [`crate::transport::Channel`] writes the same bytes without copying.
    pub fn encode(&self, version: u16, out: &mut Vec<u8>) -> Result<()> {
        let mut prefix = Vec::new();
        let mut data = Vec::new();
        self.encode_body_in(version, &mut prefix, &mut data)?;
        let header = body_header(self.kind(), version, &prefix, &data)?;
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(&prefix);
        for d in data {
            out.extend_from_slice(d);
        }
        Ok(())
    }

    /// Decodes a body whose header has been validated and whose CRC has been checked.
    ///
    /// Bulk data in the result are slices of `body`, not copies.
    pub fn decode(header: &FrameHeader, body: Bytes) -> Result<Message> {
        let kind = header.kind;
        let empty = |m: Message| {
            if body.is_empty() {
                Ok(m)
            } else {
                Err(malformed(kind, "body must be empty"))
            }
        };
        Ok(match kind {
            Kind::Hello => Message::Hello(get_ctl(kind, &body)?),
            Kind::Welcome => Message::Welcome(get_ctl(kind, &body)?),
            Kind::CheckpointReady => empty(Message::CheckpointReady)?,
            Kind::GuestShutdown => empty(Message::GuestShutdown)?,
            Kind::CheckpointRequest => Message::CheckpointRequest {
                epoch: get_ctl(kind, &body)?,
            },
            Kind::CheckpointReply => Message::CheckpointReply {
                epoch: get_ctl(kind, &body)?,
            },
            Kind::VmstateSend => Message::VmstateSend {
                epoch: get_ctl(kind, &body)?,
            },
            Kind::EndOfRam => Message::EndOfRam {
                epoch: get_ctl(kind, &body)?,
            },
            Kind::VmstateReceived => Message::VmstateReceived {
                epoch: get_ctl(kind, &body)?,
            },
            Kind::VmstateLoaded => Message::VmstateLoaded {
                epoch: get_ctl(kind, &body)?,
            },
            Kind::BlockBarrier => Message::BlockBarrier {
                epoch: get_ctl(kind, &body)?,
            },
            Kind::Heartbeat => Message::Heartbeat {
                seq: get_ctl(kind, &body)?,
            },
            Kind::VmstateSize => {
                let (epoch, size) = get_ctl(kind, &body)?;
                Message::VmstateSize { epoch, size }
            }
            Kind::FailoverNotice => Message::FailoverNotice {
                reason: get_ctl(kind, &body)?,
            },
            Kind::Goodbye => Message::Goodbye {
                reason: get_ctl(kind, &body)?,
            },
            Kind::Error => {
                let (code, text) = get_ctl(kind, &body)?;
                Message::Error { code, text }
            }
            Kind::CheckpointWanted => Message::CheckpointWanted {
                reason: get_ctl(kind, &body)?,
            },
            Kind::DiskSyncDone => Message::DiskSyncDone(get_ctl(kind, &body)?),
            Kind::BlockAck => {
                let (disk, id) = get_ctl(kind, &body)?;
                Message::BlockAck { disk, id }
            }
            Kind::BlockDiscard => {
                let d: BlockDiscard = get_ctl(kind, &body)?;
                check_sectors(d.offset, d.len).map_err(|what| malformed(kind, what))?;
                Message::BlockDiscard(d)
            }
            Kind::PrimaryIsn => Message::PrimaryIsn(get_ctl(kind, &body)?),
            Kind::DiskSyncChunk => {
                let mut c = Cursor {
                    kind,
                    buf: &body,
                    pos: 0,
                };
                let disk = c.u32()?;
                let reserved = c.u32()?;
                let offset = c.u64()?;
                if reserved != 0 {
                    return Err(malformed(kind, format!("reserved field {reserved:#x}")));
                }
                let data = body.slice(c.pos..);
                check_sync_chunk(offset, data.len()).map_err(|what| malformed(kind, what))?;
                Message::DiskSyncChunk(DiskSyncChunk { disk, offset, data })
            }
            Kind::RamPages => {
                Message::RamPages(decode_pages(kind, body, header.flags & flags::PREFIX_CRC != 0)?)
            }
            Kind::PrecopyPages => {
                Message::PrecopyPages(decode_pages(kind, body, header.flags & flags::PREFIX_CRC != 0)?)
            }
            Kind::DeviceState => {
                let mut c = Cursor {
                    kind,
                    buf: &body,
                    pos: 0,
                };
                let epoch = c.u64()?;
                let device_id = c.u32()?;
                let _pad = c.u32()?;
                let total = c.u64()?;
                let offset = c.u64()?;
                let data = body.slice(c.pos..);
                if offset.checked_add(data.len() as u64).is_none_or(|e| e > total) {
                    return Err(malformed(
                        kind,
                        format!("chunk at {offset} overruns total {total}"),
                    ));
                }
                Message::DeviceState(DeviceStateChunk {
                    epoch,
                    device_id,
                    total,
                    offset,
                    data,
                })
            }
            Kind::BlockWrite => {
                let mut c = Cursor {
                    kind,
                    buf: &body,
                    pos: 0,
                };
                let epoch = c.u64()?;
                let disk = c.u32()?;
                let _pad = c.u32()?;
                let offset = c.u64()?;
                let data = body.slice(c.pos..);
                Message::BlockWrite(BlockWrite {
                    epoch,
                    disk,
                    offset,
                    data,
                })
            }
            Kind::OutputFrame => {
                let mut c = Cursor {
                    kind,
                    buf: &body,
                    pos: 0,
                };
                let interface = c.u32()?;
                Message::OutputFrame(OutputFrame {
                    interface,
                    data: body.slice(c.pos..),
                })
            }
        })
    }

    /// Whether the checkpoint session machines consume this message. Route the others (heartbeat, block
    /// writes, output frames, failover notices, guest shutdown, handshake) to the VMM's other subsystems, in
    /// arrival order.
    pub fn is_session_message(&self) -> bool {
        matches!(
            self,
            Message::CheckpointReady
                | Message::CheckpointRequest { .. }
                | Message::CheckpointReply { .. }
                | Message::VmstateSend { .. }
                | Message::RamPages(_)
                | Message::PrecopyPages(_)
                | Message::EndOfRam { .. }
                | Message::VmstateSize { .. }
                | Message::DeviceState(_)
                | Message::VmstateReceived { .. }
                | Message::VmstateLoaded { .. }
                | Message::BlockBarrier { .. }
                | Message::Goodbye { .. }
                | Message::Error { .. }
        )
    }

    /// The epoch a checkpoint message refers to, if it carries one.
    pub fn epoch(&self) -> Option<u64> {
        match self {
            Message::CheckpointRequest { epoch }
            | Message::CheckpointReply { epoch }
            | Message::VmstateSend { epoch }
            | Message::EndOfRam { epoch }
            | Message::VmstateSize { epoch, .. }
            | Message::VmstateReceived { epoch }
            | Message::VmstateLoaded { epoch }
            | Message::BlockBarrier { epoch } => Some(*epoch),
            Message::RamPages(b) | Message::PrecopyPages(b) => Some(b.epoch),
            Message::DeviceState(c) => Some(c.epoch),
            Message::BlockWrite(w) => Some(w.epoch),
            Message::BlockDiscard(d) => Some(d.epoch),
            _ => None,
        }
    }
}

/// Encodes a page batch frame from borrowed pages without copying them: the body prefix (fixed part,
/// descriptors and, where the frame carries them, one CRC per page computed here) goes into `prefix`, the
/// non-zero pages into `data`, and the returned header carries the frame CRC (over the whole body, or over
/// the prefix with [`flags::PREFIX_CRC`]: pre-copy frames from version 3, checkpoint frames from version 4).
/// Write `header.encode() ++ prefix ++ data...` (for example as one vectored write).
///
/// Each entry is a run of whole pages at consecutive guest addresses (a single page is a run of one), or an
/// empty slice for one zero page. Handing contiguous dirty runs over as one slice saves an iovec per page.
/// `kind` must be [`Kind::RamPages`] or [`Kind::PrecopyPages`].
pub fn encode_page_frame<'a>(
    kind: Kind,
    version: u16,
    epoch: u64,
    page_size: u32,
    pages: &[(u64, &'a [u8])],
    prefix: &mut Vec<u8>,
    data: &mut Vec<&'a [u8]>,
) -> Result<FrameHeader> {
    encode_page_frame_with(kind, version, epoch, page_size, pages, None, prefix, data)
}

/// [`encode_page_frame`] with the CRC32 of every data page (`crc32fast::hash` of its bytes) computed by the
/// caller, one per data page in order (zero-page entries have none), for example while it first read the
/// pages to collect them. A frame that carries per-page CRCs ([`flags::PREFIX_CRC`]: pre-copy frames from
/// protocol version 3, checkpoint frames from version 4) then takes them as they are instead of reading
/// every page once more; a frame whose body CRC covers its pages ignores them. A wrong count is an encode
/// error; a wrong CRC is a page the receiver reports torn ([`PageBatch::torn`]) in a pre-copy frame, as if
/// the guest had written it while it was sent, and refuses ([`Error::PageCrc`]) in a checkpoint frame.
#[allow(clippy::too_many_arguments)]
pub fn encode_page_frame_with_crcs<'a>(
    kind: Kind,
    version: u16,
    epoch: u64,
    page_size: u32,
    pages: &[(u64, &'a [u8])],
    page_crcs: &[u32],
    prefix: &mut Vec<u8>,
    data: &mut Vec<&'a [u8]>,
) -> Result<FrameHeader> {
    encode_page_frame_with(
        kind,
        version,
        epoch,
        page_size,
        pages,
        Some(page_crcs),
        prefix,
        data,
    )
}

#[allow(clippy::too_many_arguments)]
fn encode_page_frame_with<'a>(
    kind: Kind,
    version: u16,
    epoch: u64,
    page_size: u32,
    pages: &[(u64, &'a [u8])],
    given: Option<&[u32]>,
    prefix: &mut Vec<u8>,
    data: &mut Vec<&'a [u8]>,
) -> Result<FrameHeader> {
    if !matches!(kind, Kind::RamPages | Kind::PrecopyPages) {
        return Err(Error::Encode {
            kind,
            what: "not a page batch kind".into(),
        });
    }
    if let Some(g) = given {
        check_page_crc_count(kind, page_size, pages, g)?;
    }
    let crcs = match (carries_page_crcs(kind, version), given) {
        (false, _) => PageCrcs::None,
        (true, None) => PageCrcs::Compute,
        (true, Some(g)) => PageCrcs::Given(g),
    };
    encode_pages(kind, epoch, page_size, pages.iter().copied(), crcs, prefix, data)?;
    body_header(kind, version, prefix, data)
}

/// Checks that `crcs` holds one checksum per data page of `pages` (a run counts its whole pages; a zero-page
/// entry none).
pub(crate) fn check_page_crc_count(
    kind: Kind,
    page_size: u32,
    pages: &[(u64, &[u8])],
    crcs: &[u32],
) -> Result<()> {
    check_page_size(kind, page_size)?;
    let data_pages: usize = pages.iter().map(|(_, b)| b.len() / page_size as usize).sum();
    if crcs.len() != data_pages {
        return Err(Error::Encode {
            kind,
            what: format!("{} page CRCs for {data_pages} data pages", crcs.len()),
        });
    }
    Ok(())
}

/// Computes the header of a body given as `prefix ++ data...`, checking its length and that `kind` exists in
/// `version`.
pub(crate) fn body_header(kind: Kind, version: u16, prefix: &[u8], data: &[&[u8]]) -> Result<FrameHeader> {
    if kind.since_version() > version {
        return Err(Error::KindNotInVersion { kind, version });
    }
    let len: usize = prefix.len() + data.iter().map(|d| d.len()).sum::<usize>();
    let body_len = u32::try_from(len).map_err(|_| Error::Encode {
        kind,
        what: format!("body of {len} bytes"),
    })?;
    // A page frame with a CRC per page (`flags::PREFIX_CRC`): the frame CRC covers the prefix only, which
    // the page batch encoder fills with exactly the fixed part, the descriptors and the per-page CRCs.
    let flags = allowed_flags(kind, version) & flags::PREFIX_CRC;
    let mut h = crc32fast::Hasher::new();
    h.update(prefix);
    if flags & flags::PREFIX_CRC == 0 {
        for d in data {
            h.update(d);
        }
    }
    Ok(FrameHeader {
        version,
        kind,
        flags,
        body_len,
        body_crc: h.finalize(),
    })
}

/// Length of the frame `msg` encodes to, without encoding bulk data.
pub fn encoded_len(msg: &Message) -> Result<usize> {
    let mut prefix = Vec::new();
    let mut data = Vec::new();
    // Counting, not checksumming: per-page CRCs are not computed.
    msg.encode_body_as(crate::frame::PROTOCOL_VERSION, true, &mut prefix, &mut data)?;
    Ok(HEADER_LEN + prefix.len() + data.iter().map(|d| d.len()).sum::<usize>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{DEFAULT_MAX_BODY, PROTOCOL_VERSION};

    fn round_trip(m: &Message) -> Message {
        let mut out = Vec::new();
        m.encode(PROTOCOL_VERSION, &mut out).unwrap();
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&out[..HEADER_LEN]);
        let h = FrameHeader::decode(&hb, DEFAULT_MAX_BODY).unwrap();
        let body = Bytes::copy_from_slice(&out[HEADER_LEN..]);
        h.check_body(&body).unwrap();
        Message::decode(&h, body).unwrap()
    }

    #[test]
    fn page_batch_decodes_as_slices_of_the_body() {
        let page = Bytes::from(vec![7u8; 4096]);
        let m = Message::RamPages(PageBatch {
            epoch: 3,
            page_size: 4096,
            pages: vec![
                RamPage {
                    gpa: 0x1000,
                    data: page,
                },
                RamPage {
                    gpa: 0x2000,
                    data: Bytes::new(),
                },
            ],
            torn: vec![],
        });
        assert_eq!(round_trip(&m), m);
    }

    #[test]
    fn page_of_wrong_size_is_refused_at_encode() {
        let m = Message::RamPages(PageBatch {
            epoch: 3,
            page_size: 4096,
            pages: vec![RamPage {
                gpa: 0x1000,
                data: Bytes::from(vec![1u8; 100]),
            }],
            torn: vec![],
        });
        assert!(matches!(
            m.encode(PROTOCOL_VERSION, &mut Vec::new()),
            Err(Error::Encode { .. })
        ));
    }

    #[test]
    fn precopy_is_not_in_version_one() {
        let m = Message::PrecopyPages(PageBatch {
            epoch: 0,
            page_size: 4096,
            pages: vec![],
            torn: vec![],
        });
        assert!(matches!(
            m.encode(1, &mut Vec::new()),
            Err(Error::KindNotInVersion { .. })
        ));
    }

    #[test]
    fn control_trailing_bytes_are_malformed() {
        let h = FrameHeader {
            version: 2,
            kind: Kind::CheckpointRequest,
            flags: 0,
            body_len: 9,
            body_crc: 0,
        };
        let body = Bytes::from(vec![0u8; 9]);
        assert!(matches!(Message::decode(&h, body), Err(Error::Malformed { .. })));
    }
}
