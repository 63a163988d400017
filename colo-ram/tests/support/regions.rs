//! Guest memory of a few regions given in pages, and the address of the n-th page across them (shared by
//! the model and page-CRC tests, included by path).

use colo_ram::PAGE_SIZE;
use vm_memory::GuestAddress;
use vm_memory::bitmap::AtomicBitmap;

pub type Mem = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Memory with one region per `(gpa, pages)`.
pub fn mem(regions: &[(u64, usize)]) -> Mem {
    let ranges: Vec<_> = regions
        .iter()
        .map(|&(g, p)| (GuestAddress(g), p * PAGE_SIZE))
        .collect();
    Mem::from_ranges(&ranges).unwrap()
}

/// Guest address of page `page` counted across `regions` (wrapping around their total).
pub fn page_gpa(regions: &[(u64, usize)], page: usize) -> u64 {
    let mut page = page % regions.iter().map(|r| r.1).sum::<usize>();
    for &(gpa, pages) in regions {
        if page < pages {
            return gpa + (page * PAGE_SIZE) as u64;
        }
        page -= pages;
    }
    unreachable!("page reduced modulo the total")
}
