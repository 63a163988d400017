//! The secondary side: [`SecondaryDisk`] keeps the SVM's view (checkpoint image plus its own writes) while
//! the secondary disk follows the primary.
//!
//! # Layers
//!
//! ```text
//!   SVM read:  active overlay  ->  hidden store  ->  secondary disk
//!   SVM write: active overlay (whole blocks; a partial block is read-modify-written from the SVM view)
//!   PVM write: old block -> hidden store (first overwrite per epoch), then the data -> secondary disk
//! ```
//!
//! The primary's writes reach the secondary disk **as they arrive** (as in QEMU), not at the checkpoint:
//! a checkpoint then costs no data movement, only dropping two indexes. The hidden store keeps, for every
//! block the primary overwrote in the current epoch, its content at the last checkpoint; the SVM's reads
//! of such a block come from there. The hidden store is thereby also an undo log: disk minus hidden store
//! is always the last checkpoint image.
//!
//! * [`SecondaryDisk::checkpoint`] (the barrier of the epoch has arrived, so the disk holds every write of
//!   it): flush the disk, drop the hidden store, drop the active overlay. The SVM adopts the PVM's disk.
//! * [`SecondaryDisk::failover`]: the SVM becomes the only copy. The disk must become *checkpoint image plus
//!   SVM writes*: roll back the hidden blocks (the primary's writes of an unfinished epoch), then write the
//!   active overlay into the disk.
//!
//! # States
//!
//! Every transition is in one `match (state, input)` (`SecondaryDisk::step`); an input the current state
//! does not take is [`Error::InvalidState`], [`Error::EpochMismatch`] or [`Error::BarrierMissing`] and
//! changes nothing.
//!
//! | state | takes |
//! |---|---|
//! | syncing ([`new_syncing`](SecondaryDisk::new_syncing)) | `apply_sync_chunk`; `finish_sync` → replicating |
//! | replicating ([`new`](SecondaryDisk::new)) | `apply*`, `svm_*`; `handle_barrier` of the epoch → barrier received; `failover` |
//! | barrier received | `svm_*`, an empty `apply_batch`; `checkpoint` → replicating the next epoch; `failover` |
//! | failover incomplete | `svm_read`, `svm_flush`; `failover` again |
//! | failed over | `svm_*`, straight to the disk |
//!
//! A failover that completes leads to failed over; one that fails after its commit point to failover
//! incomplete, before it to where it started. [`SecondaryState`] reports barrier received as replicating.
//!
//! # Crash semantics
//!
//! With both overlays in [`JournalStore`](crate::JournalStore)s on durable media, the secondary disk
//! recovered by [`recover`] after a crash of the secondary host at any point is exactly one of two images:
//!
//! | crash during | image after [`recover`] |
//! |---|---|
//! | an epoch (primary writes arriving) | checkpoint image N (hidden records are flushed before the disk write they protect, and rolled back) |
//! | `checkpoint` of epoch N | image N (old) before the hidden store's generation switch is durable, image N+1 (new) after |
//! | `failover` | image N (old) before the active overlay's `committing` mark is durable, image N + SVM writes (new) after: recovery redoes the rollback and the active write-back, both idempotent |
//!
//! The commit points are single-sector superblock writes, each followed by a flush, in the journal's A/B
//! superblock scheme (a torn superblock leaves the previous one valid). With [`MemStore`](crate::MemStore)
//! overlays a crash loses the overlays; the secondary disk is then a mix of image N and part of epoch N, and
//! must be brought back with an initial sync (as it must anyway, since the primary went on without it).
//!
//! The primary's side of the contract is in [`primary`](crate::primary): it completes no write that is not
//! on its own disk.
//!
//! # Acknowledgements
//!
//! [`SecondaryDisk::last_applied`] is the id to acknowledge after `apply`/`apply_batch` returns: the write
//! is on the secondary disk (in its cache; durable at the next checkpoint's flush) and protected by the
//! hidden store. That is what protocol C's completion means here.

use crate::backend::{BlockBackend, check_request};
use crate::error::{Error, Result};
use crate::primary::{DiscardRecord, WriteId, WriteRecord};

/// A replicated request from the primary: a write or a discard.
trait Replicated {
    fn id(&self) -> WriteId;
    fn epoch(&self) -> u64;
    fn offset(&self) -> u64;
    fn len(&self) -> u64;
    fn apply_to<D: BlockBackend>(&self, disk: &mut D) -> Result<()>;
}

impl Replicated for WriteRecord {
    fn id(&self) -> WriteId {
        self.id
    }
    fn epoch(&self) -> u64 {
        self.epoch
    }
    fn offset(&self) -> u64 {
        self.offset
    }
    fn len(&self) -> u64 {
        self.data.len() as u64
    }
    fn apply_to<D: BlockBackend>(&self, disk: &mut D) -> Result<()> {
        disk.write_at(self.offset, &self.data)
    }
}

impl Replicated for DiscardRecord {
    fn id(&self) -> WriteId {
        self.id
    }
    fn epoch(&self) -> u64 {
        self.epoch
    }
    fn offset(&self) -> u64 {
        self.offset
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn apply_to<D: BlockBackend>(&self, disk: &mut D) -> Result<()> {
        disk.discard(self.offset, self.len)
    }
}
use crate::store::OverlayStore;

/// Where a [`SecondaryDisk`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecondaryState {
    /// Receiving the initial sync; no SVM runs.
    Syncing,
    /// Following the primary; the SVM runs on the overlays.
    Replicating,
    /// A failover commit started and failed; SVM reads still work, `failover` may be retried.
    FailoverIncomplete,
    /// Failed over: the disk is the SVM's own, reads and writes go straight to it.
    FailedOver,
}

/// Where a [`SecondaryDisk`] stands, in more detail than [`SecondaryState`]: while replicating, whether
/// the current epoch's barrier has arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Syncing,
    Replicating { barrier: bool },
    FailoverIncomplete,
    FailedOver,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Syncing => "syncing",
            State::Replicating { barrier: false } => "replicating",
            State::Replicating { barrier: true } => "barrier received",
            State::FailoverIncomplete => "failover-incomplete",
            State::FailedOver => "failed-over",
        }
    }

    fn public(self) -> SecondaryState {
        match self {
            State::Syncing => SecondaryState::Syncing,
            State::Replicating { .. } => SecondaryState::Replicating,
            State::FailoverIncomplete => SecondaryState::FailoverIncomplete,
            State::FailedOver => SecondaryState::FailedOver,
        }
    }
}

/// Everything that can happen to a [`SecondaryDisk`] and change it: each public method that may change
/// the secondary feeds one of these to [`SecondaryDisk::step`]. (The SVM's reads change nothing; see
/// [`SecondaryDisk::svm_read`].)
#[derive(Debug, Clone, Copy)]
enum Input<'a> {
    SyncChunk { offset: u64, data: &'a [u8] },
    FinishSync { epoch: u64 },
    Writes(&'a [WriteRecord]),
    Discard(&'a DiscardRecord),
    Barrier { epoch: u64 },
    Checkpoint,
    Failover,
    SvmWrite { offset: u64, data: &'a [u8] },
    SvmFlush,
}

impl Input<'_> {
    fn name(self) -> &'static str {
        match self {
            Input::SyncChunk { .. } => "sync chunk",
            Input::FinishSync { .. } => "finish sync",
            Input::Writes(_) | Input::Discard(_) => "apply",
            Input::Barrier { .. } => "barrier",
            Input::Checkpoint => "checkpoint",
            Input::Failover => "failover",
            Input::SvmWrite { .. } => "svm write",
            Input::SvmFlush => "svm flush",
        }
    }
}

/// What [`recover`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing to do: the disk is a checkpoint image.
    Clean,
    /// An epoch or a checkpoint was interrupted: the primary's writes of the unfinished epoch were rolled
    /// back; the disk is the last checkpoint image.
    RolledBack {
        /// Blocks restored from the hidden store.
        blocks: usize,
    },
    /// A failover commit was interrupted after its commit point and has been completed: the disk is the
    /// last checkpoint image plus the SVM's writes.
    FailoverCompleted {
        /// Blocks of the active overlay written.
        blocks: usize,
    },
}

/// The secondary's disk with its hidden store and active overlay (see the module docs).
#[derive(Debug)]
pub struct SecondaryDisk<D, H, A> {
    disk: D,
    hidden: H,
    active: A,
    block_size: u64,
    state: State,
    epoch: u64,
    last_applied: Option<WriteId>,
    scratch: Vec<u8>,
    /// Buffer for coalesced reads of old blocks (grows up to `MAX_READ_RUN`).
    run_buf: Vec<u8>,
}

/// Largest single read when saving old blocks into the hidden store.
const MAX_READ_RUN: usize = 1 << 20;

fn check_geometry<D: BlockBackend, H: OverlayStore, A: OverlayStore>(
    disk: &D,
    hidden: &H,
    active: &A,
) -> Result<u64> {
    let bs = hidden.block_size() as u64;
    if active.block_size() as u64 != bs {
        return Err(Error::Mismatch {
            what: "overlay block size",
            expected: bs,
            found: active.block_size() as u64,
        });
    }
    if !disk.len().is_multiple_of(bs) {
        return Err(Error::Mismatch {
            what: "disk length modulo block size",
            expected: 0,
            found: disk.len() % bs,
        });
    }
    Ok(bs)
}

/// Copies every block of `store` (except those `skip` holds) into `disk`, checking indexes.
fn write_back<D: BlockBackend, S: OverlayStore>(
    disk: &mut D,
    store: &S,
    skip: Option<&dyn Fn(u64) -> bool>,
    scratch: &mut [u8],
) -> Result<usize> {
    let bs = scratch.len() as u64;
    let blocks = disk.len() / bs;
    let mut n = 0;
    for b in store.blocks() {
        if skip.is_some_and(|s| s(b)) {
            continue;
        }
        if b >= blocks {
            return Err(Error::CorruptJournal {
                reason: "block index beyond the disk",
                slot: None,
            });
        }
        if store.read(b, 0, scratch)? {
            disk.write_at(b * bs, scratch)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Failover commit from its commit point on (the active overlay is durably marked committing): roll back
/// the hidden blocks, drop the hidden store, write back the active overlay, drop it. Idempotent.
fn finish_failover<D: BlockBackend, H: OverlayStore, A: OverlayStore>(
    disk: &mut D,
    hidden: &mut H,
    active: &mut A,
    scratch: &mut [u8],
) -> Result<usize> {
    let in_active = |b| active.contains(b);
    write_back(disk, hidden, Some(&in_active), scratch)?;
    disk.flush()?;
    hidden.clear()?;
    hidden.sync()?;
    let n = write_back(disk, active, None, scratch)?;
    disk.flush()?;
    // Durable before the disk is used directly: a later recovery must not write these blocks again.
    active.clear()?;
    active.sync()?;
    Ok(n)
}

/// Crash recovery of a secondary disk and its (journal) overlays, to run on open before anything else.
///
/// Afterwards both overlays are empty and the disk is a complete image (see the module docs for which).
pub fn recover<D: BlockBackend, H: OverlayStore, A: OverlayStore>(
    disk: &mut D,
    hidden: &mut H,
    active: &mut A,
) -> Result<Recovery> {
    let bs = check_geometry(disk, hidden, active)?;
    let mut scratch = vec![0u8; bs as usize];
    if active.is_committing() {
        let blocks = finish_failover(disk, hidden, active, &mut scratch)?;
        return Ok(Recovery::FailoverCompleted { blocks });
    }
    let mut result = Recovery::Clean;
    if !hidden.is_empty() {
        let blocks = write_back(disk, hidden, None, &mut scratch)?;
        disk.flush()?;
        hidden.clear()?;
        hidden.sync()?;
        result = Recovery::RolledBack { blocks };
    }
    if !active.is_empty() {
        active.clear()?;
        active.sync()?;
    }
    Ok(result)
}

impl<D: BlockBackend, H: OverlayStore, A: OverlayStore> SecondaryDisk<D, H, A> {
    /// A secondary whose disk already equals the primary's, replicating from `epoch`. The overlays must
    /// be empty (run [`recover`] on journals first).
    pub fn new(disk: D, hidden: H, active: A, epoch: u64) -> Result<Self> {
        Self::build(disk, hidden, active, epoch, State::Replicating { barrier: false })
    }

    /// A secondary about to receive an initial sync.
    pub fn new_syncing(disk: D, hidden: H, active: A) -> Result<Self> {
        Self::build(disk, hidden, active, 0, State::Syncing)
    }

    fn build(disk: D, hidden: H, active: A, epoch: u64, state: State) -> Result<Self> {
        let block_size = check_geometry(&disk, &hidden, &active)?;
        if !hidden.is_empty() || !active.is_empty() || active.is_committing() {
            return Err(Error::InvalidState {
                state: "overlays not empty",
                event: "new (run recover first)",
            });
        }
        Ok(SecondaryDisk {
            disk,
            hidden,
            active,
            block_size,
            state,
            epoch,
            last_applied: None,
            scratch: vec![0; block_size as usize],
            run_buf: Vec::new(),
        })
    }

    /// Every state transition of the secondary, in one place: the current state and the input decide what
    /// happens. An input that makes no sense in the state is an error ([`Error::InvalidState`],
    /// [`Error::EpochMismatch`], [`Error::BarrierMissing`]) and changes nothing. An I/O error part-way
    /// leaves the state the input started in, except a failover past its commit point, which leaves
    /// [`SecondaryState::FailoverIncomplete`].
    ///
    /// Returns the number of active-overlay blocks written into the disk (non-zero only for a failover).
    fn step(&mut self, input: Input<'_>) -> Result<usize> {
        use Input as I;
        match (self.state, input) {
            // The initial sync: the primary's content straight into the disk.
            (State::Syncing, I::SyncChunk { offset, data }) => self.disk.write_at(offset, data)?,
            (State::Syncing, I::FinishSync { epoch }) => {
                self.disk.flush()?;
                self.state = State::Replicating { barrier: false };
                self.epoch = epoch;
            }

            // An epoch: the primary's writes, then its barrier, then the checkpoint that closes it.
            (State::Replicating { barrier: false }, I::Writes(records)) => self.apply_records(records)?,
            (State::Replicating { barrier: false }, I::Discard(record)) => {
                self.apply_records(std::slice::from_ref(record))?
            }
            // An empty batch applies nothing, whenever it comes.
            (State::Replicating { barrier: true }, I::Writes([])) => {}
            (State::Replicating { barrier: false }, I::Barrier { epoch }) if epoch != self.epoch => {
                return Err(Error::EpochMismatch {
                    expected: self.epoch,
                    found: epoch,
                });
            }
            (State::Replicating { barrier: false }, I::Barrier { .. }) => {
                self.state = State::Replicating { barrier: true }
            }
            (State::Replicating { barrier: false }, I::Checkpoint) => {
                return Err(Error::BarrierMissing { epoch: self.epoch });
            }
            (State::Replicating { barrier: true }, I::Checkpoint) => {
                self.commit_checkpoint()?;
                self.epoch += 1;
                self.state = State::Replicating { barrier: false };
            }

            // Failover, which may be retried until it completes.
            (State::Replicating { .. } | State::FailoverIncomplete, I::Failover) => {
                return match self.commit_failover() {
                    Ok(n) => {
                        self.state = State::FailedOver;
                        Ok(n)
                    }
                    Err(e) => {
                        if self.active.is_committing() {
                            self.state = State::FailoverIncomplete;
                        }
                        Err(e)
                    }
                };
            }

            // The SVM's writes and flushes: to the active overlay, or to the disk once failed over. While a
            // failover is incomplete the SVM may read and flush, not write.
            (State::Replicating { .. }, I::SvmWrite { offset, data }) => self.write_active(offset, data)?,
            (State::FailedOver, I::SvmWrite { offset, data }) => self.disk.write_at(offset, data)?,
            (State::Replicating { .. } | State::FailoverIncomplete, I::SvmFlush) => self.active.sync()?,
            (State::FailedOver, I::SvmFlush) => self.disk.flush()?,

            (state, input) => {
                return Err(Error::InvalidState {
                    state: state.name(),
                    event: input.name(),
                });
            }
        }
        Ok(0)
    }

    /// Initial sync: the primary's content at `offset`.
    pub fn apply_sync_chunk(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.step(Input::SyncChunk { offset, data }).map(drop)
    }

    /// Initial sync finished: flushes the disk and starts replicating at `epoch`.
    pub fn finish_sync(&mut self, epoch: u64) -> Result<()> {
        self.step(Input::FinishSync { epoch }).map(drop)
    }

    /// Applies one of the primary's writes. See [`apply_batch`](Self::apply_batch).
    pub fn apply(&mut self, record: &WriteRecord) -> Result<()> {
        self.apply_batch(std::slice::from_ref(record))
    }

    /// Applies the primary's writes in order, protecting the SVM's view with the hidden store.
    ///
    /// Every record is checked first (epoch, alignment, range) and the hidden store's room for the whole
    /// batch; on such an error nothing changed. One hidden-store sync covers the batch.
    ///
    /// A full hidden store is [`Error::OverlayFull`] with `store: "hidden"`. It cannot be cured by a
    /// checkpoint (the checkpoint needs this very write first), so the primary prevents it: configure its
    /// [`EpochLimit`](crate::EpochLimit) with this store's block size and capacity, and it refuses a guest
    /// write that would overflow the store before anything is sent ([`Error::EpochFull`]). If it happens
    /// anyway the pair has diverged from that contract: stop replicating and resync.
    pub fn apply_batch(&mut self, records: &[WriteRecord]) -> Result<()> {
        self.step(Input::Writes(records)).map(drop)
    }

    /// Applies one of the primary's discards, protecting the SVM's view like a write.
    pub fn apply_discard(&mut self, record: &DiscardRecord) -> Result<()> {
        self.step(Input::Discard(record)).map(drop)
    }

    /// Applies records in the replicating state, before the barrier (see `apply_batch`).
    fn apply_records<R: Replicated>(&mut self, records: &[R]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let bs = self.block_size;
        let (used, capacity) = (self.hidden.len(), self.hidden.capacity());
        // The peer chooses the ranges (a discard may span the whole disk): never list more than twice the
        // hidden store's room, so this list stays bounded by its capacity, not by the request.
        let room = capacity.saturating_sub(used);
        let full = |needed| Error::OverlayFull {
            store: "hidden",
            used,
            capacity,
            needed,
        };
        let mut new_blocks: Vec<u64> = Vec::new();
        for r in records {
            if r.epoch() != self.epoch {
                return Err(Error::EpochMismatch {
                    expected: self.epoch,
                    found: r.epoch(),
                });
            }
            let (offset, len) = (r.offset(), r.len());
            check_request(offset, len, self.disk.len())?;
            if len == 0 {
                continue;
            }
            for b in offset / bs..=(offset + len - 1) / bs {
                if !self.hidden.contains(b) {
                    new_blocks.push(b);
                    // Deduplicate (blocks repeat across records) only every `room` pushes: amortised cheap.
                    if new_blocks.len() > room.saturating_mul(2) {
                        new_blocks.sort_unstable();
                        new_blocks.dedup();
                        if new_blocks.len() > room {
                            // At least this many; the rest of the request was not counted.
                            return Err(full(new_blocks.len()));
                        }
                    }
                }
            }
        }
        new_blocks.sort_unstable();
        new_blocks.dedup();
        if new_blocks.len() > room {
            return Err(full(new_blocks.len()));
        }
        self.save_old_blocks(&new_blocks)?;
        if !new_blocks.is_empty() {
            self.hidden.sync()?;
        }
        for r in records {
            r.apply_to(&mut self.disk)?;
            self.last_applied = Some(r.id());
        }
        Ok(())
    }

    /// Copies the disk's current content of `blocks` (sorted, distinct) into the hidden store, reading
    /// each run of consecutive blocks with one read of at most [`MAX_READ_RUN`] bytes.
    fn save_old_blocks(&mut self, blocks: &[u64]) -> Result<()> {
        let bs = self.block_size as usize;
        let max_run = (MAX_READ_RUN / bs).max(1);
        let mut i = 0;
        while i < blocks.len() {
            let mut n = 1;
            while i + n < blocks.len() && n < max_run && blocks[i + n] == blocks[i] + n as u64 {
                n += 1;
            }
            if self.run_buf.len() < n * bs {
                self.run_buf.resize(n * bs, 0);
            }
            let buf = &mut self.run_buf[..n * bs];
            self.disk.read_at(blocks[i] * bs as u64, buf)?;
            for (k, data) in buf.chunks_exact(bs).enumerate() {
                self.hidden.put(blocks[i] + k as u64, data)?;
            }
            i += n;
        }
        Ok(())
    }

    /// The id of the last write applied: what the secondary acknowledges (cumulatively).
    pub fn last_applied(&self) -> Option<WriteId> {
        self.last_applied
    }

    /// The primary's barrier of `epoch`: every write of the epoch has been applied.
    pub fn handle_barrier(&mut self, epoch: u64) -> Result<()> {
        self.step(Input::Barrier { epoch }).map(drop)
    }

    /// Commits the checkpoint that closes the current epoch: the SVM adopts the primary's disk. Needs the
    /// epoch's barrier. Returns the new epoch.
    pub fn checkpoint(&mut self) -> Result<u64> {
        self.step(Input::Checkpoint)?;
        Ok(self.epoch)
    }

    /// The checkpoint's I/O (the barrier has arrived, so the disk holds every write of the epoch).
    fn commit_checkpoint(&mut self) -> Result<()> {
        self.disk.flush()?;
        // Commit point: from here the disk no longer rolls back to the previous image.
        self.hidden.clear()?;
        self.hidden.sync()?;
        // The active overlay's drop need not be durable: recovery discards an overlay that is not marked
        // committing.
        self.active.clear()
    }

    /// Fails over: the disk becomes the last checkpoint image plus the SVM's writes, and the SVM's I/O
    /// goes straight to it from now on. Returns the number of active blocks written back.
    ///
    /// On an I/O error the state is [`SecondaryState::FailoverIncomplete`] (SVM reads keep working, writes
    /// are refused) and `failover` may be called again.
    pub fn failover(&mut self) -> Result<usize> {
        self.step(Input::Failover)
    }

    /// The failover's I/O: the commit point, then the rest as recovery would do it.
    fn commit_failover(&mut self) -> Result<usize> {
        self.active.sync()?;
        // Commit point: recovery completes the failover from here on.
        self.active.set_committing()?;
        finish_failover(
            &mut self.disk,
            &mut self.hidden,
            &mut self.active,
            &mut self.scratch,
        )
    }

    /// Reads the SVM's view into `buf`.
    ///
    /// Reads change no state; the state decides which layers serve them.
    pub fn svm_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self.state {
            State::Replicating { .. } | State::FailoverIncomplete => self.read_view(offset, buf),
            State::FailedOver => self.disk.read_at(offset, buf),
            State::Syncing => Err(Error::InvalidState {
                state: self.state.name(),
                event: "svm read",
            }),
        }
    }

    /// Reads through the overlays: active, then hidden, then disk, block by block.
    fn read_view(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_request(offset, buf.len() as u64, self.disk.len())?;
        let bs = self.block_size;
        let len = buf.len();
        let mut pos = 0usize;
        // Start of a run of bytes that come straight from the disk, not yet read.
        let mut disk_run: Option<usize> = None;
        while pos < len {
            let off = offset + pos as u64;
            let (b, in_off) = (off / bs, (off % bs) as usize);
            let n = (bs as usize - in_off).min(len - pos);
            let piece = &mut buf[pos..pos + n];
            let from_overlay = self.active.read(b, in_off, piece)? || self.hidden.read(b, in_off, piece)?;
            if from_overlay {
                if let Some(start) = disk_run.take() {
                    self.disk.read_at(offset + start as u64, &mut buf[start..pos])?;
                }
            } else if disk_run.is_none() {
                disk_run = Some(pos);
            }
            pos += n;
        }
        if let Some(start) = disk_run {
            self.disk.read_at(offset + start as u64, &mut buf[start..])?;
        }
        Ok(())
    }

    /// Writes to the SVM's view. Checks the active overlay's room first; a full overlay is
    /// [`Error::OverlayFull`] with nothing changed.
    pub fn svm_write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.step(Input::SvmWrite { offset, data }).map(drop)
    }

    /// Writes whole blocks into the active overlay, merging a partial block with the SVM's view.
    fn write_active(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        check_request(offset, data.len() as u64, self.disk.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let bs = self.block_size;
        let first = offset / bs;
        let last = (offset + data.len() as u64 - 1) / bs;
        let needed = (first..=last).filter(|&b| !self.active.contains(b)).count();
        let (used, capacity) = (self.active.len(), self.active.capacity());
        if used + needed > capacity {
            return Err(Error::OverlayFull {
                store: "active",
                used,
                capacity,
                needed,
            });
        }
        let mut pos = 0usize;
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = (|| {
            while pos < data.len() {
                let off = offset + pos as u64;
                let (b, in_off) = (off / bs, (off % bs) as usize);
                let n = (bs as usize - in_off).min(data.len() - pos);
                if n == bs as usize {
                    self.active.put(b, &data[pos..pos + n])?;
                } else {
                    self.read_view(b * bs, &mut scratch)?;
                    scratch[in_off..in_off + n].copy_from_slice(&data[pos..pos + n]);
                    self.active.put(b, &scratch)?;
                }
                pos += n;
            }
            Ok(())
        })();
        self.scratch = scratch;
        result
    }

    /// The SVM's flush: makes its writes durable where they live (the active overlay, or the disk after
    /// failover).
    pub fn svm_flush(&mut self) -> Result<()> {
        self.step(Input::SvmFlush).map(drop)
    }

    /// The current state.
    pub fn state(&self) -> SecondaryState {
        self.state.public()
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Block size of the overlays.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// The secondary disk (what the primary's writes reach).
    pub fn disk(&self) -> &D {
        &self.disk
    }

    /// The hidden store.
    pub fn hidden(&self) -> &H {
        &self.hidden
    }

    /// The active overlay.
    pub fn active(&self) -> &A {
        &self.active
    }

    /// Disk, hidden store and active overlay.
    pub fn into_parts(self) -> (D, H, A) {
        (self.disk, self.hidden, self.active)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::backend::MemBackend;
    use crate::fault::{FaultPlan, FaultyBackend};
    use crate::store::{JournalStore, MemStore};

    const BS: usize = 1024;

    fn secondary(hidden: usize, active: usize) -> SecondaryDisk<MemBackend, MemStore, MemStore> {
        SecondaryDisk::new(
            MemBackend::from_vec(vec![0xaa; 16 * BS]).unwrap(),
            MemStore::new(BS, hidden).unwrap(),
            MemStore::new(BS, active).unwrap(),
            0,
        )
        .unwrap()
    }

    fn rec(id: u64, epoch: u64, offset: u64, len: usize, v: u8) -> WriteRecord {
        WriteRecord {
            id: WriteId(id),
            epoch,
            offset,
            data: Bytes::from(vec![v; len]),
        }
    }

    #[test]
    fn epoch_and_barrier_rules_are_enforced() {
        let mut s = secondary(4, 4);
        assert!(matches!(s.checkpoint(), Err(Error::BarrierMissing { epoch: 0 })));
        assert!(matches!(
            s.apply(&rec(0, 1, 0, 512, 1)),
            Err(Error::EpochMismatch {
                expected: 0,
                found: 1
            })
        ));
        assert!(matches!(
            s.handle_barrier(3),
            Err(Error::EpochMismatch {
                expected: 0,
                found: 3
            })
        ));
        assert_eq!(
            s.disk().as_slice()[0],
            0xaa,
            "rejected record must not be applied"
        );
        s.handle_barrier(0).unwrap();
        assert!(matches!(
            s.apply(&rec(0, 0, 0, 512, 1)),
            Err(Error::InvalidState { .. })
        ));
        assert!(matches!(s.handle_barrier(0), Err(Error::InvalidState { .. })));
        assert_eq!(s.checkpoint().unwrap(), 1);
        s.apply(&rec(0, 1, 0, 512, 1)).unwrap();
        assert_eq!(s.last_applied(), Some(WriteId(0)));
    }

    #[test]
    fn full_hidden_store_rejects_the_whole_batch() {
        let mut s = secondary(2, 4);
        let batch = [rec(0, 0, 0, 512, 1), rec(1, 0, 4 * BS as u64, 2 * BS, 2)];
        let err = s.apply_batch(&batch).unwrap_err();
        assert!(matches!(
            err,
            Error::OverlayFull {
                store: "hidden",
                used: 0,
                capacity: 2,
                needed: 3
            }
        ));
        assert!(s.disk().as_slice().iter().all(|&b| b == 0xaa));
        assert!(s.hidden().is_empty());
        assert!(s.last_applied().is_none());
    }

    #[test]
    fn full_active_overlay_rejects_the_write_and_keeps_the_view() {
        let mut s = secondary(4, 2);
        s.svm_write(0, &[1; BS]).unwrap();
        let err = s.svm_write(BS as u64 + 512, &[2; BS]).unwrap_err();
        assert!(matches!(
            err,
            Error::OverlayFull {
                store: "active",
                used: 1,
                capacity: 2,
                needed: 2
            }
        ));
        let mut buf = vec![0; 3 * BS];
        s.svm_read(0, &mut buf).unwrap();
        assert!(buf[..BS].iter().all(|&b| b == 1) && buf[BS..].iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn partial_block_writes_merge_with_the_checkpoint_view() {
        let mut s = secondary(4, 4);
        // The PVM overwrites block 0 entirely; then the SVM writes the second sector of it.
        s.apply(&rec(0, 0, 0, BS, 7)).unwrap();
        s.svm_write(512, &[3; 512]).unwrap();
        let mut buf = vec![0; BS];
        s.svm_read(0, &mut buf).unwrap();
        assert!(
            buf[..512].iter().all(|&b| b == 0xaa),
            "from the hidden store, not the PVM's data"
        );
        assert!(buf[512..].iter().all(|&b| b == 3));
    }

    #[test]
    fn io_and_state_errors_outside_replication() {
        let mut s = SecondaryDisk::new_syncing(
            MemBackend::new(16 * BS as u64).unwrap(),
            MemStore::new(BS, 2).unwrap(),
            MemStore::new(BS, 2).unwrap(),
        )
        .unwrap();
        let mut buf = [0u8; 512];
        assert!(matches!(
            s.svm_read(0, &mut buf),
            Err(Error::InvalidState { state: "syncing", .. })
        ));
        assert!(matches!(s.failover(), Err(Error::InvalidState { .. })));
        s.apply_sync_chunk(0, &[5; 2048]).unwrap();
        s.finish_sync(4).unwrap();
        assert_eq!(s.epoch(), 4);
        assert!(matches!(
            s.apply_sync_chunk(0, &[5; 512]),
            Err(Error::InvalidState { .. })
        ));
        s.failover().unwrap();
        assert_eq!(s.state(), SecondaryState::FailedOver);
        s.svm_write(0, &[9; 512]).unwrap();
        assert_eq!(s.disk().as_slice()[0], 9);
        assert!(matches!(
            s.apply(&rec(0, 4, 0, 512, 1)),
            Err(Error::InvalidState { .. })
        ));
    }

    type Faulty = SecondaryDisk<FaultyBackend<MemBackend>, MemStore, MemStore>;

    /// A replicating secondary whose disk fails as `plan` says, after the PVM wrote block 0 (the hidden
    /// store saves it) and the SVM wrote block 1 (into the active overlay).
    fn replicating_with_data(plan: &FaultPlan) -> Faulty {
        let disk = FaultyBackend::new(MemBackend::from_vec(vec![0xaa; 16 * BS]).unwrap(), plan.clone());
        let mut s = SecondaryDisk::new(
            disk,
            MemStore::new(BS, 4).unwrap(),
            MemStore::new(BS, 4).unwrap(),
            0,
        )
        .unwrap();
        s.apply(&rec(0, 0, 0, BS, 1)).unwrap();
        s.svm_write(BS as u64, &[2; BS]).unwrap();
        s
    }

    #[test]
    fn failed_failover_can_be_retried() {
        let plan = FaultPlan::never();
        let mut s = replicating_with_data(&plan);
        plan.arm(1, false);
        assert!(s.failover().is_err());
        assert_eq!(s.state(), SecondaryState::FailoverIncomplete);
        assert!(matches!(
            s.svm_write(0, &[0; 512]),
            Err(Error::InvalidState { .. })
        ));
        plan.disarm();
        let mut buf = vec![0; 2 * BS];
        s.svm_read(0, &mut buf).unwrap();
        assert!(buf[..BS].iter().all(|&b| b == 0xaa) && buf[BS..].iter().all(|&b| b == 2));
        s.failover().unwrap();
        assert!(s.disk().inner().as_slice()[..BS].iter().all(|&b| b == 0xaa));
        assert!(s.disk().inner().as_slice()[BS..2 * BS].iter().all(|&b| b == 2));
    }

    #[test]
    fn new_refuses_unrecovered_journals_and_recover_checks_indexes() {
        let dev = MemBackend::new(JournalStore::<MemBackend>::required_len(BS, 4)).unwrap();
        let mut j = JournalStore::format(dev, BS).unwrap();
        j.put(1000, &[1; BS]).unwrap();
        let disk = MemBackend::new(16 * BS as u64).unwrap();
        let active = MemStore::new(BS, 2).unwrap();
        let err = SecondaryDisk::new(disk.clone(), j, active, 0).unwrap_err();
        assert!(matches!(err, Error::InvalidState { .. }));
        let dev = MemBackend::new(JournalStore::<MemBackend>::required_len(BS, 4)).unwrap();
        let mut j = JournalStore::format(dev, BS).unwrap();
        j.put(1000, &[1; BS]).unwrap();
        let (mut disk, mut active) = (disk, MemStore::new(BS, 2).unwrap());
        assert!(matches!(
            recover(&mut disk, &mut j, &mut active),
            Err(Error::CorruptJournal { .. })
        ));
        let err = SecondaryDisk::new(
            disk,
            MemStore::new(512, 2).unwrap(),
            MemStore::new(BS, 2).unwrap(),
            0,
        );
        assert!(matches!(err, Err(Error::Mismatch { .. })));
    }

    /// A secondary with data in its disk and overlays, brought into each of its states (the states of the
    /// transition table, with the barrier as a state of its own), and the name of that state.
    fn in_every_state() -> Vec<(&'static str, Faulty)> {
        let replicating = || replicating_with_data(&FaultPlan::never());
        let mut syncing = SecondaryDisk::new_syncing(
            FaultyBackend::new(MemBackend::new(16 * BS as u64).unwrap(), FaultPlan::never()),
            MemStore::new(BS, 4).unwrap(),
            MemStore::new(BS, 4).unwrap(),
        )
        .unwrap();
        syncing.apply_sync_chunk(0, &[3; BS]).unwrap();
        let mut barrier = replicating();
        barrier.handle_barrier(0).unwrap();
        let plan = FaultPlan::never();
        let mut incomplete = replicating_with_data(&plan);
        plan.arm(1, false);
        assert!(incomplete.failover().is_err());
        plan.disarm();
        assert_eq!(incomplete.state(), SecondaryState::FailoverIncomplete);
        let mut failed_over = replicating();
        failed_over.failover().unwrap();
        vec![
            ("syncing", syncing),
            ("replicating", replicating()),
            ("barrier", barrier),
            ("incomplete", incomplete),
            ("failed-over", failed_over),
        ]
    }

    /// Everything observable about a secondary, including its private fields.
    fn snapshot(s: &Faulty) -> String {
        let contents = |store: &MemStore| {
            let mut buf = vec![0; BS];
            store
                .blocks()
                .into_iter()
                .map(|b| {
                    store.read(b, 0, &mut buf).unwrap();
                    (b, buf.clone())
                })
                .collect::<Vec<_>>()
        };
        format!("{s:?} {:?} {:?}", contents(&s.hidden), contents(&s.active))
    }

    /// The transition table: which input each state takes, and that every other input is a typed error
    /// that changes nothing at all.
    #[test]
    fn every_input_in_every_state_is_a_transition_or_a_typed_error_that_changes_nothing() {
        let write = [rec(9, 0, 2 * BS as u64, 512, 5)];
        let discard = DiscardRecord {
            id: WriteId(10),
            epoch: 0,
            offset: 3 * BS as u64,
            len: 512,
        };
        type Op<'a> = (&'a str, Box<dyn Fn(&mut Faulty) -> Result<()> + 'a>);
        let inputs: Vec<Op<'_>> = vec![
            ("sync chunk", Box::new(|s| s.apply_sync_chunk(0, &[4; 512]))),
            ("finish sync", Box::new(|s| s.finish_sync(3))),
            ("apply", Box::new(|s| s.apply_batch(&write))),
            ("apply empty", Box::new(|s| s.apply_batch(&[]))),
            ("discard", Box::new(|s| s.apply_discard(&discard))),
            ("barrier", Box::new(|s| s.handle_barrier(0))),
            ("other barrier", Box::new(|s| s.handle_barrier(7))),
            ("checkpoint", Box::new(|s| s.checkpoint().map(drop))),
            ("failover", Box::new(|s| s.failover().map(drop))),
            ("svm write", Box::new(|s| s.svm_write(0, &[6; 512]))),
            ("svm flush", Box::new(|s| s.svm_flush())),
            ("svm read", Box::new(|s| s.svm_read(0, &mut [0; 512]))),
        ];
        let mut table = Vec::new();
        for (state, _) in in_every_state() {
            let mut row = format!("{state:>11}:");
            for (input, op) in &inputs {
                // A fresh secondary in `state` for every input.
                let mut s = in_every_state()
                    .into_iter()
                    .find(|(name, _)| *name == state)
                    .unwrap()
                    .1;
                let before = snapshot(&s);
                match op(&mut s) {
                    Ok(()) => row.push_str(" ok"),
                    Err(e) => {
                        assert!(
                            matches!(
                                e,
                                Error::InvalidState { .. }
                                    | Error::EpochMismatch { .. }
                                    | Error::BarrierMissing { .. }
                            ),
                            "{state}, {input}: {e}"
                        );
                        assert_eq!(
                            snapshot(&s),
                            before,
                            "{state}, {input}: {e} changed the secondary"
                        );
                        row.push_str(" --");
                    }
                }
            }
            table.push(row);
        }
        // Columns: sync chunk, finish sync, apply, apply empty, discard, barrier, other barrier,
        // checkpoint, failover, svm write, svm flush, svm read.
        assert_eq!(
            table,
            [
                "    syncing: ok ok -- -- -- -- -- -- -- -- -- --",
                "replicating: -- -- ok ok ok ok -- -- ok ok ok ok",
                "    barrier: -- -- -- ok -- -- -- ok ok ok ok ok",
                " incomplete: -- -- -- -- -- -- -- -- ok -- ok ok",
                "failed-over: -- -- -- -- -- -- -- -- -- ok ok ok",
            ]
        );
    }

    /// A disk of any length that reads as zeros and counts writes (nothing is stored).
    struct Huge {
        len: u64,
        writes: usize,
    }

    impl BlockBackend for Huge {
        fn len(&self) -> u64 {
            self.len
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            check_request(offset, buf.len() as u64, self.len)?;
            buf.fill(0);
            Ok(())
        }
        fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
            check_request(offset, data.len() as u64, self.len)?;
            self.writes += 1;
            Ok(())
        }
        fn flush(&mut self) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn whole_disk_discard_is_refused_without_listing_every_block() {
        // 1 TiB of 1 KiB blocks: listing every block would take 8 GiB. The hidden store has room for 3.
        let disk = Huge {
            len: 1 << 40,
            writes: 0,
        };
        let mut s = SecondaryDisk::new(
            disk,
            MemStore::new(BS, 3).unwrap(),
            MemStore::new(BS, 4).unwrap(),
            0,
        )
        .unwrap();
        let discard = DiscardRecord {
            id: WriteId(0),
            epoch: 0,
            offset: 0,
            len: 1 << 40,
        };
        assert!(matches!(
            s.apply_discard(&discard),
            Err(Error::OverlayFull {
                store: "hidden",
                capacity: 3,
                ..
            })
        ));
        assert_eq!(s.disk().writes, 0, "nothing applied");
        assert!(s.hidden().is_empty());
        // Records that repeat the same blocks still fit.
        let small: Vec<WriteRecord> = (0..100).map(|i| rec(i, 0, 0, 3 * BS, 1)).collect();
        s.apply_batch(&small).unwrap();
        assert_eq!(s.hidden().len(), 3);
        assert_eq!(s.disk().writes, 100);
    }
}
