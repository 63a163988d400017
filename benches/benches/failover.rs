//! colo-failover on the checkpoint path: what the secondary's role machine costs per checkpoint (load
//! started and finished, a heartbeat, draining actions and notices) and a fencing-gate check per released
//! output; beside the clock read every sans-IO call needs and a 64-byte memcpy (one small message).

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use colo_failover::{Config, Event, FenceGate, FenceToken, Node};
use criterion::{Criterion, criterion_group, criterion_main};

fn per_checkpoint(c: &mut Criterion) {
    let mut g = c.benchmark_group("failover");
    let src = [7u8; 64];
    let mut dst = [0u8; 64];
    g.bench_function("reference/memcpy_64B", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&src)))
    });
    g.bench_function("reference/instant_now", |b| b.iter(Instant::now));

    let t0 = Instant::now();
    let mut node = Node::new(Config::default()).unwrap();
    node.handle_event(t0, Event::Join).unwrap();
    node.handle_event(t0, Event::SyncCompleted).unwrap();
    while node.poll_action().is_some() {}
    while node.poll_notice().is_some() {}
    let mut now = t0;
    g.bench_function("secondary/checkpoint_load_and_heartbeat", |b| {
        b.iter(|| {
            now += Duration::from_micros(10);
            node.handle_event(now, Event::CheckpointLoadStarted).unwrap();
            node.handle_event(now, Event::CheckpointLoadFinished).unwrap();
            node.handle_event(now, Event::HeartbeatReceived).unwrap();
            node.handle_timeout(now);
            while node.poll_action().is_some() {}
            while node.poll_notice().is_some() {}
            black_box(node.status());
        })
    });
    let mut gate = FenceGate::new();
    let token = FenceToken::from_be_bytes(5u64.to_be_bytes());
    g.bench_function("fence_gate/check", |b| {
        b.iter(|| gate.check(black_box(token)).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = per_checkpoint
}
criterion_main!(benches);
