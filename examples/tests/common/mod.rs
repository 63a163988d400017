//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod process;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colo_vmm::{Machine, MachineConfig, NetConfig};

/// True if /dev/kvm can be used; otherwise prints a loud skip line.
pub fn kvm_or_skip(test: &str) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        return true;
    }
    eprintln!("SKIPPED: {test}: /dev/kvm is not available");
    false
}

/// Create a zeroed raw disk image.
pub fn disk(dir: &Path, name: &str, mib: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    p
}

/// Console lines collected from a machine.
#[derive(Clone, Default)]
pub struct Console(pub Arc<Mutex<Vec<String>>>);

impl Console {
    pub fn attach(m: &Machine) -> Self {
        let c = Self::default();
        let lines = c.0.clone();
        m.set_console_sink(Box::new(move |l| lines.lock().unwrap().push(l.to_string())));
        c
    }

    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let t0 = Instant::now();
        loop {
            if let Some(l) = self.0.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                t0.elapsed() < timeout,
                "no console line with {needle:?} in {timeout:?}: {:?}",
                self.0.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Boot a machine on `disk` with `net`, running.
pub fn boot(disk: &Path, net: NetConfig, ram_mib: u64) -> (Machine, Console) {
    let mut cfg = MachineConfig::new(disk.to_path_buf(), net);
    cfg.ram_size = ram_mib << 20;
    let mut m = Machine::new(cfg).unwrap();
    let console = Console::attach(&m);
    m.boot(colo_vmm::GUEST_ELF).unwrap();
    m.start(false).unwrap();
    (m, console)
}
