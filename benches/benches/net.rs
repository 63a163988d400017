//! colo-net on the checkpoint path: the primary output an epoch held back (the SVM produced nothing yet, or
//! something different), released by the comparator's checkpoint, and the secondary rewriter's reset; beside
//! a memcpy of the same frame bytes.

mod common;

use std::hint::black_box;

use bytes::Bytes;
use colo_net::build::{tcp_segments, udp_pair};
use colo_net::{Action, Comparator, Config, Rewriter, RewriterConfig, Time};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn release_at_checkpoint(c: &mut Criterion) {
    for n in [64usize, 1024] {
        // PVM output of one epoch: UDP datagrams over many flows and a TCP stream of 1448-byte segments.
        let mut frames: Vec<Bytes> = (0..n / 2).map(|i| udp_pair(1000 + (i % 512) as u16).0).collect();
        let data: Vec<u8> = (0..(n / 2) * 1448).map(|i| (i * 7 % 251) as u8).collect();
        frames.extend(tcp_segments(2000, 7, 1, &data, 1448));
        let bytes: usize = frames.iter().map(|f| f.len()).sum();
        let mut g = c.benchmark_group("net");
        g.throughput(Throughput::Bytes(bytes as u64));
        let mut dst = vec![0u8; bytes];
        g.bench_function(format!("memcpy_frames/{n}frames"), |b| {
            b.iter(|| {
                let mut off = 0;
                for f in &frames {
                    dst[off..off + f.len()].copy_from_slice(black_box(f));
                    off += f.len();
                }
            })
        });
        g.bench_function(format!("checkpoint/hold_and_release/{n}frames"), |b| {
            b.iter(|| {
                let mut cmp = Comparator::new(Config::default(), Time::ZERO).unwrap();
                for f in &frames {
                    let _ = cmp.handle_primary(Time::from_millis(1), f.clone());
                }
                cmp.checkpoint(Time::from_millis(2));
                let mut released = 0;
                while let Some(a) = cmp.poll_action() {
                    if let Action::Release(f) = a {
                        released += f.len();
                    }
                }
                assert_eq!(released, bytes);
            })
        });
        g.finish();
    }
    let mut g = c.benchmark_group("net");
    let mut rw = Rewriter::new(RewriterConfig::default()).unwrap();
    g.bench_function("checkpoint/rewriter_reset", |b| b.iter(|| rw.checkpoint()));
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = release_at_checkpoint
}
criterion_main!(benches);
