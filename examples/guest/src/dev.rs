//! Drivers for the paravirtual NIC and block device: shared-memory rings polled by a host thread, with a
//! doorbell only when the host said it is asleep.

use core::sync::atomic::{AtomicU32, Ordering, fence};

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::abi::*;
use crate::rt;

fn reg(gpa: u64) -> &'static AtomicU32 {
    // SAFETY: `gpa` is a 4-byte aligned address inside the shared pages the VMM maps (identity mapping);
    // the host accesses it only atomically.
    unsafe { &*(gpa as *const AtomicU32) }
}

/// Ring the doorbell if the host device thread is asleep. Call after publishing a producer index.
fn kick_if_idle() {
    // Pairs with the host's store of the idle flag followed by a re-check of the producer indices.
    fence(Ordering::SeqCst);
    if reg(BOOT_INFO_GPA + BI_HOST_IDLE).load(Ordering::Relaxed) != 0 {
        rt::outl(PORT_KICK, 0);
    }
}

/// The paravirtual NIC as a smoltcp device.
pub struct Nic;

impl Nic {
    /// True if a received frame is waiting.
    pub fn rx_pending(&self) -> bool {
        reg(NIC_GPA + NIC_RX_PROD).load(Ordering::Acquire)
            != reg(NIC_GPA + NIC_RX_CONS).load(Ordering::Relaxed)
    }

    fn tx_space(&self) -> bool {
        let prod = reg(NIC_GPA + NIC_TX_PROD).load(Ordering::Relaxed);
        let cons = reg(NIC_GPA + NIC_TX_CONS).load(Ordering::Acquire);
        prod.wrapping_sub(cons) < NIC_SLOTS
    }
}

/// A received frame.
pub struct RxToken;
/// Room for one frame to send.
pub struct TxToken;

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let cons = reg(NIC_GPA + NIC_RX_CONS).load(Ordering::Relaxed);
        let slot = NIC_RX_SLOTS_GPA + u64::from(cons % NIC_SLOTS) * NIC_SLOT_SIZE;
        // SAFETY: the slot lies in the RX ring the host filled before publishing the producer index.
        let len = usize::from(unsafe { (slot as *const u16).read_volatile() }).min(NIC_MAX_FRAME);
        // SAFETY: as above; the host does not touch this slot until we advance the consumer index.
        let frame = unsafe { core::slice::from_raw_parts((slot + NIC_SLOT_DATA) as *const u8, len) };
        let r = f(frame);
        reg(NIC_GPA + NIC_RX_CONS).store(cons.wrapping_add(1), Ordering::Release);
        r
    }
}

impl phy::TxToken for TxToken {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let prod = reg(NIC_GPA + NIC_TX_PROD).load(Ordering::Relaxed);
        let slot = NIC_TX_SLOTS_GPA + u64::from(prod % NIC_SLOTS) * NIC_SLOT_SIZE;
        let len = len.min(NIC_MAX_FRAME);
        // SAFETY: the slot is free (checked by `transmit`/`receive`), the host reads it only after the
        // producer index moves past it.
        let buf = unsafe { core::slice::from_raw_parts_mut((slot + NIC_SLOT_DATA) as *mut u8, len) };
        let r = f(buf);
        // SAFETY: as above.
        unsafe { (slot as *mut u16).write_volatile(len as u16) };
        reg(NIC_GPA + NIC_TX_PROD).store(prod.wrapping_add(1), Ordering::Release);
        kick_if_idle();
        r
    }
}

impl phy::Device for Nic {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken)> {
        (self.rx_pending() && self.tx_space()).then_some((RxToken, TxToken))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken> {
        self.tx_space().then_some(TxToken)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

/// A block request that failed with the given descriptor status.
#[derive(Debug, Clone, Copy)]
pub struct BlkError(pub u32);

/// Submit one block request and wait for it.
pub fn blk_request(op: u32, sector: u64, count: u32, buf: *mut u8) -> Result<(), BlkError> {
    let prod = reg(BLK_GPA + BLK_REQ_PROD).load(Ordering::Relaxed);
    let desc = BLK_GPA + BLK_DESC_OFF + u64::from(prod % BLK_SLOTS) * BLK_DESC_SIZE;
    // SAFETY: the descriptor is in the block ring page; the guest waits for each request, so the host is
    // not reading this slot.
    unsafe {
        (desc as *mut u32).write_volatile(op);
        ((desc + 4) as *mut u32).write_volatile(BLK_ST_PENDING);
        ((desc + 8) as *mut u64).write_volatile(sector);
        ((desc + 16) as *mut u32).write_volatile(count);
        ((desc + 24) as *mut u64).write_volatile(buf as u64);
    }
    let next = prod.wrapping_add(1);
    reg(BLK_GPA + BLK_REQ_PROD).store(next, Ordering::Release);
    kick_if_idle();
    let mut spins = 0u32;
    while reg(BLK_GPA + BLK_REQ_DONE).load(Ordering::Acquire) != next {
        core::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins % 4096 == 0 {
            kick_if_idle();
        }
    }
    // SAFETY: the host wrote the status before publishing the completion index.
    let st = unsafe { ((desc + 4) as *const u32).read_volatile() };
    if st == BLK_ST_OK {
        Ok(())
    } else {
        Err(BlkError(st))
    }
}
