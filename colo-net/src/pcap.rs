//! Classic pcap files (the libpcap format), read and written without extra dependencies.
//!
//! Reads both byte orders and both timestamp resolutions (microseconds, magic `a1b2c3d4`, and nanoseconds,
//! magic `a1b23c4d`); writes nanosecond files. Only the Ethernet link type (1) is accepted by the reader's
//! users, but any is read. Every record length is checked against a cap before anything is allocated.

use std::io::{Read, Write};

use crate::error::NetError;

/// Largest record accepted (the snap length tcpdump uses by default).
pub const MAX_RECORD_LEN: u32 = 262_144;

/// Link type of Ethernet captures.
pub const LINKTYPE_ETHERNET: u32 = 1;

/// One captured frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Capture time, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// Captured bytes.
    pub data: Vec<u8>,
    /// Length of the frame on the wire (may exceed `data.len()` if the capture truncated it).
    pub orig_len: u32,
}

/// A whole capture.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capture {
    /// Link type from the file header.
    pub link_type: u32,
    /// Records in file order.
    pub records: Vec<Record>,
}

fn fill(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads a whole pcap stream. At most `max_records` records are accepted (an error beyond that).
pub fn read(mut r: impl Read, max_records: usize) -> Result<Capture, NetError> {
    let mut hdr = [0u8; 24];
    if fill(&mut r, &mut hdr)? < 24 {
        return Err(NetError::Pcap {
            what: "file shorter than the 24-byte header".into(),
            offset: 0,
        });
    }
    let magic = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let (big, nanos) = match magic {
        0xa1b2_c3d4 => (false, false),
        0xa1b2_3c4d => (false, true),
        0xd4c3_b2a1 => (true, false),
        0x4d3c_b2a1 => (true, true),
        m => {
            return Err(NetError::Pcap {
                what: format!("bad magic {m:#010x}"),
                offset: 0,
            });
        }
    };
    let word = |b: &[u8]| {
        let w = [b[0], b[1], b[2], b[3]];
        if big {
            u32::from_be_bytes(w)
        } else {
            u32::from_le_bytes(w)
        }
    };
    let link_type = word(&hdr[20..24]) & 0x0fff_ffff;
    let mut records = Vec::new();
    let mut offset = 24u64;
    loop {
        let mut rh = [0u8; 16];
        let n = fill(&mut r, &mut rh)?;
        if n == 0 {
            break;
        }
        if n < 16 {
            return Err(NetError::Pcap {
                what: format!("truncated record header ({n} of 16 bytes)"),
                offset,
            });
        }
        let (sec, frac, incl, orig) = (
            word(&rh[0..4]),
            word(&rh[4..8]),
            word(&rh[8..12]),
            word(&rh[12..16]),
        );
        if incl > MAX_RECORD_LEN {
            return Err(NetError::Pcap {
                what: format!("record length {incl} above {MAX_RECORD_LEN}"),
                offset,
            });
        }
        if (!nanos && frac >= 1_000_000) || (nanos && frac >= 1_000_000_000) {
            return Err(NetError::Pcap {
                what: format!("timestamp fraction {frac} out of range"),
                offset,
            });
        }
        if records.len() >= max_records {
            return Err(NetError::Pcap {
                what: format!("more than {max_records} records"),
                offset,
            });
        }
        let mut data = vec![0u8; incl as usize];
        let got = fill(&mut r, &mut data)?;
        if got < data.len() {
            return Err(NetError::Pcap {
                what: format!("truncated record ({got} of {incl} bytes)"),
                offset,
            });
        }
        let time_ns = u64::from(sec) * 1_000_000_000 + u64::from(frac) * if nanos { 1 } else { 1000 };
        records.push(Record {
            time_ns,
            data,
            orig_len: orig,
        });
        offset += 16 + u64::from(incl);
    }
    Ok(Capture { link_type, records })
}

/// Writes a nanosecond-resolution pcap stream.
pub fn write(mut w: impl Write, link_type: u32, records: &[Record]) -> Result<(), NetError> {
    let mut hdr = Vec::with_capacity(24);
    hdr.extend_from_slice(&0xa1b2_3c4du32.to_le_bytes());
    hdr.extend_from_slice(&2u16.to_le_bytes());
    hdr.extend_from_slice(&4u16.to_le_bytes());
    hdr.extend_from_slice(&0i32.to_le_bytes());
    hdr.extend_from_slice(&0u32.to_le_bytes());
    hdr.extend_from_slice(&MAX_RECORD_LEN.to_le_bytes());
    hdr.extend_from_slice(&link_type.to_le_bytes());
    w.write_all(&hdr)?;
    for (i, r) in records.iter().enumerate() {
        let len = u32::try_from(r.data.len())
            .ok()
            .filter(|l| *l <= MAX_RECORD_LEN)
            .ok_or_else(|| NetError::Pcap {
                what: format!("record {i} of {} bytes too long", r.data.len()),
                offset: 0,
            })?;
        let sec = u32::try_from(r.time_ns / 1_000_000_000).map_err(|_| NetError::Pcap {
            what: format!("record {i} time beyond 2106"),
            offset: 0,
        })?;
        let mut rh = [0u8; 16];
        rh[0..4].copy_from_slice(&sec.to_le_bytes());
        rh[4..8].copy_from_slice(&((r.time_ns % 1_000_000_000) as u32).to_le_bytes());
        rh[8..12].copy_from_slice(&len.to_le_bytes());
        rh[12..16].copy_from_slice(&r.orig_len.max(len).to_le_bytes());
        w.write_all(&rh)?;
        w.write_all(&r.data)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_microsecond_files() {
        let recs = vec![
            Record {
                time_ns: 1_700_000_000_123_456_789,
                data: vec![1, 2, 3],
                orig_len: 3,
            },
            Record {
                time_ns: 1_700_000_001_000_000_000,
                data: vec![],
                orig_len: 0,
            },
        ];
        let mut out = Vec::new();
        write(&mut out, LINKTYPE_ETHERNET, &recs).unwrap();
        let cap = read(&out[..], 10).unwrap();
        assert_eq!(cap.link_type, LINKTYPE_ETHERNET);
        assert_eq!(cap.records, recs);
        // A big-endian microsecond file.
        let mut be = Vec::new();
        {
            let w = 0xa1b2_c3d4u32;
            be.extend_from_slice(&w.to_be_bytes());
        }
        be.extend_from_slice(&[0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 1]);
        for w in [5u32, 7, 1, 1] {
            be.extend_from_slice(&w.to_be_bytes());
        }
        be.push(9);
        let cap = read(&be[..], 10).unwrap();
        assert_eq!(
            cap.records,
            vec![Record {
                time_ns: 5_000_007_000,
                data: vec![9],
                orig_len: 1
            }]
        );
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let mut out = Vec::new();
        write(
            &mut out,
            1,
            &[Record {
                time_ns: 0,
                data: vec![0; 100],
                orig_len: 100,
            }],
        )
        .unwrap();
        for cut in 0..out.len() {
            let r = read(&out[..cut], 10);
            assert_eq!(r.is_ok(), cut == 24, "cut at {cut}");
        }
        let mut huge = out.clone();
        huge[32..36].copy_from_slice(&(MAX_RECORD_LEN + 1).to_le_bytes());
        assert!(matches!(
            read(&huge[..], 10),
            Err(NetError::Pcap { offset: 24, .. })
        ));
        assert!(read(&out[..], 0).is_err());
        let mut bad = out.clone();
        bad[0] = 0;
        assert!(read(&bad[..], 10).is_err());
    }
}
