//! The mini-VMM's error type.

use std::io;

/// Everything that can go wrong in the mini-VMM core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("KVM {op}: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up or accessed.
    #[error("guest memory at {gpa:#x}: {detail}")]
    Memory {
        /// Guest-physical address involved.
        gpa: u64,
        /// What failed.
        detail: String,
    },
    /// The guest image is not a loadable ELF for this machine.
    #[error("guest ELF: {0}")]
    Elf(String),
    /// Host I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A saved state is malformed or does not fit this machine.
    #[error("invalid {what} state: {detail}")]
    InvalidState {
        /// Which state (device or vCPU).
        what: &'static str,
        /// Why it was rejected.
        detail: String,
    },
    /// The guest broke the device protocol (bad ring index, descriptor out of range).
    #[error("device {device}: guest protocol violation: {detail}")]
    GuestProtocol {
        /// Device name.
        device: &'static str,
        /// What the guest did.
        detail: String,
    },
    /// The VM is not in a state that allows the request.
    #[error("VM is {state}, cannot {op}")]
    WrongState {
        /// The current state.
        state: &'static str,
        /// The refused operation.
        op: &'static str,
    },
    /// The guest stopped unexpectedly (fault, unknown exit).
    #[error("guest stopped: {0}")]
    GuestStopped(String),
}

impl Error {
    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| Self::Kvm { op, source }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    pub(crate) fn state(what: &'static str, detail: impl Into<String>) -> Self {
        Self::InvalidState {
            what,
            detail: detail.into(),
        }
    }
}

/// Result alias for the VMM core.
pub type Result<T> = std::result::Result<T, Error>;
