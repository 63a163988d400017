//! Initial synchronisation: bring an empty or stale secondary disk to the primary's content while the
//! primary keeps writing.
//!
//! [`InitialSync`] is sans-IO. It keeps a dirty bitmap of fixed-size chunks (all set for an empty
//! secondary; the known-divergent ranges for a stale one). [`InitialSync::next_chunk`] names the next dirty
//! chunk and clears its bit; the caller reads that range of the primary disk *after* the call and sends it.
//! Every guest write during the sync goes through [`InitialSync::note_write`], which sets the bits again, so
//! a chunk overwritten after it was read is sent once more. The sync is complete when no bit is set: at that
//! point, provided the chunks were delivered in order, the secondary holds the primary's content and
//! replication of individual writes takes over (see [`PrimaryDisk`](crate::PrimaryDisk), which drives this
//! for the VMM).
//!
//! Convergence needs the guest to dirty chunks more slowly than they are sent; [`SyncProgress`] shows the
//! remaining bytes per pass so the VMM can throttle or pause the guest if a pass does not shrink them.

use crate::backend::{SECTOR_SIZE, check_request};
use crate::error::{Error, Result};

/// Largest chunk size accepted (64 MiB).
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;

/// A range of the primary disk to read and send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncChunk {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (the chunk size, shorter for the last chunk of the disk).
    pub len: u64,
}

/// Where an initial sync stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncProgress {
    /// Disk length in bytes.
    pub total_bytes: u64,
    /// Bytes still dirty (to be sent).
    pub remaining_bytes: u64,
    /// Bytes handed out by `next_chunk` so far, re-sends included.
    pub sent_bytes: u64,
    /// Of `sent_bytes`, bytes that were sent before and dirtied again by guest writes.
    pub resent_bytes: u64,
    /// Completed passes over the disk (a pass ends when the cursor wraps).
    pub passes: u32,
}

/// Dirty-chunk tracker for the initial sync (see the module docs).
#[derive(Debug, Clone)]
pub struct InitialSync {
    disk_len: u64,
    chunk_size: u64,
    chunks: u64,
    dirty: Vec<u64>,
    sent: Vec<u64>,
    dirty_count: u64,
    cursor: u64,
    progress: SyncProgress,
}

fn bit(map: &[u64], i: u64) -> bool {
    map[(i / 64) as usize] & (1 << (i % 64)) != 0
}

fn set(map: &mut [u64], i: u64) {
    map[(i / 64) as usize] |= 1 << (i % 64);
}

fn clear(map: &mut [u64], i: u64) {
    map[(i / 64) as usize] &= !(1 << (i % 64));
}

impl InitialSync {
    /// A sync of a disk of `disk_len` bytes into an empty secondary: every chunk dirty.
    pub fn new(disk_len: u64, chunk_size: u64) -> Result<Self> {
        let mut s = Self::clean(disk_len, chunk_size)?;
        for i in 0..s.chunks {
            set(&mut s.dirty, i);
        }
        s.dirty_count = s.chunks;
        Ok(s)
    }

    /// A sync with nothing dirty yet, for a stale secondary: mark the divergent ranges with
    /// [`mark_dirty`](Self::mark_dirty).
    pub fn clean(disk_len: u64, chunk_size: u64) -> Result<Self> {
        if chunk_size == 0 || !chunk_size.is_multiple_of(SECTOR_SIZE) || chunk_size > MAX_CHUNK_SIZE {
            return Err(Error::InvalidConfig(
                "sync chunk size must be a non-zero multiple of 512, at most 64 MiB",
            ));
        }
        if !disk_len.is_multiple_of(SECTOR_SIZE) {
            return Err(Error::Misaligned {
                offset: 0,
                len: disk_len,
                align: SECTOR_SIZE,
            });
        }
        let chunks = disk_len.div_ceil(chunk_size);
        let words = usize::try_from(chunks.div_ceil(64))
            .map_err(|_| Error::InvalidConfig("disk too large for the sync bitmap"))?;
        Ok(InitialSync {
            disk_len,
            chunk_size,
            chunks,
            dirty: vec![0; words],
            sent: vec![0; words],
            dirty_count: 0,
            cursor: 0,
            progress: SyncProgress {
                total_bytes: disk_len,
                ..SyncProgress::default()
            },
        })
    }

    /// Marks `len` bytes at `offset` dirty (a divergent range, or a guest write during the sync).
    pub fn mark_dirty(&mut self, offset: u64, len: u64) -> Result<()> {
        check_request(offset, len, self.disk_len)?;
        if len == 0 {
            return Ok(());
        }
        let first = offset / self.chunk_size;
        let last = (offset + len - 1) / self.chunk_size;
        for i in first..=last {
            if !bit(&self.dirty, i) {
                set(&mut self.dirty, i);
                self.dirty_count += 1;
            }
        }
        Ok(())
    }

    /// Records a guest write that reached the primary disk during the sync.
    pub fn note_write(&mut self, offset: u64, len: u64) -> Result<()> {
        self.mark_dirty(offset, len)
    }

    fn chunk_len(&self, i: u64) -> u64 {
        self.chunk_size.min(self.disk_len - i * self.chunk_size)
    }

    /// The next dirty chunk, its bit cleared; `None` when the sync is complete.
    ///
    /// Read the chunk's data from the primary disk after this call (not before), so that a write that lands
    /// in between is either in the data read or marks the chunk dirty again.
    pub fn next_chunk(&mut self) -> Option<SyncChunk> {
        if self.dirty_count == 0 {
            return None;
        }
        let words = self.dirty.len() as u64;
        let mut w = self.cursor / 64;
        // Mask off bits below the cursor in its word on the first look.
        let mut mask = !0u64 << (self.cursor % 64);
        for _ in 0..=words {
            let word = self.dirty[w as usize] & mask;
            if word != 0 {
                let i = w * 64 + u64::from(word.trailing_zeros());
                clear(&mut self.dirty, i);
                self.dirty_count -= 1;
                let len = self.chunk_len(i);
                self.progress.sent_bytes += len;
                if bit(&self.sent, i) {
                    self.progress.resent_bytes += len;
                }
                set(&mut self.sent, i);
                self.cursor = i + 1;
                if self.cursor >= self.chunks {
                    self.cursor = 0;
                    self.progress.passes += 1;
                }
                return Some(SyncChunk {
                    offset: i * self.chunk_size,
                    len,
                });
            }
            mask = !0;
            w += 1;
            if w >= words {
                w = 0;
                if self.cursor != 0 {
                    self.progress.passes += 1;
                    self.cursor = 0;
                }
            }
        }
        None
    }

    /// Puts a chunk back (its read or send failed).
    pub fn requeue(&mut self, chunk: SyncChunk) -> Result<()> {
        self.mark_dirty(chunk.offset, chunk.len)
    }

    /// True when no chunk is dirty.
    pub fn is_complete(&self) -> bool {
        self.dirty_count == 0
    }

    /// Progress so far.
    pub fn progress(&self) -> SyncProgress {
        let mut p = self.progress;
        p.remaining_bytes = self.dirty_count * self.chunk_size;
        let last = self.chunks.saturating_sub(1);
        if self.chunks > 0 && bit(&self.dirty, last) {
            p.remaining_bytes -= self.chunk_size - self.chunk_len(last);
        }
        p
    }

    /// The chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_pass_then_redirtied_chunk_is_resent() {
        let mut s = InitialSync::new(10 * 4096 + 512, 4096).unwrap();
        assert_eq!(s.progress().remaining_bytes, 10 * 4096 + 512);
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(s.next_chunk().unwrap());
        }
        s.note_write(4096, 512).unwrap(); // already sent: sent again later
        s.note_write(8 * 4096, 4096).unwrap(); // not yet sent: still once
        while let Some(c) = s.next_chunk() {
            got.push(c);
        }
        assert!(s.is_complete());
        let offsets: Vec<u64> = got.iter().map(|c| c.offset).collect();
        let mut expect: Vec<u64> = (0..11).map(|i| i * 4096).collect();
        expect.push(4096);
        assert_eq!(offsets, expect);
        assert_eq!(got[10].len, 512);
        let p = s.progress();
        assert_eq!(p.remaining_bytes, 0);
        assert_eq!(p.resent_bytes, 4096);
        assert_eq!(p.sent_bytes, 11 * 4096 + 512);
        assert_eq!(p.passes, 1);
    }

    #[test]
    fn stale_secondary_sends_only_marked_ranges() {
        let mut s = InitialSync::clean(1 << 20, 65536).unwrap();
        assert!(s.next_chunk().is_none());
        s.mark_dirty(65536 * 3 + 512, 65536).unwrap();
        assert_eq!(
            s.next_chunk(),
            Some(SyncChunk {
                offset: 65536 * 3,
                len: 65536
            })
        );
        assert_eq!(
            s.next_chunk(),
            Some(SyncChunk {
                offset: 65536 * 4,
                len: 65536
            })
        );
        assert_eq!(s.next_chunk(), None);
        assert!(matches!(
            s.mark_dirty(1 << 20, 512),
            Err(Error::OutOfRange { .. })
        ));
        assert!(InitialSync::new(4096, 1000).is_err());
    }
}
