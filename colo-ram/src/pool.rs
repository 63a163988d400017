//! A persistent pool of flush threads: a parallel flush wakes parked helpers instead of spawning threads.
//!
//! One job at a time: the flushing thread publishes the job, works on it itself, then closes it and waits
//! until every helper that joined has finished. A helper that wakes after the close never sees the job, so
//! nothing outlives the flush call that borrowed the memory.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crate::PAGE_SIZE;
use crate::bitmap::DirtyBitmap;
use crate::error::RamError;

/// One region's flush: copy the pages marked in `map` from `src` to `dst`, part by part.
pub(crate) struct CopyJob {
    src: *const u8,
    dst: *mut u8,
    /// Bytes mapped at both `src` and `dst`.
    len: usize,
    map: DirtyBitmap,
    parts: Vec<Range<usize>>,
    next: AtomicUsize,
    /// Pool threads that may take the job.
    max_helpers: usize,
    /// Pool threads that took the job (changed under the pool's lock only).
    joined: AtomicUsize,
    error: Mutex<Option<RamError>>,
}

// SAFETY: `src` and `dst` point into guest memory mappings that the flush borrows. `FlushPool::run` does not
// return (nor unwind) before every thread that took the job has finished with it, and threads copy disjoint
// parts (disjoint bitmap words, hence disjoint pages), so the pointers are used as a scoped borrow would be.
unsafe impl Send for CopyJob {}
// SAFETY: as for `Send`; the shared state besides the pointers is an atomic counter and a mutex.
unsafe impl Sync for CopyJob {}

impl CopyJob {
    /// A job copying `map`'s pages of one region from `src` to `dst` (both `len` bytes long), split into
    /// `parts` (word ranges of `map`).
    ///
    /// # Safety
    /// `src` and `dst` must be valid for reads and writes respectively of `len` bytes, must not overlap,
    /// and nothing else may write `dst` (or the pages of `src` the map selects) until the job has run.
    pub(crate) unsafe fn new(
        src: *const u8,
        dst: *mut u8,
        len: usize,
        map: DirtyBitmap,
        parts: Vec<Range<usize>>,
    ) -> Self {
        CopyJob {
            src,
            dst,
            len,
            map,
            parts,
            next: AtomicUsize::new(0),
            max_helpers: 0,
            joined: AtomicUsize::new(0),
            error: Mutex::new(None),
        }
    }

    /// Claims parts until none is left, copying each.
    fn work(&self) {
        while let Some(part) = self.parts.get(self.next.fetch_add(1, Ordering::Relaxed)) {
            for run in self.map.runs_in_words(part.clone()) {
                let (start, bytes) = (run.start * PAGE_SIZE, run.len() * PAGE_SIZE);
                if start.checked_add(bytes).is_none_or(|end| end > self.len) {
                    self.fail(RamError::OutOfRange {
                        gpa: start as u64,
                        len: bytes as u64,
                    });
                    return;
                }
                // SAFETY: `start .. start + bytes` lies inside both mappings (checked above; `new`'s
                // contract), which do not overlap. Parts are disjoint word ranges, so no other thread of
                // this job writes these pages, and nothing outside the job writes `dst` meanwhile.
                unsafe { std::ptr::copy_nonoverlapping(self.src.add(start), self.dst.add(start), bytes) };
            }
        }
    }

    fn fail(&self, e: RamError) {
        let mut slot = self.error.lock().unwrap_or_else(PoisonError::into_inner);
        slot.get_or_insert(e);
    }
}

#[derive(Default)]
struct State {
    job: Option<Arc<CopyJob>>,
    generation: u64,
    running: usize,
    shutdown: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    idle: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Parked flush helper threads, started on first use and kept until the pool is dropped.
#[derive(Default)]
pub(crate) struct FlushPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for FlushPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushPool")
            .field("helpers", &self.workers.len())
            .finish()
    }
}

/// Closes the published job and waits for the helpers that took it, also when the caller unwinds.
struct Close<'a>(&'a Shared);

impl Drop for Close<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.job = None;
        while st.running > 0 {
            st = self.0.idle.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl FlushPool {
    /// Runs `job` on the calling thread and up to `helpers` pool threads; returns the threads that took
    /// part (the calling thread included).
    pub(crate) fn run(&mut self, mut job: CopyJob, helpers: usize) -> Result<usize, RamError> {
        job.max_helpers = helpers;
        // A helper that cannot be started only makes the flush slower: the calling thread does its share.
        while self.workers.len() < helpers {
            let shared = Arc::clone(&self.shared);
            match std::thread::Builder::new()
                .name("colo-ram-flush".into())
                .spawn(move || worker(&shared))
            {
                Ok(handle) => self.workers.push(handle),
                Err(_) => break,
            }
        }
        let job = Arc::new(job);
        {
            let mut st = self.shared.lock();
            st.job = Some(Arc::clone(&job));
            st.generation = st.generation.wrapping_add(1);
        }
        self.shared.wake.notify_all();
        let close = Close(&self.shared);
        job.work();
        drop(close);
        let error = job.error.lock().unwrap_or_else(PoisonError::into_inner).take();
        match error {
            Some(e) => Err(e),
            None => Ok(1 + job.joined.load(Ordering::Relaxed)),
        }
    }
}

impl Drop for FlushPool {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(shared: &Shared) {
    let mut seen = 0u64;
    loop {
        let job = {
            let mut st = shared.lock();
            loop {
                if st.shutdown {
                    return;
                }
                if st.generation != seen {
                    seen = st.generation;
                    if let Some(job) = &st.job
                        && job.joined.load(Ordering::Relaxed) < job.max_helpers
                    {
                        let job = Arc::clone(job);
                        job.joined.fetch_add(1, Ordering::Relaxed);
                        st.running += 1;
                        break job;
                    }
                }
                st = shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
        };
        // A panic here would be a bug in the copy loop; it must still not leave the flush waiting forever.
        if catch_unwind(AssertUnwindSafe(|| job.work())).is_err() {
            job.fail(RamError::LayoutMismatch(
                "a flush helper thread panicked".to_owned(),
            ));
        }
        drop(job);
        let mut st = shared.lock();
        st.running -= 1;
        if st.running == 0 {
            shared.idle.notify_all();
        }
    }
}
