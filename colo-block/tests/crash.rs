//! Crash behaviour of the secondary: a simulated host crash at every single mutating operation of an
//! epoch, a checkpoint, another epoch and a failover commit. After each crash the devices are reopened,
//! [`recover`] runs, and the disk must be exactly one of the images allowed at that point, never a mix.
//!
//! Three crash models: every operation before the crash reached the medium; only flushed writes reached it
//! (volatile write cache); and the latter with the crashing write torn in half. The same scenario runs on
//! real raw image files in `raw_images.rs`.

mod common;

use colo_block::{FaultPlan, FaultyBackend, MemBackend, VolatileBackend};
use common::{Scenario, crash_at_every_step};

fn mem(len: u64, init: Option<&[u8]>) -> MemBackend {
    match init {
        Some(d) => MemBackend::from_vec(d.to_vec()).unwrap(),
        None => MemBackend::new(len).unwrap(),
    }
}

#[test]
fn crash_with_all_issued_writes_durable() {
    let sc = Scenario::new();
    let steps = crash_at_every_step(
        &sc,
        false,
        |plan: &FaultPlan, init: &[u8], jlen: u64| {
            (
                FaultyBackend::new(mem(0, Some(init)), plan.clone()),
                FaultyBackend::new(mem(jlen, None), plan.clone()),
                FaultyBackend::new(mem(jlen, None), plan.clone()),
            )
        },
        |d, h, a| (d.into_inner(), h.into_inner(), a.into_inner()),
        |_| {},
    );
    assert!(steps > 40, "scenario too short to be meaningful: {steps} steps");
}

#[test]
fn crash_losing_unflushed_writes() {
    let sc = Scenario::new();
    crash_at_every_step(
        &sc,
        false,
        |plan: &FaultPlan, init: &[u8], jlen: u64| {
            (
                FaultyBackend::new(VolatileBackend::new(mem(0, Some(init))), plan.clone()),
                FaultyBackend::new(VolatileBackend::new(mem(jlen, None)), plan.clone()),
                FaultyBackend::new(VolatileBackend::new(mem(jlen, None)), plan.clone()),
            )
        },
        |d, h, a| {
            (
                d.into_inner().crash(),
                h.into_inner().crash(),
                a.into_inner().crash(),
            )
        },
        |_| {},
    );
}

#[test]
fn crash_losing_unflushed_writes_with_torn_last_write() {
    let sc = Scenario::new();
    crash_at_every_step(
        &sc,
        true,
        |plan: &FaultPlan, init: &[u8], jlen: u64| {
            (
                FaultyBackend::new(VolatileBackend::new(mem(0, Some(init))), plan.clone()),
                FaultyBackend::new(VolatileBackend::new(mem(jlen, None)), plan.clone()),
                FaultyBackend::new(VolatileBackend::new(mem(jlen, None)), plan.clone()),
            )
        },
        |d, h, a| {
            (
                d.into_inner().crash(),
                h.into_inner().crash(),
                a.into_inner().crash(),
            )
        },
        |_| {},
    );
}

/// A small deterministic generator, so that a failure names its seed.
fn keep_fn(seed: u64) -> impl FnMut(u64) -> bool {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x.is_multiple_of(2)
    }
}

#[test]
fn crash_with_disk_writes_reaching_the_medium_before_journal_writes() {
    let sc = Scenario::new();
    crash_at_every_step(
        &sc,
        false,
        |plan: &FaultPlan, init: &[u8], jlen: u64| {
            (
                FaultyBackend::new(VolatileBackend::new(mem(0, Some(init))), plan.clone()),
                FaultyBackend::new(VolatileBackend::new(mem(jlen, None)), plan.clone()),
                FaultyBackend::new(VolatileBackend::new(mem(jlen, None)), plan.clone()),
            )
        },
        |d, h, a| {
            (
                d.into_inner().crash_keeping(|_| true).unwrap(),
                h.into_inner().crash(),
                a.into_inner().crash(),
            )
        },
        |_| {},
    );
}

#[test]
fn crash_with_random_subsets_of_unflushed_sectors_surviving() {
    let sc = Scenario::new();
    for seed in 0..8u64 {
        crash_at_every_step(
            &sc,
            seed % 2 == 1,
            |plan: &FaultPlan, init: &[u8], jlen: u64| {
                (
                    FaultyBackend::new(VolatileBackend::new(mem(0, Some(init))), plan.clone()),
                    FaultyBackend::new(VolatileBackend::new(mem(jlen, None)), plan.clone()),
                    FaultyBackend::new(VolatileBackend::new(mem(jlen, None)), plan.clone()),
                )
            },
            |d, h, a| {
                (
                    d.into_inner().crash_keeping(keep_fn(seed)).unwrap(),
                    h.into_inner().crash_keeping(keep_fn(seed + 100)).unwrap(),
                    a.into_inner().crash_keeping(keep_fn(seed + 200)).unwrap(),
                )
            },
            |_| {},
        );
    }
}

/// The journals' caches wrote back only their head (superblocks and the first record) and the disk's
/// cache everything: a commit mark without the records it covers is exactly what this exposes.
#[test]
fn crash_with_journal_heads_written_back_first() {
    let sc = Scenario::new();
    let head = (colo_block::store::JOURNAL_HEADER_BYTES + 512 + common::BLOCK as u64) / 512;
    crash_at_every_step(
        &sc,
        false,
        |plan: &FaultPlan, init: &[u8], jlen: u64| {
            (
                FaultyBackend::new(VolatileBackend::new(mem(0, Some(init))), plan.clone()),
                FaultyBackend::new(VolatileBackend::new(mem(jlen, None)), plan.clone()),
                FaultyBackend::new(VolatileBackend::new(mem(jlen, None)), plan.clone()),
            )
        },
        |d, h, a| {
            (
                d.into_inner().crash_keeping(|_| true).unwrap(),
                h.into_inner().crash_keeping(|s| s < head).unwrap(),
                a.into_inner().crash_keeping(|s| s < head).unwrap(),
            )
        },
        |_| {},
    );
}
