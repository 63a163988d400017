//! A `colo-vmm run` child process driven through its control socket, shared by the process-level tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colo_vmm::control::{self, Request};
use serde_json::Value;

/// How long a control request or a start-up may take on a busy 2-core machine.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// One VMM process on a switch, its stderr echoed with its name and kept for the test to search.
pub struct VmmProcess {
    /// Name used for its files in the test directory and in echoed log lines.
    pub name: String,
    /// The process.
    pub child: Child,
    /// Its control socket.
    pub control: PathBuf,
    /// Every stderr line so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl VmmProcess {
    /// Starts `colo-vmm run` with its NIC on `switch` (socket `<dir>/<name>.nic`), control socket
    /// `<dir>/<name>.ctl`, and `extra` arguments; returns once the control socket answers.
    pub fn spawn(dir: &Path, name: &str, switch: &Path, disk: &Path, ram_mib: u64, extra: &[&str]) -> Self {
        let control = dir.join(format!("{name}.ctl"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_colo-vmm"))
            .arg("run")
            .arg("--disk")
            .arg(disk)
            .arg("--switch")
            .arg(switch)
            .arg("--nic-socket")
            .arg(dir.join(format!("{name}.nic")))
            .arg("--control")
            .arg(&control)
            .args(["--ram-mib", &ram_mib.to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (l, stderr, tag) = (log.clone(), child.stderr.take().unwrap(), name.to_string());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
                l.lock().unwrap().push(line);
            }
        });
        let v = Self {
            name: name.to_string(),
            child,
            control,
            log,
        };
        // The socket file appears at bind(), a moment before listen(): wait for an answer, not the file.
        let t0 = Instant::now();
        while control::request(&v.control, &Request::Status, CONTROL_TIMEOUT).is_err() {
            assert!(t0.elapsed() < CONTROL_TIMEOUT, "{name}: no control socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        v
    }

    /// Sends one control request and returns the answer.
    pub fn ctl(&self, req: Request) -> Value {
        control::request(&self.control, &req, CONTROL_TIMEOUT).unwrap()
    }

    /// True if some stderr line so far contains `needle`.
    pub fn has_log(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// Waits for a stderr line containing `needle` and returns it.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let t0 = Instant::now();
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                t0.elapsed() < timeout,
                "{}: no log line with {needle:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
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
    pub fn quit(mut self) {
        let t0 = Instant::now();
        let a = self.ctl(Request::Quit);
        assert_eq!(a["ok"], true, "{a}");
        let st = self.wait_exit(Duration::from_secs(10));
        assert!(st.success(), "{} exit status {st}", self.name);
        eprintln!("{} quit in {:?}", self.name, t0.elapsed());
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
