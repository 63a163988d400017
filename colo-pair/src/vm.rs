//! The seams a VMM implements: its guest ([`Vm`]) and its channel to the peer ([`Link`]); and what the
//! drivers hand back to it ([`Output`]).

use std::io::{Read, Write};

use bytes::Bytes;
use colo_failover::FenceToken;
use colo_proto::{Channel, Message, PagePhase};
use vm_memory::GuestMemoryBackend;

/// The error a VMM reports from a guest operation.
pub type VmError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One device's (or the vCPUs') saved state: an opaque blob the VMM produces and loads again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// The VMM's id for the device (the same on both sides).
    pub id: u32,
    /// The serialised state.
    pub data: Vec<u8>,
}

/// The guest as the pair drivers see it. Everything else (KVM, vCPU threads, device models) stays in the VMM.
///
/// Dirty logs are not part of this trait: the VMM hands the drivers a colo-ram [`DirtyLog`] at construction
/// (on KVM `UnionLog<KvmDirtyLog, AtomicBitmapLog>`, so the VMM's own writes to guest memory are seen too).
///
/// [`DirtyLog`]: colo_ram::DirtyLog
pub trait Vm {
    /// The guest memory type (vm-memory), mapped in this process.
    type Memory: GuestMemoryBackend;

    /// Guest memory. The primary reads dirty pages from it; the secondary's RAM cache flushes into it.
    fn memory(&self) -> &Self::Memory;

    /// Stops the vCPUs and device emulation at a consistent point (no request half done, no DMA running).
    /// Pausing a paused or never started guest succeeds.
    ///
    /// Nothing may write guest memory until [`Vm::resume`]: the checkpoint's page CRCs are taken when the
    /// pages are collected and checked by the secondary after the send, so a page written in between fails
    /// the checkpoint (`colo_proto::Error::PageCrc`), which stops the secondary and leaves the primary alone.
    fn pause(&mut self) -> Result<(), VmError>;

    /// Lets the guest run (starts it, the first time on the secondary).
    fn resume(&mut self) -> Result<(), VmError>;

    /// Saves vCPU and device state of the paused guest.
    fn save_state(&mut self) -> Result<Vec<DeviceState>, VmError>;

    /// Loads state saved by the peer's [`Vm::save_state`] into the paused guest, whose RAM already holds the
    /// matching contents. Must work any number of times.
    fn load_state(&mut self, state: &[DeviceState]) -> Result<(), VmError>;

    /// Checks state from the peer before anything of its checkpoint reaches the guest: the secondary calls
    /// this before it flushes the checkpoint's RAM into the guest, and [`load_state`](Vm::load_state) only
    /// after that. A refusal is the primary's protocol error: the secondary stops (it tells the primary,
    /// which goes on alone) with the guest's RAM and devices as they were. Implement it with the same
    /// validation `load_state` does (decode every blob, check ids and sizes) without changing anything;
    /// `load_state` may then fail only for local reasons. The default accepts everything.
    fn check_state(&self, state: &[DeviceState]) -> Result<(), VmError> {
        let _ = state;
        Ok(())
    }
}

/// The sending half of the checkpoint channel. Implemented for [`colo_proto::Channel`] over any stream;
/// receiving is the VMM's (a reader thread, a poll loop): it hands each message to the driver.
pub trait Link {
    /// Sends one message.
    fn send(&mut self, msg: &Message) -> Result<(), colo_proto::Error>;

    /// Sends guest pages straight from guest memory (see [`Channel::send_pages`]). With `page_crcs` (one per
    /// data page, taken where the pages were collected; only when the phase's frames carry them, see
    /// [`PagePhase::carries_page_crcs`]) the frames take those instead of reading the pages again (see
    /// [`Channel::send_pages_with_crcs`]).
    fn send_pages(
        &mut self,
        phase: PagePhase,
        epoch: u64,
        page_size: u32,
        pages: &[(u64, &[u8])],
        page_crcs: Option<&[u32]>,
    ) -> Result<(), colo_proto::Error>;

    /// Sends device state (see [`Channel::send_vmstate`]).
    fn send_vmstate(
        &mut self,
        epoch: u64,
        devices: &[(u32, &[u8])],
        chunk: usize,
    ) -> Result<(), colo_proto::Error>;

    /// The protocol version frames are written in (the handshake's result). The drivers send the
    /// version-3 messages (disk sync, block acks, checkpoint wishes, primary ISNs) only from version 3.
    /// The default claims the newest version.
    fn version(&self) -> u16 {
        colo_proto::PROTOCOL_VERSION
    }
}

impl<S: Read + Write> Link for Channel<S> {
    fn send(&mut self, msg: &Message) -> Result<(), colo_proto::Error> {
        Channel::send(self, msg)
    }

    fn send_pages(
        &mut self,
        phase: PagePhase,
        epoch: u64,
        page_size: u32,
        pages: &[(u64, &[u8])],
        page_crcs: Option<&[u32]>,
    ) -> Result<(), colo_proto::Error> {
        match page_crcs {
            Some(crcs) => Channel::send_pages_with_crcs(self, phase, epoch, page_size, pages, crcs),
            None => Channel::send_pages(self, phase, epoch, page_size, pages),
        }
    }

    fn send_vmstate(
        &mut self,
        epoch: u64,
        devices: &[(u32, &[u8])],
        chunk: usize,
    ) -> Result<(), colo_proto::Error> {
        Channel::send_vmstate(self, epoch, devices, chunk)
    }

    fn version(&self) -> u16 {
        Channel::version(self)
    }
}

/// Why a frame reached the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The SVM produced the same output (colo-net's comparator matched it).
    Compared,
    /// Released when the secondary held the whole checkpoint `epoch`, which contains the state that
    /// produced it.
    Checkpoint {
        /// The checkpoint.
        epoch: u64,
    },
    /// Released by a primary that lost its secondary (queued output of the last epoch).
    Failover,
    /// Output of a node running alone (no partner to compare with).
    Alone,
}

/// What a driver asks the VMM to do with frames and the guest, drained with `poll_output`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Put this frame on the client network, stamped with the fencing token (see colo-failover's
    /// `FenceGate`).
    ToClient {
        /// The Ethernet frame.
        frame: Bytes,
        /// The fencing token of the release.
        token: FenceToken,
        /// Why it may leave.
        release: Release,
    },
    /// Deliver this frame to the guest's NIC.
    ToGuest(Bytes),
    /// Secondary: the SVM is now the primary; take over the client-facing address (gratuitous ARP,
    /// switch port) and send its output to the client from now on.
    Promoted {
        /// The fencing token of the promotion.
        token: FenceToken,
    },
    /// Primary: the secondary is gone; the guest runs alone, unprotected.
    ContinuedAlone {
        /// The fencing token.
        token: FenceToken,
    },
    /// The guest shut down on the primary: shut this side's guest down too (secondary), or finish (primary).
    GuestShutdown,
    /// The arbiter gave the guest to the other node: this copy must stay stopped.
    StopGuest,
}
