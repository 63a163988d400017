//! The write-ahead log on the block device: one 512-byte record per change, replayed at boot, appended with
//! group commit.

use crate::abi::{BLK_MAX_SECTORS, BLK_OP_FLUSH, BLK_OP_READ, BLK_OP_WRITE, SECTOR_SIZE};
use crate::dev::{self, BlkError};
use crate::store::{MAX_KEY, MAX_VAL, OP_SET, Table, decode_record, encode_record};

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
