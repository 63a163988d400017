//! Integration over real sockets: 1 GiB of pages over loopback TCP checked byte for byte, the handshake and
//! a full checkpoint over a Unix stream socket, and a refused handshake.

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use colo_proto::handshake::caps;
use colo_proto::{
    Channel, Error, LocalConfig, MemoryRegion, Message, PagePhase, PrimaryAction, PrimarySession, Refusal,
    Role, SecondaryAction, SecondarySession, SessionConfig,
};

const PAGE: usize = 4096;
/// Pattern memory the sender cycles through; the receiver checks each page against the same bytes.
const WINDOW: usize = 16 << 20;

fn pattern() -> Arc<Vec<u8>> {
    Arc::new(
        (0..WINDOW)
            .map(|i| ((i >> 12) as u8) ^ (i as u8).wrapping_mul(31))
            .collect(),
    )
}

#[test]
fn one_gib_of_pages_over_loopback_tcp_arrives_intact() {
    const TOTAL: usize = 1 << 30;
    let src = pattern();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let expected = src.clone();
    let rx = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut ch = Channel::from_tcp(s).unwrap();
        let (mut next_gpa, mut data_bytes, mut zero_pages) = (0u64, 0usize, 0usize);
        loop {
            match ch.recv().unwrap() {
                Message::RamPages(batch) => {
                    assert_eq!(batch.epoch, 1);
                    for p in batch.pages {
                        assert_eq!(p.gpa, next_gpa, "pages arrive in order");
                        let off = p.gpa as usize % WINDOW;
                        if p.is_zero() {
                            assert_eq!(off / PAGE % 97, 0, "only every 97th page is a zero page");
                            zero_pages += 1;
                        } else {
                            assert!(
                                p.data[..] == expected[off..off + PAGE],
                                "page {:#x} differs",
                                p.gpa
                            );
                            data_bytes += PAGE;
                        }
                        next_gpa += PAGE as u64;
                    }
                }
                Message::EndOfRam { epoch: 1 } => return (next_gpa, data_bytes, zero_pages),
                other => panic!("unexpected {other:?}"),
            }
        }
    });
    let mut tx = Channel::from_tcp(TcpStream::connect(addr).unwrap()).unwrap();
    assert!(tx.get_ref().nodelay().unwrap(), "TCP_NODELAY is set");
    let mut gpa = 0u64;
    let mut batch: Vec<(u64, &[u8])> = Vec::with_capacity(1024);
    while (gpa as usize) < TOTAL {
        batch.clear();
        for _ in 0..1024 {
            let off = gpa as usize % WINDOW;
            let data: &[u8] = if (off / PAGE).is_multiple_of(97) {
                &[]
            } else {
                &src[off..off + PAGE]
            };
            batch.push((gpa, data));
            gpa += PAGE as u64;
        }
        tx.send_pages(PagePhase::Checkpoint, 1, PAGE as u32, &batch)
            .unwrap();
    }
    tx.send(&Message::EndOfRam { epoch: 1 }).unwrap();
    let (end, data_bytes, zero_pages) = rx.join().unwrap();
    assert_eq!(end as usize, TOTAL);
    assert_eq!(data_bytes + zero_pages * PAGE, TOTAL);
    assert!(zero_pages > 0);
}

fn config(role: Role) -> LocalConfig {
    LocalConfig::new(
        role as u64,
        role,
        PAGE as u32,
        vec![MemoryRegion {
            gpa: 0,
            size: 1 << 20,
        }],
    )
}

/// One checkpoint of a 1 MiB guest over a Unix stream socket, both session machines in charge.
#[test]
fn handshake_and_checkpoints_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("colo.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let secondary = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut ch = Channel::new(s);
        let n = ch.handshake_accept(&config(Role::Secondary)).unwrap();
        assert_eq!(n.version, colo_proto::PROTOCOL_VERSION);
        assert_eq!(n.capabilities, caps::ALL);
        let mut ram = vec![0u8; 1 << 20];
        let mut cache: Vec<(u64, bytes::Bytes)> = Vec::new();
        let mut devices = Vec::new();
        let mut loaded = Vec::new();
        let mut sess = SecondarySession::new(SessionConfig::default(), Instant::now());
        let mut committed = Vec::new();
        loop {
            while let Some(a) = sess.poll_action() {
                match a {
                    SecondaryAction::Send(m) => ch.send(&m).unwrap(),
                    SecondaryAction::StoreRam(b) => {
                        cache.extend(b.pages.into_iter().map(|p| (p.gpa, p.data)))
                    }
                    SecondaryAction::StoreDeviceState(c) => devices.extend_from_slice(&c.data),
                    SecondaryAction::FlushRamCache { .. } => {
                        for (gpa, data) in cache.drain(..) {
                            let page = &mut ram[gpa as usize..gpa as usize + PAGE];
                            if data.is_empty() {
                                page.fill(0);
                            } else {
                                page.copy_from_slice(&data);
                            }
                        }
                    }
                    SecondaryAction::LoadDeviceState { .. } => loaded = std::mem::take(&mut devices),
                    SecondaryAction::CheckpointDone { epoch } => {
                        committed.push((epoch, std::mem::take(&mut loaded)))
                    }
                    SecondaryAction::PeerClosed(_) => return (ram, committed),
                    SecondaryAction::Failed(e) => panic!("secondary failed: {e}"),
                    _ => {}
                }
            }
            if sess.state_name() == "loading the checkpoint" {
                sess.checkpoint_loaded(Instant::now()).unwrap();
                continue;
            }
            let m = ch.recv().unwrap();
            sess.handle_message(Instant::now(), m).unwrap();
        }
    });

    let mut ch = Channel::connect_unix(&path).unwrap();
    let n = ch.handshake_connect(&config(Role::Primary)).unwrap();
    assert_eq!(n.peer_role, Role::Secondary);
    let mut guest = vec![0u8; 1 << 20];
    let mut sess = PrimarySession::new(SessionConfig::default(), Instant::now());
    let mut done = Vec::new();
    // Pre-copy the whole guest while it "runs", then three checkpoints that each dirty a few pages.
    for (i, b) in guest.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let all: Vec<(u64, &[u8])> = guest
        .chunks(PAGE)
        .enumerate()
        .map(|(i, p)| ((i * PAGE) as u64, p))
        .collect();
    ch.send_pages(PagePhase::Precopy, 0, PAGE as u32, &all).unwrap();
    loop {
        while let Some(a) = sess.poll_action() {
            match a {
                PrimaryAction::Send(m) => ch.send(&m).unwrap(),
                PrimaryAction::SendRam { epoch } => {
                    let dirty = 3 * epoch as usize * PAGE;
                    let pages = [
                        (dirty as u64, &guest[dirty..dirty + PAGE]),
                        ((100 * PAGE) as u64, &[][..]),
                    ];
                    ch.send_pages(PagePhase::Checkpoint, epoch, PAGE as u32, &pages)
                        .unwrap();
                    sess.ram_sent(Instant::now()).unwrap();
                }
                PrimaryAction::SendDeviceState { epoch } => {
                    let cpu = [epoch as u8; 300];
                    ch.send_vmstate(epoch, &[(0, &cpu), (1, b"serial")], 128).unwrap();
                    sess.device_state_sent(Instant::now()).unwrap();
                }
                PrimaryAction::CheckpointDone { epoch, .. } => done.push(epoch),
                PrimaryAction::Failed(e) => panic!("primary failed: {e}"),
                _ => {}
            }
        }
        if done.len() == 3 {
            break;
        }
        if sess.is_idle() {
            let epoch = sess.committed_epoch() + 1;
            // The guest dirties page 3*epoch and zeroes page 100, then the checkpoint starts.
            guest[3 * epoch as usize * PAGE..][..PAGE].fill(epoch as u8);
            guest[100 * PAGE..][..PAGE].fill(0);
            sess.start_checkpoint(Instant::now()).unwrap();
            continue;
        }
        let m = ch.recv().unwrap();
        sess.handle_message(Instant::now(), m).unwrap();
    }
    sess.close(Instant::now()).unwrap();
    while let Some(a) = sess.poll_action() {
        if let PrimaryAction::Send(m) = a {
            ch.send(&m).unwrap();
        }
    }
    let (ram, committed) = secondary.join().unwrap();
    assert_eq!(done, [1, 2, 3]);
    assert_eq!(committed.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 2, 3]);
    for (epoch, dev) in &committed {
        let mut want = vec![*epoch as u8; 300];
        want.extend_from_slice(b"serial");
        assert_eq!(dev, &want);
    }
    assert!(
        ram == guest,
        "secondary RAM equals primary RAM after the last checkpoint"
    );
}

#[test]
fn layout_mismatch_is_refused_on_both_sides() {
    let (a, b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let mut cfg = config(Role::Secondary);
        cfg.regions.push(MemoryRegion {
            gpa: 1 << 32,
            size: 1 << 20,
        });
        Channel::new(b).handshake_accept(&cfg)
    });
    let client = Channel::new(a).handshake_connect(&config(Role::Primary));
    assert!(
        matches!(client, Err(Error::PeerRefused { code: colo_proto::handshake::REFUSED, ref text }) if text.contains("layout"))
    );
    assert!(matches!(
        server.join().unwrap(),
        Err(Error::Refused(Refusal::LayoutMismatch { .. }))
    ));
}

#[test]
fn previous_version_peer_negotiates_down_and_cannot_precopy() {
    let (a, b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let mut cfg = config(Role::Secondary);
        cfg.max_version = 1;
        let mut ch = Channel::new(b);
        ch.handshake_accept(&cfg).unwrap();
        ch.recv()
    });
    let mut ch = Channel::new(a);
    let n = ch.handshake_connect(&config(Role::Primary)).unwrap();
    assert_eq!(n.version, 1);
    let page = [1u8; PAGE];
    let r = ch.send_pages(PagePhase::Precopy, 0, PAGE as u32, &[(0, &page)]);
    assert!(matches!(r, Err(Error::KindNotInVersion { .. })));
    ch.send(&Message::CheckpointReady).unwrap();
    assert_eq!(server.join().unwrap().unwrap(), Message::CheckpointReady);
}

#[test]
fn a_version_three_peer_gets_checkpoint_pages_under_a_full_body_crc() {
    let (a, b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let mut cfg = config(Role::Secondary);
        cfg.max_version = 3;
        let mut ch = Channel::new(b);
        ch.handshake_accept(&cfg).unwrap();
        (ch.recv(), ch.recv())
    });
    let mut ch = Channel::new(a);
    let n = ch.handshake_connect(&config(Role::Primary)).unwrap();
    assert_eq!(n.version, 3);
    assert!(!PagePhase::Checkpoint.carries_page_crcs(n.version));
    assert!(PagePhase::Precopy.carries_page_crcs(n.version));
    let pages: Vec<u8> = (0..2 * PAGE).map(|i| (i / 3) as u8).collect();
    let list: Vec<(u64, &[u8])> = vec![(0x4000, &pages[..])];
    let crcs: Vec<u32> = pages.chunks(PAGE).map(colo_proto::page_crc).collect();
    // Given CRCs are not carried in a v3 checkpoint frame; the frame's CRC covers every byte instead.
    ch.send_pages_with_crcs(PagePhase::Checkpoint, 5, PAGE as u32, &list, &crcs)
        .unwrap();
    ch.send_pages_with_crcs(PagePhase::Precopy, 6, PAGE as u32, &list, &crcs)
        .unwrap();
    let (ram, pre) = server.join().unwrap();
    for (m, epoch) in [(ram.unwrap(), 5), (pre.unwrap(), 6)] {
        let (Message::RamPages(b) | Message::PrecopyPages(b)) = m else {
            panic!("not pages: {m:?}")
        };
        assert_eq!(b.epoch, epoch);
        assert!(b.torn.is_empty());
        assert_eq!(b.pages.len(), 2);
        assert_eq!(&b.pages[1].data[..], &pages[PAGE..]);
    }
}
