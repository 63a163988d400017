//! `colo-vmm`: run the mini-VMM, its switch, or talk to its control socket.
//!
//! ```text
//! colo-vmm switch --path /tmp/sw
//! colo-vmm run --disk /tmp/disk.img --disk-mib 16 --switch /tmp/sw --nic-socket /tmp/vm0 --control /tmp/vm0.ctl
//! colo-vmm run ... --incoming 127.0.0.1:7100          # destination of a live migration
//! colo-vmm ctl --control /tmp/vm0.ctl '{"cmd":"migrate","addr":"127.0.0.1:7100"}'
//!
//! # a COLO pair (start the secondary first; both images must hold the same content)
//! colo-vmm run --disk /tmp/s.img --switch /tmp/sw --nic-socket /tmp/s.nic --control /tmp/s.ctl \
//!     --role secondary --colo-listen 127.0.0.1:7200
//! colo-vmm run --disk /tmp/p.img --switch /tmp/sw --nic-socket /tmp/p.nic --control /tmp/p.ctl \
//!     --role primary --colo-peer 127.0.0.1:7200
//! colo-vmm ctl --control /tmp/s.ctl '{"cmd":"failover"}'
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use colo_vmm::colo;
use colo_vmm::control::{self, ControlServer, Request};
use colo_vmm::migration::{self, Progress};
use colo_vmm::switch::Switch;
use colo_vmm::{Machine, MachineConfig, NetConfig};
use serde_json::json;

mod demo;

#[derive(Parser, Debug)]
#[command(name = "colo-vmm", version, about = "The colo-rs mini-VMM")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a VM.
    Run(Box<RunArgs>),
    /// Run a learning L2 switch over Unix datagram sockets.
    Switch {
        /// Socket path of the switch.
        #[arg(long)]
        path: PathBuf,
    },
    /// Run a COLO pair, a checking client and a failover on loopback, and report.
    Demo(demo::DemoArgs),
    /// Send one JSON request to a control socket and print the answer.
    Ctl {
        /// Control socket path.
        #[arg(long)]
        control: PathBuf,
        /// The request, e.g. '{"cmd":"status"}'.
        request: String,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Raw disk image (created with --disk-mib if missing).
    #[arg(long)]
    disk: PathBuf,
    /// Size of a disk image to create if --disk does not exist.
    #[arg(long, default_value_t = 16)]
    disk_mib: u64,
    /// Guest RAM in MiB (multiple of 2, 16 to 1024).
    #[arg(long, default_value_t = 64)]
    ram_mib: u64,
    /// Back guest RAM with a memfd.
    #[arg(long)]
    memfd: bool,
    /// Attach the NIC to the switch at this socket path.
    #[arg(long, requires = "nic_socket", conflicts_with = "tap")]
    switch: Option<PathBuf>,
    /// This VM's own socket path on the switch.
    #[arg(long)]
    nic_socket: Option<PathBuf>,
    /// Attach the NIC to this tap interface instead.
    #[arg(long)]
    tap: Option<String>,
    /// MAC address of the NIC.
    #[arg(long, default_value = "52:54:00:12:34:56")]
    mac: String,
    /// Guest IPv4 address with prefix.
    #[arg(long, default_value = "10.0.2.15/24")]
    ip: String,
    /// TCP port of the guest's key-value service.
    #[arg(long, default_value_t = 7000)]
    port: u16,
    /// JSON-lines control socket path.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Wait for a live migration on this address instead of booting.
    #[arg(long)]
    incoming: Option<String>,
    /// Exit once the guest has migrated away (default: stay paused until `quit`).
    #[arg(long)]
    exit_after_migration: bool,
    /// Run one side of a COLO pair (needs --switch and --nic-socket).
    #[arg(long, value_enum, requires_all = ["switch", "nic_socket"], conflicts_with = "incoming")]
    role: Option<ColoRole>,
    /// Primary: the secondary's --colo-listen address.
    #[arg(long)]
    colo_peer: Option<String>,
    /// Secondary: address to listen on for the primary.
    #[arg(long)]
    colo_listen: Option<String>,
    /// Periodic checkpoint interval (ms).
    #[arg(long, default_value_t = 2000)]
    checkpoint_ms: u64,
    /// No word from the peer for this long (ms) and it is lost.
    #[arg(long, default_value_t = 1000)]
    heartbeat_timeout_ms: u64,
    /// Who decides which side may run alone: `none` (unsafe under partitions), `witness=HOST:PORT`, or
    /// `etcd=URL[,URL..]` (built with the `etcd` feature; needs `--arbiter-key`).
    #[arg(long, default_value = "none")]
    arbiter: String,
    /// The pair's key at an etcd arbiter: the same on both sides of a pair and different for every pair
    /// (two pairs on one key would fence each other).
    #[arg(long)]
    arbiter_key: Option<String>,
    /// This node's name at the arbiter (default: the role).
    #[arg(long)]
    node_name: Option<String>,
    /// Capacity of the secondary's disk overlays in 4 KiB blocks (both sides must agree).
    #[arg(long, default_value_t = 8192)]
    overlay_blocks: usize,
    /// Skip the initial disk copy (both images already hold the same content; both sides must agree).
    #[arg(long)]
    no_disk_sync: bool,
    /// Test hook: the primary kills itself (SIGKILL) halfway through sending checkpoint N's pages.
    #[arg(long)]
    fault_exit_in_checkpoint: Option<u64>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ColoRole {
    Primary,
    Secondary,
}

fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<_> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("MAC {s:?} needs six bytes");
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).with_context(|| format!("MAC byte {p:?}"))?;
    }
    Ok(mac)
}

fn parse_ip(s: &str) -> anyhow::Result<([u8; 4], u8)> {
    let (ip, prefix) = s.split_once('/').unwrap_or((s, "24"));
    let ip: std::net::Ipv4Addr = ip.parse().with_context(|| format!("IPv4 address {ip:?}"))?;
    let prefix: u8 = prefix.parse().with_context(|| format!("prefix {prefix:?}"))?;
    if prefix > 32 {
        bail!("prefix {prefix} > 32");
    }
    Ok((ip.octets(), prefix))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Run(args) => run(*args),
        Cmd::Demo(args) => demo::main(args),
        Cmd::Switch { path } => {
            let mut sw = Switch::bind(&path).with_context(|| format!("binding {}", path.display()))?;
            tracing::info!("switch listening on {}", path.display());
            sw.run(&AtomicBool::new(false))?;
            Ok(())
        }
        Cmd::Ctl {
            control: path,
            request,
        } => {
            let req: Request = serde_json::from_str(&request).context("parsing the request")?;
            let v = control::request(&path, &req, Duration::from_secs(600))?;
            println!("{v}");
            Ok(())
        }
    }
}

/// What the main thread waits for.
#[derive(Debug, Default)]
struct Events {
    quit: AtomicBool,
    migrated: AtomicBool,
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    if !args.disk.exists() {
        let f =
            std::fs::File::create(&args.disk).with_context(|| format!("creating {}", args.disk.display()))?;
        f.set_len(args.disk_mib << 20)?;
    }
    let net = match (&args.switch, &args.nic_socket, &args.tap) {
        (Some(switch), Some(local), None) => NetConfig::Switch {
            switch: switch.clone(),
            local: local.clone(),
        },
        (None, _, Some(tap)) => NetConfig::Tap(tap.clone()),
        _ => NetConfig::None,
    };
    let (ip, prefix) = parse_ip(&args.ip)?;
    let mut cfg = MachineConfig::new(args.disk.clone(), net);
    cfg.ram_size = args.ram_mib << 20;
    cfg.memfd = args.memfd;
    cfg.mac = parse_mac(&args.mac)?;
    cfg.ip = ip;
    cfg.prefix = prefix;
    cfg.port = args.port;
    if let Some(role) = args.role {
        return run_colo(&args, role, cfg);
    }
    let mut machine = Machine::new(cfg)?;

    // Bind the incoming listener before anything else so a source can connect as soon as we print.
    let listener = match &args.incoming {
        Some(addr) => {
            Some(std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?)
        }
        None => None,
    };
    if listener.is_none() {
        machine.boot(colo_vmm::GUEST_ELF)?;
    } else {
        machine.prepare_incoming()?;
    }
    let machine = Arc::new(machine);
    let progress = Arc::new(Mutex::new(Progress::default()));
    let events = Arc::new(Events::default());

    let _control = match &args.control {
        Some(path) => {
            let (m, p, e) = (machine.clone(), progress.clone(), events.clone());
            let handler: control::Handler = Arc::new(move |req| handle(&m, &p, &e, req));
            Some(
                ControlServer::spawn(path, handler)
                    .with_context(|| format!("control socket {}", path.display()))?,
            )
        }
        None => None,
    };

    if let Some(listener) = listener {
        tracing::info!("waiting for an incoming migration on {}", listener.local_addr()?);
        let (stream, peer) = listener.accept()?;
        tracing::info!("incoming migration from {peer}");
        let report = migration::receive(stream, &machine, &progress)?;
        tracing::info!("incoming migration done: {report}");
    } else {
        machine.start(false)?;
    }

    let mut announced = false;
    loop {
        if events.quit.load(Ordering::SeqCst) {
            machine.quit();
            return Ok(());
        }
        if events.migrated.load(Ordering::SeqCst) && !announced {
            announced = true;
            // Like QEMU's post-migrate state: the guest now runs elsewhere; this copy stays paused (its
            // status shows the migration figures) until told to quit, or exits with --exit-after-migration.
            tracing::info!("guest migrated away; staying paused");
            if args.exit_after_migration {
                machine.quit();
                return Ok(());
            }
        }
        if let Some(exit) = machine.wait_exit(Duration::from_millis(50)) {
            tracing::info!("guest exit: {exit:?}");
            return match exit {
                colo_vmm::vm::GuestExit::PowerOff(0) | colo_vmm::vm::GuestExit::Quit => Ok(()),
                other => bail!("guest stopped: {other:?}"),
            };
        }
    }
}

fn run_colo(args: &RunArgs, role: ColoRole, machine: MachineConfig) -> anyhow::Result<()> {
    let peer = match role {
        ColoRole::Primary => colo::PeerRole::Primary {
            peer: args
                .colo_peer
                .clone()
                .context("--role primary needs --colo-peer HOST:PORT")?,
        },
        ColoRole::Secondary => colo::PeerRole::Secondary {
            listen: args
                .colo_listen
                .clone()
                .context("--role secondary needs --colo-listen HOST:PORT")?,
        },
    };
    let (Some(switch), Some(nic)) = (&args.switch, &args.nic_socket) else {
        bail!("--role needs --switch and --nic-socket");
    };
    let mut cfg = colo::ColoConfig::new(peer, switch.clone(), nic.clone());
    cfg.checkpoint_interval = Duration::from_millis(args.checkpoint_ms.max(1));
    cfg.heartbeat_timeout = Duration::from_millis(args.heartbeat_timeout_ms.max(10));
    cfg.arbiter = arbiter_choice(&args.arbiter, args.arbiter_key.as_deref())?;
    if let Some(n) = &args.node_name {
        cfg.node_name = n.clone();
    }
    cfg.overlay_blocks = args.overlay_blocks.max(1);
    cfg.fault_exit_in_checkpoint = args.fault_exit_in_checkpoint;
    cfg.disk_sync = !args.no_disk_sync;
    match colo::run(machine, cfg, args.control.as_deref())? {
        colo::Exit::Quit | colo::Exit::GuestShutdown => Ok(()),
        colo::Exit::GuestFault(f) => bail!("guest fault: {f}"),
    }
}

fn handle(
    m: &Arc<Machine>,
    progress: &Arc<Mutex<Progress>>,
    events: &Arc<Events>,
    req: Request,
) -> serde_json::Value {
    let err = |e: &dyn std::fmt::Display| json!({ "ok": false, "error": e.to_string() });
    match req {
        Request::Status => {
            let p = progress.lock().unwrap_or_else(|e| e.into_inner()).clone();
            json!({
                "state": m.run_state(),
                "ram_size": colo_vmm::memory::ram_size(m.ram()),
                "dirty_pages": p.last_dirty_pages,
                "migration": p,
                "stats": m.stats(),
            })
        }
        Request::Pause => match m.pause() {
            Ok(d) => json!({ "paused_in_us": d.as_micros() as u64 }),
            Err(e) => err(&e),
        },
        Request::Resume if events.migrated.load(Ordering::SeqCst) => {
            err(&"the guest migrated away; resuming this copy would run it twice")
        }
        Request::Resume => match m.resume() {
            Ok(()) => json!({}),
            Err(e) => err(&e),
        },
        Request::Quit => {
            events.quit.store(true, Ordering::SeqCst);
            json!({})
        }
        Request::Failover | Request::SetInterval { .. } | Request::Checkpoint | Request::Protect { .. } => {
            err(&"not a COLO pair (run with --role)")
        }
        Request::Migrate { addr } => {
            {
                let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
                if p.active {
                    return err(&"a migration is already running");
                }
                p.active = true;
            }
            let (m, p, e) = (m.clone(), progress.clone(), events.clone());
            let spawned = std::thread::Builder::new().name("migrate".into()).spawn(move || {
                match migration::send(&addr, &m, &p) {
                    Ok(report) => {
                        tracing::info!("migration done: {report}");
                        e.migrated.store(true, Ordering::SeqCst);
                    }
                    Err(err) => {
                        tracing::error!("migration failed: {err}; resuming here");
                        let mut g = p.lock().unwrap_or_else(|e| e.into_inner());
                        g.active = false;
                        g.error = Some(err.to_string());
                        drop(g);
                        let _ = m.resume();
                    }
                }
            });
            match spawned {
                Ok(_) => json!({ "started": true }),
                Err(e) => err(&e),
            }
        }
    }
}

/// `--arbiter` as an [`colo::ArbiterChoice`].
fn arbiter_choice(arg: &str, key: Option<&str>) -> anyhow::Result<colo::ArbiterChoice> {
    if !arg.starts_with("etcd=") && key.is_some() {
        bail!("--arbiter-key is for --arbiter etcd=..; the witness and none have no keys");
    }
    if arg == "none" {
        return Ok(colo::ArbiterChoice::None);
    }
    if let Some(addr) = arg.strip_prefix("witness=") {
        return Ok(colo::ArbiterChoice::Witness(
            std::net::ToSocketAddrs::to_socket_addrs(addr)
                .with_context(|| format!("witness address {addr:?}"))?
                .next()
                .with_context(|| format!("witness address {addr:?} resolves to nothing"))?,
        ));
    }
    if let Some(urls) = arg.strip_prefix("etcd=") {
        let endpoints: Vec<String> = urls
            .split(',')
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect();
        let (false, Some(key)) = (endpoints.is_empty(), key.filter(|k| !k.is_empty())) else {
            bail!("--arbiter etcd= needs at least one URL and a non-empty --arbiter-key (one per pair)");
        };
        #[cfg(feature = "etcd")]
        return Ok(colo::ArbiterChoice::Etcd {
            endpoints,
            key: key.to_owned(),
        });
        #[cfg(not(feature = "etcd"))]
        {
            let _ = (endpoints, key);
            bail!("--arbiter {arg}: this colo-vmm was built without the `etcd` feature");
        }
    }
    bail!("--arbiter must be none, witness=HOST:PORT or etcd=URL[,URL..], not {arg:?}")
}
