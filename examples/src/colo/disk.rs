//! The guest's block device in a pair: the mini-VMM's [`DiskBackend`] over colo-pair's shared colo-block
//! disks.
//!
//! A write colo-block cannot take now (the primary's epoch is full, the secondary's active overlay is full)
//! is answered with [`io::ErrorKind::WouldBlock`]: the block device then leaves the request queued and
//! retries it at its next poll, so it completes after the checkpoint that makes room and is never lost.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::time::Duration;

use bytes::Bytes;
use colo_block::{MemStore, RawFile, WriteStatus};
use colo_pair::{SharedPrimaryDisk, SharedSecondaryDisk};

use super::driver::Event;
use crate::devices::block::DiskBackend;

/// The secondary's disk type: the image file, and the hidden and active overlays in memory.
pub type SecondaryImage = SharedSecondaryDisk<SvmImage, MemStore, MemStore>;

/// The secondary's image file. While it only shadows the primary its flushes are skipped: its overlays
/// live in memory, so a crash of this host loses the shadow anyway (the primary, whose flushes are real,
/// holds the durable copy), and an fsync at every checkpoint would cost the pair hundreds of
/// milliseconds of pause here. Once promoted it is durable again ([`DurableSwitch::make_durable`]).
#[derive(Debug)]
pub struct SvmImage {
    file: RawFile,
    durable: Arc<AtomicBool>,
}

impl SvmImage {
    /// Wraps the image; flushes are skipped until the returned switch is set (see [`DurableSwitch::make_durable`]).
    pub fn new(file: RawFile) -> (Self, DurableSwitch) {
        let durable = Arc::new(AtomicBool::new(false));
        let switch = DurableSwitch {
            file: file.file().try_clone().ok(),
            durable: durable.clone(),
        };
        (Self { file, durable }, switch)
    }
}

/// Turns the secondary's image durable at promotion.
#[derive(Debug)]
pub struct DurableSwitch {
    file: Option<std::fs::File>,
    durable: Arc<AtomicBool>,
}

impl DurableSwitch {
    /// From now on every flush syncs the image; sync what is there now.
    pub fn make_durable(&self) -> io::Result<()> {
        self.durable.store(true, Ordering::SeqCst);
        match &self.file {
            Some(f) => f.sync_data(),
            None => Err(io::Error::other("no handle on the image to sync")),
        }
    }
}

impl colo_block::BlockBackend for SvmImage {
    fn len(&self) -> u64 {
        self.file.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> colo_block::Result<()> {
        self.file.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> colo_block::Result<()> {
        self.file.write_at(offset, data)
    }
    fn flush(&mut self) -> colo_block::Result<()> {
        if self.durable.load(Ordering::SeqCst) {
            self.file.flush()
        } else {
            Ok(())
        }
    }
}

/// How long the device thread waits before it retries a held write.
const HELD_BACKOFF: Duration = Duration::from_micros(200);

fn io_err(e: colo_block::Error) -> io::Error {
    io::Error::other(e)
}

fn held(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::WouldBlock, what.to_string())
}

/// The primary guest's disk: local image plus replication records.
#[derive(Debug)]
pub struct PrimaryBlock {
    disk: SharedPrimaryDisk<RawFile>,
    wake: Sender<Event>,
    len: u64,
}

impl PrimaryBlock {
    /// The device's view of `disk`; a refused write sends [`Event::Wake`] so the driver checkpoints.
    pub fn new(disk: SharedPrimaryDisk<RawFile>, wake: Sender<Event>) -> Self {
        let len = colo_block::BlockBackend::len(disk.lock().disk());
        Self { disk, wake, len }
    }
}

impl DiskBackend for PrimaryBlock {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.disk.read(offset, buf).map_err(io_err)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.disk.write(offset, Bytes::copy_from_slice(buf)) {
            // `run` sets colo-block's Async completion mode: a write is complete once on the local disk.
            // (Sync mode would need the device to complete requests later, from `take_completed`.)
            Ok(WriteStatus::Completed) => Ok(()),
            Ok(WriteStatus::AwaitingAck(id)) => Err(io::Error::other(format!(
                "write {id:?} awaits the secondary's acknowledgement: Sync completion mode is not supported here"
            ))),
            Err(colo_block::Error::EpochFull { .. }) => {
                // The driver starts the checkpoint at its next entry; wake it now.
                let _ = self.wake.send(Event::Wake);
                std::thread::sleep(HELD_BACKOFF);
                Err(held("disk epoch full: the write waits for the next checkpoint"))
            }
            Err(e) => Err(io_err(e)),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.disk.flush().map_err(io_err)
    }
}

/// The secondary guest's disk: reads through its active overlay, writes into it.
#[derive(Debug)]
pub struct SecondaryBlock {
    disk: SecondaryImage,
    wake: Sender<Event>,
    len: u64,
}

impl SecondaryBlock {
    /// The device's view of `disk`; a refused write sends [`Event::Wake`] so the driver asks the primary
    /// for an early checkpoint.
    pub fn new(disk: SecondaryImage, wake: Sender<Event>) -> Self {
        let len = colo_block::BlockBackend::len(disk.lock().disk());
        Self { disk, wake, len }
    }
}

impl DiskBackend for SecondaryBlock {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.disk.read(offset, buf).map_err(io_err)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.disk.write(offset, buf) {
            Ok(()) => Ok(()),
            Err(colo_block::Error::OverlayFull { .. }) => {
                // The driver asks the primary for an early checkpoint (CheckpointWanted).
                let _ = self.wake.send(Event::Wake);
                std::thread::sleep(HELD_BACKOFF * 5);
                Err(held(
                    "active overlay full: the write waits for the next checkpoint",
                ))
            }
            Err(e) => Err(io_err(e)),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.disk.flush().map_err(io_err)
    }
}
