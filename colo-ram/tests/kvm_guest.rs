//! A real KVM pair: a long-mode CPL3 guest on a "primary" VM writes a known set of pages (and the VMM
//! writes some through vm-memory); the dirty log must report every one of them; the pages go through
//! collection, the RAM cache and a flush into a "secondary" VM whose own guest has dirtied other pages; the
//! two memories must then be equal. Runs with the plain KVM log, with manual protect and with the dirty ring, each
//! with a pre-copy round sent while the guest runs on another thread.
//!
//! Needs /dev/kvm; prints a loud SKIPPED line where it is missing (or when built without feature `kvm`).

#[cfg(not(feature = "kvm"))]
#[test]
fn kvm_pair_round_trip() {
    eprintln!("SKIPPED: colo-ram KVM tests need `--features kvm` (CI runs with --all-features)");
}

#[cfg(feature = "kvm")]
#[path = "support/cpl3.rs"]
#[allow(dead_code)] // shared with the example and colo-bench, which use other parts of it
mod cpl3;

#[cfg(feature = "kvm")]
mod kvm {
    use std::sync::Arc;

    use colo_ram::{
        AtomicBitmapLog, CollectOptions, DirtyLog, DirtySet, FlushOptions, GuestRam, KvmDirtyLog,
        KvmDirtyRing, KvmManualDirtyLog, PAGE_SIZE, PageRun, PrimaryRam, RamCache, RamLayout, UnionLog,
    };
    use kvm_ioctls::{VcpuFd, VmFd};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    use super::cpl3::{Mem, TABLE, create_vm, kvm_or_skip, load_guest, run_guest};

    type Log = Box<dyn DirtyLog + Send>;

    /// Guest RAM: 4 MiB at 0 and 2 MiB at 16 MiB, two KVM slots.
    const RANGES: [(u64, usize); 2] = [(0, 4 << 20), (16 << 20, 2 << 20)];

    #[derive(Clone, Copy, Debug)]
    enum Kind {
        Plain,
        Manual,
        Ring,
    }

    const RING_ENTRIES: u32 = 4096;

    /// A VM whose dirty log is KVM's (plain, manual protect or dirty ring) OR the VMM's vm-memory writes.
    fn new_vm(kvm: &kvm_ioctls::Kvm, kind: Kind) -> (Mem, VcpuFd, Log) {
        let (vm, mem, vcpu, kvm_log) = create_vm(kvm, &RANGES, |vm, mem| -> Option<Log> {
            let layout = RamLayout::of(mem).unwrap();
            // Manual protect and the ring are enabled before the slots and vCPUs exist.
            match kind {
                Kind::Plain => Some(Box::new(
                    KvmDirtyLog::new(Arc::clone(vm), layout, vec![0, 1]).unwrap(),
                )),
                Kind::Manual => Some(Box::new(
                    KvmManualDirtyLog::new(Arc::clone(vm), layout, vec![0, 1]).unwrap(),
                )),
                Kind::Ring => {
                    KvmDirtyRing::<Arc<VmFd>>::enable(vm, RING_ENTRIES).unwrap();
                    None
                }
            }
        });
        let kvm_log = kvm_log.unwrap_or_else(|| {
            let layout = RamLayout::of(&mem).unwrap();
            Box::new(KvmDirtyRing::new(vm, layout, vec![0, 1], &[&vcpu], RING_ENTRIES).unwrap())
        });
        let log: Log = Box::new(UnionLog::new(kvm_log, AtomicBitmapLog::new(&mem).unwrap()));
        (mem, vcpu, log)
    }

    fn snapshot<M: GuestMemoryBackend>(mem: &M) -> Vec<u8> {
        let ram = GuestRam::new(mem).unwrap();
        let mut out = Vec::new();
        for r in ram.layout().regions() {
            let mut buf = vec![0; r.len as usize];
            ram.read(r.gpa, &mut buf).unwrap();
            out.extend(buf);
        }
        out
    }

    fn send(primary: &mut PrimaryRam<Log>, pram: &GuestRam<'_>, cache: &mut RamCache) -> usize {
        let mut pages = 0;
        for run in primary.collect(pram).unwrap() {
            let run = run.unwrap();
            pages += run.pages();
            match run {
                PageRun::Data { gpa, data } => cache.receive(gpa, data).unwrap(),
                PageRun::Zero { gpa, pages } => cache.receive_zero(gpa, pages).unwrap(),
            }
        }
        pages
    }

    fn assert_equal(pvm: &Mem, svm: &Mem, what: &str) {
        let (a, b) = (snapshot(pvm), snapshot(svm));
        if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!("{what}: PVM and SVM memories differ first at offset {i:#x}");
        }
    }

    fn pair_round_trip(kind: Kind) {
        let Some(kvm) = kvm_or_skip("the colo-ram KVM pair test") else {
            return;
        };
        let (pvm, mut pvcpu, plog) = new_vm(&kvm, kind);
        let (svm, mut svcpu, mut slog) = new_vm(&kvm, kind);
        load_guest(&pvm);
        let layout = RamLayout::of(&pvm).unwrap();
        let mut primary = PrimaryRam::new(layout.clone(), plog, CollectOptions::default());
        let mut cache = RamCache::new(
            layout.clone(),
            FlushOptions {
                threads: 2,
                parallel_threshold_pages: 64,
            },
        )
        .unwrap();
        let (pram, mut sram) = (GuestRam::new(&pvm).unwrap(), GuestRam::new(&svm).unwrap());

        // Initial sync: everything into the cache and the SVM; then the SVM's log starts clean.
        primary.mark_all().unwrap();
        for run in primary.collect(&pram).unwrap() {
            match run.unwrap() {
                PageRun::Data { gpa, data } => cache.load_initial(&mut sram, gpa, data).unwrap(),
                PageRun::Zero { gpa, pages } => cache.load_initial_zero(&mut sram, gpa, pages).unwrap(),
            }
        }
        slog.take_into(&mut DirtySet::new(layout.clone())).unwrap();
        assert_equal(&pvm, &svm, "after the initial sync");

        // Epoch 1: the PVM guest writes A, the VMM writes V, the SVM guest writes S (partly overlapping).
        let a = [
            0x10000, 0x11000, 0x12000, 0x30000, 0x200000, 0x3ff000, 0x100_0000, 0x100_1000, 0x11f_f000,
        ];
        let v = [(0x20000u64, 8usize), (0x110_0000, PAGE_SIZE), (0x3fe_ff0, 32)];
        let s = [0x10000, 0x40000, 0x100_2000, 0x11f_e000];
        run_guest(&mut pvcpu, &pvm, &a, 0x1111);
        for (gpa, len) in v {
            pvm.write_slice(&vec![0xc5; len], GuestAddress(gpa)).unwrap();
        }
        run_guest(&mut svcpu, &svm, &s, 0x2222);
        assert_ne!(snapshot(&pvm), snapshot(&svm));

        let pending = primary.take_log().unwrap();
        let dirty = primary.pending();
        for gpa in a.iter().chain(&[TABLE]) {
            assert!(dirty.contains(*gpa), "the KVM log missed guest page {gpa:#x}");
        }
        for (gpa, len) in v {
            assert!(
                dirty.contains(gpa) && dirty.contains(gpa + len as u64 - 1),
                "VMM write at {gpa:#x} missed"
            );
        }
        eprintln!(
            "epoch 1 ({kind:?}): {pending} pages dirty, guest wrote {}, VMM {}",
            a.len(),
            v.len()
        );
        assert!(pending < 64, "the log over-reports wildly: {pending} pages");
        send(&mut primary, &pram, &mut cache);
        let stats = cache.flush(&mut sram, &mut slog).unwrap();
        assert!(
            stats.flushed_pages >= pending + 3,
            "the SVM's own dirty pages were not flushed: {stats:?}"
        );
        assert_equal(&pvm, &svm, "after checkpoint 1");

        // Epoch 2: the guest writes B; a pre-copy round sends B while the guest, on another thread, writes
        // B2 (half of B and some new pages); the paused round must then hold every page of B2.
        let b: Vec<u64> = (0..300u64)
            .map(|i| 0x100000 + i * 0x1000)
            .chain([0x100_0000, 0x120_0000 - 0x1000])
            .collect();
        let b2: Vec<u64> = b
            .iter()
            .step_by(2)
            .copied()
            .chain((0..50u64).map(|i| 0x300000 + i * 0x1000))
            .collect();
        for chunk in b.chunks(200) {
            run_guest(&mut pvcpu, &pvm, chunk, 0x3333);
        }
        let before = primary.take_log().unwrap();
        let precopy = std::thread::scope(|sc| {
            let guest = sc.spawn(|| {
                for (i, chunk) in b2.chunks(100).enumerate() {
                    run_guest(&mut pvcpu, &pvm, chunk, 0x5555 + i as u64);
                }
            });
            let sent = send(&mut primary, &pram, &mut cache);
            guest.join().unwrap();
            sent
        });
        assert!(precopy >= b.len() && before >= b.len());
        run_guest(&mut svcpu, &svm, &s[1..], 0x4444);
        let paused = primary.take_log().unwrap();
        for gpa in &b2 {
            assert!(
                primary.pending().contains(*gpa),
                "page {gpa:#x} written during pre-copy is not re-sent"
            );
        }
        send(&mut primary, &pram, &mut cache);
        eprintln!("epoch 2 ({kind:?}): {precopy} pages pre-copied, {paused} sent paused");
        cache.flush(&mut sram, &mut slog).unwrap();
        assert_equal(&pvm, &svm, "after checkpoint 2 (pre-copy)");
        // The cache itself holds the PVM's RAM.
        assert_eq!(snapshot(cache.memory()), snapshot(&pvm));
    }

    #[test]
    fn kvm_pair_round_trip_plain_log() {
        pair_round_trip(Kind::Plain);
    }

    #[test]
    fn kvm_pair_round_trip_manual_protect() {
        pair_round_trip(Kind::Manual);
    }

    #[test]
    fn kvm_pair_round_trip_dirty_ring() {
        pair_round_trip(Kind::Ring);
    }
}
