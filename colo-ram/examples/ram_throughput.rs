//! RAM cache flush throughput against a plain scattered memcpy of the same pages, measured in one run.
//!
//! ```text
//! cargo run --release -p colo-ram --example ram_throughput -- --json [--size-mib 1024] [--dirty-pct 10]
//!     [--threads 2] [--iters 7]
//! ```
//!
//! Prints `flush_gbps` (the flush of `dirty-pct`% random pages of `size-mib` MiB guest RAM on `threads`
//! threads), `memcpy_gbps` (2-thread scattered 4 KiB memcpy of the same pages), `ratio`, plus clean-bitmap
//! iteration time for a 4 GiB guest and collection throughput with zero detection. Medians of `iters`
//! interleaved repetitions.

use std::time::{Duration, Instant};

use colo_ram::{
    CollectOptions, DirtyBitmap, DirtyLog, DirtySet, FlushOptions, GuestRam, PAGE_SIZE, RamCache, RamError,
    RamLayout, collect,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

struct Args {
    json: bool,
    size_mib: usize,
    dirty_pct: f64,
    threads: usize,
    iters: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        json: false,
        size_mib: 1024,
        dirty_pct: 10.0,
        threads: 2,
        iters: 7,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--json" => a.json = true,
            "--size-mib" => {
                a.size_mib = val("--size-mib")?
                    .parse()
                    .map_err(|e| format!("--size-mib: {e}"))?
            }
            "--dirty-pct" => {
                a.dirty_pct = val("--dirty-pct")?
                    .parse()
                    .map_err(|e| format!("--dirty-pct: {e}"))?
            }
            "--threads" => a.threads = val("--threads")?.parse().map_err(|e| format!("--threads: {e}"))?,
            "--iters" => a.iters = val("--iters")?.parse().map_err(|e| format!("--iters: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.size_mib == 0 || !(0.0..=100.0).contains(&a.dirty_pct) || a.iters == 0 || a.threads == 0 {
        return Err("sizes, threads and iters must be positive; dirty-pct in 0..=100".into());
    }
    Ok(a)
}

struct FixedLog(DirtySet);

impl DirtyLog for FixedLog {
    fn take_into(&mut self, set: &mut DirtySet) -> Result<(), RamError> {
        set.union_with(&self.0)
    }
}

fn random_map(pages: usize, fraction: f64, seed: u64) -> DirtyBitmap {
    let mut map = DirtyBitmap::new(pages);
    let threshold = (fraction * u32::MAX as f64) as u64;
    let mut x = seed | 1;
    for p in 0..pages {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if fraction >= 1.0 || (x & 0xffff_ffff) < threshold {
            let _ = map.set(p);
        }
    }
    map
}

fn scattered_memcpy(src: usize, dst: usize, pages: &[usize], threads: usize) {
    let chunk = pages.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for part in pages.chunks(chunk) {
            s.spawn(move || {
                for &p in part {
                    // SAFETY: `src` and `dst` are distinct mappings of the whole guest RAM that outlive the
                    // scope; `p` is a page inside them; threads copy disjoint pages.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            (src + p * PAGE_SIZE) as *const u8,
                            (dst + p * PAGE_SIZE) as *mut u8,
                            PAGE_SIZE,
                        )
                    };
                }
            });
        }
    });
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn main() -> anyhow::Result<()> {
    let args = parse().map_err(anyhow::Error::msg)?;
    let size = args.size_mib << 20;
    let svm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])?;
    // Fault every page in: untouched anonymous pages all map the shared zero page.
    let zeros = vec![0u8; 1 << 20];
    for off in (0..size).step_by(zeros.len()) {
        svm.write_slice(&zeros[..zeros.len().min(size - off)], GuestAddress(off as u64))?;
    }
    let layout = RamLayout::of(&svm)?;
    let mut cache = RamCache::new(
        layout.clone(),
        FlushOptions {
            threads: args.threads,
            parallel_threshold_pages: 1024,
        },
    )?;
    let mut sram = GuestRam::new(&svm)?;
    cache.fill_from(&sram)?; // fault every page in before measuring

    let map = random_map(size / PAGE_SIZE, args.dirty_pct / 100.0, 0x5eed);
    let pages: Vec<usize> = map.iter_pages().collect();
    let bytes = pages.len() * PAGE_SIZE;
    let mut set = DirtySet::new(layout.clone());
    set.region_mut(0)
        .ok_or_else(|| anyhow::anyhow!("no region"))?
        .union_with(&map)?;
    let mut log = FixedLog(set.clone());
    let src = cache.memory().get_host_address(GuestAddress(0))? as usize;
    let dst = svm.get_host_address(GuestAddress(0))? as usize;

    let (mut flush_t, mut memcpy_t) = (Vec::new(), Vec::new());
    for _ in 0..args.iters {
        let t = Instant::now();
        cache.flush(&mut sram, &mut log)?;
        flush_t.push(t.elapsed());
        let t = Instant::now();
        scattered_memcpy(src, dst, &pages, 2);
        memcpy_t.push(t.elapsed());
    }
    let (flush_d, memcpy_d) = (median(flush_t.clone()), median(memcpy_t.clone()));

    // Clean 4 GiB bitmap iteration.
    let clean = DirtyBitmap::new((4usize << 30) / PAGE_SIZE);
    let mut iter_t = Vec::new();
    for _ in 0..args.iters.max(5) {
        let t = Instant::now();
        std::hint::black_box(clean.runs().count());
        iter_t.push(t.elapsed());
    }

    // Collection with zero detection over the same dirty set: half the pages hold data.
    for (i, p) in pages.iter().enumerate() {
        if i % 2 == 0 {
            svm.write_obj(1u8, GuestAddress((p * PAGE_SIZE) as u64))?;
        }
    }
    let mut collect_t = Vec::new();
    for _ in 0..args.iters {
        let t = Instant::now();
        let mut n = 0;
        for run in collect(&set, &sram, CollectOptions::default())? {
            n += run?.pages();
        }
        std::hint::black_box(n);
        collect_t.push(t.elapsed());
    }

    let out = serde_json::json!({
        "size_mib": args.size_mib,
        "dirty_pct": args.dirty_pct,
        "dirty_pages": pages.len(),
        "flush_threads": args.threads,
        "flush_gbps": gbps(bytes, flush_d),
        "memcpy_gbps": gbps(bytes, memcpy_d),
        "ratio": memcpy_d.as_secs_f64() / flush_d.as_secs_f64(),
        "flush_ms": flush_d.as_secs_f64() * 1e3,
        "memcpy_ms": memcpy_d.as_secs_f64() * 1e3,
        "flush_gbps_min_max": [gbps(bytes, *flush_t.iter().max().unwrap_or(&flush_d)), gbps(bytes, *flush_t.iter().min().unwrap_or(&flush_d))],
        "memcpy_gbps_min_max": [gbps(bytes, *memcpy_t.iter().max().unwrap_or(&memcpy_d)), gbps(bytes, *memcpy_t.iter().min().unwrap_or(&memcpy_d))],
        "clean_bitmap_4gib_us": median(iter_t).as_secs_f64() * 1e6,
        "collect_zero_detect_gbps": gbps(bytes, median(collect_t)),
        "iters": args.iters,
    });
    if args.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
