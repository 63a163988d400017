//! The crate's error type.

use std::io;

/// Everything that can go wrong in `colo-block`.
///
/// Every variant carries enough context (offsets, epochs, ids, capacities) to log a useful line without
/// the caller having to remember what it asked for.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request's offset or length is not a multiple of the sector size (512).
    #[error("request at offset {offset} length {len} is not aligned to {align} bytes")]
    Misaligned {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Required alignment in bytes.
        align: u64,
    },
    /// A request reaches past the end of the device.
    #[error("request at offset {offset} length {len} is beyond the device end {device_len}")]
    OutOfRange {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Length of the device in bytes.
        device_len: u64,
    },
    /// An I/O error from the underlying storage.
    #[error("{op} at offset {offset} failed: {source}")]
    Io {
        /// The operation that failed (`read`, `write`, `flush`, `open`, ...).
        op: &'static str,
        /// Byte offset of the failed operation (0 for flush or open).
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An overlay (hidden store or active overlay) has no room for the blocks a request needs.
    ///
    /// Nothing was changed. For the active overlay the VMM turns this into a checkpoint request (a
    /// checkpoint empties both overlays) and retries the SVM's write. For the hidden store see
    /// [`SecondaryDisk::apply_batch`](crate::SecondaryDisk::apply_batch).
    #[error("{store} overlay full: {used} of {capacity} blocks used, request needs {needed} more")]
    OverlayFull {
        /// Which overlay (`hidden` or `active`).
        store: &'static str,
        /// Blocks in use.
        used: usize,
        /// Capacity in blocks.
        capacity: usize,
        /// New blocks the rejected request needed.
        needed: usize,
    },
    /// The primary's replication backlog (queued plus unacknowledged bytes) would exceed its cap.
    ///
    /// The write was not performed; the VMM retries after draining the queue or taking acks.
    #[error("replication backlog of {backlog} bytes plus {len} would exceed the cap of {limit} bytes")]
    BacklogFull {
        /// Bytes currently queued or awaiting acknowledgement.
        backlog: u64,
        /// Length of the rejected write.
        len: u64,
        /// Configured cap.
        limit: u64,
    },
    /// A primary write would touch more distinct blocks in this epoch than the secondary's hidden store
    /// holds ([`EpochLimit`](crate::primary::EpochLimit)).
    ///
    /// Nothing was written. The VMM holds the guest's request, takes a checkpoint and retries.
    #[error("epoch {epoch}: write needs {needed} new blocks, {used} of {limit} already touched")]
    EpochFull {
        /// The current epoch.
        epoch: u64,
        /// Distinct blocks already written in the epoch.
        used: usize,
        /// New blocks the rejected write needs.
        needed: usize,
        /// The limit.
        limit: usize,
    },
    /// An acknowledgement names a write id that was never handed to the transport.
    #[error("ack for write {id} but the highest write handed over is {highest_sent:?}")]
    UnknownAck {
        /// The acknowledged id.
        id: u64,
        /// The highest id handed over so far, if any.
        highest_sent: Option<u64>,
    },
    /// A replication record or barrier carries an epoch other than the one expected.
    #[error("expected epoch {expected}, got {found}")]
    EpochMismatch {
        /// The epoch the receiver is in.
        expected: u64,
        /// The epoch in the input.
        found: u64,
    },
    /// A checkpoint was asked for before the epoch's barrier arrived.
    #[error("checkpoint of epoch {epoch} before its block barrier arrived")]
    BarrierMissing {
        /// The epoch being closed.
        epoch: u64,
    },
    /// An event that makes no sense in the current state. The state is unchanged.
    #[error("{event} is not allowed in state {state}")]
    InvalidState {
        /// The current state.
        state: &'static str,
        /// The rejected event.
        event: &'static str,
    },
    /// A journal (file-backed overlay) is malformed.
    #[error("journal corrupt: {reason} (slot {slot:?})")]
    CorruptJournal {
        /// What is wrong.
        reason: &'static str,
        /// The slot concerned, if any.
        slot: Option<u64>,
    },
    /// A configuration value is unusable.
    #[error("invalid configuration: {0}")]
    InvalidConfig(&'static str),
    /// Two devices that must have equal geometry do not.
    #[error("{what} mismatch: expected {expected}, found {found}")]
    Mismatch {
        /// What differs (`disk length`, `block size`, ...).
        what: &'static str,
        /// The expected value.
        expected: u64,
        /// The value found.
        found: u64,
    },
}

/// Shorthand for `Result<T, colo_block::Error>`.
pub type Result<T> = std::result::Result<T, Error>;
