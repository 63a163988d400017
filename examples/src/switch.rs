//! A learning Ethernet switch over Unix datagram sockets: each port is a peer socket path; one datagram is
//! one frame. It learns source MACs, forwards known unicast to one port and floods the rest. A port that
//! stops existing (its socket is gone) is forgotten. An empty datagram registers a port.

use std::collections::HashMap;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Largest frame forwarded.
pub const MAX_FRAME: usize = 2048;
/// Most ports a switch keeps.
pub const MAX_PORTS: usize = 64;

/// Counters of a running switch.
#[derive(Debug, Default)]
pub struct SwitchStats {
    /// Frames received.
    pub frames: AtomicU64,
    /// Frames sent to one port.
    pub unicast: AtomicU64,
    /// Frames flooded.
    pub flooded: AtomicU64,
    /// Sends that failed (port gone).
    pub send_errors: AtomicU64,
}

/// A switch bound to a socket path.
#[derive(Debug)]
pub struct Switch {
    sock: UnixDatagram,
    path: PathBuf,
    ports: Vec<PathBuf>,
    macs: HashMap<[u8; 6], PathBuf>,
    stats: Arc<SwitchStats>,
}

fn peer_path(addr: &SocketAddr) -> Option<PathBuf> {
    addr.as_pathname().map(Path::to_path_buf)
}

impl Switch {
    /// Bind the switch at `path` (a stale socket file is replaced).
    pub fn bind(path: &Path) -> io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let sock = UnixDatagram::bind(path)?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(Self {
            sock,
            path: path.to_path_buf(),
            ports: Vec::new(),
            macs: HashMap::new(),
            stats: Arc::default(),
        })
    }

    /// The counters.
    pub fn stats(&self) -> Arc<SwitchStats> {
        self.stats.clone()
    }

    fn forget(&mut self, port: &Path) {
        self.ports.retain(|p| p != port);
        self.macs.retain(|_, p| p != port);
    }

    fn send_to(&mut self, frame: &[u8], port: &Path) {
        if self.sock.send_to(frame, port).is_err() {
            self.stats.send_errors.fetch_add(1, Ordering::Relaxed);
            // ECONNREFUSED / ENOENT: the port's process is gone. Forget it.
            if !port.exists()
                || matches!(self.sock.send_to(&[], port), Err(ref e) if e.kind() == io::ErrorKind::ConnectionRefused)
            {
                self.forget(port);
            }
        }
    }

    /// Handle one datagram from `from`.
    pub fn handle(&mut self, frame: &[u8], from: &Path) {
        if !self.ports.iter().any(|p| p == from) {
            if self.ports.len() >= MAX_PORTS {
                return;
            }
            self.ports.push(from.to_path_buf());
        }
        if frame.len() < 14 {
            return; // registration or runt
        }
        self.stats.frames.fetch_add(1, Ordering::Relaxed);
        let mut src = [0u8; 6];
        src.copy_from_slice(&frame[6..12]);
        if src[0] & 1 == 0 && self.macs.len() < 4096 {
            self.macs.insert(src, from.to_path_buf());
        }
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&frame[0..6]);
        match self.macs.get(&dst).cloned() {
            Some(port) if dst[0] & 1 == 0 => {
                if port != from {
                    self.stats.unicast.fetch_add(1, Ordering::Relaxed);
                    self.send_to(frame, &port);
                }
            }
            _ => {
                self.stats.flooded.fetch_add(1, Ordering::Relaxed);
                for port in self.ports.clone() {
                    if port != from {
                        self.send_to(frame, &port);
                    }
                }
            }
        }
    }

    /// Forward frames until `stop` is set.
    pub fn run(&mut self, stop: &AtomicBool) -> io::Result<()> {
        let mut buf = vec![0u8; MAX_FRAME];
        while !stop.load(Ordering::Relaxed) {
            match self.sock.recv_from(&mut buf) {
                Ok((n, addr)) => {
                    if let Some(from) = peer_path(&addr) {
                        self.handle(&buf[..n], &from);
                    }
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Run a switch at `path` on a background thread; it stops when the handle is dropped.
    pub fn spawn(path: &Path) -> io::Result<SwitchHandle> {
        let mut sw = Self::bind(path)?;
        let stats = sw.stats();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new().name("switch".into()).spawn(move || {
            if let Err(e) = sw.run(&stop2) {
                tracing::error!("switch: {e}");
            }
        })?;
        Ok(SwitchHandle {
            stop,
            thread: Some(thread),
            stats,
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A switch running on a thread.
#[derive(Debug)]
pub struct SwitchHandle {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    stats: Arc<SwitchStats>,
    path: PathBuf,
}

impl SwitchHandle {
    /// The counters.
    pub fn stats(&self) -> &SwitchStats {
        &self.stats
    }

    /// The switch's socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SwitchHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(60, 0xab);
        f
    }

    #[test]
    fn learns_floods_and_forgets() {
        let dir = tempfile::tempdir().unwrap();
        let sw = Switch::spawn(&dir.path().join("sw")).unwrap();
        let mk = |n: &str| {
            let s = UnixDatagram::bind(dir.path().join(n)).unwrap();
            s.connect(sw.path()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.send(&[]).unwrap();
            s
        };
        let (a, b, c) = (mk("a"), mk("b"), mk("c"));
        std::thread::sleep(Duration::from_millis(50));
        let (ma, mb) = ([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 0xb]);
        let mut buf = [0u8; 2048];
        // Unknown destination: flooded to b and c.
        a.send(&frame(mb, ma)).unwrap();
        assert_eq!(b.recv(&mut buf).unwrap(), 60);
        assert_eq!(c.recv(&mut buf).unwrap(), 60);
        // a is learnt: b's answer goes to a only.
        b.send(&frame(ma, mb)).unwrap();
        assert_eq!(a.recv(&mut buf).unwrap(), 60);
        c.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        assert!(c.recv(&mut buf).is_err());
        assert_eq!(sw.stats().unicast.load(Ordering::Relaxed), 1);
        // The MAC moves to c when c sends with it (as after a migration).
        c.send(&frame([0xff; 6], ma)).unwrap();
        assert_eq!(b.recv(&mut buf).unwrap(), 60);
        b.send(&frame(ma, mb)).unwrap();
        assert_eq!(c.recv(&mut buf).unwrap(), 60);
    }
}
