//! The benchmark's guest: one vCPU in 64-bit long mode at CPL3 (native speed under nested KVM), running a
//! loop of hand-assembled machine code that writes every page named in a table the VMM fills.
//!
//! Memory map (guest physical): GDT at 0x500, page tables at 0x1000..0x4000 (2 MiB user pages over the first
//! 1 GiB, identity mapped), code at 0x4000, stack below 0x8000, the page table of targets at 1 MiB (up to
//! [`MAX_TARGETS`] u64s), and the pages the guest dirties from [`FIRST_TARGET`] on.

use anyhow::{Context, Result, bail, ensure};
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest memory with vm-memory's write bitmap (the VMM's own writes).
pub type Mem = GuestMemoryMmap<AtomicBitmap>;

const GDT: u64 = 0x500;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const CODE: u64 = 0x4000;
const STACK_TOP: u64 = 0x8000;
const TABLE: u64 = 0x10_0000;
/// First guest address the guest dirties (everything below holds code, tables and the target table).
pub const FIRST_TARGET: u64 = 0x40_0000;
/// Most targets in one run (the table spans 1 MiB .. 4 MiB).
pub const MAX_TARGETS: usize = ((FIRST_TARGET - TABLE) / 8) as usize;
/// Largest guest the page tables map (one page directory of 2 MiB pages).
pub const MAX_MEM: u64 = 1 << 30;
const EXIT_PORT: u8 = 0x10;

/// For each u64 address in [rsi .. rsi + 8 * rcx): store rdx (the epoch marker) at it and the address
/// 8 bytes further; then leave through `out` (permitted at CPL3 by IOPL = 3).
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

/// A KVM VM with one memory slot (dirty logging on) and one vCPU, and its guest memory.
pub struct Guest {
    /// The VM (shared with the dirty log); held so that it lives as long as the guest.
    #[allow(dead_code)]
    pub vm: std::sync::Arc<VmFd>,
    /// Guest RAM, slot 0 at guest address 0.
    pub mem: Mem,
    /// The only vCPU.
    pub vcpu: VcpuFd,
}

impl Guest {
    /// Creates the VM with `mem_bytes` of RAM. `prepare` runs after the VM exists and before the memory slot
    /// is registered (manual dirty-log protection must be enabled then).
    pub fn new<T>(
        kvm: &Kvm,
        mem_bytes: u64,
        prepare: impl FnOnce(&std::sync::Arc<VmFd>, &Mem) -> Result<T>,
    ) -> Result<(Self, T)> {
        ensure!(
            (2 * FIRST_TARGET..=MAX_MEM).contains(&mem_bytes) && mem_bytes.is_multiple_of(2 << 20),
            "guest memory must be a multiple of 2 MiB between 8 MiB and 1 GiB"
        );
        let vm = std::sync::Arc::new(kvm.create_vm().context("KVM_CREATE_VM")?);
        let mem = Mem::from_ranges(&[(GuestAddress(0), mem_bytes as usize)]).context("guest memory")?;
        let prepared = prepare(&vm, &mem)?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .context("guest memory has no host mapping")?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping is owned by `mem`, which lives in the same `Guest` as the VM; the fields
            // drop in declaration order (VM first), so KVM never uses the mapping after it is unmapped.
            unsafe { vm.set_user_memory_region(r) }.context("KVM_SET_USER_MEMORY_REGION")?;
        }
        vm.set_tss_address(0xfffb_d000).context("KVM_SET_TSS_ADDR")?;
        let vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
        vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)
            .context("KVM_SET_CPUID2")?;
        let guest = Guest { vm, mem, vcpu };
        guest.setup_long_mode()?;
        guest.load()?;
        Ok((guest, prepared))
    }

    fn setup_long_mode(&self) -> Result<()> {
        let mut sregs = self.vcpu.get_sregs()?;
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
        self.vcpu.set_sregs(&sregs)?;
        Ok(())
    }

    /// GDT (null, ring-0 code and data, ring-3 data and code), page tables and code, written by the VMM.
    fn load(&self) -> Result<()> {
        let gdt: [u64; 5] = [
            0,
            0x00af_9a00_0000_ffff,
            0x00cf_9200_0000_ffff,
            0x00cf_f200_0000_ffff,
            0x00af_fa00_0000_ffff,
        ];
        for (i, d) in gdt.iter().enumerate() {
            self.mem.write_obj(*d, GuestAddress(GDT + 8 * i as u64))?;
        }
        const PRESENT_RW_USER: u64 = 0x7;
        const HUGE: u64 = 0x80;
        self.mem.write_obj(PDPT | PRESENT_RW_USER, GuestAddress(PML4))?;
        self.mem.write_obj(PD | PRESENT_RW_USER, GuestAddress(PDPT))?;
        for i in 0..512u64 {
            self.mem
                .write_obj((i << 21) | PRESENT_RW_USER | HUGE, GuestAddress(PD + 8 * i))?;
        }
        self.mem.write_slice(&CODE_BYTES, GuestAddress(CODE))?;
        Ok(())
    }

    /// Writes `targets` into the guest's table (a VMM write, seen by vm-memory's bitmap) and points the vCPU
    /// at the loop with epoch marker `marker`.
    pub fn prepare_run(&mut self, targets: &[u64], marker: u64) -> Result<()> {
        ensure!(
            !targets.is_empty() && targets.len() <= MAX_TARGETS,
            "{} targets (1..={MAX_TARGETS})",
            targets.len()
        );
        let mut table = Vec::with_capacity(targets.len() * 8);
        for t in targets {
            table.extend_from_slice(&t.to_le_bytes());
        }
        self.mem.write_slice(&table, GuestAddress(TABLE))?;
        let regs = kvm_regs {
            rip: CODE,
            rsp: STACK_TOP - 8,
            rflags: 0x2 | (3 << 12), // IOPL = 3, IF = 0
            rsi: TABLE,
            rcx: targets.len() as u64,
            rdx: marker,
            ..Default::default()
        };
        self.vcpu.set_regs(&regs)?;
        Ok(())
    }

    /// Runs the vCPU until the guest leaves through its exit port.
    pub fn run(vcpu: &mut VcpuFd) -> Result<()> {
        loop {
            match vcpu.run().context("KVM_RUN")? {
                VcpuExit::IoOut(port, _) if port == u16::from(EXIT_PORT) => return Ok(()),
                VcpuExit::Intr => continue,
                other => bail!("the guest stopped unexpectedly: {other:?}"),
            }
        }
    }

    /// The vCPU state as a device-state blob ([`CpuState::encode`]).
    pub fn cpu_state(&self) -> Result<Vec<u8>> {
        let state = CpuState {
            regs: self.vcpu.get_regs()?,
            sregs: self.vcpu.get_sregs()?,
            fpu: self.vcpu.get_fpu()?,
        };
        Ok(state.encode())
    }
}

/// vCPU registers as carried in the checkpoint's device state: a fixed little-endian layout of every field.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CpuState {
    /// General purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU and SSE state.
    pub fpu: kvm_fpu,
}

const SEG_LEN: usize = 8 + 4 + 2 + 9;
const DT_LEN: usize = 8 + 2;
/// Length of an encoded [`CpuState`].
pub const CPU_STATE_LEN: usize =
    18 * 8 + 8 * SEG_LEN + 2 * DT_LEN + 7 * 8 + 4 * 8 + (8 * 16 + 2 + 2 + 1 + 2 + 8 + 8 + 16 * 16 + 4);

impl CpuState {
    /// Encodes every field (no struct padding, no host-layout dependence).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CPU_STATE_LEN);
        let r = &self.regs;
        for v in [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13,
            r.r14, r.r15, r.rip, r.rflags,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let s = &self.sregs;
        for g in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
            out.extend_from_slice(&g.base.to_le_bytes());
            out.extend_from_slice(&g.limit.to_le_bytes());
            out.extend_from_slice(&g.selector.to_le_bytes());
            out.extend_from_slice(&[g.type_, g.present, g.dpl, g.db, g.s, g.l, g.g, g.avl, g.unusable]);
        }
        for t in [&s.gdt, &s.idt] {
            out.extend_from_slice(&t.base.to_le_bytes());
            out.extend_from_slice(&t.limit.to_le_bytes());
        }
        for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for w in s.interrupt_bitmap {
            out.extend_from_slice(&w.to_le_bytes());
        }
        let f = &self.fpu;
        for reg in &f.fpr {
            out.extend_from_slice(reg);
        }
        out.extend_from_slice(&f.fcw.to_le_bytes());
        out.extend_from_slice(&f.fsw.to_le_bytes());
        out.push(f.ftwx);
        out.extend_from_slice(&f.last_opcode.to_le_bytes());
        out.extend_from_slice(&f.last_ip.to_le_bytes());
        out.extend_from_slice(&f.last_dp.to_le_bytes());
        for reg in &f.xmm {
            out.extend_from_slice(reg);
        }
        out.extend_from_slice(&f.mxcsr.to_le_bytes());
        out
    }

    /// Decodes a blob made by [`CpuState::encode`]; a blob of the wrong length is an error.
    pub fn decode(blob: &[u8]) -> Result<Self> {
        ensure!(
            blob.len() == CPU_STATE_LEN,
            "vCPU state is {} bytes, expected {CPU_STATE_LEN}",
            blob.len()
        );
        let mut rd = Reader(blob);
        let mut st = CpuState::default();
        let r = &mut st.regs;
        for v in [
            &mut r.rax,
            &mut r.rbx,
            &mut r.rcx,
            &mut r.rdx,
            &mut r.rsi,
            &mut r.rdi,
            &mut r.rsp,
            &mut r.rbp,
            &mut r.r8,
            &mut r.r9,
            &mut r.r10,
            &mut r.r11,
            &mut r.r12,
            &mut r.r13,
            &mut r.r14,
            &mut r.r15,
            &mut r.rip,
            &mut r.rflags,
        ] {
            *v = rd.u64();
        }
        let s = &mut st.sregs;
        for g in [
            &mut s.cs, &mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss, &mut s.tr, &mut s.ldt,
        ] {
            g.base = rd.u64();
            g.limit = rd.u32();
            g.selector = rd.u16();
            let b = rd.take::<9>();
            (g.type_, g.present, g.dpl, g.db, g.s, g.l, g.g, g.avl, g.unusable) =
                (b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8]);
        }
        for t in [&mut s.gdt, &mut s.idt] {
            t.base = rd.u64();
            t.limit = rd.u16();
        }
        for v in [
            &mut s.cr0,
            &mut s.cr2,
            &mut s.cr3,
            &mut s.cr4,
            &mut s.cr8,
            &mut s.efer,
            &mut s.apic_base,
        ] {
            *v = rd.u64();
        }
        for w in &mut s.interrupt_bitmap {
            *w = rd.u64();
        }
        let f = &mut st.fpu;
        for reg in &mut f.fpr {
            *reg = rd.take::<16>();
        }
        f.fcw = rd.u16();
        f.fsw = rd.u16();
        f.ftwx = rd.take::<1>()[0];
        f.last_opcode = rd.u16();
        f.last_ip = rd.u64();
        f.last_dp = rd.u64();
        for reg in &mut f.xmm {
            *reg = rd.take::<16>();
        }
        f.mxcsr = rd.u32();
        Ok(st)
    }
}

/// A cursor over a blob whose length was checked up front.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_state_round_trips_and_rejects_a_short_blob() {
        let mut st = CpuState::default();
        st.regs.rip = 0x4000;
        st.regs.rflags = 0x3002;
        st.sregs.cs.l = 1;
        st.sregs.cs.selector = 0x23;
        st.sregs.interrupt_bitmap[3] = 0xdead_beef;
        st.sregs.efer = 0x500;
        st.fpu.xmm[15] = [7; 16];
        st.fpu.mxcsr = 0x1f80;
        let blob = st.encode();
        assert_eq!(blob.len(), CPU_STATE_LEN);
        assert_eq!(CpuState::decode(&blob).unwrap(), st);
        assert!(CpuState::decode(&blob[..blob.len() - 1]).is_err());
    }
}
