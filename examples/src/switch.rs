//! A learning Ethernet switch over Unix datagram sockets: each port is a peer socket path; one datagram is
//! one frame. It learns source MACs, forwards known unicast to one port and floods the rest. A port that
//! stops existing (its socket is gone) is forgotten. An empty datagram registers a port.
//!
//! Fencing (colo-failover): a port that registers with [`FENCED_HELLO`] instead is a *fenced* port, the
//! port of a COLO node. Every datagram it sends is the 8-byte big-endian fencing token the frame was
//! released with ([`colo_failover::FenceToken::to_be_bytes`]) followed by the frame. The switch keeps a
//! [`FenceGate`] per source MAC of fenced frames and drops (and counts, [`SwitchStats::fenced`]) a frame
//! whose token is older than one already seen for that MAC, before learning anything from it: a stale
//! primary that wakes up after its secondary took over (higher token) can neither reach the clients nor
//! pull the guest's MAC back to its port. Frames from plain ports are not gated (they are not COLO nodes).

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use colo_failover::{FenceGate, FenceToken};

/// Largest frame forwarded.
pub const MAX_FRAME: usize = 2048;
/// Most ports a switch keeps.
pub const MAX_PORTS: usize = 64;
/// Most MACs learnt, and most MACs with a fence gate.
pub const MAX_MACS: usize = 4096;
/// The registration datagram of a fenced port (shorter than any frame, so never mistaken for one).
pub const FENCED_HELLO: &[u8] = b"colo-fenced";
/// Length of the token in front of every frame from a fenced port.
pub const TOKEN_LEN: usize = 8;

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
    /// Frames from fenced ports dropped: a stale fencing token for their source MAC, no token, or no room
    /// for another gate.
    pub fenced: AtomicU64,
}

/// A switch bound to a socket path.
#[derive(Debug)]
pub struct Switch {
    sock: UnixDatagram,
    path: PathBuf,
    ports: Vec<PathBuf>,
    macs: HashMap<[u8; 6], PathBuf>,
    fenced_ports: HashSet<PathBuf>,
    gates: HashMap<[u8; 6], FenceGate>,
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
            fenced_ports: HashSet::new(),
            gates: HashMap::new(),
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
        self.fenced_ports.remove(port);
    }

    /// The highest fencing token seen for frames from `mac` (None: no fenced frame from it yet).
    pub fn fence_floor(&self, mac: [u8; 6]) -> Option<FenceToken> {
        self.gates.get(&mac).map(FenceGate::highest)
    }

    /// Strips and checks the token of a datagram from a fenced port: the frame, or None (dropped).
    fn admit_fenced<'a>(&mut self, datagram: &'a [u8]) -> Option<&'a [u8]> {
        let (token, frame) = datagram.split_first_chunk::<TOKEN_LEN>()?;
        if frame.len() < 14 {
            return None;
        }
        let mut src = [0u8; 6];
        src.copy_from_slice(&frame[6..12]);
        if !self.gates.contains_key(&src) && self.gates.len() >= MAX_MACS {
            return None;
        }
        let gate = self.gates.entry(src).or_default();
        match gate.check(FenceToken::from_be_bytes(*token)) {
            Ok(()) => Some(frame),
            Err(stale) => {
                if gate.rejected() == 1 {
                    tracing::warn!("switch: dropping frames from {src:02x?}: {stale}");
                }
                None
            }
        }
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
    pub fn handle(&mut self, datagram: &[u8], from: &Path) {
        if !self.ports.iter().any(|p| p == from) {
            if self.ports.len() >= MAX_PORTS {
                return;
            }
            self.ports.push(from.to_path_buf());
        }
        if datagram == FENCED_HELLO {
            self.fenced_ports.insert(from.to_path_buf());
            return;
        }
        let frame = if self.fenced_ports.contains(from) && !datagram.is_empty() {
            match self.admit_fenced(datagram) {
                Some(f) => f,
                None => {
                    self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        } else {
            datagram
        };
        if frame.len() < 14 {
            return; // registration or runt
        }
        self.stats.frames.fetch_add(1, Ordering::Relaxed);
        let mut src = [0u8; 6];
        src.copy_from_slice(&frame[6..12]);
        if src[0] & 1 == 0 && (self.macs.len() < MAX_MACS || self.macs.contains_key(&src)) {
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
        let mut buf = vec![0u8; TOKEN_LEN + MAX_FRAME];
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

    #[test]
    fn a_fenced_port_with_a_stale_token_can_neither_reach_clients_nor_take_the_mac_back() {
        let dir = tempfile::tempdir().unwrap();
        let sw = Switch::spawn(&dir.path().join("sw")).unwrap();
        let mk = |n: &str, hello: &[u8]| {
            let s = UnixDatagram::bind(dir.path().join(n)).unwrap();
            s.connect(sw.path()).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            s.send(hello).unwrap();
            s
        };
        let fenced = |token: u64, f: &[u8]| {
            let mut d = token.to_be_bytes().to_vec();
            d.extend_from_slice(f);
            d
        };
        let client = mk("client", &[]);
        let old = mk("old-primary", FENCED_HELLO);
        let new = mk("new-primary", FENCED_HELLO);
        std::thread::sleep(Duration::from_millis(50));
        let (guest, mc) = ([2, 0, 0, 0, 0, 0x99], [2, 0, 0, 0, 0, 0xc]);
        let mut buf = [0u8; 2048];
        // The old primary releases with token 0: the client gets the plain frame (no token).
        old.send(&fenced(0, &frame(mc, guest))).unwrap();
        assert_eq!(client.recv(&mut buf).unwrap(), 60);
        assert_eq!(&buf[..60], &frame(mc, guest)[..]);
        // The promoted secondary announces the guest's MAC with its new token 3.
        new.send(&fenced(3, &frame([0xff; 6], guest))).unwrap();
        assert_eq!(client.recv(&mut buf).unwrap(), 60);
        assert!(
            old.recv(&mut buf).is_ok(),
            "the broadcast reaches the old port too"
        );
        // The old primary wakes up and sends with token 0: dropped, and the MAC stays at the new port.
        old.send(&fenced(0, &frame(mc, guest))).unwrap();
        assert!(
            client.recv(&mut buf).is_err(),
            "a stale holder's frame is dropped"
        );
        client.send(&frame(guest, mc)).unwrap();
        assert_eq!(
            new.recv(&mut buf).unwrap(),
            60,
            "client traffic still reaches the new holder"
        );
        assert!(old.recv(&mut buf).is_err());
        // A frame without a whole token is dropped too; the holder of the current token passes.
        old.send(&[1, 2, 3]).unwrap();
        new.send(&fenced(3, &frame(mc, guest))).unwrap();
        assert_eq!(client.recv(&mut buf).unwrap(), 60);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(sw.stats().fenced.load(Ordering::Relaxed), 2);
        // A plain port is not gated (it is not a COLO node).
        assert!(sw.stats().unicast.load(Ordering::Relaxed) >= 2);
    }
}
