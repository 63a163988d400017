//! The lease table: the sans-IO core of an arbiter (used by the witness server and by the model tests).

use std::time::{Duration, Instant};

use crate::FenceToken;

/// What the lease table answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAnswer {
    /// The caller holds the lease until `ttl` after the request.
    Granted {
        /// The holding's fencing token.
        token: FenceToken,
        /// The (possibly capped) time to live.
        ttl: Duration,
    },
    /// Another node holds it.
    Denied {
        /// The holder's token.
        holder: FenceToken,
    },
    /// The table is still waiting out leases that may have been granted before a restart.
    NotReady {
        /// How long until it grants again.
        retry_after: Duration,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Holding {
    node: String,
    token: FenceToken,
    expires: Instant,
}

/// One lease with a holder, an expiry and a term (the fencing token) that grows with every new holder.
///
/// Semantics (the same as the etcd arbiter's): a request from the holder extends its lease and keeps its
/// token; a request from anybody else is denied until the lease has expired on this table's clock; the next
/// holder gets `term + 1`. A table created with [`LeaseTable::restarted`] grants nothing for one maximum TTL,
/// so leases it may have granted before it lost its memory run out first.
#[derive(Debug, Clone)]
pub struct LeaseTable {
    term: u64,
    holder: Option<Holding>,
    not_before: Option<Instant>,
    max_ttl: Duration,
}

impl LeaseTable {
    /// A fresh table whose first grant gets a token above `term_floor`. TTLs are capped at `max_ttl` (itself capped
    /// at [`MAX_LEASE_TTL`](crate::MAX_LEASE_TTL)).
    pub fn new(term_floor: u64, max_ttl: Duration) -> Self {
        let max_ttl = max_ttl.min(crate::MAX_LEASE_TTL);
        LeaseTable {
            term: term_floor,
            holder: None,
            not_before: None,
            max_ttl,
        }
    }

    /// A table that lost its holder on a restart at `now`: grants nothing before `now + max_ttl`.
    pub fn restarted(now: Instant, term_floor: u64, max_ttl: Duration) -> Self {
        let max_ttl = max_ttl.min(crate::MAX_LEASE_TTL);
        LeaseTable {
            term: term_floor,
            holder: None,
            not_before: Some(now + max_ttl),
            max_ttl,
        }
    }

    /// The last term handed out (persist it before a grant with a new term is answered).
    pub fn term(&self) -> u64 {
        self.term
    }

    /// The term a grant to `node` at `now` would use (what to persist before calling [`LeaseTable::acquire`]).
    pub fn next_term(&self, now: Instant, node: &str) -> u64 {
        match self.live_holder(now) {
            Some(h) if h.node == node => self.term,
            _ => self.term.saturating_add(1),
        }
    }

    /// The current holder, its token and its remaining time, at `now`.
    pub fn holder(&self, now: Instant) -> Option<(&str, FenceToken, Duration)> {
        self.live_holder(now)
            .map(|h| (h.node.as_str(), h.token, h.expires.saturating_duration_since(now)))
    }

    fn live_holder(&self, now: Instant) -> Option<&Holding> {
        self.holder.as_ref().filter(|h| now < h.expires)
    }

    /// `node` asks to hold the lease for `ttl` from `now`.
    pub fn acquire(&mut self, now: Instant, node: &str, ttl: Duration) -> LeaseAnswer {
        if let Some(nb) = self.not_before {
            if now < nb {
                return LeaseAnswer::NotReady {
                    retry_after: nb - now,
                };
            }
            self.not_before = None;
        }
        let ttl = ttl.min(self.max_ttl);
        match self.live_holder(now) {
            Some(h) if h.node == node => {
                let token = h.token;
                self.holder = Some(Holding {
                    node: node.to_owned(),
                    token,
                    expires: now + ttl,
                });
                LeaseAnswer::Granted { token, ttl }
            }
            Some(h) => LeaseAnswer::Denied { holder: h.token },
            // Every token is used up (a damaged or crafted term file): a new holder could only get a token
            // an earlier holder had, so nobody new may hold the lease.
            None if self.term == u64::MAX => LeaseAnswer::Denied {
                holder: FenceToken(self.term),
            },
            None => {
                self.term += 1;
                let token = FenceToken(self.term);
                self.holder = Some(Holding {
                    node: node.to_owned(),
                    token,
                    expires: now + ttl,
                });
                LeaseAnswer::Granted { token, ttl }
            }
        }
    }

    /// `node` asks to extend its holding `token`. Denied if it no longer holds exactly that.
    pub fn renew(&mut self, now: Instant, node: &str, token: FenceToken, ttl: Duration) -> LeaseAnswer {
        let ttl = ttl.min(self.max_ttl);
        match self.holder.as_mut() {
            Some(h) if now < h.expires && h.node == node && h.token == token => {
                h.expires = now + ttl;
                LeaseAnswer::Granted { token, ttl }
            }
            _ => LeaseAnswer::Denied {
                holder: self.live_holder(now).map_or(FenceToken(self.term), |h| h.token),
            },
        }
    }

    /// `node` gives up its holding `token` (ignored if it does not hold exactly that).
    pub fn release(&mut self, now: Instant, node: &str, token: FenceToken) -> bool {
        if self
            .live_holder(now)
            .is_some_and(|h| h.node == node && h.token == token)
        {
            self.holder = None;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_millis(1000);

    #[test]
    fn one_holder_at_a_time_and_tokens_grow_per_holder() {
        let t0 = Instant::now();
        let mut t = LeaseTable::new(0, Duration::from_secs(10));
        assert_eq!(
            t.acquire(t0, "a", TTL),
            LeaseAnswer::Granted {
                token: FenceToken(1),
                ttl: TTL
            }
        );
        assert_eq!(
            t.acquire(t0, "b", TTL),
            LeaseAnswer::Denied {
                holder: FenceToken(1)
            }
        );
        // The holder re-acquires: same token, extended.
        let t1 = t0 + Duration::from_millis(900);
        assert_eq!(
            t.acquire(t1, "a", TTL),
            LeaseAnswer::Granted {
                token: FenceToken(1),
                ttl: TTL
            }
        );
        assert_eq!(
            t.acquire(t0 + Duration::from_millis(1899), "b", TTL),
            LeaseAnswer::Denied {
                holder: FenceToken(1)
            }
        );
        // Expired: b wins with a larger token; a's renewal is refused.
        let t2 = t0 + Duration::from_millis(1900);
        assert_eq!(
            t.acquire(t2, "b", TTL),
            LeaseAnswer::Granted {
                token: FenceToken(2),
                ttl: TTL
            }
        );
        assert_eq!(
            t.renew(t2, "a", FenceToken(1), TTL),
            LeaseAnswer::Denied {
                holder: FenceToken(2)
            }
        );
        assert_eq!(
            t.renew(t2, "b", FenceToken(2), TTL),
            LeaseAnswer::Granted {
                token: FenceToken(2),
                ttl: TTL
            }
        );
    }

    #[test]
    fn release_hands_over_at_once_and_renew_after_expiry_is_denied() {
        let t0 = Instant::now();
        let mut t = LeaseTable::new(41, Duration::from_secs(10));
        assert_eq!(
            t.acquire(t0, "a", TTL),
            LeaseAnswer::Granted {
                token: FenceToken(42),
                ttl: TTL
            }
        );
        assert!(!t.release(t0, "a", FenceToken(7)));
        assert!(t.release(t0, "a", FenceToken(42)));
        assert_eq!(
            t.acquire(t0, "b", TTL),
            LeaseAnswer::Granted {
                token: FenceToken(43),
                ttl: TTL
            }
        );
        let late = t0 + TTL;
        assert!(matches!(
            t.renew(late, "b", FenceToken(43), TTL),
            LeaseAnswer::Denied { .. }
        ));
    }

    #[test]
    fn restarted_table_waits_out_old_leases_and_caps_ttl() {
        let t0 = Instant::now();
        let max = Duration::from_secs(2);
        let mut t = LeaseTable::restarted(t0, 5, max);
        assert_eq!(
            t.acquire(t0 + Duration::from_millis(500), "a", TTL),
            LeaseAnswer::NotReady {
                retry_after: Duration::from_millis(1500)
            }
        );
        assert_eq!(
            t.acquire(t0 + max, "a", Duration::from_secs(60)),
            LeaseAnswer::Granted {
                token: FenceToken(6),
                ttl: max
            }
        );
        assert_eq!(t.next_term(t0 + max, "a"), 6);
        assert_eq!(t.next_term(t0 + max, "b"), 7);
    }

    #[test]
    fn exhausted_tokens_are_never_handed_out_twice() {
        let t0 = Instant::now();
        let mut t = LeaseTable::new(u64::MAX - 1, Duration::from_secs(10));
        assert_eq!(
            t.acquire(t0, "a", TTL),
            LeaseAnswer::Granted {
                token: FenceToken(u64::MAX),
                ttl: TTL
            }
        );
        // The holder keeps renewing its token.
        assert!(matches!(
            t.renew(t0, "a", FenceToken(u64::MAX), TTL),
            LeaseAnswer::Granted { .. }
        ));
        // Once it lapses, nobody gets the lease again: the only token left would repeat `a`'s.
        let later = t0 + 2 * TTL;
        assert_eq!(t.next_term(later, "b"), u64::MAX);
        assert_eq!(
            t.acquire(later, "b", TTL),
            LeaseAnswer::Denied {
                holder: FenceToken(u64::MAX)
            }
        );
        assert!(t.holder(later).is_none());
    }
}
