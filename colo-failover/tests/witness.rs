//! The witness server and client over loopback TCP.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use colo_failover::witness::{WitnessArbiter, WitnessConfig, WitnessServer};
use colo_failover::{Action, Arbiter, ArbiterError, Decision, Event, FenceGate, Role};

const TIMEOUT: Duration = Duration::from_secs(2);

fn fresh() -> colo_failover::witness::WitnessHandle {
    WitnessServer::bind_fresh("127.0.0.1:0", WitnessConfig::default())
        .unwrap()
        .spawn()
        .unwrap()
}

fn client(addr: SocketAddr, node: &str, ttl_ms: u64) -> WitnessArbiter {
    WitnessArbiter::new(addr, node, Duration::from_millis(ttl_ms), TIMEOUT).unwrap()
}

#[test]
fn two_nodes_race_to_promote_and_exactly_one_wins() {
    for _ in 0..10 {
        let witness = fresh();
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|name| {
                let mut arb = client(witness.addr(), name, 1000);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    let now = Instant::now();
                    let mut node = common::node_in_colo(false, now);
                    node.handle_event(now, Event::ChannelError).unwrap();
                    barrier.wait();
                    (name, common::drive(&mut node, &mut arb))
                })
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
        let winners: Vec<_> = results
            .iter()
            .filter(|r| matches!(r.1[..], [Action::Promote { .. }]))
            .collect();
        let losers = results.iter().filter(|r| r.1 == [Action::StopGuest]).count();
        assert_eq!((winners.len(), losers), (1, 1), "{results:?}");
        let Action::Promote { token } = winners[0].1[0] else {
            unreachable!()
        };
        let (holder, held, _) = witness.holder().expect("a holder");
        assert_eq!((holder.as_str(), held), (winners[0].0, token));
    }
}

#[test]
fn lease_expiry_hands_over_and_the_stale_token_is_rejected() {
    let witness = fresh();
    let mut a = client(witness.addr(), "a", 300);
    let mut b = client(witness.addr(), "b", 300);
    let Decision::Granted(ga) = a.acquire().unwrap() else {
        panic!("a must win")
    };
    assert_eq!(ga.ttl, Some(Duration::from_millis(300)));
    // Renewals keep it for three TTLs.
    let until = Instant::now() + Duration::from_millis(900);
    while Instant::now() < until {
        assert_eq!(a.renew().unwrap(), Decision::Granted(ga));
        assert_eq!(
            b.acquire().unwrap(),
            Decision::Denied {
                holder: Some(ga.token)
            }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = Instant::now();
    assert_eq!(a.renew().unwrap(), Decision::Granted(ga));
    let gb = loop {
        if let Decision::Granted(g) = b.acquire().unwrap() {
            break g;
        }
        std::thread::sleep(Duration::from_millis(5));
        assert!(last.elapsed() < Duration::from_secs(3));
    };
    assert!(last.elapsed() >= Duration::from_millis(300));
    assert!(gb.token > ga.token);
    let mut gate = FenceGate::new();
    gate.check(gb.token).unwrap();
    assert!(gate.check(ga.token).is_err());
    assert_eq!(
        a.renew().unwrap(),
        Decision::Denied {
            holder: Some(gb.token)
        }
    );
}

#[test]
fn restarted_witness_keeps_tokens_growing_and_waits_out_old_leases() {
    let dir = tempfile::tempdir().unwrap();
    let config = WitnessConfig {
        max_ttl: Duration::from_millis(400),
        state_file: Some(dir.path().join("term")),
        ..WitnessConfig::default()
    };
    let first = WitnessServer::bind("127.0.0.1:0", config.clone())
        .unwrap()
        .spawn()
        .unwrap();
    let mut a = client(first.addr(), "a", 400);
    let Decision::Granted(g1) = a.acquire().unwrap() else {
        panic!("a must win")
    };
    first.shutdown();

    let second = WitnessServer::bind("127.0.0.1:0", config)
        .unwrap()
        .spawn()
        .unwrap();
    let mut b = client(second.addr(), "b", 400);
    let started = Instant::now();
    // a's lease may still run: nothing is granted for one max TTL.
    match b.acquire() {
        Err(ArbiterError::NotReady { retry_after, .. }) => assert!(retry_after <= Duration::from_millis(400)),
        other => panic!("expected NOTREADY, got {other:?}"),
    }
    let g2 = loop {
        match b.acquire() {
            Ok(Decision::Granted(g)) => break g,
            Err(ArbiterError::NotReady { .. }) => std::thread::sleep(Duration::from_millis(20)),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(started.elapsed() >= Duration::from_millis(350));
    assert!(g2.token > g1.token, "{} then {}", g1.token, g2.token);
}

#[test]
fn malformed_and_oversized_requests_get_an_error_and_the_server_keeps_serving() {
    let witness = fresh();
    for bad in [&b"HELLO\n"[..], b"ACQUIRE a 0\n", &[b'x'; 4096]] {
        let mut s = TcpStream::connect(witness.addr()).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(bad).unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.starts_with("ERROR "), "{line:?}");
    }
    let mut a = client(witness.addr(), "a", 1000);
    assert!(matches!(a.acquire(), Ok(Decision::Granted(_))));
    assert_eq!(a.status().unwrap().0.as_deref(), Some("a"));
}

#[test]
fn unreachable_witness_is_an_error_within_the_timeout_and_the_node_retries() {
    // A port with nobody listening.
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut arb = WitnessArbiter::new(addr, "a", Duration::from_secs(1), Duration::from_millis(300)).unwrap();
    let started = Instant::now();
    assert!(matches!(
        arb.acquire(),
        Err(ArbiterError::Io { op: "connect", .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(1));

    let now = Instant::now();
    let mut node = common::node_in_colo(true, now);
    node.handle_event(now, Event::ChannelError).unwrap();
    assert!(common::drive(&mut node, &mut arb).is_empty());
    assert_eq!(node.status().role, Role::Primary);
    assert_eq!(
        node.output_token(Instant::now()),
        None,
        "no output while the arbiter cannot be asked"
    );
    assert!(node.poll_timeout().is_some(), "a retry is scheduled");
}

#[test]
fn bad_client_settings_are_refused() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    assert!(WitnessArbiter::new(addr, "bad name", Duration::from_secs(1), TIMEOUT).is_err());
    assert!(WitnessArbiter::new(addr, "", Duration::from_secs(1), TIMEOUT).is_err());
    assert!(WitnessArbiter::new(addr, "a", Duration::ZERO, TIMEOUT).is_err());
}
