//! Property tests of the comparator against simple models: the byte stream the two sides carry decides,
//! not how it is cut; every frame is accounted for exactly once; queues stay within their bounds.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use colo_net::build::{self, Endpoint};
use colo_net::packet::tcp_flags::*;
use colo_net::{Action, CheckpointReason, Comparator, Config, MismatchKind, Time};
use common::*;
use proptest::prelude::*;

/// Cuts `len` bytes at the given (unsorted, possibly repeated) points.
fn cuts(len: usize, points: &[usize]) -> Vec<(usize, usize)> {
    let mut p: Vec<usize> = points.iter().map(|x| x % (len + 1)).collect();
    p.push(0);
    p.push(len);
    p.sort_unstable();
    p.dedup();
    p.windows(2).map(|w| (w[0], w[1])).collect()
}

fn segments(isn: u32, data: &[u8], points: &[usize]) -> Vec<Bytes> {
    cuts(data.len(), points)
        .into_iter()
        .map(|(a, b)| seg(isn.wrapping_add(a as u32), 1, DATA, &data[a..b]))
        .collect()
}

/// Feeds both sides, interleaved by `order` (true: next primary frame), and returns the actions.
fn run(c: &mut Comparator, p: &[Bytes], s: &[Bytes], order: &[bool]) -> Drained {
    let (mut i, mut j) = (0, 0);
    let mut k = 0;
    while i < p.len() || j < s.len() {
        let take_p = j >= s.len() || (i < p.len() && order.get(k).copied().unwrap_or(true));
        k += 1;
        if take_p {
            c.handle_primary(Time::from_millis(1), p[i].clone()).unwrap();
            i += 1;
        } else {
            c.handle_secondary(Time::from_millis(1), s[j].clone());
            j += 1;
        }
    }
    drain(c)
}

fn stream_case() -> impl Strategy<Value = (Vec<u8>, Vec<usize>, Vec<usize>, Vec<bool>, u32)> {
    (
        proptest::collection::vec(any::<u8>(), 1..3000),
        proptest::collection::vec(any::<usize>(), 0..12),
        proptest::collection::vec(any::<usize>(), 0..12),
        proptest::collection::vec(any::<bool>(), 0..40),
        any::<u32>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn any_segmentation_of_the_same_stream_matches((data, pc, sc, order, isn) in stream_case(), retrans in any::<Option<usize>>()) {
        let mut c = Comparator::new(Config::default(), Time::ZERO).unwrap();
        let p = segments(isn, &data, &pc);
        let mut s = segments(isn, &data, &sc);
        // A retransmission of an earlier secondary segment, after it.
        if let Some(r) = retrans {
            let r = r % s.len();
            s.push(s[r].clone());
        }
        let d = run(&mut c, &p, &s, &order);
        prop_assert!(d.checkpoints.is_empty(), "{:?}", d.checkpoints);
        prop_assert_eq!(d.released, p);
        prop_assert_eq!(d.dropped.len(), s.len());
        prop_assert_eq!(c.queued(), (0, 0));
        prop_assert_eq!(c.stats().tcp_bytes_compared, data.len() as u64);
    }

    #[test]
    fn a_single_different_byte_always_requests_a_checkpoint((data, pc, sc, order, isn) in stream_case(), at in any::<usize>(), flip in 1u8..=255) {
        let mut c = Comparator::new(Config::default(), Time::ZERO).unwrap();
        let at = at % data.len();
        let mut other = data.clone();
        other[at] ^= flip;
        let p = segments(isn, &data, &pc);
        let s = segments(isn, &other, &sc);
        let d = run(&mut c, &p, &s, &order);
        prop_assert_eq!(
            d.checkpoints,
            vec![CheckpointReason::Mismatch { flow: colo_net::FlowKey::of(&colo_net::PacketView::parse(&p[0], 0).unwrap()), offset: at as u64, kind: MismatchKind::Payload }]
        );
        // Nothing at or after the differing byte left before the checkpoint.
        let released: usize = d.released.len();
        let covering = cuts(data.len(), &pc).iter().position(|&(a, b)| a <= at && at < b).unwrap();
        prop_assert!(released <= covering);
        c.checkpoint(Time::from_millis(2));
        let after = drain(&mut c);
        prop_assert_eq!(released + after.released.len(), p.len());
        prop_assert_eq!(d.dropped.len() + after.dropped.len(), s.len());
    }
}

#[derive(Debug, Clone)]
enum Op {
    Primary { flow: u8, kind: u8, len: u16 },
    Secondary { flow: u8, kind: u8, len: u16 },
    Tick(u16),
    Checkpoint,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..6, 0u8..4, 0u16..200).prop_map(|(flow, kind, len)| Op::Primary { flow, kind, len }),
        4 => (0u8..6, 0u8..4, 0u16..200).prop_map(|(flow, kind, len)| Op::Secondary { flow, kind, len }),
        1 => (0u16..2000).prop_map(Op::Tick),
        1 => Just(Op::Checkpoint),
    ]
}

/// A frame for the random walk: TCP with a shared byte pattern (so some match), UDP, garbage.
fn frame(flow: u8, kind: u8, len: u16, seqs: &mut HashMap<(bool, u8), u32>, secondary: bool) -> Bytes {
    let mut g: Endpoint = GUEST;
    g.port = 1000 + u16::from(flow);
    let payload: Vec<u8> = (0..len).map(|i| (i % 7) as u8).collect();
    match kind {
        0 | 1 => {
            let seq = seqs.entry((secondary, flow)).or_insert(1);
            let f = build::tcp(&build::TcpSpec::data(g, CLIENT, *seq, 1, &payload));
            *seq = seq.wrapping_add(u32::from(len));
            Bytes::from(f)
        }
        2 => Bytes::from(build::udp(g, CLIENT, 0, &payload)),
        _ => Bytes::from(payload),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn every_frame_is_accounted_once_and_queues_stay_bounded(ops in proptest::collection::vec(op(), 1..200)) {
        let cfg = Config {
            max_connections: 4,
            max_queued_per_flow: 5,
            max_queued_total: 12,
            compare_timeout: Duration::from_millis(500),
            scan_interval: Duration::from_millis(100),
            ..Config::default()
        };
        let mut c = Comparator::new(cfg, Time::ZERO).unwrap();
        let mut now = 0u64;
        let mut seqs = HashMap::new();
        // frame pointer -> (is primary, times seen in an outcome)
        let mut fate: HashMap<usize, (bool, u32)> = HashMap::new();
        let mut keep = Vec::new();
        let mut outstanding_request = false;
        let mut flows = std::collections::HashSet::new();
        let account = |c: &mut Comparator, fate: &mut HashMap<usize, (bool, u32)>, outstanding: &mut bool| -> Result<(), TestCaseError> {
            while let Some(a) = c.poll_action() {
                match a {
                    Action::Release(f) => {
                        let e = fate.get_mut(&(f.as_ptr() as usize)).unwrap();
                        prop_assert!(e.0, "released a secondary frame");
                        e.1 += 1;
                    }
                    Action::DropSecondary(f) => {
                        let e = fate.get_mut(&(f.as_ptr() as usize)).unwrap();
                        prop_assert!(!e.0, "dropped a primary frame");
                        e.1 += 1;
                    }
                    Action::RequestCheckpoint(_) => {
                        prop_assert!(!*outstanding, "request repeated before the checkpoint");
                        *outstanding = true;
                    }
                }
            }
            Ok(())
        };
        for o in ops {
            now += 7;
            let t = Time::from_millis(now);
            match o {
                Op::Primary { flow, kind, len } => {
                    let f = frame(flow, kind, len, &mut seqs, false);
                    if let Ok(v) = colo_net::PacketView::parse(&f, 0) {
                        flows.insert(colo_net::FlowKey::of(&v));
                    }
                    fate.insert(f.as_ptr() as usize, (true, 0));
                    keep.push(f.clone());
                    if let Err(back) = c.handle_primary(t, f) {
                        // Handed back: counts as its one outcome.
                        fate.get_mut(&(back.0.as_ptr() as usize)).unwrap().1 += 1;
                    }
                }
                Op::Secondary { flow, kind, len } => {
                    let f = frame(flow, kind, len, &mut seqs, true);
                    if let Ok(v) = colo_net::PacketView::parse(&f, 0) {
                        flows.insert(colo_net::FlowKey::of(&v));
                    }
                    fate.insert(f.as_ptr() as usize, (false, 0));
                    keep.push(f.clone());
                    c.handle_secondary(t, f);
                }
                Op::Tick(ms) => {
                    now += u64::from(ms);
                    c.handle_tick(Time::from_millis(now));
                }
                Op::Checkpoint => {
                    c.checkpoint(t);
                    outstanding_request = false;
                }
            }
            account(&mut c, &mut fate, &mut outstanding_request)?;
            let (p, s) = c.queued();
            prop_assert!(p + s <= 12, "total queue {} over bound", p + s);
            prop_assert!(c.connections() <= 4);
            for f in &flows {
                if let Some((p, s)) = c.flow_queued(f) {
                    prop_assert!(p <= 5 && s <= 5, "flow queue ({}, {}) over bound", p, s);
                }
            }
            prop_assert_eq!(c.stats().queued as usize, p + s);
        }
        c.checkpoint(Time::from_millis(now + 1));
        account(&mut c, &mut fate, &mut outstanding_request)?;
        for (_, (_, n)) in fate {
            prop_assert_eq!(n, 1, "a frame was lost or handled twice");
        }
    }
}

#[test]
fn per_flow_bound_holds_under_a_flood() {
    let cfg = Config {
        max_queued_per_flow: 3,
        ..Config::default()
    };
    let mut c = Comparator::new(cfg, Time::ZERO).unwrap();
    let mut refused = 0;
    for i in 0..10u32 {
        if c.handle_primary(Time::ZERO, seg(1 + i, 1, DATA, b"x")).is_err() {
            refused += 1;
        }
        c.handle_secondary(Time::ZERO, seg(100 + i, 1, DATA, b"y"));
        let (p, s) = c.queued();
        assert!(p <= 3 && s <= 3);
    }
    assert_eq!(refused, 7);
    let _ = SYN;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Mutated and truncated TCP frames in both directions never make the rewriter panic, and every client
    /// frame it takes comes out again exactly once (after a checkpoint at the latest).
    #[test]
    fn rewriter_survives_garbage_and_loses_no_client_frame(
        frames in proptest::collection::vec(
            (any::<bool>(), any::<u32>(), any::<u32>(), any::<u8>(), proptest::collection::vec((0usize..70, any::<u8>()), 0..3), any::<Option<u8>>()),
            1..60,
        ),
    ) {
        let mut r = colo_net::Rewriter::new(colo_net::RewriterConfig::default()).unwrap();
        let (mut fed, mut out) = (0usize, 0usize);
        for (i, (from_client, seq, ack, flags, edits, cut)) in frames.into_iter().enumerate() {
            let mut f = if from_client {
                client_seg(seq % 64, ack % 64, flags, &[], &[1, 2, 3])
            } else {
                seg(seq % 64, ack % 64, flags, &[1, 2, 3]).to_vec()
            };
            for (at, b) in edits {
                if let Some(x) = f.get_mut(at) {
                    *x = b;
                }
            }
            if let Some(c) = cut {
                f.truncate(usize::from(c) % (f.len() + 1));
            }
            let now = Time::from_millis(i as u64);
            if from_client {
                fed += 1;
                r.client_input(now, bytes::BytesMut::from(&f[..]));
            } else {
                r.secondary_output(now, &mut f);
            }
            while let Some(x) = r.poll_input() {
                // Synthetic acknowledgments are extra frames; count only those built from client frames.
                out += 1;
                let _ = x;
            }
        }
        r.checkpoint();
        while r.poll_input().is_some() {
            out += 1;
        }
        prop_assert!(out >= fed, "client frames lost: fed {} out {}", fed, out);
        prop_assert_eq!(out - fed, r.stats().synthetic_acks as usize);
    }
}
