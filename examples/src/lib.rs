//! colo-vmm: the colo-rs mini-VMM.
//!
//! A small KVM virtual machine monitor built on kvm-ioctls and vm-memory that runs a real guest (a `no_std`
//! key-value store speaking TCP through smoltcp, with a write-ahead log on a block device) at CPL3 in long
//! mode, with devices whose state can be saved and loaded, and live migration between processes.
//!
//! Layout:
//! - the machine ([`vm`]: KVM, threads, pause/resume, save/restore), [`vcpu`], [`memory`], [`devices`]:
//!   generic VMM code that knows nothing about migration or COLO;
//! - [`switch`]: a learning L2 switch over Unix datagram sockets, and [`client`]: a host-side TCP client
//!   (smoltcp) that talks to the guest through the switch;
//! - [`control`]: the JSON-lines control socket;
//! - [`migration`]: live migration, the glue that drives colo-proto and colo-ram;
//! - [`colo`]: the COLO pair, the glue that drives colo-pair (and through it all five colo-rs crates) — the
//!   template for embedding colo-rs in another VMM.
//!
//! ```
//! use colo_vmm::{Machine, MachineConfig, NetConfig};
//! # if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
//! #     eprintln!("SKIPPED: doc example: /dev/kvm is not available");
//! #     return Ok(());
//! # }
//! let dir = tempfile::tempdir()?;
//! let disk = dir.path().join("disk.img");
//! std::fs::File::create(&disk)?.set_len(4 << 20)?;
//! let mut cfg = MachineConfig::new(disk, NetConfig::None);
//! cfg.ram_size = 32 << 20;
//! let mut vm = Machine::new(cfg)?;
//! vm.boot(colo_vmm::GUEST_ELF)?;
//! vm.start(false)?;
//! vm.pause()?; // vCPU out of KVM_RUN, device thread quiet
//! let state = vm.save_state()?; // vCPU + devices
//! let wire = state.to_bytes()?;
//! vm.restore_state(&colo_vmm::MachineState::from_bytes(&wire)?)?; // loads any number of times
//! vm.resume()?;
//! vm.quit();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod abi;
pub mod client;
pub mod colo;
pub mod control;
pub mod devices;
pub mod error;
pub mod memory;
pub mod migration;
pub mod switch;
pub mod vcpu;
pub mod vm;

pub use error::{Error, Result};
pub use vm::{Machine, MachineConfig, MachineState, NetConfig, RunState};

/// The guest image, built from `examples/guest` by the build script.
pub static GUEST_ELF: &[u8] = include_bytes!(env!("COLO_GUEST_ELF"));
