//! The secondary side's TCP sequence rewriter.
//!
//! Both VMs open the same TCP connections, but each guest picks its own initial sequence number (ISN). The
//! client only ever talks to the PVM, so every number the client sends about the guest's byte stream (its
//! acknowledgment number and SACK blocks) is in the PVM's sequence space, and every number the comparator
//! and (after failover) the client expect from the guest is too. The rewriter sits between the SVM's NIC and
//! everything else and keeps a per-connection offset `svm_isn - pvm_isn`:
//!
//! - [`Rewriter::client_input`] (client -> SVM, the mirrored input): `ack += offset` and every SACK block
//!   edge `+= offset`, so the SVM sees acknowledgments of its own bytes. The translated frames come out of
//!   [`Rewriter::poll_input`], in order per connection.
//! - [`Rewriter::secondary_output`] (SVM -> comparator, or -> client after failover): `seq -= offset`
//!   (and TSval, see below).
//!   The SVM's acknowledgment numbers and SACK blocks describe the client's stream, which both VMs receive
//!   unchanged, so they stay as they are.
//!
//! The TCP checksum is updated incrementally (RFC 1624). When the frame carries a virtio-net header with
//! `NEEDS_CSUM`, the checksum field holds only the pseudo-header sum, which does not cover sequence numbers,
//! so it is left alone.
//!
//! # Learning the offset
//!
//! The offset is known once the rewriter has seen the SVM's SYN (or SYN-ACK), which gives `svm_isn`, and the
//! PVM's ISN. The PVM's ISN is learned from the first client segment with ACK after the SVM's SYN: that
//! segment acknowledges the PVM's SYN, so `pvm_isn = ack - 1`. This covers both directions of opening:
//! - *client-opened*: SVM's SYN-ACK gives `svm_isn`; the client's handshake ACK gives `pvm_isn`.
//! - *guest-opened*: SVM's SYN gives `svm_isn`; the client's SYN-ACK (answering the PVM) gives `pvm_isn`,
//!   and is itself rewritten so the SVM accepts it (QEMU leaves such connections untranslated).
//!
//! The seam for when the client's reply reaches the secondary *before* the SVM emitted its SYN (a lagging
//! SVM): the primary's [`Comparator::primary_isn`](crate::Comparator::primary_isn) reports the PVM's ISN as
//! soon as the PVM's SYN passes, and the VMM forwards it with [`Rewriter::set_primary_isn`]. A connection
//! whose offset is never learned is passed through untranslated; the comparator then sees a sequence
//! mismatch and requests a checkpoint, after which both VMs share the PVM's ISN.
//!
//! # When the SVM lags the PVM
//!
//! The mirrored input reaches the SVM whatever its progress, so two races are handled here rather than
//! left to end in a reset connection and a checkpoint:
//! - *Input overtakes the SVM's SYN-ACK.* After a client's SYN the rewriter holds that connection's further
//!   client segments (bounded per connection and in total, at most `hold_timeout`) until the SVM's SYN-ACK
//!   has been seen, then translates and hands them out in order ([`Rewriter::poll_input`]). With the
//!   [`set_primary_isn`](Rewriter::set_primary_isn) seam the same holds for a guest-opened connection whose
//!   client SYN-ACK arrives before the SVM's SYN.
//! - *The client acknowledges bytes the SVM has not sent yet* (the PVM was faster). Linux drops such an
//!   ACK ("ack of unsent data"), and a SVM that missed the client's last ACKs stalls until a checkpoint.
//!   The rewriter therefore caps a translated acknowledgment at what the SVM has sent so far, remembers
//!   the client's real one, and when the SVM later sends those bytes it hands the SVM a pure ACK built
//!   from the client's latest headers (window, timestamps) acknowledging them. This acknowledges to the
//!   SVM only bytes the client really acknowledged to the PVM; whether they are the same bytes is exactly
//!   what the comparator checks.
//!
//! # Timestamps
//!
//! TCP timestamps are translated like sequence numbers. The client's TSval reaches both guests unchanged,
//! but its TSecr echoes the PVM's clock; a Linux SVM refuses a handshake ACK echoing a time it has not sent
//! (counted as `TSEcrRejected`), which a real-stack test here hit on one connection in twenty. The offset
//! `svm_tsval - pvm_tsval` is learned from the same client segment as the sequence offset (its TSecr echoes
//! the PVM's SYN timestamp; the SVM's SYN carried its own). Client -> SVM: TSecr `+= offset`, capped at the
//! SVM's latest TSval (an echo of 0 stays 0). SVM -> out: TSval `-= offset`, so after failover the client's
//! PAWS check sees one continuous clock. The comparator never compares timestamps.
//!
//! # Checkpoints and failover
//!
//! After a checkpoint the SVM is a copy of the PVM, so every connection's offset is zero:
//! [`Rewriter::checkpoint`] forgets all connections. After failover ([`Rewriter::failover`]) the promoted
//! SVM keeps translating the connections it has offsets for, for as long as they live, and does not track
//! connections opened after failover (they have no PVM counterpart).

use std::collections::VecDeque;
use std::time::Duration;

use bytes::BytesMut;

use crate::error::NetError;
use crate::flow::{FlowKey, FxHashMap};
use crate::packet::{PacketView, tcp_flags};
use crate::tcp::{csum_replace32, opt, options, seq_lt, seq_max};
use crate::time::Time;

/// Tunables of the [`Rewriter`].
#[derive(Clone, Debug)]
pub struct RewriterConfig {
    /// Length of the virtio-net header in front of every frame.
    pub vnet_hdr_len: usize,
    /// Most connections tracked; the oldest closed (else oldest) one is forgotten to admit a new one.
    pub max_connections: usize,
    /// A connection closed by FIN in both directions or by RST is forgotten this long after.
    pub closed_linger: Duration,
    /// Most client frames held per connection while waiting for the SVM's SYN.
    pub max_held_per_conn: usize,
    /// Most client frames held over all connections.
    pub max_held_total: usize,
    /// A held client frame is passed on untranslated after this long.
    pub hold_timeout: Duration,
}

impl Default for RewriterConfig {
    fn default() -> Self {
        RewriterConfig {
            vnet_hdr_len: 0,
            max_connections: 65536,
            closed_linger: Duration::from_secs(60),
            max_held_per_conn: 32,
            max_held_total: 4096,
            hold_timeout: Duration::from_millis(500),
        }
    }
}

/// What the rewriter did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rewrite {
    /// Sequence numbers were translated.
    Translated,
    /// A tracked TCP connection whose offset is zero or not yet known: nothing changed.
    Unchanged,
    /// Not a TCP segment of a tracked connection: nothing changed.
    Untracked,
    /// The frame could not be parsed: nothing changed (it is the caller's to drop or forward).
    Malformed,
    /// The frame waits for the SVM's SYN of its connection; [`Rewriter::poll_input`] hands it out later.
    Held,
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RewriterStats {
    /// SVM output segments translated.
    pub output_translated: u64,
    /// Client input segments translated.
    pub input_translated: u64,
    /// Offsets learned.
    pub offsets_learned: u64,
    /// Connections forgotten to make room.
    pub evictions: u64,
    /// Frames that could not be parsed.
    pub malformed: u64,
    /// Acknowledgments built for the SVM from the client's, for bytes the client acknowledged to the PVM
    /// before the SVM had sent them.
    pub synthetic_acks: u64,
    /// Client frames held until the SVM's SYN was seen.
    pub held: u64,
    /// Held client frames passed on before what they waited for happened (hold timeout, bound, the SVM
    /// reset, a checkpoint).
    pub held_released_early: u64,
    /// Connections tracked now (gauge).
    pub connections: u64,
}

/// Operating mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Normal COLO operation: the SVM's output goes to the comparator.
    Colo,
    /// The SVM has been promoted: its output goes to the client.
    Failover,
}

#[derive(Clone, Copy, Debug)]
struct Conn {
    s_isn: Option<u32>,
    p_isn: Option<u32>,
    /// `s_isn - p_isn`, once both are known.
    offset: Option<u32>,
    fin_out: bool,
    fin_in: bool,
    closed_at: Option<Time>,
    last: Time,
    /// The client opened the connection and the SVM has not answered yet: hold the client's ACKs.
    await_svm: bool,
    /// Next sequence number the SVM will send (its own space), from its output.
    s_nxt: Option<u32>,
    /// Highest acknowledgment the client sent, in the SVM's space.
    client_ack: Option<u32>,
    /// Highest acknowledgment delivered to the SVM.
    svm_acked: Option<u32>,
    /// TSval of the SVM's SYN (or SYN-ACK).
    s_syn_tsval: Option<u32>,
    /// Highest TSval the SVM has sent.
    s_tsval_max: Option<u32>,
    /// `svm_tsval - pvm_tsval`, learned with the sequence offset.
    ts_off: Option<u32>,
}

/// The headers of the latest client segment of a connection, to build acknowledgments from.
#[derive(Debug, Default)]
struct Template {
    bytes: Vec<u8>,
    /// The client's next sequence number after that segment.
    next_seq: u32,
}

/// Rewrites the SVM's TCP sequence numbers. See the [module docs](self).
#[derive(Debug)]
pub struct Rewriter {
    cfg: RewriterConfig,
    mode: Mode,
    /// Keyed by the guest -> client direction.
    conns: FxHashMap<FlowKey, Conn>,
    /// Client frames waiting for the SVM's SYN, per connection (guest -> client key), oldest first.
    held: FxHashMap<FlowKey, VecDeque<(Time, BytesMut)>>,
    held_total: usize,
    /// Client frames ready for the SVM, in order.
    ready: VecDeque<BytesMut>,
    /// Latest client headers per connection (guest -> client key).
    templates: FxHashMap<FlowKey, Template>,
    stats: RewriterStats,
}

struct Seg {
    key: FlowKey,
    seq: u32,
    /// Sequence space the segment occupies (payload, SYN, FIN).
    len: u32,
    /// Offset of the timestamp option's TSval (TSecr follows at +4), if present.
    ts: Option<usize>,
    ack: u32,
    flags: u8,
    header: usize,
    header_len: usize,
    csum_partial: bool,
}

fn segment(buf: &[u8], vnet: usize) -> Result<Option<Seg>, NetError> {
    let v = PacketView::parse(buf, vnet)?;
    let Some(t) = v.tcp() else { return Ok(None) };
    Ok(Some(Seg {
        key: FlowKey::of(&v),
        seq: t.seq,
        len: t.seq_len(),
        ts: crate::tcp::options(v.tcp_options())
            .find(|&(kind, _, len)| kind == opt::TIMESTAMP && len == 10)
            .map(|(_, at, _)| t.header + 20 + at + 2),
        ack: t.ack,
        flags: t.flags,
        header: t.header,
        header_len: t.header_len,
        csum_partial: v.csum_partial(),
    }))
}

fn get_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

/// A client segment must wait while the client opened the connection and the SVM has not answered yet.
fn must_wait(c: &Conn) -> bool {
    c.await_svm && c.s_isn.is_none()
}

/// Replaces the 32-bit field at `at` with `f(old)` and fixes the checksum at `csum_at` unless partial.
fn patch_u32(buf: &mut [u8], at: usize, csum_at: usize, partial: bool, f: impl Fn(u32) -> u32) {
    let Some(old) = get_u32(buf, at) else { return };
    let new = f(old);
    if let Some(field) = buf.get_mut(at..at + 4) {
        field.copy_from_slice(&new.to_be_bytes());
    }
    if partial {
        return;
    }
    if let Some(c) = buf.get_mut(csum_at..csum_at + 2) {
        let csum = u16::from_be_bytes([c[0], c[1]]);
        c.copy_from_slice(&csum_replace32(csum, old, new).to_be_bytes());
    }
}

impl Rewriter {
    /// A rewriter in COLO mode.
    pub fn new(cfg: RewriterConfig) -> Result<Self, NetError> {
        if cfg.vnet_hdr_len > 64 {
            return Err(NetError::Config {
                field: "vnet_hdr_len",
                value: cfg.vnet_hdr_len as u64,
                why: "0..=64",
            });
        }
        if !(1..=1 << 24).contains(&cfg.max_connections) {
            return Err(NetError::Config {
                field: "max_connections",
                value: cfg.max_connections as u64,
                why: "1..=16M",
            });
        }
        Ok(Rewriter {
            cfg,
            mode: Mode::Colo,
            conns: FxHashMap::default(),
            held: FxHashMap::default(),
            held_total: 0,
            ready: VecDeque::new(),
            templates: FxHashMap::default(),
            stats: RewriterStats::default(),
        })
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Counters.
    pub fn stats(&self) -> RewriterStats {
        RewriterStats {
            connections: self.conns.len() as u64,
            ..self.stats
        }
    }

    /// The learned offset (`svm_isn - pvm_isn`) of the connection whose guest -> client direction is `flow`.
    pub fn offset(&self, flow: &FlowKey) -> Option<u32> {
        self.conns.get(flow)?.offset
    }

    /// A checkpoint was loaded: the SVM is the PVM again, every offset is zero. Held client frames are
    /// handed out unchanged (the SVM now has the PVM's sequence numbers).
    pub fn checkpoint(&mut self) {
        self.conns.clear();
        self.templates.clear();
        let keys: Vec<FlowKey> = self.held.keys().copied().collect();
        for k in keys {
            self.release_held(&k);
        }
    }

    /// The next client frame to deliver to the SVM, in order.
    pub fn poll_input(&mut self) -> Option<BytesMut> {
        self.ready.pop_front()
    }

    /// Hands out every held frame of `key`, translated as far as the offset is known.
    fn release_held(&mut self, key: &FlowKey) {
        let Some(q) = self.held.remove(key) else { return };
        self.held_total = self.held_total.saturating_sub(q.len());
        for (at, mut f) in q {
            self.stats.held_released_early += 1;
            self.translate_input(at, &mut f);
            self.ready.push_back(f);
        }
    }

    /// Hands out the held frames of `key` that need not wait any more, in order.
    fn pump_held(&mut self, key: &FlowKey) {
        loop {
            let Some(q) = self.held.get_mut(key) else { return };
            let Some(&(at, _)) = q.front() else {
                self.held.remove(key);
                return;
            };
            if self.conns.get(key).is_some_and(must_wait) {
                return;
            }
            let Some((_, mut f)) = q.pop_front() else { return };
            self.held_total = self.held_total.saturating_sub(1);
            self.translate_input(at, &mut f);
            self.ready.push_back(f);
        }
    }

    /// The SVM has been promoted: keep translating known connections, track no new ones.
    pub fn failover(&mut self) {
        self.mode = Mode::Failover;
    }

    /// Tells the rewriter the PVM's ISN of the connection whose guest -> client direction is `flow` (the
    /// seam for [`Comparator::primary_isn`](crate::Comparator::primary_isn)).
    pub fn set_primary_isn(&mut self, now: Time, flow: FlowKey, isn: u32) {
        if self.mode == Mode::Failover && !self.conns.contains_key(&flow) {
            return;
        }
        let Some(c) = self.entry(now, flow) else { return };
        c.p_isn = Some(isn);
        if c.s_isn.is_none() {
            // The SVM's SYN is still to come: hold the client's answer until it does.
            c.await_svm = true;
        }
        if let (Some(s), None) = (c.s_isn, c.offset) {
            c.offset = Some(s.wrapping_sub(isn));
            self.stats.offsets_learned += 1;
        }
    }

    fn entry(&mut self, now: Time, key: FlowKey) -> Option<&mut Conn> {
        if !self.conns.contains_key(&key) && self.conns.len() >= self.cfg.max_connections {
            let victim = self
                .conns
                .iter()
                .min_by_key(|(_, c)| (c.closed_at.is_none(), c.last))
                .map(|(k, _)| *k);
            if let Some(v) = victim {
                self.conns.remove(&v);
                self.stats.evictions += 1;
            }
        }
        let c = self.conns.entry(key).or_insert(Conn {
            s_isn: None,
            p_isn: None,
            offset: None,
            fin_out: false,
            fin_in: false,
            closed_at: None,
            last: now,
            await_svm: false,
            s_nxt: None,
            client_ack: None,
            svm_acked: None,
            s_syn_tsval: None,
            s_tsval_max: None,
            ts_off: None,
        });
        c.last = now;
        Some(c)
    }

    /// Forgets connections closed longer than `closed_linger` ago and passes on client frames held longer
    /// than `hold_timeout`, untranslated. Call now and then (e.g. every 100 ms).
    pub fn expire(&mut self, now: Time) {
        let linger = self.cfg.closed_linger;
        self.conns
            .retain(|_, c| c.closed_at.is_none_or(|t| now.since(t) < linger));
        let conns = &self.conns;
        self.templates.retain(|k, _| conns.contains_key(k));
        let timeout = self.cfg.hold_timeout;
        let late: Vec<FlowKey> = self
            .held
            .iter()
            .filter(|(_, q)| q.front().is_some_and(|(at, _)| now.since(*at) >= timeout))
            .map(|(k, _)| *k)
            .collect();
        for k in late {
            if let Some(c) = self.conns.get_mut(&k) {
                c.await_svm = false;
            }
            self.release_held(&k);
        }
    }

    /// A frame the SVM sent, translated in place into the PVM's sequence space.
    pub fn secondary_output(&mut self, now: Time, frame: &mut [u8]) -> Rewrite {
        let seg = match segment(frame, self.cfg.vnet_hdr_len) {
            Ok(Some(s)) => s,
            Ok(None) => return Rewrite::Untracked,
            Err(_) => {
                self.stats.malformed += 1;
                return Rewrite::Malformed;
            }
        };
        let has = |f: u8| seg.flags & f != 0;
        if has(tcp_flags::SYN) {
            // A new connection (or a retransmitted SYN): learn the SVM's ISN.
            if self.mode == Mode::Failover && !self.conns.contains_key(&seg.key) {
                return Rewrite::Untracked;
            }
            let Some(c) = self.entry(now, seg.key) else {
                return Rewrite::Untracked;
            };
            if c.s_isn != Some(seg.seq) {
                // A PVM ISN told before this SYN belongs to it; one from an earlier connection does not.
                let p_isn = if c.s_isn.is_some() { None } else { c.p_isn };
                let await_svm = c.await_svm;
                *c = Conn {
                    s_isn: Some(seg.seq),
                    p_isn,
                    offset: None,
                    closed_at: None,
                    fin_in: false,
                    fin_out: false,
                    last: now,
                    await_svm,
                    s_nxt: None,
                    client_ack: None,
                    svm_acked: None,
                    s_syn_tsval: seg.ts.and_then(|at| get_u32(frame, at)),
                    s_tsval_max: None,
                    ts_off: None,
                };
                if let Some(p) = c.p_isn {
                    c.offset = Some(seg.seq.wrapping_sub(p));
                    self.stats.offsets_learned += 1;
                }
            }
        }
        let Some(c) = self.conns.get_mut(&seg.key) else {
            return Rewrite::Untracked;
        };
        c.last = now;
        let end = seg.seq.wrapping_add(seg.len);
        c.s_nxt = Some(c.s_nxt.map_or(end, |n| seq_max(n, end)));
        if let Some(v) = seg.ts.and_then(|at| get_u32(frame, at)) {
            c.s_tsval_max = Some(c.s_tsval_max.map_or(v, |m| seq_max(m, v)));
        }
        if c.await_svm && (has(tcp_flags::SYN) || has(tcp_flags::RST)) {
            // The SVM answered (or refused): the client frames that waited for it can go.
            c.await_svm = false;
        }
        if has(tcp_flags::RST) {
            self.release_held(&seg.key);
        } else if self.held.contains_key(&seg.key) {
            self.pump_held(&seg.key);
        }
        // The client has acknowledged bytes (of the PVM) that the SVM only now sent: tell the SVM.
        if let Some(c) = self.conns.get(&seg.key)
            && let (Some(want), Some(given), Some(nxt)) = (c.client_ack, c.svm_acked, c.s_nxt)
            && seq_lt(given, want)
            && seq_lt(given, nxt)
            && !has(tcp_flags::RST)
        {
            let ack = if seq_lt(nxt, want) { nxt } else { want };
            if let Some(f) = self.synthetic_ack(&seg.key, ack) {
                self.ready.push_back(f);
                self.stats.synthetic_acks += 1;
                if let Some(c) = self.conns.get_mut(&seg.key) {
                    c.svm_acked = Some(ack);
                }
            }
        }
        let Some(c) = self.conns.get_mut(&seg.key) else {
            return Rewrite::Untracked;
        };
        if has(tcp_flags::FIN) {
            c.fin_out = true;
        }
        if has(tcp_flags::RST) || (c.fin_out && c.fin_in) {
            c.closed_at.get_or_insert(now);
        }
        let (off, ts_off) = (c.offset.unwrap_or(0), c.ts_off.unwrap_or(0));
        if off == 0 && ts_off == 0 {
            return Rewrite::Unchanged;
        }
        if off != 0 {
            patch_u32(frame, seg.header + 4, seg.header + 16, seg.csum_partial, |s| {
                s.wrapping_sub(off)
            });
        }
        if let (Some(at), true) = (seg.ts, ts_off != 0) {
            // TSval into the PVM's timeline, so the client's PAWS sees one clock after failover.
            patch_u32(frame, at, seg.header + 16, seg.csum_partial, |v| {
                v.wrapping_sub(ts_off)
            });
        }
        self.stats.output_translated += 1;
        Rewrite::Translated
    }

    /// A frame from the client on its way to the SVM. It is translated into the SVM's sequence space and
    /// queued for [`poll_input`](Self::poll_input), or held there until the SVM's SYN of its connection
    /// has been seen (when the mirrored input overtakes the SVM's answer, as it does when the client's
    /// handshake ACK follows its SYN closely). Frames of one connection keep their order.
    pub fn client_input(&mut self, now: Time, mut frame: BytesMut) -> Rewrite {
        let seg = match segment(&frame, self.cfg.vnet_hdr_len) {
            Ok(Some(s)) => s,
            Ok(None) => {
                self.ready.push_back(frame);
                return Rewrite::Untracked;
            }
            Err(_) => {
                self.stats.malformed += 1;
                self.ready.push_back(frame);
                return Rewrite::Malformed;
            }
        };
        let key = seg.key.reversed();
        let syn_only = seg.flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
        if syn_only && self.mode == Mode::Colo {
            // A client opens a connection: hold its ACKs until the SVM's SYN-ACK is seen.
            if let Some(c) = self.entry(now, key)
                && (c.s_isn.is_none() || c.closed_at.is_some())
            {
                *c = Conn {
                    s_isn: None,
                    p_isn: None,
                    offset: None,
                    closed_at: None,
                    fin_in: false,
                    fin_out: false,
                    last: now,
                    await_svm: true,
                    s_nxt: None,
                    client_ack: None,
                    svm_acked: None,
                    s_syn_tsval: None,
                    s_tsval_max: None,
                    ts_off: None,
                };
            }
        }
        let waiting = self.conns.get(&key).is_some_and(must_wait);
        if (waiting && !syn_only) || self.held.contains_key(&key) {
            let q = self.held.entry(key).or_default();
            if q.len() < self.cfg.max_held_per_conn && self.held_total < self.cfg.max_held_total {
                q.push_back((now, frame));
                self.held_total += 1;
                self.stats.held += 1;
                return Rewrite::Held;
            }
            // Over the bound: give up waiting for this connection.
            if let Some(c) = self.conns.get_mut(&key) {
                c.await_svm = false;
            }
            self.release_held(&key);
            self.stats.held_released_early += 1;
            let r = self.translate_input(now, &mut frame);
            self.ready.push_back(frame);
            return r;
        }
        let r = self.translate_input(now, &mut frame);
        self.ready.push_back(frame);
        r
    }

    /// Translates a client frame in place.
    fn translate_input(&mut self, now: Time, frame: &mut [u8]) -> Rewrite {
        let seg = match segment(frame, self.cfg.vnet_hdr_len) {
            Ok(Some(s)) => s,
            Ok(None) => return Rewrite::Untracked,
            Err(_) => {
                self.stats.malformed += 1;
                return Rewrite::Malformed;
            }
        };
        let key = seg.key.reversed();
        let Some(c) = self.conns.get_mut(&key) else {
            return Rewrite::Untracked;
        };
        c.last = now;
        let has = |f: u8| seg.flags & f != 0;
        if has(tcp_flags::ACK)
            && c.offset.is_none()
            && let Some(s) = c.s_isn
        {
            // The first acknowledgment after the SVM's SYN acknowledges the PVM's SYN.
            let p = seg.ack.wrapping_sub(1);
            c.p_isn = Some(p);
            c.offset = Some(s.wrapping_sub(p));
            self.stats.offsets_learned += 1;
        }
        if has(tcp_flags::ACK)
            && c.ts_off.is_none()
            && let (Some(s_ts), Some(tsecr)) = (c.s_syn_tsval, seg.ts.and_then(|at| get_u32(frame, at + 4)))
        {
            // Its TSecr echoes the PVM's SYN timestamp, as the SVM's SYN carried its own.
            c.ts_off = Some(s_ts.wrapping_sub(tsecr));
        }
        if has(tcp_flags::FIN) {
            c.fin_in = true;
        }
        if has(tcp_flags::RST) || (c.fin_out && c.fin_in) {
            c.closed_at.get_or_insert(now);
        }
        let Some(off) = c.offset else {
            return Rewrite::Unchanged;
        };
        if !has(tcp_flags::ACK) {
            return Rewrite::Unchanged;
        }
        // An acknowledgment of SVM bytes the SVM has not sent yet (it lags the PVM) would be dropped by the
        // SVM as "ack of unsent data"; acknowledge what it has sent, and the rest when it sends it
        // (see `secondary_output`).
        let want = seg.ack.wrapping_add(off);
        let give = match c.s_nxt {
            Some(n) if seq_lt(n, want) => n,
            _ => want,
        };
        c.client_ack = Some(c.client_ack.map_or(want, |a| seq_max(a, want)));
        c.svm_acked = Some(c.svm_acked.map_or(give, |a| seq_max(a, give)));
        let (h, partial) = (seg.header, seg.csum_partial);
        // TSecr echoes the PVM's clock; the SVM (Linux counts it as TSEcrRejected) refuses an echo of a
        // time it has not sent yet. Move it to the SVM's clock, capped at the SVM's latest TSval.
        let (ts_off, s_tsval_max) = (c.ts_off, c.s_tsval_max);
        if let (Some(at), Some(ts_off)) = (seg.ts, ts_off) {
            patch_u32(frame, at + 4, h + 16, partial, |e| {
                let v = e.wrapping_add(ts_off);
                match s_tsval_max {
                    Some(m) if e != 0 && seq_lt(m, v) => m,
                    _ if e == 0 => 0,
                    _ => v,
                }
            });
        }
        if give == seg.ack && off == 0 {
            self.keep_template(key, frame, &seg);
            return Rewrite::Unchanged;
        }
        patch_u32(frame, h + 8, h + 16, partial, |_| give);
        // SACK blocks acknowledge the guest's bytes too.
        let opts_end = (h + seg.header_len).min(frame.len());
        let mut blocks = [0usize; 8];
        let mut n = 0;
        if let Some(opts) = frame.get(h + 20..opts_end) {
            for (kind, at, len) in options(opts) {
                if kind == opt::SACK {
                    let mut e = at + 2;
                    while e + 4 <= at + len && n < blocks.len() {
                        blocks[n] = h + 20 + e;
                        n += 1;
                        e += 4;
                    }
                }
            }
        }
        for &at in &blocks[..n] {
            patch_u32(frame, at, h + 16, partial, |x| x.wrapping_add(off));
        }
        self.keep_template(key, frame, &seg);
        self.stats.input_translated += 1;
        Rewrite::Translated
    }

    /// Remembers the headers of the client's latest segment (without payload).
    fn keep_template(&mut self, key: FlowKey, frame: &[u8], seg: &Seg) {
        let end = (seg.header + seg.header_len).min(frame.len());
        let t = self.templates.entry(key).or_default();
        t.bytes.clear();
        t.bytes.extend_from_slice(&frame[..end]);
        t.next_seq = seg.seq.wrapping_add(seg.len);
    }

    /// Builds a pure ACK from the client's latest headers, acknowledging `ack` (SVM space).
    fn synthetic_ack(&self, key: &FlowKey, ack: u32) -> Option<BytesMut> {
        let t = self.templates.get(key)?;
        let vnet = self.cfg.vnet_hdr_len;
        let mut f = BytesMut::from(&t.bytes[..]);
        let (l3, h, v6) = {
            let v = PacketView::parse(&f, vnet).ok()?;
            (v.l3, v.tcp()?.header, v.version == crate::packet::IpVersion::V6)
        };
        let ip_len = u16::try_from(f.len() - l3).ok()?;
        if v6 {
            f[l3 + 4..l3 + 6].copy_from_slice(&(ip_len.checked_sub(40)?).to_be_bytes());
        } else {
            f[l3 + 2..l3 + 4].copy_from_slice(&ip_len.to_be_bytes());
        }
        f[h + 4..h + 8].copy_from_slice(&t.next_seq.to_be_bytes());
        f[h + 8..h + 12].copy_from_slice(&ack.to_be_bytes());
        f[h + 13] = tcp_flags::ACK;
        f[..vnet].fill(0);
        crate::tcp::fill_checksums(&mut f, vnet).then_some(f)
    }
}
