//! The mini-VMM as a COLO pair: two real processes (`--role primary` / `--role secondary`), the switch, and
//! a TCP client speaking to the guest's key-value service through the switch.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use colo_vmm::client::{ClientConfig, KvClient};
use colo_vmm::control::Request;
use colo_vmm::switch::{Switch, SwitchHandle};
use common::process::VmmProcess;
use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);
const RAM_MIB: u64 = 32;

type Vmm = VmmProcess;

fn spawn_on(dir: &Path, name: &str, switch: &Path, disk: &Path, extra: &[&str]) -> Vmm {
    Vmm::spawn(dir, name, switch, disk, RAM_MIB, extra)
}

/// The COLO part of a VMM's status.
trait ColoStatus {
    fn colo(&self) -> Value;
    /// Polls the status until `pred` holds.
    fn wait_status(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value;
}

impl ColoStatus for Vmm {
    fn colo(&self) -> Value {
        self.ctl(Request::Status)["colo"].clone()
    }

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
    let sw = Switch::spawn(&tmp.path().join("switch")).unwrap();
    pair_in(tmp, sw, extra)
}

/// A pair on `primary.img` and `secondary.img` in `tmp` (fresh zero images unless they exist).
fn pair_in(tmp: tempfile::TempDir, sw: SwitchHandle, extra: &[&str]) -> Pair {
    let dir = tmp.path().to_path_buf();
    let image = |name: &str| {
        let p = dir.join(format!("{name}.img"));
        if !p.exists() {
            disk(&dir, &format!("{name}.img"), 8);
        }
        p
    };
    // Port 0: the secondary picks a free port and its status names it (no race with other tests).
    let mut s_args = vec!["--role", "secondary", "--colo-listen", "127.0.0.1:0"];
    s_args.extend_from_slice(extra);
    let secondary = spawn_on(&dir, "secondary", sw.path(), &image("secondary"), &s_args);
    let st = secondary.wait_status("listening address", T, |s| s["listen"].is_string());
    assert_eq!(st["phase"], "listening");
    let addr = st["listen"].as_str().unwrap().to_string();
    let mut p_args = vec!["--role", "primary", "--colo-peer", &addr];
    p_args.extend_from_slice(extra);
    let primary = spawn_on(&dir, "primary", sw.path(), &image("primary"), &p_args);
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
        Self::connect_to(p.sw.path(), &p.dir.join("client"))
    }

    fn connect_to(switch: &Path, port: &Path) -> Self {
        let c = KvClient::connect(switch, port, &ClientConfig::default(), T).unwrap();
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

#[test]
fn failover_command_on_the_secondary_stops_the_primary_and_the_same_connection_continues() {
    if !kvm_or_skip("failover_command_on_the_secondary_stops_the_primary_and_the_same_connection_continues") {
        return;
    }
    let p = pair(&["--checkpoint-ms", "200"]);
    let mut m = Model::connect(&p);
    m.work(60);
    let a = p.secondary.ctl(Request::Failover);
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["phase"], "alone", "{a}");
    let ss = p.secondary.colo();
    assert_eq!(ss["node_role"], "primary", "{ss}");
    assert_eq!(ss["failover"]["reason"], "request", "{ss}");
    // The old primary stopped before the secondary took over, and stays stopped.
    let ps = p
        .primary
        .wait_status("stopped primary", T, |s| s["phase"] == "stopped");
    assert!(
        ps["failover"]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("takes over"),
        "{ps}"
    );
    assert_eq!(p.primary.ctl(Request::Status)["state"], "paused");
    // The same TCP connection goes on, answered by the promoted guest, with every earlier write there.
    m.work(60);
    m.check_all();
    assert!(p.secondary.has_log("COLO: promoted"));
    // A second failover is refused and changes nothing.
    assert_eq!(p.secondary.ctl(Request::Failover)["ok"], false);
    p.primary.quit();
    p.secondary.quit();
}

#[test]
fn failover_command_on_the_primary_stops_the_secondary_and_the_primary_goes_on() {
    if !kvm_or_skip("failover_command_on_the_primary_stops_the_secondary_and_the_primary_goes_on") {
        return;
    }
    let p = pair(&["--checkpoint-ms", "200"]);
    let mut m = Model::connect(&p);
    m.work(30);
    let a = p.primary.ctl(Request::Failover);
    assert_eq!(a["ok"], true, "{a}");
    p.secondary
        .wait_status("stopped secondary", T, |s| s["phase"] == "stopped");
    assert_eq!(p.primary.colo()["phase"], "alone");
    m.work(30);
    m.check_all();
    p.secondary.quit();
    p.primary.quit();
}

#[test]
fn secondary_killed_the_primary_goes_on_alone_and_releases_queued_output() {
    if !kvm_or_skip("secondary_killed_the_primary_goes_on_alone_and_releases_queued_output") {
        return;
    }
    // Long interval: output waits in the comparator unless the secondary's copy matches it.
    let mut p = pair(&["--checkpoint-ms", "60000", "--heartbeat-timeout-ms", "500"]);
    let mut m = Model::connect(&p);
    m.work(40);
    p.secondary.kill();
    let t0 = Instant::now();
    // Requests sent now are answered once the primary has given the secondary up.
    m.work(40);
    eprintln!("first answers after the kill within {:?}", t0.elapsed());
    let ps = p.primary.wait_status("alone", T, |s| s["phase"] == "alone");
    assert_eq!(ps["failover"]["state"], "completed", "{ps}");
    assert_eq!(ps["failover"]["reason"], "error", "{ps}");
    assert!(p.primary.has_log("COLO: continuing alone"));
    m.check_all();
    p.primary.quit();
}

#[test]
fn guest_shutdown_on_the_primary_is_mirrored_and_both_exit() {
    if !kvm_or_skip("guest_shutdown_on_the_primary_is_mirrored_and_both_exit") {
        return;
    }
    let mut p = pair(&["--checkpoint-ms", "200"]);
    let mut m = Model::connect(&p);
    m.work(10);
    let _ = m.c.request("POWEROFF", Duration::from_secs(5));
    let ps = p.primary.wait_exit(T);
    let ss = p.secondary.wait_exit(T);
    assert!(ps.success() && ss.success(), "primary {ps}, secondary {ss}");
    assert!(p.secondary.has_log("shut down on the primary"));
}

#[test]
fn quitting_either_side_of_an_active_pair_never_hangs() {
    if !kvm_or_skip("quitting_either_side_of_an_active_pair_never_hangs") {
        return;
    }
    // Quitting the primary: the secondary sees the link go and takes over.
    let p = pair(&["--checkpoint-ms", "50"]);
    let mut m = Model::connect(&p);
    m.work(20);
    let Pair {
        primary, secondary, ..
    } = p;
    primary.quit();
    secondary.wait_status("takeover", T, |s| s["phase"] == "alone");
    m.work(20);
    m.check_all();
    secondary.quit();
    // Quitting the secondary: the primary goes on alone; then it quits too.
    let p = pair(&["--checkpoint-ms", "50"]);
    let Pair {
        primary, secondary, ..
    } = p;
    secondary.quit();
    primary.wait_status("alone", T, |s| s["phase"] == "alone");
    primary.quit();
}

#[test]
fn set_interval_takes_effect_and_checkpoint_runs_one_now() {
    if !kvm_or_skip("set_interval_takes_effect_and_checkpoint_runs_one_now") {
        return;
    }
    let p = pair(&["--checkpoint-ms", "60000"]);
    let c0 = num(&p.primary.colo()["checkpoints"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        num(&p.primary.colo()["checkpoints"]),
        c0,
        "no periodic checkpoint at 60 s"
    );
    let a = p.primary.ctl(Request::Checkpoint);
    assert_eq!(a["ok"], true, "{a}");
    p.primary
        .wait_status("commanded checkpoint", T, |s| num(&s["checkpoints"]) > c0);
    let a = p.primary.ctl(Request::SetInterval { ms: 50 });
    assert_eq!(a["ok"], true, "{a}");
    let st = p.primary.colo();
    assert_eq!(st["interval_ms"], 50);
    let c1 = num(&st["checkpoints"]);
    std::thread::sleep(Duration::from_millis(1000));
    let c2 = num(&p.primary.colo()["checkpoints"]);
    assert!(c2 >= c1 + 5, "{c1} -> {c2} checkpoints in 1 s at 50 ms");
    // The secondary refuses what only the primary can do; a bad interval is refused.
    assert_eq!(p.secondary.ctl(Request::SetInterval { ms: 10 })["ok"], false);
    assert_eq!(p.secondary.ctl(Request::Checkpoint)["ok"], false);
    assert_eq!(p.primary.ctl(Request::SetInterval { ms: 0 })["ok"], false);
    p.primary.quit();
    p.secondary.quit();
}

#[test]
fn the_secondary_gets_the_primarys_disk_and_after_a_failover_its_image_holds_every_write() {
    if !kvm_or_skip("the_secondary_gets_the_primarys_disk_and_after_a_failover_its_image_holds_every_write") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let sw = Switch::spawn(&dir.join("switch")).unwrap();
    // Before COLO: the guest runs alone on the primary's image and writes 40 records.
    let img = disk(&dir, "primary.img", 8);
    disk(&dir, "secondary.img", 8);
    let alone = spawn_on(&dir, "alone", sw.path(), &img, &[]);
    let t0 = Instant::now();
    while !alone.has_log("log replayed") {
        assert!(t0.elapsed() < T, "the lone guest did not boot");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut m = Model::connect_to(sw.path(), &dir.join("client0"));
    for i in 0..40 {
        m.set(&format!("old{i}"), &format!("o{i}"));
    }
    drop(m.c);
    alone.quit();
    // The pair: the secondary's image is all zeros; the initial sync copies the primary's.
    let p = pair_in(tmp, sw, &["--checkpoint-ms", "100"]);
    let mut m2 = Model::connect(&p);
    m2.seq = 40;
    m2.work(60);
    // The primary dies; the promoted secondary goes on writing on its own image.
    let Pair {
        _dir: tmp,
        dir,
        sw,
        mut primary,
        secondary,
    } = p;
    primary.kill();
    m2.work(60);
    secondary.quit();
    drop(m2.c);
    // A fresh VMM on the secondary's image replays the log: the old records and every COLO write.
    let after = spawn_on(&dir, "after", sw.path(), &dir.join("secondary.img"), &[]);
    let t0 = Instant::now();
    let replayed = loop {
        if let Some(l) = after
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("log replayed"))
        {
            break l.clone();
        }
        assert!(
            t0.elapsed() < T,
            "the guest did not boot on the secondary's image"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(replayed.contains(&format!("{} records", m2.seq)), "{replayed}");
    let mut m3 = Model::connect_to(sw.path(), &dir.join("client3"));
    m3.seq = m2.seq;
    m3.store = m2.store.clone();
    for i in 0..40 {
        m3.store.insert(format!("old{i}"), format!("o{i}"));
    }
    m3.check_all();
    after.quit();
    drop(tmp);
}

#[test]
fn a_full_disk_epoch_holds_the_write_until_a_forced_checkpoint_and_nothing_is_lost() {
    if !kvm_or_skip("a_full_disk_epoch_holds_the_write_until_a_forced_checkpoint_and_nothing_is_lost") {
        return;
    }
    // Two 4 KiB blocks per epoch: the log's writes fill an epoch every few SETs. No periodic checkpoint.
    let p = pair(&["--checkpoint-ms", "60000", "--overlay-blocks", "2"]);
    let c0 = num(&p.primary.colo()["checkpoints"]);
    let mut m = Model::connect(&p);
    m.work(150);
    m.check_all();
    let st = p.primary.colo();
    assert!(num(&st["checkpoints"]) > c0 + 3, "forced checkpoints: {st}");
    assert!(
        p.primary.has_log("(disk epoch full)") || p.primary.has_log("secondary asked"),
        "a checkpoint was started by the disk"
    );
    p.primary.quit();
    p.secondary.quit();
}

/// A witness arbiter on loopback and the `--arbiter` value that names it.
fn witness() -> (colo_failover::witness::WitnessHandle, String) {
    use colo_failover::witness::{WitnessConfig, WitnessServer};
    let w = WitnessServer::bind_fresh("127.0.0.1:0", WitnessConfig::default())
        .unwrap()
        .spawn()
        .unwrap();
    let arb = format!("witness={}", w.addr());
    (w, arb)
}

#[test]
fn with_a_witness_the_promoted_secondary_holds_the_lease() {
    if !kvm_or_skip("with_a_witness_the_promoted_secondary_holds_the_lease") {
        return;
    }
    let (w, arb) = witness();
    let p = pair(&["--checkpoint-ms", "200", "--arbiter", &arb]);
    assert!(!p.primary.has_log("NO ARBITER"));
    let mut m = Model::connect(&p);
    m.work(30);
    assert_eq!(
        w.holder(),
        None,
        "nobody holds the lease while the pair is healthy"
    );
    let a = p.secondary.ctl(Request::Failover);
    assert_eq!(a["ok"], true, "{a}");
    let (holder, token, _) = w.holder().expect("a holder");
    assert_eq!(holder, "secondary");
    assert_eq!(p.secondary.colo()["failover"]["token"], token.0);
    p.primary
        .wait_status("stopped primary", T, |s| s["phase"] == "stopped");
    m.work(30);
    m.check_all();
    p.primary.quit();
    p.secondary.quit();
}

#[cfg(feature = "etcd")]
#[path = "../../colo-failover/tests/common/etcd_process.rs"]
mod etcd_process;

#[cfg(feature = "etcd")]
#[test]
fn with_etcd_the_promoted_secondary_holds_the_pairs_key() {
    use colo_failover::etcd::{EtcdArbiter, EtcdConfig};
    use colo_failover::{Arbiter, Decision};
    if !kvm_or_skip("with_etcd_the_promoted_secondary_holds_the_pairs_key") {
        return;
    }
    let Some(etcd) = etcd_process::EtcdProcess::start("with_etcd_the_promoted_secondary_holds_the_pairs_key")
    else {
        return;
    };
    let key = "/colo-vmm/test-pair";
    // A third contender for the pair's key, as another node of a confused operator would be.
    let mut intruder = EtcdArbiter::connect(EtcdConfig {
        endpoints: vec![etcd.url.clone()],
        key: key.into(),
        node: "intruder".into(),
        ttl_secs: 1,
        timeout: Duration::from_secs(2),
    })
    .unwrap();
    let arb = format!("etcd={}", etcd.url);
    let p = pair(&["--checkpoint-ms", "200", "--arbiter", &arb, "--arbiter-key", key]);
    assert!(!p.primary.has_log("NO ARBITER"));
    let mut m = Model::connect(&p);
    m.work(30);
    let a = p.secondary.ctl(Request::Failover);
    assert_eq!(a["ok"], true, "{a}");
    p.primary
        .wait_status("stopped primary", T, |s| s["phase"] == "stopped");
    let token = p.secondary.colo()["failover"]["token"].as_u64().unwrap();
    assert!(
        token > 0,
        "the promoted secondary runs with an etcd fencing token"
    );
    // The promoted secondary holds the key and keeps its lease (3 s) alive: for more than two lease times
    // nobody else gets it.
    for _ in 0..8 {
        assert!(
            matches!(intruder.acquire(), Ok(Decision::Denied { .. })),
            "the key is held"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    m.work(30);
    m.check_all();
    p.primary.quit();
    p.secondary.quit();
}

#[test]
fn a_frozen_secondary_is_given_up_after_the_heartbeat_timeout() {
    if !kvm_or_skip("a_frozen_secondary_is_given_up_after_the_heartbeat_timeout") {
        return;
    }
    let mut p = pair(&["--checkpoint-ms", "50", "--heartbeat-timeout-ms", "500"]);
    let mut m = Model::connect(&p);
    m.work(30);
    let pid = p.secondary.child.id() as libc::pid_t;
    // SAFETY: plain kill(2) on our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let t0 = Instant::now();
    m.work(30);
    let ps = p.primary.wait_status("alone", T, |s| s["phase"] == "alone");
    eprintln!(
        "the primary went on alone within {:?}: {}",
        t0.elapsed(),
        ps["failover"]
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    m.check_all();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    p.secondary.kill();
    p.primary.quit();
}

#[test]
fn quit_before_the_pair_exists_is_prompt_and_clean() {
    if !kvm_or_skip("quit_before_the_pair_exists_is_prompt_and_clean") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sw = Switch::spawn(&dir.join("switch")).unwrap();
    let img = disk(dir, "s.img", 8);
    let s = spawn_on(
        dir,
        "secondary",
        sw.path(),
        &img,
        &["--role", "secondary", "--colo-listen", "127.0.0.1:0"],
    );
    let st = s.wait_status("listening", T, |s| s["listen"].is_string());
    // A primary whose secondary never answers keeps trying; quit stops it.
    let img = disk(dir, "p.img", 8);
    let p = spawn_on(
        dir,
        "primary",
        sw.path(),
        &img,
        &["--role", "primary", "--colo-peer", "127.0.0.1:1"],
    );
    assert_eq!(p.colo()["phase"], "connecting");
    assert_eq!(p.ctl(Request::Failover)["ok"], false, "no pair yet");
    p.quit();
    assert_eq!(st["phase"], "listening");
    s.quit();
}

#[test]
fn primary_killed_in_the_middle_of_a_checkpoint_the_secondary_takes_over_from_the_last_one() {
    if !kvm_or_skip("primary_killed_in_the_middle_of_a_checkpoint_the_secondary_takes_over_from_the_last_one")
    {
        return;
    }
    // The primary dies by SIGKILL after sending about half of checkpoint 8's pages, while the client works.
    let mut p = pair(&["--checkpoint-ms", "100", "--fault-exit-in-checkpoint", "8"]);
    let mut m = Model::connect(&p);
    let t0 = Instant::now();
    while p.primary.child.try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < T, "the primary did not reach checkpoint 8");
        m.work(5);
    }
    assert!(
        p.primary
            .has_log("fault injection: dying by SIGKILL in checkpoint 8")
    );
    // The same connection goes on: the secondary promoted from checkpoint 7 (the torn checkpoint 8 is
    // dropped) and no acknowledged write is missing, no answer contradicted.
    m.work(60);
    m.check_all();
    let ss = p.secondary.wait_status("takeover", T, |s| s["phase"] == "alone");
    assert!(num(&ss["checkpoints"]) >= 7, "{ss}");
    assert_eq!(ss["node_role"], "primary", "{ss}");
    assert!(p.secondary.has_log("COLO: promoted"));
    p.secondary.quit();
}

#[test]
fn a_promoted_secondary_that_cannot_reach_the_switch_keeps_the_guest_and_attaches_later() {
    if !kvm_or_skip("a_promoted_secondary_that_cannot_reach_the_switch_keeps_the_guest_and_attaches_later") {
        return;
    }
    let p = pair(&["--checkpoint-ms", "100"]);
    let mut m = Model::connect(&p);
    m.work(30);
    let Pair {
        _dir: tmp,
        dir,
        sw,
        mut primary,
        mut secondary,
    } = p;
    // The client network goes away, then the primary dies: the secondary promotes with no switch to join.
    let sw_path = sw.path().to_path_buf();
    drop(sw);
    primary.kill();
    let st = secondary.wait_status("takeover", T, |s| s["phase"] == "alone");
    assert_eq!(st["extra"]["switch_attach_pending"], true, "{st}");
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        secondary.child.try_wait().unwrap().is_none(),
        "the only copy of the guest left must not die with its switch port"
    );
    // The switch comes back: the promoted guest joins it and serves a new connection with every write.
    let sw = Switch::spawn(&sw_path).unwrap();
    secondary.wait_status("attached", T, |s| s["extra"]["switch_attach_pending"] == false);
    assert!(secondary.has_log("NIC is on the switch"));
    let mut m2 = Model::connect_to(sw.path(), &dir.join("client2"));
    m2.seq = m.seq;
    m2.store = m.store.clone();
    m2.check_all();
    m2.work(30);
    m2.check_all();
    secondary.quit();
    drop(tmp);
}

/// A secondary on a fresh image in `p`'s directory, listening on a free port; returns it and its address.
fn new_secondary(p: &Pair, name: &str, extra: &[&str]) -> (Vmm, String) {
    let image = disk(&p.dir, &format!("{name}.img"), 8);
    let mut args = vec!["--role", "secondary", "--colo-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let s = spawn_on(&p.dir, name, p.sw.path(), &image, &args);
    let st = s.wait_status("listening address", T, |s| s["listen"].is_string());
    let addr = st["listen"].as_str().unwrap().to_string();
    (s, addr)
}

/// A pair loses its secondary (killed, or `failover` on the primary when `by_command`), the primary runs
/// alone, a new secondary on a zero image is protected with `protect`, checkpoints resume with the client
/// checked throughout; then the primary is killed and the new secondary takes over. Returns the new
/// secondary's status after the takeover and the primary's token while it ran alone.
fn reprotect_then_take_over(name: &str, by_command: bool, extra: &[&str]) -> (Value, Value) {
    let mut args = vec!["--checkpoint-ms", "200", "--heartbeat-timeout-ms", "500"];
    args.extend_from_slice(extra);
    let mut p = pair(&args);
    let mut m = Model::connect(&p);
    m.work(40);
    if by_command {
        let a = p.primary.ctl(Request::Failover);
        assert_eq!(a["ok"], true, "{name}: {a}");
        p.secondary
            .wait_status("stopped secondary", T, |s| s["phase"] == "stopped");
    } else {
        p.secondary.kill();
    }
    m.work(40);
    let ps = p.primary.wait_status("alone", T, |s| s["phase"] == "alone");
    let (checkpoints_alone, token_alone) = (num(&ps["checkpoints"]), ps["failover"]["token"].clone());
    // Protect is refused where it makes no sense, changing nothing.
    let (s2, addr) = new_secondary(&p, "secondary2", &args);
    let refused = s2.ctl(Request::Protect { peer: addr.clone() });
    assert_eq!(refused["ok"], false, "{name}: {refused}");
    // The new secondary: full RAM and disk sync while the client keeps going, then checkpoints again.
    let a = p.primary.ctl(Request::Protect { peer: addr });
    assert_eq!(a["ok"], true, "{name}: {a}");
    m.work(40);
    for v in [&p.primary, &s2] {
        v.wait_status("COLO with the new secondary", T, |s| {
            s["phase"] == "colo" && s["epoch"].as_u64() >= Some(3)
        });
    }
    let again = p.primary.ctl(Request::Protect {
        peer: "127.0.0.1:1".into(),
    });
    assert_eq!(again["ok"], false, "{name}: protect while protected: {again}");
    m.work(60);
    m.check_all();
    let ps = p.primary.colo();
    let ss = s2.colo();
    eprintln!("{name}: primary {ps:#}\nnew secondary {ss:#}");
    assert_eq!(ps["failover"]["state"], "none", "{ps}");
    assert!(num(&ps["checkpoints"]) >= checkpoints_alone + 3);
    assert!(num(&ps["compare"]["released_compared"]) + num(&ps["compare"]["released_at_checkpoint"]) > 0);
    assert!(p.primary.has_log("COLO: protecting the guest again"));
    // The primary dies: the new secondary takes over from its last checkpoint, same client connection.
    p.primary.kill();
    m.work(40);
    let ss = s2.wait_status("promoted", T, |s| s["phase"] == "alone");
    assert_eq!(ss["node_role"], "primary", "{ss}");
    m.check_all();
    assert!(s2.has_log("COLO: promoted"));
    s2.quit();
    (ss, token_alone)
}

#[test]
fn a_primary_alone_is_protected_again_by_a_new_secondary_which_takes_over_when_the_primary_dies() {
    let name = "a_primary_alone_is_protected_again_by_a_new_secondary_which_takes_over_when_the_primary_dies";
    if !kvm_or_skip(name) {
        return;
    }
    reprotect_then_take_over(name, false, &[]);
}

#[test]
fn with_a_witness_a_reprotected_primary_keeps_its_lease_and_the_new_secondary_wins_the_next_token() {
    let name =
        "with_a_witness_a_reprotected_primary_keeps_its_lease_and_the_new_secondary_wins_the_next_token";
    if !kvm_or_skip(name) {
        return;
    }
    let (w, arb) = witness();
    // The operator fails over on the primary (it wins the lease), then protects it again; when it dies the
    // new secondary is refused until the dead primary's lease runs out (3 s), then wins.
    let (ss, token_alone) = reprotect_then_take_over(name, true, &["--arbiter", &arb]);
    let token_alone = token_alone.as_u64().expect("the primary held the lease alone");
    let (holder, token, _) = w.holder().expect("a holder");
    assert_eq!(holder, "secondary");
    assert!(token.0 > token_alone, "{} after {token_alone}", token.0);
    assert_eq!(ss["failover"]["token"], token.0);
}
