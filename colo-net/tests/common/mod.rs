//! Helpers shared by the integration tests.
#![allow(dead_code)]

use bytes::Bytes;
use colo_net::build::{self, Endpoint, TcpSpec};
use colo_net::packet::tcp_flags::*;
use colo_net::{Action, CheckpointReason, Comparator};

pub const GUEST: Endpoint = Endpoint {
    mac: [2, 0, 0, 0, 0, 2],
    ip: [10, 0, 0, 2],
    port: 80,
};
pub const CLIENT: Endpoint = Endpoint {
    mac: [2, 0, 0, 0, 0, 1],
    ip: [10, 0, 0, 1],
    port: 40000,
};

pub fn seg(seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Bytes {
    let mut s = TcpSpec::data(GUEST, CLIENT, seq, ack, payload);
    s.flags = flags;
    Bytes::from(build::tcp(&s))
}

pub fn seg_ext(
    seq: u32,
    ack: u32,
    flags: u8,
    ip_id: u16,
    window: u16,
    options: &[u8],
    payload: &[u8],
) -> Bytes {
    let mut s = TcpSpec::data(GUEST, CLIENT, seq, ack, payload);
    s.flags = flags;
    s.ip_id = ip_id;
    s.window = window;
    s.options = options;
    Bytes::from(build::tcp(&s))
}

pub fn client_seg(seq: u32, ack: u32, flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut s = TcpSpec::data(CLIENT, GUEST, seq, ack, payload);
    s.flags = flags;
    s.options = options;
    build::tcp(&s)
}

pub const DATA: u8 = ACK | PSH;

#[derive(Default, Debug)]
pub struct Drained {
    pub released: Vec<Bytes>,
    pub dropped: Vec<Bytes>,
    pub checkpoints: Vec<CheckpointReason>,
}

pub fn drain(c: &mut Comparator) -> Drained {
    let mut d = Drained::default();
    while let Some(a) = c.poll_action() {
        match a {
            Action::Release(f) => d.released.push(f),
            Action::DropSecondary(f) => d.dropped.push(f),
            Action::RequestCheckpoint(r) => d.checkpoints.push(r),
        }
    }
    d
}

/// Checks the TCP checksum of an Ethernet/IPv4/TCP frame.
pub fn tcp_checksum_ok(frame: &[u8]) -> bool {
    let Ok(p) = etherparse::SlicedPacket::from_ethernet(frame) else {
        return false;
    };
    let (Some(etherparse::NetSlice::Ipv4(ip)), Some(etherparse::TransportSlice::Tcp(t))) =
        (p.net, p.transport)
    else {
        return false;
    };
    let h = ip.header();
    t.calc_checksum_ipv4(h.source(), h.destination())
        .is_ok_and(|c| c == t.checksum())
}
