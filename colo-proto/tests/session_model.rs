//! The checkpoint machines driven by generated event sequences, checked against deliberately naive reference
//! models: a flat "what may come next" table per side. Most generated events follow the model's script (so
//! sequences get deep into checkpoints); the rest are random, with epochs just around the right one.

use std::time::{Duration, Instant};

use bytes::Bytes;
use colo_proto::{
    DeviceStateChunk, Message, PageBatch, PrimaryAction, PrimarySession, SecondaryAction, SecondarySession,
    SessionConfig,
};
use proptest::prelude::*;

/// The naive secondary: where in the checkpoint script it is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum S {
    Running(u64),
    Paused(u64),
    Ram(u64),
    Size(u64),
    Dev(u64, u64),
    Loading(u64),
    Failed,
}

#[derive(Debug, Clone)]
enum SEv {
    Msg(Message),
    Loaded,
    Timeout,
}

fn chunk(epoch: u64, len: usize) -> Message {
    Message::DeviceState(DeviceStateChunk {
        epoch,
        device_id: 1,
        total: len as u64,
        offset: 0,
        data: Bytes::from(vec![5u8; len]),
    })
}

fn pages(epoch: u64) -> PageBatch {
    PageBatch {
        epoch,
        page_size: 4096,
        pages: vec![],
        torn: vec![],
    }
}

/// The event the script expects next (used to steer generation).
fn s_next(s: S) -> SEv {
    match s {
        S::Running(c) => SEv::Msg(Message::CheckpointRequest { epoch: c + 1 }),
        S::Paused(e) => SEv::Msg(Message::VmstateSend { epoch: e }),
        S::Ram(e) => SEv::Msg(Message::EndOfRam { epoch: e }),
        S::Size(e) => SEv::Msg(Message::VmstateSize { epoch: e, size: 10 }),
        S::Dev(e, 0) => SEv::Msg(Message::BlockBarrier { epoch: e }),
        S::Dev(e, rem) => SEv::Msg(chunk(e, rem.min(4) as usize)),
        S::Loading(_) | S::Failed => SEv::Loaded,
    }
}

/// A random event with an epoch near `base`.
fn s_random(choice: u8, base: u64, off: u8) -> SEv {
    let e = (base + u64::from(off)).saturating_sub(1);
    match choice % 12 {
        0 => SEv::Msg(Message::CheckpointRequest { epoch: e }),
        1 => SEv::Msg(Message::VmstateSend { epoch: e }),
        2 => SEv::Msg(Message::RamPages(pages(e))),
        3 => SEv::Msg(Message::PrecopyPages(pages(e))),
        4 => SEv::Msg(Message::EndOfRam { epoch: e }),
        5 => SEv::Msg(Message::VmstateSize {
            epoch: e,
            size: u64::from(off) * 3,
        }),
        6 => SEv::Msg(chunk(e, usize::from(off))),
        7 => SEv::Msg(Message::BlockBarrier { epoch: e }),
        8 => SEv::Loaded,
        9 => SEv::Timeout,
        10 => SEv::Msg(Message::VmstateLoaded { epoch: e }),
        _ => SEv::Msg(Message::CheckpointReady),
    }
}

/// The model's step: `Some(next)` if accepted, `None` if the machine must fail; local commands that are
/// refused leave the state and are reported as `Err(())`.
fn s_model(s: S, ev: &SEv) -> Result<Option<S>, ()> {
    use Message as M;
    Ok(match (s, ev) {
        (S::Failed, SEv::Msg(_)) => None,
        (S::Failed, SEv::Timeout) => Some(S::Failed),
        (S::Failed, _) => return Err(()),
        (S::Loading(e), SEv::Loaded) => Some(S::Running(e)),
        (_, SEv::Loaded) => return Err(()),
        (S::Paused(_) | S::Ram(_) | S::Size(_) | S::Dev(..), SEv::Timeout) => None,
        (_, SEv::Timeout) => Some(s),
        (S::Running(c), SEv::Msg(M::CheckpointRequest { epoch })) if *epoch == c + 1 => {
            Some(S::Paused(*epoch))
        }
        (S::Running(c), SEv::Msg(M::PrecopyPages(_))) => Some(S::Running(c)),
        (S::Paused(e), SEv::Msg(M::VmstateSend { epoch })) if *epoch == e => Some(S::Ram(e)),
        (S::Ram(e), SEv::Msg(M::RamPages(b))) if b.epoch == e => Some(S::Ram(e)),
        (S::Ram(e), SEv::Msg(M::EndOfRam { epoch })) if *epoch == e => Some(S::Size(e)),
        (S::Size(e), SEv::Msg(M::VmstateSize { epoch, size })) if *epoch == e => Some(S::Dev(e, *size)),
        (S::Dev(e, rem), SEv::Msg(M::DeviceState(c))) if c.epoch == e && c.data.len() as u64 <= rem => {
            Some(S::Dev(e, rem - c.data.len() as u64))
        }
        (S::Dev(e, 0), SEv::Msg(M::BlockBarrier { epoch })) if *epoch == e => Some(S::Loading(e)),
        _ => None,
    })
}

/// The naive primary.
#[derive(Debug, Clone, Copy, PartialEq)]
enum P {
    WaitReady,
    Running(u64),
    AwaitReply(u64),
    SendingRam(u64),
    SendingDev(u64),
    AwaitReceived(u64),
    AwaitLoaded(u64),
    Failed,
}

#[derive(Debug, Clone)]
enum PEv {
    Msg(Message),
    Start,
    RamSent,
    DevSent,
    Timeout,
}

fn p_next(p: P) -> PEv {
    match p {
        P::WaitReady => PEv::Msg(Message::CheckpointReady),
        P::Running(_) | P::Failed => PEv::Start,
        P::AwaitReply(e) => PEv::Msg(Message::CheckpointReply { epoch: e }),
        P::SendingRam(_) => PEv::RamSent,
        P::SendingDev(_) => PEv::DevSent,
        P::AwaitReceived(e) => PEv::Msg(Message::VmstateReceived { epoch: e }),
        P::AwaitLoaded(e) => PEv::Msg(Message::VmstateLoaded { epoch: e }),
    }
}

fn p_random(choice: u8, base: u64, off: u8) -> PEv {
    let e = (base + u64::from(off)).saturating_sub(1);
    match choice % 9 {
        0 => PEv::Msg(Message::CheckpointReady),
        1 => PEv::Msg(Message::CheckpointReply { epoch: e }),
        2 => PEv::Msg(Message::VmstateReceived { epoch: e }),
        3 => PEv::Msg(Message::VmstateLoaded { epoch: e }),
        4 => PEv::Start,
        5 => PEv::RamSent,
        6 => PEv::DevSent,
        7 => PEv::Timeout,
        _ => PEv::Msg(Message::CheckpointRequest { epoch: e }),
    }
}

fn p_model(p: P, ev: &PEv) -> Result<Option<P>, ()> {
    use Message as M;
    Ok(match (p, ev) {
        (P::Failed, PEv::Msg(_)) => None,
        (P::Failed, PEv::Timeout) => Some(P::Failed),
        (P::Failed, _) => return Err(()),
        (P::WaitReady | P::AwaitReply(_) | P::AwaitReceived(_) | P::AwaitLoaded(_), PEv::Timeout) => None,
        (_, PEv::Timeout) => Some(p),
        (P::Running(c), PEv::Start) => Some(P::AwaitReply(c + 1)),
        (P::SendingRam(e), PEv::RamSent) => Some(P::SendingDev(e)),
        (P::SendingDev(e), PEv::DevSent) => Some(P::AwaitReceived(e)),
        (_, PEv::Start | PEv::RamSent | PEv::DevSent) => return Err(()),
        (P::WaitReady, PEv::Msg(M::CheckpointReady)) => Some(P::Running(0)),
        (P::AwaitReply(e), PEv::Msg(M::CheckpointReply { epoch })) if *epoch == e => Some(P::SendingRam(e)),
        (P::AwaitReceived(e), PEv::Msg(M::VmstateReceived { epoch })) if *epoch == e => {
            Some(P::AwaitLoaded(e))
        }
        (P::AwaitLoaded(e), PEv::Msg(M::VmstateLoaded { epoch })) if *epoch == e => Some(P::Running(e)),
        _ => None,
    })
}

fn epoch_of_s(s: S) -> u64 {
    match s {
        S::Running(e) | S::Paused(e) | S::Ram(e) | S::Size(e) | S::Dev(e, _) | S::Loading(e) => e,
        S::Failed => 0,
    }
}

fn epoch_of_p(p: P) -> u64 {
    match p {
        P::Running(e)
        | P::AwaitReply(e)
        | P::SendingRam(e)
        | P::SendingDev(e)
        | P::AwaitReceived(e)
        | P::AwaitLoaded(e) => e,
        P::WaitReady | P::Failed => 0,
    }
}

type Steps = Vec<(bool, u8, u8)>;

fn steps() -> impl Strategy<Value = Steps> {
    // 92% of steps follow the script, the rest are random.
    proptest::collection::vec((prop::bool::weighted(0.92), any::<u8>(), 0u8..4), 1..120)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn secondary_matches_the_reference_model(steps in steps()) {
        let t0 = Instant::now();
        let cfg = SessionConfig::default();
        let mut m = SecondarySession::new(cfg, t0);
        let mut model = S::Running(0);
        let mut last_done = 0;
        for (i, (follow, choice, off)) in steps.into_iter().enumerate() {
            let now = t0 + Duration::from_millis(i as u64);
            let ev = if follow { s_next(model) } else { s_random(choice, epoch_of_s(model), off) };
            let expect = s_model(model, &ev);
            let got = match ev.clone() {
                SEv::Msg(msg) => m.handle_message(now, msg),
                SEv::Loaded => m.checkpoint_loaded(now),
                SEv::Timeout => m.handle_timeout(now + cfg.peer_timeout + Duration::from_secs(1)),
            };
            match expect {
                Ok(Some(next)) => {
                    prop_assert!(got.is_ok(), "model accepts {:?} in {:?}, machine said {:?}", ev, model, got);
                    model = next;
                }
                Ok(None) => {
                    prop_assert!(got.is_err(), "model refuses {:?} in {:?}, machine accepted", ev, model);
                    prop_assert!(m.failure().is_some(), "machine not failed after {:?}", ev);
                    model = S::Failed;
                }
                Err(()) => prop_assert!(got.is_err(), "command {:?} in {:?} must be refused", ev, model),
            }
            prop_assert_eq!(m.failure().is_some(), model == S::Failed);
            while let Some(a) = m.poll_action() {
                if let SecondaryAction::CheckpointDone { epoch } = a {
                    prop_assert_eq!(epoch, last_done + 1, "epochs commit in order");
                    last_done = epoch;
                }
            }
            if let S::Running(c) = model {
                prop_assert_eq!(m.committed_epoch(), c);
            }
        }
    }

    #[test]
    fn primary_matches_the_reference_model(steps in steps()) {
        let t0 = Instant::now();
        let cfg = SessionConfig::default();
        let mut m = PrimarySession::new(cfg, t0);
        let mut model = P::WaitReady;
        let mut last_done = 0;
        for (i, (follow, choice, off)) in steps.into_iter().enumerate() {
            let now = t0 + Duration::from_millis(i as u64);
            let ev = if follow { p_next(model) } else { p_random(choice, epoch_of_p(model), off) };
            let expect = p_model(model, &ev);
            let got = match ev.clone() {
                PEv::Msg(msg) => m.handle_message(now, msg),
                PEv::Start => m.start_checkpoint(now),
                PEv::RamSent => m.ram_sent(now),
                PEv::DevSent => m.device_state_sent(now),
                PEv::Timeout => m.handle_timeout(now + cfg.load_timeout + Duration::from_secs(1)),
            };
            match expect {
                Ok(Some(next)) => {
                    prop_assert!(got.is_ok(), "model accepts {:?} in {:?}, machine said {:?}", ev, model, got);
                    model = next;
                }
                Ok(None) => {
                    prop_assert!(got.is_err(), "model refuses {:?} in {:?}, machine accepted", ev, model);
                    prop_assert!(m.failure().is_some());
                    model = P::Failed;
                }
                Err(()) => prop_assert!(got.is_err(), "command {:?} in {:?} must be refused", ev, model),
            }
            prop_assert_eq!(m.failure().is_some(), model == P::Failed);
            prop_assert_eq!(m.poll_timeout().is_some(),
                matches!(model, P::WaitReady | P::AwaitReply(_) | P::AwaitReceived(_) | P::AwaitLoaded(_)));
            while let Some(a) = m.poll_action() {
                if let PrimaryAction::CheckpointDone { epoch, .. } = a {
                    prop_assert_eq!(epoch, last_done + 1, "epochs commit in order");
                    last_done = epoch;
                }
            }
        }
    }
}

/// Carries out the primary's actions like a VMM would; returns the epoch of a finished checkpoint.
fn drive_primary(
    p: &mut PrimarySession,
    now: Instant,
    to_s: &mut Vec<Message>,
    log: &mut Vec<String>,
) -> Option<u64> {
    let mut done = None;
    while let Some(a) = p.poll_action() {
        match a {
            PrimaryAction::Send(m) => to_s.push(m),
            PrimaryAction::SendRam { epoch } => {
                to_s.push(Message::RamPages(pages(epoch)));
                p.ram_sent(now).unwrap();
            }
            PrimaryAction::SendDeviceState { epoch } => {
                to_s.push(Message::VmstateSize { epoch, size: 3 });
                to_s.push(chunk(epoch, 3));
                p.device_state_sent(now).unwrap();
            }
            PrimaryAction::ReleaseOutput { epoch } => log.push(format!("P release {epoch}")),
            PrimaryAction::PauseGuest => log.push("P pause".into()),
            PrimaryAction::ResumeGuest => log.push("P resume".into()),
            PrimaryAction::CheckpointDone { epoch, .. } => done = Some(epoch),
            PrimaryAction::Failed(e) => panic!("primary failed: {e}"),
            PrimaryAction::PeerClosed(r) => panic!("peer closed: {r:?}"),
        }
    }
    done
}

/// The whole transaction, both machines wired together in memory, in QEMU's order.
#[test]
fn primary_and_secondary_complete_checkpoints_together() {
    let now = Instant::now();
    let cfg = SessionConfig::default();
    let mut p = PrimarySession::new(cfg, now);
    let mut s = SecondarySession::new(cfg, now);
    let mut log = Vec::new();
    let mut to_p: Vec<Message> = Vec::new();
    let mut to_s: Vec<Message> = Vec::new();
    let mut done = 0;
    for _ in 0..200 {
        while let Some(a) = s.poll_action() {
            match a {
                SecondaryAction::Send(m) => to_p.push(m),
                SecondaryAction::Failed(e) => panic!("secondary failed: {e}"),
                SecondaryAction::StoreRam(_) | SecondaryAction::StoreDeviceState(_) => {}
                SecondaryAction::CheckpointDone { .. } => {}
                other => log.push(format!("S {other:?}")),
            }
        }
        for m in to_p.drain(..) {
            log.push(format!("S->P {:?}", m.kind()));
            p.handle_message(now, m).unwrap();
        }
        if let Some(e) = drive_primary(&mut p, now, &mut to_s, &mut log) {
            done = e;
        }
        if s.state_name() == "loading the checkpoint" {
            s.checkpoint_loaded(now).unwrap();
        }
        if p.is_idle() && done < 3 {
            p.start_checkpoint(now).unwrap();
            drive_primary(&mut p, now, &mut to_s, &mut log);
        }
        for m in to_s.drain(..) {
            log.push(format!("P->S {:?}", m.kind()));
            s.handle_message(now, m).unwrap();
        }
        if done == 3 {
            break;
        }
    }
    assert_eq!(done, 3, "{log:#?}");
    assert_eq!(s.committed_epoch(), 3);
    let first: Vec<&str> = log.iter().map(String::as_str).take(22).collect();
    assert_eq!(
        first,
        [
            "S->P CheckpointReady",
            "P->S CheckpointRequest",
            "S PauseGuest",
            "S->P CheckpointReply",
            "P pause",
            "P->S VmstateSend",
            "P->S RamPages",
            "P->S EndOfRam",
            "P->S VmstateSize",
            "P->S DeviceState",
            "P->S BlockBarrier",
            "S FlushRamCache { epoch: 1 }",
            "S LoadDeviceState { epoch: 1 }",
            "S CommitBlockCheckpoint { epoch: 1 }",
            "S->P VmstateReceived",
            "P release 1",
            "S ResumeGuest",
            "S->P VmstateLoaded",
            "P resume",
            "P->S CheckpointRequest",
            "S PauseGuest",
            "S->P CheckpointReply",
        ],
        "{log:#?}"
    );
}
