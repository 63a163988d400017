//! Live-migration figures next to the physical limit, measured in the same run:
//! raw loopback TCP throughput (1 MiB writes), then migrations of a guest at idle and under a client's
//! writes: pre-copy throughput and the stop-and-copy pause (downtime).
//!
//! `cargo run --release -p colo-vmm --example migration_bench -- [--ram-mib 256] [--fill-mib 192] [--runs 3]`
//!
//! `--fill-mib` fills that much guest RAM above the guest's own 16 MiB with pseudo-random bytes before boot
//! (standing in for a guest page cache), so pre-copy moves real data instead of zero-page markers.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colo_vmm::client::{ClientConfig, KvClient};
use colo_vmm::migration::{self, MigrationReport, Progress};
use colo_vmm::switch::Switch;
use colo_vmm::{Machine, MachineConfig, NetConfig};
use vm_memory::{Bytes, GuestAddress};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One stream, 1 MiB writes, `total` bytes: bytes per second.
fn loopback_tcp(total: u64) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < total {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        got
    });
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let buf = vec![0x5au8; 1 << 20];
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < total {
        s.write_all(&buf).unwrap();
        sent += buf.len() as u64;
    }
    let got = reader.join().unwrap();
    got as f64 / t0.elapsed().as_secs_f64()
}

fn fill(m: &Machine, from: u64, bytes: u64) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    for off in (from..from + bytes).step_by(buf.len()) {
        for w in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        m.ram().write_slice(&buf, GuestAddress(off)).unwrap();
    }
}

fn migrate_once(ram_mib: u64, fill_mib: u64, under_writes: bool) -> (MigrationReport, u64) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    let sw = Switch::spawn(&dir.path().join("sw")).unwrap();
    let net = |n: &str| NetConfig::Switch {
        switch: sw.path().to_path_buf(),
        local: dir.path().join(n),
    };
    let mut cfg = MachineConfig::new(disk.clone(), net("src"));
    cfg.ram_size = ram_mib << 20;
    let mut src = Machine::new(cfg.clone()).unwrap();
    let booted = Arc::new(AtomicBool::new(false));
    let b2 = booted.clone();
    src.set_console_sink(Box::new(move |l| {
        if l.contains("log replayed") {
            b2.store(true, Ordering::SeqCst);
        }
    }));
    src.boot(colo_vmm::GUEST_ELF).unwrap();
    fill(&src, 16 << 20, (fill_mib << 20).min((ram_mib - 16) << 20));
    src.start(false).unwrap();
    while !booted.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }

    cfg.net = net("dst");
    let mut dst = Machine::new(cfg).unwrap();
    dst.prepare_incoming().unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let receiver = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        migration::receive(s, &dst, &Mutex::new(Progress::default())).unwrap();
        dst
    });

    let t = Duration::from_secs(20);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = under_writes.then(|| {
        let mut c = KvClient::connect(sw.path(), &dir.path().join("c"), &ClientConfig::default(), t).unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let a = c
                    .request(&format!("SET k{} {}", n % 500, "x".repeat(100)), t)
                    .unwrap();
                assert!(a.starts_with("OK "), "{a}");
                n += 1;
            }
            n
        })
    });
    std::thread::sleep(Duration::from_millis(200));
    let report = migration::send(&addr, &src, &Mutex::new(Progress::default())).unwrap();
    let dst = receiver.join().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let writes = writer.map_or(0, |w| w.join().unwrap());
    src.quit();
    dst.quit();
    (report, writes)
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("SKIPPED: migration_bench: /dev/kvm is not available");
        return;
    }
    let ram_mib = arg("--ram-mib", 256);
    let fill_mib = arg("--fill-mib", 192);
    let runs = arg("--runs", 3);
    let tcp = loopback_tcp(1 << 30);
    println!("loopback TCP, one stream, 1 MiB writes: {:.0} MB/s", tcp / 1e6);
    for under_writes in [false, true] {
        for run in 0..runs {
            let (r, writes) = migrate_once(ram_mib, fill_mib, under_writes);
            println!(
                "{} run {run}: RAM {ram_mib} MiB ({fill_mib} MiB filled): {} rounds, {} data + {} zero pages; pre-copy {:.0} MB/s = {:.2} of loopback TCP; downtime {:.3} ms ({} pages in stop-and-copy); total {:.0} ms; client writes {writes}",
                if under_writes { "under writes" } else { "idle" },
                r.rounds,
                r.pages,
                r.zero_pages,
                r.precopy_bytes_per_sec / 1e6,
                r.precopy_bytes_per_sec / tcp,
                r.downtime.as_secs_f64() * 1e3,
                r.final_pages,
                r.total.as_secs_f64() * 1e3,
            );
        }
    }
}
