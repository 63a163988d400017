//! Disk handles a VMM's block device model calls (from its device thread), shared with the driver.
//!
//! The primary's guest writes go through [`SharedPrimaryDisk::write`]: local disk plus a replication record
//! that the [`PrimaryPair`](crate::PrimaryPair) sends. The secondary guest's I/O goes through
//! [`SharedSecondaryDisk`]: reads resolve active overlay, hidden store, disk; writes land in the active
//! overlay; the [`SecondaryPair`](crate::SecondaryPair) applies the primary's writes underneath.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use colo_block::{BlockBackend, Error, OverlayStore, PrimaryDisk, SecondaryDisk, WriteId, WriteStatus};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves the disk state as colo-block left it (each call is
    // all-or-nothing on validation errors); keep going rather than poisoning the pair.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct PrimaryInner<B> {
    disk: Mutex<PrimaryDisk<B>>,
    /// A write was refused with `EpochFull`: the driver must checkpoint.
    epoch_full: AtomicBool,
    /// Writes (Sync completion mode) the secondary acknowledged, or that completed because it was lost.
    completed: Mutex<Vec<WriteId>>,
}

/// The primary's disk, shared between the VMM's block device and the [`PrimaryPair`](crate::PrimaryPair).
#[derive(Debug)]
pub struct SharedPrimaryDisk<B> {
    inner: Arc<PrimaryInner<B>>,
}

impl<B> Clone for SharedPrimaryDisk<B> {
    fn clone(&self) -> Self {
        SharedPrimaryDisk {
            inner: self.inner.clone(),
        }
    }
}

impl<B: BlockBackend> SharedPrimaryDisk<B> {
    /// Wraps a primary disk (replication is started by the driver).
    pub fn new(disk: PrimaryDisk<B>) -> Self {
        SharedPrimaryDisk {
            inner: Arc::new(PrimaryInner {
                disk: Mutex::new(disk),
                epoch_full: AtomicBool::new(false),
                completed: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A guest write. `Ok(AwaitingAck(id))` (colo-block's Sync completion mode, DRBD protocol C): complete
    /// the guest's request once `id` comes out of [`take_completed`](Self::take_completed), which happens
    /// when the secondary has applied it (its `BlockAck`), or when the secondary is lost.
    /// `Err(EpochFull)`: nothing was written; hold the request and retry it after the next checkpoint. The driver starts that checkpoint at its next entry (any `handle_*` call, or
    /// `checkpoint_now` if the VMM wants it at once from another thread's notice).
    pub fn write(&self, offset: u64, data: Bytes) -> Result<WriteStatus, Error> {
        let r = lock(&self.inner.disk).write(offset, data);
        if matches!(r, Err(Error::EpochFull { .. })) {
            self.inner.epoch_full.store(true, Ordering::SeqCst);
        }
        r
    }

    /// A guest read.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        lock(&self.inner.disk).read(offset, buf)
    }

    /// A guest flush.
    pub fn flush(&self) -> Result<(), Error> {
        lock(&self.inner.disk).flush()
    }

    /// The disk itself (for the driver, tests and tools).
    pub fn lock(&self) -> MutexGuard<'_, PrimaryDisk<B>> {
        lock(&self.inner.disk)
    }

    pub(crate) fn take_epoch_full(&self) -> bool {
        self.inner.epoch_full.swap(false, Ordering::SeqCst)
    }

    /// The writes that completed since the last call (Sync completion mode), in completion order: complete
    /// the guest's requests for them now. Always empty in Async mode.
    pub fn take_completed(&self) -> Vec<WriteId> {
        std::mem::take(&mut *lock(&self.inner.completed))
    }

    pub(crate) fn push_completed(&self, ids: Vec<WriteId>) {
        if !ids.is_empty() {
            lock(&self.inner.completed).extend(ids);
        }
    }
}

#[derive(Debug)]
struct SecondaryInner<D, H, A> {
    disk: Mutex<SecondaryDisk<D, H, A>>,
    overlay_full: AtomicBool,
}

/// The secondary's disk, shared between the VMM's block device and the
/// [`SecondaryPair`](crate::SecondaryPair).
#[derive(Debug)]
pub struct SharedSecondaryDisk<D, H, A> {
    inner: Arc<SecondaryInner<D, H, A>>,
}

impl<D, H, A> Clone for SharedSecondaryDisk<D, H, A> {
    fn clone(&self) -> Self {
        SharedSecondaryDisk {
            inner: self.inner.clone(),
        }
    }
}

impl<D: BlockBackend, H: OverlayStore, A: OverlayStore> SharedSecondaryDisk<D, H, A> {
    /// Wraps a secondary disk.
    pub fn new(disk: SecondaryDisk<D, H, A>) -> Self {
        SharedSecondaryDisk {
            inner: Arc::new(SecondaryInner {
                disk: Mutex::new(disk),
                overlay_full: AtomicBool::new(false),
            }),
        }
    }

    /// A read by the SVM (its view: last checkpoint plus its own writes; after failover, the disk).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        lock(&self.inner.disk).svm_read(offset, buf)
    }

    /// A write by the SVM. `Err(OverlayFull)`: hold the request until the next checkpoint.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let r = lock(&self.inner.disk).svm_write(offset, data);
        if matches!(r, Err(Error::OverlayFull { .. })) {
            self.inner.overlay_full.store(true, Ordering::SeqCst);
        }
        r
    }

    /// A flush by the SVM.
    pub fn flush(&self) -> Result<(), Error> {
        lock(&self.inner.disk).svm_flush()
    }

    /// The disk itself (for the driver, tests and tools).
    pub fn lock(&self) -> MutexGuard<'_, SecondaryDisk<D, H, A>> {
        lock(&self.inner.disk)
    }

    pub(crate) fn take_overlay_full(&self) -> bool {
        self.inner.overlay_full.swap(false, Ordering::SeqCst)
    }
}
