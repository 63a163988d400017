//! Sans-IO checkpoint transaction machines, one per side.
//!
//! One checkpoint, as QEMU's COLO orders it (P = primary, S = secondary):
//!
//! ```text
//! P: CheckpointRequest(e)          -> S pauses its guest
//! S: CheckpointReply(e)            -> P pauses its guest
//! P: VmstateSend(e), RamPages(e)..., EndOfRam(e)
//! P: VmstateSize(e, n), DeviceState(e)... (n bytes in all), BlockBarrier(e)
//! S: VmstateReceived(e)            -> P may release the comparator's queued output
//!    S flushes its RAM cache, loads device state, commits the block checkpoint, resumes
//! S: VmstateLoaded(e)              -> P resumes; epoch e is committed on both sides
//! ```
//!
//! The machines own no socket, thread or clock. The VMM feeds them received messages and local events with
//! the current time, drains actions with `poll_action`, and arms a timer from `poll_timeout`. Page batches
//! and device state are sent by the VMM through [`crate::Channel`] when the primary asks for them
//! ([`PrimaryAction::SendRam`], [`PrimaryAction::SendDeviceState`]); the secondary hands received pages and
//! device state back as actions, so the machine sees every message in order.
//!
//! Live migration before COLO starts (and pages sent ahead of a checkpoint to shorten the pause) use
//! [`Message::PrecopyPages`]: the secondary accepts them only while its guest runs, and stores them in the
//! RAM cache exactly like checkpoint pages. The first checkpoint (epoch 1) then completes the migration: the
//! secondary's "pause" and "resume" of a guest that has not run yet simply start it.
//!
//! Only messages for which [`Message::is_session_message`] holds belong here; any other message is unexpected.
//!
//! An out-of-order message, a wrong epoch, a peer error or a missed deadline moves a machine to its `Failed`
//! state, which it never leaves; a local command given at the wrong time is refused without changing state.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::message::{DeviceStateChunk, Message, PageBatch, Reason};

/// Timeouts and limits of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// How long to wait for the peer's next message inside a checkpoint (and for `CheckpointReady`).
    pub peer_timeout: Duration,
    /// How long the primary waits for `VmstateLoaded` after `VmstateReceived` (the secondary flushes its
    /// RAM cache and loads devices meanwhile).
    pub load_timeout: Duration,
    /// Largest device state the secondary accepts for one checkpoint.
    pub max_device_state: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            peer_timeout: Duration::from_secs(10),
            load_timeout: Duration::from_secs(30),
            max_device_state: 1 << 30,
        }
    }
}

/// What the primary's VMM must do next.
#[derive(Debug, Clone)]
pub enum PrimaryAction {
    /// Send this message to the secondary.
    Send(Message),
    /// Pause the guest's vCPUs.
    PauseGuest,
    /// Collect the dirty pages of `epoch` and send them with [`crate::Channel::send_pages`], then call
    /// [`PrimarySession::ram_sent`].
    SendRam {
        /// Epoch being built.
        epoch: u64,
    },
    /// Send vCPU and device state with [`crate::Channel::send_vmstate`], then call
    /// [`PrimarySession::device_state_sent`].
    SendDeviceState {
        /// Epoch being built.
        epoch: u64,
    },
    /// The secondary holds the whole checkpoint: the comparator may release the primary output it queued.
    ReleaseOutput {
        /// Epoch now received by the secondary.
        epoch: u64,
    },
    /// Resume the guest's vCPUs.
    ResumeGuest,
    /// Checkpoint `epoch` is committed on both sides.
    CheckpointDone {
        /// The committed epoch.
        epoch: u64,
        /// How long the primary guest was paused.
        paused: Duration,
    },
    /// The peer closed the session in an orderly way.
    PeerClosed(Reason),
    /// The session failed; it accepts nothing more.
    Failed(Error),
}

/// What the secondary's VMM must do next.
#[derive(Debug, Clone)]
pub enum SecondaryAction {
    /// Send this message to the primary.
    Send(Message),
    /// Pause the guest's vCPUs.
    PauseGuest,
    /// Write these pages into the RAM cache (never straight into guest memory).
    StoreRam(PageBatch),
    /// Buffer this chunk of device state.
    StoreDeviceState(DeviceStateChunk),
    /// Flush the RAM cache into guest memory (the pages received, OR the pages the guest dirtied itself).
    FlushRamCache {
        /// Epoch being committed.
        epoch: u64,
    },
    /// Load the buffered device state into the devices.
    LoadDeviceState {
        /// Epoch being committed.
        epoch: u64,
    },
    /// Commit the block checkpoint (drop the active overlay and hidden store).
    CommitBlockCheckpoint {
        /// Epoch being committed.
        epoch: u64,
    },
    /// Resume the guest's vCPUs.
    ResumeGuest,
    /// Checkpoint `epoch` is committed.
    CheckpointDone {
        /// The committed epoch.
        epoch: u64,
    },
    /// The peer closed the session in an orderly way.
    PeerClosed(Reason),
    /// The session failed; it accepts nothing more.
    Failed(Error),
}

#[derive(Debug, Clone)]
enum PState {
    WaitingReady {
        deadline: Instant,
    },
    Running {
        epoch: u64,
    },
    AwaitingReply {
        epoch: u64,
        deadline: Instant,
    },
    SendingRam {
        epoch: u64,
        paused_at: Instant,
    },
    SendingDeviceState {
        epoch: u64,
        paused_at: Instant,
    },
    AwaitingReceived {
        epoch: u64,
        paused_at: Instant,
        deadline: Instant,
    },
    AwaitingLoaded {
        epoch: u64,
        paused_at: Instant,
        deadline: Instant,
    },
    Closed,
    Failed(Error),
}

impl PState {
    fn name(&self) -> &'static str {
        match self {
            PState::WaitingReady { .. } => "waiting for checkpoint-ready",
            PState::Running { .. } => "running",
            PState::AwaitingReply { .. } => "waiting for checkpoint-reply",
            PState::SendingRam { .. } => "sending RAM",
            PState::SendingDeviceState { .. } => "sending device state",
            PState::AwaitingReceived { .. } => "waiting for vmstate-received",
            PState::AwaitingLoaded { .. } => "waiting for vmstate-loaded",
            PState::Closed => "closed",
            PState::Failed(_) => "failed",
        }
    }
}

/// Input to a machine: a received message or a local event.
enum Event {
    Msg(Message),
    StartCheckpoint,
    RamSent,
    DeviceStateSent,
    Loaded,
    Close,
    Timeout,
}

impl Event {
    fn command(&self) -> &'static str {
        match self {
            Event::Msg(_) => "message",
            Event::StartCheckpoint => "start_checkpoint",
            Event::RamSent => "ram_sent",
            Event::DeviceStateSent => "device_state_sent",
            Event::Loaded => "checkpoint_loaded",
            Event::Close => "close",
            Event::Timeout => "timeout",
        }
    }
}

/// `now + wait`, or a deadline a century away when `wait` is too long to add (`Duration::MAX` as "never").
fn after(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

/// The error for an input that has no transition in `state`: an unexpected message, or a local command
/// given at the wrong time.
fn refuse(state: &'static str, ev: Event) -> Error {
    match ev {
        Event::Msg(m) => Error::Unexpected {
            state,
            kind: m.kind(),
        },
        other => Error::BadCommand {
            state,
            command: other.command(),
        },
    }
}

/// What [`step`] and [`handle_timeout`] need of either machine.
trait Machine {
    /// The single `match (state, event)`.
    fn transition(&mut self, now: Instant, event: Event) -> Result<()>;
    /// Moves to `Failed` (once) and reports it as an action.
    fn fail(&mut self, error: Error);
    /// The deadline armed in the current state.
    fn poll_timeout(&self) -> Option<Instant>;
}

/// Runs one event through a machine. An error fails the machine, except a local command refused in the
/// current state (the state stays) and any input to a machine that already failed.
fn step<M: Machine>(m: &mut M, now: Instant, event: Event) -> Result<()> {
    let is_msg = matches!(event, Event::Msg(_));
    match m.transition(now, event) {
        Ok(()) => Ok(()),
        Err(e @ Error::BadCommand { .. }) if !is_msg => Err(e),
        Err(e @ Error::AlreadyFailed(_)) => Err(e),
        Err(e) => {
            m.fail(e.clone());
            Err(e)
        }
    }
}

/// Fires the machine's deadline if it is due at `now`.
fn handle_timeout<M: Machine>(m: &mut M, now: Instant) -> Result<()> {
    match m.poll_timeout() {
        Some(deadline) if now >= deadline => step(m, now, Event::Timeout),
        _ => Ok(()),
    }
}

impl Machine for PrimarySession {
    fn transition(&mut self, now: Instant, event: Event) -> Result<()> {
        PrimarySession::transition(self, now, event)
    }
    fn fail(&mut self, error: Error) {
        PrimarySession::fail(self, error)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        PrimarySession::poll_timeout(self)
    }
}

impl Machine for SecondarySession {
    fn transition(&mut self, now: Instant, event: Event) -> Result<()> {
        SecondarySession::transition(self, now, event)
    }
    fn fail(&mut self, error: Error) {
        SecondarySession::fail(self, error)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        SecondarySession::poll_timeout(self)
    }
}

fn check_epoch(msg: &Message, expected: u64) -> Result<()> {
    match msg.epoch() {
        Some(found) if found != expected => Err(Error::Epoch {
            kind: msg.kind(),
            expected,
            found,
        }),
        _ => Ok(()),
    }
}

/// The primary side of the checkpoint transaction.
///
/// ```
/// use std::time::Instant;
/// use colo_proto::{Message, PrimaryAction, PrimarySession, SessionConfig};
///
/// let now = Instant::now();
/// let mut p = PrimarySession::new(SessionConfig::default(), now);
/// p.handle_message(now, Message::CheckpointReady).unwrap();
/// p.start_checkpoint(now).unwrap();
/// assert!(matches!(p.poll_action(), Some(PrimaryAction::Send(Message::CheckpointRequest { epoch: 1 }))));
/// p.handle_message(now, Message::CheckpointReply { epoch: 1 }).unwrap();
/// assert!(matches!(p.poll_action(), Some(PrimaryAction::PauseGuest)));
/// ```
#[derive(Debug)]
pub struct PrimarySession {
    config: SessionConfig,
    state: PState,
    committed: u64,
    actions: VecDeque<PrimaryAction>,
}

impl PrimarySession {
    /// A primary waiting for the secondary's `CheckpointReady` (call after the handshake).
    pub fn new(config: SessionConfig, now: Instant) -> Self {
        PrimarySession {
            config,
            state: PState::WaitingReady {
                deadline: after(now, config.peer_timeout),
            },
            committed: 0,
            actions: VecDeque::new(),
        }
    }

    /// The next action to carry out, in order.
    pub fn poll_action(&mut self) -> Option<PrimaryAction> {
        self.actions.pop_front()
    }

    /// When [`PrimarySession::handle_timeout`] must be called, if the machine waits for the peer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            PState::WaitingReady { deadline }
            | PState::AwaitingReply { deadline, .. }
            | PState::AwaitingReceived { deadline, .. }
            | PState::AwaitingLoaded { deadline, .. } => Some(deadline),
            _ => None,
        }
    }

    /// The last committed epoch.
    pub fn committed_epoch(&self) -> u64 {
        self.committed
    }

    /// A short description of the state, for logs.
    pub fn state_name(&self) -> &'static str {
        self.state.name()
    }

    /// Whether the machine is running and may start a checkpoint.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, PState::Running { .. })
    }

    /// The error that failed the session, if it failed.
    pub fn failure(&self) -> Option<&Error> {
        match &self.state {
            PState::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// A message from the secondary.
    pub fn handle_message(&mut self, now: Instant, msg: Message) -> Result<()> {
        self.step(now, Event::Msg(msg))
    }

    /// Start the next checkpoint (the periodic timer fired or the comparator saw a mismatch).
    pub fn start_checkpoint(&mut self, now: Instant) -> Result<()> {
        self.step(now, Event::StartCheckpoint)
    }

    /// All dirty pages of the checkpoint have been sent.
    pub fn ram_sent(&mut self, now: Instant) -> Result<()> {
        self.step(now, Event::RamSent)
    }

    /// The device state of the checkpoint has been sent.
    pub fn device_state_sent(&mut self, now: Instant) -> Result<()> {
        self.step(now, Event::DeviceStateSent)
    }

    /// End the session in an orderly way (only between checkpoints).
    pub fn close(&mut self, now: Instant) -> Result<()> {
        self.step(now, Event::Close)
    }

    /// Fail the session because of a local problem (the channel broke, the dirty log failed...).
    pub fn fail(&mut self, error: Error) {
        if !matches!(self.state, PState::Failed(_)) {
            self.state = PState::Failed(error.clone());
            self.actions.push_back(PrimaryAction::Failed(error));
        }
    }

    /// The timer armed from [`PrimarySession::poll_timeout`] fired.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<()> {
        handle_timeout(self, now)
    }

    fn step(&mut self, now: Instant, event: Event) -> Result<()> {
        step(self, now, event)
    }

    fn transition(&mut self, now: Instant, event: Event) -> Result<()> {
        use PrimaryAction as A;
        let peer = self.config.peer_timeout;
        let state = std::mem::replace(&mut self.state, PState::Closed);
        let (next, result) = match (state, event) {
            (PState::Failed(e), _) => (PState::Failed(e.clone()), Err(Error::AlreadyFailed(Box::new(e)))),
            (s @ PState::Closed, ev) => (s, Err(refuse("closed", ev))),
            (_, Event::Msg(Message::Error { code, text })) => {
                (PState::Closed, Err(Error::Peer { code, text }))
            }
            (PState::Running { epoch }, Event::Msg(Message::Goodbye { reason })) => {
                self.actions.push_back(A::PeerClosed(reason));
                let _ = epoch;
                (PState::Closed, Ok(()))
            }
            (_, Event::Msg(Message::Goodbye { reason })) => (PState::Closed, Err(Error::Goodbye(reason))),
            (s, Event::Timeout) => {
                let name = s.name();
                (s, Err(Error::Timeout { state: name }))
            }
            (PState::WaitingReady { .. }, Event::Msg(Message::CheckpointReady)) => (
                PState::Running {
                    epoch: self.committed,
                },
                Ok(()),
            ),
            (PState::Running { epoch }, Event::StartCheckpoint) => {
                let epoch = epoch + 1;
                self.actions
                    .push_back(A::Send(Message::CheckpointRequest { epoch }));
                (
                    PState::AwaitingReply {
                        epoch,
                        deadline: after(now, peer),
                    },
                    Ok(()),
                )
            }
            (PState::Running { epoch }, Event::Close) => {
                self.actions.push_back(A::Send(Message::Goodbye {
                    reason: Reason::Normal,
                }));
                let _ = epoch;
                (PState::Closed, Ok(()))
            }
            (PState::AwaitingReply { epoch, deadline }, Event::Msg(m @ Message::CheckpointReply { .. })) => {
                match check_epoch(&m, epoch) {
                    Ok(()) => {
                        self.actions.push_back(A::PauseGuest);
                        self.actions.push_back(A::Send(Message::VmstateSend { epoch }));
                        self.actions.push_back(A::SendRam { epoch });
                        (
                            PState::SendingRam {
                                epoch,
                                paused_at: now,
                            },
                            Ok(()),
                        )
                    }
                    Err(e) => (PState::AwaitingReply { epoch, deadline }, Err(e)),
                }
            }
            (PState::SendingRam { epoch, paused_at }, Event::RamSent) => {
                self.actions.push_back(A::Send(Message::EndOfRam { epoch }));
                self.actions.push_back(A::SendDeviceState { epoch });
                (PState::SendingDeviceState { epoch, paused_at }, Ok(()))
            }
            (PState::SendingDeviceState { epoch, paused_at }, Event::DeviceStateSent) => {
                self.actions.push_back(A::Send(Message::BlockBarrier { epoch }));
                (
                    PState::AwaitingReceived {
                        epoch,
                        paused_at,
                        deadline: after(now, peer),
                    },
                    Ok(()),
                )
            }
            (
                PState::AwaitingReceived {
                    epoch,
                    paused_at,
                    deadline,
                },
                Event::Msg(m @ Message::VmstateReceived { .. }),
            ) => match check_epoch(&m, epoch) {
                Ok(()) => {
                    self.actions.push_back(A::ReleaseOutput { epoch });
                    let deadline = after(now, self.config.load_timeout);
                    (
                        PState::AwaitingLoaded {
                            epoch,
                            paused_at,
                            deadline,
                        },
                        Ok(()),
                    )
                }
                Err(e) => (
                    PState::AwaitingReceived {
                        epoch,
                        paused_at,
                        deadline,
                    },
                    Err(e),
                ),
            },
            (
                PState::AwaitingLoaded {
                    epoch,
                    paused_at,
                    deadline,
                },
                Event::Msg(m @ Message::VmstateLoaded { .. }),
            ) => match check_epoch(&m, epoch) {
                Ok(()) => {
                    self.committed = epoch;
                    self.actions.push_back(A::ResumeGuest);
                    let paused = now.saturating_duration_since(paused_at);
                    self.actions.push_back(A::CheckpointDone { epoch, paused });
                    (PState::Running { epoch }, Ok(()))
                }
                Err(e) => (
                    PState::AwaitingLoaded {
                        epoch,
                        paused_at,
                        deadline,
                    },
                    Err(e),
                ),
            },
            (s, ev) => {
                let e = refuse(s.name(), ev);
                (s, Err(e))
            }
        };
        self.state = next;
        result
    }
}

#[derive(Debug, Clone, Copy)]
struct DeviceProgress {
    device_id: u32,
    next_offset: u64,
    total: u64,
}

#[derive(Debug, Clone)]
enum SState {
    Running {
        epoch: u64,
    },
    Paused {
        epoch: u64,
        deadline: Instant,
    },
    ReceivingRam {
        epoch: u64,
        deadline: Instant,
    },
    AwaitingSize {
        epoch: u64,
        deadline: Instant,
    },
    ReceivingDevices {
        epoch: u64,
        size: u64,
        got: u64,
        device: Option<DeviceProgress>,
        deadline: Instant,
    },
    Loading {
        epoch: u64,
    },
    Closed,
    Failed(Error),
}

impl SState {
    fn name(&self) -> &'static str {
        match self {
            SState::Running { .. } => "running",
            SState::Paused { .. } => "paused, waiting for vmstate-send",
            SState::ReceivingRam { .. } => "receiving RAM",
            SState::AwaitingSize { .. } => "waiting for vmstate-size",
            SState::ReceivingDevices { .. } => "receiving device state",
            SState::Loading { .. } => "loading the checkpoint",
            SState::Closed => "closed",
            SState::Failed(_) => "failed",
        }
    }
}

/// The secondary side of the checkpoint transaction.
///
/// ```
/// use std::time::Instant;
/// use colo_proto::{Message, SecondaryAction, SecondarySession, SessionConfig};
///
/// let now = Instant::now();
/// let mut s = SecondarySession::new(SessionConfig::default(), now);
/// assert!(matches!(s.poll_action(), Some(SecondaryAction::Send(Message::CheckpointReady))));
/// s.handle_message(now, Message::CheckpointRequest { epoch: 1 }).unwrap();
/// assert!(matches!(s.poll_action(), Some(SecondaryAction::PauseGuest)));
/// // A message out of order fails the session for good.
/// assert!(s.handle_message(now, Message::EndOfRam { epoch: 1 }).is_err());
/// assert!(s.failure().is_some());
/// ```
#[derive(Debug)]
pub struct SecondarySession {
    config: SessionConfig,
    state: SState,
    committed: u64,
    actions: VecDeque<SecondaryAction>,
    /// Pre-copy pages that arrived torn (their own CRC failed) and have not arrived intact since.
    torn: HashSet<u64>,
}

/// Most torn pre-copy pages a secondary tracks at once (8 MiB of addresses); more is an error.
pub const MAX_TORN_PAGES: usize = 1 << 20;

impl SecondarySession {
    /// A secondary ready for checkpoints (call after the handshake); its first action sends
    /// `CheckpointReady`.
    pub fn new(config: SessionConfig, _now: Instant) -> Self {
        let mut actions = VecDeque::new();
        actions.push_back(SecondaryAction::Send(Message::CheckpointReady));
        SecondarySession {
            config,
            state: SState::Running { epoch: 0 },
            committed: 0,
            actions,
            torn: HashSet::new(),
        }
    }

    /// The next action to carry out, in order.
    pub fn poll_action(&mut self) -> Option<SecondaryAction> {
        self.actions.pop_front()
    }

    /// When [`SecondarySession::handle_timeout`] must be called, if the machine waits for the peer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            SState::Paused { deadline, .. }
            | SState::ReceivingRam { deadline, .. }
            | SState::AwaitingSize { deadline, .. }
            | SState::ReceivingDevices { deadline, .. } => Some(deadline),
            _ => None,
        }
    }

    /// The last committed epoch.
    pub fn committed_epoch(&self) -> u64 {
        self.committed
    }

    /// A short description of the state, for logs.
    pub fn state_name(&self) -> &'static str {
        self.state.name()
    }

    /// The error that failed the session, if it failed.
    pub fn failure(&self) -> Option<&Error> {
        match &self.state {
            SState::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// A message from the primary.
    pub fn handle_message(&mut self, now: Instant, msg: Message) -> Result<()> {
        self.step(now, Event::Msg(msg))
    }

    /// Pre-copy pages whose own CRC failed (torn while the guest wrote them) and that have not arrived
    /// intact since; they must before the RAM of the next checkpoint ends.
    pub fn torn_pages(&self) -> usize {
        self.torn.len()
    }

    /// Notes a batch's torn pages and clears those that arrive intact.
    fn track_torn(&mut self, batch: &PageBatch) -> Result<()> {
        for p in &batch.pages {
            self.torn.remove(&p.gpa);
        }
        for &gpa in &batch.torn {
            self.torn.insert(gpa);
        }
        if self.torn.len() > MAX_TORN_PAGES {
            return Err(Error::TornPages {
                epoch: batch.epoch,
                pages: self.torn.len(),
                first: self.torn.iter().copied().min().unwrap_or(0),
            });
        }
        Ok(())
    }

    /// The VMM has flushed the RAM cache, loaded device state and committed the block checkpoint.
    pub fn checkpoint_loaded(&mut self, now: Instant) -> Result<()> {
        self.step(now, Event::Loaded)
    }

    /// End the session in an orderly way (only between checkpoints).
    pub fn close(&mut self, now: Instant) -> Result<()> {
        self.step(now, Event::Close)
    }

    /// Fail the session because of a local problem.
    pub fn fail(&mut self, error: Error) {
        if !matches!(self.state, SState::Failed(_)) {
            self.state = SState::Failed(error.clone());
            self.actions.push_back(SecondaryAction::Failed(error));
        }
    }

    /// The timer armed from [`SecondarySession::poll_timeout`] fired.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<()> {
        handle_timeout(self, now)
    }

    fn step(&mut self, now: Instant, event: Event) -> Result<()> {
        step(self, now, event)
    }

    fn transition(&mut self, now: Instant, event: Event) -> Result<()> {
        use SecondaryAction as A;
        let deadline = after(now, self.config.peer_timeout);
        let state = std::mem::replace(&mut self.state, SState::Closed);
        let (next, result) = match (state, event) {
            (SState::Failed(e), _) => (SState::Failed(e.clone()), Err(Error::AlreadyFailed(Box::new(e)))),
            (s @ SState::Closed, ev) => (s, Err(refuse("closed", ev))),
            (_, Event::Msg(Message::Error { code, text })) => {
                (SState::Closed, Err(Error::Peer { code, text }))
            }
            (SState::Running { .. }, Event::Msg(Message::Goodbye { reason })) => {
                self.actions.push_back(A::PeerClosed(reason));
                (SState::Closed, Ok(()))
            }
            (_, Event::Msg(Message::Goodbye { reason })) => (SState::Closed, Err(Error::Goodbye(reason))),
            (s, Event::Timeout) => {
                let name = s.name();
                (s, Err(Error::Timeout { state: name }))
            }
            (SState::Running { epoch }, Event::Close) => {
                self.actions.push_back(A::Send(Message::Goodbye {
                    reason: Reason::Normal,
                }));
                let _ = epoch;
                (SState::Closed, Ok(()))
            }
            (s @ SState::Running { .. }, Event::Msg(Message::PrecopyPages(batch))) => {
                match self.track_torn(&batch) {
                    Ok(()) => {
                        self.actions.push_back(A::StoreRam(batch));
                        (s, Ok(()))
                    }
                    Err(e) => (s, Err(e)),
                }
            }
            (SState::Running { epoch }, Event::Msg(m @ Message::CheckpointRequest { .. })) => {
                match check_epoch(&m, epoch + 1) {
                    Ok(()) => {
                        let epoch = epoch + 1;
                        self.actions.push_back(A::PauseGuest);
                        self.actions
                            .push_back(A::Send(Message::CheckpointReply { epoch }));
                        (SState::Paused { epoch, deadline }, Ok(()))
                    }
                    Err(e) => (SState::Running { epoch }, Err(e)),
                }
            }
            (SState::Paused { epoch, .. }, Event::Msg(m @ Message::VmstateSend { .. })) => {
                let r = check_epoch(&m, epoch);
                (SState::ReceivingRam { epoch, deadline }, r)
            }
            (SState::ReceivingRam { epoch, .. }, Event::Msg(Message::RamPages(batch))) => {
                if batch.epoch != epoch {
                    let e = Error::Epoch {
                        kind: crate::Kind::RamPages,
                        expected: epoch,
                        found: batch.epoch,
                    };
                    (SState::ReceivingRam { epoch, deadline }, Err(e))
                } else {
                    let r = self.track_torn(&batch);
                    if r.is_ok() {
                        self.actions.push_back(A::StoreRam(batch));
                    }
                    (SState::ReceivingRam { epoch, deadline }, r)
                }
            }
            (SState::ReceivingRam { epoch, .. }, Event::Msg(m @ Message::EndOfRam { .. })) => {
                let r = check_epoch(&m, epoch).and_then(|()| match self.torn.iter().min() {
                    // A torn page was written by the guest during its send, so it is dirty and must be in
                    // this checkpoint; one still missing was damaged in transit.
                    Some(&first) => Err(Error::TornPages {
                        epoch,
                        pages: self.torn.len(),
                        first,
                    }),
                    None => Ok(()),
                });
                (SState::AwaitingSize { epoch, deadline }, r)
            }
            (SState::AwaitingSize { epoch, .. }, Event::Msg(m @ Message::VmstateSize { size, .. })) => {
                let r = check_epoch(&m, epoch).and_then(|()| {
                    if size > self.config.max_device_state {
                        Err(Error::DeviceState {
                            epoch,
                            what: format!("{size} bytes exceed the cap of {}", self.config.max_device_state),
                        })
                    } else {
                        Ok(())
                    }
                });
                (
                    SState::ReceivingDevices {
                        epoch,
                        size,
                        got: 0,
                        device: None,
                        deadline,
                    },
                    r,
                )
            }
            (
                SState::ReceivingDevices {
                    epoch,
                    size,
                    got,
                    device,
                    ..
                },
                Event::Msg(Message::DeviceState(chunk)),
            ) => match accept_chunk(epoch, size, got, device, &chunk) {
                Ok((got, device)) => {
                    self.actions.push_back(A::StoreDeviceState(chunk));
                    (
                        SState::ReceivingDevices {
                            epoch,
                            size,
                            got,
                            device: Some(device),
                            deadline,
                        },
                        Ok(()),
                    )
                }
                Err(e) => (
                    SState::ReceivingDevices {
                        epoch,
                        size,
                        got,
                        device,
                        deadline,
                    },
                    Err(e),
                ),
            },
            (
                SState::ReceivingDevices {
                    epoch,
                    size,
                    got,
                    device,
                    ..
                },
                Event::Msg(m @ Message::BlockBarrier { .. }),
            ) => {
                let complete = got == size && device.is_none_or(|d| d.next_offset == d.total);
                let r = check_epoch(&m, epoch).and_then(|()| {
                    if complete {
                        Ok(())
                    } else {
                        Err(Error::DeviceState {
                            epoch,
                            what: format!("only {got} of {size} bytes before barrier"),
                        })
                    }
                });
                if r.is_ok() {
                    self.actions
                        .push_back(A::Send(Message::VmstateReceived { epoch }));
                    self.actions.push_back(A::FlushRamCache { epoch });
                    self.actions.push_back(A::LoadDeviceState { epoch });
                    self.actions.push_back(A::CommitBlockCheckpoint { epoch });
                }
                (SState::Loading { epoch }, r)
            }
            (SState::Loading { epoch }, Event::Loaded) => {
                self.committed = epoch;
                self.actions.push_back(A::ResumeGuest);
                self.actions.push_back(A::Send(Message::VmstateLoaded { epoch }));
                self.actions.push_back(A::CheckpointDone { epoch });
                (SState::Running { epoch }, Ok(()))
            }
            (s, ev) => {
                let e = refuse(s.name(), ev);
                (s, Err(e))
            }
        };
        self.state = next;
        result
    }
}

/// Checks one device-state chunk against the announced size and the device in progress.
fn accept_chunk(
    epoch: u64,
    size: u64,
    got: u64,
    device: Option<DeviceProgress>,
    chunk: &DeviceStateChunk,
) -> Result<(u64, DeviceProgress)> {
    let bad = |what: String| Err(Error::DeviceState { epoch, what });
    if chunk.epoch != epoch {
        return Err(Error::Epoch {
            kind: crate::Kind::DeviceState,
            expected: epoch,
            found: chunk.epoch,
        });
    }
    let len = chunk.data.len() as u64;
    let before = got;
    let got = match got.checked_add(len).filter(|&g| g <= size) {
        Some(g) => g,
        None => {
            return bad(format!(
                "chunk of {len} bytes overruns the announced {size} bytes"
            ));
        }
    };
    let progress = match device {
        Some(d) if d.next_offset < d.total => {
            if chunk.device_id != d.device_id || chunk.offset != d.next_offset || chunk.total != d.total {
                return bad(format!(
                    "device {} chunk at {} while device {} expects offset {}",
                    chunk.device_id, chunk.offset, d.device_id, d.next_offset
                ));
            }
            d
        }
        _ => {
            if chunk.offset != 0 {
                return bad(format!(
                    "device {} starts at offset {}",
                    chunk.device_id, chunk.offset
                ));
            }
            // The announced size bounds every device's total, so a VMM may size its buffer by `total`.
            if chunk.total > size - before {
                return bad(format!(
                    "device {} announces {} bytes, only {} of the checkpoint's {size} are left",
                    chunk.device_id,
                    chunk.total,
                    size - before
                ));
            }
            DeviceProgress {
                device_id: chunk.device_id,
                next_offset: 0,
                total: chunk.total,
            }
        }
    };
    Ok((
        got,
        DeviceProgress {
            next_offset: progress.next_offset + len,
            ..progress
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn chunk(device_id: u32, total: u64, offset: u64, len: usize) -> Message {
        Message::DeviceState(DeviceStateChunk {
            epoch: 1,
            device_id,
            total,
            offset,
            data: Bytes::from(vec![0; len]),
        })
    }

    /// A secondary inside checkpoint 1, waiting for device state of `size` bytes.
    fn receiving_devices(size: u64) -> (SecondarySession, Instant) {
        let now = Instant::now();
        let mut s = SecondarySession::new(SessionConfig::default(), now);
        for m in [
            Message::CheckpointRequest { epoch: 1 },
            Message::VmstateSend { epoch: 1 },
            Message::EndOfRam { epoch: 1 },
            Message::VmstateSize { epoch: 1, size },
        ] {
            s.handle_message(now, m).unwrap();
        }
        (s, now)
    }

    #[test]
    fn a_device_total_beyond_the_announced_size_is_refused() {
        // 10 bytes announced; a device claiming 2^60 bytes in a 4-byte chunk must not get through, so the
        // VMM can size its buffer by `total`.
        let (mut s, now) = receiving_devices(10);
        assert!(matches!(
            s.handle_message(now, chunk(7, 1 << 60, 0, 4)),
            Err(Error::DeviceState { .. })
        ));
        assert!(s.failure().is_some());
        // The second device may claim only what the first left over.
        let (mut s, now) = receiving_devices(10);
        s.handle_message(now, chunk(7, 6, 0, 6)).unwrap();
        assert!(s.handle_message(now, chunk(8, 5, 0, 4)).is_err());
        let (mut s, now) = receiving_devices(10);
        s.handle_message(now, chunk(7, 6, 0, 6)).unwrap();
        s.handle_message(now, chunk(8, 4, 0, 4)).unwrap();
    }

    #[test]
    fn endless_timeouts_do_not_overflow_the_clock() {
        let now = Instant::now();
        let cfg = SessionConfig {
            peer_timeout: Duration::MAX,
            load_timeout: Duration::MAX,
            ..SessionConfig::default()
        };
        let mut p = PrimarySession::new(cfg, now);
        assert!(p.poll_timeout().is_some_and(|d| d > now));
        p.handle_message(now, Message::CheckpointReady).unwrap();
        p.start_checkpoint(now).unwrap();
        let mut s = SecondarySession::new(cfg, now);
        s.handle_message(now, Message::CheckpointRequest { epoch: 1 })
            .unwrap();
        assert!(s.poll_timeout().is_some_and(|d| d > now));
    }

    #[test]
    fn device_state_in_chunks_and_devices_in_turn_is_accepted() {
        let (mut s, now) = receiving_devices(10);
        for m in [
            chunk(7, 6, 0, 4),
            chunk(7, 6, 4, 2),
            chunk(8, 4, 0, 4),
            Message::BlockBarrier { epoch: 1 },
        ] {
            s.handle_message(now, m).unwrap();
        }
        assert_eq!(s.state_name(), "loading the checkpoint");
    }

    #[test]
    fn device_chunks_out_of_order_or_interleaved_fail() {
        let (mut s, now) = receiving_devices(10);
        s.handle_message(now, chunk(7, 6, 0, 4)).unwrap();
        assert!(matches!(
            s.handle_message(now, chunk(8, 4, 0, 4)),
            Err(Error::DeviceState { .. })
        ));
        assert!(s.failure().is_some());

        let (mut s, now) = receiving_devices(10);
        assert!(matches!(
            s.handle_message(now, chunk(7, 6, 2, 4)),
            Err(Error::DeviceState { .. })
        ));

        let (mut s, now) = receiving_devices(3);
        assert!(matches!(
            s.handle_message(now, chunk(7, 6, 0, 4)),
            Err(Error::DeviceState { .. })
        ));
    }

    #[test]
    fn barrier_before_all_device_state_fails() {
        let (mut s, now) = receiving_devices(10);
        s.handle_message(now, chunk(7, 10, 0, 4)).unwrap();
        assert!(matches!(
            s.handle_message(now, Message::BlockBarrier { epoch: 1 }),
            Err(Error::DeviceState { .. })
        ));
        assert!(matches!(
            s.handle_message(now, Message::BlockBarrier { epoch: 1 }),
            Err(Error::AlreadyFailed(_))
        ));
    }

    #[test]
    fn deadlines_fire_only_when_due() {
        let now = Instant::now();
        let cfg = SessionConfig::default();
        let mut p = PrimarySession::new(cfg, now);
        assert_eq!(p.poll_timeout(), Some(now + cfg.peer_timeout));
        p.handle_timeout(now + cfg.peer_timeout / 2).unwrap();
        assert!(p.failure().is_none());
        p.handle_message(now, Message::CheckpointReady).unwrap();
        assert_eq!(p.poll_timeout(), None, "no deadline while the guests just run");
        p.start_checkpoint(now).unwrap();
        let due = p.poll_timeout().unwrap();
        assert!(matches!(p.handle_timeout(due), Err(Error::Timeout { .. })));
        assert!(matches!(p.failure(), Some(Error::Timeout { .. })));
        assert_eq!(p.poll_timeout(), None);
    }

    #[test]
    fn local_command_at_the_wrong_time_leaves_the_state() {
        let now = Instant::now();
        let mut p = PrimarySession::new(SessionConfig::default(), now);
        assert!(matches!(p.ram_sent(now), Err(Error::BadCommand { .. })));
        assert!(p.failure().is_none());
        assert_eq!(p.state_name(), "waiting for checkpoint-ready");
    }
}
