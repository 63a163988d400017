//! COLO glue: the one module of the mini-VMM that knows colo-pair (and through it colo-proto, colo-ram,
//! colo-block, colo-net and colo-failover). It is written as the template another VMM copies; the rest of
//! the mini-VMM ([`crate::vm`], [`crate::devices`]) knows nothing about COLO.
//!
//! What a VMM provides, file by file:
//!
//! | file | piece | what it does |
//! |---|---|---|
//! | [`vm`] | [`ColoVm`] | `colo_pair::Vm` for the machine: RAM, pause/resume, state as blobs (vCPU + devices, and the NIC's receive queue); [`vm::dirty_log`]: KVM's log OR vm-memory's bitmap |
//! | [`net`] | [`NicPort`], [`RxQueue`], [`SwitchPort`] | the NIC's backend: guest frames to the driver, `Output::ToGuest` to the guest; the client network port (a fenced switch port: each frame carries its release token) |
//! | [`disk`] | [`PrimaryBlock`], [`SecondaryBlock`] | the block device's backend over colo-pair's shared colo-block disks; a write that must wait (epoch or backlog full, overlay full) stays queued in the device and completes after the driver made room |
//! | [`link`] | [`SharedLink`] | the checkpoint channel (TCP): sending half for colo-pair plus a heartbeat and watchdog thread, a reader thread with backpressure, the fault-injection hook |
//! | [`driver`] | [`Driver`] | the loop: one FIFO event queue, the pair's timers, its outputs (release to the switch, deliver to the guest, promotion, shutdown), control commands, status |
//! | here | [`run`] | process setup for either role: machine, disks, connection and handshake, arbiter, control socket |
//!
//! Process layout (one process per side):
//!
//! ```text
//!             client network (switch)                       primary                 secondary
//!   client <-> switch <-> SwitchPort --Client--> driver --ToGuest--> RxQueue -> NIC -> guest (PVM)
//!                           ^                   | ^  \--mirror (OutputFrame)-----------> driver -> rewriter -> SVM
//!                           '----ToClient-------' '-GuestTx-- NIC          comparator <-- forwarded SVM frames
//!   threads per process: vCPU, device, driver (owns the colo-pair driver), reader (peer messages),
//!   heartbeat, switch reader, control socket.
//! ```
//!
//! The secondary's NIC is not on the client network until it is promoted; then it attaches its own switch
//! port, announces the guest's MAC, and the SVM's output goes to the client (translated by the rewriter).
//!
//! Fencing: every frame the pair releases (`Output::ToClient`) carries colo-failover's fencing token, and
//! [`SwitchPort`] hands it to the switch with the frame; the switch keeps a `FenceGate` per guest MAC
//! ([`crate::switch`]) and drops frames of an older token. The promoted secondary announces the MAC with
//! its promotion token, so a stale primary that wakes up later (token 0 until its first failover) reaches
//! no client and cannot pull the MAC back. Tokens only grow across nodes with a real arbiter
//! (`--arbiter witness=..`); `none` hands both sides their own tokens, which fence nothing. Disk writes need
//! no gate here: each side writes only its own image (no storage is shared); a VMM on shared storage puts
//! a `FenceGate` in front of it the same way.
//!
//! Threads and locks a VMM copying this must keep: the driver thread is the only caller into colo-pair;
//! the link's sending half is one mutex shared with the heartbeat thread, which only writes into an empty
//! socket send queue (so it never blocks holding it) and doubles as the watchdog of a blocked driver write;
//! a failed write closes the link (half a frame may be on the stream). No lock of the glue is held across
//! a call into colo-pair, and colo-pair holds its disk lock only for short calls, never across `pause`.

pub mod disk;
pub mod driver;
pub mod link;
pub mod net;
pub mod vm;

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colo_block::{EpochLimit, InitialSync, MemStore, PrimaryConfig, PrimaryDisk, RawFile, SecondaryDisk};
use colo_failover::witness::WitnessArbiter;
use colo_failover::{Arbiter, NoArbiter};
use colo_pair::{PairConfig, PrimaryPair, SecondaryPair, SharedPrimaryDisk, SharedSecondaryDisk, Side};
use colo_proto::{Channel, LocalConfig, MemoryRegion, Role};
use serde_json::{Value, json};

pub use disk::{PrimaryBlock, SecondaryBlock};
pub use driver::{Command, Driver, Event};
pub use link::SharedLink;
pub use net::{NicPort, RxQueue, SwitchPort};
pub use vm::ColoVm;

use crate::control::{self, ControlServer, Request};
use crate::memory::{PAGE_SIZE, ram_size};
use crate::vm::{Machine, MachineConfig, NetConfig};

/// Block size of the secondary's overlays and of the primary's epoch limit.
pub const OVERLAY_BLOCK: usize = 4096;
/// Chunk size of the initial disk sync.
pub const SYNC_CHUNK: u64 = 256 << 10;

/// Which side this process runs, and where its peer is.
#[derive(Debug, Clone)]
pub enum PeerRole {
    /// Boot the guest and connect to the secondary at this address.
    Primary {
        /// The secondary's `--colo-listen` address.
        peer: String,
    },
    /// Listen here for the primary; boot nothing until it connects.
    Secondary {
        /// Address to listen on.
        listen: String,
    },
}

/// Who decides which side may run alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArbiterChoice {
    /// Nobody: unsafe under network partitions (both sides may run).
    None,
    /// colo-failover's witness server at this address.
    Witness(SocketAddr),
    /// colo-failover's etcd lease arbiter (feature `etcd`): both sides of a pair compete for `key`.
    #[cfg(feature = "etcd")]
    Etcd {
        /// Client URLs of the etcd cluster, such as `http://127.0.0.1:2379`.
        endpoints: Vec<String>,
        /// The pair's key (the same on both sides, one per pair).
        key: String,
    },
}

/// The COLO settings of one process.
#[derive(Debug, Clone)]
pub struct ColoConfig {
    /// Side and peer.
    pub role: PeerRole,
    /// Periodic checkpoint interval.
    pub checkpoint_interval: Duration,
    /// No word from the peer for this long: it is lost.
    pub heartbeat_timeout: Duration,
    /// Arbiter.
    pub arbiter: ArbiterChoice,
    /// This node's name at the arbiter.
    pub node_name: String,
    /// Lease time to live at the witness.
    pub lease_ttl: Duration,
    /// Test hook: the primary dies by SIGKILL in the middle of sending this checkpoint's pages.
    pub fault_exit_in_checkpoint: Option<u64>,
    /// The client network's switch.
    pub switch: PathBuf,
    /// This process's port on it (the secondary binds it only when promoted).
    pub nic_socket: PathBuf,
    /// Capacity of the secondary's hidden store and active overlay in 4 KiB blocks; the primary refuses
    /// (holds) a write that would touch more distinct blocks in one epoch, and checkpoints.
    pub overlay_blocks: usize,
    /// How long the primary keeps trying to reach the secondary.
    pub connect_timeout: Duration,
    /// Copy the primary's disk to the secondary's before the first checkpoint (colo-block's initial sync,
    /// protocol v3). Both sides must agree; without it both images must already hold the same content.
    pub disk_sync: bool,
}

impl ColoConfig {
    /// Defaults for `role` on the client network `switch` with this process's port `nic_socket`.
    pub fn new(role: PeerRole, switch: PathBuf, nic_socket: PathBuf) -> Self {
        let node_name = match role {
            PeerRole::Primary { .. } => "primary",
            PeerRole::Secondary { .. } => "secondary",
        }
        .to_string();
        Self {
            role,
            checkpoint_interval: Duration::from_millis(2000),
            heartbeat_timeout: Duration::from_millis(1000),
            arbiter: ArbiterChoice::None,
            node_name,
            lease_ttl: Duration::from_secs(3),
            fault_exit_in_checkpoint: None,
            switch,
            nic_socket,
            overlay_blocks: 8192,
            connect_timeout: Duration::from_secs(60),
            disk_sync: true,
        }
    }

    /// The colo-pair settings.
    pub fn pair_config(&self) -> PairConfig {
        let mut cfg = PairConfig {
            checkpoint_interval: self.checkpoint_interval,
            // The block device completes writes at once (colo-block's Async mode, see `PrimaryBlock`):
            // nothing waits for the secondary's per-write acknowledgement, so it is not sent.
            block_acks: false,
            ..PairConfig::default()
        };
        cfg.failover.heartbeat_timeout = self.heartbeat_timeout;
        cfg.failover.heartbeat_interval = (self.heartbeat_timeout / 5).max(Duration::from_millis(5));
        // A partner that died holding the witness lease keeps it for one TTL.
        cfg.failover.denied_patience = cfg.failover.denied_patience.max(self.lease_ttl * 2);
        cfg
    }
}

/// Why a COLO process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Told to quit.
    Quit,
    /// The guest shut down (on the primary; mirrored on the secondary).
    GuestShutdown,
    /// The guest faulted.
    GuestFault(String),
}

/// What can stop a COLO process.
#[derive(Debug, thiserror::Error)]
pub enum ColoError {
    /// The machine failed.
    #[error("machine: {0}")]
    Machine(#[from] crate::Error),
    /// The pair driver failed.
    #[error("COLO pair: {0}")]
    Pair(#[from] colo_pair::PairError),
    /// The channel or its handshake failed.
    #[error("COLO channel: {0}")]
    Proto(#[from] colo_proto::Error),
    /// A disk could not be set up.
    #[error("disk {path}: {source}")]
    Disk {
        /// The image.
        path: PathBuf,
        /// The colo-block error.
        #[source]
        source: colo_block::Error,
    },
    /// The dirty log could not be set up.
    #[error("dirty log: {0}")]
    Ram(#[from] colo_ram::RamError),
    /// The arbiter could not be set up.
    #[error("arbiter: {0}")]
    Arbiter(#[from] colo_failover::ArbiterError),
    /// Socket or thread setup failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The peer never came.
    #[error("no COLO peer: {0}")]
    NoPeer(String),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ColoError {
    move |source| ColoError::Io { what, source }
}

/// A connection to a new secondary, handshake done, for [`Command::Protect`].
#[derive(Debug)]
pub struct NewLink {
    /// The sending half.
    pub link: SharedLink,
    /// The receiving half, for the reader thread.
    pub reader: Channel<TcpStream>,
    /// The secondary's address (for the log).
    pub peer: String,
}

/// What the control socket handler shares with the driver.
struct ControlShared {
    side: Side,
    connect_timeout: Duration,
    machine: Arc<Machine>,
    status: Arc<Mutex<Value>>,
    events: Mutex<Sender<Event>>,
    quit: AtomicBool,
    driving: AtomicBool,
}

/// How long the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a control command waits for the driver's answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

fn handle_control(c: &ControlShared, req: Request) -> Value {
    let command = |cmd| {
        if !c.driving.load(Ordering::SeqCst) {
            return json!({ "ok": false, "error": "the pair is not running (no peer yet, or finished)" });
        }
        let (tx, rx) = mpsc::channel();
        let sent = c
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Event::Command(cmd, tx));
        if sent.is_err() {
            return json!({ "ok": false, "error": "the COLO driver has stopped" });
        }
        rx.recv_timeout(COMMAND_TIMEOUT)
            .unwrap_or_else(|_| json!({ "ok": false, "error": "no answer from the COLO driver" }))
    };
    match req {
        Request::Status => {
            let colo = c.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
            json!({
                "state": c.machine.run_state(),
                "ram_size": ram_size(c.machine.ram()),
                "stats": c.machine.stats(),
                "colo": colo,
            })
        }
        Request::Pause | Request::Resume | Request::Migrate { .. } => {
            json!({ "ok": false, "error": "the COLO pair drives this guest (use failover, or quit)" })
        }
        Request::Quit => {
            c.quit.store(true, Ordering::SeqCst);
            let _ = c
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(Event::Quit);
            json!({})
        }
        Request::Failover => command(Command::Failover),
        Request::SetInterval { ms } if (1..=3_600_000).contains(&ms) => {
            command(Command::SetInterval(Duration::from_millis(ms)))
        }
        Request::SetInterval { ms } => {
            json!({ "ok": false, "error": format!("interval {ms} ms is not within 1..=3600000") })
        }
        Request::Checkpoint => command(Command::Checkpoint),
        Request::Protect { .. } if c.side != Side::Primary => {
            json!({ "ok": false, "error": "protect is a primary's command (a promoted secondary cannot be protected)" })
        }
        Request::Protect { .. } if !c.driving.load(Ordering::SeqCst) => {
            json!({ "ok": false, "error": "the pair is not running (no peer yet, or finished)" })
        }
        Request::Protect { .. } if c.status.lock().unwrap_or_else(|e| e.into_inner())["phase"] != "alone" => {
            // Checked again by the driver; this only spares a connection to the new secondary.
            json!({ "ok": false, "error": "protect needs a primary running alone" })
        }
        Request::Protect { peer } => {
            // Connect and shake hands here, on the control thread: the driver (and the guest) go on meanwhile.
            match connect(&peer, &c.quit, c.connect_timeout)
                .and_then(|s| handshake(s, Side::Primary, &c.machine))
            {
                Ok((chan, reader)) => match SharedLink::new(chan, None) {
                    Ok(link) => command(Command::Protect(Box::new(NewLink { link, reader, peer }))),
                    Err(e) => json!({ "ok": false, "error": format!("{peer}: {e}") }),
                },
                Err(e) => json!({ "ok": false, "error": format!("{peer}: {e}") }),
            }
        }
    }
}

/// The colo-proto handshake on a new connection (RAM layouts must match): the channel for sending and
/// one for the reader thread, both at the negotiated version.
fn handshake(
    stream: TcpStream,
    side: Side,
    machine: &Machine,
) -> Result<(Channel<TcpStream>, Channel<TcpStream>), ColoError> {
    let regions = vec![MemoryRegion {
        gpa: 0,
        size: ram_size(machine.ram()),
    }];
    stream.set_nodelay(true).map_err(io("socket options"))?;
    // A peer that never finishes the handshake is refused after this long (not waited for forever).
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(io("socket options"))?;
    // A peer that stops reading fails our sends after this long instead of hanging the driver.
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(io("socket options"))?;
    let mut chan = Channel::new(stream.try_clone().map_err(io("socket"))?);
    let negotiated = match side {
        Side::Primary => {
            chan.handshake_connect(&LocalConfig::new(1, Role::Primary, PAGE_SIZE as u32, regions))?
        }
        Side::Secondary => {
            chan.handshake_accept(&LocalConfig::new(2, Role::Secondary, PAGE_SIZE as u32, regions))?
        }
    };
    stream.set_read_timeout(None).map_err(io("socket options"))?;
    let mut reader = Channel::new(stream);
    reader.set_version(negotiated.version);
    tracing::info!("COLO: handshake done (protocol version {})", negotiated.version);
    Ok((chan, reader))
}

fn set_phase(status: &Mutex<Value>, side: &str, phase: &str) {
    *status.lock().unwrap_or_else(|e| e.into_inner()) = json!({ "role": side, "phase": phase });
}

fn connect(addr: &str, quit: &AtomicBool, timeout: Duration) -> Result<TcpStream, ColoError> {
    let t0 = Instant::now();
    let mut logged = false;
    loop {
        let err = match addr.to_socket_addrs() {
            Ok(mut addrs) => match addrs.next() {
                Some(a) => match TcpStream::connect_timeout(&a, Duration::from_secs(1)) {
                    Ok(s) => return Ok(s),
                    Err(e) => e.to_string(),
                },
                None => format!("{addr} resolves to nothing"),
            },
            Err(e) => e.to_string(),
        };
        if quit.load(Ordering::SeqCst) {
            return Err(ColoError::NoPeer("quit while connecting".into()));
        }
        if t0.elapsed() > timeout {
            return Err(ColoError::NoPeer(format!("{addr}: {err} (for {timeout:?})")));
        }
        if !logged {
            tracing::info!("COLO: waiting for the secondary at {addr} ({err})");
            logged = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn accept(listener: &TcpListener, quit: &AtomicBool) -> Result<TcpStream, ColoError> {
    listener.set_nonblocking(true).map_err(io("listening"))?;
    loop {
        match listener.accept() {
            Ok((s, peer)) => {
                tracing::info!("COLO: primary connected from {peer}");
                s.set_nonblocking(false).map_err(io("accepting"))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if quit.load(Ordering::SeqCst) {
                    return Err(ColoError::NoPeer("quit while listening".into()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io("accepting")(e)),
        }
    }
}

fn arbiter(cfg: &ColoConfig) -> Result<Box<dyn Arbiter + Send>, ColoError> {
    Ok(match cfg.arbiter {
        ArbiterChoice::None => {
            tracing::warn!(
                "COLO: NO ARBITER: if the link between the two sides fails while both live, BOTH will run the \
                 guest (split brain). Use --arbiter witness=HOST:PORT outside tests."
            );
            Box::new(NoArbiter::unsafe_under_partitions())
        }
        ArbiterChoice::Witness(addr) => Box::new(WitnessArbiter::new(
            addr,
            &cfg.node_name,
            cfg.lease_ttl,
            Duration::from_millis(500),
        )?),
        #[cfg(feature = "etcd")]
        ArbiterChoice::Etcd {
            ref endpoints,
            ref key,
        } => Box::new(colo_failover::etcd::EtcdArbiter::connect(
            colo_failover::etcd::EtcdConfig {
                endpoints: endpoints.clone(),
                key: key.clone(),
                node: cfg.node_name.clone(),
                // etcd counts leases in whole seconds.
                ttl_secs: cfg.lease_ttl.as_secs_f64().ceil().max(1.0) as i64,
                timeout: Duration::from_millis(500),
            },
        )?),
    })
}

/// The guest's disk as each side shares it with its block device.
enum SideDisk {
    Primary(SharedPrimaryDisk<RawFile>),
    Secondary(disk::SecondaryImage, disk::DurableSwitch),
}

fn open_image(path: &Path) -> Result<RawFile, ColoError> {
    RawFile::open(path).map_err(|source| ColoError::Disk {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs one side of a COLO pair until the guest shuts down or the control socket says `quit`.
///
/// `machine` names the guest (RAM size, disk image, MAC, address); its `net` is ignored (the NIC is the
/// pair's). The disk image must exist on both sides with the same size; with [`ColoConfig::disk_sync`]
/// the primary copies its content to the secondary's before the first checkpoint, without it both must
/// already hold the same content.
pub fn run(mut machine: MachineConfig, cfg: ColoConfig, control: Option<&Path>) -> Result<Exit, ColoError> {
    let side = match cfg.role {
        PeerRole::Primary { .. } => Side::Primary,
        PeerRole::Secondary { .. } => Side::Secondary,
    };
    let side_name = match side {
        Side::Primary => "primary",
        Side::Secondary => "secondary",
    };
    machine.net = NetConfig::None;
    let mac = machine.mac;
    let (events_tx, events) = mpsc::channel();
    let rx = Arc::new(RxQueue::new().map_err(io("eventfd"))?);
    let tx_waiting = Arc::new(AtomicUsize::new(0));
    let nic = NicPort::new(events_tx.clone(), tx_waiting.clone(), rx.clone());
    let blocks = cfg.overlay_blocks.max(1);

    // Disks: the image plus colo-block's replication state, shared by the block device and the driver.
    let image = open_image(&machine.disk)?;
    let disk_err = |source| ColoError::Disk {
        path: machine.disk.clone(),
        source,
    };
    let (disk, block): (SideDisk, Box<dyn crate::devices::block::DiskBackend>) = match side {
        Side::Primary => {
            let limit = EpochLimit {
                block_size: OVERLAY_BLOCK as u64,
                max_blocks: blocks,
            };
            let len = colo_block::BlockBackend::len(&image);
            let mut pd = PrimaryDisk::new(
                image,
                PrimaryConfig {
                    epoch_limit: Some(limit),
                    ..PrimaryConfig::default()
                },
            );
            if cfg.disk_sync {
                // Every chunk goes across before checkpoint 1; what the guest writes meanwhile goes again.
                pd.start_sync(InitialSync::new(len, SYNC_CHUNK).map_err(disk_err)?)
                    .map_err(disk_err)?;
            }
            let disk = SharedPrimaryDisk::new(pd);
            let block = Box::new(PrimaryBlock::new(disk.clone(), events_tx.clone()));
            (SideDisk::Primary(disk), block)
        }
        Side::Secondary => {
            let store = || MemStore::new(OVERLAY_BLOCK, blocks).map_err(disk_err);
            let (image, durable) = disk::SvmImage::new(image);
            let sd = if cfg.disk_sync {
                SecondaryDisk::new_syncing(image, store()?, store()?)
            } else {
                SecondaryDisk::new(image, store()?, store()?, 0)
            };
            let disk = SharedSecondaryDisk::new(sd.map_err(disk_err)?);
            let block = Box::new(SecondaryBlock::new(disk.clone(), events_tx.clone()));
            (SideDisk::Secondary(disk, durable), block)
        }
    };

    let mut m = Machine::with_backends(machine, Some(Box::new(nic)), Some(block))?;
    match side {
        Side::Primary => m.boot(crate::GUEST_ELF)?,
        Side::Secondary => m.prepare_incoming()?,
    }
    // Threads start paused: the guest first runs when checkpoint 1 (the end of the initial sync) is
    // committed on both sides.
    m.start(true)?;
    let machine = Arc::new(m);

    let status = Arc::new(Mutex::new(Value::Null));
    set_phase(
        &status,
        side_name,
        if side == Side::Primary {
            "connecting"
        } else {
            "listening"
        },
    );
    let shared = Arc::new(ControlShared {
        side,
        connect_timeout: cfg.connect_timeout,
        machine: machine.clone(),
        status: status.clone(),
        events: Mutex::new(events_tx.clone()),
        quit: AtomicBool::new(false),
        driving: AtomicBool::new(false),
    });
    let _control = match control {
        Some(path) => {
            let s = shared.clone();
            let handler: control::Handler = Arc::new(move |req| handle_control(&s, req));
            Some(ControlServer::spawn(path, handler).map_err(io("control socket"))?)
        }
        None => None,
    };

    // The checkpoint channel and its handshake (RAM layouts must match).
    let stream = match &cfg.role {
        PeerRole::Primary { peer } => connect(peer, &shared.quit, cfg.connect_timeout),
        PeerRole::Secondary { listen } => {
            let l = TcpListener::bind(listen).map_err(io("binding --colo-listen"))?;
            let bound = l.local_addr().map_err(io("listening"))?;
            // With port 0 the status tells the primary's launcher which port was picked.
            status.lock().unwrap_or_else(|e| e.into_inner())["listen"] = json!(bound.to_string());
            tracing::info!("COLO: secondary listening on {bound}");
            accept(&l, &shared.quit)
        }
    };
    let stream = match stream {
        Ok(s) => s,
        Err(_) if shared.quit.load(Ordering::SeqCst) => {
            machine.quit();
            return Ok(Exit::Quit);
        }
        Err(e) => return Err(e),
    };
    let (chan, reader) = handshake(stream, side, &machine)?;

    let link = SharedLink::new(chan, cfg.fault_exit_in_checkpoint).map_err(io("socket"))?;
    let peer_pending = Arc::new(AtomicUsize::new(0));
    link::spawn_reader(reader, events_tx.clone(), peer_pending.clone(), link.clone())
        .map_err(io("starting the reader thread"))?;
    let pair_cfg = cfg.pair_config();
    link.driver_tick();
    link.spawn_heartbeats(pair_cfg.failover.heartbeat_interval, cfg.heartbeat_timeout)
        .map_err(io("starting the heartbeat thread"))?;

    let vm = ColoVm::new(machine.clone(), rx.clone());
    let log = vm::dirty_log(&machine)?;
    let arbiter = arbiter(&cfg)?;
    let heartbeats = (pair_cfg.failover.heartbeat_interval, cfg.heartbeat_timeout);
    let parts = |switch, attach| driver::DriverParts {
        side,
        machine: machine.clone(),
        rx: rx.clone(),
        link: link.clone(),
        events,
        events_tx: events_tx.clone(),
        tx_waiting: tx_waiting.clone(),
        peer_pending: peer_pending.clone(),
        switch,
        attach,
        status: status.clone(),
        heartbeats,
    };
    let result = match disk {
        SideDisk::Primary(disk) => {
            let switch =
                SwitchPort::connect(&cfg.nic_socket, &cfg.switch).map_err(io("attaching to the switch"))?;
            switch
                .spawn_reader(events_tx.clone())
                .map_err(io("starting the switch reader"))?;
            tracing::info!("COLO: primary: sending guest RAM to the secondary");
            let t0 = Instant::now();
            let pair = PrimaryPair::new(
                pair_cfg,
                Instant::now(),
                vm,
                log,
                disk,
                Box::new(link.clone()),
                arbiter,
            )?;
            tracing::info!(
                "COLO: primary: RAM sent in {:?}; first checkpoint next",
                t0.elapsed()
            );
            shared.driving.store(true, Ordering::SeqCst);
            Driver::new(pair, parts(Some(switch), None)).run()
        }
        SideDisk::Secondary(disk, durable) => {
            let pair = SecondaryPair::new(
                pair_cfg,
                Instant::now(),
                vm,
                log,
                disk,
                Box::new(link.clone()),
                arbiter,
            )?;
            shared.driving.store(true, Ordering::SeqCst);
            let attach = driver::Attach {
                switch: cfg.switch.clone(),
                local: cfg.nic_socket.clone(),
                mac,
                durable,
            };
            Driver::new(pair, parts(None, Some(attach))).run()
        }
    };
    shared.driving.store(false, Ordering::SeqCst);
    link.close();
    machine.quit();
    if let Err(e) = &result {
        tracing::error!("COLO: stopped by an error: {e}");
    }
    result
}
