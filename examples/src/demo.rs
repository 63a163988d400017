//! `colo-vmm demo`: a COLO pair on loopback, a client that checks every answer, a SIGKILL, a failover the client
//! does not notice, and a report.
//!
//! What it does, in a fresh private directory:
//! 1. starts a switch (a thread of this process), a witness (the arbiter, a thread of this process, unless
//!    `--arbiter none`), the secondary and the primary (child processes of this same binary, `run --role ..`);
//! 2. waits until the pair runs COLO (the primary's status shows epoch >= 1);
//! 3. connects a client (a host smoltcp stack on the switch) to the guest's key-value service over ONE TCP
//!    connection and sends a random mix of `SET`/`GET`/`DEL`/`STAT`, checking every answer against its own
//!    model of the store ([`Model`]);
//! 4. after `--checkpoints-before-kill` checkpoints, SIGKILLs the chosen side (or, with
//!    `--kill-mid-checkpoint`, lets the primary kill itself in the middle of sending a checkpoint's pages; or,
//!    with `--freeze`, SIGSTOPs it so that only the heartbeat timeout reveals it; or, with `--by-command`,
//!    sends the other side the operator's `{"cmd":"failover"}`);
//! 5. waits for the survivor to take over and keeps the client going on the SAME connection for
//!    `--after-kill-secs`;
//! 6. reads every key back, compares the guest's whole store (`STAT` key count and sequence number, and a
//!    `GET` of every key the client ever touched) with the model, and prints a report (`--json`: one JSON
//!    object).
//!
//! Figures (all measured by this process):
//! - `failover_ms`: from the instant the demo sends SIGKILL (for `--kill-mid-checkpoint`: the instant it
//!   sees the primary gone, polled every few ms) to the first answer the client receives to a request it sent
//!   after that instant (the service is back for new requests). A request already in flight at the kill is
//!   answered (by the survivor) before that.
//! - `client_outage_ms`: the longest time between two consecutive answers the client received from 1 s before
//!   the kill to 5 s after it: what the client noticed of the failover.
//! - `takeover_ms`: from the same instant to the first status poll (every 10 ms) in which the survivor reports
//!   it has failed over (the secondary promoted, or the primary running alone).
//! - `pause_ms_p50`/`pause_ms_p99`/`checkpoints`/`bytes_sent`/`compare`: the pair's own counters, from the
//!   last status of the primary before the kill or at the end (whichever is later), or from the survivor.
//! - `client_requests` counts every request of the one connection, the final read-back included;
//!   `requests_per_s*` count answers of the random workload only (before the kill, after the takeover, all).
//!
//! The exit status is non-zero unless the store is consistent with the model and the client saw no error and
//! no reset. Every child is killed and reaped and the directory removed on every path, Ctrl-C included.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use colo_vmm::client::{ClientConfig, ClientError, KvClient};
use colo_vmm::control::{self, Request};
use colo_vmm::switch::Switch;
use serde_json::{Value, json};

/// Which side the demo kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KillSide {
    /// SIGKILL the primary: the secondary takes over the client's connection.
    Primary,
    /// SIGKILL the secondary: the primary goes on alone.
    Secondary,
    /// Kill nobody: checkpoints only.
    None,
}

impl KillSide {
    fn name(self) -> &'static str {
        match self {
            KillSide::Primary => "primary",
            KillSide::Secondary => "secondary",
            KillSide::None => "none",
        }
    }
}

/// Which arbiter decides who may run alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArbiterKind {
    /// A witness server run by the demo (colo-failover's `WitnessServer`).
    Witness,
    /// No arbiter: a side that loses its peer runs alone.
    None,
}

/// `colo-vmm demo` options.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Print exactly one JSON object on stdout instead of the readable report.
    #[arg(long)]
    pub json: bool,
    /// Which side goes away (SIGKILL, unless --freeze or --by-command says otherwise).
    #[arg(long, value_enum, default_value_t = KillSide::Primary)]
    pub kill: KillSide,
    /// Let the primary kill itself in the middle of sending a checkpoint's pages (implies --kill primary).
    #[arg(long)]
    pub kill_mid_checkpoint: bool,
    /// SIGSTOP the chosen side instead of SIGKILL: it stays alive with its sockets open but silent, so the
    /// survivor notices only through the heartbeat timeout, then asks the arbiter. The frozen process is
    /// SIGKILLed at the end.
    #[arg(long, conflicts_with = "kill_mid_checkpoint")]
    pub freeze: bool,
    /// Instead of a signal, send the failover command to the other side: the secondary asks the primary to
    /// stop and takes over (`--kill primary`), or the primary goes on alone and the secondary stops
    /// (`--kill secondary`).
    #[arg(long, conflicts_with_all = ["kill_mid_checkpoint", "freeze"])]
    pub by_command: bool,
    /// Checkpoints the pair completes before the kill (and the kill waits at least this many checkpoint
    /// intervals of COLO, so that mismatch checkpoints do not cut the show short). With
    /// `--kill-mid-checkpoint` the primary dies in checkpoint N+1.
    #[arg(long, default_value_t = 8)]
    pub checkpoints_before_kill: u64,
    /// Seconds the client goes on after the kill before it reads everything back (with --no-colo: the length
    /// of the run).
    #[arg(long, default_value_t = 8.0)]
    pub after_kill_secs: f64,
    /// Checkpoint interval of the pair.
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_ms: u64,
    /// Heartbeat timeout of the pair (how long a silent peer is tolerated).
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_timeout_ms: u64,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 64)]
    pub ram_mib: u64,
    /// The arbiter.
    #[arg(long, value_enum, default_value_t = ArbiterKind::Witness)]
    pub arbiter: ArbiterKind,
    /// Number of distinct keys the client uses.
    #[arg(long, default_value_t = 200)]
    pub keys: u32,
    /// Seed of the client's random choices (default: from the clock; printed in the report).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Run the same workload against one VM without COLO (the reference for request rate and latency).
    #[arg(long, conflicts_with_all = ["kill_mid_checkpoint"])]
    pub no_colo: bool,
    /// Keep the working directory (logs, disks, sockets) and print its path.
    #[arg(long)]
    pub keep_dir: bool,
}

/// Why the demo could not complete.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Setting up the directory, a disk, the switch or the witness failed.
    #[error("setup: {what}: {source}")]
    Setup {
        /// What was being set up.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A child VMM could not be started.
    #[error("starting the {name}: {source}")]
    Spawn {
        /// Which child.
        name: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// A child VMM exited when it should be running.
    #[error("the {name} exited unexpectedly ({status})")]
    ChildExited {
        /// Which child.
        name: &'static str,
        /// Its exit status.
        status: ExitStatus,
    },
    /// Something did not happen in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What the demo waited for.
        what: String,
        /// How long it waited.
        after: Duration,
    },
    /// The client could not connect.
    #[error("client: {0}")]
    Client(#[from] ClientError),
    /// A control socket answered with an error or garbage.
    #[error("control socket of the {name}: {detail}")]
    Control {
        /// Which child.
        name: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// The pair stopped running COLO before the demo killed anything.
    #[error("the pair left COLO before the kill: the {side} is in phase {phase} ({detail})")]
    LeftColo {
        /// Which side.
        side: &'static str,
        /// Its phase.
        phase: String,
        /// Its failover detail.
        detail: String,
    },
    /// Ctrl-C or SIGTERM.
    #[error("interrupted")]
    Interrupted,
    /// The option combination makes no sense.
    #[error("bad options: {0}")]
    Options(&'static str),
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // Second signal: give up at once (the children die with us through PR_SET_PDEATHSIG).
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a handler that only touches an atomic (and _exit) is valid; the
        // handler is an `extern "C" fn(c_int)` as sa_sigaction expects without SA_SIGINFO.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn check_interrupt() -> Result<(), DemoError> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(DemoError::Interrupted)
    } else {
        Ok(())
    }
}

/// Sleep in small steps, returning early on Ctrl-C.
fn sleep(d: Duration) -> Result<(), DemoError> {
    let end = Instant::now() + d;
    loop {
        check_interrupt()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// A private directory removed on drop.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn new(keep: bool) -> Result<Self, DemoError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("colo-demo-{}-{nanos:08x}", std::process::id()));
        let mut b = std::fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        b.create(&path).map_err(|source| DemoError::Setup {
            what: format!("creating {}", path.display()),
            source,
        })?;
        Ok(Self { path, keep })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// One child VMM process.
struct Vmm {
    name: &'static str,
    child: Child,
    control: PathBuf,
    log: PathBuf,
    exited: Option<ExitStatus>,
    frozen: bool,
}

impl Vmm {
    fn spawn(name: &'static str, dir: &Path, args: &[String]) -> Result<Self, DemoError> {
        let log = dir.join(format!("{name}.log"));
        let control = dir.join(format!("{name}.ctl"));
        let exe = std::env::current_exe().map_err(|source| DemoError::Spawn { name, source })?;
        let logf = std::fs::File::create(&log).map_err(|source| DemoError::Spawn { name, source })?;
        let mut cmd = Command::new(exe);
        cmd.arg("run")
            .args(args)
            .arg("--control")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe system
        // calls (prctl, setpgid, getppid, kill).
        unsafe {
            cmd.pre_exec(|| {
                // Die with the demo even if it is SIGKILLed; keep out of the terminal's process group so that
                // Ctrl-C reaches only the demo, which then stops the children in order.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                libc::setpgid(0, 0);
                if libc::getppid() == 1 {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| DemoError::Spawn { name, source })?;
        Ok(Self {
            name,
            child,
            control,
            log,
            exited: None,
            frozen: false,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the child has exited (reaped once, remembered).
    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    fn ensure_running(&mut self) -> Result<(), DemoError> {
        match self.poll_exit() {
            Some(status) => Err(DemoError::ChildExited {
                name: self.name,
                status,
            }),
            None => Ok(()),
        }
    }

    fn request(&self, req: &Request, timeout: Duration) -> Result<Value, DemoError> {
        let v = control::request(&self.control, req, timeout).map_err(|e| DemoError::Control {
            name: self.name,
            detail: e.to_string(),
        })?;
        if v["ok"] == false {
            return Err(DemoError::Control {
                name: self.name,
                detail: v["error"].to_string(),
            });
        }
        Ok(v)
    }

    fn status(&self) -> Result<Value, DemoError> {
        self.request(&Request::Status, Duration::from_secs(5))
    }

    /// Wait until the control socket answers.
    fn wait_ready(&mut self, timeout: Duration) -> Result<Value, DemoError> {
        let t0 = Instant::now();
        loop {
            check_interrupt()?;
            self.ensure_running()?;
            if self.control.exists()
                && let Ok(v) = self.status()
            {
                return Ok(v);
            }
            if t0.elapsed() > timeout {
                return Err(DemoError::Timeout {
                    what: format!("the {}'s control socket", self.name),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL; returns the instant just before the signal was sent.
    fn sigkill(&mut self) -> Instant {
        let t = Instant::now();
        let _ = self.child.kill();
        t
    }

    /// SIGSTOP; returns the instant just before the signal was sent.
    fn sigstop(&mut self) -> Instant {
        let t = Instant::now();
        if self.poll_exit().is_none() {
            let pid = libc::pid_t::try_from(self.child.id()).unwrap_or(libc::pid_t::MAX);
            // SAFETY: kill(2) on our own unreaped child's pid (it cannot have been reused before we reap it).
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            self.frozen = true;
        }
        t
    }

    /// Ask the VMM to quit; SIGKILL it if it has not exited within `timeout`. Returns the exit status.
    fn quit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.poll_exit().is_none() && !self.frozen {
            let _ = self.request(&Request::Quit, Duration::from_secs(2));
            let t0 = Instant::now();
            while self.poll_exit().is_none() && t0.elapsed() < timeout {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
        self.exited
    }

    fn log_tail(&self, lines: usize) -> Vec<String> {
        let Ok(f) = std::fs::File::open(&self.log) else {
            return Vec::new();
        };
        let all: Vec<String> = BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .map(|l| strip_ansi(&l))
            .collect();
        all[all.len().saturating_sub(lines)..].to_vec()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The line without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// splitmix64: a small, good, seedable generator (the client's choices only need to be reproducible).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the client knows about one key: its value for sure, or the values it may have after writes whose
/// answers never came.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    Known(Option<String>),
    Unsure(Vec<Option<String>>),
}

impl Slot {
    fn possible(&self) -> Vec<Option<String>> {
        match self {
            Slot::Known(v) => vec![v.clone()],
            Slot::Unsure(vs) => vs.clone(),
        }
    }
}

/// The client's model of the guest's store.
///
/// Every answered request either matches the model (and may narrow it) or is a contradiction. A write whose
/// answer never came (the connection failed first) may or may not have happened: its key then has two
/// possible values and the sequence number one more possible step, until a later answer tells which.
#[derive(Debug, Default)]
pub struct Model {
    keys: BTreeMap<String, Slot>,
    /// The store's write sequence number as far as known.
    seq: u64,
    /// Unanswered writes since `seq` was last known: the real number is in `seq..=seq + seq_unsure`.
    seq_unsure: u64,
}

/// A request of the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Set(String, String),
    Get(String),
    Del(String),
    Stat,
}

impl Op {
    fn line(&self) -> String {
        match self {
            Op::Set(k, v) => format!("SET {k} {v}"),
            Op::Get(k) => format!("GET {k}"),
            Op::Del(k) => format!("DEL {k}"),
            Op::Stat => "STAT".to_owned(),
        }
    }

    fn is_write(&self) -> bool {
        matches!(self, Op::Set(..) | Op::Del(..))
    }
}

impl Model {
    fn slot(&self, k: &str) -> Slot {
        self.keys.get(k).cloned().unwrap_or(Slot::Known(None))
    }

    fn seq_ok(&self, s: u64, is_write: bool) -> bool {
        let lo = self.seq + u64::from(is_write);
        s >= lo && s <= lo + self.seq_unsure
    }

    fn key_count_range(&self) -> (u64, u64) {
        let (mut lo, mut hi) = (0, 0);
        for slot in self.keys.values() {
            let p = slot.possible();
            if p.iter().all(Option::is_some) {
                lo += 1;
            }
            if p.iter().any(Option::is_some) {
                hi += 1;
            }
        }
        (lo, hi)
    }

    /// Check `answer` to `op`; on success the model takes the request's effect.
    fn apply(&mut self, op: &Op, answer: &str) -> Result<(), String> {
        let bad = |expected: String| {
            Err(format!(
                "{:?} answered {answer:?}, model expects {expected}",
                op.line()
            ))
        };
        match op {
            Op::Set(k, v) => match answer.strip_prefix("OK ").and_then(|s| s.parse::<u64>().ok()) {
                Some(s) if self.seq_ok(s, true) => {
                    self.seq = s;
                    self.seq_unsure = 0;
                    self.keys.insert(k.clone(), Slot::Known(Some(v.clone())));
                    Ok(())
                }
                _ => bad(format!(
                    "OK {}..={}",
                    self.seq + 1,
                    self.seq + 1 + self.seq_unsure
                )),
            },
            Op::Get(k) => {
                let got = if answer == "NONE" {
                    None
                } else if let Some(v) = answer.strip_prefix("VAL ") {
                    Some(v.to_owned())
                } else {
                    return bad("VAL or NONE".into());
                };
                let possible = self.slot(k).possible();
                if possible.contains(&got) {
                    self.keys.insert(k.clone(), Slot::Known(got));
                    Ok(())
                } else {
                    bad(format!("one of {possible:?}"))
                }
            }
            Op::Del(k) => {
                let possible = self.slot(k).possible();
                let seq = if answer == "NONE" {
                    None
                } else if let Some(s) = answer.strip_prefix("OK ").and_then(|s| s.parse::<u64>().ok()) {
                    if !self.seq_ok(s, true) {
                        return bad(format!(
                            "OK {}..={}",
                            self.seq + 1,
                            self.seq + 1 + self.seq_unsure
                        ));
                    }
                    Some(s)
                } else {
                    return bad("OK seq or NONE".into());
                };
                if !possible.iter().any(|p| p.is_some() == seq.is_some()) {
                    return bad(format!("a key that is one of {possible:?}"));
                }
                if let Some(s) = seq {
                    self.seq = s;
                    self.seq_unsure = 0;
                }
                self.keys.insert(k.clone(), Slot::Known(None));
                Ok(())
            }
            Op::Stat => {
                let field = |name: &str| {
                    answer
                        .split(' ')
                        .find_map(|f| f.strip_prefix(name))
                        .and_then(|v| v.parse::<u64>().ok())
                };
                let (Some(keys), Some(seq)) = (field("keys="), field("seq=")) else {
                    return bad("STAT keys=.. seq=..".into());
                };
                let (lo, hi) = self.key_count_range();
                if keys < lo || keys > hi || !self.seq_ok(seq, false) {
                    return bad(format!(
                        "keys in {lo}..={hi}, seq in {}..={}",
                        self.seq,
                        self.seq + self.seq_unsure
                    ));
                }
                // The sequence number is known again; which unanswered writes happened stays open (their
                // keys stay unsure until read).
                self.seq = seq;
                self.seq_unsure = 0;
                Ok(())
            }
        }
    }

    /// `op` was sent but its answer never came: it may or may not have taken effect.
    fn unanswered(&mut self, op: &Op) {
        let (k, new) = match op {
            Op::Set(k, v) => (k, Some(v.clone())),
            Op::Del(k) => (k, None),
            Op::Get(_) | Op::Stat => return,
        };
        let mut possible = self.slot(k).possible();
        if !possible.contains(&new) {
            possible.push(new);
        }
        self.keys.insert(k.clone(), Slot::Unsure(possible));
        self.seq_unsure += 1;
    }

    /// Keys with exactly one possible value.
    fn known_keys(&self) -> usize {
        self.keys.values().filter(|s| matches!(s, Slot::Known(_))).count()
    }

    fn present_keys(&self) -> u64 {
        self.key_count_range().1
    }
}

/// Counters of the client.
#[derive(Debug, Default, Clone)]
struct ClientStats {
    requests: u64,
    writes: u64,
    reads: u64,
    stats: u64,
    errors: u64,
    resets: u64,
    contradictions: Vec<String>,
    unanswered: u64,
    max_request: Duration,
    reconnects: u64,
}

/// One request's timing, in microseconds since the demo started.
#[derive(Debug, Clone, Copy)]
struct Timing {
    sent_us: u64,
    answered_us: u64,
}

/// Most timings kept (the first ones; the kill is at most a few seconds in).
const MAX_TIMINGS: usize = 2_000_000;

/// The client: one connection, the model, random requests.
struct Workload {
    client: Option<KvClient>,
    model: Model,
    rng: Rng,
    stats: ClientStats,
    timings: Vec<Timing>,
    t0: Instant,
    keys: u32,
    timeout: Duration,
    last_error: Option<String>,
}

impl Workload {
    fn key(&mut self) -> String {
        format!("k{:04}", self.rng.below(u64::from(self.keys)))
    }

    fn next_op(&mut self) -> Op {
        let r = self.rng.below(100);
        let key = self.key();
        match r {
            // STAT answers carry the guest's TSC, which differs between the two VMs: every STAT is an output
            // mismatch and forces a checkpoint. Rare enough to show that without making every second
            // request a checkpoint.
            0..48 => {
                // A value the model can check to the byte: request number, key, and a random tail.
                let n = self.stats.requests;
                let len = self.rng.below(160) as usize;
                let tail: String = (0..len)
                    .map(|_| char::from(b'a' + self.rng.below(26) as u8))
                    .collect();
                Op::Set(key.clone(), format!("{n}.{key}.{tail}"))
            }
            48..86 => Op::Get(key),
            86..98 => Op::Del(key),
            _ => Op::Stat,
        }
    }

    fn us(&self, t: Instant) -> u64 {
        u64::try_from(t.duration_since(self.t0).as_micros()).unwrap_or(u64::MAX)
    }

    /// Send `op`, check the answer. Returns false when the connection is no longer usable.
    fn one(&mut self, op: &Op) -> bool {
        let Some(client) = self.client.as_mut() else {
            return false;
        };
        let sent = Instant::now();
        let r = client.request(&op.line(), self.timeout);
        let answered = Instant::now();
        self.stats.requests += 1;
        match op {
            Op::Set(..) | Op::Del(..) => self.stats.writes += 1,
            Op::Get(..) => self.stats.reads += 1,
            Op::Stat => self.stats.stats += 1,
        }
        match r {
            Ok(answer) => {
                let took = answered - sent;
                self.stats.max_request = self.stats.max_request.max(took);
                if self.timings.len() < MAX_TIMINGS {
                    let t = Timing {
                        sent_us: self.us(sent),
                        answered_us: self.us(answered),
                    };
                    self.timings.push(t);
                }
                if let Err(c) = self.model.apply(op, &answer)
                    && self.stats.contradictions.len() < 100
                {
                    self.stats.contradictions.push(c);
                }
                true
            }
            Err(e) => {
                if matches!(e, ClientError::Closed(_)) {
                    self.stats.resets += 1;
                } else {
                    self.stats.errors += 1;
                }
                if op.is_write() {
                    self.stats.unanswered += 1;
                }
                self.model.unanswered(op);
                self.last_error = Some(format!("{:?}: {e}", op.line()));
                // The answer stream can no longer be matched to requests: drop the connection.
                self.client = None;
                false
            }
        }
    }

    /// Read every key the client ever used and the store's counters; compare with the model.
    fn verify(&mut self) -> Result<VerifyReport, ClientError> {
        let mut report = VerifyReport::default();
        for i in 0..self.keys {
            let op = Op::Get(format!("k{i:04}"));
            let before = self.stats.contradictions.len();
            if !self.one(&op) {
                return Err(ClientError::Closed(self.last_error.clone().unwrap_or_default()));
            }
            report.keys_read += 1;
            if self.stats.contradictions.len() > before {
                report.mismatched_keys += 1;
            }
        }
        let before = self.stats.contradictions.len();
        if !self.one(&Op::Stat) {
            return Err(ClientError::Closed(self.last_error.clone().unwrap_or_default()));
        }
        report.stat_matches = self.stats.contradictions.len() == before;
        report.keys_present = self.model.present_keys();
        report.seq = self.model.seq;
        report.all_known = self.model.known_keys() == self.model.keys.len() && self.model.seq_unsure == 0;
        Ok(report)
    }
}

#[derive(Debug, Default, Clone)]
struct VerifyReport {
    keys_read: u64,
    mismatched_keys: u64,
    stat_matches: bool,
    keys_present: u64,
    seq: u64,
    all_known: bool,
}

/// Everything the demo observed.
#[derive(Debug, Default)]
struct Outcome {
    events: Vec<(f64, String)>,
    colo_at_s: Option<f64>,
    colo_at: Option<Instant>,
    kill_at: Option<Instant>,
    kill_how: &'static str,
    killed_pid: Option<u32>,
    checkpoints_before_kill: Option<u64>,
    takeover_at: Option<Instant>,
    last_primary_status: Option<Value>,
    last_secondary_status: Option<Value>,
    survivor_status: Option<Value>,
    /// The side that was told to stop, if it is still there at the end (`--by-command`).
    victim_status: Option<Value>,
    survivor_exit: Option<String>,
    verify: Option<VerifyReport>,
    verify_error: Option<String>,
    client: ClientStats,
    client_duration: Duration,
    workload_requests: u64,
    first_answer_after_kill: Option<Duration>,
    /// The longest time between two consecutive answers from 1 s before the kill to 5 s after it.
    outage: Option<Duration>,
    /// Answers per second while the pair ran COLO (client start to kill).
    rate_colo: Option<f64>,
    /// Answers per second after the survivor took over.
    rate_after: Option<f64>,
    witness_holder: Option<String>,
}

/// The whole run: owns the children so that they die on every path.
struct Demo {
    args: DemoArgs,
    t0: Instant,
    dir: WorkDir,
    primary: Option<Vmm>,
    secondary: Option<Vmm>,
    out: Outcome,
}

fn colo(status: &Option<Value>) -> &Value {
    static NULL: Value = Value::Null;
    status.as_ref().map_or(&NULL, |s| &s["colo"])
}

fn u64_of(v: &Value) -> Option<u64> {
    v.as_u64()
}

impl Demo {
    fn event(&mut self, msg: String) {
        let t = self.t0.elapsed().as_secs_f64();
        if self.args.json {
            eprintln!("[{t:7.2}s] {msg}");
        } else {
            println!("[{t:7.2}s] {msg}");
        }
        self.out.events.push((t, msg));
    }

    fn common_vm_args(&self, name: &str, disk: &Path, switch: &Path) -> Vec<String> {
        let mut a = vec![
            "--disk".into(),
            disk.display().to_string(),
            "--switch".into(),
            switch.display().to_string(),
            "--nic-socket".into(),
            self.dir.path.join(format!("{name}.nic")).display().to_string(),
            "--ram-mib".into(),
            self.args.ram_mib.to_string(),
        ];
        if !self.args.no_colo {
            a.extend([
                "--checkpoint-ms".into(),
                self.args.checkpoint_ms.to_string(),
                "--heartbeat-timeout-ms".into(),
                self.args.heartbeat_timeout_ms.to_string(),
            ]);
        }
        a
    }

    fn make_disk(&self, name: &str) -> Result<PathBuf, DemoError> {
        let p = self.dir.path.join(name);
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(DISK_MIB << 20))
            .map_err(|source| DemoError::Setup {
                what: format!("creating {}", p.display()),
                source,
            })?;
        Ok(p)
    }

    /// Start the VMs; returns when the pair runs COLO (or the single VM serves).
    fn start_vms(&mut self, switch: &Path, arbiter: Option<String>) -> Result<(), DemoError> {
        let boot_timeout = Duration::from_secs(60);
        let pdisk = self.make_disk("primary.img")?;
        if self.args.no_colo {
            let args = self.common_vm_args("primary", &pdisk, switch);
            self.event("starting one VM without COLO (reference run)".into());
            let p = self.primary.insert(Vmm::spawn("primary", &self.dir.path, &args)?);
            p.wait_ready(boot_timeout)?;
            return Ok(());
        }
        let sdisk = self.make_disk("secondary.img")?;
        let arbiter_arg = arbiter.map_or_else(|| "none".to_owned(), |a| format!("witness={a}"));

        let mut sargs = self.common_vm_args("secondary", &sdisk, switch);
        sargs.extend([
            "--role".into(),
            "secondary".into(),
            // Port 0: the secondary binds a free port and names it in its status (no race for a port).
            "--colo-listen".into(),
            "127.0.0.1:0".into(),
            "--arbiter".into(),
            arbiter_arg.clone(),
        ]);
        let s = self
            .secondary
            .insert(Vmm::spawn("secondary", &self.dir.path, &sargs)?);
        let pid = s.pid();
        s.wait_ready(boot_timeout)?;
        let t0 = Instant::now();
        let peer = loop {
            check_interrupt()?;
            s.ensure_running()?;
            if let Some(a) = s.status()?["colo"]["listen"].as_str() {
                break a.to_owned();
            }
            if t0.elapsed() > boot_timeout {
                return Err(DemoError::Timeout {
                    what: "the secondary's listening address".into(),
                    after: boot_timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.event(format!("secondary (pid {pid}) listening on {peer}"));

        let mut pargs = self.common_vm_args("primary", &pdisk, switch);
        pargs.extend([
            "--role".into(),
            "primary".into(),
            "--colo-peer".into(),
            peer,
            "--arbiter".into(),
            arbiter_arg,
        ]);
        if self.args.kill_mid_checkpoint {
            pargs.extend([
                "--fault-exit-in-checkpoint".into(),
                (self.args.checkpoints_before_kill + 1).to_string(),
            ]);
        }
        let p = self
            .primary
            .insert(Vmm::spawn("primary", &self.dir.path, &pargs)?);
        let pid = p.pid();
        p.wait_ready(boot_timeout)?;
        self.event(format!(
            "primary (pid {pid}) booting, connecting to the secondary"
        ));

        // COLO runs once the first checkpoint (the initial sync) is in.
        let t0 = Instant::now();
        loop {
            check_interrupt()?;
            self.ensure_running()?;
            let st = self.primary_ref()?.status()?;
            if u64_of(&st["colo"]["epoch"]).is_some_and(|e| e >= 1) {
                self.event(format!(
                    "COLO running: epoch {}, {} checkpoint(s), initial sync took {:.2} s",
                    st["colo"]["epoch"],
                    st["colo"]["checkpoints"],
                    t0.elapsed().as_secs_f64()
                ));
                self.out.colo_at_s = Some(self.t0.elapsed().as_secs_f64());
                self.out.colo_at = Some(Instant::now());
                self.out.last_primary_status = Some(st);
                return Ok(());
            }
            if t0.elapsed() > boot_timeout {
                return Err(DemoError::Timeout {
                    what: "the pair to reach COLO (epoch >= 1)".into(),
                    after: boot_timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn primary_ref(&self) -> Result<&Vmm, DemoError> {
        self.primary.as_ref().ok_or(DemoError::Options("no primary"))
    }

    /// Both children that should be alive are.
    fn ensure_running(&mut self) -> Result<(), DemoError> {
        for v in [self.primary.as_mut(), self.secondary.as_mut()]
            .into_iter()
            .flatten()
        {
            v.ensure_running()?;
        }
        Ok(())
    }

    fn poll_statuses(&mut self) {
        if let Some(st) = self.primary.as_ref().and_then(|p| p.status().ok()) {
            self.out.last_primary_status = Some(st);
        }
        if let Some(st) = self.secondary.as_ref().and_then(|p| p.status().ok()) {
            self.out.last_secondary_status = Some(st);
        }
    }

    fn checkpoints_now(&self) -> u64 {
        let p = u64_of(&colo(&self.out.last_primary_status)["checkpoints"]).unwrap_or(0);
        let s = u64_of(&colo(&self.out.last_secondary_status)["checkpoints"]).unwrap_or(0);
        p.max(s)
    }

    /// Wait for the checkpoints, then kill the chosen side. Returns the survivor's name.
    fn kill_phase(&mut self, answered: &dyn Fn() -> u64) -> Result<(), DemoError> {
        let want = self.args.checkpoints_before_kill;
        let limit = Duration::from_millis(self.args.checkpoint_ms * (want + 2)) + Duration::from_secs(60);
        let t0 = Instant::now();
        let kill = self.args.kill;
        let mut last_reported = 0;
        loop {
            check_interrupt()?;
            if self.args.kill_mid_checkpoint {
                if let Some(status) = self.primary.as_mut().and_then(Vmm::poll_exit) {
                    let at = Instant::now();
                    if std::os::unix::process::ExitStatusExt::signal(&status) != Some(libc::SIGKILL) {
                        // Not the fault hook: the primary failed on its own.
                        return Err(DemoError::ChildExited {
                            name: "primary",
                            status,
                        });
                    }
                    self.out.kill_at = Some(at);
                    // The secondary's count: what it loaded (the primary's last status may be a poll old).
                    if let Some(st) = self.secondary.as_ref().and_then(|s| s.status().ok()) {
                        self.out.last_secondary_status = Some(st);
                    }
                    self.out.kill_how = "fault-exit-in-checkpoint";
                    self.out.killed_pid = self.primary.as_ref().map(Vmm::pid);
                    self.out.checkpoints_before_kill = Some(self.checkpoints_now());
                    self.event(format!(
                        "the primary killed itself in the middle of checkpoint {} ({status}); {} checkpoints \
                         completed, {} requests answered",
                        want + 1,
                        self.checkpoints_now(),
                        answered()
                    ));
                    return Ok(());
                }
                if let Some(s) = self.secondary.as_mut() {
                    s.ensure_running()?;
                }
            } else {
                self.ensure_running()?;
            }
            self.poll_statuses();
            for (side, st) in [
                ("primary", &self.out.last_primary_status),
                ("secondary", &self.out.last_secondary_status),
            ] {
                let c = colo(st);
                if let Some(phase) = c["phase"].as_str().filter(|p| !matches!(*p, "syncing" | "colo")) {
                    if self.args.kill_mid_checkpoint && side == "secondary" {
                        // The primary may just have killed itself: let the exit check above decide.
                        continue;
                    }
                    return Err(DemoError::LeftColo {
                        side,
                        phase: phase.to_owned(),
                        detail: c["failover"]["detail"].to_string(),
                    });
                }
            }
            let n = self.checkpoints_now();
            if n > last_reported {
                last_reported = n;
                let p = colo(&self.out.last_primary_status);
                let msg = format!(
                    "checkpoint {n} ({}): pause {:.1} ms, {} requests answered so far",
                    p["extra"]["last_trigger"]
                        .as_str()
                        .map_or("?", |t| t.split(" {").next().unwrap_or(t)),
                    p["pause_ms_last"].as_f64().unwrap_or(f64::NAN),
                    answered()
                );
                self.event(msg);
            }
            let colo_for = self.out.colo_at.map_or(Duration::ZERO, |t| t.elapsed());
            let min_colo = Duration::from_millis(self.args.checkpoint_ms.saturating_mul(want));
            if !self.args.kill_mid_checkpoint && n >= want && colo_for >= min_colo {
                if kill != KillSide::None {
                    self.out.checkpoints_before_kill = Some(n);
                }
                let victim = match kill {
                    KillSide::Primary => self.primary.as_mut(),
                    KillSide::Secondary => self.secondary.as_mut(),
                    KillSide::None => return Ok(()),
                };
                let Some(v) = victim else {
                    return Err(DemoError::Options("no such side"));
                };
                let pid = v.pid();
                if self.args.by_command {
                    // The operator's failover: the other side is told to take over; `kill` names the side
                    // that is to stop.
                    let survivor = match kill {
                        KillSide::Primary => self.secondary.as_ref(),
                        _ => self.primary.as_ref(),
                    };
                    let Some(s) = survivor else {
                        return Err(DemoError::Options("no such side"));
                    };
                    let at = Instant::now();
                    let answer = s.request(&Request::Failover, Duration::from_secs(30))?;
                    self.out.kill_at = Some(at);
                    self.out.kill_how = "failover-command";
                    self.out.killed_pid = Some(pid);
                    self.event(format!(
                        "{{\"cmd\":\"failover\"}} -> {} after {n} checkpoints, {} requests answered; answer {answer}",
                        s.name,
                        answered()
                    ));
                    return Ok(());
                }
                let (at, how) = if self.args.freeze {
                    (v.sigstop(), "sigstop")
                } else {
                    (v.sigkill(), "sigkill")
                };
                self.out.kill_at = Some(at);
                self.out.kill_how = how;
                self.out.killed_pid = Some(pid);
                self.event(format!(
                    "{} -> {} (pid {pid}) after {n} checkpoints, {} requests answered",
                    how.to_uppercase(),
                    kill.name(),
                    answered()
                ));
                return Ok(());
            }
            if t0.elapsed() > limit {
                return Err(DemoError::Timeout {
                    what: format!("{want} checkpoints"),
                    after: limit,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn survivor(&self) -> Option<&Vmm> {
        match self.killed() {
            KillSide::Primary => self.secondary.as_ref(),
            KillSide::Secondary | KillSide::None => self.primary.as_ref(),
        }
    }

    fn survivor_mut(&mut self) -> Option<&mut Vmm> {
        match self.killed() {
            KillSide::Primary => self.secondary.as_mut(),
            KillSide::Secondary | KillSide::None => self.primary.as_mut(),
        }
    }

    fn killed(&self) -> KillSide {
        if self.args.kill_mid_checkpoint {
            KillSide::Primary
        } else {
            self.args.kill
        }
    }

    /// Wait until the survivor reports that it failed over.
    fn takeover_phase(&mut self) -> Result<(), DemoError> {
        let limit = Duration::from_millis(self.args.heartbeat_timeout_ms * 10) + Duration::from_secs(30);
        let t0 = Instant::now();
        loop {
            check_interrupt()?;
            let Some(s) = self.survivor_mut() else {
                return Err(DemoError::Options("no survivor"));
            };
            s.ensure_running()?;
            if let Ok(st) = s.status()
                && failed_over(&st)
            {
                let at = Instant::now();
                self.out.takeover_at = Some(at);
                let since = self.out.kill_at.map_or(0.0, |k| (at - k).as_secs_f64() * 1000.0);
                let c = &st["colo"];
                let msg = format!(
                    "the {} took over: role {}, phase {}, failover {} ({}) {since:.0} ms after the kill",
                    if self.killed() == KillSide::Primary {
                        "secondary"
                    } else {
                        "primary"
                    },
                    text(&c["node_role"]),
                    text(&c["phase"]),
                    text(&c["failover"]["state"]),
                    text(&c["failover"]["detail"]),
                );
                self.out.survivor_status = Some(st);
                self.event(msg);
                return Ok(());
            }
            if t0.elapsed() > limit {
                return Err(DemoError::Timeout {
                    what: "the survivor to fail over".into(),
                    after: limit,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A JSON value as plain text (strings without quotes, null as `-`).
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// True if a status shows a side that has failed over (promoted secondary, or primary running alone).
fn failed_over(st: &Value) -> bool {
    let c = &st["colo"];
    let lower = |v: &Value| v.as_str().map(str::to_ascii_lowercase).unwrap_or_default();
    let phase = lower(&c["phase"]);
    let fstate = lower(&c["failover"]["state"]);
    phase == "alone" || fstate == "completed"
}

/// Size of each disk image.
const DISK_MIB: u64 = 64;

/// Run the demo; prints the report; an error if anything went wrong or the result is not consistent.
pub fn main(args: DemoArgs) -> anyhow::Result<()> {
    install_signal_handlers();
    let early = || -> Result<WorkDir, DemoError> {
        if args.kill_mid_checkpoint && args.kill == KillSide::Secondary {
            return Err(DemoError::Options("--kill-mid-checkpoint kills the primary"));
        }
        if args.keys == 0 || args.keys > 2000 {
            return Err(DemoError::Options("--keys must be 1 to 2000"));
        }
        if !(0.0..=3600.0).contains(&args.after_kill_secs) {
            return Err(DemoError::Options("--after-kill-secs must be 0 to 3600"));
        }
        if !(1..=60_000).contains(&args.checkpoint_ms) || !(10..=60_000).contains(&args.heartbeat_timeout_ms)
        {
            return Err(DemoError::Options(
                "--checkpoint-ms must be 1 to 60000 and --heartbeat-timeout-ms 10 to 60000",
            ));
        }
        if args.checkpoints_before_kill > 10_000 {
            return Err(DemoError::Options(
                "--checkpoints-before-kill must be at most 10000",
            ));
        }
        if let Err(source) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            return Err(DemoError::Setup {
                what: "the VMs need /dev/kvm (read and write)".into(),
                source,
            });
        }
        if args.no_colo && args.kill_mid_checkpoint {
            return Err(DemoError::Options("--no-colo has nobody to fail over to"));
        }
        WorkDir::new(args.keep_dir)
    };
    let dir = match early() {
        Ok(d) => d,
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    json!({ "pass": false, "error": e.to_string(), "state_consistent": false })
                );
            }
            return Err(e.into());
        }
    };
    let mut demo = Demo {
        args: args.clone(),
        t0: Instant::now(),
        dir,
        primary: None,
        secondary: None,
        out: Outcome::default(),
    };
    if args.no_colo {
        demo.args.kill = KillSide::None;
    }
    let result = demo.run();
    // Stop the children in order before reporting (the survivor's last status is taken in `run`).
    let survivor_exit = demo
        .survivor_mut()
        .and_then(|s| s.quit(Duration::from_secs(10)))
        .map(|s| s.to_string());
    demo.out.survivor_exit = survivor_exit;
    for v in [demo.primary.as_mut(), demo.secondary.as_mut()]
        .into_iter()
        .flatten()
    {
        v.quit(Duration::from_secs(5));
    }
    let report = demo.report(result.as_ref().err());
    let pass = result.is_ok() && report["pass"] == true;
    if !pass && !matches!(result, Err(DemoError::Interrupted)) {
        for v in [demo.primary.as_ref(), demo.secondary.as_ref()]
            .into_iter()
            .flatten()
        {
            eprintln!("--- last lines of the {}'s log ({}):", v.name, v.log.display());
            for l in v.log_tail(25) {
                eprintln!("    {l}");
            }
        }
    }
    if args.keep_dir {
        eprintln!("working directory kept: {}", demo.dir.path.display());
    }
    if args.json {
        println!("{report}");
    } else {
        print_readable(&report);
    }
    drop(demo);
    match result {
        Err(e) => Err(e.into()),
        Ok(()) if !pass => Err(anyhow::anyhow!(
            "the demo failed: state_consistent={}, client_errors={}, connection_resets={}",
            report["state_consistent"],
            report["client_errors"],
            report["connection_resets"]
        )),
        Ok(()) => Ok(()),
    }
}

impl Demo {
    fn run(&mut self) -> Result<(), DemoError> {
        let a = &self.args;
        let desc = format!(
            "colo-vmm demo: {} MiB guest, checkpoint every {} ms, heartbeat timeout {} ms, kill {}{}",
            a.ram_mib,
            a.checkpoint_ms,
            a.heartbeat_timeout_ms,
            self.killed().name(),
            if a.kill_mid_checkpoint {
                " in the middle of a checkpoint"
            } else {
                ""
            }
        );
        self.event(desc);
        let sw_path = self.dir.path.join("switch");
        let _switch = Switch::spawn(&sw_path).map_err(|source| DemoError::Setup {
            what: "the switch".into(),
            source,
        })?;
        let witness = match (self.args.arbiter, self.args.no_colo) {
            (ArbiterKind::Witness, false) => Some(start_witness()?),
            _ => None,
        };
        let witness_addr = witness.as_ref().map(Witness::addr);
        self.event(format!(
            "switch at {}; arbiter: {}",
            sw_path.display(),
            witness_addr
                .as_deref()
                .map_or("none".to_owned(), |a| format!("witness on {a}"))
        ));
        self.start_vms(&sw_path, witness_addr)?;

        // The client: one TCP connection through the switch for the whole run.
        let seed = self.args.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
        self.args.seed = Some(seed);
        let timeout = Duration::from_millis(self.args.heartbeat_timeout_ms * 10).max(Duration::from_secs(20));
        let client = KvClient::connect(
            &sw_path,
            &self.dir.path.join("client"),
            &ClientConfig::default(),
            timeout,
        )?;
        self.event(format!(
            "client connected to 10.0.2.15:7000 through the switch (one TCP connection, seed {seed})"
        ));
        let mut work = Workload {
            client: Some(client),
            model: Model::default(),
            rng: Rng(seed),
            stats: ClientStats::default(),
            timings: Vec::new(),
            t0: self.t0,
            keys: self.args.keys,
            timeout,
            last_error: None,
        };
        // The guest's store starts empty (fresh disks); the model starts from what the guest says.
        if !work.one(&Op::Stat) {
            return Err(DemoError::Client(ClientError::Closed(
                work.last_error.unwrap_or_default(),
            )));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        let (stop2, answered2) = (stop.clone(), answered.clone());
        let client_start = Instant::now();
        std::thread::Builder::new()
            .name("client".into())
            .spawn(move || {
                // Run in slices so the answered count is visible to the main thread.
                while !stop2.load(Ordering::Relaxed) && work.client.is_some() {
                    let before = work.stats.requests;
                    for _ in 0..16 {
                        if stop2.load(Ordering::Relaxed) {
                            break;
                        }
                        let op = work.next_op();
                        if !work.one(&op) {
                            break;
                        }
                    }
                    answered2.fetch_add(work.stats.requests - before, Ordering::Relaxed);
                }
                let _ = tx.send(work);
            })
            .map_err(|source| DemoError::Setup {
                what: "the client thread".into(),
                source,
            })?;
        let answered_fn = || answered.load(Ordering::Relaxed);

        let phases: Result<(), DemoError> = (|| {
            if self.args.no_colo {
                sleep(Duration::from_secs_f64(self.args.after_kill_secs.max(0.0)))?;
                return Ok(());
            }
            self.kill_phase(&answered_fn)?;
            if self.out.kill_at.is_some() {
                self.takeover_phase()?;
            }
            sleep(Duration::from_secs_f64(self.args.after_kill_secs.max(0.0)))?;
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        let join_limit = timeout + Duration::from_secs(5);
        let mut work = match rx.recv_timeout(join_limit) {
            Ok(w) => w,
            Err(_) => {
                phases?;
                return Err(DemoError::Timeout {
                    what: "the client to stop".into(),
                    after: join_limit,
                });
            }
        };
        self.out.client_duration = client_start.elapsed();
        self.out.workload_requests = work.stats.requests;
        self.out.client = work.stats.clone();
        if let Some(e) = &work.last_error {
            self.event(format!("client lost its connection: {e}"));
        }
        if let Some(kill) = self.out.kill_at {
            let k = work.us(kill);
            self.out.first_answer_after_kill = work
                .timings
                .iter()
                .filter(|t| t.sent_us >= k)
                .map(|t| Duration::from_micros(t.answered_us - k))
                .min();
        }
        if let Some(kill) = self.out.kill_at {
            let k = work.us(kill);
            let (lo, hi) = (k.saturating_sub(1_000_000), k + 5_000_000);
            let answers: Vec<u64> = work
                .timings
                .iter()
                .map(|t| t.answered_us)
                .filter(|&a| a >= lo && a <= hi)
                .collect();
            self.out.outage = answers
                .windows(2)
                .map(|w| Duration::from_micros(w[1] - w[0]))
                .max();
        }
        let stop_us = work.us(Instant::now());
        let rate = |from: Option<Instant>, to_us: Option<u64>| -> Option<f64> {
            let from_us = work.us(from?);
            let to_us = to_us?;
            let n = work
                .timings
                .iter()
                .filter(|t| t.answered_us >= from_us && t.answered_us < to_us)
                .count();
            (to_us > from_us + 100_000).then(|| (n as f64 * 1e6 / (to_us - from_us) as f64).round())
        };
        let kill_us = self.out.kill_at.map(|k| work.us(k)).or(Some(stop_us));
        self.out.rate_colo = rate(Some(client_start), kill_us);
        self.out.rate_after = rate(self.out.takeover_at, Some(stop_us));
        phases?;
        self.event(format!(
            "client stopped after {} requests; reading back all {} keys",
            work.stats.requests, self.args.keys
        ));

        // Verification: on the same connection if it survived, else on a new one (a reconnect is reported).
        if work.client.is_none() {
            work.stats.reconnects += 1;
            match KvClient::connect(
                &sw_path,
                &self.dir.path.join("client2"),
                &ClientConfig::default(),
                timeout,
            ) {
                Ok(c) => work.client = Some(c),
                Err(e) => self.out.verify_error = Some(format!("reconnecting for the read-back: {e}")),
            }
        }
        if work.client.is_some() {
            match work.verify() {
                Ok(v) => {
                    let msg = format!(
                        "read back {} keys: {} present, {} mismatched, STAT {}; seq {}",
                        v.keys_read,
                        v.keys_present,
                        v.mismatched_keys,
                        if v.stat_matches { "matches" } else { "DIFFERS" },
                        v.seq
                    );
                    self.out.verify = Some(v);
                    self.event(msg);
                }
                Err(e) => self.out.verify_error = Some(e.to_string()),
            }
        }
        if let Some(c) = work.client.take() {
            c.close(Duration::from_secs(2));
        }
        self.out.client = work.stats.clone();
        if let Some(s) = self.survivor().and_then(|s| s.status().ok()) {
            self.out.survivor_status = Some(s);
        }
        let victim = match self.killed() {
            KillSide::Primary => self.primary.as_mut(),
            KillSide::Secondary => self.secondary.as_mut(),
            KillSide::None => None,
        };
        if let Some(v) = victim
            && !v.frozen
            && v.poll_exit().is_none()
        {
            self.out.victim_status = v.status().ok();
        }
        if let Some(w) = &witness {
            self.out.witness_holder = w.holder();
        }
        Ok(())
    }
}

/// A number rounded to three decimals (microseconds, for milliseconds); anything else unchanged.
fn round3(v: &Value) -> Value {
    v.as_f64()
        .map_or_else(|| v.clone(), |x| json!((x * 1e3).round() / 1e3))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Demo {
    /// The JSON report.
    fn report(&self, err: Option<&DemoError>) -> Value {
        let o = &self.out;
        let c = &o.client;
        // The pair's counters: the survivor at the end, else the last status seen before the kill.
        let pre = colo(&o.last_primary_status);
        let end = colo(&o.survivor_status);
        let pick = |field: &str| -> Value {
            let (a, b) = (&end[field], &pre[field]);
            match (a.as_f64(), b.as_f64()) {
                (Some(x), Some(y)) => {
                    if x >= y || field.starts_with("pause") {
                        a.clone()
                    } else {
                        b.clone()
                    }
                }
                (Some(_), None) => a.clone(),
                _ => b.clone(),
            }
        };
        // Pause figures come from the primary (who pauses for checkpoints): the survivor if it is the primary,
        // else the primary's last status before the kill.
        let pauses = if self.killed() == KillSide::Primary {
            pre
        } else {
            end
        };
        let verify = o.verify.as_ref();
        let state_consistent = verify
            .is_some_and(|v| v.mismatched_keys == 0 && v.stat_matches && v.all_known)
            && c.contradictions.is_empty()
            && o.verify_error.is_none();
        let kill_ms = |t: Option<Instant>| -> Value {
            match (o.kill_at, t) {
                (Some(k), Some(t)) => json!(ms(t - k)),
                _ => Value::Null,
            }
        };
        let failed_over = o.kill_at.is_some() && o.takeover_at.is_some();
        let pass = err.is_none()
            && state_consistent
            && c.errors == 0
            && c.resets == 0
            && (self.killed() == KillSide::None || failed_over);
        let secs = o.client_duration.as_secs_f64();
        let mut pair = json!({
            "pass": pass,
            "error": err.map(ToString::to_string),
            "killed": self.killed().name(),
            "kill_how": if o.kill_at.is_some() { json!(o.kill_how) } else { Value::Null },
            "killed_pid": o.killed_pid,
            "colo": !self.args.no_colo,
            "checkpoints": pick("checkpoints"),
            "checkpoints_before_kill": o.checkpoints_before_kill,
            "mismatch_checkpoints": pick("mismatch_checkpoints"),
            "pause_ms_p50": round3(&pauses["pause_ms_p50"]),
            "pause_ms_p99": round3(&pauses["pause_ms_p99"]),
            "pause_ms_last": round3(&pauses["pause_ms_last"]),
            "bytes_sent": pick("bytes_sent"),
            "compare": if self.killed() == KillSide::Primary { &pre["compare"] } else { &end["compare"] },
            "failover": failed_over,
            "failover_ms": o.first_answer_after_kill.map(ms),
            "takeover_ms": kill_ms(o.takeover_at),
            "client_outage_ms": o.outage.map(ms),
            "survivor": {
                "side": if self.killed() == KillSide::Primary { "secondary" } else { "primary" },
                "role": end["node_role"],
                "phase": end["phase"],
                "epoch": end["epoch"],
                "failover": end["failover"],
                "exit": o.survivor_exit,
            },
            "witness_holder": o.witness_holder,
            "victim": {
                "alive_at_end": o.victim_status.is_some(),
                "phase": colo(&o.victim_status)["phase"],
                "vm_state": o.victim_status.as_ref().map(|v| v["state"].clone()),
            },
        });
        let client = json!({
            "client_requests": c.requests,
            "client_writes": c.writes,
            "client_reads": c.reads,
            "client_stats": c.stats,
            "client_errors": c.errors,
            "connection_resets": c.resets,
            "client_reconnects": c.reconnects,
            "unanswered_writes": c.unanswered,
            "contradictions": c.contradictions,
            "client_max_request_ms": ms(c.max_request),
            "requests_per_s_before_kill": o.rate_colo,
            "requests_per_s_after_takeover": o.rate_after,
            "requests_per_s": if secs > 0.0 { json!((o.workload_requests as f64 / secs).round()) } else { Value::Null },
            "keys_present": verify.map(|v| v.keys_present),
            "keys_read_back": verify.map(|v| v.keys_read),
            "store_seq": verify.map(|v| v.seq),
            "verify_error": o.verify_error,
            "state_consistent": state_consistent,
            "colo_after_s": o.colo_at_s.map(|t| (t * 1e3).round() / 1e3),
            "duration_s": (self.t0.elapsed().as_secs_f64() * 100.0).round() / 100.0,
            "ram_mib": self.args.ram_mib,
            "checkpoint_ms": self.args.checkpoint_ms,
            "heartbeat_timeout_ms": self.args.heartbeat_timeout_ms,
            "arbiter": match self.args.arbiter { ArbiterKind::Witness => "witness", ArbiterKind::None => "none" },
            "seed": self.args.seed,
        });
        if let (Some(a), Value::Object(b)) = (pair.as_object_mut(), client) {
            a.extend(b);
        }
        pair
    }
}

fn print_readable(r: &Value) {
    let show = text;
    println!();
    println!("result: {}", if r["pass"] == true { "PASS" } else { "FAIL" });
    if let Some(e) = r["error"].as_str() {
        println!("  error: {e}");
    }
    println!(
        "  killed:                {} ({}), after {} checkpoints",
        show(&r["killed"]),
        show(&r["kill_how"]),
        show(&r["checkpoints_before_kill"])
    );
    let f = &r["survivor"]["failover"];
    println!(
        "  survivor:              {} -> role {}, phase {}; failover {} ({}: {}), fence token {}",
        show(&r["survivor"]["side"]),
        show(&r["survivor"]["role"]),
        show(&r["survivor"]["phase"]),
        show(&f["state"]),
        show(&f["reason"]),
        show(&f["detail"]),
        show(&f["token"])
    );
    println!(
        "  arbiter:               {}, lease now held by {}",
        show(&r["arbiter"]),
        show(&r["witness_holder"])
    );
    println!(
        "  takeover:              {} ms from the kill to the survivor's new role",
        show(&r["takeover_ms"])
    );
    println!(
        "  failover (client):     {} ms from the kill to the first answer to a request sent after it",
        show(&r["failover_ms"])
    );
    println!(
        "  client outage:         {} ms, the longest wait between two answers around the kill",
        show(&r["client_outage_ms"])
    );
    println!(
        "  checkpoints:           {} ({} on mismatch), pause p50 {} ms, p99 {} ms, {} bytes sent",
        show(&r["checkpoints"]),
        show(&r["mismatch_checkpoints"]),
        show(&r["pause_ms_p50"]),
        show(&r["pause_ms_p99"]),
        show(&r["bytes_sent"])
    );
    let c = &r["compare"];
    if c.is_object() {
        println!(
            "  compare:               {} primary frames, {} released as compared ({} TCP payload bytes), {} at \
             checkpoints; {} mismatches",
            show(&c["primary_frames"]),
            show(&c["released_compared"]),
            show(&c["tcp_bytes_compared"]),
            show(&c["released_at_checkpoint"]),
            show(&c["mismatches"])
        );
    }
    println!(
        "  client:                {} requests ({} writes, {} reads, {} STAT), {}/s, slowest {} ms",
        show(&r["client_requests"]),
        show(&r["client_writes"]),
        show(&r["client_reads"]),
        show(&r["client_stats"]),
        show(&r["requests_per_s"]),
        show(&r["client_max_request_ms"])
    );
    println!(
        "  client rate:           {}/s under COLO before the kill, {}/s after the takeover",
        show(&r["requests_per_s_before_kill"]),
        show(&r["requests_per_s_after_takeover"])
    );
    println!(
        "  connection:            {} errors, {} resets, {} reconnects (one TCP connection for the whole run \
         when all are 0)",
        show(&r["client_errors"]),
        show(&r["connection_resets"]),
        show(&r["client_reconnects"])
    );
    println!(
        "  store:                 {} keys present, {} read back, seq {}, contradictions {}",
        show(&r["keys_present"]),
        show(&r["keys_read_back"]),
        show(&r["store_seq"]),
        r["contradictions"].as_array().map_or(0, Vec::len)
    );
    if let Some(cs) = r["contradictions"].as_array() {
        for c in cs.iter().take(10) {
            println!("      {}", show(c));
        }
    }
    println!(
        "  state consistent:      {} (the guest's store equals the client's model)",
        show(&r["state_consistent"])
    );
    println!(
        "  run took {} s (seed {})",
        show(&r["duration_s"]),
        show(&r["seed"])
    );
}

/// The arbiter the demo runs for the pair: colo-failover's witness server on a thread of this process, on a
/// loopback port. The pair's sides ask it for the "may run alone" lease when they lose each other.
struct Witness(colo_failover::witness::WitnessHandle);

impl Witness {
    fn addr(&self) -> String {
        self.0.addr().to_string()
    }

    /// Who holds the lease now, e.g. `secondary (token 17)`.
    fn holder(&self) -> Option<String> {
        self.0
            .holder()
            .map(|(node, token, _)| format!("{node} (token {})", token.0))
    }
}

fn start_witness() -> Result<Witness, DemoError> {
    use colo_failover::witness::{WitnessConfig, WitnessServer};
    let config = WitnessConfig {
        max_ttl: Duration::from_secs(10),
        ..WitnessConfig::default()
    };
    WitnessServer::bind_fresh("127.0.0.1:0", config)
        .and_then(WitnessServer::spawn)
        .map(Witness)
        .map_err(|source| DemoError::Setup {
            what: "the witness".into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_checks_answers_and_tracks_unanswered_writes() {
        let mut m = Model::default();
        let set = |k: &str, v: &str| Op::Set(k.into(), v.into());
        assert!(m.apply(&Op::Stat, "STAT keys=0 seq=0 tsc=5").is_ok());
        assert!(m.apply(&set("a", "1"), "OK 1").is_ok());
        assert!(
            m.apply(&set("a", "2"), "OK 3").is_err(),
            "a skipped sequence number"
        );
        assert!(m.apply(&Op::Get("a".into()), "VAL 1").is_ok());
        assert!(m.apply(&Op::Get("a".into()), "VAL 2").is_err());
        assert!(m.apply(&Op::Get("b".into()), "NONE").is_ok());
        assert!(m.apply(&Op::Del("b".into()), "OK 2").is_err(), "b never existed");
        assert!(m.apply(&Op::Del("a".into()), "OK 2").is_ok());
        assert!(m.apply(&Op::Get("a".into()), "NONE").is_ok());
        assert!(m.apply(&Op::Stat, "STAT keys=0 seq=2 tsc=9").is_ok());
        assert!(m.apply(&Op::Stat, "STAT keys=1 seq=2 tsc=9").is_err());

        // A SET whose answer never came: either value, and seq 2 or 3.
        assert!(m.apply(&set("c", "x"), "OK 3").is_ok());
        m.unanswered(&set("c", "y"));
        assert!(m.apply(&Op::Get("c".into()), "VAL z").is_err());
        assert!(m.apply(&Op::Stat, "STAT keys=1 seq=5 tsc=1").is_err());
        assert!(m.apply(&Op::Get("c".into()), "VAL y").is_ok());
        assert_eq!(m.slot("c"), Slot::Known(Some("y".into())));
        assert!(
            m.apply(&set("d", "1"), "OK 5").is_ok(),
            "the unanswered SET happened (seq 4)"
        );
        assert!(m.apply(&set("d", "2"), "OK 7").is_err());
        // An unanswered DEL that did not happen.
        m.unanswered(&Op::Del("d".into()));
        assert!(m.apply(&Op::Stat, "STAT keys=2 seq=5 tsc=1").is_ok());
        assert!(m.apply(&Op::Get("d".into()), "VAL 1").is_ok());
    }

    /// The guest's store, as simply as possible: what the service answers.
    #[derive(Default)]
    struct Store {
        map: std::collections::HashMap<String, String>,
        seq: u64,
    }

    impl Store {
        fn answer(&mut self, op: &Op) -> String {
            match op {
                Op::Set(k, v) => {
                    self.seq += 1;
                    self.map.insert(k.clone(), v.clone());
                    format!("OK {}", self.seq)
                }
                Op::Get(k) => self.map.get(k).map_or("NONE".into(), |v| format!("VAL {v}")),
                Op::Del(k) => match self.map.remove(k) {
                    Some(_) => {
                        self.seq += 1;
                        format!("OK {}", self.seq)
                    }
                    None => "NONE".into(),
                },
                Op::Stat => format!("STAT keys={} seq={} tsc=1", self.map.len(), self.seq),
            }
        }
    }

    fn op_strategy() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let key = (0u8..6).prop_map(|k| format!("k{k}"));
        prop_oneof![
            (key.clone(), 0u8..4).prop_map(|(k, v)| Op::Set(k, format!("v{v}"))),
            key.clone().prop_map(Op::Get),
            key.prop_map(Op::Del),
            Just(Op::Stat),
        ]
    }

    proptest::proptest! {
        /// A store that answers truly never contradicts the model, also when some answers are lost (the
        /// request then took effect or not, at random) and the client goes on; and after reading every key
        /// and STAT the model knows everything again.
        #[test]
        fn true_answers_are_never_contradictions(
            ops in proptest::collection::vec((op_strategy(), 0u8..10), 1..200)
        ) {
            let mut store = Store::default();
            let mut model = Model::default();
            for (op, fate) in &ops {
                match fate {
                    0 => { let _ = store.answer(op); model.unanswered(op); } // happened, answer lost
                    1 => model.unanswered(op),                                  // never arrived
                    _ => { let a = store.answer(op); proptest::prop_assert_eq!(model.apply(op, &a), Ok(())); }
                }
            }
            for k in 0..6 {
                let op = Op::Get(format!("k{k}"));
                let a = store.answer(&op);
                proptest::prop_assert_eq!(model.apply(&op, &a), Ok(()));
            }
            let a = store.answer(&Op::Stat);
            proptest::prop_assert_eq!(model.apply(&Op::Stat, &a), Ok(()));
            proptest::prop_assert_eq!(model.known_keys(), model.keys.len());
            proptest::prop_assert_eq!(model.seq, store.seq);
        }

        /// A store that lost or changed an acknowledged write is caught by the read-back.
        #[test]
        fn a_lost_acknowledged_write_is_caught(
            ops in proptest::collection::vec(op_strategy(), 1..100), victim in 0usize..100
        ) {
            let mut store = Store::default();
            let mut model = Model::default();
            for op in &ops {
                let a = store.answer(op);
                proptest::prop_assert_eq!(model.apply(op, &a), Ok(()));
            }
            // Damage the store: forget one key, or change its value.
            let keys: Vec<String> = store.map.keys().cloned().collect();
            proptest::prop_assume!(!keys.is_empty());
            let k = keys[victim % keys.len()].clone();
            if victim % 2 == 0 {
                store.map.remove(&k);
            } else {
                store.map.insert(k.clone(), "damaged".into());
            }
            let op = Op::Get(k);
            let a = store.answer(&op);
            proptest::prop_assert!(model.apply(&op, &a).is_err());
        }
    }

    #[test]
    fn values_fit_one_request_line() {
        let mut w = Rng(42);
        for _ in 0..1000 {
            let len = w.below(160) as usize;
            let v = format!("{}.k0000.{}", u64::MAX, "a".repeat(len));
            assert!(v.len() <= 255 && format!("SET k0000 {v}").len() <= 400);
        }
    }
}
