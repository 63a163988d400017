//! Plain `KVM_GET_DIRTY_LOG` against manual protect (`KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG`) and the
//! per-vCPU dirty ring (65536 entries) on a real
//! 1 GiB guest: the cost of one `take_into` when clean and after the guest dirtied 1% and 10% of its pages,
//! and the guest's own time to dirty them (write-protect faults after the reset).
//!
//! ```text
//! cargo run --release -p colo-ram --features kvm --example kvm_dirty_log -- [--rounds 5]
//! ```
//!
//! Prints one JSON object. Needs /dev/kvm (prints a SKIPPED line without it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use colo_ram::{DirtyLog, DirtySet, KvmDirtyLog, KvmDirtyRing, KvmManualDirtyLog, PAGE_SIZE, RamLayout};
use kvm_ioctls::VmFd;

#[path = "../tests/support/cpl3.rs"]
#[allow(dead_code)]
mod cpl3;

const GIB: usize = 1 << 30;

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Plain,
    Manual,
    Ring,
}

const RING_ENTRIES: u32 = 65536;

fn measure(kvm: &kvm_ioctls::Kvm, kind: Kind, rounds: usize) -> serde_json::Value {
    let (vm, mem, mut vcpu, log) =
        cpl3::create_vm(kvm, &[(0, GIB)], |vm, mem| -> Option<Box<dyn DirtyLog>> {
            let layout = RamLayout::of(mem).unwrap();
            match kind {
                Kind::Plain => Some(Box::new(
                    KvmDirtyLog::new(Arc::clone(vm), layout, vec![0]).unwrap(),
                )),
                Kind::Manual => Some(Box::new(
                    KvmManualDirtyLog::new(Arc::clone(vm), layout, vec![0]).unwrap(),
                )),
                Kind::Ring => {
                    KvmDirtyRing::<Arc<VmFd>>::enable(vm, RING_ENTRIES).unwrap();
                    None
                }
            }
        });
    let mut log = log.unwrap_or_else(|| {
        let layout = RamLayout::of(&mem).unwrap();
        Box::new(KvmDirtyRing::new(vm, layout, vec![0], &[&vcpu], RING_ENTRIES).unwrap())
    });
    cpl3::load_guest(&mem);
    let mut set = DirtySet::new(RamLayout::of(&mem).unwrap());
    cpl3::run_guest(&mut vcpu, &mem, &[0x200000], 1);
    log.take_into(&mut set).unwrap();

    let mut clean = Vec::new();
    for _ in 0..20 {
        set.clear();
        let t = Instant::now();
        log.take_into(&mut set).unwrap();
        clean.push(t.elapsed());
    }
    let mut out = serde_json::json!({ "clean_take_us": median(clean) * 1e6 });
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (name, permille, rounds) in [("1pct", 10usize, rounds), ("10pct", 100, rounds.div_ceil(2))] {
        let pages = GIB / PAGE_SIZE * permille / 1000;
        let (mut take, mut guest, mut reported) = (Vec::new(), Vec::new(), 0);
        for _ in 0..rounds {
            // Random distinct-enough pages above 2 MiB (the code, tables and target list live below).
            let targets: Vec<u64> = (0..pages)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (2 << 20) + (x % ((GIB as u64 - (2 << 20)) / PAGE_SIZE as u64)) * PAGE_SIZE as u64
                })
                .collect();
            let t = Instant::now();
            for chunk in targets.chunks(cpl3::MAX_TARGETS) {
                cpl3::run_guest(&mut vcpu, &mem, chunk, 7);
            }
            guest.push(t.elapsed());
            set.clear();
            let t = Instant::now();
            log.take_into(&mut set).unwrap();
            take.push(t.elapsed());
            reported = set.count();
        }
        out[format!("dirty_{name}_take_us")] = (median(take) * 1e6).into();
        out[format!("dirty_{name}_guest_ms")] = (median(guest) * 1e3).into();
        out[format!("dirty_{name}_reported_pages")] = reported.into();
    }
    out
}

fn main() -> anyhow::Result<()> {
    let mut rounds = 5;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => {
                rounds = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--rounds needs a value"))?
                    .parse()?
            }
            "--json" => {}
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let Some(kvm) = cpl3::kvm_or_skip("the kvm_dirty_log benchmark") else {
        return Ok(());
    };
    let plain = measure(&kvm, Kind::Plain, rounds.max(1));
    let manual = measure(&kvm, Kind::Manual, rounds.max(1));
    let ring = measure(&kvm, Kind::Ring, rounds.max(1));
    let out =
        serde_json::json!({ "slot_gib": 1, "plain": plain, "manual_protect": manual, "dirty_ring": ring });
    println!("{out}");
    Ok(())
}
