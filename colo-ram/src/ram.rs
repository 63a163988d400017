//! A flat view of guest RAM: each region's guest address, length and host mapping.

use std::marker::PhantomData;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::PAGE_SIZE;
use crate::error::RamError;

/// Where one region of guest RAM lives in the guest's physical address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionLayout {
    /// First guest physical address.
    pub gpa: u64,
    /// Length in bytes, a whole number of pages.
    pub len: u64,
}

impl RegionLayout {
    /// Number of pages in the region.
    pub fn pages(&self) -> usize {
        (self.len / PAGE_SIZE as u64) as usize
    }

    /// One past the last guest physical address.
    pub fn end(&self) -> u64 {
        self.gpa + self.len
    }
}

/// The guest RAM layout: regions in ascending, non-overlapping order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamLayout {
    regions: Vec<RegionLayout>,
}

impl RamLayout {
    /// Builds a layout, checking alignment, order and overlap.
    pub fn new(regions: Vec<RegionLayout>) -> Result<Self, RamError> {
        let mut prev_end = 0u64;
        for (i, r) in regions.iter().enumerate() {
            if r.gpa % PAGE_SIZE as u64 != 0 || r.len % PAGE_SIZE as u64 != 0 || r.len == 0 {
                return Err(RamError::UnsupportedRegion {
                    gpa: r.gpa,
                    len: r.len,
                    reason: "start and length must be non-zero whole pages",
                });
            }
            if r.gpa.checked_add(r.len).is_none() || (i > 0 && r.gpa < prev_end) {
                return Err(RamError::UnsupportedRegion {
                    gpa: r.gpa,
                    len: r.len,
                    reason: "regions must be ascending and must not overlap",
                });
            }
            prev_end = r.end();
        }
        Ok(RamLayout { regions })
    }

    /// The layout of a vm-memory guest memory.
    pub fn of<M: GuestMemoryBackend>(mem: &M) -> Result<Self, RamError> {
        Self::new(
            mem.iter()
                .map(|r| RegionLayout {
                    gpa: r.start_addr().0,
                    len: r.len(),
                })
                .collect(),
        )
    }

    /// The regions.
    pub fn regions(&self) -> &[RegionLayout] {
        &self.regions
    }

    /// Total bytes of RAM.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Total pages of RAM.
    pub fn total_pages(&self) -> usize {
        self.regions.iter().map(RegionLayout::pages).sum()
    }

    /// Finds the region and page index of a page-aligned range `gpa..gpa+len` that must lie in one region.
    pub fn locate(&self, gpa: u64, len: u64) -> Result<(usize, usize), RamError> {
        if !gpa.is_multiple_of(PAGE_SIZE as u64) {
            return Err(RamError::Misaligned {
                gpa,
                page_size: PAGE_SIZE,
            });
        }
        let idx = self.regions.partition_point(|r| r.end() <= gpa);
        match self.regions.get(idx) {
            Some(r) if r.gpa <= gpa && gpa.checked_add(len).is_some_and(|e| e <= r.end()) => {
                Ok((idx, ((gpa - r.gpa) / PAGE_SIZE as u64) as usize))
            }
            _ => Err(RamError::OutOfRange { gpa, len }),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct HostRegion {
    pub(crate) layout: RegionLayout,
    pub(crate) host: *mut u8,
}

/// Guest RAM seen as host mappings, borrowed from a vm-memory [`GuestMemoryBackend`].
///
/// The primary reads pages out of it, the secondary's RAM cache flushes pages into it. Writes made through
/// this view bypass vm-memory's dirty bitmap on purpose: a flush must not show up as the SVM dirtying its
/// own memory.
///
/// Writers take `&mut GuestRam`, so page slices borrowed from a view (a [`Collection`](crate::Collection))
/// cannot be alive while the same view is written. As in every VMM, the guest itself (through KVM) may
/// change bytes behind a borrowed slice while its vCPUs run; the dirty log then reports the page again.
#[derive(Debug)]
pub struct GuestRam<'m> {
    layout: RamLayout,
    regions: Vec<HostRegion>,
    _mem: PhantomData<&'m ()>,
}

// SAFETY: `GuestRam` only holds raw pointers into mappings owned by the borrowed guest memory (alive for
// 'm), which vm-memory itself shares across threads (`GuestMemoryMmap` is Send + Sync). Every access through
// them is bounds checked against the layout.
unsafe impl Send for GuestRam<'_> {}
// SAFETY: as for `Send`; shared access only reads or copies into disjoint pages (see `RamCache::flush`).
unsafe impl Sync for GuestRam<'_> {}

impl GuestRam<'static> {
    /// Like [`GuestRam::new`], without tying the view's lifetime to `mem` (for a struct owning both).
    ///
    /// # Safety
    ///
    /// The caller keeps every region mapping of `mem` alive, and unmapped by nobody else, for as long as the
    /// returned view is used. (vm-memory mappings live on the heap: moving `mem` does not move them.)
    pub(crate) unsafe fn new_detached<M: GuestMemoryBackend>(mem: &M) -> Result<Self, RamError> {
        let GuestRam { layout, regions, .. } = GuestRam::new(mem)?;
        Ok(GuestRam {
            layout,
            regions,
            _mem: PhantomData,
        })
    }
}

impl<'m> GuestRam<'m> {
    /// Borrows the host mappings of every region of `mem`.
    pub fn new<M: GuestMemoryBackend>(mem: &'m M) -> Result<Self, RamError> {
        let layout = RamLayout::of(mem)?;
        let mut regions = Vec::with_capacity(layout.regions().len());
        for (r, l) in mem.iter().zip(layout.regions()) {
            let no_mapping = |reason| RamError::UnsupportedRegion {
                gpa: l.gpa,
                len: l.len,
                reason,
            };
            // Take the pointer from a volatile slice of the whole region, not from `get_host_address`: a
            // region implementation vouches for a `VolatileSlice` with `unsafe` code (valid for its length),
            // whereas `get_host_address` is a safe method any implementation may get wrong.
            let slice = r
                .as_volatile_slice()
                .map_err(|_| no_mapping("region has no host mapping"))?;
            if slice.len() as u64 != l.len {
                return Err(no_mapping("host mapping shorter than the region"));
            }
            let host = slice.ptr_guard_mut().as_ptr();
            regions.push(HostRegion { layout: *l, host });
        }
        Ok(GuestRam {
            layout,
            regions,
            _mem: PhantomData,
        })
    }

    /// The layout of this memory.
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    /// Whether any region of `self` shares host memory with any region of `other` (two views of one
    /// mapping, for instance of a cloned `GuestMemoryMmap`).
    pub(crate) fn shares_memory_with(&self, other: &GuestRam<'_>) -> bool {
        let span = |r: &HostRegion| {
            let start = r.host as usize;
            start..start.saturating_add(r.layout.len as usize)
        };
        self.regions.iter().any(|a| {
            let a = span(a);
            other.regions.iter().any(|b| {
                let b = span(b);
                a.start < b.end && b.start < a.end
            })
        })
    }

    /// Host pointer to page `page` of region `region`, checked against the layout.
    pub(crate) fn page_ptr(&self, region: usize, page: usize, pages: usize) -> Result<*mut u8, RamError> {
        let r = self
            .regions
            .get(region)
            .ok_or(RamError::OutOfRange { gpa: 0, len: 0 })?;
        if page.checked_add(pages).is_none_or(|e| e > r.layout.pages()) {
            return Err(RamError::OutOfRange {
                gpa: r
                    .layout
                    .gpa
                    .saturating_add((page as u64).saturating_mul(PAGE_SIZE as u64)),
                len: (pages as u64).saturating_mul(PAGE_SIZE as u64),
            });
        }
        // SAFETY: `page + pages` is within the region (checked above), so the offset stays inside the
        // region's mapping.
        Ok(unsafe { r.host.add(page * PAGE_SIZE) })
    }

    /// Borrows `pages` pages of guest RAM starting at page `page` of region `region` as bytes.
    ///
    /// The guest may change these bytes while its vCPUs run (pre-copy); the dirty log then reports the page
    /// again and it is re-sent. With the vCPUs paused the bytes are a consistent snapshot.
    pub(crate) fn pages(&self, region: usize, page: usize, pages: usize) -> Result<&[u8], RamError> {
        let p = self.page_ptr(region, page, pages)?;
        // SAFETY: `p .. p + pages * PAGE_SIZE` lies inside a live mapping borrowed for 'm (checked by
        // `page_ptr`). Guest RAM is plain bytes, valid for any bit pattern. Concurrent writers are only the
        // guest (through KVM's own mapping, outside this program's memory model) and the VMM's device
        // emulation, which the caller pauses before a checkpoint.
        Ok(unsafe { std::slice::from_raw_parts(p, pages * PAGE_SIZE) })
    }

    /// Copies whole pages `data` into region `region` from page `page` on.
    pub(crate) fn write_pages(&self, region: usize, page: usize, data: &[u8]) -> Result<(), RamError> {
        let p = self.page_ptr(region, page, data.len().div_ceil(PAGE_SIZE))?;
        // SAFETY: the destination lies inside the region's mapping (checked by `page_ptr`, rounding up);
        // `data` is a Rust slice that cannot alias guest RAM mutably.
        unsafe { std::ptr::copy(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// Zeroes `pages` pages of region `region` from page `page` on.
    pub(crate) fn zero_pages(&self, region: usize, page: usize, pages: usize) -> Result<(), RamError> {
        let p = self.page_ptr(region, page, pages)?;
        // SAFETY: the range lies inside the region's mapping (checked by `page_ptr`).
        unsafe { std::ptr::write_bytes(p, 0, pages * PAGE_SIZE) };
        Ok(())
    }

    /// Reads `buf.len()` bytes at `gpa` (inside one region) into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), RamError> {
        let (region, off) = self.byte_offset(gpa, buf.len())?;
        // SAFETY: `off .. off + buf.len()` lies inside the region's mapping (checked by `byte_offset`);
        // `buf` is a distinct Rust allocation, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.regions[region].host.add(off), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    fn byte_offset(&self, gpa: u64, len: usize) -> Result<(usize, usize), RamError> {
        let idx = self.layout.regions.partition_point(|r| r.end() <= gpa);
        match self.layout.regions.get(idx) {
            Some(r) if r.gpa <= gpa && gpa.checked_add(len as u64).is_some_and(|e| e <= r.end()) => {
                Ok((idx, (gpa - r.gpa) as usize))
            }
            _ => Err(RamError::OutOfRange { gpa, len: len as u64 }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_rejects_overlap_and_misalignment() {
        let r = |gpa, len| RegionLayout { gpa, len };
        assert!(RamLayout::new(vec![r(0, 0x2000), r(0x1000, 0x1000)]).is_err());
        assert!(RamLayout::new(vec![r(0x10, 0x1000)]).is_err());
        assert!(RamLayout::new(vec![r(0, 0x1800)]).is_err());
        assert!(RamLayout::new(vec![r(u64::MAX - 0xfff, 0x2000)]).is_err());
        let l = RamLayout::new(vec![r(0, 0x2000), r(0x10000, 0x3000)]).unwrap();
        assert_eq!(l.locate(0x11000, 0x2000).unwrap(), (1, 1));
        assert!(matches!(
            l.locate(0x11000, 0x3000),
            Err(RamError::OutOfRange { .. })
        ));
        assert!(matches!(
            l.locate(0x3000, 0x1000),
            Err(RamError::OutOfRange { .. })
        ));
        assert!(matches!(
            l.locate(0x11001, 0x1000),
            Err(RamError::Misaligned { .. })
        ));
        assert!(matches!(
            l.locate(!0xfff, 0x1000),
            Err(RamError::OutOfRange { .. })
        ));
    }
}
