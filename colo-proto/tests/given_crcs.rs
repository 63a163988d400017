//! `Channel::send_pages_with_crcs`: page CRCs computed by the caller (where it first read the pages) give the
//! same wire bytes as CRCs computed while sending, in every frame kind and version; a wrong count is refused
//! before anything is written; a wrong CRC is a torn page at the receiver.

use std::io::{self, Cursor, Read, Write};

use colo_proto::{Channel, Error, Message, PROTOCOL_VERSION, PagePhase};
use proptest::prelude::*;

const PS: usize = 4096;

/// A stream that records what is written and reads from a fixed buffer.
#[derive(Default)]
struct Wire {
    out: Vec<u8>,
    input: Cursor<Vec<u8>>,
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn channel(version: u16, batch: usize) -> Channel<Wire> {
    let mut ch = Channel::new(Wire::default());
    ch.set_version(version);
    ch.set_batch_pages(batch);
    ch
}

/// The entries of `runs` over `mem`: `(first page, pages)` with 0 pages meaning one zero page at that index.
fn entries(mem: &[u8], runs: &[(usize, usize)]) -> Vec<(u64, Vec<u8>)> {
    runs.iter()
        .map(|&(first, n)| ((first * PS) as u64, mem[first * PS..(first + n) * PS].to_vec()))
        .collect()
}

fn crcs_of(list: &[(u64, &[u8])]) -> Vec<u32> {
    list.iter()
        .flat_map(|(_, b)| b.chunks_exact(PS).map(crc32fast::hash))
        .collect()
}

fn received(wire: Vec<u8>, version: u16) -> Vec<Message> {
    let mut rx = Channel::new(Wire {
        out: Vec::new(),
        input: Cursor::new(wire),
    });
    rx.set_version(version);
    let mut out = Vec::new();
    loop {
        match rx.recv() {
            Ok(m) => out.push(m),
            Err(Error::Closed) => return out,
            Err(e) => panic!("receive failed: {e}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Given CRCs and computed CRCs produce the same frames, byte for byte, for pre-copy and checkpoint
    /// frames in every protocol version and any batch size (runs split across frames included).
    #[test]
    fn given_crcs_write_the_same_frames(
        runs in proptest::collection::vec((0usize..4, 0usize..5), 0..12),
        batch in 1usize..9,
        version in 1u16..=PROTOCOL_VERSION,
        precopy in any::<bool>(),
    ) {
        let mem: Vec<u8> = (0..64 * PS).map(|i| (i * 31 / 7 + i / PS) as u8).collect();
        // Runs at increasing page numbers so they do not overlap: (gap, pages).
        let mut at = 0;
        let runs: Vec<(usize, usize)> = runs
            .into_iter()
            .map(|(gap, n)| {
                let first = at + gap;
                at = first + n.max(1);
                (first, n)
            })
            .collect();
        let owned = entries(&mem, &runs);
        let list: Vec<(u64, &[u8])> = owned.iter().map(|(g, b)| (*g, &b[..])).collect();
        let phase = if precopy { PagePhase::Precopy } else { PagePhase::Checkpoint };
        let mut a = channel(version, batch);
        let ra = a.send_pages(phase, 9, PS as u32, &list);
        let mut b = channel(version, batch);
        let rb = b.send_pages_with_crcs(phase, 9, PS as u32, &list, &crcs_of(&list));
        if precopy && version < 2 || list.is_empty() {
            // No pre-copy frames before version 2 (both refuse alike); nothing to send writes nothing.
            prop_assert_eq!(ra.map_err(|e| e.to_string()), rb.map_err(|e| e.to_string()));
            prop_assert_eq!(&a.get_ref().out, &b.get_ref().out);
            return Ok(());
        }
        ra.unwrap();
        rb.unwrap();
        let wire = a.into_inner().out;
        prop_assert_eq!(&wire, &b.into_inner().out);
        let pages: usize = received(wire, version)
            .iter()
            .map(|m| match m {
                Message::PrecopyPages(b) | Message::RamPages(b) => {
                    assert!(b.torn.is_empty());
                    b.pages.len()
                }
                other => panic!("unexpected {other:?}"),
            })
            .sum();
        prop_assert_eq!(pages, list.len() + list.iter().map(|(_, b)| (b.len() / PS).saturating_sub(1)).sum::<usize>());
    }
}

#[test]
fn a_wrong_count_is_refused_before_anything_is_written() {
    let mem = vec![7u8; 3 * PS];
    let list: Vec<(u64, &[u8])> = vec![(0, &mem[..2 * PS]), (0x5000, &[]), (0x8000, &mem[2 * PS..])];
    for phase in [PagePhase::Precopy, PagePhase::Checkpoint] {
        for n in [0, 2, 4] {
            let mut ch = channel(PROTOCOL_VERSION, 1);
            let err = ch
                .send_pages_with_crcs(phase, 1, PS as u32, &list, &vec![0; n])
                .unwrap_err();
            assert!(matches!(err, Error::Encode { .. }), "{err}");
            assert!(ch.get_ref().out.is_empty(), "{n} CRCs: bytes written");
        }
    }
}

#[test]
fn a_stale_crc_is_a_torn_page_at_the_receiver() {
    let mut mem: Vec<u8> = (0..3 * PS).map(|i| (i / 5) as u8).collect();
    let collected = {
        let list: Vec<(u64, &[u8])> = vec![(0x1000, &mem[..2 * PS]), (0x9000, &mem[2 * PS..])];
        crcs_of(&list)
    };
    // The guest writes the second page after it was collected (and its CRC taken), before the send.
    mem[PS + 100] ^= 0x5a;
    let list: Vec<(u64, &[u8])> = vec![(0x1000, &mem[..2 * PS]), (0x9000, &mem[2 * PS..])];
    let mut ch = channel(PROTOCOL_VERSION, 256);
    ch.send_pages_with_crcs(PagePhase::Precopy, 3, PS as u32, &list, &collected)
        .unwrap();
    let got = received(ch.into_inner().out, PROTOCOL_VERSION);
    let [Message::PrecopyPages(b)] = &got[..] else {
        panic!("{got:?}")
    };
    assert_eq!(b.torn, vec![0x2000]);
    let gpas: Vec<u64> = b.pages.iter().map(|p| p.gpa).collect();
    assert_eq!(gpas, vec![0x1000, 0x9000]);

    // A checkpoint frame of version 4 carries the given CRCs too; the guest is paused then, so a page that
    // does not match was damaged: the frame is refused.
    let mut ch = channel(PROTOCOL_VERSION, 256);
    ch.send_pages_with_crcs(PagePhase::Checkpoint, 3, PS as u32, &list, &collected)
        .unwrap();
    let mut rx = Channel::new(Wire {
        out: Vec::new(),
        input: Cursor::new(ch.into_inner().out),
    });
    rx.set_version(PROTOCOL_VERSION);
    match rx.recv() {
        Err(e @ Error::PageCrc { gpa: 0x2000, .. }) => assert!(e.is_protocol_error()),
        other => panic!("expected a page CRC error, got {other:?}"),
    }

    // Up to version 3 the checkpoint frame's body CRC is computed over the pages as sent: the given CRCs do
    // not matter.
    let mut ch = channel(3, 256);
    ch.send_pages_with_crcs(PagePhase::Checkpoint, 3, PS as u32, &list, &collected)
        .unwrap();
    let got = received(ch.into_inner().out, 3);
    let [Message::RamPages(b)] = &got[..] else {
        panic!("{got:?}")
    };
    assert!(b.torn.is_empty());
    assert_eq!(&b.pages[1].data[..], &mem[PS..2 * PS]);
}
