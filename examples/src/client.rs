//! A host-side client for the guest's key-value service: its own smoltcp TCP/IP stack on a port of the
//! [`crate::switch`], so tests and demos need no root and no tap device.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, Ipv4Address};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket I/O on the switch port failed.
    #[error("switch port: {0}")]
    Io(#[from] io::Error),
    /// No answer in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// The connection was reset or closed by the guest.
    #[error("connection closed in state {0}")]
    Closed(String),
    /// The request does not fit in one line.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
}

struct Port {
    sock: UnixDatagram,
    rx: Vec<u8>,
}

struct RxTok(Vec<u8>);
struct TxTok<'a>(&'a UnixDatagram);

impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        // A frame the switch cannot take is lost like on a wire; TCP retransmits it.
        let _ = self.0.send(&buf);
        r
    }
}

impl phy::Device for Port {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _: SmolInstant) -> Option<(RxTok, TxTok<'_>)> {
        loop {
            match self.sock.recv(&mut self.rx) {
                Ok(0) => continue,
                Ok(n) => return Some((RxTok(self.rx[..n].to_vec()), TxTok(&self.sock))),
                Err(_) => return None,
            }
        }
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<TxTok<'_>> {
        Some(TxTok(&self.sock))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

/// Client addressing.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The client's MAC.
    pub mac: [u8; 6],
    /// The client's IPv4 address (same /24 as the guest).
    pub ip: [u8; 4],
    /// The guest's address.
    pub server: [u8; 4],
    /// The guest's port.
    pub port: u16,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            mac: [0x02, 0, 0, 0, 0, 0x10],
            ip: [10, 0, 2, 100],
            server: [10, 0, 2, 15],
            port: 7000,
        }
    }
}

/// One TCP connection to the guest's key-value service, line by line.
pub struct KvClient {
    port: Port,
    iface: Interface,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    pending: Vec<u8>,
    path: PathBuf,
}

impl std::fmt::Debug for KvClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvClient")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl KvClient {
    /// Attach to the switch at `switch` through the socket `local` and connect to the guest.
    pub fn connect(
        switch: &Path,
        local: &Path,
        cfg: &ClientConfig,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let _ = std::fs::remove_file(local);
        let sock = UnixDatagram::bind(local)?;
        sock.connect(switch)?;
        sock.set_nonblocking(true)?;
        sock.send(&[])?;
        let mut port = Port {
            sock,
            rx: vec![0; 2048],
        };
        let mut config = Config::new(EthernetAddress(cfg.mac).into());
        config.random_seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(7, |d| d.as_nanos() as u64);
        let mut iface = Interface::new(config, &mut port, SmolInstant::now());
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(Ipv4Address::from(cfg.ip)), 24));
        });
        let mut sockets = SocketSet::new(Vec::<SocketStorage<'static>>::new());
        let mut tcp = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 65536]),
            tcp::SocketBuffer::new(vec![0; 65536]),
        );
        tcp.set_nagle_enabled(false);
        tcp.set_ack_delay(None);
        // A fresh ephemeral port per connection, so a reconnect is never mistaken for the old connection.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let local_port = 40000 + ((std::process::id().wrapping_mul(7919).wrapping_add(n)) % 20000) as u16;
        tcp.connect(
            iface.context(),
            (IpAddress::Ipv4(Ipv4Address::from(cfg.server)), cfg.port),
            local_port,
        )
        .map_err(|_| ClientError::BadRequest("connect"))?;
        let handle = sockets.add(tcp);
        let mut c = Self {
            port,
            iface,
            sockets,
            handle,
            pending: Vec::new(),
            path: local.to_path_buf(),
        };
        c.wait(timeout, "the TCP handshake", |s| s.may_send())?;
        Ok(c)
    }

    fn poll(&mut self) {
        self.iface
            .poll(SmolInstant::now(), &mut self.port, &mut self.sockets);
    }

    fn wait(
        &mut self,
        timeout: Duration,
        what: &'static str,
        mut done: impl FnMut(&mut tcp::Socket<'static>) -> bool,
    ) -> Result<(), ClientError> {
        let t0 = Instant::now();
        loop {
            self.poll();
            let s = self.sockets.get_mut::<tcp::Socket<'static>>(self.handle);
            if done(s) {
                return Ok(());
            }
            if !s.is_open() || matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                return Err(ClientError::Closed(s.state().to_string()));
            }
            if t0.elapsed() > timeout {
                return Err(ClientError::Timeout(timeout, what));
            }
            let delay = self
                .iface
                .poll_delay(SmolInstant::now(), &self.sockets)
                .map_or(5_000, |d| d.total_micros());
            let mut fd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.port.sock),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut fd, 1, (delay / 1000).clamp(0, 5) as i32) };
        }
    }

    /// Send one command line and return the answer line (without the newline).
    pub fn request(&mut self, line: &str, timeout: Duration) -> Result<String, ClientError> {
        if line.contains('\n') || line.len() > 400 {
            return Err(ClientError::BadRequest(
                "a request is one line of at most 400 bytes",
            ));
        }
        let mut out = line.as_bytes().to_vec();
        out.push(b'\n');
        let mut sent = 0;
        let handle = self.handle;
        self.wait(timeout, "send buffer space", |s| {
            if let Ok(n) = s.send_slice(&out[sent..]) {
                sent += n;
            }
            sent == out.len()
        })?;
        let _ = handle;
        let mut pending = std::mem::take(&mut self.pending);
        let mut answer = None;
        let mut buf = [0u8; 4096];
        let r = self.wait(timeout, "the answer", |s| {
            while s.can_recv() {
                match s.recv_slice(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
            }
            if let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let l: Vec<u8> = pending.drain(..=i).collect();
                answer = Some(String::from_utf8_lossy(&l[..l.len() - 1]).into_owned());
                return true;
            }
            false
        });
        self.pending = pending;
        r?;
        answer.ok_or(ClientError::Timeout(timeout, "the answer"))
    }

    /// Close the connection gracefully.
    pub fn close(mut self, timeout: Duration) {
        self.sockets.get_mut::<tcp::Socket<'static>>(self.handle).close();
        let _ = self.wait(timeout, "close", |s| !s.may_send() && s.send_queue() == 0);
    }
}

impl Drop for KvClient {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
