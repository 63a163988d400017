//! Property test: the primary and secondary together against a naive oracle of three flat images
//! (primary disk, checkpoint image, SVM view).

use bytes::Bytes;
use colo_block::{
    EpochLimit, Error, JournalStore, MemBackend, MemStore, Outgoing, OverlayStore, PrimaryConfig,
    PrimaryDisk, SecondaryDisk, WriteRecord,
};
use proptest::prelude::*;

const SECTOR: usize = 512;
const DISK_SECTORS: usize = 96;
const DISK: usize = DISK_SECTORS * SECTOR;
/// Four sectors per block, so that requests often cover blocks partially.
const BLOCK: usize = 2048;
const HIDDEN_CAP: usize = 12;
const ACTIVE_CAP: usize = 10;

#[derive(Debug, Clone)]
enum Op {
    PvmWrite {
        sector: usize,
        sectors: usize,
        fill: u8,
    },
    PvmDiscard {
        sector: usize,
        sectors: usize,
    },
    SvmWrite {
        sector: usize,
        sectors: usize,
        fill: u8,
    },
    SvmRead {
        sector: usize,
        sectors: usize,
    },
    /// Deliver some of the records in flight to the secondary.
    Deliver {
        count: usize,
    },
    Checkpoint,
}

fn range() -> impl Strategy<Value = (usize, usize)> {
    (0..DISK_SECTORS).prop_flat_map(|s| (Just(s), 1..=(DISK_SECTORS - s).min(12)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), any::<u8>()).prop_map(|((sector, sectors), fill)| Op::PvmWrite { sector, sectors, fill }),
        1 => range().prop_map(|(sector, sectors)| Op::PvmDiscard { sector, sectors }),
        3 => (range(), any::<u8>()).prop_map(|((sector, sectors), fill)| Op::SvmWrite { sector, sectors, fill }),
        3 => range().prop_map(|(sector, sectors)| Op::SvmRead { sector, sectors }),
        2 => (0..6usize).prop_map(|count| Op::Deliver { count }),
        1 => Just(Op::Checkpoint),
    ]
}

/// Data that differs per sector, so misplaced sectors are caught.
fn pattern(sectors: usize, fill: u8, salt: usize) -> Vec<u8> {
    let mut v = vec![0u8; sectors * SECTOR];
    for (i, s) in v.chunks_mut(SECTOR).enumerate() {
        s.fill(fill.wrapping_add((i + salt) as u8));
        s[0] = i as u8;
    }
    v
}

struct Pair<H, A> {
    primary: PrimaryDisk<MemBackend>,
    secondary: SecondaryDisk<MemBackend, H, A>,
    in_flight: Vec<Outgoing>,
    // The oracle.
    primary_img: Vec<u8>,
    ckpt_img: Vec<u8>,
    svm_img: Vec<u8>,
}

impl<H: OverlayStore, A: OverlayStore> Pair<H, A> {
    fn new(hidden: H, active: A, initial: Vec<u8>) -> Self {
        let mut primary = PrimaryDisk::new(
            MemBackend::from_vec(initial.clone()).unwrap(),
            PrimaryConfig {
                epoch_limit: Some(EpochLimit {
                    block_size: BLOCK as u64,
                    max_blocks: HIDDEN_CAP,
                }),
                ..PrimaryConfig::default()
            },
        );
        primary.start_replication().unwrap();
        let secondary =
            SecondaryDisk::new(MemBackend::from_vec(initial.clone()).unwrap(), hidden, active, 0).unwrap();
        Pair {
            primary,
            secondary,
            in_flight: Vec::new(),
            primary_img: initial.clone(),
            ckpt_img: initial.clone(),
            svm_img: initial,
        }
    }

    fn pump(&mut self) {
        while let Some(out) = self.primary.poll_outgoing().unwrap() {
            match out {
                rec @ (Outgoing::Write(_) | Outgoing::Discard(_)) => self.in_flight.push(rec),
                Outgoing::Barrier { epoch } => {
                    self.deliver(usize::MAX);
                    self.secondary.handle_barrier(epoch).unwrap();
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Delivers the first `count` records in flight: runs of writes as one batch, discards one by one.
    fn deliver(&mut self, count: usize) {
        let n = count.min(self.in_flight.len());
        let mut batch: Vec<WriteRecord> = Vec::new();
        let mut last = None;
        for out in self.in_flight.drain(..n) {
            match out {
                Outgoing::Write(rec) => {
                    last = Some(rec.id);
                    batch.push(rec);
                }
                Outgoing::Discard(rec) => {
                    self.secondary.apply_batch(&std::mem::take(&mut batch)).unwrap();
                    self.secondary.apply_discard(&rec).unwrap();
                    last = Some(rec.id);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        self.secondary.apply_batch(&batch).unwrap();
        if last.is_some() {
            assert_eq!(self.secondary.last_applied(), last);
        }
    }

    fn checkpoint(&mut self) {
        self.primary.end_epoch().unwrap();
        self.pump();
        self.secondary.checkpoint().unwrap();
        assert_eq!(
            self.secondary.disk().as_slice(),
            &self.primary_img[..],
            "secondary != primary after checkpoint"
        );
        assert_eq!(self.primary.disk().as_slice(), &self.primary_img[..]);
        self.ckpt_img = self.primary_img.clone();
        self.svm_img = self.primary_img.clone();
        self.check_read(0, DISK_SECTORS);
    }

    fn check_read(&self, sector: usize, sectors: usize) {
        let mut buf = vec![0u8; sectors * SECTOR];
        self.secondary
            .svm_read((sector * SECTOR) as u64, &mut buf)
            .unwrap();
        let want = &self.svm_img[sector * SECTOR..(sector + sectors) * SECTOR];
        assert!(
            buf == want,
            "SVM read of sectors {sector}+{sectors} differs from the oracle"
        );
    }

    fn step(&mut self, op: &Op, salt: usize) {
        match *op {
            Op::PvmWrite {
                sector,
                sectors,
                fill,
            } => {
                let data = pattern(sectors, fill, salt);
                let off = (sector * SECTOR) as u64;
                match self.primary.write(off, Bytes::from(data.clone())) {
                    Ok(_) => {}
                    Err(Error::EpochFull { .. }) => {
                        self.checkpoint();
                        self.primary.write(off, Bytes::from(data.clone())).unwrap();
                    }
                    Err(e) => panic!("{e}"),
                }
                self.primary_img[sector * SECTOR..(sector + sectors) * SECTOR].copy_from_slice(&data);
                self.pump();
            }
            Op::PvmDiscard { sector, sectors } => {
                let (off, len) = ((sector * SECTOR) as u64, (sectors * SECTOR) as u64);
                match self.primary.discard(off, len) {
                    Ok(_) => {}
                    Err(Error::EpochFull { .. }) => {
                        self.checkpoint();
                        self.primary.discard(off, len).unwrap();
                    }
                    Err(e) => panic!("{e}"),
                }
                self.primary_img[sector * SECTOR..(sector + sectors) * SECTOR].fill(0);
                self.pump();
            }
            Op::SvmWrite {
                sector,
                sectors,
                fill,
            } => {
                let data = pattern(sectors, fill, salt);
                let off = (sector * SECTOR) as u64;
                match self.secondary.svm_write(off, &data) {
                    Ok(()) => {}
                    Err(Error::OverlayFull { store: "active", .. }) => {
                        // Nothing changed: the SVM view is still the oracle's.
                        self.check_read(0, DISK_SECTORS);
                        self.checkpoint();
                        self.secondary.svm_write(off, &data).unwrap();
                    }
                    Err(e) => panic!("{e}"),
                }
                self.svm_img[sector * SECTOR..(sector + sectors) * SECTOR].copy_from_slice(&data);
            }
            Op::SvmRead { sector, sectors } => self.check_read(sector, sectors),
            Op::Deliver { count } => self.deliver(count),
            Op::Checkpoint => self.checkpoint(),
        }
    }

    /// The primary dies: some of the records in flight arrive, then the secondary fails over.
    fn failover(mut self, delivered: usize) {
        self.deliver(delivered);
        self.in_flight.clear();
        self.secondary.failover().unwrap();
        assert!(
            self.secondary.disk().as_slice() == &self.svm_img[..],
            "failover image != checkpoint + SVM writes"
        );
        assert!(self.secondary.hidden().is_empty() && self.secondary.active().is_empty());
        self.check_read(0, DISK_SECTORS);
        let _ = &self.ckpt_img;
    }
}

fn initial() -> Vec<u8> {
    (0..DISK).map(|i| (i / SECTOR) as u8 ^ 0x5a).collect()
}

fn run<H: OverlayStore, A: OverlayStore>(
    hidden: H,
    active: A,
    ops: &[Op],
    end_in_failover: bool,
    delivered: usize,
) {
    let mut pair = Pair::new(hidden, active, initial());
    for (i, op) in ops.iter().enumerate() {
        pair.step(op, i);
    }
    if end_in_failover {
        pair.failover(delivered);
    } else {
        pair.checkpoint();
    }
}

fn journal(capacity: usize) -> JournalStore<MemBackend> {
    let dev = MemBackend::new(JournalStore::<MemBackend>::required_len(BLOCK, capacity)).unwrap();
    JournalStore::format(dev, BLOCK).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn mem_overlays_match_oracle(ops in prop::collection::vec(op(), 1..60), failover: bool, delivered in 0..8usize) {
        run(MemStore::new(BLOCK, HIDDEN_CAP).unwrap(), MemStore::new(BLOCK, ACTIVE_CAP).unwrap(), &ops, failover, delivered);
    }

    #[test]
    fn journal_overlays_match_oracle(ops in prop::collection::vec(op(), 1..60), failover: bool, delivered in 0..8usize) {
        run(journal(HIDDEN_CAP), journal(ACTIVE_CAP), &ops, failover, delivered);
    }
}
