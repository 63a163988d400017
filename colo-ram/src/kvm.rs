//! KVM dirty logs (feature `kvm`).
//!
//! * [`KvmDirtyLog`]: plain `KVM_GET_DIRTY_LOG`, which returns the bitmap and write-protects the pages again
//!   in one call.
//! * [`KvmManualDirtyLog`]: `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`. `KVM_GET_DIRTY_LOG` only reads the bitmap
//!   and `KVM_CLEAR_DIRTY_LOG` (a raw ioctl: kvm-ioctls has no wrapper) re-protects exactly the pages that
//!   were dirty, so a clean or sparse slot costs little.
//!
//! Both read every slot into a reusable set and must be taken with the slot's memory registered with
//! `KVM_MEM_LOG_DIRTY_PAGES`.

use std::borrow::Borrow;
use std::os::raw::c_void;

use kvm_bindings::{
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, kvm_clear_dirty_log,
    kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log, kvm_dirty_log__bindgen_ty_1, kvm_enable_cap,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::error::RamError;
use crate::log::{DirtyLog, DirtySet};
use crate::ram::RamLayout;

use self::nr::{KVM_CLEAR_DIRTY_LOG, KVM_GET_DIRTY_LOG};

/// ioctl request numbers (linux/kvm.h).
mod nr {
    #![allow(missing_docs)]
    use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log};
    use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

    const KVMIO: u32 = 0xAE;
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
}

fn check_slots(layout: &RamLayout, slots: &[u32]) -> Result<(), RamError> {
    if slots.len() == layout.regions().len() {
        Ok(())
    } else {
        Err(RamError::LayoutMismatch(format!(
            "{} KVM slots for {} guest RAM regions",
            slots.len(),
            layout.regions().len()
        )))
    }
}

/// KVM's dirty log through `KVM_GET_DIRTY_LOG`: the guest's own writes.
///
/// `slots[i]` is the KVM memory slot of region `i` of the layout.
#[derive(Debug)]
pub struct KvmDirtyLog<V> {
    vm: V,
    layout: RamLayout,
    slots: Vec<u32>,
}

impl<V: Borrow<VmFd>> KvmDirtyLog<V> {
    /// Reads the dirty log of `slots` (one per region of `layout`, in order) from `vm`.
    pub fn new(vm: V, layout: RamLayout, slots: Vec<u32>) -> Result<Self, RamError> {
        check_slots(&layout, &slots)?;
        Ok(KvmDirtyLog { vm, layout, slots })
    }

    /// The VM.
    pub fn vm(&self) -> &VmFd {
        self.vm.borrow()
    }
}

impl<V: Borrow<VmFd>> DirtyLog for KvmDirtyLog<V> {
    fn take_into(&mut self, set: &mut DirtySet) -> Result<(), RamError> {
        set.check_layout(&self.layout)?;
        for (i, (&slot, r)) in self.slots.iter().zip(self.layout.regions()).enumerate() {
            let words = self
                .vm
                .borrow()
                .get_dirty_log(slot, r.len as usize)
                .map_err(|source| RamError::Kvm {
                    op: "KVM_GET_DIRTY_LOG",
                    slot,
                    source,
                })?;
            set.or_region_words(i, &words)?;
        }
        Ok(())
    }
}

/// KVM's dirty log with manual protection: `KVM_GET_DIRTY_LOG` then `KVM_CLEAR_DIRTY_LOG` of exactly the
/// pages found dirty, with no allocation per call.
#[derive(Debug)]
pub struct KvmManualDirtyLog<V> {
    vm: V,
    layout: RamLayout,
    slots: Vec<u32>,
    buf: Vec<u64>,
}

impl<V: Borrow<VmFd>> KvmManualDirtyLog<V> {
    /// Enables `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` on `vm` (do this before registering the slots) and reads
    /// the dirty log of `slots` (one per region of `layout`).
    pub fn new(vm: V, layout: RamLayout, slots: Vec<u32>) -> Result<Self, RamError> {
        check_slots(&layout, &slots)?;
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
        vm.borrow().enable_cap(&cap).map_err(|source| RamError::Kvm {
            op: "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
            slot: slots.first().copied().unwrap_or(0),
            source,
        })?;
        let max_words = layout
            .regions()
            .iter()
            .map(|r| r.pages().div_ceil(64))
            .max()
            .unwrap_or(0);
        Ok(KvmManualDirtyLog {
            vm,
            layout,
            slots,
            buf: vec![0; max_words],
        })
    }

    /// The VM.
    pub fn vm(&self) -> &VmFd {
        self.vm.borrow()
    }
}

impl<V: Borrow<VmFd>> DirtyLog for KvmManualDirtyLog<V> {
    fn take_into(&mut self, set: &mut DirtySet) -> Result<(), RamError> {
        set.check_layout(&self.layout)?;
        for (i, (&slot, r)) in self.slots.iter().zip(self.layout.regions()).enumerate() {
            let pages = r.pages();
            let words = &mut self.buf[..pages.div_ceil(64)];
            let get = kvm_dirty_log {
                slot,
                padding1: 0,
                __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: words.as_mut_ptr() as *mut c_void,
                },
            };
            // SAFETY: `get` names a buffer of one bit per page of the slot (the layout's region length is
            // the slot size), which KVM fills; the fd is a VM fd.
            let ret = unsafe { ioctl_with_ref(self.vm.borrow(), KVM_GET_DIRTY_LOG(), &get) };
            if ret != 0 {
                return Err(RamError::Kvm {
                    op: "KVM_GET_DIRTY_LOG",
                    slot,
                    source: errno::Error::last(),
                });
            }
            set.or_region_words(i, words)?;
            // Re-protect only the span of words that holds dirty pages.
            let Some(first) = words.iter().position(|&w| w != 0) else {
                continue;
            };
            let last = words.iter().rposition(|&w| w != 0).unwrap_or(first);
            let first_page = first * 64;
            let num_pages = ((last + 1) * 64).min(pages) - first_page;
            let clear = kvm_clear_dirty_log {
                slot,
                num_pages: u32::try_from(num_pages).map_err(|_| RamError::UnsupportedRegion {
                    gpa: r.gpa,
                    len: r.len,
                    reason: "slot too large for KVM_CLEAR_DIRTY_LOG",
                })?,
                first_page: first_page as u64,
                __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: words[first..].as_mut_ptr() as *mut c_void,
                },
            };
            // SAFETY: the bitmap pointer covers `num_pages` bits from `first_page` (a multiple of 64, as KVM
            // requires; `num_pages` is a multiple of 64 or reaches the end of the slot) inside `words`.
            let ret = unsafe { ioctl_with_ref(self.vm.borrow(), KVM_CLEAR_DIRTY_LOG(), &clear) };
            if ret != 0 {
                return Err(RamError::Kvm {
                    op: "KVM_CLEAR_DIRTY_LOG",
                    slot,
                    source: errno::Error::last(),
                });
            }
        }
        Ok(())
    }
}
