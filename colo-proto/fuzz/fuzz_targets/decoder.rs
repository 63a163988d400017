//! Fuzz the streaming decoder and the blocking channel's receive path with arbitrary peer bytes.
//!
//! The first byte picks the split size for the streaming decoder (and the kind and protocol version for the
//! body parsers); the rest is the stream. Neither path may panic, and the decoder's buffer may never grow
//! past one frame at the cap. The stream is also fed once more with the first frame's CRCs made right, so
//! that random bodies get past the checksums into the body parsers through the normal receive path.
#![no_main]

use std::io::{self, Read, Write};

use bytes::Bytes;
use colo_proto::frame::{allowed_flags, flags};
use colo_proto::{
    Channel, Decoder, FrameHeader, HEADER_LEN, Kind, MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION,
};
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

    // The same stream with the first frame's body CRC and header CRC computed as a sender would.
    if let Some(fixed) = with_first_crcs_fixed(stream) {
        let mut ch = Channel::new(Input(&fixed));
        ch.set_max_body(CAP);
        while ch.recv().is_ok() {}
    }

    // The header CRC keeps random bytes out of the body parsers; reach them directly too, as if a body with a
    // correct CRC had arrived for the kind the first byte picks.
    let kind = Kind::ALL[usize::from(data[0]) % Kind::ALL.len()];
    let versions = PROTOCOL_VERSION - MIN_PROTOCOL_VERSION + 1;
    let version = MIN_PROTOCOL_VERSION + (u16::from(data[0]) / Kind::ALL.len() as u16) % versions;
    let header = FrameHeader {
        version,
        kind,
        flags: 0,
        body_len: stream.len() as u32,
        body_crc: 0,
    };
    let _ = Message::decode(&header, Bytes::copy_from_slice(stream));
    // The flagged CRC check (a page frame whose CRC covers only its fixed part, descriptors and per-page
    // CRCs: pre-copy from version 3, checkpoint from version 4) reads the descriptor count from the body
    // itself.
    let flagged = FrameHeader {
        flags: allowed_flags(kind, version),
        ..header
    };
    let _ = flagged.check_body(stream);
    // And the body parser of such a frame (per-page CRCs after the descriptors: torn pre-copy pages,
    // `PageCrc` for checkpoint pages).
    let _ = Message::decode(&flagged, Bytes::copy_from_slice(stream));
});

/// `stream` with the first frame's body CRC (over what its flags say it covers) and header CRC set right;
/// `None` if the stream is shorter than its first frame.
fn with_first_crcs_fixed(stream: &[u8]) -> Option<Vec<u8>> {
    let mut out = stream.to_vec();
    let field = |at: usize| u32::from_le_bytes([out[at], out[at + 1], out[at + 2], out[at + 3]]);
    if out.len() < HEADER_LEN {
        return None;
    }
    let (frame_flags, body_len) = (field(8), field(12) as usize);
    let body = out.get(HEADER_LEN..HEADER_LEN.checked_add(body_len)?)?;
    let covered = if frame_flags & flags::PREFIX_CRC != 0 {
        let count = body.get(12..16).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)?;
        (16 + 12 * count).min(body.len())
    } else {
        body.len()
    };
    let body_crc = crc32fast::hash(&body[..covered]);
    out[16..20].copy_from_slice(&body_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&out[..20]);
    out[20..24].copy_from_slice(&header_crc.to_le_bytes());
    Some(out)
}
