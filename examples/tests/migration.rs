//! Live migration between two VMM processes while a client keeps writing through the switch.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colo_vmm::client::{ClientConfig, KvClient};
use colo_vmm::control::Request;
use colo_vmm::switch::Switch;
use common::process::VmmProcess;
use common::*;

type Vmm = VmmProcess;

fn spawn(dir: &Path, name: &str, switch: &Path, disk: &Path, extra: &[&str]) -> Vmm {
    Vmm::spawn(dir, name, switch, disk, 64, extra)
}

/// Ask `src` to migrate to `addr` and wait until it reports done; returns its final status.
fn migrate(src: &Vmm, addr: &str, t: Duration) -> serde_json::Value {
    let a = src.ctl(Request::Migrate {
        addr: addr.to_string(),
    });
    assert_eq!(a["ok"], true, "{a}");
    let t0 = Instant::now();
    loop {
        let st = src.ctl(Request::Status);
        if st["migration"]["phase"] == "done" {
            return st;
        }
        assert!(st["migration"]["error"].is_null(), "{st}");
        assert!(t0.elapsed() < t, "migration did not finish: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn live_migration_between_processes_keeps_the_clients_connection_and_data() {
    if !kvm_or_skip("live_migration_between_processes_keeps_the_clients_connection_and_data") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(dir.path(), "disk.img", 8);
    let sw = Switch::spawn(&dir.path().join("switch")).unwrap();
    let t = Duration::from_secs(20);

    let src = spawn(dir.path(), "src", sw.path(), &disk, &[]);
    src.wait_log("log replayed", t);
    let mut c =
        KvClient::connect(sw.path(), &dir.path().join("client"), &ClientConfig::default(), t).unwrap();
    assert_eq!(c.request("PING", t).unwrap(), "PONG");

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dst = spawn(dir.path(), "dst", sw.path(), &disk, &["--incoming", &addr]);
    dst.wait_log("waiting for an incoming migration", t);
    assert_eq!(dst.ctl(Request::Status)["state"], "created");

    // The writer: every acknowledged SET goes into the model; any error fails the test.
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut model = HashMap::new();
        let mut seq = 0u64;
        let mut i = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            let (k, v) = (format!("key{}", i % 300), format!("v{i}"));
            let a = c
                .request(&format!("SET {k} {v}"), Duration::from_secs(20))
                .unwrap();
            seq += 1;
            assert_eq!(a, format!("OK {seq}"), "request {i}");
            model.insert(k, v);
            i += 1;
        }
        (c, model, i)
    });
    std::thread::sleep(Duration::from_millis(300));
    let st = src.ctl(Request::Status);
    assert_eq!(st["state"], "running");
    assert_eq!(st["ram_size"], 64 << 20);

    let status = migrate(&src, &addr, t);
    assert_eq!(status["state"], "paused");
    assert!(
        status["migration"]["downtime_us"].as_u64().unwrap() < 5_000_000,
        "{status}"
    );
    eprintln!("migration under writes: {}", src.wait_log("migration done", t));
    // The source refuses to run the guest a second time.
    assert_eq!(src.ctl(Request::Resume)["ok"], false);
    assert_eq!(dst.ctl(Request::Status)["state"], "running");
    src.quit();

    // The migrated guest migrates on again, to a third process, still under writes.
    std::thread::sleep(Duration::from_millis(200));
    let addr2 = format!("127.0.0.1:{}", free_port());
    let third = spawn(dir.path(), "third", sw.path(), &disk, &["--incoming", &addr2]);
    third.wait_log("waiting for an incoming migration", t);
    migrate(&dst, &addr2, t);
    dst.quit();
    let dst = third;

    // Keep writing on the same connection for a while on the destination.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (mut c, model, n) = writer.join().unwrap();
    assert!(n > 20, "the client wrote only {n} times");
    for (k, v) in &model {
        assert_eq!(c.request(&format!("GET {k}"), t).unwrap(), format!("VAL {v}"));
    }
    let stat = c.request("STAT", t).unwrap();
    assert!(stat.contains(&format!("seq={n} ")), "{stat} after {n} writes");
    dst.quit();
}

fn incoming(dir: &Path, ram_mib: u64) -> colo_vmm::Machine {
    let mut cfg = colo_vmm::MachineConfig::new(disk(dir, "in.img", 1), colo_vmm::NetConfig::None);
    cfg.ram_size = ram_mib << 20;
    let mut m = colo_vmm::Machine::new(cfg).unwrap();
    m.prepare_incoming().unwrap();
    m
}

/// Run `receive` on one end of a loopback connection and `peer` on the other.
fn receive_from(
    m: &colo_vmm::Machine,
    peer: impl FnOnce(colo_proto::Channel<std::net::TcpStream>) + Send,
) -> Result<colo_vmm::migration::MigrationReport, colo_vmm::migration::MigrationError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::scope(|s| {
        s.spawn(move || peer(colo_proto::Channel::connect_tcp(addr).unwrap()));
        let (stream, _) = l.accept().unwrap();
        colo_vmm::migration::receive(stream, m, &Mutex::new(Default::default()))
    })
}

fn hello(ram_mib: u64) -> colo_proto::LocalConfig {
    colo_proto::LocalConfig::new(
        1,
        colo_proto::Role::Primary,
        4096,
        vec![colo_proto::MemoryRegion {
            gpa: 0,
            size: ram_mib << 20,
        }],
    )
}

#[test]
fn the_destination_refuses_a_bad_source_and_stays_stopped() {
    if !kvm_or_skip("the_destination_refuses_a_bad_source_and_stays_stopped") {
        return;
    }
    use colo_proto::{Message, PagePhase};
    let dir = tempfile::tempdir().unwrap();
    let m = incoming(dir.path(), 16);
    // A source with a different RAM size is refused at the handshake.
    let r = receive_from(&m, |mut ch| {
        let _ = ch.handshake_connect(&hello(32));
    });
    assert!(r.is_err());
    // A page outside guest RAM.
    let r = receive_from(&m, |mut ch| {
        ch.handshake_connect(&hello(16)).unwrap();
        let page = [7u8; 4096];
        let _ = ch.send_pages(PagePhase::Precopy, 0, 4096, &[(16 << 20, &page[..])]);
    });
    assert!(
        matches!(r, Err(colo_vmm::migration::MigrationError::Peer(_))),
        "{r:?}"
    );
    // A machine state that does not decode.
    let r = receive_from(&m, |mut ch| {
        ch.handshake_connect(&hello(16)).unwrap();
        ch.send(&Message::EndOfRam { epoch: 0 }).unwrap();
        let _ = ch.send_vmstate(
            0,
            &[(colo_vmm::migration::MACHINE_STATE_ID, &[0xee; 100][..])],
            4096,
        );
    });
    assert!(
        matches!(r, Err(colo_vmm::migration::MigrationError::Machine(_))),
        "{r:?}"
    );
    // The source vanishing mid-stream.
    let r = receive_from(&m, |mut ch| {
        ch.handshake_connect(&hello(16)).unwrap();
    });
    assert!(r.is_err());
    assert_eq!(m.run_state(), colo_vmm::RunState::Created, "nothing was started");
    // And a machine that never ran cannot be migrated away.
    let r = colo_vmm::migration::send("127.0.0.1:9", &m, &Mutex::new(Default::default()));
    assert!(
        matches!(
            r,
            Err(colo_vmm::migration::MigrationError::Machine(
                colo_vmm::Error::WrongState { .. }
            ))
        ),
        "{r:?}"
    );
}

#[test]
fn a_failed_migration_leaves_the_source_able_to_resume() {
    if !kvm_or_skip("a_failed_migration_leaves_the_source_able_to_resume") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(dir.path(), "d.img", 4);
    let sw = Switch::spawn(&dir.path().join("sw")).unwrap();
    let net = colo_vmm::NetConfig::Switch {
        switch: sw.path().to_path_buf(),
        local: dir.path().join("vm"),
    };
    let (m, console) = boot(&disk, net, 32);
    let t = Duration::from_secs(10);
    console.wait_for("log replayed", t);
    let mut c = KvClient::connect(sw.path(), &dir.path().join("c"), &ClientConfig::default(), t).unwrap();
    assert_eq!(c.request("SET a 1", t).unwrap(), "OK 1");
    // Nobody listens there.
    let port = free_port();
    let progress = Mutex::new(Default::default());
    assert!(colo_vmm::migration::send(&format!("127.0.0.1:{port}"), &m, &progress).is_err());
    // A destination that hangs up after the handshake, once pre-copy has started.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let peer = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut ch = colo_proto::Channel::from_tcp(s).unwrap();
        let local = colo_proto::LocalConfig::new(
            2,
            colo_proto::Role::Secondary,
            4096,
            vec![colo_proto::MemoryRegion {
                gpa: 0,
                size: 32 << 20,
            }],
        );
        ch.handshake_accept(&local).unwrap();
        let _ = ch.recv();
    });
    assert!(colo_vmm::migration::send(&addr, &m, &progress).is_err());
    peer.join().unwrap();
    m.resume().unwrap();
    assert_eq!(c.request("GET a", t).unwrap(), "VAL 1");
    assert_eq!(c.request("SET b 2", t).unwrap(), "OK 2");
    m.quit();
}
