//! Dirty logs: where the set of pages written since the last checkpoint comes from.
//!
//! A guest's own writes are logged by KVM ([`KvmDirtyLog`](crate::kvm::KvmDirtyLog), feature `kvm`); writes
//! the VMM makes through vm-memory (device emulation, DMA) are logged by vm-memory's [`AtomicBitmap`] and read
//! by [`AtomicBitmapLog`]. KVM never sees the second kind, so a VMM always combines both with [`UnionLog`].

use std::ops::Range;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, MmapRegion};

use crate::PAGE_SIZE;
use crate::bitmap::DirtyBitmap;
use crate::error::RamError;
use crate::ram::{RamLayout, RegionLayout};

/// A set of guest pages, one [`DirtyBitmap`] per region of a [`RamLayout`].
///
/// Allocated once for a layout and reused: checkpoints clear it, never grow it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtySet {
    layout: RamLayout,
    maps: Vec<DirtyBitmap>,
}

impl DirtySet {
    /// An empty set for `layout`.
    pub fn new(layout: RamLayout) -> Self {
        let maps = layout
            .regions()
            .iter()
            .map(|r| DirtyBitmap::new(r.pages()))
            .collect();
        DirtySet { layout, maps }
    }

    /// The layout this set covers.
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    /// The bitmap of region `idx` (layout order).
    pub fn region(&self, idx: usize) -> Option<&DirtyBitmap> {
        self.maps.get(idx)
    }

    /// The bitmap of region `idx`, mutably.
    pub fn region_mut(&mut self, idx: usize) -> Option<&mut DirtyBitmap> {
        self.maps.get_mut(idx)
    }

    /// The bitmaps of all regions, in layout order.
    pub fn regions(&self) -> &[DirtyBitmap] {
        &self.maps
    }

    /// ORs raw bitmap words (KVM / vm-memory layout) into region `idx`.
    pub fn or_region_words(&mut self, idx: usize, words: &[u64]) -> Result<(), RamError> {
        let map = self
            .maps
            .get_mut(idx)
            .ok_or_else(|| RamError::LayoutMismatch(format!("no region {idx} in the dirty set")))?;
        map.or_words(words)
    }

    /// Marks the pages of `gpa..gpa+len` (page aligned, inside one region).
    pub fn mark(&mut self, gpa: u64, len: u64) -> Result<(), RamError> {
        let (region, page) = self.layout.locate(gpa, len)?;
        let pages = len.div_ceil(PAGE_SIZE as u64) as usize;
        self.maps[region].set_range(page..page + pages)
    }

    /// Whether the page holding `gpa` is in the set.
    pub fn contains(&self, gpa: u64) -> bool {
        let gpa = gpa & !(PAGE_SIZE as u64 - 1);
        match self.layout.locate(gpa, PAGE_SIZE as u64) {
            Ok((region, page)) => self.maps[region].test(page),
            Err(_) => false,
        }
    }

    /// Marks every page of guest RAM (the initial full sync).
    pub fn set_all(&mut self) {
        self.maps.iter_mut().for_each(DirtyBitmap::set_all);
    }

    /// Empties the set.
    pub fn clear(&mut self) {
        self.maps.iter_mut().for_each(DirtyBitmap::clear_all);
    }

    /// ORs `other` into `self`; both must have the same layout.
    pub fn union_with(&mut self, other: &DirtySet) -> Result<(), RamError> {
        self.check_layout(&other.layout)?;
        for (a, b) in self.maps.iter_mut().zip(&other.maps) {
            a.union_with(b)?;
        }
        Ok(())
    }

    /// Number of pages in the set.
    pub fn count(&self) -> usize {
        self.maps.iter().map(DirtyBitmap::count).sum()
    }

    /// Whether the set is empty.
    pub fn is_clear(&self) -> bool {
        self.maps.iter().all(DirtyBitmap::is_clear)
    }

    /// Runs of pages in the set, ascending by guest address, as `(region index, page range in the region)`.
    pub fn runs(&self) -> impl Iterator<Item = (usize, Range<usize>)> + '_ {
        self.maps
            .iter()
            .enumerate()
            .flat_map(|(i, m)| m.runs().map(move |r| (i, r)))
    }

    /// Guest addresses of the pages in the set, ascending.
    pub fn gpas(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs().flat_map(move |(i, r)| {
            let base = self.layout.regions()[i].gpa;
            r.map(move |p| base + (p * PAGE_SIZE) as u64)
        })
    }

    pub(crate) fn check_layout(&self, layout: &RamLayout) -> Result<(), RamError> {
        if &self.layout == layout {
            Ok(())
        } else {
            Err(RamError::LayoutMismatch(format!(
                "dirty set covers {:?}, expected {:?}",
                self.layout, layout
            )))
        }
    }
}

/// A source of dirty pages: "the pages written since the last call, per memory region, and reset".
///
/// `take_into` ORs those pages into `set` (so several logs can feed one set) and resets the log, so that
/// the next call reports only pages written after this one. Implementations may over-report but must never
/// miss a page written before the call returned.
pub trait DirtyLog {
    /// ORs into `set` the pages written since the previous call, then resets the log.
    fn take_into(&mut self, set: &mut DirtySet) -> Result<(), RamError>;
}

impl<T: DirtyLog + ?Sized> DirtyLog for &mut T {
    fn take_into(&mut self, set: &mut DirtySet) -> Result<(), RamError> {
        (**self).take_into(set)
    }
}

impl<T: DirtyLog + ?Sized> DirtyLog for Box<T> {
    fn take_into(&mut self, set: &mut DirtySet) -> Result<(), RamError> {
        (**self).take_into(set)
    }
}

/// A log that never reports anything (memory nobody writes, or tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopDirtyLog;

impl DirtyLog for NoopDirtyLog {
    fn take_into(&mut self, _set: &mut DirtySet) -> Result<(), RamError> {
        Ok(())
    }
}

/// The union of two logs: both are taken (and reset) into the same set.
///
/// Nest it for more sources: `UnionLog::new(kvm, UnionLog::new(vmm, other))`.
#[derive(Debug)]
pub struct UnionLog<A, B> {
    /// First source.
    pub a: A,
    /// Second source.
    pub b: B,
}

impl<A: DirtyLog, B: DirtyLog> UnionLog<A, B> {
    /// ORs `a` and `b`.
    pub fn new(a: A, b: B) -> Self {
        UnionLog { a, b }
    }
}

impl<A: DirtyLog, B: DirtyLog> DirtyLog for UnionLog<A, B> {
    fn take_into(&mut self, set: &mut DirtySet) -> Result<(), RamError> {
        // Take both even if the first fails, so neither keeps stale bits; report the first error.
        let ra = self.a.take_into(set);
        let rb = self.b.take_into(set);
        ra.and(rb)
    }
}

/// The VMM's own writes to guest memory, recorded by vm-memory's [`AtomicBitmap`] on every write made
/// through vm-memory's `Bytes` API (device emulation, DMA, loaders).
///
/// vm-memory marks a page after the write completes, so a write racing with `take_into` is reported either
/// now or at the next call, never lost.
#[derive(Clone, Debug)]
pub struct AtomicBitmapLog {
    layout: RamLayout,
    regions: Vec<Arc<MmapRegion<AtomicBitmap>>>,
}

impl AtomicBitmapLog {
    /// Reads the bitmaps of every region of `mem`.
    pub fn new(mem: &GuestMemoryMmap<AtomicBitmap>) -> Result<Self, RamError> {
        let layout = RamLayout::of(mem)?;
        let regions: Vec<_> = mem.iter().map(|r| r.get_mmap()).collect();
        for (m, l) in regions.iter().zip(layout.regions()) {
            Self::check_bitmap(m.bitmap(), l)?;
        }
        Ok(AtomicBitmapLog { layout, regions })
    }

    fn check_bitmap(map: &AtomicBitmap, l: &RegionLayout) -> Result<(), RamError> {
        if map.len() == l.pages() {
            Ok(())
        } else {
            Err(RamError::UnsupportedRegion {
                gpa: l.gpa,
                len: l.len,
                reason: "vm-memory bitmap page size is not the 4 KiB guest page size",
            })
        }
    }

    /// The layout this log covers.
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }
}

impl DirtyLog for AtomicBitmapLog {
    fn take_into(&mut self, set: &mut DirtySet) -> Result<(), RamError> {
        set.check_layout(&self.layout)?;
        for (i, r) in self.regions.iter().enumerate() {
            let words = r.bitmap().get_and_reset();
            set.or_region_words(i, &words)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn atomic_bitmap_log_reports_vmm_writes_once() {
        let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x100000), 0x8000),
        ])
        .unwrap();
        let mut log = AtomicBitmapLog::new(&mem).unwrap();
        let mut set = DirtySet::new(log.layout().clone());
        log.take_into(&mut set).unwrap();
        assert!(set.is_clear());
        mem.write_slice(&[1; 0x1002], GuestAddress(0x2fff)).unwrap();
        mem.write_obj(7u8, GuestAddress(0x107000)).unwrap();
        log.take_into(&mut set).unwrap();
        assert_eq!(
            set.gpas().collect::<Vec<_>>(),
            vec![0x2000, 0x3000, 0x4000, 0x107000]
        );
        set.clear();
        log.take_into(&mut set).unwrap();
        assert!(set.is_clear(), "a log reports a write once");
    }

    #[test]
    fn union_log_ors_sources_and_checks_layout() {
        let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let other = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_obj(1u8, GuestAddress(0x1000)).unwrap();
        other.write_obj(1u8, GuestAddress(0x5000)).unwrap();
        let mut log = UnionLog::new(
            AtomicBitmapLog::new(&mem).unwrap(),
            AtomicBitmapLog::new(&other).unwrap(),
        );
        let mut set = DirtySet::new(RamLayout::of(&mem).unwrap());
        log.take_into(&mut set).unwrap();
        assert_eq!(set.gpas().collect::<Vec<_>>(), vec![0x1000, 0x5000]);

        let mut wrong = DirtySet::new(RamLayout::new(vec![RegionLayout { gpa: 0, len: 0x20000 }]).unwrap());
        assert!(matches!(
            log.take_into(&mut wrong),
            Err(RamError::LayoutMismatch(_))
        ));
    }
}
