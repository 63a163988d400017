//! The paravirtual block device over a raw image file: a ring of request descriptors in guest memory
//! (layout in [`crate::abi`]). The device owns the completion index, keeps it in its state and mirrors it
//! into guest memory.

use std::fs::{File, OpenOptions};
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

/// The block device model.
#[derive(Debug)]
pub struct Block {
    state: BlockState,
    file: File,
    buf: Vec<u8>,
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
        let len = file.metadata().map_err(Error::io("disk image metadata"))?.len();
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
            file,
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
        for _ in 0..queued {
            let desc = BLK_GPA + BLK_DESC_OFF + u64::from(self.state.done % BLK_SLOTS) * BLK_DESC_SIZE;
            let status = match self.execute(ram, desc) {
                Ok(()) => BLK_ST_OK,
                Err(st) => {
                    self.state.errors += 1;
                    st
                }
            };
            ram.write_obj(status, GuestAddress(desc + 4)).map_err(mem(desc))?;
            self.state.done = self.state.done.wrapping_add(1);
        }
        if queued > 0 {
            self.sync_to_guest(ram)?;
        }
        Ok(queued as usize)
    }

    fn execute(&mut self, ram: &GuestRam, desc: u64) -> std::result::Result<(), u32> {
        let op: u32 = ram.read_obj(GuestAddress(desc)).map_err(|_| BLK_ST_BADREQ)?;
        let sector: u64 = ram.read_obj(GuestAddress(desc + 8)).map_err(|_| BLK_ST_BADREQ)?;
        let count: u32 = ram.read_obj(GuestAddress(desc + 16)).map_err(|_| BLK_ST_BADREQ)?;
        let buf: u64 = ram.read_obj(GuestAddress(desc + 24)).map_err(|_| BLK_ST_BADREQ)?;
        if op == BLK_OP_FLUSH {
            self.file.sync_data().map_err(|e| {
                tracing::warn!("block: flush failed: {e}");
                BLK_ST_IOERR
            })?;
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
                self.file
                    .read_exact_at(&mut self.buf, off)
                    .map_err(|_| BLK_ST_IOERR)?;
                ram.write_slice(&self.buf, GuestAddress(buf))
                    .map_err(|_| BLK_ST_BADREQ)?;
                self.state.reads += 1;
            }
            BLK_OP_WRITE => {
                ram.read_slice(&mut self.buf, GuestAddress(buf))
                    .map_err(|_| BLK_ST_BADREQ)?;
                self.file.write_all_at(&self.buf, off).map_err(|_| BLK_ST_IOERR)?;
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
        let sectors = self
            .file
            .metadata()
            .map_err(Error::io("disk image metadata"))?
            .len()
            / SECTOR_SIZE;
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
