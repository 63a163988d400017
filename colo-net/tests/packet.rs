//! Packet views: fixtures for each supported layout, and the fast path held to the general (etherparse)
//! path on mutated frames.

mod common;

use colo_net::build;
use colo_net::packet::{IpVersion, Transport, masked_diff};
use colo_net::{FlowKey, NetError, PacketView};
use common::*;
use etherparse::PacketBuilder;
use proptest::prelude::*;

fn built(b: etherparse::PacketBuilderStep<etherparse::UdpHeader>, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

#[test]
fn vlan_tags_ipv6_and_vnet_header_are_understood() {
    // 802.1Q
    let f = built(
        PacketBuilder::ethernet2([2; 6], [3; 6])
            .single_vlan(42.try_into().unwrap())
            .ipv4([1, 1, 1, 1], [2, 2, 2, 2], 9)
            .udp(5, 6),
        b"vlan",
    );
    let v = PacketView::parse(&f, 0).unwrap();
    assert_eq!(v.vlan, (1 << 31) | 42);
    assert_eq!(
        v.transport,
        Transport::Udp {
            src_port: 5,
            dst_port: 6
        }
    );
    // QinQ
    let f = built(
        PacketBuilder::ethernet2([2; 6], [3; 6])
            .double_vlan(7.try_into().unwrap(), 9.try_into().unwrap())
            .ipv4([1, 1, 1, 1], [2, 2, 2, 2], 9)
            .udp(5, 6),
        b"qinq",
    );
    assert_eq!(PacketView::parse(&f, 0).unwrap().vlan, (1 << 31) | (7 << 16) | 9);
    // IPv6 + TCP
    let mut f = Vec::new();
    PacketBuilder::ethernet2([2; 6], [3; 6])
        .ipv6([1; 16], [2; 16], 64)
        .tcp(80, 81, 1000, 100)
        .write(&mut f, b"six")
        .unwrap();
    let v = PacketView::parse(&f, 0).unwrap();
    assert_eq!(v.version, IpVersion::V6);
    assert_eq!(v.tcp_payload(), b"six");
    assert_eq!(v.src, u128::from_be_bytes([1; 16]));
    // A 12-byte virtio-net header in front; offsets include it.
    let mut g = vec![1u8; 12];
    g.extend_from_slice(&f);
    let w = PacketView::parse(&g, 12).unwrap();
    assert_eq!(w.l3, v.l3 + 12);
    assert!(w.csum_partial());
    assert_eq!(FlowKey::of(&w), FlowKey::of(&v));
    assert!(matches!(
        PacketView::parse(&g[..5], 12),
        Err(NetError::Malformed { .. })
    ));
    // ICMPv4 echo and an IPv4 fragment.
    let mut f = Vec::new();
    PacketBuilder::ethernet2([2; 6], [3; 6])
        .ipv4([1; 4], [2; 4], 64)
        .icmpv4_echo_request(1, 2)
        .write(&mut f, b"ping")
        .unwrap();
    assert_eq!(PacketView::parse(&f, 0).unwrap().transport, Transport::Icmp);
    let mut frag = build::udp(GUEST, CLIENT, 7, b"fragment");
    frag[20] = 0x20; // more fragments
    let v = PacketView::parse(&frag, 0).unwrap();
    assert!(v.fragment);
    assert_eq!(v.transport, Transport::Other);
}

#[test]
fn masked_compare_ignores_ipv6_hop_limit_and_flow_label() {
    let mk = |hop: u8, label: u32| {
        let mut f = Vec::new();
        PacketBuilder::ethernet2([2; 6], [3; 6])
            .ipv6([1; 16], [2; 16], hop)
            .udp(1, 2)
            .write(&mut f, b"x")
            .unwrap();
        f[15] = (f[15] & 0xf0) | ((label >> 16) as u8 & 0x0f);
        f[16] = (label >> 8) as u8;
        f[17] = label as u8;
        f
    };
    let (a, b) = (mk(64, 1), mk(3, 0xfffff));
    let (va, vb) = (
        PacketView::parse(&a, 0).unwrap(),
        PacketView::parse(&b, 0).unwrap(),
    );
    assert_eq!(masked_diff(&a, &va.layout(), &b, &vb.layout()), None);
    let mut c = b.clone();
    *c.last_mut().unwrap() ^= 1;
    let vc = PacketView::parse(&c, 0).unwrap();
    assert_eq!(masked_diff(&a, &va.layout(), &c, &vc.layout()), Some(48));
}

fn frame_strategy() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..100),
        any::<u32>(),
        any::<u8>(),
    )
        .prop_map(|(tcp, payload, seq, flags)| {
            if tcp {
                let mut s = build::TcpSpec::data(GUEST, CLIENT, seq, seq.rotate_left(7), &payload);
                s.flags = flags;
                build::tcp(&s)
            } else {
                build::udp(GUEST, CLIENT, seq as u16, &payload)
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The fast path never disagrees with etherparse: mutate header bytes and cut frames anywhere.
    #[test]
    fn fast_path_agrees_with_etherparse(
        frame in frame_strategy(),
        edits in proptest::collection::vec((0usize..80, any::<u8>()), 0..4),
        cut in any::<Option<usize>>(),
        vnet in prop_oneof![Just(0usize), Just(10), Just(12)],
    ) {
        let mut f = vec![0u8; vnet];
        f.extend_from_slice(&frame);
        for (at, b) in edits {
            if let Some(x) = f.get_mut(at) {
                *x = b;
            }
        }
        if let Some(c) = cut {
            f.truncate(c % (f.len() + 1));
        }
        let fast = PacketView::parse(&f, vnet);
        let general = PacketView::parse_general(&f, vnet);
        match (&fast, &general) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            _ => prop_assert!(false, "fast {:?} vs general {:?}", fast, general),
        }
    }
}

#[test]
fn ipv4_options_and_ethernet_padding() {
    // A 60-byte minimum frame: padding after the IP packet is not part of it.
    let mut f = build::udp(GUEST, CLIENT, 1, b"ab");
    let ip_end = f.len();
    f.resize(60, 0xee);
    let v = PacketView::parse(&f, 0).unwrap();
    assert_eq!(v.ip_end, ip_end);
    let mut g = f.clone();
    g[59] = 0x11;
    let w = PacketView::parse(&g, 0).unwrap();
    assert_eq!(masked_diff(&f, &v.layout(), &g, &w.layout()), None);
    let _ = seg(1, 1, DATA, b"");
}
