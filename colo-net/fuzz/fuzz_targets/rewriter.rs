//! Frames in both directions: the rewriter never panics and hands every client frame out exactly once.
#![no_main]

use bytes::BytesMut;
use colo_net::{Rewriter, RewriterConfig, Time};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut r) = Rewriter::new(RewriterConfig::default()) else {
        return;
    };
    let (mut fed, mut out) = (0u64, 0u64);
    let mut rest = data;
    let mut now = 0;
    while let [op, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (frame, next) = tail.split_at(n);
        rest = next;
        now += u64::from(op >> 2);
        let t = Time::from_millis(now);
        // Well-formed segments built from the input for most ops, raw bytes otherwise.
        let built = |from_client: bool| -> Vec<u8> {
            match frame {
                [a, b, c, flags, payload @ ..] if op & 0x80 != 0 => {
                    let (g, cl) = (colo_net::build::BENCH_GUEST, colo_net::build::BENCH_CLIENT);
                    let seq = u32::from(u16::from_be_bytes([*a, *b]));
                    let ack = u32::from(*c) << 8;
                    let (src, dst) = if from_client { (cl, g) } else { (g, cl) };
                    let mut spec = colo_net::build::TcpSpec::data(src, dst, seq, ack, payload);
                    spec.flags = *flags;
                    colo_net::build::tcp(&spec)
                }
                _ => frame.to_vec(),
            }
        };
        match op & 3 {
            0 => {
                fed += 1;
                r.client_input(t, BytesMut::from(&built(true)[..]));
            }
            1 => {
                let mut f = built(false);
                r.secondary_output(t, &mut f);
            }
            2 => r.expire(t),
            _ => r.checkpoint(),
        }
        while r.poll_input().is_some() {
            out += 1;
        }
    }
    r.checkpoint();
    while r.poll_input().is_some() {
        out += 1;
    }
    assert_eq!(out, fed + r.stats().synthetic_acks);
});
