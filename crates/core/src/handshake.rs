//! The handshake that opens a connection to a peer's RPC/data port, without I/O.
//!
//! The initiator sends `Hello`, whose payload is the instance id it expects (0: any), and
//! waits for `HelloAck`, whose payload is the target's instance id, until its deadline. An
//! answer naming another instance than the one expected means the peer restarted.
//!
//! Call order for [`Handshake`]: `new(now, ..)` → `poll_transmit` (the `Hello` to send, once)
//! → `handle_frame` for each frame that arrives, `handle_closed` if the connection closes,
//! `handle_timeout(now)` when `poll_timeout` is due (a no-op when called early) → after each
//! input, `poll_event` until it returns `None`. Exactly one event is ever produced:
//! `Established` or `Failed`; inputs after it are ignored.
//!
//! The target's side is one function, [`answer`].

use std::time::{Duration, Instant};

use crate::wire::{FrameKind, Header, Status, HEADER_LEN, INSTANCE_LEN};
use crate::InstanceId;

/// Bytes of a `Hello` or `HelloAck` frame (header and instance id).
pub const HELLO_LEN: usize = HEADER_LEN + INSTANCE_LEN as usize;

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// No `HelloAck` arrived before the deadline.
    #[error("no answer to hello within {after:?}")]
    TimedOut { after: Duration },
    /// The answer was not a `HelloAck` with an instance id.
    #[error("bad hello answer: {kind:?} with status {status:?} and {len} payload bytes")]
    BadAnswer { kind: FrameKind, status: Status, len: usize },
    /// The peer answered as another instance than the one expected.
    #[error("the peer restarted (instance {found}, expected {expected})")]
    Restarted { expected: InstanceId, found: InstanceId },
    /// The connection closed before the answer.
    #[error("the connection closed during the handshake")]
    Closed,
}

/// What a handshake ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeEvent {
    /// The peer answered as this instance.
    Established(InstanceId),
    Failed(HandshakeFailure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Over,
}

/// The initiator's side of a handshake.
#[derive(Debug)]
pub struct Handshake {
    expect: Option<InstanceId>,
    started: Instant,
    deadline: Instant,
    hello: Option<[u8; HELLO_LEN]>,
    state: State,
    event: Option<HandshakeEvent>,
}

impl Handshake {
    /// A handshake started at `now` that fails unless answered within `timeout`, by the
    /// instance `expect` when given.
    pub fn new(now: Instant, timeout: Duration, expect: Option<InstanceId>) -> Self {
        let mut hello = [0u8; HELLO_LEN];
        hello[..HEADER_LEN]
            .copy_from_slice(&Header::new(FrameKind::Hello, 0, 0, INSTANCE_LEN).encode());
        hello[HEADER_LEN..].copy_from_slice(&expect.map_or(0, |i| i.0).to_le_bytes());
        Self {
            expect,
            started: now,
            deadline: now + timeout,
            hello: Some(hello),
            state: State::Waiting,
            event: None,
        }
    }

    /// The `Hello` frame to send (once).
    pub fn poll_transmit(&mut self) -> Option<[u8; HELLO_LEN]> {
        self.hello.take()
    }

    /// A frame arrived (its header and whole payload).
    pub fn handle_frame(&mut self, _now: Instant, header: &Header, payload: &[u8]) {
        if self.state != State::Waiting {
            return;
        }
        let ok = header.kind == FrameKind::HelloAck
            && header.status == Status::Ok
            && payload.len() == INSTANCE_LEN as usize;
        if !ok {
            let (kind, status, len) = (header.kind, header.status, payload.len());
            return self.end(HandshakeEvent::Failed(HandshakeFailure::BadAnswer {
                kind,
                status,
                len,
            }));
        }
        let mut id = [0u8; INSTANCE_LEN as usize];
        id.copy_from_slice(payload);
        let found = InstanceId(u128::from_le_bytes(id));
        match self.expect {
            Some(expected) if expected != found => {
                self.end(HandshakeEvent::Failed(HandshakeFailure::Restarted { expected, found }))
            }
            _ => self.end(HandshakeEvent::Established(found)),
        }
    }

    /// The connection closed.
    pub fn handle_closed(&mut self) {
        if self.state == State::Waiting {
            self.end(HandshakeEvent::Failed(HandshakeFailure::Closed));
        }
    }

    /// Fails the handshake if its deadline passed (a no-op before).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Waiting && now >= self.deadline {
            let after = now.saturating_duration_since(self.started);
            self.end(HandshakeEvent::Failed(HandshakeFailure::TimedOut { after }));
        }
    }

    /// When `handle_timeout` is next due (`None` once the handshake is over).
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.state == State::Waiting).then_some(self.deadline)
    }

    /// The outcome, once.
    pub fn poll_event(&mut self) -> Option<HandshakeEvent> {
        self.event.take()
    }

    fn end(&mut self, event: HandshakeEvent) {
        self.state = State::Over;
        self.event = Some(event);
    }
}

/// The target's answer to a `Hello`: a `HelloAck` carrying its instance id, tagged as the
/// hello was.
pub fn answer(hello: &Header, me: InstanceId) -> [u8; HELLO_LEN] {
    let mut out = [0u8; HELLO_LEN];
    out[..HEADER_LEN]
        .copy_from_slice(&Header::new(FrameKind::HelloAck, hello.tag, 0, INSTANCE_LEN).encode());
    out[HEADER_LEN..].copy_from_slice(&me.0.to_le_bytes());
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::sim::{decode, Endpoint, Link, Pair};

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// The initiator under test.
    struct Client {
        hs: Handshake,
        events: Vec<HandshakeEvent>,
    }

    impl Endpoint for Client {
        fn poll_transmit(&mut self, _now: Instant) -> Option<Vec<u8>> {
            self.hs.poll_transmit().map(|b| b.to_vec())
        }
        fn handle_frame(&mut self, now: Instant, frame: &[u8]) {
            let (h, payload) = decode(frame);
            self.hs.handle_frame(now, &h, payload);
            self.events.extend(self.hs.poll_event());
        }
        fn poll_timeout(&self) -> Option<Instant> {
            self.hs.poll_timeout()
        }
        fn handle_timeout(&mut self, now: Instant) {
            self.hs.handle_timeout(now);
            self.events.extend(self.hs.poll_event());
        }
    }

    /// A target that answers every hello as `me` (or stays silent when `mute`).
    struct Target {
        me: InstanceId,
        mute: bool,
        out: Vec<Vec<u8>>,
        hellos: usize,
    }

    impl Endpoint for Target {
        fn poll_transmit(&mut self, _now: Instant) -> Option<Vec<u8>> {
            self.out.pop()
        }
        fn handle_frame(&mut self, _now: Instant, frame: &[u8]) {
            let (h, _) = decode(frame);
            assert_eq!(h.kind, FrameKind::Hello);
            self.hellos += 1;
            if !self.mute {
                self.out.push(answer(&h, self.me).to_vec());
            }
        }
        fn poll_timeout(&self) -> Option<Instant> {
            None
        }
        fn handle_timeout(&mut self, _now: Instant) {}
    }

    fn pair(link: Link, expect: Option<InstanceId>, me: u128, mute: bool) -> Pair<Client, Target> {
        let now = Instant::now();
        let client = Client { hs: Handshake::new(now, TIMEOUT, expect), events: Vec::new() };
        let target = Target { me: InstanceId(me), mute, out: Vec::new(), hellos: 0 };
        Pair::new(now, client, target, link)
    }

    #[test]
    fn established_in_one_round_trip() {
        let latency = Duration::from_millis(3);
        let mut p = pair(Link { latency, ..Link::default() }, Some(InstanceId(9)), 9, false);
        p.drive(Duration::from_secs(60));
        assert_eq!(p.a.events, vec![HandshakeEvent::Established(InstanceId(9))]);
        assert_eq!(p.elapsed(), 2 * latency);
    }

    #[test]
    fn a_peer_that_never_answers_fails_at_the_deadline_in_simulated_time() {
        let real = Instant::now();
        let mut p = pair(Link::default(), None, 1, true);
        p.drive(Duration::from_secs(3600));
        assert_eq!(p.b.hellos, 1);
        assert_eq!(
            p.a.events,
            vec![HandshakeEvent::Failed(HandshakeFailure::TimedOut { after: TIMEOUT })]
        );
        assert_eq!(p.elapsed(), TIMEOUT, "failed exactly at its deadline");
        assert!(
            real.elapsed() < Duration::from_millis(500),
            "no real waiting: {:?}",
            real.elapsed()
        );
    }

    #[test]
    fn a_lost_hello_fails_at_the_deadline() {
        let mut p = pair(Link { drop_one_in: 1, ..Link::default() }, None, 1, false);
        p.drive(Duration::from_secs(3600));
        assert_eq!(p.b.hellos, 0);
        assert!(matches!(
            p.a.events[..],
            [HandshakeEvent::Failed(HandshakeFailure::TimedOut { .. })]
        ));
    }

    #[test]
    fn an_answer_after_the_deadline_is_ignored() {
        let link = Link { latency: TIMEOUT, ..Link::default() };
        let mut p = pair(link, None, 1, false);
        p.drive(Duration::from_secs(3600));
        assert_eq!(p.b.hellos, 1);
        assert_eq!(p.a.events.len(), 1, "{:?}", p.a.events);
        assert!(matches!(p.a.events[0], HandshakeEvent::Failed(HandshakeFailure::TimedOut { .. })));
    }

    #[test]
    fn duplicated_frames_give_one_outcome() {
        let link =
            Link { duplicate_one_in: 1, latency: Duration::from_millis(1), ..Link::default() };
        let mut p = pair(link, Some(InstanceId(4)), 4, false);
        p.drive(Duration::from_secs(60));
        assert_eq!(p.b.hellos, 2, "the hello arrived twice");
        assert_eq!(p.a.events, vec![HandshakeEvent::Established(InstanceId(4))]);
    }

    #[test]
    fn a_restarted_peer_is_recognised() {
        let mut p = pair(Link::default(), Some(InstanceId(4)), 5, false);
        p.drive(Duration::from_secs(60));
        let restarted =
            HandshakeFailure::Restarted { expected: InstanceId(4), found: InstanceId(5) };
        assert_eq!(p.a.events, vec![HandshakeEvent::Failed(restarted)]);
    }

    #[test]
    fn wrong_answers_and_a_close_fail_it() {
        let now = Instant::now();
        let mut hs = Handshake::new(now, TIMEOUT, None);
        hs.handle_frame(now, &Header::new(FrameKind::ProbeAck, 0, 0, 0), &[]);
        assert!(matches!(
            hs.poll_event(),
            Some(HandshakeEvent::Failed(HandshakeFailure::BadAnswer {
                kind: FrameKind::ProbeAck,
                ..
            }))
        ));
        assert_eq!(hs.poll_timeout(), None);
        hs.handle_closed();
        assert_eq!(hs.poll_event(), None, "one outcome only");

        let mut hs = Handshake::new(now, TIMEOUT, None);
        hs.handle_timeout(now + TIMEOUT / 2);
        assert_eq!(hs.poll_event(), None, "early timeouts are no-ops");
        hs.handle_closed();
        assert_eq!(hs.poll_event(), Some(HandshakeEvent::Failed(HandshakeFailure::Closed)));
    }
}
