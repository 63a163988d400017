//! The comparator: decides when the PVM's output may leave and when the pair must checkpoint.
//!
//! It runs on the primary host. The VMM hands it every frame the PVM sends ([`Comparator::handle_primary`])
//! and every frame the SVM sends after the secondary's [`Rewriter`](crate::Rewriter) translated it
//! ([`Comparator::handle_secondary`]), calls [`Comparator::handle_tick`] when [`Comparator::poll_timeout`]
//! expires and [`Comparator::checkpoint`] once a checkpoint has been taken, and carries out the
//! [`Action`]s it polls: send a released primary frame to the client, free a secondary frame, start a
//! checkpoint.
//!
//! # What is compared
//!
//! Frames are tracked per flow ([`FlowKey`]: protocol, addresses, ports, VLAN ids, one direction).
//!
//! **TCP** is compared as a byte stream per flow, in the primary's sequence space (the rewriter puts the
//! SVM's segments there). A primary segment is released once every part of it is accounted for, in the
//! order the PVM sent them:
//! - *payload*: the SVM produced the same bytes at the same sequence numbers, whatever the segmentation on
//!   either side (a 64 KiB TSO frame matches 45 wire-sized segments). Bytes are compared with memcmp.
//! - *SYN*: the SVM sent a SYN with the same SYN/ACK/FIN/RST flags and the same set of option kinds
//!   ([`SynShape`]). Option values (MSS, window scale, timestamps) and the ISN are
//!   not compared; the primary's SYN sets where the stream starts.
//! - *FIN*: the SVM's FIN sits at the same sequence number; data where the other side has its FIN is a
//!   mismatch.
//! - *RST*: the SVM also sent a RST on this flow (its sequence number is not compared: a RST answering a
//!   stray segment takes its number from that segment).
//! - *ACK*: the acknowledgment number of a primary segment must not exceed the highest one the SVM has sent
//!   on the flow: the client must never hear that data was received which the SVM has not received too.
//!
//! Never compared: window, checksum, urgent pointer, the PSH/URG/ECE/CWR flags, timestamps and the other
//! option values, IP id/TTL.
//! Pure ACKs (no payload, no SYN/FIN/RST) are not compared: a primary pure ACK waits only for the ACK rule
//! and its turn; a secondary pure ACK updates the SVM's acknowledgment and is dropped at once.
//! A segment that lies entirely below the compared position is a *retransmission*: a primary one is
//! released (its bytes were already compared), a secondary one dropped. A segment that overlaps the
//! compared position is compared from there on. A gap (a segment starting beyond the compared position)
//! waits for the missing bytes; if they never come the stale timer requests a checkpoint.
//!
//! **UDP, ICMP, ICMPv6 and IP fragments** are compared frame by frame with [`masked_diff`]: link header and
//! the whole IP packet, except IPv4 identification, TTL and header checksum, IPv6 flow label and hop limit,
//! and the transport checksum. A primary frame pairs with an equal secondary frame among the first
//! `datagram_window` queued ones and vice versa, so small reorderings by multi-threaded guests do not
//! checkpoint; when nothing pairs and either side has `datagram_window` unpaired frames (at once with a
//! window of 1), that is a mismatch.
//!
//! **Other IP protocols** are compared the same way without any transport checksum skipped (the whole
//! frame except the IP fields above, which two identical guests legitimately choose differently).
//!
//! **Non-IP frames** (ARP and the like) and **malformed or truncated frames** are not compared: a primary
//! one is released at once, a secondary one dropped, each counted ([`Stats`]). With
//! [`Config::checkpoint_on_unsupported`] a non-IP primary frame also requests a checkpoint.
//!
//! # Bounds and timers
//!
//! The connection table holds at most `max_connections` flows. A new flow in a full table evicts the idle
//! flow (no queued frames) that was active longest ago and requests a checkpoint
//! ([`CheckpointReason::TableFull`]); if no flow is idle the frame is refused like a full queue. Queues are
//! bounded per flow and side and globally: a primary frame that does not fit is handed back to the caller
//! ([`Backpressure`]) so the VMM stops taking frames from the PVM until the checkpoint, and a secondary frame
//! that does not fit is dropped; both request a checkpoint ([`CheckpointReason::QueueFull`]). Every
//! `scan_interval` the tick looks for a frame held longer than `compare_timeout` and requests a checkpoint
//! ([`CheckpointReason::Stale`]).
//!
//! At [`Comparator::checkpoint`] every held primary frame is released (in order) and every secondary frame
//! dropped; TCP flows continue from the furthest released sequence number, as both VMs are now identical.
//! While a requested checkpoint is outstanding, further requests are counted but not repeated.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;

use crate::error::NetError;
use crate::flow::{FlowKey, FxHashMap};
use crate::packet::{Layout, PacketView, Transport, first_diff, masked_diff, tcp_flags};
use crate::tcp::{SynShape, seq_le, seq_lt, seq_max};
use crate::time::Time;

/// Tunables of the [`Comparator`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Length of the virtio-net header in front of every frame (0, 10 or 12 in practice).
    pub vnet_hdr_len: usize,
    /// A frame held longer than this requests a checkpoint (QEMU: 3000 ms).
    pub compare_timeout: Duration,
    /// How often the tick looks for stale frames (QEMU: 1000 ms).
    pub scan_interval: Duration,
    /// Most flows tracked at once.
    pub max_connections: usize,
    /// Most frames queued per flow and side.
    pub max_queued_per_flow: usize,
    /// Most frames queued over all flows, both sides together.
    pub max_queued_total: usize,
    /// Frames longer than this (virtio-net header included) are treated as malformed.
    pub max_frame_len: usize,
    /// How far into a datagram queue a frame may find its partner. 1 pairs strictly in order and reports a
    /// mismatch at the first unequal pair; a larger window tolerates reordering and reports a mismatch once
    /// either side has that many unpaired frames (or the stale timer fires).
    pub datagram_window: usize,
    /// Request a checkpoint for every non-IP primary frame (default: forward unchecked).
    pub checkpoint_on_unsupported: bool,
    /// At a checkpoint, forget flows idle for longer than this.
    pub idle_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vnet_hdr_len: 0,
            compare_timeout: Duration::from_millis(3000),
            scan_interval: Duration::from_millis(1000),
            max_connections: 16384,
            max_queued_per_flow: 2048,
            max_queued_total: 16384,
            max_frame_len: 65536 + 64,
            datagram_window: 4,
            checkpoint_on_unsupported: false,
            idle_timeout: Duration::from_secs(120),
        }
    }
}

impl Config {
    /// Checks every field against its allowed range.
    pub fn validate(&self) -> Result<(), NetError> {
        let check = |field, value: u64, ok: bool, why| {
            if ok {
                Ok(())
            } else {
                Err(NetError::Config { field, value, why })
            }
        };
        check(
            "vnet_hdr_len",
            self.vnet_hdr_len as u64,
            self.vnet_hdr_len <= 64,
            "0..=64",
        )?;
        let t = self.compare_timeout.as_millis() as u64;
        check("compare_timeout", t, t >= 1, ">= 1 ms")?;
        let s = self.scan_interval.as_millis() as u64;
        check("scan_interval", s, s >= 1, ">= 1 ms")?;
        let c = self.max_connections as u64;
        check("max_connections", c, (1..=1 << 24).contains(&c), "1..=16M")?;
        let q = self.max_queued_per_flow as u64;
        check("max_queued_per_flow", q, q >= 1, ">= 1")?;
        let g = self.max_queued_total as u64;
        check("max_queued_total", g, (2..=1 << 26).contains(&g), "2..=64M")?;
        let f = self.max_frame_len as u64;
        check("max_frame_len", f, (64..=1 << 20).contains(&f), "64..=1 MiB")?;
        let w = self.datagram_window as u64;
        check("datagram_window", w, (1..=1024).contains(&w), "1..=1024")
    }
}

/// Which VM a frame came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The primary VM (its output reaches the client).
    Primary,
    /// The secondary VM (its output is only compared).
    Secondary,
}

/// What differed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MismatchKind {
    /// TCP payload bytes; `offset` counts from the start of the compared stream.
    Payload,
    /// SYN flags or option kinds.
    Syn,
    /// One side ended the stream (FIN) where the other sent data.
    Fin,
    /// A datagram matched nothing; `offset` is within the IP packet.
    Datagram,
}

/// Why a checkpoint is requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointReason {
    /// The outputs differ.
    Mismatch {
        /// The flow.
        flow: FlowKey,
        /// Byte offset of the first difference (see [`MismatchKind`]).
        offset: u64,
        /// What differed.
        kind: MismatchKind,
    },
    /// A frame waited longer than the compare timeout.
    Stale {
        /// The flow.
        flow: FlowKey,
        /// How long the oldest frame has waited.
        age: Duration,
        /// Whose frame.
        side: Side,
    },
    /// A frame did not fit in its queue.
    QueueFull {
        /// The flow.
        flow: FlowKey,
        /// Whose frame.
        side: Side,
    },
    /// The connection table was full; `evicted` is the idle flow removed to make room (none: no flow was
    /// idle and the frame was refused).
    TableFull {
        /// The evicted flow.
        evicted: Option<FlowKey>,
    },
    /// A frame the comparator cannot look into (only with `checkpoint_on_unsupported`).
    Unsupported {
        /// What it was.
        what: &'static str,
    },
}

/// What the VMM must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this primary frame to the client.
    Release(Bytes),
    /// This secondary frame is done with.
    DropSecondary(Bytes),
    /// Take a checkpoint, then call [`Comparator::checkpoint`].
    RequestCheckpoint(CheckpointReason),
}

/// A primary frame that was not accepted because its queue is full; a checkpoint has been requested.
/// The caller keeps the frame (and should stop reading the PVM's transmit queue) and offers it again after
/// [`Comparator::checkpoint`].
#[derive(Debug, thiserror::Error)]
#[error("comparator queue full; frame of {} bytes handed back", .0.len())]
pub struct Backpressure(pub Bytes);

/// Counters; they only grow (except the two gauges noted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Primary frames handed in (accepted or not).
    pub primary_frames: u64,
    /// Secondary frames handed in.
    pub secondary_frames: u64,
    /// Primary frames released after comparison (or retransmission).
    pub released_compared: u64,
    /// Primary frames released at a checkpoint without a full comparison.
    pub released_at_checkpoint: u64,
    /// Primary frames released unchecked because they were malformed.
    pub primary_malformed: u64,
    /// Primary frames released unchecked because they are not IP.
    pub primary_unsupported: u64,
    /// Secondary frames dropped (every reason).
    pub secondary_dropped: u64,
    /// Secondary frames dropped because they were malformed.
    pub secondary_malformed: u64,
    /// Secondary frames dropped because they are not IP.
    pub secondary_unsupported: u64,
    /// Primary frames handed back with [`Backpressure`].
    pub primary_refused: u64,
    /// Secondary frames dropped because their queue was full.
    pub secondary_overflow: u64,
    /// Retransmitted segments recognised (both sides).
    pub retransmissions: u64,
    /// TCP payload bytes compared equal.
    pub tcp_bytes_compared: u64,
    /// Datagrams (UDP/ICMP/other) compared equal.
    pub datagrams_compared: u64,
    /// Mismatches found.
    pub mismatches: u64,
    /// Stale frames found.
    pub stale: u64,
    /// Checkpoint requests emitted.
    pub checkpoint_requests: u64,
    /// Reasons for a checkpoint found while one was already requested.
    pub checkpoint_requests_suppressed: u64,
    /// Checkpoints carried out ([`Comparator::checkpoint`] calls).
    pub checkpoints: u64,
    /// Flows evicted from a full table.
    pub evictions: u64,
    /// Flows currently tracked (gauge).
    pub connections: u64,
    /// Frames currently queued, both sides (gauge).
    pub queued: u64,
}

#[derive(Clone, Copy, Debug)]
enum Meta {
    Tcp {
        /// Sequence number of the first payload byte (after a SYN).
        seq: u32,
        ack: u32,
        len: u32,
        /// Offset of the payload in the frame.
        off: u32,
        flags: u8,
        option_kinds: u64,
    },
    Datagram(Layout),
}

#[derive(Debug)]
struct Held {
    frame: Bytes,
    at: Time,
    matched: bool,
    meta: Meta,
}

impl Held {
    fn tcp_payload(&self) -> &[u8] {
        match self.meta {
            Meta::Tcp { off, len, .. } => self
                .frame
                .get(off as usize..off as usize + len as usize)
                .unwrap_or(&[]),
            Meta::Datagram(_) => &[],
        }
    }
}

#[derive(Debug, Default)]
struct TcpState {
    /// Next sequence number to compare.
    cmp_seq: Option<u32>,
    /// Where the compared stream started (for reporting offsets).
    base: u32,
    /// The SYN (or SYN-ACK) of the current connection has been matched.
    syn_matched: bool,
    /// The SVM's SYN, waiting for the PVM's.
    s_syn: Option<SynShape>,
    /// Sequence number of a FIN the SVM sent, not yet paired.
    s_fin_at: Option<u32>,
    /// Highest acknowledgment the SVM sent.
    s_max_ack: Option<u32>,
    /// Highest acknowledgment the PVM sent.
    p_max_ack: Option<u32>,
    /// RSTs the SVM sent, not yet paired.
    s_rst: u32,
    /// The primary's ISN of the matched SYN.
    p_isn: Option<u32>,
    /// The primary's ISN of the latest SYN seen (matched or not), for the rewriter seam.
    p_isn_seen: Option<u32>,
    /// A FIN or RST has been matched.
    closed: bool,
}

#[derive(Debug)]
enum Kind {
    Tcp(Box<TcpState>),
    Datagram,
}

#[derive(Debug)]
struct Conn {
    kind: Kind,
    pq: VecDeque<Held>,
    sq: VecDeque<Held>,
    /// Index of the first primary frame not yet matched.
    cursor: usize,
    last_active: Time,
    /// A mismatch was reported; hold everything until the checkpoint.
    diverged: bool,
}

impl Conn {
    fn new(tcp: bool, now: Time) -> Self {
        Conn {
            kind: if tcp {
                Kind::Tcp(Box::default())
            } else {
                Kind::Datagram
            },
            pq: VecDeque::new(),
            sq: VecDeque::new(),
            cursor: 0,
            last_active: now,
            diverged: false,
        }
    }
    fn idle(&self) -> bool {
        self.pq.is_empty() && self.sq.is_empty()
    }
}

/// Output of one step of a flow's comparison, applied by the comparator afterwards (keeps borrows short).
#[derive(Default)]
struct Outcome {
    mismatch: Option<(u64, MismatchKind)>,
}

/// Compares the PVM's and the SVM's output. See the [module docs](self).
#[derive(Debug)]
pub struct Comparator {
    cfg: Config,
    conns: FxHashMap<FlowKey, Conn>,
    out: Out,
    next_scan: Time,
}

/// Everything the comparison of one flow writes besides the flow itself (borrowed next to a `&mut Conn`).
#[derive(Debug)]
struct Out {
    actions: VecDeque<Action>,
    queued: usize,
    requested: bool,
    stats: Stats,
}

impl Out {
    fn request(&mut self, reason: CheckpointReason) {
        if self.requested {
            self.stats.checkpoint_requests_suppressed += 1;
        } else {
            self.requested = true;
            self.stats.checkpoint_requests += 1;
            self.actions.push_back(Action::RequestCheckpoint(reason));
        }
    }

    fn drop_secondary(&mut self, frame: Bytes) {
        self.stats.secondary_dropped += 1;
        self.actions.push_back(Action::DropSecondary(frame));
    }
}

/// Finds or makes room for `key`'s flow (one hash lookup when the table has room). `None` when the table
/// is full of busy flows.
fn slot<'a>(
    conns: &'a mut FxHashMap<FlowKey, Conn>,
    out: &mut Out,
    max: usize,
    key: &FlowKey,
    tcp: bool,
    now: Time,
) -> Option<&'a mut Conn> {
    if conns.len() >= max && !conns.contains_key(key) {
        // Oldest idle flow, preferring closed ones.
        let victim = conns
            .iter()
            .filter(|(_, c)| c.idle())
            .min_by_key(|(_, c)| (!matches!(&c.kind, Kind::Tcp(t) if t.closed), c.last_active))
            .map(|(k, _)| *k);
        match victim {
            Some(v) => {
                conns.remove(&v);
                out.stats.evictions += 1;
                out.request(CheckpointReason::TableFull { evicted: Some(v) });
            }
            None => {
                out.request(CheckpointReason::TableFull { evicted: None });
                return None;
            }
        }
    }
    Some(conns.entry(*key).or_insert_with(|| Conn::new(tcp, now)))
}

impl Comparator {
    /// A comparator with `cfg`, which must validate.
    pub fn new(cfg: Config, now: Time) -> Result<Self, NetError> {
        cfg.validate()?;
        let next_scan = now.saturating_add(cfg.scan_interval);
        Ok(Comparator {
            conns: FxHashMap::with_capacity_and_hasher(cfg.max_connections.min(4096), Default::default()),
            cfg,
            out: Out {
                actions: VecDeque::with_capacity(64),
                queued: 0,
                requested: false,
                stats: Stats::default(),
            },
            next_scan,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        let mut s = self.out.stats;
        s.connections = self.conns.len() as u64;
        s.queued = self.out.queued as u64;
        s
    }

    /// Frames queued now: (primary, secondary).
    pub fn queued(&self) -> (usize, usize) {
        self.conns
            .values()
            .fold((0, 0), |(p, s), c| (p + c.pq.len(), s + c.sq.len()))
    }

    /// Frames queued for one flow: (primary, secondary), or `None` if the flow is not tracked.
    pub fn flow_queued(&self, flow: &FlowKey) -> Option<(usize, usize)> {
        self.conns.get(flow).map(|c| (c.pq.len(), c.sq.len()))
    }

    /// Flows tracked now.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The PVM's initial sequence number on a TCP flow, once its SYN was seen: the seam through which the
    /// VMM can tell the secondary's [`Rewriter`](crate::Rewriter) (`Rewriter::set_primary_isn`) when the
    /// client's reply reaches the SVM before the SVM's own SYN.
    pub fn primary_isn(&self, flow: &FlowKey) -> Option<u32> {
        match &self.conns.get(flow)?.kind {
            Kind::Tcp(t) => t.p_isn_seen,
            Kind::Datagram => None,
        }
    }

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.out.actions.pop_front()
    }

    /// When [`handle_tick`](Self::handle_tick) should next be called.
    pub fn poll_timeout(&self) -> Time {
        self.next_scan
    }

    /// A frame the PVM sent. Returns the frame back if it cannot be queued (see [`Backpressure`]).
    pub fn handle_primary(&mut self, now: Time, frame: Bytes) -> Result<(), Backpressure> {
        let out = &mut self.out;
        out.stats.primary_frames += 1;
        if frame.len() > self.cfg.max_frame_len {
            out.stats.primary_malformed += 1;
            out.actions.push_back(Action::Release(frame));
            return Ok(());
        }
        let view = match PacketView::parse(&frame, self.cfg.vnet_hdr_len) {
            Ok(v) => v,
            Err(NetError::Unsupported { what, .. }) => {
                out.stats.primary_unsupported += 1;
                out.actions.push_back(Action::Release(frame));
                if self.cfg.checkpoint_on_unsupported {
                    out.request(CheckpointReason::Unsupported { what });
                }
                return Ok(());
            }
            Err(_) => {
                out.stats.primary_malformed += 1;
                out.actions.push_back(Action::Release(frame));
                return Ok(());
            }
        };
        let key = FlowKey::of(&view);
        let tcp = view.tcp().is_some();
        let meta = meta_of(&view);
        let total_full = out.queued >= self.cfg.max_queued_total;
        let Some(conn) = slot(&mut self.conns, out, self.cfg.max_connections, &key, tcp, now) else {
            out.stats.primary_refused += 1;
            return Err(Backpressure(frame));
        };
        if total_full || conn.pq.len() >= self.cfg.max_queued_per_flow {
            out.stats.primary_refused += 1;
            out.request(CheckpointReason::QueueFull {
                flow: key,
                side: Side::Primary,
            });
            return Err(Backpressure(frame));
        }
        conn.last_active = now;
        if let (Kind::Tcp(t), Meta::Tcp { seq, flags, .. }) = (&mut conn.kind, meta)
            && flags & tcp_flags::SYN != 0
        {
            t.p_isn_seen = Some(seq.wrapping_sub(1));
        }
        conn.pq.push_back(Held {
            frame,
            at: now,
            matched: false,
            meta,
        });
        out.queued += 1;
        progress(conn, &key, out, self.cfg.datagram_window);
        Ok(())
    }

    /// A frame the SVM sent (already translated by the rewriter).
    pub fn handle_secondary(&mut self, now: Time, frame: Bytes) {
        let out = &mut self.out;
        out.stats.secondary_frames += 1;
        if frame.len() > self.cfg.max_frame_len {
            out.stats.secondary_malformed += 1;
            return out.drop_secondary(frame);
        }
        let view = match PacketView::parse(&frame, self.cfg.vnet_hdr_len) {
            Ok(v) => v,
            Err(NetError::Unsupported { .. }) => {
                out.stats.secondary_unsupported += 1;
                return out.drop_secondary(frame);
            }
            Err(_) => {
                out.stats.secondary_malformed += 1;
                return out.drop_secondary(frame);
            }
        };
        let key = FlowKey::of(&view);
        let meta = meta_of(&view);
        let total_full = out.queued >= self.cfg.max_queued_total;
        let tcp = matches!(meta, Meta::Tcp { .. });
        if let Meta::Tcp { len: 0, flags, .. } = meta
            && flags & (tcp_flags::SYN | tcp_flags::FIN | tcp_flags::RST) == 0
            && !self.conns.contains_key(&key)
        {
            // A pure ACK of a flow with nothing to pair: nothing to remember.
            return out.drop_secondary(frame);
        }
        let Some(conn) = slot(&mut self.conns, out, self.cfg.max_connections, &key, tcp, now) else {
            out.stats.secondary_overflow += 1;
            return out.drop_secondary(frame);
        };
        conn.last_active = now;
        if let (
            Kind::Tcp(t),
            Meta::Tcp {
                ack,
                len,
                flags,
                option_kinds,
                ..
            },
        ) = (&mut conn.kind, meta)
        {
            // Facts of a secondary segment that need no queueing.
            if flags & tcp_flags::ACK != 0 {
                t.s_max_ack = Some(t.s_max_ack.map_or(ack, |m| seq_max(m, ack)));
            }
            if flags & tcp_flags::RST != 0 {
                t.s_rst = t.s_rst.saturating_add(1);
            } else if flags & tcp_flags::SYN != 0 {
                if t.s_syn.is_none() && (!t.syn_matched || t.closed) {
                    t.s_syn = Some(SynShape {
                        flags: flags & 0x17,
                        option_kinds,
                    });
                } else {
                    out.stats.retransmissions += 1;
                }
            }
            if len == 0 && flags & tcp_flags::FIN == 0 {
                // Pure ACK, SYN or RST: remembered above; the frame itself is done with.
                out.drop_secondary(frame);
                progress(conn, &key, out, self.cfg.datagram_window);
                return;
            }
        }
        if conn.diverged {
            return out.drop_secondary(frame);
        }
        if total_full || conn.sq.len() >= self.cfg.max_queued_per_flow {
            out.stats.secondary_overflow += 1;
            out.request(CheckpointReason::QueueFull {
                flow: key,
                side: Side::Secondary,
            });
            return out.drop_secondary(frame);
        }
        conn.sq.push_back(Held {
            frame,
            at: now,
            matched: false,
            meta,
        });
        out.queued += 1;
        progress(conn, &key, out, self.cfg.datagram_window);
    }

    /// Looks for stale frames if the scan interval has passed.
    pub fn handle_tick(&mut self, now: Time) {
        if now < self.next_scan {
            return;
        }
        self.next_scan = now.saturating_add(self.cfg.scan_interval);
        let timeout = self.cfg.compare_timeout;
        let mut oldest: Option<(Duration, FlowKey, Side)> = None;
        for (k, c) in &self.conns {
            for (q, side) in [(&c.pq, Side::Primary), (&c.sq, Side::Secondary)] {
                if let Some(h) = q.front() {
                    let age = now.since(h.at);
                    if age >= timeout && oldest.is_none_or(|(a, _, _)| age > a) {
                        oldest = Some((age, *k, side));
                    }
                }
            }
        }
        if let Some((age, flow, side)) = oldest {
            self.out.stats.stale += 1;
            self.out.request(CheckpointReason::Stale { flow, age, side });
        }
    }

    /// A checkpoint has been taken: both VMs are identical again. Releases every held primary frame,
    /// drops every secondary frame, and forgets flows idle for longer than `idle_timeout`.
    ///
    /// A primary that loses its secondary (failover) calls this too, and then stops feeding the comparator.
    pub fn checkpoint(&mut self, now: Time) {
        self.out.stats.checkpoints += 1;
        self.out.requested = false;
        for conn in self.conns.values_mut() {
            for h in conn.pq.drain(..) {
                if let (
                    Kind::Tcp(t),
                    Meta::Tcp {
                        seq, len, flags, ack, ..
                    },
                ) = (&mut conn.kind, h.meta)
                {
                    let end = seq
                        .wrapping_add(len)
                        .wrapping_add(u32::from(flags & tcp_flags::FIN != 0));
                    t.cmp_seq = Some(t.cmp_seq.map_or(end, |c| seq_max(c, end)));
                    if flags & tcp_flags::SYN != 0 {
                        t.syn_matched = true;
                        t.p_isn = Some(seq.wrapping_sub(1));
                        if t.base == 0 {
                            t.base = seq;
                        }
                    }
                    if flags & tcp_flags::ACK != 0 {
                        t.p_max_ack = Some(t.p_max_ack.map_or(ack, |m| seq_max(m, ack)));
                    }
                    if flags & (tcp_flags::FIN | tcp_flags::RST) != 0 {
                        t.closed = true;
                    }
                }
                self.out.stats.released_at_checkpoint += 1;
                self.out.actions.push_back(Action::Release(h.frame));
            }
            for h in conn.sq.drain(..) {
                self.out.stats.secondary_dropped += 1;
                self.out.actions.push_back(Action::DropSecondary(h.frame));
            }
            conn.cursor = 0;
            conn.diverged = false;
            if let Kind::Tcp(t) = &mut conn.kind {
                // The SVM is now the PVM: it has acknowledged what the PVM acknowledged.
                t.s_max_ack = t.p_max_ack;
                t.s_fin_at = None;
                t.s_rst = 0;
                t.s_syn = None;
            }
        }
        self.out.queued = 0;
        let idle = self.cfg.idle_timeout;
        self.conns.retain(|_, c| now.since(c.last_active) < idle);
    }
}

fn meta_of(view: &PacketView<'_>) -> Meta {
    match view.transport {
        Transport::Tcp(t) => {
            let syn = t.has(tcp_flags::SYN);
            Meta::Tcp {
                seq: t.seq.wrapping_add(u32::from(syn)),
                ack: t.ack,
                len: t.payload_len as u32,
                off: t.payload as u32,
                flags: t.flags,
                option_kinds: if syn {
                    SynShape::new(t.flags, view.tcp_options()).option_kinds
                } else {
                    0
                },
            }
        }
        _ => Meta::Datagram(view.layout()),
    }
}

/// Runs the comparison of one flow as far as it goes and emits its actions.
fn progress(conn: &mut Conn, key: &FlowKey, out: &mut Out, window: usize) {
    if conn.diverged {
        return;
    }
    let mut res = Outcome::default();
    let before = conn.pq.len() + conn.sq.len();
    match &mut conn.kind {
        Kind::Tcp(t) => tcp_compare(
            t,
            &mut conn.pq,
            &mut conn.sq,
            &mut conn.cursor,
            &mut res,
            &mut out.stats,
            &mut out.actions,
        ),
        Kind::Datagram => datagram_compare(
            &mut conn.pq,
            &mut conn.sq,
            &mut conn.cursor,
            window,
            &mut res,
            &mut out.stats,
            &mut out.actions,
        ),
    }
    // Release matched primary frames from the front, in order.
    let s_ack = match &conn.kind {
        Kind::Tcp(t) => Some(t.s_max_ack),
        Kind::Datagram => None,
    };
    while let Some(h) = conn.pq.front() {
        if !h.matched {
            break;
        }
        if let (Some(s_ack), Meta::Tcp { ack, flags, .. }) = (s_ack, h.meta)
            && flags & tcp_flags::ACK != 0
            && !s_ack.is_some_and(|s| seq_le(ack, s))
        {
            break;
        }
        if let Some(h) = conn.pq.pop_front() {
            conn.cursor = conn.cursor.saturating_sub(1);
            if let (Kind::Tcp(t), Meta::Tcp { ack, flags, .. }) = (&mut conn.kind, h.meta)
                && flags & tcp_flags::ACK != 0
            {
                t.p_max_ack = Some(t.p_max_ack.map_or(ack, |m| seq_max(m, ack)));
            }
            out.stats.released_compared += 1;
            out.actions.push_back(Action::Release(h.frame));
        }
    }
    let after = conn.pq.len() + conn.sq.len();
    out.queued = out.queued.saturating_sub(before.saturating_sub(after));
    if let Some((offset, kind)) = res.mismatch {
        conn.diverged = true;
        // A diverged flow's secondary frames are of no further use.
        let n = conn.sq.len();
        for h in conn.sq.drain(..) {
            out.drop_secondary(h.frame);
        }
        out.queued = out.queued.saturating_sub(n);
        out.stats.mismatches += 1;
        out.request(CheckpointReason::Mismatch {
            flow: *key,
            offset,
            kind,
        });
    }
}

#[allow(clippy::too_many_arguments)]
fn tcp_compare(
    t: &mut TcpState,
    pq: &mut VecDeque<Held>,
    sq: &mut VecDeque<Held>,
    cursor: &mut usize,
    out: &mut Outcome,
    stats: &mut Stats,
    actions: &mut VecDeque<Action>,
) {
    let drop_s = |h: Held, stats: &mut Stats, actions: &mut VecDeque<Action>| {
        stats.secondary_dropped += 1;
        actions.push_back(Action::DropSecondary(h.frame));
    };
    'frames: while let Some(p) = pq.get_mut(*cursor) {
        let Meta::Tcp {
            seq,
            len,
            flags,
            option_kinds,
            ..
        } = p.meta
        else {
            // Cannot happen: a TCP flow only queues TCP metadata. Treat as matched rather than stall.
            p.matched = true;
            *cursor += 1;
            continue;
        };
        let has = |f: u8| flags & f != 0;
        if has(tcp_flags::RST) {
            if t.s_rst == 0 {
                break;
            }
            t.s_rst -= 1;
            t.closed = true;
            p.matched = true;
            *cursor += 1;
            continue;
        }
        if has(tcp_flags::SYN) {
            let isn = seq.wrapping_sub(1);
            if t.syn_matched && t.p_isn == Some(isn) {
                stats.retransmissions += 1;
            } else {
                let Some(shape) = t.s_syn else { break };
                if shape
                    != (SynShape {
                        flags: flags & 0x17,
                        option_kinds,
                    })
                {
                    out.mismatch = Some((0, MismatchKind::Syn));
                    return;
                }
                // A new connection on this flow starts here.
                t.syn_matched = true;
                t.closed = false;
                t.p_isn = Some(isn);
                t.cmp_seq = Some(seq);
                t.base = seq;
                t.s_syn = None;
                t.s_fin_at = None;
            }
            if len == 0 && !has(tcp_flags::FIN) {
                p.matched = true;
                *cursor += 1;
                continue;
            }
        }
        let fin = has(tcp_flags::FIN);
        let pend = seq.wrapping_add(len);
        let end = pend.wrapping_add(u32::from(fin));
        if len == 0 && !fin {
            // Pure ACK (or window update): nothing to compare; the ACK rule gates its release.
            p.matched = true;
            *cursor += 1;
            continue;
        }
        let mut cs = match t.cmp_seq {
            Some(c) => c,
            None => {
                t.base = seq;
                seq
            }
        };
        if seq_le(end, cs) {
            stats.retransmissions += 1;
            p.matched = true;
            *cursor += 1;
            continue;
        }
        if seq_lt(cs, seq) {
            // Bytes before this segment were never seen from the PVM: wait (the stale timer decides).
            break;
        }
        // Payload from cs to pend.
        while seq_lt(cs, pend) {
            if t.s_fin_at == Some(cs) {
                // The SVM ended its stream here; the PVM has more data.
                out.mismatch = Some((u64::from(cs.wrapping_sub(t.base)), MismatchKind::Fin));
                t.cmp_seq = Some(cs);
                return;
            }
            let Some(s) = sq.front() else {
                t.cmp_seq = Some(cs);
                break 'frames;
            };
            let Meta::Tcp {
                seq: sseq,
                len: slen,
                flags: sflags,
                ..
            } = s.meta
            else {
                if let Some(h) = sq.pop_front() {
                    drop_s(h, stats, actions);
                }
                continue;
            };
            let sfin = sflags & tcp_flags::FIN != 0;
            let spend = sseq.wrapping_add(slen);
            let send = spend.wrapping_add(u32::from(sfin));
            if seq_le(send, cs) {
                stats.retransmissions += 1;
                if let Some(h) = sq.pop_front() {
                    drop_s(h, stats, actions);
                }
                continue;
            }
            if seq_lt(cs, sseq) {
                t.cmp_seq = Some(cs);
                break 'frames;
            }
            if spend == cs {
                // The SVM ends its stream (FIN) where the PVM has more data.
                out.mismatch = Some((u64::from(cs.wrapping_sub(t.base)), MismatchKind::Fin));
                t.cmp_seq = Some(cs);
                return;
            }
            let n = pend.wrapping_sub(cs).min(spend.wrapping_sub(cs)) as usize;
            let po = cs.wrapping_sub(seq) as usize;
            let so = cs.wrapping_sub(sseq) as usize;
            let pp = p.tcp_payload();
            let sp = s.tcp_payload();
            let (Some(a), Some(b)) = (pp.get(po..po + n), sp.get(so..so + n)) else {
                out.mismatch = Some((u64::from(cs.wrapping_sub(t.base)), MismatchKind::Payload));
                t.cmp_seq = Some(cs);
                return;
            };
            if let Some(i) = first_diff(a, b) {
                let off = u64::from(cs.wrapping_sub(t.base)) + i as u64;
                out.mismatch = Some((off, MismatchKind::Payload));
                t.cmp_seq = Some(cs);
                return;
            }
            stats.tcp_bytes_compared += n as u64;
            cs = cs.wrapping_add(n as u32);
            if cs == spend
                && let Some(h) = sq.pop_front()
            {
                if sfin {
                    t.s_fin_at = Some(cs);
                }
                drop_s(h, stats, actions);
            }
        }
        t.cmp_seq = Some(cs);
        if fin {
            // Drop what the SVM retransmitted, and take a FIN-only segment at cs.
            while let Some(s) = sq.front() {
                let Meta::Tcp {
                    seq: sseq,
                    len: slen,
                    flags: sflags,
                    ..
                } = s.meta
                else {
                    break;
                };
                let sfin = sflags & tcp_flags::FIN != 0;
                let spend = sseq.wrapping_add(slen);
                if seq_le(spend.wrapping_add(u32::from(sfin)), cs) {
                    stats.retransmissions += 1;
                } else if spend == cs && sfin {
                    t.s_fin_at = Some(cs);
                } else if seq_le(sseq, cs) {
                    out.mismatch = Some((u64::from(cs.wrapping_sub(t.base)), MismatchKind::Fin));
                    return;
                } else {
                    break;
                }
                if let Some(h) = sq.pop_front() {
                    drop_s(h, stats, actions);
                }
            }
            if t.s_fin_at != Some(cs) {
                break;
            }
            t.s_fin_at = None;
            t.closed = true;
            cs = cs.wrapping_add(1);
            t.cmp_seq = Some(cs);
        }
        p.matched = true;
        *cursor += 1;
    }
    // Secondary segments wholly below the compared position are retransmissions.
    if let Some(cs) = t.cmp_seq {
        while let Some(s) = sq.front() {
            let Meta::Tcp {
                seq: sseq,
                len: slen,
                flags: sflags,
                ..
            } = s.meta
            else {
                break;
            };
            let send = sseq
                .wrapping_add(slen)
                .wrapping_add(u32::from(sflags & tcp_flags::FIN != 0));
            if !seq_le(send, cs) || (slen == 0 && sflags & tcp_flags::FIN == 0) {
                break;
            }
            stats.retransmissions += 1;
            if let Some(h) = sq.pop_front() {
                drop_s(h, stats, actions);
            }
        }
    }
}

fn datagram_compare(
    pq: &mut VecDeque<Held>,
    sq: &mut VecDeque<Held>,
    cursor: &mut usize,
    window: usize,
    out: &mut Outcome,
    stats: &mut Stats,
    actions: &mut VecDeque<Action>,
) {
    let eq = |a: &Held, b: &Held| match (a.meta, b.meta) {
        (Meta::Datagram(la), Meta::Datagram(lb)) => masked_diff(&a.frame, &la, &b.frame, &lb),
        _ => Some(0),
    };
    loop {
        while pq.get(*cursor).is_some_and(|h| h.matched) {
            *cursor += 1;
        }
        let Some(p) = pq.get(*cursor) else { return };
        if sq.is_empty() {
            return;
        }
        // The primary head against the first secondary frames.
        if let Some(j) = sq.iter().take(window).position(|s| eq(p, s).is_none()) {
            if let Some(s) = sq.remove(j) {
                stats.datagrams_compared += 1;
                stats.secondary_dropped += 1;
                actions.push_back(Action::DropSecondary(s.frame));
            }
            if let Some(p) = pq.get_mut(*cursor) {
                p.matched = true;
            }
            continue;
        }
        // The secondary head against the next primary frames.
        let Some(s) = sq.front() else { return };
        let found = pq
            .iter()
            .skip(*cursor)
            .take(window)
            .position(|p| !p.matched && eq(p, s).is_none());
        if let Some(i) = found {
            if let Some(p) = pq.get_mut(*cursor + i) {
                p.matched = true;
            }
            if let Some(s) = sq.pop_front() {
                stats.datagrams_compared += 1;
                stats.secondary_dropped += 1;
                actions.push_back(Action::DropSecondary(s.frame));
            }
            continue;
        }
        // Nothing pairs. With a window of one that is a mismatch at once; with a larger window the partner
        // may still come, until either side has a window's worth of unpaired frames (or the stale timer).
        let unpaired_p = pq.iter().skip(*cursor).filter(|h| !h.matched).count();
        if window <= 1 || unpaired_p >= window || sq.len() >= window {
            let offset = eq(p, s).unwrap_or(0) as u64;
            out.mismatch = Some((offset, MismatchKind::Datagram));
        }
        return;
    }
}
