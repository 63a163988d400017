//! The primary side: [`PrimaryDisk`] writes the guest's data to the local disk and queues a replication
//! record for the secondary.
//!
//! # Data flow
//!
//! ```text
//! guest write(offset, Bytes) --> local disk (pwrite)        --> WriteStatus back to the device model
//!                            \-> Outgoing::Write(WriteRecord) queued, same Bytes (no copy)
//! guest discard(offset, len) --> local discard, Outgoing::Discard(DiscardRecord) queued
//! checkpoint               ---> end_epoch(): Outgoing::Barrier { epoch } queued behind the epoch's writes
//! VMM transport            <--- poll_outgoing(): records, barriers, sync chunks, in order
//! secondary ack(id)        ---> handle_ack(id): writes now complete (Sync mode)
//! ```
//!
//! The transport is the VMM's: it sends what [`PrimaryDisk::poll_outgoing`] yields, **in order**, and feeds
//! the secondary's acknowledgements to [`PrimaryDisk::handle_ack`]. An acknowledgement is cumulative: the
//! secondary applies records in order and acknowledges the highest id applied.
//!
//! # Completion semantics
//!
//! * [`CompletionMode::Async`] (DRBD protocol A, QEMU's choice): a write completes as soon as the local
//!   disk accepted it. The record may still sit in the queue or the network; if the secondary is lost, the
//!   primary simply carries on. The guest loses nothing: its data is on the primary's disk.
//! * [`CompletionMode::Sync`] (DRBD protocol C): a write completes when the local disk accepted it *and*
//!   the secondary acknowledged it (applied it to its disk, see [`secondary`](crate::secondary)).
//!   `write` returns [`WriteStatus::AwaitingAck`]; the id comes back out of
//!   `handle_ack` when it completes. If the secondary is lost, [`PrimaryDisk::stop_replication`] completes
//!   every waiting write (they are all on the local disk).
//!
//! While standalone or during an initial sync, writes complete on the local write in both modes: there is
//! no copy to wait for yet (the sync re-sends whatever they dirty).
//!
//! In both modes a guest flush is [`PrimaryDisk::flush`]: it makes the local disk durable. The primary never
//! completes a write that is not on its local disk, so no completed write is lost by losing the secondary.
//!
//! # Epoch size
//!
//! The secondary saves the old content of every block the primary overwrites in an epoch (its hidden
//! store), and its store is bounded. A write the secondary cannot protect must not be sent at all, since
//! the epoch's checkpoint needs every write of the epoch. So the bound is enforced here, before the write:
//! with an [`EpochLimit`] equal to the secondary's hidden-store geometry, a write that would touch more
//! distinct blocks in the epoch is refused with [`Error::EpochFull`] (nothing written); the VMM holds the
//! guest's request, takes a checkpoint and retries.
//!
//! # Barrier
//!
//! At a checkpoint the VMM pauses the guest and calls [`PrimaryDisk::end_epoch`]. This queues a barrier
//! behind every write of the closing epoch; once `poll_outgoing` has yielded it
//! ([`PrimaryDisk::barrier_handed_over`]), every write of that epoch has been handed to the transport. The
//! secondary must see the barrier before it commits the checkpoint.

use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasherDefault;

use bytes::{Bytes, BytesMut};

use crate::backend::{BlockBackend, check_request};
use crate::error::{Error, Result};
use crate::store::BlockHasher;
use crate::sync::{InitialSync, SyncProgress};

/// When a guest write completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompletionMode {
    /// Complete on the local write (protocol A).
    #[default]
    Async,
    /// Complete on the local write plus the secondary's acknowledgement (protocol C).
    Sync,
}

/// Identifies one replicated write; ids increase by one per write, starting at 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriteId(pub u64);

/// One guest write, for the secondary: plain data, for any transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRecord {
    /// The write's id (acknowledged by the secondary).
    pub id: WriteId,
    /// The epoch the write belongs to (the checkpoint interval it happened in).
    pub epoch: u64,
    /// Byte offset on the disk (sector aligned).
    pub offset: u64,
    /// The data (a sector multiple), shared with the guest's buffer.
    pub data: Bytes,
}

/// One guest discard, for the secondary: the range reads as zeros once applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardRecord {
    /// The discard's id (same sequence as writes; acknowledged like them).
    pub id: WriteId,
    /// The epoch it belongs to.
    pub epoch: u64,
    /// Byte offset on the disk (sector aligned).
    pub offset: u64,
    /// Length in bytes (a sector multiple).
    pub len: u64,
}

/// Backlog bytes a queued record costs at least (its bookkeeping, for a discard or an empty write).
const RECORD_COST: u64 = 64;

/// What a guest request carries.
enum Payload {
    Data(Bytes),
    Discard(u64),
}

impl Payload {
    fn len(&self) -> u64 {
        match self {
            Payload::Data(d) => d.len() as u64,
            Payload::Discard(len) => *len,
        }
    }

    /// What the request counts against the backlog cap: its data, and at least [`RECORD_COST`], so that
    /// a guest cannot queue discards (or empty writes) without bound while the transport stalls.
    fn queued_bytes(&self) -> u64 {
        match self {
            Payload::Data(d) => (d.len() as u64).max(RECORD_COST),
            Payload::Discard(_) => RECORD_COST,
        }
    }

    fn apply_to<B: BlockBackend>(&self, disk: &mut B, offset: u64) -> Result<()> {
        match self {
            Payload::Data(d) => disk.write_at(offset, d),
            Payload::Discard(len) => disk.discard(offset, *len),
        }
    }
}

/// What the primary hands to the transport, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// A guest write.
    Write(WriteRecord),
    /// A guest discard.
    Discard(DiscardRecord),
    /// Every write of `epoch` precedes this.
    Barrier {
        /// The epoch closed.
        epoch: u64,
    },
    /// Initial sync: the primary's content at `offset`.
    SyncChunk {
        /// Byte offset.
        offset: u64,
        /// The data.
        data: Bytes,
    },
    /// Initial sync finished: from here on the secondary equals the primary, and writes follow as records.
    SyncDone,
}

/// The result of a guest write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStatus {
    /// Complete the guest's request now.
    Completed,
    /// Complete it when `handle_ack` returns this id (Sync mode).
    AwaitingAck(WriteId),
}

/// The secondary's hidden-store geometry, to bound the distinct blocks written per epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochLimit {
    /// The secondary's overlay block size in bytes.
    pub block_size: u64,
    /// The secondary's hidden-store capacity in blocks.
    pub max_blocks: usize,
}

/// Limits and modes of a [`PrimaryDisk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrimaryConfig {
    /// Completion semantics.
    pub mode: CompletionMode,
    /// Cap on bytes queued for the transport plus bytes awaiting acknowledgement (every record, a discard
    /// too, counts at least 64 bytes).
    pub max_backlog_bytes: u64,
    /// Bound on distinct blocks written per epoch (see the module docs); `None` for no bound.
    pub epoch_limit: Option<EpochLimit>,
}

impl Default for PrimaryConfig {
    fn default() -> Self {
        PrimaryConfig {
            mode: CompletionMode::Async,
            max_backlog_bytes: 256 << 20,
            epoch_limit: None,
        }
    }
}

/// The replication state of the primary.
#[derive(Debug)]
enum State {
    /// No partner: writes go to the local disk only.
    Standalone,
    /// Bringing the secondary up to date.
    Syncing(Box<InitialSync>),
    /// Every write is forwarded.
    Replicating,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Standalone => "standalone",
            State::Syncing(_) => "syncing",
            State::Replicating => "replicating",
        }
    }
}

/// The primary's disk and write forwarder (see the module docs).
#[derive(Debug)]
pub struct PrimaryDisk<B> {
    disk: B,
    config: PrimaryConfig,
    state: State,
    epoch: u64,
    next_id: u64,
    queue: VecDeque<Outgoing>,
    queued_bytes: u64,
    unacked: VecDeque<(WriteId, u64)>,
    unacked_bytes: u64,
    highest_sent: Option<u64>,
    last_barrier_sent: Option<u64>,
    epoch_blocks: HashSet<u64, BuildHasherDefault<BlockHasher>>,
}

impl<B: BlockBackend> PrimaryDisk<B> {
    /// A primary without a partner yet (standalone) at epoch 0.
    pub fn new(disk: B, config: PrimaryConfig) -> Self {
        PrimaryDisk {
            disk,
            config,
            state: State::Standalone,
            epoch: 0,
            next_id: 0,
            queue: VecDeque::new(),
            queued_bytes: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            highest_sent: None,
            last_barrier_sent: None,
            epoch_blocks: HashSet::default(),
        }
    }

    /// Starts forwarding writes, the secondary's disk being already identical (for example both copied
    /// from one image). Otherwise use [`start_sync`](Self::start_sync).
    pub fn start_replication(&mut self) -> Result<()> {
        match self.state {
            State::Standalone => {
                self.state = State::Replicating;
                Ok(())
            }
            _ => Err(self.invalid("start_replication")),
        }
    }

    /// Starts an initial sync; replication of single writes follows on its own once `poll_outgoing` yields
    /// [`Outgoing::SyncDone`].
    pub fn start_sync(&mut self, sync: InitialSync) -> Result<()> {
        match self.state {
            State::Standalone => {
                self.state = State::Syncing(Box::new(sync));
                Ok(())
            }
            _ => Err(self.invalid("start_sync")),
        }
    }

    fn invalid(&self, event: &'static str) -> Error {
        Error::InvalidState {
            state: self.state.name(),
            event,
        }
    }

    /// A guest write of `data` at `offset`.
    ///
    /// The data reaches the local disk before this returns; the replication record shares `data`'s buffer.
    /// On error nothing was written and nothing queued.
    pub fn write(&mut self, offset: u64, data: Bytes) -> Result<WriteStatus> {
        self.submit(offset, Payload::Data(data))
    }

    /// A guest discard of `len` bytes at `offset`: the range reads as zeros afterwards, here and (once
    /// the [`DiscardRecord`] is applied) on the secondary. Completion and errors as for [`write`](Self::write).
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<WriteStatus> {
        self.submit(offset, Payload::Discard(len))
    }

    fn submit(&mut self, offset: u64, payload: Payload) -> Result<WriteStatus> {
        let len = payload.len();
        check_request(offset, len, self.disk.len())?;
        match &mut self.state {
            State::Standalone => {
                payload.apply_to(&mut self.disk, offset)?;
                Ok(WriteStatus::Completed)
            }
            State::Syncing(sync) => {
                payload.apply_to(&mut self.disk, offset)?;
                sync.note_write(offset, len)?;
                Ok(WriteStatus::Completed)
            }
            State::Replicating => {
                // Only data waits in the queue; a discard record is a few bytes.
                let bytes = payload.queued_bytes();
                let backlog = self.queued_bytes + self.unacked_bytes;
                if backlog + bytes > self.config.max_backlog_bytes {
                    return Err(Error::BacklogFull {
                        backlog,
                        len: bytes,
                        limit: self.config.max_backlog_bytes,
                    });
                }
                self.reserve_epoch_blocks(offset, len)?;
                payload.apply_to(&mut self.disk, offset)?;
                let id = WriteId(self.next_id);
                self.next_id += 1;
                self.queued_bytes += bytes;
                let epoch = self.epoch;
                self.queue.push_back(match payload {
                    Payload::Data(data) => Outgoing::Write(WriteRecord {
                        id,
                        epoch,
                        offset,
                        data,
                    }),
                    Payload::Discard(len) => Outgoing::Discard(DiscardRecord {
                        id,
                        epoch,
                        offset,
                        len,
                    }),
                });
                match self.config.mode {
                    CompletionMode::Async => Ok(WriteStatus::Completed),
                    CompletionMode::Sync => {
                        self.unacked.push_back((id, bytes));
                        self.unacked_bytes += bytes;
                        Ok(WriteStatus::AwaitingAck(id))
                    }
                }
            }
        }
    }

    /// Checks the [`EpochLimit`] for a request touching `len` bytes at `offset`, and counts its blocks.
    fn reserve_epoch_blocks(&mut self, offset: u64, len: u64) -> Result<()> {
        let Some(limit) = self.config.epoch_limit else {
            return Ok(());
        };
        if len == 0 {
            return Ok(());
        }
        let bs = limit.block_size.max(1);
        let blocks = offset / bs..=(offset + len - 1) / bs;
        let needed = blocks.clone().filter(|b| !self.epoch_blocks.contains(b)).count();
        let used = self.epoch_blocks.len();
        if used + needed > limit.max_blocks {
            return Err(Error::EpochFull {
                epoch: self.epoch,
                used,
                needed,
                limit: limit.max_blocks,
            });
        }
        self.epoch_blocks.extend(blocks);
        Ok(())
    }

    /// A guest read.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.disk.read_at(offset, buf)
    }

    /// A guest flush: makes the local disk durable.
    pub fn flush(&mut self) -> Result<()> {
        self.disk.flush()
    }

    /// The next item for the transport, in order. During an initial sync this reads the next dirty chunk
    /// from the local disk.
    pub fn poll_outgoing(&mut self) -> Result<Option<Outgoing>> {
        if let Some(out) = self.queue.pop_front() {
            match &out {
                Outgoing::Write(rec) => {
                    self.queued_bytes -= (rec.data.len() as u64).max(RECORD_COST);
                    self.highest_sent = Some(rec.id.0);
                }
                Outgoing::Discard(rec) => {
                    self.queued_bytes -= RECORD_COST;
                    self.highest_sent = Some(rec.id.0);
                }
                Outgoing::Barrier { epoch } => self.last_barrier_sent = Some(*epoch),
                Outgoing::SyncChunk { .. } | Outgoing::SyncDone => {}
            }
            return Ok(Some(out));
        }
        let State::Syncing(sync) = &mut self.state else {
            return Ok(None);
        };
        match sync.next_chunk() {
            Some(chunk) => {
                // Bounded: the chunk size is capped by InitialSync.
                let mut buf = BytesMut::zeroed(chunk.len as usize);
                if let Err(e) = self.disk.read_at(chunk.offset, &mut buf) {
                    sync.requeue(chunk)?;
                    return Err(e);
                }
                Ok(Some(Outgoing::SyncChunk {
                    offset: chunk.offset,
                    data: buf.freeze(),
                }))
            }
            None => {
                self.state = State::Replicating;
                Ok(Some(Outgoing::SyncDone))
            }
        }
    }

    /// Closes the current epoch (the guest is paused for a checkpoint): queues its barrier and returns the
    /// closed epoch. Writes from now on belong to the next epoch.
    pub fn end_epoch(&mut self) -> Result<u64> {
        match self.state {
            State::Replicating => {
                let epoch = self.epoch;
                self.queue.push_back(Outgoing::Barrier { epoch });
                self.epoch += 1;
                self.epoch_blocks.clear();
                Ok(epoch)
            }
            _ => Err(self.invalid("end_epoch")),
        }
    }

    /// True once `poll_outgoing` yielded the barrier of `epoch`: every write of it was handed over.
    pub fn barrier_handed_over(&self, epoch: u64) -> bool {
        self.last_barrier_sent.is_some_and(|e| e >= epoch)
    }

    /// The secondary applied every write up to and including `id`. Returns the writes that complete now
    /// (in Sync mode; always empty in Async mode). A repeated or older ack returns nothing.
    pub fn handle_ack(&mut self, id: WriteId) -> Result<Vec<WriteId>> {
        if self.highest_sent.is_none_or(|h| id.0 > h) {
            return Err(Error::UnknownAck {
                id: id.0,
                highest_sent: self.highest_sent,
            });
        }
        let mut done = Vec::new();
        while let Some(&(front, len)) = self.unacked.front() {
            if front > id {
                break;
            }
            self.unacked.pop_front();
            self.unacked_bytes -= len;
            done.push(front);
        }
        Ok(done)
    }

    /// The secondary is gone (failover of the primary, or an operator stop): drops the queue, returns to
    /// standalone and returns every write that was waiting for an ack, to be completed now.
    pub fn stop_replication(&mut self) -> Vec<WriteId> {
        self.state = State::Standalone;
        self.queue.clear();
        self.queued_bytes = 0;
        self.unacked_bytes = 0;
        // The blocks the lost secondary's overlays held this epoch: a later secondary starts empty.
        self.epoch_blocks.clear();
        self.unacked.drain(..).map(|(id, _)| id).collect()
    }

    /// The current epoch (the one new writes belong to).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Bytes queued for the transport (as counted against the backlog cap).
    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes
    }

    /// Writes waiting for the secondary's acknowledgement (Sync mode).
    pub fn awaiting_ack(&self) -> usize {
        self.unacked.len()
    }

    /// Progress of the initial sync, while one runs.
    pub fn sync_progress(&self) -> Option<SyncProgress> {
        match &self.state {
            State::Syncing(s) => Some(s.progress()),
            _ => None,
        }
    }

    /// True while replicating (not standalone, not syncing).
    pub fn is_replicating(&self) -> bool {
        matches!(self.state, State::Replicating)
    }

    /// The local disk.
    pub fn disk(&self) -> &B {
        &self.disk
    }

    /// The local disk, consuming the primary.
    pub fn into_disk(self) -> B {
        self.disk
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;

    fn primary(mode: CompletionMode) -> PrimaryDisk<MemBackend> {
        let mut p = PrimaryDisk::new(
            MemBackend::new(1 << 16).unwrap(),
            PrimaryConfig {
                mode,
                max_backlog_bytes: 8192,
                epoch_limit: None,
            },
        );
        p.start_replication().unwrap();
        p
    }

    #[test]
    fn async_write_completes_at_once_and_shares_the_buffer() {
        let mut p = primary(CompletionMode::Async);
        let data = Bytes::from(vec![3u8; 4096]);
        assert_eq!(p.write(4096, data.clone()).unwrap(), WriteStatus::Completed);
        let Some(Outgoing::Write(rec)) = p.poll_outgoing().unwrap() else {
            panic!("no record")
        };
        assert_eq!((rec.id, rec.epoch, rec.offset), (WriteId(0), 0, 4096));
        assert_eq!(rec.data.as_ptr(), data.as_ptr(), "record must not copy the data");
        let mut buf = vec![0; 4096];
        p.read(4096, &mut buf).unwrap();
        assert_eq!(buf, vec![3; 4096]);
        assert!(p.handle_ack(WriteId(0)).unwrap().is_empty());
    }

    #[test]
    fn sync_writes_complete_on_cumulative_ack_only() {
        let mut p = primary(CompletionMode::Sync);
        for i in 0..3 {
            assert_eq!(
                p.write(i * 512, Bytes::from(vec![1u8; 512])).unwrap(),
                WriteStatus::AwaitingAck(WriteId(i))
            );
        }
        assert!(matches!(
            p.handle_ack(WriteId(0)),
            Err(Error::UnknownAck {
                id: 0,
                highest_sent: None
            })
        ));
        p.poll_outgoing().unwrap();
        p.poll_outgoing().unwrap();
        assert_eq!(p.handle_ack(WriteId(1)).unwrap(), vec![WriteId(0), WriteId(1)]);
        assert!(p.handle_ack(WriteId(1)).unwrap().is_empty());
        assert_eq!(p.awaiting_ack(), 1);
        assert_eq!(p.stop_replication(), vec![WriteId(2)]);
        assert_eq!(
            p.write(0, Bytes::from(vec![2u8; 512])).unwrap(),
            WriteStatus::Completed
        );
        assert!(p.poll_outgoing().unwrap().is_none());
    }

    #[test]
    fn discard_zeroes_locally_and_is_replicated_at_a_small_backlog_cost() {
        let mut p = primary(CompletionMode::Sync);
        p.write(0, Bytes::from(vec![4u8; 1024])).unwrap();
        assert_eq!(p.discard(512, 512).unwrap(), WriteStatus::AwaitingAck(WriteId(1)));
        let mut buf = vec![9u8; 1024];
        p.read(0, &mut buf).unwrap();
        assert_eq!(&buf[..512], &[4; 512]);
        assert_eq!(&buf[512..], &[0; 512]);
        assert_eq!(p.queued_bytes(), 1024 + RECORD_COST);
        assert!(matches!(p.poll_outgoing().unwrap(), Some(Outgoing::Write(_))));
        let rec = DiscardRecord {
            id: WriteId(1),
            epoch: 0,
            offset: 512,
            len: 512,
        };
        assert_eq!(p.poll_outgoing().unwrap(), Some(Outgoing::Discard(rec)));
        assert_eq!(p.handle_ack(WriteId(1)).unwrap(), vec![WriteId(0), WriteId(1)]);
        assert_eq!(p.queued_bytes(), 0);
        assert!(matches!(p.discard(0, 100), Err(Error::Misaligned { .. })));
    }

    #[test]
    fn discards_and_empty_writes_cannot_grow_the_queue_without_bound() {
        // The backlog cap is 8 KiB and nothing drains the queue.
        let mut p = primary(CompletionMode::Async);
        let mut queued = 0u64;
        let err = loop {
            let r = if queued.is_multiple_of(2) {
                p.discard(0, 512)
            } else {
                p.write(0, Bytes::new())
            };
            match r {
                Ok(_) => queued += 1,
                Err(e) => break e,
            }
            assert!(queued <= 8192 / RECORD_COST, "queue grew past the cap");
        };
        assert!(matches!(err, Error::BacklogFull { .. }));
        assert_eq!(queued, 8192 / RECORD_COST);
    }

    #[test]
    fn barrier_follows_every_write_of_its_epoch() {
        let mut p = primary(CompletionMode::Async);
        p.write(0, Bytes::from(vec![1u8; 512])).unwrap();
        assert_eq!(p.end_epoch().unwrap(), 0);
        p.write(512, Bytes::from(vec![2u8; 512])).unwrap();
        assert!(!p.barrier_handed_over(0));
        let items: Vec<Outgoing> = std::iter::from_fn(|| p.poll_outgoing().unwrap()).collect();
        assert!(matches!(&items[0], Outgoing::Write(r) if r.epoch == 0));
        assert_eq!(items[1], Outgoing::Barrier { epoch: 0 });
        assert!(matches!(&items[2], Outgoing::Write(r) if r.epoch == 1));
        assert!(p.barrier_handed_over(0));
    }

    #[test]
    fn backlog_cap_rejects_before_touching_the_disk() {
        let mut p = primary(CompletionMode::Async);
        p.write(0, Bytes::from(vec![1u8; 8192])).unwrap();
        let err = p.write(8192, Bytes::from(vec![9u8; 512])).unwrap_err();
        assert!(matches!(
            err,
            Error::BacklogFull {
                backlog: 8192,
                len: 512,
                limit: 8192
            }
        ));
        let mut buf = vec![0; 512];
        p.read(8192, &mut buf).unwrap();
        assert_eq!(buf, vec![0; 512]);
        assert!(matches!(
            p.write(3, Bytes::from(vec![0u8; 512])),
            Err(Error::Misaligned { .. })
        ));
    }

    #[test]
    fn epoch_limit_refuses_writes_the_secondary_cannot_protect() {
        let limit = EpochLimit {
            block_size: 4096,
            max_blocks: 2,
        };
        let mut p = PrimaryDisk::new(
            MemBackend::new(1 << 16).unwrap(),
            PrimaryConfig {
                epoch_limit: Some(limit),
                ..PrimaryConfig::default()
            },
        );
        p.start_replication().unwrap();
        p.write(0, Bytes::from(vec![1u8; 8192])).unwrap();
        p.write(512, Bytes::from(vec![1u8; 512])).unwrap(); // same blocks: fine
        let err = p.write(8192, Bytes::from(vec![1u8; 512])).unwrap_err();
        assert!(matches!(
            err,
            Error::EpochFull {
                epoch: 0,
                used: 2,
                needed: 1,
                limit: 2
            }
        ));
        p.end_epoch().unwrap();
        p.write(8192, Bytes::from(vec![1u8; 512])).unwrap();
        // The secondary is lost in the middle of a full epoch; a new one (re-protection) starts with empty
        // overlays, so the epoch's count starts again too.
        p.write(16384, Bytes::from(vec![1u8; 512])).unwrap();
        assert!(p.write(24576, Bytes::from(vec![1u8; 512])).is_err());
        p.stop_replication();
        p.start_replication().unwrap();
        p.write(24576, Bytes::from(vec![1u8; 4096])).unwrap();
        p.write(32768, Bytes::from(vec![1u8; 512])).unwrap();
    }

    #[test]
    fn sync_sends_chunks_then_switches_to_records() {
        let mut p = PrimaryDisk::new(MemBackend::new(8192).unwrap(), PrimaryConfig::default());
        p.start_sync(InitialSync::new(8192, 4096).unwrap()).unwrap();
        assert!(matches!(
            p.end_epoch(),
            Err(Error::InvalidState { state: "syncing", .. })
        ));
        p.write(0, Bytes::from(vec![5u8; 512])).unwrap();
        let Some(Outgoing::SyncChunk { offset: 0, data }) = p.poll_outgoing().unwrap() else {
            panic!()
        };
        assert_eq!(&data[..512], &[5; 512]);
        p.write(0, Bytes::from(vec![6u8; 512])).unwrap(); // chunk 0 is dirty again
        assert!(matches!(
            p.poll_outgoing().unwrap(),
            Some(Outgoing::SyncChunk { offset: 4096, .. })
        ));
        let Some(Outgoing::SyncChunk { offset: 0, data }) = p.poll_outgoing().unwrap() else {
            panic!()
        };
        assert_eq!(&data[..512], &[6; 512]);
        assert_eq!(p.poll_outgoing().unwrap(), Some(Outgoing::SyncDone));
        assert!(p.is_replicating());
        p.write(512, Bytes::from(vec![7u8; 512])).unwrap();
        assert!(matches!(p.poll_outgoing().unwrap(), Some(Outgoing::Write(_))));
    }
}
