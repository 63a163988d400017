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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::backend::NetBackend;
    use crate::memory::create_ram;
    use std::collections::VecDeque;

    #[derive(Default)]
    struct Loop {
        sent: Vec<Vec<u8>>,
        inbox: VecDeque<Vec<u8>>,
    }

    impl NetBackend for Loop {
        fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
            self.sent.push(frame.to_vec());
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
            Ok(self.inbox.pop_front().map(|f| {
                buf[..f.len()].copy_from_slice(&f);
                f.len()
            }))
        }
        fn poll_fd(&self) -> std::os::fd::RawFd {
            -1
        }
    }

    fn guest_send(ram: &GuestRam, idx: u32, frame: &[u8]) {
        let slot = NIC_TX_SLOTS_GPA + u64::from(idx % NIC_SLOTS) * NIC_SLOT_SIZE;
        ram.write_slice(frame, GuestAddress(slot + NIC_SLOT_DATA))
            .unwrap();
        ram.write_obj(frame.len() as u16, GuestAddress(slot)).unwrap();
        store(ram, NIC_GPA + NIC_TX_PROD, idx + 1).unwrap();
    }

    #[test]
    fn frames_flow_both_ways_and_a_full_rx_ring_leaves_frames_in_the_backend() {
        let (ram, _) = create_ram(MIN_RAM, false).unwrap();
        let mut nic = Nic::new([2, 0, 0, 0, 0, 1]);
        let mut be = Loop::default();
        guest_send(&ram, 0, b"hello");
        for i in 0..NIC_SLOTS + 5 {
            be.inbox.push_back(vec![i as u8; 60]);
        }
        let w = nic.poll(&ram, &mut be).unwrap();
        assert_eq!(
            w,
            NicWork {
                tx: 1,
                rx: NIC_SLOTS as usize
            }
        );
        assert_eq!(be.sent, [b"hello".to_vec()]);
        assert_eq!(be.inbox.len(), 5, "no frame is dropped when the ring is full");
        assert_eq!(load(&ram, NIC_GPA + NIC_RX_PROD).unwrap(), NIC_SLOTS);
        // The guest consumes two; two more arrive.
        store(&ram, NIC_GPA + NIC_RX_CONS, 2).unwrap();
        assert_eq!(nic.poll(&ram, &mut be).unwrap().rx, 2);
    }

    #[test]
    fn a_guest_that_breaks_the_ring_gets_an_error_and_a_stopped_device() {
        let (ram, _) = create_ram(MIN_RAM, false).unwrap();
        let mut nic = Nic::new([2, 0, 0, 0, 0, 1]);
        let mut be = Loop::default();
        store(&ram, NIC_GPA + NIC_TX_PROD, NIC_SLOTS + 1).unwrap();
        assert!(matches!(
            nic.poll(&ram, &mut be),
            Err(Error::GuestProtocol { .. })
        ));
        assert!(nic.state().broken);
        assert_eq!(nic.poll(&ram, &mut be).unwrap(), NicWork::default());
        // An oversized length is refused too.
        let mut nic = Nic::new([2, 0, 0, 0, 0, 1]);
        store(&ram, NIC_GPA + NIC_TX_PROD, 1).unwrap();
        ram.write_obj(u16::MAX, GuestAddress(NIC_TX_SLOTS_GPA)).unwrap();
        assert!(nic.poll(&ram, &mut be).is_err());
        assert!(be.sent.is_empty());
    }

    #[test]
    fn state_loads_any_number_of_times_into_fresh_and_running_nics() {
        let (ram, _) = create_ram(MIN_RAM, false).unwrap();
        let mut nic = Nic::new([2, 0, 0, 0, 0, 1]);
        let mut be = Loop::default();
        guest_send(&ram, 0, b"one");
        nic.poll(&ram, &mut be).unwrap();
        let st = nic.state();
        let bytes = crate::devices::encode("nic", &st).unwrap();
        for _ in 0..3 {
            let decoded: NicState = crate::devices::decode("nic", &bytes).unwrap();
            let fresh = Nic::from_state(&decoded).unwrap();
            assert_eq!(fresh.state(), st);
            nic.restore(&decoded).unwrap();
            assert_eq!(nic.state(), st);
        }
        // The restored NIC continues where the saved one stood.
        guest_send(&ram, 1, b"two");
        assert_eq!(nic.poll(&ram, &mut be).unwrap().tx, 1);
        assert_eq!(be.sent.len(), 2);
        assert!(
            Nic::from_state(&NicState {
                mac: [1, 0, 0, 0, 0, 0],
                ..st
            })
            .is_err()
        );
        assert!(crate::devices::decode::<NicState>("nic", &bytes[..bytes.len() - 1]).is_err());
    }
}
