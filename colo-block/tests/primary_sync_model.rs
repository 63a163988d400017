//! Property tests of the primary alone: the completion contract in both modes, and the initial sync
//! converging to the primary's content under concurrent guest writes.

use std::collections::BTreeSet;

use bytes::Bytes;
use colo_block::{
    CompletionMode, InitialSync, MemBackend, Outgoing, PrimaryConfig, PrimaryDisk, WriteId, WriteStatus,
};
use proptest::prelude::*;

const SECTORS: u64 = 64;

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        fill: u8,
    },
    Poll {
        count: usize,
    },
    /// Ack the n-th id handed over so far (cumulative).
    Ack {
        pick: usize,
    },
    EndEpoch,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SECTORS).prop_flat_map(|s| (Just(s), 1..=(SECTORS - s).min(8), any::<u8>()))
            .prop_map(|(sector, sectors, fill)| Op::Write { sector, sectors, fill }),
        2 => (0..5usize).prop_map(|count| Op::Poll { count }),
        2 => any::<usize>().prop_map(|pick| Op::Ack { pick }),
        1 => Just(Op::EndEpoch),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every write is on the local disk when `write` returns; in Sync mode a write completes exactly once,
    /// only after an ack covering it (or at `stop_replication`); records come out in id order with their
    /// epoch, each barrier after all writes of its epoch.
    #[test]
    fn completion_contract(ops in prop::collection::vec(op(), 1..80), sync: bool) {
        let mode = if sync { CompletionMode::Sync } else { CompletionMode::Async };
        let mut p = PrimaryDisk::new(
            MemBackend::new(SECTORS * 512).unwrap(),
            PrimaryConfig { mode, ..PrimaryConfig::default() },
        );
        p.start_replication().unwrap();
        let mut oracle = vec![0u8; (SECTORS * 512) as usize];
        let mut pending = BTreeSet::new();
        let mut completed = BTreeSet::new();
        let mut sent: Vec<u64> = Vec::new();
        let (mut next_id, mut epoch, mut last_epoch_seen) = (0u64, 0u64, 0u64);
        for op in &ops {
            match *op {
                Op::Write { sector, sectors, fill } => {
                    let data = vec![fill; (sectors * 512) as usize];
                    let st = p.write(sector * 512, Bytes::from(data.clone())).unwrap();
                    oracle[(sector * 512) as usize..((sector + sectors) * 512) as usize].copy_from_slice(&data);
                    let mut buf = vec![0u8; data.len()];
                    p.read(sector * 512, &mut buf).unwrap();
                    prop_assert_eq!(buf, data, "write not on the local disk at return");
                    match (mode, st) {
                        (CompletionMode::Async, WriteStatus::Completed) => { completed.insert(next_id); }
                        (CompletionMode::Sync, WriteStatus::AwaitingAck(WriteId(id))) => {
                            prop_assert_eq!(id, next_id);
                            pending.insert(id);
                        }
                        other => prop_assert!(false, "unexpected status {:?}", other),
                    }
                    next_id += 1;
                }
                Op::Poll { count } => {
                    for _ in 0..count {
                        match p.poll_outgoing().unwrap() {
                            Some(Outgoing::Write(r)) => {
                                prop_assert_eq!(r.id.0, sent.len() as u64);
                                prop_assert!(r.epoch >= last_epoch_seen);
                                last_epoch_seen = r.epoch;
                                sent.push(r.id.0);
                            }
                            Some(Outgoing::Barrier { epoch: e }) => {
                                prop_assert_eq!(e, last_epoch_seen.max(e));
                                last_epoch_seen = e + 1;
                                prop_assert!(p.barrier_handed_over(e));
                            }
                            Some(other) => prop_assert!(false, "unexpected {:?}", other),
                            None => break,
                        }
                    }
                }
                Op::Ack { pick } => {
                    if sent.is_empty() {
                        prop_assert!(p.handle_ack(WriteId(0)).is_err());
                        continue;
                    }
                    let id = sent[pick % sent.len()];
                    for done in p.handle_ack(WriteId(id)).unwrap() {
                        prop_assert!(done.0 <= id);
                        prop_assert!(pending.remove(&done.0), "completed twice or never pending");
                        completed.insert(done.0);
                    }
                    prop_assert!(pending.iter().all(|&x| x > id));
                }
                Op::EndEpoch => {
                    prop_assert_eq!(p.end_epoch().unwrap(), epoch);
                    epoch += 1;
                }
            }
        }
        for done in p.stop_replication() {
            prop_assert!(pending.remove(&done.0));
            completed.insert(done.0);
        }
        prop_assert!(pending.is_empty());
        prop_assert_eq!(completed.len() as u64, next_id);
        prop_assert_eq!(p.disk().as_slice(), &oracle[..]);
    }

    /// A stale secondary synced while the guest writes ends equal to the primary.
    #[test]
    fn initial_sync_converges(
        writes in prop::collection::vec((0..SECTORS, 1..8u64, any::<u8>(), 0..4usize), 0..60),
        chunk_sectors in 1..16u64,
        stale in any::<bool>(),
    ) {
        let mut p = PrimaryDisk::new(MemBackend::from_vec(vec![0x11; (SECTORS * 512) as usize]).unwrap(),
                                     PrimaryConfig::default());
        let mut secondary = vec![if stale { 0x22 } else { 0 }; (SECTORS * 512) as usize];
        p.start_sync(InitialSync::new(SECTORS * 512, chunk_sectors * 512).unwrap()).unwrap();
        let mut w = writes.iter();
        loop {
            // Between chunks, up to 3 guest writes.
            if let Some(&(s, n, fill, k)) = w.next() {
                let n = n.min(SECTORS - s);
                for _ in 0..k.min(3) + 1 {
                    p.write(s * 512, Bytes::from(vec![fill; (n * 512) as usize])).unwrap();
                }
            }
            match p.poll_outgoing().unwrap() {
                Some(Outgoing::SyncChunk { offset, data }) => {
                    secondary[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                }
                Some(Outgoing::SyncDone) => break,
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
        prop_assert!(p.is_replicating());
        prop_assert_eq!(p.disk().as_slice(), &secondary[..]);
        // Writes from now on are records.
        p.write(0, Bytes::from(vec![9u8; 512])).unwrap();
        prop_assert!(matches!(p.poll_outgoing().unwrap(), Some(Outgoing::Write(_))));
    }
}
