//! The handshake that opens a connection to a peer's RPC/data port, without I/O.
//!
//! The initiator sends `Hello`, whose payload is the instance id it expects (0: any), and
//! waits for `HelloAck`, whose payload is the target's instance id, until its deadline. An
//! answer naming another instance than the one expected means the peer restarted.
//!
//! With a cluster secret (`auth.rs`) the initiator's `Hello` also carries its own instance id
//! and a fresh nonce; the target's `HelloAck` carries its nonce and its proof; the initiator
//! checks the proof, sends its own in `Auth`, and the connection is open when `AuthAck` says
//! Ok. A target with a secret refuses a hello without one (`HelloAck` with AccessDenied) and
//! serves nothing before a valid `Auth`; an initiator with a secret refuses a target that
//! cannot prove it. Either way both sides say why.
//!
//! Call order for [`Handshake`]: `new(now, ..)` → `poll_transmit` (frames to send: the
//! `Hello`, later the `Auth`) → `handle_frame` for each frame that arrives, `handle_closed` if
//! the connection closes, `handle_timeout(now)` when `poll_timeout` is due (a no-op when
//! called early) → after each input, `poll_transmit` and `poll_event` until they return
//! `None`. Exactly one event is ever produced: `Established` or `Failed`; inputs after it are
//! ignored.
//!
//! The target's side is [`answer_hello`] and [`answer_auth`].

use std::time::{Duration, Instant};

use crate::auth::{ClusterSecret, Nonce, Role, Transcript, NONCE_LEN};
use crate::wire::{
    FrameKind, Header, Status, HEADER_LEN, HELLO_ACK_AUTH_PAYLOAD, HELLO_AUTH_PAYLOAD, INSTANCE_LEN,
};
use crate::InstanceId;

/// Bytes of a plain `Hello` or `HelloAck` frame (header and instance id).
pub const HELLO_LEN: usize = HEADER_LEN + INSTANCE_LEN as usize;

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// No answer arrived before the deadline.
    #[error("no answer to hello within {after:?}")]
    TimedOut { after: Duration },
    /// The answer was not a `HelloAck` with an instance id (or not an `AuthAck`).
    #[error("bad hello answer: {kind:?} with status {status:?} and {len} payload bytes")]
    BadAnswer { kind: FrameKind, status: Status, len: usize },
    /// The peer answered as another instance than the one expected.
    #[error("the peer restarted (instance {found}, expected {expected})")]
    Restarted { expected: InstanceId, found: InstanceId },
    /// The connection closed before the answer.
    #[error("the connection closed during the handshake")]
    Closed,
    /// The peer refused us: it requires the cluster secret, or our proof of it was wrong.
    #[error("refused by the peer: {reason}")]
    Refused { reason: &'static str },
    /// The peer could not prove the cluster secret: it has none, or another.
    #[error("the peer is not trusted: {reason}")]
    Unproven { reason: &'static str },
}

/// What a handshake ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeEvent {
    /// The peer answered as this instance.
    Established(InstanceId),
    Failed(HandshakeFailure),
}

/// What the initiator proves with: the secret, its own instance id and a fresh nonce.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    pub secret: ClusterSecret,
    pub me: InstanceId,
    pub nonce: Nonce,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// For the `HelloAck`.
    Hello,
    /// For the `AuthAck`, the target being this instance.
    Auth(InstanceId),
    Over,
}

/// The initiator's side of a handshake.
#[derive(Debug)]
pub struct Handshake {
    expect: Option<InstanceId>,
    auth: Option<ClientAuth>,
    started: Instant,
    deadline: Instant,
    out: Vec<Vec<u8>>,
    state: State,
    event: Option<HandshakeEvent>,
}

fn frame(kind: FrameKind, status: Status, tag: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(
        &Header::new(kind, tag, 0, payload.len() as u64).with_status(status).encode(),
    );
    out.extend_from_slice(payload);
    out
}

fn instance(b: &[u8]) -> InstanceId {
    let mut id = [0u8; INSTANCE_LEN as usize];
    id.copy_from_slice(&b[..INSTANCE_LEN as usize]);
    InstanceId(u128::from_le_bytes(id))
}

impl Handshake {
    /// A handshake started at `now` that fails unless answered within `timeout`, by the
    /// instance `expect` when given, proving the cluster secret with `auth` when given.
    pub fn new(
        now: Instant,
        timeout: Duration,
        expect: Option<InstanceId>,
        auth: Option<ClientAuth>,
    ) -> Self {
        let mut payload = expect.map_or(0, |i| i.0).to_le_bytes().to_vec();
        if let Some(a) = &auth {
            payload.extend_from_slice(&a.me.0.to_le_bytes());
            payload.extend_from_slice(&a.nonce);
        }
        Self {
            expect,
            auth,
            started: now,
            deadline: now + timeout,
            out: vec![frame(FrameKind::Hello, Status::Ok, 0, &payload)],
            state: State::Hello,
            event: None,
        }
    }

    /// The next frame to send, whole (the `Hello` first; the `Auth` once the target proved
    /// the secret).
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.remove(0))
        }
    }

    /// A frame arrived (its header and whole payload).
    pub fn handle_frame(&mut self, _now: Instant, header: &Header, payload: &[u8]) {
        let bad = |h: &Header| {
            HandshakeEvent::Failed(HandshakeFailure::BadAnswer {
                kind: h.kind,
                status: h.status,
                len: payload.len(),
            })
        };
        match self.state {
            State::Over => {}
            State::Hello => {
                if header.kind == FrameKind::HelloAck && header.status == Status::AccessDenied {
                    let reason = if self.auth.is_some() {
                        "it refused our hello"
                    } else {
                        "it requires a cluster secret and this engine has none"
                    };
                    return self.fail(HandshakeFailure::Refused { reason });
                }
                if header.kind != FrameKind::HelloAck || header.status != Status::Ok {
                    return self.end(bad(header));
                }
                let plain = payload.len() == INSTANCE_LEN as usize;
                let challenged = payload.len() == HELLO_ACK_AUTH_PAYLOAD as usize;
                if !plain && !challenged {
                    return self.end(bad(header));
                }
                let found = instance(payload);
                let restarted = self
                    .expect
                    .filter(|e| *e != found)
                    .map(|expected| HandshakeFailure::Restarted { expected, found });
                let Some(auth) = &self.auth else {
                    if let Some(r) = restarted {
                        return self.fail(r);
                    }
                    return if plain {
                        self.end(HandshakeEvent::Established(found))
                    } else {
                        self.end(bad(header))
                    };
                };
                if plain {
                    let reason = "it has no cluster secret (it sent no proof)";
                    return self.fail(HandshakeFailure::Unproven { reason });
                }
                let mut ns = [0u8; NONCE_LEN];
                ns.copy_from_slice(
                    &payload[INSTANCE_LEN as usize..INSTANCE_LEN as usize + NONCE_LEN],
                );
                let t = Transcript {
                    initiator: auth.me,
                    target: found,
                    initiator_nonce: auth.nonce,
                    target_nonce: ns,
                };
                let proof = &payload[INSTANCE_LEN as usize + NONCE_LEN..];
                if !auth.secret.verify(Role::Target, &t, proof) {
                    let reason = "its proof is not of our cluster secret (another secret)";
                    return self.fail(HandshakeFailure::Unproven { reason });
                }
                // Only a proven answer may say the peer restarted (an unproven one could make
                // us retire a live peer).
                if let Some(r) = restarted {
                    return self.fail(r);
                }
                let mine = auth.secret.prove(Role::Initiator, &t);
                self.out.push(frame(FrameKind::Auth, Status::Ok, 0, &mine));
                self.state = State::Auth(found);
            }
            State::Auth(found) => match (header.kind, header.status) {
                (FrameKind::AuthAck, Status::Ok) => self.end(HandshakeEvent::Established(found)),
                (FrameKind::AuthAck, Status::AccessDenied) => {
                    let reason =
                        "it did not accept our proof of the cluster secret (another secret)";
                    self.fail(HandshakeFailure::Refused { reason })
                }
                _ => self.end(bad(header)),
            },
        }
    }

    /// The connection closed.
    pub fn handle_closed(&mut self) {
        if self.state != State::Over {
            self.fail(HandshakeFailure::Closed);
        }
    }

    /// Fails the handshake if its deadline passed (a no-op before).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state != State::Over && now >= self.deadline {
            let after = now.saturating_duration_since(self.started);
            self.fail(HandshakeFailure::TimedOut { after });
        }
    }

    /// When `handle_timeout` is next due (`None` once the handshake is over).
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.state != State::Over).then_some(self.deadline)
    }

    /// The outcome, once.
    pub fn poll_event(&mut self) -> Option<HandshakeEvent> {
        self.event.take()
    }

    fn fail(&mut self, f: HandshakeFailure) {
        self.end(HandshakeEvent::Failed(f));
    }

    fn end(&mut self, event: HandshakeEvent) {
        self.state = State::Over;
        self.out.clear();
        self.event = Some(event);
    }
}

/// The target's plain answer to a `Hello`: a `HelloAck` carrying its instance id, tagged as
/// the hello was.
pub fn answer(hello: &Header, me: InstanceId) -> [u8; HELLO_LEN] {
    let mut out = [0u8; HELLO_LEN];
    out[..HEADER_LEN]
        .copy_from_slice(&Header::new(FrameKind::HelloAck, hello.tag, 0, INSTANCE_LEN).encode());
    out[HEADER_LEN..].copy_from_slice(&me.0.to_le_bytes());
    out
}

/// What the target does with a `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloAnswer {
    /// Send this; the connection is open (neither side has a secret).
    Open(Vec<u8>),
    /// Send this challenge; the initiator's `Auth` must come next, for this transcript.
    Challenged(Vec<u8>, Transcript),
    /// Send this refusal and close: we have a secret and the hello offered no proof.
    Refused(Vec<u8>),
    /// Send this plain answer: the initiator offered a secret we do not have (it will refuse
    /// us; worth a warning here).
    Unasked(Vec<u8>),
}

/// The target's answer to a `Hello` (`payload` whole) as instance `me`, with the cluster
/// `secret` when one is in force, and a fresh `nonce` of ours.
pub fn answer_hello(
    hello: &Header,
    payload: &[u8],
    me: InstanceId,
    secret: Option<&ClusterSecret>,
    nonce: Nonce,
) -> HelloAnswer {
    let offered = payload.len() == HELLO_AUTH_PAYLOAD as usize;
    let plain = answer(hello, me).to_vec();
    let Some(secret) = secret else {
        return if offered { HelloAnswer::Unasked(plain) } else { HelloAnswer::Open(plain) };
    };
    if !offered {
        return HelloAnswer::Refused(frame(
            FrameKind::HelloAck,
            Status::AccessDenied,
            hello.tag,
            &[],
        ));
    }
    let mut nc = [0u8; NONCE_LEN];
    nc.copy_from_slice(&payload[2 * INSTANCE_LEN as usize..]);
    let t = Transcript {
        initiator: instance(&payload[INSTANCE_LEN as usize..]),
        target: me,
        initiator_nonce: nc,
        target_nonce: nonce,
    };
    let mut body = me.0.to_le_bytes().to_vec();
    body.extend_from_slice(&nonce);
    body.extend_from_slice(&secret.prove(Role::Target, &t));
    HelloAnswer::Challenged(frame(FrameKind::HelloAck, Status::Ok, hello.tag, &body), t)
}

/// The target's answer to the initiator's `Auth` for handshake `t`: the `AuthAck`, and whether
/// the proof holds (if not, send the answer and close).
pub fn answer_auth(
    auth: &Header,
    payload: &[u8],
    secret: &ClusterSecret,
    t: &Transcript,
) -> (Vec<u8>, bool) {
    let ok = auth.kind == FrameKind::Auth && secret.verify(Role::Initiator, t, payload);
    let status = if ok { Status::Ok } else { Status::AccessDenied };
    (frame(FrameKind::AuthAck, status, auth.tag, &[]), ok)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::auth::{ClusterSecret, PROOF_LEN};
    use crate::sim::{decode, Endpoint, Link, Pair};

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// The initiator under test.
    struct Client {
        hs: Handshake,
        events: Vec<HandshakeEvent>,
    }

    impl Endpoint for Client {
        fn poll_transmit(&mut self, _now: Instant) -> Option<Vec<u8>> {
            self.hs.poll_transmit()
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
        let client = Client { hs: Handshake::new(now, TIMEOUT, expect, None), events: Vec::new() };
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
        let mut hs = Handshake::new(now, TIMEOUT, None, None);
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

        let mut hs = Handshake::new(now, TIMEOUT, None, None);
        hs.handle_timeout(now + TIMEOUT / 2);
        assert_eq!(hs.poll_event(), None, "early timeouts are no-ops");
        hs.handle_closed();
        assert_eq!(hs.poll_event(), Some(HandshakeEvent::Failed(HandshakeFailure::Closed)));
    }

    /// A target serving hellos the way the RPC port does, with or without a secret.
    struct AuthTarget {
        me: InstanceId,
        secret: Option<ClusterSecret>,
        nonce: u8,
        pending: Option<Transcript>,
        out: Vec<Vec<u8>>,
        /// What it saw: "open", "challenged", "refused", "unasked", "authed", "bad proof".
        log: Vec<&'static str>,
        /// Every frame the initiator sent (to replay them).
        seen: Vec<Vec<u8>>,
    }

    impl Endpoint for AuthTarget {
        fn poll_transmit(&mut self, _now: Instant) -> Option<Vec<u8>> {
            if self.out.is_empty() {
                None
            } else {
                Some(self.out.remove(0))
            }
        }
        fn handle_frame(&mut self, _now: Instant, frame: &[u8]) {
            self.seen.push(frame.to_vec());
            let (h, payload) = decode(frame);
            match h.kind {
                FrameKind::Hello => {
                    let nonce = [self.nonce; NONCE_LEN];
                    self.nonce = self.nonce.wrapping_add(1);
                    match answer_hello(&h, payload, self.me, self.secret.as_ref(), nonce) {
                        HelloAnswer::Open(a) => self.reply("open", a),
                        HelloAnswer::Refused(a) => self.reply("refused", a),
                        HelloAnswer::Unasked(a) => self.reply("unasked", a),
                        HelloAnswer::Challenged(a, t) => {
                            self.pending = Some(t);
                            self.reply("challenged", a)
                        }
                    }
                }
                FrameKind::Auth => {
                    let (Some(t), Some(secret)) = (self.pending.take(), self.secret.as_ref())
                    else {
                        self.log.push("auth out of turn");
                        return;
                    };
                    let (a, ok) = answer_auth(&h, payload, secret, &t);
                    self.reply(if ok { "authed" } else { "bad proof" }, a);
                }
                _ => self.log.push("other"),
            }
        }
        fn poll_timeout(&self) -> Option<Instant> {
            None
        }
        fn handle_timeout(&mut self, _now: Instant) {}
    }

    impl AuthTarget {
        fn new(me: u128, secret: Option<&[u8]>) -> Self {
            Self {
                me: InstanceId(me),
                secret: secret.map(|s| ClusterSecret::new(s).unwrap()),
                nonce: 100,
                pending: None,
                out: Vec::new(),
                log: Vec::new(),
                seen: Vec::new(),
            }
        }
        fn reply(&mut self, what: &'static str, frame: Vec<u8>) {
            self.log.push(what);
            self.out.push(frame);
        }
    }

    fn auth_pair(client: Option<&[u8]>, target: AuthTarget) -> Pair<Client, AuthTarget> {
        let now = Instant::now();
        let auth = client.map(|s| ClientAuth {
            secret: ClusterSecret::new(s).unwrap(),
            me: InstanceId(7),
            nonce: [1; NONCE_LEN],
        });
        let client =
            Client { hs: Handshake::new(now, TIMEOUT, Some(target.me), auth), events: Vec::new() };
        let link = Link { latency: Duration::from_millis(1), ..Link::default() };
        Pair::new(now, client, target, link)
    }

    #[test]
    fn the_same_secret_opens_the_connection_in_two_round_trips() {
        let mut p = auth_pair(Some(b"s3cret"), AuthTarget::new(9, Some(b"s3cret")));
        p.drive(Duration::from_secs(60));
        assert_eq!(p.a.events, vec![HandshakeEvent::Established(InstanceId(9))]);
        assert_eq!(p.b.log, vec!["challenged", "authed"]);
        assert_eq!(p.elapsed(), Duration::from_millis(4));
    }

    #[test]
    fn another_secret_or_none_is_refused_on_both_sides() {
        // Another secret: the initiator finds the target's proof wrong and sends none.
        let mut p = auth_pair(Some(b"one"), AuthTarget::new(9, Some(b"two")));
        p.drive(Duration::from_secs(60));
        assert!(matches!(
            p.a.events[..],
            [HandshakeEvent::Failed(HandshakeFailure::Unproven { .. })]
        ));
        assert_eq!(p.b.log, vec!["challenged"], "no proof was sent to it");
        // No secret here, one there: refused by the target.
        let mut p = auth_pair(None, AuthTarget::new(9, Some(b"two")));
        p.drive(Duration::from_secs(60));
        assert!(matches!(
            p.a.events[..],
            [HandshakeEvent::Failed(HandshakeFailure::Refused { .. })]
        ));
        assert_eq!(p.b.log, vec!["refused"]);
        // A secret here, none there: the target answers plainly, the initiator refuses it.
        let mut p = auth_pair(Some(b"one"), AuthTarget::new(9, None));
        p.drive(Duration::from_secs(60));
        assert!(matches!(
            p.a.events[..],
            [HandshakeEvent::Failed(HandshakeFailure::Unproven { .. })]
        ));
        assert_eq!(p.b.log, vec!["unasked"]);
        // Neither: as before.
        let mut p = auth_pair(None, AuthTarget::new(9, None));
        p.drive(Duration::from_secs(60));
        assert_eq!(p.a.events, vec![HandshakeEvent::Established(InstanceId(9))]);
    }

    #[test]
    fn a_recorded_handshake_replayed_to_the_target_is_refused() {
        let mut p = auth_pair(Some(b"s3cret"), AuthTarget::new(9, Some(b"s3cret")));
        p.drive(Duration::from_secs(60));
        let recorded = p.b.seen.clone();
        assert_eq!(recorded.len(), 2, "hello and auth");
        // The attacker replays the initiator's frames to the same target: its challenge has a
        // fresh nonce, so the old proof does not answer it.
        let mut target = p.b;
        target.log.clear();
        let now = Instant::now();
        for f in &recorded {
            target.handle_frame(now, f);
        }
        assert_eq!(target.log, vec!["challenged", "bad proof"]);
        let (h, _) = decode(target.out.last().unwrap());
        assert_eq!((h.kind, h.status), (FrameKind::AuthAck, Status::AccessDenied));
    }

    #[test]
    fn an_unproven_answer_cannot_claim_the_peer_restarted() {
        // Anyone answering on the address with another instance id and no valid proof: the
        // failure is "not trusted", never "restarted" (which would retire the peer).
        let now = Instant::now();
        let secret = ClusterSecret::new(b"x").unwrap();
        let auth = ClientAuth { secret, me: InstanceId(7), nonce: [1; NONCE_LEN] };
        let mut hs = Handshake::new(now, TIMEOUT, Some(InstanceId(3)), Some(auth));
        let _ = hs.poll_transmit();
        let mut body = 99u128.to_le_bytes().to_vec();
        body.extend_from_slice(&[0u8; NONCE_LEN + PROOF_LEN]);
        let h = Header::new(FrameKind::HelloAck, 0, 0, body.len() as u64);
        hs.handle_frame(now, &h, &body);
        let event = hs.poll_event();
        assert!(
            matches!(event, Some(HandshakeEvent::Failed(HandshakeFailure::Unproven { .. }))),
            "{event:?}"
        );
    }

    #[test]
    fn a_refusal_of_the_proof_fails_the_initiator() {
        let now = Instant::now();
        let auth = ClientAuth {
            secret: ClusterSecret::new(b"x").unwrap(),
            me: InstanceId(7),
            nonce: [1; NONCE_LEN],
        };
        let mut hs = Handshake::new(now, TIMEOUT, None, Some(auth.clone()));
        let hello = hs.poll_transmit().unwrap();
        let (h, payload) = decode(&hello);
        let HelloAnswer::Challenged(ack, _) =
            answer_hello(&h, payload, InstanceId(3), Some(&auth.secret), [5; NONCE_LEN])
        else {
            panic!("the target should challenge")
        };
        let (h, payload) = decode(&ack);
        hs.handle_frame(now, &h, payload);
        assert!(hs.poll_transmit().is_some(), "the initiator's proof");
        let denied = Header::new(FrameKind::AuthAck, 0, 0, 0).with_status(Status::AccessDenied);
        hs.handle_frame(now, &denied, &[]);
        assert!(matches!(
            hs.poll_event(),
            Some(HandshakeEvent::Failed(HandshakeFailure::Refused { .. }))
        ));
    }

    proptest::proptest! {
        /// Handshake frames of every kind with arbitrary bodies (the lengths the handshake
        /// looks for among them), and arbitrary header bytes behind the magic: the target's
        /// answers and the initiator's machine never panic, a random proof is never accepted,
        /// and no frame opens a connection that requires the secret without a proof made with
        /// it.
        #[test]
        fn handshake_frames_never_panic_nor_admit_without_the_secret(
            kind in 0usize..4,
            len in proptest::prop_oneof![
                proptest::strategy::Just(INSTANCE_LEN as usize),
                proptest::strategy::Just(HELLO_AUTH_PAYLOAD as usize),
                proptest::strategy::Just(HELLO_ACK_AUTH_PAYLOAD as usize),
                0usize..96,
            ],
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 96),
            proof in proptest::collection::vec(proptest::prelude::any::<u8>(), PROOF_LEN),
            mut raw in proptest::collection::vec(proptest::prelude::any::<u8>(), HEADER_LEN),
        ) {
            raw[..4].copy_from_slice(&crate::wire::MAGIC);
            let payload = &bytes[..len];
            let kinds = [FrameKind::Hello, FrameKind::HelloAck, FrameKind::Auth, FrameKind::AuthAck];
            let made = Header::new(kinds[kind], 0, 0, len as u64);
            let decoded = raw.first_chunk::<HEADER_LEN>().and_then(|r| Header::decode(r).ok());
            let secret = ClusterSecret::new(b"k").unwrap();
            for h in [Some(made), decoded].into_iter().flatten() {
                for s in [Some(&secret), None] {
                    if let HelloAnswer::Challenged(_, t) = answer_hello(&h, payload, InstanceId(2), s, [3; NONCE_LEN]) {
                        let auth = Header::new(FrameKind::Auth, 0, 0, PROOF_LEN as u64);
                        let (_, ok) = answer_auth(&auth, &proof, &secret, &t);
                        proptest::prop_assert!(!ok, "a random proof was accepted");
                    }
                }
                let auth = ClientAuth { secret: secret.clone(), me: InstanceId(1), nonce: [4; NONCE_LEN] };
                let mut hs = Handshake::new(Instant::now(), TIMEOUT, None, Some(auth));
                while hs.poll_transmit().is_some() {}
                hs.handle_frame(Instant::now(), &h, payload);
                let ended = hs.poll_event();
                proptest::prop_assert!(!matches!(ended, Some(HandshakeEvent::Established(_))), "established without a proof");
            }
        }
    }
}
