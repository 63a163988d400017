//! Measures the time from the last heartbeat of a killed primary to the secondary's promotion decision, with
//! real sockets and real arbiters.
//!
//! ```text
//! cargo run --release -p colo-failover --features etcd --example failover_latency -- [--json] [--runs N]
//! ```
//!
//! Two threads play the pair: each drives a [`Node`] with the default [`Config`], heartbeats go over loopback
//! UDP (a killed host sends no FIN, so the heartbeat timeout is what detects it). The primary is killed
//! (it stops without a word, leaving any lease to run out); the secondary's decision time is measured from the
//! last heartbeat it received to the moment its machine emits [`Action::Promote`].
//!
//! Scenarios: no arbiter; the witness (a server thread on loopback TCP); etcd (a server the example starts
//! itself, needs `etcd` on PATH and the `etcd` feature). "holder" scenarios kill a primary that holds the
//! arbiter (a re-protected pair, after an earlier failover), so the secondary also waits for its lease to run
//! out. The reference is the heartbeat timeout (nothing can decide earlier) and, for holder scenarios, the
//! lease TTL: that one runs from the dead holder's last *renewal* (every third of the TTL), which may precede
//! its last heartbeat, so a holder run can land below the TTL but never below the timeout. The output gives
//! each median as a ratio to its reference, and the loopback UDP round trip measured in the same run.

#[cfg(feature = "etcd")]
#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use colo_failover::witness::{WitnessArbiter, WitnessConfig, WitnessServer};
use colo_failover::{Action, Arbiter, Config, Event, NoArbiter, Node};

type MakeArbiter = Arc<dyn Fn(&str) -> Box<dyn Arbiter + Send> + Send + Sync>;

/// Runs `node` against `sock`/`arbiter` until `stop` or until it emits `Promote`; returns the promote instant.
fn drive(
    node: &mut Node,
    sock: &UdpSocket,
    peer: SocketAddr,
    arbiter: &mut dyn Arbiter,
    stop: &AtomicBool,
    last_hb: &mut Option<Instant>,
) -> Option<Instant> {
    let mut buf = [0u8; 16];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = node
            .poll_timeout()
            .map_or(Duration::from_millis(10), |d| d.saturating_duration_since(now));
        // SO_RCVTIMEO counts in kernel ticks (4 ms here); poll a non-blocking socket and sleep on the
        // high-resolution timer instead, so the driver adds well under a millisecond to the decision.
        let got = sock.recv_from(&mut buf);
        if got.is_err() {
            std::thread::sleep(wait.clamp(Duration::from_micros(20), Duration::from_micros(200)));
        }
        if let Ok((n, from)) = got
            && n == 2
            && &buf[..2] == b"hb"
            && from == peer
        {
            let t = Instant::now();
            *last_hb = Some(t);
            node.handle_event(t, Event::HeartbeatReceived).ok()?;
        }
        node.handle_timeout(Instant::now());
        while let Some(a) = node.poll_action() {
            match a {
                Action::SendHeartbeat => {
                    let _ = sock.send_to(b"hb", peer);
                }
                Action::AcquireArbiter => {
                    let answer = arbiter.acquire();
                    node.handle_arbiter(Instant::now(), answer).ok()?;
                }
                Action::RenewArbiter => {
                    let answer = arbiter.renew();
                    node.handle_arbiter(Instant::now(), answer).ok()?;
                }
                Action::ReleaseArbiter => {
                    let _ = arbiter.release();
                }
                Action::Promote { .. } => return Some(Instant::now()),
                Action::ContinueAlone { .. } => {
                    node.handle_event(Instant::now(), Event::TakeoverDone).ok()?
                }
                Action::SuspendOutput | Action::StopGuest => {}
            }
        }
    }
    None
}

/// One kill-and-promote run: the decision latency from the last heartbeat received.
fn run_once(make: &MakeArbiter, primary_holds: bool, key: &str, kill_after: Duration) -> Option<Duration> {
    let ps = UdpSocket::bind("127.0.0.1:0").ok()?;
    let ss = UdpSocket::bind("127.0.0.1:0").ok()?;
    ps.set_nonblocking(true).ok()?;
    ss.set_nonblocking(true).ok()?;
    let (paddr, saddr) = (ps.local_addr().ok()?, ss.local_addr().ok()?);
    let kill = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));

    let primary = {
        let (make, kill, ready, key) = (
            Arc::clone(make),
            Arc::clone(&kill),
            Arc::clone(&ready),
            key.to_owned(),
        );
        std::thread::spawn(move || {
            let mut arb = make(&format!("{key}-p"));
            let now = Instant::now();
            let mut node = Node::new(Config::default()).ok()?;
            if primary_holds {
                // A survivor of an earlier failover: it holds the arbiter, then re-protects.
                node.handle_event(now, Event::Join).ok()?;
                node.handle_event(now, Event::SyncCompleted).ok()?;
                node.handle_event(now, Event::FailoverCommand).ok()?;
                while let Some(a) = node.poll_action() {
                    if a == Action::AcquireArbiter {
                        let answer = arb.acquire();
                        node.handle_arbiter(Instant::now(), answer).ok()?;
                    }
                }
                node.handle_event(Instant::now(), Event::TakeoverDone).ok()?;
                node.status().token?;
            }
            node.handle_event(Instant::now(), Event::Protect).ok()?;
            node.handle_event(Instant::now(), Event::SyncCompleted).ok()?;
            ready.store(true, Ordering::Relaxed);
            let mut last = None;
            drive(&mut node, &ps, saddr, &mut *arb, &kill, &mut last);
            // Killed: no release, no goodbye. Dropping the client closes its connection, as a crash would.
            Some(())
        })
    };
    while !ready.load(Ordering::Relaxed) {
        if primary.is_finished() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut sarb = make(&format!("{key}-s"));
    let mut snode = Node::new(Config::default()).ok()?;
    let now = Instant::now();
    snode.handle_event(now, Event::Join).ok()?;
    snode.handle_event(now, Event::SyncCompleted).ok()?;
    let killer = {
        let kill = Arc::clone(&kill);
        std::thread::spawn(move || {
            std::thread::sleep(kill_after);
            kill.store(true, Ordering::Relaxed);
        })
    };
    let never = AtomicBool::new(false);
    let mut last_hb = None;
    let promoted = drive(&mut snode, &ss, paddr, &mut *sarb, &never, &mut last_hb);
    // Hand the arbiter back so the next run starts from an empty one (the witness has a single lease).
    let _ = sarb.release();
    let _ = killer.join();
    let _ = primary.join();
    Some(promoted?.saturating_duration_since(last_hb?))
}

fn udp_rtt() -> Duration {
    let a = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let b = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let (aa, ba) = (a.local_addr().expect("addr"), b.local_addr().expect("addr"));
    let mut buf = [0u8; 8];
    let mut best = Duration::MAX;
    for _ in 0..200 {
        let t = Instant::now();
        a.send_to(b"ping", ba).expect("send");
        b.recv_from(&mut buf).expect("recv");
        b.send_to(b"pong", aa).expect("send");
        a.recv_from(&mut buf).expect("recv");
        best = best.min(t.elapsed());
    }
    best
}

struct Row {
    scenario: &'static str,
    floor: Duration,
    samples: Vec<Duration>,
}

fn measure(name: &'static str, make: MakeArbiter, holds: bool, floor: Duration, runs: usize) -> Row {
    let samples = (0..runs)
        .filter_map(|i| {
            // Kill at varying phases of the heartbeat and renewal periods (100 ms and 330 ms).
            let kill_after = Duration::from_millis(700 + (i as u64 * 71) % 330);
            run_once(&make, holds, &format!("{name}{i}"), kill_after)
        })
        .collect();
    Row {
        scenario: name,
        floor,
        samples,
    }
}

fn main() -> anyhow::Result<()> {
    let mut json = false;
    let mut runs = 8usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--runs" => {
                runs = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--runs needs N"))?
                    .parse()?
            }
            // `cargo bench`-style harness flags are accepted and ignored.
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    let timeout = Config::default().heartbeat_timeout;
    let rtt = udp_rtt();
    let mut rows = Vec::new();

    rows.push(measure(
        "none",
        Arc::new(|_: &str| Box::new(NoArbiter::unsafe_under_partitions()) as Box<dyn Arbiter + Send>),
        false,
        timeout,
        runs,
    ));

    let witness_ttl = Duration::from_secs(1);
    let witness = WitnessServer::bind_fresh("127.0.0.1:0", WitnessConfig::default())?.spawn()?;
    let waddr = witness.addr();
    let mk_witness = move |node: &str| -> Box<dyn Arbiter + Send> {
        // Pair members compete under one name space per run: "<scenario><i>-p" / "-s".
        Box::new(
            WitnessArbiter::new(waddr, node, witness_ttl, Duration::from_millis(500))
                .expect("witness client"),
        )
    };
    rows.push(measure("witness", Arc::new(mk_witness), false, timeout, runs));
    rows.push(measure(
        "witness-holder-killed",
        Arc::new(mk_witness),
        true,
        timeout.max(witness_ttl),
        runs,
    ));
    drop(witness);

    #[cfg(feature = "etcd")]
    {
        use colo_failover::etcd::{EtcdArbiter, EtcdConfig};
        if let Some(etcd) = common::EtcdProcess::start("failover_latency") {
            let url = etcd.url.clone();
            let mk = move |node: &str| -> Box<dyn Arbiter + Send> {
                // The key is per run (the run name without the -p/-s suffix), the node name per member.
                let key = format!(
                    "/colo/latency/{}",
                    node.trim_end_matches("-p").trim_end_matches("-s")
                );
                Box::new(
                    EtcdArbiter::connect(EtcdConfig {
                        endpoints: vec![url.clone()],
                        key,
                        node: node.to_owned(),
                        ttl_secs: 1,
                        timeout: Duration::from_secs(1),
                    })
                    .expect("etcd client"),
                )
            };
            let mk: MakeArbiter = Arc::new(mk);
            rows.push(measure("etcd", Arc::clone(&mk), false, timeout, runs));
            rows.push(measure(
                "etcd-holder-killed",
                mk,
                true,
                timeout.max(Duration::from_secs(1)),
                runs,
            ));
        }
    }
    #[cfg(not(feature = "etcd"))]
    eprintln!("SKIPPED: etcd scenarios need --features etcd");

    for row in &rows {
        let mut s = row.samples.clone();
        s.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let (min, med, max) = match (s.first(), s.get(s.len() / 2), s.last()) {
            (Some(a), Some(b), Some(c)) => (ms(*a), ms(*b), ms(*c)),
            _ => (f64::NAN, f64::NAN, f64::NAN),
        };
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "scenario": row.scenario,
                    "runs": s.len(),
                    "min_ms": min, "median_ms": med, "max_ms": max,
                    "reference_ms": ms(row.floor),
                    "median_over_reference": med / ms(row.floor),
                    "heartbeat_timeout_ms": ms(timeout),
                    "loopback_udp_rtt_us": rtt.as_secs_f64() * 1e6,
                })
            );
        } else {
            println!(
                "{:<24} runs {:>2}  min {:>8.1} ms  median {:>8.1} ms  max {:>8.1} ms  reference {:>6.0} ms  median/reference {:.3}",
                row.scenario,
                s.len(),
                min,
                med,
                max,
                ms(row.floor),
                med / ms(row.floor)
            );
        }
    }
    if !json {
        println!(
            "loopback UDP round trip (best of 200): {:.1} us",
            rtt.as_secs_f64() * 1e6
        );
    }
    Ok(())
}
