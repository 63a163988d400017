//! Offline comparison of two captures, as the `pcap_compare` example runs it.
//!
//! Each capture holds both directions at one guest's NIC: the client's (mirrored) input and that guest's
//! output. Frames whose source MAC is the guest's are output; everything else is input. The replay merges
//! both captures by timestamp and, like the VMM would:
//! - primary output goes to [`Comparator::handle_primary`]; when it is a SYN, the PVM's ISN is handed to
//!   the rewriter through the documented seam ([`Rewriter::set_primary_isn`]);
//! - secondary input goes through [`Rewriter::client_input`] (which learns the ISN offsets);
//! - secondary output goes through [`Rewriter::secondary_output`] and then to
//!   [`Comparator::handle_secondary`];
//! - the comparator's timer runs on capture time;
//! - a requested checkpoint is carried out at once ([`Comparator::checkpoint`]). The rewriter keeps its
//!   offsets: the captured SVM was not really reset, so its later output stays in its own sequence space.
//!
//! Primary input is not needed (the PVM receives it directly).

use bytes::Bytes;

use crate::comparator::{Action, CheckpointReason, Comparator, Config};
use crate::error::NetError;
use crate::flow::FlowKey;
use crate::packet::PacketView;
use crate::pcap::Record;
use crate::rewriter::{Rewriter, RewriterConfig};
use crate::time::Time;

/// One decision of the comparator, at capture time `t_ns` (nanoseconds since the first frame).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// A primary frame was released.
    Released {
        /// When.
        t_ns: u64,
        /// Its flow, if it parsed.
        flow: Option<FlowKey>,
        /// Its length.
        len: usize,
    },
    /// A secondary frame was dropped.
    Dropped {
        /// When.
        t_ns: u64,
        /// Its flow, if it parsed.
        flow: Option<FlowKey>,
        /// Its length.
        len: usize,
    },
    /// A checkpoint was requested (and carried out).
    Checkpoint {
        /// When.
        t_ns: u64,
        /// Why.
        reason: CheckpointReason,
    },
}

/// Totals of a replay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Primary output frames fed in.
    pub primary_frames: u64,
    /// Secondary output frames fed in.
    pub secondary_frames: u64,
    /// Primary frames released.
    pub released: u64,
    /// Secondary frames dropped.
    pub dropped: u64,
    /// Checkpoints requested.
    pub checkpoints: u64,
    /// Mismatches found.
    pub mismatches: u64,
    /// Frames still held when the captures ended (primary, secondary).
    pub held_at_end: (u64, u64),
    /// SVM output segments the rewriter translated.
    pub translated: u64,
}

/// How to replay.
#[derive(Clone, Debug, Default)]
pub struct ReplayConfig {
    /// Comparator settings (`vnet_hdr_len` applies to both captures).
    pub comparator: Config,
    /// The guests' MAC address; `None` infers it (see [`infer_guest_mac`]).
    pub guest_mac: Option<[u8; 6]>,
    /// After the last frame, run the timer once more `compare_timeout` later, so frames that never matched
    /// request a stale checkpoint.
    pub final_tick: bool,
}

fn src_mac(frame: &[u8], vnet: usize) -> Option<[u8; 6]> {
    frame.get(vnet + 6..vnet + 12)?.try_into().ok()
}

/// Infers the guests' MAC from two captures: the client's input appears byte for byte in both captures
/// (it is mirrored), the guests' output does not. The source MAC whose frames are least often found
/// identical in the other capture is the guest's.
pub fn infer_guest_mac(primary: &[Record], secondary: &[Record], vnet: usize) -> Option<[u8; 6]> {
    use std::collections::{HashMap, HashSet};
    let other: HashSet<&[u8]> = secondary.iter().map(|r| r.data.as_slice()).collect();
    let mut seen: HashMap<[u8; 6], (u64, u64)> = HashMap::new();
    for r in primary {
        if let Some(mac) = src_mac(&r.data, vnet) {
            let e = seen.entry(mac).or_default();
            e.0 += 1;
            e.1 += u64::from(other.contains(r.data.as_slice()));
        }
    }
    // Lowest share of identical frames; ties broken by more frames, then by address.
    seen.into_iter()
        .min_by(|(ma, (na, ia)), (mb, (nb, ib))| {
            (u128::from(*ia) * u128::from(*nb))
                .cmp(&(u128::from(*ib) * u128::from(*na)))
                .then(nb.cmp(na))
                .then(ma.cmp(mb))
        })
        .map(|(m, _)| m)
}

/// Replays two captures; returns every decision and the totals.
pub fn replay(
    primary: &[Record],
    secondary: &[Record],
    cfg: &ReplayConfig,
) -> Result<(Vec<Decision>, Summary), NetError> {
    let vnet = cfg.comparator.vnet_hdr_len;
    let guest = cfg
        .guest_mac
        .or_else(|| infer_guest_mac(primary, secondary, vnet))
        .ok_or(NetError::Pcap {
            what: "cannot tell the guest's MAC: no frames".into(),
            offset: 0,
        })?;
    let origin = primary
        .iter()
        .chain(secondary)
        .map(|r| r.time_ns)
        .min()
        .unwrap_or(0);
    let mut cmp = Comparator::new(cfg.comparator.clone(), Time::ZERO)?;
    let mut rw = Rewriter::new(RewriterConfig {
        vnet_hdr_len: vnet,
        ..RewriterConfig::default()
    })?;
    let mut decisions = Vec::new();
    let mut sum = Summary::default();

    // Merge by time; primary first on equal timestamps; file order otherwise.
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(primary.len() + secondary.len());
    events.extend(
        primary
            .iter()
            .enumerate()
            .map(|(i, r)| (r.time_ns.saturating_sub(origin), false, i)),
    );
    events.extend(
        secondary
            .iter()
            .enumerate()
            .map(|(i, r)| (r.time_ns.saturating_sub(origin), true, i)),
    );
    events.sort_by_key(|&(t, s, i)| (t, s, i));

    let flow_of = |b: &[u8]| PacketView::parse(b, vnet).ok().map(|v| FlowKey::of(&v));
    let mut last = Time::ZERO;
    let drain = |cmp: &mut Comparator, now: Time, decisions: &mut Vec<Decision>, sum: &mut Summary| {
        let t_ns = now.as_nanos();
        loop {
            let mut checkpoint = false;
            while let Some(a) = cmp.poll_action() {
                match a {
                    Action::Release(f) => {
                        sum.released += 1;
                        decisions.push(Decision::Released {
                            t_ns,
                            flow: flow_of(&f),
                            len: f.len(),
                        });
                    }
                    Action::DropSecondary(f) => {
                        sum.dropped += 1;
                        decisions.push(Decision::Dropped {
                            t_ns,
                            flow: flow_of(&f),
                            len: f.len(),
                        });
                    }
                    Action::RequestCheckpoint(reason) => {
                        sum.checkpoints += 1;
                        if matches!(reason, CheckpointReason::Mismatch { .. }) {
                            sum.mismatches += 1;
                        }
                        decisions.push(Decision::Checkpoint { t_ns, reason });
                        checkpoint = true;
                    }
                }
            }
            if !checkpoint {
                break;
            }
            cmp.checkpoint(now);
        }
    };
    for (t, is_secondary, i) in events {
        let now = Time::from_nanos(t);
        last = now;
        if now >= cmp.poll_timeout() {
            cmp.handle_tick(now);
            rw.expire(now);
            while rw.poll_input().is_some() {}
            drain(&mut cmp, now, &mut decisions, &mut sum);
        }
        let rec = if is_secondary { &secondary[i] } else { &primary[i] };
        let output = src_mac(&rec.data, vnet) == Some(guest);
        match (is_secondary, output) {
            (false, false) => continue,
            (false, true) => {
                sum.primary_frames += 1;
                let frame = Bytes::copy_from_slice(&rec.data);
                let syn = PacketView::parse(&frame, vnet).ok().and_then(|v| {
                    v.tcp()
                        .filter(|t| t.has(crate::packet::tcp_flags::SYN))
                        .map(|_| FlowKey::of(&v))
                });
                if let Err(back) = cmp.handle_primary(now, frame) {
                    // The refusal requested a checkpoint, which the drain carries out.
                    drain(&mut cmp, now, &mut decisions, &mut sum);
                    // After a checkpoint every queue is empty, so this cannot be refused again.
                    let _ = cmp.handle_primary(now, back.0);
                }
                if let Some(flow) = syn
                    && let Some(isn) = cmp.primary_isn(&flow)
                {
                    rw.set_primary_isn(now, flow, isn);
                }
            }
            (true, false) => {
                rw.client_input(now, bytes::BytesMut::from(&rec.data[..]));
                // What the SVM would receive is not needed here; the rewriter has learned from it.
                while rw.poll_input().is_some() {}
            }
            (true, true) => {
                sum.secondary_frames += 1;
                let mut data = rec.data.clone();
                rw.secondary_output(now, &mut data);
                while rw.poll_input().is_some() {}
                cmp.handle_secondary(now, Bytes::from(data));
            }
        }
        drain(&mut cmp, now, &mut decisions, &mut sum);
    }
    if cfg.final_tick {
        let now = last
            .saturating_add(cfg.comparator.compare_timeout)
            .saturating_add(cfg.comparator.scan_interval);
        cmp.handle_tick(now);
        drain(&mut cmp, now, &mut decisions, &mut sum);
    }
    let (p, s) = cmp.queued();
    sum.held_at_end = (p as u64, s as u64);
    sum.translated = rw.stats().output_translated;
    Ok((decisions, sum))
}
