//! The `Arbiter` seam: who may run the guest alone.
//!
//! The node machine never talks to an arbiter itself. It emits [`Action::AcquireArbiter`],
//! [`Action::RenewArbiter`] or [`Action::ReleaseArbiter`]; the VMM calls the matching method of its
//! [`Arbiter`] (these do their own blocking I/O, with bounded timeouts) and feeds the answer back with
//! [`Node::handle_arbiter`](crate::Node::handle_arbiter), which turns it into an [`Event`].
//!
//! [`Action::AcquireArbiter`]: crate::Action::AcquireArbiter
//! [`Action::RenewArbiter`]: crate::Action::RenewArbiter
//! [`Action::ReleaseArbiter`]: crate::Action::ReleaseArbiter
//! [`Event`]: crate::Event

use std::time::Duration;

use crate::FenceToken;

/// A won (or renewed) arbiter grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The fencing token of this holding. Re-acquiring or renewing a lease one still holds returns the same
    /// token; a new holder always gets a larger one.
    pub token: FenceToken,
    /// How long the grant lasts without renewal, counted from when the request was sent. `None` means it never
    /// expires (only [`NoArbiter`]).
    pub ttl: Option<Duration>,
}

/// The arbiter's answer to an acquire or renew request that reached it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// This node holds the arbiter.
    Granted(Grant),
    /// Another node holds it (its token, if the arbiter tells).
    Denied {
        /// The current holder's token.
        holder: Option<FenceToken>,
    },
}

/// An arbiter request that did not get an answer (or got a malformed one).
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    /// Connecting to, writing to or reading from the arbiter failed or timed out.
    #[error("arbiter {endpoint}: {op} failed: {source}")]
    Io {
        /// Where the arbiter lives.
        endpoint: String,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The arbiter answered something this client does not understand.
    #[error("arbiter {endpoint}: bad answer: {detail}")]
    Protocol {
        /// Where the arbiter lives.
        endpoint: String,
        /// What was wrong.
        detail: String,
    },
    /// The arbiter is reachable but not serving grants yet (a restarted witness waiting out old leases).
    #[error("arbiter {endpoint} is not granting yet: retry in {retry_after:?}")]
    NotReady {
        /// Where the arbiter lives.
        endpoint: String,
        /// When to ask again.
        retry_after: Duration,
    },
    /// The etcd client reported an error.
    #[error("etcd {endpoint}: {op} failed: {detail}")]
    Etcd {
        /// The etcd endpoint.
        endpoint: String,
        /// What was being done.
        op: &'static str,
        /// The client's error text.
        detail: String,
    },
    /// The node asked to renew or release a grant it does not hold.
    #[error("no grant held")]
    NotHeld,
}

/// Decides which node of a pair may run the guest alone: the fencing authority against split brain.
///
/// Implementations must keep these promises (the model tests check the node machine against a simulated
/// arbiter that keeps exactly these):
/// - at most one holder at a time; a grant lasts `ttl` from when the holder *sent* its request, and the
///   arbiter itself only hands the role to somebody else after it saw that long pass without a renewal;
/// - every new holder gets a token larger than every token handed out before (persistently, across
///   arbiter restarts);
/// - acquiring or renewing while still holding returns the same token;
/// - every call returns within a bounded time (an error is better than a hang: the node's own lease clock
///   keeps running).
pub trait Arbiter {
    /// Tries to become the holder.
    fn acquire(&mut self) -> Result<Decision, ArbiterError>;
    /// Extends the current holding. `Denied` means the holding is gone.
    fn renew(&mut self) -> Result<Decision, ArbiterError>;
    /// Gives the holding up (best effort; an expired lease has the same effect, only later).
    fn release(&mut self) -> Result<(), ArbiterError>;

    /// Whether this arbiter's tokens order the nodes of a pair (true for every real arbiter). A node that
    /// starts a pair as the primary takes a grant at the start and gives it back at once, so that its
    /// output carries the arbiter's current token rather than [`FenceToken::ZERO`], which a
    /// [`FenceGate`](crate::FenceGate) that saw an earlier failover drops. [`NoArbiter`] answers false:
    /// its tokens mean nothing across nodes, and such a primary keeps token zero.
    fn fences(&self) -> bool {
        true
    }
}

impl<A: Arbiter + ?Sized> Arbiter for Box<A> {
    fn acquire(&mut self) -> Result<Decision, ArbiterError> {
        (**self).acquire()
    }
    fn renew(&mut self) -> Result<Decision, ArbiterError> {
        (**self).renew()
    }
    fn release(&mut self) -> Result<(), ArbiterError> {
        (**self).release()
    }
    fn fences(&self) -> bool {
        (**self).fences()
    }
}

/// No fencing at all: every request is granted at once, forever.
///
/// **Unsafe under network partitions.** If the two nodes lose each other but both keep running (a cut link, a
/// dead switch port), each one declares the other dead, each one is granted, and both release output: two live
/// copies of the guest answer clients and write disks (split brain). Use it only where the pair's link cannot
/// fail independently of the nodes (a crossover cable with a watchdog, a test rig), or where an outside manager
/// fences (STONITH) before issuing the failover command. The `split_brain_with_no_arbiter` model test shows
/// the failure.
///
/// Tokens still grow (each grant is one larger than the previous grant of *this* instance), so a
/// [`FenceGate`](crate::FenceGate) still orders outputs of one node, but across two nodes they mean nothing.
#[derive(Debug)]
pub struct NoArbiter {
    next: u64,
    held: Option<FenceToken>,
}

impl NoArbiter {
    /// Opts out of fencing. The name of this constructor is the acknowledgement.
    pub fn unsafe_under_partitions() -> Self {
        NoArbiter { next: 1, held: None }
    }
}

impl Arbiter for NoArbiter {
    fn acquire(&mut self) -> Result<Decision, ArbiterError> {
        let token = match self.held {
            Some(t) => t,
            None => {
                let t = FenceToken(self.next);
                self.next = self.next.saturating_add(1);
                self.held = Some(t);
                t
            }
        };
        Ok(Decision::Granted(Grant { token, ttl: None }))
    }

    fn renew(&mut self) -> Result<Decision, ArbiterError> {
        match self.held {
            Some(token) => Ok(Decision::Granted(Grant { token, ttl: None })),
            None => Err(ArbiterError::NotHeld),
        }
    }

    fn release(&mut self) -> Result<(), ArbiterError> {
        self.held = None;
        Ok(())
    }

    fn fences(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_arbiter_grants_forever_and_grows_tokens_across_holdings() {
        let mut a = NoArbiter::unsafe_under_partitions();
        let Ok(Decision::Granted(g1)) = a.acquire() else {
            panic!("not granted")
        };
        assert_eq!(g1.ttl, None);
        assert_eq!(a.acquire().ok(), Some(Decision::Granted(g1)));
        assert_eq!(a.renew().ok(), Some(Decision::Granted(g1)));
        a.release().unwrap();
        assert!(matches!(a.renew(), Err(ArbiterError::NotHeld)));
        let Ok(Decision::Granted(g2)) = a.acquire() else {
            panic!("not granted")
        };
        assert!(g2.token > g1.token);
        assert!(!a.fences());
        let boxed: Box<dyn Arbiter> = Box::new(a);
        assert!(!boxed.fences());
    }
}
