//! Comparator throughput on one core, with a memcmp/memcpy reference measured in the same run.
//!
//! ```text
//! cargo run --release -p colo-net --example net_throughput -- [--json] [--seconds S]
//! ```
//! - `udp64_mpps`: pairs of 64-byte UDP frames (one from each VM, 64 flows) compared per second, millions.
//! - `tcp_gbps`: TCP payload compared and released per second, 1448-byte segments on both sides, Gbit/s.
//! - `tcp_resegmented_gbps`: the same stream cut into 1000-byte segments on the secondary side.
//! - `memcmp_gbps` / `memcpy_gbps`: the physical reference on 1448-byte chunks over the same working set
//!   as the TCP run; the ratios say how close the comparator gets to just touching the bytes.
//! - `memcmp64_mpps`: memcmp of the same 64-byte frame pairs, the floor for the UDP figure.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use colo_net::build::{tcp_segments, udp_pair};
use colo_net::{Action, Comparator, Config, Time};

fn drain(c: &mut Comparator) -> usize {
    let mut n = 0;
    while let Some(a) = c.poll_action() {
        if matches!(a, Action::RequestCheckpoint(_)) {
            eprintln!("unexpected checkpoint request: {a:?}");
        }
        n += 1;
    }
    n
}

/// Runs `f` repeatedly for about `budget`, returns the best rate of `units` per second.
fn best_rate(budget: Duration, units: f64, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut best = 0f64;
    while start.elapsed() < budget || best == 0.0 {
        let t = Instant::now();
        f();
        best = best.max(units / t.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let secs: f64 = std::env::args()
        .skip_while(|a| a != "--seconds")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let budget = Duration::from_secs_f64(secs);

    // UDP: 64 flows, 64-byte pairs.
    let pairs: Vec<(Bytes, Bytes)> = (0..64).map(|i| udp_pair(1000 + i)).collect();
    let mut cmp = Comparator::new(Config::default(), Time::ZERO).expect("default config");
    const UDP_ROUNDS: usize = 4096;
    let udp_pps = best_rate(budget, (UDP_ROUNDS * pairs.len()) as f64, || {
        let now = Time::from_millis(1);
        for _ in 0..UDP_ROUNDS {
            for (p, s) in &pairs {
                let _ = cmp.handle_primary(now, p.clone());
                cmp.handle_secondary(now, s.clone());
                drain(&mut cmp);
            }
        }
    });

    // TCP: 8 flows of 512 segments each, fresh comparator per pass so sequence numbers stay new.
    let data: Vec<u8> = (0..512 * 1448).map(|i| (i * 7 % 251) as u8).collect();
    let flows: Vec<(Vec<Bytes>, Vec<Bytes>, Vec<Bytes>)> = (0..8u16)
        .map(|f| {
            let isn = 0xffff_0000u32.wrapping_add(u32::from(f) * 7919);
            (
                tcp_segments(2000 + f, isn, 1, &data, 1448),
                tcp_segments(2000 + f, isn, 30000, &data, 1448),
                tcp_segments(2000 + f, isn, 30000, &data, 1000),
            )
        })
        .collect();
    let bytes_per_pass = (flows.len() * data.len()) as f64;
    let flows = &flows;
    let run_tcp = |resegmented: bool| {
        move || {
            let mut c = Comparator::new(Config::default(), Time::ZERO).expect("default config");
            let now = Time::from_millis(1);
            for (p, s, s2) in flows {
                let s = if resegmented { s2 } else { s };
                let mut j = 0;
                for (i, pf) in p.iter().enumerate() {
                    let _ = c.handle_primary(now, pf.clone());
                    // Keep the secondary in step with the primary's bytes.
                    let upto = (i + 1) * 1448;
                    let seg = if resegmented { 1000 } else { 1448 };
                    while j < s.len() && j * seg < upto {
                        c.handle_secondary(now, s[j].clone());
                        j += 1;
                    }
                    drain(&mut c);
                }
            }
            black_box(c.stats());
        }
    };
    let tcp_bps = best_rate(budget, bytes_per_pass, run_tcp(false));
    let tcp2_bps = best_rate(budget, bytes_per_pass, run_tcp(true));

    // Physical reference over the same working set as the TCP run (8 flows, both sides): memcmp of equal
    // 1448-byte chunks, memcpy of them.
    let a: Vec<u8> = data.repeat(flows.len());
    let b: Vec<u8> = a.clone();
    let mut dst = vec![0u8; a.len()];
    let memcmp_bps = best_rate(budget, a.len() as f64, || {
        let mut eq = 0usize;
        for (x, y) in a.chunks(1448).zip(b.chunks(1448)) {
            eq += usize::from(black_box(x) == black_box(y));
        }
        black_box(eq);
    });
    let memcpy_bps = best_rate(budget, a.len() as f64, || {
        for (d, s) in dst.chunks_mut(1448).zip(a.chunks(1448)) {
            d.copy_from_slice(black_box(s));
        }
        black_box(&dst);
    });

    // And for the UDP figure: memcmp of the 64-byte pairs alone.
    let memcmp64_pps = best_rate(budget, (UDP_ROUNDS * pairs.len()) as f64, || {
        let mut eq = 0usize;
        for _ in 0..UDP_ROUNDS {
            for (p, s) in &pairs {
                eq += usize::from(black_box(&p[..]) == black_box(&s[..]));
            }
        }
        black_box(eq);
    });

    let gbit = |bps: f64| bps * 8.0 / 1e9;
    let memcmp64_mpps = memcmp64_pps / 1e6;
    let udp64_mpps = udp_pps / 1e6;
    let (tcp_gbps, tcp_resegmented_gbps) = (gbit(tcp_bps), gbit(tcp2_bps));
    let (memcmp_gbps, memcpy_gbps) = (gbit(memcmp_bps), gbit(memcpy_bps));
    if json {
        println!(
            "{{\"udp64_mpps\":{udp64_mpps:.3},\"tcp_gbps\":{tcp_gbps:.2},\"tcp_resegmented_gbps\":{tcp_resegmented_gbps:.2},\
\"memcmp_gbps\":{memcmp_gbps:.2},\"memcmp64_mpps\":{memcmp64_mpps:.1},\"memcpy_gbps\":{memcpy_gbps:.2},\"tcp_to_memcmp\":{:.3},\"tcp_to_memcpy\":{:.3}}}",
            tcp_gbps / memcmp_gbps,
            tcp_gbps / memcpy_gbps
        );
    } else {
        println!("udp64 pairs compared:     {udp64_mpps:.2} Mpps (target >= 5)");
        println!("tcp 1448-byte segments:   {tcp_gbps:.1} Gbit/s (target >= 20)");
        println!("tcp resegmented (1000):   {tcp_resegmented_gbps:.1} Gbit/s");
        println!("reference memcmp / memcpy: {memcmp_gbps:.1} / {memcpy_gbps:.1} Gbit/s");
        println!("reference memcmp of 64-byte pairs: {memcmp64_mpps:.1} Mpps");
        println!(
            "tcp / memcmp = {:.2}, tcp / memcpy = {:.2}",
            tcp_gbps / memcmp_gbps,
            tcp_gbps / memcpy_gbps
        );
    }
}
