//! Byte-fixture tests of the comparator's decisions.

mod common;

use std::time::Duration;

use bytes::Bytes;
use colo_net::build;
use colo_net::packet::tcp_flags::*;
use colo_net::{CheckpointReason, Comparator, Config, FlowKey, MismatchKind, PacketView, Side, Time};
use common::*;

fn cmp() -> Comparator {
    Comparator::new(Config::default(), Time::ZERO).unwrap()
}

fn t(ms: u64) -> Time {
    Time::from_millis(ms)
}

fn flow() -> FlowKey {
    FlowKey::of(&PacketView::parse(&seg(1, 1, ACK, b""), 0).unwrap())
}

const ISN: u32 = 0xffff_fff0; // close to wrap-around on purpose

#[test]
fn same_bytes_in_different_segments_are_released_in_order() {
    let mut c = cmp();
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let p = [
        seg(ISN, 5, DATA, &data[..1448]),
        seg(ISN.wrapping_add(1448), 5, DATA, &data[1448..]),
    ];
    for f in &p {
        c.handle_primary(t(1), f.clone()).unwrap();
    }
    assert!(drain(&mut c).released.is_empty());
    let mut off = 0;
    for size in [100, 900, 1, 1999] {
        c.handle_secondary(
            t(2),
            seg(
                ISN.wrapping_add(off),
                5,
                DATA,
                &data[off as usize..off as usize + size],
            ),
        );
        off += size as u32;
    }
    let d = drain(&mut c);
    assert_eq!(d.released, p.to_vec());
    assert_eq!(d.dropped.len(), 4);
    assert!(d.checkpoints.is_empty());
    assert_eq!(c.stats().tcp_bytes_compared, 3000);
    assert_eq!(c.queued(), (0, 0));
}

#[test]
fn one_different_byte_requests_a_checkpoint_naming_flow_and_offset() {
    let mut c = cmp();
    c.handle_primary(t(1), seg(1000, 5, DATA, &[7; 500])).unwrap();
    let mut other = [7u8; 500];
    other[321] = 8;
    c.handle_secondary(t(1), seg(1000, 5, DATA, &other[..400]));
    let d = drain(&mut c);
    assert!(d.released.is_empty());
    assert_eq!(
        d.checkpoints,
        vec![CheckpointReason::Mismatch {
            flow: flow(),
            offset: 321,
            kind: MismatchKind::Payload
        }]
    );
    // The primary frame is held until the checkpoint, then released; nothing else is requested meanwhile.
    c.handle_secondary(t(2), seg(1400, 5, DATA, &[7; 100]));
    let d = drain(&mut c);
    assert_eq!(d.dropped.len(), 1);
    assert!(d.checkpoints.is_empty());
    c.checkpoint(t(3));
    let d = drain(&mut c);
    assert_eq!(d.released.len(), 1);
    // After the checkpoint the flow continues from the released position.
    c.handle_primary(t(4), seg(1500, 5, DATA, b"next")).unwrap();
    c.handle_secondary(t(4), seg(1500, 5, DATA, b"next"));
    let d = drain(&mut c);
    assert_eq!(d.released.len(), 1);
    assert!(d.checkpoints.is_empty());
}

#[test]
fn handshake_syn_shapes_and_acks() {
    let mut c = cmp();
    let mss_ws = [2, 4, 5, 0xb4, 1, 3, 3, 7];
    // Client-opened: both guests answer with SYN-ACK; ISNs differ, the rewriter has not learned yet.
    c.handle_primary(t(1), seg_ext(ISN, 101, SYN | ACK, 1, 64240, &mss_ws, b""))
        .unwrap();
    assert!(drain(&mut c).released.is_empty());
    c.handle_secondary(
        t(1),
        seg_ext(
            0x1234,
            101,
            SYN | ACK,
            9,
            65160,
            &[2, 4, 5, 0x80, 1, 3, 3, 9],
            b"",
        ),
    );
    let d = drain(&mut c);
    assert_eq!(d.released.len(), 1, "{d:?}");
    assert!(d.checkpoints.is_empty());
    // Data acknowledging client bytes the SVM has not acknowledged yet waits for the SVM's ACK.
    c.handle_primary(t(2), seg(ISN.wrapping_add(1), 151, DATA, b"hello"))
        .unwrap();
    c.handle_secondary(t(2), seg(ISN.wrapping_add(1), 121, DATA, b"hello"));
    assert!(drain(&mut c).released.is_empty());
    c.handle_secondary(t(3), seg(ISN.wrapping_add(6), 151, ACK, b""));
    let d = drain(&mut c);
    assert_eq!(d.released.len(), 1);
    assert_eq!(d.dropped.len(), 1);
    // A different set of SYN options is a mismatch.
    let mut c = cmp();
    c.handle_primary(t(1), seg_ext(ISN, 101, SYN | ACK, 1, 64240, &mss_ws, b""))
        .unwrap();
    c.handle_secondary(
        t(1),
        seg_ext(0x1234, 101, SYN | ACK, 1, 64240, &[2, 4, 5, 0xb4], b""),
    );
    let d = drain(&mut c);
    assert_eq!(
        d.checkpoints,
        vec![CheckpointReason::Mismatch {
            flow: flow(),
            offset: 0,
            kind: MismatchKind::Syn
        }]
    );
}

#[test]
fn retransmissions_are_recognised_on_both_sides() {
    let mut c = cmp();
    c.handle_primary(t(1), seg(10, 1, DATA, b"abcdef")).unwrap();
    c.handle_secondary(t(1), seg(10, 1, DATA, b"abcdef"));
    assert_eq!(drain(&mut c).released.len(), 1);
    // Whole retransmissions pass at once; a partial overlap is compared from the new bytes on.
    c.handle_primary(t(2), seg(10, 1, DATA, b"abcdef")).unwrap();
    c.handle_secondary(t(2), seg(12, 1, DATA, b"cdef"));
    let d = drain(&mut c);
    assert_eq!((d.released.len(), d.dropped.len()), (1, 1));
    c.handle_primary(t(3), seg(14, 1, DATA, b"efGH")).unwrap();
    c.handle_secondary(t(3), seg(10, 1, DATA, b"abcdefGH"));
    let d = drain(&mut c);
    assert_eq!(
        (d.released.len(), d.dropped.len(), d.checkpoints.len()),
        (1, 1, 0)
    );
    assert_eq!(c.stats().retransmissions, 2);
    c.handle_primary(t(4), seg(14, 1, DATA, b"efGX")).unwrap();
    assert_eq!(
        drain(&mut c).released.len(),
        1,
        "bytes below the compared position are not re-checked"
    );
}

#[test]
fn fin_and_rst_are_paired_without_payload_compare() {
    let mut c = cmp();
    c.handle_primary(t(1), seg(1, 1, DATA | FIN, b"bye")).unwrap();
    c.handle_secondary(t(1), seg(1, 1, DATA, b"bye"));
    assert!(drain(&mut c).released.is_empty(), "FIN waits for the SVM's FIN");
    c.handle_secondary(t(2), seg(4, 1, ACK | FIN, b""));
    assert_eq!(drain(&mut c).released.len(), 1);
    // RST: any RST from the SVM on the flow.
    c.handle_primary(t(3), seg(5, 1, RST | ACK, b"")).unwrap();
    assert!(drain(&mut c).released.is_empty());
    c.handle_secondary(t(3), seg(999, 0, RST, b""));
    assert_eq!(drain(&mut c).released.len(), 1);
    // The SVM ending its stream where the PVM sends more is a mismatch.
    let mut c = cmp();
    c.handle_secondary(t(1), seg(1, 1, ACK | FIN, b"ab"));
    c.handle_primary(t(1), seg(1, 1, DATA, b"abc")).unwrap();
    let d = drain(&mut c);
    assert!(matches!(
        d.checkpoints[..],
        [CheckpointReason::Mismatch {
            offset: 2,
            kind: MismatchKind::Fin,
            ..
        }]
    ));
}

#[test]
fn udp_ignores_ttl_id_and_checksum_but_not_payload() {
    let mut c = cmp();
    let a = build::udp(GUEST, CLIENT, 1, b"datagram");
    let mut b = build::udp(GUEST, CLIENT, 2, b"datagram");
    b[22] = 63; // TTL
    b[24] ^= 0xff; // IP checksum
    b[40] ^= 0x55; // UDP checksum
    c.handle_primary(t(1), Bytes::from(a.clone())).unwrap();
    c.handle_secondary(t(1), Bytes::from(b));
    let d = drain(&mut c);
    assert_eq!((d.released.len(), d.checkpoints.len()), (1, 0));
    // Reordered pairs still match.
    let x = Bytes::from(build::udp(GUEST, CLIENT, 3, b"one"));
    let y = Bytes::from(build::udp(GUEST, CLIENT, 4, b"two"));
    c.handle_secondary(t(2), y.clone());
    c.handle_primary(t(2), x.clone()).unwrap();
    c.handle_primary(t(2), y.clone()).unwrap();
    c.handle_secondary(t(2), x.clone());
    let d = drain(&mut c);
    assert_eq!(d.released, vec![x, y]);
    // A payload difference is a mismatch at its offset in the IP packet (20 IP + 8 UDP + 3); with the
    // default window it is reported once the window is full, with a window of 1 at once.
    let mut c = Comparator::new(
        Config {
            datagram_window: 1,
            ..Config::default()
        },
        Time::ZERO,
    )
    .unwrap();
    c.handle_primary(t(3), Bytes::from(build::udp(GUEST, CLIENT, 5, b"abcdef")))
        .unwrap();
    c.handle_secondary(t(3), Bytes::from(build::udp(GUEST, CLIENT, 5, b"abcXef")));
    let d = drain(&mut c);
    assert!(matches!(
        d.checkpoints[..],
        [CheckpointReason::Mismatch {
            offset: 31,
            kind: MismatchKind::Datagram,
            ..
        }]
    ));
}

#[test]
fn malformed_and_non_ip_frames_pass_or_drop_and_are_counted() {
    let mut c = cmp();
    let good = seg(1, 1, DATA, b"xyz");
    let truncated = good.slice(..good.len() - 10);
    let runt = Bytes::from_static(&[1, 2, 3]);
    let mut arp = vec![0xff; 12];
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    for f in [truncated.clone(), runt.clone(), Bytes::from(arp.clone())] {
        c.handle_primary(t(1), f.clone()).unwrap();
        c.handle_secondary(t(1), f);
    }
    let d = drain(&mut c);
    assert_eq!(d.released.len(), 3);
    assert_eq!(d.dropped.len(), 3);
    let s = c.stats();
    assert_eq!((s.primary_malformed, s.primary_unsupported), (2, 1));
    assert_eq!((s.secondary_malformed, s.secondary_unsupported), (2, 1));
    // Every truncation of a valid frame is handled without panic.
    for cut in 0..good.len() {
        c.handle_primary(t(2), good.slice(..cut)).unwrap();
        c.handle_secondary(t(2), good.slice(..cut));
    }
}

#[test]
fn stale_frames_request_a_checkpoint_after_the_timeout() {
    let cfg = Config {
        compare_timeout: Duration::from_millis(300),
        scan_interval: Duration::from_millis(100),
        ..Config::default()
    };
    let mut c = Comparator::new(cfg, Time::ZERO).unwrap();
    c.handle_primary(t(10), seg(1, 1, DATA, b"lonely")).unwrap();
    assert_eq!(c.poll_timeout(), t(100));
    c.handle_tick(t(100));
    c.handle_tick(t(200));
    assert!(drain(&mut c).checkpoints.is_empty());
    c.handle_tick(t(320));
    let d = drain(&mut c);
    assert_eq!(
        d.checkpoints,
        vec![CheckpointReason::Stale {
            flow: flow(),
            age: Duration::from_millis(310),
            side: Side::Primary
        }]
    );
    c.checkpoint(t(330));
    assert_eq!(drain(&mut c).released.len(), 1);
}

#[test]
fn full_table_evicts_the_oldest_idle_flow_through_a_checkpoint() {
    let cfg = Config {
        max_connections: 2,
        ..Config::default()
    };
    let mut c = Comparator::new(cfg, Time::ZERO).unwrap();
    let on_port = |port: u16, ms: u64, c: &mut Comparator| {
        let mut g = GUEST;
        g.port = port;
        let f = Bytes::from(build::udp(g, CLIENT, 0, b"x"));
        c.handle_primary(t(ms), f.clone()).unwrap();
        c.handle_secondary(t(ms), f);
    };
    on_port(1, 1, &mut c);
    on_port(2, 2, &mut c);
    assert!(drain(&mut c).checkpoints.is_empty());
    on_port(3, 3, &mut c);
    let d = drain(&mut c);
    assert!(
        matches!(d.checkpoints[..], [CheckpointReason::TableFull { evicted: Some(k) }] if k.src_port == 1)
    );
    assert_eq!(d.released.len(), 1);
    // With no idle flow, the new flow's primary frame is handed back.
    let mut g = GUEST;
    g.port = 9;
    c.checkpoint(t(4));
    drain(&mut c);
    c.handle_primary(t(5), seg(1, 1, DATA, b"a")).unwrap();
    let mut s = c.handle_primary(t(5), Bytes::from(build::udp(g, CLIENT, 0, b"held")));
    assert!(s.is_ok(), "one idle flow (port 3) can still be evicted");
    g.port = 10;
    s = c.handle_primary(t(6), Bytes::from(build::udp(g, CLIENT, 0, b"refused")));
    assert!(s.is_err());
}

#[test]
fn full_queue_hands_the_primary_frame_back_and_drops_the_secondary() {
    let cfg = Config {
        max_queued_per_flow: 2,
        ..Config::default()
    };
    let mut c = Comparator::new(cfg, Time::ZERO).unwrap();
    c.handle_primary(t(1), seg(1, 1, DATA, b"a")).unwrap();
    c.handle_primary(t(1), seg(2, 1, DATA, b"b")).unwrap();
    let back = c.handle_primary(t(1), seg(3, 1, DATA, b"c")).unwrap_err();
    assert_eq!(back.0, seg(3, 1, DATA, b"c"));
    let d = drain(&mut c);
    assert!(matches!(
        d.checkpoints[..],
        [CheckpointReason::QueueFull {
            side: Side::Primary,
            ..
        }]
    ));
    c.handle_secondary(t(1), seg(5, 1, DATA, b"x"));
    c.handle_secondary(t(1), seg(6, 1, DATA, b"y"));
    c.handle_secondary(t(1), seg(7, 1, DATA, b"z"));
    let d = drain(&mut c);
    assert_eq!(d.dropped.len(), 1);
    assert_eq!(c.stats().secondary_overflow, 1);
    assert_eq!(c.flow_queued(&flow()), Some((2, 2)));
}

#[test]
fn config_is_validated() {
    let bad = Config {
        max_connections: 0,
        ..Config::default()
    };
    assert!(Comparator::new(bad, Time::ZERO).is_err());
    let bad = Config {
        compare_timeout: Duration::ZERO,
        ..Config::default()
    };
    assert!(Comparator::new(bad, Time::ZERO).is_err());
}
