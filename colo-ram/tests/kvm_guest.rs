//! A real KVM pair: a long-mode CPL3 guest on a "primary" VM writes a known set of pages (and the VMM
//! writes some through vm-memory); the dirty log must report every one of them; the pages go through
//! collection, the RAM cache and a flush into a "secondary" VM whose own guest has dirtied other pages; the
//! two memories must then be equal. Runs once with the plain KVM log and once with manual protect, and once
//! with a pre-copy round sent while the guest runs on another thread.
//!
//! Needs /dev/kvm; prints a loud SKIPPED line where it is missing (or when built without feature `kvm`).

#[cfg(not(feature = "kvm"))]
#[test]
fn kvm_pair_round_trip() {
    eprintln!("SKIPPED: colo-ram KVM tests need `--features kvm` (CI runs with --all-features)");
}

#[cfg(feature = "kvm")]
mod kvm {
    use std::sync::Arc;

    use colo_ram::{
        AtomicBitmapLog, CollectOptions, DirtyLog, DirtySet, FlushOptions, GuestRam, KvmDirtyLog,
        KvmManualDirtyLog, PAGE_SIZE, PageRun, PrimaryRam, RamCache, RamLayout, UnionLog,
    };
    use kvm_bindings::{
        KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, kvm_segment, kvm_userspace_memory_region,
    };
    use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    type Mem = GuestMemoryMmap<AtomicBitmap>;
    type Log = Box<dyn DirtyLog + Send>;

    /// Guest RAM: 4 MiB at 0 and 2 MiB at 16 MiB, two KVM slots.
    const RANGES: [(u64, usize); 2] = [(0, 4 << 20), (16 << 20, 2 << 20)];
    const GDT: u64 = 0x500;
    const PML4: u64 = 0x1000;
    const CODE: u64 = 0x4000;
    const TABLE: u64 = 0x5000;
    const EXIT_PORT: u16 = 0x10;

    /// for each address in [rsi .. rsi + 8*rcx): store the address at it and rdx 8 bytes further; then `out`.
    const GUEST_CODE: [u8; 23] = [
        0x48,
        0x8b,
        0x06, // mov rax, [rsi]
        0x48,
        0x89,
        0x00, // mov [rax], rax
        0x48,
        0x89,
        0x50,
        0x08, // mov [rax+8], rdx
        0x48,
        0x83,
        0xc6,
        0x08, // add rsi, 8
        0x48,
        0xff,
        0xc9, // dec rcx
        0x75,
        0xed, // jnz back to the first instruction
        0xe6,
        EXIT_PORT as u8, // out 0x10, al (allowed at CPL3 by IOPL=3)
        0xeb,
        0xfe, // jmp $ (never reached: the VMM resets RIP)
    ];

    struct Vm {
        vm: Arc<VmFd>,
        mem: Mem,
        vcpu: VcpuFd,
        log: Log,
    }

    fn kvm() -> Option<Kvm> {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("SKIPPED: /dev/kvm is missing; the colo-ram KVM pair test did not run");
            return None;
        }
        Some(Kvm::new().expect("/dev/kvm exists but cannot be opened"))
    }

    fn new_vm(kvm: &Kvm, manual: bool) -> Vm {
        let vm = Arc::new(kvm.create_vm().unwrap());
        let mem = Mem::from_ranges(&RANGES.map(|(g, l)| (GuestAddress(g), l))).unwrap();
        let layout = RamLayout::of(&mem).unwrap();
        let slots = vec![0, 1];
        // Manual protect must be enabled before the slots are registered.
        let kvm_log: Log = if manual {
            Box::new(KvmManualDirtyLog::new(Arc::clone(&vm), layout, slots).unwrap())
        } else {
            Box::new(KvmDirtyLog::new(Arc::clone(&vm), layout, slots).unwrap())
        };
        for (slot, region) in mem.iter().enumerate() {
            let host = mem.get_host_address(region.start_addr()).unwrap();
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping belongs to `mem`, which lives in the returned `Vm` as long as the VM.
            unsafe { vm.set_user_memory_region(r).unwrap() };
        }
        vm.set_tss_address(0xfffb_d000).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap())
            .unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 3,
            db,
            s: 1,
            l,
            g: 1,
            ..Default::default()
        };
        sregs.cs = seg(0x23, 0xb, 1, 0);
        let data = seg(0x1b, 0x3, 0, 1);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.gdt.base = GDT;
        sregs.gdt.limit = 5 * 8 - 1;
        sregs.cr3 = PML4;
        sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10); // PAE, OSFXSR, OSXMMEXCPT
        sregs.cr0 = 1 | (1 << 1) | (1 << 16) | (1 << 31); // PE, MP, WP, PG
        sregs.efer = (1 << 8) | (1 << 10); // LME, LMA
        vcpu.set_sregs(&sregs).unwrap();
        let log: Log = Box::new(UnionLog::new(kvm_log, AtomicBitmapLog::new(&mem).unwrap()));
        Vm { vm, mem, vcpu, log }
    }

    /// GDT, identity-mapped 1 GiB of 2 MiB user pages (0xFEC00000.. stays unmapped), the code.
    fn load_guest(mem: &Mem) {
        let gdt: [u64; 5] = [
            0,
            0x00af_9a00_0000_ffff,
            0x00cf_9200_0000_ffff,
            0x00cf_f200_0000_ffff,
            0x00af_fa00_0000_ffff,
        ];
        for (i, d) in gdt.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(GDT + 8 * i as u64)).unwrap();
        }
        const PRESENT_RW_USER: u64 = 0x7;
        mem.write_obj(0x2000 | PRESENT_RW_USER, GuestAddress(PML4))
            .unwrap();
        mem.write_obj(0x3000 | PRESENT_RW_USER, GuestAddress(0x2000))
            .unwrap();
        for i in 0..512u64 {
            mem.write_obj((i << 21) | PRESENT_RW_USER | 0x80, GuestAddress(0x3000 + 8 * i))
                .unwrap();
        }
        mem.write_slice(&GUEST_CODE, GuestAddress(CODE)).unwrap();
    }

    /// Runs the guest over `targets` (written by the VMM into the table page) with marker `rdx`.
    fn run_guest(vcpu: &mut VcpuFd, mem: &Mem, targets: &[u64], rdx: u64) {
        assert!(!targets.is_empty() && targets.len() <= 512);
        for (i, t) in targets.iter().enumerate() {
            mem.write_obj(*t, GuestAddress(TABLE + 8 * i as u64)).unwrap();
        }
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = CODE;
        regs.rsp = 0x8000 - 8;
        regs.rflags = 0x2 | (3 << 12); // IOPL = 3, IF = 0
        regs.rsi = TABLE;
        regs.rcx = targets.len() as u64;
        regs.rdx = rdx;
        vcpu.set_regs(&regs).unwrap();
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(EXIT_PORT, _) => {}
            other => panic!("guest did not reach its exit port: {other:?}"),
        }
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

    fn pair_round_trip(manual: bool) {
        let Some(kvm) = kvm() else { return };
        let Vm {
            vm: _pvm_fd,
            mem: pvm,
            vcpu: mut pvcpu,
            log: plog,
        } = new_vm(&kvm, manual);
        let Vm {
            vm: _svm_fd,
            mem: svm,
            vcpu: mut svcpu,
            log: mut slog,
        } = new_vm(&kvm, manual);
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
        let (pram, sram) = (GuestRam::new(&pvm).unwrap(), GuestRam::new(&svm).unwrap());

        // Initial sync: everything into the cache and the SVM; then the SVM's log starts clean.
        primary.mark_all().unwrap();
        for run in primary.collect(&pram).unwrap() {
            match run.unwrap() {
                PageRun::Data { gpa, data } => cache.load_initial(&sram, gpa, data).unwrap(),
                PageRun::Zero { gpa, pages } => cache.load_initial_zero(&sram, gpa, pages).unwrap(),
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
            "epoch 1 (manual={manual}): {pending} pages dirty, guest wrote {}, VMM {}",
            a.len(),
            v.len()
        );
        assert!(pending < 64, "the log over-reports wildly: {pending} pages");
        send(&mut primary, &pram, &mut cache);
        let stats = cache.flush(&sram, &mut slog).unwrap();
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
        eprintln!("epoch 2 (manual={manual}): {precopy} pages pre-copied, {paused} sent paused");
        cache.flush(&sram, &mut slog).unwrap();
        assert_equal(&pvm, &svm, "after checkpoint 2 (pre-copy)");
        // The cache itself holds the PVM's RAM.
        assert_eq!(snapshot(cache.memory()), snapshot(&pvm));
    }

    #[test]
    fn kvm_pair_round_trip_plain_log() {
        pair_round_trip(false);
    }

    #[test]
    fn kvm_pair_round_trip_manual_protect() {
        pair_round_trip(true);
    }
}
