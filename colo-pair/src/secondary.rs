//! The secondary side: runs the shadow guest, whose output is only compared until it is promoted.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use colo_block::{BlockBackend, DiscardRecord, OverlayStore, SecondaryState, WriteId, WriteRecord};
use colo_failover::{Arbiter, Event as NodeEvent, FenceToken, Node};
use colo_net::packet::IpVersion;
use colo_net::{FlowKey, Rewriter, Time};
use colo_proto::{
    DiskSyncDone, Message, OutputFrame, PageBatch, SecondaryAction, SecondarySession, WantReason,
};
use colo_ram::{DirtyLog, GuestRam, PAGE_SIZE, RamCache, RamLayout};

use crate::config::PairConfig;
use crate::disk::SharedSecondaryDisk;
use crate::error::{PairError, Result};
use crate::peer::{NodeStep, Peer};
use crate::status::{PairStatus, Pauses, Phase, Side};
use crate::vm::{DeviceState, Link, Output, Release, Vm};

/// The error code a secondary sends in `Message::Error` when it gives up on its own (its copy can no longer
/// follow the primary): the primary then runs alone.
pub const SECONDARY_FAILED: u32 = 0x5ec0_0001;

/// How often the rewriter's held frames and closed connections are expired.
const EXPIRE_INTERVAL: Duration = Duration::from_millis(100);

/// The secondary of a COLO pair: applies checkpoints (colo-proto session, colo-ram RAM cache with union
/// flush, device state), follows the primary's disk (colo-block hidden store and active overlay), rewrites
/// the SVM's TCP sequence numbers and forwards its output to the primary's comparator (colo-net), and
/// promotes the SVM when the primary is lost and the arbiter agrees (colo-failover).
///
/// Driven like [`PrimaryPair`](crate::PrimaryPair).
pub struct SecondaryPair<V: Vm, D, H, A> {
    cfg: PairConfig,
    origin: Instant,
    vm: V,
    /// The RAM cache (one guest RAM); freed at promotion.
    cache: Option<RamCache>,
    svm_log: Box<dyn DirtyLog + Send>,
    disk: SharedSecondaryDisk<D, H, A>,
    session: SecondarySession,
    rewriter: Rewriter,
    /// The channel to the secondary/primary and the failover machine watching it.
    peer: Peer,
    phase: Phase,
    outputs: VecDeque<Output>,
    /// Output waiting for the promotion (or a valid lease).
    unstamped: VecDeque<Bytes>,
    paused: bool,
    paused_at: Option<Instant>,
    /// Wall time the last checkpoint's flush, device load and disk commit took. They run inside one call,
    /// after the `now` it was given, so the pause ending at the resume adds it.
    load_took: Duration,
    devices: Vec<DeviceState>,
    next_write_id: u64,
    next_expire: Instant,
    checkpoints: u64,
    pauses: Pauses,
    /// Bytes of initial disk sync data received.
    sync_bytes: u64,
    /// A checkpoint was asked for in this epoch (asked once per epoch).
    asked_checkpoint: bool,
    /// Rewriter evictions seen so far (a rise is table pressure).
    evictions_seen: u64,
}

impl<V: Vm, D, H, A> std::fmt::Debug for SecondaryPair<V, D, H, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecondaryPair")
            .field("phase", &self.phase)
            .field("session", &self.session.state_name())
            .field("epoch", &self.session.committed_epoch())
            .finish()
    }
}

impl<V: Vm, D: BlockBackend, H: OverlayStore, A: OverlayStore> SecondaryPair<V, D, H, A> {
    /// Starts shadowing over `link` (after the VMM's handshake). `vm` has not run yet: its RAM comes from
    /// the primary, and the first checkpoint starts it. `svm_log` tracks `vm`'s memory; `disk` holds the
    /// same image as the primary's disk, or is syncing ([`SecondaryDisk::new_syncing`], protocol v3): it
    /// then receives the primary's initial disk sync before the first checkpoint.
    ///
    /// [`SecondaryDisk::new_syncing`]: colo_block::SecondaryDisk::new_syncing
    pub fn new(
        cfg: PairConfig,
        now: Instant,
        vm: V,
        svm_log: Box<dyn DirtyLog + Send>,
        disk: SharedSecondaryDisk<D, H, A>,
        link: Box<dyn Link + Send>,
        arbiter: Box<dyn Arbiter + Send>,
    ) -> Result<Self> {
        let layout = RamLayout::of(vm.memory()).map_err(|source| PairError::Ram { epoch: 0, source })?;
        let cache = RamCache::new(layout, cfg.flush).map_err(|source| PairError::Ram { epoch: 0, source })?;
        if disk.lock().state() == SecondaryState::Syncing && link.version() < 3 {
            return Err(PairError::NeedsVersion {
                feature: "initial disk sync",
                version: link.version(),
            });
        }
        let rewriter = Rewriter::new(cfg.rewriter.clone())?;
        let mut node = Node::new(cfg.failover)?;
        node.handle_event(now, NodeEvent::Join)?;
        let session = SecondarySession::new(cfg.session, now);
        let mut pair = SecondaryPair {
            cfg,
            origin: now,
            vm,
            cache: Some(cache),
            svm_log,
            disk,
            peer: Peer::new(link, node, arbiter),
            session,
            rewriter,
            phase: Phase::Syncing,
            outputs: VecDeque::new(),
            unstamped: VecDeque::new(),
            paused: true,
            paused_at: None,
            load_took: Duration::ZERO,
            devices: Vec::new(),
            next_write_id: 0,
            next_expire: now + EXPIRE_INTERVAL,
            checkpoints: 0,
            pauses: Pauses::default(),
            sync_bytes: 0,
            asked_checkpoint: false,
            evictions_seen: 0,
        };
        pair.drive_session(now)?;
        pair.drive_node(now)?;
        Ok(pair)
    }

    fn net_time(&self, now: Instant) -> Time {
        crate::peer::net_time(self.origin, now)
    }

    /// The guest.
    pub fn vm(&self) -> &V {
        &self.vm
    }

    /// The guest, mutably.
    pub fn vm_mut(&mut self) -> &mut V {
        &mut self.vm
    }

    /// The guest's disk.
    pub fn disk(&self) -> &SharedSecondaryDisk<D, H, A> {
        &self.disk
    }

    /// Where the pair stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The checkpoint session's state, for logs ("running", "receiving RAM", ...).
    pub fn session_state(&self) -> &'static str {
        self.session.state_name()
    }

    /// Whether the guest is paused (or has not been started by the first checkpoint yet).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The next thing for the VMM to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.peer.node.poll_timeout(),
            self.session.poll_timeout(),
            Some(self.next_expire),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<()> {
        self.peer.node.handle_timeout(now);
        self.drive_node(now)?;
        if self.session.poll_timeout().is_some_and(|d| d <= now) {
            let _ = self.session.handle_timeout(now);
            self.drive_session(now)?;
        }
        if now >= self.next_expire {
            self.next_expire = now + EXPIRE_INTERVAL;
            let t = self.net_time(now);
            self.rewriter.expire(t);
            self.drain_input();
        }
        self.check_pressure(now);
        self.drive_node(now)
    }

    /// A message from the primary, in arrival order.
    ///
    /// A message a secondary never accepts (one only a secondary sends) is a protocol error of a living
    /// primary: the secondary stops (as [`channel_error`](Self::channel_error) does) and returns
    /// [`PairError::Unexpected`].
    pub fn handle_message(&mut self, now: Instant, msg: Message) -> Result<()> {
        if !matches!(self.phase, Phase::Syncing | Phase::Colo) {
            return Ok(());
        }
        let _ = self.peer.node.handle_event(now, NodeEvent::HeartbeatReceived);
        match msg {
            Message::Heartbeat { .. } => {}
            Message::BlockWrite(w) => {
                let rec = WriteRecord {
                    id: WriteId(self.next_write_id),
                    epoch: w.epoch,
                    offset: w.offset,
                    data: w.data,
                };
                self.next_write_id += 1;
                let r = self.disk.lock().apply(&rec);
                self.applied(now, r, rec.offset)?;
            }
            Message::BlockDiscard(d) => {
                let rec = DiscardRecord {
                    id: WriteId(self.next_write_id),
                    epoch: d.epoch,
                    offset: d.offset,
                    len: d.len,
                };
                self.next_write_id += 1;
                let r = self.disk.lock().apply_discard(&rec);
                self.applied(now, r, rec.offset)?;
            }
            Message::DiskSyncChunk(c) => {
                let r = self.disk.lock().apply_sync_chunk(c.offset, &c.data);
                match r {
                    Ok(()) => self.sync_bytes += c.data.len() as u64,
                    Err(e) => self.give_up(now, format!("initial disk sync at {}: {e}", c.offset))?,
                }
            }
            Message::DiskSyncDone(done) => {
                if let Err(e) = self.finish_sync(&done) {
                    self.give_up(now, format!("initial disk sync: {e}"))?;
                }
            }
            Message::PrimaryIsn(i) => {
                let f = i.flow;
                let flow = FlowKey {
                    src: f.src,
                    dst: f.dst,
                    src_port: f.src_port,
                    dst_port: f.dst_port,
                    vlan: f.vlan,
                    proto: 6,
                    version: if f.ipv6 { IpVersion::V6 } else { IpVersion::V4 },
                };
                let t = self.net_time(now);
                self.rewriter.set_primary_isn(t, flow, i.isn);
                self.drain_input();
            }
            Message::OutputFrame(f) => {
                // The client's frames, mirrored by the primary.
                let t = self.net_time(now);
                self.rewriter.client_input(t, BytesMut::from(&f.data[..]));
                self.drain_input();
            }
            Message::GuestShutdown => {
                self.peer.ok = false;
                let _ = self.peer.node.handle_event(now, NodeEvent::Stop);
                self.pause_guest(now)?;
                self.phase = Phase::ShutDown;
                self.peer.exit_detail = Some("the guest shut down on the primary".into());
                self.outputs.push_back(Output::GuestShutdown);
            }
            Message::FailoverNotice { reason } => {
                // The primary runs on alone: this copy must not be promoted.
                self.peer.ok = false;
                let _ = self.peer.node.handle_event(now, NodeEvent::Stop);
                self.pause_guest(now)?;
                self.phase = Phase::Stopped;
                self.peer.exit_detail = Some(format!("the primary continues alone ({reason:?})"));
                self.outputs.push_back(Output::StopGuest);
            }
            m if m.is_session_message() => {
                let _ = self.session.handle_message(now, m);
                self.drive_session(now)?;
            }
            m => {
                // Only a primary that is alive sends anything: stop rather than ever promote next to it.
                let e = PairError::Unexpected {
                    what: format!("{:?}", m.kind()),
                    state: self.phase.name(),
                };
                self.give_up(now, format!("protocol error from the primary: {e}"))?;
                return Err(e);
            }
        }
        self.check_pressure(now);
        self.drive_node(now)
    }

    /// The VMM's receiver saw the channel fail or close (the primary may be dead: this may promote).
    pub fn link_failed(&mut self, now: Instant, detail: &str) -> Result<()> {
        self.link_lost(now, detail.to_string());
        self.drive_session(now)?;
        self.drive_node(now)
    }

    /// The VMM's receiver got this error from the channel (`Channel::recv`).
    ///
    /// A protocol error ([`colo_proto::Error::is_protocol_error`]: garbage, a bad CRC, a message out of
    /// order) comes from a primary that is alive, since it wrote those bytes: the secondary stops (phase
    /// `Stopped`, [`Output::StopGuest`], exit detail) and is never promoted next to it. Anything else (the
    /// stream closed or broke off inside a frame, a socket error) is the loss of the primary, as
    /// [`link_failed`](Self::link_failed).
    pub fn channel_error(&mut self, now: Instant, error: &colo_proto::Error) -> Result<()> {
        if error.is_protocol_error() && matches!(self.phase, Phase::Syncing | Phase::Colo) {
            return self.give_up(now, format!("protocol error from the primary: {error}"));
        }
        self.link_failed(now, &error.to_string())
    }

    /// A frame the SVM sent: through the rewriter to the primary's comparator, or to the client once
    /// promoted. `Err(OutputFull)`: not taken, offer it again later.
    pub fn guest_output(&mut self, now: Instant, frame: Bytes) -> Result<()> {
        let t = self.net_time(now);
        match self.phase {
            Phase::Syncing | Phase::Colo => {
                let mut buf = BytesMut::from(&frame[..]);
                self.rewriter.secondary_output(t, &mut buf);
                let msg = Message::OutputFrame(OutputFrame {
                    interface: self.cfg.interface,
                    data: buf.freeze(),
                });
                self.send(now, &msg);
                self.drive_node(now)?;
            }
            Phase::FailingOver | Phase::Alone => {
                if self.unstamped.len() >= crate::MAX_HELD_FRAMES {
                    return Err(PairError::OutputFull {
                        held: self.unstamped.len(),
                    });
                }
                let mut buf = BytesMut::from(&frame[..]);
                self.rewriter.secondary_output(t, &mut buf);
                self.unstamped.push_back(buf.freeze());
                self.flush_unstamped(now);
            }
            Phase::Stopped | Phase::ShutDown => {}
        }
        Ok(())
    }

    /// A frame from the client, once promoted (before, the client's frames come mirrored by the primary).
    pub fn client_input(&mut self, now: Instant, frame: Bytes) -> Result<()> {
        if matches!(self.phase, Phase::Alone | Phase::FailingOver) {
            let t = self.net_time(now);
            self.rewriter.client_input(t, BytesMut::from(&frame[..]));
            self.drain_input();
        }
        Ok(())
    }

    /// The first half of an operator's takeover while the primary is alive: tells it (`FailoverNotice`)
    /// to stop its guest for good and release nothing more; it then closes the link. Call
    /// [`failover_now`](Self::failover_now) once the link is gone (or after a bound: an arbiter still
    /// fences a primary that did not hear). Nothing else changes here.
    pub fn ask_primary_to_stop(&mut self, now: Instant) -> Result<()> {
        if self.phase != Phase::Colo || !self.peer.ok {
            return Err(PairError::BadCommand {
                command: "ask the primary to stop",
                state: self.phase.name(),
            });
        }
        let msg = Message::FailoverNotice {
            reason: colo_proto::Reason::Operator,
        };
        self.send(now, &msg);
        self.drive_node(now)
    }

    /// The operator's "failover now": promote the SVM (after winning the arbiter).
    pub fn failover_now(&mut self, now: Instant) -> Result<()> {
        self.peer.node.handle_event(now, NodeEvent::FailoverCommand)?;
        self.peer.exit_detail = Some("operator command".into());
        self.drive_node(now)
    }

    /// The status report.
    pub fn status(&self) -> PairStatus {
        PairStatus {
            side: Side::Secondary,
            phase: self.phase,
            failover: self.peer.node.status(),
            epoch: self.session.committed_epoch(),
            checkpoints: self.checkpoints,
            mismatch_checkpoints: 0,
            last_pause: self.pauses.last(),
            p99_pause: self.pauses.percentile(99),
            pause_p50: self.pauses.percentile(50),
            bytes_sent: self.peer.bytes_sent,
            compare: None,
            rewrite: Some(self.rewriter.stats()),
            disk_sync: None,
            exit_detail: self.peer.exit_detail.clone(),
            checkpoint_interval: self.cfg.checkpoint_interval,
        }
    }

    // ---- internals ----

    fn send(&mut self, now: Instant, msg: &Message) -> bool {
        self.peer.send_or_lose(now, msg, &mut self.session)
    }

    /// The channel is unusable: the session fails and the failover machine counts the partner as lost.
    fn link_lost(&mut self, now: Instant, detail: String) {
        self.peer.lose(now, detail, &mut self.session);
    }

    /// A replicated write or discard was applied (or not): acknowledge it (protocol v3), or give up.
    fn applied(
        &mut self,
        now: Instant,
        r: std::result::Result<(), colo_block::Error>,
        offset: u64,
    ) -> Result<()> {
        match r {
            Ok(()) => {
                let last = self.disk.lock().last_applied();
                if let Some(WriteId(id)) = last
                    && self.cfg.block_acks
                    && self.peer.link.version() >= 3
                {
                    self.send(now, &Message::BlockAck { disk: 0, id });
                }
                Ok(())
            }
            Err(e) => self.give_up(now, format!("applying the primary's write at {offset}: {e}")),
        }
    }

    /// The primary's sync summary: the disk lengths agree and every byte announced arrived.
    fn finish_sync(&mut self, done: &DiskSyncDone) -> std::result::Result<(), String> {
        let mut disk = self.disk.lock();
        let len = disk.disk().len();
        if done.disk_len != len {
            return Err(format!("primary disk has {} bytes, ours {len}", done.disk_len));
        }
        if done.bytes != self.sync_bytes {
            return Err(format!(
                "primary sent {} bytes, {} arrived",
                done.bytes, self.sync_bytes
            ));
        }
        disk.finish_sync(done.epoch).map_err(|e| e.to_string())
    }

    /// Asks the primary for an early checkpoint (once per epoch, protocol v3) when an SVM write was refused
    /// for lack of active-overlay room, or the rewriter had to evict connections.
    fn check_pressure(&mut self, now: Instant) {
        let overlay_full = self.disk.take_overlay_full();
        let evictions = self.rewriter.stats().evictions;
        let rewriter_full = evictions > self.evictions_seen;
        self.evictions_seen = evictions;
        let reason = if overlay_full {
            WantReason::OverlayFull
        } else if rewriter_full {
            WantReason::RewriterFull
        } else {
            return;
        };
        if self.phase == Phase::Colo && !self.asked_checkpoint && self.peer.link.version() >= 3 {
            self.asked_checkpoint = true;
            self.send(now, &Message::CheckpointWanted { reason });
        }
    }

    /// This copy cannot follow the primary any more: tell it (it runs on alone) and stop.
    fn give_up(&mut self, now: Instant, detail: String) -> Result<()> {
        let msg = Message::Error {
            code: SECONDARY_FAILED,
            text: detail.clone(),
        };
        self.send(now, &msg);
        self.peer.ok = false;
        self.peer.exit_detail = Some(detail);
        let _ = self.peer.node.handle_event(now, NodeEvent::Stop);
        while self.session.poll_action().is_some() {}
        self.pause_guest(now)?;
        self.phase = Phase::Stopped;
        self.outputs.push_back(Output::StopGuest);
        Ok(())
    }

    fn pause_guest(&mut self, now: Instant) -> Result<()> {
        if !self.paused {
            self.vm
                .pause()
                .map_err(|source| PairError::Vm { op: "pause", source })?;
            self.paused = true;
            self.paused_at = Some(now);
        }
        Ok(())
    }

    fn resume_guest(&mut self, now: Instant) -> Result<()> {
        if self.paused {
            self.vm
                .resume()
                .map_err(|source| PairError::Vm { op: "resume", source })?;
            self.paused = false;
            if let Some(at) = self.paused_at.take() {
                let load = std::mem::take(&mut self.load_took);
                self.pauses.push(now.saturating_duration_since(at) + load);
            }
        }
        Ok(())
    }

    fn store_ram(&mut self, batch: &PageBatch) -> std::result::Result<(), PairError> {
        if batch.page_size as usize != PAGE_SIZE {
            return Err(PairError::PageSize {
                epoch: batch.epoch,
                found: batch.page_size,
                expected: PAGE_SIZE as u32,
            });
        }
        let ram_err = |source| PairError::Ram {
            epoch: batch.epoch,
            source,
        };
        let Some(cache) = &mut self.cache else {
            return Ok(());
        };
        for p in &batch.pages {
            if p.is_zero() {
                cache.receive_zero(p.gpa, 1).map_err(ram_err)?;
            } else {
                cache.receive(p.gpa, &p.data).map_err(ram_err)?;
            }
        }
        Ok(())
    }

    /// Flushes the RAM cache, loads device state and commits the block checkpoint.
    fn load_checkpoint(&mut self, now: Instant, epoch: u64) -> std::result::Result<(), PairError> {
        let began = Instant::now();
        let mut guest = GuestRam::new(self.vm.memory()).map_err(|source| PairError::Ram { epoch, source })?;
        if let Some(cache) = &mut self.cache {
            cache
                .flush(&mut guest, &mut self.svm_log)
                .map_err(|source| PairError::Ram { epoch, source })?;
        }
        let devices = std::mem::take(&mut self.devices);
        self.vm.load_state(&devices).map_err(|source| PairError::Vm {
            op: "load state",
            source,
        })?;
        let block = |source| PairError::Block {
            what: "checkpoint",
            source,
        };
        {
            let mut disk = self.disk.lock();
            let disk_epoch = disk.epoch();
            disk.handle_barrier(disk_epoch).map_err(block)?;
            disk.checkpoint().map_err(block)?;
        }
        self.rewriter.checkpoint();
        self.drain_input();
        let _ = self.session.checkpoint_loaded(now);
        self.load_took = began.elapsed();
        Ok(())
    }

    fn drive_session(&mut self, now: Instant) -> Result<()> {
        while let Some(action) = self.session.poll_action() {
            if !matches!(self.phase, Phase::Syncing | Phase::Colo) {
                continue;
            }
            match action {
                SecondaryAction::Send(m) => {
                    self.send(now, &m);
                }
                SecondaryAction::PauseGuest => self.pause_guest(now)?,
                SecondaryAction::StoreRam(batch) => {
                    if let Err(e) = self.store_ram(&batch) {
                        self.give_up(now, e.to_string())?;
                    }
                }
                SecondaryAction::StoreDeviceState(chunk) => {
                    if chunk.offset == 0 {
                        // The session checked `total` against its cap and the chunk order.
                        let cap = usize::try_from(chunk.total).unwrap_or(usize::MAX).min(1 << 20);
                        self.devices.push(DeviceState {
                            id: chunk.device_id,
                            data: Vec::with_capacity(cap),
                        });
                    }
                    if let Some(d) = self.devices.last_mut() {
                        d.data.extend_from_slice(&chunk.data);
                    }
                }
                SecondaryAction::FlushRamCache { epoch } => {
                    let _ = self.peer.node.handle_event(now, NodeEvent::CheckpointLoadStarted);
                    // The device state comes from the primary: check it before the flush changes the
                    // guest's RAM. A refusal is the primary's protocol error, with the guest untouched.
                    if let Err(e) = self.vm.check_state(&self.devices) {
                        let detail = format!(
                            "protocol error from the primary: device state of checkpoint {epoch} refused: {e}"
                        );
                        self.devices.clear();
                        self.give_up(now, detail)?;
                        continue;
                    }
                    // Flush, device load and block commit happen together, before anything else arrives.
                    if let Err(e) = self.load_checkpoint(now, epoch) {
                        self.give_up(now, format!("loading checkpoint {epoch}: {e}"))?;
                    }
                    let _ = self
                        .peer
                        .node
                        .handle_event(now, NodeEvent::CheckpointLoadFinished);
                }
                SecondaryAction::LoadDeviceState { .. } | SecondaryAction::CommitBlockCheckpoint { .. } => {}
                SecondaryAction::ResumeGuest => self.resume_guest(now)?,
                SecondaryAction::CheckpointDone { .. } => {
                    self.checkpoints += 1;
                    self.asked_checkpoint = false;
                    if self.phase == Phase::Syncing {
                        self.phase = Phase::Colo;
                        self.peer.node.handle_event(now, NodeEvent::SyncCompleted)?;
                    }
                }
                SecondaryAction::PeerClosed(reason) => {
                    self.link_lost(now, format!("the primary left ({reason:?})"));
                }
                SecondaryAction::Failed(e) if e.is_protocol_error() => {
                    // The primary is alive (it sent this): never promote next to it.
                    self.give_up(now, format!("protocol error from the primary: {e}"))?;
                }
                SecondaryAction::Failed(e) => self.link_lost(now, e.to_string()),
            }
        }
        Ok(())
    }

    fn drain_input(&mut self) {
        while let Some(f) = self.rewriter.poll_input() {
            self.outputs.push_back(Output::ToGuest(f.freeze()));
        }
    }

    fn flush_unstamped(&mut self, now: Instant) {
        if self.phase != Phase::Alone {
            return;
        }
        if let Some(token) = self.peer.output_token(now) {
            while let Some(frame) = self.unstamped.pop_front() {
                self.outputs.push_back(Output::ToClient {
                    frame,
                    token,
                    release: Release::Alone,
                });
            }
        }
    }

    fn drive_node(&mut self, now: Instant) -> Result<()> {
        while let Some(step) = self.peer.next_step(now) {
            match step {
                NodeStep::LinkFailed(detail) => self.link_lost(now, detail),
                NodeStep::Promote(token) => self.promote(now, token)?,
                NodeStep::ContinueAlone(_) | NodeStep::SuspendOutput => {}
                NodeStep::StopGuest => {
                    self.pause_guest(now)?;
                    self.peer.ok = false;
                    self.phase = Phase::Stopped;
                    self.outputs.push_back(Output::StopGuest);
                }
            }
        }
        match self.phase {
            Phase::Syncing if self.peer.node.status().role == colo_failover::Role::None => {
                // Lost the primary before the first checkpoint: no consistent copy to run.
                self.link_lost(now, "primary lost before the first checkpoint".into());
                while self.session.poll_action().is_some() {}
                self.pause_guest(now)?;
                self.phase = Phase::Stopped;
                self.outputs.push_back(Output::StopGuest);
            }
            Phase::Colo if self.peer.node.status().failover != colo_failover::FailoverStatus::None => {
                self.phase = Phase::FailingOver;
                self.link_lost(now, "failover".into());
            }
            _ => {}
        }
        self.flush_unstamped(now);
        Ok(())
    }

    /// The primary is gone and the arbiter agreed: the SVM becomes the primary.
    fn promote(&mut self, now: Instant, token: FenceToken) -> Result<()> {
        self.peer.ok = false;
        while self.session.poll_action().is_some() {}
        // A partly received checkpoint is dropped with the RAM cache (never flushed); the SVM runs on from
        // its own state, which is what the client has seen.
        self.devices.clear();
        self.cache = None;
        let committed = self.disk.lock().failover();
        committed.map_err(|source| PairError::Block {
            what: "failover commit",
            source,
        })?;
        self.rewriter.failover();
        self.drain_input();
        self.phase = Phase::Alone;
        self.resume_guest(now)?;
        let _ = self.peer.node.handle_event(now, NodeEvent::TakeoverDone);
        self.outputs.push_back(Output::Promoted { token });
        self.flush_unstamped(now);
        Ok(())
    }
}
