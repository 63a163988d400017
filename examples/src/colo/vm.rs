//! The mini-VMM's [`Machine`] as colo-pair sees it ([`colo_pair::Vm`]), and its dirty log.

use std::borrow::Borrow;
use std::sync::Arc;

use bytes::Bytes;
use colo_pair::{DeviceState, Vm, VmError};
use colo_ram::{AtomicBitmapLog, DirtyLog, KvmDirtyLog, RamError, RamLayout, UnionLog};
use kvm_ioctls::VmFd;

use super::net::RxQueue;
use crate::memory::GuestRam;
use crate::migration::MACHINE_STATE_ID;
use crate::vm::{Machine, MachineState, RAM_SLOT};

/// Device id of the NIC's receive queue (frames not yet taken by the guest) in a checkpoint.
pub const RX_QUEUE_ID: u32 = 2;

/// A [`Machine`] for colo-pair: pause/resume, its RAM, and its state as two blobs (vCPU + devices as one
/// [`MachineState`], and the NIC's host-side receive queue).
#[derive(Debug, Clone)]
pub struct ColoVm {
    machine: Arc<Machine>,
    rx: Arc<RxQueue>,
}

impl ColoVm {
    /// Wraps a machine whose NIC backend reads from `rx`.
    pub fn new(machine: Arc<Machine>, rx: Arc<RxQueue>) -> Self {
        Self { machine, rx }
    }

    /// The machine.
    pub fn machine(&self) -> &Arc<Machine> {
        &self.machine
    }
}

impl Vm for ColoVm {
    type Memory = GuestRam;

    fn memory(&self) -> &GuestRam {
        self.machine.ram()
    }

    fn pause(&mut self) -> Result<(), VmError> {
        let took = self.machine.pause()?;
        if took > std::time::Duration::from_millis(100) {
            tracing::warn!("COLO: stopping the guest took {took:?} (a device request in flight)");
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        Ok(self.machine.resume()?)
    }

    fn save_state(&mut self) -> Result<Vec<DeviceState>, VmError> {
        Ok(vec![
            DeviceState {
                id: MACHINE_STATE_ID,
                data: self.machine.save_state()?.to_bytes()?,
            },
            DeviceState {
                id: RX_QUEUE_ID,
                data: RxQueue::encode(&self.rx.snapshot()),
            },
        ])
    }

    fn check_state(&self, state: &[DeviceState]) -> Result<(), VmError> {
        let (machine, _) = decode(state)?;
        Ok(self.machine.check_state(&machine)?)
    }

    fn load_state(&mut self, state: &[DeviceState]) -> Result<(), VmError> {
        // Decode and validate everything before changing anything.
        let (machine, rx) = decode(state)?;
        self.machine.restore_state(&machine)?;
        self.rx.replace(rx);
        Ok(())
    }
}

/// The machine state and the NIC's receive queue of a checkpoint, each present exactly once.
fn decode(state: &[DeviceState]) -> Result<(MachineState, Vec<Bytes>), VmError> {
    let blob = |id| {
        let mut found = state.iter().filter(|s| s.id == id);
        match (found.next(), found.next()) {
            (Some(s), None) => Ok(&s.data[..]),
            (None, _) => Err(format!("checkpoint has no device {id}")),
            (Some(_), Some(_)) => Err(format!("checkpoint has device {id} twice")),
        }
    };
    if let Some(s) = state
        .iter()
        .find(|s| ![MACHINE_STATE_ID, RX_QUEUE_ID].contains(&s.id))
    {
        return Err(format!("checkpoint has unknown device {}", s.id).into());
    }
    let machine = MachineState::from_bytes(blob(MACHINE_STATE_ID)?)?;
    let rx = RxQueue::decode(blob(RX_QUEUE_ID)?).map_err(|e| format!("NIC receive queue: {e}"))?;
    Ok((machine, rx))
}

/// Lets colo-ram's KVM log own a reference to the machine's VM fd.
#[derive(Debug, Clone)]
pub struct VmFdOf(pub Arc<Machine>);

impl Borrow<VmFd> for VmFdOf {
    fn borrow(&self) -> &VmFd {
        self.0.vm_fd()
    }
}

/// The dirty log of a machine's RAM: KVM's log (the guest's writes) OR vm-memory's bitmap (the VMM's own
/// writes: device emulation, a RAM cache flush).
pub fn dirty_log(machine: &Arc<Machine>) -> Result<Box<dyn DirtyLog + Send>, RamError> {
    let ram = machine.ram();
    let layout = RamLayout::of(&**ram)?;
    Ok(Box::new(UnionLog::new(
        KvmDirtyLog::new(VmFdOf(machine.clone()), layout, vec![RAM_SLOT])?,
        AtomicBitmapLog::new(ram)?,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{MachineConfig, NetConfig};
    use bytes::Bytes;

    #[test]
    fn state_loads_any_number_of_times_and_bad_checkpoints_are_refused_by_the_check_and_change_nothing() {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            eprintln!("SKIPPED: colo::vm state test: /dev/kvm is not available");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
        let mut cfg = MachineConfig::new(disk, NetConfig::None);
        cfg.ram_size = 16 << 20;
        let mut m = Machine::new(cfg).unwrap();
        m.boot(crate::GUEST_ELF).unwrap();
        let rx = Arc::new(RxQueue::new().unwrap());
        let mut vm = ColoVm::new(Arc::new(m), rx.clone());
        rx.push(Bytes::from_static(b"queued at the checkpoint"));
        let saved = vm.save_state().unwrap();
        assert_eq!(saved.len(), 2);
        rx.replace(vec![Bytes::from_static(b"the secondary's own")]);
        let bad: Vec<Vec<DeviceState>> = vec![
            saved[..1].to_vec(),
            vec![saved[0].clone(), saved[1].clone(), saved[1].clone()],
            vec![
                saved[0].clone(),
                saved[1].clone(),
                DeviceState { id: 9, data: vec![] },
            ],
            vec![
                DeviceState {
                    id: MACHINE_STATE_ID,
                    data: vec![1, 2, 3],
                },
                saved[1].clone(),
            ],
            vec![
                saved[0].clone(),
                DeviceState {
                    id: RX_QUEUE_ID,
                    data: vec![9; 7],
                },
            ],
        ];
        vm.check_state(&saved).unwrap();
        for b in bad {
            assert!(
                vm.check_state(&b).is_err(),
                "check_state refuses what load_state refuses"
            );
            assert!(vm.load_state(&b).is_err());
            assert_eq!(
                rx.snapshot(),
                vec![Bytes::from_static(b"the secondary's own")],
                "unchanged"
            );
        }
        for _ in 0..3 {
            vm.load_state(&saved).unwrap();
            assert_eq!(
                rx.snapshot(),
                vec![Bytes::from_static(b"queued at the checkpoint")]
            );
        }
    }
}
