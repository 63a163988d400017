//! Throughput of colo-block's data paths against the raw file in the same run.
//!
//! ```text
//! cargo run --release -p colo-block --example block_throughput -- [--json] [--reps N] [--mib N] [--dir D]
//! ```
//!
//! * primary path: `PrimaryDisk::write` (Async mode) plus draining the record queue, vs `pwrite` of the
//!   same buffers at the same offsets straight to the same raw file; random 4 KiB and 64 KiB writes.
//! * secondary apply: `SecondaryDisk::apply_batch` in batches of 64 records (hidden store in memory, and
//!   as a journal file flushed once per batch), vs raw `pwrite` of the same records to a third file.
//! * checkpoint drop: `SecondaryDisk::checkpoint` with 1k and 100k blocks in the active overlay.
//!
//! Every figure is the median of N repetitions with min and max; the machine is shared and noisy. The
//! primary and raw paths are interleaved in slices of 256 writes. `--dir /dev/shm` takes the disk's
//! writeback out of the comparison (the page cache is then the whole physical path).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use colo_block::{
    BlockBackend, JournalStore, MemBackend, MemStore, OverlayStore, PrimaryConfig, PrimaryDisk, RawFile,
    SecondaryDisk, WriteId, WriteRecord,
};
use serde_json::{Value, json};

struct Args {
    json: bool,
    reps: usize,
    mib: u64,
    dir: Option<PathBuf>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        json: false,
        reps: 5,
        mib: 128,
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--json" => a.json = true,
            "--reps" => a.reps = it.next().context("--reps N")?.parse()?,
            "--mib" => a.mib = it.next().context("--mib N")?.parse()?,
            "--dir" => a.dir = Some(it.next().context("--dir D")?.into()),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(a.reps > 0 && a.mib >= 16, "need --reps >= 1 and --mib >= 16");
    Ok(a)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Random aligned writes of `size` bytes covering `total` bytes in a disk of `disk_len`.
fn workload(disk_len: u64, size: usize, total: u64, seed: u64) -> Vec<(u64, Bytes)> {
    let mut rng = Rng(seed | 1);
    let slots = disk_len / size as u64;
    (0..total / size as u64)
        .map(|_| {
            let off = rng.next() % slots * size as u64;
            let v = rng.next() as u8;
            (off, Bytes::from(vec![v; size]))
        })
        .collect()
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn stats(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    json!({ "median": s[s.len() / 2], "min": s[0], "max": s[s.len() - 1] })
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn raw_pass(file: &mut RawFile, w: &[(u64, Bytes)]) -> Result<Duration> {
    let t = Instant::now();
    for (off, d) in w {
        file.write_at(*off, d)?;
    }
    Ok(t.elapsed())
}

fn primary_pass(primary: &mut PrimaryDisk<RawFile>, w: &[(u64, Bytes)]) -> Result<Duration> {
    let t = Instant::now();
    for (off, d) in w {
        primary.write(*off, d.clone())?;
        // The transport takes the record (here: drops it after "sending").
        while let Some(out) = primary.poll_outgoing()? {
            std::hint::black_box(&out);
        }
    }
    Ok(t.elapsed())
}

fn create(path: &Path, len: u64) -> Result<RawFile> {
    let mut f = RawFile::create(path, len)?;
    // Allocate every block first so neither path pays for file growth.
    let zeros = vec![0u8; 1 << 20];
    for off in (0..len).step_by(zeros.len()) {
        f.write_at(off, &zeros[..(len - off).min(zeros.len() as u64) as usize])?;
    }
    f.flush()?;
    Ok(f)
}

fn main() -> Result<()> {
    let a = args()?;
    let tmp = tempfile::tempdir_in(a.dir.clone().unwrap_or_else(std::env::temp_dir))?;
    let disk_len = a.mib << 20;
    let total = disk_len / 2;
    let path = tmp.path().join("primary.raw");
    let file = create(&path, disk_len)?;
    let mut primary = PrimaryDisk::new(
        file,
        PrimaryConfig {
            max_backlog_bytes: u64::MAX,
            ..PrimaryConfig::default()
        },
    );
    primary.start_replication()?;
    let mut raw = RawFile::open(&path)?;

    // Primary path vs raw file.
    let mut by_size = serde_json::Map::new();
    let (mut all_p, mut all_r, mut all_ratio) = (Vec::new(), Vec::new(), Vec::new());
    let sizes = [4096usize, 65536];
    let loads: Vec<Vec<(u64, Bytes)>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &s)| workload(disk_len, s, total, 42 + i as u64))
        .collect();
    for rep in 0..a.reps {
        let (mut tp, mut tr) = (Duration::ZERO, Duration::ZERO);
        for (i, w) in loads.iter().enumerate() {
            // Interleave the two paths in slices of 256 writes, alternating which goes first, so that both
            // see the same machine load and page-cache state.
            let (mut dp, mut dr) = (Duration::ZERO, Duration::ZERO);
            for (k, slice) in w.chunks(256).enumerate() {
                if (k + rep) % 2 == 0 {
                    dr += raw_pass(&mut raw, slice)?;
                    dp += primary_pass(&mut primary, slice)?;
                } else {
                    dp += primary_pass(&mut primary, slice)?;
                    dr += raw_pass(&mut raw, slice)?;
                }
            }
            let e = by_size
                .entry(format!("{}k", sizes[i] / 1024))
                .or_insert_with(|| json!({"p": [], "r": [], "q": []}));
            e["p"].as_array_mut().unwrap().push(json!(gbps(total, dp)));
            e["r"].as_array_mut().unwrap().push(json!(gbps(total, dr)));
            e["q"]
                .as_array_mut()
                .unwrap()
                .push(json!(dr.as_secs_f64() / dp.as_secs_f64()));
            tp += dp;
            tr += dr;
        }
        all_p.push(gbps(total * 2, tp));
        all_r.push(gbps(total * 2, tr));
        all_ratio.push(tr.as_secs_f64() / tp.as_secs_f64());
    }
    let by_size: serde_json::Map<String, Value> = by_size
        .into_iter()
        .map(|(k, v)| {
            let f = |key: &str| -> Vec<f64> { v[key].as_array().unwrap().iter().filter_map(Value::as_f64).collect() };
            (
                k,
                json!({ "primary_write_gbps": stats(&f("p")), "raw_write_gbps": stats(&f("r")), "ratio": stats(&f("q")) }),
            )
        })
        .collect();
    drop(primary);

    // Secondary apply: records of 4 KiB and 64 KiB random writes, batches of 64, one epoch per rep. The
    // secondaries live across reps (as across epochs in a real pair), so their overlays are warm.
    let mut apply = serde_json::Map::new();
    for (i, &size) in sizes.iter().enumerate() {
        let recs: Vec<WriteRecord> = loads[i]
            .iter()
            .take((total / 4 / size as u64) as usize)
            .enumerate()
            .map(|(n, (off, d))| WriteRecord {
                id: WriteId(n as u64),
                epoch: 0,
                offset: *off,
                data: d.clone(),
            })
            .collect();
        let bytes = recs.len() as u64 * size as u64;
        let blocks = (bytes / 4096) as usize + 16;
        let (mut mem_g, mut jnl_g, mut raw_g) = (Vec::new(), Vec::new(), Vec::new());
        let mut raw = create(&tmp.path().join("raw.raw"), disk_len)?;
        let mut mem_sec = SecondaryDisk::new(
            create(&tmp.path().join("secondary_mem.raw"), disk_len)?,
            MemStore::new(4096, blocks)?,
            MemStore::new(4096, 16)?,
            0,
        )?;
        let jlen = JournalStore::<RawFile>::required_len(4096, blocks);
        let hidden = JournalStore::format(RawFile::create(tmp.path().join("hidden.jnl"), jlen)?, 4096)?;
        let mut jnl_sec = SecondaryDisk::new(
            create(&tmp.path().join("secondary_jnl.raw"), disk_len)?,
            hidden,
            MemStore::new(4096, 16)?,
            0,
        )?;
        for rep in 0..a.reps {
            let epoch_recs: Vec<WriteRecord> = recs
                .iter()
                .map(|r| WriteRecord {
                    epoch: rep as u64,
                    ..r.clone()
                })
                .collect();
            let mut raw_pass = || -> Result<f64> {
                let t = Instant::now();
                for r in &epoch_recs {
                    raw.write_at(r.offset, &r.data)?;
                }
                Ok(gbps(bytes, t.elapsed()))
            };
            // Alternate the order of the reference and the measured paths between reps.
            if rep % 2 == 0 {
                raw_g.push(raw_pass()?);
            }
            for (sec_g, run) in [(&mut mem_g, 0), (&mut jnl_g, 1)] {
                let t = Instant::now();
                for batch in epoch_recs.chunks(64) {
                    if run == 0 {
                        mem_sec.apply_batch(batch)?;
                    } else {
                        jnl_sec.apply_batch(batch)?;
                    }
                }
                sec_g.push(gbps(bytes, t.elapsed()));
            }
            if rep % 2 == 1 {
                raw_g.push(raw_pass()?);
            }
            mem_sec.handle_barrier(rep as u64)?;
            mem_sec.checkpoint()?;
            jnl_sec.handle_barrier(rep as u64)?;
            jnl_sec.checkpoint()?;
        }
        apply.insert(
            format!("{}k", size / 1024),
            json!({
                "apply_mem_hidden_gbps": stats(&mem_g),
                "apply_journal_hidden_gbps": stats(&jnl_g),
                "raw_write_gbps": stats(&raw_g),
                "ratio_mem": median(&mem_g) / median(&raw_g),
                "ratio_journal": median(&jnl_g) / median(&raw_g),
            }),
        );
    }

    // Checkpoint drop with N blocks in the active overlay (and as many in the hidden store for the journal).
    let mut drop_times = serde_json::Map::new();
    let block = vec![7u8; 4096];
    for &n in &[1_000usize, 100_000] {
        // The disk is in memory, so that only the overlays are timed; one block per overlay block.
        let drop_len = (n as u64 * 4096).max(disk_len);
        let mut mem_ms = Vec::new();
        let mut jnl_ms = Vec::new();
        let mut mem_sec = SecondaryDisk::new(
            MemBackend::new(drop_len)?,
            MemStore::new(4096, n)?,
            MemStore::new(4096, n)?,
            0,
        )?;
        let jlen = JournalStore::<RawFile>::required_len(4096, n);
        let jact = JournalStore::format(RawFile::create(tmp.path().join("active.jnl"), jlen)?, 4096)?;
        let jhid = JournalStore::format(RawFile::create(tmp.path().join("hidden2.jnl"), jlen)?, 4096)?;
        let mut jnl_sec = SecondaryDisk::new(MemBackend::new(drop_len)?, jhid, jact, 0)?;
        for rep in 0..a.reps {
            for b in 0..n as u64 {
                let off = b * 4096;
                mem_sec.svm_write(off, &block)?;
                jnl_sec.svm_write(off, &block)?;
            }
            assert_eq!(mem_sec.active().len(), n);
            mem_sec.handle_barrier(rep as u64)?;
            let t = Instant::now();
            mem_sec.checkpoint()?;
            mem_ms.push(t.elapsed().as_secs_f64() * 1e3);
            jnl_sec.handle_barrier(rep as u64)?;
            let t = Instant::now();
            jnl_sec.checkpoint()?;
            jnl_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        drop_times.insert(
            format!("{}k_blocks", n / 1000),
            json!({ "mem_overlay_ms": stats(&mem_ms), "journal_overlay_ms": stats(&jnl_ms),
                    "blocks": n }),
        );
    }

    let out = json!({
        "primary_write_gbps": median(&all_p),
        "raw_write_gbps": median(&all_r),
        "ratio": median(&all_ratio),
        "ratio_min": all_ratio.iter().copied().fold(f64::INFINITY, f64::min),
        "ratio_max": all_ratio.iter().copied().fold(0.0, f64::max),
        "write_by_size": by_size,
        "secondary_apply": apply,
        "checkpoint_drop": drop_times,
        "reps": a.reps,
        "disk_mib": a.mib,
        "bytes_per_pass": total,
        "reference": "raw_write_gbps: pwrite of the same buffers at the same offsets to the same raw file (page cache), same run",
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "primary path {:.2} GB/s, raw file {:.2} GB/s, ratio {:.3} (min {:.3}, max {:.3}) over {} reps",
            median(&all_p),
            median(&all_r),
            median(&all_ratio),
            out["ratio_min"],
            out["ratio_max"],
            a.reps
        );
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
