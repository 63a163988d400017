//! KVM dirty logs (feature `kvm`).
//!
//! * [`KvmDirtyLog`]: plain `KVM_GET_DIRTY_LOG`, which returns the bitmap and write-protects the pages again
//!   in one call.
//! * [`KvmManualDirtyLog`]: `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`. `KVM_GET_DIRTY_LOG` only reads the bitmap
//!   and `KVM_CLEAR_DIRTY_LOG` (a raw ioctl: kvm-ioctls has no wrapper) re-protects exactly the pages that
//!   were dirty, so a clean or sparse slot costs little.
//!
//! * [`KvmDirtyRing`]: the per-vCPU dirty ring (`KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]`), harvested from the
//!   rings mapped from each vCPU fd, then `KVM_RESET_DIRTY_RINGS` (raw calls: kvm-ioctls only names the
//!   capability).
//!
//! All of them need the slots registered with `KVM_MEM_LOG_DIRTY_PAGES`.

use std::borrow::Borrow;
use std::os::raw::c_void;

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_DIRTY_LOG_PAGE_OFFSET, kvm_clear_dirty_log,
    kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_gfn, kvm_dirty_log, kvm_dirty_log__bindgen_ty_1,
    kvm_enable_cap,
};
use kvm_ioctls::{VcpuFd, VmFd};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use vmm_sys_util::errno;

use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};

use crate::error::RamError;
use crate::log::{DirtyLog, DirtySet};
use crate::ram::RamLayout;

use self::nr::{KVM_CLEAR_DIRTY_LOG, KVM_GET_DIRTY_LOG, KVM_RESET_DIRTY_RINGS};

/// ioctl request numbers (linux/kvm.h).
mod nr {
    #![allow(missing_docs)]
    use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log};
    use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

    const KVMIO: u32 = 0xAE;
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
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
    ///
    /// `slots[i]` must be registered with exactly the guest address and size of region `i` (kvm-ioctls'
    /// `get_dirty_log` sizes KVM's output buffer from it).
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
    ///
    /// `slots[i]` must be registered with exactly the guest address and size of region `i`: KVM writes one
    /// bit per page of the slot into a buffer sized from the layout, and a larger slot would write past it.
    /// (The same contract as kvm-ioctls' `VmFd::get_dirty_log`; KVM offers no way to check it.)
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
            // SAFETY: `get` names a buffer of one bit per page of region `i`, which KVM fills with one bit
            // per page of `slot`; the fd is a VM fd. This holds only if `slot` was registered with exactly
            // region `i`'s size, which `new` documents as the caller's duty and cannot check (KVM has no
            // query for a slot's size; kvm-ioctls' safe `get_dirty_log` relies on the same contract).
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

const DIRTY_GFN_F_DIRTY: u32 = 1;
const DIRTY_GFN_F_RESET: u32 = 2;
/// Largest ring accepted (KVM's own limit on our machines: 65536 entries).
pub const MAX_DIRTY_RING_ENTRIES: u32 = 65536;

/// One vCPU's dirty ring, mapped from its fd.
#[derive(Debug)]
struct Ring {
    base: *mut kvm_dirty_gfn,
    entries: u32,
    /// Index of the next entry to harvest (free-running, wraps modulo `entries`).
    next: u32,
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: `base` was returned by a successful mmap of exactly this length in `KvmDirtyRing::new`
        // and is unmapped only here.
        unsafe {
            libc::munmap(
                self.base as *mut c_void,
                self.entries as usize * size_of::<kvm_dirty_gfn>(),
            )
        };
    }
}

/// KVM's per-vCPU dirty ring: the guest's writes as a queue of `(slot, page)` entries instead of a bitmap.
///
/// Setup order matters: [`KvmDirtyRing::enable`] before any vCPU is created, then the slots and vCPUs, then
/// [`KvmDirtyRing::new`] with every vCPU. A vCPU whose ring fills exits with `KVM_EXIT_DIRTY_RING_FULL`
/// (exit reason 31, `VcpuExit::Unsupported(31)` in kvm-ioctls); the VMM then calls `take_into` before
/// running it again. With the ring on, `KVM_GET_DIRTY_LOG` fails, so use this instead of [`KvmDirtyLog`].
#[derive(Debug)]
pub struct KvmDirtyRing<V> {
    vm: V,
    layout: RamLayout,
    slots: Vec<u32>,
    rings: Vec<Ring>,
}

// SAFETY: the ring mappings are owned by this value (unmapped on drop) and only touched through `&mut self`;
// the kernel side synchronises through the entries' flags with acquire/release ordering.
unsafe impl<V: Send> Send for KvmDirtyRing<V> {}

impl<V: Borrow<VmFd>> KvmDirtyRing<V> {
    /// Enables the dirty ring of `entries` entries (a power of two) per vCPU on `vm`, preferring the
    /// acquire/release variant. Call before creating any vCPU.
    pub fn enable(vm: &VmFd, entries: u32) -> Result<(), RamError> {
        if !entries.is_power_of_two() || entries > MAX_DIRTY_RING_ENTRIES {
            return Err(RamError::LayoutMismatch(format!(
                "dirty ring size {entries} is not a power of two up to {MAX_DIRTY_RING_ENTRIES}"
            )));
        }
        let cap = if vm.check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING_ACQ_REL) as _) > 0 {
            KVM_CAP_DIRTY_LOG_RING_ACQ_REL
        } else {
            KVM_CAP_DIRTY_LOG_RING
        };
        let mut enable = kvm_enable_cap {
            cap,
            ..Default::default()
        };
        enable.args[0] = u64::from(entries) * size_of::<kvm_dirty_gfn>() as u64;
        vm.enable_cap(&enable).map_err(|source| RamError::Kvm {
            op: "KVM_ENABLE_CAP(DIRTY_LOG_RING)",
            slot: 0,
            source,
        })
    }

    /// Maps the rings of `vcpus` (all of the VM's vCPUs; `entries` as given to [`enable`](Self::enable)) and
    /// reads them for `slots` (one per region of `layout`).
    pub fn new(
        vm: V,
        layout: RamLayout,
        slots: Vec<u32>,
        vcpus: &[&VcpuFd],
        entries: u32,
    ) -> Result<Self, RamError> {
        check_slots(&layout, &slots)?;
        if !entries.is_power_of_two() || entries > MAX_DIRTY_RING_ENTRIES {
            return Err(RamError::LayoutMismatch(format!(
                "dirty ring size {entries} is not a power of two"
            )));
        }
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let len = entries as usize * size_of::<kvm_dirty_gfn>();
        let mut rings = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            // SAFETY: maps `len` bytes of the vCPU's dirty ring at the offset KVM defines; a failed call is
            // checked below and nothing is dereferenced before.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    vcpu.as_raw_fd(),
                    KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * page as libc::off_t,
                )
            };
            if base == libc::MAP_FAILED {
                return Err(RamError::Kvm {
                    op: "mmap(dirty ring)",
                    slot: 0,
                    source: errno::Error::last(),
                });
            }
            rings.push(Ring {
                base: base as *mut kvm_dirty_gfn,
                entries,
                next: 0,
            });
        }
        Ok(KvmDirtyRing {
            vm,
            layout,
            slots,
            rings,
        })
    }
}

impl<V: Borrow<VmFd>> DirtyLog for KvmDirtyRing<V> {
    fn take_into(&mut self, set: &mut DirtySet) -> Result<(), RamError> {
        set.check_layout(&self.layout)?;
        let mut harvested = 0usize;
        let mut bad = None;
        for ring in &mut self.rings {
            loop {
                let idx = (ring.next % ring.entries) as usize;
                // SAFETY: `idx < entries`, so the entry lies inside the ring mapping. `flags` is the first
                // field, a naturally aligned u32 shared with the kernel: access it atomically.
                let entry = unsafe { ring.base.add(idx) };
                // SAFETY: as above; `AtomicU32` has the same layout as u32.
                let flags = unsafe { &*(std::ptr::addr_of_mut!((*entry).flags) as *const AtomicU32) };
                if flags.load(Ordering::Acquire) & DIRTY_GFN_F_DIRTY == 0 {
                    break;
                }
                // SAFETY: the kernel published this entry (acquire above); we read it before handing it back.
                let (slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
                let region = self.slots.iter().position(|&s| s == slot);
                match region.and_then(|r| set.region_mut(r)).map(|m| {
                    usize::try_from(offset).map_or(
                        Err(RamError::PageIndex {
                            page: usize::MAX,
                            pages: m.len(),
                        }),
                        |p| m.set(p),
                    )
                }) {
                    Some(Ok(())) => {}
                    Some(Err(e)) => bad = bad.or(Some(e)),
                    None => {
                        bad = bad.or(Some(RamError::LayoutMismatch(format!(
                            "dirty ring entry for unknown slot {slot:#x}"
                        ))))
                    }
                }
                flags.store(DIRTY_GFN_F_RESET, Ordering::Release);
                ring.next = ring.next.wrapping_add(1);
                harvested += 1;
            }
        }
        if harvested > 0 {
            // SAFETY: a plain ioctl without arguments on a VM fd.
            let ret = unsafe { ioctl(self.vm.borrow(), KVM_RESET_DIRTY_RINGS()) };
            if ret < 0 {
                return Err(RamError::Kvm {
                    op: "KVM_RESET_DIRTY_RINGS",
                    slot: 0,
                    source: errno::Error::last(),
                });
            }
        }
        bad.map_or(Ok(()), Err)
    }
}
