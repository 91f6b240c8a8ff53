//! Batches in flight: the core tracker behind a lock, a condition variable for waiters, and
//! the data gate that keeps late READ data out of memory the caller was told is free.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use tidewire_core::batch::{BatchTracker, RequestState};
use tidewire_core::select::TransportKind;
use tidewire_core::BatchId;

use crate::error::{Error, ErrorKind, Result};
use crate::notify::Notification;
use crate::transport::tcp::TcpConn;

/// Where a batch's notification goes once its data is visible.
pub(crate) enum TrailerRoute {
    /// The peer is this engine: straight into our own queue.
    Local(Arc<crate::notify::NotifyQueue>, Notification),
    /// Over the peer's TCP connection.
    Tcp(Arc<TcpConn>, Vec<u8>),
}

/// How long a waiter polls before sleeping on the condition variable: the first
/// `SPIN_TIGHT` in a tight loop, then yielding between polls. A wake-up from the condition
/// variable costs 6–30 µs on our GPU hosts (bench/NOTES.md §8), as much as a small copy takes,
/// so batches up to a millisecond (256 MiB over NVLink, 16,384 scattered 16 KiB pages) are
/// waited for by polling. `TIDEWIRE_WAIT_SPIN_US` overrides it.
const SPIN: Duration = Duration::from_micros(1000);
const SPIN_TIGHT: Duration = Duration::from_micros(20);

pub(crate) fn spin() -> Duration {
    static SPIN_FOR: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *SPIN_FOR.get_or_init(|| {
        let us = tidewire_gpu::copy::tuning("TIDEWIRE_WAIT_SPIN_US", SPIN.as_micros() as u32);
        Duration::from_micros(u64::from(us.min(100_000)))
    })
}

pub(crate) struct Batch {
    pub(crate) id: BatchId,
    tracker: Mutex<BatchTracker<Error>>,
    cond: Condvar,
    /// READ data is copied into local memory under a read guard, after checking that its
    /// request is still pending; every failure transition takes the write side first, so once
    /// a request is reported failed no late byte lands in its buffer.
    gate: RwLock<()>,
    trailer: Mutex<Option<TrailerRoute>>,
    started: Instant,
    /// Nanoseconds from `started` to each [`Mark`] (0: not reached).
    marks: [AtomicU64; 5],
    /// The runs as the transports took them, kept while metrics are recorded (most batches
    /// take one run: no allocation for it).
    runs: Option<Mutex<smallvec::SmallVec<[RunMeta; 1]>>>,
    /// Every run was handed to its transport (and noted): the batch may be counted (once:
    /// at its first finish after this, or by `seal` if it had already finished).
    sealed: AtomicBool,
    /// What a failure transition stops before it returns (see [`Fence`]).
    fences: Mutex<Vec<Arc<dyn Fence>>>,
}

/// A path on which READ data lands in local memory without passing the data gate (a NIC
/// writing straight into registered memory): a failure transition of the batch calls
/// [`Fence::stop`] under the gate's write side, before the failure is visible.
pub(crate) trait Fence: Send + Sync {
    /// Requests `reqs` of `batch` (every one: `None`) are failing: once this returns, no byte
    /// of their READs lands in local memory.
    fn stop(&self, batch: &Batch, reqs: Option<&[Range<usize>]>);
}

/// One run of a batch as a transport took it (for the metrics).
pub(crate) struct RunMeta {
    pub(crate) reqs: Range<usize>,
    pub(crate) transport: TransportKind,
    pub(crate) bytes: u64,
    /// The peer's label value (bounded).
    pub(crate) peer: &'static str,
    /// Where its requests and bytes are counted.
    pub(crate) counters: &'static crate::metrics::RunCounters,
}

/// Points in a batch's life recorded for [`BatchHandle::timings`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Mark {
    /// Every request has a transport.
    Planned = 0,
    /// The first GPU launch was enqueued.
    FirstLaunch = 1,
    /// The completion thread saw the last GPU job of the batch done.
    GpuDone = 2,
    /// Every request reached its final state.
    Finished = 3,
    /// The first byte was on its way: a frame handed to a tcp lane, an RMA posted, a copy
    /// begun (GPU transports: `FirstLaunch`).
    FirstByte = 4,
}

/// Where a batch's time went, from `submit` (each `None` when the batch never got there).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Every request checked and given a transport.
    pub planned: Option<Duration>,
    /// The first GPU launch enqueued (GPU transports only).
    pub first_launch: Option<Duration>,
    /// The engine saw the last GPU copy complete (GPU transports only).
    pub gpu_done: Option<Duration>,
    /// Every request reached its final state (a waiter wakes after this).
    pub finished: Option<Duration>,
}

impl Batch {
    /// A batch of `n` requests submitted at `started`; `chunks[i]` completions finish request
    /// `i` (`None`: one each).
    pub(crate) fn new(
        started: Instant,
        id: BatchId,
        n: usize,
        chunks: Option<Vec<u32>>,
        trailer: Option<TrailerRoute>,
        deadline: Instant,
    ) -> Arc<Self> {
        let tracker = match chunks {
            Some(c) => BatchTracker::new(c, trailer.is_some(), deadline),
            None => BatchTracker::single(n, trailer.is_some(), deadline),
        };
        Arc::new(Self {
            id,
            tracker: Mutex::new(tracker),
            cond: Condvar::new(),
            gate: RwLock::new(()),
            trailer: Mutex::new(trailer),
            started,
            marks: Default::default(),
            runs: crate::metrics::get().map(|_| Mutex::default()),
            sealed: AtomicBool::new(false),
            fences: Mutex::default(),
        })
    }

    /// Request `req` completes after `chunks` chunk completions; before any is reported.
    pub(crate) fn set_chunks(&self, reqs: Range<usize>, chunks: impl Fn(usize) -> u32) {
        let mut t = self.tracker.lock();
        for req in reqs {
            t.set_chunks(req, chunks(req));
        }
    }

    pub(crate) fn set_deadline(&self, deadline: Instant) {
        self.tracker.lock().set_deadline(deadline);
    }

    /// The batch's deadline.
    pub(crate) fn deadline(&self) -> Instant {
        self.tracker.lock().deadline()
    }

    /// Records that the batch reached `m` now (the first time; `GpuDone`: the latest time).
    pub(crate) fn mark(&self, m: Mark) {
        let at = (self.started.elapsed().as_nanos() as u64).max(1);
        let slot = &self.marks[m as usize];
        match m {
            Mark::GpuDone => {
                slot.fetch_max(at, Ordering::Relaxed);
            }
            Mark::Planned | Mark::FirstLaunch | Mark::Finished | Mark::FirstByte => {
                let _ = slot.compare_exchange(0, at, Ordering::Relaxed, Ordering::Relaxed);
            }
        }
    }

    /// One chunk of `req` is done; sends the trailer if this completed the data.
    pub(crate) fn chunk_done(self: &Arc<Self>, req: usize) {
        self.runs_done(std::slice::from_ref(&(req..req + 1)));
    }

    /// One chunk of every request in `runs` is done (one lock for all); sends the trailer if
    /// this completed the data.
    pub(crate) fn runs_done(self: &Arc<Self>, runs: &[Range<usize>]) {
        let send = {
            let mut t = self.tracker.lock();
            t.handle_runs_done(runs);
            let send = t.poll_trailer();
            self.finish(t);
            send
        };
        if send {
            self.send_trailer();
        }
    }

    pub(crate) fn fail_request(&self, req: usize, err: Error) {
        self.fail_runs(std::slice::from_ref(&(req..req + 1)), err);
    }

    /// Every request still pending in `runs` failed with `err` (one lock for all).
    pub(crate) fn fail_runs(&self, runs: &[Range<usize>], err: Error) {
        let _gate = self.gate.write();
        self.stop_fences(Some(runs));
        let mut t = self.tracker.lock();
        t.handle_runs_failed(runs, err);
        self.finish(t);
    }

    /// Adds a path that failures must stop (see [`Fence`]).
    pub(crate) fn add_fence(&self, fence: Arc<dyn Fence>) {
        self.fences.lock().push(fence);
    }

    /// Stops the fenced paths of requests `reqs` (every one: `None`); under the gate's write
    /// side.
    fn stop_fences(&self, reqs: Option<&[Range<usize>]>) {
        let fences: Vec<Arc<dyn Fence>> = self.fences.lock().clone();
        for f in fences {
            f.stop(self, reqs);
        }
    }

    /// Every run was handed to its transport: the batch is counted when it finishes (now, if
    /// a transport already failed all of it).
    pub(crate) fn seal(&self) {
        let t = self.tracker.lock();
        self.sealed.store(true, Ordering::Release);
        // Finished already: its first finish, unsealed, was not counted.
        if t.is_finished() {
            self.count(&t);
        }
    }

    /// Counts the batch in the metrics (when they are recorded), under the tracker lock.
    fn count(&self, t: &BatchTracker<Error>) {
        if let (Some(m), Some(runs)) = (crate::metrics::get(), &self.runs) {
            self.record(t, m, &runs.lock());
        }
    }

    /// Releases the tracker lock after an update: wakes the waiters if the batch finished,
    /// then counts it if it succeeded (after the lock, so that its waiter does not wait for
    /// the counting; a scrape waits for it instead, see [`crate::metrics::Metrics::render`]).
    fn finish(&self, t: MutexGuard<'_, BatchTracker<Error>>) {
        let count_after = self.wake_if_finished(&t);
        drop(t);
        if let (Some(half), Some(m), Some(runs)) = (count_after, crate::metrics::get(), &self.runs)
        {
            self.record_ok(m, &runs.lock());
            m.counted(half);
        }
    }

    /// Wakes the waiters once the batch is finished (and records when); counts a failed
    /// batch, or returns the announcement ([`crate::metrics::Metrics::counting`], made here,
    /// before the outcome is visible) of one that succeeded and is to be counted once the
    /// lock is released.
    fn wake_if_finished(&self, t: &BatchTracker<Error>) -> Option<usize> {
        let mut count_after = None;
        if t.is_finished() {
            let first = self.marks[Mark::Finished as usize].load(Ordering::Relaxed) == 0;
            self.mark(Mark::Finished);
            if first {
                tracing::debug!(
                    batch = self.id.0,
                    ok = t.first_error().is_none(),
                    after_us = self.started.elapsed().as_micros() as u64,
                    "finished"
                );
            }
            // Counted at its first finish once sealed (before that, `seal` counts it).
            if first && self.sealed.load(Ordering::Acquire) {
                match crate::metrics::get() {
                    Some(m) if self.runs.is_some() && t.first_error().is_none() => {
                        count_after = Some(m.counting());
                    }
                    _ => self.count(t),
                }
            }
            self.cond.notify_all();
        }
        count_after
    }

    /// Notes a run a transport took (when metrics are recorded).
    pub(crate) fn note_run(&self, run: impl FnOnce(&crate::metrics::Metrics) -> RunMeta) {
        if let (Some(runs), Some(m)) = (&self.runs, crate::metrics::get()) {
            runs.lock().push(run(m));
        }
    }

    /// Counts a finished batch: each run's completed requests and bytes (bytes of a run count
    /// when all its requests completed), failures by error kind, the batch's outcome and
    /// latencies.
    fn record(&self, t: &BatchTracker<Error>, m: &crate::metrics::Metrics, runs: &[RunMeta]) {
        if t.first_error().is_none() {
            self.record_ok(m, runs);
            return;
        }
        for run in runs {
            let mut done = 0u64;
            let mut kinds: Vec<(ErrorKind, u64)> = Vec::new();
            for i in run.reqs.clone() {
                match t.request_state(i) {
                    Some(RequestState::Done) => done += 1,
                    Some(RequestState::Failed(e)) => {
                        match kinds.iter_mut().find(|(k, _)| *k == e.kind()) {
                            Some((_, c)) => *c += 1,
                            None => kinds.push((e.kind(), 1)),
                        }
                    }
                    _ => {}
                }
            }
            run.counters.requests.inc_by(done);
            if done == run.reqs.len() as u64 {
                run.counters.bytes.inc_by(run.bytes);
            }
            for (kind, n) in kinds {
                let l = [
                    ("kind", format!("{kind:?}")),
                    ("transport", run.transport.name().to_string()),
                    ("peer", run.peer.to_string()),
                ];
                m.failures.get_or_create(&l).inc_by(n);
            }
        }
        self.record_outcome(m, runs, false);
    }

    /// Counts a batch whose every request completed: each run's requests and bytes (no pass
    /// over the requests), the outcome and latencies.
    fn record_ok(&self, m: &crate::metrics::Metrics, runs: &[RunMeta]) {
        for run in runs {
            run.counters.requests.inc_by(run.reqs.len() as u64);
            run.counters.bytes.inc_by(run.bytes);
        }
        self.record_outcome(m, runs, true);
    }

    fn record_outcome(&self, m: &crate::metrics::Metrics, runs: &[RunMeta], ok: bool) {
        let transport = runs.first().map_or(TransportKind::Local, |r| r.transport);
        let at = |mk: Mark| self.marks[mk as usize].load(Ordering::Relaxed);
        let first =
            [at(Mark::FirstByte), at(Mark::FirstLaunch)].into_iter().filter(|n| *n > 0).min();
        m.batch_done(transport, ok, at(Mark::Finished), first);
    }

    pub(crate) fn fail_all(&self, err: Error) {
        let _gate = self.gate.write();
        self.stop_fences(None);
        let mut t = self.tracker.lock();
        t.fail_all_pending(err);
        self.finish(t);
    }

    pub(crate) fn trailer_done(&self) {
        let mut t = self.tracker.lock();
        t.handle_trailer_done();
        self.finish(t);
    }

    pub(crate) fn trailer_failed(&self, err: Error) {
        let mut t = self.tracker.lock();
        t.handle_trailer_failed(err);
        self.finish(t);
    }

    fn send_trailer(self: &Arc<Self>) {
        let Some(route) = self.trailer.lock().take() else {
            self.trailer_failed(Error::Internal("trailer released twice"));
            return;
        };
        match route {
            TrailerRoute::Local(queue, n) => {
                queue.push(n);
                self.trailer_done();
            }
            TrailerRoute::Tcp(conn, payload) => conn.send_notify(self.clone(), payload),
        }
    }

    /// A guard under which READ data for `req` may be written into local memory, if the
    /// request is still pending.
    pub(crate) fn accepts_data(&self, req: usize) -> Option<RwLockReadGuard<'_, ()>> {
        let g = self.gate.read();
        self.tracker.lock().is_pending(req).then_some(g)
    }

    fn check_deadline(&self) {
        self.expire(Instant::now());
    }

    /// Fails every pending request if the batch's deadline is at or before `now` (the
    /// watcher calls this for batches nobody waits on).
    pub(crate) fn expire(&self, now: Instant) {
        let overdue = {
            let t = self.tracker.lock();
            t.poll_timeout().is_some_and(|d| now >= d)
        };
        if overdue {
            let after = now - self.started;
            self.fail_all(Error::Timeout { what: format!("{}", self.id), after });
        }
    }

    /// True once every request (and the notification) reached its final state.
    pub(crate) fn is_finished(&self) -> bool {
        self.tracker.lock().is_finished()
    }

    fn outcome(&self) -> Option<Result<()>> {
        self.tracker.lock().outcome()
    }

    /// Waits until the batch finishes or `limit` passes (`None`: until its own deadline).
    fn wait_until(&self, limit: Option<Instant>) -> Option<Result<()>> {
        // Poll first (see SPIN); past SPIN_TIGHT the poll yields, so it never starves the
        // threads it waits for.
        let start = Instant::now();
        let spin_until = limit.map_or(start + spin(), |l| l.min(start + spin()));
        loop {
            if let Some(out) = self.tracker.lock().outcome() {
                return Some(out);
            }
            let now = Instant::now();
            if now >= spin_until {
                break;
            }
            if now - start < SPIN_TIGHT {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        loop {
            self.check_deadline();
            let mut t = self.tracker.lock();
            if let Some(out) = t.outcome() {
                return Some(out);
            }
            let deadline = t.deadline();
            let until = limit.map_or(deadline, |l| l.min(deadline));
            if limit.is_some_and(|l| Instant::now() >= l) {
                return None;
            }
            self.cond.wait_until(&mut t, until);
        }
    }
}

/// Per-request status, as the caller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestStatus {
    Pending,
    Done,
    Failed(Error),
}

/// A submitted batch. Dropping the handle does not cancel the batch.
#[derive(Clone)]
pub struct BatchHandle {
    pub(crate) batch: Arc<Batch>,
}

impl BatchHandle {
    pub fn id(&self) -> BatchId {
        self.batch.id
    }

    /// `None` while running, else the outcome (the first failure, in request order).
    pub fn poll(&self) -> Option<Result<()>> {
        self.batch.check_deadline();
        self.batch.outcome()
    }

    /// Waits until the batch finishes; bounded by the batch's own deadline.
    pub fn wait(&self) -> Result<()> {
        self.batch.wait_until(None).unwrap_or(Err(Error::Internal("batch wait returned early")))
    }

    /// Waits up to `timeout`; `None` if the batch is still running then.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<()>> {
        self.batch.wait_until(Some(Instant::now() + timeout))
    }

    /// Fails every request still pending with `Cancelled`. Requests already done stay done;
    /// no byte of a cancelled READ lands after this returns.
    pub fn cancel(&self) {
        self.batch.fail_all(Error::Cancelled { batch: self.batch.id });
    }

    /// The status of every request, in submission order.
    pub fn statuses(&self) -> Vec<RequestStatus> {
        self.batch.check_deadline();
        let t = self.batch.tracker.lock();
        t.states()
            .into_iter()
            .map(|s| match s {
                RequestState::Pending => RequestStatus::Pending,
                RequestState::Done => RequestStatus::Done,
                RequestState::Failed(e) => RequestStatus::Failed(e.clone()),
            })
            .collect()
    }

    /// Counts of (done, failed, pending) requests.
    pub fn counts(&self) -> (usize, usize, usize) {
        self.batch.tracker.lock().counts()
    }

    /// Where the batch's time went so far (for benchmarks and diagnosis).
    pub fn timings(&self) -> Timings {
        let at = |m: Mark| match self.batch.marks[m as usize].load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        };
        Timings {
            planned: at(Mark::Planned),
            first_launch: at(Mark::FirstLaunch),
            gpu_done: at(Mark::GpuDone),
            finished: at(Mark::Finished),
        }
    }
}

impl std::fmt::Debug for BatchHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (done, failed, pending) = self.counts();
        f.debug_struct("BatchHandle")
            .field("id", &self.batch.id)
            .field("done", &done)
            .field("failed", &failed)
            .field("pending", &pending)
            .finish()
    }
}
