//! Host backends for the NIC: where the guest's frames go and come from.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// A source and sink of Ethernet frames. `recv` never blocks; the device thread waits on `poll_fd`.
pub trait NetBackend: Send {
    /// Send one frame.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Receive one frame into `buf` if one is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// A descriptor that becomes readable when a frame is waiting.
    fn poll_fd(&self) -> RawFd;
}

/// Frames as datagrams on a Unix socket connected to a [`crate::switch`] (no privileges needed).
#[derive(Debug)]
pub struct UnixDgramBackend {
    sock: UnixDatagram,
    path: PathBuf,
}

impl UnixDgramBackend {
    /// Bind `local` (removed first if stale) and attach to the switch at `switch`.
    pub fn connect(local: &Path, switch: &Path) -> io::Result<Self> {
        let _ = std::fs::remove_file(local);
        let sock = UnixDatagram::bind(local)?;
        sock.connect(switch)?;
        sock.set_nonblocking(true)?;
        // An empty datagram registers the port with the switch before the guest says anything.
        sock.send(&[])?;
        Ok(Self {
            sock,
            path: local.to_path_buf(),
        })
    }
}

impl Drop for UnixDgramBackend {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl NetBackend for UnixDgramBackend {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.sock.send(frame).map(|_| ())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match self.sock.recv(buf) {
                Ok(0) => continue, // the switch's keepalive
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    fn poll_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A Linux tap device (needs CAP_NET_ADMIN; the tests make one inside a network namespace).
#[derive(Debug)]
pub struct TapBackend {
    file: File,
    name: String,
}

impl TapBackend {
    /// Open (or create) the tap interface `name`.
    pub fn open(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "tap name must be 1 to 15 bytes",
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads and writes an ifreq-sized struct we own; the fd is a tun control fd.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for TapBackend {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.file.write(frame).map(|_| ())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn poll_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// A backend that drops what is sent and never receives (a NIC with no cable).
#[derive(Debug, Default)]
pub struct NoopBackend {
    /// Frames sent into the void.
    pub sent: u64,
    fd: Option<vmm_sys_util::eventfd::EventFd>,
}

impl NoopBackend {
    /// A new unplugged backend.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            sent: 0,
            fd: Some(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }
}

impl NetBackend for NoopBackend {
    fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
        self.sent += 1;
        Ok(())
    }
    fn recv(&mut self, _buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(None)
    }
    fn poll_fd(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }
}
