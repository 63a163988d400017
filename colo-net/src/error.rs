//! The crate's error type.

use thiserror::Error;

/// Everything in `colo-net` that can fail returns this.
///
/// Bad frames are not errors of the comparator (they get a defined treatment and a counter);
/// these variants describe inputs the *caller* handed over that cannot be processed at all.
#[derive(Debug, Error)]
pub enum NetError {
    /// A frame could not be sliced into headers.
    #[error("malformed frame ({len} bytes): {what}")]
    Malformed {
        /// Length of the frame as handed in (virtio-net header included).
        len: usize,
        /// What was wrong, from the parser.
        what: String,
    },
    /// A frame is valid but of a kind the comparator does not look into.
    #[error("unsupported frame ({len} bytes): {what}")]
    Unsupported {
        /// Length of the frame as handed in.
        len: usize,
        /// What is unsupported.
        what: &'static str,
    },
    /// A configuration value is out of its allowed range.
    #[error("invalid configuration: {field} = {value} ({why})")]
    Config {
        /// Name of the field.
        field: &'static str,
        /// The rejected value.
        value: u64,
        /// The allowed range.
        why: &'static str,
    },
    /// A pcap file could not be read or written.
    #[error("pcap {what} at byte {offset}")]
    Pcap {
        /// What was wrong.
        what: String,
        /// Byte offset in the file where it was detected.
        offset: u64,
    },
    /// An I/O error while reading or writing a capture.
    #[error("capture I/O: {0}")]
    Io(#[from] std::io::Error),
}
