//! Criterion benchmarks of the public API, with a memcmp reference beside them.

use std::hint::black_box;

use bytes::Bytes;
use colo_net::build::{tcp_segments, udp_pair};
use colo_net::{Comparator, Config, PacketView, Rewriter, RewriterConfig, Time};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn drain(c: &mut Comparator) {
    while let Some(a) = c.poll_action() {
        black_box(a);
    }
}

fn udp(c: &mut Criterion) {
    let pairs: Vec<(Bytes, Bytes)> = (0..64).map(|i| udp_pair(1000 + i)).collect();
    let mut g = c.benchmark_group("compare");
    g.throughput(Throughput::Elements(pairs.len() as u64));
    let mut cmp = Comparator::new(Config::default(), Time::ZERO).unwrap();
    g.bench_function("udp64_pair/64flows", |b| {
        b.iter(|| {
            for (p, s) in &pairs {
                let _ = cmp.handle_primary(Time::ZERO, p.clone());
                cmp.handle_secondary(Time::ZERO, s.clone());
                drain(&mut cmp);
            }
        })
    });
    g.finish();
}

fn tcp(c: &mut Criterion) {
    let data: Vec<u8> = (0..256 * 1448).map(|i| (i * 7 % 251) as u8).collect();
    let p = tcp_segments(2000, 7, 1, &data, 1448);
    let s = tcp_segments(2000, 7, 9000, &data, 1448);
    let s2 = tcp_segments(2000, 7, 9000, &data, 1000);
    let mut g = c.benchmark_group("compare");
    g.throughput(Throughput::Bytes(data.len() as u64));
    for (name, sec, seg) in [
        ("tcp1448_stream/256seg", &s, 1448),
        ("tcp_resegmented_1000/256seg", &s2, 1000),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut cmp = Comparator::new(Config::default(), Time::ZERO).unwrap();
                let mut j = 0;
                for (i, f) in p.iter().enumerate() {
                    let _ = cmp.handle_primary(Time::ZERO, f.clone());
                    while j < sec.len() && j * seg < (i + 1) * 1448 {
                        cmp.handle_secondary(Time::ZERO, sec[j].clone());
                        j += 1;
                    }
                    drain(&mut cmp);
                }
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("reference");
    g.throughput(Throughput::Bytes(data.len() as u64));
    let other = data.clone();
    g.bench_function("memcmp_1448/256seg", |b| {
        b.iter(|| {
            let mut eq = 0;
            for (x, y) in data.chunks(1448).zip(other.chunks(1448)) {
                eq += usize::from(black_box(x) == black_box(y));
            }
            eq
        })
    });
    g.finish();
}

fn parse_and_rewrite(c: &mut Criterion) {
    let (u, _) = udp_pair(1);
    let t = tcp_segments(1, 5, 1, &[0u8; 1448], 1448).remove(0);
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("udp64", |b| {
        b.iter(|| PacketView::parse(black_box(&u), 0).is_ok())
    });
    g.bench_function("tcp1448", |b| {
        b.iter(|| PacketView::parse(black_box(&t), 0).is_ok())
    });
    g.bench_function("tcp1448_etherparse_path", |b| {
        b.iter(|| PacketView::parse_general(black_box(&t), 0).is_ok())
    });
    g.finish();
    let mut g = c.benchmark_group("rewriter");
    g.throughput(Throughput::Elements(1));
    let mut rw = Rewriter::new(RewriterConfig::default()).unwrap();
    // Learn an offset: SVM SYN, then the client's SYN-ACK.
    let mut guest = colo_net::build::BENCH_GUEST;
    guest.port = 1;
    let mut spec = colo_net::build::TcpSpec::data(guest, colo_net::build::BENCH_CLIENT, 1000, 0, &[]);
    spec.flags = colo_net::packet::tcp_flags::SYN;
    let mut syn = colo_net::build::tcp(&spec);
    rw.secondary_output(Time::ZERO, &mut syn);
    rw.set_primary_isn(
        Time::ZERO,
        colo_net::FlowKey::of(&PacketView::parse(&syn, 0).unwrap()),
        5,
    );
    let mut frame = t.to_vec();
    g.bench_function("secondary_output/tcp1448", |b| {
        b.iter(|| rw.secondary_output(Time::ZERO, black_box(&mut frame)))
    });
    g.finish();
}

criterion_group!(benches, udp, tcp, parse_and_rewrite);
criterion_main!(benches);
