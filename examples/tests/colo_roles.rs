//! The mini-VMM as a COLO pair: two real processes (`--role primary` / `--role secondary`), the switch, and
//! a TCP client speaking to the guest's key-value service through the switch.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colo_vmm::client::{ClientConfig, KvClient};
use colo_vmm::control::{self, Request};
use colo_vmm::switch::{Switch, SwitchHandle};
use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);
const RAM_MIB: &str = "32";

struct Vmm {
    name: &'static str,
    child: Child,
    control: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Vmm {
    fn spawn(dir: &Path, name: &'static str, switch: &Path, extra: &[&str]) -> Self {
        let control = dir.join(format!("{name}.ctl"));
        let disk = disk(dir, &format!("{name}.img"), 8);
        let mut child = Command::new(env!("CARGO_BIN_EXE_colo-vmm"))
            .arg("run")
            .arg("--disk")
            .arg(&disk)
            .arg("--switch")
            .arg(switch)
            .arg("--nic-socket")
            .arg(dir.join(format!("{name}.nic")))
            .arg("--control")
            .arg(&control)
            .args(["--ram-mib", RAM_MIB])
            .args(extra)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (l, stderr) = (log.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
                l.lock().unwrap().push(line);
            }
        });
        let v = Self {
            name,
            child,
            control,
            log,
        };
        let t0 = Instant::now();
        while !v.control.exists() {
            assert!(t0.elapsed() < T, "{name}: no control socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        v
    }

    fn ctl(&self, req: Request) -> Value {
        control::request(&self.control, &req, T).unwrap()
    }

    fn colo(&self) -> Value {
        self.ctl(Request::Status)["colo"].clone()
    }

    /// Polls the status until `pred` holds.
    fn wait_status(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            let st = self.colo();
            if pred(&st) {
                return st;
            }
            assert!(
                t0.elapsed() < timeout,
                "{}: no {what} in {timeout:?}: {st}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn has_log(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                t0.elapsed() < timeout,
                "{} did not exit in {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `quit` answers and the process exits promptly and cleanly.
    fn quit(mut self) {
        let t0 = Instant::now();
        let a = self.ctl(Request::Quit);
        assert_eq!(a["ok"], true, "{a}");
        let st = self.wait_exit(Duration::from_secs(10));
        assert!(st.success(), "{} exit status {st}", self.name);
        eprintln!("{} quit in {:?}", self.name, t0.elapsed());
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

struct Pair {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    sw: SwitchHandle,
    primary: Vmm,
    secondary: Vmm,
}

/// A pair in COLO (checkpoint 1 committed on both sides).
fn pair(extra: &[&str]) -> Pair {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let sw = Switch::spawn(&dir.join("switch")).unwrap();
    let addr = free_addr();
    let mut s_args = vec!["--role", "secondary", "--colo-listen", &addr];
    s_args.extend_from_slice(extra);
    let secondary = Vmm::spawn(&dir, "secondary", sw.path(), &s_args);
    let mut p_args = vec!["--role", "primary", "--colo-peer", &addr];
    p_args.extend_from_slice(extra);
    let primary = Vmm::spawn(&dir, "primary", sw.path(), &p_args);
    for v in [&primary, &secondary] {
        v.wait_status("COLO", T, |s| {
            s["phase"] == "colo" && s["checkpoints"].as_u64() >= Some(1)
        });
    }
    Pair {
        _dir: tmp,
        dir,
        sw,
        primary,
        secondary,
    }
}

/// A client with its own model of the store; every answer is checked.
struct Model {
    c: KvClient,
    store: HashMap<String, String>,
    seq: u64,
    n: u64,
}

impl Model {
    fn connect(p: &Pair) -> Self {
        let c = KvClient::connect(p.sw.path(), &p.dir.join("client"), &ClientConfig::default(), T).unwrap();
        Self {
            c,
            store: HashMap::new(),
            seq: 0,
            n: 0,
        }
    }

    fn set(&mut self, k: &str, v: &str) {
        let a = self.c.request(&format!("SET {k} {v}"), T).unwrap();
        self.seq += 1;
        assert_eq!(a, format!("OK {}", self.seq), "SET {k} {v}");
        self.store.insert(k.into(), v.into());
    }

    /// `n` writes and reads over a working set of 50 keys.
    fn work(&mut self, n: u64) {
        for _ in 0..n {
            let i = self.n;
            self.n += 1;
            let k = format!("k{}", i % 50);
            if i % 3 == 2 {
                let want = self
                    .store
                    .get(&k)
                    .map_or("NONE".to_string(), |v| format!("VAL {v}"));
                assert_eq!(self.c.request(&format!("GET {k}"), T).unwrap(), want, "GET {k}");
            } else {
                self.set(&k, &format!("v{i}"));
            }
        }
    }

    fn check_all(&mut self) {
        let store = self.store.clone();
        for (k, v) in &store {
            assert_eq!(
                self.c.request(&format!("GET {k}"), T).unwrap(),
                format!("VAL {v}")
            );
        }
        let stat = self.c.request("STAT", T).unwrap();
        assert!(
            stat.contains(&format!("seq={} ", self.seq)),
            "{stat} after {} writes",
            self.seq
        );
    }
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[test]
fn checkpoints_run_and_the_client_gets_correct_answers_through_the_pair() {
    if !kvm_or_skip("checkpoints_run_and_the_client_gets_correct_answers_through_the_pair") {
        return;
    }
    let p = pair(&["--checkpoint-ms", "100"]);
    let mut m = Model::connect(&p);
    assert_eq!(m.c.request("PING", T).unwrap(), "PONG");
    m.work(150);
    m.check_all();
    let before = num(&p.primary.colo()["checkpoints"]);
    std::thread::sleep(Duration::from_millis(500));
    let ps = p.primary.colo();
    let ss = p.secondary.colo();
    eprintln!("primary {ps:#}\nsecondary {ss:#}");
    assert!(num(&ps["checkpoints"]) > before + 2, "periodic checkpoints run");
    assert!(num(&ss["checkpoints"]) >= num(&ps["checkpoints"]) - 1);
    assert!(num(&ps["compare"]["released_compared"]) + num(&ps["compare"]["released_at_checkpoint"]) > 100);
    assert!(ps["pause_ms_p99"].as_f64().unwrap() > 0.0);
    assert!(ps["pause_ms_p50"].as_f64().unwrap() <= ps["pause_ms_p99"].as_f64().unwrap());
    assert!(num(&ps["bytes_sent"]) > 100_000, "RAM and state went across");
    assert_eq!(ps["failover"]["state"], "none");
    assert!(p.primary.has_log("COLO: checkpoint"));
    p.primary.quit();
    p.secondary.quit();
}
