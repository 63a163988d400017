//! What both drivers keep about their partner: the channel to it, and the failover machine (with its
//! arbiter) that decides what happens when the partner goes quiet.

use std::time::Instant;

use colo_failover::{Action as NodeAction, Arbiter, Decision, Event as NodeEvent, FenceToken, Node, Notice};
use colo_net::Time;
use colo_proto::message::encoded_len;
use colo_proto::{Message, PrimarySession, SecondarySession};

use crate::vm::Link;

/// colo-net's clock: time since the driver started.
pub(crate) fn net_time(origin: Instant, now: Instant) -> Time {
    Time::from_nanos(u64::try_from(now.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX))
}

/// A step of the failover machine that the side itself carries out.
pub(crate) enum NodeStep {
    /// A heartbeat could not be sent: the link failed (detail).
    LinkFailed(String),
    /// The secondary becomes the primary.
    Promote(FenceToken),
    /// The primary goes on without its secondary.
    ContinueAlone(FenceToken),
    /// Hold output until the arbiter decides.
    SuspendOutput,
    /// The arbiter gave the guest to the other node.
    StopGuest,
}

/// A side's checkpoint session, failed when the link to the partner is lost.
pub(crate) trait Session {
    fn fail(&mut self, error: colo_proto::Error);
}

impl Session for PrimarySession {
    fn fail(&mut self, error: colo_proto::Error) {
        PrimarySession::fail(self, error);
    }
}

impl Session for SecondarySession {
    fn fail(&mut self, error: colo_proto::Error) {
        SecondarySession::fail(self, error);
    }
}

/// The partner as one driver sees it.
pub(crate) struct Peer {
    pub(crate) link: Box<dyn Link + Send>,
    /// The link can still carry messages.
    pub(crate) ok: bool,
    /// Bytes of message bodies and page data handed to the link.
    pub(crate) bytes_sent: u64,
    pub(crate) node: Node,
    arbiter: Box<dyn Arbiter + Send>,
    heartbeat_seq: u64,
    /// Why replication ended, if it did.
    pub(crate) exit_detail: Option<String>,
    /// The lowest token output is stamped with: the grant a primary took (and gave back) at pair start.
    start_token: FenceToken,
}

impl Peer {
    pub(crate) fn new(link: Box<dyn Link + Send>, node: Node, arbiter: Box<dyn Arbiter + Send>) -> Self {
        Peer {
            link,
            ok: true,
            bytes_sent: 0,
            node,
            arbiter,
            heartbeat_seq: 0,
            exit_detail: None,
            start_token: FenceToken::ZERO,
        }
    }

    /// A new partner over `link` (re-protection): the link is up again and the last exit's detail is
    /// cleared. The failover machine, the arbiter (and any lease it holds), the start token, the
    /// heartbeat numbering and the byte count go on.
    pub(crate) fn reconnect(&mut self, link: Box<dyn Link + Send>) {
        self.link = link;
        self.ok = true;
        self.exit_detail = None;
    }

    /// A primary starting a pair: takes a grant from a fencing arbiter and gives it back at once, so its
    /// COLO output carries the arbiter's current token. Holding the grant through COLO would keep the
    /// secondary from winning the arbiter when the primary dies. Without an answer, or with
    /// [`NoArbiter`](colo_failover::NoArbiter), the output keeps token zero (a gate with a higher floor
    /// drops it: never less safe). Returns the token taken.
    pub(crate) fn take_start_token(&mut self) -> Option<FenceToken> {
        if !self.arbiter.fences() {
            return None;
        }
        let Ok(Decision::Granted(grant)) = self.arbiter.acquire() else {
            return None;
        };
        let _ = self.arbiter.release();
        self.start_token = grant.token;
        Some(grant.token)
    }

    /// The token to stamp on output released at `now` (the failover machine's, never below the start
    /// token), or `None` if nothing may be released.
    pub(crate) fn output_token(&self, now: Instant) -> Option<FenceToken> {
        self.node.output_token(now).map(|t| t.max(self.start_token))
    }

    /// Sends `msg`. `Ok(false)`: the link was down already, nothing sent. `Err(detail)`: the link failed
    /// now; the caller counts the partner as lost.
    pub(crate) fn send(&mut self, msg: &Message) -> Result<bool, String> {
        if !self.ok {
            return Ok(false);
        }
        match self.link.send(msg) {
            Ok(()) => {
                self.bytes_sent += encoded_len(msg).unwrap_or(0) as u64;
                Ok(true)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Sends `msg`; if the link fails now, loses the partner (see [`lose`](Self::lose)). Returns whether
    /// the message went out.
    pub(crate) fn send_or_lose(&mut self, now: Instant, msg: &Message, session: &mut impl Session) -> bool {
        self.send(msg).unwrap_or_else(|detail| {
            self.lose(now, detail, session);
            false
        })
    }

    /// The link is unusable: the session fails and the failover machine counts the partner as lost.
    /// Nothing changes if the link was down already.
    pub(crate) fn lose(&mut self, now: Instant, detail: String, session: &mut impl Session) {
        if !self.ok {
            return;
        }
        self.ok = false;
        self.exit_detail.get_or_insert_with(|| detail.clone());
        let _ = self.node.handle_event(now, NodeEvent::ChannelError);
        session.fail(colo_proto::Error::Local(detail));
    }

    /// Runs the failover machine's pending work (heartbeats out, arbiter calls, why the partner was
    /// lost) until it needs the side: returns that step, or `None` when it is idle.
    pub(crate) fn next_step(&mut self, now: Instant) -> Option<NodeStep> {
        while let Some(notice) = self.node.poll_notice() {
            if let Notice::PeerLost { cause } = notice {
                self.exit_detail.get_or_insert(format!("partner lost: {cause:?}"));
            }
        }
        while let Some(action) = self.node.poll_action() {
            match action {
                NodeAction::SendHeartbeat => {
                    self.heartbeat_seq += 1;
                    let m = Message::Heartbeat {
                        seq: self.heartbeat_seq,
                    };
                    if let Err(detail) = self.send(&m) {
                        return Some(NodeStep::LinkFailed(detail));
                    }
                }
                NodeAction::AcquireArbiter => {
                    let answer = self.arbiter.acquire();
                    let _ = self.node.handle_arbiter(now, answer);
                }
                NodeAction::RenewArbiter => {
                    let answer = self.arbiter.renew();
                    let _ = self.node.handle_arbiter(now, answer);
                }
                NodeAction::ReleaseArbiter => {
                    let _ = self.arbiter.release();
                }
                NodeAction::Promote { token } => return Some(NodeStep::Promote(token)),
                NodeAction::ContinueAlone { token } => return Some(NodeStep::ContinueAlone(token)),
                NodeAction::SuspendOutput => return Some(NodeStep::SuspendOutput),
                NodeAction::StopGuest => return Some(NodeStep::StopGuest),
            }
        }
        None
    }
}
