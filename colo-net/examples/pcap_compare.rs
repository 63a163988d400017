//! Compares two captures the way the primary's comparator would see them.
//!
//! ```text
//! cargo run --release -p colo-net --example pcap_compare -- PRIMARY.pcap SECONDARY.pcap \
//!     [--guest-mac 02:00:00:00:00:02] [--vnet-hdr-len N] [--final-tick] [--quiet]
//! ```
//!
//! Each capture holds both directions at one guest's NIC: the client's mirrored input and that guest's
//! output. Prints one JSON object per decision (`released`, `dropped`, `checkpoint` with its reason) and a
//! final summary line. Exit status 0 whatever the outcome; 2 on bad usage or unreadable files.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};

use anyhow::{Context, bail};
use colo_net::comparator::{CheckpointReason, Config, MismatchKind, Side};
use colo_net::pcap;
use colo_net::replay::{Decision, ReplayConfig, replay};
use serde_json::{Value, json};

fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("a MAC has 6 bytes: {s}"))
}

fn reason_json(r: &CheckpointReason) -> Value {
    match r {
        CheckpointReason::Mismatch { flow, offset, kind } => json!({
            "reason": "mismatch", "flow": flow.to_string(), "offset": offset,
            "kind": match kind {
                MismatchKind::Payload => "payload",
                MismatchKind::Syn => "syn",
                MismatchKind::Fin => "fin",
                MismatchKind::Datagram => "datagram",
            }
        }),
        CheckpointReason::Stale { flow, age, side } => json!({
            "reason": "stale", "flow": flow.to_string(), "age_ms": age.as_secs_f64() * 1e3,
            "side": if *side == Side::Primary { "primary" } else { "secondary" }
        }),
        CheckpointReason::QueueFull { flow, side } => json!({
            "reason": "queue_full", "flow": flow.to_string(),
            "side": if *side == Side::Primary { "primary" } else { "secondary" }
        }),
        CheckpointReason::TableFull { evicted } => {
            json!({ "reason": "table_full", "evicted": evicted.map(|f| f.to_string()) })
        }
        CheckpointReason::Unsupported { what } => json!({ "reason": "unsupported", "what": what }),
    }
}

fn main() -> anyhow::Result<()> {
    let mut files = Vec::new();
    let mut cfg = ReplayConfig {
        comparator: Config::default(),
        ..ReplayConfig::default()
    };
    let mut quiet = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--guest-mac" => {
                cfg.guest_mac = Some(parse_mac(&args.next().context("--guest-mac needs a value")?)?)
            }
            "--vnet-hdr-len" => {
                cfg.comparator.vnet_hdr_len = args.next().context("--vnet-hdr-len needs a value")?.parse()?
            }
            "--final-tick" => cfg.final_tick = true,
            "--quiet" => quiet = true,
            "-h" | "--help" => {
                println!(
                    "usage: pcap_compare PRIMARY.pcap SECONDARY.pcap [--guest-mac MAC] [--vnet-hdr-len N] [--final-tick] [--quiet]"
                );
                return Ok(());
            }
            _ if a.starts_with("--") => bail!("unknown option {a}"),
            _ => files.push(a),
        }
    }
    let [p, s] = files.as_slice() else {
        eprintln!("usage: pcap_compare PRIMARY.pcap SECONDARY.pcap [options]");
        std::process::exit(2);
    };
    let read = |path: &str| -> anyhow::Result<pcap::Capture> {
        let f = File::open(path).with_context(|| format!("opening {path}"))?;
        let cap = pcap::read(BufReader::new(f), 50_000_000).with_context(|| format!("reading {path}"))?;
        if cap.link_type != pcap::LINKTYPE_ETHERNET {
            bail!("{path}: link type {} is not Ethernet", cap.link_type);
        }
        Ok(cap)
    };
    let (pc, sc) = (read(p)?, read(s)?);
    let (decisions, sum) = replay(&pc.records, &sc.records, &cfg)?;
    let out = std::io::stdout();
    let mut out = BufWriter::new(out.lock());
    for d in &decisions {
        let v = match d {
            Decision::Released { t_ns, flow, len } => {
                if quiet {
                    continue;
                }
                json!({"t_ns": t_ns, "decision": "released", "flow": flow.map(|f| f.to_string()), "len": len})
            }
            Decision::Dropped { t_ns, flow, len } => {
                if quiet {
                    continue;
                }
                json!({"t_ns": t_ns, "decision": "dropped", "flow": flow.map(|f| f.to_string()), "len": len})
            }
            Decision::Checkpoint { t_ns, reason } => {
                let mut v = reason_json(reason);
                v["t_ns"] = json!(t_ns);
                v["decision"] = json!("checkpoint");
                v
            }
        };
        writeln!(out, "{v}")?;
    }
    writeln!(
        out,
        "{}",
        json!({
            "summary": true,
            "primary_frames": sum.primary_frames,
            "secondary_frames": sum.secondary_frames,
            "released": sum.released,
            "dropped": sum.dropped,
            "checkpoints": sum.checkpoints,
            "mismatches": sum.mismatches,
            "held_at_end": {"primary": sum.held_at_end.0, "secondary": sum.held_at_end.1},
            "translated": sum.translated,
        })
    )?;
    Ok(())
}
