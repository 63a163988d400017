//! The benchmark's guest: one vCPU in 64-bit long mode at CPL3 (native speed under nested KVM), running a
//! loop of hand-assembled machine code that writes every page named in a table the VMM fills.
//!
//! Memory map (guest physical): GDT, page tables, code and stack below 0x8000 (see colo-ram's
//! `tests/support/cpl3.rs`, which this shares), the table of targets at 1 MiB (up to [`MAX_TARGETS`] u64s),
//! and the pages the guest dirties from [`FIRST_TARGET`] on.

use anyhow::{Result, anyhow, ensure};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

// The CPL3 guest setup is shared with colo-ram's KVM test (one copy, included by path: neither crate depends
// on the other).
#[allow(dead_code)]
#[path = "../../colo-ram/tests/support/cpl3.rs"]
mod cpl3;

pub use cpl3::{MAX_MEM, Mem};

/// The table of targets the guest walks.
const TABLE: u64 = 0x10_0000;
/// First guest address the guest dirties (everything below holds code, tables and the target table).
pub const FIRST_TARGET: u64 = 0x40_0000;
/// Most targets in one run (the table spans 1 MiB .. 4 MiB).
pub const MAX_TARGETS: usize = ((FIRST_TARGET - TABLE) / 8) as usize;

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
        let (vm, mem, vcpu, prepared) = cpl3::try_create_vm(kvm, &[(0, mem_bytes as usize)], |vm, mem| {
            prepare(vm, mem).map_err(Into::into)
        })
        .map_err(|e| anyhow!(e))?;
        cpl3::try_load_guest(&mem).map_err(|e| anyhow!(e))?;
        Ok((Guest { vm, mem, vcpu }, prepared))
    }

    /// Writes `targets` into the guest's table (a VMM write, seen by vm-memory's bitmap) and points the vCPU
    /// at the loop with epoch marker `marker`.
    pub fn prepare_run(&mut self, targets: &[u64], marker: u64) -> Result<()> {
        ensure!(
            !targets.is_empty() && targets.len() <= MAX_TARGETS,
            "{} targets (1..={MAX_TARGETS})",
            targets.len()
        );
        cpl3::try_prepare_run(&mut self.vcpu, &self.mem, TABLE, targets, marker).map_err(|e| anyhow!(e))
    }

    /// Runs the vCPU until the guest leaves through its exit port.
    pub fn run(vcpu: &mut VcpuFd) -> Result<()> {
        cpl3::try_run(vcpu).map_err(|e| anyhow!(e))
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
