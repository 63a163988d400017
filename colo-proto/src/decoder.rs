//! Streaming frame decoder: bytes in any split, messages out.
//!
//! The decoder owns a `BytesMut` receive buffer. It accepts only the bytes the current frame still needs
//! ([`Decoder::feed`] returns how many it took), validates the header (including the length cap) before it
//! reserves room for the body, and hands out decoded bodies as frozen slices of its buffer. The buffer never
//! holds more than `HEADER_LEN + max_body` bytes, whatever the peer sends.
//!
//! ```
//! use colo_proto::{Decoder, Message, PROTOCOL_VERSION};
//!
//! let mut wire = Vec::new();
//! Message::CheckpointRequest { epoch: 7 }.encode(PROTOCOL_VERSION, &mut wire).unwrap();
//! let mut dec = Decoder::new();
//! let mut got = Vec::new();
//! for byte in wire.chunks(1) {
//!     let mut rest = byte;
//!     while !rest.is_empty() {
//!         let n = dec.feed(rest);
//!         rest = &rest[n..];
//!         while let Some(m) = dec.decode().unwrap() {
//!             got.push(m);
//!         }
//!     }
//! }
//! dec.finish().unwrap();
//! assert_eq!(got, [Message::CheckpointRequest { epoch: 7 }]);
//! ```

use bytes::{Bytes, BytesMut};

use crate::error::{Error, Result};
use crate::frame::{DEFAULT_MAX_BODY, FrameHeader, HEADER_LEN};
use crate::message::Message;

/// Streaming decoder of COLO frames.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    max_body: u32,
    header: Option<FrameHeader>,
    failed: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder with the default body cap ([`DEFAULT_MAX_BODY`], 64 MiB).
    pub fn new() -> Self {
        Self::with_max_body(DEFAULT_MAX_BODY)
    }

    /// A decoder that refuses frame bodies longer than `max_body` bytes.
    pub fn with_max_body(max_body: u32) -> Self {
        Decoder {
            buf: BytesMut::with_capacity(HEADER_LEN),
            max_body,
            header: None,
            failed: false,
        }
    }

    /// The body cap.
    pub fn max_body(&self) -> u32 {
        self.max_body
    }

    /// How many more bytes the frame in progress needs; 0 when a whole frame (or header) is buffered and
    /// [`Decoder::decode`] must be called.
    pub fn wanted(&self) -> usize {
        match self.header {
            None => HEADER_LEN.saturating_sub(self.buf.len()),
            Some(h) => h.frame_len().saturating_sub(self.buf.len()),
        }
    }

    /// Bytes currently buffered.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Capacity of the receive buffer. It never exceeds `HEADER_LEN + max_body`.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Copies as many bytes of `data` as the current frame needs into the buffer and returns how many were
    /// taken. Returns 0 when [`Decoder::decode`] must run first.
    pub fn feed(&mut self, data: &[u8]) -> usize {
        if self.failed {
            return 0;
        }
        let n = self.wanted().min(data.len());
        if self.header.is_none() && self.buf.capacity() < HEADER_LEN && !self.buf.try_reclaim(HEADER_LEN) {
            let mut fresh = BytesMut::with_capacity(HEADER_LEN);
            fresh.extend_from_slice(&self.buf);
            self.buf = fresh;
        }
        self.buf.extend_from_slice(&data[..n]);
        n
    }

    /// Decodes the next frame if it is complete. `Ok(None)` means more bytes are needed.
    ///
    /// After an error the decoder stays failed: a damaged stream cannot be resynchronised.
    pub fn decode(&mut self) -> Result<Option<Message>> {
        match self.decode_frame()? {
            None => Ok(None),
            Some((h, body)) => Message::decode(&h, body)
                .map(Some)
                .inspect_err(|_| self.failed = true),
        }
    }

    /// Like [`Decoder::decode`] but returns the validated header and the CRC-checked raw body.
    pub fn decode_frame(&mut self) -> Result<Option<(FrameHeader, Bytes)>> {
        if self.failed {
            return Err(Error::DecoderFailed);
        }
        let r = self.step();
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn step(&mut self) -> Result<Option<(FrameHeader, Bytes)>> {
        let header = match self.header {
            Some(h) => h,
            None => {
                if self.buf.len() < HEADER_LEN {
                    return Ok(None);
                }
                let mut raw = [0u8; HEADER_LEN];
                raw.copy_from_slice(&self.buf[..HEADER_LEN]);
                let h = FrameHeader::decode(&raw, self.max_body)?;
                // The cap was checked: now it is safe to make room for the body. Reuse the old allocation if
                // every frame handed out of it has been dropped; otherwise allocate exactly one frame.
                let need = h.frame_len();
                if self.buf.capacity() < need && !self.buf.try_reclaim(need - self.buf.len()) {
                    let mut fresh = BytesMut::with_capacity(need);
                    fresh.extend_from_slice(&self.buf);
                    self.buf = fresh;
                }
                self.header = Some(h);
                h
            }
        };
        if self.buf.len() < header.frame_len() {
            return Ok(None);
        }
        let mut frame = self.buf.split_to(header.frame_len());
        self.header = None;
        let body = frame.split_off(HEADER_LEN).freeze();
        header.check_body(&body)?;
        Ok(Some((header, body)))
    }

    /// Call at end of stream: fails with [`Error::Truncated`] if a frame was cut short.
    pub fn finish(&self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let needed = match self.header {
            Some(h) => h.frame_len(),
            None => HEADER_LEN,
        };
        Err(Error::Truncated {
            buffered: self.buf.len() as u64,
            needed: needed as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::PROTOCOL_VERSION;

    #[test]
    fn truncation_is_reported_at_eof() {
        let mut wire = Vec::new();
        Message::Heartbeat { seq: 1 }
            .encode(PROTOCOL_VERSION, &mut wire)
            .unwrap();
        let mut d = Decoder::new();
        d.feed(&wire[..wire.len() - 1]);
        assert_eq!(d.decode().unwrap(), None);
        assert!(matches!(d.finish(), Err(Error::Truncated { .. })));
    }

    #[test]
    fn oversize_is_refused_before_allocating() {
        let mut wire = Vec::new();
        let m = Message::Error {
            code: 1,
            text: "x".repeat(1000),
        };
        m.encode(PROTOCOL_VERSION, &mut wire).unwrap();
        let mut d = Decoder::with_max_body(100);
        d.feed(&wire);
        assert!(matches!(d.decode(), Err(Error::Oversize { .. })));
        assert!(d.capacity() < 1000);
        assert!(matches!(d.decode(), Err(Error::DecoderFailed)));
    }
}
