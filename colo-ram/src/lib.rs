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
//! | `kvm` | `KvmDirtyLog`, `KvmManualDirtyLog`, `KvmDirtyRing` over kvm-ioctls (feature `kvm`) |
//! | [`ram`] | [`GuestRam`] / [`RamLayout`]: guest RAM as host mappings |
//! | [`primary`] | [`PrimaryRam`], [`collect`], [`PageRun`], zero detection, pre-copy policy |
//! | [`cache`] | [`RamCache`] and its flush |
//!
//! ## Example: one checkpoint, without KVM
//!
//! ```rust
//! use colo_ram::*;
//! use vm_memory::{bitmap::AtomicBitmap, Bytes, GuestAddress, GuestMemoryMmap};
//!
//! let pvm = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! let svm = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! let layout = RamLayout::of(&pvm).unwrap();
//! // On KVM: UnionLog::new(KvmDirtyLog::new(&vm_fd, layout.clone(), slots)?, AtomicBitmapLog::new(&pvm)?)
//! let mut primary = PrimaryRam::new(layout.clone(), AtomicBitmapLog::new(&pvm).unwrap(), CollectOptions::default());
//! let mut cache = RamCache::new(layout, FlushOptions::default()).unwrap();
//! let mut svm_log = AtomicBitmapLog::new(&svm).unwrap();
//! let (pram, mut sram) = (GuestRam::new(&pvm).unwrap(), GuestRam::new(&svm).unwrap());
//! pvm.write_slice(b"boot", GuestAddress(0x1000)).unwrap();
//! primary.mark_all().unwrap(); // initial sync: every page, into the cache and SVM memory
//! for run in primary.collect(&pram).unwrap() {
//!     match run.unwrap() {
//!         PageRun::Data { gpa, data } => cache.load_initial(&mut sram, gpa, data).unwrap(),
//!         PageRun::Zero { gpa, pages } => cache.load_initial_zero(&mut sram, gpa, pages).unwrap(),
//!     }
//! }
//!
//! pvm.write_slice(b"epoch 1", GuestAddress(0x3000)).unwrap(); // the primary runs
//! svm.write_slice(b"diverged", GuestAddress(0x8000)).unwrap(); // so does the secondary
//!
//! primary.take_log().unwrap(); // checkpoint, primary paused: the pages written since the last one
//! for run in primary.collect(&pram).unwrap() {
//!     match run.unwrap() {
//!         // ...over the wire...
//!         PageRun::Data { gpa, data } => cache.receive(gpa, data).unwrap(),
//!         PageRun::Zero { gpa, pages } => cache.receive_zero(gpa, pages).unwrap(),
//!     }
//! }
//! let stats = cache.flush(&mut sram, &mut svm_log).unwrap(); // secondary paused
//! assert_eq!(stats.flushed_pages, 2); // the received page and the one the SVM dirtied itself
//! ```

pub mod bitmap;
pub mod cache;
pub mod error;
#[cfg(feature = "kvm")]
pub mod kvm;
pub mod log;
mod pool;
pub mod primary;
pub mod ram;

pub use bitmap::DirtyBitmap;
pub use cache::{FlushOptions, FlushStats, RamCache};
pub use error::RamError;
#[cfg(feature = "kvm")]
pub use kvm::{KvmDirtyLog, KvmDirtyRing, KvmManualDirtyLog};
pub use log::{AtomicBitmapLog, DirtyLog, DirtySet, NoopDirtyLog, UnionLog};
pub use primary::{
    CollectOptions, CollectStats, Collection, PageRun, PrecopyPolicy, PrimaryRam, collect, is_zero,
};
pub use ram::{GuestRam, RamLayout, RegionLayout};

/// The guest page size tracked by every bitmap here (x86-64 KVM dirty logs use 4 KiB pages).
pub const PAGE_SIZE: usize = 4096;
