//! Stall detection for one connection, without I/O.
//!
//! A connection is stalled when, for the stall deadline,
//! - the peer sent nothing while answers were awaited from it (a host gone without a reset:
//!   no byte, no FIN, ever), or
//! - the peer stopped in the middle of a frame, or
//! - bytes waited to be sent and the peer took none (it stopped reading).
//!
//! An idle connection (nothing awaited, nothing to send, between frames) never stalls.
//!
//! Call order for [`StallDetector`]: `new(now, stall)`, then in any order as they happen:
//! `handle_received` (bytes arrived), `handle_awaiting` (the count of answers awaited
//! changed), `handle_sent` (the socket took bytes), `handle_send_blocked` (bytes wait for
//! room, or no longer do); `handle_timeout(now)` when `poll_timeout` is due (a no-op when
//! called early) → `poll_event`. The detector fires once; after that it is inert and
//! [`StallDetector::stalled`] says why. The caller then drops the connection.

use std::fmt;
use std::time::{Duration, Instant};

/// Why a connection stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stalled {
    /// The peer stopped sending in the middle of a frame.
    MidFrame { after: Duration },
    /// Answers were awaited and the peer sent nothing.
    Silent { after: Duration, awaiting: usize },
    /// Bytes waited to be sent and the peer took none.
    SendBlocked { after: Duration },
}

impl fmt::Display for Stalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MidFrame { after } => {
                write!(f, "the peer stalled in the middle of a frame for {after:?}")
            }
            Self::Silent { after, awaiting } => write!(
                f,
                "the peer sent nothing for {after:?} while requests were pending ({awaiting} \
                 answers awaited)"
            ),
            Self::SendBlocked { after } => {
                write!(f, "the peer took none of the bytes sent to it for {after:?}")
            }
        }
    }
}

/// Watches one connection for stalls.
#[derive(Debug, Clone)]
pub struct StallDetector {
    stall: Duration,
    awaiting: usize,
    mid_frame: bool,
    /// We stopped reading (back-pressure: our answers pile up): the peer owes us nothing
    /// meanwhile, and a peer that stops reading our answers is the send watch's to catch.
    paused: bool,
    /// Start of the receive window: the last arrival, or when answers began to be awaited.
    heard: Instant,
    send_blocked: bool,
    /// Start of the send window: the last write progress, or when the block began.
    sent: Instant,
    stalled: Option<Stalled>,
    event: Option<Stalled>,
}

impl StallDetector {
    pub fn new(now: Instant, stall: Duration) -> Self {
        Self {
            stall,
            awaiting: 0,
            mid_frame: false,
            paused: false,
            heard: now,
            send_blocked: false,
            sent: now,
            stalled: None,
            event: None,
        }
    }

    /// Bytes arrived; `mid_frame`: what arrived so far ends inside a frame.
    pub fn handle_received(&mut self, now: Instant, mid_frame: bool) {
        self.heard = now;
        self.mid_frame = mid_frame;
    }

    /// `n` answers are now awaited from the peer. The silence window starts when the count
    /// leaves zero.
    pub fn handle_awaiting(&mut self, now: Instant, n: usize) {
        if !self.receive_watched() && n > 0 {
            self.heard = now;
        }
        self.awaiting = n;
    }

    /// We stop reading the socket (`true`, back-pressure) or read it again (`false`). While
    /// paused, the receive window is not watched; it restarts when reading resumes.
    pub fn handle_receive_paused(&mut self, now: Instant, paused: bool) {
        if self.paused && !paused {
            self.heard = now;
        }
        self.paused = paused;
    }

    /// The socket took bytes.
    pub fn handle_sent(&mut self, now: Instant) {
        self.sent = now;
    }

    /// Bytes wait for room in the socket (`true`), or nothing waits any more (`false`).
    pub fn handle_send_blocked(&mut self, now: Instant, blocked: bool) {
        if blocked && !self.send_blocked {
            self.sent = now;
        }
        self.send_blocked = blocked;
    }

    fn receive_watched(&self) -> bool {
        !self.paused && (self.awaiting > 0 || self.mid_frame)
    }

    /// When `handle_timeout` is next due (`None` while idle, and once stalled).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.stalled.is_some() {
            return None;
        }
        let recv = self.receive_watched().then(|| self.heard + self.stall);
        let send = self.send_blocked.then(|| self.sent + self.stall);
        recv.into_iter().chain(send).min()
    }

    /// Declares the stall if a window has run out (a no-op before).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.stalled.is_some() {
            return;
        }
        let stalled = if self.receive_watched() && now >= self.heard + self.stall {
            let after = now.saturating_duration_since(self.heard);
            if self.mid_frame {
                Stalled::MidFrame { after }
            } else {
                Stalled::Silent { after, awaiting: self.awaiting }
            }
        } else if self.send_blocked && now >= self.sent + self.stall {
            Stalled::SendBlocked { after: now.saturating_duration_since(self.sent) }
        } else {
            return;
        };
        self.stalled = Some(stalled);
        self.event = Some(stalled);
    }

    /// The stall, once.
    pub fn poll_event(&mut self) -> Option<Stalled> {
        self.event.take()
    }

    /// Why the connection stalled, if it did.
    pub fn stalled(&self) -> Option<Stalled> {
        self.stalled
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {

    #[test]
    fn a_receiver_paused_by_back_pressure_is_not_a_stalled_sender() {
        let t0 = Instant::now();
        let stall = Duration::from_secs(10);
        let mut d = StallDetector::new(t0, stall);
        // Whole headers wait in our buffer while we stop reading: not the peer's fault.
        d.handle_received(t0, true);
        d.handle_receive_paused(t0, true);
        assert_eq!(d.poll_timeout(), None);
        d.handle_timeout(t0 + 3 * stall);
        assert_eq!(d.stalled(), None);
        // Reading resumes: the window starts again from then.
        let resumed = t0 + 3 * stall;
        d.handle_receive_paused(resumed, false);
        assert_eq!(d.poll_timeout(), Some(resumed + stall));
        d.handle_timeout(resumed + stall);
        assert!(matches!(d.stalled(), Some(Stalled::MidFrame { .. })));
    }
    use super::*;
    use crate::sim::{decode, Endpoint, Link, Pair};
    use crate::wire::{FrameKind, Header, HEADER_LEN};

    const STALL: Duration = Duration::from_secs(10);

    /// An initiator that sends `left` READ requests one after another, each once the previous
    /// one was answered, watching the connection.
    struct Initiator {
        watch: StallDetector,
        left: usize,
        in_flight: bool,
        answers: usize,
        events: Vec<Stalled>,
    }

    impl Initiator {
        fn new(now: Instant, requests: usize) -> Self {
            let watch = StallDetector::new(now, STALL);
            Self { watch, left: requests, in_flight: false, answers: 0, events: Vec::new() }
        }
    }

    impl Endpoint for Initiator {
        fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
            if self.in_flight || self.left == 0 || self.watch.stalled().is_some() {
                return None;
            }
            self.left -= 1;
            self.in_flight = true;
            self.watch.handle_awaiting(now, 1);
            Some(Header::new(FrameKind::Read, 1, 0, 16).encode().to_vec())
        }
        fn handle_frame(&mut self, now: Instant, frame: &[u8]) {
            let (h, _) = decode(frame);
            assert_eq!(h.kind, FrameKind::ReadData);
            self.watch.handle_received(now, false);
            self.in_flight = false;
            self.answers += 1;
            self.watch.handle_awaiting(now, 0);
        }
        fn poll_timeout(&self) -> Option<Instant> {
            self.watch.poll_timeout()
        }
        fn handle_timeout(&mut self, now: Instant) {
            self.watch.handle_timeout(now);
            self.events.extend(self.watch.poll_event());
        }
    }

    /// A target that answers each READ after `think` (or never, when `None`).
    struct Target {
        think: Option<Duration>,
        due: Vec<Instant>,
    }

    impl Endpoint for Target {
        fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
            let at = self.due.iter().position(|t| *t <= now)?;
            self.due.swap_remove(at);
            let mut f = Header::new(FrameKind::ReadData, 1, 0, 16).encode().to_vec();
            f.extend_from_slice(&[0u8; 16]);
            Some(f)
        }
        fn handle_frame(&mut self, now: Instant, _frame: &[u8]) {
            if let Some(t) = self.think {
                self.due.push(now + t);
            }
        }
        fn poll_timeout(&self) -> Option<Instant> {
            self.due.iter().min().copied()
        }
        fn handle_timeout(&mut self, _now: Instant) {}
    }

    fn pair(requests: usize, think: Option<Duration>, link: Link) -> Pair<Initiator, Target> {
        let now = Instant::now();
        Pair::new(now, Initiator::new(now, requests), Target { think, due: Vec::new() }, link)
    }

    #[test]
    fn a_silent_peer_fails_pending_requests_at_the_stall_deadline() {
        let real = Instant::now();
        let latency = Duration::from_millis(2);
        let mut p = pair(1, None, Link { latency, ..Link::default() });
        p.drive(Duration::from_secs(3600));
        assert_eq!(p.a.events, vec![Stalled::Silent { after: STALL, awaiting: 1 }]);
        assert_eq!(p.elapsed(), STALL);
        assert!(p.a.events[0].to_string().contains("sent nothing"));
        assert!(real.elapsed() < Duration::from_millis(500), "{:?}", real.elapsed());
    }

    #[test]
    fn a_slow_peer_that_answers_within_the_deadline_never_stalls() {
        let think = STALL - Duration::from_millis(5);
        let mut p =
            pair(20, Some(think), Link { latency: Duration::from_millis(1), ..Link::default() });
        p.drive(Duration::from_secs(3600));
        assert_eq!(p.a.answers, 20);
        assert!(p.a.events.is_empty(), "{:?}", p.a.events);
        assert!(p.elapsed() > 10 * STALL, "ran far past one stall deadline");
        assert_eq!(p.a.poll_timeout(), None, "idle: nothing to watch");
    }

    #[test]
    fn a_lost_answer_is_a_stall() {
        let link = Link { drop_one_in: 3, seed: 7, ..Link::default() };
        let mut p = pair(50, Some(Duration::from_millis(1)), link);
        p.drive(Duration::from_secs(3600));
        assert!(p.a.answers < 50);
        assert!(matches!(p.a.events[..], [Stalled::Silent { .. }]), "{:?}", p.a.events);
    }

    /// A target reading a byte stream (chunks need not be whole frames) and watching for a
    /// sender that stops mid-frame.
    struct StreamTarget {
        watch: StallDetector,
        buf: Vec<u8>,
        frames: usize,
        events: Vec<Stalled>,
    }

    impl Endpoint for StreamTarget {
        fn poll_transmit(&mut self, _now: Instant) -> Option<Vec<u8>> {
            None
        }
        fn handle_frame(&mut self, now: Instant, chunk: &[u8]) {
            if self.watch.stalled().is_some() {
                return; // dropped
            }
            self.buf.extend_from_slice(chunk);
            loop {
                if self.buf.len() < HEADER_LEN {
                    break;
                }
                let (h, _) = decode(&self.buf[..HEADER_LEN]);
                let whole = HEADER_LEN + h.payload_len() as usize;
                if self.buf.len() < whole {
                    break;
                }
                self.buf.drain(..whole);
                self.frames += 1;
            }
            self.watch.handle_received(now, !self.buf.is_empty());
        }
        fn poll_timeout(&self) -> Option<Instant> {
            self.watch.poll_timeout()
        }
        fn handle_timeout(&mut self, now: Instant) {
            self.watch.handle_timeout(now);
            self.events.extend(self.watch.poll_event());
        }
    }

    /// A sender of prepared chunks, one per `gap`.
    struct Chunks {
        chunks: Vec<Vec<u8>>,
        next_at: Instant,
        gap: Duration,
    }

    impl Endpoint for Chunks {
        fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
            if self.chunks.is_empty() || now < self.next_at {
                return None;
            }
            self.next_at = now + self.gap;
            Some(self.chunks.remove(0))
        }
        fn handle_frame(&mut self, _now: Instant, _frame: &[u8]) {}
        fn poll_timeout(&self) -> Option<Instant> {
            (!self.chunks.is_empty()).then_some(self.next_at)
        }
        fn handle_timeout(&mut self, _now: Instant) {}
    }

    fn write_frame(len: usize) -> Vec<u8> {
        let mut f = Header::new(FrameKind::Write, 1, 0x1000, len as u64).encode().to_vec();
        f.resize(HEADER_LEN + len, 7);
        f
    }

    fn stream(chunks: Vec<Vec<u8>>, gap: Duration) -> Pair<Chunks, StreamTarget> {
        let now = Instant::now();
        let sender = Chunks { chunks, next_at: now, gap };
        let target = StreamTarget {
            watch: StallDetector::new(now, STALL),
            buf: Vec::new(),
            frames: 0,
            events: Vec::new(),
        };
        Pair::new(now, sender, target, Link::default())
    }

    #[test]
    fn a_sender_stalled_mid_frame_is_detected_after_its_last_byte() {
        let f = write_frame(4096);
        // A whole frame, then a header and part of the next payload, then nothing.
        let chunks = vec![f.clone(), f[..HEADER_LEN + 100].to_vec()];
        let gap = Duration::from_secs(3);
        let mut p = stream(chunks, gap);
        p.drive(Duration::from_secs(3600));
        assert_eq!(p.b.frames, 1);
        assert_eq!(p.b.events, vec![Stalled::MidFrame { after: STALL }]);
        assert_eq!(p.elapsed(), gap + STALL, "measured from the last byte");
    }

    #[test]
    fn a_frame_trickling_in_slower_than_the_deadline_stalls_only_when_a_gap_exceeds_it() {
        let f = write_frame(300);
        let chunks: Vec<Vec<u8>> = f.chunks(10).map(<[u8]>::to_vec).collect();
        let mut p = stream(chunks.clone(), STALL - Duration::from_millis(1));
        p.drive(Duration::from_secs(36_000));
        assert_eq!((p.b.frames, p.b.events.len()), (1, 0), "each gap is under the deadline");
        let mut p = stream(chunks, STALL + Duration::from_millis(1));
        p.drive(Duration::from_secs(36_000));
        assert_eq!(p.b.frames, 0);
        assert!(matches!(p.b.events[..], [Stalled::MidFrame { .. }]));
    }

    #[test]
    fn a_peer_that_stops_reading_stalls_the_sender() {
        let t0 = Instant::now();
        let mut w = StallDetector::new(t0, STALL);
        w.handle_send_blocked(t0 + STALL * 5, true);
        assert_eq!(w.poll_timeout(), Some(t0 + STALL * 6), "the window starts at the block");
        w.handle_sent(t0 + STALL * 6 - Duration::from_secs(1));
        w.handle_timeout(t0 + STALL * 6);
        assert_eq!(w.poll_event(), None, "progress restarted the window");
        w.handle_timeout(t0 + STALL * 7);
        assert_eq!(
            w.poll_event(),
            Some(Stalled::SendBlocked { after: STALL + Duration::from_secs(1) })
        );
        assert_eq!(w.poll_timeout(), None);
        w.handle_timeout(t0 + STALL * 9);
        assert_eq!(w.poll_event(), None, "fires once");
    }

    #[test]
    fn an_idle_connection_never_stalls() {
        let t0 = Instant::now();
        let mut w = StallDetector::new(t0, STALL);
        w.handle_awaiting(t0, 2);
        w.handle_received(t0 + STALL / 2, false);
        w.handle_awaiting(t0 + STALL / 2, 0);
        w.handle_send_blocked(t0 + STALL / 2, false);
        assert_eq!(w.poll_timeout(), None);
        // Answers awaited again much later: the window starts then, not at the last byte.
        w.handle_awaiting(t0 + STALL * 100, 1);
        assert_eq!(w.poll_timeout(), Some(t0 + STALL * 101));
    }
}
