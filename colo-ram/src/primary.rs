//! Primary side: turn the dirty set into page runs to send, with zero-page detection and pre-copy rounds.

use std::ops::Range;

use crate::PAGE_SIZE;
use crate::error::RamError;
use crate::log::{DirtyLog, DirtySet};
use crate::ram::{GuestRam, RamLayout};

/// Whether `page` is all zero bytes.
///
/// ORs 256-byte blocks as `u64` words and stops at the first block that is not zero; a page of data is
/// usually rejected after its first block. (Unaligned `u64` reads of fixed-size chunks: no `unsafe`, and the
/// compiler turns each block into a few vector ORs.)
#[inline]
pub fn is_zero(page: &[u8]) -> bool {
    let (blocks, tail) = page.as_chunks::<256>();
    for block in blocks {
        let (words, _) = block.as_chunks::<8>();
        if words.iter().fold(0, |acc, w| acc | u64::from_ne_bytes(*w)) != 0 {
            return false;
        }
    }
    tail.iter().all(|&b| b == 0)
}

/// One run of dirty pages to send, in ascending guest address order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageRun<'a> {
    /// `data.len() / PAGE_SIZE` consecutive pages starting at `gpa`, borrowed from guest RAM.
    Data {
        /// Guest physical address of the first page.
        gpa: u64,
        /// The pages' bytes, a whole number of pages.
        data: &'a [u8],
    },
    /// `pages` consecutive all-zero pages starting at `gpa`: send a marker, no data. The secondary must
    /// still write them (a page that became zero is as dirty as any other).
    Zero {
        /// Guest physical address of the first page.
        gpa: u64,
        /// Number of zero pages.
        pages: usize,
    },
}

impl PageRun<'_> {
    /// Guest physical address of the first page.
    pub fn gpa(&self) -> u64 {
        match *self {
            PageRun::Data { gpa, .. } | PageRun::Zero { gpa, .. } => gpa,
        }
    }

    /// Number of pages in the run.
    pub fn pages(&self) -> usize {
        match *self {
            PageRun::Data { data, .. } => data.len() / PAGE_SIZE,
            PageRun::Zero { pages, .. } => pages,
        }
    }
}

/// How pages are collected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CollectOptions {
    /// Look for all-zero pages and send them as [`PageRun::Zero`] markers.
    pub detect_zero: bool,
    /// Longest run yielded, in pages (bounds one batch on the wire). At least 1.
    pub max_run_pages: usize,
}

impl Default for CollectOptions {
    fn default() -> Self {
        CollectOptions {
            detect_zero: true,
            max_run_pages: 256,
        }
    }
}

/// Counts from one collection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CollectStats {
    /// Pages yielded with data.
    pub data_pages: usize,
    /// Pages yielded as zero markers.
    pub zero_pages: usize,
    /// Runs yielded.
    pub runs: usize,
}

/// Iterator over the pages of a dirty set as [`PageRun`]s borrowed from guest RAM.
///
/// Made by [`collect`] or [`PrimaryRam::collect`].
pub struct Collection<'r> {
    ram: &'r GuestRam<'r>,
    runs: Box<dyn Iterator<Item = (usize, Range<usize>)> + 'r>,
    cur: Option<(usize, Range<usize>)>,
    /// Zero-ness and CRC of the first page of `cur`, if already read.
    peek: Option<(bool, u32)>,
    /// With [`Collection::with_page_crcs`]: the page checksum, and the checksums of the data pages of the
    /// run being taken.
    crc: Option<fn(&[u8]) -> u32>,
    crcs: Vec<u32>,
    options: CollectOptions,
    stats: CollectStats,
    done: Option<&'r mut bool>,
}

impl std::fmt::Debug for Collection<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collection")
            .field("cur", &self.cur)
            .field("stats", &self.stats)
            .finish()
    }
}

/// Collects the pages of `set` from `ram`. `set` and `ram` must have the same layout.
pub fn collect<'r>(
    set: &'r DirtySet,
    ram: &'r GuestRam<'r>,
    options: CollectOptions,
) -> Result<Collection<'r>, RamError> {
    set.check_layout(ram.layout())?;
    Ok(Collection {
        ram,
        runs: Box::new(set.runs()),
        cur: None,
        peek: None,
        crc: None,
        crcs: Vec::new(),
        options: CollectOptions {
            max_run_pages: options.max_run_pages.max(1),
            ..options
        },
        stats: CollectStats::default(),
        done: None,
    })
}

impl<'r> Collection<'r> {
    /// Counts so far (final once the iterator is exhausted).
    pub fn stats(&self) -> CollectStats {
        self.stats
    }

    /// Also computes `crc(page)` of every data page, in the pass that reads the page to look for zeros, and
    /// hands the checksums out with [`Collection::fill`]. Give it the checksum the wire protocol puts on each
    /// page (colo-proto: `colo_proto::page_crc`, for `Channel::send_pages_with_crcs`). Reading a scattered page
    /// from memory costs far more than hashing it once it is in cache, so taking the checksum here, where
    /// each page is read first, saves the sender a second pass over cold memory. Zero pages are not hashed.
    ///
    /// Call it before taking runs; called later, the page the collection had looked at is read again. While
    /// the guest runs (pre-copy), a page can change between its checksum here and the socket's copy of it;
    /// the receiver then sees a torn page, which the dirty log reports again for the next round. Fill and
    /// send in chunks (as [`Collection::fill`] allows) to keep that window, and the cache footprint, short.
    pub fn with_page_crcs(mut self, crc: fn(&[u8]) -> u32) -> Self {
        if self.crc.is_none() {
            // A page looked at before (its checksum not taken) is read again.
            self.peek = None;
        }
        self.crc = Some(crc);
        self
    }

    /// Takes runs until at least `max_pages` pages (or all that are left) were added, in the shape page
    /// senders take (`Channel::send_pages`): `(gpa, bytes)` for each data run (borrowed from guest RAM),
    /// `(gpa, &[])` for each zero page; with [`Collection::with_page_crcs`] one checksum per data page in
    /// order is appended to `crcs`. A run is never split, so a chunk may exceed `max_pages` by less than one
    /// run ([`CollectOptions::max_run_pages`]). Returns whether the collection is exhausted. On an error
    /// nothing is appended.
    pub fn fill(
        &mut self,
        max_pages: usize,
        entries: &mut Vec<(u64, &'r [u8])>,
        crcs: &mut Vec<u32>,
    ) -> Result<bool, RamError> {
        let (entries_at, crcs_at) = (entries.len(), crcs.len());
        let mut pages = 0;
        while pages < max_pages.max(1) {
            match self.take_run() {
                Ok(Some(PageRun::Data { gpa, data })) => {
                    pages += data.len() / PAGE_SIZE;
                    entries.push((gpa, data));
                    crcs.append(&mut self.crcs);
                }
                Ok(Some(PageRun::Zero { gpa, pages: n })) => {
                    pages += n;
                    entries.extend((0..n as u64).map(|i| (gpa + i * PAGE_SIZE as u64, &[][..])));
                }
                Ok(None) => return Ok(true),
                Err(e) => {
                    entries.truncate(entries_at);
                    crcs.truncate(crcs_at);
                    return Err(e);
                }
            }
        }
        Ok(false)
    }

    /// Reads one page: whether it counts as zero, and with page checksums the checksum of a data page (0
    /// otherwise).
    fn probe(&self, region: usize, page: usize) -> Result<(bool, u32), RamError> {
        let bytes = self.ram.pages(region, page, 1)?;
        let zero = self.options.detect_zero && is_zero(bytes);
        let crc = match self.crc {
            Some(crc) if !zero => crc(bytes),
            _ => 0,
        };
        Ok((zero, crc))
    }

    /// The next run; its data pages' checksums (with page checksums) are in `self.crcs`, replacing the
    /// previous run's. Marks the collection done at its end.
    fn take_run(&mut self) -> Result<Option<PageRun<'r>>, RamError> {
        self.crcs.clear();
        let run = self.next_run();
        if let Ok(None) = run
            && let Some(done) = self.done.take()
        {
            *done = true;
        }
        if run.is_err() {
            self.crcs.clear();
        }
        run
    }

    fn next_run(&mut self) -> Result<Option<PageRun<'r>>, RamError> {
        let (region, range) = loop {
            match self.cur.take() {
                Some((region, range)) if !range.is_empty() => break (region, range),
                _ => match self.runs.next() {
                    Some(next) => {
                        self.cur = Some(next);
                        self.peek = None;
                    }
                    None => return Ok(None),
                },
            }
        };
        let (first_zero, first_crc) = match self.peek.take() {
            Some(p) => p,
            None => self.probe(region, range.start)?,
        };
        if !first_zero && self.crc.is_some() {
            self.crcs.push(first_crc);
        }
        let limit = range.len().min(self.options.max_run_pages);
        let mut len = 1;
        while len < limit {
            let (z, crc) = self.probe(region, range.start + len)?;
            if z != first_zero {
                self.peek = Some((z, crc));
                break;
            }
            if !z && self.crc.is_some() {
                self.crcs.push(crc);
            }
            len += 1;
        }
        let gpa = self.ram.layout().regions()[region].gpa + (range.start * PAGE_SIZE) as u64;
        let run = if first_zero {
            self.stats.zero_pages += len;
            PageRun::Zero { gpa, pages: len }
        } else {
            self.stats.data_pages += len;
            PageRun::Data {
                gpa,
                data: self.ram.pages(region, range.start, len)?,
            }
        };
        self.stats.runs += 1;
        self.cur = Some((region, range.start + len..range.end));
        Ok(Some(run))
    }
}

impl<'r> Iterator for Collection<'r> {
    type Item = Result<PageRun<'r>, RamError>;

    /// The next run. Page checksums ([`Collection::with_page_crcs`]) are handed out by
    /// [`Collection::fill`] only.
    fn next(&mut self) -> Option<Self::Item> {
        self.take_run().transpose()
    }
}

/// When to stop pre-copy rounds and pause the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrecopyPolicy {
    /// Most rounds sent while the guest runs before pausing regardless.
    pub max_rounds: u32,
    /// Pause once no more than this many pages are pending (the pause then sends at most about this many).
    pub pause_below_pages: usize,
}

impl Default for PrecopyPolicy {
    fn default() -> Self {
        PrecopyPolicy {
            max_rounds: 3,
            pause_below_pages: 2048,
        }
    }
}

impl PrecopyPolicy {
    /// Whether to send another round while the guest runs, given the rounds done so far and the pages
    /// pending now (from [`PrimaryRam::take_log`]).
    pub fn another_round(&self, rounds_done: u32, pending_pages: usize) -> bool {
        rounds_done < self.max_rounds && pending_pages > self.pause_below_pages
    }
}

/// The primary's RAM side of COLO: owns the dirty log and the pending dirty set.
///
/// One checkpoint, with optional pre-copy (the guest keeps running during pre-copy rounds):
///
/// ```text
/// let mut rounds = 0;
/// while policy.another_round(rounds, primary.take_log()?) {   // guest running
///     for run in primary.collect(&ram)? { send(run?) }        // sends while the guest writes
///     rounds += 1;
/// }
/// pause vCPUs and device emulation;
/// primary.take_log()?;                                         // only pages written since the last round
/// for run in primary.collect(&ram)? { send(run?) }
/// ```
///
/// KVM (and vm-memory) reset a page's dirty bit before the pages are read, so a page the guest writes while
/// a round is being sent is reported again by the next `take_log` and re-sent while paused.
///
/// A collection that is dropped before it is exhausted (a send failed) leaves its pages pending: the next
/// round sends them again together with the newly dirtied ones. Nothing is lost.
#[derive(Debug)]
pub struct PrimaryRam<L> {
    log: L,
    pending: DirtySet,
    options: CollectOptions,
    /// The last collection ran to the end: its pages were sent.
    sent: bool,
}

impl<L: DirtyLog> PrimaryRam<L> {
    /// A primary over `layout` reading `log` (typically `UnionLog<KvmDirtyLog, AtomicBitmapLog>`).
    pub fn new(layout: RamLayout, log: L, options: CollectOptions) -> Self {
        PrimaryRam {
            log,
            pending: DirtySet::new(layout),
            options,
            sent: false,
        }
    }

    /// Initial sync: resets the log and marks all of guest RAM pending, so the next collection sends
    /// everything and later rounds send only pages written after this call.
    pub fn mark_all(&mut self) -> Result<(), RamError> {
        self.start_round();
        self.log.take_into(&mut self.pending)?;
        self.pending.set_all();
        Ok(())
    }

    fn start_round(&mut self) {
        if self.sent {
            self.pending.clear();
            self.sent = false;
        }
    }

    /// Starts a round: adds the pages written since the last call to the pending set and returns how many
    /// pages are now pending. Pages of a fully sent collection are no longer pending.
    pub fn take_log(&mut self) -> Result<usize, RamError> {
        self.start_round();
        self.log.take_into(&mut self.pending)?;
        Ok(self.pending.count())
    }

    /// The pending pages as runs read from `ram` (the guest RAM the log tracks).
    pub fn collect<'r>(&'r mut self, ram: &'r GuestRam<'r>) -> Result<Collection<'r>, RamError> {
        self.sent = false;
        let mut c = collect(&self.pending, ram, self.options)?;
        c.done = Some(&mut self.sent);
        Ok(c)
    }

    /// A checkpoint with the guest paused: [`take_log`](Self::take_log) then [`collect`](Self::collect).
    pub fn checkpoint<'r>(&'r mut self, ram: &'r GuestRam<'r>) -> Result<Collection<'r>, RamError> {
        self.take_log()?;
        self.collect(ram)
    }

    /// The pages pending for the next collection.
    pub fn pending(&self) -> &DirtySet {
        &self.pending
    }

    /// The dirty log.
    pub fn log_mut(&mut self) -> &mut L {
        &mut self.log
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_finds_a_single_late_byte() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        for pos in [0, 7, 255, 256, 2048, PAGE_SIZE - 1] {
            page[pos] = 1;
            assert!(!is_zero(&page), "byte {pos}");
            page[pos] = 0;
        }
        // Unaligned slices work too.
        assert!(!is_zero(&[0, 0, 0, 1, 0]));
        assert!(is_zero(&[0; 13]));
    }

    #[test]
    fn precopy_policy_pauses_when_small_or_late() {
        let p = PrecopyPolicy {
            max_rounds: 2,
            pause_below_pages: 10,
        };
        assert!(p.another_round(0, 11));
        assert!(!p.another_round(0, 10));
        assert!(!p.another_round(2, 1000));
    }
}
