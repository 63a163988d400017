//! colo-pair: the glue that drives the five colo-rs crates for a COLO pair, for any VMM.
//!
//! A VMM implements two small traits and runs one loop per side; this crate does the rest:
//!
//! | piece | what | crate it drives |
//! |---|---|---|
//! | [`Vm`] | pause/resume the guest, its memory (vm-memory), save/load vCPU and device state as blobs | — |
//! | [`Link`] | the sending half of the checkpoint channel (implemented for `colo_proto::Channel`) | colo-proto |
//! | [`SharedPrimaryDisk`], [`SharedSecondaryDisk`] | what the VMM's block device calls | colo-block |
//! | [`PrimaryPair`] | checkpoint transaction, dirty pages, disk write forwarding, output comparison, failover | all five |
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

#![warn(missing_docs)]

mod config;
mod disk;
mod error;
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
