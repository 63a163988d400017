//! Model checking of the pair: two node machines, a simulated network and a simulated arbiter.
//!
//! A deterministic discrete-event simulation drives both [`Node`]s with their own timers. Proptest generates
//! fault schedules: heartbeats lost or delayed in either direction, partitions that heal, nodes that are cut
//! from the arbiter, crash, freeze (a long pause, then resume with stale state) or restart, checkpoint loads,
//! operator commands and re-protection. The arbiter is a [`LeaseTable`] (the witness server's core, with the
//! etcd arbiter's semantics) behind links with delays and an RPC timeout.
//!
//! Invariants, checked after every simulated instant:
//! - with an arbiter, at most one node runs as the primary alone with a lease that is valid on its own clock;
//! - every such node's token passes the [`FenceGate`] of the shared sink (no output a gate would reject);
//! - every arbiter answer is accepted by the machine (one request at a time, no answer without a request);
//! - after all faults heal, a pair that still has a copy of the guest ends with exactly one primary.
//!
//! Both a proptest over random schedules and an exhaustive pass over all short schedules from a fixed menu run
//! these checks. Deliberately breaking the lease rule (counting the lease 600 ms longer) or the patience with a
//! refusing arbiter makes them fail.
//!
//! With [`NoArbiter`] semantics the same partition gives two primaries: `split_brain_with_no_arbiter` shows it.
//!
//! Clocks: both nodes and the arbiter share the simulated clock (no drift); the lease rule that makes this
//! safe (a node counts its lease from when it sent the request) is what the test exercises.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use colo_failover::{
    Action, Arbiter, Config, Decision, Event, FenceGate, FenceToken, LeaseAnswer, LeaseTable, NoArbiter,
    Node, Role,
};
use proptest::prelude::*;

const TTL_MS: u64 = 1000;
const RPC_TIMEOUT_MS: u64 = 250;
const TAKEOVER_MS: u64 = 5;
const SYNC_MS: u64 = 50;

fn config() -> Config {
    Config {
        denied_patience: Duration::from_millis(3000),
        ..Config::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum ArbKind {
    Acquire,
    Renew(u64),
    Release(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Sim {
    /// Deliver an event to a node (`incarnation` guards against a restarted node getting old mail).
    Deliver {
        node: usize,
        incarnation: u32,
        event: EventKey,
    },
    /// The arbiter processes a request.
    ArbiterProcess {
        node: usize,
        incarnation: u32,
        kind: ArbKind,
        sent: u64,
    },
    /// A scheduled fault.
    Op(usize),
    /// A frozen node wakes up.
    Resume { node: usize, incarnation: u32 },
}

/// `Event` is not `Ord`; this is an orderable copy of the events the simulation delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum EventKey {
    Heartbeat,
    Granted(u64, u64),
    Denied(u64),
    Unreachable,
    TakeoverDone,
    SyncCompleted,
    LoadFinished,
}

impl EventKey {
    fn event(self) -> Event {
        match self {
            EventKey::Heartbeat => Event::HeartbeatReceived,
            EventKey::Granted(t, ttl) => Event::ArbiterGranted {
                token: FenceToken(t),
                ttl: Some(Duration::from_millis(ttl)),
            },
            EventKey::Denied(t) => Event::ArbiterDenied {
                holder: Some(FenceToken(t)),
            },
            EventKey::Unreachable => Event::ArbiterUnreachable,
            EventKey::TakeoverDone => Event::TakeoverDone,
            EventKey::SyncCompleted => Event::SyncCompleted,
            EventKey::LoadFinished => Event::CheckpointLoadFinished,
        }
    }
    fn is_arbiter_answer(self) -> bool {
        matches!(
            self,
            EventKey::Granted(..) | EventKey::Denied(_) | EventKey::Unreachable
        )
    }
}

/// A fault or operator action in a schedule.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Heartbeats from `from` to the other node are lost (or flow again).
    Link { from: usize, up: bool },
    /// Heartbeats from `from` take this long (beyond the timeout: delayed into a failover).
    Delay { from: usize, ms: u64 },
    /// Both directions down.
    Partition,
    /// Everything up, small delays.
    Heal,
    /// `node` cannot (or can again) reach the arbiter.
    ArbiterLink { node: usize, up: bool },
    /// The arbiter answers `node` after this long each way.
    ArbiterDelay { node: usize, ms: u64 },
    /// `node` crashes.
    Kill(usize),
    /// `node` freezes for `ms` and then resumes where it was.
    Pause { node: usize, ms: u64 },
    /// A crashed node comes back empty (idle).
    Restart(usize),
    /// The operator's failover command on `node`.
    Command(usize),
    /// The checkpoint channel of `node` fails.
    ChannelError(usize),
    /// `node`, if a COLO secondary, loads a checkpoint for `ms`.
    Load { node: usize, ms: u64 },
    /// A node running alone takes the other (idle, fenced or stopped) as its new secondary.
    Reprotect,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let n = 0..2usize;
    prop_oneof![
        (n.clone(), any::<bool>()).prop_map(|(from, up)| Op::Link { from, up }),
        (n.clone(), 0..900u64).prop_map(|(from, ms)| Op::Delay { from, ms }),
        Just(Op::Partition),
        Just(Op::Heal),
        (n.clone(), any::<bool>()).prop_map(|(node, up)| Op::ArbiterLink { node, up }),
        (n.clone(), 0..300u64).prop_map(|(node, ms)| Op::ArbiterDelay { node, ms }),
        n.clone().prop_map(Op::Kill),
        (n.clone(), 100..3000u64).prop_map(|(node, ms)| Op::Pause { node, ms }),
        n.clone().prop_map(Op::Restart),
        n.clone().prop_map(Op::Command),
        n.clone().prop_map(Op::ChannelError),
        (n, 1..400u64).prop_map(|(node, ms)| Op::Load { node, ms }),
        Just(Op::Reprotect),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    Running,
    Paused,
    Dead,
}

struct SimNode {
    node: Node,
    life: Life,
    incarnation: u32,
    hb_up: bool,
    hb_delay: u64,
    arb_up: bool,
    arb_delay: u64,
    /// The node's own NoArbiter when the pair runs without fencing.
    no_arbiter: NoArbiter,
    last_token: FenceToken,
}

struct World {
    t0: Instant,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, Sim)>>,
    nodes: [SimNode; 2],
    table: LeaseTable,
    with_arbiter: bool,
    sink: FenceGate,
    ops: Vec<Op>,
    /// Largest number of nodes simultaneously running as primary alone.
    max_alone: usize,
    trace: Vec<String>,
}

impl World {
    fn new(with_arbiter: bool, ops: Vec<Op>) -> World {
        let t0 = Instant::now();
        let mk = |primary: bool| {
            let mut node = Node::new(config()).unwrap();
            node.handle_event(t0, if primary { Event::Protect } else { Event::Join })
                .unwrap();
            node.handle_event(t0, Event::SyncCompleted).unwrap();
            SimNode {
                node,
                life: Life::Running,
                incarnation: 0,
                hb_up: true,
                hb_delay: 1,
                arb_up: true,
                arb_delay: 1,
                no_arbiter: NoArbiter::unsafe_under_partitions(),
                last_token: FenceToken::ZERO,
            }
        };
        World {
            t0,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes: [mk(true), mk(false)],
            table: LeaseTable::new(0, Duration::from_secs(60)),
            with_arbiter,
            sink: FenceGate::new(),
            ops,
            max_alone: 0,
            trace: Vec::new(),
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn schedule(&mut self, at: u64, ev: Sim) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, ev)));
    }

    fn deliver_later(&mut self, node: usize, after: u64, event: EventKey) {
        let incarnation = self.nodes[node].incarnation;
        self.schedule(
            self.now + after,
            Sim::Deliver {
                node,
                incarnation,
                event,
            },
        );
    }

    /// The next instant something happens: a queued item or a running node's timer.
    fn next_time(&self) -> Option<u64> {
        let q = self.queue.peek().map(|Reverse((t, _, _))| *t);
        let timers = self
            .nodes
            .iter()
            .filter(|n| n.life == Life::Running)
            .filter_map(|n| {
                n.node.poll_timeout().map(|d| {
                    let us = d.saturating_duration_since(self.t0).as_micros();
                    u64::try_from(us.div_ceil(1000)).unwrap_or(u64::MAX)
                })
            });
        q.into_iter().chain(timers).min()
    }

    fn run_until(&mut self, end: u64) {
        while let Some(t) = self.next_time().filter(|&t| t <= end) {
            self.now = self.now.max(t);
            let now = self.at(self.now);
            for i in 0..2 {
                if self.nodes[i].life == Life::Running {
                    self.nodes[i].node.handle_timeout(now);
                    self.run_actions(i);
                }
            }
            while let Some(Reverse((t, _, _))) = self.queue.peek() {
                if *t > self.now {
                    break;
                }
                let Some(Reverse((_, _, ev))) = self.queue.pop() else {
                    break;
                };
                self.process(ev);
            }
            self.check();
        }
        self.now = self.now.max(end);
    }

    fn process(&mut self, ev: Sim) {
        let now = self.at(self.now);
        match ev {
            Sim::Deliver {
                node,
                incarnation,
                event,
            } => {
                let n = &mut self.nodes[node];
                if n.incarnation != incarnation || n.life == Life::Dead {
                    return;
                }
                if n.life == Life::Paused {
                    // A frozen process reads its socket later.
                    self.schedule(self.now + 1, ev);
                    return;
                }
                let result = n.node.handle_event(now, event.event());
                self.trace.push(format!(
                    "{} n{node} {event:?} -> {result:?} {:?}",
                    self.now,
                    n.node.status()
                ));
                if event.is_arbiter_answer() {
                    assert_eq!(
                        result,
                        Ok(()),
                        "arbiter answer refused\n{}",
                        self.trace.join("\n")
                    );
                }
                if event == EventKey::Heartbeat {
                    assert_eq!(result, Ok(()));
                }
                self.run_actions(node);
            }
            Sim::ArbiterProcess {
                node,
                incarnation,
                kind,
                sent,
            } => {
                if !self.nodes[node].arb_up {
                    self.schedule(
                        sent + RPC_TIMEOUT_MS,
                        Sim::Deliver {
                            node,
                            incarnation,
                            event: EventKey::Unreachable,
                        },
                    );
                    return;
                }
                let name = if node == 0 { "n0" } else { "n1" };
                let ttl = Duration::from_millis(TTL_MS);
                let answer = match kind {
                    ArbKind::Acquire => Some(self.table.acquire(now, name, ttl)),
                    ArbKind::Renew(t) => Some(self.table.renew(now, name, FenceToken(t), ttl)),
                    ArbKind::Release(t) => {
                        self.table.release(now, name, FenceToken(t));
                        None
                    }
                };
                let Some(answer) = answer else { return };
                let back = self.now + self.nodes[node].arb_delay;
                let key = match answer {
                    LeaseAnswer::Granted { token, ttl } => {
                        EventKey::Granted(token.get(), u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
                    }
                    LeaseAnswer::Denied { holder } => EventKey::Denied(holder.get()),
                    LeaseAnswer::NotReady { .. } => EventKey::Unreachable,
                };
                if back - sent <= RPC_TIMEOUT_MS {
                    self.schedule(
                        back,
                        Sim::Deliver {
                            node,
                            incarnation,
                            event: key,
                        },
                    );
                } else {
                    // The answer comes too late: the driver already gave up (the arbiter acted anyway).
                    self.schedule(
                        sent + RPC_TIMEOUT_MS,
                        Sim::Deliver {
                            node,
                            incarnation,
                            event: EventKey::Unreachable,
                        },
                    );
                }
            }
            Sim::Resume { node, incarnation } => {
                let n = &mut self.nodes[node];
                if n.incarnation == incarnation && n.life == Life::Paused {
                    n.life = Life::Running;
                    n.node.handle_timeout(now);
                    self.run_actions(node);
                }
            }
            Sim::Op(i) => {
                let op = self.ops[i];
                self.trace.push(format!("{} op {op:?}", self.now));
                self.apply(op);
            }
        }
    }

    fn apply(&mut self, op: Op) {
        let now = self.at(self.now);
        match op {
            Op::Link { from, up } => self.nodes[from].hb_up = up,
            Op::Delay { from, ms } => self.nodes[from].hb_delay = ms,
            Op::Partition => self.nodes.iter_mut().for_each(|n| n.hb_up = false),
            Op::Heal => self.nodes.iter_mut().for_each(|n| {
                n.hb_up = true;
                n.hb_delay = 1;
                n.arb_up = true;
                n.arb_delay = 1;
            }),
            Op::ArbiterLink { node, up } => self.nodes[node].arb_up = up,
            Op::ArbiterDelay { node, ms } => self.nodes[node].arb_delay = ms,
            Op::Kill(node) => self.nodes[node].life = Life::Dead,
            Op::Pause { node, ms } => {
                if self.nodes[node].life == Life::Running {
                    self.nodes[node].life = Life::Paused;
                    let incarnation = self.nodes[node].incarnation;
                    self.schedule(self.now + ms, Sim::Resume { node, incarnation });
                }
            }
            Op::Restart(node) => {
                if self.nodes[node].life == Life::Dead {
                    let n = &mut self.nodes[node];
                    n.node = Node::new(config()).unwrap();
                    n.life = Life::Running;
                    n.incarnation += 1;
                    n.last_token = FenceToken::ZERO;
                }
            }
            Op::Command(node) => self.with_running(node, |n| {
                let _ = n.handle_event(now, Event::FailoverCommand);
            }),
            Op::ChannelError(node) => self.with_running(node, |n| {
                let _ = n.handle_event(now, Event::ChannelError);
            }),
            Op::Load { node, ms } => {
                let mut started = false;
                self.with_running(node, |n| {
                    started = n.handle_event(now, Event::CheckpointLoadStarted).is_ok()
                });
                if started {
                    self.deliver_later(node, ms, EventKey::LoadFinished);
                }
            }
            Op::Reprotect => {
                let alone = (0..2).find(|&i| {
                    let s = self.nodes[i].node.status();
                    self.nodes[i].life == Life::Running && s.role == Role::Primary && s.mode == Role::None
                });
                let Some(p) = alone else { return };
                let s = 1 - p;
                if self.nodes[s].life != Life::Running || self.nodes[s].node.status().role != Role::None {
                    return;
                }
                if self.nodes[p].node.handle_event(now, Event::Protect).is_ok()
                    && self.nodes[s].node.handle_event(now, Event::Join).is_ok()
                {
                    self.deliver_later(p, SYNC_MS, EventKey::SyncCompleted);
                    self.deliver_later(s, SYNC_MS, EventKey::SyncCompleted);
                }
                self.run_actions(p);
                self.run_actions(s);
            }
        }
        for i in 0..2 {
            self.run_actions(i);
        }
    }

    fn with_running(&mut self, node: usize, f: impl FnOnce(&mut Node)) {
        if self.nodes[node].life == Life::Running {
            f(&mut self.nodes[node].node);
        }
    }

    fn run_actions(&mut self, i: usize) {
        if self.nodes[i].life != Life::Running {
            return;
        }
        while let Some(a) = self.nodes[i].node.poll_action() {
            let incarnation = self.nodes[i].incarnation;
            let sent = self.now;
            match a {
                Action::SendHeartbeat => {
                    if self.nodes[i].hb_up {
                        let delay = self.nodes[i].hb_delay;
                        let to = 1 - i;
                        let inc = self.nodes[to].incarnation;
                        self.schedule(
                            self.now + delay,
                            Sim::Deliver {
                                node: to,
                                incarnation: inc,
                                event: EventKey::Heartbeat,
                            },
                        );
                    }
                }
                Action::AcquireArbiter | Action::RenewArbiter | Action::ReleaseArbiter
                    if !self.with_arbiter =>
                {
                    let n = &mut self.nodes[i];
                    let answer = match a {
                        Action::AcquireArbiter => n.no_arbiter.acquire(),
                        Action::RenewArbiter => n.no_arbiter.renew(),
                        _ => {
                            let _ = n.no_arbiter.release();
                            continue;
                        }
                    };
                    let key = match answer {
                        Ok(Decision::Granted(g)) => EventKey::Granted(g.token.get(), 1 << 40),
                        _ => EventKey::Unreachable,
                    };
                    self.deliver_later(i, 0, key);
                }
                Action::AcquireArbiter | Action::RenewArbiter | Action::ReleaseArbiter => {
                    let token = self.nodes[i].node.status().token.map_or(0, FenceToken::get);
                    let kind = match a {
                        Action::AcquireArbiter => ArbKind::Acquire,
                        Action::RenewArbiter => ArbKind::Renew(token),
                        _ => ArbKind::Release(self.nodes[i].last_token.get()),
                    };
                    if self.nodes[i].arb_up {
                        let at = self.now + self.nodes[i].arb_delay;
                        self.schedule(
                            at,
                            Sim::ArbiterProcess {
                                node: i,
                                incarnation,
                                kind,
                                sent,
                            },
                        );
                    } else if !matches!(kind, ArbKind::Release(_)) {
                        self.schedule(
                            sent + RPC_TIMEOUT_MS,
                            Sim::Deliver {
                                node: i,
                                incarnation,
                                event: EventKey::Unreachable,
                            },
                        );
                    }
                }
                Action::Promote { token } | Action::ContinueAlone { token } => {
                    assert!(
                        token >= self.nodes[i].last_token,
                        "a node's tokens must not go back"
                    );
                    self.nodes[i].last_token = token;
                    self.deliver_later(i, TAKEOVER_MS, EventKey::TakeoverDone);
                }
                Action::SuspendOutput | Action::StopGuest => {}
            }
        }
    }

    /// The safety invariants at the current instant.
    fn check(&mut self) {
        let now = self.at(self.now);
        let alone: Vec<usize> = (0..2)
            .filter(|&i| self.nodes[i].life == Life::Running && self.nodes[i].node.is_primary_alone(now))
            .collect();
        self.max_alone = self.max_alone.max(alone.len());
        if self.with_arbiter {
            assert!(
                alone.len() <= 1,
                "split brain at {} ms\n{}",
                self.now,
                self.trace.join("\n")
            );
            for &i in &alone {
                let token = self.nodes[i]
                    .node
                    .output_token(now)
                    .expect("primary alone has a token");
                assert!(
                    self.sink.check(token).is_ok(),
                    "n{i} released output with stale {token} at {} ms\n{}",
                    self.now,
                    self.trace.join("\n")
                );
            }
        }
    }

    fn run_schedule(&mut self, gaps: &[u64]) {
        let mut t = 0;
        for (i, gap) in gaps.iter().enumerate() {
            t += gap;
            self.schedule(t, Sim::Op(i));
        }
        self.run_until(t + 1);
    }

    /// After everything heals: a pair that still has a copy of the guest must end with exactly one primary.
    fn check_recovers(&mut self) {
        self.apply(Op::Heal);
        for i in 0..2 {
            if self.nodes[i].life == Life::Paused {
                self.nodes[i].life = Life::Running;
                let now = self.at(self.now);
                self.nodes[i].node.handle_timeout(now);
            }
        }
        let end = self.now + 15_000;
        self.run_until(end);
        let live: Vec<_> = self
            .nodes
            .iter()
            .filter(|n| n.life == Life::Running)
            .map(|n| n.node.status())
            .collect();
        if live.iter().any(|s| s.role != Role::None) {
            let primaries = live.iter().filter(|s| s.role == Role::Primary).count();
            assert_eq!(primaries, 1, "after healing: {live:?}\n{}", self.trace.join("\n"));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn never_two_primaries_with_valid_tokens(
        schedule in proptest::collection::vec((0..1500u64, op_strategy()), 1..30)
    ) {
        let (gaps, ops): (Vec<u64>, Vec<Op>) = schedule.into_iter().unzip();
        let mut world = World::new(true, ops);
        world.run_schedule(&gaps);
        world.check_recovers();
    }
}

/// The deterministic partition that the NoArbiter docs warn about: both sides lose each other, both are
/// "granted", both release output, and their tokens (each from its own NoArbiter) do not order them.
#[test]
fn split_brain_with_no_arbiter() {
    let mut world = World::new(false, vec![Op::Partition]);
    world.run_schedule(&[1000]);
    world.run_until(world.now + 2000);
    let now = world.at(world.now);
    assert!(
        world.nodes.iter().all(|n| n.node.is_primary_alone(now)),
        "both run as primary"
    );
    assert_eq!(world.max_alone, 2);
    let tokens: Vec<_> = world.nodes.iter().map(|n| n.node.output_token(now)).collect();
    // Each NoArbiter starts at 1: the gate cannot tell the copies apart and admits both.
    assert_eq!(tokens, vec![Some(FenceToken(1)), Some(FenceToken(1))]);
    let mut gate = FenceGate::new();
    assert!(tokens.iter().flatten().all(|&t| gate.check(t).is_ok()));
}

/// The same partition with the arbiter: exactly one side runs, the other stops.
#[test]
fn partition_with_arbiter_leaves_one_primary() {
    let mut world = World::new(true, vec![Op::Partition]);
    world.run_schedule(&[1000]);
    world.run_until(world.now + 6000);
    let now = world.at(world.now);
    let alone = world
        .nodes
        .iter()
        .filter(|n| n.node.is_primary_alone(now))
        .count();
    assert_eq!(alone, 1);
    assert_eq!(world.max_alone, 1);
    let roles: Vec<_> = world.nodes.iter().map(|n| n.node.status().role).collect();
    assert!(
        roles.contains(&Role::Primary) && roles.contains(&Role::None),
        "{roles:?}"
    );
}

/// A frozen holder wakes up after its lease ran out and the partner took over: it must not release output.
#[test]
fn frozen_primary_wakes_up_fenced() {
    let mut world = World::new(
        true,
        vec![
            Op::Kill(1),                     // the secondary dies: the primary takes the arbiter
            Op::Restart(1),                  // it comes back empty
            Op::Reprotect,                   // and becomes the new secondary
            Op::Pause { node: 0, ms: 4000 }, // the primary freezes through its lease
        ],
    );
    world.run_schedule(&[100, 2000, 100, 1000]);
    world.run_until(world.now + 6000);
    let now = world.at(world.now);
    assert!(
        world.nodes[1].node.is_primary_alone(now),
        "the new secondary took over"
    );
    assert!(
        !world.nodes[0].node.is_primary_alone(now),
        "the woken primary must not release"
    );
    assert_eq!(world.max_alone, 1);
}

/// Exhaustive enumeration over small bounds, complementing the random schedules: every sequence of three
/// faults from a fixed menu, each after a short or a long gap, with the same invariants.
#[test]
fn exhaustive_three_fault_schedules() {
    let menu = [
        Op::Link { from: 0, up: false },
        Op::Link { from: 1, up: false },
        Op::Delay { from: 0, ms: 700 },
        Op::Delay { from: 1, ms: 700 },
        Op::Partition,
        Op::Heal,
        Op::ArbiterLink { node: 0, up: false },
        Op::ArbiterLink { node: 1, up: false },
        Op::ArbiterDelay { node: 0, ms: 200 },
        Op::Kill(0),
        Op::Kill(1),
        Op::Pause { node: 0, ms: 1500 },
        Op::Pause { node: 1, ms: 1500 },
        Op::Restart(0),
        Op::Restart(1),
        Op::Command(0),
        Op::Command(1),
        Op::ChannelError(1),
        Op::Load { node: 1, ms: 300 },
        Op::Reprotect,
    ];
    let gaps = [100u64, 900];
    let mut runs = 0;
    for a in 0..menu.len() * gaps.len() {
        for b in 0..menu.len() * gaps.len() {
            for c in 0..menu.len() * gaps.len() {
                let pick = |k: usize| (gaps[k % gaps.len()], menu[k / gaps.len()]);
                let schedule = [pick(a), pick(b), pick(c)];
                let (g, ops): (Vec<u64>, Vec<Op>) = schedule.into_iter().unzip();
                let mut world = World::new(true, ops);
                world.run_schedule(&g);
                world.check_recovers();
                runs += 1;
            }
        }
    }
    assert_eq!(runs, 40 * 40 * 40);
}
