//! RAM cache and primary collection through the public API: errors, zero pages, union flush.

use colo_ram::{
    AtomicBitmapLog, CollectOptions, DirtyLog, DirtySet, FlushOptions, GuestRam, NoopDirtyLog, PAGE_SIZE,
    PageRun, PrimaryRam, RamCache, RamError, RamLayout, collect,
};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<AtomicBitmap>;

fn mem() -> Mem {
    Mem::from_ranges(&[
        (GuestAddress(0), 64 * PAGE_SIZE),
        (GuestAddress(0x100000), 16 * PAGE_SIZE),
    ])
    .unwrap()
}

fn bytes(m: &Mem) -> Vec<u8> {
    let ram = GuestRam::new(m).unwrap();
    let mut out = Vec::new();
    for r in ram.layout().regions() {
        let mut buf = vec![0; r.len as usize];
        ram.read(r.gpa, &mut buf).unwrap();
        out.extend(buf);
    }
    out
}

#[test]
fn bad_pages_from_the_peer_are_typed_errors() {
    let m = mem();
    let layout = RamLayout::of(&m).unwrap();
    let mut cache = RamCache::new(layout, FlushOptions::default()).unwrap();
    let page = vec![1u8; PAGE_SIZE];
    assert!(matches!(
        cache.receive(0x1001, &page),
        Err(RamError::Misaligned { gpa: 0x1001, .. })
    ));
    assert!(matches!(
        cache.receive(0x1000, &page[..100]),
        Err(RamError::ShortPage { len: 100, .. })
    ));
    assert!(matches!(
        cache.receive(0x1000, &[]),
        Err(RamError::ShortPage { len: 0, .. })
    ));
    // Past the end of region 0, in the hole, past the end of RAM, straddling a region end.
    assert!(matches!(
        cache.receive(64 * PAGE_SIZE as u64, &page),
        Err(RamError::OutOfRange { .. })
    ));
    assert!(matches!(
        cache.receive(0x200000, &page),
        Err(RamError::OutOfRange { .. })
    ));
    assert!(matches!(
        cache.receive(!0xfff, &page),
        Err(RamError::OutOfRange { .. })
    ));
    let two = vec![1u8; 2 * PAGE_SIZE];
    assert!(matches!(
        cache.receive(0x100000 + 15 * PAGE_SIZE as u64, &two),
        Err(RamError::OutOfRange { .. })
    ));
    assert!(matches!(
        cache.receive_zero(0x100000, 17),
        Err(RamError::OutOfRange { .. })
    ));
    assert!(matches!(
        cache.receive_zero(0x100000, 0),
        Err(RamError::ShortPage { .. })
    ));
    assert!(matches!(
        cache.receive_zero(0x1000, usize::MAX),
        Err(RamError::ShortPage { .. } | RamError::OutOfRange { .. })
    ));
    assert!(cache.received().is_clear(), "rejected pages are not marked");

    // A cache for another layout refuses to flush into this memory.
    let other = Mem::from_ranges(&[(GuestAddress(0), 64 * PAGE_SIZE)]).unwrap();
    let mut svm = GuestRam::new(&other).unwrap();
    assert!(matches!(
        cache.flush(&mut svm, &mut NoopDirtyLog),
        Err(RamError::LayoutMismatch(_))
    ));
}

#[test]
fn flush_writes_received_and_rolls_back_svm_dirty_pages() {
    let (pvm, svm) = (mem(), mem());
    let layout = RamLayout::of(&pvm).unwrap();
    let mut cache = RamCache::new(
        layout.clone(),
        FlushOptions {
            threads: 2,
            parallel_threshold_pages: 1,
        },
    )
    .unwrap();
    // Initial sync of non-trivial content.
    pvm.write_slice(&[0xaa; 3 * PAGE_SIZE], GuestAddress(0x3000))
        .unwrap();
    pvm.write_slice(&[0xbb; PAGE_SIZE], GuestAddress(0x101000))
        .unwrap();
    let mut primary = PrimaryRam::new(
        layout.clone(),
        AtomicBitmapLog::new(&pvm).unwrap(),
        CollectOptions::default(),
    );
    let pram = GuestRam::new(&pvm).unwrap();
    let mut sram = GuestRam::new(&svm).unwrap();
    primary.mark_all().unwrap();
    for run in primary.collect(&pram).unwrap() {
        match run.unwrap() {
            PageRun::Data { gpa, data } => cache.load_initial(&mut sram, gpa, data).unwrap(),
            PageRun::Zero { gpa, pages } => cache.load_initial_zero(&mut sram, gpa, pages).unwrap(),
        }
    }
    let mut svm_log = AtomicBitmapLog::new(&svm).unwrap();
    svm_log.take_into(&mut DirtySet::new(layout.clone())).unwrap();
    assert_eq!(bytes(&pvm), bytes(&svm));

    // Epoch: PVM writes, turns a page to zero; SVM writes other pages and one the PVM also wrote.
    pvm.write_slice(&[0x11; PAGE_SIZE], GuestAddress(0x10000))
        .unwrap();
    pvm.write_slice(&[0; PAGE_SIZE], GuestAddress(0x4000)).unwrap();
    svm.write_slice(&[0x22; 10], GuestAddress(0x20000)).unwrap();
    svm.write_slice(&[0x33; 10], GuestAddress(0x10000)).unwrap();
    svm.write_slice(&[0x44; 10], GuestAddress(0x101000)).unwrap();
    let mut zero_pages = 0;
    for run in primary.checkpoint(&pram).unwrap() {
        match run.unwrap() {
            PageRun::Data { gpa, data } => cache.receive(gpa, data).unwrap(),
            PageRun::Zero { gpa, pages } => {
                zero_pages += pages;
                cache.receive_zero(gpa, pages).unwrap()
            }
        }
    }
    assert_eq!(zero_pages, 1, "the page that became zero travels as a marker");
    assert_ne!(
        bytes(&pvm),
        bytes(&svm),
        "received pages stay in the cache until the flush"
    );
    let stats = cache.flush(&mut sram, &mut svm_log).unwrap();
    assert_eq!(stats.received_pages, 2);
    assert_eq!(stats.flushed_pages, 4);
    assert_eq!(bytes(&pvm), bytes(&svm));
    assert!(cache.received().is_clear());
}

#[test]
fn collection_splits_zero_and_data_runs_and_caps_length() {
    let m = mem();
    let layout = RamLayout::of(&m).unwrap();
    m.write_slice(&[5; 2 * PAGE_SIZE], GuestAddress(0x2000)).unwrap();
    let ram = GuestRam::new(&m).unwrap();
    let mut set = DirtySet::new(layout);
    set.mark(0, 8 * PAGE_SIZE as u64).unwrap();
    set.mark(0x100000, 3 * PAGE_SIZE as u64).unwrap();
    let opts = CollectOptions {
        detect_zero: true,
        max_run_pages: 2,
    };
    let runs: Vec<_> = collect(&set, &ram, opts)
        .unwrap()
        .map(|r| r.unwrap())
        .map(|r| (r.gpa(), r.pages(), matches!(r, PageRun::Zero { .. })))
        .collect();
    assert_eq!(
        runs,
        vec![
            (0, 2, true),
            (0x2000, 2, false),
            (0x4000, 2, true),
            (0x6000, 2, true),
            (0x100000, 2, true),
            (0x102000, 1, true),
        ]
    );
    let plain = collect(
        &set,
        &ram,
        CollectOptions {
            detect_zero: false,
            max_run_pages: 1024,
        },
    )
    .unwrap();
    let runs: Vec<_> = plain.map(|r| r.unwrap()).collect();
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|r| matches!(r, PageRun::Data { .. })));
}

#[test]
fn an_interrupted_collection_keeps_its_pages_pending() {
    let m = mem();
    let layout = RamLayout::of(&m).unwrap();
    let mut primary = PrimaryRam::new(
        layout,
        AtomicBitmapLog::new(&m).unwrap(),
        CollectOptions::default(),
    );
    let ram = GuestRam::new(&m).unwrap();
    primary.take_log().unwrap();
    m.write_slice(&[1; PAGE_SIZE], GuestAddress(0x1000)).unwrap();
    m.write_slice(&[1; PAGE_SIZE], GuestAddress(0x9000)).unwrap();
    assert_eq!(primary.take_log().unwrap(), 2);
    {
        let mut c = primary.collect(&ram).unwrap();
        c.next().unwrap().unwrap();
        // Dropped: the send failed.
    }
    m.write_slice(&[1; PAGE_SIZE], GuestAddress(0x20000)).unwrap();
    assert_eq!(primary.take_log().unwrap(), 3, "unsent pages stay pending");
    assert_eq!(primary.collect(&ram).unwrap().count(), 3);
    assert_eq!(primary.take_log().unwrap(), 0, "a completed collection is done");
}

#[test]
fn a_view_of_the_cache_itself_is_refused_as_svm_memory() {
    let layout = RamLayout::of(&mem()).unwrap();
    let mut cache = RamCache::new(layout, FlushOptions::default()).unwrap();
    cache.receive(0x1000, &[5u8; PAGE_SIZE]).unwrap();
    // A clone shares the cache's mappings without borrowing the cache.
    let alias = cache.memory().clone();
    let mut view = GuestRam::new(&alias).unwrap();
    let refused = |r: Result<_, RamError>| matches!(r, Err(RamError::LayoutMismatch(_)));
    assert!(refused(cache.flush(&mut view, &mut NoopDirtyLog).map(|_| ())));
    assert!(refused(cache.fill_from(&view)));
    assert!(refused(cache.load_initial(&mut view, 0, &[1u8; PAGE_SIZE])));
    assert!(refused(cache.load_initial_zero(&mut view, 0, 1)));
    // Nothing was copied or lost: the received page is still pending and still in the cache.
    assert_eq!(cache.received().count(), 1);
    let mut buf = vec![0u8; PAGE_SIZE];
    view.read(0x1000, &mut buf).unwrap();
    assert_eq!(buf, vec![5u8; PAGE_SIZE]);
}

#[test]
fn parked_flush_threads_serve_many_flushes_and_huge_page_advice_keeps_contents() {
    // 4 MiB in one region, so every part of a parallel flush holds several runs.
    let pvm = Mem::from_ranges(&[(GuestAddress(0), 1024 * PAGE_SIZE)]).unwrap();
    let svm = Mem::from_ranges(&[(GuestAddress(0), 1024 * PAGE_SIZE)]).unwrap();
    let layout = RamLayout::of(&pvm).unwrap();
    let mut cache = RamCache::new(
        layout.clone(),
        FlushOptions {
            threads: 1,
            parallel_threshold_pages: 1,
        },
    )
    .unwrap();
    // Advice only: where THP is not allowed the kernel refuses, and the cache works the same.
    let _ = cache.advise_huge_pages();
    let mut sram = GuestRam::new(&svm).unwrap();
    let pram = GuestRam::new(&pvm).unwrap();
    let mut primary = PrimaryRam::new(
        layout.clone(),
        AtomicBitmapLog::new(&pvm).unwrap(),
        CollectOptions::default(),
    );
    for epoch in 1u8..=24 {
        // A different set of pages each epoch: every third page shifted by the epoch, every 7th full run.
        for page in (usize::from(epoch) % 3..1024).step_by(3) {
            let fill = epoch.wrapping_mul(31).wrapping_add(page as u8) | 1;
            pvm.write_slice(&[fill; PAGE_SIZE], GuestAddress((page * PAGE_SIZE) as u64))
                .unwrap();
        }
        let start = usize::from(epoch) * 37 % 900;
        pvm.write_slice(
            &vec![epoch; 64 * PAGE_SIZE],
            GuestAddress((start * PAGE_SIZE) as u64),
        )
        .unwrap();
        for run in primary.checkpoint(&pram).unwrap() {
            match run.unwrap() {
                PageRun::Data { gpa, data } => cache.receive(gpa, data).unwrap(),
                PageRun::Zero { gpa, pages } => cache.receive_zero(gpa, pages).unwrap(),
            }
        }
        // 1 to 4 threads, growing and shrinking: the pool starts helpers on demand and keeps them parked.
        let threads = 1 + usize::from(epoch) % 4;
        cache.set_options(FlushOptions {
            threads,
            parallel_threshold_pages: 1,
        });
        let stats = cache.flush(&mut sram, &mut NoopDirtyLog).unwrap();
        assert!(stats.threads >= 1 && stats.threads <= threads, "{stats:?}");
        assert!(
            bytes(&pvm) == bytes(&svm),
            "epoch {epoch}: SVM differs after the flush"
        );
        assert!(cache.received().count() == 0);
    }
    // (Whether a woken helper joins before the calling thread has claimed every part is up to the
    // scheduler, so the test checks contents and bounds, not the number of threads that took part.)
}
