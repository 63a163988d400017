//! The crate's error type.

use std::sync::Arc;

use crate::frame::Kind;
use crate::handshake::Refusal;
use crate::message::Reason;

/// Everything that can go wrong on a COLO channel: bad bytes from the peer, a refused handshake, a checkpoint
/// transaction out of order, or the socket itself.
///
/// The type is `Clone` so that a session machine can keep the error that failed it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The first four bytes of a frame are not the COLO magic.
    #[error("bad frame magic {found:#010x}")]
    BadMagic {
        /// The value read where the magic belongs.
        found: u32,
    },
    /// The frame's protocol version is outside the range this side speaks.
    #[error("unsupported protocol version {found} (this side speaks {min}..={max})")]
    UnsupportedVersion {
        /// The version in the frame header.
        found: u16,
        /// Oldest version this side accepts.
        min: u16,
        /// Newest version this side accepts.
        max: u16,
    },
    /// The header's own checksum does not match: a header byte was damaged.
    #[error("frame header checksum mismatch (expected {expected:#010x}, computed {computed:#010x})")]
    HeaderCrc {
        /// Checksum carried in the header.
        expected: u32,
        /// Checksum computed over the received header.
        computed: u32,
    },
    /// The message kind is unknown, or not part of the frame's protocol version.
    #[error("unknown message kind {kind} in protocol version {version}")]
    UnknownKind {
        /// Raw kind value.
        kind: u16,
        /// Protocol version of the frame.
        version: u16,
    },
    /// Flag bits this version does not define.
    #[error("unknown frame flags {flags:#x} on {kind:?}")]
    UnknownFlags {
        /// Message kind of the frame.
        kind: Kind,
        /// The flag word.
        flags: u32,
    },
    /// The announced body is larger than the receive cap; nothing was allocated for it.
    #[error("{kind:?} frame body of {len} bytes exceeds the cap of {max} bytes")]
    Oversize {
        /// Message kind of the frame.
        kind: Kind,
        /// Announced body length.
        len: u64,
        /// The configured cap.
        max: u64,
    },
    /// The body's CRC32 does not match the header.
    #[error("{kind:?} frame body checksum mismatch (expected {expected:#010x}, computed {computed:#010x})")]
    BodyCrc {
        /// Message kind of the frame.
        kind: Kind,
        /// Checksum carried in the header.
        expected: u32,
        /// Checksum computed over the received body.
        computed: u32,
    },
    /// A checkpoint page does not match its own CRC (protocol version 4 on). The guest was paused while the
    /// page was sent, so it cannot have been torn by a guest write: it was damaged, or the sender took its
    /// CRC while something could still write the page (a VMM whose pause lets a device keep writing guest
    /// memory; see colo-pair's `Vm::pause`).
    #[error(
        "{kind:?} page at {gpa:#x}: checksum mismatch (expected {expected:#010x}, computed {computed:#010x})"
    )]
    PageCrc {
        /// Message kind of the frame.
        kind: Kind,
        /// Guest physical address of the page.
        gpa: u64,
        /// The page's CRC carried in the frame.
        expected: u32,
        /// CRC computed over the received page.
        computed: u32,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame: {buffered} of {needed} bytes received")]
    Truncated {
        /// Bytes of the frame received.
        buffered: u64,
        /// Bytes the frame needs (header only, until the header is complete).
        needed: u64,
    },
    /// The peer closed the stream cleanly between frames.
    #[error("peer closed the channel")]
    Closed,
    /// The body does not have the layout its kind requires.
    #[error("malformed {kind:?} body: {what}")]
    Malformed {
        /// Message kind of the frame.
        kind: Kind,
        /// What was wrong.
        what: String,
    },
    /// A message could not be encoded (a field too large, a page of the wrong size).
    #[error("cannot encode {kind:?}: {what}")]
    Encode {
        /// Message kind being encoded.
        kind: Kind,
        /// What was wrong.
        what: String,
    },
    /// The message kind does not exist in the negotiated protocol version.
    #[error("{kind:?} is not part of protocol version {version}")]
    KindNotInVersion {
        /// Message kind.
        kind: Kind,
        /// The version in use.
        version: u16,
    },
    /// A previous error left the decoder in the middle of a damaged stream.
    #[error("decoder already failed on an earlier frame")]
    DecoderFailed,
    /// This side refused the peer's handshake.
    #[error("handshake refused: {0}")]
    Refused(Refusal),
    /// The peer refused our handshake.
    #[error("peer refused the handshake: code {code}: {text}")]
    PeerRefused {
        /// The peer's error code.
        code: u32,
        /// The peer's explanation.
        text: String,
    },
    /// A message that makes no sense at this point of the protocol.
    #[error("unexpected {kind:?} while {state}")]
    Unexpected {
        /// The state the machine was in.
        state: &'static str,
        /// The message kind received.
        kind: Kind,
    },
    /// A local command that makes no sense in the current state.
    #[error("{command} is not allowed while {state}")]
    BadCommand {
        /// The state the machine was in.
        state: &'static str,
        /// The command.
        command: &'static str,
    },
    /// A checkpoint message carried the wrong epoch.
    #[error("{kind:?} carries epoch {found}, expected {expected}")]
    Epoch {
        /// Message kind.
        kind: Kind,
        /// Epoch the machine expected.
        expected: u64,
        /// Epoch in the message.
        found: u64,
    },
    /// Device state did not add up to the announced size.
    #[error("device state of epoch {epoch}: {what}")]
    DeviceState {
        /// Epoch of the checkpoint.
        epoch: u64,
        /// What was wrong.
        what: String,
    },
    /// Pre-copy pages whose own CRC failed were not sent again intact by the end of the checkpoint's RAM
    /// (a page torn by a guest write is always dirty and re-sent; one that is not was damaged in transit),
    /// or too many are outstanding.
    #[error(
        "{pages} torn pre-copy pages (first at {first:#x}) not re-sent by the end of epoch {epoch}'s RAM"
    )]
    TornPages {
        /// The checkpoint epoch.
        epoch: u64,
        /// How many pages are outstanding.
        pages: usize,
        /// The lowest outstanding address.
        first: u64,
    },
    /// The peer did not answer in time.
    #[error("timed out while {state}")]
    Timeout {
        /// The state the machine was in.
        state: &'static str,
    },
    /// The peer sent an error message.
    #[error("peer error {code}: {text}")]
    Peer {
        /// The peer's error code.
        code: u32,
        /// The peer's explanation.
        text: String,
    },
    /// The peer said goodbye.
    #[error("peer said goodbye: {0:?}")]
    Goodbye(Reason),
    /// The local VMM reported a failure to the session.
    #[error("local failure: {0}")]
    Local(String),
    /// The session already failed; it accepts nothing more.
    #[error("session already failed: {0}")]
    AlreadyFailed(Box<Error>),
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(Arc<std::io::Error>),
}

impl Error {
    /// Whether the peer broke the protocol: it sent bytes that are not a valid frame (bad magic, version,
    /// CRC, kind, flags, size or body), a message out of order or with the wrong epoch, bad device state,
    /// an error report, or a goodbye in the middle of a checkpoint. The peer is then alive (it wrote those
    /// bytes) but cannot be trusted to follow the protocol.
    ///
    /// False for what a dead or unreachable peer looks like: the stream closed or ended inside a frame, a
    /// socket error, a missed deadline, and for local failures and refused local commands.
    pub fn is_protocol_error(&self) -> bool {
        match self {
            Error::BadMagic { .. }
            | Error::UnsupportedVersion { .. }
            | Error::HeaderCrc { .. }
            | Error::UnknownKind { .. }
            | Error::UnknownFlags { .. }
            | Error::Oversize { .. }
            | Error::BodyCrc { .. }
            | Error::PageCrc { .. }
            | Error::Malformed { .. }
            | Error::DecoderFailed
            | Error::Refused(_)
            | Error::PeerRefused { .. }
            | Error::Unexpected { .. }
            | Error::Epoch { .. }
            | Error::DeviceState { .. }
            | Error::TornPages { .. }
            | Error::Peer { .. }
            | Error::Goodbye(_) => true,
            Error::AlreadyFailed(e) => e.is_protocol_error(),
            Error::Truncated { .. }
            | Error::Closed
            | Error::Encode { .. }
            | Error::KindNotInVersion { .. }
            | Error::BadCommand { .. }
            | Error::Timeout { .. }
            | Error::Local(_)
            | Error::Io(_) => false,
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(Arc::new(e))
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
