//! The bare runtime: port I/O, the TSC, the serial console, the memory functions the compiler expects from
//! libc, and the panic handler.

use core::arch::asm;
use core::fmt;

use crate::abi;

/// A 32-bit `out` (allowed at CPL3 because the VMM sets IOPL=3).
pub fn outl(port: u16, value: u32) {
    // SAFETY: port I/O exits to the VMM; it touches no guest memory.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, nomem, preserves_flags)) };
}

/// Write bytes to the serial console: copy them to the console page, then one `out` with the count.
pub fn console_write(bytes: &[u8]) {
    for chunk in bytes.chunks(abi::CONSOLE_MAX as usize) {
        // SAFETY: the console page is reserved guest memory the VMM only reads during the `out` exit.
        unsafe { core::ptr::copy_nonoverlapping(chunk.as_ptr(), abi::CONSOLE_GPA as *mut u8, chunk.len()) };
        outl(abi::PORT_SERIAL, chunk.len() as u32);
    }
}

/// Read the time-stamp counter (CR4.TSD is clear, so this works at CPL3).
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nostack, nomem, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Ask the VMM to power the machine off.
pub fn poweroff(code: u32) -> ! {
    loop {
        outl(abi::PORT_POWEROFF, code);
    }
}

/// A line-buffered writer to the serial console: one exit per line.
pub struct Console {
    buf: [u8; 200],
    len: usize,
}

impl Console {
    /// An empty line buffer.
    pub const fn new() -> Self {
        Self {
            buf: [0; 200],
            len: 0,
        }
    }

    /// Send what is buffered.
    pub fn flush(&mut self) {
        if self.len > 0 {
            console_write(&self.buf[..self.len]);
        }
        self.len = 0;
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
            if b == b'\n' {
                self.flush();
            }
        }
        Ok(())
    }
}

/// `println!` to the serial console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut c = $crate::rt::Console::new();
        let _ = writeln!(c, $($arg)*);
        c.flush();
    }};
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("guest panic: {info}");
    poweroff(101)
}

// The memory functions: written with string instructions so the compiler cannot turn them back into calls
// to themselves.

/// # Safety
/// Standard `memcpy` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for `n` bytes.
    unsafe {
        asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard `memmove` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: forward copy is correct when dst does not start inside src.
        unsafe { memcpy(dst, src, n) }
    } else {
        // SAFETY: backward copy with DF set, restored before returning.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _, inout("rcx") n => _,
                 options(nostack));
        }
        dst
    }
}

/// # Safety
/// Standard `memset` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid for `n` bytes.
    unsafe {
        asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Standard `memcmp` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller guarantees both ranges are valid; volatile keeps this a plain loop.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard `bcmp` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Never called (panic = "abort"); the precompiled libcore still names it.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// Never called (panic = "abort"); the precompiled libcore still names it.
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    poweroff(102)
}
