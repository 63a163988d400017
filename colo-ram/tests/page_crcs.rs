//! `Collection::fill` with and without `with_page_crcs`: the entries a page sender takes and one checksum
//! per data page, checked against a plain collection expanded and hashed page by page (the reference model),
//! for any chunk size.

use colo_ram::{CollectOptions, DirtySet, GuestRam, PAGE_SIZE, PageRun, RamLayout, collect};
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

/// Entries as a sender gets them: `(gpa, bytes)` per data run, `(gpa, [])` per zero page.
type Entries = Vec<(u64, Vec<u8>)>;

/// The model: a plain collection, zero runs expanded page by page, data pages hashed one by one.
fn model(set: &DirtySet, ram: &GuestRam<'_>, opts: CollectOptions) -> (Entries, Vec<u32>) {
    let mut entries = Vec::new();
    let mut crcs = Vec::new();
    for run in collect(set, ram, opts).unwrap() {
        match run.unwrap() {
            PageRun::Data { gpa, data } => {
                crcs.extend(data.chunks_exact(PAGE_SIZE).map(crc32fast::hash));
                entries.push((gpa, data.to_vec()));
            }
            PageRun::Zero { gpa, pages } => {
                entries.extend((0..pages as u64).map(|i| (gpa + i * PAGE_SIZE as u64, Vec::new())));
            }
        }
    }
    (entries, crcs)
}

/// Fills in chunks of `chunk` pages; checks each chunk's size against the bound `fill` promises.
fn filled(
    set: &DirtySet,
    ram: &GuestRam<'_>,
    opts: CollectOptions,
    chunk: usize,
    crcs_on: bool,
) -> (Entries, Vec<u32>) {
    let mut c = collect(set, ram, opts).unwrap();
    if crcs_on {
        c = c.with_page_crcs(crc32fast::hash);
    }
    let (mut entries, mut crcs) = (Vec::new(), Vec::new());
    let mut all = Vec::new();
    loop {
        entries.clear();
        let done = c.fill(chunk, &mut entries, &mut crcs).unwrap();
        let pages: usize = entries.iter().map(|(_, b)| (b.len() / PAGE_SIZE).max(1)).sum();
        assert!(
            pages < chunk.max(1) + opts.max_run_pages,
            "a chunk of {pages} pages for {chunk}"
        );
        assert!(done || pages >= chunk.max(1), "a short chunk before the end");
        all.extend(entries.iter().map(|&(g, b)| (g, b.to_vec())));
        if done {
            break;
        }
    }
    (all, crcs)
}

#[test]
fn page_crcs_asked_for_half_way_cover_the_pages_filled_after() {
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
    let mut c = c.with_page_crcs(crc32fast::hash);
    let (mut entries, mut crcs) = (Vec::new(), Vec::new());
    assert!(c.fill(usize::MAX, &mut entries, &mut crcs).unwrap());
    let want: Vec<u32> = entries
        .iter()
        .flat_map(|(_, b)| b.chunks_exact(PAGE_SIZE).map(crc32fast::hash))
        .collect();
    assert_eq!(want.len(), 4, "pages 1, 3, 4 and 5");
    assert_eq!(crcs, want);
}

#[test]
fn runs_taken_by_the_iterator_hand_out_no_checksums_and_fill_appends() {
    let m = mem();
    for page in 0..6u64 {
        m.write_slice(&[9; 4], GuestAddress(page * PAGE_SIZE as u64))
            .unwrap();
    }
    let ram = GuestRam::new(&m).unwrap();
    let mut set = DirtySet::new(RamLayout::of(&m).unwrap());
    set.mark(0, PAGE_SIZE as u64).unwrap();
    set.mark(2 * PAGE_SIZE as u64, PAGE_SIZE as u64).unwrap();
    set.mark(4 * PAGE_SIZE as u64, 2 * PAGE_SIZE as u64).unwrap();
    let mut c = collect(&set, &ram, CollectOptions::default())
        .unwrap()
        .with_page_crcs(crc32fast::hash);
    assert!(matches!(c.next(), Some(Ok(PageRun::Data { gpa: 0, .. }))));
    // What the caller already holds stays; fill appends one entry and one checksum per page it took.
    let (mut entries, mut crcs) = (vec![(7u64, &[][..])], vec![42u32]);
    assert!(c.fill(usize::MAX, &mut entries, &mut crcs).unwrap());
    assert_eq!(
        entries.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![7, 0x2000, 0x4000]
    );
    assert_eq!(crcs.len(), 1 + 3);
    assert_eq!(crcs[0], 42);
    assert!(c.fill(1, &mut entries, &mut crcs).unwrap(), "still exhausted");
    assert_eq!(crcs.len(), 4);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn fill_matches_the_model(
        // Page contents: 0 leaves a page zero, otherwise a byte written at a spot in it.
        contents in proptest::collection::vec((0u8..4, 0usize..PAGE_SIZE), 64),
        dirty in proptest::collection::vec(any::<bool>(), 64),
        detect_zero in any::<bool>(),
        max_run_pages in 1usize..6,
        chunk in 0usize..12,
        crcs_on in any::<bool>(),
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
        let (want_entries, want_crcs) = model(&set, &ram, opts);
        let (entries, crcs) = filled(&set, &ram, opts, chunk, crcs_on);
        prop_assert_eq!(entries, want_entries);
        prop_assert_eq!(crcs, if crcs_on { want_crcs } else { Vec::new() });
    }
}
