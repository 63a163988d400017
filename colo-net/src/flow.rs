//! Flow keys and the fast hasher the connection tables use.

use std::hash::{BuildHasherDefault, Hash, Hasher};

use crate::packet::{IpVersion, PacketView, Transport};

/// Identifies one direction of one connection: protocol, addresses, ports and VLAN ids.
///
/// Keys are direction-sensitive; [`FlowKey::reversed`] gives the other direction. For ICMP and other
/// protocols the ports are zero, so all such traffic between two addresses is one flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowKey {
    /// Source address (IPv4 in the low 32 bits).
    pub src: u128,
    /// Destination address.
    pub dst: u128,
    /// Source port (0 when the protocol has none).
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// VLAN ids as in [`PacketView::vlan`].
    pub vlan: u32,
    /// IP protocol number.
    pub proto: u8,
    /// IP version.
    pub version: IpVersion,
}

impl FlowKey {
    /// The key of the frame's flow.
    pub fn of(p: &PacketView<'_>) -> Self {
        let (src_port, dst_port) = match p.transport {
            Transport::Tcp(t) => (t.src_port, t.dst_port),
            Transport::Udp { src_port, dst_port } => (src_port, dst_port),
            Transport::Icmp | Transport::Other => (0, 0),
        };
        FlowKey {
            src: p.src,
            dst: p.dst,
            src_port,
            dst_port,
            vlan: p.vlan,
            proto: p.proto,
            version: p.version,
        }
    }

    /// The same connection seen in the other direction.
    pub fn reversed(&self) -> Self {
        FlowKey {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            ..*self
        }
    }
}

impl Hash for FlowKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.src as u64 ^ (self.src >> 64) as u64);
        state.write_u64(self.dst as u64 ^ (self.dst >> 64) as u64);
        state.write_u64(
            u64::from(self.src_port)
                | u64::from(self.dst_port) << 16
                | u64::from(self.proto) << 32
                | u64::from(self.version == IpVersion::V6) << 40,
        );
        state.write_u32(self.vlan);
    }
}

impl std::fmt::Display for FlowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addr = |a: u128| match self.version {
            IpVersion::V4 => std::net::IpAddr::from(std::net::Ipv4Addr::from(a as u32)),
            IpVersion::V6 => std::net::IpAddr::from(std::net::Ipv6Addr::from(a)),
        };
        write!(
            f,
            "proto {} {}:{} -> {}:{}",
            self.proto,
            addr(self.src),
            self.src_port,
            addr(self.dst),
            self.dst_port
        )?;
        if self.vlan != 0 {
            write!(f, " vlan {:#x}", self.vlan & 0x0fff_ffff)?;
        }
        Ok(())
    }
}

/// A multiply-rotate hasher (the FxHash construction) for keys that are already well spread. Flow keys
/// come from guests, so a guest can aim for collisions; the tables are bounded, which caps the damage
/// at slower lookups.
#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn finish(&self) -> u64 {
        // Fold the high bits down: hashbrown takes its bucket index from the low bits.
        self.hash ^ (self.hash >> 29)
    }
}

/// `BuildHasher` for [`FxHasher`].
pub type FxBuildHasher = BuildHasherDefault<FxHasher>;

/// A `HashMap` with [`FxHasher`].
pub type FxHashMap<K, V> = std::collections::HashMap<K, V, FxBuildHasher>;
