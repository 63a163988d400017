//! The crate's error type.

use crate::FailoverStatus;

/// Everything the node machine can refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The event makes no sense in the current state; nothing changed.
    #[error("event {event} is not valid in state {state}")]
    UnexpectedEvent {
        /// The state the node was in.
        state: &'static str,
        /// The refused event.
        event: &'static str,
    },
    /// A failover command while a failover is already under way (QEMU refuses it the same way).
    #[error("a failover is already requested (status {status:?})")]
    FailoverAlreadyRequested {
        /// The failover status at the time.
        status: FailoverStatus,
    },
    /// A failover command outside COLO.
    #[error("not in COLO (state {state}): nothing to fail over")]
    NotInColo {
        /// The state the node was in.
        state: &'static str,
    },
    /// The configuration is inconsistent.
    #[error("invalid configuration: {detail}")]
    InvalidConfig {
        /// What is wrong.
        detail: &'static str,
    },
}
