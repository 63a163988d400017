//! Page throughput of the framed transport against plain `write_all` on the same kind of loopback TCP pair.
//!
//! Streams `--gib` GiB (default 2) of 4 KiB pages in batches through `Channel::send_pages` (CRC32 of every
//! body, vectored writes, zero-copy decode), then the same number of bytes with plain `write_all` of the same
//! chunk size, alternating for `--rounds` rounds (default 5). Prints the median of each and their ratio;
//! `--json` prints one JSON object.
//!
//! `cargo run --release -p colo-proto --example wire_throughput -- --json`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Instant;

use colo_proto::{Channel, Message, PagePhase};

const PAGE: usize = 4096;
/// Source memory the sender cycles through: larger than the last-level cache, like guest RAM.
const SOURCE: usize = 64 << 20;

struct Args {
    json: bool,
    gib: f64,
    rounds: usize,
    batch_pages: usize,
    /// Hand the sender one entry per page instead of contiguous runs.
    scattered: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        json: false,
        scattered: false,
        gib: 2.0,
        rounds: 5,
        batch_pages: colo_proto::transport::DEFAULT_BATCH_PAGES,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--json" => a.json = true,
            "--scattered" => a.scattered = true,
            "--gib" => a.gib = val("--gib")?.parse().map_err(|e| format!("--gib: {e}"))?,
            "--rounds" => a.rounds = val("--rounds")?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--batch-pages" => {
                a.batch_pages = val("--batch-pages")?
                    .parse()
                    .map_err(|e| format!("--batch-pages: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let a = TcpStream::connect(l.local_addr()?)?;
    let (b, _) = l.accept()?;
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    Ok((a, b))
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// CPU time (user + system) of the whole process so far, in seconds.
fn cpu_seconds() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a complete rusage into the pointer we pass; RUSAGE_SELF is always valid.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } == 0;
    if !ok {
        return f64::NAN;
    }
    // SAFETY: getrusage succeeded and initialised the struct (it was zeroed before in any case).
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Runs `f` and returns (GB/s of wall time, CPU nanoseconds per byte of both threads).
fn measure(total: usize, f: impl FnOnce() -> Res<f64>) -> Res<(f64, f64)> {
    let c0 = cpu_seconds();
    let rate = f()?;
    let cpu = cpu_seconds() - c0;
    Ok((rate / 1e9, cpu * 1e9 / total as f64))
}

/// Returns bytes of page data moved per second.
fn framed(source: &[u8], total: usize, batch_pages: usize, scattered: bool) -> Res<f64> {
    let (a, b) = pair()?;
    let start = Instant::now();
    let rx = thread::Builder::new()
        .name("rx".into())
        .spawn(move || -> Res<usize> {
            let mut ch = Channel::from_tcp(b)?;
            let mut got = 0usize;
            loop {
                match ch.recv()? {
                    Message::RamPages(batch) => {
                        got += batch.pages.iter().map(|p| p.data.len()).sum::<usize>()
                    }
                    Message::EndOfRam { .. } => return Ok(got),
                    other => return Err(format!("unexpected {:?}", other.kind()).into()),
                }
            }
        })?;
    let mut ch = Channel::from_tcp(a)?;
    ch.set_batch_pages(batch_pages);
    // Either every page as its own entry (dirty pages scattered over guest memory), or the source as one
    // contiguous run (what a dirty-bitmap run iterator hands over for a fully dirty region). The frames are
    // the same either way: `batch_pages` 4 KiB pages with one descriptor each.
    let pages: Vec<(u64, &[u8])> = source
        .chunks_exact(PAGE)
        .enumerate()
        .map(|(i, p)| ((i * PAGE) as u64, p))
        .collect();
    let mut sent = 0;
    while sent < total {
        let n = ((total - sent) / PAGE).min(pages.len());
        if scattered {
            ch.send_pages(PagePhase::Checkpoint, 1, PAGE as u32, &pages[..n])?;
        } else {
            ch.send_pages(PagePhase::Checkpoint, 1, PAGE as u32, &[(0, &source[..n * PAGE])])?;
        }
        sent += n * PAGE;
    }
    ch.send(&Message::EndOfRam { epoch: 1 })?;
    let got = rx.join().map_err(|_| "receiver panicked")??;
    let secs = start.elapsed().as_secs_f64();
    if got != sent {
        return Err(format!("received {got} bytes, sent {sent}").into());
    }
    Ok(sent as f64 / secs)
}

fn raw(source: &[u8], total: usize, chunk: usize) -> Res<f64> {
    let (mut a, mut b) = pair()?;
    let start = Instant::now();
    let rx = thread::Builder::new()
        .name("rawrx".into())
        .spawn(move || -> Res<usize> {
            let mut buf = vec![0u8; chunk];
            let mut got = 0usize;
            loop {
                let n = b.read(&mut buf)?;
                if n == 0 {
                    return Ok(got);
                }
                got += n;
            }
        })?;
    let mut sent = 0;
    while sent < total {
        for c in source.chunks(chunk) {
            let c = &c[..c.len().min(total - sent)];
            a.write_all(c)?;
            sent += c.len();
            if sent >= total {
                break;
            }
        }
    }
    a.shutdown(std::net::Shutdown::Write)?;
    let got = rx.join().map_err(|_| "receiver panicked")??;
    let secs = start.elapsed().as_secs_f64();
    if got != sent {
        return Err(format!("received {got} bytes, sent {sent}").into());
    }
    Ok(sent as f64 / secs)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Res<()> {
    let args = parse_args()?;
    let total = ((args.gib * (1u64 << 30) as f64) as usize) / PAGE * PAGE;
    let source: Vec<u8> = (0..SOURCE).map(|i| (i as u8) ^ ((i >> 12) as u8)).collect();
    let chunk = args.batch_pages * PAGE;
    let (mut f, mut r, mut fc, mut rc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds.max(1) {
        // Alternate which goes first, so that neither always meets the other's leftovers.
        let ((fg, fcpu), (rg, rcpu)) = if round % 2 == 0 {
            let a = measure(total, || framed(&source, total, args.batch_pages, args.scattered))?;
            (a, measure(total, || raw(&source, total, chunk))?)
        } else {
            let b = measure(total, || raw(&source, total, chunk))?;
            (
                measure(total, || framed(&source, total, args.batch_pages, args.scattered))?,
                b,
            )
        };
        if !args.json {
            println!(
                "round {round}: framed {fg:.2} GB/s ({fcpu:.3} cpu ns/B), raw {rg:.2} GB/s ({rcpu:.3} cpu ns/B), ratio {:.3}",
                fg / rg
            );
        }
        f.push(fg);
        r.push(rg);
        fc.push(fcpu);
        rc.push(rcpu);
    }
    let cpu_ratio = median(&mut rc.clone()) / median(&mut fc.clone());
    let ratios: Vec<f64> = f.iter().zip(&r).map(|(a, b)| a / b).collect();
    let (fm, rm) = (median(&mut f.clone()), median(&mut r.clone()));
    let ratio = fm / rm;
    let lo = ratios.iter().copied().fold(f64::MAX, f64::min);
    let hi = ratios.iter().copied().fold(0.0, f64::max);
    if args.json {
        let out = serde_json::json!({
            "bytes_per_run": total,
            "page_size": PAGE,
            "batch_pages": args.batch_pages,
            "sender_entries": if args.scattered { "one per page" } else { "contiguous runs" },
            "rounds": f.len(),
            "framed_gbps": fm,
            "raw_gbps": rm,
            "ratio": ratio,
            "framed_runs_gbps": f,
            "raw_runs_gbps": r,
            "round_ratios": ratios,
            "round_ratio_min": lo,
            "round_ratio_max": hi,
            "framed_cpu_ns_per_byte": fc,
            "raw_cpu_ns_per_byte": rc,
            "cpu_efficiency_ratio": cpu_ratio,
        });
        println!("{out}");
    } else {
        println!("median: framed {fm:.2} GB/s, raw {rm:.2} GB/s, ratio {ratio:.3} (rounds {lo:.3}..{hi:.3})");
        println!("cpu efficiency (raw cpu per byte / framed cpu per byte, medians): {cpu_ratio:.3}");
    }
    Ok(())
}
