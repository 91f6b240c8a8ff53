//! The batch state machine.
//!
//! A batch is a set of requests submitted together. Each request is split into chunks by the
//! transport; the request is done when all its chunks are done, or failed at its first
//! failure. A batch may carry a *trailer* (the notification): it is released by
//! [`BatchTracker::poll_trailer`] only once every request is done, so the peer never sees the
//! notification before the data is visible, and the batch finishes only when the trailer is
//! acknowledged.
//!
//! Call order: `new` → any of `handle_chunk_done` / `handle_request_failed` /
//! `handle_timeout` / `cancel`, with `poll_trailer` after each input, until `is_finished`.
//! The caller owns the clock: `poll_timeout` says when `handle_timeout` is next due.
//! Every request reaches a final state exactly once; inputs for final requests are ignored.

use std::ops::Range;
use std::time::Instant;

/// The state of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestState<E> {
    Pending,
    Done,
    Failed(E),
}

impl<E> RequestState<E> {
    pub fn is_final(&self) -> bool {
        !matches!(self, Self::Pending)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Trailer<E> {
    None,
    Waiting,
    Sent,
    Done,
    Failed(E),
}

// PENDING must be 0: a run is all pending when the OR of its states is 0.
const PENDING: u8 = 0;
const DONE: u8 = 1;
const FAILED: u8 = 2;

/// Tracks completion of one batch. `E` is the caller's error type.
///
/// A request costs one byte (plus four when it has several chunks): batches of 100,000
/// pages are tracked, completed and dropped in a few hundred microseconds. Errors are kept
/// per run of requests that failed together.
#[derive(Debug, Clone)]
pub struct BatchTracker<E> {
    /// Chunks left per request; empty when every request is one chunk.
    remaining: Vec<u32>,
    states: Vec<u8>,
    /// The requests that failed, as runs of consecutive requests sharing one error.
    errors: Vec<(Range<usize>, E)>,
    open: usize,
    failed: usize,
    deadline: Instant,
    trailer: Trailer<E>,
}

impl<E: Clone> BatchTracker<E> {
    /// A batch whose request `i` completes after `chunks[i]` chunk completions (at least 1).
    pub fn new(chunks: Vec<u32>, has_trailer: bool, deadline: Instant) -> Self {
        let n = chunks.len();
        let mut t = Self::single(n, has_trailer, deadline);
        if chunks.iter().any(|&c| c > 1) {
            t.remaining = chunks.into_iter().map(|c| c.max(1)).collect();
        }
        t
    }

    /// A batch of `n` requests of one chunk each.
    pub fn single(n: usize, has_trailer: bool, deadline: Instant) -> Self {
        Self {
            remaining: Vec::new(),
            states: vec![PENDING; n],
            errors: Vec::new(),
            open: n,
            failed: 0,
            deadline,
            trailer: if has_trailer { Trailer::Waiting } else { Trailer::None },
        }
    }

    /// Request `req` completes after `chunks` chunk completions (at least 1). Call before any
    /// of its chunks is reported.
    pub fn set_chunks(&mut self, req: usize, chunks: u32) {
        if chunks > 1 && self.remaining.is_empty() {
            self.remaining = vec![1; self.states.len()];
        }
        if let Some(left) = self.remaining.get_mut(req) {
            *left = chunks.max(1);
        }
    }

    /// Moves the deadline (used when the batch's size is known only after it was created).
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// One chunk of request `req` is done. Returns true if this completed the request.
    pub fn handle_chunk_done(&mut self, req: usize) -> bool {
        let Some(state) = self.states.get_mut(req) else {
            return false;
        };
        if *state != PENDING {
            return false;
        }
        if let Some(left) = self.remaining.get_mut(req) {
            *left = left.saturating_sub(1);
            if *left > 0 {
                return false;
            }
        }
        *state = DONE;
        self.open -= 1;
        self.settle_trailer();
        true
    }

    /// One chunk of every request in `runs` is done. Returns how many requests this completed.
    pub fn handle_runs_done(&mut self, runs: &[Range<usize>]) -> usize {
        let mut n = 0;
        for run in runs {
            let run = run.start.min(self.states.len())..run.end.min(self.states.len());
            if self.remaining.is_empty() {
                let states = &mut self.states[run];
                // The common case, a run that is all pending, in two vectorised passes.
                if states.iter().fold(PENDING, |a, &s| a | s) == PENDING {
                    states.fill(DONE);
                    n += states.len();
                    continue;
                }
                for s in states {
                    if *s == PENDING {
                        *s = DONE;
                        n += 1;
                    }
                }
                continue;
            }
            for req in run {
                let (Some(state), Some(left)) =
                    (self.states.get_mut(req), self.remaining.get_mut(req))
                else {
                    continue;
                };
                if *state == PENDING {
                    *left = left.saturating_sub(1);
                    if *left == 0 {
                        *state = DONE;
                        n += 1;
                    }
                }
            }
        }
        self.open -= n;
        self.settle_trailer();
        n
    }

    /// Request `req` failed. Returns true if this was its final transition.
    pub fn handle_request_failed(&mut self, req: usize, err: E) -> bool {
        self.handle_runs_failed(std::slice::from_ref(&(req..req + 1)), err) > 0
    }

    /// Every request still pending in `runs` failed with `err`. Returns how many did.
    pub fn handle_runs_failed(&mut self, runs: &[Range<usize>], err: E) -> usize {
        let mut total = 0;
        for run in runs {
            let run = run.start.min(self.states.len())..run.end.min(self.states.len());
            // Consecutive pending requests become one error run.
            let mut from: Option<usize> = None;
            for req in run.clone() {
                if self.states[req] == PENDING {
                    self.states[req] = FAILED;
                    total += 1;
                    from.get_or_insert(req);
                } else if let Some(f) = from.take() {
                    self.errors.push((f..req, err.clone()));
                }
            }
            if let Some(f) = from {
                self.errors.push((f..run.end, err.clone()));
            }
        }
        self.open -= total;
        self.failed += total;
        self.settle_trailer();
        total
    }

    /// Fails everything still pending (requests and trailer) with `err`: used for
    /// cancellation, shutdown and deadlines.
    pub fn fail_all_pending(&mut self, err: E) {
        let all = 0..self.states.len();
        self.handle_runs_failed(&[all], err.clone());
        if matches!(self.trailer, Trailer::Waiting | Trailer::Sent) {
            self.trailer = Trailer::Failed(err);
        }
    }

    /// The deadline passed: fails what is pending with `make_err()`. No-op when called early.
    pub fn handle_timeout(&mut self, now: Instant, make_err: impl FnOnce() -> E) {
        if now >= self.deadline && !self.is_finished() {
            self.fail_all_pending(make_err());
        }
    }

    /// When `handle_timeout` is next due, if the batch is not finished.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.is_finished()).then_some(self.deadline)
    }

    /// The deadline of this batch.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// True exactly once: when every request is done and the trailer should now be sent.
    pub fn poll_trailer(&mut self) -> bool {
        if matches!(self.trailer, Trailer::Waiting) && self.open == 0 && self.failed == 0 {
            self.trailer = Trailer::Sent;
            return true;
        }
        false
    }

    /// The trailer was acknowledged by the peer.
    pub fn handle_trailer_done(&mut self) {
        if matches!(self.trailer, Trailer::Sent) {
            self.trailer = Trailer::Done;
        }
    }

    /// The trailer could not be delivered.
    pub fn handle_trailer_failed(&mut self, err: E) {
        if matches!(self.trailer, Trailer::Waiting | Trailer::Sent) {
            self.trailer = Trailer::Failed(err);
        }
    }

    fn settle_trailer(&mut self) {
        if self.open == 0 && self.failed > 0 && matches!(self.trailer, Trailer::Waiting) {
            // The notification is never sent for a batch whose data did not all arrive; the
            // batch's error is the first failed request's.
            if let Some(err) = self.first_error() {
                self.trailer = Trailer::Failed(err);
            }
        }
    }

    /// True when every request is final and the trailer, if any, is settled.
    pub fn is_finished(&self) -> bool {
        self.open == 0 && !matches!(self.trailer, Trailer::Waiting | Trailer::Sent)
    }

    /// True while request `req` is neither done nor failed.
    pub fn is_pending(&self, req: usize) -> bool {
        self.states.get(req) == Some(&PENDING)
    }

    pub fn request_state(&self, req: usize) -> Option<RequestState<&E>> {
        Some(match *self.states.get(req)? {
            PENDING => RequestState::Pending,
            DONE => RequestState::Done,
            _ => RequestState::Failed(&self.errors.iter().find(|(r, _)| r.contains(&req))?.1),
        })
    }

    /// Every request's state, in request order.
    pub fn states(&self) -> Vec<RequestState<&E>> {
        let mut out: Vec<RequestState<&E>> = self
            .states
            .iter()
            .map(|&s| if s == DONE { RequestState::Done } else { RequestState::Pending })
            .collect();
        for (run, e) in &self.errors {
            for s in out.get_mut(run.clone()).into_iter().flatten() {
                *s = RequestState::Failed(e);
            }
        }
        out
    }

    /// Counts of (done, failed, pending) requests.
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.states.len() - self.open - self.failed, self.failed, self.open)
    }

    /// The first request failure, in request order, or the trailer's failure.
    pub fn first_error(&self) -> Option<E> {
        self.errors.iter().min_by_key(|(run, _)| run.start).map(|(_, e)| e.clone()).or_else(|| {
            match &self.trailer {
                Trailer::Failed(e) => Some(e.clone()),
                _ => None,
            }
        })
    }

    /// `None` while running; `Some(Ok)` when all done; `Some(Err(first error))` otherwise.
    pub fn outcome(&self) -> Option<Result<(), E>> {
        if !self.is_finished() {
            return None;
        }
        Some(match self.first_error() {
            Some(e) => Err(e),
            None => Ok(()),
        })
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum E {
        Peer,
        Timeout,
        Cancelled,
    }

    #[test]
    fn completes_after_all_chunks_then_trailer() {
        let t0 = Instant::now();
        let mut b = BatchTracker::<E>::new(vec![2, 1], true, t0 + Duration::from_secs(1));
        assert!(!b.handle_chunk_done(0));
        assert!(!b.poll_trailer());
        assert!(b.handle_chunk_done(1));
        assert!(b.handle_chunk_done(0));
        assert!(!b.is_finished());
        assert!(b.poll_trailer());
        assert!(!b.poll_trailer(), "the trailer is released once");
        b.handle_trailer_done();
        assert_eq!(b.outcome(), Some(Ok(())));
    }

    #[test]
    fn failure_suppresses_trailer() {
        let t0 = Instant::now();
        let mut b = BatchTracker::new(vec![1, 1], true, t0 + Duration::from_secs(1));
        b.handle_chunk_done(0);
        b.handle_request_failed(1, E::Peer);
        assert!(!b.poll_trailer());
        assert_eq!(b.outcome(), Some(Err(E::Peer)));
    }

    #[test]
    fn runs_complete_and_fail_together() {
        let t0 = Instant::now();
        let mut b = BatchTracker::single(6, false, t0 + Duration::from_secs(1));
        assert_eq!(b.handle_runs_done(&[0..2, 4..5]), 3);
        assert_eq!(b.handle_runs_done(&[1..3]), 1, "request 1 was already done");
        assert_eq!(b.handle_runs_failed(&[0..6], E::Peer), 2, "3 and 5 were pending");
        assert_eq!(b.counts(), (4, 2, 0));
        assert_eq!(b.request_state(3), Some(RequestState::Failed(&E::Peer)));
        assert_eq!(b.request_state(4), Some(RequestState::Done));
        assert_eq!(b.outcome(), Some(Err(E::Peer)));
        // Several chunks per request: a run counts one chunk of each.
        let mut c = BatchTracker::<E>::new(vec![2, 1], false, t0 + Duration::from_secs(1));
        assert_eq!(c.handle_runs_done(&[0..2]), 1);
        assert_eq!(c.handle_runs_done(&[0..2]), 1);
        assert_eq!(c.outcome(), Some(Ok(())));
        // Chunk counts set after creation count the same way.
        let mut d = BatchTracker::<E>::single(2, false, t0 + Duration::from_secs(1));
        d.set_chunks(1, 3);
        assert_eq!(d.handle_runs_done(&[0..2]), 1);
        assert_eq!(d.handle_runs_done(&[0..2]), 0);
        assert_eq!(d.handle_runs_done(&[0..2]), 1);
        assert_eq!(d.outcome(), Some(Ok(())));
    }

    #[test]
    fn deadline_fails_pending_within_simulated_time() {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(30);
        let mut b = BatchTracker::new(vec![1, 1, 1], false, deadline);
        b.handle_chunk_done(1);
        b.handle_timeout(t0 + Duration::from_secs(29), || E::Timeout);
        assert!(!b.is_finished(), "early timeouts are no-ops");
        assert_eq!(b.poll_timeout(), Some(deadline));
        b.handle_timeout(deadline, || E::Timeout);
        assert!(b.is_finished());
        assert_eq!(b.request_state(1), Some(RequestState::Done));
        assert_eq!(b.request_state(2), Some(RequestState::Failed(&E::Timeout)));
        assert_eq!(b.poll_timeout(), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Chunk(usize),
        Fail(usize),
        RunDone(usize, usize),
        RunFail(usize, usize),
        Cancel,
        Timeout(u64),
        TrailerDone,
        TrailerFail,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0usize..6).prop_map(Op::Chunk),
            1 => (0usize..6).prop_map(Op::Fail),
            2 => (0usize..7, 0usize..7).prop_map(|(a, b)| Op::RunDone(a.min(b), a.max(b))),
            1 => (0usize..7, 0usize..7).prop_map(|(a, b)| Op::RunFail(a.min(b), a.max(b))),
            1 => Just(Op::Cancel),
            1 => (0u64..20).prop_map(Op::Timeout),
            1 => Just(Op::TrailerDone),
            1 => Just(Op::TrailerFail),
        ]
    }

    proptest! {
        #[test]
        fn every_request_completes_exactly_once(
            chunks in proptest::collection::vec(1u32..4, 1..6),
            trailer in any::<bool>(),
            ops in proptest::collection::vec(op(), 0..40),
        ) {
            let t0 = Instant::now();
            let mut b = BatchTracker::new(chunks.clone(), trailer, t0 + Duration::from_secs(10));
            let mut finals = vec![0u32; chunks.len()];
            let mut cancelled = false;
            let mut trailer_released = 0;
            for op in ops {
                let before: Vec<bool> = b.states().iter().map(RequestState::is_final).collect();
                match op {
                    Op::Chunk(i) => { b.handle_chunk_done(i); }
                    Op::Fail(i) => { b.handle_request_failed(i, E::Peer); }
                    Op::RunDone(x, y) => { b.handle_runs_done(&[x..y]); }
                    Op::RunFail(x, y) => { b.handle_runs_failed(&[x..y], E::Peer); }
                    Op::Cancel => { b.fail_all_pending(E::Cancelled); cancelled = true; }
                    Op::Timeout(s) => b.handle_timeout(t0 + Duration::from_secs(s), || E::Timeout),
                    Op::TrailerDone => b.handle_trailer_done(),
                    Op::TrailerFail => b.handle_trailer_failed(E::Peer),
                }
                if b.poll_trailer() {
                    trailer_released += 1;
                    prop_assert!(b.states().iter().all(|s| *s == RequestState::Done));
                }
                for (i, s) in b.states().iter().enumerate() {
                    if s.is_final() && !before[i] { finals[i] += 1; }
                    if cancelled {
                        prop_assert!(s.is_final(), "nothing stays pending after cancel");
                    }
                }
                for (i, s) in b.states().iter().enumerate() {
                    prop_assert_eq!(b.request_state(i), Some(s.clone()));
                    prop_assert_eq!(b.is_pending(i), !s.is_final());
                }
                let (done, failed, pending) = b.counts();
                prop_assert_eq!(done + failed + pending, chunks.len());
                prop_assert_eq!(b.outcome().is_some(), b.is_finished());
            }
            prop_assert!(finals.iter().all(|&n| n <= 1));
            prop_assert!(trailer_released <= 1);
            prop_assert!(trailer || trailer_released == 0);
        }
    }
}
