//! Bounded block stores for the secondary's overlays: [`MemStore`] (memory) and [`JournalStore`] (a
//! self-describing, crash-recoverable log on any [`BlockBackend`], usually a file).
//!
//! A store maps a block index of the disk to one block of data. It never grows past the capacity fixed
//! when it is made; [`OverlayStore::put`] of a new block into a full store is [`Error::OverlayFull`].
//!
//! # Journal format
//!
//! ```text
//! offset 0     superblock A (512 bytes)    the two copies: the newer one is current (see below)
//! offset 512   superblock B (512 bytes)
//! offset 4096  slot 0: header (512 bytes) + data (block_size bytes)
//!              slot 1: ...
//! ```
//!
//! A superblock holds a magic, a format version, the block size, a sequence number, the current record
//! generation and a state (`open` or `committing`), protected by a CRC32. Every change of superblock writes
//! a copy with the next sequence number (open picks the valid copy with the newer one); a torn superblock
//! write therefore leaves the previous superblock intact and valid. Sequence numbers wrap around and are
//! compared as serial numbers (the newer is the one a wrapping difference below 2^63 ahead): the two copies
//! of a journal differ by the few superblock writes between two flushes, so any value is valid, and every
//! number the store writes is one that open accepts. (A range bound on open would be crossed by the store's
//! own next write, and a crash right after a flushed commit mark would then leave a journal that no longer
//! opens.) Precisely: the copy last known durable is never overwritten; a
//! superblock written without a flush is replaced in place by the next one. A slot header holds a magic, the record generation, the block index
//! and the CRC32 of the data, itself protected by a CRC32. Slots are filled in order from slot 0; on open the
//! store takes slots until the first one that is not a complete, current-generation record. `clear` starts a
//! new generation, which invalidates every record at once with a single superblock write (durable at the
//! next `sync`); `set_committing` writes and flushes. A generation is a fresh 64-bit value, never the
//! previous one plus one: a crash may lose a superblock whose records reached the medium, and a generation
//! counted again after the reopen would bring those records back.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasherDefault, Hasher};

use crate::backend::{BlockBackend, SECTOR_SIZE};
use crate::error::{Error, Result};

/// Largest block size a store accepts (1 MiB).
pub const MAX_BLOCK_SIZE: usize = 1 << 20;

/// A bounded map from block index to block contents.
///
/// Offsets and lengths inside a block are sector aligned, as everywhere in this crate.
pub trait OverlayStore {
    /// Size of one block in bytes.
    fn block_size(&self) -> usize;
    /// Maximum number of blocks held.
    fn capacity(&self) -> usize;
    /// Number of blocks held.
    fn len(&self) -> usize;
    /// True when no block is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// True when `block` is held.
    fn contains(&self, block: u64) -> bool;
    /// Reads `buf.len()` bytes at `offset` inside `block` into `buf`; false (and `buf` untouched) when the
    /// block is not held.
    fn read(&self, block: u64, offset: usize, buf: &mut [u8]) -> Result<bool>;
    /// Stores a whole block (`data.len() == block_size`), replacing any previous contents.
    fn put(&mut self, block: u64, data: &[u8]) -> Result<()>;
    /// Makes every `put` so far durable (no-op in memory).
    fn sync(&mut self) -> Result<()>;
    /// Drops every block. For a journal the drop is durable after the next [`sync`](Self::sync); a crash
    /// before that may bring the dropped blocks back.
    fn clear(&mut self) -> Result<()>;
    /// The held block indexes in ascending order.
    fn blocks(&self) -> Vec<u64>;
    /// True once [`set_committing`](Self::set_committing) ran and until the next `clear`.
    fn is_committing(&self) -> bool;
    /// Durably marks the store's contents as being committed into the disk (used by failover).
    fn set_committing(&mut self) -> Result<()>;
}

/// A cheap hasher for block indexes (multiplicative, Fibonacci hashing). Keys are disk block numbers, not
/// attacker-chosen strings; capacity bounds the map anyway.
#[derive(Default, Clone, Copy)]
pub struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
}

type BlockMap = HashMap<u64, u32, BuildHasherDefault<BlockHasher>>;

fn check_block_size(block_size: usize) -> Result<()> {
    if block_size == 0 || !block_size.is_multiple_of(SECTOR_SIZE as usize) || block_size > MAX_BLOCK_SIZE {
        return Err(Error::InvalidConfig(
            "block size must be a non-zero multiple of 512, at most 1 MiB",
        ));
    }
    Ok(())
}

fn check_piece(block_size: usize, offset: usize, len: usize) -> Result<()> {
    if !offset.is_multiple_of(SECTOR_SIZE as usize) || !len.is_multiple_of(SECTOR_SIZE as usize) {
        return Err(Error::Misaligned {
            offset: offset as u64,
            len: len as u64,
            align: SECTOR_SIZE,
        });
    }
    if offset.checked_add(len).is_none_or(|end| end > block_size) {
        return Err(Error::OutOfRange {
            offset: offset as u64,
            len: len as u64,
            device_len: block_size as u64,
        });
    }
    Ok(())
}

fn check_block_len(block_size: usize, data: &[u8]) -> Result<()> {
    if data.len() != block_size {
        return Err(Error::Mismatch {
            what: "block length",
            expected: block_size as u64,
            found: data.len() as u64,
        });
    }
    Ok(())
}

/// Which slot holds which block, for both stores. Slots are handed out in order from 0 and a block keeps
/// its slot until `clear`, so the slots in use are always `0..len`.
struct SlotIndex {
    map: BlockMap,
    capacity: usize,
}

impl SlotIndex {
    fn new(capacity: usize) -> Self {
        SlotIndex {
            map: BlockMap::default(),
            capacity,
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn contains(&self, block: u64) -> bool {
        self.map.contains_key(&block)
    }

    fn get(&self, block: u64) -> Option<usize> {
        self.map.get(&block).map(|&slot| slot as usize)
    }

    /// The slot to store `block` in, and whether it is a new one (to [`insert`](Self::insert) once the
    /// data is there): the block's own slot, or the next free one. A full store is `OverlayFull`.
    fn slot_for(&self, block: u64) -> Result<(usize, bool)> {
        match self.get(block) {
            Some(slot) => Ok((slot, false)),
            None if self.len() >= self.capacity => Err(Error::OverlayFull {
                store: "overlay",
                used: self.len(),
                capacity: self.capacity,
                needed: 1,
            }),
            None => Ok((self.len(), true)),
        }
    }

    /// Records that `block` now occupies the next free slot; false (and nothing changed) when it already
    /// had one.
    fn insert(&mut self, block: u64) -> bool {
        let slot = self.len() as u32;
        match self.map.entry(block) {
            Entry::Occupied(_) => false,
            Entry::Vacant(v) => {
                v.insert(slot);
                true
            }
        }
    }

    fn blocks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.map.keys().copied().collect();
        v.sort_unstable();
        v
    }

    fn clear(&mut self) {
        self.map.clear();
    }
}

/// Blocks per arena chunk of a [`MemStore`].
const CHUNK_BLOCKS: usize = 256;

/// An overlay in memory: an arena of fixed slots plus an index.
///
/// Memory is taken in chunks of 256 blocks as the store fills and kept across `clear`, so a checkpoint's
/// drop costs one index clear and no frees (call [`MemStore::release_memory`] to give it back).
pub struct MemStore {
    block_size: usize,
    index: SlotIndex,
    chunks: Vec<Box<[u8]>>,
    committing: bool,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemStore")
            .field("block_size", &self.block_size)
            .field("capacity", &self.index.capacity)
            .field("len", &self.index.len())
            .finish()
    }
}

impl MemStore {
    /// A store of at most `capacity` blocks of `block_size` bytes.
    pub fn new(block_size: usize, capacity: usize) -> Result<Self> {
        check_block_size(block_size)?;
        if capacity == 0 || capacity > u32::MAX as usize || capacity.checked_mul(block_size).is_none() {
            return Err(Error::InvalidConfig(
                "overlay capacity must be between 1 and 2^32-1 blocks",
            ));
        }
        Ok(MemStore {
            block_size,
            index: SlotIndex::new(capacity),
            chunks: Vec::new(),
            committing: false,
        })
    }

    /// Frees the arena memory not in use (all of it after a `clear`).
    pub fn release_memory(&mut self) {
        let keep = self.index.len().div_ceil(CHUNK_BLOCKS);
        self.chunks.truncate(keep);
        self.chunks.shrink_to_fit();
        self.index.map.shrink_to_fit();
    }

    fn slot(&self, slot: usize) -> &[u8] {
        let bs = self.block_size;
        let start = (slot % CHUNK_BLOCKS) * bs;
        &self.chunks[slot / CHUNK_BLOCKS][start..start + bs]
    }

    fn slot_mut(&mut self, slot: usize) -> &mut [u8] {
        let bs = self.block_size;
        let start = (slot % CHUNK_BLOCKS) * bs;
        &mut self.chunks[slot / CHUNK_BLOCKS][start..start + bs]
    }
}

impl OverlayStore for MemStore {
    fn block_size(&self) -> usize {
        self.block_size
    }
    fn capacity(&self) -> usize {
        self.index.capacity
    }
    fn len(&self) -> usize {
        self.index.len()
    }
    fn contains(&self, block: u64) -> bool {
        self.index.contains(block)
    }

    fn read(&self, block: u64, offset: usize, buf: &mut [u8]) -> Result<bool> {
        check_piece(self.block_size, offset, buf.len())?;
        match self.index.get(block) {
            Some(slot) => {
                buf.copy_from_slice(&self.slot(slot)[offset..offset + buf.len()]);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn put(&mut self, block: u64, data: &[u8]) -> Result<()> {
        check_block_len(self.block_size, data)?;
        let (slot, new) = self.index.slot_for(block)?;
        if slot / CHUNK_BLOCKS >= self.chunks.len() {
            let blocks = CHUNK_BLOCKS.min(self.index.capacity - slot);
            self.chunks
                .push(vec![0u8; blocks * self.block_size].into_boxed_slice());
        }
        self.slot_mut(slot).copy_from_slice(data);
        if new {
            self.index.insert(block);
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        Ok(())
    }

    fn clear(&mut self) -> Result<()> {
        self.index.clear();
        self.committing = false;
        Ok(())
    }

    fn blocks(&self) -> Vec<u64> {
        self.index.blocks()
    }

    fn is_committing(&self) -> bool {
        self.committing
    }

    fn set_committing(&mut self) -> Result<()> {
        self.committing = true;
        Ok(())
    }
}

const SB_MAGIC: &[u8; 8] = b"COLOJNL1";
const REC_MAGIC: &[u8; 8] = b"COLOREC1";
const FORMAT_VERSION: u32 = 1;
/// Bytes reserved at the start of a journal for the two superblocks.
pub const JOURNAL_HEADER_BYTES: u64 = 4096;
const SLOT_HEADER: usize = SECTOR_SIZE as usize;
const STATE_OPEN: u32 = 0;
const STATE_COMMITTING: u32 = 1;

/// True when sequence number `seq` is newer than `than`: at most 2^63 - 1 steps ahead of it, wrapping
/// (serial number arithmetic). Of two copies 2^63 apart, neither is newer.
fn seq_newer(seq: u64, than: u64) -> bool {
    (seq.wrapping_sub(than) as i64) > 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Superblock {
    block_size: u32,
    seq: u64,
    generation: u64,
    state: u32,
    /// Chosen at format time; records of another journal that used the same device never match.
    journal_id: u64,
}

impl Superblock {
    fn encode(&self) -> [u8; SECTOR_SIZE as usize] {
        let mut b = [0u8; SECTOR_SIZE as usize];
        b[0..8].copy_from_slice(SB_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.generation.to_le_bytes());
        b[32..36].copy_from_slice(&self.state.to_le_bytes());
        b[36..44].copy_from_slice(&self.journal_id.to_le_bytes());
        let crc = crc32fast::hash(&b[0..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Superblock> {
        if b.len() < 48 || &b[0..8] != SB_MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[44..48].try_into().ok()?);
        if crc != crc32fast::hash(&b[0..44]) {
            return None;
        }
        if u32::from_le_bytes(b[8..12].try_into().ok()?) != FORMAT_VERSION {
            return None;
        }
        Some(Superblock {
            block_size: u32::from_le_bytes(b[12..16].try_into().ok()?),
            seq: u64::from_le_bytes(b[16..24].try_into().ok()?),
            generation: u64::from_le_bytes(b[24..32].try_into().ok()?),
            state: u32::from_le_bytes(b[32..36].try_into().ok()?),
            journal_id: u64::from_le_bytes(b[36..44].try_into().ok()?),
        })
    }
}

fn encode_record_header(h: &mut [u8], sb: &Superblock, block: u64, data: &[u8]) {
    h.fill(0);
    h[0..8].copy_from_slice(REC_MAGIC);
    h[8..16].copy_from_slice(&sb.generation.to_le_bytes());
    h[16..24].copy_from_slice(&block.to_le_bytes());
    h[24..28].copy_from_slice(&crc32fast::hash(data).to_le_bytes());
    h[28..36].copy_from_slice(&sb.journal_id.to_le_bytes());
    let crc = crc32fast::hash(&h[0..36]);
    h[36..40].copy_from_slice(&crc.to_le_bytes());
}

/// Returns the block index when `rec` (header followed by data) is a complete record of the journal and
/// generation of `sb`.
fn decode_record(rec: &[u8], sb: &Superblock) -> Option<u64> {
    let (h, data) = rec.split_at(SLOT_HEADER);
    if &h[0..8] != REC_MAGIC {
        return None;
    }
    if u32::from_le_bytes(h[36..40].try_into().ok()?) != crc32fast::hash(&h[0..36]) {
        return None;
    }
    if u64::from_le_bytes(h[8..16].try_into().ok()?) != sb.generation
        || u64::from_le_bytes(h[28..36].try_into().ok()?) != sb.journal_id
    {
        return None;
    }
    if u32::from_le_bytes(h[24..28].try_into().ok()?) != crc32fast::hash(data) {
        return None;
    }
    Some(u64::from_le_bytes(h[16..24].try_into().ok()?))
}

/// A 64-bit value no earlier call is expected to have returned, on this host or another: the wall clock in
/// nanoseconds, the process id, a per-process counter and `salt`, mixed (splitmix64's finaliser). Used for
/// journal ids and record generations, which must not repeat values that records on the medium may carry.
fn unique_u64(salt: u64) -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut x = nanos
        ^ salt.rotate_left(32)
        ^ u64::from(std::process::id()).rotate_left(16)
        ^ count.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Reads both superblock copies: the valid one with the newer sequence number (copy A when neither is
/// newer) and its slot.
fn read_superblock<B: BlockBackend>(backend: &B) -> Result<Option<(Superblock, u64)>> {
    if backend.len() < JOURNAL_HEADER_BYTES {
        return Ok(None);
    }
    let mut two = [0u8; 2 * SECTOR_SIZE as usize];
    backend.read_at(0, &mut two)?;
    let a = Superblock::decode(&two[..SECTOR_SIZE as usize]);
    let b = Superblock::decode(&two[SECTOR_SIZE as usize..]);
    Ok(match (a, b) {
        (Some(a), Some(b)) if seq_newer(b.seq, a.seq) => Some((b, 1)),
        (Some(a), _) => Some((a, 0)),
        (None, Some(b)) => Some((b, 1)),
        (None, None) => None,
    })
}

/// An overlay kept as a crash-recoverable log on a [`BlockBackend`] (see the module docs for the format).
///
/// Its capacity is fixed by the backend's length: `(len - 4096) / (512 + block_size)` blocks.
pub struct JournalStore<B> {
    backend: B,
    sb: Superblock,
    /// Which superblock copy holds `sb` (0 = A, 1 = B).
    sb_slot: u64,
    /// True when `sb` is known to be on the medium (flushed since it was written).
    sb_durable: bool,
    index: SlotIndex,
    scratch: Vec<u8>,
}

impl<B> std::fmt::Debug for JournalStore<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalStore")
            .field("block_size", &self.sb.block_size)
            .field("generation", &self.sb.generation)
            .field("capacity", &self.index.capacity)
            .field("len", &self.index.len())
            .finish()
    }
}

impl<B: BlockBackend> JournalStore<B> {
    /// Backend length needed for a journal of `capacity` blocks of `block_size` bytes.
    pub fn required_len(block_size: usize, capacity: usize) -> u64 {
        JOURNAL_HEADER_BYTES + (SLOT_HEADER as u64 + block_size as u64) * capacity as u64
    }

    /// Formats `backend` as an empty journal for blocks of `block_size` bytes.
    pub fn format(mut backend: B, block_size: usize) -> Result<Self> {
        check_block_size(block_size)?;
        let capacity = Self::capacity_for(backend.len(), block_size)?;
        // Continue the sequence of any journal the device held before, so the new superblock is newer than
        // the previous journal's current one, which stays in the other copy; a fresh id and generation
        // make sure none of its records (or those of a journal whose superblocks are gone) match.
        let previous = read_superblock(&backend).ok().flatten();
        let seq = previous.map_or(0, |(sb, _)| sb.seq).wrapping_add(1);
        let journal_id = unique_u64(seq);
        let sb = Superblock {
            block_size: block_size as u32,
            seq,
            generation: unique_u64(seq),
            state: STATE_OPEN,
            journal_id,
        };
        // Write the copy that does not hold the previous journal's latest superblock.
        let slot = previous.map_or(0, |(_, slot)| 1 - slot);
        backend.write_at(slot * SECTOR_SIZE, &sb.encode())?;
        backend.flush()?;
        Ok(JournalStore {
            backend,
            sb,
            sb_slot: slot,
            sb_durable: true,
            index: SlotIndex::new(capacity),
            scratch: vec![0; SLOT_HEADER + block_size],
        })
    }

    /// Opens a journal written by [`format`](Self::format), recovering its current records.
    pub fn open(backend: B) -> Result<Self> {
        let Some((sb, sb_slot)) = read_superblock(&backend)? else {
            return Err(Error::CorruptJournal {
                reason: "no valid superblock",
                slot: None,
            });
        };
        let block_size = sb.block_size as usize;
        check_block_size(block_size).map_err(|_| Error::CorruptJournal {
            reason: "bad block size in superblock",
            slot: None,
        })?;
        if sb.state != STATE_OPEN && sb.state != STATE_COMMITTING {
            return Err(Error::CorruptJournal {
                reason: "unknown state in superblock",
                slot: None,
            });
        }
        let capacity = Self::capacity_for(backend.len(), block_size)?;
        let mut store = JournalStore {
            backend,
            sb,
            sb_slot,
            sb_durable: true,
            index: SlotIndex::new(capacity),
            scratch: vec![0; SLOT_HEADER + block_size],
        };
        let mut rec = vec![0u8; SLOT_HEADER + block_size];
        while store.index.len() < capacity {
            let slot = store.index.len();
            store.backend.read_at(store.slot_offset(slot), &mut rec)?;
            let Some(block) = decode_record(&rec, &sb) else {
                break;
            };
            if !store.index.insert(block) {
                return Err(Error::CorruptJournal {
                    reason: "block recorded twice",
                    slot: Some(slot as u64),
                });
            }
        }
        Ok(store)
    }

    fn capacity_for(len: u64, block_size: usize) -> Result<usize> {
        let slots = len.saturating_sub(JOURNAL_HEADER_BYTES) / (SLOT_HEADER + block_size) as u64;
        if slots == 0 {
            return Err(Error::InvalidConfig("journal device too small for one block"));
        }
        Ok(slots.min(u32::MAX as u64) as usize)
    }

    fn slot_offset(&self, slot: usize) -> u64 {
        JOURNAL_HEADER_BYTES + slot as u64 * (SLOT_HEADER + self.sb.block_size as usize) as u64
    }

    /// Writes the next superblock. The copy that is known durable is never overwritten: if the latest
    /// superblock is durable the other copy is written, otherwise the latest (not yet durable) copy is
    /// replaced. A torn or lost superblock write therefore always leaves the last durable one valid.
    fn write_superblock(&mut self, generation: u64, state: u32, flush: bool) -> Result<()> {
        let sb = Superblock {
            journal_id: self.sb.journal_id,
            block_size: self.sb.block_size,
            seq: self.sb.seq.wrapping_add(1),
            generation,
            state,
        };
        let slot = if self.sb_durable {
            1 - self.sb_slot
        } else {
            self.sb_slot
        };
        self.backend.write_at(slot * SECTOR_SIZE, &sb.encode())?;
        self.sb = sb;
        self.sb_slot = slot;
        self.sb_durable = false;
        if flush {
            self.sync()?;
        }
        Ok(())
    }

    /// The current record generation (changes at every `clear`).
    pub fn generation(&self) -> u64 {
        self.sb.generation
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, consuming the store (no flush: call `sync` first if needed).
    pub fn into_backend(self) -> B {
        self.backend
    }
}

impl<B: BlockBackend> OverlayStore for JournalStore<B> {
    fn block_size(&self) -> usize {
        self.sb.block_size as usize
    }
    fn capacity(&self) -> usize {
        self.index.capacity
    }
    fn len(&self) -> usize {
        self.index.len()
    }
    fn contains(&self, block: u64) -> bool {
        self.index.contains(block)
    }

    fn read(&self, block: u64, offset: usize, buf: &mut [u8]) -> Result<bool> {
        check_piece(self.block_size(), offset, buf.len())?;
        match self.index.get(block) {
            Some(slot) => {
                let at = self.slot_offset(slot) + (SLOT_HEADER + offset) as u64;
                self.backend.read_at(at, buf)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn put(&mut self, block: u64, data: &[u8]) -> Result<()> {
        check_block_len(self.block_size(), data)?;
        let (slot, new) = self.index.slot_for(block)?;
        let (h, d) = self.scratch.split_at_mut(SLOT_HEADER);
        d.copy_from_slice(data);
        encode_record_header(h, &self.sb, block, data);
        let at = self.slot_offset(slot);
        self.backend.write_at(at, &self.scratch)?;
        if new {
            self.index.insert(block);
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.backend.flush()?;
        self.sb_durable = true;
        Ok(())
    }

    fn clear(&mut self) -> Result<()> {
        // Not `previous + 1`: a crash can lose a superblock while records written under its generation
        // survive, and a generation counted again from the surviving superblock would bring them back.
        let mut generation = unique_u64(self.sb.seq);
        if generation == self.sb.generation {
            generation = !generation;
        }
        self.write_superblock(generation, STATE_OPEN, false)?;
        self.index.clear();
        Ok(())
    }

    fn blocks(&self) -> Vec<u64> {
        self.index.blocks()
    }

    fn is_committing(&self) -> bool {
        self.sb.state == STATE_COMMITTING
    }

    fn set_committing(&mut self) -> Result<()> {
        if self.is_committing() {
            return Ok(());
        }
        self.write_superblock(self.sb.generation, STATE_COMMITTING, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;

    fn block(v: u8) -> Vec<u8> {
        vec![v; 1024]
    }

    /// A freshly formatted journal of 4 blocks of `bs` bytes in memory.
    fn journal(bs: usize) -> JournalStore<MemBackend> {
        let dev = MemBackend::new(JournalStore::<MemBackend>::required_len(bs, 4)).unwrap();
        JournalStore::format(dev, bs).unwrap()
    }

    /// Stores each block of `blocks` filled with its own index, then syncs.
    fn put_synced(j: &mut JournalStore<MemBackend>, blocks: impl IntoIterator<Item = u64>) {
        for b in blocks {
            j.put(b, &vec![b as u8; j.block_size()]).unwrap();
        }
        j.sync().unwrap();
    }

    /// Syncs `j` and opens its device again.
    fn reopen(mut j: JournalStore<MemBackend>) -> JournalStore<MemBackend> {
        j.sync().unwrap();
        JournalStore::open(j.into_backend()).unwrap()
    }

    #[test]
    fn mem_store_is_bounded_and_clear_keeps_nothing() {
        let mut s = MemStore::new(1024, 3).unwrap();
        for b in 0..3 {
            s.put(b * 10, &block(b as u8)).unwrap();
        }
        s.put(10, &block(9)).unwrap(); // replacement needs no room
        assert!(matches!(
            s.put(99, &block(1)),
            Err(Error::OverlayFull { capacity: 3, .. })
        ));
        let mut buf = [0u8; 512];
        assert!(s.read(10, 512, &mut buf).unwrap());
        assert_eq!(buf, [9; 512]);
        assert_eq!(s.blocks(), vec![0, 10, 20]);
        s.clear().unwrap();
        assert!(s.is_empty());
        assert!(!s.read(10, 0, &mut buf).unwrap());
        s.put(99, &block(4)).unwrap();
        assert!(s.read(99, 0, &mut buf).unwrap());
        assert_eq!(buf, [4; 512]);
    }

    #[test]
    fn journal_survives_reopen_and_clear_invalidates() {
        let mut j = journal(1024);
        assert_eq!(j.capacity(), 4);
        j.put(5, &block(5)).unwrap();
        j.put(7, &block(7)).unwrap();
        j.put(5, &block(6)).unwrap();
        let mut j = reopen(j);
        assert_eq!(j.blocks(), vec![5, 7]);
        let mut buf = [0u8; 1024];
        assert!(j.read(5, 0, &mut buf).unwrap());
        assert_eq!(buf, [6; 1024]);
        j.clear().unwrap();
        put_synced(&mut j, [9]);
        assert_eq!(reopen(j).blocks(), vec![9]);
    }

    #[test]
    fn journal_torn_record_and_bad_superblock_are_handled() {
        let mut j = journal(512);
        put_synced(&mut j, [1, 2]);
        let mut dev = j.into_backend();
        // Tear the second record's data: it and everything after it are ignored.
        dev.write_at(JOURNAL_HEADER_BYTES + 1024 + 512, &[0xee; 512])
            .unwrap();
        let j = JournalStore::open(dev).unwrap();
        assert_eq!(j.blocks(), vec![1]);
        let mut dev = j.into_backend();
        dev.write_at(0, &[0xff; 1024]).unwrap();
        assert!(matches!(
            JournalStore::open(dev),
            Err(Error::CorruptJournal { .. })
        ));
    }

    #[test]
    fn reformat_never_resurrects_old_records() {
        let mut j = journal(512);
        put_synced(&mut j, 1..4);
        let mut j = JournalStore::format(j.into_backend(), 512).unwrap();
        put_synced(&mut j, [9]);
        assert_eq!(reopen(j).blocks(), vec![9]);
    }

    #[test]
    fn records_of_a_lost_superblock_never_come_back() {
        let mut j = journal(512);
        put_synced(&mut j, [1]);
        let durable_superblocks = j.backend().as_slice()[..1024].to_vec();
        // A clear whose superblock never reaches the medium, though the records written after it do.
        j.clear().unwrap();
        for b in 10..14 {
            j.put(b, &[b as u8; 512]).unwrap();
        }
        let mut dev = j.into_backend();
        dev.write_at(0, &durable_superblocks).unwrap();
        // Reopen (the old generation: slot 0 was overwritten, so nothing is current), clear as recovery
        // does, take one new record, reopen again: the lost generation's records stay dead.
        let mut j = JournalStore::open(dev).unwrap();
        assert!(j.is_empty());
        j.clear().unwrap();
        j.sync().unwrap();
        put_synced(&mut j, [20]);
        assert_eq!(reopen(j).blocks(), vec![20]);
    }

    #[test]
    fn torn_superblock_update_falls_back_to_previous() {
        let mut j = journal(512);
        put_synced(&mut j, [3]);
        let slot = j.sb_slot;
        let mut dev = j.into_backend();
        // A torn write of the next superblock (the other copy) leaves garbage there.
        dev.write_at((1 - slot) * SECTOR_SIZE, &[0x55; 512]).unwrap();
        let j = JournalStore::open(dev).unwrap();
        assert_eq!(j.blocks(), vec![3]);
        assert!(!j.is_committing());
    }
}
