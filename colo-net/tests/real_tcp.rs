//! A real COLO network loop with Linux TCP stacks, in network namespaces this test creates.
//!
//! ```text
//!   client ns                     primary ns (PVM)
//!   10.77.0.1  c0 <----- veth -----> p0  10.77.0.2  02:..:02
//!              m0 <----- veth -----> s0  10.77.0.2  02:..:02
//!                                 secondary ns (SVM)
//! ```
//! The client talks to the PVM over c0/p0. A pump thread in the client namespace watches c0 with an
//! AF_PACKET socket: every frame the client sends is mirrored to the SVM through m0, after the
//! [`Rewriter`] moved its acknowledgment numbers into the SVM's sequence space; every frame the SVM sends
//! arrives on m0 and goes nowhere else (m0 has no address). Both guests run the same application but with
//! different write sizes, TCP_NODELAY and buffer sizes; their kernels choose different ISNs and IP ids.
//! The pump records what each guest's NIC saw into two pcap files; the test replays them through
//! `colo_net::replay` (what `pcap_compare` runs) and expects no checkpoint, then flips one payload byte of
//! the SVM's output and expects a mismatch.
//!
//! Both directions of opening are exercised: client-opened (guest is a server) and guest-opened (guest
//! is a client). Namespaces are deleted on every exit path (guard with Drop).

mod common;

use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use colo_net::pcap::{self, Record};
use colo_net::replay::{Decision, ReplayConfig, replay};
use colo_net::{CheckpointReason, MismatchKind, PacketView, Rewriter, RewriterConfig, Time};

const CLIENT_MAC: &str = "02:00:00:00:00:01";
const GUEST_MAC: &str = "02:00:00:00:00:02";
const MIRROR_MAC: &str = "02:00:00:00:00:03";

struct Netns {
    names: Vec<String>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn setup(tag: &str) -> Result<Netns, String> {
    let ns = Netns {
        names: vec![format!("cc{tag}"), format!("cp{tag}"), format!("cs{tag}")],
    };
    let (c, p, s) = (&ns.names[0], &ns.names[1], &ns.names[2]);
    for n in &ns.names {
        ip(&["netns", "add", n])?;
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        // No IPv6 chatter (router solicitations, DAD) in the captures: set the namespace's sysctls from
        // a thread inside it (/proc/sys/net follows the opener's namespace; no sysctl binary needed).
        let name = n.clone();
        thread::spawn(move || -> Result<(), String> {
            enter(&name)?;
            for conf in ["all", "default"] {
                std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1")
                    .map_err(|e| format!("disable IPv6 in {name}: {e}"))?;
            }
            Ok(())
        })
        .join()
        .map_err(|_| "sysctl thread panicked".to_string())??;
    }
    ip(&[
        "link",
        "add",
        &format!("c0{tag}"),
        "netns",
        c,
        "type",
        "veth",
        "peer",
        "name",
        &format!("p0{tag}"),
        "netns",
        p,
    ])?;
    ip(&[
        "link",
        "add",
        &format!("m0{tag}"),
        "netns",
        c,
        "type",
        "veth",
        "peer",
        "name",
        &format!("s0{tag}"),
        "netns",
        s,
    ])?;
    for (n, dev, mac, addr) in [
        (c, format!("c0{tag}"), CLIENT_MAC, Some("10.77.0.1/24")),
        (c, format!("m0{tag}"), MIRROR_MAC, None),
        (p, format!("p0{tag}"), GUEST_MAC, Some("10.77.0.2/24")),
        (s, format!("s0{tag}"), GUEST_MAC, Some("10.77.0.2/24")),
    ] {
        ip(&["-n", n, "link", "set", &dev, "address", mac])?;
        if let Some(a) = addr {
            ip(&["-n", n, "addr", "add", a, "dev", &dev])?;
        }
        ip(&["-n", n, "link", "set", &dev, "up"])?;
    }
    ip(&[
        "-n",
        c,
        "neigh",
        "replace",
        "10.77.0.2",
        "lladdr",
        GUEST_MAC,
        "dev",
        &format!("c0{tag}"),
        "nud",
        "permanent",
    ])?;
    for (n, dev) in [(p, format!("p0{tag}")), (s, format!("s0{tag}"))] {
        ip(&[
            "-n",
            n,
            "neigh",
            "replace",
            "10.77.0.1",
            "lladdr",
            CLIENT_MAC,
            "dev",
            &dev,
            "nud",
            "permanent",
        ])?;
    }
    Ok(ns)
}

fn enter(ns: &str) -> Result<(), String> {
    let path = CString::new(format!("/var/run/netns/{ns}")).map_err(|e| e.to_string())?;
    // SAFETY: `path` is a valid NUL-terminated string; the returned fd is checked and closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!("open netns {ns}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is an open namespace file descriptor we own; setns only affects this thread.
    let r = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    // SAFETY: fd is ours and not used after this.
    unsafe { libc::close(fd) };
    if r != 0 {
        return Err(format!("setns {ns}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// An AF_PACKET socket bound to one interface (of the calling thread's namespace).
fn packet_socket(dev: &str) -> Result<OwnedFd, String> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(format!("AF_PACKET socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = CString::new(dev).map_err(|e| e.to_string())?;
    // SAFETY: name is a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(format!("no interface {dev}"));
    }
    // SAFETY: sockaddr_ll is plain old data; zeroed is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll of the size passed.
    let r = unsafe {
        libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(format!(
            "bind AF_PACKET to {dev}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let size: libc::c_int = 8 << 20;
    // SAFETY: setsockopt with a c_int option value of the size passed.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    Ok(owned)
}

/// Receives one frame; returns its packet type (PACKET_OUTGOING etc.).
fn recv_frame(fd: &OwnedFd, buf: &mut [u8]) -> Option<(usize, u8)> {
    // SAFETY: zeroed sockaddr_ll is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: buf and sll are valid for the lengths passed; MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            (&mut sll as *mut libc::sockaddr_ll).cast(),
            &mut len,
        )
    };
    if n <= 0 || n as usize > buf.len() {
        return None;
    }
    Some((n as usize, sll.sll_pkttype))
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Recomputes the IPv4 TCP checksum (the captured client frames may carry a partial one from offload).
fn fix_tcp_checksum(frame: &mut [u8]) {
    let Ok(v) = PacketView::parse(frame, 0) else {
        return;
    };
    let Some(t) = v.tcp().copied() else { return };
    if v.version != colo_net::packet::IpVersion::V4 {
        return;
    }
    let (l3, end) = (v.l3, v.ip_end);
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    let seglen = (end - t.header) as u16;
    add(&frame[l3 + 12..l3 + 20]);
    add(&[0, 6]);
    add(&seglen.to_be_bytes());
    frame[t.header + 16] = 0;
    frame[t.header + 17] = 0;
    add(&frame[t.header..end]);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[t.header + 16..t.header + 18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

struct Captures {
    primary: Vec<Record>,
    secondary: Vec<Record>,
    mirrored: u64,
}

/// Runs in the client namespace: mirrors client output to the SVM (rewritten) and records both NICs.
fn pump(ns: String, tag: String, stop: Arc<AtomicBool>, ready: mpsc::Sender<Result<(), String>>) -> Captures {
    let mut caps = Captures {
        primary: Vec::new(),
        secondary: Vec::new(),
        mirrored: 0,
    };
    let socks = enter(&ns).and_then(|_| {
        Ok((
            packet_socket(&format!("c0{tag}"))?,
            packet_socket(&format!("m0{tag}"))?,
        ))
    });
    let (c0, m0) = match socks {
        Ok(s) => {
            let _ = ready.send(Ok(()));
            s
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return caps;
        }
    };
    let mut rw = Rewriter::new(RewriterConfig::default()).unwrap_or_else(|e| panic!("rewriter: {e}"));
    let mut buf = vec![0u8; 256 * 1024];
    let origin = Instant::now();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let mut pfds = [
            libc::pollfd {
                fd: m0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: c0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: pfds is a valid array of two pollfd.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, 20) };
        if n <= 0 && stopping {
            break;
        }
        let t = || Time::from_nanos(origin.elapsed().as_nanos() as u64);
        // SVM output first, so its SYN is known before a client reply that answers the PVM.
        while let Some((len, kind)) = recv_frame(&m0, &mut buf) {
            if std::env::var_os("COLO_NET_DEBUG").is_some() {
                eprintln!("m0 frame kind {kind} len {len}");
            }
            if kind != libc::PACKET_OUTGOING {
                let data = buf[..len].to_vec();
                // The rewriter learns the SVM's ISN here (its translated copy is not needed).
                let mut scratch = data.clone();
                rw.secondary_output(t(), &mut scratch);
                mirror(&mut rw, &m0, &mut caps.mirrored);
                caps.secondary.push(Record {
                    time_ns: now_ns(),
                    orig_len: len as u32,
                    data,
                });
            }
        }
        while let Some((len, kind)) = recv_frame(&c0, &mut buf) {
            let data = buf[..len].to_vec();
            let ts = now_ns();
            if kind == libc::PACKET_OUTGOING {
                // Client -> PVM: mirror to the SVM through the rewriter.
                rw.client_input(t(), bytes::BytesMut::from(&data[..]));
                caps.secondary.push(Record {
                    time_ns: ts,
                    orig_len: len as u32,
                    data: data.clone(),
                });
            }
            caps.primary.push(Record {
                time_ns: ts,
                orig_len: len as u32,
                data,
            });
            mirror(&mut rw, &m0, &mut caps.mirrored);
        }
        rw.expire(t());
        mirror(&mut rw, &m0, &mut caps.mirrored);
    }
    caps
}

/// Sends what the rewriter has ready for the SVM.
fn mirror(rw: &mut Rewriter, m0: &OwnedFd, count: &mut u64) {
    while let Some(mut m) = rw.poll_input() {
        fix_tcp_checksum(&mut m);
        // SAFETY: m is a valid buffer of m.len() bytes; m0 is bound to the mirror interface.
        let sent = unsafe { libc::send(m0.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
        if sent == m.len() as isize {
            *count += 1;
        } else {
            eprintln!("mirror send failed: {}", std::io::Error::last_os_error());
        }
    }
}

fn set_int_opt(fd: i32, level: i32, opt: i32, v: i32) {
    // SAFETY: setsockopt with a c_int value of the size passed; failure only leaves the default.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
}

/// Guest behaviour knobs: the two guests send the same bytes but differently.
#[derive(Clone, Copy)]
struct Style {
    chunk: usize,
    nodelay: bool,
    sndbuf: i32,
    rcvbuf: i32,
}

const PVM_STYLE: Style = Style {
    chunk: 1000,
    nodelay: true,
    sndbuf: 1 << 20,
    rcvbuf: 1 << 16,
};
const SVM_STYLE: Style = Style {
    chunk: 7000,
    nodelay: false,
    sndbuf: 2 << 20,
    rcvbuf: 1 << 18,
};

fn body(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 253) as u8).collect()
}

fn style_stream(s: &TcpStream, st: Style) {
    let _ = s.set_nodelay(st.nodelay);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
}

fn write_chunks(s: &mut TcpStream, data: &[u8], chunk: usize) -> std::io::Result<()> {
    for c in data.chunks(chunk) {
        s.write_all(c)?;
    }
    Ok(())
}

fn read_to_end_timeout(s: &mut TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = s.read_to_end(&mut v);
    v
}

/// Guest as a server (client-opened connection).
fn guest_server(
    ns: String,
    st: Style,
    resp: Arc<Vec<u8>>,
    ready: mpsc::Sender<Result<(), String>>,
) -> Result<(), String> {
    enter(&ns)?;
    let l = TcpListener::bind("10.77.0.2:8080").map_err(|e| e.to_string());
    let l = match l {
        Ok(l) => {
            let _ = ready.send(Ok(()));
            l
        }
        Err(e) => {
            let _ = ready.send(Err(e.clone()));
            return Err(e);
        }
    };
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match l.accept() {
            Ok((s, _)) => break s,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    style_stream(&s, st);
    set_int_opt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, st.sndbuf);
    let mut req = [0u8; 100];
    s.read_exact(&mut req).map_err(|e| format!("read request: {e}"))?;
    write_chunks(&mut s, &resp, st.chunk).map_err(|e| format!("write response: {e}"))?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = read_to_end_timeout(&mut s);
    Ok(())
}

/// Guest as a client (guest-opened connection) from a fixed local port.
fn guest_client(ns: String, st: Style, data: Arc<Vec<u8>>, delay: Duration) -> Result<Vec<u8>, String> {
    enter(&ns)?;
    thread::sleep(delay);
    // SAFETY: plain socket(2); checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err("socket".into());
    }
    // SAFETY: fd is a fresh socket owned by this TcpStream from now on.
    let mut s = unsafe { TcpStream::from_raw_fd(fd) };
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, st.rcvbuf);
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, st.sndbuf);
    let sa = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let local = sa("10.77.0.2:45000".parse().map_err(|_| "addr")?);
    let remote = sa("10.77.0.1:9090".parse().map_err(|_| "addr")?);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: local is a valid sockaddr_in of the length passed.
    if unsafe { libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) } != 0 {
        return Err(format!("bind: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: remote is a valid sockaddr_in of the length passed.
    if unsafe { libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) } != 0 {
        return Err(format!("connect: {}", std::io::Error::last_os_error()));
    }
    style_stream(&s, st);
    write_chunks(&mut s, &data, st.chunk).map_err(|e| format!("write: {e}"))?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    Ok(read_to_end_timeout(&mut s))
}

struct Run {
    captures: Captures,
}

fn run_scenario(tag: &str, guest_opened: bool) -> Result<Run, String> {
    let ns = setup(tag)?;
    let (c, p, s) = (ns.names[0].clone(), ns.names[1].clone(), ns.names[2].clone());
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let pump_thread = {
        let (c, tag, stop) = (c.clone(), tag.to_string(), stop.clone());
        thread::spawn(move || pump(c, tag, stop, tx))
    };
    rx.recv_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())??;
    let payload = Arc::new(body(if guest_opened { 200_000 } else { 300_000 }));
    let result = if !guest_opened {
        let mut guests = Vec::new();
        for (n, st) in [(p.clone(), PVM_STYLE), (s.clone(), SVM_STYLE)] {
            let (tx, rx) = mpsc::channel();
            let resp = payload.clone();
            guests.push(thread::spawn(move || guest_server(n, st, resp, tx)));
            rx.recv_timeout(Duration::from_secs(5))
                .map_err(|e| e.to_string())??;
        }
        let client = {
            let c = c.clone();
            thread::spawn(move || -> Result<Vec<u8>, String> {
                enter(&c)?;
                let mut s = TcpStream::connect_timeout(
                    &"10.77.0.2:8080".parse().map_err(|_| "addr")?,
                    Duration::from_secs(5),
                )
                .map_err(|e| format!("client connect: {e}"))?;
                style_stream(&s, PVM_STYLE);
                s.write_all(&[b'R'; 100]).map_err(|e| e.to_string())?;
                let got = read_to_end_timeout(&mut s);
                Ok(got)
            })
        };
        let got = client.join().map_err(|_| "client panicked")??;
        let mut errs = Vec::new();
        for g in guests {
            if let Err(e) = g.join().map_err(|_| "guest panicked".to_string()).and_then(|r| r) {
                errs.push(e);
            }
        }
        if got != *payload {
            Err(format!("client got {} bytes, want {}", got.len(), payload.len()))
        } else if !errs.is_empty() {
            Err(format!("guests: {errs:?}"))
        } else {
            Ok(())
        }
    } else {
        // The client side runs a server; both guests connect from the same port, the SVM a bit first.
        let (ltx, lrx) = mpsc::channel();
        let expect = payload.clone();
        let server = {
            let c = c.clone();
            thread::spawn(move || -> Result<(), String> {
                enter(&c)?;
                let l = TcpListener::bind("10.77.0.1:9090").map_err(|e| e.to_string())?;
                let _ = ltx.send(());
                let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
                style_stream(&s, PVM_STYLE);
                let got = read_to_end_timeout(&mut s);
                if got != *expect {
                    return Err(format!("server got {} bytes", got.len()));
                }
                s.write_all(b"done").map_err(|e| e.to_string())?;
                Ok(())
            })
        };
        lrx.recv_timeout(Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        let svm = {
            let (s, d) = (s.clone(), payload.clone());
            thread::spawn(move || guest_client(s, SVM_STYLE, d, Duration::ZERO))
        };
        let pvm = {
            let (p, d) = (p.clone(), payload.clone());
            thread::spawn(move || guest_client(p, PVM_STYLE, d, Duration::from_millis(100)))
        };
        let pr = pvm.join().map_err(|_| "pvm panicked")?;
        let sr = svm.join().map_err(|_| "svm panicked")?;
        let server = server.join().map_err(|_| "server panicked")?;
        match (pr, sr, server) {
            (Ok(a), Ok(b), Ok(())) if a == b"done" && b == b"done" => Ok(()),
            other => Err(format!("guest-opened exchange failed: {other:?}")),
        }
    };
    // Let trailing ACKs and FINs pass, then stop the pump.
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let captures = pump_thread.join().map_err(|_| "pump panicked")?;
    if result.is_err() {
        for n in &ns.names {
            if let Ok(o) = Command::new("ip").args(["-n", n, "-s", "link"]).output() {
                eprintln!("{n}: {}", String::from_utf8_lossy(&o.stdout));
            }
            if let Ok(o) = Command::new("ip")
                .args(["netns", "exec", n, "cat", "/proc/net/netstat"])
                .output()
            {
                let text = String::from_utf8_lossy(&o.stdout);
                let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt")).collect();
                if let [names, values] = rows[..] {
                    for (k, v) in names.split(' ').zip(values.split(' ')) {
                        if v != "0" {
                            eprintln!("{n}: {k} = {v}");
                        }
                    }
                }
            }
            if let Ok(o) = Command::new("ip")
                .args(["netns", "exec", n, "cat", "/proc/net/snmp"])
                .output()
            {
                eprintln!("{n}: {}", String::from_utf8_lossy(&o.stdout));
            }
        }
    }
    drop(ns);
    if let Err(e) = result {
        dump("primary", &captures.primary);
        dump("secondary", &captures.secondary);
        return Err(e);
    }
    Ok(Run { captures })
}

/// Prints a capture as one line per TCP segment (for diagnosing a failed exchange).
fn dump(name: &str, recs: &[Record]) {
    eprintln!("--- {name} capture ({} frames)", recs.len());
    let t0 = recs.first().map_or(0, |r| r.time_ns);
    for r in recs.iter().take(60) {
        eprint!("{:>10.3} ms ", (r.time_ns.saturating_sub(t0)) as f64 / 1e6);
        match PacketView::parse(&r.data, 0) {
            Ok(v) => match v.tcp() {
                Some(t) => eprintln!(
                    "{} {:>5}->{:<5} flags {:#04x} seq {:>10} ack {:>10} len {}",
                    if r.data[11] == 2 { "guest " } else { "client" },
                    t.src_port,
                    t.dst_port,
                    t.flags,
                    t.seq,
                    t.ack,
                    t.payload_len
                ),
                None => eprintln!("non-TCP IP frame of {} bytes", r.data.len()),
            },
            Err(e) => eprintln!("unparsed frame of {} bytes: {e}", r.data.len()),
        }
    }
}

fn write_and_reload(dir: &std::path::Path, name: &str, recs: &[Record]) -> Vec<Record> {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).unwrap();
    pcap::write(std::io::BufWriter::new(f), pcap::LINKTYPE_ETHERNET, recs).unwrap();
    pcap::read(
        std::io::BufReader::new(std::fs::File::open(&path).unwrap()),
        10_000_000,
    )
    .unwrap()
    .records
}

fn check(tag: &str, guest_opened: bool) {
    if unsafe_is_not_root() {
        eprintln!("SKIPPED: real_tcp needs root for network namespaces");
        return;
    }
    // The live exchange (two kernels, a user-space mirror) is occasionally disturbed on a loaded machine;
    // a failed *exchange* is retried in fresh namespaces (loudly). The comparison itself is never retried.
    let mut attempt = 0;
    let run = loop {
        attempt += 1;
        match run_scenario(&format!("{tag}{attempt}"), guest_opened) {
            Ok(r) => break r,
            Err(e) if e.contains("netns add") && e.contains("ermission") => {
                eprintln!("SKIPPED: cannot create network namespaces: {e}");
                return;
            }
            Err(e) if attempt < 3 => eprintln!("RETRYING: live exchange attempt {attempt} failed: {e}"),
            Err(e) => panic!("scenario failed {attempt} times: {e}"),
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let primary = write_and_reload(dir.path(), "primary.pcap", &run.captures.primary);
    let secondary = write_and_reload(dir.path(), "secondary.pcap", &run.captures.secondary);
    if let Some(keep) = std::env::var_os("COLO_NET_KEEP") {
        // Keep the captures for pcap_compare.
        let keep = std::path::PathBuf::from(keep);
        let _ = std::fs::create_dir_all(&keep);
        for n in ["primary.pcap", "secondary.pcap"] {
            let _ = std::fs::copy(dir.path().join(n), keep.join(format!("{tag}-{n}")));
        }
    }
    assert!(
        run.captures.mirrored > 5,
        "mirror sent {} frames",
        run.captures.mirrored
    );
    let cfg = ReplayConfig::default();
    let (decisions, sum) = replay(&primary, &secondary, &cfg).unwrap();
    eprintln!("{tag}: {sum:?}");
    let cps: Vec<_> = decisions
        .iter()
        .filter(|d| matches!(d, Decision::Checkpoint { .. }))
        .collect();
    assert_eq!(sum.checkpoints, 0, "no checkpoint expected, got {cps:?}");
    assert!(sum.primary_frames > 20 && sum.secondary_frames > 5, "{sum:?}");
    assert!(
        sum.translated > 0,
        "the SVM's output was never translated: {sum:?}"
    );
    assert!(sum.released + sum.held_at_end.0 == sum.primary_frames, "{sum:?}");
    assert!(sum.held_at_end.0 <= 2, "primary frames left unmatched: {sum:?}");

    // Flip one payload byte of a data segment in the middle of the SVM's output.
    let mut bad = secondary.clone();
    let guest: [u8; 6] = [2, 0, 0, 0, 0, 2];
    let data_frames: Vec<usize> = bad
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.data[6..12] == guest && PacketView::parse(&r.data, 0).is_ok_and(|v| !v.tcp_payload().is_empty())
        })
        .map(|(i, _)| i)
        .collect();
    let victim = data_frames[data_frames.len() / 2];
    let (at, _) = {
        let v = PacketView::parse(&bad[victim].data, 0).unwrap();
        let t = *v.tcp().unwrap();
        (t.payload + t.payload_len / 2, t)
    };
    bad[victim].data[at] ^= 0x20;
    let (decisions, sum) = replay(&primary, &bad, &cfg).unwrap();
    eprintln!("{tag} flipped: {sum:?}");
    assert!(sum.mismatches >= 1, "{sum:?}");
    let first = decisions.iter().find_map(|d| match d {
        Decision::Checkpoint { reason, .. } => Some(*reason),
        _ => None,
    });
    assert!(
        matches!(
            first,
            Some(CheckpointReason::Mismatch {
                kind: MismatchKind::Payload,
                ..
            })
        ),
        "first checkpoint should be the payload mismatch: {first:?}"
    );
}

fn unsafe_is_not_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() != 0 }
}

#[test]
fn real_tcp_client_opened_connection_matches_and_a_flipped_byte_does_not() {
    check(&format!("a{}", std::process::id() % 10_000), false);
}

#[test]
fn real_tcp_guest_opened_connection_matches_and_a_flipped_byte_does_not() {
    check(&format!("b{}", std::process::id() % 10_000), true);
}
