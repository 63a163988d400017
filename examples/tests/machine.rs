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

/// A client's view of the store: every answer is checked against it.
#[derive(Default)]
pub struct Model(pub std::collections::HashMap<String, String>);

#[test]
fn kv_service_answers_over_tcp_through_the_switch_and_survives_reboot() {
    if !kvm_or_skip("kv_service_answers_over_tcp_through_the_switch_and_survives_reboot") {
        return;
    }
    use colo_vmm::client::{ClientConfig, KvClient};
    use colo_vmm::switch::Switch;
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(dir.path(), "disk.img", 4);
    let sw = Switch::spawn(&dir.path().join("switch")).unwrap();
    let net = || NetConfig::Switch {
        switch: sw.path().to_path_buf(),
        local: dir.path().join("vm0"),
    };
    let t = Duration::from_secs(10);
    let mut model = Model::default();
    {
        let (mut m, console) = boot(&disk, net(), 32);
        console.wait_for("log replayed", t);
        let mut c =
            KvClient::connect(sw.path(), &dir.path().join("c0"), &ClientConfig::default(), t).unwrap();
        assert_eq!(c.request("PING", t).unwrap(), "PONG");
        assert_eq!(c.request("GET nothing", t).unwrap(), "NONE");
        for i in 0..200u32 {
            let (k, v) = (
                format!("k{}", i % 37),
                format!("value-{i}-{}", "x".repeat((i % 50) as usize)),
            );
            let a = c.request(&format!("SET {k} {v}"), t).unwrap();
            assert_eq!(a, format!("OK {}", i + 1));
            model.0.insert(k, v);
        }
        assert_eq!(c.request("DEL k3", t).unwrap(), "OK 201");
        model.0.remove("k3");
        assert_eq!(c.request("DEL k3", t).unwrap(), "NONE");
        for (k, v) in &model.0 {
            assert_eq!(c.request(&format!("GET {k}"), t).unwrap(), format!("VAL {v}"));
        }
        assert!(c.request("FROB", t).unwrap().starts_with("ERR"));
        let stat = c.request("STAT", t).unwrap();
        assert!(
            stat.starts_with(&format!("STAT keys={} seq=201 tsc=", model.0.len())),
            "{stat}"
        );
        c.close(t);
        m.quit();
    }
    // A fresh boot on the same disk replays the log: the store is intact.
    let (mut m, console) = boot(&disk, net(), 32);
    let l = console.wait_for("log replayed", t);
    assert!(l.contains("201 records"), "{l}");
    let mut c = KvClient::connect(sw.path(), &dir.path().join("c1"), &ClientConfig::default(), t).unwrap();
    for (k, v) in &model.0 {
        assert_eq!(c.request(&format!("GET {k}"), t).unwrap(), format!("VAL {v}"));
    }
    assert_eq!(c.request("GET k3", t).unwrap(), "NONE");
    m.quit();
}
