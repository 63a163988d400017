//! Crash behaviour of the secondary: a simulated host crash at every single mutating operation of an
//! epoch, a checkpoint, another epoch and a failover commit. After each crash the devices are reopened,
//! [`recover`] runs, and the disk must be exactly one of the images allowed at that point, never a mix.
//!
//! Crash models: every operation before the crash reached the medium; only flushed writes reached it
//! (volatile write cache), also with the crashing write torn in half; the disk's cache written back but
//! not the journals'; only the journals' heads written back; random subsets of unflushed sectors
//! surviving. The same scenario runs on real raw image files in `raw_images.rs`.

mod common;

use colo_block::{FaultPlan, FaultyBackend, MemBackend, VolatileBackend};
use common::{Scenario, crash_at_every_step};

fn mem(len: u64, init: Option<&[u8]>) -> MemBackend {
    match init {
        Some(d) => MemBackend::from_vec(d.to_vec()).unwrap(),
        None => MemBackend::new(len).unwrap(),
    }
}

/// A device behind a volatile write cache, failing as its `FaultPlan` says.
type Cached = FaultyBackend<VolatileBackend<MemBackend>>;

/// A disk holding `init` and two blank journal devices of `jlen` bytes, each behind a volatile write
/// cache, all counting against `plan`.
fn cached_devices(plan: &FaultPlan, init: &[u8], jlen: u64) -> (Cached, Cached, Cached) {
    let cached = |medium| FaultyBackend::new(VolatileBackend::new(medium), plan.clone());
    (
        cached(mem(0, Some(init))),
        cached(mem(jlen, None)),
        cached(mem(jlen, None)),
    )
}

/// What reaches the medium of `dev` when the host crashes: what was flushed, plus the unflushed sectors
/// `keep` selects (written back by the cache before the crash).
fn survivor(dev: Cached, keep: impl FnMut(u64) -> bool) -> MemBackend {
    dev.into_inner().crash_keeping(keep).unwrap()
}

/// A crash in which the disk's cache had written back the unflushed sectors `disk` selects and each
/// journal's cache those `journal` selects.
fn written_back(
    disk: impl Fn(u64) -> bool + Copy,
    journal: impl Fn(u64) -> bool + Copy,
) -> impl Fn(Cached, Cached, Cached) -> (MemBackend, MemBackend, MemBackend) {
    move |d, h, a| (survivor(d, disk), survivor(h, journal), survivor(a, journal))
}

/// A crash in which every cache loses what was not flushed.
fn lose_unflushed(d: Cached, h: Cached, a: Cached) -> (MemBackend, MemBackend, MemBackend) {
    written_back(|_| false, |_| false)(d, h, a)
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
    crash_at_every_step(&Scenario::new(), false, cached_devices, lose_unflushed, |_| {});
}

#[test]
fn crash_losing_unflushed_writes_with_torn_last_write() {
    crash_at_every_step(&Scenario::new(), true, cached_devices, lose_unflushed, |_| {});
}

#[test]
fn crash_with_disk_writes_reaching_the_medium_before_journal_writes() {
    let crash = written_back(|_| true, |_| false);
    crash_at_every_step(&Scenario::new(), false, cached_devices, crash, |_| {});
}

#[test]
fn crash_with_random_subsets_of_unflushed_sectors_surviving() {
    let sc = Scenario::new();
    for seed in 0..8u64 {
        crash_at_every_step(
            &sc,
            seed % 2 == 1,
            cached_devices,
            |d, h, a| {
                (
                    survivor(d, keep_fn(seed)),
                    survivor(h, keep_fn(seed + 100)),
                    survivor(a, keep_fn(seed + 200)),
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
    let head = (colo_block::store::JOURNAL_HEADER_BYTES + 512 + common::BLOCK as u64) / 512;
    let crash = written_back(|_| true, move |s| s < head);
    crash_at_every_step(&Scenario::new(), false, cached_devices, crash, |_| {});
}
