//! A minimal long-mode CPL3 guest on real KVM that writes a given list of pages, shared by the KVM test and
//! the `kvm_dirty_log` example. The VMM builds the GDT, identity page tables (2 MiB user pages over the
//! first 1 GiB; 0xFEC00000.. stays unmapped), and a few bytes of hand-assembled code.

use std::sync::Arc;

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, kvm_segment, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

pub type Mem = GuestMemoryMmap<AtomicBitmap>;

pub const GDT: u64 = 0x500;
pub const PML4: u64 = 0x1000;
pub const CODE: u64 = 0x4000;
/// The list of addresses the guest writes: up to [`MAX_TARGETS`] u64s (64 KiB).
pub const TABLE: u64 = 0x80000;
pub const MAX_TARGETS: usize = 8192;
pub const EXIT_PORT: u16 = 0x10;

/// For each address in [rsi .. rsi + 8*rcx): store the address at it and rdx 8 bytes further; then `out`.
#[rustfmt::skip]
const GUEST_CODE: [u8; 23] = [
    0x48, 0x8b, 0x06,       // mov rax, [rsi]
    0x48, 0x89, 0x00,       // mov [rax], rax
    0x48, 0x89, 0x50, 0x08, // mov [rax+8], rdx
    0x48, 0x83, 0xc6, 0x08, // add rsi, 8
    0x48, 0xff, 0xc9,       // dec rcx
    0x75, 0xed,             // jnz back to the first instruction
    0xe6, EXIT_PORT as u8,  // out 0x10, al (allowed at CPL3 by IOPL=3)
    0xeb, 0xfe,             // jmp $ (never reached: the VMM resets RIP)
];

/// A VM with `ranges` of guest RAM as slots 0, 1, ... (dirty logging on) and one vCPU in long mode at CPL3.
/// `prepare` runs after the VM exists and before the slots are registered (to enable capabilities).
pub fn create_vm<T>(
    kvm: &Kvm,
    ranges: &[(u64, usize)],
    prepare: impl FnOnce(&Arc<VmFd>, &Mem) -> T,
) -> (Arc<VmFd>, Mem, VcpuFd, T) {
    let vm = Arc::new(kvm.create_vm().unwrap());
    let mem = Mem::from_ranges(
        &ranges
            .iter()
            .map(|&(g, l)| (GuestAddress(g), l))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let prepared = prepare(&vm, &mem);
    for (slot, region) in mem.iter().enumerate() {
        let host = mem.get_host_address(region.start_addr()).unwrap();
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping belongs to `mem`, returned next to the VM; callers drop the VM first or
        // together with it, and KVM holds no reference past the VM's lifetime.
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
    (vm, mem, vcpu, prepared)
}

/// Writes the GDT (null, ring-0 code/data, ring-3 data/code), the page tables and the code into `mem`.
pub fn load_guest(mem: &Mem) {
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
    const HUGE: u64 = 0x80;
    mem.write_obj(0x2000 | PRESENT_RW_USER, GuestAddress(PML4))
        .unwrap();
    mem.write_obj(0x3000 | PRESENT_RW_USER, GuestAddress(0x2000))
        .unwrap();
    for i in 0..512u64 {
        mem.write_obj((i << 21) | PRESENT_RW_USER | HUGE, GuestAddress(0x3000 + 8 * i))
            .unwrap();
    }
    mem.write_slice(&GUEST_CODE, GuestAddress(CODE)).unwrap();
}

/// Runs the guest over `targets` (the VMM writes them into the table first) with marker `rdx`.
pub fn run_guest(vcpu: &mut VcpuFd, mem: &Mem, targets: &[u64], rdx: u64) {
    assert!(!targets.is_empty() && targets.len() <= MAX_TARGETS);
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

/// Opens /dev/kvm, or prints a loud skip line and returns `None` where it is missing.
pub fn kvm_or_skip(what: &str) -> Option<Kvm> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm is missing; {what} did not run");
        return None;
    }
    Some(Kvm::new().expect("/dev/kvm exists but cannot be opened"))
}
