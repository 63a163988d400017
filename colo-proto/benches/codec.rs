//! Encode and decode of a 4 MiB batch of 4 KiB pages, beside a 4 MiB memcpy measured in the same run.
//!
//! `cargo bench -p colo-proto --bench codec`

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use colo_proto::message::encode_page_frame;
use colo_proto::{DEFAULT_MAX_BODY, Decoder, FrameHeader, HEADER_LEN, Kind, Message, PROTOCOL_VERSION};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};

const PAGE: usize = 4096;
const BATCH: usize = 4 << 20;

fn source() -> Vec<u8> {
    (0..BATCH).map(|i| (i as u8) ^ ((i >> 12) as u8)).collect()
}

fn wire(src: &[u8]) -> Vec<u8> {
    let pages: Vec<(u64, &[u8])> = src
        .chunks(PAGE)
        .enumerate()
        .map(|(i, p)| ((i * PAGE) as u64, p))
        .collect();
    let (mut prefix, mut data) = (Vec::new(), Vec::new());
    let h = encode_page_frame(
        Kind::RamPages,
        PROTOCOL_VERSION,
        1,
        PAGE as u32,
        &pages,
        &mut prefix,
        &mut data,
    )
    .expect("encode");
    let mut out = h.encode().to_vec();
    out.extend_from_slice(&prefix);
    for d in data {
        out.extend_from_slice(d);
    }
    out
}

/// Times the encoding of one frame of `pages` in the current protocol version (descriptors and CRCs; the
/// page data is borrowed, not copied).
fn bench_encode(g: &mut BenchmarkGroup<'_, WallTime>, name: &str, kind: Kind, pages: &[(u64, &[u8])]) {
    let (mut prefix, mut data) = (Vec::with_capacity(16 + 12 * 1024), Vec::with_capacity(1024));
    g.bench_function(name, |b| {
        b.iter(|| {
            prefix.clear();
            data.clear();
            let h = encode_page_frame(
                kind,
                PROTOCOL_VERSION,
                1,
                PAGE as u32,
                black_box(pages),
                &mut prefix,
                &mut data,
            )
            .expect("encode");
            black_box(h);
        })
    });
}

fn codec(c: &mut Criterion) {
    let src = source();
    let pages: Vec<(u64, &[u8])> = src
        .chunks(PAGE)
        .enumerate()
        .map(|(i, p)| ((i * PAGE) as u64, p))
        .collect();
    let wire = wire(&src);
    let mut g = c.benchmark_group("proto");
    g.throughput(Throughput::Bytes(BATCH as u64));
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));

    // The physical reference: copying the same 4 MiB once.
    let mut dst = vec![0u8; BATCH];
    g.bench_function("memcpy/4MiB", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
        })
    });

    // What the transport does before its vectored write: descriptors and a CRC per page (protocol v4 puts
    // them on checkpoint frames too), no copy of pages.
    bench_encode(&mut g, "encode/page_batch_zero_copy/4MiB", Kind::RamPages, &pages);
    // The same frame when the caller hands the 1024 pages over as one contiguous run: one iovec instead of
    // 1024 (the pages are still hashed one by one).
    bench_encode(
        &mut g,
        "encode/page_run_zero_copy/4MiB",
        Kind::RamPages,
        &[(0u64, &src[..])],
    );
    // Pre-copy from a running guest (v3 on): a CRC per page plus a frame CRC over the descriptors and those
    // CRCs (flags::PREFIX_CRC), so the pages go out straight from guest memory, with no staging copy.
    bench_encode(
        &mut g,
        "encode/precopy_page_crcs/4MiB",
        Kind::PrecopyPages,
        &pages,
    );

    // What a VMM had to do before v3 to send pre-copy pages safely: copy them out of the running guest
    // into a staging buffer, then encode the copy with a CRC over every byte (as a protocol-v2 frame).
    let mut staging = vec![0u8; BATCH];
    let mut prefix = Vec::with_capacity(16 + 8 * 1024);
    g.bench_function("encode/precopy_staged_copy_full_crc/4MiB", |b| {
        b.iter(|| {
            staging.copy_from_slice(black_box(&src));
            let staged: Vec<(u64, &[u8])> = staging
                .chunks(PAGE)
                .enumerate()
                .map(|(i, p)| ((i * PAGE) as u64, p))
                .collect();
            prefix.clear();
            let mut data = Vec::with_capacity(1024);
            let h = encode_page_frame(Kind::PrecopyPages, 2, 0, 4096, &staged, &mut prefix, &mut data)
                .expect("encode");
            black_box(h);
        })
    });

    // Decode of a received frame: header checks, body CRC, page slices of the same buffer (no copy).
    let body = Bytes::copy_from_slice(&wire[HEADER_LEN..]);
    let mut raw = [0u8; HEADER_LEN];
    raw.copy_from_slice(&wire[..HEADER_LEN]);
    g.bench_function("decode/page_batch_zero_copy/4MiB", |b| {
        b.iter(|| {
            let h = FrameHeader::decode(black_box(&raw), DEFAULT_MAX_BODY).expect("header");
            h.check_body(&body).expect("crc");
            let m = Message::decode(&h, body.clone()).expect("decode");
            black_box(m);
        })
    });

    // The streaming decoder, which first copies the bytes into its own buffer.
    let mut dec = Decoder::new();
    g.bench_function("decode/page_batch_streaming/4MiB", |b| {
        b.iter(|| {
            let mut rest = &wire[..];
            while !rest.is_empty() {
                let n = dec.feed(rest);
                rest = &rest[n..];
                if let Some(m) = dec.decode().expect("decode") {
                    black_box(m);
                }
            }
        })
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
