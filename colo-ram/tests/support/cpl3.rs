//! A minimal long-mode CPL3 guest on real KVM that writes a given list of pages. One copy, shared by
//! colo-ram's KVM test and `kvm_dirty_log` example and by colo-bench's checkpoint benchmark (each includes
//! this file with `#[path]`, so the crates stay independent of each other).
//!
//! The VMM builds the GDT at 0x500 (null, ring-0 code and data, ring-3 data and code), identity page tables
//! at 0x1000..0x4000 (2 MiB user pages over the first 1 GiB; 0xFEC00000.. stays unmapped), a few bytes of
//! hand-assembled code at 0x4000 and the stack below 0x8000. The guest runs at CPL3 (native speed under
//! nested KVM) and writes every page named in a table of u64 addresses the VMM fills.
//!
//! The `try_` functions return errors (for the benchmark); the short names panic (for tests and examples).

use std::sync::Arc;

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, kvm_regs, kvm_segment, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest memory with vm-memory's write bitmap (the VMM's own writes).
pub type Mem = GuestMemoryMmap<AtomicBitmap>;

/// Any setup or run failure, with its context in the message.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

pub const GDT: u64 = 0x500;
pub const PML4: u64 = 0x1000;
pub const PDPT: u64 = 0x2000;
pub const PD: u64 = 0x3000;
pub const CODE: u64 = 0x4000;
pub const STACK_TOP: u64 = 0x8000;
/// Largest guest the page tables map (one page directory of 2 MiB pages).
pub const MAX_MEM: u64 = 1 << 30;
/// The table of addresses [`run_guest`] uses: up to [`MAX_TARGETS`] u64s (64 KiB).
pub const TABLE: u64 = 0x80000;
pub const MAX_TARGETS: usize = 8192;
pub const EXIT_PORT: u8 = 0x10;

/// For each u64 address in [rsi .. rsi + 8 * rcx): store rdx (the marker) at it and the address 8 bytes
/// further; then leave through `out` (permitted at CPL3 by IOPL = 3).
#[rustfmt::skip]
const CODE_BYTES: [u8; 23] = [
    0x48, 0x8b, 0x06,       // 0: mov rax, [rsi]
    0x48, 0x89, 0x10,       // 3: mov [rax], rdx
    0x48, 0x89, 0x40, 0x08, // 6: mov [rax + 8], rax
    0x48, 0x83, 0xc6, 0x08, // 10: add rsi, 8
    0x48, 0xff, 0xc9,       // 14: dec rcx
    0x75, 0xed,             // 17: jnz 0
    0xe6, EXIT_PORT,        // 19: out 0x10, al
    0xeb, 0xfe,             // 21: jmp $ (never reached: the VMM sets RIP before each run)
];

fn ctx<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> Error {
    move |e| format!("{what}: {e}").into()
}

/// A VM with `ranges` of guest RAM as slots 0, 1, ... (dirty logging on) and one vCPU in long mode at CPL3.
/// `prepare` runs after the VM exists and before the slots are registered (to enable capabilities such as
/// manual dirty-log protection). Load the guest with [`try_load_guest`] before running it.
pub fn try_create_vm<T>(
    kvm: &Kvm,
    ranges: &[(u64, usize)],
    prepare: impl FnOnce(&Arc<VmFd>, &Mem) -> Result<T, Error>,
) -> Result<(Arc<VmFd>, Mem, VcpuFd, T), Error> {
    let vm = Arc::new(kvm.create_vm().map_err(ctx("KVM_CREATE_VM"))?);
    let ranges: Vec<_> = ranges.iter().map(|&(g, l)| (GuestAddress(g), l)).collect();
    let mem = Mem::from_ranges(&ranges).map_err(ctx("guest memory"))?;
    let prepared = prepare(&vm, &mem)?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(ctx("guest memory host mapping"))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping belongs to `mem`, returned next to the VM; callers drop the VM first or
        // together with it, and KVM holds no reference past the VM's lifetime.
        unsafe { vm.set_user_memory_region(r) }.map_err(ctx("KVM_SET_USER_MEMORY_REGION"))?;
    }
    vm.set_tss_address(0xfffb_d000).map_err(ctx("KVM_SET_TSS_ADDR"))?;
    let vcpu = vm.create_vcpu(0).map_err(ctx("KVM_CREATE_VCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ctx("KVM_GET_SUPPORTED_CPUID"))?;
    // CPUID before the long-mode sregs: KVM checks EFER bits against the guest's CPUID.
    vcpu.set_cpuid2(&cpuid).map_err(ctx("KVM_SET_CPUID2"))?;
    let mut sregs = vcpu.get_sregs().map_err(ctx("KVM_GET_SREGS"))?;
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
    vcpu.set_sregs(&sregs).map_err(ctx("KVM_SET_SREGS"))?;
    Ok((vm, mem, vcpu, prepared))
}

/// Writes the GDT, the page tables and the code into `mem` (VMM writes, seen by vm-memory's bitmap).
pub fn try_load_guest(mem: &Mem) -> Result<(), Error> {
    let gdt: [u64; 5] = [
        0,
        0x00af_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00cf_f200_0000_ffff,
        0x00af_fa00_0000_ffff,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT + 8 * i as u64))?;
    }
    const PRESENT_RW_USER: u64 = 0x7;
    const HUGE: u64 = 0x80;
    mem.write_obj(PDPT | PRESENT_RW_USER, GuestAddress(PML4))?;
    mem.write_obj(PD | PRESENT_RW_USER, GuestAddress(PDPT))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | PRESENT_RW_USER | HUGE, GuestAddress(PD + 8 * i))?;
    }
    mem.write_slice(&CODE_BYTES, GuestAddress(CODE))?;
    Ok(())
}

/// Writes `targets` into the table at guest address `table` (a VMM write) and points the vCPU at the loop
/// with marker `marker`. The table must lie in mapped guest RAM clear of the code, tables and stack.
pub fn try_prepare_run(
    vcpu: &mut VcpuFd,
    mem: &Mem,
    table: u64,
    targets: &[u64],
    marker: u64,
) -> Result<(), Error> {
    if targets.is_empty() {
        return Err("the guest needs at least one target".into());
    }
    let mut bytes = Vec::with_capacity(targets.len() * 8);
    for t in targets {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(table))?;
    let regs = kvm_regs {
        rip: CODE,
        rsp: STACK_TOP - 8,
        rflags: 0x2 | (3 << 12), // IOPL = 3, IF = 0
        rsi: table,
        rcx: targets.len() as u64,
        rdx: marker,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(ctx("KVM_SET_REGS"))?;
    Ok(())
}

/// Runs the vCPU until the guest leaves through its exit port.
pub fn try_run(vcpu: &mut VcpuFd) -> Result<(), Error> {
    loop {
        match vcpu.run().map_err(ctx("KVM_RUN"))? {
            VcpuExit::IoOut(port, _) if port == u16::from(EXIT_PORT) => return Ok(()),
            VcpuExit::Intr => continue,
            other => return Err(format!("the guest stopped unexpectedly: {other:?}").into()),
        }
    }
}

/// [`try_create_vm`] for tests: panics on failure.
pub fn create_vm<T>(
    kvm: &Kvm,
    ranges: &[(u64, usize)],
    prepare: impl FnOnce(&Arc<VmFd>, &Mem) -> T,
) -> (Arc<VmFd>, Mem, VcpuFd, T) {
    try_create_vm(kvm, ranges, |vm, mem| Ok(prepare(vm, mem))).unwrap()
}

/// [`try_load_guest`] for tests: panics on failure.
pub fn load_guest(mem: &Mem) {
    try_load_guest(mem).unwrap();
}

/// Runs the guest over `targets` (at most [`MAX_TARGETS`], written into [`TABLE`]) with marker `rdx`;
/// panics on failure.
pub fn run_guest(vcpu: &mut VcpuFd, mem: &Mem, targets: &[u64], rdx: u64) {
    assert!(targets.len() <= MAX_TARGETS);
    try_prepare_run(vcpu, mem, TABLE, targets, rdx).unwrap();
    try_run(vcpu).unwrap();
}

/// Opens /dev/kvm, or prints a loud skip line and returns `None` where it is missing.
pub fn kvm_or_skip(what: &str) -> Option<Kvm> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm is missing; {what} did not run");
        return None;
    }
    Some(Kvm::new().expect("/dev/kvm exists but cannot be opened"))
}
