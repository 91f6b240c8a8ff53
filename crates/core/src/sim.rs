//! Test support: two state machines joined by an in-memory wire, in simulated time (quinn's
//! `Pair`). Frames can be delayed, dropped and duplicated, from a seeded generator; each
//! direction keeps its order, as a TCP stream does. [`Pair::drive`] moves both ends until
//! nothing is left to do, jumping time to the earliest delivery or deadline, so a test of a
//! ten-second deadline runs in microseconds.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::wire::{Header, HEADER_LEN};

/// One end of the wire: a machine under test wrapped to speak whole frames.
pub(crate) trait Endpoint {
    /// The next frame to send, if any.
    fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>>;
    /// A frame arrived.
    fn handle_frame(&mut self, now: Instant, frame: &[u8]);
    /// When `handle_timeout` is next due.
    fn poll_timeout(&self) -> Option<Instant>;
    fn handle_timeout(&mut self, now: Instant);
}

/// How the wire treats frames (the same in both directions).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Link {
    /// Delay of every frame.
    pub(crate) latency: Duration,
    /// Drop one frame in this many, at random (0: none; 1: all).
    pub(crate) drop_one_in: u32,
    /// Deliver one frame in this many twice, at random (0: none; 1: all).
    pub(crate) duplicate_one_in: u32,
    pub(crate) seed: u64,
}

impl Default for Link {
    fn default() -> Self {
        Self { latency: Duration::ZERO, drop_one_in: 0, duplicate_one_in: 0, seed: 1 }
    }
}

/// Splits an encoded frame into its header and payload.
pub(crate) fn decode(frame: &[u8]) -> (Header, &[u8]) {
    let raw: &[u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().unwrap();
    (Header::decode(raw).unwrap(), &frame[HEADER_LEN..])
}

pub(crate) struct Pair<A, B> {
    pub(crate) a: A,
    pub(crate) b: B,
    start: Instant,
    pub(crate) now: Instant,
    link: Link,
    rng: u64,
    to_a: VecDeque<(Instant, Vec<u8>)>,
    to_b: VecDeque<(Instant, Vec<u8>)>,
    /// Frames sent by a and b (before drops and duplicates).
    pub(crate) sent: (usize, usize),
}

impl<A: Endpoint, B: Endpoint> Pair<A, B> {
    pub(crate) fn new(now: Instant, a: A, b: B, link: Link) -> Self {
        Self {
            a,
            b,
            start: now,
            now,
            link,
            rng: link.seed.max(1),
            to_a: VecDeque::new(),
            to_b: VecDeque::new(),
            sent: (0, 0),
        }
    }

    /// Simulated time since the pair was made.
    pub(crate) fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn one_in(&mut self, n: u32) -> bool {
        // xorshift64: deterministic for a seed, no dependency.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        n != 0 && self.rng.is_multiple_of(u64::from(n))
    }

    fn put(&mut self, to_b: bool, frame: Vec<u8>) {
        if self.one_in(self.link.drop_one_in) {
            return;
        }
        let at = self.now + self.link.latency;
        let twice = self.one_in(self.link.duplicate_one_in);
        let queue = if to_b { &mut self.to_b } else { &mut self.to_a };
        if twice {
            queue.push_back((at, frame.clone()));
        }
        queue.push_back((at, frame));
    }

    /// Sends what both ends want to send, delivers what is due and fires due timeouts, at the
    /// current time. Returns whether anything happened.
    pub(crate) fn step(&mut self) -> bool {
        let now = self.now;
        let mut any = false;
        while let Some(f) = self.a.poll_transmit(now) {
            self.sent.0 += 1;
            self.put(true, f);
            any = true;
        }
        while let Some(f) = self.b.poll_transmit(now) {
            self.sent.1 += 1;
            self.put(false, f);
            any = true;
        }
        while self.to_b.front().is_some_and(|(at, _)| *at <= now) {
            let (_, f) = self.to_b.pop_front().unwrap();
            self.b.handle_frame(now, &f);
            any = true;
        }
        while self.to_a.front().is_some_and(|(at, _)| *at <= now) {
            let (_, f) = self.to_a.pop_front().unwrap();
            self.a.handle_frame(now, &f);
            any = true;
        }
        if self.a.poll_timeout().is_some_and(|t| t <= now) {
            self.a.handle_timeout(now);
            assert!(!matches!(self.a.poll_timeout(), Some(t) if t <= now), "a's timer not cleared");
            any = true;
        }
        if self.b.poll_timeout().is_some_and(|t| t <= now) {
            self.b.handle_timeout(now);
            assert!(!matches!(self.b.poll_timeout(), Some(t) if t <= now), "b's timer not cleared");
            any = true;
        }
        any
    }

    /// The earliest delivery or deadline still to come.
    fn next_event(&self) -> Option<Instant> {
        [
            self.to_a.front().map(|(at, _)| *at),
            self.to_b.front().map(|(at, _)| *at),
            self.a.poll_timeout(),
            self.b.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Steps until nothing is left to happen, jumping time to the next delivery or deadline;
    /// stops `limit` of simulated time after the current time.
    pub(crate) fn drive(&mut self, limit: Duration) {
        let end = self.now + limit;
        for _ in 0..1_000_000 {
            while self.step() {}
            match self.next_event() {
                Some(t) if t <= end => self.now = self.now.max(t),
                _ => return,
            }
        }
        panic!("the pair did not settle");
    }
}
