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

/// Tracks completion of one batch. `E` is the caller's error type.
#[derive(Debug, Clone)]
pub struct BatchTracker<E> {
    remaining: Vec<u32>,
    states: Vec<RequestState<E>>,
    open: usize,
    failed: usize,
    deadline: Instant,
    trailer: Trailer<E>,
}

impl<E: Clone> BatchTracker<E> {
    /// A batch whose request `i` completes after `chunks[i]` chunk completions (at least 1).
    pub fn new(chunks: Vec<u32>, has_trailer: bool, deadline: Instant) -> Self {
        let n = chunks.len();
        Self {
            remaining: chunks.into_iter().map(|c| c.max(1)).collect(),
            states: vec![RequestState::Pending; n],
            open: n,
            failed: 0,
            deadline,
            trailer: if has_trailer { Trailer::Waiting } else { Trailer::None },
        }
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// One chunk of request `req` is done. Returns true if this completed the request.
    pub fn handle_chunk_done(&mut self, req: usize) -> bool {
        let (Some(state), Some(left)) = (self.states.get_mut(req), self.remaining.get_mut(req))
        else {
            return false;
        };
        if state.is_final() {
            return false;
        }
        *left = left.saturating_sub(1);
        if *left > 0 {
            return false;
        }
        *state = RequestState::Done;
        self.open -= 1;
        self.settle_trailer();
        true
    }

    /// Request `req` failed. Returns true if this was its final transition.
    pub fn handle_request_failed(&mut self, req: usize, err: E) -> bool {
        let Some(state) = self.states.get_mut(req) else {
            return false;
        };
        if state.is_final() {
            return false;
        }
        *state = RequestState::Failed(err);
        self.open -= 1;
        self.failed += 1;
        self.settle_trailer();
        true
    }

    /// Fails everything still pending (requests and trailer) with `err`: used for
    /// cancellation, shutdown and deadlines.
    pub fn fail_all_pending(&mut self, err: E) {
        for i in 0..self.states.len() {
            self.handle_request_failed(i, err.clone());
        }
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

    pub fn request_state(&self, req: usize) -> Option<&RequestState<E>> {
        self.states.get(req)
    }

    pub fn states(&self) -> &[RequestState<E>] {
        &self.states
    }

    /// Counts of (done, failed, pending) requests.
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.states.len() - self.open - self.failed, self.failed, self.open)
    }

    /// The first request failure, in request order, or the trailer's failure.
    pub fn first_error(&self) -> Option<E> {
        self.states
            .iter()
            .find_map(|s| match s {
                RequestState::Failed(e) => Some(e.clone()),
                _ => None,
            })
            .or_else(|| match &self.trailer {
                Trailer::Failed(e) => Some(e.clone()),
                _ => None,
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
        assert_eq!(b.request_state(1), Some(&RequestState::Done));
        assert_eq!(b.request_state(2), Some(&RequestState::Failed(E::Timeout)));
        assert_eq!(b.poll_timeout(), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Chunk(usize),
        Fail(usize),
        Cancel,
        Timeout(u64),
        TrailerDone,
        TrailerFail,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0usize..6).prop_map(Op::Chunk),
            1 => (0usize..6).prop_map(Op::Fail),
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
