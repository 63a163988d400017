//! Model test: for any interleaving of PVM writes, SVM writes, pre-copy rounds and checkpoints, after each
//! flush the SVM's memory equals the PVM's memory at that checkpoint. The oracle is a naive copy of the
//! whole PVM memory taken at the checkpoint.

use colo_ram::{
    AtomicBitmapLog, CollectOptions, FlushOptions, GuestRam, PAGE_SIZE, PageRun, PrimaryRam, RamCache,
    RamLayout,
};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

#[path = "support/regions.rs"]
mod regions;
use regions::Mem;

const REGIONS: [(u64, usize); 2] = [(0, 40), (0x100000, 24)];

fn mem() -> Mem {
    regions::mem(&REGIONS)
}

fn page_gpa(page: usize) -> u64 {
    regions::page_gpa(&REGIONS, page)
}

/// The naive oracle: every byte of guest RAM, region after region.
fn snapshot(m: &Mem) -> Vec<u8> {
    let ram = GuestRam::new(m).unwrap();
    let mut out = Vec::new();
    for r in ram.layout().regions() {
        let mut buf = vec![0; r.len as usize];
        ram.read(r.gpa, &mut buf).unwrap();
        out.extend(buf);
    }
    out
}

#[derive(Clone, Debug)]
enum Op {
    /// The PVM guest writes `len` bytes of `val` at `offset` in a page (`val == 0` can make a zero page).
    Pvm {
        page: usize,
        offset: usize,
        len: usize,
        val: u8,
    },
    /// The SVM writes on its own (it diverges until the next checkpoint).
    Svm {
        page: usize,
        offset: usize,
        len: usize,
        val: u8,
    },
    /// A pre-copy round while the PVM runs.
    Precopy,
    /// A checkpoint: collect, receive, flush on `threads` threads.
    Checkpoint { threads: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let write = (
        0usize..64,
        0usize..PAGE_SIZE,
        1usize..3 * PAGE_SIZE,
        prop_oneof![Just(0u8), any::<u8>()],
    );
    prop_oneof![
        4 => write.clone().prop_map(|(page, offset, len, val)| Op::Pvm { page, offset, len, val }),
        3 => write.prop_map(|(page, offset, len, val)| Op::Svm { page, offset, len, val }),
        1 => Just(Op::Precopy),
        2 => (1usize..4).prop_map(|threads| Op::Checkpoint { threads }),
    ]
}

/// A write clipped to its region, through vm-memory (so the AtomicBitmap logs it).
fn write(m: &Mem, page: usize, offset: usize, len: usize, val: u8) {
    let gpa = page_gpa(page);
    let region = REGIONS
        .iter()
        .find(|r| gpa >= r.0 && gpa < r.0 + (r.1 * PAGE_SIZE) as u64)
        .unwrap();
    let end = region.0 + (region.1 * PAGE_SIZE) as u64;
    let start = gpa + offset as u64;
    let len = len.min((end - start) as usize);
    m.write_slice(&vec![val; len], GuestAddress(start)).unwrap();
}

fn send<L: colo_ram::DirtyLog>(
    primary: &mut PrimaryRam<L>,
    pram: &GuestRam<'_>,
    cache: &mut RamCache,
    take: bool,
) {
    if take {
        primary.take_log().unwrap();
    }
    for run in primary.collect(pram).unwrap() {
        match run.unwrap() {
            PageRun::Data { gpa, data } => cache.receive(gpa, data).unwrap(),
            PageRun::Zero { gpa, pages } => cache.receive_zero(gpa, pages).unwrap(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn svm_equals_pvm_after_every_flush(ops in proptest::collection::vec(op(), 1..40), max_run in 1usize..300) {
        let (pvm, svm) = (mem(), mem());
        // Different initial content, so the initial sync must really copy.
        write(&pvm, 3, 0, 5 * PAGE_SIZE, 0x5a);
        write(&svm, 50, 0, PAGE_SIZE, 0x77);
        let layout = RamLayout::of(&pvm).unwrap();
        let options = CollectOptions { detect_zero: true, max_run_pages: max_run };
        let mut primary = PrimaryRam::new(layout.clone(), AtomicBitmapLog::new(&pvm).unwrap(), options);
        let mut cache = RamCache::new(layout, FlushOptions { threads: 1, parallel_threshold_pages: 0 }).unwrap();
        let mut svm_log = AtomicBitmapLog::new(&svm).unwrap();
        let (pram, mut sram) = (GuestRam::new(&pvm).unwrap(), GuestRam::new(&svm).unwrap());

        // Initial sync into cache and SVM memory.
        primary.mark_all().unwrap();
        for run in primary.collect(&pram).unwrap() {
            match run.unwrap() {
                PageRun::Data { gpa, data } => cache.load_initial(&mut sram, gpa, data).unwrap(),
                PageRun::Zero { gpa, pages } => cache.load_initial_zero(&mut sram, gpa, pages).unwrap(),
            }
        }
        cache.flush(&mut sram, &mut svm_log).unwrap(); // starts the SVM's log clean; copies nothing new
        prop_assert_eq!(snapshot(&svm), snapshot(&pvm));

        for op in ops {
            match op {
                Op::Pvm { page, offset, len, val } => write(&pvm, page, offset, len, val),
                Op::Svm { page, offset, len, val } => write(&svm, page, offset, len, val),
                Op::Precopy => send(&mut primary, &pram, &mut cache, true),
                Op::Checkpoint { threads } => {
                    cache.set_options(FlushOptions { threads, parallel_threshold_pages: 0 });
                    send(&mut primary, &pram, &mut cache, true);
                    let oracle = snapshot(&pvm);
                    cache.flush(&mut sram, &mut svm_log).unwrap();
                    prop_assert!(snapshot(&svm) == oracle, "SVM differs from the PVM after a flush");
                    prop_assert!(cache.received().is_clear());
                }
            }
        }
    }

    #[test]
    fn zero_pages_round_trip(pages in proptest::collection::vec((0usize..64, prop_oneof![Just(0u8), Just(1u8)]), 1..30)) {
        let (pvm, svm) = (mem(), mem());
        let layout = RamLayout::of(&pvm).unwrap();
        // SVM starts full of non-zero bytes everywhere; the PVM starts non-zero on the test pages.
        for p in 0..64 { write(&svm, p, 0, PAGE_SIZE, 0xee); write(&pvm, p, 0, PAGE_SIZE, 0xee); }
        let mut primary = PrimaryRam::new(layout.clone(), AtomicBitmapLog::new(&pvm).unwrap(), CollectOptions::default());
        let mut cache = RamCache::new(layout, FlushOptions::default()).unwrap();
        let (pram, mut sram) = (GuestRam::new(&pvm).unwrap(), GuestRam::new(&svm).unwrap());
        cache.fill_from(&sram).unwrap();
        primary.take_log().unwrap();
        for &(p, v) in &pages { write(&pvm, p, 0, PAGE_SIZE, v); }
        let mut zero_markers = 0;
        primary.take_log().unwrap();
        for run in primary.collect(&pram).unwrap() {
            match run.unwrap() {
                PageRun::Data { gpa, data } => cache.receive(gpa, data).unwrap(),
                PageRun::Zero { gpa, pages } => { zero_markers += pages; cache.receive_zero(gpa, pages).unwrap() }
            }
        }
        let zeroed: std::collections::BTreeSet<_> = pages.iter().map(|&(p, _)| p).filter(|&p| pages.iter().rev().find(|x| x.0 == p).unwrap().1 == 0).collect();
        prop_assert_eq!(zero_markers, zeroed.len());
        cache.flush(&mut sram, &mut colo_ram::NoopDirtyLog).unwrap();
        prop_assert!(snapshot(&svm) == snapshot(&pvm));
    }

    #[test]
    fn hostile_pages_are_errors_never_writes(
        gpa in prop_oneof![any::<u64>(), 0u64..0x120000, (0u64..0x130).prop_map(|p| p * PAGE_SIZE as u64), Just(!0xfffu64)],
        len in prop_oneof![0usize..3 * PAGE_SIZE, (0usize..5).prop_map(|p| p * PAGE_SIZE)],
        pages in prop_oneof![any::<usize>(), 0usize..70],
    ) {
        let m = mem();
        let layout = RamLayout::of(&m).unwrap();
        let mut cache = RamCache::new(layout.clone(), FlushOptions::default()).unwrap();
        let data = vec![0xabu8; len];
        let in_ram = |g: u64, l: u64| REGIONS.iter().any(|&(s, p)| g >= s && g.checked_add(l).is_some_and(|e| e <= s + (p * PAGE_SIZE) as u64));
        let ok_data = gpa % PAGE_SIZE as u64 == 0 && len > 0 && len % PAGE_SIZE == 0 && in_ram(gpa, len as u64);
        prop_assert_eq!(cache.receive(gpa, &data).is_ok(), ok_data);
        let zlen = (pages as u64).checked_mul(PAGE_SIZE as u64);
        let ok_zero = gpa % PAGE_SIZE as u64 == 0 && pages > 0 && zlen.is_some_and(|l| in_ram(gpa, l));
        prop_assert_eq!(cache.receive_zero(gpa, pages).is_ok(), ok_zero);
        // Only accepted pages are marked.
        let expected = usize::from(ok_data) * (len / PAGE_SIZE) + if ok_zero { pages } else { 0 };
        prop_assert!(cache.received().count() <= expected);
        if !ok_data && !ok_zero { prop_assert!(cache.received().is_clear()); }
    }
}
