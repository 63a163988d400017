//! A throwaway etcd server on loopback for tests (colo-failover's, and colo-vmm's, which includes this file
//! by path).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Finds `name` on PATH.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether we run under CI (`CI=true`), where a missing tool is a failure, not a skip.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    l.local_addr().expect("local addr").port()
}

/// An etcd server started by the test, killed and reaped on drop.
pub struct EtcdProcess {
    child: Child,
    /// The client URL.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl EtcdProcess {
    /// Starts a single-node etcd on free loopback ports with a temp data dir and waits until it is healthy.
    /// Returns `None` (after a LOUD skip line) when etcd is not installed and `CI` is not `true`; panics under
    /// CI.
    pub fn start(test: &str) -> Option<EtcdProcess> {
        let Some(bin) = find_on_path("etcd") else {
            if under_ci() {
                panic!("{test}: etcd is not on PATH but CI=true: install Debian's etcd-server package");
            }
            eprintln!("SKIPPED: {test}: etcd is not on PATH (install etcd-server; under CI=true this fails)");
            return None;
        };
        let mut last_err = String::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("temp dir");
            let (client, peer) = (free_port(), free_port());
            let url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log file");
            let child = Command::new(&bin)
                .args(["--name", "t", "--data-dir"])
                .arg(dir.path().join("data"))
                .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
                .args([
                    "--listen-peer-urls",
                    &peer_url,
                    "--initial-advertise-peer-urls",
                    &peer_url,
                ])
                .args([
                    "--initial-cluster",
                    &format!("t={peer_url}"),
                    "--initial-cluster-state",
                    "new",
                ])
                .args(["--listen-metrics-urls", "", "--log-level", "warn"])
                .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn etcd");
            let mut p = EtcdProcess {
                child,
                url,
                _dir: dir,
            };
            match p.wait_healthy(client, Duration::from_secs(10)) {
                Ok(()) => return Some(p),
                Err(e) => last_err = e, // dropped: killed and reaped; retry on other ports
            }
        }
        panic!("{test}: etcd did not become healthy: {last_err}");
    }

    fn wait_healthy(&mut self, port: u16, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("etcd exited early with {status}"));
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let _ = s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
                let mut body = String::new();
                let _ = s.read_to_string(&mut body);
                if body.contains("\"health\":\"true\"") {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("timed out waiting for /health".into())
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
