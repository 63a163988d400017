//! The primary side: runs the guest whose output reaches the client.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use colo_block::{BlockBackend, InitialSync, Outgoing, WriteId};
use colo_failover::{Arbiter, Event as NodeEvent, FailoverStatus, FenceToken, Node};
use colo_net::packet::{IpVersion, tcp_flags};
use colo_net::{Action as NetAction, Backpressure, Comparator, FlowKey, PacketView, Time};
use colo_proto::message::MAX_DISK_CHUNK;
use colo_proto::{
    BlockDiscard, BlockWrite, DiskSyncChunk, DiskSyncDone, Message, OutputFrame, PagePhase, PrimaryAction,
    PrimaryIsn, PrimarySession, Reason, TcpFlow,
};
use colo_ram::{DirtyLog, GuestRam, PAGE_SIZE, PrimaryRam, RamLayout};

use crate::config::PairConfig;
use crate::disk::SharedPrimaryDisk;
use crate::error::{PairError, Result};
use crate::peer::{NodeStep, Peer};
use crate::status::{PairStatus, Pauses, Phase, Side, Trigger};
use crate::vm::{Link, Output, Release, Vm};

/// Largest block write message (discards are sent as zero writes of at most this size).
const MAX_BLOCK_MESSAGE: u64 = 1 << 20;

/// Pages the primary collects (zero check and page CRCs, one pass over each page) before it writes them:
/// 64 MiB of guest RAM. It bounds the memory a round's entries take (about 20 bytes per page) and the time
/// between a pre-copy page's CRC and its send (a page written in between arrives torn and is sent again);
/// within a chunk the collection runs uninterrupted, then the socket writes. Measured with colo-bench
/// (`--chunk-pages`): collecting a whole 1 GiB / 10 % round first was as fast as 4 MiB chunks in total
/// (collection + send), and faster at 1 %.
pub const SEND_CHUNK_PAGES: usize = 16384;

/// The primary of a COLO pair: drives the checkpoint transaction (colo-proto), dirty-page collection
/// (colo-ram), write forwarding (colo-block), output comparison (colo-net) and failover (colo-failover).
///
/// Sans-IO apart from the [`Link`] it sends on and the [`Vm`] it pauses: the VMM feeds it what arrives
/// (peer messages, client frames, guest frames) with the current time, calls
/// [`handle_timeout`](Self::handle_timeout) at [`poll_timeout`](Self::poll_timeout), and carries out the
/// [`Output`]s it drains with [`poll_output`](Self::poll_output).
pub struct PrimaryPair<V: Vm, B: BlockBackend> {
    cfg: PairConfig,
    origin: Instant,
    vm: V,
    ram: PrimaryRam<Box<dyn DirtyLog + Send>>,
    disk: SharedPrimaryDisk<B>,
    /// What belongs to the secondary being protected (or last protected): replaced by each protection.
    rep: Protection,
    /// The channel to the secondary and the failover machine watching it.
    peer: Peer,
    phase: Phase,
    outputs: VecDeque<Output>,
    /// PVM frames the comparator handed back (queue full), offered again after the checkpoint.
    held: VecDeque<Bytes>,
    /// Released frames waiting for a fencing token (output suspended).
    unstamped: VecDeque<(Bytes, Release)>,
    suspended: bool,
    paused: bool,
    last_trigger: Option<Trigger>,
    /// Counted over every secondary this primary protected.
    checkpoints: u64,
    mismatch_checkpoints: u64,
    pauses: Pauses,
    /// The arbiter's grant taken (and given back) at the start, if any.
    start_token: Option<FenceToken>,
}

/// What the primary keeps about the one secondary it protects: the checkpoint session (its epochs start
/// again at 0 with each secondary, which expects checkpoint 1 first), the comparator (it compares against
/// that secondary's guest), the initial sync's progress and how the secondary numbers the writes it acks.
/// A new pair and a re-protection both start from a fresh one ([`Protection::new`]).
struct Protection {
    session: PrimarySession,
    cmp: Comparator,
    next_checkpoint: Instant,
    wanted: Option<Trigger>,
    /// The initial disk sync runs (the first checkpoint waits for its end).
    disk_syncing: bool,
    /// Bytes of disk sync data sent.
    sync_bytes: u64,
    /// colo-block's id of the first write (or discard) sent to this secondary. The secondary numbers the
    /// writes it applies from 0 (its `BlockAck` ids); the primary's ids go on across secondaries, so the
    /// secondary's id `n` is the primary's `ack_base + n`. `None` until a write went out.
    ack_base: Option<u64>,
}

impl Protection {
    /// Fresh per-secondary state at `now` (`net_now`: the same instant on the comparator's clock).
    fn new(cfg: &PairConfig, now: Instant, net_now: Time) -> Result<Self> {
        Ok(Protection {
            session: PrimarySession::new(cfg.session, now),
            cmp: Comparator::new(cfg.compare.clone(), net_now)?,
            next_checkpoint: now + cfg.checkpoint_interval,
            wanted: Some(Trigger::Initial),
            disk_syncing: false,
            sync_bytes: 0,
            ack_base: None,
        })
    }
}

/// A link that cannot carry the initial disk sync `disk` is about to run.
fn check_link<B: BlockBackend>(disk: &SharedPrimaryDisk<B>, link: &dyn Link) -> Result<()> {
    if disk.lock().sync_progress().is_some() && link.version() < 3 {
        return Err(PairError::NeedsVersion {
            feature: "initial disk sync",
            version: link.version(),
        });
    }
    Ok(())
}

impl<V: Vm, B: BlockBackend> std::fmt::Debug for PrimaryPair<V, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryPair")
            .field("phase", &self.phase)
            .field("session", &self.rep.session.state_name())
            .field("epoch", &self.rep.session.committed_epoch())
            .finish()
    }
}

impl<V: Vm, B: BlockBackend> PrimaryPair<V, B> {
    /// Starts protecting `vm` (running) over `link`, after the VMM's handshake on it.
    ///
    /// `dirty_log` tracks `vm`'s memory (KVM's log OR the VMM's own writes). `disk` is the guest's disk:
    /// either standalone, when the secondary's disk already equals it (both copied from one image), or
    /// with an initial sync started (`disk.lock().start_sync(InitialSync::new(..))`, protocol v3), when the
    /// secondary's disk is empty or stale ([`SecondaryDisk::new_syncing`](colo_block::SecondaryDisk)). The
    /// sync then runs while the guest runs: the guest's writes land on the primary's disk and mark their
    /// chunks dirty again, so they are re-sent (colo-block's `InitialSync`); the sync sends at most
    /// [`PairConfig::disk_sync_burst`] bytes per `handle_timeout`, and the first checkpoint waits for its
    /// end. The whole of guest RAM is sent at once as pre-copy pages; the first checkpoint, started as soon
    /// as the secondary is ready (and the disk synced), completes the migration.
    pub fn new(
        cfg: PairConfig,
        now: Instant,
        vm: V,
        dirty_log: Box<dyn DirtyLog + Send>,
        disk: SharedPrimaryDisk<B>,
        link: Box<dyn Link + Send>,
        arbiter: Box<dyn Arbiter + Send>,
    ) -> Result<Self> {
        let layout = RamLayout::of(vm.memory()).map_err(|source| PairError::Ram { epoch: 0, source })?;
        let ram = PrimaryRam::new(layout, dirty_log, cfg.collect);
        check_link(&disk, &*link)?;
        let rep = Protection::new(&cfg, now, Time::ZERO)?;
        let mut node = Node::new(cfg.failover)?;
        node.handle_event(now, NodeEvent::Protect)?;
        let mut peer = Peer::new(link, node, arbiter);
        let start_token = peer.take_start_token();
        let mut pair = PrimaryPair {
            cfg,
            origin: now,
            vm,
            ram,
            disk,
            peer,
            rep,
            phase: Phase::Syncing,
            outputs: VecDeque::new(),
            held: VecDeque::new(),
            unstamped: VecDeque::new(),
            suspended: false,
            paused: false,
            last_trigger: None,
            checkpoints: 0,
            mismatch_checkpoints: 0,
            pauses: Pauses::default(),
            start_token,
        };
        pair.start_protection(now)?;
        Ok(pair)
    }

    /// Re-protection: gives a primary that runs alone (its secondary died, froze or was cut off, or an
    /// operator's `failover_now`) a new secondary over `link`, after the VMM's handshake on it. The guest
    /// keeps running. The steps are a new pair's: the failover node's `Protect`, the whole of guest RAM as
    /// pre-copy pages, the disk's initial sync when `sync` is given, then checkpoints from 1 (the new
    /// secondary's session starts at 0). Everything that belonged to the old secondary (session,
    /// comparator, sync progress, write numbering) is replaced; the output released when it was lost stays
    /// released, and output still waiting for a fencing token goes out, once, when the token comes.
    ///
    /// `sync`: `Some(InitialSync::new(..))` for a secondary with an empty or stale disk
    /// ([`SecondaryDisk::new_syncing`](colo_block::SecondaryDisk::new_syncing), protocol v3), the normal
    /// case since this disk has changed alone. `None` only when the secondary's disk already equals this one
    /// and replicates from this disk's current epoch (`disk().lock().epoch()`, given to
    /// [`SecondaryDisk::new`](colo_block::SecondaryDisk::new)).
    ///
    /// The VMM must drop whatever the old link's receiver still delivers: from this call on, every message,
    /// channel error and close it hands to the driver must come from `link`'s peer.
    ///
    /// With an arbiter, a lease the primary won when it went alone stays held and renewed through the
    /// resync and the COLO run that follows (a new pair gives its start grant back). If this primary then
    /// dies, the new secondary is refused until that lease runs out: its failover node's
    /// `denied_patience` must be longer than the lease's time to live, or it fences itself (colo-vmm sets
    /// it to at least twice the TTL). A refused renewal during the resync gives the sync up and wins the
    /// arbiter back, output held meanwhile.
    ///
    /// Errors, with nothing changed: [`PairError::BadCommand`] unless the pair runs alone with output
    /// flowing (not while a lapsed lease is being won again: the node refuses `Protect` then),
    /// [`PairError::NeedsVersion`] for a sync over a version-2 link, [`PairError::Failover`] if the failover
    /// machine refuses. Errors after that (the disk, guest RAM) give the new secondary up and leave the pair
    /// running alone (or winning its arbiter back), as does [`PairError::PeerLost`]: the new link failed
    /// while the RAM went out.
    pub fn reprotect(
        &mut self,
        now: Instant,
        link: Box<dyn Link + Send>,
        sync: Option<InitialSync>,
    ) -> Result<()> {
        if self.phase != Phase::Alone || self.suspended {
            return Err(PairError::BadCommand {
                command: "reprotect",
                state: if self.suspended {
                    "running alone with output suspended"
                } else {
                    self.phase.name()
                },
            });
        }
        let version = link.version();
        if sync.is_some() && version < 3 {
            return Err(PairError::NeedsVersion {
                feature: "initial disk sync",
                version,
            });
        }
        {
            let disk = self.disk.lock();
            if disk.is_replicating() || disk.sync_progress().is_some() {
                return Err(PairError::BadCommand {
                    command: "reprotect",
                    state: "the disk is not standalone",
                });
            }
            if sync
                .as_ref()
                .is_some_and(|s| s.progress().total_bytes != disk.disk().len())
            {
                return Err(PairError::BadCommand {
                    command: "reprotect with a sync of another disk length",
                    state: "alone",
                });
            }
        }
        let rep = Protection::new(&self.cfg, now, self.net_time(now))?;
        self.peer.node.handle_event(now, NodeEvent::Protect)?;
        // From here on the new secondary is ours.
        self.peer.reconnect(link);
        self.rep = rep;
        if let Some(sync) = sync {
            let started = self.disk.lock().start_sync(sync);
            if let Err(source) = started {
                self.link_lost(now, format!("starting the disk sync: {source}"));
                self.drive_node(now)?;
                return Err(PairError::Block {
                    what: "start sync",
                    source,
                });
            }
        }
        self.phase = Phase::Syncing;
        if let Err(e) = self.start_protection(now) {
            // Nothing half done stays behind: the new secondary is given up and the pair runs alone again.
            self.link_lost(now, format!("re-protection: {e}"));
            self.drive_node(now)?;
            return Err(e);
        }
        if !matches!(self.phase, Phase::Syncing) {
            // The new link failed while the RAM went out: the pair runs alone again (or is winning its
            // arbiter back), as the status says.
            return Err(PairError::PeerLost {
                during: "re-protection's RAM send",
            });
        }
        Ok(())
    }

    /// What a new pair and a re-protection both do once the link and a fresh [`Protection`] are in place
    /// and the node got `Protect`: start the disk's replication (unless a sync was started), mark all of
    /// guest RAM and send it as pre-copy pages. The first checkpoint follows once the secondary is ready.
    fn start_protection(&mut self, now: Instant) -> Result<()> {
        self.rep.disk_syncing = self.disk.lock().sync_progress().is_some();
        if !self.rep.disk_syncing {
            let started = self.disk.lock().start_replication();
            started.map_err(|source| PairError::Block {
                what: "start replication",
                source,
            })?;
        }
        self.ram
            .mark_all()
            .map_err(|source| PairError::Ram { epoch: 0, source })?;
        self.send_ram(now, PagePhase::Precopy, 0)?;
        self.drive_node(now)
    }

    fn net_time(&self, now: Instant) -> Time {
        crate::peer::net_time(self.origin, now)
    }

    /// The guest.
    pub fn vm(&self) -> &V {
        &self.vm
    }

    /// The guest, mutably (to run it, in a simulation).
    pub fn vm_mut(&mut self) -> &mut V {
        &mut self.vm
    }

    /// The guest's disk.
    pub fn disk(&self) -> &SharedPrimaryDisk<B> {
        &self.disk
    }

    /// Where the pair stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The checkpoint session's state, for logs ("running", "receiving RAM", ...).
    pub fn session_state(&self) -> &'static str {
        self.rep.session.state_name()
    }

    /// The next thing for the VMM to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = [self.peer.node.poll_timeout(), self.rep.session.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        let mut add = |i: Instant| t = Some(t.map_or(i, |t| t.min(i)));
        if matches!(self.phase, Phase::Syncing | Phase::Colo) {
            add(self.origin + Duration::from_nanos(self.rep.cmp.poll_timeout().as_nanos()));
            if self.phase == Phase::Colo {
                add(self.rep.next_checkpoint);
            }
            if (self.rep.wanted.is_some() && self.rep.session.is_idle())
                || (self.rep.disk_syncing && self.peer.ok)
            {
                add(self.origin);
            }
        }
        t
    }

    /// Runs every timer due at `now`: heartbeats and failover, the session's deadlines, the comparator's
    /// stale scan, queued disk writes, and the periodic checkpoint.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<()> {
        self.peer.node.handle_timeout(now);
        self.drive_node(now)?;
        if self.rep.session.poll_timeout().is_some_and(|d| d <= now) {
            // A missed deadline fails the session; the failure comes out as an action.
            let _ = self.rep.session.handle_timeout(now);
            self.drive_session(now)?;
        }
        if matches!(self.phase, Phase::Syncing | Phase::Colo) {
            let t = self.net_time(now);
            self.rep.cmp.handle_tick(t);
            self.drain_compare(now, None);
        }
        self.pump_disk(now)?;
        self.maybe_checkpoint(now)?;
        self.drive_node(now)
    }

    /// A message from the secondary, in arrival order.
    pub fn handle_message(&mut self, now: Instant, msg: Message) -> Result<()> {
        if !matches!(self.phase, Phase::Syncing | Phase::Colo) {
            // The partner was given up: what it still says is stale.
            return Ok(());
        }
        let _ = self.peer.node.handle_event(now, NodeEvent::HeartbeatReceived);
        match msg {
            Message::Heartbeat { .. } => {}
            Message::OutputFrame(f) => {
                let t = self.net_time(now);
                self.rep.cmp.handle_secondary(t, f.data);
                self.drain_compare(now, None);
            }
            Message::FailoverNotice { reason } if self.phase == Phase::Syncing => {
                // A secondary still syncing has no copy of the guest to take over with (an honest one sends
                // the notice only in COLO): stopping here would lose the only copy. Give the link up.
                self.link_lost(
                    now,
                    format!("failover notice ({reason:?}) from a secondary still syncing"),
                );
                self.drive_node(now)?;
                return Ok(());
            }
            Message::FailoverNotice { reason } => {
                // The secondary takes the guest over (an operator's command there): this copy must stop
                // and release nothing more, or two copies would run once the link is gone.
                self.stop_for_takeover(now, format!("the secondary takes over ({reason:?})"))?;
                return Ok(());
            }
            Message::BlockAck { id, .. } => {
                // The secondary's numbering (from 0 on this link) in the disk's (see `Protection::ack_base`).
                let Some(ours) = self.rep.ack_base.and_then(|base| base.checked_add(id)) else {
                    let why = if self.rep.ack_base.is_none() {
                        "before any write"
                    } else {
                        "out of range"
                    };
                    self.link_lost(now, format!("block ack {id} from the secondary {why}"));
                    self.drive_node(now)?;
                    return Ok(());
                };
                let r = self.disk.lock().handle_ack(WriteId(ours));
                match r {
                    Ok(done) => self.disk.push_completed(done),
                    // An ack for a write never sent: the secondary does not follow the protocol.
                    Err(e) => self.link_lost(now, format!("block ack from the secondary: {e}")),
                }
            }
            Message::CheckpointWanted { reason } => {
                self.rep.wanted.get_or_insert(Trigger::Secondary(reason));
            }
            m if m.is_session_message() => {
                // An error here also comes out as `PrimaryAction::Failed`.
                let _ = self.rep.session.handle_message(now, m);
                self.drive_session(now)?;
            }
            m => {
                return Err(PairError::Unexpected {
                    what: format!("{:?}", m.kind()),
                    state: self.phase.name(),
                });
            }
        }
        self.drive_node(now)?;
        self.pump_disk(now)?;
        self.maybe_checkpoint(now)
    }

    /// The VMM's receiver saw the channel fail or close.
    pub fn link_failed(&mut self, now: Instant, detail: &str) -> Result<()> {
        self.link_lost(now, detail.to_string());
        self.drive_session(now)?;
        self.drive_node(now)
    }

    /// The VMM's receiver got this error from the channel (`Channel::recv`). The primary treats every
    /// channel error as the loss of its secondary (it goes on alone, after the arbiter); the method exists
    /// for symmetry with [`SecondaryPair::channel_error`](crate::SecondaryPair::channel_error).
    pub fn channel_error(&mut self, now: Instant, error: &colo_proto::Error) -> Result<()> {
        self.link_failed(now, &error.to_string())
    }

    /// A frame from the client: to the PVM, and mirrored to the SVM while protected.
    pub fn client_input(&mut self, now: Instant, frame: Bytes) -> Result<()> {
        match self.phase {
            Phase::Syncing | Phase::Colo => {
                self.outputs.push_back(Output::ToGuest(frame.clone()));
                let msg = Message::OutputFrame(OutputFrame {
                    interface: self.cfg.interface,
                    data: frame,
                });
                self.send(now, &msg);
                self.drive_node(now)?;
            }
            Phase::FailingOver | Phase::Alone => self.outputs.push_back(Output::ToGuest(frame)),
            Phase::Stopped | Phase::ShutDown => {}
        }
        Ok(())
    }

    /// A frame the PVM sent.
    ///
    /// `Err(OutputFull)`: too many frames are held; the frame was not taken (offer it again later).
    pub fn guest_output(&mut self, now: Instant, frame: Bytes) -> Result<()> {
        let held = self.held.len() + self.unstamped.len();
        if held >= crate::MAX_HELD_FRAMES {
            return Err(PairError::OutputFull { held });
        }
        match self.phase {
            Phase::Syncing | Phase::Colo if self.held.is_empty() => {
                let t = self.net_time(now);
                let syn = self.guest_syn(&frame);
                if let Err(Backpressure(f)) = self.rep.cmp.handle_primary(t, frame) {
                    self.held.push_back(f);
                }
                if let Some(flow) = syn {
                    self.forward_isn(now, &flow);
                }
                self.drain_compare(now, None);
                self.maybe_checkpoint(now)?;
                self.drive_node(now)?;
            }
            Phase::Syncing | Phase::Colo | Phase::FailingOver => self.held.push_back(frame),
            Phase::Alone => self.emit(now, frame, Release::Alone),
            Phase::Stopped | Phase::ShutDown => {}
        }
        Ok(())
    }

    /// The guest shut down: tell the secondary, release what is queued, and finish.
    pub fn guest_shutdown(&mut self, now: Instant) -> Result<()> {
        if matches!(self.phase, Phase::Syncing | Phase::Colo) {
            self.send(now, &Message::GuestShutdown);
            let t = self.net_time(now);
            self.rep.cmp.checkpoint(t);
            self.drain_compare_as(now, Release::Failover);
            while let Some(f) = self.held.pop_front() {
                self.emit(now, f, Release::Failover);
            }
        }
        self.peer.ok = false;
        let _ = self.peer.node.handle_event(now, NodeEvent::Stop);
        self.drive_node(now)?;
        self.phase = Phase::ShutDown;
        self.outputs.push_back(Output::GuestShutdown);
        Ok(())
    }

    /// The operator's "failover now": stop replicating and run alone (after winning the arbiter).
    pub fn failover_now(&mut self, now: Instant) -> Result<()> {
        self.peer.node.handle_event(now, NodeEvent::FailoverCommand)?;
        self.peer.exit_detail = Some("operator command".into());
        self.drive_node(now)
    }

    /// Changes the periodic checkpoint interval; like QEMU, a checkpoint follows at once.
    pub fn set_checkpoint_interval(&mut self, now: Instant, interval: Duration) -> Result<()> {
        self.cfg.checkpoint_interval = interval;
        self.rep.next_checkpoint = now + interval;
        self.checkpoint_now(now)
    }

    /// Asks for a checkpoint as soon as the session is idle.
    pub fn checkpoint_now(&mut self, now: Instant) -> Result<()> {
        if !matches!(self.phase, Phase::Syncing | Phase::Colo) {
            return Err(PairError::BadCommand {
                command: "checkpoint",
                state: self.phase.name(),
            });
        }
        self.rep.wanted.get_or_insert(Trigger::Command);
        self.maybe_checkpoint(now)
    }

    /// The token of the arbiter grant taken (and given back at once) when the pair started: COLO output is
    /// stamped with it (or a later token), so a [`FenceGate`](colo_failover::FenceGate) that kept a floor
    /// from an earlier failover lets it through. `None` with [`NoArbiter`](colo_failover::NoArbiter) (output
    /// keeps token zero, as before) or when the arbiter did not grant (unreachable, or another node holds
    /// it: the output keeps token zero, which such a gate drops).
    pub fn start_token(&self) -> Option<FenceToken> {
        self.start_token
    }

    /// Why the last checkpoint was started.
    pub fn last_trigger(&self) -> Option<Trigger> {
        self.last_trigger
    }

    /// The status report.
    pub fn status(&self) -> PairStatus {
        PairStatus {
            side: Side::Primary,
            phase: self.phase,
            failover: self.peer.node.status(),
            epoch: self.rep.session.committed_epoch(),
            checkpoints: self.checkpoints,
            mismatch_checkpoints: self.mismatch_checkpoints,
            last_pause: self.pauses.last(),
            p99_pause: self.pauses.percentile(99),
            pause_p50: self.pauses.percentile(50),
            bytes_sent: self.peer.bytes_sent,
            compare: Some(self.rep.cmp.stats()),
            rewrite: None,
            disk_sync: self.disk.lock().sync_progress(),
            exit_detail: self.peer.exit_detail.clone(),
            checkpoint_interval: self.cfg.checkpoint_interval,
        }
    }

    // ---- internals ----

    /// The flow of a guest-opened TCP connection, if `frame` is its SYN (no ACK) and the link can carry the
    /// PVM's ISN to the secondary's rewriter.
    fn guest_syn(&self, frame: &[u8]) -> Option<FlowKey> {
        if self.peer.link.version() < 3 || !self.peer.ok {
            return None;
        }
        let view = PacketView::parse(frame, self.cfg.compare.vnet_hdr_len).ok()?;
        let tcp = view.tcp()?;
        (tcp.has(tcp_flags::SYN) && !tcp.has(tcp_flags::ACK)).then(|| FlowKey::of(&view))
    }

    /// Tells the secondary's rewriter the PVM's ISN of a connection the guest opens, once the comparator
    /// has seen the SYN (colo-net's `Comparator::primary_isn` -> `Rewriter::set_primary_isn` seam).
    fn forward_isn(&mut self, now: Instant, flow: &FlowKey) {
        let Some(isn) = self.rep.cmp.primary_isn(flow) else {
            return;
        };
        let msg = Message::PrimaryIsn(PrimaryIsn {
            flow: TcpFlow {
                src: flow.src,
                dst: flow.dst,
                src_port: flow.src_port,
                dst_port: flow.dst_port,
                vlan: flow.vlan,
                ipv6: flow.version == IpVersion::V6,
            },
            isn,
        });
        self.send(now, &msg);
    }

    fn send(&mut self, now: Instant, msg: &Message) -> bool {
        self.peer.send_or_lose(now, msg, &mut self.rep.session)
    }

    /// The channel is unusable: the session fails and the failover machine counts the partner as lost.
    fn link_lost(&mut self, now: Instant, detail: String) {
        self.peer.lose(now, detail, &mut self.rep.session);
    }

    fn pause_guest(&mut self) -> Result<()> {
        if !self.paused {
            self.vm
                .pause()
                .map_err(|source| PairError::Vm { op: "pause", source })?;
            self.paused = true;
        }
        Ok(())
    }

    fn resume_guest(&mut self) -> Result<()> {
        if self.paused {
            self.vm
                .resume()
                .map_err(|source| PairError::Vm { op: "resume", source })?;
            self.paused = false;
        }
        Ok(())
    }

    fn maybe_checkpoint(&mut self, now: Instant) -> Result<()> {
        if self.disk.take_epoch_full() {
            self.rep.wanted.get_or_insert(Trigger::EpochFull);
        }
        let due = self.phase == Phase::Colo && now >= self.rep.next_checkpoint;
        if !self.peer.ok
            || self.rep.disk_syncing
            || !matches!(self.phase, Phase::Syncing | Phase::Colo)
            || !self.rep.session.is_idle()
            || !(due || self.rep.wanted.is_some())
        {
            return Ok(());
        }
        let trigger = self.rep.wanted.take().unwrap_or(Trigger::Periodic);
        if matches!(trigger, Trigger::Compare(_)) {
            self.mismatch_checkpoints += 1;
        }
        self.last_trigger = Some(trigger);
        self.rep.next_checkpoint = now + self.cfg.checkpoint_interval;
        self.rep.session.start_checkpoint(now)?;
        self.drive_session(now)
    }

    fn drive_session(&mut self, now: Instant) -> Result<()> {
        while let Some(action) = self.rep.session.poll_action() {
            if !matches!(self.phase, Phase::Syncing | Phase::Colo) {
                continue;
            }
            match action {
                PrimaryAction::Send(m) => {
                    self.send(now, &m);
                }
                PrimaryAction::PauseGuest => self.pause_guest()?,
                PrimaryAction::SendRam { epoch } => {
                    // Close the disk epoch: every write of it goes out before the session's barrier.
                    self.disk.lock().end_epoch().map_err(|source| PairError::Block {
                        what: "end epoch",
                        source,
                    })?;
                    self.pump_disk(now)?;
                    self.ram
                        .take_log()
                        .map_err(|source| PairError::Ram { epoch, source })?;
                    if self.send_ram(now, PagePhase::Checkpoint, epoch)? {
                        let _ = self.rep.session.ram_sent(now);
                    }
                }
                PrimaryAction::SendDeviceState { epoch } => {
                    let states = self.vm.save_state().map_err(|source| PairError::Vm {
                        op: "save state",
                        source,
                    })?;
                    let refs: Vec<(u32, &[u8])> = states.iter().map(|s| (s.id, &s.data[..])).collect();
                    let sent = self.peer.ok
                        && self
                            .peer
                            .link
                            .send_vmstate(epoch, &refs, self.cfg.device_chunk)
                            .is_ok();
                    drop(refs);
                    if sent {
                        self.peer.bytes_sent += states.iter().map(|s| s.data.len() as u64 + 48).sum::<u64>();
                        let _ = self.rep.session.device_state_sent(now);
                    } else {
                        self.link_lost(now, format!("sending device state of epoch {epoch}"));
                    }
                }
                PrimaryAction::ReleaseOutput { epoch } => {
                    let t = self.net_time(now);
                    self.rep.cmp.checkpoint(t);
                    self.drain_compare(now, Some(epoch));
                    self.offer_held(now);
                }
                PrimaryAction::ResumeGuest => self.resume_guest()?,
                PrimaryAction::CheckpointDone { paused, .. } => {
                    self.checkpoints += 1;
                    self.pauses.push(paused);
                    if self.phase == Phase::Syncing {
                        self.phase = Phase::Colo;
                        self.peer.node.handle_event(now, NodeEvent::SyncCompleted)?;
                    }
                    self.rep.next_checkpoint = now + self.cfg.checkpoint_interval;
                }
                PrimaryAction::PeerClosed(reason) => {
                    self.link_lost(now, format!("the secondary left ({reason:?})"));
                }
                PrimaryAction::Failed(e) => self.link_lost(now, e.to_string()),
            }
        }
        Ok(())
    }

    /// Collects the pending pages and sends them, chunk by chunk ([`SEND_CHUNK_PAGES`]): each chunk is
    /// read (zero check and, where the frames carry them, the page CRCs) and then written while its pages are
    /// still in cache. Returns whether they all went out.
    fn send_ram(&mut self, now: Instant, phase: PagePhase, epoch: u64) -> Result<bool> {
        if !self.peer.ok {
            return Ok(false);
        }
        let ram_err = |source| PairError::Ram { epoch, source };
        let with_crcs = phase.carries_page_crcs(self.peer.link.version());
        let sent = {
            let guest = GuestRam::new(self.vm.memory()).map_err(ram_err)?;
            let mut collection = self.ram.collect(&guest).map_err(ram_err)?;
            if with_crcs {
                collection = collection.with_page_crcs(colo_proto::page_crc);
            }
            let (mut entries, mut crcs) = (Vec::new(), Vec::new());
            loop {
                entries.clear();
                crcs.clear();
                let done = collection
                    .fill(SEND_CHUNK_PAGES, &mut entries, &mut crcs)
                    .map_err(ram_err)?;
                if !entries.is_empty() {
                    let crcs = with_crcs.then_some(&crcs[..]);
                    if let Err(e) = self
                        .peer
                        .link
                        .send_pages(phase, epoch, PAGE_SIZE as u32, &entries, crcs)
                    {
                        // The collection is dropped unfinished: its pages stay pending.
                        break Err(e);
                    }
                    // Data bytes and an 8-byte descriptor per page.
                    self.peer.bytes_sent += entries
                        .iter()
                        .map(|(_, d)| d.len() as u64 + 8 * (d.len() / PAGE_SIZE).max(1) as u64)
                        .sum::<u64>();
                }
                if done {
                    break Ok(());
                }
            }
        };
        match sent {
            Ok(()) => Ok(true),
            Err(e) => {
                self.link_lost(now, e.to_string());
                Ok(false)
            }
        }
    }

    /// Sends every queued disk write (barriers are implied by the session's `BlockBarrier`), and during an
    /// initial sync up to [`PairConfig::disk_sync_burst`] bytes of sync data.
    fn pump_disk(&mut self, now: Instant) -> Result<()> {
        let mut burst = 0u64;
        while self.peer.ok && !(self.rep.disk_syncing && burst >= self.cfg.disk_sync_burst) {
            let out = self
                .disk
                .lock()
                .poll_outgoing()
                .map_err(|source| PairError::Block {
                    what: "poll outgoing",
                    source,
                })?;
            match out {
                None => break,
                Some(Outgoing::Write(rec)) => {
                    self.rep.ack_base.get_or_insert(rec.id.0);
                    let msg = Message::BlockWrite(BlockWrite {
                        epoch: rec.epoch,
                        disk: 0,
                        offset: rec.offset,
                        data: rec.data,
                    });
                    self.send(now, &msg);
                }
                Some(Outgoing::Discard(rec)) if self.peer.link.version() >= 3 => {
                    self.rep.ack_base.get_or_insert(rec.id.0);
                    let msg = Message::BlockDiscard(BlockDiscard {
                        epoch: rec.epoch,
                        disk: 0,
                        offset: rec.offset,
                        len: rec.len,
                    });
                    self.send(now, &msg);
                }
                Some(Outgoing::Discard(rec)) => {
                    // Protocol v2 has no discard message: the secondary gets zeros, which read the same.
                    // (Block acks, which number writes and discards one to one, need v3.)
                    let mut off = 0;
                    while off < rec.len {
                        let n = (rec.len - off).min(MAX_BLOCK_MESSAGE);
                        let msg = Message::BlockWrite(BlockWrite {
                            epoch: rec.epoch,
                            disk: 0,
                            offset: rec.offset + off,
                            data: Bytes::from(vec![0u8; n as usize]),
                        });
                        self.send(now, &msg);
                        off += n;
                    }
                }
                Some(Outgoing::SyncChunk { offset, data }) => {
                    burst += data.len() as u64;
                    let mut at = 0;
                    while at < data.len() {
                        let n = (data.len() - at).min(MAX_DISK_CHUNK);
                        let msg = Message::DiskSyncChunk(DiskSyncChunk {
                            disk: 0,
                            offset: offset + at as u64,
                            data: data.slice(at..at + n),
                        });
                        self.send(now, &msg);
                        self.rep.sync_bytes += n as u64;
                        at += n;
                    }
                }
                Some(Outgoing::SyncDone) => {
                    let (epoch, disk_len) = {
                        let d = self.disk.lock();
                        (d.epoch(), d.disk().len())
                    };
                    let msg = Message::DiskSyncDone(DiskSyncDone {
                        disk: 0,
                        epoch,
                        disk_len,
                        bytes: self.rep.sync_bytes,
                    });
                    self.send(now, &msg);
                    self.rep.disk_syncing = false;
                }
                Some(Outgoing::Barrier { .. }) => {}
            }
        }
        Ok(())
    }

    fn drain_compare(&mut self, now: Instant, checkpoint: Option<u64>) {
        let release = checkpoint.map_or(Release::Compared, |epoch| Release::Checkpoint { epoch });
        self.drain_compare_as(now, release);
    }

    fn drain_compare_as(&mut self, now: Instant, release: Release) {
        while let Some(a) = self.rep.cmp.poll_action() {
            match a {
                NetAction::Release(f) => self.emit(now, f, release),
                NetAction::DropSecondary(_) => {}
                NetAction::RequestCheckpoint(reason) => {
                    self.rep.wanted.get_or_insert(Trigger::Compare(reason));
                }
            }
        }
    }

    /// Offers the frames the comparator refused again (after a checkpoint emptied its queues).
    fn offer_held(&mut self, now: Instant) {
        let t = self.net_time(now);
        while let Some(f) = self.held.pop_front() {
            if let Err(Backpressure(f)) = self.rep.cmp.handle_primary(t, f) {
                self.held.push_front(f);
                break;
            }
        }
        self.drain_compare(now, None);
    }

    /// Releases `frame` stamped with the output token, after the frames still waiting for one; without a
    /// token or with output suspended it waits too.
    fn emit(&mut self, now: Instant, frame: Bytes, release: Release) {
        self.unstamped.push_back((frame, release));
        if self.suspended {
            return;
        }
        if let Some(token) = self.peer.output_token(now) {
            for (frame, release) in self.unstamped.drain(..) {
                self.outputs.push_back(Output::ToClient {
                    frame,
                    token,
                    release,
                });
            }
        }
    }

    fn drive_node(&mut self, now: Instant) -> Result<()> {
        while let Some(step) = self.peer.next_step(now) {
            match step {
                NodeStep::LinkFailed(detail) => self.link_lost(now, detail),
                NodeStep::Promote(_) => {}
                NodeStep::ContinueAlone(token) => self.go_alone(now, token)?,
                NodeStep::SuspendOutput => self.suspended = true,
                NodeStep::StopGuest => {
                    self.pause_guest()?;
                    self.peer.ok = false;
                    self.phase = Phase::Stopped;
                    self.outputs.push_back(Output::StopGuest);
                }
            }
        }
        if matches!(self.phase, Phase::Syncing | Phase::Colo) {
            let st = self.peer.node.status();
            if self.phase == Phase::Syncing && self.peer.node.is_primary_alone(now) {
                // Lost before the first checkpoint: the machine goes straight to running alone.
                let token = self.peer.output_token(now).unwrap_or(FenceToken::ZERO);
                self.go_alone(now, token)?;
            } else if matches!(
                st.failover,
                FailoverStatus::Required | FailoverStatus::Active | FailoverStatus::Relaunch
            ) {
                // (`Completed` stays from an earlier failover while a re-protection syncs.)
                self.phase = Phase::FailingOver;
                self.link_lost(now, "failover".into());
            }
        }
        Ok(())
    }

    /// The secondary announced that it takes over: pause the guest, drop what the comparator holds (the
    /// secondary's guest produces that output itself) and stop.
    fn stop_for_takeover(&mut self, now: Instant, detail: String) -> Result<()> {
        self.peer.ok = false;
        self.peer.exit_detail = Some(detail.clone());
        self.rep.session.fail(colo_proto::Error::Local(detail));
        while self.rep.session.poll_action().is_some() {}
        let _ = self.peer.node.handle_event(now, NodeEvent::Stop);
        self.pause_guest()?;
        let _ = self.disk.lock().stop_replication();
        self.held.clear();
        self.unstamped.clear();
        self.phase = Phase::Stopped;
        self.outputs.push_back(Output::StopGuest);
        Ok(())
    }

    /// The secondary is gone: stop replicating, release what the comparator holds, run alone.
    fn go_alone(&mut self, now: Instant, token: FenceToken) -> Result<()> {
        if self.peer.ok {
            // Tell a still-living secondary to stop rather than promote (operator failover).
            let _ = self.peer.link.send(&Message::FailoverNotice {
                reason: Reason::Operator,
            });
        }
        self.peer.ok = false;
        while self.rep.session.poll_action().is_some() {}
        // Writes waiting for the secondary's ack are on our disk: they complete now.
        let waiting = self.disk.lock().stop_replication();
        self.disk.push_completed(waiting);
        self.rep.disk_syncing = false;
        self.phase = Phase::Alone;
        self.suspended = false;
        let t = self.net_time(now);
        self.rep.cmp.checkpoint(t);
        let stamped: Vec<(Bytes, Release)> = self.unstamped.drain(..).collect();
        for (f, r) in stamped {
            self.outputs.push_back(Output::ToClient {
                frame: f,
                token,
                release: r,
            });
        }
        self.drain_compare_as(now, Release::Failover);
        while let Some(f) = self.held.pop_front() {
            self.emit(now, f, Release::Failover);
        }
        self.resume_guest()?;
        let _ = self.peer.node.handle_event(now, NodeEvent::TakeoverDone);
        self.outputs.push_back(Output::ContinuedAlone { token });
        Ok(())
    }
}
