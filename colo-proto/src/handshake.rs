//! Handshake: version and capability negotiation, and the guest layout check.
//!
//! The connecting side sends [`Hello`]; the accepting side answers with [`Welcome`] or refuses with
//! [`Message::Error`] carrying code [`REFUSED`] and the reason. Both sides then use the highest version in
//! both ranges and the intersection of capabilities. A pair whose guests differ in page size or memory layout
//! cannot replicate, and is refused with a typed [`Refusal`].
//!
//! Hello and Welcome frames are written in the sender's oldest version so that a peer one version behind can
//! still read them.

use std::fmt;

use crate::error::{Error, Result};
use crate::frame::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use crate::message::{Hello, MemoryRegion, Message, Role, Welcome};

/// Error code of a handshake refusal in [`Message::Error`].
pub const REFUSED: u32 = 1;

/// Capability bits.
pub mod caps {
    /// Pre-copy page batches ([`crate::Message::PrecopyPages`]) are accepted.
    pub const PRECOPY: u64 = 1 << 0;
    /// Disk writes are forwarded on this channel.
    pub const BLOCK_REPLICATION: u64 = 1 << 1;
    /// Secondary output frames are forwarded on this channel.
    pub const OUTPUT_FORWARDING: u64 = 1 << 2;
    /// Every capability this crate knows.
    pub const ALL: u64 = PRECOPY | BLOCK_REPLICATION | OUTPUT_FORWARDING;
}

/// What one side brings to the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalConfig {
    /// Oldest version to accept (normally [`MIN_PROTOCOL_VERSION`]).
    pub min_version: u16,
    /// Newest version to offer (normally [`PROTOCOL_VERSION`]).
    pub max_version: u16,
    /// Capability bits this side supports.
    pub capabilities: u64,
    /// This node's id.
    pub node_id: u64,
    /// This node's role.
    pub role: Role,
    /// Guest page size.
    pub page_size: u32,
    /// Guest memory layout.
    pub regions: Vec<MemoryRegion>,
}

impl LocalConfig {
    /// A configuration with the full version range and every capability.
    pub fn new(node_id: u64, role: Role, page_size: u32, regions: Vec<MemoryRegion>) -> Self {
        LocalConfig {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            capabilities: caps::ALL,
            node_id,
            role,
            page_size,
            regions,
        }
    }

    /// The offer this side sends when it connects.
    pub fn hello(&self) -> Hello {
        Hello {
            min_version: self.min_version,
            max_version: self.max_version,
            capabilities: self.capabilities,
            node_id: self.node_id,
            role: self.role,
            page_size: self.page_size,
            regions: self.regions.clone(),
        }
    }
}

/// The outcome of a successful handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Protocol version to write frames in.
    pub version: u16,
    /// Capabilities both sides support.
    pub capabilities: u64,
    /// The peer's node id.
    pub peer_node_id: u64,
    /// The peer's role.
    pub peer_role: Role,
}

/// Why a handshake was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The version ranges do not overlap.
    NoCommonVersion {
        /// This side's range.
        ours: (u16, u16),
        /// The peer's range.
        theirs: (u16, u16),
    },
    /// Guest page sizes differ.
    PageSizeMismatch {
        /// This side's page size.
        ours: u32,
        /// The peer's page size.
        theirs: u32,
    },
    /// Guest memory layouts differ.
    LayoutMismatch {
        /// This side's regions.
        ours: Vec<MemoryRegion>,
        /// The peer's regions.
        theirs: Vec<MemoryRegion>,
    },
    /// Both sides claim the same role.
    SameRole(Role),
    /// The welcome names a version or capabilities that were not offered.
    BadWelcome(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoCommonVersion { ours, theirs } => write!(
                f,
                "no common protocol version: ours {}..={}, theirs {}..={}",
                ours.0, ours.1, theirs.0, theirs.1
            ),
            Refusal::PageSizeMismatch { ours, theirs } => {
                write!(f, "guest page size differs: ours {ours}, theirs {theirs}")
            }
            Refusal::LayoutMismatch { ours, theirs } => {
                write!(
                    f,
                    "guest memory layout differs: ours {ours:x?}, theirs {theirs:x?}"
                )
            }
            Refusal::SameRole(r) => write!(f, "both sides are {r:?}"),
            Refusal::BadWelcome(w) => write!(f, "bad welcome: {w}"),
        }
    }
}

/// The highest version in both ranges, if any.
pub fn highest_common_version(ours: (u16, u16), theirs: (u16, u16)) -> Option<u16> {
    let hi = ours.1.min(theirs.1);
    let lo = ours.0.max(theirs.0);
    (lo <= hi).then_some(hi)
}

fn check_guest(
    local: &LocalConfig,
    page_size: u32,
    regions: &[MemoryRegion],
    role: Role,
) -> Result<(), Refusal> {
    if page_size != local.page_size {
        return Err(Refusal::PageSizeMismatch {
            ours: local.page_size,
            theirs: page_size,
        });
    }
    if regions != local.regions.as_slice() {
        return Err(Refusal::LayoutMismatch {
            ours: local.regions.clone(),
            theirs: regions.to_vec(),
        });
    }
    if role == local.role {
        return Err(Refusal::SameRole(role));
    }
    Ok(())
}

/// Accepting side: checks an offer. On success returns the [`Welcome`] to send and the negotiated result;
/// on refusal the caller sends [`refusal_message`] and closes.
pub fn accept(local: &LocalConfig, hello: &Hello) -> Result<(Welcome, Negotiated), Refusal> {
    let ours = (local.min_version, local.max_version);
    let theirs = (hello.min_version, hello.max_version);
    let version = highest_common_version(ours, theirs).ok_or(Refusal::NoCommonVersion { ours, theirs })?;
    check_guest(local, hello.page_size, &hello.regions, hello.role)?;
    let capabilities = local.capabilities & hello.capabilities;
    let welcome = Welcome {
        version,
        capabilities,
        node_id: local.node_id,
        role: local.role,
        page_size: local.page_size,
        regions: local.regions.clone(),
    };
    let negotiated = Negotiated {
        version,
        capabilities,
        peer_node_id: hello.node_id,
        peer_role: hello.role,
    };
    Ok((welcome, negotiated))
}

/// Connecting side: checks the peer's answer to our [`Hello`].
pub fn complete(local: &LocalConfig, answer: Message) -> Result<Negotiated> {
    let w = match answer {
        Message::Welcome(w) => w,
        Message::Error { code, text } => return Err(Error::PeerRefused { code, text }),
        other => {
            return Err(Error::Unexpected {
                state: "waiting for welcome",
                kind: other.kind(),
            });
        }
    };
    if !(local.min_version..=local.max_version).contains(&w.version) {
        return Err(Error::Refused(Refusal::BadWelcome(format!(
            "version {} was not offered",
            w.version
        ))));
    }
    if w.capabilities & !local.capabilities != 0 {
        return Err(Error::Refused(Refusal::BadWelcome(format!(
            "capabilities {:#x} were not offered",
            w.capabilities
        ))));
    }
    check_guest(local, w.page_size, &w.regions, w.role).map_err(Error::Refused)?;
    Ok(Negotiated {
        version: w.version,
        capabilities: w.capabilities,
        peer_node_id: w.node_id,
        peer_role: w.role,
    })
}

/// The message that tells the peer why its offer was refused.
///
/// The text is cut to [`MAX_REFUSAL_TEXT`] bytes: a layout mismatch quotes the peer's regions, and a
/// long list would not fit a control message, so the peer would never learn why it was refused.
pub fn refusal_message(r: &Refusal) -> Message {
    let mut text = r.to_string();
    if text.len() > MAX_REFUSAL_TEXT {
        let mut end = MAX_REFUSAL_TEXT - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    Message::Error { code: REFUSED, text }
}

/// Longest refusal text [`refusal_message`] sends.
pub const MAX_REFUSAL_TEXT: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(role: Role) -> LocalConfig {
        LocalConfig::new(
            1,
            role,
            4096,
            vec![MemoryRegion {
                gpa: 0,
                size: 1 << 30,
            }],
        )
    }

    #[test]
    fn a_refusal_quoting_a_huge_layout_still_fits_a_control_message() {
        let regions = |n: u64| {
            (0..n)
                .map(|i| MemoryRegion {
                    gpa: i << 32,
                    size: 4096,
                })
                .collect()
        };
        let local = LocalConfig::new(1, Role::Secondary, 4096, regions(1));
        let mut hello = LocalConfig::new(2, Role::Primary, 4096, regions(50_000)).hello();
        hello.min_version = MIN_PROTOCOL_VERSION;
        let refusal = accept(&local, &hello).unwrap_err();
        let msg = refusal_message(&refusal);
        let Message::Error { text, .. } = &msg else {
            panic!("not an error message");
        };
        assert!(text.len() <= MAX_REFUSAL_TEXT && text.starts_with("guest memory layout differs"));
        msg.encode(PROTOCOL_VERSION, &mut Vec::new()).unwrap();
    }

    #[test]
    fn picks_highest_common_version() {
        assert_eq!(highest_common_version((1, 2), (1, 2)), Some(2));
        assert_eq!(highest_common_version((1, 2), (2, 3)), Some(2));
        assert_eq!(highest_common_version((1, 2), (0, 1)), Some(1));
        assert_eq!(highest_common_version((2, 2), (0, 1)), None);
    }

    #[test]
    fn previous_version_peer_is_accepted() {
        let p = cfg(Role::Primary);
        let mut s = cfg(Role::Secondary);
        s.max_version = 1;
        let (w, n) = accept(&s, &p.hello()).unwrap();
        assert_eq!(n.version, 1);
        assert_eq!(complete(&p, Message::Welcome(w)).unwrap().version, 1);
    }

    #[test]
    fn page_size_and_layout_mismatch_are_refused() {
        let p = cfg(Role::Primary);
        let mut s = cfg(Role::Secondary);
        s.page_size = 65536;
        assert!(matches!(
            accept(&s, &p.hello()),
            Err(Refusal::PageSizeMismatch {
                ours: 65536,
                theirs: 4096
            })
        ));
        let mut s = cfg(Role::Secondary);
        s.regions.push(MemoryRegion {
            gpa: 1 << 32,
            size: 4096,
        });
        let r = accept(&s, &p.hello()).unwrap_err();
        assert!(matches!(r, Refusal::LayoutMismatch { .. }));
        let text = refusal_message(&r);
        let Message::Error { code: REFUSED, text } = text else {
            panic!("not a refusal")
        };
        assert!(text.contains("layout"), "{text}");
    }

    #[test]
    fn refusal_is_reported_to_the_connecting_side() {
        let p = cfg(Role::Primary);
        let r = refusal_message(&Refusal::SameRole(Role::Primary));
        assert!(matches!(
            complete(&p, r),
            Err(Error::PeerRefused { code: REFUSED, .. })
        ));
    }
}
