//! colo-guest: a key-value store served over TCP (smoltcp) with a write-ahead log on the paravirtual block
//! device, run by the colo-vmm mini-VMM at CPL3 in long mode.
//!
//! Protocol: one command per line, one answer line each, in order:
//! `SET key value` -> `OK seq`; `GET key` -> `VAL value` or `NONE`; `DEL key` -> `OK seq` or `NONE`;
//! `STAT` -> `STAT keys=.. seq=.. tsc=..`; `PING` -> `PONG`; `POWEROFF` -> `BYE`, then the guest powers
//! off once every answer has been acknowledged. Changes are answered only after their log
//! records are written and flushed (group commit: all answers of one loop iteration wait for one flush).

#![no_std]
#![no_main]

#[path = "../../src/abi.rs"]
#[allow(dead_code)]
mod abi;
mod dev;
mod rt;
mod store;
mod wal;

use core::cell::UnsafeCell;
use core::fmt::Write as _;

use smoltcp::iface::{Config, Interface, SocketSet, SocketStorage};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpCidr, Ipv4Address};

use abi::*;

const CONNS: usize = 4;
const LINE: usize = 512;
const OUT: usize = 4096;

/// A static the single guest thread owns.
struct Global<T>(UnsafeCell<T>);
// SAFETY: the guest has one thread and no interrupts.
unsafe impl<T> Sync for Global<T> {}

static TABLE: Global<store::Table> = Global(UnsafeCell::new(store::Table::new()));

#[repr(C, align(4096))]
struct BlkBuf([u8; (BLK_MAX_SECTORS as usize) * SECTOR_SIZE as usize]);
static BLKBUF: Global<BlkBuf> = Global(UnsafeCell::new(BlkBuf([0; (BLK_MAX_SECTORS as usize) * 512])));

fn boot_u64(off: u64) -> u64 {
    // SAFETY: the boot info page is written by the VMM before the guest starts.
    unsafe { ((BOOT_INFO_GPA + off) as *const u64).read_volatile() }
}

fn boot_bytes<const N: usize>(off: u64) -> [u8; N] {
    // SAFETY: as above.
    unsafe { ((BOOT_INFO_GPA + off) as *const [u8; N]).read_volatile() }
}

struct Clock {
    tsc_khz: u64,
}

impl Clock {
    fn now(&self) -> Instant {
        Instant::from_micros((u128::from(rt::rdtsc()) * 1000 / u128::from(self.tsc_khz)) as i64)
    }
}

/// Per-connection line assembly and answers waiting for the group commit.
struct Conn {
    line: [u8; LINE],
    line_len: usize,
    discarding: bool,
    out: [u8; OUT],
    out_len: usize,
}

impl Conn {
    const fn new() -> Self {
        Self {
            line: [0; LINE],
            line_len: 0,
            discarding: false,
            out: [0; OUT],
            out_len: 0,
        }
    }

    fn reset(&mut self) {
        self.line_len = 0;
        self.discarding = false;
        self.out_len = 0;
    }

    fn out_room(&self) -> usize {
        OUT - self.out_len
    }
}

struct OutWriter<'a>(&'a mut Conn);

impl core::fmt::Write for OutWriter<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let b = s.as_bytes();
        if b.len() > self.0.out_room() {
            return Err(core::fmt::Error);
        }
        self.0.out[self.0.out_len..self.0.out_len + b.len()].copy_from_slice(b);
        self.0.out_len += b.len();
        Ok(())
    }
}

fn split_word(s: &[u8]) -> (&[u8], &[u8]) {
    match s.iter().position(|&b| b == b' ') {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, &[]),
    }
}

/// Execute one command line; the answer goes to `conn.out`. The caller checked that the log batch has room.
fn execute(line: &[u8], conn: &mut Conn, table: &mut store::Table, wal: &mut wal::Wal, poweroff: &mut bool) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let (cmd, rest) = split_word(line);
    let mut w = OutWriter(conn);
    let _ = match cmd {
        b"SET" => {
            let (key, val) = split_word(rest);
            match table.can_set(key, val) {
                Err(e) => writeln!(w, "ERR {e:?}"),
                Ok(()) if wal.disk_full() => writeln!(w, "ERR log full"),
                Ok(()) if !wal.has_room() => writeln!(w, "ERR log busy"),
                Ok(()) => {
                    let seq = wal.stage(store::OP_SET, key, val);
                    let _ = table.set(key, val);
                    writeln!(w, "OK {seq}")
                }
            }
        }
        b"DEL" => {
            if table.get(rest).is_none() {
                writeln!(w, "NONE")
            } else if wal.disk_full() {
                writeln!(w, "ERR log full")
            } else if !wal.has_room() {
                writeln!(w, "ERR log busy")
            } else {
                let seq = wal.stage(store::OP_DEL, rest, &[]);
                table.del(rest);
                writeln!(w, "OK {seq}")
            }
        }
        b"GET" => match table.get(rest) {
            Some(v) => {
                let _ = w.write_str("VAL ");
                let _ = w.write_str(core::str::from_utf8(v).unwrap_or("<binary>"));
                writeln!(w)
            }
            None => writeln!(w, "NONE"),
        },
        b"STAT" => writeln!(w, "STAT keys={} seq={} tsc={}", table.len(), wal.seq, rt::rdtsc()),
        b"PING" => writeln!(w, "PONG"),
        b"POWEROFF" => {
            *poweroff = true;
            writeln!(w, "BYE")
        }
        b"" => Ok(()),
        _ => writeln!(w, "ERR unknown command"),
    };
}

/// Read what fits from the socket and execute complete lines, leaving room for their answers.
fn serve(
    sock: &mut tcp::Socket<'_>,
    conn: &mut Conn,
    table: &mut store::Table,
    wal: &mut wal::Wal,
    poweroff: &mut bool,
) -> bool {
    let mut progress = false;
    while sock.can_recv() && conn.out_room() >= 512 && wal.has_room() {
        let mut byte = [0u8; 1];
        // Bytes are taken one at a time so a line is never split across a full staging buffer.
        let Ok(1) = sock.recv_slice(&mut byte) else { break };
        progress = true;
        let b = byte[0];
        if b == b'\n' {
            if conn.discarding {
                conn.discarding = false;
                let _ = writeln!(OutWriter(conn), "ERR line too long");
            } else {
                let mut line = [0u8; LINE];
                let n = conn.line_len;
                line[..n].copy_from_slice(&conn.line[..n]);
                conn.line_len = 0;
                execute(&line[..n], conn, table, wal, poweroff);
            }
        } else if conn.line_len < LINE {
            conn.line[conn.line_len] = b;
            conn.line_len += 1;
        } else {
            conn.discarding = true;
        }
    }
    progress
}

#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    if boot_u64(BI_MAGIC) != BOOT_MAGIC {
        rt::poweroff(2);
    }
    let clock = Clock {
        tsc_khz: boot_u64(BI_TSC_KHZ).max(1),
    };
    let mac: [u8; 6] = boot_bytes(BI_MAC);
    let ip: [u8; 4] = boot_bytes(BI_IP);
    let prefix = boot_bytes::<1>(BI_PREFIX)[0];
    let port = u16::from_le_bytes(boot_bytes(BI_PORT));
    let disk_sectors = boot_u64(BI_DISK_SECTORS);
    println!(
        "colo-guest: up, ram {} MiB, disk {} sectors, ip {}.{}.{}.{}/{} port {}, tsc {} kHz",
        boot_u64(BI_RAM_SIZE) >> 20,
        disk_sectors,
        ip[0],
        ip[1],
        ip[2],
        ip[3],
        prefix,
        port,
        clock.tsc_khz
    );

    // SAFETY: the only references to these statics are made here, once.
    let (table, blkbuf) = unsafe { (&mut *TABLE.0.get(), &mut *BLKBUF.0.get()) };
    let mut wal = wal::Wal::new(disk_sectors, blkbuf.0.as_mut_ptr());
    match wal.replay(table) {
        Ok(n) => println!("colo-guest: log replayed, {n} records, {} keys", table.len()),
        Err(e) => {
            println!("colo-guest: log read failed: status {}", e.0);
            rt::poweroff(3);
        }
    }

    let mut nic = dev::Nic;
    let mut config = Config::new(EthernetAddress(mac).into());
    // Nondeterminism like a real guest: TCP initial sequence numbers and ports come from the TSC.
    config.random_seed = rt::rdtsc() ^ (rt::rdtsc() << 29);
    let mut iface = Interface::new(config, &mut nic, clock.now());
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(Ipv4Address::from(ip).into(), prefix));
    });

    let mut rx_bufs = [[0u8; 8192]; CONNS];
    let mut tx_bufs = [[0u8; 8192]; CONNS];
    let mut storage: [SocketStorage<'_>; CONNS] = Default::default();
    let mut sockets = SocketSet::new(&mut storage[..]);
    let mut handles = [None; CONNS];
    for (i, (rx, tx)) in rx_bufs.iter_mut().zip(tx_bufs.iter_mut()).enumerate() {
        let sock = tcp::Socket::new(
            tcp::SocketBuffer::new(&mut rx[..]),
            tcp::SocketBuffer::new(&mut tx[..]),
        );
        handles[i] = Some(sockets.add(sock));
    }
    let mut conns = [const { Conn::new() }; CONNS];
    let mut poweroff = false;

    loop {
        let now = clock.now();
        let mut progress =
            iface.poll(now, &mut nic, &mut sockets) == smoltcp::iface::PollResult::SocketStateChanged;

        for (h, conn) in handles.iter().flatten().zip(conns.iter_mut()) {
            let sock = sockets.get_mut::<tcp::Socket<'_>>(*h);
            if !sock.is_open() {
                conn.reset();
                if sock.listen(port).is_ok() {
                    progress = true;
                }
                continue;
            }
            if sock.state() == tcp::State::CloseWait && !sock.can_recv() && conn.out_len == 0 {
                sock.close();
                progress = true;
                continue;
            }
            progress |= serve(sock, conn, table, &mut wal, &mut poweroff);
        }

        if wal.staged() > 0 {
            if let Err(e) = wal.commit() {
                println!("colo-guest: log write failed: status {}; stopping", e.0);
                rt::poweroff(3);
            }
        }

        for (h, conn) in handles.iter().flatten().zip(conns.iter_mut()) {
            if conn.out_len == 0 {
                continue;
            }
            let sock = sockets.get_mut::<tcp::Socket<'_>>(*h);
            if let Ok(n) = sock.send_slice(&conn.out[..conn.out_len]) {
                if n > 0 {
                    conn.out.copy_within(n..conn.out_len, 0);
                    conn.out_len -= n;
                    progress = true;
                }
            }
        }

        if poweroff
            && conns.iter().all(|c| c.out_len == 0)
            && handles
                .iter()
                .flatten()
                .all(|h| sockets.get::<tcp::Socket<'_>>(*h).send_queue() == 0)
        {
            println!("colo-guest: powering off");
            rt::poweroff(0);
        }

        if !progress && !nic.rx_pending() {
            let now = clock.now();
            let wait = iface
                .poll_delay(now, &sockets)
                .map_or(50_000, |d| d.total_micros())
                .min(50_000);
            if wait > 0 {
                rt::outl(PORT_IDLE, wait as u32);
            }
        }
    }
}
