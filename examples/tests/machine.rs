//! The machine boots the real guest, pauses, saves and restores.

mod common;

use std::time::Duration;

use colo_vmm::{NetConfig, RunState};
use common::*;

#[test]
fn guest_boots_replays_empty_log_and_idles() {
    if !kvm_or_skip("guest_boots_replays_empty_log_and_idles") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(dir.path(), "disk.img", 4);
    let (mut m, console) = boot(&disk, NetConfig::None, 32);
    console.wait_for("colo-guest: up", Duration::from_secs(10));
    let l = console.wait_for("log replayed", Duration::from_secs(10));
    assert!(l.contains("0 records"), "{l}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(m.run_state(), RunState::Running);
    assert!(m.exit_reason().is_none(), "{:?}", m.exit_reason());
    let st = m.stats();
    assert!(st.vcpu_exits < 200, "an idle guest should exit rarely: {st:?}");
    m.quit();
}
