//! File-backed tests on real raw images made by `qemu-img create -f raw`, checked with `qemu-img compare`.

mod common;

use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use colo_block::{
    BlockBackend, FaultPlan, FaultyBackend, InitialSync, JournalStore, MemStore, Outgoing, PrimaryConfig,
    PrimaryDisk, RawFile, SecondaryDisk,
};
use common::{Scenario, crash_at_every_step};

fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: qemu-img not found; raw images are made with RawFile::create and not compared");
    }
    ok
}

fn create(path: &Path, len: u64, qemu: bool) -> RawFile {
    if qemu {
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(path)
            .arg(len.to_string())
            .status()
            .unwrap();
        assert!(st.success(), "qemu-img create failed");
        RawFile::open(path).unwrap()
    } else {
        RawFile::create(path, len).unwrap()
    }
}

/// `qemu-img compare` exit status 0 means identical contents.
fn identical(a: &Path, b: &Path) -> bool {
    let st = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .status()
        .unwrap();
    st.success()
}

fn write_image(path: &Path, data: &[u8], qemu: bool) {
    let mut f = create(path, data.len() as u64, qemu);
    f.write_at(0, data).unwrap();
    f.flush().unwrap();
}

#[test]
fn crash_at_every_step_on_raw_files() {
    let qemu = have_qemu_img();
    let dir = tempfile::tempdir().unwrap();
    let sc = Scenario::new();
    let (disk, hj, aj) = (
        dir.path().join("disk.raw"),
        dir.path().join("hidden.jnl"),
        dir.path().join("active.jnl"),
    );
    let expected = [
        (dir.path().join("image0.raw"), &sc.img0),
        (dir.path().join("image1.raw"), &sc.img1),
        (dir.path().join("failover.raw"), &sc.img_failover),
        (dir.path().join("after.raw"), &sc.img_after),
    ];
    for (p, img) in &expected {
        write_image(p, img, qemu);
    }
    let steps = crash_at_every_step(
        &sc,
        true,
        |plan: &FaultPlan, init: &[u8], jlen: u64| {
            let mut d = create(&disk, init.len() as u64, qemu);
            d.write_at(0, init).unwrap();
            d.flush().unwrap();
            (
                FaultyBackend::new(d, plan.clone()),
                FaultyBackend::new(create(&hj, jlen, qemu), plan.clone()),
                FaultyBackend::new(create(&aj, jlen, qemu), plan.clone()),
            )
        },
        |d, h, a| {
            // The process dies: drop every handle, then reopen the files as a restarted secondary would.
            drop((d, h, a));
            (
                RawFile::open(&disk).unwrap(),
                RawFile::open(&hj).unwrap(),
                RawFile::open(&aj).unwrap(),
            )
        },
        |got| {
            if qemu {
                let (p, _) = expected.iter().find(|(_, img)| got == &img[..]).unwrap();
                assert!(
                    identical(&disk, p),
                    "qemu-img compare disagrees with {}",
                    p.display()
                );
            }
        },
    );
    assert!(steps > 40);
}

fn pump(
    primary: &mut PrimaryDisk<RawFile>,
    secondary: &mut SecondaryDisk<RawFile, JournalStore<RawFile>, MemStore>,
) {
    let mut batch = Vec::new();
    while let Some(out) = primary.poll_outgoing().unwrap() {
        match out {
            Outgoing::Write(rec) => batch.push(rec),
            Outgoing::Discard(rec) => {
                secondary.apply_batch(&std::mem::take(&mut batch)).unwrap();
                secondary.apply_discard(&rec).unwrap();
            }
            Outgoing::Barrier { epoch } => {
                secondary.apply_batch(&std::mem::take(&mut batch)).unwrap();
                secondary.handle_barrier(epoch).unwrap();
            }
            Outgoing::SyncChunk { offset, data } => secondary.apply_sync_chunk(offset, &data).unwrap(),
            Outgoing::SyncDone => secondary.finish_sync(primary.epoch()).unwrap(),
        }
    }
    secondary.apply_batch(&batch).unwrap();
}

fn pattern(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// A stale secondary is synced while the primary writes, then replicates through checkpoints and fails
/// over; `qemu-img compare` checks the images at each stage.
#[test]
fn sync_replicate_checkpoint_failover_on_raw_files() {
    const LEN: u64 = 4 << 20;
    const BS: usize = 4096;
    let qemu = have_qemu_img();
    let dir = tempfile::tempdir().unwrap();
    let (pp, sp, hp) = (
        dir.path().join("primary.raw"),
        dir.path().join("secondary.raw"),
        dir.path().join("hidden.jnl"),
    );
    let mut pdisk = create(&pp, LEN, qemu);
    pdisk.write_at(0, &pattern(LEN as usize, 1)).unwrap();
    let mut sdisk = create(&sp, LEN, qemu);
    sdisk.write_at(LEN / 2, &pattern((LEN / 2) as usize, 2)).unwrap(); // stale, not empty

    let mut primary = PrimaryDisk::new(pdisk, PrimaryConfig::default());
    primary
        .start_sync(InitialSync::new(LEN, 256 << 10).unwrap())
        .unwrap();
    let hidden = JournalStore::format(
        create(&hp, JournalStore::<RawFile>::required_len(BS, 256), qemu),
        BS,
    )
    .unwrap();
    let mut secondary = SecondaryDisk::new_syncing(sdisk, hidden, MemStore::new(BS, 256).unwrap()).unwrap();

    // Sync with guest writes in between chunks, some behind the sync cursor.
    let mut seed = 10;
    let mut chunks = 0;
    while let Some(out) = primary.poll_outgoing().unwrap() {
        match out {
            Outgoing::SyncChunk { offset, data } => {
                secondary.apply_sync_chunk(offset, &data).unwrap();
                chunks += 1;
                if chunks % 3 == 0 {
                    seed += 1;
                    let off = (seed * 37 % (LEN / BS as u64)) * BS as u64;
                    primary.write(off, pattern(BS, seed)).unwrap();
                }
            }
            Outgoing::SyncDone => secondary.finish_sync(primary.epoch()).unwrap(),
            other => panic!("unexpected {other:?}"),
        }
    }
    let progress = primary.sync_progress();
    assert!(progress.is_none(), "sync must be finished");
    assert!(primary.is_replicating());
    primary.flush().unwrap();
    if qemu {
        assert!(
            identical(&pp, &sp),
            "secondary differs from primary after the initial sync"
        );
    }

    // Three epochs of replication with SVM writes, each ending in a checkpoint.
    for epoch in 0..3u64 {
        for i in 0..40 {
            seed += 1;
            let off = (seed * 7919 % (LEN / 512 - 16)) * 512;
            primary.write(off, pattern(512 * (1 + i % 16), seed)).unwrap();
            let svm_off = (seed * 104_729 % (LEN / 512 - 8)) * 512;
            secondary
                .svm_write(svm_off, &pattern(512 * (1 + i % 8), seed + 1000))
                .unwrap();
            if i % 10 == 0 {
                pump(&mut primary, &mut secondary);
            }
        }
        assert_eq!(primary.end_epoch().unwrap(), epoch);
        pump(&mut primary, &mut secondary);
        secondary.checkpoint().unwrap();
        primary.flush().unwrap();
        if qemu {
            assert!(
                identical(&pp, &sp),
                "secondary differs from primary after checkpoint {epoch}"
            );
        }
    }

    // Last epoch: the primary dies with writes in flight; the secondary fails over.
    let mut expected = vec![0u8; LEN as usize];
    primary.read(0, &mut expected).unwrap();
    for i in 0..20u64 {
        seed += 1;
        primary.write(i * 65536, pattern(4096, seed)).unwrap();
        let svm = pattern(1024, seed + 5000);
        let off = i * 65536 + 1024;
        secondary.svm_write(off, &svm).unwrap();
        expected[off as usize..off as usize + svm.len()].copy_from_slice(&svm);
        if i == 10 {
            pump(&mut primary, &mut secondary);
        }
    }
    drop(primary);
    secondary.failover().unwrap();
    let ep = dir.path().join("expected.raw");
    write_image(&ep, &expected, qemu);
    let mut got = vec![0u8; LEN as usize];
    secondary.disk().read_at(0, &mut got).unwrap();
    assert!(got == expected, "failover image differs");
    if qemu {
        assert!(identical(&sp, &ep), "qemu-img compare: failover image differs");
    }
}
