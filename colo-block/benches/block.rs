//! Criterion benches of colo-block's public APIs, each beside its physical reference: the raw file for the
//! write paths, memcpy for overlay copies.

use std::cell::RefCell;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use colo_block::{
    BlockBackend, MemBackend, MemStore, PrimaryConfig, PrimaryDisk, RawFile, SecondaryDisk, WriteId,
    WriteRecord,
};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

const DISK: u64 = 64 << 20;

fn offsets(size: usize, n: usize) -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let slots = DISK / size as u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % slots * size as u64
        })
        .collect()
}

fn file(dir: &tempfile::TempDir, name: &str) -> RawFile {
    let mut f = RawFile::create(dir.path().join(name), DISK).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for off in (0..DISK).step_by(zeros.len()) {
        f.write_at(off, &zeros).unwrap();
    }
    // Written back before timing starts, so no pass waits for the fill's writeback.
    f.flush().unwrap();
    f
}

fn write_paths(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    // Both paths write the same file, so both see the same page-cache state.
    let mut raw = file(&dir, "disk.raw");
    let mut primary = PrimaryDisk::new(
        RawFile::open(dir.path().join("disk.raw")).unwrap(),
        PrimaryConfig {
            max_backlog_bytes: u64::MAX,
            ..PrimaryConfig::default()
        },
    );
    primary.start_replication().unwrap();
    for size in [4096usize, 65536] {
        let mut g = c.benchmark_group(format!("block/write/{}k", size / 1024));
        g.throughput(Throughput::Bytes(size as u64));
        let offs = offsets(size, 4096);
        let data = Bytes::from(vec![0x5au8; size]);
        let mut i = 0;
        g.bench_function("raw_file", |b| {
            b.iter(|| {
                i = (i + 1) % offs.len();
                raw.write_at(offs[i], &data).unwrap();
            })
        });
        g.bench_function("primary_async", |b| {
            b.iter(|| {
                i = (i + 1) % offs.len();
                primary.write(offs[i], data.clone()).unwrap();
                black_box(primary.poll_outgoing().unwrap());
            })
        });
        g.finish();
    }
}

fn secondary_apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("block/secondary_apply/64x4k");
    let offs = offsets(4096, 64);
    g.throughput(Throughput::Bytes(64 * 4096));
    let data = Bytes::from(vec![1u8; 4096]);
    let mut raw = MemBackend::new(DISK).unwrap();
    g.bench_function("raw_mem_write", |b| {
        b.iter(|| {
            for &o in &offs {
                raw.write_at(o, &data).unwrap();
            }
        })
    });
    let mut sec = SecondaryDisk::new(
        MemBackend::new(DISK).unwrap(),
        MemStore::new(4096, 128).unwrap(),
        MemStore::new(4096, 16).unwrap(),
        0,
    )
    .unwrap();
    let mut epoch = 0u64;
    g.bench_function("mem_hidden", |b| {
        b.iter(|| {
            let recs: Vec<WriteRecord> = offs
                .iter()
                .enumerate()
                .map(|(n, &o)| WriteRecord {
                    id: WriteId(n as u64),
                    epoch,
                    offset: o,
                    data: data.clone(),
                })
                .collect();
            sec.apply_batch(&recs).unwrap();
            sec.handle_barrier(epoch).unwrap();
            epoch = sec.checkpoint().unwrap();
        })
    });
    g.finish();
}

fn checkpoint_drop(c: &mut Criterion) {
    let mut g = c.benchmark_group("block/checkpoint_drop");
    for n in [1_000u64, 10_000] {
        let sec = RefCell::new(
            SecondaryDisk::new(
                MemBackend::new(n * 4096).unwrap(),
                MemStore::new(4096, 16).unwrap(),
                MemStore::new(4096, n as usize).unwrap(),
                0,
            )
            .unwrap(),
        );
        let block = vec![3u8; 4096];
        g.bench_function(format!("mem_active/{}k_blocks", n / 1000), |b| {
            b.iter_batched(
                || {
                    let mut sec = sec.borrow_mut();
                    for i in 0..n {
                        sec.svm_write(i * 4096, &block).unwrap();
                    }
                    let epoch = sec.epoch();
                    sec.handle_barrier(epoch).unwrap();
                },
                |()| sec.borrow_mut().checkpoint().unwrap(),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
    let mut g = c.benchmark_group("block/memcpy_reference");
    let src = vec![1u8; 1 << 20];
    let mut dst = vec![0u8; 1 << 20];
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("1MiB", |b| b.iter(|| dst.copy_from_slice(black_box(&src))));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    targets = write_paths, secondary_apply, checkpoint_drop
}
criterion_main!(benches);
