//! colo-pair: the glue that drives the five colo-rs crates for a COLO pair, for any VMM.
//!
//! A VMM implements two small traits and runs one loop per side; this crate does the rest:
//!
//! | piece | what | crate it drives |
//! |---|---|---|
//! | [`Vm`] | pause/resume the guest, its memory (vm-memory), save/load vCPU and device state as blobs | — |
//! | [`Link`] | the sending half of the checkpoint channel (implemented for `colo_proto::Channel`) | colo-proto |
//! | [`SharedPrimaryDisk`], [`SharedSecondaryDisk`] | what the VMM's block device calls | colo-block |
//! | [`PrimaryPair`] | checkpoint transaction, dirty pages, disk write forwarding, output comparison, failover, re-protection ([`PrimaryPair::reprotect`]) | all five |
//! | [`SecondaryPair`] | RAM cache and union flush, device load, hidden/active overlays, rewriter, promotion | all five |
//! | [`PairStatus`] | role, epoch, checkpoints, pauses, bytes, compare counters, failover state and reason | — |
//!
//! Both drivers are sans-IO apart from the [`Link`] they send on and the [`Vm`] they pause: the VMM hands
//! them each received message, client frame and guest frame with the current time, calls
//! `handle_timeout` when `poll_timeout` passes, and carries out the [`Output`]s they return (frames to the
//! client with their fencing token, frames to the guest, promotion, shutdown). See the README for the loop.
//!
//! Wire mapping of the checkpoint (epoch `N`): the primary pauses, closes the disk epoch (colo-block epoch
//! `N - 1`) and sends its writes as `BlockWrite`s, then the dirty pages, then device state, then the
//! session's `BlockBarrier { N }`; the secondary applies writes as they arrive, and on the barrier flushes
//! its RAM cache, loads the devices, commits the disk checkpoint and resets the rewriter, in one step. Client
//! frames mirrored to the secondary and the SVM's frames sent back to the comparator travel as
//! `OutputFrame`s on the same channel, in order with the checkpoint messages.
//!
//! On a protocol-version-3 link ([`Link::version`]) the drivers also run colo-block's initial disk sync before
//! the first checkpoint (when the primary's disk was handed over with `start_sync`), acknowledge applied
//! writes for colo-block's Sync completion mode ([`SharedPrimaryDisk::take_completed`]), forward discards,
//! let the secondary ask for an early checkpoint ([`Trigger::Secondary`]) and forward the PVM's ISNs of
//! guest-opened TCP connections to the rewriter. A secondary stops, and never promotes, on a protocol error
//! from its primary ([`SecondaryPair::channel_error`]).
//!
//! ## Example: the first checkpoint of a pair in one thread
//!
//! ```
//! use std::os::unix::net::UnixStream;
//! use std::time::Instant;
//! use colo_block::{MemBackend, MemStore, PrimaryConfig, PrimaryDisk, SecondaryDisk};
//! use colo_failover::NoArbiter;
//! use colo_pair::*;
//! use colo_proto::{Channel, Message, PROTOCOL_VERSION};
//! use colo_ram::AtomicBitmapLog;
//! use vm_memory::{bitmap::AtomicBitmap, GuestAddress, GuestMemoryMmap};
//!
//! /// A guest that never runs: memory plus one device blob.
//! struct Idle(GuestMemoryMmap<AtomicBitmap>);
//! impl Vm for Idle {
//!     type Memory = GuestMemoryMmap<AtomicBitmap>;
//!     fn memory(&self) -> &Self::Memory { &self.0 }
//!     fn pause(&mut self) -> Result<(), VmError> { Ok(()) }
//!     fn resume(&mut self) -> Result<(), VmError> { Ok(()) }
//!     fn save_state(&mut self) -> Result<Vec<DeviceState>, VmError> {
//!         Ok(vec![DeviceState { id: 0, data: b"vcpu".to_vec() }])
//!     }
//!     fn load_state(&mut self, s: &[DeviceState]) -> Result<(), VmError> {
//!         if s.len() == 1 && s[0].data == b"vcpu" { Ok(()) } else { Err("bad state".into()) }
//!     }
//! }
//! fn channel(s: UnixStream) -> Channel<UnixStream> {
//!     let mut ch = Channel::new(s);
//!     ch.set_version(PROTOCOL_VERSION); // a real VMM runs the colo-proto handshake instead
//!     ch
//! }
//! /// The next message waiting on `ch`, if any (the socket is non-blocking).
//! fn poll(ch: &mut Channel<UnixStream>) -> Option<Message> {
//!     ch.recv().ok()
//! }
//!
//! let mem = || GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 64 << 10)]).unwrap();
//! let (pvm, svm) = (Idle(mem()), Idle(mem()));
//! let (plog, slog) = (AtomicBitmapLog::new(&pvm.0)?, AtomicBitmapLog::new(&svm.0)?);
//! let (a, b) = UnixStream::pair()?;
//! a.set_nonblocking(true)?;
//! let (mut p_rx, mut s_rx) = (channel(a.try_clone()?), channel(b.try_clone()?));
//! b.set_nonblocking(true)?;
//! let pdisk = PrimaryDisk::new(MemBackend::new(1 << 20)?, PrimaryConfig::default());
//! let sdisk = SecondaryDisk::new(MemBackend::new(1 << 20)?, MemStore::new(4096, 64)?, MemStore::new(4096, 64)?, 0)?;
//! let now = Instant::now();
//! let mut s = SecondaryPair::new(PairConfig::default(), now, svm, Box::new(slog), SharedSecondaryDisk::new(sdisk),
//!     Box::new(channel(b)), Box::new(NoArbiter::unsafe_under_partitions()))?;
//! let mut p = PrimaryPair::new(PairConfig::default(), now, pvm, Box::new(plog), SharedPrimaryDisk::new(pdisk),
//!     Box::new(channel(a)), Box::new(NoArbiter::unsafe_under_partitions()))?;
//! // Carry messages across until checkpoint 1 (the end of the migration) is committed on both sides.
//! for _ in 0..10 {
//!     while let Some(m) = poll(&mut s_rx) { s.handle_message(Instant::now(), m)?; }
//!     while let Some(m) = poll(&mut p_rx) { p.handle_message(Instant::now(), m)?; }
//! }
//! assert_eq!((p.status().epoch, s.status().epoch), (1, 1));
//! assert_eq!((p.phase(), s.phase()), (Phase::Colo, Phase::Colo));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

mod config;
mod disk;
mod error;
mod peer;
mod primary;
mod secondary;
mod status;
mod vm;

pub use config::PairConfig;
pub use disk::{SharedPrimaryDisk, SharedSecondaryDisk};
pub use error::{PairError, Result};
pub use primary::PrimaryPair;
pub use secondary::{SECONDARY_FAILED, SecondaryPair};
pub use status::{PairStatus, Phase, Side, Trigger};
pub use vm::{DeviceState, Link, Output, Release, Vm, VmError};

/// Most guest output frames a driver holds (refused by a full comparator, waiting for a token or for the
/// takeover) before it refuses more with [`PairError::OutputFull`].
pub const MAX_HELD_FRAMES: usize = 65536;
