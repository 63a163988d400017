//! Test support: a throwaway etcd server on loopback.
#![allow(dead_code)]

mod etcd_process;
#[allow(unused_imports)] // not every test binary starts etcd
pub use etcd_process::*;

use std::time::{Duration, Instant};

use colo_failover::{Action, Arbiter, Event, Node};

/// Executes the node's arbiter actions against `arbiter` right away (as a VMM's driver loop would) and
/// returns the other actions.
pub fn drive(node: &mut Node, arbiter: &mut dyn Arbiter) -> Vec<Action> {
    let mut other = Vec::new();
    while let Some(a) = node.poll_action() {
        match a {
            Action::AcquireArbiter => {
                let answer = arbiter.acquire();
                node.handle_arbiter(Instant::now(), answer)
                    .expect("arbiter answer accepted");
            }
            Action::RenewArbiter => {
                let answer = arbiter.renew();
                node.handle_arbiter(Instant::now(), answer)
                    .expect("renew answer accepted");
            }
            Action::ReleaseArbiter => {
                let _ = arbiter.release();
            }
            a => other.push(a),
        }
    }
    other
}

/// A node that is in COLO with the given role at `now`.
pub fn node_in_colo(primary: bool, now: Instant) -> Node {
    // Fence at the first refusal: these tests race live holders.
    let config = colo_failover::Config {
        denied_patience: Duration::ZERO,
        ..colo_failover::Config::default()
    };
    let mut n = Node::new(config).expect("valid config");
    n.handle_event(now, if primary { Event::Protect } else { Event::Join })
        .expect("start");
    n.handle_event(now, Event::SyncCompleted).expect("sync");
    while n.poll_action().is_some() {}
    n
}
