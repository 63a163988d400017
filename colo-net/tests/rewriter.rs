//! The secondary's rewriter: offsets learned for client- and guest-opened connections, checksums kept
//! valid, SACK blocks translated, reset at checkpoint, kept in failover.

mod common;

use bytes::Bytes;
use colo_net::packet::tcp_flags::*;
use colo_net::rewriter::{Mode, Rewrite};
use colo_net::{Comparator, Config, FlowKey, PacketView, Rewriter, RewriterConfig, Time};
use common::*;

fn rw() -> Rewriter {
    Rewriter::new(RewriterConfig::default()).unwrap()
}

fn now() -> Time {
    Time::from_millis(1)
}

/// Runs a client frame through the rewriter; the frame becomes what the SVM would receive (if released).
fn input(r: &mut Rewriter, f: &mut Vec<u8>) -> Rewrite {
    let v = r.client_input(now(), bytes::BytesMut::from(&f[..]));
    if v != Rewrite::Held {
        *f = r
            .poll_input()
            .expect("a frame that is not held is ready")
            .to_vec();
        assert!(r.poll_input().is_none());
    }
    v
}

fn seq_of(f: &[u8]) -> (u32, u32) {
    let v = PacketView::parse(f, 0).unwrap();
    let t = v.tcp().unwrap();
    (t.seq, t.ack)
}

const P_ISN: u32 = 0x1000_0000;
const S_ISN: u32 = 0xfff0_0000; // the offset wraps
const C_ISN: u32 = 777;

#[test]
fn client_opened_connection_is_translated_both_ways() {
    let mut r = rw();
    // The client's SYN is mirrored unchanged; the connection is now expected.
    let mut syn = client_seg(C_ISN, 0, SYN, &[], b"");
    assert_eq!(input(&mut r, &mut syn), Rewrite::Unchanged);
    // The SVM answers with its own ISN.
    let mut synack = seg(S_ISN, C_ISN + 1, SYN | ACK, b"").to_vec();
    assert_eq!(r.secondary_output(now(), &mut synack), Rewrite::Unchanged);
    // The client's ACK acknowledges the PVM's SYN: offset learned, ack moved into the SVM's space.
    let mut ack = client_seg(C_ISN + 1, P_ISN + 1, ACK, &[], b"GET /");
    assert_eq!(input(&mut r, &mut ack), Rewrite::Translated);
    assert_eq!(seq_of(&ack), (C_ISN + 1, S_ISN + 1));
    assert!(tcp_checksum_ok(&ack));
    let flow = FlowKey::of(&PacketView::parse(&synack, 0).unwrap());
    assert_eq!(r.offset(&flow), Some(S_ISN.wrapping_sub(P_ISN)));
    // The SVM's data comes out in the PVM's space, checksum intact.
    let mut data = seg(S_ISN + 1, C_ISN + 6, DATA, b"200 OK").to_vec();
    assert_eq!(r.secondary_output(now(), &mut data), Rewrite::Translated);
    assert_eq!(seq_of(&data), (P_ISN + 1, C_ISN + 6));
    assert!(tcp_checksum_ok(&data));
    // SACK blocks from the client acknowledge guest bytes: translated too.
    let sack = [1, 1, 5, 10, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut s = sack;
    s[4..8].copy_from_slice(&(P_ISN + 100).to_be_bytes());
    s[8..12].copy_from_slice(&(P_ISN + 200).to_be_bytes());
    let mut f = client_seg(C_ISN + 6, P_ISN + 7, ACK, &s, b"");
    assert_eq!(input(&mut r, &mut f), Rewrite::Translated);
    let v = PacketView::parse(&f, 0).unwrap();
    let o = v.tcp_options();
    assert_eq!(u32::from_be_bytes(o[4..8].try_into().unwrap()), S_ISN + 100);
    assert_eq!(u32::from_be_bytes(o[8..12].try_into().unwrap()), S_ISN + 200);
    assert!(tcp_checksum_ok(&f));
}

#[test]
fn guest_opened_connection_is_translated_from_the_clients_syn_ack() {
    let mut r = rw();
    let mut syn = seg(S_ISN, 0, SYN, b"").to_vec();
    assert_eq!(r.secondary_output(now(), &mut syn), Rewrite::Unchanged);
    // The client answers the PVM's SYN; the SVM must see an acknowledgment of its own.
    let mut synack = client_seg(C_ISN, P_ISN + 1, SYN | ACK, &[], b"");
    assert_eq!(input(&mut r, &mut synack), Rewrite::Translated);
    assert_eq!(seq_of(&synack), (C_ISN, S_ISN + 1));
    assert!(tcp_checksum_ok(&synack));
    let mut ack = seg(S_ISN + 1, C_ISN + 1, ACK, b"").to_vec();
    assert_eq!(r.secondary_output(now(), &mut ack), Rewrite::Translated);
    assert_eq!(seq_of(&ack), (P_ISN + 1, C_ISN + 1));
}

#[test]
fn client_frames_that_overtake_the_svms_syn_ack_are_held_then_translated() {
    let mut r = rw();
    let mut syn = client_seg(C_ISN, 0, SYN, &[], b"");
    input(&mut r, &mut syn);
    let mut ack = client_seg(C_ISN + 1, P_ISN + 1, ACK, &[], b"");
    let mut req = client_seg(C_ISN + 1, P_ISN + 1, DATA, &[], b"GET /");
    assert_eq!(input(&mut r, &mut ack), Rewrite::Held);
    assert_eq!(input(&mut r, &mut req), Rewrite::Held);
    assert!(r.poll_input().is_none());
    let mut synack = seg(S_ISN, C_ISN + 1, SYN | ACK, b"").to_vec();
    r.secondary_output(now(), &mut synack);
    let out: Vec<_> = std::iter::from_fn(|| r.poll_input()).collect();
    assert_eq!(out.len(), 2);
    assert_eq!(seq_of(&out[0]), (C_ISN + 1, S_ISN + 1));
    assert_eq!(seq_of(&out[1]), (C_ISN + 1, S_ISN + 1));
    assert!(out.iter().all(|f| tcp_checksum_ok(f)));
    assert_eq!(PacketView::parse(&out[1], 0).unwrap().tcp_payload(), b"GET /");
    // Without an answer from the SVM, held frames go on untranslated after the hold timeout.
    let mut r = rw();
    let mut syn = client_seg(C_ISN, 0, SYN, &[], b"");
    input(&mut r, &mut syn);
    let mut ack = client_seg(C_ISN + 1, P_ISN + 1, ACK, &[], b"");
    assert_eq!(input(&mut r, &mut ack), Rewrite::Held);
    r.expire(Time::from_millis(100));
    assert!(r.poll_input().is_none());
    r.expire(Time::from_millis(1000));
    assert_eq!(r.poll_input().map(|f| seq_of(&f)), Some((C_ISN + 1, P_ISN + 1)));
    assert_eq!(r.stats().held_released_early, 1);
}

#[test]
fn primary_isn_seam_translates_the_svms_first_segment() {
    let mut r = rw();
    let flow = FlowKey::of(&PacketView::parse(&seg(0, 0, SYN, b""), 0).unwrap());
    r.set_primary_isn(now(), flow, P_ISN);
    let mut syn = seg(S_ISN, 0, SYN, b"").to_vec();
    assert_eq!(r.secondary_output(now(), &mut syn), Rewrite::Translated);
    assert_eq!(seq_of(&syn).0, P_ISN);
}

#[test]
fn checkpoint_resets_and_failover_keeps_offsets() {
    let mut r = rw();
    let mut syn = seg(S_ISN, 0, SYN, b"").to_vec();
    r.secondary_output(now(), &mut syn);
    let mut synack = client_seg(C_ISN, P_ISN + 1, SYN | ACK, &[], b"");
    input(&mut r, &mut synack);
    r.failover();
    assert_eq!(r.mode(), Mode::Failover);
    let mut d = seg(S_ISN + 1, C_ISN + 1, DATA, b"x").to_vec();
    assert_eq!(r.secondary_output(now(), &mut d), Rewrite::Translated);
    // A connection opened after failover has no PVM twin: not tracked.
    let mut other = seg(5, 0, SYN, b"").to_vec();
    other[34] ^= 1; // another source port
    assert_eq!(r.secondary_output(now(), &mut other), Rewrite::Untracked);
    r.checkpoint();
    let mut d = seg(S_ISN + 2, C_ISN + 1, DATA, b"y").to_vec();
    assert_eq!(r.secondary_output(now(), &mut d), Rewrite::Untracked);
}

#[test]
fn malformed_frames_are_reported_not_touched() {
    let mut r = rw();
    let good = seg(1, 1, DATA, b"abc").to_vec();
    for cut in 0..good.len() {
        let mut f = good[..cut].to_vec();
        let before = f.clone();
        let _ = r.secondary_output(now(), &mut f);
        let _ = input(&mut r, &mut f);
        assert_eq!(f, before);
    }
}

/// Two simulated TCP senders with different ISNs, IP ids, windows and segmentation, through the rewriter
/// into the comparator: no checkpoint, every primary frame released.
#[test]
fn end_to_end_different_isns_and_segmentation_match() {
    let mut c = Comparator::new(Config::default(), Time::ZERO).unwrap();
    let mut r = rw();
    let body: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let mss_ts = [2, 4, 5, 0xb4, 1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0];
    // Handshake, client-opened.
    let mut cin = client_seg(C_ISN, 0, SYN, &[], b"");
    input(&mut r, &mut cin);
    c.handle_primary(now(), seg_ext(P_ISN, C_ISN + 1, SYN | ACK, 1, 1000, &mss_ts, b""))
        .unwrap();
    let mut s = seg_ext(S_ISN, C_ISN + 1, SYN | ACK, 99, 2000, &mss_ts, b"").to_vec();
    r.secondary_output(now(), &mut s);
    c.handle_secondary(now(), Bytes::from(s));
    let mut cin = client_seg(C_ISN + 1, P_ISN + 1, ACK, &[], b"");
    input(&mut r, &mut cin);
    let mut released = drain(&mut c).released.len();
    // The PVM sends 1448-byte segments, the SVM 1000-byte ones.
    let mut id = 2;
    for (size, side) in [(1448usize, 0), (1000, 1)] {
        for (i, chunk) in body.chunks(size).enumerate() {
            let seq = (if side == 0 { P_ISN } else { S_ISN }).wrapping_add(1 + (i * size) as u32);
            id += 1;
            let f = seg_ext(seq, C_ISN + 1, DATA, id, 500 + side, &[], chunk);
            if side == 0 {
                c.handle_primary(now(), f).unwrap();
            } else {
                let mut f = f.to_vec();
                assert_eq!(r.secondary_output(now(), &mut f), Rewrite::Translated);
                c.handle_secondary(now(), Bytes::from(f));
            }
        }
    }
    let d = drain(&mut c);
    released += d.released.len();
    assert!(d.checkpoints.is_empty(), "{:?}", d.checkpoints);
    assert_eq!(released, 1 + body.len().div_ceil(1448));
    assert_eq!(c.queued(), (0, 0));
}

/// The client acknowledges PVM bytes the lagging SVM has not sent: the SVM is told only what it sent,
/// and the rest once it sends it (a pure ACK built from the client's headers).
#[test]
fn acks_of_bytes_the_svm_has_not_sent_are_capped_then_completed() {
    let mut r = rw();
    let mut syn = seg(S_ISN, 0, SYN, b"").to_vec();
    r.secondary_output(now(), &mut syn);
    let mut synack = client_seg(
        C_ISN,
        P_ISN + 1,
        SYN | ACK,
        &[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3],
        b"",
    );
    input(&mut r, &mut synack);
    // The SVM has sent 100 bytes; the client has already acknowledged 300 of the PVM's.
    let mut d = seg(S_ISN + 1, C_ISN + 1, DATA, &[1; 100]).to_vec();
    r.secondary_output(now(), &mut d);
    let mut ack = client_seg(
        C_ISN + 1,
        P_ISN + 301,
        ACK,
        &[1, 1, 8, 10, 0, 0, 0, 10, 0, 0, 0, 4],
        b"",
    );
    assert_eq!(input(&mut r, &mut ack), Rewrite::Translated);
    assert_eq!(seq_of(&ack), (C_ISN + 1, S_ISN + 101));
    assert!(tcp_checksum_ok(&ack));
    // The SVM sends 150 more: it gets an ACK for them, with the client's sequence number and options.
    let mut d = seg(S_ISN + 101, C_ISN + 1, DATA, &[1; 150]).to_vec();
    r.secondary_output(now(), &mut d);
    let synth = r.poll_input().expect("an acknowledgment for the SVM");
    assert_eq!(seq_of(&synth), (C_ISN + 1, S_ISN + 251));
    assert!(tcp_checksum_ok(&synth));
    let v = PacketView::parse(&synth, 0).unwrap();
    assert_eq!(v.tcp().unwrap().flags, ACK);
    assert!(v.tcp_payload().is_empty());
    assert_eq!(v.tcp_options(), &[1, 1, 8, 10, 0, 0, 0, 10, 0, 0, 0, 4]);
    // And the rest when it sends it; nothing beyond what the client acknowledged.
    let mut d = seg(S_ISN + 251, C_ISN + 1, DATA, &[1; 100]).to_vec();
    r.secondary_output(now(), &mut d);
    assert_eq!(r.poll_input().map(|f| seq_of(&f)), Some((C_ISN + 1, S_ISN + 301)));
    assert!(r.poll_input().is_none());
    assert_eq!(r.stats().synthetic_acks, 2);
}

#[test]
fn partial_checksums_are_left_alone() {
    let cfg = RewriterConfig {
        vnet_hdr_len: 10,
        ..RewriterConfig::default()
    };
    let mut r = Rewriter::new(cfg).unwrap();
    let with_hdr = |f: &[u8]| {
        let mut v = vec![
            colo_net::packet::VIRTIO_NET_HDR_F_NEEDS_CSUM,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        v.extend_from_slice(f);
        v
    };
    let mut syn = with_hdr(&seg(S_ISN, 0, SYN, b""));
    r.secondary_output(now(), &mut syn);
    let synack = with_hdr(&client_seg(C_ISN, P_ISN + 1, SYN | ACK, &[], b""));
    r.client_input(now(), bytes::BytesMut::from(&synack[..]));
    let out = r.poll_input().unwrap();
    let csum = |f: &[u8]| u16::from_be_bytes([f[10 + 14 + 20 + 16], f[10 + 14 + 20 + 17]]);
    assert_eq!(
        csum(&out),
        csum(&synack),
        "a partial checksum does not cover the ack field"
    );
    let v = PacketView::parse(&out, 10).unwrap();
    assert_eq!(v.tcp().unwrap().ack, S_ISN + 1);
}

fn ts_opt(val: u32, ecr: u32) -> [u8; 12] {
    let mut o = [1, 1, 8, 10, 0, 0, 0, 0, 0, 0, 0, 0];
    o[4..8].copy_from_slice(&val.to_be_bytes());
    o[8..12].copy_from_slice(&ecr.to_be_bytes());
    o
}

fn ts_of(f: &[u8]) -> (u32, u32) {
    let v = PacketView::parse(f, 0).unwrap();
    let o = v.tcp_options();
    (
        u32::from_be_bytes(o[4..8].try_into().unwrap()),
        u32::from_be_bytes(o[8..12].try_into().unwrap()),
    )
}

/// The client echoes the PVM's timestamps; the SVM gets them on its own clock (capped at what it sent),
/// and the SVM's timestamps go out on the PVM's clock.
#[test]
fn timestamps_are_translated_between_the_two_clocks() {
    let mut r = rw();
    let (p_ts, s_ts, c_ts) = (1_000_000u32, 5_000u32, 777u32);
    let mut syn = client_seg(C_ISN, 0, SYN, &ts_opt(c_ts, 0), b"");
    input(&mut r, &mut syn);
    assert_eq!(ts_of(&syn), (c_ts, 0), "a zero echo stays zero");
    let mut synack = seg_ext(S_ISN, C_ISN + 1, SYN | ACK, 0, 100, &ts_opt(s_ts, c_ts), b"").to_vec();
    r.secondary_output(now(), &mut synack);
    let mut ack = client_seg(C_ISN + 1, P_ISN + 1, ACK, &ts_opt(c_ts + 1, p_ts), b"");
    input(&mut r, &mut ack);
    assert_eq!(ts_of(&ack), (c_ts + 1, s_ts));
    assert!(tcp_checksum_ok(&ack));
    // SVM output: TSval onto the PVM's clock.
    let mut d = seg_ext(
        S_ISN + 1,
        C_ISN + 1,
        DATA,
        0,
        100,
        &ts_opt(s_ts + 10, c_ts + 1),
        b"data",
    )
    .to_vec();
    assert_eq!(r.secondary_output(now(), &mut d), Rewrite::Translated);
    assert_eq!(ts_of(&d), (p_ts + 10, c_ts + 1));
    assert!(tcp_checksum_ok(&d));
    // An echo of a PVM time the SVM has not reached yet is capped at the SVM's latest TSval.
    let mut late = client_seg(C_ISN + 1, P_ISN + 5, ACK, &ts_opt(c_ts + 2, p_ts + 50), b"");
    input(&mut r, &mut late);
    assert_eq!(ts_of(&late), (c_ts + 2, s_ts + 10));
}
