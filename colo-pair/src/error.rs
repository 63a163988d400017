//! The crate's error type.

use crate::vm::VmError;

/// What can go wrong while driving a pair.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// The VMM's guest operation failed.
    #[error("guest VM: {op} failed: {source}")]
    Vm {
        /// What was being done (pause, resume, save state, load state).
        op: &'static str,
        /// The VMM's error.
        #[source]
        source: VmError,
    },
    /// Guest RAM tracking, collection or the RAM cache failed.
    #[error("RAM at epoch {epoch}: {source}")]
    Ram {
        /// The checkpoint epoch.
        epoch: u64,
        /// The colo-ram error.
        #[source]
        source: colo_ram::RamError,
    },
    /// Block replication failed.
    #[error("block replication ({what}): {source}")]
    Block {
        /// What was being done.
        what: &'static str,
        /// The colo-block error.
        #[source]
        source: colo_block::Error,
    },
    /// The checkpoint channel or the session machine failed.
    #[error("COLO protocol: {0}")]
    Proto(#[from] colo_proto::Error),
    /// The failover machine refused an event.
    #[error("failover machine: {0}")]
    Failover(#[from] colo_failover::Error),
    /// The comparator or rewriter configuration is invalid.
    #[error("network compare: {0}")]
    Net(#[from] colo_net::NetError),
    /// The peer sent a page batch with a page size this side does not use.
    #[error("peer sent {found}-byte pages at epoch {epoch}; guest pages are {expected} bytes")]
    PageSize {
        /// Epoch of the batch.
        epoch: u64,
        /// Page size in the batch.
        found: u32,
        /// Our page size.
        expected: u32,
    },
    /// A message that this side never accepts (for example a primary-only message sent to a primary).
    #[error("unexpected {what} from the peer while {state}")]
    Unexpected {
        /// The message kind.
        what: String,
        /// Our state.
        state: &'static str,
    },
    /// Too many frames are held (waiting for a checkpoint, a token or a takeover): stop reading the guest's
    /// transmit queue for now; the frame was not taken.
    #[error("{held} output frames held; frame refused")]
    OutputFull {
        /// Frames held.
        held: usize,
    },
    /// A feature needs a newer protocol version than the link speaks.
    #[error("{feature} needs protocol version 3; the link speaks version {version}")]
    NeedsVersion {
        /// The feature.
        feature: &'static str,
        /// The link's version.
        version: u16,
    },
    /// The peer was lost while a command was carried out (the pair went on without it; see its status).
    #[error("the peer was lost during {during}")]
    PeerLost {
        /// What was going on.
        during: &'static str,
    },
    /// A command given in a state where it makes no sense; nothing changed.
    #[error("{command} is not possible while {state}")]
    BadCommand {
        /// The command.
        command: &'static str,
        /// Our state.
        state: &'static str,
    },
}

/// Result alias for this crate.
pub type Result<T, E = PairError> = std::result::Result<T, E>;
