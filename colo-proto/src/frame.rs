//! The frame: a fixed 24-byte little-endian header followed by a body.
//!
//! ```text
//! offset  size  field
//!      0     4  magic        b"COLO"
//!      4     2  version      protocol version the frame is written in
//!      6     2  kind         message kind (`Kind`)
//!      8     4  flags        `flags::*` bits defined for this kind and version; others must be zero
//!     12     4  body_len     length of the body in bytes
//!     16     4  body_crc     CRC32 (IEEE, crc32fast) of the body
//!     20     4  header_crc   CRC32 of bytes 0..20
//! ```
//!
//! The header carries its own CRC so that a damaged length or kind is caught before it is acted upon, and
//! every single damaged byte of a frame is detected (by the frame CRC, or for the page data of a page frame
//! with [`flags::PREFIX_CRC`] by the page's own CRC: in a pre-copy frame such a page is reported torn, not
//! refused, by design). Checks run in the order magic, version, header CRC,
//! kind, flags, length cap, so that a peer speaking a future version gets `UnsupportedVersion` even if that
//! version changed the rest of the header.

use crate::error::{Error, Result};

/// Length of the frame header in bytes.
pub const HEADER_LEN: usize = 24;

/// The magic at the start of every frame: the bytes `COLO`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"COLO");

/// The newest protocol version this crate speaks.
///
/// Version 3 adds the disk initial sync ([`Kind::DiskSyncChunk`], [`Kind::DiskSyncDone`]), block
/// acknowledgements and discards ([`Kind::BlockAck`], [`Kind::BlockDiscard`]), the secondary's
/// [`Kind::CheckpointWanted`], [`Kind::PrimaryIsn`] forwarding, and the [`flags::PREFIX_CRC`] flag on
/// pre-copy page frames. A version-3 peer talks to a version-2 (or 1) peer in the older version: it then
/// sends none of these, and a frame carrying one is refused by both encoder and decoder.
///
/// Version 4 puts [`flags::PREFIX_CRC`] on checkpoint page frames ([`Kind::RamPages`]) too: every page
/// frame then carries a CRC32 per page, which a sender can take where it first reads the page (see
/// `Channel::send_pages_with_crcs`) instead of in a second pass over cold guest memory. Nothing else
/// changes; a version-4 peer talks to older peers in their version.
pub const PROTOCOL_VERSION: u16 = 4;

/// The oldest protocol version this crate still accepts.
///
/// Version 1 is version 2 without [`Kind::PrecopyPages`] and [`Kind::Heartbeat`]; version 2 is version 3
/// without the kinds and the flag listed at [`PROTOCOL_VERSION`]; version 3 is version 4 without
/// [`flags::PREFIX_CRC`] on [`Kind::RamPages`].
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// Frame flag bits. A bit is valid only on the kinds and versions its documentation names; any other set
/// bit is [`Error::UnknownFlags`].
pub mod flags {
    /// On a [`Kind::PrecopyPages`](super::Kind::PrecopyPages) frame of version 3 or later: the body CRC covers
    /// only the batch's fixed part, its descriptors and a CRC32 per page that follows them
    /// (`16 + 12 * count` bytes), not the page data; each page is checked against its own CRC.
    ///
    /// Pre-copy pages are read from the running guest. The sender computes the CRC and the kernel copies
    /// the pages a moment later; a vCPU that writes a page in between makes the bytes on the wire differ
    /// from the bytes the CRC saw, and a full-body CRC would then reject a frame that is harmless: the
    /// write also set the page's dirty bit, so the page is sent again, fully checked, by the next pre-copy
    /// pass or at the latest in the checkpoint ([`Kind::RamPages`](super::Kind::RamPages): the guest is
    /// paused then, so its pages cannot change under the send; checked by a full-body CRC up to version 3
    /// and by each page's own CRC from version 4, see below).
    ///
    /// So the frame CRC protects the structure (addresses, zero markers, page size, count, epoch and the
    /// per-page CRCs): a damaged frame can never put data at a wrong address or desynchronise the stream.
    /// Each page is checked against its own CRC; one that fails is *torn*: the decoder leaves it out of
    /// [`PageBatch::pages`](crate::PageBatch) and names it in `PageBatch::torn`, and the secondary session
    /// requires every torn page to arrive again intact before the end of the next checkpoint's RAM
    /// (`Error::TornPages` otherwise). A torn page always does (it is dirty); a page damaged in transit does
    /// not, and is caught there. End-to-end detection is kept without copying the pages first (the
    /// alternative: a memcpy of all guest RAM on the sender).
    ///
    /// From version 4 the flag is also on every [`Kind::RamPages`](super::Kind::RamPages) frame, with the
    /// same layout. The guest is paused then, so a checkpoint page cannot be torn: one that fails its own
    /// CRC was damaged, and the frame is refused with `Error::PageCrc`.
    pub const PREFIX_CRC: u32 = 1 << 0;
}

/// The flag bits valid on a frame of `kind` in `version`.
pub fn allowed_flags(kind: Kind, version: u16) -> u32 {
    match kind {
        Kind::PrecopyPages if version >= 3 => flags::PREFIX_CRC,
        Kind::RamPages if version >= 4 => flags::PREFIX_CRC,
        _ => 0,
    }
}

/// Whether page frames of `kind` carry a CRC32 per page in `version` ([`flags::PREFIX_CRC`]: pre-copy
/// frames from version 3, checkpoint frames from version 4).
pub fn carries_page_crcs(kind: Kind, version: u16) -> bool {
    allowed_flags(kind, version) & flags::PREFIX_CRC != 0
}

/// Length of the fixed part of a page batch body (epoch, page size, count).
const BATCH_FIXED: usize = 16;

/// Default cap on a frame body: 64 MiB.
pub const DEFAULT_MAX_BODY: u32 = 64 << 20;

macro_rules! kinds {
    ($( $(#[$doc:meta])* $name:ident = $val:literal since $since:literal, )*) => {
        /// The kind of message a frame carries. The numbers are part of the wire format.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        #[non_exhaustive]
        pub enum Kind {
            $( $(#[$doc])* $name = $val, )*
        }

        impl Kind {
            /// Every kind, in wire order.
            pub const ALL: &'static [Kind] = &[$(Kind::$name,)*];

            /// The kind for a raw value, if it exists in protocol `version`.
            pub fn from_wire(raw: u16, version: u16) -> Option<Kind> {
                match raw {
                    $( $val if version >= $since => Some(Kind::$name), )*
                    _ => None,
                }
            }

            /// The first protocol version that has this kind.
            pub fn since_version(self) -> u16 {
                match self {
                    $( Kind::$name => $since, )*
                }
            }
        }
    };
}

kinds! {
    /// Handshake offer (connecting side).
    Hello = 1 since 1,
    /// Handshake acceptance (accepting side).
    Welcome = 2 since 1,
    /// Secondary is ready for checkpoints.
    CheckpointReady = 10 since 1,
    /// Primary asks for checkpoint `epoch`.
    CheckpointRequest = 11 since 1,
    /// Secondary has paused for checkpoint `epoch`.
    CheckpointReply = 12 since 1,
    /// Primary starts sending the VM state.
    VmstateSend = 13 since 1,
    /// A batch of guest pages inside a checkpoint.
    RamPages = 14 since 1,
    /// End of the RAM part of a checkpoint.
    EndOfRam = 15 since 1,
    /// Size of the device state that follows.
    VmstateSize = 16 since 1,
    /// A chunk of one device's state.
    DeviceState = 17 since 1,
    /// Secondary has the whole checkpoint.
    VmstateReceived = 18 since 1,
    /// Secondary has loaded the checkpoint and resumed.
    VmstateLoaded = 19 since 1,
    /// A batch of guest pages sent while the guest runs (pre-copy).
    PrecopyPages = 20 since 2,
    /// The secondary asks for a checkpoint soon (its overlay or rewriter table is filling up).
    CheckpointWanted = 21 since 3,
    /// Liveness beacon.
    Heartbeat = 30 since 2,
    /// The guest shut down.
    GuestShutdown = 31 since 1,
    /// A primary disk write forwarded to the secondary.
    BlockWrite = 40 since 1,
    /// All block writes of an epoch have been sent.
    BlockBarrier = 41 since 1,
    /// Initial disk sync: a range of the primary's disk.
    DiskSyncChunk = 42 since 3,
    /// Initial disk sync finished (summary).
    DiskSyncDone = 43 since 3,
    /// The secondary applied every replicated write up to an id (cumulative).
    BlockAck = 44 since 3,
    /// A primary disk discard forwarded to the secondary.
    BlockDiscard = 45 since 3,
    /// A secondary guest's output frame forwarded to the primary's comparator.
    OutputFrame = 50 since 1,
    /// The PVM's initial sequence number of a TCP connection, for the secondary's rewriter.
    PrimaryIsn = 51 since 3,
    /// A side announces it is failing over.
    FailoverNotice = 60 since 1,
    /// A side leaves the session.
    Goodbye = 61 since 1,
    /// A side reports an error.
    Error = 62 since 1,
}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol version the frame is written in.
    pub version: u16,
    /// Message kind.
    pub kind: Kind,
    /// Flag bits (see [`flags`]).
    pub flags: u32,
    /// Length of the body.
    pub body_len: u32,
    /// CRC32 of the body.
    pub body_crc: u32,
}

impl FrameHeader {
    /// Encodes the header, computing the header CRC.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        out[8..12].copy_from_slice(&self.flags.to_le_bytes());
        out[12..16].copy_from_slice(&self.body_len.to_le_bytes());
        out[16..20].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = crc32fast::hash(&out[..20]);
        out[20..24].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and validates a header: magic, version within `MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION`,
    /// header CRC, kind known in that version, no flag outside [`allowed_flags`], and
    /// `body_len <= max_body`.
    pub fn decode(bytes: &[u8; HEADER_LEN], max_body: u32) -> Result<FrameHeader> {
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(Error::BadMagic { found: magic });
        }
        let version = u16_at(4);
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
            return Err(Error::UnsupportedVersion {
                found: version,
                min: MIN_PROTOCOL_VERSION,
                max: PROTOCOL_VERSION,
            });
        }
        let computed = crc32fast::hash(&bytes[..20]);
        let expected = u32_at(20);
        if computed != expected {
            return Err(Error::HeaderCrc { expected, computed });
        }
        let raw_kind = u16_at(6);
        let kind = Kind::from_wire(raw_kind, version).ok_or(Error::UnknownKind {
            kind: raw_kind,
            version,
        })?;
        let flags = u32_at(8);
        if flags & !allowed_flags(kind, version) != 0 {
            return Err(Error::UnknownFlags { kind, flags });
        }
        let body_len = u32_at(12);
        if body_len > max_body {
            return Err(Error::Oversize {
                kind,
                len: body_len.into(),
                max: max_body.into(),
            });
        }
        Ok(FrameHeader {
            version,
            kind,
            flags,
            body_len,
            body_crc: u32_at(16),
        })
    }

    /// Checks `body` against the header's CRC (over the part of the body the CRC covers: all of it, or with
    /// [`flags::PREFIX_CRC`] the fixed part, the descriptors and the per-page CRCs).
    pub fn check_body(&self, body: &[u8]) -> Result<()> {
        let computed = crc32fast::hash(&body[..self.crc_len(body)?]);
        if computed != self.body_crc {
            return Err(Error::BodyCrc {
                kind: self.kind,
                expected: self.body_crc,
                computed,
            });
        }
        Ok(())
    }

    /// How many leading bytes of `body` the body CRC covers.
    fn crc_len(&self, body: &[u8]) -> Result<usize> {
        if self.flags & flags::PREFIX_CRC == 0 {
            return Ok(body.len());
        }
        let count = body
            .get(12..BATCH_FIXED)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize);
        count
            .and_then(|n| n.checked_mul(12))
            .and_then(|d| d.checked_add(BATCH_FIXED))
            .filter(|&len| len <= body.len())
            .ok_or_else(|| Error::Malformed {
                kind: self.kind,
                what: format!(
                    "prefix-checked body of {} bytes is shorter than its descriptors",
                    body.len()
                ),
            })
    }

    /// Total frame length (header and body).
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> FrameHeader {
        FrameHeader {
            version: PROTOCOL_VERSION,
            kind: Kind::RamPages,
            flags: 0,
            body_len: 100,
            body_crc: 7,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = header();
        assert_eq!(FrameHeader::decode(&h.encode(), DEFAULT_MAX_BODY).unwrap(), h);
    }

    #[test]
    fn every_header_byte_flip_is_rejected() {
        let bytes = header().encode();
        for i in 0..HEADER_LEN {
            for bit in 0..8 {
                let mut b = bytes;
                b[i] ^= 1 << bit;
                assert!(
                    FrameHeader::decode(&b, DEFAULT_MAX_BODY).is_err(),
                    "byte {i} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn typed_errors_for_bad_fields() {
        let mut b = header().encode();
        b[0] = b'X';
        assert!(matches!(
            FrameHeader::decode(&b, DEFAULT_MAX_BODY),
            Err(Error::BadMagic { .. })
        ));

        let h = FrameHeader {
            version: 9,
            ..header()
        };
        assert!(matches!(
            FrameHeader::decode(&h.encode(), DEFAULT_MAX_BODY),
            Err(Error::UnsupportedVersion { found: 9, .. })
        ));

        let h = FrameHeader {
            body_len: 1000,
            ..header()
        };
        assert!(matches!(
            FrameHeader::decode(&h.encode(), 999),
            Err(Error::Oversize { len: 1000, .. })
        ));

        let mut b = header().encode();
        b[6..8].copy_from_slice(&999u16.to_le_bytes());
        let crc = crc32fast::hash(&b[..20]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&b, DEFAULT_MAX_BODY),
            Err(Error::UnknownKind { kind: 999, .. })
        ));
    }

    #[test]
    fn version_one_has_no_precopy() {
        assert_eq!(Kind::from_wire(Kind::PrecopyPages as u16, 1), None);
        assert_eq!(
            Kind::from_wire(Kind::PrecopyPages as u16, 2),
            Some(Kind::PrecopyPages)
        );
        for k in Kind::ALL {
            assert_eq!(Kind::from_wire(*k as u16, PROTOCOL_VERSION), Some(*k));
        }
    }
}
