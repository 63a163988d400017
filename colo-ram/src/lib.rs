//! Guest RAM for COLO (coarse-grained lock-stepping) VM fault tolerance.
//!
//! On the **primary**, a [`DirtyLog`] (KVM's log OR the VMM's own vm-memory writes) says which pages the
//! guest and the devices wrote since the last checkpoint; [`PrimaryRam`] turns that into [`PageRun`]s of
//! `(guest address, borrowed bytes)` with all-zero pages reduced to markers, optionally sending most of
//! them in pre-copy rounds while the guest still runs.
//!
//! On the **secondary**, [`RamCache`] holds a full copy of the primary's RAM. Pages received during a
//! checkpoint go only into the cache; [`RamCache::flush`] then copies the union of the received pages and
//! the pages the secondary VM dirtied itself into its memory, in parallel for large sets.
//!
//! The crate moves bytes and bits only: the VMM pauses vCPUs, sends the runs over its channel (colo-proto
//! carries them as `(gpa, &[u8])` batches), and calls the cache with what arrives.
//!
//! | module | what |
//! |---|---|
//! | [`bitmap`] | [`DirtyBitmap`]: word-at-a-time bitmap with fast run iteration |
//! | [`log`] | [`DirtyLog`] trait, [`DirtySet`], [`AtomicBitmapLog`], [`UnionLog`] |
//! | `kvm` | `KvmDirtyLog` and `KvmManualDirtyLog` over kvm-ioctls (feature `kvm`) |
//! | [`ram`] | [`GuestRam`] / [`RamLayout`]: guest RAM as host mappings |
//! | [`primary`] | [`PrimaryRam`], [`collect`], [`PageRun`], zero detection, pre-copy policy |
//! | [`cache`] | [`RamCache`] and its flush |

pub mod bitmap;
pub mod cache;
pub mod error;
#[cfg(feature = "kvm")]
pub mod kvm;
pub mod log;
pub mod primary;
pub mod ram;

pub use bitmap::DirtyBitmap;
pub use cache::{FlushOptions, FlushStats, RamCache};
pub use error::RamError;
#[cfg(feature = "kvm")]
pub use kvm::{KvmDirtyLog, KvmManualDirtyLog};
pub use log::{AtomicBitmapLog, DirtyLog, DirtySet, NoopDirtyLog, UnionLog};
pub use primary::{
    CollectOptions, CollectStats, Collection, PageRun, PrecopyPolicy, PrimaryRam, collect, is_zero,
};
pub use ram::{GuestRam, RamLayout, RegionLayout};

/// The guest page size tracked by every bitmap here (x86-64 KVM dirty logs use 4 KiB pages).
pub const PAGE_SIZE: usize = 4096;
