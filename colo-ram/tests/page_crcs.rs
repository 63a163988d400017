//! `Collection::with_page_crcs`: the same runs as a plain collection, and exactly one CRC32 per data page,
//! equal to `crc32fast::hash` of the page, in the order the pages are yielded (the reference model).

use colo_ram::{CollectOptions, DirtySet, GuestRam, PAGE_SIZE, PageRun, RamLayout, ZERO_PAGE_CRC, collect};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

#[path = "support/regions.rs"]
mod regions;
use regions::Mem;

const REGIONS: [(u64, usize); 2] = [(0, 48), (0x100000, 16)];

fn mem() -> Mem {
    regions::mem(&REGIONS)
}

fn page_gpa(page: usize) -> u64 {
    regions::page_gpa(&REGIONS, page)
}

/// (gpa, pages, zero) of every run, and the model's CRCs: `crc32fast::hash` of each data page yielded.
type Runs = Vec<(u64, usize, bool)>;

fn plain(set: &DirtySet, ram: &GuestRam<'_>, opts: CollectOptions) -> (Runs, Vec<u32>) {
    let mut runs = Vec::new();
    let mut crcs = Vec::new();
    for run in collect(set, ram, opts).unwrap() {
        let run = run.unwrap();
        if let PageRun::Data { data, .. } = run {
            crcs.extend(data.chunks_exact(PAGE_SIZE).map(crc32fast::hash));
        }
        runs.push((run.gpa(), run.pages(), matches!(run, PageRun::Zero { .. })));
    }
    (runs, crcs)
}

/// Collects with page CRCs, taking them every `take_every` runs (0: once at the end).
fn with_crcs(
    set: &DirtySet,
    ram: &GuestRam<'_>,
    opts: CollectOptions,
    take_every: usize,
) -> (Runs, Vec<u32>) {
    let mut c = collect(set, ram, opts).unwrap().with_page_crcs();
    let mut runs = Vec::new();
    let mut crcs = Vec::new();
    while let Some(run) = c.next() {
        let run = run.unwrap();
        runs.push((run.gpa(), run.pages(), matches!(run, PageRun::Zero { .. })));
        if take_every > 0 && runs.len() % take_every == 0 {
            crcs.extend(c.take_page_crcs());
        }
    }
    crcs.extend(c.take_page_crcs());
    assert!(c.take_page_crcs().is_empty());
    (runs, crcs)
}

#[test]
fn the_zero_page_crc_is_the_crc_of_a_zero_page() {
    assert_eq!(crc32fast::hash(&[0; PAGE_SIZE]), ZERO_PAGE_CRC);
}

#[test]
fn without_page_crcs_none_are_taken() {
    let m = mem();
    m.write_slice(&[3; PAGE_SIZE], GuestAddress(0x3000)).unwrap();
    let ram = GuestRam::new(&m).unwrap();
    let mut set = DirtySet::new(RamLayout::of(&m).unwrap());
    set.mark(0, 8 * PAGE_SIZE as u64).unwrap();
    let mut c = collect(&set, &ram, CollectOptions::default()).unwrap();
    assert_eq!(c.by_ref().count(), 3);
    assert!(c.take_page_crcs().is_empty());
}

#[test]
fn page_crcs_asked_for_half_way_cover_the_pages_yielded_after() {
    let m = mem();
    for page in [1u64, 3, 4, 5] {
        m.write_slice(&[page as u8; 8], GuestAddress(page * PAGE_SIZE as u64 + 64))
            .unwrap();
    }
    let ram = GuestRam::new(&m).unwrap();
    let mut set = DirtySet::new(RamLayout::of(&m).unwrap());
    set.mark(0, 8 * PAGE_SIZE as u64).unwrap();
    // Page 0 is zero, page 1 data: yielding page 0's run looked at page 1 already.
    let mut c = collect(&set, &ram, CollectOptions::default()).unwrap();
    assert!(matches!(c.next(), Some(Ok(PageRun::Zero { gpa: 0, pages: 1 }))));
    let mut c = c.with_page_crcs();
    let mut want = Vec::new();
    for run in c.by_ref() {
        if let PageRun::Data { data, .. } = run.unwrap() {
            want.extend(data.chunks_exact(PAGE_SIZE).map(crc32fast::hash));
        }
    }
    assert_eq!(want.len(), 4, "pages 1, 3, 4 and 5");
    assert_eq!(c.take_page_crcs(), want);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn page_crcs_match_the_yielded_pages(
        // Page contents: 0 leaves a page zero, otherwise a byte written at a spot in it.
        contents in proptest::collection::vec((0u8..4, 0usize..PAGE_SIZE), 64),
        dirty in proptest::collection::vec(any::<bool>(), 64),
        detect_zero in any::<bool>(),
        max_run_pages in 1usize..6,
        take_every in 0usize..4,
    ) {
        let m = mem();
        for (page, &(val, at)) in contents.iter().enumerate() {
            if val != 0 {
                m.write_slice(&[val], GuestAddress(page_gpa(page) + at as u64)).unwrap();
            }
        }
        let ram = GuestRam::new(&m).unwrap();
        let mut set = DirtySet::new(RamLayout::of(&m).unwrap());
        for (page, _) in dirty.iter().enumerate().filter(|(_, d)| **d) {
            set.mark(page_gpa(page), PAGE_SIZE as u64).unwrap();
        }
        let opts = CollectOptions { detect_zero, max_run_pages };
        let (want_runs, want_crcs) = plain(&set, &ram, opts);
        let (runs, crcs) = with_crcs(&set, &ram, opts, take_every);
        prop_assert_eq!(runs, want_runs);
        prop_assert_eq!(crcs, want_crcs);
    }
}
