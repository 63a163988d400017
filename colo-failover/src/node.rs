//! The sans-IO node machine: role, heartbeat, failover status and fencing for one side of a COLO pair.
//!
//! The VMM owns the sockets, the clock and the arbiter. It feeds [`Event`]s in with
//! [`Node::handle_event`], calls [`Node::handle_timeout`] when [`Node::poll_timeout`] passes, and executes
//! the [`Action`]s it drains with [`Node::poll_action`]. [`Node::poll_notice`] is the event stream for
//! management (the COLO_EXIT equivalent) and [`Node::status`] the query (query-colo-status).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::{ArbiterError, Decision, Error, FenceToken};

/// What a node does with the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Not part of a pair (QEMU's mode `none`).
    None,
    /// Runs the guest and releases its output.
    Primary,
    /// Runs a shadow of the guest whose output is only compared, never released.
    Secondary,
}

/// Progress of a failover (QEMU's `COLOStatus` failover values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailoverStatus {
    /// No failover in progress.
    None,
    /// The partner is lost (or an operator asked); waiting to win the arbiter.
    Required,
    /// The arbiter is won; the VMM is taking over (promoting, or stopping replication).
    Active,
    /// The takeover is done; this node runs the guest alone, unprotected.
    Completed,
    /// A failover was requested while the secondary was loading a checkpoint; it proceeds when the load ends.
    Relaunch,
}

/// Why COLO ended (QEMU's `COLOExitReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitReason {
    /// COLO has not exited.
    None,
    /// An operator asked for the failover.
    Request,
    /// The partner was lost: heartbeat timeout or checkpoint channel error.
    Error,
    /// A failover is being processed.
    Processing,
}

/// Why this node decided its partner is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LossCause {
    /// No heartbeat for longer than [`Config::heartbeat_timeout`].
    HeartbeatTimeout,
    /// The checkpoint channel failed.
    ChannelError,
    /// The operator's failover command.
    Command,
}

/// The longest lease TTL the node believes (longer grants are counted as this long).
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(24 * 3600);

/// The longest duration a [`Config`] field may have.
pub const MAX_CONFIG_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Tuning of one node. All durations are measured on the clock the VMM passes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// How often to send a heartbeat to the partner.
    pub heartbeat_interval: Duration,
    /// How long without any heartbeat from the partner before it is declared lost.
    pub heartbeat_timeout: Duration,
    /// How long to wait before asking the arbiter again after it could not be reached.
    pub arbiter_retry: Duration,
    /// A held lease is renewed when this fraction (in percent) of its TTL has passed since the last renewal
    /// was sent.
    pub renew_percent: u8,
    /// How long a node that lost its partner keeps asking while the arbiter says someone else holds it,
    /// before it gives up and stops its guest. A partner that died while holding the arbiter (a primary
    /// after an earlier failover) keeps it until its lease runs out, so this must exceed the arbiter's lease
    /// TTL plus its expiry slack (etcd: about 0.5 s). Zero fences at the first refusal.
    pub denied_patience: Duration,
}

impl Default for Config {
    /// 100 ms heartbeats, 500 ms timeout (five missed heartbeats), 100 ms arbiter retry, renew at a third of
    /// the TTL, 5 s patience with a refusing arbiter (enough for leases up to about 4 s).
    fn default() -> Self {
        Config {
            heartbeat_interval: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_millis(500),
            arbiter_retry: Duration::from_millis(100),
            renew_percent: 33,
            denied_patience: Duration::from_secs(5),
        }
    }
}

impl Config {
    /// Checks that the values make sense together.
    pub fn validate(&self) -> Result<(), Error> {
        if self.heartbeat_interval.is_zero() {
            return Err(Error::InvalidConfig {
                detail: "heartbeat_interval is zero",
            });
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(Error::InvalidConfig {
                detail: "heartbeat_timeout must exceed heartbeat_interval",
            });
        }
        if self.arbiter_retry.is_zero() {
            return Err(Error::InvalidConfig {
                detail: "arbiter_retry is zero",
            });
        }
        let durations = [
            self.heartbeat_interval,
            self.heartbeat_timeout,
            self.arbiter_retry,
            self.denied_patience,
        ];
        if durations.iter().any(|d| *d > MAX_CONFIG_DURATION) {
            return Err(Error::InvalidConfig {
                detail: "a duration exceeds MAX_CONFIG_DURATION (one day)",
            });
        }
        if self.renew_percent == 0 || self.renew_percent >= 100 {
            return Err(Error::InvalidConfig {
                detail: "renew_percent must be in 1..=99",
            });
        }
        Ok(())
    }
}

/// Inputs from the VMM: commands, network observations and arbiter answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Start protecting the running guest: the VMM begins the initial sync to a (new) secondary. Valid when
    /// idle and when running alone after a failover (re-protection; the guest keeps running).
    Protect,
    /// Join as the secondary of a primary that is syncing to us. Valid when idle, stopped or fenced.
    Join,
    /// The initial sync finished; COLO checkpointing runs from now on.
    SyncCompleted,
    /// A heartbeat from the partner arrived.
    HeartbeatReceived,
    /// The checkpoint channel (or the initial sync stream) failed: counted as losing the partner.
    ChannelError,
    /// Secondary only: every byte of a checkpoint arrived and the VMM starts loading it into the SVM.
    CheckpointLoadStarted,
    /// Secondary only: the checkpoint is loaded and the SVM resumes.
    CheckpointLoadFinished,
    /// The operator's failover command (QEMU's `x-colo-lost-heartbeat`).
    FailoverCommand,
    /// The arbiter granted (or renewed) our holding.
    ArbiterGranted {
        /// The grant's fencing token.
        token: FenceToken,
        /// Its time to live, counted from when the request action was emitted (`None`: never expires).
        ttl: Option<Duration>,
    },
    /// The arbiter refused: another node holds it.
    ArbiterDenied {
        /// The holder's token, if known.
        holder: Option<FenceToken>,
    },
    /// The arbiter could not be reached or gave no usable answer.
    ArbiterUnreachable,
    /// The VMM finished the takeover asked for by [`Action::Promote`] or [`Action::ContinueAlone`].
    TakeoverDone,
    /// Leave COLO and stop (the operator shuts this side down).
    Stop,
}

/// What the VMM must do, drained with [`Node::poll_action`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send one heartbeat to the partner (a tiny message on its own socket or the checkpoint channel).
    SendHeartbeat,
    /// Call [`Arbiter::acquire`](crate::Arbiter::acquire) and feed the answer back.
    AcquireArbiter,
    /// Call [`Arbiter::renew`](crate::Arbiter::renew) and feed the answer back.
    RenewArbiter,
    /// Call [`Arbiter::release`](crate::Arbiter::release); no answer is expected.
    ReleaseArbiter,
    /// Secondary: drop any partly received checkpoint, commit the active disk overlay, switch the network
    /// rewriter to failover mode, take over the client-facing address and resume the SVM as the primary,
    /// stamping every released output with `token`. Report [`Event::TakeoverDone`].
    Promote {
        /// The token to attach to every output from now on.
        token: FenceToken,
    },
    /// Primary: stop replicating, close the checkpoint channel and release the comparator's queued output
    /// alone, stamped with `token`. Report [`Event::TakeoverDone`].
    ContinueAlone {
        /// The token to attach to every output from now on.
        token: FenceToken,
    },
    /// Our lease lapsed while running alone: stop releasing output (hold it or pause the guest) until the
    /// arbiter is won again ([`Action::ContinueAlone`] follows) or lost ([`Action::StopGuest`] follows).
    SuspendOutput,
    /// The other node holds the arbiter: this copy of the guest must not run. Stop it and release nothing.
    StopGuest,
}

/// Management notifications, drained with [`Node::poll_notice`] (QEMU's COLO_EXIT and friends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// COLO checkpointing started (or started again after re-protection).
    ColoStarted {
        /// Our side of the pair.
        role: Role,
    },
    /// The partner was declared lost.
    PeerLost {
        /// Why.
        cause: LossCause,
    },
    /// The failover status moved.
    FailoverStatusChanged {
        /// Before.
        from: FailoverStatus,
        /// After.
        to: FailoverStatus,
    },
    /// COLO ended on this node (QEMU's COLO_EXIT).
    ColoExit {
        /// The COLO mode the node had.
        mode: Role,
        /// Why it ended.
        reason: ExitReason,
    },
    /// The initial sync to or from a new partner was abandoned.
    SyncAborted,
    /// The arbiter holding was lost while COLO still ran (no effect until the next failover).
    ArbiterLost,
    /// This node lost the arbiter to the other one and stopped its guest.
    Fenced {
        /// The winner's token, if known.
        holder: Option<FenceToken>,
    },
}

/// The answer to a status query (QEMU's `query-colo-status`, plus fencing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// What the node does with the guest now.
    pub role: Role,
    /// The COLO mode: primary or secondary while COLO (or its failover) runs, none otherwise.
    pub mode: Role,
    /// The COLO mode before the last exit.
    pub last_mode: Role,
    /// Why COLO last ended, or `Processing` while a failover runs.
    pub reason: ExitReason,
    /// Failover progress.
    pub failover: FailoverStatus,
    /// Whether a partner shadows the guest (COLO is running).
    pub protected: bool,
    /// The token of the arbiter holding, if any.
    pub token: Option<FenceToken>,
}

/// The machine's state. Lease bookkeeping lives beside it in [`Node`] because a lease outlives states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not in a pair.
    Idle,
    /// Initial sync running (guest running unprotected on the primary).
    Syncing { role: Role },
    /// Checkpointing; `loading` only for a secondary applying a checkpoint.
    Colo { role: Role, loading: bool },
    /// Secondary: failover requested during a checkpoint load.
    Relaunch { reason: ExitReason },
    /// Waiting to win the arbiter.
    Required { role: Role, reason: ExitReason },
    /// Arbiter won; the VMM takes over.
    Active {
        role: Role,
        reason: ExitReason,
        token: FenceToken,
    },
    /// Running the guest alone, unprotected.
    Alone,
    /// Lost the arbiter to the other node; the guest is stopped.
    Fenced,
    /// Stopped by command or by losing the primary before having a consistent copy.
    Stopped,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Syncing { .. } => "syncing",
            State::Colo { .. } => "colo",
            State::Relaunch { .. } => "relaunch",
            State::Required { .. } => "failover-required",
            State::Active { .. } => "failover-active",
            State::Alone => "alone",
            State::Fenced => "fenced",
            State::Stopped => "stopped",
        }
    }
}

/// Timer-driven inputs, fed through the same transition function as [`Event`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    HeartbeatDue,
    PeerTimeout,
    RetryArbiter,
    RenewDue,
    LeaseExpired,
}

#[derive(Debug, Clone, Copy)]
enum Input {
    Event(Event),
    Timer(Timer),
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Protect => "protect",
            Event::Join => "join",
            Event::SyncCompleted => "sync-completed",
            Event::HeartbeatReceived => "heartbeat",
            Event::ChannelError => "channel-error",
            Event::CheckpointLoadStarted => "checkpoint-load-started",
            Event::CheckpointLoadFinished => "checkpoint-load-finished",
            Event::FailoverCommand => "failover-command",
            Event::ArbiterGranted { .. } => "arbiter-granted",
            Event::ArbiterDenied { .. } => "arbiter-denied",
            Event::ArbiterUnreachable => "arbiter-unreachable",
            Event::TakeoverDone => "takeover-done",
            Event::Stop => "stop",
        }
    }
}

/// A held arbiter grant as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    token: FenceToken,
    /// Local expiry: request emission time + TTL, never later than the arbiter's own expiry.
    expires: Option<Instant>,
    ttl: Option<Duration>,
}

/// One side of a COLO pair: the sans-IO role and failover machine.
///
/// ```
/// use std::time::{Duration, Instant};
/// use colo_failover::{Action, Config, Event, FenceToken, Node, Role};
///
/// let t0 = Instant::now();
/// let mut secondary = Node::new(Config::default()).unwrap();
/// secondary.handle_event(t0, Event::Join).unwrap();
/// secondary.handle_event(t0, Event::SyncCompleted).unwrap();
/// // The primary goes silent: after the heartbeat timeout the secondary asks the arbiter.
/// let deadline = secondary.poll_timeout().unwrap();
/// let later = t0 + Duration::from_secs(1);
/// secondary.handle_timeout(later);
/// let actions: Vec<_> = std::iter::from_fn(|| secondary.poll_action()).collect();
/// assert!(actions.contains(&Action::AcquireArbiter));
/// // The arbiter (witness, etcd) says yes: promote, stamping outputs with the grant's token.
/// secondary
///     .handle_event(later, Event::ArbiterGranted { token: FenceToken(5), ttl: Some(Duration::from_secs(2)) })
///     .unwrap();
/// assert_eq!(secondary.poll_action(), Some(Action::Promote { token: FenceToken(5) }));
/// secondary.handle_event(later, Event::TakeoverDone).unwrap();
/// assert_eq!(secondary.status().role, Role::Primary);
/// # let _ = deadline;
/// ```
#[derive(Debug)]
pub struct Node {
    config: Config,
    state: State,
    failover: FailoverStatus,
    reason: ExitReason,
    last_mode: Role,
    /// Whether this node ever ran COLO since it last started as primary: running alone then needs the
    /// arbiter.
    paired: bool,
    /// Whether the COLO_EXIT notice of the current (or last) COLO run went out already.
    exit_reported: bool,
    lease: Option<Lease>,
    /// The last token this node held, kept for outputs of a COLO primary whose lease lapsed.
    last_token: FenceToken,
    /// When the outstanding arbiter request (acquire or renew) was emitted.
    pending: Option<Instant>,
    /// When the arbiter first refused this failover.
    denied_since: Option<Instant>,
    next_heartbeat: Option<Instant>,
    peer_deadline: Option<Instant>,
    retry_at: Option<Instant>,
    renew_at: Option<Instant>,
    actions: VecDeque<Action>,
    notices: VecDeque<Notice>,
}

impl Node {
    /// A node in the idle state.
    pub fn new(config: Config) -> Result<Self, Error> {
        config.validate()?;
        Ok(Node {
            config,
            state: State::Idle,
            failover: FailoverStatus::None,
            reason: ExitReason::None,
            last_mode: Role::None,
            paired: false,
            exit_reported: true,
            lease: None,
            last_token: FenceToken::ZERO,
            pending: None,
            denied_since: None,
            next_heartbeat: None,
            peer_deadline: None,
            retry_at: None,
            renew_at: None,
            actions: VecDeque::new(),
            notices: VecDeque::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The status query.
    pub fn status(&self) -> Status {
        let (role, mode) = match self.state {
            State::Idle | State::Fenced | State::Stopped => (Role::None, Role::None),
            State::Syncing { role } => (role, Role::None),
            State::Colo { role, .. } => (role, role),
            // A failover out of COLO keeps the COLO mode until it completes; a node that already ran alone
            // and is re-winning a lapsed lease is not in COLO.
            State::Required { role, .. } | State::Active { role, .. } => {
                (role, if self.exit_reported { Role::None } else { role })
            }
            State::Relaunch { .. } => (Role::Secondary, Role::Secondary),
            State::Alone => (Role::Primary, Role::None),
        };
        Status {
            role,
            mode,
            last_mode: self.last_mode,
            reason: self.reason,
            failover: self.failover,
            protected: matches!(self.state, State::Colo { .. }),
            token: self.lease.map(|l| l.token),
        }
    }

    /// The token to stamp on outputs released at `now`, or `None` if this node must release nothing.
    ///
    /// A COLO primary releases (compared) output with its last token ([`FenceToken::ZERO`] before any
    /// failover); a node running alone needs a lease that has not lapsed at `now` (unless it never had a
    /// partner since it started). Everything else releases nothing.
    pub fn output_token(&self, now: Instant) -> Option<FenceToken> {
        let valid_lease = self
            .lease
            .filter(|l| l.expires.is_none_or(|e| now < e))
            .map(|l| l.token);
        match self.state {
            State::Colo {
                role: Role::Primary, ..
            } => Some(valid_lease.unwrap_or(self.last_token)),
            State::Syncing { role: Role::Primary } if !self.paired => Some(self.last_token),
            State::Syncing { role: Role::Primary } => valid_lease,
            State::Active { .. } => valid_lease,
            State::Alone if !self.paired => Some(valid_lease.unwrap_or(self.last_token)),
            State::Alone => valid_lease,
            _ => None,
        }
    }

    /// Whether the node releases output with nobody checking it: it runs the guest unprotected as the
    /// primary after a failover and its lease is valid at `now`. The split-brain invariant is that at most one
    /// node of a pair answers `true` at any instant.
    pub fn is_primary_alone(&self, now: Instant) -> bool {
        matches!(self.state, State::Active { .. } | State::Alone) && self.output_token(now).is_some()
    }

    /// The earliest instant at which [`Node::handle_timeout`] has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.next_heartbeat,
            self.peer_deadline,
            self.retry_at,
            self.renew_at,
            self.lease.and_then(|l| l.expires),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs every timer that is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Order matters when several are due at once: a lapsed lease first (stop output before anything
        // else), then the partner timeout, then routine work.
        loop {
            let timer = if self.lease.and_then(|l| l.expires).is_some_and(|e| e <= now) {
                Timer::LeaseExpired
            } else if self.peer_deadline.is_some_and(|d| d <= now) {
                Timer::PeerTimeout
            } else if self.retry_at.is_some_and(|d| d <= now) {
                Timer::RetryArbiter
            } else if self.renew_at.is_some_and(|d| d <= now) {
                Timer::RenewDue
            } else if self.next_heartbeat.is_some_and(|d| d <= now) {
                Timer::HeartbeatDue
            } else {
                return;
            };
            // Timers are only armed in states that accept them, so this cannot fail; if it ever did, the
            // timer is disarmed by `step` and the loop terminates.
            let _ = self.step(now, Input::Timer(timer));
        }
    }

    /// Feeds one event in. An event that makes no sense in the current state is an error and changes nothing.
    pub fn handle_event(&mut self, now: Instant, event: Event) -> Result<(), Error> {
        self.step(now, Input::Event(event))
    }

    /// Feeds an [`Arbiter`](crate::Arbiter) call's result in (a convenience over [`Node::handle_event`]).
    pub fn handle_arbiter(
        &mut self,
        now: Instant,
        answer: Result<Decision, ArbiterError>,
    ) -> Result<(), Error> {
        let event = match answer {
            Ok(Decision::Granted(g)) => Event::ArbiterGranted {
                token: g.token,
                ttl: g.ttl,
            },
            Ok(Decision::Denied { holder }) => Event::ArbiterDenied { holder },
            Err(_) => Event::ArbiterUnreachable,
        };
        self.handle_event(now, event)
    }

    /// The next action for the VMM.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next management notice.
    pub fn poll_notice(&mut self) -> Option<Notice> {
        self.notices.pop_front()
    }

    // ---- the transition function ----

    fn step(&mut self, now: Instant, input: Input) -> Result<(), Error> {
        use Event as E;
        use Input::{Event as Ev, Timer as Tm};
        let state = self.state;
        match (state, input) {
            // Starting a sync.
            (State::Idle, Ev(E::Protect)) => {
                self.paired = false;
                self.enter_syncing(now, Role::Primary);
            }
            (State::Alone, Ev(E::Protect)) => self.enter_syncing(now, Role::Primary),
            (State::Idle | State::Stopped | State::Fenced, Ev(E::Join)) => {
                self.enter_syncing(now, Role::Secondary)
            }
            (State::Syncing { role }, Ev(E::SyncCompleted)) => {
                self.paired = true;
                self.exit_reported = false;
                self.state = State::Colo { role, loading: false };
                self.set_failover(FailoverStatus::None);
                self.reason = ExitReason::None;
                self.notices.push_back(Notice::ColoStarted { role });
            }

            // Liveness.
            (
                State::Syncing { .. } | State::Colo { .. } | State::Relaunch { .. },
                Ev(E::HeartbeatReceived),
            ) => {
                if matches!(state, State::Relaunch { .. }) {
                    // Already failing over: a late heartbeat does not undo that.
                } else {
                    self.peer_deadline = Some(now + self.config.heartbeat_timeout);
                }
            }
            // Heartbeats race with everything; after the partner is given up they are stale, not wrong.
            (_, Ev(E::HeartbeatReceived)) => {}
            (
                State::Syncing { .. } | State::Colo { .. } | State::Relaunch { .. },
                Tm(Timer::HeartbeatDue),
            ) => {
                self.actions.push_back(Action::SendHeartbeat);
                self.next_heartbeat = Some(now + self.config.heartbeat_interval);
            }

            // Losing the partner during the initial sync: nothing to fail over to or from.
            (State::Syncing { role: Role::Primary }, Ev(E::ChannelError) | Tm(Timer::PeerTimeout)) => {
                self.stop_heartbeats();
                self.notices.push_back(Notice::SyncAborted);
                if self.paired && !self.lease_valid(now) {
                    // Re-protecting after a failover, and the lease lapsed meanwhile: running alone needs the
                    // arbiter again.
                    self.state = State::Required {
                        role: Role::Primary,
                        reason: ExitReason::Error,
                    };
                    self.reason = ExitReason::Processing;
                    self.set_failover(FailoverStatus::Required);
                    self.request_arbiter(now, Action::AcquireArbiter);
                } else {
                    self.state = State::Alone;
                }
            }
            (State::Syncing { .. }, Ev(E::ChannelError) | Tm(Timer::PeerTimeout)) => {
                // A secondary without a complete copy cannot take over.
                self.stop_heartbeats();
                self.state = State::Stopped;
                self.reason = ExitReason::Error;
                self.notices.push_back(Notice::SyncAborted);
            }

            // Losing the partner in COLO, or the operator's command.
            (State::Colo { role, loading: false }, Ev(E::ChannelError) | Tm(Timer::PeerTimeout)) => {
                let cause = cause_of(input);
                self.notices.push_back(Notice::PeerLost { cause });
                self.begin_failover(now, role, ExitReason::Error);
            }
            (State::Colo { role, loading: false }, Ev(E::FailoverCommand)) => {
                self.notices.push_back(Notice::PeerLost {
                    cause: LossCause::Command,
                });
                self.begin_failover(now, role, ExitReason::Request);
            }
            (
                State::Colo {
                    role: Role::Secondary,
                    loading: true,
                },
                Ev(E::ChannelError | E::FailoverCommand) | Tm(Timer::PeerTimeout),
            ) => {
                let cause = cause_of(input);
                let reason = if cause == LossCause::Command {
                    ExitReason::Request
                } else {
                    ExitReason::Error
                };
                self.notices.push_back(Notice::PeerLost { cause });
                self.peer_deadline = None;
                self.state = State::Relaunch { reason };
                self.reason = ExitReason::Processing;
                self.set_failover(FailoverStatus::Relaunch);
            }
            (
                State::Relaunch { .. } | State::Required { .. } | State::Active { .. },
                Ev(E::FailoverCommand),
            ) => {
                return Err(Error::FailoverAlreadyRequested {
                    status: self.failover,
                });
            }
            (_, Ev(E::FailoverCommand)) => return Err(Error::NotInColo { state: state.name() }),
            // A failing channel while already failing over adds nothing.
            (State::Relaunch { .. } | State::Required { .. } | State::Active { .. }, Ev(E::ChannelError)) => {
            }

            // Checkpoint loading on the secondary.
            (
                State::Colo {
                    role: Role::Secondary,
                    loading: false,
                },
                Ev(E::CheckpointLoadStarted),
            ) => {
                self.state = State::Colo {
                    role: Role::Secondary,
                    loading: true,
                };
            }
            (
                State::Colo {
                    role: Role::Secondary,
                    loading: true,
                },
                Ev(E::CheckpointLoadFinished),
            ) => {
                self.state = State::Colo {
                    role: Role::Secondary,
                    loading: false,
                };
            }
            (State::Relaunch { reason, .. }, Ev(E::CheckpointLoadFinished)) => {
                self.begin_failover(now, Role::Secondary, reason);
            }

            // The arbiter.
            (State::Required { .. }, Tm(Timer::RetryArbiter)) => {
                self.retry_at = None;
                self.request_arbiter(now, Action::AcquireArbiter);
            }
            (_, Tm(Timer::RenewDue)) => {
                self.renew_at = None;
                if self.lease.is_some() && self.pending.is_none() {
                    self.request_arbiter(now, Action::RenewArbiter);
                } else if self.lease.is_some() {
                    // Still waiting for the previous answer: try again one retry later.
                    self.renew_at = Some(now + self.config.arbiter_retry);
                }
            }
            (State::Required { role, reason }, Ev(E::ArbiterGranted { token, ttl })) => {
                let sent = self.take_pending(state, input)?;
                self.hold(sent, token, ttl);
                self.enter_active(role, reason, token);
            }
            (State::Required { .. }, Ev(E::ArbiterDenied { holder })) => {
                self.take_pending(state, input)?;
                let since = *self.denied_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= self.config.denied_patience {
                    self.fence(holder);
                } else {
                    // The holder may be a dead partner whose lease has not run out yet: ask again.
                    self.retry_at = Some(now + self.config.arbiter_retry);
                }
            }
            (State::Required { .. }, Ev(E::ArbiterUnreachable)) => {
                self.take_pending(state, input)?;
                self.retry_at = Some(now + self.config.arbiter_retry);
            }
            // Renewal answers in the other states.
            (_, Ev(E::ArbiterGranted { token, ttl })) => {
                let sent = self.take_pending(state, input)?;
                match self.lease {
                    Some(l) if l.token == token => self.hold(sent, token, ttl),
                    _ => {
                        // Renewed something we no longer (or never) held: let it lapse at the arbiter.
                        self.actions.push_back(Action::ReleaseArbiter);
                    }
                }
            }
            (_, Ev(E::ArbiterDenied { holder })) => {
                self.take_pending(state, input)?;
                if self.lease.take().is_some() {
                    self.renew_at = None;
                    match state {
                        State::Active { .. } | State::Alone => self.fence(holder),
                        // A re-protecting primary's output needs the lease, as when it lapses.
                        State::Syncing { role: Role::Primary } if self.paired => self.resync_lost_lease(now),
                        _ => self.notices.push_back(Notice::ArbiterLost),
                    }
                }
            }
            (_, Ev(E::ArbiterUnreachable)) => {
                self.take_pending(state, input)?;
                if self.lease.is_some() {
                    // The lease clock keeps running; renew again soon.
                    self.renew_at = Some(now + self.config.arbiter_retry);
                }
            }
            (_, Tm(Timer::LeaseExpired)) => {
                self.lease = None;
                self.renew_at = None;
                match state {
                    State::Active { role, .. } => {
                        // Granted, but the lease lapsed before the takeover finished: hold output back and
                        // win the arbiter again before continuing.
                        self.actions.push_back(Action::SuspendOutput);
                        self.state = State::Required {
                            role,
                            reason: self.reason_or_error(),
                        };
                        self.set_failover(FailoverStatus::Required);
                        self.request_arbiter(now, Action::AcquireArbiter);
                    }
                    State::Syncing { role: Role::Primary } if self.paired => self.resync_lost_lease(now),
                    State::Alone => self.primary_wins_lease_again(now),
                    State::Syncing { .. } | State::Colo { .. } => self.notices.push_back(Notice::ArbiterLost),
                    _ => {}
                }
            }

            // The takeover.
            (State::Active { role, reason, .. }, Ev(E::TakeoverDone)) => {
                self.state = State::Alone;
                self.last_mode = role;
                self.reason = reason;
                self.set_failover(FailoverStatus::Completed);
                self.report_exit(role, reason);
            }

            // Stopping.
            (_, Ev(E::Stop)) => {
                if let State::Colo { role, .. } | State::Required { role, .. } | State::Active { role, .. } =
                    state
                {
                    self.report_exit(role, ExitReason::Request);
                }
                self.stop_heartbeats();
                self.retry_at = None;
                self.release();
                self.reason = ExitReason::Request;
                self.set_failover(FailoverStatus::None);
                self.state = State::Stopped;
            }

            // Timers that fire in a state that no longer wants them are disarmed.
            (_, Tm(timer)) => self.disarm(timer),
            (_, Ev(event)) => {
                return Err(Error::UnexpectedEvent {
                    state: state.name(),
                    event: event.name(),
                });
            }
        }
        Ok(())
    }

    // ---- helpers (no transitions of their own) ----

    fn lease_valid(&self, now: Instant) -> bool {
        self.lease.is_some_and(|l| l.expires.is_none_or(|e| now < e))
    }

    fn enter_syncing(&mut self, now: Instant, role: Role) {
        self.state = State::Syncing { role };
        self.next_heartbeat = Some(now);
        self.peer_deadline = Some(now + self.config.heartbeat_timeout);
    }

    /// A re-protecting primary lost its lease (it lapsed, or a renewal was refused): re-protection runs
    /// unprotected and its output needs the lease. Give the sync up and win the arbiter again (the new
    /// secondary sees the sync fail).
    fn resync_lost_lease(&mut self, now: Instant) {
        self.stop_heartbeats();
        self.notices.push_back(Notice::SyncAborted);
        self.primary_wins_lease_again(now);
    }

    /// A primary running alone (or given up re-protecting) without its lease: output held until it wins
    /// the arbiter again.
    fn primary_wins_lease_again(&mut self, now: Instant) {
        self.denied_since = None;
        self.actions.push_back(Action::SuspendOutput);
        self.state = State::Required {
            role: Role::Primary,
            reason: ExitReason::Error,
        };
        self.reason = ExitReason::Processing;
        self.set_failover(FailoverStatus::Required);
        self.request_arbiter(now, Action::AcquireArbiter);
    }

    fn stop_heartbeats(&mut self) {
        self.next_heartbeat = None;
        self.peer_deadline = None;
    }

    fn begin_failover(&mut self, now: Instant, role: Role, reason: ExitReason) {
        self.stop_heartbeats();
        self.denied_since = None;
        self.reason = ExitReason::Processing;
        match self.lease {
            // A primary whose lease is valid holds the arbiter already (its local expiry comes before the
            // arbiter's): no round trip needed.
            Some(l) if role == Role::Primary && l.expires.is_none_or(|e| now < e) => {
                self.set_failover(FailoverStatus::Required);
                self.enter_active(role, reason, l.token);
            }
            _ => {
                self.state = State::Required { role, reason };
                self.set_failover(FailoverStatus::Required);
                self.request_arbiter(now, Action::AcquireArbiter);
            }
        }
    }

    fn enter_active(&mut self, role: Role, reason: ExitReason, token: FenceToken) {
        self.retry_at = None;
        self.state = State::Active { role, reason, token };
        self.set_failover(FailoverStatus::Active);
        self.actions.push_back(match role {
            Role::Secondary => Action::Promote { token },
            _ => Action::ContinueAlone { token },
        });
    }

    fn fence(&mut self, holder: Option<FenceToken>) {
        let mode = match self.state {
            State::Required { role, .. } | State::Active { role, .. } => role,
            _ => Role::Primary,
        };
        self.retry_at = None;
        self.renew_at = None;
        self.lease = None;
        self.stop_heartbeats();
        self.actions.push_back(Action::StopGuest);
        self.set_failover(FailoverStatus::None);
        self.state = State::Fenced;
        self.notices.push_back(Notice::Fenced { holder });
        self.report_exit(mode, ExitReason::Error);
        self.reason = ExitReason::Error;
    }

    fn report_exit(&mut self, mode: Role, reason: ExitReason) {
        if !self.exit_reported {
            self.exit_reported = true;
            self.last_mode = mode;
            self.notices.push_back(Notice::ColoExit { mode, reason });
        }
    }

    fn release(&mut self) {
        if self.lease.take().is_some() {
            self.actions.push_back(Action::ReleaseArbiter);
        }
        self.renew_at = None;
    }

    fn request_arbiter(&mut self, now: Instant, action: Action) {
        if self.pending.is_some() {
            // One request at a time; the outstanding answer is handled as the answer to this one.
            return;
        }
        self.pending = Some(now);
        self.actions.push_back(action);
    }

    fn take_pending(&mut self, state: State, input: Input) -> Result<Instant, Error> {
        match self.pending.take() {
            Some(sent) => Ok(sent),
            None => Err(Error::UnexpectedEvent {
                state: state.name(),
                event: match input {
                    Input::Event(e) => e.name(),
                    Input::Timer(_) => "timer",
                },
            }),
        }
    }

    fn hold(&mut self, sent: Instant, token: FenceToken, ttl: Option<Duration>) {
        // The TTL comes from the arbiter: cap it so no answer can overflow the clock arithmetic.
        let ttl = ttl.map(|t| t.min(MAX_LEASE_TTL));
        self.last_token = self.last_token.max(token);
        let expires = ttl.map(|t| sent + t);
        self.lease = Some(Lease { token, expires, ttl });
        self.renew_at = ttl.map(|t| sent + t * u32::from(self.config.renew_percent) / 100);
    }

    fn disarm(&mut self, timer: Timer) {
        match timer {
            Timer::HeartbeatDue => self.next_heartbeat = None,
            Timer::PeerTimeout => self.peer_deadline = None,
            Timer::RetryArbiter => self.retry_at = None,
            Timer::RenewDue => self.renew_at = None,
            Timer::LeaseExpired => self.lease = None,
        }
    }

    fn set_failover(&mut self, to: FailoverStatus) {
        if self.failover != to {
            self.notices.push_back(Notice::FailoverStatusChanged {
                from: self.failover,
                to,
            });
            self.failover = to;
        }
    }

    fn reason_or_error(&self) -> ExitReason {
        match self.state {
            State::Active { reason, .. } | State::Required { reason, .. } => reason,
            _ => ExitReason::Error,
        }
    }

    /// The lease TTL of the current holding, if any (for diagnostics).
    pub fn lease_ttl(&self) -> Option<Duration> {
        self.lease.and_then(|l| l.ttl)
    }
}

fn cause_of(input: Input) -> LossCause {
    match input {
        Input::Event(Event::FailoverCommand) => LossCause::Command,
        Input::Event(Event::ChannelError) => LossCause::ChannelError,
        _ => LossCause::HeartbeatTimeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn drain(node: &mut Node) -> Vec<Action> {
        std::iter::from_fn(|| node.poll_action()).collect()
    }

    fn notices(node: &mut Node) -> Vec<Notice> {
        std::iter::from_fn(|| node.poll_notice()).collect()
    }

    fn in_colo(role: Role, t0: Instant) -> Node {
        let mut n = Node::new(Config {
            denied_patience: Duration::ZERO,
            ..Config::default()
        })
        .unwrap();
        n.handle_event(
            t0,
            if role == Role::Primary {
                Event::Protect
            } else {
                Event::Join
            },
        )
        .unwrap();
        n.handle_event(t0, Event::SyncCompleted).unwrap();
        drain(&mut n);
        notices(&mut n);
        n
    }

    /// The arbiter's grant of `FenceToken(token)` for `ttl` reaches `node` at `now`.
    fn grant(node: &mut Node, now: Instant, token: u64, ttl: Option<Duration>) {
        node.handle_event(
            now,
            Event::ArbiterGranted {
                token: FenceToken(token),
                ttl,
            },
        )
        .unwrap();
    }

    /// A primary that lost its secondary at `t0` and won the arbiter (token 1, lease `ttl`): it runs alone.
    fn primary_alone(t0: Instant, ttl: Option<Duration>) -> Node {
        let mut p = in_colo(Role::Primary, t0);
        p.handle_event(t0, Event::ChannelError).unwrap();
        drain(&mut p);
        grant(&mut p, t0, 1, ttl);
        p.handle_event(t0, Event::TakeoverDone).unwrap();
        p
    }

    /// Runs timers up to `until` in 1 ms steps while the partner keeps quiet.
    fn run_until(n: &mut Node, until: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(t) = n.poll_timeout().filter(|&t| t <= until) {
            n.handle_timeout(t);
            out.extend(drain(n));
        }
        out
    }

    #[test]
    fn heartbeats_go_out_at_the_interval() {
        let t0 = Instant::now();
        let mut n = in_colo(Role::Primary, t0);
        let mut now = t0;
        let mut sent = 0;
        for _ in 0..45 {
            now += 10 * MS;
            n.handle_event(now, Event::HeartbeatReceived).unwrap();
            n.handle_timeout(now);
            sent += drain(&mut n)
                .iter()
                .filter(|a| **a == Action::SendHeartbeat)
                .count();
        }
        // 450 ms at a 100 ms interval starting at t0: t0, 100, 200, 300, 400.
        assert_eq!(sent, 5);
        assert_eq!(n.status().failover, FailoverStatus::None);
        assert!(n.status().protected);
    }

    #[test]
    fn missed_heartbeats_trigger_failover_after_the_timeout_not_before() {
        let t0 = Instant::now();
        let mut s = in_colo(Role::Secondary, t0);
        let acts = run_until(&mut s, t0 + 499 * MS);
        assert!(!acts.contains(&Action::AcquireArbiter));
        assert_eq!(s.poll_timeout(), Some(t0 + 500 * MS));
        let acts = run_until(&mut s, t0 + 500 * MS);
        assert_eq!(acts, vec![Action::AcquireArbiter]);
        let st = s.status();
        assert_eq!(
            (st.failover, st.reason, st.mode),
            (FailoverStatus::Required, ExitReason::Processing, Role::Secondary)
        );
        assert_eq!(
            notices(&mut s),
            vec![
                Notice::PeerLost {
                    cause: LossCause::HeartbeatTimeout
                },
                Notice::FailoverStatusChanged {
                    from: FailoverStatus::None,
                    to: FailoverStatus::Required
                }
            ]
        );
        // Not promoted, no output, until the arbiter answers.
        assert_eq!(s.output_token(t0 + 500 * MS), None);
        // A late heartbeat does not undo the failover.
        s.handle_event(t0 + 501 * MS, Event::HeartbeatReceived).unwrap();
        assert_eq!(s.status().failover, FailoverStatus::Required);
    }

    #[test]
    fn secondary_promotes_with_the_grant_token_and_reports_colo_exit() {
        let t0 = Instant::now();
        let mut s = in_colo(Role::Secondary, t0);
        s.handle_event(t0, Event::ChannelError).unwrap();
        assert_eq!(drain(&mut s), vec![Action::AcquireArbiter]);
        let ttl = Some(Duration::from_secs(2));
        grant(&mut s, t0 + MS, 8, ttl);
        assert_eq!(drain(&mut s), vec![Action::Promote { token: FenceToken(8) }]);
        assert_eq!(s.status().failover, FailoverStatus::Active);
        assert_eq!(s.output_token(t0 + MS), Some(FenceToken(8)));
        s.handle_event(t0 + 2 * MS, Event::TakeoverDone).unwrap();
        let st = s.status();
        assert_eq!(st.role, Role::Primary);
        assert_eq!(st.mode, Role::None);
        assert_eq!(st.last_mode, Role::Secondary);
        assert_eq!(st.reason, ExitReason::Error);
        assert_eq!(st.failover, FailoverStatus::Completed);
        assert!(!st.protected);
        assert!(notices(&mut s).contains(&Notice::ColoExit {
            mode: Role::Secondary,
            reason: ExitReason::Error
        }));
        // The lease is renewed at a third of its TTL, counted from the request.
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_millis(660)));
        s.handle_timeout(t0 + Duration::from_millis(660));
        assert_eq!(drain(&mut s), vec![Action::RenewArbiter]);
    }

    #[test]
    fn denied_secondary_is_fenced_and_stops_its_guest() {
        let t0 = Instant::now();
        let mut s = in_colo(Role::Secondary, t0);
        s.handle_event(t0, Event::ChannelError).unwrap();
        drain(&mut s);
        s.handle_event(
            t0,
            Event::ArbiterDenied {
                holder: Some(FenceToken(3)),
            },
        )
        .unwrap();
        assert_eq!(drain(&mut s), vec![Action::StopGuest]);
        assert_eq!(s.status().role, Role::None);
        assert_eq!(s.output_token(t0), None);
        let n = notices(&mut s);
        assert!(n.contains(&Notice::Fenced {
            holder: Some(FenceToken(3))
        }));
        assert!(n.contains(&Notice::ColoExit {
            mode: Role::Secondary,
            reason: ExitReason::Error
        }));
        // The fenced node may rejoin as a new secondary.
        s.handle_event(t0, Event::Join).unwrap();
        assert_eq!(s.status().role, Role::Secondary);
    }

    #[test]
    fn denied_node_keeps_asking_for_the_patience_then_stops() {
        let t0 = Instant::now();
        let mut s = Node::new(Config {
            denied_patience: Duration::from_millis(1000),
            ..Config::default()
        })
        .unwrap();
        s.handle_event(t0, Event::Join).unwrap();
        s.handle_event(t0, Event::SyncCompleted).unwrap();
        s.handle_event(t0, Event::ChannelError).unwrap();
        drain(&mut s);
        let mut now = t0;
        // The dead primary's lease runs for another 800 ms.
        s.handle_event(
            now,
            Event::ArbiterDenied {
                holder: Some(FenceToken(1)),
            },
        )
        .unwrap();
        loop {
            let t = s.poll_timeout().unwrap();
            now = t;
            s.handle_timeout(now);
            assert_eq!(drain(&mut s), vec![Action::AcquireArbiter]);
            assert_eq!(s.output_token(now), None);
            if now >= t0 + Duration::from_millis(800) {
                break;
            }
            s.handle_event(
                now,
                Event::ArbiterDenied {
                    holder: Some(FenceToken(1)),
                },
            )
            .unwrap();
        }
        grant(&mut s, now, 2, None);
        assert_eq!(drain(&mut s), vec![Action::Promote { token: FenceToken(2) }]);

        // A live holder keeps refusing: the node gives up after the patience.
        let mut s = Node::new(Config {
            denied_patience: Duration::from_millis(1000),
            ..Config::default()
        })
        .unwrap();
        s.handle_event(t0, Event::Join).unwrap();
        s.handle_event(t0, Event::SyncCompleted).unwrap();
        s.handle_event(t0, Event::ChannelError).unwrap();
        drain(&mut s);
        let mut now = t0;
        loop {
            s.handle_event(
                now,
                Event::ArbiterDenied {
                    holder: Some(FenceToken(1)),
                },
            )
            .unwrap();
            if drain(&mut s) == [Action::StopGuest] {
                break;
            }
            now = s.poll_timeout().unwrap();
            s.handle_timeout(now);
            assert_eq!(drain(&mut s), vec![Action::AcquireArbiter]);
        }
        assert!(now >= t0 + Duration::from_millis(1000) && now < t0 + Duration::from_millis(1101));
    }

    #[test]
    fn unreachable_arbiter_is_retried_and_nothing_is_released_meanwhile() {
        let t0 = Instant::now();
        let mut p = in_colo(Role::Primary, t0);
        assert_eq!(p.output_token(t0), Some(FenceToken::ZERO));
        p.handle_event(t0, Event::ChannelError).unwrap();
        assert_eq!(drain(&mut p), vec![Action::AcquireArbiter]);
        assert_eq!(
            p.output_token(t0),
            None,
            "a primary that lost its partner releases nothing before the arbiter"
        );
        p.handle_event(t0, Event::ArbiterUnreachable).unwrap();
        assert!(drain(&mut p).is_empty());
        assert_eq!(run_until(&mut p, t0 + 100 * MS), vec![Action::AcquireArbiter]);
        grant(&mut p, t0 + 100 * MS, 1, None);
        assert_eq!(
            drain(&mut p),
            vec![Action::ContinueAlone { token: FenceToken(1) }]
        );
    }

    #[test]
    fn failover_during_checkpoint_load_becomes_relaunch_and_runs_after_the_load() {
        let t0 = Instant::now();
        let mut s = in_colo(Role::Secondary, t0);
        s.handle_event(t0, Event::CheckpointLoadStarted).unwrap();
        s.handle_event(t0, Event::FailoverCommand).unwrap();
        assert_eq!(s.status().failover, FailoverStatus::Relaunch);
        assert!(!drain(&mut s).contains(&Action::AcquireArbiter));
        assert_eq!(
            s.handle_event(t0, Event::FailoverCommand),
            Err(Error::FailoverAlreadyRequested {
                status: FailoverStatus::Relaunch
            })
        );
        s.handle_event(t0 + MS, Event::CheckpointLoadFinished).unwrap();
        assert_eq!(s.status().failover, FailoverStatus::Required);
        assert_eq!(drain(&mut s), vec![Action::AcquireArbiter]);
        grant(&mut s, t0 + MS, 2, None);
        s.handle_event(t0 + MS, Event::TakeoverDone).unwrap();
        assert_eq!(s.status().reason, ExitReason::Request);
    }

    #[test]
    fn primary_holding_a_valid_lease_continues_alone_without_asking_again() {
        let t0 = Instant::now();
        let mut p = in_colo(Role::Secondary, t0);
        // Become primary through a failover, holding a 2 s lease.
        p.handle_event(t0, Event::FailoverCommand).unwrap();
        drain(&mut p);
        grant(&mut p, t0, 4, Some(Duration::from_secs(2)));
        p.handle_event(t0, Event::TakeoverDone).unwrap();
        // Re-protect with a new secondary: the guest never stops, the token stays.
        p.handle_event(t0 + MS, Event::Protect).unwrap();
        assert_eq!(p.output_token(t0 + MS), Some(FenceToken(4)));
        p.handle_event(t0 + 2 * MS, Event::SyncCompleted).unwrap();
        assert_eq!(p.status().mode, Role::Primary);
        assert!(p.status().protected);
        drain(&mut p);
        p.handle_event(t0 + 3 * MS, Event::ChannelError).unwrap();
        assert_eq!(
            drain(&mut p),
            vec![Action::ContinueAlone { token: FenceToken(4) }]
        );
    }

    #[test]
    fn lapsed_lease_while_alone_suspends_output_until_won_again() {
        let t0 = Instant::now();
        let ttl = Some(Duration::from_millis(900));
        let mut p = primary_alone(t0, ttl);
        drain(&mut p);
        // Renewals go unanswered (the arbiter is unreachable).
        let mut now = t0;
        while now < t0 + Duration::from_millis(899) {
            now += MS;
            p.handle_timeout(now);
            for a in drain(&mut p) {
                assert_eq!(a, Action::RenewArbiter);
                p.handle_event(now, Event::ArbiterUnreachable).unwrap();
            }
        }
        assert!(p.is_primary_alone(now));
        p.handle_timeout(t0 + Duration::from_millis(900));
        assert_eq!(drain(&mut p), vec![Action::SuspendOutput, Action::AcquireArbiter]);
        assert!(!p.is_primary_alone(t0 + Duration::from_millis(900)));
        assert_eq!(p.status().failover, FailoverStatus::Required);
        assert_eq!((p.status().role, p.status().mode), (Role::Primary, Role::None));
        grant(&mut p, t0 + Duration::from_millis(950), 1, ttl);
        assert_eq!(
            drain(&mut p),
            vec![Action::ContinueAlone { token: FenceToken(1) }]
        );
    }

    #[test]
    fn reprotecting_primary_whose_lease_lapses_gives_the_sync_up_and_asks_again() {
        let t0 = Instant::now();
        let ttl = Some(Duration::from_millis(900));
        let mut p = primary_alone(t0, ttl);
        p.handle_event(t0, Event::Protect).unwrap();
        drain(&mut p);
        // Frozen through its lease: it wakes up past both the lease and the new secondary's heartbeats.
        p.handle_timeout(t0 + Duration::from_millis(2000));
        let acts = drain(&mut p);
        assert_eq!(acts, vec![Action::SuspendOutput, Action::AcquireArbiter]);
        assert_eq!(p.status().failover, FailoverStatus::Required);
        assert_eq!(p.output_token(t0 + Duration::from_millis(2000)), None);
        assert!(notices(&mut p).contains(&Notice::SyncAborted));
    }

    #[test]
    fn secondary_losing_its_primary_during_initial_sync_stops_instead_of_promoting() {
        let t0 = Instant::now();
        let mut s = Node::new(Config::default()).unwrap();
        s.handle_event(t0, Event::Join).unwrap();
        run_until(&mut s, t0 + Duration::from_secs(1));
        assert_eq!(s.status().role, Role::None);
        assert!(notices(&mut s).contains(&Notice::SyncAborted));
        // A primary losing its new secondary during the sync just keeps running alone.
        let mut p = Node::new(Config::default()).unwrap();
        p.handle_event(t0, Event::Protect).unwrap();
        p.handle_event(t0, Event::ChannelError).unwrap();
        assert_eq!(p.status().role, Role::Primary);
        assert_eq!(p.output_token(t0), Some(FenceToken::ZERO));
    }

    #[test]
    fn impossible_events_are_errors_that_change_nothing() {
        let t0 = Instant::now();
        let mut n = Node::new(Config::default()).unwrap();
        for ev in [
            Event::SyncCompleted,
            Event::CheckpointLoadStarted,
            Event::CheckpointLoadFinished,
            Event::TakeoverDone,
            Event::ArbiterGranted {
                token: FenceToken(1),
                ttl: None,
            },
            Event::ArbiterDenied { holder: None },
            Event::ArbiterUnreachable,
            Event::ChannelError,
        ] {
            assert!(
                matches!(
                    n.handle_event(t0, ev),
                    Err(Error::UnexpectedEvent { state: "idle", .. })
                ),
                "{ev:?}"
            );
        }
        assert_eq!(
            n.handle_event(t0, Event::FailoverCommand),
            Err(Error::NotInColo { state: "idle" })
        );
        assert_eq!(n.status().role, Role::None);
        assert!(drain(&mut n).is_empty());
        let mut p = in_colo(Role::Primary, t0);
        assert!(p.handle_event(t0, Event::CheckpointLoadStarted).is_err());
        assert!(p.handle_event(t0, Event::Join).is_err());
        assert!(p.status().protected);
    }

    #[test]
    fn invalid_configs_are_refused() {
        let bad = [
            Config {
                heartbeat_interval: Duration::ZERO,
                ..Config::default()
            },
            Config {
                heartbeat_timeout: Duration::from_millis(100),
                ..Config::default()
            },
            Config {
                arbiter_retry: Duration::ZERO,
                ..Config::default()
            },
            Config {
                renew_percent: 100,
                ..Config::default()
            },
        ];
        for c in bad {
            assert!(matches!(Node::new(c), Err(Error::InvalidConfig { .. })));
        }
    }

    #[test]
    fn absurd_ttl_from_an_arbiter_is_capped_not_a_panic() {
        let t0 = Instant::now();
        let mut s = in_colo(Role::Secondary, t0);
        s.handle_event(t0, Event::ChannelError).unwrap();
        drain(&mut s);
        grant(&mut s, t0, 1, Some(Duration::MAX));
        assert_eq!(s.lease_ttl(), Some(MAX_LEASE_TTL));
        assert!(s.poll_timeout().is_some());
    }

    #[test]
    fn stop_releases_the_arbiter_and_reports_exit() {
        let t0 = Instant::now();
        let mut p = in_colo(Role::Primary, t0);
        p.handle_event(t0, Event::FailoverCommand).unwrap();
        drain(&mut p);
        grant(&mut p, t0, 1, Some(Duration::from_secs(1)));
        drain(&mut p);
        p.handle_event(t0, Event::Stop).unwrap();
        assert_eq!(drain(&mut p), vec![Action::ReleaseArbiter]);
        assert!(notices(&mut p).contains(&Notice::ColoExit {
            mode: Role::Primary,
            reason: ExitReason::Request
        }));
        assert_eq!(p.poll_timeout(), None);
    }
}
