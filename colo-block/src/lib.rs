//! Block replication for a COLO pair.
//!
//! In COLO the primary VM (PVM) and the secondary VM (SVM) run the same workload; at each checkpoint the
//! SVM is reset to the PVM's state. Their disks must follow: the secondary's disk takes every write of the
//! PVM, while the SVM, which runs too, must keep seeing the disk as it was at the last checkpoint plus its
//! own writes. This crate provides the pieces; the VMM wires them to its block device model and its
//! transport.
//!
//! | module | what |
//! |---|---|
//! | [`backend`] | [`BlockBackend`] (sector-aligned read, write, flush, discard) for [`RawFile`] and [`MemBackend`] |
//! | [`primary`] | [`PrimaryDisk`]: local write plus a [`WriteRecord`] for the secondary, epoch barriers, Async/Sync completion |
//! | [`secondary`] | [`SecondaryDisk`]: hidden store and active overlay, `checkpoint`, `failover`, crash [`recover`]y |
//! | [`store`] | bounded overlays: [`MemStore`] in memory, [`JournalStore`] crash-recoverable on any backend |
//! | [`sync`] | [`InitialSync`]: dirty-chunk bitmap to bring a new or stale secondary up to date |
//! | [`fault`] | [`FaultyBackend`], [`VolatileBackend`]: fault injection and write-cache loss to test crash behaviour |
//!
//! Left to the VMM: the transport (records are plain data with [`bytes::Bytes`] payloads; deliver them in
//! order), turning [`Error::OverlayFull`] into a checkpoint request, when to checkpoint and fail over, and
//! the guest-facing device.
//!
//! ```
//! use bytes::Bytes;
//! use colo_block::*;
//!
//! # fn main() -> Result<()> {
//! let mut primary = PrimaryDisk::new(MemBackend::new(1 << 20)?, PrimaryConfig::default());
//! primary.start_replication()?;
//! let mut secondary = SecondaryDisk::new(
//!     MemBackend::new(1 << 20)?,
//!     MemStore::new(4096, 64)?, // hidden store
//!     MemStore::new(4096, 64)?, // active overlay
//!     0,
//! )?;
//! // The PVM writes; the SVM writes the same block differently.
//! primary.write(0, Bytes::from(vec![1u8; 4096]))?;
//! secondary.svm_write(0, &[2u8; 4096])?;
//! // Checkpoint: close the epoch, ship everything up to its barrier, commit.
//! let epoch = primary.end_epoch()?;
//! while let Some(out) = primary.poll_outgoing()? {
//!     match out {
//!         Outgoing::Write(rec) => secondary.apply(&rec)?,
//!         Outgoing::Discard(rec) => secondary.apply_discard(&rec)?,
//!         Outgoing::Barrier { epoch } => secondary.handle_barrier(epoch)?,
//!         Outgoing::SyncChunk { .. } | Outgoing::SyncDone => unreachable!("no sync started"),
//!     }
//! }
//! assert!(primary.barrier_handed_over(epoch));
//! let mut buf = [0u8; 4096];
//! secondary.svm_read(0, &mut buf)?;
//! assert_eq!(buf, [2u8; 4096]); // the SVM still sees its own write
//! secondary.checkpoint()?;
//! secondary.svm_read(0, &mut buf)?;
//! assert_eq!(buf, [1u8; 4096]); // now it has adopted the PVM's disk
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod backend;
mod error;
pub mod fault;
pub mod primary;
pub mod secondary;
pub mod store;
pub mod sync;

pub use backend::{BlockBackend, MemBackend, RawFile, SECTOR_SIZE};
pub use error::{Error, Result};
pub use fault::{FaultPlan, FaultyBackend, VolatileBackend};
pub use primary::{
    CompletionMode, DiscardRecord, EpochLimit, Outgoing, PrimaryConfig, PrimaryDisk, WriteId, WriteRecord,
    WriteStatus,
};
pub use secondary::{Recovery, SecondaryDisk, SecondaryState, recover};
pub use store::{JournalStore, MemStore, OverlayStore};
pub use sync::{InitialSync, SyncChunk, SyncProgress};
