//! Property tests of the wire format: round trips through the streaming decoder in arbitrary splits,
//! arbitrary input never panics or allocates past the cap, and every single damaged byte is detected.

use bytes::Bytes;
use colo_proto::{
    BlockDiscard, BlockWrite, Decoder, DeviceStateChunk, DiskSyncChunk, DiskSyncDone, Error, HEADER_LEN,
    Hello, MemoryRegion, Message, OutputFrame, PROTOCOL_VERSION, PageBatch, PrimaryIsn, RamPage, Reason,
    Role, TcpFlow, WantReason, Welcome,
};
use proptest::prelude::*;

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Primary), Just(Role::Secondary)]
}

fn reason() -> impl Strategy<Value = Reason> {
    prop_oneof![
        Just(Reason::Normal),
        Just(Reason::Shutdown),
        Just(Reason::Operator),
        Just(Reason::HeartbeatLost),
        Just(Reason::ProtocolError),
        Just(Reason::LocalFailure),
        Just(Reason::Fenced),
    ]
}

fn regions() -> impl Strategy<Value = Vec<MemoryRegion>> {
    proptest::collection::vec(
        (any::<u64>(), any::<u64>()).prop_map(|(gpa, size)| MemoryRegion { gpa, size }),
        0..4,
    )
}

fn batch() -> impl Strategy<Value = PageBatch> {
    let page_size = prop_oneof![Just(512u32), Just(4096u32)];
    (any::<u64>(), page_size).prop_flat_map(|(epoch, page_size)| {
        let page = (any::<u32>(), any::<bool>(), any::<u8>()).prop_map(move |(frame, zero, fill)| RamPage {
            gpa: u64::from(frame) * u64::from(page_size),
            data: if zero {
                Bytes::new()
            } else {
                Bytes::from(vec![fill; page_size as usize])
            },
        });
        proptest::collection::vec(page, 0..6).prop_map(move |pages| PageBatch {
            epoch,
            page_size,
            pages,
            torn: vec![],
        })
    })
}

fn message() -> impl Strategy<Value = Message> {
    let e = any::<u64>();
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            role(),
            any::<u32>(),
            regions()
        )
            .prop_map(
                |(min_version, max_version, capabilities, node_id, role, page_size, regions)| {
                    Message::Hello(Hello {
                        min_version,
                        max_version,
                        capabilities,
                        node_id,
                        role,
                        page_size,
                        regions,
                    })
                }
            ),
        (
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            role(),
            any::<u32>(),
            regions()
        )
            .prop_map(|(version, capabilities, node_id, role, page_size, regions)| {
                Message::Welcome(Welcome {
                    version,
                    capabilities,
                    node_id,
                    role,
                    page_size,
                    regions,
                })
            }),
        Just(Message::CheckpointReady),
        e.prop_map(|epoch| Message::CheckpointRequest { epoch }),
        e.prop_map(|epoch| Message::CheckpointReply { epoch }),
        e.prop_map(|epoch| Message::VmstateSend { epoch }),
        batch().prop_map(Message::RamPages),
        batch().prop_map(Message::PrecopyPages),
        e.prop_map(|epoch| Message::EndOfRam { epoch }),
        (e, any::<u64>()).prop_map(|(epoch, size)| Message::VmstateSize { epoch, size }),
        (e, any::<u32>(), bytes(300), any::<u32>(), any::<u32>()).prop_map(
            |(epoch, device_id, data, pre, post)| {
                let offset = u64::from(pre);
                let total = offset + data.len() as u64 + u64::from(post);
                Message::DeviceState(DeviceStateChunk {
                    epoch,
                    device_id,
                    total,
                    offset,
                    data,
                })
            }
        ),
        e.prop_map(|epoch| Message::VmstateReceived { epoch }),
        e.prop_map(|epoch| Message::VmstateLoaded { epoch }),
        any::<u64>().prop_map(|seq| Message::Heartbeat { seq }),
        Just(Message::GuestShutdown),
        (e, any::<u32>(), any::<u64>(), bytes(300)).prop_map(|(epoch, disk, offset, data)| {
            Message::BlockWrite(BlockWrite {
                epoch,
                disk,
                offset,
                data,
            })
        }),
        e.prop_map(|epoch| Message::BlockBarrier { epoch }),
        (any::<u32>(), bytes(300))
            .prop_map(|(interface, data)| Message::OutputFrame(OutputFrame { interface, data })),
        reason().prop_map(|reason| Message::FailoverNotice { reason }),
        reason().prop_map(|reason| Message::Goodbye { reason }),
        (any::<u32>(), ".{0,40}").prop_map(|(code, text)| Message::Error { code, text }),
        v3_message(),
    ]
}

/// The messages protocol version 3 added.
fn v3_message() -> impl Strategy<Value = Message> {
    let sectors = |max: u64| (0..max).prop_map(|n| n * 512);
    prop_oneof![
        prop_oneof![Just(WantReason::OverlayFull), Just(WantReason::RewriterFull)]
            .prop_map(|reason| Message::CheckpointWanted { reason }),
        (any::<u32>(), sectors(1 << 40), 1usize..5, any::<u8>()).prop_map(|(disk, offset, n, fill)| {
            Message::DiskSyncChunk(DiskSyncChunk {
                disk,
                offset,
                data: Bytes::from(vec![fill; n * 512]),
            })
        }),
        (any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(disk, epoch, disk_len, bytes)| {
                Message::DiskSyncDone(DiskSyncDone {
                    disk,
                    epoch,
                    disk_len,
                    bytes,
                })
            }
        ),
        (any::<u32>(), any::<u64>()).prop_map(|(disk, id)| Message::BlockAck { disk, id }),
        (any::<u64>(), any::<u32>(), sectors(1 << 40), sectors(1 << 40)).prop_map(
            |(epoch, disk, offset, len)| Message::BlockDiscard(BlockDiscard {
                epoch,
                disk,
                offset,
                len,
            })
        ),
        (
            any::<u128>(),
            any::<u128>(),
            any::<u16>(),
            any::<u16>(),
            any::<u32>(),
            any::<bool>(),
            any::<u32>()
        )
            .prop_map(|(src, dst, src_port, dst_port, vlan, ipv6, isn)| {
                Message::PrimaryIsn(PrimaryIsn {
                    flow: TcpFlow {
                        src,
                        dst,
                        src_port,
                        dst_port,
                        vlan,
                        ipv6,
                    },
                    isn,
                })
            }),
    ]
}

/// Feeds `wire` to a decoder in pieces of the given sizes (cycled), collecting messages.
fn decode_split(dec: &mut Decoder, wire: &[u8], splits: &[usize]) -> Result<Vec<Message>, Error> {
    let mut out = Vec::new();
    let mut rest = wire;
    let mut i = 0;
    while !rest.is_empty() {
        let take = splits[i % splits.len()].clamp(1, rest.len());
        i += 1;
        let mut piece = &rest[..take];
        rest = &rest[take..];
        while !piece.is_empty() {
            let n = dec.feed(piece);
            piece = &piece[n..];
            while let Some(m) = dec.decode()? {
                out.push(m);
            }
        }
    }
    while let Some(m) = dec.decode()? {
        out.push(m);
    }
    dec.finish()?;
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn every_message_round_trips_in_any_split(
        msgs in proptest::collection::vec(message(), 1..5),
        splits in proptest::collection::vec(1usize..5000, 1..8),
    ) {
        let mut wire = Vec::new();
        for m in &msgs {
            m.encode(PROTOCOL_VERSION, &mut wire).unwrap();
        }
        let mut dec = Decoder::new();
        let got = decode_split(&mut dec, &wire, &splits).unwrap();
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn encoded_len_is_the_length_encode_writes(m in message()) {
        let mut wire = Vec::new();
        m.encode(PROTOCOL_VERSION, &mut wire).unwrap();
        prop_assert_eq!(colo_proto::message::encoded_len(&m).unwrap(), wire.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic_nor_allocate_past_the_cap(
        junk in proptest::collection::vec(any::<u8>(), 0..20000),
        splits in proptest::collection::vec(1usize..3000, 1..8),
        valid_prefix in proptest::option::of(message()),
    ) {
        const CAP: u32 = 4096;
        let mut wire = Vec::new();
        if let Some(m) = valid_prefix {
            // A valid frame first, so the junk also lands in body and second-header positions.
            let _ = m.encode(PROTOCOL_VERSION, &mut wire);
        }
        wire.extend_from_slice(&junk);
        let mut dec = Decoder::with_max_body(CAP);
        let mut rest = &wire[..];
        let mut i = 0;
        'outer: while !rest.is_empty() {
            let take = splits[i % splits.len()].clamp(1, rest.len());
            i += 1;
            let mut piece = &rest[..take];
            rest = &rest[take..];
            while !piece.is_empty() {
                let n = dec.feed(piece);
                piece = &piece[n..];
                prop_assert!(dec.capacity() <= HEADER_LEN + CAP as usize, "capacity {}", dec.capacity());
                loop {
                    match dec.decode() {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => break 'outer,
                    }
                }
                if n == 0 && dec.wanted() == 0 {
                    break 'outer;
                }
            }
        }
        prop_assert!(dec.capacity() <= HEADER_LEN + CAP as usize);
    }

    /// Any single damaged byte is detected, except (by design, `flags::PREFIX_CRC`) one in the page data
    /// of a pre-copy frame: that frame is accepted with the same descriptors.
    #[test]
    fn any_single_damaged_byte_is_detected(m in message(), pos in any::<prop::sample::Index>(), mask in 1u8..=255) {
        let mut wire = Vec::new();
        m.encode(PROTOCOL_VERSION, &mut wire).unwrap();
        let i = pos.index(wire.len());
        wire[i] ^= mask;
        let mut dec = Decoder::new();
        let r = decode_split(&mut dec, &wire, &[wire.len()]);
        match (&m, r) {
            (Message::PrecopyPages(b), Ok(got)) => {
                // The damaged byte is page data: exactly that page is reported torn, the rest is intact.
                let data_at = HEADER_LEN + 16 + 12 * b.pages.len();
                prop_assert!(i >= data_at, "flip of descriptor byte {} went unnoticed", i);
                let [Message::PrecopyPages(g)] = &got[..] else {
                    return Err(TestCaseError::fail(format!("decoded {got:?}")));
                };
                let ps = b.page_size as usize;
                let data_pages: Vec<&RamPage> = b.pages.iter().filter(|p| !p.is_zero()).collect();
                let hit = data_pages[(i - data_at) / ps].gpa;
                prop_assert_eq!(&g.torn, &vec![hit]);
                let want: Vec<&RamPage> = b.pages.iter().filter(|p| p.gpa != hit || p.is_zero()).collect();
                prop_assert_eq!(g.pages.iter().collect::<Vec<_>>(), want);
                prop_assert_eq!((g.epoch, g.page_size), (b.epoch, b.page_size));
            }
            (_, r) => prop_assert!(r.is_err(), "flip of byte {} with {:#x} went unnoticed: {:?}", i, mask, r),
        }
    }

    /// A version-3 frame kind inside a version-2 frame is refused by the decoder, and the encoder refuses to
    /// write one.
    #[test]
    fn v3_messages_do_not_exist_in_v2(m in v3_message()) {
        let r = m.encode(2, &mut Vec::new());
        prop_assert!(matches!(r, Err(Error::KindNotInVersion { .. })), "encoded in v2: {:?}", r);
        let mut wire = Vec::new();
        m.encode(PROTOCOL_VERSION, &mut wire).unwrap();
        // Rewrite the version field (and the header CRC, so only the kind check can object).
        wire[4..6].copy_from_slice(&2u16.to_le_bytes());
        let crc = crc32fast::hash(&wire[..20]);
        wire[20..24].copy_from_slice(&crc.to_le_bytes());
        let r = decode_split(&mut Decoder::new(), &wire, &[wire.len()]);
        prop_assert!(matches!(r, Err(Error::UnknownKind { version: 2, .. })), "{:?}", r);
    }
}

#[test]
fn every_byte_of_a_page_batch_frame_is_protected() {
    let m = Message::RamPages(PageBatch {
        epoch: 9,
        page_size: 512,
        pages: vec![
            RamPage {
                gpa: 0,
                data: Bytes::from(vec![1u8; 512]),
            },
            RamPage {
                gpa: 512,
                data: Bytes::new(),
            },
        ],
        torn: vec![],
    });
    let mut wire = Vec::new();
    m.encode(PROTOCOL_VERSION, &mut wire).unwrap();
    for i in 0..wire.len() {
        let mut w = wire.clone();
        w[i] ^= 0x40;
        let mut dec = Decoder::new();
        assert!(decode_split(&mut dec, &w, &[w.len()]).is_err(), "byte {i}");
    }
}

/// An in-memory byte pipe: writes append, reads consume from the front.
#[derive(Default)]
struct Pipe {
    buf: Vec<u8>,
    pos: usize,
}

impl std::io::Write for Pipe {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::io::Read for Pipe {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// `Channel::send_pages` with runs of pages and any batch size delivers exactly what the naive expansion
    /// (one page at a time, in order) says.
    #[test]
    fn page_runs_arrive_as_the_naive_page_list(
        runs in proptest::collection::vec((0u64..64, 0usize..6), 0..12),
        batch in 1usize..9,
    ) {
        use colo_proto::{Channel, PagePhase};
        const PS: usize = 512;
        let mem: Vec<u8> = (0..64 * PS).map(|i| (i / PS) as u8 ^ (i as u8)).collect();
        // (first page, length in pages); length 0 is a zero page. Runs are clipped to the memory.
        let list: Vec<(u64, &[u8])> = runs
            .iter()
            .map(|&(first, len)| {
                let first = first as usize;
                let len = len.min(64 - first);
                ((first * PS) as u64, &mem[first * PS..(first + len) * PS])
            })
            .collect();
        let mut naive: Vec<(u64, Vec<u8>)> = Vec::new();
        for &(gpa, bytes) in &list {
            if bytes.is_empty() {
                naive.push((gpa, Vec::new()));
            }
            for (i, page) in bytes.chunks(PS).enumerate() {
                naive.push((gpa + (i * PS) as u64, page.to_vec()));
            }
        }
        let mut tx = Channel::new(Pipe::default());
        tx.set_version(PROTOCOL_VERSION);
        tx.set_batch_pages(batch);
        tx.send_pages(PagePhase::Precopy, 5, PS as u32, &list).unwrap();
        let mut rx = Channel::new(tx.into_inner());
        let mut got: Vec<(u64, Vec<u8>)> = Vec::new();
        loop {
            match rx.recv() {
                Ok(Message::PrecopyPages(b)) => {
                    prop_assert!(b.pages.len() <= batch);
                    prop_assert_eq!(b.epoch, 5);
                    got.extend(b.pages.into_iter().map(|p| (p.gpa, p.data.to_vec())));
                }
                Err(Error::Closed) => break,
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
        prop_assert_eq!(got, naive);
    }
}
