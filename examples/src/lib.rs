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
//! - [`control`]: the JSON-lines control socket.

#![warn(missing_docs)]

pub mod abi;
pub mod client;
pub mod control;
pub mod devices;
pub mod error;
pub mod memory;
pub mod switch;
pub mod vcpu;
pub mod vm;

pub use error::{Error, Result};
pub use vm::{Machine, MachineConfig, MachineState, NetConfig, RunState};

/// The guest image, built from `examples/guest` by the build script.
pub static GUEST_ELF: &[u8] = include_bytes!(env!("COLO_GUEST_ELF"));
