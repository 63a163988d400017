//! Fault injection for crash testing, as wrappers around any [`BlockBackend`] (no branches in the logic
//! under test).
//!
//! * [`FaultyBackend`] counts mutating operations (writes, flushes, discards) against a [`FaultPlan`] that
//!   may be shared by several backends (a disk and its journals), so that "stop after the N-th operation"
//!   is one global point in time. The failing operation and every later one return an I/O error and do not
//!   reach the inner backend, except that a failing write can be *torn*: its first half is written.
//! * [`VolatileBackend`] models a volatile write cache: writes stay pending until `flush`, and
//!   [`VolatileBackend::crash`] drops what was not flushed; [`VolatileBackend::crash_keeping`] keeps any
//!   chosen subset of the unflushed sectors (writes reordered and torn by the cache).

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::backend::{BlockBackend, SECTOR_SIZE, check_request};
use crate::error::{Error, Result};

#[derive(Debug)]
struct PlanState {
    ops: AtomicU64,
    limit: AtomicU64,
    tear: AtomicBool,
    tripped: AtomicBool,
}

/// When injected faults start; cheap to clone, clones share the count.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    state: Arc<PlanState>,
}

impl Default for FaultPlan {
    fn default() -> Self {
        Self::never()
    }
}

impl FaultPlan {
    /// A plan that never fails (but counts).
    pub fn never() -> Self {
        FaultPlan {
            state: Arc::new(PlanState {
                ops: AtomicU64::new(0),
                limit: AtomicU64::new(u64::MAX),
                tear: AtomicBool::new(false),
                tripped: AtomicBool::new(false),
            }),
        }
    }

    /// From now on, let `n` more mutating operations through, then fail every one. With `tear`, the first
    /// failing write writes its first half (rounded down to sectors) before failing.
    pub fn arm(&self, n: u64, tear: bool) {
        let now = self.state.ops.load(Ordering::SeqCst);
        self.state.limit.store(now.saturating_add(n), Ordering::SeqCst);
        self.state.tear.store(tear, Ordering::SeqCst);
    }

    /// Stops injecting faults: the device works again.
    pub fn disarm(&self) {
        self.state.limit.store(u64::MAX, Ordering::SeqCst);
        self.state.tripped.store(false, Ordering::SeqCst);
    }

    /// Mutating operations that went through so far.
    pub fn ops(&self) -> u64 {
        self.state.ops.load(Ordering::SeqCst)
    }

    /// True once an operation was refused (until `disarm`).
    pub fn tripped(&self) -> bool {
        self.state.tripped.load(Ordering::SeqCst)
    }

    /// Counts one operation; `Ok(None)` lets it through, `Ok(Some(tear))` refuses it.
    fn admit(&self) -> Option<bool> {
        if self.tripped() || self.state.ops.load(Ordering::SeqCst) >= self.state.limit.load(Ordering::SeqCst)
        {
            let first = !self.state.tripped.swap(true, Ordering::SeqCst);
            return Some(first && self.state.tear.load(Ordering::SeqCst));
        }
        self.state.ops.fetch_add(1, Ordering::SeqCst);
        None
    }
}

fn injected(op: &'static str, offset: u64) -> Error {
    Error::Io {
        op,
        offset,
        source: io::Error::other("injected fault"),
    }
}

/// A backend whose mutating operations stop at a point chosen by a [`FaultPlan`].
#[derive(Debug)]
pub struct FaultyBackend<B> {
    inner: B,
    plan: FaultPlan,
}

impl<B: BlockBackend> FaultyBackend<B> {
    /// Wraps `inner`, counting against `plan`.
    pub fn new(inner: B, plan: FaultPlan) -> Self {
        FaultyBackend { inner, plan }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The wrapped backend, consuming the wrapper.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: BlockBackend> BlockBackend for FaultyBackend<B> {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.plan.tripped() {
            return Err(injected("read", offset));
        }
        self.inner.read_at(offset, buf)
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        check_request(offset, data.len() as u64, self.inner.len())?;
        match self.plan.admit() {
            None => self.inner.write_at(offset, data),
            Some(tear) => {
                let half = (data.len() / 2) & !(SECTOR_SIZE as usize - 1);
                if tear && half > 0 {
                    self.inner.write_at(offset, &data[..half])?;
                }
                Err(injected("write", offset))
            }
        }
    }

    fn flush(&mut self) -> Result<()> {
        match self.plan.admit() {
            None => self.inner.flush(),
            Some(_) => Err(injected("flush", 0)),
        }
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        check_request(offset, len, self.inner.len())?;
        match self.plan.admit() {
            None => self.inner.discard(offset, len),
            Some(_) => Err(injected("discard", offset)),
        }
    }
}

/// A backend with a volatile write cache: writes are held (per sector) until `flush`.
#[derive(Debug)]
pub struct VolatileBackend<B> {
    inner: B,
    pending: BTreeMap<u64, Box<[u8]>>,
}

impl<B: BlockBackend> VolatileBackend<B> {
    /// Wraps `inner` (the durable medium).
    pub fn new(inner: B) -> Self {
        VolatileBackend {
            inner,
            pending: BTreeMap::new(),
        }
    }

    /// The host crashed: what survives is the durable medium, without the unflushed writes.
    pub fn crash(self) -> B {
        self.inner
    }

    /// The host crashed and the cache had written back some of its sectors: `keep(sector)` says which
    /// (any subset is possible on real hardware, including a part of one write).
    pub fn crash_keeping(mut self, mut keep: impl FnMut(u64) -> bool) -> Result<B> {
        for (sector, data) in std::mem::take(&mut self.pending) {
            if keep(sector) {
                self.inner.write_at(sector * SECTOR_SIZE, &data)?;
            }
        }
        Ok(self.inner)
    }

    /// Sectors written and not yet flushed.
    pub fn pending_sectors(&self) -> usize {
        self.pending.len()
    }
}

impl<B: BlockBackend> BlockBackend for VolatileBackend<B> {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf)?;
        let end = offset + buf.len() as u64;
        for (&sector, data) in self.pending.range(offset / SECTOR_SIZE..end / SECTOR_SIZE) {
            let at = (sector * SECTOR_SIZE - offset) as usize;
            buf[at..at + SECTOR_SIZE as usize].copy_from_slice(data);
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        check_request(offset, data.len() as u64, self.inner.len())?;
        for (i, chunk) in data.chunks_exact(SECTOR_SIZE as usize).enumerate() {
            self.pending.insert(offset / SECTOR_SIZE + i as u64, chunk.into());
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        for (sector, data) in std::mem::take(&mut self.pending) {
            self.inner.write_at(sector * SECTOR_SIZE, &data)?;
        }
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;

    #[test]
    fn plan_is_shared_and_stops_everything_after_the_limit() {
        let plan = FaultPlan::never();
        let mut a = FaultyBackend::new(MemBackend::new(4096).unwrap(), plan.clone());
        let mut b = FaultyBackend::new(MemBackend::new(4096).unwrap(), plan.clone());
        plan.arm(2, true);
        a.write_at(0, &[1; 512]).unwrap();
        b.flush().unwrap();
        assert!(b.write_at(0, &[2; 1024]).is_err());
        assert!(a.write_at(512, &[3; 512]).is_err());
        assert!(plan.tripped());
        assert_eq!(plan.ops(), 2);
        let b = b.into_inner();
        assert_eq!(&b.as_slice()[..512], &[2; 512], "torn: first half written");
        assert_eq!(&b.as_slice()[512..1024], &[0; 512]);
    }

    #[test]
    fn volatile_backend_loses_unflushed_writes_on_crash() {
        let mut v = VolatileBackend::new(MemBackend::new(4096).unwrap());
        v.write_at(0, &[1; 512]).unwrap();
        v.flush().unwrap();
        v.write_at(512, &[2; 1024]).unwrap();
        let mut buf = [0u8; 1536];
        v.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf[512..], &[2; 1024]);
        let m = v.crash();
        assert_eq!(&m.as_slice()[..512], &[1; 512]);
        assert_eq!(&m.as_slice()[512..1536], &[0; 1024]);
    }
}
