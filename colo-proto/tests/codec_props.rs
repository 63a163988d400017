//! Property tests of the wire format: round trips through the streaming decoder in arbitrary splits,
//! arbitrary input never panics or allocates past the cap, and every single damaged byte is detected.

use bytes::Bytes;
use colo_proto::{
    BlockWrite, Decoder, DeviceStateChunk, Error, HEADER_LEN, Hello, MemoryRegion, Message, OutputFrame,
    PROTOCOL_VERSION, PageBatch, RamPage, Reason, Role, Welcome,
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

    #[test]
    fn any_single_damaged_byte_is_detected(m in message(), pos in any::<prop::sample::Index>(), mask in 1u8..=255) {
        let mut wire = Vec::new();
        m.encode(PROTOCOL_VERSION, &mut wire).unwrap();
        let i = pos.index(wire.len());
        wire[i] ^= mask;
        let mut dec = Decoder::new();
        let r = decode_split(&mut dec, &wire, &[wire.len()]);
        prop_assert!(r.is_err(), "flip of byte {} with {:#x} went unnoticed: {:?}", i, mask, r);
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
