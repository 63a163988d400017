//! vCPU setup for a CPL3 long-mode guest, and the vCPU state that moves between processes.

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, Msrs, kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::abi::*;
use crate::error::{Error, Result};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_IOPL3: u64 = 3 << 12;

/// The MSRs a CPL3 guest can observe or that KVM keeps per vCPU and a migration must carry.
pub const SAVED_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x3b,        // IA32_TSC_ADJUST
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// Give the vCPU the host's supported CPUID (needed before long mode is accepted) and the initial CPL3
/// long-mode register state: IOPL=3, interrupts off, the stack at [`STACK_TOP`] as if `entry` was called.
pub fn setup_long_mode(kvm: &Kvm, vcpu: &VcpuFd, entry: u64) -> Result<()> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("get_supported_cpuid"))?;
    vcpu.set_cpuid2(&cpuid).map_err(Error::kvm("set_cpuid2"))?;

    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("get_sregs"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x20 | 3,
        type_: 11,
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x18 | 3,
        type_: 3,
        l: 0,
        db: 1,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS_GPA,
        limit: crate::memory::TSS_LIMIT as u32,
        selector: 0x28,
        type_: 11,
        s: 0,
        dpl: 0,
        l: 0,
        g: 0,
        ..code
    };
    sregs.ldt = kvm_segment {
        selector: 0,
        type_: 2,
        s: 0,
        dpl: 0,
        l: 0,
        g: 0,
        unusable: 1,
        ..code
    };
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = 7 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(Error::kvm("set_sregs"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("set_fpu"))?;

    let regs = kvm_regs {
        rip: entry,
        rsp: STACK_TOP - 8,
        rflags: 0x2 | RFLAGS_IOPL3,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(Error::kvm("set_regs"))?;
    Ok(())
}

/// Everything a guest needs to continue exactly where it stood, in another VM or process.
///
/// The x87/SSE state is carried by `xsave` (which includes MXCSR; KVM_GET_FPU reads it back as 0 on our
/// nested KVM). The TSC travels as MSR 0x10, so guest time continues from where it stood.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, descriptor-table and control registers, EFER.
    pub sregs: kvm_sregs,
    /// FPU, SSE and extended state: the 4 KiB KVM_GET_XSAVE region as 1024 words.
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Pending exceptions, interrupts, NMIs, interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Multiprocessing state.
    pub mp_state: kvm_mp_state,
    /// The saved MSRs as (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// TSC frequency in kHz the guest was calibrated to.
    pub tsc_khz: u32,
}

impl VcpuState {
    /// Read the state of a stopped vCPU (not inside KVM_RUN).
    pub fn save(vcpu: &VcpuFd) -> Result<Self> {
        let mut msrs = Msrs::from_entries(
            &SAVED_MSRS
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|e| Error::state("vcpu", format!("MSR list: {e:?}")))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(Error::kvm("get_msrs"))?;
        let msrs = msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)).collect();
        Ok(Self {
            regs: vcpu.get_regs().map_err(Error::kvm("get_regs"))?,
            sregs: vcpu.get_sregs().map_err(Error::kvm("get_sregs"))?,
            xsave: vcpu.get_xsave().map_err(Error::kvm("get_xsave"))?.region.to_vec(),
            xcrs: vcpu.get_xcrs().map_err(Error::kvm("get_xcrs"))?,
            events: vcpu.get_vcpu_events().map_err(Error::kvm("get_vcpu_events"))?,
            debugregs: vcpu.get_debug_regs().map_err(Error::kvm("get_debug_regs"))?,
            mp_state: vcpu.get_mp_state().map_err(Error::kvm("get_mp_state"))?,
            msrs,
            tsc_khz: vcpu.get_tsc_khz().map_err(Error::kvm("get_tsc_khz"))?,
        })
    }

    /// Check the state is one this VMM can have produced: long mode at CPL3, known MSRs.
    pub fn validate(&self) -> Result<()> {
        let bad = |d: String| Err(Error::state("vcpu", d));
        if self.sregs.efer & EFER_LMA == 0 || self.sregs.cr0 & CR0_PG == 0 {
            return bad(format!(
                "not in long mode (efer {:#x}, cr0 {:#x})",
                self.sregs.efer, self.sregs.cr0
            ));
        }
        if self.sregs.cs.dpl != 3 {
            return bad(format!(
                "CS.DPL {} (the mini-VMM runs guests at CPL3)",
                self.sregs.cs.dpl
            ));
        }
        if let Some((i, _)) = self.msrs.iter().find(|(i, _)| !SAVED_MSRS.contains(i)) {
            return bad(format!("MSR {i:#x} is not one this VMM saves"));
        }
        if self.xsave.len() != 1024 {
            return bad(format!("xsave area of {} words, expected 1024", self.xsave.len()));
        }
        if self.msrs.len() > SAVED_MSRS.len() {
            return bad(format!("{} MSRs", self.msrs.len()));
        }
        Ok(())
    }

    /// Load into a vCPU (freshly created with [`setup_long_mode`]'s CPUID, or one that is stopped).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<()> {
        self.validate()?;
        vcpu.set_sregs(&self.sregs).map_err(Error::kvm("set_sregs"))?;
        vcpu.set_regs(&self.regs).map_err(Error::kvm("set_regs"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(Error::kvm("set_xcrs"))?;
        let mut xsave = kvm_xsave::default();
        xsave.region.copy_from_slice(&self.xsave);
        // SAFETY: `xsave` is a plain 4 KiB kvm_xsave as KVM_GET_XSAVE returns it (no extended AMX area).
        unsafe { vcpu.set_xsave(&xsave) }.map_err(Error::kvm("set_xsave"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(Error::kvm("set_debug_regs"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(Error::kvm("set_mp_state"))?;
        let entries: Vec<_> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs =
            Msrs::from_entries(&entries).map_err(|e| Error::state("vcpu", format!("MSR list: {e:?}")))?;
        let n = vcpu.set_msrs(&msrs).map_err(Error::kvm("set_msrs"))?;
        if n != entries.len() {
            return Err(Error::state(
                "vcpu",
                format!("KVM took {n} of {} MSRs", entries.len()),
            ));
        }
        // Events last: they may depend on the registers above.
        vcpu.set_vcpu_events(&self.events)
            .map_err(Error::kvm("set_vcpu_events"))?;
        Ok(())
    }

    /// Encode for the wire (bincode).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        bincode::serde::encode_to_vec(self, bincode::config::standard())
            .map_err(|e| Error::state("vcpu", format!("encode: {e}")))
    }

    /// Decode and validate.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > 64 << 10 {
            return Err(Error::state(
                "vcpu",
                format!("{} bytes is too large", bytes.len()),
            ));
        }
        let cfg = bincode::config::standard().with_limit::<{ 64 << 10 }>();
        let (s, used): (Self, usize) = bincode::serde::decode_from_slice(bytes, cfg)
            .map_err(|e| Error::state("vcpu", format!("decode: {e}")))?;
        if used != bytes.len() {
            return Err(Error::state(
                "vcpu",
                format!("{} trailing bytes", bytes.len() - used),
            ));
        }
        s.validate()?;
        Ok(s)
    }
}
