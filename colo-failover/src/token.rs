//! Fencing tokens and the gate that rejects a stale holder's output.

use std::fmt;

/// A fencing token: a number handed out with every arbiter grant that only ever grows from one holder to the
/// next.
///
/// A node attaches the token it holds to everything it lets out of the pair (released network frames, disk
/// writes to shared storage, commands to a load balancer). The receiving side keeps a [`FenceGate`] and rejects
/// anything stamped with a token lower than the highest it has seen, so a node that lost the arbiter without
/// noticing (paused, partitioned, slow) cannot corrupt what the new holder already wrote.
///
/// [`FenceToken::ZERO`] is the token of a pair that never failed over: the first primary of a COLO pair runs
/// with it until some failover hands out a real grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FenceToken(pub u64);

impl FenceToken {
    /// The token of a primary that has never been through a failover.
    pub const ZERO: FenceToken = FenceToken(0);

    /// The raw value, for stamping into a frame header or a disk request.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The token as 8 big-endian bytes (the form used on the wire by the witness protocol and suggested for
    /// output headers).
    pub fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// Reads a token written by [`FenceToken::to_be_bytes`].
    pub fn from_be_bytes(bytes: [u8; 8]) -> Self {
        FenceToken(u64::from_be_bytes(bytes))
    }
}

impl fmt::Display for FenceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fence#{}", self.0)
    }
}

/// Why a [`FenceGate`] refused an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stale fencing token {presented}: the gate has already seen {highest}")]
pub struct StaleToken {
    /// The token attached to the rejected output.
    pub presented: FenceToken,
    /// The highest token the gate had accepted before.
    pub highest: FenceToken,
}

/// The receiving side of fencing: accepts outputs stamped with the highest token seen so far (or a higher one,
/// which becomes the new highest) and rejects anything older.
///
/// Put one in front of every resource that both nodes of a pair could reach: the shared disk or block server,
/// the switch port or tap writer that releases client frames, a load balancer. It needs no clock and no
/// network; it is the last line of defence when leases and heartbeats have been fooled by a pause or a clock
/// jump.
///
/// ```
/// use colo_failover::{FenceGate, FenceToken};
/// let mut gate = FenceGate::new();
/// assert!(gate.check(FenceToken(7)).is_ok()); // the old primary writes
/// assert!(gate.check(FenceToken(9)).is_ok()); // the promoted secondary writes: 9 becomes the floor
/// assert!(gate.check(FenceToken(7)).is_err()); // the old primary wakes up: rejected
/// ```
#[derive(Debug, Clone, Default)]
pub struct FenceGate {
    highest: FenceToken,
    rejected: u64,
}

impl FenceGate {
    /// A gate that has seen nothing yet (it accepts [`FenceToken::ZERO`] and above).
    pub fn new() -> Self {
        Self::default()
    }

    /// A gate that starts from a floor it persisted earlier (see [`FenceGate::highest`]).
    pub fn with_floor(highest: FenceToken) -> Self {
        FenceGate { highest, rejected: 0 }
    }

    /// Admits an output stamped with `token`, or rejects it if a newer holder has already been seen.
    pub fn check(&mut self, token: FenceToken) -> Result<(), StaleToken> {
        if token < self.highest {
            self.rejected += 1;
            return Err(StaleToken {
                presented: token,
                highest: self.highest,
            });
        }
        self.highest = token;
        Ok(())
    }

    /// Whether `token` would be admitted, without recording anything.
    pub fn would_accept(&self, token: FenceToken) -> bool {
        token >= self.highest
    }

    /// The highest token admitted so far (persist it if the gate must survive a restart).
    pub fn highest(&self) -> FenceToken {
        self.highest
    }

    /// How many outputs the gate has rejected.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_rejects_older_tokens_and_accepts_equal_or_newer() {
        let mut gate = FenceGate::new();
        assert_eq!(gate.check(FenceToken::ZERO), Ok(()));
        assert_eq!(gate.check(FenceToken(3)), Ok(()));
        assert_eq!(gate.check(FenceToken(3)), Ok(()));
        assert_eq!(
            gate.check(FenceToken(2)),
            Err(StaleToken {
                presented: FenceToken(2),
                highest: FenceToken(3)
            })
        );
        assert_eq!(gate.highest(), FenceToken(3));
        assert_eq!(gate.rejected(), 1);
        assert!(!gate.would_accept(FenceToken::ZERO));
        assert!(gate.would_accept(FenceToken(4)));
    }

    #[test]
    fn gate_restored_from_floor_keeps_rejecting() {
        let mut gate = FenceGate::with_floor(FenceToken(10));
        assert!(gate.check(FenceToken(9)).is_err());
        assert!(gate.check(FenceToken(10)).is_ok());
    }

    #[test]
    fn token_bytes_round_trip() {
        let t = FenceToken(0x0102_0304_0506_0708);
        assert_eq!(t.to_be_bytes(), [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(FenceToken::from_be_bytes(t.to_be_bytes()), t);
    }
}
