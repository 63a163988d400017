//! colo-proto on the checkpoint path: what framing a checkpoint's dirty pages costs (encode with CRC into a
//! discarding stream, decode from memory), and the control messages of one checkpoint through both session
//! machines, each beside a scattered memcpy of the same pages.

mod common;

use std::hint::black_box;
use std::io::{self, Read, Write};
use std::time::Instant;

use colo_proto::{
    Channel, Message, PagePhase, PrimaryAction, PrimarySession, SecondaryAction, SecondarySession,
    SessionConfig,
};
use common::{PAGE, gather_pages, scattered_pages};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// A stream that discards writes and reads from a recorded buffer (rewound by the bench).
#[derive(Default)]
struct Mem {
    data: Vec<u8>,
    pos: usize,
    record: bool,
}

impl Write for Mem {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.record {
            self.data.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut n = 0;
        for b in bufs {
            n += self.write(b)?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Mem {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

const RAM: usize = 256 << 20;

fn page_batches(c: &mut Criterion) {
    let ram: Vec<u8> = (0..RAM).map(|i| (i / PAGE) as u8 | 1).collect();
    for mib in [4usize, 64] {
        let n = (mib << 20) / PAGE;
        let pages = scattered_pages(RAM / PAGE, n);
        let entries: Vec<(u64, &[u8])> = pages
            .iter()
            .map(|&p| ((p * PAGE) as u64, &ram[p * PAGE..][..PAGE]))
            .collect();
        let mut g = c.benchmark_group("proto");
        g.throughput(Throughput::Bytes((n * PAGE) as u64));
        let mut buf = vec![0u8; n * PAGE];
        g.bench_function(format!("memcpy_gather/page_batch/{mib}MiB"), |b| {
            b.iter(|| gather_pages(black_box(&ram), &pages, &mut buf))
        });
        let mut tx = Channel::new(Mem::default());
        g.bench_function(format!("encode/page_batch/{mib}MiB"), |b| {
            b.iter(|| {
                tx.send_pages(PagePhase::Checkpoint, 1, PAGE as u32, black_box(&entries))
                    .unwrap()
            })
        });
        let mut rec = Channel::new(Mem {
            record: true,
            ..Mem::default()
        });
        rec.send_pages(PagePhase::Checkpoint, 1, PAGE as u32, &entries)
            .unwrap();
        rec.send(&Message::EndOfRam { epoch: 1 }).unwrap();
        let mut rx = Channel::new(rec.into_inner());
        g.bench_function(format!("decode/page_batch/{mib}MiB"), |b| {
            b.iter(|| {
                rx.get_mut().pos = 0;
                let mut got = 0;
                loop {
                    match rx.recv().unwrap() {
                        Message::RamPages(batch) => got += batch.pages.len(),
                        Message::EndOfRam { .. } => break,
                        other => panic!("unexpected {other:?}"),
                    }
                }
                assert_eq!(got, n);
            })
        });
        g.finish();
    }
}

/// One checkpoint's control path through both machines, messages handed over in memory (no pages).
fn session_round(c: &mut Criterion) {
    let mut g = c.benchmark_group("proto/session");
    let cfg = SessionConfig::default();
    let now = Instant::now();
    let mut p = PrimarySession::new(cfg, now);
    let mut s = SecondarySession::new(cfg, now);
    let mut to_s: Vec<Message> = Vec::new();
    let mut to_p: Vec<Message> = Vec::new();
    let mut pump = |p: &mut PrimarySession, s: &mut SecondarySession| {
        loop {
            let mut progress = false;
            while let Some(a) = p.poll_action() {
                progress = true;
                match a {
                    PrimaryAction::Send(m) => to_s.push(m),
                    PrimaryAction::SendRam { .. } => p.ram_sent(now).unwrap(),
                    PrimaryAction::SendDeviceState { epoch } => {
                        to_s.push(Message::VmstateSize { epoch, size: 0 });
                        p.device_state_sent(now).unwrap();
                    }
                    PrimaryAction::Failed(e) => panic!("{e}"),
                    _ => {}
                }
            }
            while let Some(a) = s.poll_action() {
                progress = true;
                match a {
                    SecondaryAction::Send(m) => to_p.push(m),
                    SecondaryAction::Failed(e) => panic!("{e}"),
                    _ => {}
                }
            }
            if s.state_name() == "loading the checkpoint" {
                s.checkpoint_loaded(now).unwrap();
                progress = true;
            }
            for m in to_s.drain(..) {
                progress = true;
                s.handle_message(now, m).unwrap();
            }
            for m in to_p.drain(..) {
                progress = true;
                p.handle_message(now, m).unwrap();
            }
            if !progress {
                break;
            }
        }
    };
    pump(&mut p, &mut s);
    g.bench_function("checkpoint_control/no_pages", |b| {
        b.iter(|| {
            p.start_checkpoint(now).unwrap();
            pump(&mut p, &mut s);
            assert!(p.is_idle());
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = page_batches, session_round
}
criterion_main!(benches);
