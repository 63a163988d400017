//! Guest memory: allocation (anonymous or over a memfd another process can map), the boot structures the
//! VMM writes (GDT, TSS, identity page tables with the user bit) and the ELF loader.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::abi::*;
use crate::error::{Error, Result};

/// Guest RAM: one region at GPA 0, with vm-memory's dirty bitmap recording every write the VMM makes.
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// Largest RAM the mini-VMM maps (below the local APIC hole and inside the 1 GiB identity map).
pub const MAX_RAM: u64 = 1 << 30;

/// Limit of the TSS: the 0x68-byte TSS, a bitmap for ports 0 to 0x5ff and its terminating byte.
pub const TSS_LIMIT: u64 = 0x68 + 0xc0;

/// Page size used for dirty tracking and migration.
pub const PAGE_SIZE: u64 = 4096;

/// Allocate `size` bytes of guest RAM. With `memfd`, the memory is a shared mapping of a memfd (returned so
/// another process can map it).
pub fn create_ram(size: u64, memfd: bool) -> Result<(GuestRam, Option<File>)> {
    if !(MIN_RAM..=MAX_RAM).contains(&size) || !size.is_multiple_of(2 << 20) {
        return Err(Error::Memory {
            gpa: 0,
            detail: format!("RAM size {size} must be a multiple of 2 MiB in {MIN_RAM}..={MAX_RAM}"),
        });
    }
    let file = if memfd {
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"colo-vmm-ram".as_ptr(), 0) };
        if fd < 0 {
            return Err(Error::io("memfd_create")(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(Error::io("sizing the RAM memfd"))?;
        Some(file)
    } else {
        None
    };
    let range = (
        GuestAddress(0),
        size as usize,
        file.as_ref().map(|f| {
            FileOffset::from_arc(
                f.try_clone()
                    .map(std::sync::Arc::new)
                    .expect("dup of a memfd we own"),
                0,
            )
        }),
    );
    let ram = GuestRam::from_ranges_with_files([range]).map_err(|e| Error::Memory {
        gpa: 0,
        detail: format!("mapping RAM: {e}"),
    })?;
    Ok((ram, file))
}

/// RAM size in bytes.
pub fn ram_size(ram: &GuestRam) -> u64 {
    ram.iter().map(vm_memory::GuestMemoryRegion::len).sum()
}

fn write_u64s(ram: &GuestRam, gpa: u64, vals: &[u64]) -> Result<()> {
    for (i, v) in vals.iter().enumerate() {
        let a = gpa + 8 * i as u64;
        ram.write_obj(*v, GuestAddress(a)).map_err(|e| Error::Memory {
            gpa: a,
            detail: e.to_string(),
        })?;
    }
    Ok(())
}

/// Write the GDT, TSS and identity page tables (2 MiB pages, user-accessible) for a CPL3 long-mode guest.
pub fn write_boot_tables(ram: &GuestRam) -> Result<()> {
    let tss_low = TSS_LIMIT | ((TSS_GPA & 0xff_ffff) << 16) | (0x89 << 40) | (((TSS_GPA >> 24) & 0xff) << 56);
    let gdt = [
        0,
        0x00af_9a00_0000_ffff, // 0x08 kernel code 64
        0x00cf_9200_0000_ffff, // 0x10 kernel data
        0x00cf_f200_0000_ffff, // 0x18 user data, DPL3
        0x00af_fa00_0000_ffff, // 0x20 user code 64, DPL3
        tss_low,               // 0x28 TSS (low)
        TSS_GPA >> 32,         // TSS (high)
    ];
    write_u64s(ram, GDT_GPA, &gdt)?;
    // A TSS whose I/O permission bitmap allows every port up to 0x5ff. IOPL=3 alone should suffice, but our
    // nested KVM does not keep IOPL for CPL3 code, so `out` would fault without the bitmap.
    let mut tss = vec![0u8; (TSS_LIMIT + 1) as usize];
    tss[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes());
    tss[TSS_LIMIT as usize] = 0xff;
    ram.write_slice(&tss, GuestAddress(TSS_GPA))
        .map_err(|e| Error::Memory {
            gpa: TSS_GPA,
            detail: e.to_string(),
        })?;
    write_u64s(ram, PML4_GPA, &[PDPT_GPA | 7])?;
    write_u64s(ram, PDPT_GPA, &[PD_GPA | 7])?;
    let pages = ram_size(ram).div_ceil(2 << 20);
    let pd: Vec<u64> = (0..pages).map(|i| (i << 21) | 0x87).collect();
    write_u64s(ram, PD_GPA, &pd)
}

/// Fill the boot information page the guest reads at start.
pub fn write_boot_info(ram: &GuestRam, info: &BootInfo) -> Result<()> {
    let w = |off: u64, bytes: &[u8]| {
        ram.write_slice(bytes, GuestAddress(BOOT_INFO_GPA + off))
            .map_err(|e| Error::Memory {
                gpa: BOOT_INFO_GPA + off,
                detail: e.to_string(),
            })
    };
    w(BI_MAGIC, &BOOT_MAGIC.to_le_bytes())?;
    w(BI_TSC_KHZ, &info.tsc_khz.to_le_bytes())?;
    w(BI_RAM_SIZE, &ram_size(ram).to_le_bytes())?;
    w(BI_DISK_SECTORS, &info.disk_sectors.to_le_bytes())?;
    w(BI_MAC, &info.mac)?;
    w(BI_IP, &info.ip)?;
    w(BI_PREFIX, &[info.prefix])?;
    w(BI_PORT, &info.port.to_le_bytes())?;
    w(BI_HOST_IDLE, &0u32.to_le_bytes())
}

/// What the VMM tells the guest at boot.
#[derive(Debug, Clone)]
pub struct BootInfo {
    /// TSC frequency in kHz (from KVM_GET_TSC_KHZ).
    pub tsc_khz: u64,
    /// Disk size in sectors.
    pub disk_sectors: u64,
    /// The NIC's MAC address.
    pub mac: [u8; 6],
    /// The guest's IPv4 address.
    pub ip: [u8; 4],
    /// Prefix length.
    pub prefix: u8,
    /// TCP port of the key-value service.
    pub port: u16,
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Load a static x86-64 ELF executable: copy each PT_LOAD segment and zero its tail (`.bss`). Every segment
/// must lie between [`IMAGE_GPA`] and the stack. Returns the entry point.
pub fn load_elf(ram: &GuestRam, elf: &[u8]) -> Result<u64> {
    let bad = |m: &str| Error::Elf(m.to_string());
    if elf.len() < 64 || &elf[0..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err(bad("not a little-endian ELF64 file"));
    }
    if le16(elf, 16) != 2 || le16(elf, 18) != 62 {
        return Err(bad("not an x86-64 executable"));
    }
    let entry = le64(elf, 24);
    let phoff = usize::try_from(le64(elf, 32)).map_err(|_| bad("program header offset"))?;
    let phentsize = usize::from(le16(elf, 54));
    let phnum = usize::from(le16(elf, 56));
    if phentsize < 56 || phnum > 64 {
        return Err(bad("program header table size"));
    }
    let table_end = phoff
        .checked_add(phentsize * phnum)
        .ok_or_else(|| bad("program header table"))?;
    if table_end > elf.len() {
        return Err(bad("program header table past end of file"));
    }
    let limit = STACK_TOP - (4 << 20);
    let mut entry_ok = false;
    for i in 0..phnum {
        let ph = &elf[phoff + i * phentsize..phoff + (i + 1) * phentsize];
        if le32(ph, 0) != 1 {
            continue; // not PT_LOAD
        }
        let (off, vaddr, filesz, memsz) = (le64(ph, 8), le64(ph, 16), le64(ph, 32), le64(ph, 40));
        let end = vaddr
            .checked_add(memsz)
            .ok_or_else(|| bad("segment size overflows"))?;
        if vaddr < IMAGE_GPA || end > limit || filesz > memsz {
            return Err(Error::Elf(format!(
                "segment {vaddr:#x}..{end:#x} outside {IMAGE_GPA:#x}..{limit:#x}"
            )));
        }
        let file_end = off.checked_add(filesz).ok_or_else(|| bad("segment file range"))?;
        if file_end > elf.len() as u64 {
            return Err(bad("segment past end of file"));
        }
        let data = &elf[off as usize..file_end as usize];
        let mem = |e: vm_memory::GuestMemoryError| Error::Memory {
            gpa: vaddr,
            detail: e.to_string(),
        };
        ram.write_slice(data, GuestAddress(vaddr)).map_err(mem)?;
        let zeros = vec![0u8; (memsz - filesz) as usize];
        ram.write_slice(&zeros, GuestAddress(vaddr + filesz))
            .map_err(mem)?;
        entry_ok |= (vaddr..end).contains(&entry);
    }
    if !entry_ok {
        return Err(Error::Elf(format!(
            "entry point {entry:#x} is in no loaded segment"
        )));
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_loader_rejects_garbage_and_truncation() {
        let (ram, _) = create_ram(MIN_RAM, false).unwrap();
        assert!(load_elf(&ram, b"not an elf").is_err());
        let good = crate::GUEST_ELF;
        assert!(load_elf(&ram, &good[..100]).is_err());
        let mut wrong_machine = good.to_vec();
        wrong_machine[18] = 3;
        assert!(load_elf(&ram, &wrong_machine).is_err());
        let entry = load_elf(&ram, good).unwrap();
        assert_eq!(entry, IMAGE_GPA);
    }

    #[test]
    fn ram_size_is_validated() {
        assert!(create_ram(MIN_RAM - 4096, false).is_err());
        assert!(create_ram(MAX_RAM * 2, false).is_err());
        let (ram, file) = create_ram(MIN_RAM, true).unwrap();
        assert_eq!(ram_size(&ram), MIN_RAM);
        assert_eq!(file.unwrap().metadata().unwrap().len(), MIN_RAM);
    }
}
