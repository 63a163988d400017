//! A byte-driven sequence of primary frames, secondary frames, ticks and checkpoints: no panic, queues
//! and the table within their bounds, every frame accounted exactly once.
#![no_main]

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use colo_net::{Action, Comparator, Config, Time};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cfg = Config {
        max_connections: 8,
        max_queued_per_flow: 6,
        max_queued_total: 20,
        compare_timeout: Duration::from_millis(50),
        scan_interval: Duration::from_millis(10),
        ..Config::default()
    };
    let Ok(mut c) = Comparator::new(cfg, Time::ZERO) else {
        return;
    };
    let mut fate: HashMap<usize, u32> = HashMap::new();
    let mut keep = Vec::new();
    let mut now = 0u64;
    let mut rest = data;
    while let [op, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (frame, next) = tail.split_at(n);
        rest = next;
        now += u64::from(op >> 4);
        let t = Time::from_millis(now);
        match op & 3 {
            0 | 1 => {
                // Half the frames are well-formed TCP/UDP built from the input (so the comparison code is
                // reached), the rest raw bytes.
                let f = match frame {
                    [k, a, b, flags, payload @ ..] if k & 0x80 != 0 => {
                        let seq = u32::from(u16::from_be_bytes([*a, *b]) % 4096);
                        let mut g = colo_net::build::BENCH_GUEST;
                        g.port = u16::from(k & 3);
                        if k & 0x40 != 0 {
                            Bytes::from(colo_net::build::udp(
                                g,
                                colo_net::build::BENCH_CLIENT,
                                seq as u16,
                                payload,
                            ))
                        } else {
                            let mut spec = colo_net::build::TcpSpec::data(
                                g,
                                colo_net::build::BENCH_CLIENT,
                                seq,
                                seq / 2,
                                payload,
                            );
                            spec.flags = *flags;
                            Bytes::from(colo_net::build::tcp(&spec))
                        }
                    }
                    _ => Bytes::copy_from_slice(frame),
                };
                fate.insert(f.as_ptr() as usize, 0);
                keep.push(f.clone());
                if op & 3 == 0 {
                    if let Err(back) = c.handle_primary(t, f) {
                        *fate.get_mut(&(back.0.as_ptr() as usize)).unwrap() += 1;
                    }
                } else {
                    c.handle_secondary(t, f);
                }
            }
            2 => c.handle_tick(t),
            _ => c.checkpoint(t),
        }
        while let Some(a) = c.poll_action() {
            if let Action::Release(f) | Action::DropSecondary(f) = a {
                *fate.get_mut(&(f.as_ptr() as usize)).unwrap() += 1;
            }
        }
        let (p, s) = c.queued();
        assert!(p + s <= 20 && c.connections() <= 8);
    }
    c.checkpoint(Time::from_millis(now + 1));
    while let Some(a) = c.poll_action() {
        if let Action::Release(f) | Action::DropSecondary(f) = a {
            *fate.get_mut(&(f.as_ptr() as usize)).unwrap() += 1;
        }
    }
    // Empty frames share one static pointer; skip them.
    for (ptr, n) in fate {
        if keep.iter().any(|k| k.as_ptr() as usize == ptr && !k.is_empty()) {
            assert_eq!(n, 1);
        }
    }
});
