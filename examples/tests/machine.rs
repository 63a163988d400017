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
    let (m, console) = boot(&disk, NetConfig::None, 32);
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
        let (m, console) = boot(&disk, net(), 32);
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
    let (m, console) = boot(&disk, net(), 32);
    let l = console.wait_for("log replayed", t);
    assert!(l.contains("201 records"), "{l}");
    let mut c = KvClient::connect(sw.path(), &dir.path().join("c1"), &ClientConfig::default(), t).unwrap();
    for (k, v) in &model.0 {
        assert_eq!(c.request(&format!("GET {k}"), t).unwrap(), format!("VAL {v}"));
    }
    assert_eq!(c.request("GET k3", t).unwrap(), "NONE");
    // The guest powers off on request, after its answer went out.
    assert_eq!(c.request("POWEROFF", t).unwrap(), "BYE");
    assert_eq!(m.wait_exit(t), Some(colo_vmm::vm::GuestExit::PowerOff(0)));
    m.quit();
}

/// Copy all of `from`'s RAM into `to`.
fn copy_ram(from: &colo_vmm::Machine, to: &colo_vmm::Machine) {
    use vm_memory::{Bytes, GuestAddress};
    let size = colo_vmm::memory::ram_size(from.ram());
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..size).step_by(buf.len()) {
        from.ram().read_slice(&mut buf, GuestAddress(off)).unwrap();
        to.ram().write_slice(&buf, GuestAddress(off)).unwrap();
    }
}

#[test]
fn vcpu_and_device_state_move_to_a_second_vm_and_the_tcp_connection_survives() {
    if !kvm_or_skip("vcpu_and_device_state_move_to_a_second_vm_and_the_tcp_connection_survives") {
        return;
    }
    use colo_vmm::client::{ClientConfig, KvClient};
    use colo_vmm::switch::Switch;
    use colo_vmm::{Machine, MachineConfig, MachineState};
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(dir.path(), "disk.img", 4);
    let sw = Switch::spawn(&dir.path().join("switch")).unwrap();
    let t = Duration::from_secs(10);
    let net = |n: &str| NetConfig::Switch {
        switch: sw.path().to_path_buf(),
        local: dir.path().join(n),
    };
    let (a, console) = boot(&disk, net("vm-a"), 32);
    console.wait_for("log replayed", t);
    let mut c = KvClient::connect(sw.path(), &dir.path().join("c"), &ClientConfig::default(), t).unwrap();
    for i in 0..50 {
        assert_eq!(
            c.request(&format!("SET a{i} {i}"), t).unwrap(),
            format!("OK {}", i + 1)
        );
    }

    a.pause().unwrap();
    let saved = a.save_state().unwrap();
    // The state survives its encoding, and garbage or a truncated copy is refused.
    let bytes = saved.to_bytes().unwrap();
    assert_eq!(MachineState::from_bytes(&bytes).unwrap(), saved);
    assert!(MachineState::from_bytes(&bytes[..bytes.len() - 3]).is_err());
    assert!(MachineState::from_bytes(&[0xff; 64]).is_err());
    // Saving twice without running gives the same state (apart from the running TSC).
    let mut again = a.save_state().unwrap();
    let tsc = |s: &MachineState| s.vcpu.msrs.iter().find(|m| m.0 == 0x10).unwrap().1;
    assert!(tsc(&again) >= tsc(&saved));
    again.vcpu.msrs = saved.vcpu.msrs.clone();
    assert_eq!(again, saved);

    let mut cfg = MachineConfig::new(disk.clone(), net("vm-b"));
    cfg.ram_size = 32 << 20;
    let mut b = Machine::new(cfg).unwrap();
    let console_b = Console::attach(&b);
    b.prepare_incoming().unwrap();
    copy_ram(&a, &b);
    // A state loads any number of times.
    for _ in 0..3 {
        b.restore_state(&saved).unwrap();
    }
    let mut loaded = b.save_state().unwrap();
    assert!(tsc(&loaded) >= tsc(&saved), "guest time must not go backwards");
    loaded.vcpu.msrs = saved.vcpu.msrs.clone();
    assert_eq!(loaded.vcpu.regs, saved.vcpu.regs);
    assert_eq!(loaded.vcpu.sregs, saved.vcpu.sregs);
    assert_eq!(
        loaded.vcpu.xsave[..160],
        saved.vcpu.xsave[..160],
        "x87/SSE state (incl. MXCSR)"
    );
    assert_eq!(loaded.devices, saved.devices);
    a.quit();
    drop(a);

    b.start(false).unwrap();
    b.announce().unwrap();
    // Same TCP connection, now served by the second VM.
    for i in 0..50 {
        assert_eq!(c.request(&format!("GET a{i}"), t).unwrap(), format!("VAL {i}"));
    }
    assert_eq!(c.request("SET after 1", t).unwrap(), "OK 51");
    assert!(console_b.0.lock().unwrap().is_empty(), "the guest did not reboot");
    b.quit();
}
