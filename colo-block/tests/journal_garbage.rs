//! `JournalStore::open` parses a disk image: damaged or arbitrary bytes must give a typed error or a journal
//! whose every record is one that was really written, never a panic or an allocation the image chooses.

use std::collections::HashMap;

use colo_block::{BlockBackend, Error, JournalStore, MemBackend, OverlayStore, SECTOR_SIZE};
use proptest::prelude::*;

const BS: usize = 512;
const SLOTS: usize = 8;

fn image_len() -> u64 {
    JournalStore::<MemBackend>::required_len(BS, SLOTS)
}

/// Exercises an opened journal: every listed block reads, then a clear and a put survive a reopen.
fn exercise(mut j: JournalStore<MemBackend>) {
    let mut buf = vec![0u8; j.block_size()];
    for b in j.blocks() {
        assert!(j.read(b, 0, &mut buf).unwrap());
    }
    j.clear().unwrap();
    j.put(3, &vec![3u8; j.block_size()]).unwrap();
    j.sync().unwrap();
    let j = JournalStore::open(j.into_backend()).unwrap();
    assert_eq!(j.blocks(), vec![3]);
}

/// A superblock with a correct CRC, as the format in `store.rs` lays it out.
fn superblock(block_size: u32, seq: u64, generation: u64, state: u32) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..8].copy_from_slice(b"COLOJNL1");
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    b[12..16].copy_from_slice(&block_size.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    b[24..32].copy_from_slice(&generation.to_le_bytes());
    b[32..36].copy_from_slice(&state.to_le_bytes());
    b[36..44].copy_from_slice(&7u64.to_le_bytes());
    let crc = crc32fast::hash(&b[0..44]);
    b[44..48].copy_from_slice(&crc.to_le_bytes());
    b
}

#[test]
fn crafted_superblocks_are_typed_errors() {
    for (sb, what) in [
        (superblock(512, 5, 5, 9), "unknown state"),
        (superblock(0, 5, 5, 0), "zero block size"),
        (superblock(1000, 5, 5, 0), "unaligned block size"),
        (superblock(u32::MAX, 5, 5, 0), "huge block size"),
    ] {
        let mut image = vec![0u8; image_len() as usize];
        image[..512].copy_from_slice(&sb);
        let dev = MemBackend::from_vec(image).unwrap();
        assert!(
            matches!(JournalStore::open(dev.clone()), Err(Error::CorruptJournal { .. })),
            "{what}"
        );
        // Formatting over it works and yields an empty journal.
        let j = JournalStore::format(dev, BS).unwrap();
        assert!(j.is_empty(), "{what}");
        exercise(j);
    }
}

/// Regression (fuzz target `journal`, fuzz_targets/journal.rs:100): a journal whose superblock sequence
/// number sat at the old open-side bound (`u64::MAX / 2`) opened, and its own next `clear` wrote the next
/// number, which the same bound then refused on reopen. Sequence numbers now wrap and are compared as serial
/// numbers, so every number the store can write reopens; this checks the boundary values in both copies.
#[test]
fn journals_at_any_sequence_number_reopen_after_their_own_writes() {
    for seq in [
        u64::MAX / 2 - 1,
        u64::MAX / 2,
        u64::MAX / 2 + 1,
        u64::MAX - 1,
        u64::MAX,
        0,
    ] {
        for copy in [0usize, 1] {
            let mut image = vec![0u8; image_len() as usize];
            image[copy * 512..copy * 512 + 512].copy_from_slice(&superblock(512, seq, 1, 0));
            let j = JournalStore::open(MemBackend::from_vec(image.clone()).unwrap())
                .unwrap_or_else(|e| panic!("seq {seq} in copy {copy}: {e}"));
            assert!(j.is_empty());
            exercise(j);
            // A committing mark written at the end of the range is what a reopen sees (a crash right
            // after this commit point must not lose it).
            let mut j = JournalStore::open(MemBackend::from_vec(image.clone()).unwrap()).unwrap();
            j.set_committing().unwrap();
            let j = JournalStore::open(j.into_backend()).unwrap();
            assert!(j.is_committing(), "seq {seq} in copy {copy}");
            // Formatting over it yields a journal that reopens as the new one.
            let mut j = JournalStore::format(MemBackend::from_vec(image).unwrap(), BS).unwrap();
            j.put(4, &[4; BS]).unwrap();
            j.sync().unwrap();
            let j = JournalStore::open(j.into_backend()).unwrap();
            assert_eq!(j.blocks(), vec![4], "seq {seq} in copy {copy}");
            exercise(j);
        }
    }
}

/// The other copy may hold any valid superblock (a previous journal, or a crafted one): formatting still
/// gives a journal that reopens as itself, whichever copy held what.
#[test]
fn format_wins_over_any_pair_of_superblocks() {
    let seqs = [0, 1, 7, u64::MAX / 2, u64::MAX / 2 + 1, u64::MAX - 1, u64::MAX];
    for a in seqs {
        for b in seqs {
            let mut image = vec![0u8; image_len() as usize];
            image[..512].copy_from_slice(&superblock(512, a, 1, 1));
            image[512..1024].copy_from_slice(&superblock(512, b, 2, 0));
            let mut j = JournalStore::format(MemBackend::from_vec(image).unwrap(), BS).unwrap();
            j.put(6, &[6; BS]).unwrap();
            j.sync().unwrap();
            let j = JournalStore::open(j.into_backend()).unwrap_or_else(|e| panic!("seqs {a} {b}: {e}"));
            assert_eq!(j.blocks(), vec![6], "seqs {a} {b}");
            assert!(!j.is_committing(), "seqs {a} {b}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes (with a valid superblock half of the time, so the record parser is reached).
    #[test]
    fn arbitrary_images_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..(image_len() as usize)),
        with_superblock in any::<bool>(),
        seq in any::<u64>(),
    ) {
        let mut image = bytes;
        image.resize(image.len().next_multiple_of(SECTOR_SIZE as usize), 0);
        if with_superblock && image.len() >= 4096 {
            image[..512].copy_from_slice(&superblock(512, seq, seq, 0));
        }
        if let Ok(j) = JournalStore::open(MemBackend::from_vec(image).unwrap()) {
            prop_assert!(j.len() <= j.capacity());
            exercise(j);
        }
    }

    /// A real journal with damaged bytes: a record it still returns holds exactly what was last written.
    #[test]
    fn damaged_journals_return_only_written_records(
        writes in proptest::collection::vec((0u64..12, any::<u8>()), 0..20),
        damage in proptest::collection::vec((0..image_len() as usize, 1u8..=255), 1..8),
    ) {
        let dev = MemBackend::new(image_len()).unwrap();
        let mut j = JournalStore::format(dev, BS).unwrap();
        let mut model = HashMap::new();
        for (block, v) in writes {
            if j.put(block, &[v; BS]).is_ok() {
                model.insert(block, v);
            }
        }
        j.sync().unwrap();
        let mut image = j.into_backend().into_vec();
        for (at, x) in damage {
            image[at] ^= x;
        }
        match JournalStore::open(MemBackend::from_vec(image).unwrap()) {
            Ok(j) => {
                let mut buf = [0u8; BS];
                for b in j.blocks() {
                    prop_assert!(j.read(b, 0, &mut buf).unwrap());
                    let want = model.get(&b).copied();
                    prop_assert_eq!(Some(buf[0]), want, "block {}", b);
                    prop_assert!(buf.iter().all(|&x| Some(x) == want));
                }
                exercise(j);
            }
            Err(e) => prop_assert!(matches!(e, Error::CorruptJournal { .. }), "{e}"),
        }
    }
}

#[test]
fn backend_of_the_wrong_size_is_refused() {
    let dev = MemBackend::new(4096).unwrap();
    assert!(JournalStore::format(dev, BS).is_err());
    let mut dev = MemBackend::new(4096).unwrap();
    dev.write_at(0, &superblock(512, 1, 1, 0)).unwrap();
    assert!(JournalStore::open(dev).is_err());
}
