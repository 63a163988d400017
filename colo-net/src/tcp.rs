//! TCP helpers: sequence arithmetic, option parsing and incremental checksum updates.

/// `a` comes before `b` in sequence space (RFC 9293 modular comparison).
#[inline]
pub fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// `a` comes before or equals `b` in sequence space.
#[inline]
pub fn seq_le(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) <= 0
}

/// The later of two sequence numbers.
#[inline]
pub fn seq_max(a: u32, b: u32) -> u32 {
    if seq_lt(a, b) { b } else { a }
}

/// TCP option kinds.
pub mod opt {
    /// End of option list.
    pub const EOL: u8 = 0;
    /// No-operation.
    pub const NOP: u8 = 1;
    /// Maximum segment size.
    pub const MSS: u8 = 2;
    /// Window scale.
    pub const WSCALE: u8 = 3;
    /// SACK permitted.
    pub const SACK_PERMITTED: u8 = 4;
    /// SACK blocks.
    pub const SACK: u8 = 5;
    /// Timestamps.
    pub const TIMESTAMP: u8 = 8;
}

/// Walks TCP options as `(kind, offset of the option within `opts`, length)`, stopping at EOL or at
/// the first option whose length does not fit (malformed options end the walk, they never panic).
pub fn options(opts: &[u8]) -> impl Iterator<Item = (u8, usize, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        loop {
            let kind = *opts.get(i)?;
            match kind {
                opt::EOL => return None,
                opt::NOP => i += 1,
                _ => {
                    let len = usize::from(*opts.get(i + 1)?);
                    if len < 2 || i + len > opts.len() {
                        return None;
                    }
                    let at = i;
                    i += len;
                    return Some((kind, at, len));
                }
            }
        }
    })
}

/// What the comparator checks on a SYN or SYN-ACK: the flags and which options are present
/// (a bit per option kind below 64; 63 stands for any higher kind). Option values are not compared: the
/// two guests' ISNs, timestamps and, after a reconfiguration, MSS or window scale may differ without the
/// connection diverging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynShape {
    /// The TCP flags byte.
    pub flags: u8,
    /// Bit `k` set when option kind `k` is present.
    pub option_kinds: u64,
}

impl SynShape {
    /// Shape of a segment with `flags` and option bytes `opts`.
    pub fn new(flags: u8, opts: &[u8]) -> Self {
        let mut option_kinds = 0u64;
        for (kind, _, _) in options(opts) {
            option_kinds |= 1 << kind.min(63);
        }
        // PSH/URG/ECE/CWR on a SYN do not change what the connection is; compare SYN, ACK, FIN, RST.
        SynShape {
            flags: flags & 0x17,
            option_kinds,
        }
    }
}

/// Adds a 16-bit one's-complement difference into a checksum (RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')).
#[inline]
fn csum_replace16(csum: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!csum) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Updates `csum` for a 32-bit field changing from `old` to `new`.
#[inline]
pub fn csum_replace32(csum: u16, old: u32, new: u32) -> u16 {
    let c = csum_replace16(csum, (old >> 16) as u16, (new >> 16) as u16);
    csum_replace16(c, old as u16, new as u16)
}

/// One's-complement sum of `data` (big-endian 16-bit words, odd byte padded) added to `sum`, unfolded.
pub fn ones_sum(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [b] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*b) << 8);
    }
    sum
}

/// Folds a sum from [`ones_sum`] into the 16-bit checksum value.
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Recomputes the IPv4 header checksum (if IPv4) and the full TCP checksum of a parsed TCP frame.
/// Returns false (leaving the frame alone) if it is not a TCP frame whose offsets fit.
pub fn fill_checksums(frame: &mut [u8], vnet_hdr_len: usize) -> bool {
    let Ok(v) = crate::packet::PacketView::parse(frame, vnet_hdr_len) else {
        return false;
    };
    let Some(t) = v.tcp().copied() else { return false };
    let (l3, l4, end, version) = (v.l3, t.header, v.ip_end, v.version);
    let tcp_len = end - l4;
    let mut sum = u32::from(crate::packet::ip_proto::TCP) + tcp_len as u32;
    match version {
        crate::packet::IpVersion::V4 => {
            let ihl = l4 - l3;
            frame[l3 + 10] = 0;
            frame[l3 + 11] = 0;
            let c = fold(ones_sum(&frame[l3..l3 + ihl.min(60)], 0));
            frame[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
            sum = ones_sum(&frame[l3 + 12..l3 + 20], sum);
        }
        crate::packet::IpVersion::V6 => sum = ones_sum(&frame[l3 + 8..l3 + 40], sum),
    }
    frame[l4 + 16] = 0;
    frame[l4 + 17] = 0;
    let c = fold(ones_sum(&frame[l4..end], sum));
    frame[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_sum(data: &[u8]) -> u16 {
        let mut sum = 0u32;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from(c[0]) << 8
            };
            sum += u32::from(w);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn incremental_checksum_matches_full_recompute() {
        let mut data: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
        for (old_at, new) in [
            (4usize, 0xdead_beefu32),
            (8, 0),
            (12, 0xffff_ffff),
            (0, 0x0001_0000),
        ] {
            data[16] = 0;
            data[17] = 0;
            let before = full_sum(&data);
            let old = u32::from_be_bytes(data[old_at..old_at + 4].try_into().unwrap());
            data[old_at..old_at + 4].copy_from_slice(&new.to_be_bytes());
            let want = {
                let mut d = data.clone();
                d[16] = 0;
                d[17] = 0;
                full_sum(&d)
            };
            // Checksums are equal modulo the +0/-0 ambiguity of one's complement.
            let got = csum_replace32(before, old, new);
            assert!(
                got == want || (got == 0xffff && want == 0) || (got == 0 && want == 0xffff),
                "{got:#x} {want:#x}"
            );
        }
    }

    #[test]
    fn sequence_comparison_wraps() {
        assert!(seq_lt(0xffff_fff0, 0x10));
        assert!(!seq_lt(0x10, 0xffff_fff0));
        assert!(seq_le(5, 5));
        assert_eq!(seq_max(0xffff_fff0, 0x10), 0x10);
    }

    #[test]
    fn option_walk_stops_on_malformed_length() {
        let opts = [opt::NOP, opt::MSS, 4, 5, 0xb4, opt::TIMESTAMP, 40, 0];
        let v: Vec<_> = options(&opts).collect();
        assert_eq!(v, vec![(opt::MSS, 1, 4)]);
        assert_eq!(options(&[opt::SACK, 0]).count(), 0);
        assert_eq!(options(&[opt::SACK]).count(), 0);
    }

    #[test]
    fn syn_shape_ignores_option_values() {
        let a = SynShape::new(
            0x12,
            &[2, 4, 5, 0xb4, 4, 2, 8, 10, 1, 2, 3, 4, 0, 0, 0, 0, 1, 3, 3, 7],
        );
        let b = SynShape::new(
            0x12,
            &[2, 4, 5, 0x00, 4, 2, 8, 10, 9, 9, 9, 9, 5, 5, 5, 5, 1, 3, 3, 9],
        );
        assert_eq!(a, b);
        assert_ne!(a, SynShape::new(0x12, &[2, 4, 5, 0xb4]));
    }
}
