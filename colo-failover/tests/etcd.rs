//! The etcd lease arbiter against a real etcd server started by the test (feature `etcd`).
#![cfg(feature = "etcd")]

mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use colo_failover::etcd::{EtcdArbiter, EtcdConfig};
use colo_failover::{Action, Arbiter, Decision, Event, FenceGate, Role};
use common::EtcdProcess;

fn arbiter(etcd: &EtcdProcess, key: &str, node: &str) -> EtcdArbiter {
    EtcdArbiter::connect(EtcdConfig {
        endpoints: vec![etcd.url.clone()],
        key: key.into(),
        node: node.into(),
        ttl_secs: 1,
        timeout: Duration::from_secs(2),
    })
    .expect("connect to etcd")
}

#[test]
fn two_nodes_race_to_promote_and_exactly_one_wins() {
    let Some(etcd) = EtcdProcess::start("two_nodes_race_to_promote_and_exactly_one_wins") else {
        return;
    };
    for round in 0..5 {
        let key = format!("/colo/race/{round}");
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|name| {
                let mut arb = arbiter(&etcd, &key, name);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    // Both are secondaries of a primary that just died (a manual command stands in for the
                    // heartbeat timeout).
                    let now = Instant::now();
                    let mut node = common::node_in_colo(false, now);
                    node.handle_event(now, Event::FailoverCommand).unwrap();
                    barrier.wait();
                    let actions = common::drive(&mut node, &mut arb);
                    (name, actions, node.status(), arb)
                })
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
        let winners: Vec<_> = results
            .iter()
            .filter(|r| matches!(r.1.as_slice(), [Action::Promote { .. }]))
            .collect();
        let losers: Vec<_> = results.iter().filter(|r| r.1 == [Action::StopGuest]).collect();
        assert_eq!(
            (winners.len(), losers.len()),
            (1, 1),
            "round {round}: {:?}",
            results.iter().map(|r| &r.1).collect::<Vec<_>>()
        );
        let Action::Promote { token } = winners[0].1[0] else {
            unreachable!()
        };
        assert_eq!(winners[0].2.token, Some(token));
        assert_eq!(losers[0].2.role, Role::None);
        // etcd agrees on who holds it, with the same token.
        let mut observer = arbiter(&etcd, &key, "observer");
        assert_eq!(observer.holder().unwrap(), Some((winners[0].0.to_owned(), token)));
    }
}

#[test]
fn lease_expiry_hands_the_role_over_and_the_old_token_is_rejected() {
    let Some(etcd) = EtcdProcess::start("lease_expiry_hands_the_role_over_and_the_old_token_is_rejected")
    else {
        return;
    };
    let key = "/colo/expiry";
    let mut a = arbiter(&etcd, key, "a");
    let mut b = arbiter(&etcd, key, "b");
    let Decision::Granted(ga) = a.acquire().unwrap() else {
        panic!("first acquire must win")
    };
    assert_eq!(ga.ttl, Some(Duration::from_secs(1)));
    let mut gate = FenceGate::new();
    gate.check(ga.token).unwrap();

    // While a renews, b is denied for well over one TTL.
    let until = Instant::now() + Duration::from_millis(1800);
    while Instant::now() < until {
        assert_eq!(a.renew().unwrap(), Decision::Granted(ga));
        assert_eq!(
            b.acquire().unwrap(),
            Decision::Denied {
                holder: Some(ga.token)
            }
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // a stops renewing (frozen or dead): b wins once etcd expires the lease.
    let last_renew_sent = Instant::now();
    assert_eq!(a.renew().unwrap(), Decision::Granted(ga));
    let gb = loop {
        match b.acquire().unwrap() {
            Decision::Granted(g) => break g,
            Decision::Denied { .. } => std::thread::sleep(Duration::from_millis(20)),
        }
        assert!(
            last_renew_sent.elapsed() < Duration::from_secs(5),
            "lease never expired"
        );
    };
    let handover = last_renew_sent.elapsed();
    eprintln!("etcd lease handover {handover:?} after the last renewal (ttl 1 s)");
    assert!(
        handover >= Duration::from_secs(1),
        "b won {handover:?} after a's renewal, before the TTL"
    );
    assert!(
        gb.token > ga.token,
        "tokens must grow: {} then {}",
        ga.token,
        gb.token
    );

    // The new holder's output passes, the old holder's is rejected, and the old holder learns it lost.
    gate.check(gb.token).unwrap();
    assert!(gate.check(ga.token).is_err());
    assert_eq!(a.renew().unwrap(), Decision::Denied { holder: None });
    assert!(matches!(a.acquire().unwrap(), Decision::Denied { holder: Some(t) } if t == gb.token));
}

#[test]
fn release_hands_over_at_once_and_a_holder_reacquires_with_its_token() {
    let Some(etcd) = EtcdProcess::start("release_hands_over_at_once_and_a_holder_reacquires_with_its_token")
    else {
        return;
    };
    let key = "/colo/release";
    let mut a = arbiter(&etcd, key, "a");
    let mut b = arbiter(&etcd, key, "b");
    let Decision::Granted(g1) = a.acquire().unwrap() else {
        panic!("a must win")
    };
    assert_eq!(
        a.acquire().unwrap(),
        Decision::Granted(g1),
        "re-acquiring keeps the token"
    );
    a.release().unwrap();
    let Decision::Granted(g2) = b.acquire().unwrap() else {
        panic!("b must win right after the release")
    };
    assert!(g2.token > g1.token);
}

#[test]
fn promoted_node_keeps_its_lease_through_renewals_and_fences_the_other() {
    let Some(etcd) =
        EtcdProcess::start("promoted_node_keeps_its_lease_through_renewals_and_fences_the_other")
    else {
        return;
    };
    let key = "/colo/machine";
    let mut arb_s = arbiter(&etcd, key, "s");
    let mut arb_p = arbiter(&etcd, key, "p");
    let t0 = Instant::now();
    let mut s = common::node_in_colo(false, t0);
    let mut p = common::node_in_colo(true, t0);
    // A partition: both lose the other. The secondary asks first and wins.
    s.handle_event(t0, Event::ChannelError).unwrap();
    let acts = common::drive(&mut s, &mut arb_s);
    let [Action::Promote { token }] = acts[..] else {
        panic!("secondary must promote: {acts:?}")
    };
    s.handle_event(Instant::now(), Event::TakeoverDone).unwrap();
    // The promoted node drives its timers for 2.5 s (2.5 TTLs): renewals keep the lease.
    let end = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < end {
        s.handle_timeout(Instant::now());
        assert!(common::drive(&mut s, &mut arb_s).is_empty());
        assert!(s.is_primary_alone(Instant::now()));
        std::thread::sleep(Duration::from_millis(20));
    }
    // The old primary times out late and is refused: it must stop its guest.
    p.handle_event(Instant::now(), Event::ChannelError).unwrap();
    assert_eq!(common::drive(&mut p, &mut arb_p), vec![Action::StopGuest]);
    assert_eq!(p.output_token(Instant::now()), None);
    assert_eq!(s.output_token(Instant::now()), Some(token));
}
