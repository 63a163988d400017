//! Fuzz the streaming decoder and the blocking channel's receive path with arbitrary peer bytes.
//!
//! The first byte picks the split size for the streaming decoder (and the kind for the body parsers); the
//! rest is the stream. Neither path may
//! panic, and the decoder's buffer may never grow past one frame at the cap.
#![no_main]

use std::io::{self, Read, Write};

use bytes::Bytes;
use colo_proto::frame::allowed_flags;
use colo_proto::{Channel, Decoder, FrameHeader, HEADER_LEN, Kind, Message, PROTOCOL_VERSION};
use libfuzzer_sys::fuzz_target;

const CAP: u32 = 1 << 16;

/// A read-only stream over the fuzz input; writes are discarded.
struct Input<'a>(&'a [u8]);

impl Read for Input<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Input<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let split = usize::from(split).max(1);

    let mut dec = Decoder::with_max_body(CAP);
    'feed: for piece in stream.chunks(split) {
        let mut piece = piece;
        while !piece.is_empty() {
            let n = dec.feed(piece);
            piece = &piece[n..];
            assert!(dec.capacity() <= HEADER_LEN + CAP as usize);
            loop {
                match dec.decode() {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
        }
    }
    let _ = dec.finish();

    let mut ch = Channel::new(Input(stream));
    ch.set_max_body(CAP);
    while ch.recv().is_ok() {}

    // The header CRC keeps random bytes out of the body parsers; reach them directly too, as if a body with a
    // correct CRC had arrived for the kind the first byte picks.
    let kind = Kind::ALL[usize::from(data[0]) % Kind::ALL.len()];
    let header = FrameHeader {
        version: PROTOCOL_VERSION,
        kind,
        flags: 0,
        body_len: stream.len() as u32,
        body_crc: 0,
    };
    let _ = Message::decode(&header, Bytes::copy_from_slice(stream));
    // The flagged CRC check (a pre-copy body whose CRC covers only its descriptors) reads the descriptor
    // count from the body itself.
    let flagged = FrameHeader {
        flags: allowed_flags(kind, PROTOCOL_VERSION),
        ..header
    };
    let _ = flagged.check_body(stream);
});
