//! colo-failover: who runs the guest when something fails.
//!
//! In a COLO pair the primary runs the guest and releases its output once the secondary's shadow copy agrees
//! (or a checkpoint passes); the secondary runs the shadow. This crate decides roles and failover for one node:
//!
//! - [`Node`]: the sans-IO machine. Roles ([`Role`]), failover status ([`FailoverStatus`]: none, required,
//!   active, completed, relaunch), exit reasons ([`ExitReason`]), a status query ([`Node::status`], the
//!   `query-colo-status` equivalent) and a notice stream ([`Node::poll_notice`], COLO_EXIT and friends).
//!   Heartbeats go out at an interval and a missed-heartbeat timeout or a checkpoint channel error counts as
//!   losing the partner; failover is automatic on loss and can be commanded. Time is a parameter
//!   ([`Node::poll_timeout`], [`Node::handle_timeout`]); the VMM executes [`Action`]s.
//! - Fencing against split brain: before a secondary promotes itself, and before a primary that lost its
//!   partner releases output alone, the node must win an [`Arbiter`]. Every grant carries a [`FenceToken`]
//!   that only grows; outputs carry it and a [`FenceGate`] in front of each shared resource rejects a stale
//!   holder's output. Arbiters: [`NoArbiter`] (explicit, unsafe under partitions), the witness
//!   ([`witness::WitnessServer`] and [`witness::WitnessArbiter`]) and, behind the `etcd` feature, an etcd lease
//!   (`etcd::EtcdArbiter`).
//! - Re-protection: after a failover the survivor runs alone ([`FailoverStatus::Completed`]); [`Event::Protect`]
//!   starts the initial sync to a new secondary and [`Event::SyncCompleted`] returns to COLO, without stopping
//!   the guest.
//!
//! # Attaching the fencing token to outputs
//!
//! [`Node::output_token`] gives the token to stamp on everything the node lets out at a given instant (`None`:
//! release nothing). The VMM puts it where the receiving side can check it before acting:
//!
//! - released network frames: in a small header on the link to the switch-side releaser or tap writer (8 bytes,
//!   [`FenceToken::to_be_bytes`]), or as the generation of a load balancer's backend registration;
//! - disk writes to shared storage: in the request to the block server (an NBD/iSCSI persistent-reservation key,
//!   a field of a custom protocol), or as a compare-and-set precondition on an object store;
//! - any external side effect: as the generation argument of the API call.
//!
//! The receiver keeps a [`FenceGate`] (persisting [`FenceGate::highest`] if it restarts) and drops any output
//! stamped with a token older than the newest it has seen. Leases stop a healthy stale holder on time; the gate
//! stops one that was paused through its lease (a long GC-like stall, a frozen VM, a clock jump).
//!
//! # What the VMM does
//!
//! It owns sockets, threads and the clock: it sends heartbeats when asked, reports heartbeats and channel
//! errors, calls the arbiter when asked (these calls block, bounded by their timeouts) and performs the
//! takeover ([`Action::Promote`], [`Action::ContinueAlone`], [`Action::StopGuest`]).
//!
//! # Limits
//!
//! Leases assume both clocks run at about the same rate: the node counts its lease from when it *sent* the
//! request, the arbiter from when it received it, so the node always believes it expires first, but a node
//! clock running much slower than the arbiter's breaks that. The [`FenceGate`] covers what leases cannot.

#![warn(missing_docs)]

mod arbiter;
mod error;
#[cfg(feature = "etcd")]
pub mod etcd;
mod lease;
mod node;
mod token;
pub mod witness;

pub use arbiter::{Arbiter, ArbiterError, Decision, Grant, NoArbiter};
pub use error::Error;
pub use lease::{LeaseAnswer, LeaseTable};
pub use node::{
    Action, Config, Event, ExitReason, FailoverStatus, LossCause, MAX_CONFIG_DURATION, MAX_LEASE_TTL, Node,
    Notice, Role, Status,
};
pub use token::{FenceGate, FenceToken, StaleToken};
