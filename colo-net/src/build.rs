//! Frame builders for tests, benchmarks and examples: Ethernet II + IPv4 + TCP/UDP with valid checksums.

use etherparse::PacketBuilder;

use crate::packet::tcp_flags;

/// Addresses of one side of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// MAC address.
    pub mac: [u8; 6],
    /// IPv4 address.
    pub ip: [u8; 4],
    /// Port.
    pub port: u16,
}

/// A TCP segment to build.
#[derive(Clone, Debug)]
pub struct TcpSpec<'a> {
    /// Sender.
    pub src: Endpoint,
    /// Receiver.
    pub dst: Endpoint,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (used with [`tcp_flags::ACK`]).
    pub ack: u32,
    /// Flags (see [`tcp_flags`]).
    pub flags: u8,
    /// Window.
    pub window: u16,
    /// IPv4 identification.
    pub ip_id: u16,
    /// Raw option bytes (a multiple of 4, at most 40).
    pub options: &'a [u8],
    /// Payload.
    pub payload: &'a [u8],
}

impl<'a> TcpSpec<'a> {
    /// An ACK segment carrying `payload` from `src` to `dst`.
    pub fn data(src: Endpoint, dst: Endpoint, seq: u32, ack: u32, payload: &'a [u8]) -> Self {
        TcpSpec {
            src,
            dst,
            seq,
            ack,
            flags: tcp_flags::ACK | tcp_flags::PSH,
            window: 65535,
            ip_id: 0,
            options: &[],
            payload,
        }
    }
}

/// Builds the Ethernet frame of a TCP segment (empty if the options are not a multiple of 4 up to 40).
pub fn tcp(spec: &TcpSpec<'_>) -> Vec<u8> {
    let f = spec.flags;
    let mut b = PacketBuilder::ethernet2(spec.src.mac, spec.dst.mac)
        .ipv4(spec.src.ip, spec.dst.ip, 64)
        .tcp(spec.src.port, spec.dst.port, spec.seq, spec.window);
    if f & tcp_flags::ACK != 0 {
        b = b.ack(spec.ack);
    }
    if f & tcp_flags::SYN != 0 {
        b = b.syn();
    }
    if f & tcp_flags::FIN != 0 {
        b = b.fin();
    }
    if f & tcp_flags::RST != 0 {
        b = b.rst();
    }
    if f & tcp_flags::PSH != 0 {
        b = b.psh();
    }
    if !spec.options.is_empty() {
        b = match b.options_raw(spec.options) {
            Ok(b) => b,
            Err(_) => return Vec::new(),
        };
    }
    let mut out = Vec::with_capacity(b.size(spec.payload.len()));
    // Writing into a Vec cannot fail for these header sizes.
    if b.write(&mut out, spec.payload).is_err() {
        out.clear();
    }
    // Set the IPv4 id (PacketBuilder writes 0) and fix the header checksum.
    if out.len() >= 34 {
        out[18..20].copy_from_slice(&spec.ip_id.to_be_bytes());
        fix_ipv4_checksum(&mut out[14..34]);
    }
    out
}

/// Builds the Ethernet frame of a UDP datagram.
pub fn udp(src: Endpoint, dst: Endpoint, ip_id: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src.mac, dst.mac)
        .ipv4(src.ip, dst.ip, 64)
        .udp(src.port, dst.port);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    if b.write(&mut out, payload).is_err() {
        out.clear();
    }
    if out.len() >= 34 {
        out[18..20].copy_from_slice(&ip_id.to_be_bytes());
        fix_ipv4_checksum(&mut out[14..34]);
    }
    out
}

fn fix_ipv4_checksum(h: &mut [u8]) {
    h[10] = 0;
    h[11] = 0;
    let mut sum = 0u32;
    for c in h.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    h[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// The guest side used by [`tcp_segments`] and [`udp_pair`].
pub const BENCH_GUEST: Endpoint = Endpoint {
    mac: [2, 0, 0, 0, 0, 2],
    ip: [10, 0, 0, 2],
    port: 80,
};
/// The client side used by [`tcp_segments`] and [`udp_pair`].
pub const BENCH_CLIENT: Endpoint = Endpoint {
    mac: [2, 0, 0, 0, 0, 1],
    ip: [10, 0, 0, 1],
    port: 40000,
};

/// A byte stream from the guest's port `port` cut into `seg`-byte ACK segments starting at `isn + 1`,
/// with IP ids starting at `ip_id` (so two calls give the differences two guests have).
pub fn tcp_segments(port: u16, isn: u32, ip_id: u16, data: &[u8], seg: usize) -> Vec<bytes::Bytes> {
    let mut g = BENCH_GUEST;
    g.port = port;
    data.chunks(seg.max(1))
        .enumerate()
        .map(|(i, c)| {
            let mut s = TcpSpec::data(g, BENCH_CLIENT, isn.wrapping_add(1 + (i * seg) as u32), 1, c);
            s.ip_id = ip_id.wrapping_add(i as u16);
            bytes::Bytes::from(tcp(&s))
        })
        .collect()
}

/// A pair of equal 64-byte UDP frames (22 payload bytes) from the guest's port `port`, differing only in
/// the IP id, TTL-independent fields and checksums as two guests' would.
pub fn udp_pair(port: u16) -> (bytes::Bytes, bytes::Bytes) {
    let mut g = BENCH_GUEST;
    g.port = port;
    let payload = [0x5a; 22];
    (
        bytes::Bytes::from(udp(g, BENCH_CLIENT, 1, &payload)),
        bytes::Bytes::from(udp(g, BENCH_CLIENT, 2, &payload)),
    )
}
