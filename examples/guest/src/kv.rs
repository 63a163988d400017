//! The key-value store: an open-addressing table in RAM, made durable by a write-ahead log of one 512-byte
//! record per change on the block device.

use crate::abi::{BLK_MAX_SECTORS, BLK_OP_FLUSH, BLK_OP_READ, BLK_OP_WRITE, SECTOR_SIZE};
use crate::dev::{self, BlkError};

/// Longest key.
pub const MAX_KEY: usize = 64;
/// Longest value.
pub const MAX_VAL: usize = 255;
const SLOTS: usize = 4096;
const MAX_KEYS: usize = SLOTS * 3 / 4;
const REC_MAGIC: u32 = 0x4c41_5743; // "CWAL"
/// WAL operation: set.
pub const OP_SET: u8 = 1;
/// WAL operation: delete.
pub const OP_DEL: u8 = 2;

#[derive(Clone, Copy)]
struct Entry {
    state: u8, // 0 empty, 1 used, 2 deleted
    klen: u8,
    vlen: u8,
    key: [u8; MAX_KEY],
    val: [u8; MAX_VAL],
}

const EMPTY: Entry = Entry {
    state: 0,
    klen: 0,
    vlen: 0,
    key: [0; MAX_KEY],
    val: [0; MAX_VAL],
};

/// The table.
pub struct Table {
    slots: [Entry; SLOTS],
    keys: usize,
}

fn hash(key: &[u8]) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h as usize
}

/// Why a change was refused.
#[derive(Debug, Clone, Copy)]
pub enum KvError {
    /// Key empty or too long.
    BadKey,
    /// Value too long.
    BadValue,
    /// The table is full.
    Full,
}

impl Table {
    /// An empty table (for a zeroed static).
    pub const fn new() -> Self {
        Self {
            slots: [EMPTY; SLOTS],
            keys: 0,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys
    }

    fn find(&self, key: &[u8]) -> Result<usize, Option<usize>> {
        let mut i = hash(key) % SLOTS;
        let mut free = None;
        for _ in 0..SLOTS {
            let e = &self.slots[i];
            match e.state {
                0 => return Err(free.or(Some(i))),
                1 if &e.key[..usize::from(e.klen)] == key => return Ok(i),
                2 if free.is_none() => free = Some(i),
                _ => {}
            }
            i = (i + 1) % SLOTS;
        }
        Err(free)
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.find(key)
            .ok()
            .map(|i| &self.slots[i].val[..usize::from(self.slots[i].vlen)])
    }

    /// Check that `set(key, val)` would succeed.
    pub fn can_set(&self, key: &[u8], val: &[u8]) -> Result<(), KvError> {
        if key.is_empty() || key.len() > MAX_KEY {
            return Err(KvError::BadKey);
        }
        if val.len() > MAX_VAL {
            return Err(KvError::BadValue);
        }
        if self.find(key).is_err() && self.keys >= MAX_KEYS {
            return Err(KvError::Full);
        }
        Ok(())
    }

    /// Insert or replace.
    pub fn set(&mut self, key: &[u8], val: &[u8]) -> Result<(), KvError> {
        self.can_set(key, val)?;
        let i = match self.find(key) {
            Ok(i) => i,
            Err(Some(i)) => {
                self.keys += 1;
                i
            }
            Err(None) => return Err(KvError::Full),
        };
        let e = &mut self.slots[i];
        e.state = 1;
        e.klen = key.len() as u8;
        e.key[..key.len()].copy_from_slice(key);
        e.vlen = val.len() as u8;
        e.val[..val.len()].copy_from_slice(val);
        Ok(())
    }

    /// Remove; true if the key existed.
    pub fn del(&mut self, key: &[u8]) -> bool {
        match self.find(key) {
            Ok(i) => {
                self.slots[i].state = 2;
                self.keys -= 1;
                true
            }
            Err(_) => false,
        }
    }
}

/// CRC-32 (IEEE), bitwise: the WAL is small.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Write one record into a 512-byte sector buffer.
pub fn encode_record(sector: &mut [u8], seq: u64, op: u8, key: &[u8], val: &[u8]) {
    sector.fill(0);
    sector[0..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
    sector[4] = op;
    sector[5] = key.len() as u8;
    sector[6] = val.len() as u8;
    sector[8..16].copy_from_slice(&seq.to_le_bytes());
    sector[16..16 + key.len()].copy_from_slice(key);
    sector[16 + key.len()..16 + key.len() + val.len()].copy_from_slice(val);
    let crc = crc32(&sector[..508]);
    sector[508..512].copy_from_slice(&crc.to_le_bytes());
}

/// A decoded record, borrowing from its sector.
pub struct Record<'a> {
    /// Sequence number (1, 2, ...).
    pub seq: u64,
    /// OP_SET or OP_DEL.
    pub op: u8,
    /// Key.
    pub key: &'a [u8],
    /// Value (empty for deletes).
    pub val: &'a [u8],
}

/// Decode a record; None if the sector holds none (end of log).
pub fn decode_record(sector: &[u8]) -> Option<Record<'_>> {
    if sector.len() < 512 || sector[0..4] != REC_MAGIC.to_le_bytes() {
        return None;
    }
    let crc = u32::from_le_bytes([sector[508], sector[509], sector[510], sector[511]]);
    if crc != crc32(&sector[..508]) {
        return None;
    }
    let (op, klen, vlen) = (sector[4], usize::from(sector[5]), usize::from(sector[6]));
    if klen > MAX_KEY || 16 + klen + vlen > 508 || (op != OP_SET && op != OP_DEL) {
        return None;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&sector[8..16]);
    Some(Record {
        seq: u64::from_le_bytes(seq),
        op,
        key: &sector[16..16 + klen],
        val: &sector[16 + klen..16 + klen + vlen],
    })
}

/// The write-ahead log: where the next record goes and a staging buffer for group commit.
pub struct Wal {
    /// Next sector to write.
    pub next_sector: u64,
    /// Sequence number of the last record written or staged.
    pub seq: u64,
    /// Disk size in sectors.
    pub disk_sectors: u64,
    staged: u32,
    buf: *mut u8,
}

impl Wal {
    /// A log over a disk of `disk_sectors`, staging into `buf` (BLK_MAX_SECTORS sectors).
    pub fn new(disk_sectors: u64, buf: *mut u8) -> Self {
        Self {
            next_sector: 0,
            seq: 0,
            disk_sectors,
            staged: 0,
            buf,
        }
    }

    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: `buf` points to a static buffer of BLK_MAX_SECTORS sectors owned by the log.
        unsafe { core::slice::from_raw_parts_mut(self.buf, (BLK_MAX_SECTORS as u64 * SECTOR_SIZE) as usize) }
    }

    /// Replay the log into `table`; returns the number of records applied.
    pub fn replay(&mut self, table: &mut Table) -> Result<u64, BlkError> {
        let mut applied = 0;
        loop {
            let count = (self.disk_sectors - self.next_sector).min(u64::from(BLK_MAX_SECTORS)) as u32;
            if count == 0 {
                return Ok(applied);
            }
            dev::blk_request(BLK_OP_READ, self.next_sector, count, self.buf)?;
            for i in 0..count as usize {
                let start = i * SECTOR_SIZE as usize;
                let expected = self.seq + 1;
                let sector = &self.buf()[start..start + SECTOR_SIZE as usize];
                let Some(rec) = decode_record(sector) else {
                    return Ok(applied);
                };
                if rec.seq != expected {
                    return Ok(applied);
                }
                // Copy out of the buffer before mutating the table (the borrow ends here).
                let (mut k, mut v) = ([0u8; MAX_KEY], [0u8; MAX_VAL]);
                let (kl, vl, op) = (rec.key.len(), rec.val.len(), rec.op);
                k[..kl].copy_from_slice(rec.key);
                v[..vl].copy_from_slice(rec.val);
                if op == OP_SET {
                    let _ = table.set(&k[..kl], &v[..vl]);
                } else {
                    table.del(&k[..kl]);
                }
                self.seq += 1;
                self.next_sector += 1;
                applied += 1;
            }
        }
    }

    /// True if one more record fits in the staging buffer and on the disk.
    pub fn has_room(&self) -> bool {
        self.staged < BLK_MAX_SECTORS && self.next_sector + u64::from(self.staged) < self.disk_sectors
    }

    /// True if the disk itself is full.
    pub fn disk_full(&self) -> bool {
        self.next_sector + u64::from(self.staged) >= self.disk_sectors
    }

    /// Stage a record; returns its sequence number. Call `has_room` first.
    pub fn stage(&mut self, op: u8, key: &[u8], val: &[u8]) -> u64 {
        self.seq += 1;
        let seq = self.seq;
        let start = self.staged as usize * SECTOR_SIZE as usize;
        encode_record(
            &mut self.buf()[start..start + SECTOR_SIZE as usize],
            seq,
            op,
            key,
            val,
        );
        self.staged += 1;
        seq
    }

    /// Number of staged records.
    pub fn staged(&self) -> u32 {
        self.staged
    }

    /// Write the staged records and flush them to stable storage.
    pub fn commit(&mut self) -> Result<(), BlkError> {
        if self.staged == 0 {
            return Ok(());
        }
        dev::blk_request(BLK_OP_WRITE, self.next_sector, self.staged, self.buf)?;
        dev::blk_request(BLK_OP_FLUSH, 0, 0, self.buf)?;
        self.next_sector += u64::from(self.staged);
        self.staged = 0;
        Ok(())
    }
}
