//! Fuzz the journal reader: `JournalStore::open` and recovery over an arbitrary disk image.
//!
//! The first input byte picks a block size and which checksums the target repairs; the rest is the image
//! (padded to at least the superblocks and two slots). Random bytes almost never carry a valid CRC, so the
//! target can write the superblock's magic, version, block size and CRC, and give every slot a record
//! header of the superblock's journal and generation with correct CRCs, while the fuzzer keeps control of
//! every other byte (sequence number, state, block indexes, data). That reaches the record scan, duplicate
//! detection and recovery. The layout repeated here is the one `colo_block::store` documents.
//!
//! Opening must give a typed error or a journal that reads, clears and takes new records; `recover` over
//! it (as the hidden store, next to an empty active overlay) must not panic either.
#![no_main]

use colo_block::{JournalStore, MemBackend, MemStore, OverlayStore, recover};
use libfuzzer_sys::fuzz_target;

/// Images larger than this are cut: the reader's cost grows with the image, not its logic.
const MAX_IMAGE: usize = 1 << 20;
const HEADER: usize = 4096;
const SLOT_HEADER: usize = 512;

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Makes the superblock at `sb` carry a valid magic, version, block size `bs` and CRC.
fn repair_superblock(sb: &mut [u8], bs: usize) {
    sb[0..8].copy_from_slice(b"COLOJNL1");
    sb[8..12].copy_from_slice(&1u32.to_le_bytes());
    sb[12..16].copy_from_slice(&(bs as u32).to_le_bytes());
    let crc = crc32fast::hash(&sb[0..44]);
    sb[44..48].copy_from_slice(&crc.to_le_bytes());
}

/// Makes every slot a record of the journal and generation of the superblock `sb`, keeping the fuzzer's
/// block index and data, with both CRCs right.
fn repair_records(image: &mut [u8], sb: &[u8], bs: usize) {
    let (generation, journal_id) = (&sb[24..32].to_vec(), &sb[36..44].to_vec());
    let mut at = HEADER;
    while at + SLOT_HEADER + bs <= image.len() {
        let (h, rest) = image[at..].split_at_mut(SLOT_HEADER);
        let data = &rest[..bs];
        h[0..8].copy_from_slice(b"COLOREC1");
        h[8..16].copy_from_slice(generation);
        h[24..28].copy_from_slice(&crc32fast::hash(data).to_le_bytes());
        h[28..36].copy_from_slice(journal_id);
        let crc = crc32fast::hash(&h[0..36]);
        h[36..40].copy_from_slice(&crc.to_le_bytes());
        at += SLOT_HEADER + bs;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bs = 512 << (mode >> 6);
    let mut image = rest[..rest.len().min(MAX_IMAGE)].to_vec();
    let min = HEADER + 2 * (SLOT_HEADER + bs);
    image.resize(image.len().max(min).next_multiple_of(512), 0);
    if mode & 1 != 0 {
        repair_superblock(&mut image[0..512], bs);
    }
    if mode & 2 != 0 {
        repair_superblock(&mut image[512..1024], bs);
    }
    if mode & 4 != 0 {
        // Records of the copy the reader will pick (the valid one with the newer sequence number,
        // compared as wrapping serial numbers).
        let a_seq = u64::from_le_bytes(image[16..24].try_into().unwrap_or_default());
        let b_seq = u64::from_le_bytes(image[528..536].try_into().unwrap_or_default());
        let b_newer = (b_seq.wrapping_sub(a_seq) as i64) > 0;
        let sb = if mode & 2 != 0 && (mode & 1 == 0 || b_newer) {
            image[512..1024].to_vec()
        } else {
            image[0..512].to_vec()
        };
        if le32(&sb[12..16]) as usize == bs {
            repair_records(&mut image, &sb, bs);
        }
    }
    let Ok(dev) = MemBackend::from_vec(image) else {
        return;
    };
    let Ok(mut j) = JournalStore::open(dev) else {
        return;
    };
    assert!(j.len() <= j.capacity());
    let bs = j.block_size();
    let mut buf = vec![0u8; bs];
    for b in j.blocks() {
        assert!(j.read(b, 0, &mut buf).expect("a recovered record reads"));
    }
    // Recovery with this journal as the hidden store rolls its blocks back into a disk: it may refuse
    // blocks beyond the disk with a typed error, never panic.
    if let (Ok(mut disk), Ok(mut active)) = (MemBackend::new(64 * bs as u64), MemStore::new(bs, 4)) {
        let _ = recover(&mut disk, &mut j, &mut active);
    }
    j.clear().expect("clear in memory");
    j.put(1, &vec![1u8; bs]).expect("a cleared journal has room");
    j.sync().expect("sync in memory");
    let j = JournalStore::open(j.into_backend()).expect("a journal this store wrote reopens");
    assert!(j.blocks().contains(&1));
});
