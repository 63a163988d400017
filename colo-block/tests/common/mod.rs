//! The crash scenario shared by `crash.rs` and `raw_images.rs`.
#![allow(dead_code)]

use bytes::Bytes;
use colo_block::{
    BlockBackend, DiscardRecord, FaultPlan, JournalStore, OverlayStore, Recovery, SecondaryDisk, WriteId,
    WriteRecord, recover,
};

pub const BLOCK: usize = 4096;
pub const DISK: usize = 64 * BLOCK;
pub const JOURNAL_BLOCKS: usize = 32;
/// One sector written by the promoted SVM over a block its active overlay held.
const POST_FAILOVER: (u64, u8) = (30 * BLOCK as u64 + 512, 17);

/// Where the scenario was when it crashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Epoch0,
    Checkpoint,
    Epoch1,
    Failover,
    /// The promoted SVM writes straight to its disk and flushes.
    AfterFailover,
    Done,
}

pub struct Scenario {
    pub img0: Vec<u8>,
    pub img1: Vec<u8>,
    pub img_failover: Vec<u8>,
    pub img_after: Vec<u8>,
    epoch0: Vec<Vec<WriteRecord>>,
    svm0: Vec<(u64, Vec<u8>)>,
    epoch1: Vec<Vec<WriteRecord>>,
    /// Discards applied after each epoch's writes.
    discard0: DiscardRecord,
    discard1: DiscardRecord,
    svm1: Vec<(u64, Vec<u8>)>,
}

fn fill(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i / 512) as u8) ^ (i as u8))
        .collect()
}

fn apply(img: &mut [u8], off: u64, data: &[u8]) {
    img[off as usize..off as usize + data.len()].copy_from_slice(data);
}

impl Scenario {
    pub fn new() -> Self {
        let img0 = fill(DISK, 7);
        let mut id = 0;
        let mut rec = |epoch: u64, off: u64, len: usize, seed: u8| {
            id += 1;
            WriteRecord {
                id: WriteId(id),
                epoch,
                offset: off,
                data: Bytes::from(fill(len, seed)),
            }
        };
        // Full blocks, partial blocks, a write spanning blocks, one block written twice.
        let epoch0 = vec![
            vec![rec(0, 0, BLOCK, 1), rec(0, 5 * BLOCK as u64 + 512, 1024, 2)],
            vec![rec(0, 9 * BLOCK as u64, 3 * BLOCK, 3)],
            vec![rec(0, 0, 512, 4), rec(0, 40 * BLOCK as u64 - 1024, 2048, 5)],
        ];
        let svm0 = vec![
            (2 * BLOCK as u64, fill(BLOCK, 9)),
            (9 * BLOCK as u64 + 1536, fill(512, 10)),
        ];
        let epoch1 = vec![
            vec![
                rec(1, 2 * BLOCK as u64, BLOCK, 11),
                rec(1, 20 * BLOCK as u64, 2 * BLOCK, 12),
            ],
            vec![rec(1, 9 * BLOCK as u64 + 512, 512, 13)],
        ];
        let svm1 = vec![
            (20 * BLOCK as u64 + 512, fill(1024, 14)),
            (30 * BLOCK as u64, fill(2 * BLOCK, 15)),
            (9 * BLOCK as u64, fill(512, 16)),
        ];
        let mut img1 = img0.clone();
        for r in epoch0.iter().flatten() {
            apply(&mut img1, r.offset, &r.data);
        }
        // A discard over a block partly written in this epoch, and one across a block boundary.
        let discard0 = DiscardRecord {
            id: WriteId(100),
            epoch: 0,
            offset: 10 * BLOCK as u64,
            len: 1536,
        };
        let discard1 = DiscardRecord {
            id: WriteId(101),
            epoch: 1,
            offset: 44 * BLOCK as u64 - 512,
            len: 2048,
        };
        img1[discard0.offset as usize..(discard0.offset + discard0.len) as usize].fill(0);
        let mut img_failover = img1.clone();
        for (off, d) in &svm1 {
            apply(&mut img_failover, *off, d);
        }
        let mut img_after = img_failover.clone();
        apply(&mut img_after, POST_FAILOVER.0, &fill(512, POST_FAILOVER.1));
        Scenario {
            img0,
            img1,
            img_failover,
            img_after,
            epoch0,
            svm0,
            epoch1,
            discard0,
            discard1,
            svm1,
        }
    }

    fn allowed(&self, phase: Phase) -> Vec<(&'static str, &[u8])> {
        match phase {
            Phase::Epoch0 => vec![("image 0", &self.img0)],
            Phase::Checkpoint => vec![("image 0", &self.img0), ("image 1", &self.img1)],
            Phase::Epoch1 => vec![("image 1", &self.img1)],
            Phase::Failover => vec![
                ("image 1", &self.img1),
                ("image 1 + SVM writes", &self.img_failover),
            ],
            Phase::AfterFailover => {
                vec![
                    ("image 1 + SVM writes", &self.img_failover),
                    ("after failover", &self.img_after),
                ]
            }
            Phase::Done => vec![("after failover", &self.img_after)],
        }
    }

    /// Runs the scenario, updating `phase` as it goes; returns at the first error.
    pub fn run<D: BlockBackend, J: BlockBackend>(
        &self,
        sec: &mut SecondaryDisk<D, JournalStore<J>, JournalStore<J>>,
        phase: &mut Phase,
    ) -> colo_block::Result<()> {
        *phase = Phase::Epoch0;
        for batch in &self.epoch0 {
            sec.apply_batch(batch)?;
        }
        sec.apply_discard(&self.discard0)?;
        for (off, d) in &self.svm0 {
            sec.svm_write(*off, d)?;
        }
        sec.handle_barrier(0)?;
        *phase = Phase::Checkpoint;
        sec.checkpoint()?;
        *phase = Phase::Epoch1;
        for batch in &self.epoch1 {
            sec.apply_batch(batch)?;
        }
        sec.apply_discard(&self.discard1)?;
        for (off, d) in &self.svm1 {
            sec.svm_write(*off, d)?;
        }
        *phase = Phase::Failover;
        sec.failover()?;
        *phase = Phase::AfterFailover;
        sec.svm_write(POST_FAILOVER.0, &fill(512, POST_FAILOVER.1))?;
        sec.svm_flush()?;
        *phase = Phase::Done;
        Ok(())
    }
}

pub fn journal_len() -> u64 {
    JournalStore::<colo_block::MemBackend>::required_len(BLOCK, JOURNAL_BLOCKS)
}

fn read_all<B: BlockBackend>(b: &B) -> Vec<u8> {
    let mut v = vec![0u8; b.len() as usize];
    b.read_at(0, &mut v).unwrap();
    v
}

/// Runs the scenario once per mutating operation, crashing at that operation; returns the number of
/// operations of a complete run. `make` builds fresh devices (disk holding `init`, blank journal devices)
/// counting against the plan; `crash` turns them into what survives; `inspect` sees each recovered disk.
pub fn crash_at_every_step<D, J, DD, JD>(
    sc: &Scenario,
    tear: bool,
    make: impl Fn(&FaultPlan, &[u8], u64) -> (D, J, J),
    crash: impl Fn(D, J, J) -> (DD, JD, JD),
    inspect: impl Fn(&[u8]),
) -> u64
where
    D: BlockBackend,
    J: BlockBackend,
    DD: BlockBackend,
    JD: BlockBackend,
{
    let mut n = 0u64;
    let mut seen_phases = Vec::new();
    loop {
        let plan = FaultPlan::never();
        let (disk, h, a) = make(&plan, &sc.img0, journal_len());
        let hidden = JournalStore::format(h, BLOCK).unwrap();
        let active = JournalStore::format(a, BLOCK).unwrap();
        let mut sec = SecondaryDisk::new(disk, hidden, active, 0).unwrap();
        plan.arm(n, tear);
        let mut phase = Phase::Epoch0;
        let result = sc.run(&mut sec, &mut phase);
        let completed = result.is_ok();
        assert_eq!(
            completed,
            !plan.tripped(),
            "step {n}: errors only from injected faults: {result:?}"
        );
        let (disk, h, a) = sec.into_parts();
        let (mut disk, h, a) = crash(disk, h.into_backend(), a.into_backend());
        let mut hidden = JournalStore::open(h).unwrap();
        let mut active = JournalStore::open(a).unwrap();
        let recovery = recover(&mut disk, &mut hidden, &mut active).unwrap();
        let got = read_all(&disk);
        let allowed = sc.allowed(phase);
        let which = allowed.iter().find(|(_, img)| got == *img).map(|(name, _)| *name);
        assert!(
            which.is_some(),
            "crash at step {n} in {phase:?} (recovery {recovery:?}): disk is none of {:?}",
            allowed.iter().map(|(name, _)| *name).collect::<Vec<_>>()
        );
        // Recovery leaves empty overlays, and a second recovery changes nothing.
        assert!(hidden.blocks().is_empty() && active.blocks().is_empty());
        assert_eq!(
            recover(&mut disk, &mut hidden, &mut active).unwrap(),
            Recovery::Clean
        );
        assert!(read_all(&disk) == got);
        inspect(&got);
        if !seen_phases.contains(&(phase, which)) {
            seen_phases.push((phase, which));
        }
        if completed {
            // Every phase was crashed in, and both outcomes of each commit were seen.
            for p in [
                Phase::Epoch0,
                Phase::Checkpoint,
                Phase::Epoch1,
                Phase::Failover,
                Phase::Done,
            ] {
                assert!(seen_phases.iter().any(|(q, _)| *q == p), "never crashed in {p:?}");
            }
            for (p, img) in [
                (Phase::Checkpoint, "image 0"),
                (Phase::Checkpoint, "image 1"),
                (Phase::Failover, "image 1"),
                (Phase::Failover, "image 1 + SVM writes"),
            ] {
                assert!(
                    seen_phases.contains(&(p, Some(img))),
                    "crash in {p:?} never gave {img}"
                );
            }
            return n;
        }
        n += 1;
    }
}
