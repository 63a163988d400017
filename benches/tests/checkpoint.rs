//! End to end: the checkpoint benchmark binary runs a tiny KVM guest (16 MiB, 2 checkpoints) as a primary
//! and secondary process pair, with and without pre-copy, and must end with equal memories (the binary
//! checks a CRC32 of both guest memories and fails loudly otherwise). Prints SKIPPED where /dev/kvm is
//! missing.

use std::process::Command;

fn run(extra: &[&str]) -> Option<serde_json::Value> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm is missing; the checkpoint benchmark did not run");
        return None;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_colo-bench"))
        .args([
            "checkpoint",
            "--mem",
            "16M",
            "--dirty-pct",
            "10",
            "--checkpoints",
            "2",
            "--json",
        ])
        .args(extra)
        .output()
        .expect("running colo-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "colo-bench failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_str(stdout.trim()).expect("one JSON object"))
}

fn check(report: &serde_json::Value, precopy: bool) {
    assert_eq!(report["memory_equal"], true);
    assert_eq!(report["checkpoints"], 2);
    assert_eq!(report["precopy"], precopy);
    // 10% of 16 MiB: 410 pages a checkpoint, at least that many moved, each measured against references.
    assert_eq!(report["dirty_pages_per_epoch"], 410);
    let per = report["per_checkpoint"]
        .as_array()
        .expect("per-checkpoint records");
    assert_eq!(per.len(), 3);
    for r in &per[1..] {
        assert!(r["data_pages"].as_u64().unwrap() >= 410, "{r}");
        assert!(r["raw_tcp_ns"].as_u64().unwrap() > 0, "{r}");
        assert!(r["flushed_pages"].as_u64().unwrap() >= 410, "{r}");
    }
    for key in [
        "pause_ms_p50",
        "pause_ms_p99",
        "data_movement_ms",
        "stream_gbps",
        "raw_tcp_gbps",
        "raw_tcp_split_gbps",
    ] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key} in {report}");
    }
    for side in [
        "stream_send",
        "stream_collect",
        "raw_send",
        "gather_ref",
        "stream_receive",
        "raw_receive",
    ] {
        assert!(
            report["cpu_ns_per_kib"][side].as_f64().unwrap() > 0.0,
            "{side} in {report}"
        );
    }
}

#[test]
fn tiny_checkpoint_benchmark_ends_with_equal_memories() {
    if let Some(r) = run(&[]) {
        check(&r, true);
        // The hot pages were written again during pre-copy: the pause must have carried them.
        assert!(r["paused_data_mib"].as_f64().unwrap() > 0.0, "{r}");
    }
}

#[test]
fn tiny_stop_and_copy_benchmark_ends_with_equal_memories() {
    // Also the secondary's other receive mode (reader thread and store pipelined) and a huge-page RAM cache.
    let flags = [
        "--no-precopy",
        "--log",
        "plain",
        "--receive-threads",
        "2",
        "--cache-huge-pages",
    ];
    if let Some(r) = run(&flags) {
        check(&r, false);
    }
}
