//! The driver thread: one loop per process that owns the colo-pair driver (the README loop of colo-pair).
//!
//! Everything that happens reaches it as an [`Event`] on one FIFO queue, in causal order: messages from the
//! peer (reader thread), client frames (switch thread), the guest's frames (NIC, from the device thread),
//! a disk that wants a checkpoint, control commands. That order matters for the comparator: the guest's
//! frames taken before a pause are queued before anything the pause causes, so they are compared in the
//! epoch that produced them.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use colo_block::{BlockBackend, InitialSync, MemStore, RawFile};
use colo_failover::{ExitReason, FailoverStatus, FenceToken, Role as NodeRole};
use colo_pair::{Output, PairError, PairStatus, Phase, PrimaryPair, SecondaryPair, Side, Trigger};
use colo_proto::Message;
use serde_json::{Value, json};

use super::link::SharedLink;
use super::net::{RxQueue, SwitchPort};
use super::vm::ColoVm;
use super::{ColoError, Exit};
use crate::devices::nic::announce_frame;
use crate::vm::{GuestExit, Machine};

/// Longest wait for an event before the loop looks at its timers anyway.
const IDLE: Duration = Duration::from_millis(20);
/// Most events handled in one round before the timers run.
const ROUND: usize = 4096;
/// How often a promoted secondary tries again to attach to a switch it could not reach.
pub const ATTACH_RETRY: Duration = Duration::from_millis(500);
/// How long a secondary told to take over waits for the primary to confirm it stopped (by closing the
/// link) before it takes over anyway (the arbiter still fences a primary that did not hear).
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(2);

/// Something for the driver thread.
#[derive(Debug)]
pub enum Event {
    /// A message from the peer, or the error that ended the channel.
    Peer {
        /// The [`SharedLink::id`] of the link it came on: what an earlier link still delivers after a
        /// re-protection is dropped.
        link: u64,
        /// The message or the error.
        msg: Result<Message, colo_proto::Error>,
    },
    /// A frame from the client network.
    Client(Bytes),
    /// A frame the guest sent.
    GuestTx(Bytes),
    /// Look at the timers and the disk now (a write waits for a checkpoint).
    Wake,
    /// An operator command; the answer goes back on the sender.
    Command(Command, Sender<Value>),
    /// Stop the pair and the process.
    Quit,
}

/// Operator commands (from the control socket).
#[derive(Debug)]
pub enum Command {
    /// Fail over now: the primary runs on alone; the secondary takes over (after stopping the primary).
    Failover,
    /// Change the checkpoint interval (primary; a checkpoint follows at once).
    SetInterval(Duration),
    /// Checkpoint now (primary).
    Checkpoint,
    /// Protect the guest again with the new secondary at the end of this link (a primary running alone;
    /// the control thread connected and ran the handshake).
    Protect(Box<super::NewLink>),
}

/// The calls the loop makes on either side's colo-pair driver.
pub trait PairDriver {
    /// See [`PrimaryPair::handle_message`].
    fn handle_message(&mut self, now: Instant, msg: Message) -> colo_pair::Result<()>;
    /// See [`SecondaryPair::channel_error`].
    fn channel_error(&mut self, now: Instant, error: &colo_proto::Error) -> colo_pair::Result<()>;
    /// See [`PrimaryPair::client_input`].
    fn client_input(&mut self, now: Instant, frame: Bytes) -> colo_pair::Result<()>;
    /// See [`PrimaryPair::guest_output`].
    fn guest_output(&mut self, now: Instant, frame: Bytes) -> colo_pair::Result<()>;
    /// See [`PrimaryPair::handle_timeout`].
    fn handle_timeout(&mut self, now: Instant) -> colo_pair::Result<()>;
    /// See [`PrimaryPair::poll_timeout`].
    fn poll_timeout(&self) -> Option<Instant>;
    /// See [`PrimaryPair::poll_output`].
    fn poll_output(&mut self) -> Option<Output>;
    /// See [`PrimaryPair::status`].
    fn status(&self) -> PairStatus;
    /// See [`PrimaryPair::phase`].
    fn phase(&self) -> Phase;
    /// See [`PrimaryPair::failover_now`].
    fn failover_now(&mut self, now: Instant) -> colo_pair::Result<()>;
    /// See [`PrimaryPair::set_checkpoint_interval`] (primary only).
    fn set_interval(&mut self, now: Instant, interval: Duration) -> colo_pair::Result<()>;
    /// See [`PrimaryPair::checkpoint_now`] (primary only).
    fn checkpoint_now(&mut self, now: Instant) -> colo_pair::Result<()>;
    /// See [`SecondaryPair::ask_primary_to_stop`] (secondary only).
    fn ask_primary_to_stop(&mut self, now: Instant) -> colo_pair::Result<()>;
    /// See [`PrimaryPair::guest_shutdown`] (primary only).
    fn guest_shutdown(&mut self, now: Instant) -> colo_pair::Result<()>;
    /// Why the last checkpoint started (primary only).
    fn last_trigger(&self) -> Option<Trigger>;
    /// See [`PrimaryPair::reprotect`] (primary only): over `link`, with a full disk sync.
    fn reprotect(&mut self, now: Instant, link: SharedLink) -> colo_pair::Result<()>;
}

/// The primary's driver type.
pub type Primary = PrimaryPair<ColoVm, RawFile>;
/// The secondary's driver type.
pub type Secondary = SecondaryPair<ColoVm, super::disk::SvmImage, MemStore, MemStore>;

macro_rules! common_calls {
    () => {
        fn handle_message(&mut self, now: Instant, msg: Message) -> colo_pair::Result<()> {
            Self::handle_message(self, now, msg)
        }
        fn channel_error(&mut self, now: Instant, error: &colo_proto::Error) -> colo_pair::Result<()> {
            Self::channel_error(self, now, error)
        }
        fn client_input(&mut self, now: Instant, frame: Bytes) -> colo_pair::Result<()> {
            Self::client_input(self, now, frame)
        }
        fn guest_output(&mut self, now: Instant, frame: Bytes) -> colo_pair::Result<()> {
            Self::guest_output(self, now, frame)
        }
        fn handle_timeout(&mut self, now: Instant) -> colo_pair::Result<()> {
            Self::handle_timeout(self, now)
        }
        fn poll_timeout(&self) -> Option<Instant> {
            Self::poll_timeout(self)
        }
        fn poll_output(&mut self) -> Option<Output> {
            Self::poll_output(self)
        }
        fn status(&self) -> PairStatus {
            Self::status(self)
        }
        fn phase(&self) -> Phase {
            Self::phase(self)
        }
        fn failover_now(&mut self, now: Instant) -> colo_pair::Result<()> {
            Self::failover_now(self, now)
        }
    };
}

impl PairDriver for Primary {
    common_calls!();
    fn set_interval(&mut self, now: Instant, interval: Duration) -> colo_pair::Result<()> {
        self.set_checkpoint_interval(now, interval)
    }
    fn checkpoint_now(&mut self, now: Instant) -> colo_pair::Result<()> {
        Self::checkpoint_now(self, now)
    }
    fn guest_shutdown(&mut self, now: Instant) -> colo_pair::Result<()> {
        Self::guest_shutdown(self, now)
    }
    fn ask_primary_to_stop(&mut self, _: Instant) -> colo_pair::Result<()> {
        Err(PairError::BadCommand {
            command: "ask the primary to stop",
            state: "the primary",
        })
    }
    fn last_trigger(&self) -> Option<Trigger> {
        Self::last_trigger(self)
    }
    fn reprotect(&mut self, now: Instant, link: SharedLink) -> colo_pair::Result<()> {
        // The disk changed while the guest ran alone: all of it goes to the new secondary again.
        let len = self.disk().lock().disk().len();
        let sync = InitialSync::new(len, super::SYNC_CHUNK).map_err(|source| PairError::Block {
            what: "initial sync",
            source,
        })?;
        Self::reprotect(self, now, Box::new(link), Some(sync))
    }
}

fn primary_only(command: &'static str) -> PairError {
    PairError::BadCommand {
        command,
        state: "the secondary (the primary drives checkpoints)",
    }
}

impl PairDriver for Secondary {
    common_calls!();
    fn set_interval(&mut self, _: Instant, _: Duration) -> colo_pair::Result<()> {
        Err(primary_only("set_interval"))
    }
    fn checkpoint_now(&mut self, _: Instant) -> colo_pair::Result<()> {
        Err(primary_only("checkpoint"))
    }
    fn guest_shutdown(&mut self, _: Instant) -> colo_pair::Result<()> {
        Ok(())
    }
    fn ask_primary_to_stop(&mut self, now: Instant) -> colo_pair::Result<()> {
        Self::ask_primary_to_stop(self, now)
    }
    fn last_trigger(&self) -> Option<Trigger> {
        None
    }
    fn reprotect(&mut self, _: Instant, _: SharedLink) -> colo_pair::Result<()> {
        Err(PairError::BadCommand {
            command: "protect",
            state: "the secondary (a promoted secondary's disk cannot be replicated from)",
        })
    }
}

/// Where the secondary attaches to the client network once promoted.
#[derive(Debug)]
pub struct Attach {
    /// The switch's socket.
    pub switch: PathBuf,
    /// This process's port socket.
    pub local: PathBuf,
    /// The guest's MAC, announced after the takeover.
    pub mac: [u8; 6],
    /// Makes the disk image durable.
    pub durable: super::disk::DurableSwitch,
}

struct Takeover {
    deadline: Instant,
    reply: Sender<Value>,
}

/// The loop's state.
pub struct Driver<P: PairDriver> {
    pair: P,
    side: Side,
    machine: Arc<Machine>,
    rx: Arc<RxQueue>,
    link: SharedLink,
    events: Receiver<Event>,
    events_tx: Sender<Event>,
    tx_waiting: Arc<AtomicUsize>,
    peer_pending: Arc<AtomicUsize>,
    switch: Option<SwitchPort>,
    attach: Option<Attach>,
    /// Promoted, NIC not on the switch yet: the token, when to try next, failed tries so far.
    attach_pending: Option<(FenceToken, Instant, u32)>,
    status: Arc<Mutex<Value>>,
    seen_checkpoints: u64,
    last_phase: Phase,
    takeover: Option<Takeover>,
    /// Guest frames the pair refused for now (`OutputFull`), offered again in order.
    retry_tx: VecDeque<Bytes>,
    last_peer_message: Instant,
    failover_ms: Option<u64>,
    guest_exit_seen: bool,
    undeliverable: u64,
    last_publish: Instant,
    done: Option<Exit>,
    heartbeats: (Duration, Duration),
}

/// What the driver needs besides the pair.
pub struct DriverParts {
    /// Which side.
    pub side: Side,
    /// The machine.
    pub machine: Arc<Machine>,
    /// The NIC's receive queue.
    pub rx: Arc<RxQueue>,
    /// The channel's sending half.
    pub link: SharedLink,
    /// The event queue.
    pub events: Receiver<Event>,
    /// A sender for it (for threads the driver starts).
    pub events_tx: Sender<Event>,
    /// Guest frames not taken by the pair yet (queued as events, or held in the driver after a refusal).
    pub tx_waiting: Arc<AtomicUsize>,
    /// Peer messages queued as events.
    pub peer_pending: Arc<AtomicUsize>,
    /// The client network port (primary), if attached.
    pub switch: Option<SwitchPort>,
    /// Where to attach when promoted (secondary).
    pub attach: Option<Attach>,
    /// Where the status snapshot goes (the control socket reads it).
    pub status: Arc<Mutex<Value>>,
    /// The heartbeat thread's interval and its watchdog's silence limit (for the links of re-protections).
    pub heartbeats: (Duration, Duration),
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Syncing => "syncing",
        Phase::Colo => "colo",
        Phase::FailingOver => "failing_over",
        Phase::Alone => "alone",
        Phase::Stopped => "stopped",
        Phase::ShutDown => "shut_down",
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn trigger_name(t: Trigger) -> String {
    match t {
        Trigger::Initial => "initial".into(),
        Trigger::Periodic => "periodic".into(),
        Trigger::Compare(r) => format!("compare: {r:?}"),
        Trigger::EpochFull => "disk epoch full".into(),
        Trigger::Secondary(r) => format!("secondary asked: {r:?}"),
        Trigger::Command => "command".into(),
    }
}

impl<P: PairDriver> Driver<P> {
    /// A loop around `pair`.
    pub fn new(pair: P, parts: DriverParts) -> Self {
        let now = Instant::now();
        let last_phase = pair.status().phase;
        Self {
            pair,
            side: parts.side,
            machine: parts.machine,
            rx: parts.rx,
            link: parts.link,
            events: parts.events,
            events_tx: parts.events_tx,
            tx_waiting: parts.tx_waiting,
            peer_pending: parts.peer_pending,
            switch: parts.switch,
            attach: parts.attach,
            attach_pending: None,
            status: parts.status,
            seen_checkpoints: 0,
            last_phase,
            takeover: None,
            retry_tx: VecDeque::new(),
            last_peer_message: now,
            failover_ms: None,
            guest_exit_seen: false,
            undeliverable: 0,
            last_publish: now,
            done: None,
            heartbeats: parts.heartbeats,
        }
    }

    /// Runs until the guest shuts down or `quit`.
    pub fn run(mut self) -> Result<Exit, ColoError> {
        self.settle(Ok(()))?;
        loop {
            self.link.driver_tick();
            let now = Instant::now();
            let wait = self
                .pair
                .poll_timeout()
                .map_or(IDLE, |d| d.saturating_duration_since(now))
                .min(IDLE);
            match self.events.recv_timeout(wait) {
                Ok(ev) => {
                    self.handle(ev)?;
                    // Everything already waiting goes before the timers: a queued message from the peer
                    // proves it alive even if this thread was busy for longer than the heartbeat timeout.
                    for _ in 0..ROUND {
                        match self.events.try_recv() {
                            Ok(ev) => self.handle(ev)?,
                            Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
            }
            self.retry_output()?;
            let now = Instant::now();
            if self.pair.poll_timeout().is_some_and(|d| d <= now) {
                let r = self.pair.handle_timeout(now);
                self.settle(r)?;
            }
            if let Some(t) = &self.takeover
                && t.deadline <= now
            {
                tracing::warn!(
                    "COLO: failover: the primary did not confirm its stop within {TAKEOVER_WAIT:?}; taking over \
                     (only an arbiter fences a primary that did not hear)"
                );
                self.take_over(now)?;
            }
            self.try_attach();
            self.check_guest()?;
            self.publish(false);
            if let Some(exit) = self.done.take() {
                self.publish(true);
                return Ok(exit);
            }
        }
    }

    fn handle(&mut self, ev: Event) -> Result<(), ColoError> {
        let t0 = Instant::now();
        let kind = match &ev {
            Event::Peer { msg: Ok(m), .. } => Some(m.kind()),
            _ => None,
        };
        let name = match &ev {
            Event::Peer { msg: Ok(_), .. } => "peer message",
            Event::Peer { msg: Err(_), .. } => "peer error",
            Event::Client(_) => "client frame",
            Event::GuestTx(_) => "guest frame",
            Event::Wake => "wake-up",
            Event::Command(..) => "command",
            Event::Quit => "quit",
        };
        let r = self.handle_inner(ev);
        let took = t0.elapsed();
        if took > Duration::from_millis(250) {
            tracing::warn!("COLO: handling a {name} {kind:?} took {took:?}");
        } else if took > Duration::from_millis(20) {
            tracing::debug!("COLO: handling a {name} {kind:?} took {took:?}");
        }
        r
    }

    fn handle_inner(&mut self, ev: Event) -> Result<(), ColoError> {
        let now = Instant::now();
        match ev {
            Event::Peer { link, .. } if link != self.link.id() => {
                // From the link of a secondary given up before a re-protection: stale.
                self.peer_pending.fetch_sub(1, Ordering::Relaxed);
            }
            Event::Peer { msg, .. } => {
                self.peer_pending.fetch_sub(1, Ordering::Relaxed);
                match msg {
                    Ok(msg) => {
                        self.last_peer_message = now;
                        let r = self.pair.handle_message(now, msg);
                        self.settle(r)?;
                    }
                    Err(e) => {
                        if self.takeover.is_some() {
                            tracing::info!("COLO: failover: the primary closed the link ({e}); taking over");
                            self.take_over(now)?;
                        }
                        if !self.link.is_closed() {
                            tracing::warn!("COLO: link to the peer lost: {e}");
                        }
                        let r = self.pair.channel_error(now, &e);
                        self.settle(r)?;
                    }
                }
            }
            Event::Client(frame) => {
                if let Some(sw) = &self.switch {
                    sw.taken();
                }
                let r = self.pair.client_input(now, frame);
                self.settle_frame(r)?;
            }
            Event::GuestTx(frame) => self.offer(now, Some(frame))?,
            Event::Wake => {
                let r = self.pair.handle_timeout(now);
                self.settle(r)?;
            }
            Event::Command(cmd, reply) => self.command(now, cmd, reply)?,
            Event::Quit => {
                tracing::info!("COLO: quit requested");
                self.done.get_or_insert(Exit::Quit);
            }
        }
        Ok(())
    }

    /// Offers the guest frames refused earlier and then `frame`, in order; the first one refused waits in
    /// `retry_tx` with all behind it.
    fn offer(&mut self, now: Instant, frame: Option<Bytes>) -> Result<(), ColoError> {
        let mut backlog = std::mem::take(&mut self.retry_tx);
        let tx_waiting = self.tx_waiting.clone();
        let r = offer_in_order(&mut backlog, &tx_waiting, frame, |f| {
            match self.pair.guest_output(now, f.clone()) {
                Err(PairError::OutputFull { .. }) => Ok(Some(f)),
                r => self.settle_frame(r).map(|()| None),
            }
        });
        self.retry_tx = backlog;
        r
    }

    fn retry_output(&mut self) -> Result<(), ColoError> {
        if self.retry_tx.is_empty() {
            return Ok(());
        }
        self.offer(Instant::now(), None)
    }

    fn command(&mut self, now: Instant, cmd: Command, reply: Sender<Value>) -> Result<(), ColoError> {
        let phase = self.pair.status().phase;
        match cmd {
            Command::Failover if self.side == Side::Secondary && phase == Phase::Colo => {
                if self.takeover.is_some() {
                    let _ = reply.send(json!({ "ok": false, "error": "a failover is already running" }));
                    return Ok(());
                }
                // Stop the primary first: it pauses its guest for good and closes the link, which is our
                // signal to take over. A primary that does not answer is fenced by the arbiter.
                tracing::info!("COLO: failover requested: asking the primary to stop");
                let asked = self.pair.ask_primary_to_stop(now);
                self.takeover = Some(Takeover {
                    deadline: now + TAKEOVER_WAIT,
                    reply,
                });
                if asked.is_err() || self.link.is_closed() {
                    self.take_over(now)?;
                } else {
                    self.settle(Ok(()))?;
                }
            }
            Command::Failover => {
                tracing::info!("COLO: failover requested");
                let r = self.pair.failover_now(now);
                self.reply(r, &reply)?;
            }
            Command::SetInterval(d) => {
                let r = self.pair.set_interval(now, d);
                if r.is_ok() {
                    tracing::info!("COLO: checkpoint interval set to {d:?}");
                }
                self.reply(r, &reply)?;
            }
            Command::Checkpoint => {
                let r = self.pair.checkpoint_now(now);
                self.reply(r, &reply)?;
            }
            Command::Protect(new) => self.protect(now, *new, &reply)?,
        }
        Ok(())
    }

    /// Re-protection: the new link replaces the old one (its reader and heartbeat threads start only once
    /// the pair took it; a refused link is closed, which the new secondary sees).
    fn protect(&mut self, now: Instant, new: super::NewLink, reply: &Sender<Value>) -> Result<(), ColoError> {
        let super::NewLink { link, reader, peer } = new;
        let t0 = Instant::now();
        // The new link's reader and heartbeat thread run before the RAM goes out, as for a new pair: the
        // watchdog then gives up a secondary that stops reading during the send, and what the secondary
        // says meanwhile is queued. Their events carry the new link's id, so they are dropped if the pair
        // refuses the link (it stays on the old one).
        link.driver_tick();
        let started = super::link::spawn_reader(
            reader,
            self.events_tx.clone(),
            self.peer_pending.clone(),
            link.clone(),
        )
        .and_then(|()| link.spawn_heartbeats(self.heartbeats.0, self.heartbeats.1));
        if let Err(e) = started {
            tracing::error!("COLO: starting the new link's threads: {e}");
            link.close();
            return self.reply(Err(PairError::Proto(colo_proto::Error::from(e))), reply);
        }
        // Refused (not a primary running alone): nothing changed. Failed after it began (the new link lost
        // during the RAM send, or a local error): the pair runs alone again. Either way the new secondary
        // sees its link close.
        let r = self.pair.reprotect(now, link.clone());
        if r.is_err() {
            link.close();
            return self.reply(r, reply);
        }
        tracing::info!(
            "COLO: protecting the guest again with the secondary at {peer}: RAM sent in {:?}; disk sync and \
             checkpoint 1 next",
            t0.elapsed()
        );
        self.link = link;
        self.last_peer_message = Instant::now();
        self.failover_ms = None;
        self.reply(Ok(()), reply)
    }

    /// Answers a command with its result (a refused command changes nothing and is only the operator's
    /// news), then settles the pair.
    fn reply(&mut self, r: colo_pair::Result<()>, reply: &Sender<Value>) -> Result<(), ColoError> {
        let err = match r {
            Err(e @ PairError::Vm { .. }) => return self.settle(Err(e)),
            r => r.err().map(|e| e.to_string()),
        };
        self.settle(Ok(()))?;
        let phase = phase_name(self.pair.status().phase);
        // The operator reads the status next: show the command's effect there first.
        self.publish(true);
        let _ = reply.send(match err {
            None => json!({ "ok": true, "phase": phase }),
            Some(e) => json!({ "ok": false, "error": e, "phase": phase }),
        });
        Ok(())
    }

    /// The secondary takes over now (the primary stopped, or did not answer in time).
    fn take_over(&mut self, now: Instant) -> Result<(), ColoError> {
        let Some(t) = self.takeover.take() else {
            return Ok(());
        };
        let r = self.pair.failover_now(now);
        self.reply(r, &t.reply)
    }

    /// After every call into the pair: judge its result, carry out its outputs, note what changed.
    fn settle(&mut self, r: colo_pair::Result<()>) -> Result<(), ColoError> {
        self.settle_as(r, true)
    }

    /// [`settle`](Self::settle) after a frame in either direction: a checkpoint cannot have completed
    /// (that takes a message from the peer), so only a phase change is looked for (the full status sorts
    /// the pause window for its percentiles: too dear per frame).
    fn settle_frame(&mut self, r: colo_pair::Result<()>) -> Result<(), ColoError> {
        self.settle_as(r, false)
    }

    fn settle_as(&mut self, r: colo_pair::Result<()>, full: bool) -> Result<(), ColoError> {
        match r {
            Ok(()) => {}
            Err(e @ PairError::Vm { .. }) => return Err(ColoError::Pair(e)),
            Err(e) => tracing::warn!("COLO: {e}"),
        }
        while let Some(out) = self.pair.poll_output() {
            self.output(out)?;
        }
        if !full && self.pair.phase() == self.last_phase {
            return Ok(());
        }
        let st = self.pair.status();
        if st.checkpoints > self.seen_checkpoints {
            self.seen_checkpoints = st.checkpoints;
            match self.pair.last_trigger() {
                Some(t) => tracing::info!(
                    "COLO: checkpoint {} ({}): guest paused {:.2} ms, {} bytes sent in all",
                    st.epoch,
                    trigger_name(t),
                    ms(st.last_pause),
                    st.bytes_sent
                ),
                None => tracing::info!(
                    "COLO: checkpoint {} loaded: guest paused {:.2} ms",
                    st.epoch,
                    ms(st.last_pause)
                ),
            }
            self.publish(true);
        }
        if st.phase != self.last_phase {
            tracing::info!(
                "COLO: phase {} -> {}{}",
                phase_name(self.last_phase),
                phase_name(st.phase),
                st.exit_detail
                    .as_ref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            );
            if matches!(self.last_phase, Phase::Syncing | Phase::Colo)
                && matches!(st.phase, Phase::FailingOver | Phase::Alone | Phase::Stopped)
            {
                tracing::info!(
                    "COLO: failover: {} (state {:?}, reason {:?})",
                    st.exit_detail.as_deref().unwrap_or("partner lost"),
                    st.failover.failover,
                    st.failover.reason
                );
            }
            self.last_phase = st.phase;
            if !matches!(st.phase, Phase::Syncing | Phase::Colo) {
                // The partner is given up: make sure it sees that, and stop the heartbeats.
                self.link.close();
            }
            self.publish(true);
        }
        Ok(())
    }

    fn output(&mut self, out: Output) -> Result<(), ColoError> {
        match out {
            Output::ToClient { frame, token, .. } => match &self.switch {
                Some(sw) => sw.send(&frame, token),
                None => self.undeliverable += 1,
            },
            Output::ToGuest(frame) => {
                self.rx.push(frame);
            }
            Output::Promoted { token } => {
                let since = self.last_peer_message.elapsed();
                self.failover_ms = Some(since.as_millis() as u64);
                self.link.close();
                self.attach_switch(token);
                tracing::info!(
                    "COLO: promoted (token {}): the secondary's guest serves the clients now, {:.0} ms after the \
                     last word from the primary",
                    token.0,
                    ms(since)
                );
            }
            Output::ContinuedAlone { token } => {
                self.failover_ms = Some(self.last_peer_message.elapsed().as_millis() as u64);
                self.link.close();
                tracing::info!(
                    "COLO: continuing alone (token {}): the secondary is gone, queued output released",
                    token.0
                );
            }
            Output::GuestShutdown => {
                self.link.close();
                if self.side == Side::Secondary {
                    tracing::info!("COLO: the guest shut down on the primary; shutting down here too");
                    self.machine.quit();
                } else {
                    tracing::info!("COLO: guest shut down; the secondary was told");
                }
                self.done.get_or_insert(Exit::GuestShutdown);
            }
            Output::StopGuest => {
                self.link.close();
                tracing::warn!(
                    "COLO: stopped: this copy of the guest stays paused ({})",
                    self.pair.status().exit_detail.unwrap_or_default()
                );
            }
        }
        Ok(())
    }

    /// The promoted guest's disk becomes durable and its NIC goes on the client network, its frames
    /// stamped with `token` from now (see [`Driver::try_attach`]).
    fn attach_switch(&mut self, token: FenceToken) {
        let Some(a) = &self.attach else {
            return;
        };
        if let Err(e) = a.durable.make_durable() {
            tracing::error!("COLO: syncing the disk image after the takeover: {e}");
        }
        self.attach_pending = Some((token, Instant::now(), 0));
        self.try_attach();
    }

    /// Attaches the promoted guest's NIC to the switch if that is pending and due. A switch that cannot be
    /// reached now is tried again every [`ATTACH_RETRY`]: the guest is the only copy left and runs on (its
    /// output counted as undeliverable meanwhile); failing the process would lose it.
    fn try_attach(&mut self) {
        let (Some((token, due, tries)), Some(a)) = (self.attach_pending, &self.attach) else {
            return;
        };
        if Instant::now() < due {
            return;
        }
        let attached = SwitchPort::connect(&a.local, &a.switch).and_then(|port| {
            // Move the guest's MAC to this port at once (as after a migration). The switch's gate for the
            // MAC rises to the new token: a stale primary is fenced off from here.
            port.send(&announce_frame(a.mac), token);
            port.spawn_reader(self.events_tx.clone())?;
            Ok(port)
        });
        match attached {
            Ok(port) => {
                if tries > 0 {
                    tracing::info!("COLO: the promoted guest's NIC is on the switch (after {tries} retries)");
                }
                self.switch = Some(port);
                self.attach = None;
                self.attach_pending = None;
            }
            Err(e) => {
                if tries == 0 {
                    tracing::error!(
                        "COLO: attaching the promoted guest's NIC to the switch {}: {e}; retrying every \
                         {ATTACH_RETRY:?}",
                        a.switch.display()
                    );
                }
                self.attach_pending = Some((token, Instant::now() + ATTACH_RETRY, tries + 1));
            }
        }
    }

    fn check_guest(&mut self) -> Result<(), ColoError> {
        if self.guest_exit_seen {
            return Ok(());
        }
        let Some(exit) = self.machine.exit_reason() else {
            return Ok(());
        };
        self.guest_exit_seen = true;
        let phase = self.pair.status().phase;
        let serving = self.side == Side::Primary || phase == Phase::Alone;
        match exit {
            GuestExit::Quit => {}
            _ if !serving => {
                // The shadow stopped on its own: the primary's guest decides (its shutdown follows, or the
                // next checkpoint fails to resume this copy and the primary goes on alone).
                tracing::warn!("COLO: the secondary's guest stopped by itself: {exit:?}");
            }
            GuestExit::PowerOff(code) => {
                tracing::info!("COLO: guest powered off (code {code})");
                let r = self.pair.guest_shutdown(Instant::now());
                self.settle(r)?;
                self.done.get_or_insert(Exit::GuestShutdown);
            }
            GuestExit::Fault(f) => {
                tracing::error!("COLO: guest fault: {f}");
                let r = self.pair.guest_shutdown(Instant::now());
                self.settle(r)?;
                self.done.get_or_insert(Exit::GuestFault(f));
            }
        }
        Ok(())
    }

    fn publish(&mut self, force: bool) {
        if !force && self.last_publish.elapsed() < Duration::from_millis(10) {
            return;
        }
        self.last_publish = Instant::now();
        let st = self.pair.status();
        let v = status_json(self.side, &st, self.failover_ms, self.extra());
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = v;
    }

    fn extra(&self) -> Value {
        json!({
            "last_trigger": self.pair.last_trigger().map(trigger_name),
            "heartbeats_sent_by_thread": self.link.heartbeats(),
            "nic_rx_dropped": self.rx.dropped(),
            "output_undeliverable": self.undeliverable,
            "switch_send_errors": self.switch.as_ref().map_or(0, SwitchPort::send_errors),
            "client_frames_dropped": self.switch.as_ref().map_or(0, SwitchPort::dropped),
            "held_guest_frames": self.retry_tx.len(),
            "switch_attach_pending": self.attach_pending.is_some(),
        })
    }
}

/// Offers `incoming` (if any) after the frames in `backlog`, in order, and stops at the first one `offer`
/// refuses (it gives the frame back), which goes back to the front of `backlog`.
///
/// `waiting` counts the guest frames the pair has not taken yet, queued as events or in `backlog`; a frame
/// leaves it only when `offer` takes it. The NIC refuses new frames at [`super::net::MAX_TX_FRAMES`], so a
/// guest sending while the pair refuses (output suspended, comparator full) cannot grow `backlog` without
/// bound: its NIC counts TX errors instead.
fn offer_in_order<E>(
    backlog: &mut VecDeque<Bytes>,
    waiting: &AtomicUsize,
    incoming: Option<Bytes>,
    mut offer: impl FnMut(Bytes) -> Result<Option<Bytes>, E>,
) -> Result<(), E> {
    backlog.extend(incoming);
    while let Some(f) = backlog.pop_front() {
        match offer(f)? {
            Some(refused) => {
                backlog.push_front(refused);
                break;
            }
            None => {
                waiting.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

fn role_name(r: NodeRole) -> &'static str {
    match r {
        NodeRole::None => "none",
        NodeRole::Primary => "primary",
        NodeRole::Secondary => "secondary",
    }
}

/// The `colo` object of the control socket's status answer.
pub fn status_json(side: Side, st: &PairStatus, failover_ms: Option<u64>, extra: Value) -> Value {
    let failover_state = match st.failover.failover {
        FailoverStatus::None => "none",
        FailoverStatus::Required => "required",
        FailoverStatus::Active => "active",
        FailoverStatus::Completed => "completed",
        FailoverStatus::Relaunch => "relaunch",
    };
    let reason = match st.failover.reason {
        ExitReason::None => "none",
        ExitReason::Request => "request",
        ExitReason::Error => "error",
        ExitReason::Processing => "processing",
    };
    let compare = st.compare.map(|c| {
        json!({
            "primary_frames": c.primary_frames,
            "secondary_frames": c.secondary_frames,
            "released_compared": c.released_compared,
            "released_at_checkpoint": c.released_at_checkpoint,
            "primary_unsupported": c.primary_unsupported,
            "secondary_dropped": c.secondary_dropped,
            "primary_refused": c.primary_refused,
            "retransmissions": c.retransmissions,
            "tcp_bytes_compared": c.tcp_bytes_compared,
            "datagrams_compared": c.datagrams_compared,
            "mismatches": c.mismatches,
            "stale": c.stale,
            "checkpoint_requests": c.checkpoint_requests,
        })
    });
    let rewrite = st.rewrite.map(|r| {
        json!({
            "output_translated": r.output_translated,
            "input_translated": r.input_translated,
            "offsets_learned": r.offsets_learned,
            "synthetic_acks": r.synthetic_acks,
            "held": r.held,
            "connections": r.connections,
        })
    });
    json!({
        "role": match side { Side::Primary => "primary", Side::Secondary => "secondary" },
        "node_role": role_name(st.failover.role),
        "phase": phase_name(st.phase),
        "epoch": st.epoch,
        "checkpoints": st.checkpoints,
        "mismatch_checkpoints": st.mismatch_checkpoints,
        "pause_ms_last": ms(st.last_pause),
        "pause_ms_p50": ms(st.pause_p50),
        "pause_ms_p99": ms(st.p99_pause),
        "bytes_sent": st.bytes_sent,
        "compare": compare,
        "rewrite": rewrite,
        "failover": {
            "state": failover_state,
            "reason": reason,
            "detail": st.exit_detail,
            "token": st.failover.token.map(|t| t.0),
            "failover_ms": failover_ms,
        },
        "interval_ms": st.checkpoint_interval.as_millis() as u64,
        "extra": extra,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_frames_the_pair_refuses_stay_bounded_and_in_order() {
        use crate::colo::net::{MAX_TX_FRAMES, NicPort, RxQueue};
        use crate::devices::backend::NetBackend;
        let (tx, events) = std::sync::mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let mut nic = NicPort::new(tx, waiting.clone(), Arc::new(RxQueue::new().unwrap()));
        let mut backlog = VecDeque::new();
        let mut taken = Vec::new();
        let mut open = false;
        let pass = |backlog: &mut VecDeque<Bytes>, open: bool, taken: &mut Vec<Bytes>| {
            while let Ok(Event::GuestTx(f)) = events.try_recv() {
                offer_in_order::<()>(backlog, &waiting, Some(f), |f| {
                    Ok(if open {
                        taken.push(f);
                        None
                    } else {
                        Some(f)
                    })
                })
                .unwrap();
            }
        };
        // The pair refuses everything (output suspended) while the guest keeps sending.
        let mut refused_by_nic = 0;
        for i in 0..MAX_TX_FRAMES as u32 + 100 {
            if nic.send(&i.to_le_bytes()).is_err() {
                refused_by_nic += 1;
            }
            pass(&mut backlog, open, &mut taken);
        }
        assert_eq!(
            backlog.len(),
            MAX_TX_FRAMES,
            "held frames are bounded by the NIC's limit"
        );
        assert_eq!(
            refused_by_nic, 100,
            "the rest is refused at the NIC (a TX error it counts)"
        );
        assert!(nic.send(b"refused").is_err(), "nothing more fits");
        // The pair takes frames again (the driver's retry): all held ones go first, in order; then the NIC
        // takes new frames again.
        open = true;
        offer_in_order::<()>(&mut backlog, &waiting, None, |f| {
            taken.push(f);
            Ok(None)
        })
        .unwrap();
        nic.send(b"new").unwrap();
        pass(&mut backlog, open, &mut taken);
        assert!(backlog.is_empty());
        assert_eq!(taken.len(), MAX_TX_FRAMES + 1);
        for (i, f) in taken[..MAX_TX_FRAMES].iter().enumerate() {
            assert_eq!(&f[..], &(i as u32).to_le_bytes());
        }
        assert_eq!(&taken[MAX_TX_FRAMES][..], b"new");
        assert_eq!(waiting.load(Ordering::Relaxed), 0);
    }
}
