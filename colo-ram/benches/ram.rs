//! colo-ram benchmarks, each next to its physical reference measured in the same run.
//!
//! * `ram/bitmap_runs/<density>/4GiB`: run iteration over a 4 GiB guest's bitmap (1 Mi pages).
//! * `ram/zero_check/<method>/<page>`: block-OR zero detection against a per-byte loop.
//! * `ram/collect/<mode>/dirty_10pct/256MiB`: primary collection, with and without zero detection.
//! * `ram/flush/dirty_<pct>/1GiB/<n>thr` next to `ram/flush/dirty_<pct>/1GiB/memcpy_<n>thr`: the RAM cache
//!   flush against a plain scattered 4 KiB memcpy of the same pages.

#![allow(missing_docs)]

use std::time::Duration;

use colo_ram::{
    CollectOptions, DirtyBitmap, DirtyLog, DirtySet, FlushOptions, GuestRam, PAGE_SIZE, RamCache, RamError,
    RamLayout, collect, is_zero,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const GIB: usize = 1 << 30;

/// Deterministic xorshift, so every run marks the same pages.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// `pages` bits with each set with probability `permille / 1000` (exactly all for 1000).
fn random_map(pages: usize, permille: u64, seed: u64) -> DirtyBitmap {
    let mut map = DirtyBitmap::new(pages);
    if permille >= 1000 {
        map.set_all();
        return map;
    }
    let mut next = rng(seed);
    for p in 0..pages {
        if next() % 1000 < permille {
            map.set(p).unwrap();
        }
    }
    map
}

/// A dirty log that reports the same fixed set every time (the flush bench re-marks its pages with it).
struct FixedLog(DirtySet);

impl DirtyLog for FixedLog {
    fn take_into(&mut self, set: &mut DirtySet) -> Result<(), RamError> {
        set.union_with(&self.0)
    }
}

fn bitmap_runs(c: &mut Criterion) {
    let pages = 4 * GIB / PAGE_SIZE;
    let mut g = c.benchmark_group("ram/bitmap_runs");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300))
        .sample_size(20);
    for (name, permille) in [
        ("clean", 0u64),
        ("dirty_0.1pct", 1),
        ("dirty_1pct", 10),
        ("dirty_10pct", 100),
    ] {
        let map = random_map(pages, permille, 7);
        g.throughput(Throughput::Elements(pages as u64));
        g.bench_function(BenchmarkId::new(name, "4GiB"), |b| {
            b.iter(|| map.runs().map(|r| r.len()).sum::<usize>())
        });
    }
    g.finish();
}

fn zero_check(c: &mut Criterion) {
    let mut g = c.benchmark_group("ram/zero_check");
    g.measurement_time(Duration::from_secs(1))
        .warm_up_time(Duration::from_millis(200));
    let zero = vec![0u8; PAGE_SIZE];
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    g.bench_function(BenchmarkId::new("block_or", "zero_page"), |b| {
        b.iter(|| is_zero(std::hint::black_box(&zero)))
    });
    g.bench_function(BenchmarkId::new("per_byte", "zero_page"), |b| {
        b.iter(|| std::hint::black_box(&zero).iter().all(|&x| x == 0))
    });
    g.finish();
}

fn collection(c: &mut Criterion) {
    let size = 256 << 20;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap();
    touch(&mem, size);
    let layout = RamLayout::of(&mem).unwrap();
    let mut set = DirtySet::new(layout);
    let map = random_map(size / PAGE_SIZE, 100, 11);
    set.region_mut(0).unwrap().union_with(&map).unwrap();
    // Every other dirty page holds data (a non-zero byte in its last word: the worst case for detection).
    for (i, p) in map.iter_pages().enumerate() {
        if i % 2 == 0 {
            mem.write_obj(1u8, GuestAddress(((p + 1) * PAGE_SIZE - 1) as u64))
                .unwrap();
        }
    }
    let ram = GuestRam::new(&mem).unwrap();
    let mut g = c.benchmark_group("ram/collect");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300))
        .sample_size(10);
    g.throughput(Throughput::Bytes((set.count() * PAGE_SIZE) as u64));
    for (name, detect_zero) in [("zero_detect", true), ("no_zero_detect", false)] {
        let opts = CollectOptions {
            detect_zero,
            max_run_pages: 256,
        };
        g.bench_function(BenchmarkId::new(name, "dirty_10pct/256MiB"), |b| {
            b.iter(|| {
                collect(&set, &ram, opts)
                    .unwrap()
                    .map(|r| r.unwrap().pages())
                    .sum::<usize>()
            })
        });
    }
    g.finish();
}

/// Faults every page in with real (zeroed) memory: untouched anonymous pages all map the one shared zero
/// page, which would make reads look cache-hot.
fn touch(mem: &GuestMemoryMmap<()>, size: usize) {
    let zeros = vec![0u8; 1 << 20];
    for off in (0..size).step_by(zeros.len()) {
        mem.write_slice(&zeros, GuestAddress(off as u64)).unwrap();
    }
}

/// Copies page `p` of `src` to `dst` for every page in `pages`, on `threads` threads (the reference).
fn scattered_memcpy(src: usize, dst: usize, pages: &[usize], threads: usize) {
    if threads <= 1 {
        return copy_pages(src, dst, pages);
    }
    let chunk = pages.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for part in pages.chunks(chunk) {
            s.spawn(move || copy_pages(src, dst, part));
        }
    });
}

fn copy_pages(src: usize, dst: usize, pages: &[usize]) {
    for &p in pages {
        // SAFETY: `src` and `dst` are distinct 1 GiB mappings that outlive the copy and `p` is a page index
        // inside them; threads copy disjoint pages.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (src + p * PAGE_SIZE) as *const u8,
                (dst + p * PAGE_SIZE) as *mut u8,
                PAGE_SIZE,
            )
        };
    }
}

fn flush(c: &mut Criterion) {
    let layout =
        RamLayout::of(&GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GIB)]).unwrap()).unwrap();
    let svm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GIB)]).unwrap();
    touch(&svm, GIB);
    let mut cache = RamCache::new(layout.clone(), FlushOptions::default()).unwrap();
    // Touch everything once so no page fault lands in a measurement.
    cache.fill_from(&GuestRam::new(&svm).unwrap()).unwrap();
    let mut sram = GuestRam::new(&svm).unwrap();
    let src = cache.memory().get_host_address(GuestAddress(0)).unwrap() as usize;
    let dst = svm.get_host_address(GuestAddress(0)).unwrap() as usize;

    let mut g = c.benchmark_group("ram/flush");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(10);
    for (pct, permille) in [
        ("dirty_1pct", 10u64),
        ("dirty_10pct", 100),
        ("dirty_100pct", 1000),
    ] {
        let map = random_map(GIB / PAGE_SIZE, permille, 13);
        let pages: Vec<usize> = map.iter_pages().collect();
        let mut set = DirtySet::new(layout.clone());
        set.region_mut(0).unwrap().union_with(&map).unwrap();
        let mut log = FixedLog(set);
        g.throughput(Throughput::Bytes((pages.len() * PAGE_SIZE) as u64));
        for threads in [1usize, 2] {
            cache.set_options(FlushOptions {
                threads,
                parallel_threshold_pages: 1024,
            });
            let id = format!("{pct}/1GiB");
            g.bench_function(BenchmarkId::new(id.clone(), format!("{threads}thr")), |b| {
                b.iter(|| cache.flush(&mut sram, &mut log).unwrap())
            });
            g.bench_function(BenchmarkId::new(id, format!("memcpy_{threads}thr")), |b| {
                b.iter(|| scattered_memcpy(src, dst, &pages, threads))
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default();
    targets = bitmap_runs, zero_check, collection, flush
}
criterion_main!(benches);
