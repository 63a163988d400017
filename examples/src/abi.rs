//! The guest/VMM ABI: fixed guest-physical addresses, shared ring layouts and I/O ports.
//!
//! This file is compiled twice: into the VMM (as `colo_vmm::abi`) and into the `no_std` guest (with
//! `#[path]`), so the two sides cannot disagree. It holds only constants.

/// Guest-physical address of the GDT built by the VMM.
pub const GDT_GPA: u64 = 0x1000;
/// Guest-physical address of the 64-bit TSS.
pub const TSS_GPA: u64 = 0x2000;
/// Guest-physical address of the PML4 table.
pub const PML4_GPA: u64 = 0x3000;
/// Guest-physical address of the PDPT.
pub const PDPT_GPA: u64 = 0x4000;
/// Guest-physical address of the page directory (2 MiB pages, 1 GiB mapped).
pub const PD_GPA: u64 = 0x5000;

/// Guest-physical address of the boot information page written by the VMM.
pub const BOOT_INFO_GPA: u64 = 0x8000;
/// `BOOT_INFO` magic ("COLOBOOT" little-endian).
pub const BOOT_MAGIC: u64 = 0x544f_4f42_4f4c_4f43;
/// Offset of the magic (u64).
pub const BI_MAGIC: u64 = 0;
/// Offset of the TSC frequency in kHz (u64).
pub const BI_TSC_KHZ: u64 = 8;
/// Offset of the RAM size in bytes (u64).
pub const BI_RAM_SIZE: u64 = 16;
/// Offset of the disk size in 512-byte sectors (u64).
pub const BI_DISK_SECTORS: u64 = 24;
/// Offset of the MAC address (6 bytes).
pub const BI_MAC: u64 = 32;
/// Offset of the IPv4 address (4 bytes).
pub const BI_IP: u64 = 40;
/// Offset of the IPv4 prefix length (u8).
pub const BI_PREFIX: u64 = 44;
/// Offset of the TCP port the service listens on (u16).
pub const BI_PORT: u64 = 46;
/// Offset of the host-idle flag (u32): the device thread sets it to 1 before it sleeps; the guest then rings
/// [`PORT_KICK`] after queueing work.
pub const BI_HOST_IDLE: u64 = 64;

/// Guest-physical address of the NIC shared header page.
pub const NIC_GPA: u64 = 0x10000;
/// Offset of the TX producer index (u32, written by the guest).
pub const NIC_TX_PROD: u64 = 0;
/// Offset of the TX consumer index (u32, written by the host).
pub const NIC_TX_CONS: u64 = 4;
/// Offset of the RX producer index (u32, written by the host).
pub const NIC_RX_PROD: u64 = 8;
/// Offset of the RX consumer index (u32, written by the guest).
pub const NIC_RX_CONS: u64 = 12;
/// Number of slots in each NIC ring (a power of two).
pub const NIC_SLOTS: u32 = 64;
/// Size of one NIC slot: a u16 length at offset 0, the frame at [`NIC_SLOT_DATA`].
pub const NIC_SLOT_SIZE: u64 = 2048;
/// Offset of the frame inside a slot.
pub const NIC_SLOT_DATA: u64 = 16;
/// Largest frame a slot holds.
pub const NIC_MAX_FRAME: usize = (NIC_SLOT_SIZE - NIC_SLOT_DATA) as usize;
/// Guest-physical address of the TX slots.
pub const NIC_TX_SLOTS_GPA: u64 = NIC_GPA + 0x1000;
/// Guest-physical address of the RX slots.
pub const NIC_RX_SLOTS_GPA: u64 = NIC_TX_SLOTS_GPA + NIC_SLOTS as u64 * NIC_SLOT_SIZE;

/// Guest-physical address of the block request ring.
pub const BLK_GPA: u64 = 0x60000;
/// Offset of the request producer index (u32, written by the guest).
pub const BLK_REQ_PROD: u64 = 0;
/// Offset of the completion index (u32, written by the host).
pub const BLK_REQ_DONE: u64 = 4;
/// Offset of the first descriptor.
pub const BLK_DESC_OFF: u64 = 64;
/// Number of descriptors in the block ring (a power of two).
pub const BLK_SLOTS: u32 = 16;
/// Size of one block descriptor: op u32, status u32, sector u64, count u32, pad u32, buffer gpa u64.
pub const BLK_DESC_SIZE: u64 = 32;
/// Sector size of the block device.
pub const SECTOR_SIZE: u64 = 512;
/// Largest request in sectors (64 KiB).
pub const BLK_MAX_SECTORS: u32 = 128;
/// Block operation: read.
pub const BLK_OP_READ: u32 = 1;
/// Block operation: write.
pub const BLK_OP_WRITE: u32 = 2;
/// Block operation: flush to stable storage.
pub const BLK_OP_FLUSH: u32 = 3;
/// Descriptor status: not completed yet.
pub const BLK_ST_PENDING: u32 = 0;
/// Descriptor status: completed successfully.
pub const BLK_ST_OK: u32 = 1;
/// Descriptor status: the host's I/O failed.
pub const BLK_ST_IOERR: u32 = 2;
/// Descriptor status: the request was malformed (bad op, range or buffer).
pub const BLK_ST_BADREQ: u32 = 3;

/// Where the guest image is linked.
pub const IMAGE_GPA: u64 = 0x20_0000;
/// Initial stack pointer (grows down; 4 MiB below it are reserved for the stack).
pub const STACK_TOP: u64 = 0xC0_0000;
/// Smallest RAM the guest runs in.
pub const MIN_RAM: u64 = 16 << 20;

/// Serial console: the guest copies up to [`CONSOLE_MAX`] bytes to [`CONSOLE_GPA`] and writes their count
/// to this port with a 32-bit `out` (one exit per line; our nested KVM does not emulate `rep outsb` at CPL3).
pub const PORT_SERIAL: u16 = 0x3f8;
/// Guest-physical address of the console output buffer.
pub const CONSOLE_GPA: u64 = 0x9000;
/// Largest console write.
pub const CONSOLE_MAX: u32 = 4096;
/// Doorbell: the guest queued NIC or block work while the host device thread was idle.
pub const PORT_KICK: u16 = 0x500;
/// The guest is idle: a 32-bit `out` with the longest wait in microseconds.
pub const PORT_IDLE: u16 = 0x501;
/// Power off: a 32-bit `out` with the exit code.
pub const PORT_POWEROFF: u16 = 0x502;
