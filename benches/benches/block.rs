//! colo-block on the checkpoint path: an epoch's worth of 4 KiB guest writes forwarded by the primary,
//! applied on the secondary (old blocks to the hidden store), then the checkpoint barrier and commit; beside
//! a memcpy of the same bytes.

mod common;

use std::hint::black_box;

use bytes::Bytes;
use colo_block::{MemBackend, MemStore, Outgoing, PrimaryConfig, PrimaryDisk, SecondaryDisk};
use common::{PAGE, scattered_pages};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const DISK: u64 = 256 << 20;

fn epoch_commit(c: &mut Criterion) {
    for n in [64usize, 1024] {
        let blocks = scattered_pages((DISK / PAGE as u64) as usize, n);
        let payload = Bytes::from(vec![0x5au8; PAGE]);
        let mut g = c.benchmark_group("block");
        g.throughput(Throughput::Bytes((n * PAGE) as u64));
        let src = vec![0x5au8; n * PAGE];
        let mut dst = vec![0u8; n * PAGE];
        g.bench_function(format!("memcpy/{n}x4KiB"), |b| {
            b.iter(|| dst.copy_from_slice(black_box(&src)))
        });
        let mut primary = PrimaryDisk::new(MemBackend::new(DISK).unwrap(), PrimaryConfig::default());
        primary.start_replication().unwrap();
        let mut secondary = SecondaryDisk::new(
            MemBackend::new(DISK).unwrap(),
            MemStore::new(PAGE, 4096).unwrap(),
            MemStore::new(PAGE, 4096).unwrap(),
            0,
        )
        .unwrap();
        g.bench_function(format!("checkpoint/forward_apply_commit/{n}x4KiB"), |b| {
            b.iter(|| {
                for &blk in &blocks {
                    primary.write((blk * PAGE) as u64, payload.clone()).unwrap();
                }
                let epoch = primary.end_epoch().unwrap();
                while let Some(out) = primary.poll_outgoing().unwrap() {
                    match out {
                        Outgoing::Write(rec) => secondary.apply(&rec).unwrap(),
                        Outgoing::Discard(rec) => secondary.apply_discard(&rec).unwrap(),
                        Outgoing::Barrier { epoch } => secondary.handle_barrier(epoch).unwrap(),
                        Outgoing::SyncChunk { .. } | Outgoing::SyncDone => unreachable!("no sync"),
                    }
                }
                assert!(primary.barrier_handed_over(epoch));
                secondary.checkpoint().unwrap();
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = epoch_commit
}
criterion_main!(benches);
