//! The paravirtual block device over a raw image file: a ring of request descriptors in guest memory
//! (layout in [`crate::abi`]). The device owns the completion index, keeps it in its state and mirrors it
//! into guest memory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::abi::*;
use crate::error::{Error, Result};
use crate::memory::{GuestRam, ram_size};

/// Saved block device state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BlockState {
    /// Disk size in sectors (must match the image the state is loaded over).
    pub sectors: u64,
    /// Requests completed (free-running; the next descriptor is `done % BLK_SLOTS`).
    pub done: u32,
    /// Read requests completed.
    pub reads: u64,
    /// Write requests completed.
    pub writes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Requests that failed (I/O error or malformed).
    pub errors: u64,
    /// Set when the guest broke the ring protocol.
    pub broken: bool,
}

/// Storage behind the block device. A COLO VMM puts its replication layer here (forwarding the primary's
/// writes, the secondary's overlay); [`RawFile`] is a plain image.
///
/// An error of kind [`io::ErrorKind::WouldBlock`] means "not now": nothing was done, and the device leaves
/// the request (and every request behind it) queued and retries it at its next poll. A COLO disk uses it
/// for a write that has to wait for the next checkpoint.
pub trait DiskBackend: Send {
    /// Size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Read `buf.len()` bytes at `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make completed writes durable.
    fn flush(&mut self) -> io::Result<()>;
}

/// A raw image file.
#[derive(Debug)]
pub struct RawFile(pub File);

impl DiskBackend for RawFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

/// The block device model.
pub struct Block {
    state: BlockState,
    disk: Box<dyn DiskBackend>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Internal status: the backend held the request (never written to the guest).
const HELD: u32 = u32::MAX;

fn io_status(e: io::Error) -> u32 {
    if e.kind() == io::ErrorKind::WouldBlock {
        HELD
    } else {
        tracing::warn!("block: I/O failed: {e}");
        BLK_ST_IOERR
    }
}

fn mem(gpa: u64) -> impl FnOnce(vm_memory::GuestMemoryError) -> Error {
    move |e| Error::Memory {
        gpa,
        detail: e.to_string(),
    }
}

impl Block {
    /// Open a raw image (its size must be a whole number of sectors).
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(Error::io(format!("opening {}", path.display())))?;
        Self::with_backend(Box::new(RawFile(file)))
    }

    /// A block device over any storage (its size must be a whole number of sectors).
    pub fn with_backend(disk: Box<dyn DiskBackend>) -> Result<Self> {
        let len = disk.size().map_err(Error::io("disk size"))?;
        if len % SECTOR_SIZE != 0 || len == 0 {
            return Err(Error::state(
                "block",
                format!("image size {len} is not a positive multiple of {SECTOR_SIZE}"),
            ));
        }
        Ok(Self {
            state: BlockState {
                sectors: len / SECTOR_SIZE,
                ..Default::default()
            },
            disk,
            buf: Vec::new(),
        })
    }

    /// Disk size in sectors.
    pub fn sectors(&self) -> u64 {
        self.state.sectors
    }

    /// Publish the completion index into guest memory (after boot or restore).
    pub fn sync_to_guest(&self, ram: &GuestRam) -> Result<()> {
        ram.store(
            self.state.done,
            GuestAddress(BLK_GPA + BLK_REQ_DONE),
            Ordering::Release,
        )
        .map_err(mem(BLK_GPA))
    }

    /// True if the guest has submitted requests not yet completed.
    pub fn pending(&self, ram: &GuestRam) -> Result<bool> {
        let prod: u32 = ram
            .load(GuestAddress(BLK_GPA + BLK_REQ_PROD), Ordering::Acquire)
            .map_err(mem(BLK_GPA))?;
        Ok(!self.state.broken && prod != self.state.done)
    }

    /// Execute every submitted request; returns how many completed.
    pub fn poll(&mut self, ram: &GuestRam) -> Result<usize> {
        if self.state.broken {
            return Ok(0);
        }
        let prod: u32 = ram
            .load(GuestAddress(BLK_GPA + BLK_REQ_PROD), Ordering::Acquire)
            .map_err(mem(BLK_GPA))?;
        let queued = prod.wrapping_sub(self.state.done);
        if queued > BLK_SLOTS {
            self.state.broken = true;
            return Err(Error::GuestProtocol {
                device: "block",
                detail: format!(
                    "request producer {prod} is {queued} ahead of completions {}",
                    self.state.done
                ),
            });
        }
        let mut completed = 0;
        for _ in 0..queued {
            let desc = BLK_GPA + BLK_DESC_OFF + u64::from(self.state.done % BLK_SLOTS) * BLK_DESC_SIZE;
            let status = match self.execute(ram, desc) {
                Ok(()) => BLK_ST_OK,
                // The backend holds the request (a COLO disk whose epoch is full): leave it and the ones
                // behind it queued; the next poll retries them in order.
                Err(HELD) => break,
                Err(st) => {
                    self.state.errors += 1;
                    st
                }
            };
            ram.write_obj(status, GuestAddress(desc + 4)).map_err(mem(desc))?;
            self.state.done = self.state.done.wrapping_add(1);
            completed += 1;
        }
        if completed > 0 {
            self.sync_to_guest(ram)?;
        }
        Ok(completed)
    }

    fn execute(&mut self, ram: &GuestRam, desc: u64) -> std::result::Result<(), u32> {
        let op: u32 = ram.read_obj(GuestAddress(desc)).map_err(|_| BLK_ST_BADREQ)?;
        let sector: u64 = ram.read_obj(GuestAddress(desc + 8)).map_err(|_| BLK_ST_BADREQ)?;
        let count: u32 = ram.read_obj(GuestAddress(desc + 16)).map_err(|_| BLK_ST_BADREQ)?;
        let buf: u64 = ram.read_obj(GuestAddress(desc + 24)).map_err(|_| BLK_ST_BADREQ)?;
        if op == BLK_OP_FLUSH {
            self.disk.flush().map_err(io_status)?;
            self.state.flushes += 1;
            return Ok(());
        }
        let len = u64::from(count) * SECTOR_SIZE;
        let in_disk = sector
            .checked_add(u64::from(count))
            .is_some_and(|end| end <= self.state.sectors);
        let in_ram = buf.checked_add(len).is_some_and(|end| end <= ram_size(ram));
        if count == 0 || count > BLK_MAX_SECTORS || !in_disk || !in_ram {
            return Err(BLK_ST_BADREQ);
        }
        self.buf.resize(len as usize, 0);
        let off = sector * SECTOR_SIZE;
        match op {
            BLK_OP_READ => {
                self.disk.read_at(&mut self.buf, off).map_err(io_status)?;
                ram.write_slice(&self.buf, GuestAddress(buf))
                    .map_err(|_| BLK_ST_BADREQ)?;
                self.state.reads += 1;
            }
            BLK_OP_WRITE => {
                ram.read_slice(&mut self.buf, GuestAddress(buf))
                    .map_err(|_| BLK_ST_BADREQ)?;
                self.disk.write_at(&self.buf, off).map_err(io_status)?;
                self.state.writes += 1;
            }
            _ => return Err(BLK_ST_BADREQ),
        }
        Ok(())
    }

    /// The current state.
    pub fn state(&self) -> BlockState {
        self.state.clone()
    }

    /// Replace the state; it must describe a disk of this image's size.
    pub fn restore(&mut self, state: &BlockState) -> Result<()> {
        let sectors = self.disk.size().map_err(Error::io("disk size"))? / SECTOR_SIZE;
        if state.sectors != sectors {
            return Err(Error::state(
                "block",
                format!("state is for {} sectors, image has {sectors}", state.sectors),
            ));
        }
        self.state = state.clone();
        Ok(())
    }

    /// Open `path` and load `state` into it.
    pub fn from_state(path: &Path, state: &BlockState) -> Result<Self> {
        let mut b = Self::open(path)?;
        b.restore(state)?;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_ram;

    fn submit(ram: &GuestRam, idx: u32, op: u32, sector: u64, count: u32, buf: u64) -> u64 {
        let desc = BLK_GPA + BLK_DESC_OFF + u64::from(idx % BLK_SLOTS) * BLK_DESC_SIZE;
        ram.write_obj(op, GuestAddress(desc)).unwrap();
        ram.write_obj(BLK_ST_PENDING, GuestAddress(desc + 4)).unwrap();
        ram.write_obj(sector, GuestAddress(desc + 8)).unwrap();
        ram.write_obj(count, GuestAddress(desc + 16)).unwrap();
        ram.write_obj(buf, GuestAddress(desc + 24)).unwrap();
        ram.store(idx + 1, GuestAddress(BLK_GPA + BLK_REQ_PROD), Ordering::Release)
            .unwrap();
        desc
    }

    fn status(ram: &GuestRam, desc: u64) -> u32 {
        ram.read_obj(GuestAddress(desc + 4)).unwrap()
    }

    /// A backend that holds (WouldBlock) every write while `hold` is set.
    struct Holding {
        inner: RawFile,
        hold: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl DiskBackend for Holding {
        fn size(&self) -> io::Result<u64> {
            self.inner.size()
        }
        fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
            if self.hold.load(Ordering::SeqCst) {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "held"));
            }
            self.inner.write_at(buf, offset)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    #[test]
    fn a_held_write_stays_queued_with_the_requests_behind_it_and_completes_later() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 * SECTOR_SIZE)
            .unwrap();
        let file = OpenOptions::new().read(true).write(true).open(&img).unwrap();
        let hold = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut b = Block::with_backend(Box::new(Holding {
            inner: RawFile(file),
            hold: hold.clone(),
        }))
        .unwrap();
        let (ram, _) = create_ram(MIN_RAM, false).unwrap();
        ram.write_slice(&[0x5a; 512], GuestAddress(0x100000)).unwrap();
        let first = submit(&ram, 0, BLK_OP_WRITE, 1, 1, 0x100000);
        assert_eq!(b.poll(&ram).unwrap(), 1);
        hold.store(true, Ordering::SeqCst);
        let held = submit(&ram, 1, BLK_OP_WRITE, 2, 1, 0x100000);
        let behind = submit(&ram, 2, BLK_OP_READ, 1, 1, 0x200000);
        for _ in 0..3 {
            assert_eq!(
                b.poll(&ram).unwrap(),
                0,
                "nothing completes while the write is held"
            );
            assert!(b.pending(&ram).unwrap());
        }
        assert_eq!(status(&ram, held), BLK_ST_PENDING);
        assert_eq!(status(&ram, behind), BLK_ST_PENDING);
        assert_eq!(b.state().errors, 0, "a held write is not an error");
        hold.store(false, Ordering::SeqCst);
        assert_eq!(b.poll(&ram).unwrap(), 2, "both complete, in order");
        assert_eq!(
            (status(&ram, first), status(&ram, held), status(&ram, behind)),
            (BLK_ST_OK, BLK_ST_OK, BLK_ST_OK)
        );
        assert!(!b.pending(&ram).unwrap());
        let on_disk = std::fs::read(&img).unwrap();
        assert_eq!(&on_disk[2 * 512..3 * 512], &[0x5a; 512][..]);
    }

    #[test]
    fn reads_writes_flushes_and_refuses_bad_requests() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 * SECTOR_SIZE)
            .unwrap();
        let (ram, _) = create_ram(MIN_RAM, false).unwrap();
        let mut b = Block::open(&img).unwrap();
        ram.write_slice(&[0xab; 1024], GuestAddress(0x100000)).unwrap();
        let d = submit(&ram, 0, BLK_OP_WRITE, 3, 2, 0x100000);
        assert_eq!(b.poll(&ram).unwrap(), 1);
        assert_eq!(status(&ram, d), BLK_ST_OK);
        let d = submit(&ram, 1, BLK_OP_FLUSH, 0, 0, 0);
        b.poll(&ram).unwrap();
        assert_eq!(status(&ram, d), BLK_ST_OK);
        let d = submit(&ram, 2, BLK_OP_READ, 3, 2, 0x200000);
        b.poll(&ram).unwrap();
        assert_eq!(status(&ram, d), BLK_ST_OK);
        let mut back = [0u8; 1024];
        ram.read_slice(&mut back, GuestAddress(0x200000)).unwrap();
        assert_eq!(back, [0xab; 1024]);
        let on_disk = std::fs::read(&img).unwrap();
        assert_eq!(&on_disk[3 * 512..5 * 512], &[0xab; 1024][..]);
        // Past the end of the disk, past the end of RAM, an unknown op, too large: BADREQ, nothing written.
        for (i, (op, sector, count, buf)) in [
            (BLK_OP_WRITE, 63, 2, 0x100000),
            (BLK_OP_READ, 0, 1, MIN_RAM - 256),
            (9, 0, 1, 0x100000),
            (BLK_OP_WRITE, 0, BLK_MAX_SECTORS + 1, 0x100000),
            (BLK_OP_WRITE, u64::MAX, 1, 0x100000),
        ]
        .into_iter()
        .enumerate()
        {
            let d = submit(&ram, 3 + i as u32, op, sector, count, buf);
            b.poll(&ram).unwrap();
            assert_eq!(status(&ram, d), BLK_ST_BADREQ, "request {i}");
        }
        assert_eq!(b.state().errors, 5);
        assert_eq!(std::fs::read(&img).unwrap(), on_disk);
        // A producer index too far ahead stops the device.
        ram.store(1000u32, GuestAddress(BLK_GPA + BLK_REQ_PROD), Ordering::Release)
            .unwrap();
        assert!(b.poll(&ram).is_err());
        assert!(b.state().broken);
    }

    #[test]
    fn state_round_trips_and_is_checked_against_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 * SECTOR_SIZE)
            .unwrap();
        let small = dir.path().join("s.img");
        std::fs::File::create(&small)
            .unwrap()
            .set_len(8 * SECTOR_SIZE)
            .unwrap();
        let (ram, _) = create_ram(MIN_RAM, false).unwrap();
        let mut b = Block::open(&img).unwrap();
        submit(&ram, 0, BLK_OP_FLUSH, 0, 0, 0);
        b.poll(&ram).unwrap();
        let st = b.state();
        let bytes = crate::devices::encode("block", &st).unwrap();
        for _ in 0..3 {
            let decoded: BlockState = crate::devices::decode("block", &bytes).unwrap();
            assert_eq!(Block::from_state(&img, &decoded).unwrap().state(), st);
            b.restore(&decoded).unwrap();
        }
        assert!(
            Block::from_state(&small, &st).is_err(),
            "a state for another disk size is refused"
        );
        // The restored device completes the next request in the right slot.
        let d = submit(&ram, 1, BLK_OP_FLUSH, 0, 0, 0);
        let mut fresh = Block::from_state(&img, &st).unwrap();
        assert_eq!(fresh.poll(&ram).unwrap(), 1);
        assert_eq!(status(&ram, d), BLK_ST_OK);
        let unaligned = dir.path().join("u.img");
        std::fs::File::create(&unaligned).unwrap().set_len(1000).unwrap();
        assert!(Block::open(&unaligned).is_err());
    }
}
