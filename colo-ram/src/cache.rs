//! Secondary side: the RAM cache and its flush into the SVM's memory at a checkpoint.

use std::ops::Range;

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::PAGE_SIZE;
use crate::bitmap::DirtyBitmap;
use crate::error::RamError;
use crate::log::{DirtyLog, DirtySet};
use crate::pool::{CopyJob, FlushPool};
use crate::ram::{GuestRam, RamLayout};

/// How a flush uses threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushOptions {
    /// Threads copying at once (the calling thread included). 1 copies on the calling thread only. The
    /// helper threads are started by the first parallel flush and parked between flushes.
    pub threads: usize,
    /// Below this many pages a flush stays on the calling thread (waking helpers costs more than it saves).
    pub parallel_threshold_pages: usize,
}

impl Default for FlushOptions {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
        FlushOptions {
            threads,
            parallel_threshold_pages: 2048,
        }
    }
}

/// What a flush did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Pages received from the primary since the last flush.
    pub received_pages: usize,
    /// Pages copied into SVM memory: received pages OR pages the SVM dirtied itself.
    pub flushed_pages: usize,
    /// Threads that copied.
    pub threads: usize,
}

/// The secondary's copy of the primary's guest RAM as of the last checkpoint, plus the pages received since.
///
/// During the initial sync every page goes into both the cache and SVM memory
/// ([`load_initial`](Self::load_initial)). During COLO, pages from the primary go only into the cache and
/// are marked received ([`receive`](Self::receive), [`receive_zero`](Self::receive_zero)). At a
/// checkpoint, [`flush`](Self::flush) copies into SVM memory the union of the received pages and the
/// pages the SVM dirtied itself (they must be rolled back to the primary's state), then clears both.
///
/// It costs one guest RAM (anonymous memory, touched as pages arrive) plus one bit per page; nothing grows
/// with the number of checkpoints.
#[derive(Debug)]
pub struct RamCache {
    layout: RamLayout,
    /// Host view of `mem`, made once (a page receive must not allocate).
    view: GuestRam<'static>,
    mem: GuestMemoryMmap,
    received: DirtySet,
    options: FlushOptions,
    /// Helper threads of parallel flushes, started on the first one and parked in between.
    pool: FlushPool,
}

impl RamCache {
    /// A zeroed cache for guest RAM laid out as `layout`.
    pub fn new(layout: RamLayout, options: FlushOptions) -> Result<Self, RamError> {
        let ranges: Vec<(GuestAddress, usize)> = layout
            .regions()
            .iter()
            .map(|r| {
                usize::try_from(r.len)
                    .map(|len| (GuestAddress(r.gpa), len))
                    .map_err(|_| RamError::UnsupportedRegion {
                        gpa: r.gpa,
                        len: r.len,
                        reason: "larger than the address space",
                    })
            })
            .collect::<Result<_, _>>()?;
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| RamError::CacheAlloc(e.to_string()))?;
        // SAFETY: `mem` is owned by the cache next to the view, never replaced and never handed out
        // mutably, so its mappings outlive every use of the view.
        let view = unsafe { GuestRam::new_detached(&mem)? };
        Ok(RamCache {
            received: DirtySet::new(layout.clone()),
            layout,
            view,
            mem,
            options,
            pool: FlushPool::default(),
        })
    }

    /// Asks the kernel to back the cache with transparent huge pages (`madvise(MADV_HUGEPAGE)` over each
    /// region), so that storing scattered pages and flushing them take fewer TLB misses.
    ///
    /// Call it right after [`new`](Self::new), before the initial sync touches the cache: memory already
    /// touched stays in 4 KiB pages until the kernel's background collapse gets to it. The first touch of
    /// each 2 MiB then costs more (a huge page is zeroed). It has effect only where the host allows THP
    /// (`/sys/kernel/mm/transparent_hugepage/enabled` is `always` or `madvise`); elsewhere the kernel
    /// refuses and this returns the error, and the cache works as before.
    pub fn advise_huge_pages(&self) -> Result<(), RamError> {
        for (i, r) in self.layout.regions().iter().enumerate() {
            let p = self.view.page_ptr(i, 0, r.pages())?;
            // SAFETY: `p` is the page-aligned start of the cache's own anonymous mapping of `r.len` bytes
            // (checked by `page_ptr`); MADV_HUGEPAGE only changes how the kernel backs it, not its contents.
            let rc = unsafe { libc::madvise(p.cast(), r.len as usize, libc::MADV_HUGEPAGE) };
            if rc != 0 {
                return Err(RamError::CacheAlloc(format!(
                    "madvise(MADV_HUGEPAGE) on region {i} at {:#x}: {}",
                    r.gpa,
                    std::io::Error::last_os_error()
                )));
            }
        }
        Ok(())
    }

    /// The guest RAM layout the cache mirrors.
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    /// The cache's own memory (the primary's RAM as of the last checkpoint plus received pages).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Pages received since the last flush.
    pub fn received(&self) -> &DirtySet {
        &self.received
    }

    /// Flush options in force.
    pub fn options(&self) -> FlushOptions {
        self.options
    }

    /// Changes the flush options.
    pub fn set_options(&mut self, options: FlushOptions) {
        self.options = options;
    }

    fn check_data(gpa: u64, data: &[u8]) -> Result<(), RamError> {
        if !gpa.is_multiple_of(PAGE_SIZE as u64) {
            return Err(RamError::Misaligned {
                gpa,
                page_size: PAGE_SIZE,
            });
        }
        if data.is_empty() || !data.len().is_multiple_of(PAGE_SIZE) {
            return Err(RamError::ShortPage {
                gpa,
                len: data.len(),
                page_size: PAGE_SIZE,
            });
        }
        Ok(())
    }

    /// Initial sync: writes whole pages at `gpa` into both the cache and SVM memory `svm`.
    pub fn load_initial(&mut self, svm: &mut GuestRam<'_>, gpa: u64, data: &[u8]) -> Result<(), RamError> {
        Self::check_data(gpa, data)?;
        self.check_ram(svm)?;
        let (region, page) = self.layout.locate(gpa, data.len() as u64)?;
        svm.write_pages(region, page, data)?;
        self.view.write_pages(region, page, data)
    }

    /// Initial sync: zeroes `pages` pages at `gpa` in both the cache and SVM memory `svm`.
    pub fn load_initial_zero(
        &mut self,
        svm: &mut GuestRam<'_>,
        gpa: u64,
        pages: usize,
    ) -> Result<(), RamError> {
        self.check_ram(svm)?;
        let (region, page) = self.locate_pages(gpa, pages)?;
        svm.zero_pages(region, page, pages)?;
        self.view.zero_pages(region, page, pages)
    }

    /// Initial sync done some other way (SVM RAM loaded directly): copies all of `svm` into the cache.
    pub fn fill_from(&mut self, svm: &GuestRam<'_>) -> Result<(), RamError> {
        self.check_ram(svm)?;
        let cache = &self.view;
        for (i, r) in self.layout.regions().iter().enumerate() {
            cache.write_pages(i, 0, svm.pages(i, 0, r.pages())?)?;
        }
        Ok(())
    }

    /// A checkpoint page run from the primary: whole pages at `gpa`, inside one region. They go into the
    /// cache only, and are marked received.
    pub fn receive(&mut self, gpa: u64, data: &[u8]) -> Result<(), RamError> {
        Self::check_data(gpa, data)?;
        let (region, page) = self.layout.locate(gpa, data.len() as u64)?;
        self.view.write_pages(region, page, data)?;
        self.mark(region, page..page + data.len() / PAGE_SIZE)
    }

    /// A zero-page marker from the primary: `pages` zero pages at `gpa`, cache only, marked received.
    pub fn receive_zero(&mut self, gpa: u64, pages: usize) -> Result<(), RamError> {
        let (region, page) = self.locate_pages(gpa, pages)?;
        self.view.zero_pages(region, page, pages)?;
        self.mark(region, page..page + pages)
    }

    fn mark(&mut self, region: usize, pages: Range<usize>) -> Result<(), RamError> {
        match self.received.region_mut(region) {
            Some(map) => map.set_range(pages),
            None => Err(RamError::LayoutMismatch(format!("no region {region}"))),
        }
    }

    fn locate_pages(&self, gpa: u64, pages: usize) -> Result<(usize, usize), RamError> {
        let len = (pages as u64).checked_mul(PAGE_SIZE as u64).filter(|&l| l > 0);
        let len = len.ok_or(RamError::ShortPage {
            gpa,
            len: 0,
            page_size: PAGE_SIZE,
        })?;
        self.layout.locate(gpa, len)
    }

    fn check_ram(&self, svm: &GuestRam<'_>) -> Result<(), RamError> {
        if svm.shares_memory_with(&self.view) {
            // A view of the cache's own memory (a clone of `memory()`): copying between them would
            // overlap, and reading one while writing the other would alias.
            Err(RamError::LayoutMismatch(
                "SVM memory is the RAM cache's own memory".to_owned(),
            ))
        } else if svm.layout() == &self.layout {
            Ok(())
        } else {
            Err(RamError::LayoutMismatch(format!(
                "SVM memory is {:?}, the cache mirrors {:?}",
                svm.layout(),
                self.layout
            )))
        }
    }

    /// Checkpoint commit on the secondary, with the SVM paused.
    ///
    /// Takes the SVM's own dirty log (`svm_log`, typically KVM OR vm-memory, tracking `svm`) into the
    /// received set, copies every page of that union from the cache into `svm` run by run (across
    /// [`FlushOptions::threads`] threads for large sets), and clears the set. Afterwards `svm` equals the
    /// primary's RAM at this checkpoint.
    pub fn flush<L: DirtyLog + ?Sized>(
        &mut self,
        svm: &mut GuestRam<'_>,
        svm_log: &mut L,
    ) -> Result<FlushStats, RamError> {
        self.check_ram(svm)?;
        let received_pages = self.received.count();
        svm_log.take_into(&mut self.received)?;
        let cache = &self.view;
        let pool = &mut self.pool;
        let mut stats = FlushStats {
            received_pages,
            flushed_pages: 0,
            threads: 1,
        };
        for (i, map) in self.received.regions().iter().enumerate() {
            let pages = map.count();
            stats.flushed_pages += pages;
            let threads = if pages >= self.options.parallel_threshold_pages {
                self.options.threads
            } else {
                1
            };
            stats.threads = stats.threads.max(copy_region(pool, cache, svm, i, map, threads)?);
        }
        self.received.clear();
        Ok(stats)
    }
}

/// Work items per flush thread (balanced by page count, claimed dynamically).
const PARTS_PER_THREAD: usize = 8;

/// Copies the pages marked in `map` (region `region`) from `src` to `dst`, on up to `threads` threads (the
/// calling thread and pool helpers). Returns the number of threads used.
fn copy_region(
    pool: &mut FlushPool,
    src: &GuestRam<'_>,
    dst: &GuestRam<'_>,
    region: usize,
    map: &DirtyBitmap,
    threads: usize,
) -> Result<usize, RamError> {
    let parts = if threads > 1 {
        // Several parts per thread, claimed dynamically: the calling thread starts at once, and a helper
        // that the scheduler wakes late simply takes fewer parts.
        map.balanced_word_ranges(threads * PARTS_PER_THREAD)
    } else {
        Vec::new()
    };
    if parts.len() <= 1 {
        for run in map.runs() {
            copy_run(src, dst, region, run)?;
        }
        return Ok(1);
    }
    let pages = map.len();
    let from = src.page_ptr(region, 0, pages)?;
    let to = dst.page_ptr(region, 0, pages)?;
    // SAFETY: both pointers start `pages` pages of their region's mapping (checked by `page_ptr`); the
    // cache and the SVM memory are distinct mappings (`check_ram`), the SVM is paused and `dst` is borrowed
    // mutably by the flush, so nothing else writes it until `run` returns, which waits for every helper.
    let job = unsafe { CopyJob::new(from, to, pages * PAGE_SIZE, map.clone(), parts) };
    pool.run(job, threads - 1)
}

#[inline]
fn copy_run(
    src: &GuestRam<'_>,
    dst: &GuestRam<'_>,
    region: usize,
    run: Range<usize>,
) -> Result<(), RamError> {
    let from = src.page_ptr(region, run.start, run.len())?;
    let to = dst.page_ptr(region, run.start, run.len())?;
    // SAFETY: both ranges are `run.len()` pages inside their region's mapping (checked by `page_ptr`). The
    // cache and the SVM memory are distinct mappings, so they do not overlap. Threads of one flush copy
    // disjoint page ranges (disjoint bitmap words), and the SVM is paused, so nothing else writes `to`.
    unsafe { std::ptr::copy_nonoverlapping(from, to, run.len() * PAGE_SIZE) };
    Ok(())
}
