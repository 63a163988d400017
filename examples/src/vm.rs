//! The machine: one KVM VM with one vCPU, guest RAM, the three devices, a vCPU thread and a device thread,
//! and pause / resume / save / restore. Nothing here knows about migration or COLO: that glue drives a
//! [`Machine`] through its public methods.

use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::abi::*;
use crate::devices::backend::{NetBackend, NoopBackend, TapBackend, UnixDgramBackend};
use crate::devices::block::{Block, DiskBackend};
use crate::devices::nic::{Nic, announce_frame};
use crate::devices::serial::Serial;
use crate::devices::{self, DevicesState};
use crate::error::{Error, Result};
use crate::memory::{self, BootInfo, GuestRam};
use crate::vcpu::{self, VcpuState};

/// Where the NIC's frames go.
#[derive(Debug, Clone)]
pub enum NetConfig {
    /// A port on a [`crate::switch`]: bind `local`, send to `switch`.
    Switch {
        /// The switch's socket.
        switch: PathBuf,
        /// This NIC's socket.
        local: PathBuf,
    },
    /// A tap interface.
    Tap(String),
    /// No cable.
    None,
}

/// How to build a machine.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// RAM size in bytes (multiple of 2 MiB, 16 MiB to 1 GiB).
    pub ram_size: u64,
    /// Back RAM with a memfd (shareable with another process).
    pub memfd: bool,
    /// Raw disk image.
    pub disk: PathBuf,
    /// NIC backend.
    pub net: NetConfig,
    /// NIC MAC address.
    pub mac: [u8; 6],
    /// Guest IPv4 address.
    pub ip: [u8; 4],
    /// Prefix length.
    pub prefix: u8,
    /// TCP port of the guest's key-value service.
    pub port: u16,
}

impl MachineConfig {
    /// A 64 MiB machine on `disk` with the default guest address 10.0.2.15/24 port 7000.
    pub fn new(disk: PathBuf, net: NetConfig) -> Self {
        Self {
            ram_size: 64 << 20,
            memfd: false,
            disk,
            net,
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            ip: [10, 0, 2, 15],
            prefix: 24,
            port: 7000,
        }
    }
}

/// Why the guest stopped for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestExit {
    /// The guest powered off with this code.
    PowerOff(u32),
    /// The guest faulted or made an exit the VMM does not handle.
    Fault(String),
    /// The VMM was told to quit.
    Quit,
}

/// Run state as the control socket reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Threads not started yet (e.g. waiting for an incoming migration).
    Created,
    /// vCPU running.
    Running,
    /// vCPU and devices stopped; state can be saved or loaded.
    Paused,
    /// The guest is gone.
    Stopped,
}

/// Everything but RAM: the vCPU and the devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    /// The vCPU.
    pub vcpu: VcpuState,
    /// The devices.
    pub devices: DevicesState,
}

impl MachineState {
    /// Encode for the wire.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let v = self.vcpu.to_bytes()?;
        let d = devices::encode("devices", &self.devices)?;
        let mut out = Vec::with_capacity(8 + v.len() + d.len());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(&v);
        out.extend_from_slice(&d);
        Ok(out)
    }

    /// Decode and validate.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let n = b.get(..4).ok_or_else(|| Error::state("machine", "truncated"))?;
        let n = u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize;
        let v = b
            .get(4..4usize.saturating_add(n))
            .ok_or_else(|| Error::state("machine", "truncated vCPU state"))?;
        Ok(Self {
            vcpu: VcpuState::from_bytes(v)?,
            devices: devices::decode("devices", &b[4 + n..])?,
        })
    }
}

const WANT_RUN: u8 = 0;
const WANT_PAUSE: u8 = 1;
const WANT_QUIT: u8 = 2;

#[derive(Debug, Default)]
struct Phases {
    vcpu_paused: bool,
    dev_paused: bool,
    vcpu_exited: bool,
    dev_exited: bool,
    exit: Option<GuestExit>,
}

/// State shared by the machine's threads.
struct Shared {
    want: AtomicU8,
    phases: Mutex<Phases>,
    changed: Condvar,
    /// The guest's idle wait: set when the device thread delivered something.
    wake: Mutex<bool>,
    wake_cond: Condvar,
    /// Wakes the device thread (guest doorbell, pause, quit).
    kick: EventFd,
    exits: AtomicU64,
    kicks: AtomicU64,
}

impl Shared {
    fn wake_vcpu(&self) {
        *lock(&self.wake) = true;
        self.wake_cond.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Devices {
    nic: Nic,
    block: Block,
    backend: Box<dyn NetBackend>,
}

/// One running (or paused) virtual machine.
pub struct Machine {
    config: MachineConfig,
    kvm: Kvm,
    vm: VmFd,
    ram: Arc<GuestRam>,
    ram_file: Option<std::fs::File>,
    vcpu: Arc<Mutex<VcpuFd>>,
    serial: Arc<Mutex<Serial>>,
    devices: Arc<Mutex<Devices>>,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    started: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("config", &self.config)
            .field("state", &self.run_state())
            .finish()
    }
}

extern "C" fn on_kick_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// The KVM memory slot holding guest RAM.
pub const RAM_SLOT: u32 = 0;

impl Machine {
    /// Create the VM, its RAM and devices, with the guest not yet loaded.
    pub fn new(config: MachineConfig) -> Result<Self> {
        Self::with_backends(config, None, None)
    }

    /// Like [`Machine::new`], but with the NIC's frames going to `net` and the disk's I/O going to `disk`
    /// instead of what `config` names (a COLO VMM interposes its comparator and block replication here).
    pub fn with_backends(
        config: MachineConfig,
        net: Option<Box<dyn NetBackend>>,
        disk: Option<Box<dyn DiskBackend>>,
    ) -> Result<Self> {
        static SIGNAL: Once = Once::new();
        SIGNAL.call_once(|| {
            if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick_signal) {
                tracing::error!("registering the vCPU kick signal: {e}");
            }
        });
        let kvm = Kvm::new().map_err(Error::kvm("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(Error::kvm("create_vm"))?;
        let (ram, ram_file) = memory::create_ram(config.ram_size, config.memfd)?;
        let region = ram.iter().next().ok_or_else(|| Error::Memory {
            gpa: 0,
            detail: "no RAM region".into(),
        })?;
        let host = ram.get_host_address(GuestAddress(0)).map_err(|e| Error::Memory {
            gpa: 0,
            detail: e.to_string(),
        })?;
        let slot = kvm_userspace_memory_region {
            slot: RAM_SLOT,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping behind `host` lives in `ram`, which the Machine keeps for as long as the VM.
        unsafe { vm.set_user_memory_region(slot) }.map_err(Error::kvm("set_user_memory_region"))?;
        let vcpu = vm.create_vcpu(0).map_err(Error::kvm("create_vcpu"))?;

        let block = match disk {
            Some(d) => Block::with_backend(d)?,
            None => Block::open(&config.disk)?,
        };
        let backend: Box<dyn NetBackend> = match (net, &config.net) {
            (Some(b), _) => b,
            (None, NetConfig::Switch { switch, local }) => Box::new(
                UnixDgramBackend::connect(local, switch)
                    .map_err(Error::io(format!("attaching to switch {}", switch.display())))?,
            ),
            (None, NetConfig::Tap(name)) => {
                Box::new(TapBackend::open(name).map_err(Error::io(format!("opening tap {name}")))?)
            }
            (None, NetConfig::None) => Box::new(NoopBackend::new().map_err(Error::io("eventfd"))?),
        };
        let shared = Arc::new(Shared {
            want: AtomicU8::new(WANT_PAUSE),
            phases: Mutex::new(Phases {
                vcpu_paused: true,
                dev_paused: true,
                ..Default::default()
            }),
            changed: Condvar::new(),
            wake: Mutex::new(false),
            wake_cond: Condvar::new(),
            kick: EventFd::new(libc::EFD_NONBLOCK).map_err(Error::io("eventfd"))?,
            exits: AtomicU64::new(0),
            kicks: AtomicU64::new(0),
        });
        Ok(Self {
            kvm,
            vm,
            ram: Arc::new(ram),
            ram_file,
            vcpu: Arc::new(Mutex::new(vcpu)),
            serial: Arc::new(Mutex::new(Serial::new())),
            devices: Arc::new(Mutex::new(Devices {
                nic: Nic::new(config.mac),
                block,
                backend,
            })),
            shared,
            threads: Mutex::new(Vec::new()),
            started: std::sync::atomic::AtomicBool::new(false),
            config,
        })
    }
}

impl Machine {
    /// Load the guest image and set up a fresh boot: boot tables, boot info, CPL3 long-mode vCPU.
    pub fn boot(&mut self, elf: &[u8]) -> Result<()> {
        if self.started.load(Ordering::SeqCst) {
            return Err(Error::WrongState {
                state: "started",
                op: "boot",
            });
        }
        memory::write_boot_tables(&self.ram)?;
        let entry = memory::load_elf(&self.ram, elf)?;
        let vcpu = lock(&self.vcpu);
        let tsc_khz = vcpu.get_tsc_khz().map_err(Error::kvm("get_tsc_khz"))?;
        let devs = lock(&self.devices);
        memory::write_boot_info(
            &self.ram,
            &BootInfo {
                tsc_khz: u64::from(tsc_khz),
                disk_sectors: devs.block.sectors(),
                mac: self.config.mac,
                ip: self.config.ip,
                prefix: self.config.prefix,
                port: self.config.port,
            },
        )?;
        devs.nic.sync_to_guest(&self.ram)?;
        devs.block.sync_to_guest(&self.ram)?;
        vcpu::setup_long_mode(&self.kvm, &vcpu, entry)
    }

    /// Prepare the vCPU of a machine that will receive its state (CPUID must be set before the state).
    pub fn prepare_incoming(&mut self) -> Result<()> {
        let vcpu = lock(&self.vcpu);
        vcpu::setup_long_mode(&self.kvm, &vcpu, IMAGE_GPA)
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The memfd behind RAM, if the machine was made with one.
    pub fn ram_file(&self) -> Option<&std::fs::File> {
        self.ram_file.as_ref()
    }

    /// The KVM VM (for dirty logging).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// The configuration.
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// Hand every console line to `sink` as well as to the log.
    pub fn set_console_sink(&self, sink: Box<dyn FnMut(&str) + Send>) {
        lock(&self.serial).set_sink(sink);
    }

    /// Start the vCPU and device threads (paused if `paused`).
    pub fn start(&self, paused: bool) -> Result<()> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Err(Error::WrongState {
                state: "started",
                op: "start",
            });
        }
        self.shared
            .want
            .store(if paused { WANT_PAUSE } else { WANT_RUN }, Ordering::SeqCst);
        {
            let mut p = lock(&self.shared.phases);
            p.vcpu_paused = paused;
            p.dev_paused = paused;
        }
        let (shared, vcpu, serial, ram) = (
            self.shared.clone(),
            self.vcpu.clone(),
            self.serial.clone(),
            self.ram.clone(),
        );
        let t = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || vcpu_thread(&shared, &vcpu, &serial, &ram))
            .map_err(Error::io("spawning the vCPU thread"))?;
        lock(&self.threads).push(t);
        let (shared, devices, ram) = (self.shared.clone(), self.devices.clone(), self.ram.clone());
        let t = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || device_thread(&shared, &devices, &ram))
            .map_err(Error::io("spawning the device thread"))?;
        lock(&self.threads).push(t);
        Ok(())
    }

    /// Current run state.
    pub fn run_state(&self) -> RunState {
        let p = lock(&self.shared.phases);
        if p.vcpu_exited {
            RunState::Stopped
        } else if !self.started.load(Ordering::SeqCst) {
            RunState::Created
        } else if p.vcpu_paused && p.dev_paused {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    /// Why the guest stopped, once it has.
    pub fn exit_reason(&self) -> Option<GuestExit> {
        lock(&self.shared.phases).exit.clone()
    }

    /// Stop the vCPU and the devices at a consistent point: the vCPU is out of KVM_RUN and the device thread
    /// has finished every request it started. Returns how long it took.
    pub fn pause(&self) -> Result<Duration> {
        let t0 = Instant::now();
        if !self.started.load(Ordering::SeqCst) {
            return Ok(Duration::ZERO);
        }
        self.shared.want.store(WANT_PAUSE, Ordering::SeqCst);
        let mut p = lock(&self.shared.phases);
        loop {
            if (p.vcpu_paused || p.vcpu_exited) && (p.dev_paused || p.dev_exited) {
                return Ok(t0.elapsed());
            }
            drop(p);
            self.poke_threads();
            p = lock(&self.shared.phases);
            p = self
                .shared
                .changed
                .wait_timeout(p, Duration::from_millis(1))
                .map_or_else(|e| e.into_inner().0, |r| r.0);
        }
    }

    fn poke_threads(&self) {
        let _ = self.shared.kick.write(1);
        self.shared.wake_vcpu();
        if let Some(t) = lock(&self.threads).first() {
            // SAFETY: the thread is alive (joined only in Drop) and SIGRTMIN has a no-op handler; the signal
            // only makes KVM_RUN return EINTR.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// Let a paused machine run.
    pub fn resume(&self) -> Result<()> {
        if !self.started.load(Ordering::SeqCst) {
            return Err(Error::WrongState {
                state: "created",
                op: "resume",
            });
        }
        if lock(&self.shared.phases).vcpu_exited {
            return Err(Error::WrongState {
                state: "stopped",
                op: "resume",
            });
        }
        self.shared.want.store(WANT_RUN, Ordering::SeqCst);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Stop the threads for good.
    pub fn quit(&self) {
        self.shared.want.store(WANT_QUIT, Ordering::SeqCst);
        self.shared.changed.notify_all();
        while lock(&self.threads).iter().any(|t| !t.is_finished()) {
            self.poke_threads();
            std::thread::sleep(Duration::from_millis(1));
        }
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        let mut p = lock(&self.shared.phases);
        p.vcpu_exited = true;
        p.exit.get_or_insert(GuestExit::Quit);
    }

    /// Wait until the guest stops by itself (power off or fault), up to `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> Option<GuestExit> {
        let deadline = Instant::now() + timeout;
        let mut p = lock(&self.shared.phases);
        loop {
            if let Some(e) = &p.exit {
                return Some(e.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            p = self
                .shared
                .changed
                .wait_timeout(p, left)
                .map_or_else(|e| e.into_inner().0, |r| r.0);
        }
    }

    fn check_stopped(&self, op: &'static str) -> Result<()> {
        match self.run_state() {
            RunState::Paused | RunState::Created | RunState::Stopped => Ok(()),
            RunState::Running => Err(Error::WrongState { state: "running", op }),
        }
    }

    /// Save the vCPU and device state of a paused machine.
    pub fn save_state(&self) -> Result<MachineState> {
        self.check_stopped("save state")?;
        let vcpu = VcpuState::save(&lock(&self.vcpu))?;
        let devs = lock(&self.devices);
        let devices = DevicesState {
            serial: lock(&self.serial).state(),
            nic: devs.nic.state(),
            block: devs.block.state(),
        };
        Ok(MachineState { vcpu, devices })
    }

    /// Load vCPU and device state into a paused (or not yet started) machine whose RAM already holds the
    /// matching contents. May be called any number of times.
    pub fn restore_state(&self, state: &MachineState) -> Result<()> {
        self.check_stopped("restore state")?;
        // Validate everything before changing anything.
        self.check_state(state)?;
        let mut devs = lock(&self.devices);
        let mut serial = lock(&self.serial);
        state.vcpu.restore(&lock(&self.vcpu))?;
        serial.restore(&state.devices.serial)?;
        devs.nic.restore(&state.devices.nic)?;
        devs.block.restore(&state.devices.block)?;
        devs.nic.sync_to_guest(&self.ram)?;
        devs.block.sync_to_guest(&self.ram)?;
        Ok(())
    }

    /// Checks that `state` would load into this machine, changing nothing: everything
    /// [`Machine::restore_state`] validates before it changes anything. Works while the guest runs.
    pub fn check_state(&self, state: &MachineState) -> Result<()> {
        state.vcpu.validate()?;
        Serial::from_state(&state.devices.serial)?;
        Nic::from_state(&state.devices.nic)?;
        let sectors = lock(&self.devices).block.sectors();
        if state.devices.block.sectors != sectors {
            return Err(Error::state(
                "block",
                format!(
                    "state is for {} sectors, image has {sectors}",
                    state.devices.block.sectors
                ),
            ));
        }
        Ok(())
    }

    /// Send a frame on behalf of the guest announcing its MAC (after it moved to this process).
    pub fn announce(&self) -> Result<()> {
        let mut devs = lock(&self.devices);
        let frame = announce_frame(devs.nic.mac());
        devs.backend
            .send(&frame)
            .map_err(Error::io("sending the MAC announcement"))
    }

    /// Counters for status reports.
    pub fn stats(&self) -> MachineStats {
        let devs = lock(&self.devices);
        let nic = devs.nic.state();
        let blk = devs.block.state();
        MachineStats {
            state: self.run_state(),
            ram_size: memory::ram_size(&self.ram),
            vcpu_exits: self.shared.exits.load(Ordering::Relaxed),
            kicks: self.shared.kicks.load(Ordering::Relaxed),
            nic_tx: nic.tx_frames,
            nic_rx: nic.rx_frames,
            blk_writes: blk.writes,
            console_lines: lock(&self.serial).state().lines,
        }
    }

    /// Read one 4 KiB page of RAM (for tests and tools).
    pub fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.ram
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| Error::Memory {
                gpa,
                detail: e.to_string(),
            })
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if !lock(&self.threads).is_empty() {
            self.quit();
        }
    }
}

/// Counters reported by [`Machine::stats`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineStats {
    /// Run state.
    pub state: RunState,
    /// RAM size in bytes.
    pub ram_size: u64,
    /// vCPU exits to user space.
    pub vcpu_exits: u64,
    /// Guest doorbells.
    pub kicks: u64,
    /// Frames sent by the guest.
    pub nic_tx: u64,
    /// Frames delivered to the guest.
    pub nic_rx: u64,
    /// Block writes.
    pub blk_writes: u64,
    /// Console lines.
    pub console_lines: u64,
}

fn set_phase(shared: &Shared, f: impl FnOnce(&mut Phases)) {
    f(&mut lock(&shared.phases));
    shared.changed.notify_all();
}

/// Park a thread while the machine is paused. Returns false if it must quit.
fn park_while_paused(shared: &Shared, is_vcpu: bool) -> bool {
    let mut p = lock(&shared.phases);
    loop {
        match shared.want.load(Ordering::SeqCst) {
            WANT_RUN => {
                if is_vcpu {
                    p.vcpu_paused = false
                } else {
                    p.dev_paused = false
                }
                shared.changed.notify_all();
                return true;
            }
            WANT_QUIT => return false,
            _ => {
                if is_vcpu {
                    p.vcpu_paused = true
                } else {
                    p.dev_paused = true
                }
                shared.changed.notify_all();
                p = shared
                    .changed
                    .wait_timeout(p, Duration::from_millis(50))
                    .map_or_else(|e| e.into_inner().0, |r| r.0);
            }
        }
    }
}

fn rx_waiting(ram: &GuestRam) -> bool {
    let prod = ram.load::<u32>(GuestAddress(NIC_GPA + NIC_RX_PROD), Ordering::Acquire);
    let cons = ram.load::<u32>(GuestAddress(NIC_GPA + NIC_RX_CONS), Ordering::Acquire);
    matches!((prod, cons), (Ok(p), Ok(c)) if p != c)
}

fn vcpu_thread(shared: &Shared, vcpu: &Mutex<VcpuFd>, serial: &Mutex<Serial>, ram: &GuestRam) {
    let exit = 'outer: loop {
        if shared.want.load(Ordering::SeqCst) != WANT_RUN && !park_while_paused(shared, true) {
            break GuestExit::Quit;
        }
        let mut vcpu = lock(vcpu);
        loop {
            if shared.want.load(Ordering::SeqCst) != WANT_RUN {
                break;
            }
            let exit = vcpu.run();
            shared.exits.fetch_add(1, Ordering::Relaxed);
            match exit {
                Ok(VcpuExit::IoOut(PORT_SERIAL, data)) => {
                    let n = data
                        .get(..4)
                        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .min(CONSOLE_MAX);
                    let mut buf = vec![0u8; n as usize];
                    match ram.read_slice(&mut buf, GuestAddress(CONSOLE_GPA)) {
                        Ok(()) => lock(serial).write(&buf),
                        Err(e) => tracing::warn!("serial: console buffer: {e}"),
                    }
                }
                Ok(VcpuExit::IoOut(PORT_KICK, _)) => {
                    shared.kicks.fetch_add(1, Ordering::Relaxed);
                    let _ = shared.kick.write(1);
                }
                Ok(VcpuExit::IoOut(PORT_IDLE, data)) => {
                    let us = data
                        .get(..4)
                        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                    let wait = Duration::from_micros(u64::from(us.min(50_000)));
                    let mut woken = lock(&shared.wake);
                    if !*woken && !rx_waiting(ram) && shared.want.load(Ordering::SeqCst) == WANT_RUN {
                        woken = shared
                            .wake_cond
                            .wait_timeout(woken, wait)
                            .map_or_else(|e| e.into_inner().0, |r| r.0);
                    }
                    *woken = false;
                }
                Ok(VcpuExit::IoOut(PORT_POWEROFF, data)) => {
                    let code = data
                        .get(..4)
                        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                    break 'outer GuestExit::PowerOff(code);
                }
                Ok(VcpuExit::Shutdown) => {
                    let regs = vcpu
                        .get_regs()
                        .map(|r| format!("rip {:#x} rsp {:#x}", r.rip, r.rsp))
                        .unwrap_or_default();
                    break 'outer GuestExit::Fault(format!("triple fault (shutdown) at {regs}"));
                }
                Ok(other) => break 'outer GuestExit::Fault(format!("unhandled exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => break 'outer GuestExit::Fault(format!("KVM_RUN: {e}")),
            }
        }
    };
    if exit != GuestExit::Quit {
        tracing::info!("guest stopped: {exit:?}");
    }
    set_phase(shared, |p| {
        p.vcpu_exited = true;
        p.exit.get_or_insert(exit);
    });
    // Let the device thread go too.
    shared.want.store(WANT_QUIT, Ordering::SeqCst);
    let _ = shared.kick.write(1);
    shared.changed.notify_all();
}

/// How long the device thread keeps polling after the last work before it sleeps.
const SPIN: Duration = Duration::from_micros(200);

fn device_thread(shared: &Shared, devices: &Mutex<Devices>, ram: &GuestRam) {
    let mut last_work = Instant::now();
    loop {
        if shared.want.load(Ordering::SeqCst) != WANT_RUN && !park_while_paused(shared, false) {
            break;
        }
        let mut devs = lock(devices);
        let d = &mut *devs;
        let nic = d.nic.poll(ram, d.backend.as_mut());
        let blk = d.block.poll(ram);
        let (nic, blk) = match (nic, blk) {
            (Ok(n), Ok(b)) => (n, b),
            (n, b) => {
                for e in [n.err(), b.err()].into_iter().flatten() {
                    tracing::error!("device error: {e}");
                }
                (Default::default(), 0)
            }
        };
        if nic.rx > 0 || blk > 0 {
            shared.wake_vcpu();
        }
        if nic.tx + nic.rx + blk > 0 {
            last_work = Instant::now();
            continue;
        }
        if last_work.elapsed() < SPIN {
            drop(devs);
            std::thread::yield_now();
            continue;
        }
        // Going to sleep: tell the guest to ring the doorbell, then look once more (the guest publishes its
        // producer index before it reads the flag; we set the flag before we read the index).
        let _ = ram.store(1u32, GuestAddress(BOOT_INFO_GPA + BI_HOST_IDLE), Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        let busy = d.nic.tx_pending(ram).unwrap_or(false) || d.block.pending(ram).unwrap_or(false);
        let fd = d.backend.poll_fd();
        drop(devs);
        if !busy && shared.want.load(Ordering::SeqCst) == WANT_RUN {
            let mut fds = [
                libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: shared.kick.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
            let _ = shared.kick.read();
        }
        let _ = ram.store(0u32, GuestAddress(BOOT_INFO_GPA + BI_HOST_IDLE), Ordering::SeqCst);
        last_work = Instant::now();
    }
    set_phase(shared, |p| p.dev_exited = true);
}
