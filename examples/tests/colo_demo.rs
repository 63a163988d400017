//! End to end: `colo-vmm demo --json` as a user runs it: a COLO pair of real processes, a client on one TCP
//! connection through the switch, a side killed, the survivor taking over. Each test asserts the demo's JSON.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::kvm_or_skip;
use serde_json::Value;

/// The demos run one at a time: each is a pair of VMs with heartbeats, and two cores are shared.
static SERIAL: Mutex<()> = Mutex::new(());

/// Small and short: 32 MiB guests, checkpoints every 300 ms, 100 keys.
const QUICK: &[&str] = &[
    "--ram-mib",
    "32",
    "--checkpoint-ms",
    "300",
    "--after-kill-secs",
    "2",
    "--keys",
    "100",
];

/// Run the demo with `args`; returns its exit success and its one JSON object. Kills it after `limit`.
fn demo(args: &[&str], limit: Duration) -> (bool, Value) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new(env!("CARGO_BIN_EXE_colo-vmm"))
        .arg("demo")
        .arg("--json")
        .args(QUICK)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the demo did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap();
    eprintln!("demo {args:?} exited {status} after {:?}: {out}", t0.elapsed());
    let mut objects = serde_json::Deserializer::from_str(&out).into_iter::<Value>();
    let v = objects
        .next()
        .expect("no JSON on stdout")
        .expect("stdout is not JSON");
    assert!(
        objects.next().is_none(),
        "more than one JSON value on stdout: {out}"
    );
    assert!(v.is_object(), "{v}");
    (status.success(), v)
}

/// What every run must show: a consistent store, one connection, no error.
fn assert_clean(ok: bool, v: &Value) {
    assert_eq!(v["state_consistent"], true, "{v}");
    assert_eq!(v["client_errors"], 0, "{v}");
    assert_eq!(v["connection_resets"], 0, "{v}");
    assert_eq!(v["client_reconnects"], 0, "{v}");
    assert_eq!(v["contradictions"].as_array().map(Vec::len), Some(0), "{v}");
    assert!(v["error"].is_null(), "{v}");
    assert!(ok, "the demo exited non-zero: {v}");
    assert!(v["client_requests"].as_u64().unwrap() > 100, "{v}");
    assert_eq!(v["keys_read_back"], 100, "{v}");
}

#[test]
fn the_reference_run_without_colo_is_consistent() {
    if !kvm_or_skip("the_reference_run_without_colo_is_consistent") {
        return;
    }
    let (ok, v) = demo(&["--no-colo"], Duration::from_secs(60));
    assert_clean(ok, &v);
    assert_eq!(v["colo"], false, "{v}");
    assert_eq!(v["killed"], "none", "{v}");
    assert!(v["failover_ms"].is_null(), "{v}");
}

/// The kill happened after the asked number of checkpoints and the survivor failed over.
fn assert_failover(v: &Value, killed: &str, survivor: &str, checkpoints: u64) {
    assert_eq!(v["colo"], true, "{v}");
    assert_eq!(v["killed"], killed, "{v}");
    assert_eq!(v["failover"], true, "{v}");
    assert!(v["failover_ms"].as_f64().is_some(), "{v}");
    assert!(v["takeover_ms"].as_f64().is_some(), "{v}");
    let before = v["checkpoints_before_kill"].as_u64().unwrap();
    assert!(before >= checkpoints, "{v}");
    assert!(v["checkpoints"].as_u64().unwrap() >= before, "{v}");
    assert_eq!(v["survivor"]["side"], survivor, "{v}");
    assert_eq!(v["survivor"]["role"], "primary", "{v}");
    assert_eq!(v["survivor"]["phase"], "alone", "{v}");
    assert!(v["pause_ms_p99"].as_f64().is_some(), "{v}");
}

#[test]
fn primary_killed_the_secondary_takes_over_the_clients_connection() {
    if !kvm_or_skip("primary_killed_the_secondary_takes_over_the_clients_connection") {
        return;
    }
    let (ok, v) = demo(
        &["--kill", "primary", "--checkpoints-before-kill", "3"],
        Duration::from_secs(120),
    );
    assert_clean(ok, &v);
    assert_failover(&v, "primary", "secondary", 3);
    assert_eq!(v["kill_how"], "sigkill", "{v}");
}

#[test]
fn secondary_killed_the_primary_goes_on_alone() {
    if !kvm_or_skip("secondary_killed_the_primary_goes_on_alone") {
        return;
    }
    let (ok, v) = demo(
        &["--kill", "secondary", "--checkpoints-before-kill", "3"],
        Duration::from_secs(120),
    );
    assert_clean(ok, &v);
    assert_failover(&v, "secondary", "primary", 3);
    assert_eq!(v["kill_how"], "sigkill", "{v}");
}

#[test]
fn primary_killed_in_the_middle_of_a_checkpoint() {
    if !kvm_or_skip("primary_killed_in_the_middle_of_a_checkpoint") {
        return;
    }
    let (ok, v) = demo(
        &["--kill-mid-checkpoint", "--checkpoints-before-kill", "3"],
        Duration::from_secs(120),
    );
    assert_clean(ok, &v);
    assert_failover(&v, "primary", "secondary", 3);
    assert_eq!(v["kill_how"], "fault-exit-in-checkpoint", "{v}");
    // The primary died while sending checkpoint 4: the secondary ran on from checkpoint 3, discarding the
    // torn one.
    assert_eq!(v["checkpoints_before_kill"], 3, "{v}");
    assert_eq!(v["survivor"]["epoch"], 3, "{v}");
}

#[test]
fn without_a_kill_the_pair_stays_in_colo() {
    if !kvm_or_skip("without_a_kill_the_pair_stays_in_colo") {
        return;
    }
    let (ok, v) = demo(
        &["--kill", "none", "--checkpoints-before-kill", "3"],
        Duration::from_secs(120),
    );
    assert_clean(ok, &v);
    assert_eq!(v["colo"], true, "{v}");
    assert_eq!(v["killed"], "none", "{v}");
    assert_eq!(v["failover"], false, "{v}");
    assert!(v["checkpoints"].as_u64().unwrap() >= 3, "{v}");
    assert_eq!(v["survivor"]["phase"], "colo", "{v}");
}

#[test]
fn primary_frozen_the_heartbeat_timeout_promotes_the_secondary() {
    if !kvm_or_skip("primary_frozen_the_heartbeat_timeout_promotes_the_secondary") {
        return;
    }
    // SIGSTOP keeps the primary's sockets open: only the heartbeat timeout (1 s) can tell.
    let (ok, v) = demo(
        &["--freeze", "--kill", "primary", "--checkpoints-before-kill", "3"],
        Duration::from_secs(120),
    );
    assert_clean(ok, &v);
    assert_failover(&v, "primary", "secondary", 3);
    assert_eq!(v["kill_how"], "sigstop", "{v}");
    let takeover = v["takeover_ms"].as_f64().unwrap();
    // Heartbeats go every 200 ms (a fifth of the timeout): the last word came at most that long before the
    // stop. A SIGKILL's takeover takes 30-120 ms here.
    assert!(takeover >= 700.0, "promoted before the heartbeat timeout: {v}");
}

#[test]
fn operator_failover_the_secondary_takes_over_and_the_primary_stops() {
    if !kvm_or_skip("operator_failover_the_secondary_takes_over_and_the_primary_stops") {
        return;
    }
    let (ok, v) = demo(
        &[
            "--by-command",
            "--kill",
            "primary",
            "--checkpoints-before-kill",
            "3",
        ],
        Duration::from_secs(120),
    );
    assert_clean(ok, &v);
    assert_failover(&v, "primary", "secondary", 3);
    assert_eq!(v["kill_how"], "failover-command", "{v}");
    assert_eq!(v["survivor"]["failover"]["reason"], "request", "{v}");
    // The primary was told to stop, and did: one guest runs, not two.
    assert_eq!(v["victim"]["alive_at_end"], true, "{v}");
    assert_eq!(v["victim"]["phase"], "stopped", "{v}");
}
