//! The tap backend, for real use: the guest's service reached by the host kernel's TCP stack through a tap
//! interface inside a network namespace this test creates (and deletes).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use colo_vmm::NetConfig;
use common::*;

struct Netns(String);

impl Netns {
    fn create(name: &str) -> Option<Self> {
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .ok()?
            .success();
        ok.then(|| Self(name.to_string()))
    }

    fn ip(&self, args: &[&str]) {
        let st = Command::new("ip")
            .arg("-n")
            .arg(&self.0)
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ip -n {} {args:?}", self.0);
    }

    /// Move the calling thread into the namespace.
    fn enter(&self) {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.0)).unwrap();
        // SAFETY: setns on a valid namespace fd only changes this thread's network namespace.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn kv_service_over_a_tap_in_a_private_network_namespace() {
    if !kvm_or_skip("kv_service_over_a_tap_in_a_private_network_namespace") {
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIPPED: kv_service_over_a_tap_in_a_private_network_namespace: /dev/net/tun is missing");
        return;
    }
    let name = format!("colovmm{}", std::process::id());
    let Some(ns) = Netns::create(&name) else {
        eprintln!(
            "SKIPPED: kv_service_over_a_tap_in_a_private_network_namespace: cannot create a network namespace (needs root and iproute2)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(dir.path(), "disk.img", 4);
    // Everything network-facing happens on a thread that lives in the namespace.
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter();
            let (m, console) = boot(&disk, NetConfig::Tap("colotap0".into()), 32);
            ns.ip(&["addr", "add", "10.0.2.1/24", "dev", "colotap0"]);
            ns.ip(&["link", "set", "colotap0", "up"]);
            console.wait_for("log replayed", Duration::from_secs(10));
            let mut stream = None;
            for _ in 0..100 {
                match TcpStream::connect_timeout(&"10.0.2.15:7000".parse().unwrap(), Duration::from_secs(1)) {
                    Ok(st) => {
                        stream = Some(st);
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
            let stream = stream.expect("connecting to the guest through the tap");
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut w = stream.try_clone().unwrap();
            let mut r = BufReader::new(stream);
            let mut ask = |q: &str| {
                writeln!(w, "{q}").unwrap();
                let mut l = String::new();
                r.read_line(&mut l).unwrap();
                l.trim_end().to_string()
            };
            assert_eq!(ask("PING"), "PONG");
            for i in 0..20 {
                assert_eq!(ask(&format!("SET t{i} v{i}")), format!("OK {}", i + 1));
            }
            for i in 0..20 {
                assert_eq!(ask(&format!("GET t{i}")), format!("VAL v{i}"));
            }
            m.quit();
        });
    });
}
