//! Zero-copy packet views over Ethernet frames.
//!
//! [`PacketView::parse`] slices a frame with `etherparse` and records the offsets and the few header values
//! the comparator and the rewriter need. Every offset is relative to the buffer handed in, *including* an
//! optional virtio-net header prefix, so the rewriter can patch fields in place.
//!
//! Handled: an optional virtio-net header of configurable length, Ethernet II, up to two 802.1Q / 802.1ad
//! VLAN tags, IPv4 (with options), IPv6 (with extension headers), TCP, UDP, ICMP, ICMPv6 and any other IP
//! protocol (including IP fragments, whose transport header is not looked into). Everything else (ARP, LLDP,
//! MACsec, ...) is [`NetError::Unsupported`]; anything truncated or inconsistent is [`NetError::Malformed`].
//! Parsing never panics: once `parse` returned `Ok`, every recorded offset lies inside the buffer.

use etherparse::{LinkExtSlice, NetSlice, SlicedPacket, TransportSlice};

use crate::error::NetError;

/// Bit 0 of the virtio-net header flags: the L4 checksum is partial (only the pseudo-header sum is filled
/// in) and the device or host completes it.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;

/// IP protocol numbers used here.
pub mod ip_proto {
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMP for IPv6.
    pub const ICMPV6: u8 = 58;
}

/// TCP flag bits as found in byte 13 of the TCP header.
pub mod tcp_flags {
    /// No more data from the sender.
    pub const FIN: u8 = 0x01;
    /// Synchronise sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push.
    pub const PSH: u8 = 0x08;
    /// The acknowledgment field is significant.
    pub const ACK: u8 = 0x10;
    /// Urgent pointer significant.
    pub const URG: u8 = 0x20;
}

/// IP version of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpVersion {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// What the TCP header of a frame says, with offsets into the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpMeta {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (meaningful only with [`tcp_flags::ACK`]).
    pub ack: u32,
    /// Flags byte (see [`tcp_flags`]).
    pub flags: u8,
    /// Advertised window (unscaled).
    pub window: u16,
    /// Offset of the TCP header.
    pub header: usize,
    /// Length of the TCP header including options.
    pub header_len: usize,
    /// Offset of the payload.
    pub payload: usize,
    /// Length of the payload (IP length based, so Ethernet padding is excluded).
    pub payload_len: usize,
}

impl TcpMeta {
    /// True if every bit of `flag` is set.
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag == flag
    }

    /// Sequence space the segment occupies: payload plus one for SYN and one for FIN.
    pub fn seq_len(&self) -> u32 {
        // payload_len is bounded by the IP length field (< 2^20 even for IPv6 jumbograms we refuse).
        self.payload_len as u32 + u32::from(self.has(tcp_flags::SYN)) + u32::from(self.has(tcp_flags::FIN))
    }
}

/// The transport layer of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP segment.
    Tcp(TcpMeta),
    /// UDP datagram.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// ICMP or ICMPv6 message.
    Icmp,
    /// Any other IP protocol, or a fragment whose transport header is not looked into.
    Other,
}

/// A checked view of one frame. All offsets are inside the buffer it was parsed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketView<'a> {
    buf: &'a [u8],
    /// Offset of the Ethernet header (the virtio-net header length).
    pub l2: usize,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the IP payload (after IPv4 options or IPv6 extension headers).
    pub l4: usize,
    /// End of the IP packet (`l3` + IP total length); bytes after it are link padding.
    pub ip_end: usize,
    /// IP version.
    pub version: IpVersion,
    /// Source address (IPv4 in the low 32 bits).
    pub src: u128,
    /// Destination address (IPv4 in the low 32 bits).
    pub dst: u128,
    /// IP protocol number (for IPv6, the protocol after the extension headers).
    pub proto: u8,
    /// The IP payload is a fragment.
    pub fragment: bool,
    /// VLAN ids, outer in bits 16..28 and inner in bits 0..12, plus bit 31 set if tagged at all.
    pub vlan: u32,
    /// Offset of the transport checksum field that the comparator ignores, if any.
    pub l4_csum: Option<usize>,
    /// Transport layer.
    pub transport: Transport,
}

fn offset_in(base: &[u8], part: &[u8]) -> usize {
    // Both slices come from the same allocation (etherparse only sub-slices `base`).
    (part.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize)
}

impl<'a> PacketView<'a> {
    /// Slices `buf`, which starts with a virtio-net header of `vnet_hdr_len` bytes (0 for none).
    ///
    /// The common case (untagged Ethernet II, IPv4 without options, unfragmented TCP or UDP) takes a
    /// short fast path; everything else, including every frame the fast path has the least doubt about,
    /// goes through etherparse ([`PacketView::parse_general`]). Both give the same view (a property test
    /// holds them to it).
    #[inline]
    pub fn parse(buf: &'a [u8], vnet_hdr_len: usize) -> Result<Self, NetError> {
        match Self::parse_fast(buf, vnet_hdr_len) {
            Some(v) => Ok(v),
            None => Self::parse_general(buf, vnet_hdr_len),
        }
    }

    #[inline]
    fn parse_fast(buf: &'a [u8], vnet: usize) -> Option<Self> {
        let l3 = vnet.checked_add(14)?;
        let ip = buf.get(l3..l3 + 20)?;
        if buf.get(vnet + 12..vnet + 14)? != [0x08, 0x00] || ip[0] != 0x45 {
            return None;
        }
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
        let ip_end = l3 + total;
        if total < 20 || ip_end > buf.len() || frag != 0 {
            return None;
        }
        let l4 = l3 + 20;
        let proto = ip[9];
        let word = |a: usize| u32::from_be_bytes([buf[a], buf[a + 1], buf[a + 2], buf[a + 3]]);
        let (transport, l4_csum) = match proto {
            ip_proto::TCP => {
                if total < 40 {
                    return None;
                }
                let header_len = usize::from(buf[l4 + 12] >> 4) * 4;
                if header_len < 20 || 20 + header_len > total {
                    return None;
                }
                let t = TcpMeta {
                    src_port: u16::from_be_bytes([buf[l4], buf[l4 + 1]]),
                    dst_port: u16::from_be_bytes([buf[l4 + 2], buf[l4 + 3]]),
                    seq: word(l4 + 4),
                    ack: word(l4 + 8),
                    flags: buf[l4 + 13],
                    window: u16::from_be_bytes([buf[l4 + 14], buf[l4 + 15]]),
                    header: l4,
                    header_len,
                    payload: l4 + header_len,
                    payload_len: total - 20 - header_len,
                };
                (Transport::Tcp(t), Some(l4 + 16))
            }
            ip_proto::UDP => {
                if total < 28 || usize::from(u16::from_be_bytes([buf[l4 + 4], buf[l4 + 5]])) != total - 20 {
                    return None;
                }
                let src_port = u16::from_be_bytes([buf[l4], buf[l4 + 1]]);
                let dst_port = u16::from_be_bytes([buf[l4 + 2], buf[l4 + 3]]);
                (Transport::Udp { src_port, dst_port }, Some(l4 + 6))
            }
            _ => return None,
        };
        Some(PacketView {
            buf,
            l2: vnet,
            l3,
            l4,
            ip_end,
            version: IpVersion::V4,
            src: u128::from(word(l3 + 12)),
            dst: u128::from(word(l3 + 16)),
            proto,
            fragment: false,
            vlan: 0,
            l4_csum,
            transport,
        })
    }

    /// Slices `buf` with etherparse; handles every supported layout (see the module docs).
    pub fn parse_general(buf: &'a [u8], vnet_hdr_len: usize) -> Result<Self, NetError> {
        let len = buf.len();
        let Some(eth) = buf.get(vnet_hdr_len..) else {
            return Err(NetError::Malformed {
                len,
                what: format!("shorter than the {vnet_hdr_len}-byte virtio-net header"),
            });
        };
        let sliced = SlicedPacket::from_ethernet(eth).map_err(|e| NetError::Malformed {
            len,
            what: e.to_string(),
        })?;
        let mut vlan = 0u32;
        let mut tags = 0;
        for ext in &sliced.link_exts {
            match ext {
                LinkExtSlice::Vlan(v) => {
                    vlan = (vlan << 16) | u32::from(v.vlan_identifier().value());
                    tags += 1;
                }
                LinkExtSlice::Macsec(_) => return Err(NetError::Unsupported { len, what: "MACsec" }),
            }
        }
        if tags > 2 {
            return Err(NetError::Unsupported {
                len,
                what: "more than two VLAN tags",
            });
        }
        if tags > 0 {
            vlan |= 1 << 31;
        }
        let (l3, version, src, dst, ip_len, payload) = match &sliced.net {
            Some(NetSlice::Ipv4(ip)) => {
                let h = ip.header();
                let l3 = offset_in(buf, h.slice());
                (
                    l3,
                    IpVersion::V4,
                    u128::from(u32::from_be_bytes(h.source())),
                    u128::from(u32::from_be_bytes(h.destination())),
                    usize::from(h.total_len()),
                    ip.payload(),
                )
            }
            Some(NetSlice::Ipv6(ip)) => {
                let h = ip.header();
                let l3 = offset_in(buf, h.slice());
                (
                    l3,
                    IpVersion::V6,
                    u128::from_be_bytes(h.source()),
                    u128::from_be_bytes(h.destination()),
                    40 + usize::from(h.payload_length()),
                    ip.payload(),
                )
            }
            Some(NetSlice::Arp(_)) => return Err(NetError::Unsupported { len, what: "ARP" }),
            None => {
                return Err(NetError::Unsupported {
                    len,
                    what: "non-IP ethertype",
                });
            }
        };
        let l4 = offset_in(buf, payload.payload);
        // etherparse cut the payload at the IP length; make the IP end agree with it.
        let ip_end = l4 + payload.payload.len();
        if l3 + ip_len < ip_end || ip_end > len {
            return Err(NetError::Malformed {
                len,
                what: format!("IP length {ip_len} inconsistent"),
            });
        }
        let proto = payload.ip_number.0;
        let fragment = payload.fragmented;
        let (transport, l4_csum) = match &sliced.transport {
            _ if fragment => (Transport::Other, None),
            Some(TransportSlice::Tcp(t)) => {
                let header = offset_in(buf, t.slice());
                let header_len = t.header_slice().len();
                let p = t.payload();
                (
                    Transport::Tcp(TcpMeta {
                        src_port: t.source_port(),
                        dst_port: t.destination_port(),
                        seq: t.sequence_number(),
                        ack: t.acknowledgment_number(),
                        flags: t.header_slice()[13],
                        window: t.window_size(),
                        header,
                        header_len,
                        payload: offset_in(buf, p),
                        payload_len: p.len(),
                    }),
                    Some(header + 16),
                )
            }
            Some(TransportSlice::Udp(u)) => (
                Transport::Udp {
                    src_port: u.source_port(),
                    dst_port: u.destination_port(),
                },
                Some(offset_in(buf, u.slice()) + 6),
            ),
            Some(TransportSlice::Icmpv4(i)) => (Transport::Icmp, Some(offset_in(buf, i.slice()) + 2)),
            Some(TransportSlice::Icmpv6(i)) => (Transport::Icmp, Some(offset_in(buf, i.slice()) + 2)),
            Some(TransportSlice::Igmp(_)) | None => {
                // etherparse leaves the transport empty when the TCP/UDP/ICMP header does not fit.
                if matches!(
                    proto,
                    ip_proto::TCP | ip_proto::UDP | ip_proto::ICMP | ip_proto::ICMPV6
                ) {
                    return Err(NetError::Malformed {
                        len,
                        what: format!("truncated IP protocol {proto} header"),
                    });
                }
                (Transport::Other, None)
            }
        };
        Ok(PacketView {
            buf,
            l2: vnet_hdr_len,
            l3,
            l4,
            ip_end,
            version,
            src,
            dst,
            proto,
            fragment,
            vlan,
            l4_csum,
            transport,
        })
    }

    /// The whole buffer the view was parsed from.
    pub fn buf(&self) -> &'a [u8] {
        self.buf
    }

    /// The TCP metadata, if this is an unfragmented TCP segment.
    pub fn tcp(&self) -> Option<&TcpMeta> {
        match &self.transport {
            Transport::Tcp(t) => Some(t),
            _ => None,
        }
    }

    /// The TCP payload bytes (empty for anything else).
    pub fn tcp_payload(&self) -> &'a [u8] {
        match &self.transport {
            Transport::Tcp(t) => self.buf.get(t.payload..t.payload + t.payload_len).unwrap_or(&[]),
            _ => &[],
        }
    }

    /// The TCP options bytes (empty for anything else).
    pub fn tcp_options(&self) -> &'a [u8] {
        match &self.transport {
            Transport::Tcp(t) => self
                .buf
                .get(t.header + 20..t.header + t.header_len)
                .unwrap_or(&[]),
            _ => &[],
        }
    }

    /// True if the virtio-net header says the L4 checksum is partial.
    pub fn csum_partial(&self) -> bool {
        self.l2 > 0
            && self
                .buf
                .first()
                .is_some_and(|f| f & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0)
    }
}

/// Where the parts of a frame are, as [`masked_diff`] needs them; small enough to keep beside a queued frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Offset of the Ethernet header.
    pub l2: u32,
    /// Offset of the IP header.
    pub l3: u32,
    /// Offset of the IP payload.
    pub l4: u32,
    /// End of the IP packet.
    pub ip_end: u32,
    /// Offset of the transport checksum, or 0 when there is none to skip.
    pub l4_csum: u32,
    /// IP version.
    pub version: IpVersion,
}

impl PacketView<'_> {
    /// The offsets of this frame.
    pub fn layout(&self) -> Layout {
        // Frames are capped far below 4 GiB by the comparator before they get here.
        Layout {
            l2: self.l2 as u32,
            l3: self.l3 as u32,
            l4: self.l4 as u32,
            ip_end: self.ip_end as u32,
            l4_csum: self.l4_csum.unwrap_or(0) as u32,
            version: self.version,
        }
    }
}

/// Compares two frames' IP packets byte by byte, skipping the fields two identical guests legitimately
/// differ in: IPv4 identification, TTL and header checksum; IPv6 hop limit and flow label; and the transport
/// checksum at `l4_csum`. The link header (MAC addresses, VLAN tags) is compared too; link padding after the
/// IP packet and the virtio-net header are not.
///
/// Returns `None` when equal, else the offset (from the start of the IP header) of the first difference.
/// Both layouts must describe their buffers (as [`PacketView::layout`] does); a layout that does not fit
/// its buffer compares as different at offset 0 instead of panicking.
pub fn masked_diff(ab: &[u8], a: &Layout, bb: &[u8], b: &Layout) -> Option<usize> {
    let fits = |buf: &[u8], l: &Layout| {
        l.l2 <= l.l3 && l.l3 <= l.l4 && l.l4 <= l.ip_end && l.ip_end as usize <= buf.len()
    };
    if !fits(ab, a) || !fits(bb, b) {
        return Some(0);
    }
    let a_l2 = &ab[a.l2 as usize..a.l3 as usize];
    let b_l2 = &bb[b.l2 as usize..b.l3 as usize];
    if a_l2 != b_l2
        || a.ip_end - a.l3 != b.ip_end - b.l3
        || a.version != b.version
        || a.l4 - a.l3 != b.l4 - b.l3
    {
        return Some(0);
    }
    let ip_a = &ab[a.l3 as usize..a.ip_end as usize];
    let ip_b = &bb[b.l3 as usize..b.ip_end as usize];
    // Fields to skip, as (start, end) relative to the IP header; sorted.
    let mut skip = [(0usize, 0usize); 4];
    let mut n = match a.version {
        IpVersion::V4 => {
            skip[0] = (4, 6); // identification
            skip[1] = (8, 9); // TTL
            skip[2] = (10, 12); // header checksum
            3
        }
        IpVersion::V6 => {
            // Flow label: low 4 bits of byte 1 and bytes 2..4; compare the high nibble of byte 1 below.
            skip[0] = (1, 4);
            skip[1] = (7, 8); // hop limit
            2
        }
    };
    let (ca, cb) = (a.l4_csum as usize, b.l4_csum as usize);
    if ca >= a.l3 as usize + 8
        && ca.wrapping_sub(a.l3 as usize) == cb.wrapping_sub(b.l3 as usize)
        && ca + 2 <= a.ip_end as usize
    {
        let at = ca - a.l3 as usize;
        skip[n] = (at, at + 2);
        n += 1;
    }
    if a.version == IpVersion::V6
        && ip_a.len() >= 2
        && (ip_a[0] != ip_b[0] || ip_a[1] & 0xf0 != ip_b[1] & 0xf0)
    {
        return Some(0);
    }
    let mut pos = 0;
    for &(s, e) in &skip[..n] {
        let s = s.min(ip_a.len());
        if let Some(i) = first_diff(&ip_a[pos..s], &ip_b[pos..s]) {
            return Some(pos + i);
        }
        pos = e.min(ip_a.len());
    }
    first_diff(&ip_a[pos..], &ip_b[pos..]).map(|i| pos + i)
}

/// Index of the first differing byte of two equally long slices. Compares in blocks so equal data
/// runs at memcmp speed.
#[inline]
pub(crate) fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    debug_assert_eq!(a.len(), b.len());
    if a == b {
        return None;
    }
    const BLOCK: usize = 64;
    let mut off = 0;
    for (ca, cb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        if ca != cb {
            return ca.iter().zip(cb).position(|(x, y)| x != y).map(|i| off + i);
        }
        off += ca.len();
    }
    None
}
