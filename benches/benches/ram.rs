//! colo-ram on the checkpoint path, per guest size and dirty share: the primary's paused round (dirty log
//! read through vm-memory's bitmap, then collection of the runs, with and without page CRCs) beside a
//! scattered memcpy gather of the same pages, and the secondary's side (pages into the RAM cache, then the flush into SVM memory) beside a
//! scattered memcpy of the same pages into another mapping.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use colo_ram::{
    AtomicBitmapLog, CollectOptions, FlushOptions, GuestRam, PageRun, PrimaryRam, RamCache, RamLayout,
};
use common::{PAGE, gather_pages, scatter_pages, scattered_pages};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

type Mem = GuestMemoryMmap<AtomicBitmap>;

fn host_slice(mem: &Mem, len: usize) -> &[u8] {
    let p = mem.get_host_address(GuestAddress(0)).unwrap();
    // SAFETY: one region of `len` bytes from guest address 0, alive as long as `mem`; the bench only reads
    // it while nothing writes.
    unsafe { std::slice::from_raw_parts(p, len) }
}

fn sizes() -> [(usize, &'static str); 2] {
    [(256 << 20, "256MiB"), (1 << 30, "1GiB")]
}

fn primary_round(c: &mut Criterion) {
    for (len, size) in sizes() {
        let mem = Mem::from_ranges(&[(GuestAddress(0), len)]).unwrap();
        // Non-zero content everywhere (a page of zeroes would go as a marker).
        for p in (0..len).step_by(PAGE) {
            mem.write_obj(p as u64 | 1, GuestAddress(p as u64)).unwrap();
        }
        let layout = RamLayout::of(&mem).unwrap();
        let mut primary = PrimaryRam::new(
            layout,
            AtomicBitmapLog::new(&mem).unwrap(),
            CollectOptions::default(),
        );
        primary.take_log().unwrap();
        let ram = GuestRam::new(&mem).unwrap();
        for pct in [1usize, 10] {
            let pages = scattered_pages(len / PAGE, len / PAGE * pct / 100);
            let mut g = c.benchmark_group("ram");
            g.throughput(Throughput::Bytes((pages.len() * PAGE) as u64));
            let mut buf = vec![0u8; pages.len() * PAGE];
            g.bench_function(format!("memcpy_gather/dirty_{pct}pct/{size}"), |b| {
                b.iter(|| gather_pages(black_box(host_slice(&mem, len)), &pages, &mut buf))
            });
            g.bench_function(format!("primary_round/dirty_{pct}pct/{size}"), |b| {
                b.iter_batched(
                    || {
                        // The guest (here the VMM, through vm-memory) writes the pages: not timed.
                        for &p in &pages {
                            mem.write_obj(7u8, GuestAddress((p * PAGE) as u64)).unwrap();
                        }
                    },
                    |()| {
                        let n = primary.take_log().unwrap();
                        let mut bytes = 0;
                        for run in primary.collect(&ram).unwrap() {
                            if let PageRun::Data { data, .. } = run.unwrap() {
                                bytes += black_box(data).len();
                            }
                        }
                        assert!(n >= pages.len() && bytes >= pages.len() * PAGE);
                    },
                    BatchSize::PerIteration,
                )
            });
            // The same round taking every page's CRC in the collection pass (what protocol v4 frames
            // carry), filled the way a sender takes it: the pass then reads whole pages, as the memcpy
            // gather does.
            g.bench_function(format!("primary_round_crcs/dirty_{pct}pct/{size}"), |b| {
                b.iter_batched(
                    || {
                        for &p in &pages {
                            mem.write_obj(7u8, GuestAddress((p * PAGE) as u64)).unwrap();
                        }
                    },
                    |()| {
                        primary.take_log().unwrap();
                        let mut runs = primary
                            .collect(&ram)
                            .unwrap()
                            .with_page_crcs(colo_proto::page_crc);
                        let (mut entries, mut crcs) = (Vec::new(), Vec::new());
                        assert!(runs.fill(usize::MAX, &mut entries, &mut crcs).unwrap());
                        let bytes: usize = black_box(&entries).iter().map(|(_, d)| d.len()).sum();
                        assert_eq!(black_box(crcs).len() * PAGE, bytes);
                    },
                    BatchSize::PerIteration,
                )
            });
            g.finish();
        }
    }
}

fn secondary_commit(c: &mut Criterion) {
    for (len, size) in sizes() {
        let src: Vec<u8> = (0..len).map(|i| (i / PAGE) as u8 | 1).collect();
        let svm = Mem::from_ranges(&[(GuestAddress(0), len)]).unwrap();
        let layout = RamLayout::of(&svm).unwrap();
        let mut cache = RamCache::new(layout, FlushOptions::default()).unwrap();
        let mut svm_log = AtomicBitmapLog::new(&svm).unwrap();
        let mut sram = GuestRam::new(&svm).unwrap();
        // Initial sync: every page of the SVM and the cache touched.
        cache.fill_from(&sram).unwrap();
        let mut scratch = vec![1u8; len];
        for pct in [1usize, 10] {
            let pages = scattered_pages(len / PAGE, len / PAGE * pct / 100);
            let packed: Vec<u8> = pages
                .iter()
                .flat_map(|&p| src[p * PAGE..][..PAGE].to_vec())
                .collect();
            let mut g = c.benchmark_group("ram");
            g.throughput(Throughput::Bytes((pages.len() * PAGE) as u64));
            g.bench_function(format!("memcpy_scatter/dirty_{pct}pct/{size}"), |b| {
                b.iter(|| scatter_pages(black_box(&packed), &pages, &mut scratch))
            });
            g.bench_function(format!("receive/dirty_{pct}pct/{size}"), |b| {
                b.iter(|| {
                    for (k, &p) in pages.iter().enumerate() {
                        cache
                            .receive((p * PAGE) as u64, &packed[k * PAGE..][..PAGE])
                            .unwrap();
                    }
                })
            });
            g.bench_function(format!("flush/dirty_{pct}pct/{size}"), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        // Pages into the cache (not timed), then the commit's flush into SVM memory.
                        for &p in &pages {
                            cache
                                .receive((p * PAGE) as u64, &src[p * PAGE..][..PAGE])
                                .unwrap();
                        }
                        let t = Instant::now();
                        let stats = cache.flush(&mut sram, &mut svm_log).unwrap();
                        total += t.elapsed();
                        assert_eq!(stats.flushed_pages, pages.len());
                    }
                    total
                })
            });
            g.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = primary_round, secondary_commit
}
criterion_main!(benches);
