//! The paravirtual NIC: a TX ring and an RX ring of fixed slots in guest memory (layout in [`crate::abi`]).
//! The guest owns TX-producer and RX-consumer indices; the device owns TX-consumer and RX-producer indices,
//! keeps them in its state and mirrors them into guest memory for the guest to read.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::backend::NetBackend;
use crate::abi::*;
use crate::error::{Error, Result};
use crate::memory::GuestRam;

/// Saved NIC state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NicState {
    /// MAC address.
    pub mac: [u8; 6],
    /// Next TX slot the device will read (free-running).
    pub tx_cons: u32,
    /// Next RX slot the device will fill (free-running).
    pub rx_prod: u32,
    /// Frames sent to the backend.
    pub tx_frames: u64,
    /// Frames the backend refused (the guest's TCP retransmits them).
    pub tx_errors: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Set when the guest broke the ring protocol; the device then stops until reset or restored.
    pub broken: bool,
}

/// The NIC device model (the backend is attached separately and is not part of the state).
#[derive(Debug)]
pub struct Nic {
    state: NicState,
    frame: Vec<u8>,
}

fn load(ram: &GuestRam, gpa: u64) -> Result<u32> {
    ram.load::<u32>(GuestAddress(gpa), Ordering::Acquire)
        .map_err(|e| Error::Memory {
            gpa,
            detail: e.to_string(),
        })
}

fn store(ram: &GuestRam, gpa: u64, v: u32) -> Result<()> {
    ram.store(v, GuestAddress(gpa), Ordering::Release)
        .map_err(|e| Error::Memory {
            gpa,
            detail: e.to_string(),
        })
}

/// Work done by one poll.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NicWork {
    /// Frames taken from the guest.
    pub tx: usize,
    /// Frames given to the guest.
    pub rx: usize,
}

impl Nic {
    /// A NIC with this MAC address and empty rings.
    pub fn new(mac: [u8; 6]) -> Self {
        Self {
            state: NicState {
                mac,
                ..Default::default()
            },
            frame: vec![0; NIC_MAX_FRAME],
        }
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.state.mac
    }

    /// Publish the device-owned indices into guest memory (after boot or restore).
    pub fn sync_to_guest(&self, ram: &GuestRam) -> Result<()> {
        store(ram, NIC_GPA + NIC_TX_CONS, self.state.tx_cons)?;
        store(ram, NIC_GPA + NIC_RX_PROD, self.state.rx_prod)
    }

    /// True if the guest has queued frames to send.
    pub fn tx_pending(&self, ram: &GuestRam) -> Result<bool> {
        Ok(!self.state.broken && load(ram, NIC_GPA + NIC_TX_PROD)? != self.state.tx_cons)
    }

    fn broken(&mut self, detail: String) -> Error {
        self.state.broken = true;
        Error::GuestProtocol {
            device: "nic",
            detail,
        }
    }

    /// Move queued guest frames to the backend and waiting backend frames into free RX slots.
    pub fn poll(&mut self, ram: &GuestRam, backend: &mut dyn NetBackend) -> Result<NicWork> {
        let mut work = NicWork::default();
        if self.state.broken {
            return Ok(work);
        }
        let prod = load(ram, NIC_GPA + NIC_TX_PROD)?;
        let queued = prod.wrapping_sub(self.state.tx_cons);
        if queued > NIC_SLOTS {
            return Err(self.broken(format!(
                "TX producer {prod} is {queued} slots ahead of {}",
                self.state.tx_cons
            )));
        }
        for _ in 0..queued {
            let slot = NIC_TX_SLOTS_GPA + u64::from(self.state.tx_cons % NIC_SLOTS) * NIC_SLOT_SIZE;
            let len: u16 = ram.read_obj(GuestAddress(slot)).map_err(|e| Error::Memory {
                gpa: slot,
                detail: e.to_string(),
            })?;
            let len = usize::from(len);
            if len > NIC_MAX_FRAME {
                return Err(self.broken(format!("TX frame of {len} bytes in slot at {slot:#x}")));
            }
            let frame = &mut self.frame[..len];
            ram.read_slice(frame, GuestAddress(slot + NIC_SLOT_DATA))
                .map_err(|e| Error::Memory {
                    gpa: slot,
                    detail: e.to_string(),
                })?;
            match backend.send(frame) {
                Ok(()) => self.state.tx_frames += 1,
                Err(e) => {
                    self.state.tx_errors += 1;
                    tracing::debug!("nic: backend send failed: {e}");
                }
            }
            self.state.tx_cons = self.state.tx_cons.wrapping_add(1);
            work.tx += 1;
        }
        if work.tx > 0 {
            store(ram, NIC_GPA + NIC_TX_CONS, self.state.tx_cons)?;
        }

        let cons = load(ram, NIC_GPA + NIC_RX_CONS)?;
        let used = self.state.rx_prod.wrapping_sub(cons);
        if used > NIC_SLOTS {
            return Err(self.broken(format!(
                "RX consumer {cons} is ahead of producer {}",
                self.state.rx_prod
            )));
        }
        // Only read from the backend while there is a free slot: a full ring leaves frames in the socket.
        for _ in used..NIC_SLOTS {
            let n = match backend.recv(&mut self.frame) {
                Ok(Some(n)) => n.min(NIC_MAX_FRAME),
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("nic: backend recv failed: {e}");
                    break;
                }
            };
            let slot = NIC_RX_SLOTS_GPA + u64::from(self.state.rx_prod % NIC_SLOTS) * NIC_SLOT_SIZE;
            let mem = |e: vm_memory::GuestMemoryError| Error::Memory {
                gpa: slot,
                detail: e.to_string(),
            };
            ram.write_slice(&self.frame[..n], GuestAddress(slot + NIC_SLOT_DATA))
                .map_err(mem)?;
            ram.write_obj(n as u16, GuestAddress(slot)).map_err(mem)?;
            self.state.rx_prod = self.state.rx_prod.wrapping_add(1);
            self.state.rx_frames += 1;
            work.rx += 1;
        }
        if work.rx > 0 {
            store(ram, NIC_GPA + NIC_RX_PROD, self.state.rx_prod)?;
        }
        Ok(work)
    }

    /// The current state.
    pub fn state(&self) -> NicState {
        self.state.clone()
    }

    /// Replace the state; call [`Nic::sync_to_guest`] once guest memory holds the matching contents.
    pub fn restore(&mut self, state: &NicState) -> Result<()> {
        if state.mac[0] & 1 != 0 {
            return Err(Error::state("nic", format!("multicast MAC {:02x?}", state.mac)));
        }
        self.state = state.clone();
        Ok(())
    }

    /// A new NIC with this state.
    pub fn from_state(state: &NicState) -> Result<Self> {
        let mut n = Self::new(state.mac);
        n.restore(state)?;
        Ok(n)
    }
}

/// A gratuitous ARP-style announcement (an RARP request, as hypervisors send after migration) from `mac`,
/// so a learning switch moves the MAC to the port the guest now sits behind.
pub fn announce_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x80, 0x35]); // RARP
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 3]); // Ethernet/IPv4, request reverse
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}
