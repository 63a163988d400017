//! colo-proto: the wire protocol that carries a COLO checkpoint between a primary and a secondary VMM.
//!
//! - [`frame`]: the fixed frame header (magic, version, kind, flags, length, CRC32) and its validation.
//! - [`message`]: the message set of a COLO session and each body's layout; page data encoded from borrowed
//!   slices and decoded as zero-copy `Bytes`.
//! - [`decoder`]: a streaming decoder for bytes in any split, with a body cap checked before allocating.
//! - [`handshake`]: version and capability negotiation, guest layout and page size checks.
//! - [`session`]: sans-IO checkpoint transaction machines for the primary and the secondary.
//! - [`transport`]: a blocking framed channel over TCP or Unix stream sockets (vectored writes, pooled reads).
//! - [`error`]: the crate's error type.
//!
//! The crate owns no thread, clock or guest memory: the VMM passes time in, moves pages from its memory into
//! [`Channel::send_pages`], and carries out the [`session`] machines' actions.
//!
//! ```
//! use std::os::unix::net::UnixStream;
//! use colo_proto::{Channel, Message, PagePhase};
//!
//! let (a, b) = UnixStream::pair().unwrap();
//! let (mut tx, mut rx) = (Channel::new(a), Channel::new(b));
//! let page = vec![0xabu8; 4096];
//! tx.send(&Message::CheckpointRequest { epoch: 1 }).unwrap();
//! tx.send_pages(PagePhase::Checkpoint, 1, 4096, &[(0x1000, &page[..]), (0x2000, &[][..])]).unwrap();
//! assert_eq!(rx.recv().unwrap(), Message::CheckpointRequest { epoch: 1 });
//! let Message::RamPages(batch) = rx.recv().unwrap() else { panic!("expected pages") };
//! assert_eq!(&batch.pages[0].data[..], &page[..]);
//! assert!(batch.pages[1].is_zero());
//! ```

#![warn(missing_docs)]

pub mod decoder;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod message;
pub mod session;
pub mod transport;

/// The README's example runs as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use decoder::Decoder;
pub use error::{Error, Result};
pub use frame::{DEFAULT_MAX_BODY, FrameHeader, HEADER_LEN, Kind, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
pub use handshake::{LocalConfig, Negotiated, Refusal};
pub use message::{
    BlockDiscard, BlockWrite, DeviceStateChunk, DiskSyncChunk, DiskSyncDone, Hello, MemoryRegion, Message,
    OutputFrame, PageBatch, PrimaryIsn, RamPage, Reason, Role, TcpFlow, WantReason, Welcome, page_crc,
};

pub use session::{PrimaryAction, PrimarySession, SecondaryAction, SecondarySession, SessionConfig};
pub use transport::{Channel, PagePhase};
