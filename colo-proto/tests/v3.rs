//! Protocol version 3: pre-copy frames whose CRC covers only the descriptors (a page the guest writes during
//! the send is accepted, a damaged descriptor is not), and the bounds of the new messages.

use bytes::Bytes;
use colo_proto::frame::{allowed_flags, flags};
use colo_proto::message::{MAX_DISK_CHUNK, encode_page_frame};
use colo_proto::{
    Channel, Decoder, DiskSyncChunk, Error, FrameHeader, HEADER_LEN, Kind, Message, PROTOCOL_VERSION,
    PagePhase,
};

const PS: usize = 4096;

/// Encodes a page frame the way `Channel` does (header computed from the pages, then written), with
/// `between` run on the wire bytes after the CRC was computed: the guest writing a page in the gap.
fn frame_written_while_guest_runs(kind: Kind, version: u16, between: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mem: Vec<u8> = (0..3 * PS).map(|i| (i / 7) as u8).collect();
    let pages: Vec<(u64, &[u8])> = vec![(0x1000, &mem[..2 * PS]), (0x8000, &[]), (0x9000, &mem[2 * PS..])];
    let (mut prefix, mut data) = (Vec::new(), Vec::new());
    let header = encode_page_frame(kind, version, 4, PS as u32, &pages, &mut prefix, &mut data).unwrap();
    let mut wire = header.encode().to_vec();
    wire.extend_from_slice(&prefix);
    for d in &data {
        wire.extend_from_slice(d);
    }
    between(&mut wire);
    wire
}

fn decode_all(wire: &[u8]) -> Result<Vec<Message>, Error> {
    let mut dec = Decoder::new();
    let mut out = Vec::new();
    let mut rest = wire;
    while !rest.is_empty() {
        let n = dec.feed(rest);
        rest = &rest[n..];
        while let Some(m) = dec.decode()? {
            out.push(m);
        }
    }
    dec.finish()?;
    Ok(out)
}

/// Offset of the first page byte in a frame of the test batch: 4 descriptors, and in a pre-copy frame of
/// version 3 one CRC per page after them.
const DATA_AT: usize = HEADER_LEN + 16 + 4 * 12;
/// The same in a checkpoint frame of version 3 (no per-page CRCs).
const RAM_DATA_AT: usize = HEADER_LEN + 16 + 4 * 8;

#[test]
fn a_precopy_page_written_during_the_send_is_accepted() {
    let wire = frame_written_while_guest_runs(Kind::PrecopyPages, PROTOCOL_VERSION, |w| {
        w[DATA_AT + 5] ^= 0xff;
        w[DATA_AT + 3 * PS - 1] = 0x42;
    });
    let hdr = FrameHeader::decode(wire[..HEADER_LEN].try_into().unwrap(), 1 << 20).unwrap();
    assert_eq!(hdr.flags, flags::PREFIX_CRC);
    let got = decode_all(&wire).unwrap();
    let [Message::PrecopyPages(b)] = &got[..] else {
        panic!("{got:?}")
    };
    // The two torn pages (their own CRCs fail) are left out and named: the primary sends them again.
    let gpas: Vec<u64> = b.pages.iter().map(|p| p.gpa).collect();
    assert_eq!(gpas, [0x2000, 0x8000]);
    assert_eq!(b.torn, [0x1000, 0x9000]);
    assert!(b.pages[1].is_zero());
    assert!(
        b.pages[0]
            .data
            .iter()
            .enumerate()
            .all(|(i, &x)| x == ((PS + i) / 7) as u8)
    );
}

#[test]
fn an_intact_precopy_frame_has_no_torn_pages() {
    let wire = frame_written_while_guest_runs(Kind::PrecopyPages, PROTOCOL_VERSION, |_| {});
    let got = decode_all(&wire).unwrap();
    let [Message::PrecopyPages(b)] = &got[..] else {
        panic!("{got:?}")
    };
    assert_eq!(b.pages.len(), 4);
    assert!(b.torn.is_empty());
}

#[test]
fn a_damaged_precopy_descriptor_page_crc_or_fixed_field_is_still_rejected() {
    for at in HEADER_LEN..DATA_AT {
        for bit in [0x01u8, 0x80] {
            let wire = frame_written_while_guest_runs(Kind::PrecopyPages, PROTOCOL_VERSION, |w| w[at] ^= bit);
            assert!(decode_all(&wire).is_err(), "byte {at} bit {bit:#x}");
        }
    }
    // Dropping the flag (with a consistent header CRC) makes the CRC cover the data again: refused.
    let mut wire = frame_written_while_guest_runs(Kind::PrecopyPages, PROTOCOL_VERSION, |_| {});
    wire[8..12].copy_from_slice(&0u32.to_le_bytes());
    let crc = crc32fast::hash(&wire[..20]);
    wire[20..24].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(decode_all(&wire), Err(Error::BodyCrc { .. })));
}

#[test]
fn version_three_checkpoint_pages_keep_a_crc_over_every_byte() {
    assert_eq!(allowed_flags(Kind::RamPages, 3), 0);
    let wire = frame_written_while_guest_runs(Kind::RamPages, 3, |w| w[RAM_DATA_AT + 5] ^= 1);
    assert!(matches!(
        decode_all(&wire),
        Err(Error::BodyCrc {
            kind: Kind::RamPages,
            ..
        })
    ));
    // A version-3 checkpoint frame claiming the per-page flag is refused at the header.
    let mut wire = frame_written_while_guest_runs(Kind::RamPages, 3, |_| {});
    wire[8..12].copy_from_slice(&flags::PREFIX_CRC.to_le_bytes());
    let crc = crc32fast::hash(&wire[..20]);
    wire[20..24].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(decode_all(&wire), Err(Error::UnknownFlags { .. })));
}

#[test]
fn version_four_checkpoint_pages_have_their_own_crcs_and_a_bad_one_fails_the_frame() {
    assert_eq!(allowed_flags(Kind::RamPages, 4), flags::PREFIX_CRC);
    let wire = frame_written_while_guest_runs(Kind::RamPages, 4, |_| {});
    let hdr = FrameHeader::decode(wire[..HEADER_LEN].try_into().unwrap(), 1 << 20).unwrap();
    assert_eq!(hdr.flags, flags::PREFIX_CRC);
    let got = decode_all(&wire).unwrap();
    let [Message::RamPages(b)] = &got[..] else {
        panic!("{got:?}")
    };
    assert_eq!(b.pages.len(), 4);
    assert!(b.torn.is_empty());
    // Same layout as a pre-copy frame: a changed page byte is that page's CRC failing (the guest was paused,
    // so it was damaged: the frame is refused, nothing is stored), a changed descriptor the frame CRC's.
    for (at, page) in [
        (DATA_AT + 5, 0x1000),
        (DATA_AT + PS + 9, 0x2000),
        (DATA_AT + 3 * PS - 1, 0x9000),
    ] {
        let wire = frame_written_while_guest_runs(Kind::RamPages, 4, |w| w[at] ^= 0x10);
        match decode_all(&wire) {
            Err(Error::PageCrc {
                kind: Kind::RamPages,
                gpa,
                ..
            }) => assert_eq!(gpa, page),
            other => panic!("byte {at}: {other:?}"),
        }
    }
    let wire = frame_written_while_guest_runs(Kind::RamPages, 4, |w| w[HEADER_LEN + 17] ^= 1);
    assert!(matches!(decode_all(&wire), Err(Error::BodyCrc { .. })));
}

#[test]
fn version_two_precopy_frames_keep_the_full_crc() {
    assert_eq!(allowed_flags(Kind::PrecopyPages, 2), 0);
    let wire = frame_written_while_guest_runs(Kind::PrecopyPages, 2, |w| w[RAM_DATA_AT] ^= 1);
    assert!(matches!(decode_all(&wire), Err(Error::BodyCrc { .. })));
}

#[test]
fn a_prefix_crc_over_a_body_shorter_than_its_descriptors_is_malformed() {
    // Count 1000 descriptors in a 16-byte body: nothing reads past the body.
    let mut body = vec![0u8; 16];
    body[8..12].copy_from_slice(&4096u32.to_le_bytes());
    body[12..16].copy_from_slice(&1000u32.to_le_bytes());
    let h = FrameHeader {
        version: PROTOCOL_VERSION,
        kind: Kind::PrecopyPages,
        flags: flags::PREFIX_CRC,
        body_len: 16,
        body_crc: crc32fast::hash(&body),
    };
    assert!(matches!(h.check_body(&body), Err(Error::Malformed { .. })));
    assert!(matches!(h.check_body(&body[..7]), Err(Error::Malformed { .. })));
}

#[test]
fn channel_precopy_round_trip_over_v3() {
    let mem = vec![9u8; 8 * PS];
    let mut tx = Channel::new(std::io::Cursor::new(Vec::new()));
    tx.set_version(PROTOCOL_VERSION);
    tx.send_pages(PagePhase::Precopy, 0, PS as u32, &[(0, &mem[..])])
        .unwrap();
    let wire = tx.into_inner().into_inner();
    let mut rx = Channel::new(std::io::Cursor::new(wire));
    rx.set_version(PROTOCOL_VERSION);
    let Message::PrecopyPages(b) = rx.recv().unwrap() else {
        panic!("not pre-copy")
    };
    assert_eq!(b.pages.len(), 8);
    assert!(b.pages.iter().all(|p| p.data[..] == mem[..PS]));
}

/// Encodes a `DiskSyncChunk` body by hand (the encoder refuses bad ones) and decodes it.
fn sync_chunk_body(reserved: u32, offset: u64, len: usize) -> Result<Message, Error> {
    let mut body = 7u32.to_le_bytes().to_vec();
    body.extend(reserved.to_le_bytes());
    body.extend(offset.to_le_bytes());
    body.extend(std::iter::repeat_n(0xa5u8, len));
    let h = FrameHeader {
        version: PROTOCOL_VERSION,
        kind: Kind::DiskSyncChunk,
        flags: 0,
        body_len: body.len() as u32,
        body_crc: crc32fast::hash(&body),
    };
    Message::decode(&h, Bytes::from(body))
}

#[test]
fn disk_sync_chunks_are_whole_sectors_and_capped() {
    let ok = sync_chunk_body(0, 1024, 512).unwrap();
    assert!(matches!(
        ok,
        Message::DiskSyncChunk(DiskSyncChunk {
            disk: 7,
            offset: 1024,
            ..
        })
    ));
    for (reserved, offset, len) in [
        (1, 0, 512),                  // reserved field set
        (0, 100, 512),                // unaligned offset
        (0, 0, 100),                  // partial sector
        (0, 0, 0),                    // empty
        (0, u64::MAX - 511, 512),     // wraps
        (0, 0, MAX_DISK_CHUNK + 512), // over the cap
    ] {
        assert!(
            matches!(
                sync_chunk_body(reserved, offset, len),
                Err(Error::Malformed { .. })
            ),
            "{reserved} {offset} {len}"
        );
    }
    let big = Message::DiskSyncChunk(DiskSyncChunk {
        disk: 0,
        offset: 0,
        data: Bytes::from(vec![0u8; MAX_DISK_CHUNK + 512]),
    });
    assert!(matches!(
        big.encode(PROTOCOL_VERSION, &mut Vec::new()),
        Err(Error::Encode { .. })
    ));
}

#[test]
fn a_discard_of_partial_sectors_is_malformed() {
    use colo_proto::BlockDiscard;
    let bad = Message::BlockDiscard(BlockDiscard {
        epoch: 1,
        disk: 0,
        offset: 512,
        len: 100,
    });
    assert!(matches!(
        bad.encode(PROTOCOL_VERSION, &mut Vec::new()),
        Err(Error::Encode { .. })
    ));
    // The same body, built by hand, is refused by the decoder.
    let mut body = Vec::new();
    body.extend(1u64.to_le_bytes());
    body.extend(0u32.to_le_bytes());
    body.extend(512u64.to_le_bytes());
    body.extend(100u64.to_le_bytes());
    let h = FrameHeader {
        version: PROTOCOL_VERSION,
        kind: Kind::BlockDiscard,
        flags: 0,
        body_len: body.len() as u32,
        body_crc: crc32fast::hash(&body),
    };
    assert!(matches!(
        Message::decode(&h, Bytes::from(body)),
        Err(Error::Malformed { .. })
    ));
}

mod torn_pages {
    use std::time::Instant;

    use bytes::Bytes;
    use colo_proto::{Error, Message, PageBatch, RamPage, SecondarySession, SessionConfig};

    fn batch(epoch: u64, pages: &[u64], torn: &[u64]) -> PageBatch {
        PageBatch {
            epoch,
            page_size: 4096,
            pages: pages
                .iter()
                .map(|&gpa| RamPage {
                    gpa,
                    data: Bytes::from(vec![1u8; 4096]),
                })
                .collect(),
            torn: torn.to_vec(),
        }
    }

    /// A secondary that got a pre-copy batch with two torn pages, now inside checkpoint 1's RAM.
    fn after_torn_precopy() -> (SecondarySession, Instant) {
        let now = Instant::now();
        let mut s = SecondarySession::new(SessionConfig::default(), now);
        s.handle_message(now, Message::PrecopyPages(batch(0, &[0x3000], &[0x1000, 0x2000])))
            .unwrap();
        assert_eq!(s.torn_pages(), 2);
        for m in [
            Message::CheckpointRequest { epoch: 1 },
            Message::VmstateSend { epoch: 1 },
        ] {
            s.handle_message(now, m).unwrap();
        }
        (s, now)
    }

    #[test]
    fn torn_pages_sent_again_in_the_checkpoint_are_fine() {
        let (mut s, now) = after_torn_precopy();
        s.handle_message(now, Message::RamPages(batch(1, &[0x1000, 0x2000], &[])))
            .unwrap();
        assert_eq!(s.torn_pages(), 0);
        s.handle_message(now, Message::EndOfRam { epoch: 1 }).unwrap();
    }

    #[test]
    fn a_torn_page_sent_again_intact_by_a_later_precopy_pass_is_fine() {
        let now = Instant::now();
        let mut s = SecondarySession::new(SessionConfig::default(), now);
        s.handle_message(now, Message::PrecopyPages(batch(0, &[], &[0x1000])))
            .unwrap();
        s.handle_message(now, Message::PrecopyPages(batch(0, &[0x1000], &[])))
            .unwrap();
        assert_eq!(s.torn_pages(), 0);
    }

    #[test]
    fn a_torn_page_never_sent_again_was_damaged_in_transit() {
        let (mut s, now) = after_torn_precopy();
        s.handle_message(now, Message::RamPages(batch(1, &[0x1000], &[])))
            .unwrap();
        let r = s.handle_message(now, Message::EndOfRam { epoch: 1 });
        assert!(
            matches!(
                r,
                Err(Error::TornPages {
                    epoch: 1,
                    pages: 1,
                    first: 0x2000
                })
            ),
            "{r:?}"
        );
        assert!(s.failure().is_some_and(Error::is_protocol_error));
    }
}
