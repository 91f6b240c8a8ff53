//! The revocation lease over RPC, without I/O.
//!
//! A peer that cannot map an owner's revocation page (another host) marks each GPU copy into
//! the owner's memory in flight before the copy starts, with an `Enter` frame on the owner's
//! RPC port, and clears the mark with a `Leave` frame once the copy completed. The owner's
//! `unregister` waits for the marks; a connection that closes releases the marks taken on it,
//! so an owner never waits for a peer that is gone.
//!
//! On the wire: `Enter` carries a fresh tag and the region id in `addr`; the `EnterAck` echoes
//! both, with status `Ok` (marked) or `AccessDenied` (unknown or unregistered region). The mark
//! is named by that tag: `Leave` carries it back, with the region id, and `LeaveAck` echoes it.
//! Each `Enter` of a [`LeaseClient`] has a fresh tag, which lets the owner recognise a
//! duplicate ([`LeaseTable`]).
//!
//! Call order for [`LeaseClient`] (the initiator): `new(timeout)`; `submit_enter` /
//! `submit_leave` at any time; after each, `poll_transmit` until `None` and send the frames in
//! that order; `handle_frame` for each `EnterAck` / `LeaveAck`, `handle_closed` if the
//! connection closes, `handle_timeout(now)` when `poll_timeout` is due (a no-op when called
//! early); after each input, `poll_event` until `None`. Every call ends in exactly one event.
//! A call that times out or an answer that makes no sense *breaks* the channel: every call in
//! flight fails, later calls fail at once, and the caller must close the connection (the
//! owner then releases every mark taken on it) and start a new client on a new one.
//!
//! Duplicated or late answers (an answer after its call timed out, a second answer to a
//! call) are ignored and counted. [`LeaseTable`] is the owner's side, one per connection.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::wire::{FrameKind, Header, Status, HEADER_LEN};
use crate::RegionId;

/// Which kind of call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    Enter,
    Leave,
}

/// Identifies one call of a [`LeaseClient`] (unique per client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallId(pub u64);

/// An in-flight mark the owner granted: leave it with [`LeaseClient::submit_leave`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mark {
    /// The tag of the `Enter` that took it.
    pub tag: u64,
    pub region: RegionId,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseFailure {
    /// No answer within the deadline (the channel is broken).
    #[error("{kind:?} for {region} not answered within {after:?}")]
    TimedOut { kind: CallKind, region: RegionId, after: Duration },
    /// The connection closed (the owner released every mark taken on it).
    #[error("the revocation channel closed")]
    Closed,
    /// An answer for another region than the call's (the channel is broken).
    #[error("{kind:?} for {region} answered for region#{answered}")]
    Mismatch { kind: CallKind, region: RegionId, answered: u64 },
    /// The owner answered with a status that is not an outcome of the call (for example
    /// `ShuttingDown`).
    #[error("{kind:?} for {region} answered {status:?}")]
    Status { kind: CallKind, region: RegionId, status: Status },
    /// A frame that is not an answer of the lease channel (the channel is broken).
    #[error("unexpected {kind:?} frame on the revocation channel")]
    Unexpected { kind: FrameKind },
    /// A `Leave` of a mark this client does not hold (never granted, or already left).
    #[error("leave of {region} (mark {tag}), which is not held")]
    NotHeld { region: RegionId, tag: u64 },
}

/// The end of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// `mark`: the copy may start, the mark is held; `None`: the owner refused (the region
    /// is unknown or was unregistered) and nothing is held.
    Entered {
        call: CallId,
        region: RegionId,
        mark: Option<Mark>,
    },
    /// The mark is cleared.
    Left {
        call: CallId,
        mark: Mark,
    },
    Failed {
        call: CallId,
        region: RegionId,
        failure: LeaseFailure,
    },
}

#[derive(Debug, Clone)]
struct Call {
    id: CallId,
    kind: CallKind,
    region: RegionId,
    started: Instant,
    deadline: Instant,
}

/// The initiator's side of the lease channel.
#[derive(Debug)]
pub struct LeaseClient {
    timeout: Duration,
    next_tag: u64,
    next_call: u64,
    /// Calls awaiting an answer, by wire tag.
    calls: BTreeMap<u64, Call>,
    /// Marks held, by tag.
    marks: BTreeMap<u64, RegionId>,
    transmit: VecDeque<[u8; HEADER_LEN]>,
    events: VecDeque<LeaseEvent>,
    broken: Option<LeaseFailure>,
    ignored: usize,
}

impl LeaseClient {
    /// A client whose calls fail unless answered within `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            next_tag: 1,
            next_call: 1,
            calls: BTreeMap::new(),
            marks: BTreeMap::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            broken: None,
            ignored: 0,
        }
    }

    fn call_id(&mut self) -> CallId {
        let id = CallId(self.next_call);
        self.next_call += 1;
        id
    }

    fn start(&mut self, now: Instant, tag: u64, kind: CallKind, region: RegionId) -> CallId {
        let id = self.call_id();
        if let Some(failure) = self.broken.clone() {
            self.events.push_back(LeaseEvent::Failed { call: id, region, failure });
            return id;
        }
        let frame = match kind {
            CallKind::Enter => FrameKind::Enter,
            CallKind::Leave => FrameKind::Leave,
        };
        self.transmit.push_back(Header::new(frame, tag, region.0, 0).encode());
        let call = Call { id, kind, region, started: now, deadline: now + self.timeout };
        self.calls.insert(tag, call);
        id
    }

    /// Asks the owner to mark a copy into `region` in flight.
    pub fn submit_enter(&mut self, now: Instant, region: RegionId) -> CallId {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.start(now, tag, CallKind::Enter, region)
    }

    /// Clears a mark.
    pub fn submit_leave(&mut self, now: Instant, mark: Mark) -> CallId {
        let held = self.marks.get(&mark.tag) == Some(&mark.region);
        if !held || self.calls.contains_key(&mark.tag) {
            let call = self.call_id();
            let failure = LeaseFailure::NotHeld { region: mark.region, tag: mark.tag };
            self.events.push_back(LeaseEvent::Failed { call, region: mark.region, failure });
            return call;
        }
        self.start(now, mark.tag, CallKind::Leave, mark.region)
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<[u8; HEADER_LEN]> {
        self.transmit.pop_front()
    }

    /// An `EnterAck` or `LeaveAck` arrived. Other kinds break the channel.
    pub fn handle_frame(&mut self, _now: Instant, h: &Header) {
        if self.broken.is_some() {
            self.ignored += 1;
            return;
        }
        let kind = match h.kind {
            FrameKind::EnterAck => CallKind::Enter,
            FrameKind::LeaveAck => CallKind::Leave,
            other => return self.break_channel(LeaseFailure::Unexpected { kind: other }),
        };
        let Some(call) = self.calls.get(&h.tag).filter(|c| c.kind == kind).cloned() else {
            // A late answer (its call timed out) or a duplicate.
            self.ignored += 1;
            return;
        };
        if h.addr != call.region.0 {
            let failure = LeaseFailure::Mismatch { kind, region: call.region, answered: h.addr };
            return self.break_channel(failure);
        }
        self.calls.remove(&h.tag);
        let (id, region) = (call.id, call.region);
        let event = match (kind, h.status) {
            (CallKind::Enter, Status::Ok) => {
                self.marks.insert(h.tag, region);
                LeaseEvent::Entered { call: id, region, mark: Some(Mark { tag: h.tag, region }) }
            }
            (CallKind::Enter, Status::AccessDenied) => {
                LeaseEvent::Entered { call: id, region, mark: None }
            }
            (CallKind::Leave, status) => {
                // Whatever the answer, the owner holds no mark for this tag any more.
                self.marks.remove(&h.tag);
                let mark = Mark { tag: h.tag, region };
                if status == Status::Ok {
                    LeaseEvent::Left { call: id, mark }
                } else {
                    let failure = LeaseFailure::Status { kind, region, status };
                    LeaseEvent::Failed { call: id, region, failure }
                }
            }
            (CallKind::Enter, status) => {
                let failure = LeaseFailure::Status { kind, region, status };
                LeaseEvent::Failed { call: id, region, failure }
            }
        };
        self.events.push_back(event);
    }

    /// The connection closed: every call in flight fails, the marks are gone.
    pub fn handle_closed(&mut self) {
        if self.broken.is_none() {
            self.break_channel(LeaseFailure::Closed);
        }
    }

    /// Breaks the channel if a call's deadline passed (a no-op before).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.broken.is_some() {
            return;
        }
        let late = self.calls.values().find(|c| now >= c.deadline).cloned();
        if let Some(c) = late {
            let after = now.saturating_duration_since(c.started);
            self.break_channel(LeaseFailure::TimedOut { kind: c.kind, region: c.region, after });
        }
    }

    fn break_channel(&mut self, failure: LeaseFailure) {
        self.broken = Some(failure.clone());
        self.transmit.clear();
        self.marks.clear();
        for (_, c) in std::mem::take(&mut self.calls) {
            let failure = failure.clone();
            self.events.push_back(LeaseEvent::Failed { call: c.id, region: c.region, failure });
        }
    }

    /// When `handle_timeout` is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.broken.is_some() {
            return None;
        }
        self.calls.values().map(|c| c.deadline).min()
    }

    pub fn poll_event(&mut self) -> Option<LeaseEvent> {
        self.events.pop_front()
    }

    /// Why the channel is broken, if it is: the connection must be closed.
    pub fn broken(&self) -> Option<&LeaseFailure> {
        self.broken.as_ref()
    }

    /// Marks held (granted and not left).
    pub fn marks_held(&self) -> usize {
        self.marks.len()
    }

    /// Calls awaiting an answer.
    pub fn in_flight(&self) -> usize {
        self.calls.len()
    }

    /// Answers ignored as late or duplicated.
    pub fn ignored(&self) -> usize {
        self.ignored
    }
}

/// Frames an owner remembers per connection to recognise a duplicate.
const RECENT: usize = 16;

/// The owner's side of one connection: the marks its peer holds. `M` is whatever keeps a
/// mark taken in the owner (the engine's region entry).
///
/// A mark is named by the tag of its `Enter` and cleared by a `Leave` of the same tag and
/// region; a `Leave` whose tag names no mark clears one mark of its region (clients that
/// do not reuse the tag). A frame identical to one of the last few answered on the
/// connection (same kind, tag and region) is a duplicate: it gets the same answer and takes
/// or clears nothing. Clients that want duplicates recognised use a fresh tag per `Enter`.
#[derive(Debug)]
pub struct LeaseTable<M> {
    held: Vec<(u64, RegionId, M)>,
    recent: VecDeque<(FrameKind, u64, u64, Status)>,
}

impl<M> Default for LeaseTable<M> {
    fn default() -> Self {
        Self { held: Vec::new(), recent: VecDeque::new() }
    }
}

impl<M> LeaseTable<M> {
    fn repeated(&self, h: &Header) -> Option<Status> {
        self.recent.iter().find(|(k, t, a, _)| (*k, *t, *a) == (h.kind, h.tag, h.addr)).map(|r| r.3)
    }

    fn remember(&mut self, h: &Header, status: Status) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((h.kind, h.tag, h.addr, status));
    }

    /// An `Enter` arrived; `mark` takes the mark of the region (`None`: unknown or
    /// unregistered). Returns the `EnterAck` to send.
    pub fn handle_enter(
        &mut self,
        h: &Header,
        mark: impl FnOnce(RegionId) -> Option<M>,
    ) -> [u8; HEADER_LEN] {
        if let Some(status) = self.repeated(h) {
            return ack(FrameKind::EnterAck, h, status);
        }
        let region = RegionId(h.addr);
        let status = match mark(region) {
            Some(m) => {
                self.held.push((h.tag, region, m));
                Status::Ok
            }
            None => Status::AccessDenied,
        };
        self.remember(h, status);
        ack(FrameKind::EnterAck, h, status)
    }

    /// A `Leave` arrived. Returns the `LeaveAck` to send and the mark to clear, if one was
    /// held (else the answer is `BadRequest`).
    pub fn handle_leave(&mut self, h: &Header) -> ([u8; HEADER_LEN], Option<M>) {
        if let Some(status) = self.repeated(h) {
            return (ack(FrameKind::LeaveAck, h, status), None);
        }
        let region = RegionId(h.addr);
        let at = self
            .held
            .iter()
            .position(|(t, r, _)| (*t, *r) == (h.tag, region))
            .or_else(|| self.held.iter().position(|(_, r, _)| *r == region));
        let cleared = at.map(|i| self.held.swap_remove(i).2);
        let status = if cleared.is_some() { Status::Ok } else { Status::BadRequest };
        self.remember(h, status);
        (ack(FrameKind::LeaveAck, h, status), cleared)
    }

    /// The connection closed: every mark taken on it, to clear.
    pub fn handle_closed(&mut self) -> Vec<M> {
        self.held.drain(..).map(|(_, _, m)| m).collect()
    }

    /// Marks held by the peer.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// The answer of `kind` to `h`, with `status`.
pub fn ack(kind: FrameKind, h: &Header, status: Status) -> [u8; HEADER_LEN] {
    Header::new(kind, h.tag, h.addr, 0).with_status(status).encode()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;
    use crate::sim::{decode, Endpoint, Link, Pair};

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// An initiator that enters each region of `script` (all at once) and leaves every mark
    /// as soon as it is granted.
    struct Client {
        lease: LeaseClient,
        script: Vec<RegionId>,
        events: Vec<LeaseEvent>,
        calls: HashSet<CallId>,
    }

    impl Client {
        fn pump(&mut self, now: Instant) {
            while let Some(e) = self.lease.poll_event() {
                if let LeaseEvent::Entered { mark: Some(mark), .. } = &e {
                    let id = self.lease.submit_leave(now, *mark);
                    self.calls.insert(id);
                }
                self.events.push(e);
            }
        }
    }

    impl Endpoint for Client {
        fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
            for region in std::mem::take(&mut self.script) {
                let id = self.lease.submit_enter(now, region);
                self.calls.insert(id);
            }
            self.pump(now);
            self.lease.poll_transmit().map(|f| f.to_vec())
        }
        fn handle_frame(&mut self, now: Instant, frame: &[u8]) {
            self.lease.handle_frame(now, &decode(frame).0);
            self.pump(now);
        }
        fn poll_timeout(&self) -> Option<Instant> {
            self.lease.poll_timeout()
        }
        fn handle_timeout(&mut self, now: Instant) {
            self.lease.handle_timeout(now);
            self.pump(now);
        }
    }

    /// The owner: marks per region, and which regions are registered.
    struct Owner {
        table: LeaseTable<RegionId>,
        registered: HashSet<RegionId>,
        marks: HashMap<RegionId, i64>,
        out: VecDeque<Vec<u8>>,
        /// Frames it still answers (the rest are ignored, as by a peer that froze).
        answers_left: usize,
    }

    impl Endpoint for Owner {
        fn poll_transmit(&mut self, _now: Instant) -> Option<Vec<u8>> {
            self.out.pop_front()
        }
        fn handle_frame(&mut self, _now: Instant, frame: &[u8]) {
            let (h, _) = decode(frame);
            if self.answers_left == 0 {
                return;
            }
            self.answers_left -= 1;
            let answer = match h.kind {
                FrameKind::Enter => {
                    let (registered, marks) = (&self.registered, &mut self.marks);
                    self.table.handle_enter(&h, |r| {
                        registered.contains(&r).then(|| {
                            *marks.entry(r).or_default() += 1;
                            r
                        })
                    })
                }
                FrameKind::Leave => {
                    let (ack, cleared) = self.table.handle_leave(&h);
                    if let Some(r) = cleared {
                        *self.marks.get_mut(&r).unwrap() -= 1;
                    }
                    ack
                }
                other => panic!("unexpected {other:?}"),
            };
            self.out.push_back(answer.to_vec());
        }
        fn poll_timeout(&self) -> Option<Instant> {
            None
        }
        fn handle_timeout(&mut self, _now: Instant) {}
    }

    impl Owner {
        fn held(&self) -> i64 {
            self.marks.values().sum()
        }
    }

    fn pair(script: &[u64], registered: &[u64], link: Link) -> Pair<Client, Owner> {
        let now = Instant::now();
        let client = Client {
            lease: LeaseClient::new(TIMEOUT),
            script: script.iter().map(|r| RegionId(*r)).collect(),
            events: Vec::new(),
            calls: HashSet::new(),
        };
        let owner = Owner {
            table: LeaseTable::default(),
            registered: registered.iter().map(|r| RegionId(*r)).collect(),
            marks: HashMap::new(),
            out: VecDeque::new(),
            answers_left: usize::MAX,
        };
        Pair::new(now, client, owner, link)
    }

    /// Every call ended in exactly one event.
    fn one_event_per_call(c: &Client) {
        let mut seen = HashSet::new();
        for e in &c.events {
            let call = match e {
                LeaseEvent::Entered { call, .. } | LeaseEvent::Left { call, .. } => call,
                LeaseEvent::Failed { call, .. } => call,
            };
            assert!(seen.insert(*call), "two events for {call:?}: {:?}", c.events);
        }
        assert_eq!(seen, c.calls, "every call ended");
    }

    #[test]
    fn enter_then_leave_and_a_refusal() {
        let mut p =
            pair(&[1, 2], &[1], Link { latency: Duration::from_millis(1), ..Link::default() });
        p.drive(Duration::from_secs(60));
        one_event_per_call(&p.a);
        let m = Mark { tag: 1, region: RegionId(1) };
        assert!(p.a.events.contains(&LeaseEvent::Entered {
            call: CallId(1),
            region: RegionId(1),
            mark: Some(m)
        }));
        assert!(p.a.events.contains(&LeaseEvent::Entered {
            call: CallId(2),
            region: RegionId(2),
            mark: None
        }));
        assert!(p
            .a
            .events
            .iter()
            .any(|e| matches!(e, LeaseEvent::Left { mark, .. } if *mark == m)));
        assert_eq!((p.a.lease.marks_held(), p.b.held(), p.b.table.len()), (0, 0, 0));
        assert_eq!(p.elapsed(), Duration::from_millis(4), "enter and leave: two round trips");
    }

    #[test]
    fn duplicated_frames_take_and_clear_each_mark_once() {
        for seed in 1..40 {
            let link = Link {
                duplicate_one_in: 2,
                latency: Duration::from_micros(50),
                seed,
                ..Link::default()
            };
            let script: Vec<u64> = (0..30).map(|i| i % 5).collect();
            let mut p = pair(&script, &[0, 1, 2, 3], link);
            p.drive(Duration::from_secs(60));
            one_event_per_call(&p.a);
            assert!(p.a.lease.broken().is_none(), "seed {seed}: {:?}", p.a.lease.broken());
            assert_eq!(p.b.held(), 0, "seed {seed}: every mark cleared once");
            assert_eq!(p.b.table.len(), 0);
            let granted =
                p.a.events
                    .iter()
                    .filter(|e| matches!(e, LeaseEvent::Entered { mark: Some(_), .. }))
                    .count();
            let left = p.a.events.iter().filter(|e| matches!(e, LeaseEvent::Left { .. })).count();
            assert_eq!((granted, left), (24, 24), "seed {seed}");
            assert!(p.a.lease.ignored() > 0, "seed {seed}: duplicates were seen and ignored");
        }
    }

    #[test]
    fn an_unanswered_enter_breaks_the_channel_at_its_deadline() {
        let real = Instant::now();
        let mut p = pair(&[1, 2, 3], &[1, 2, 3], Link::default());
        p.b.answers_left = 0;
        p.drive(Duration::from_secs(3600));
        assert_eq!(p.elapsed(), TIMEOUT);
        one_event_per_call(&p.a);
        assert!(p.a.events.iter().all(|e| matches!(
            e,
            LeaseEvent::Failed {
                failure: LeaseFailure::TimedOut { kind: CallKind::Enter, .. },
                ..
            }
        )));
        // Later calls fail at once, sending nothing (releasing marks on close is tested by
        // `a_lost_leave_breaks_the_channel_and_closing_releases_the_mark`).
        let id = p.a.lease.submit_enter(p.now, RegionId(1));
        assert!(
            matches!(p.a.lease.poll_event(), Some(LeaseEvent::Failed { call, .. }) if call == id)
        );
        assert_eq!(p.a.lease.poll_transmit(), None);
        assert!(real.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn a_lost_leave_breaks_the_channel_and_closing_releases_the_mark() {
        // The owner answers the enter, then freezes: the leave is never answered.
        let mut p = pair(&[7], &[7], Link::default());
        p.b.answers_left = 1;
        p.drive(Duration::from_secs(3600));
        assert_eq!(p.b.held(), 1, "granted, never cleared by a leave");
        assert!(matches!(
            p.a.events.last(),
            Some(LeaseEvent::Failed {
                failure: LeaseFailure::TimedOut { kind: CallKind::Leave, .. },
                ..
            })
        ));
        assert_eq!(p.a.lease.marks_held(), 0);
        for r in p.b.table.handle_closed() {
            *p.b.marks.get_mut(&r).unwrap() -= 1;
        }
        assert_eq!(p.b.held(), 0);
    }

    #[test]
    fn an_answer_after_the_deadline_is_ignored() {
        let mut p = pair(&[1], &[1], Link { latency: TIMEOUT, ..Link::default() });
        p.drive(Duration::from_secs(3600));
        one_event_per_call(&p.a);
        assert!(matches!(
            p.a.events[..],
            [LeaseEvent::Failed { failure: LeaseFailure::TimedOut { .. }, .. }]
        ));
        assert_eq!(p.a.lease.ignored(), 1, "the late ack");
        assert_eq!(p.b.held(), 1, "the owner marked it; closing the connection releases it");
    }

    #[test]
    fn leaving_a_mark_not_held_fails_without_a_frame() {
        let mut c = LeaseClient::new(TIMEOUT);
        let now = Instant::now();
        let call = c.submit_leave(now, Mark { tag: 3, region: RegionId(1) });
        assert!(matches!(
            c.poll_event(),
            Some(LeaseEvent::Failed { call: id, failure: LeaseFailure::NotHeld { .. }, .. }) if id == call
        ));
        assert_eq!(c.poll_transmit(), None);
    }

    #[test]
    fn an_answer_for_another_region_breaks_the_channel() {
        let mut c = LeaseClient::new(TIMEOUT);
        let now = Instant::now();
        c.submit_enter(now, RegionId(1));
        c.submit_enter(now, RegionId(2));
        let wrong = Header::new(FrameKind::EnterAck, 1, 9, 0);
        c.handle_frame(now, &wrong);
        let events: Vec<_> = std::iter::from_fn(|| c.poll_event()).collect();
        assert_eq!(events.len(), 2);
        assert!(c.broken().is_some());
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn the_owner_takes_and_clears_nothing_for_a_duplicate() {
        let mut t: LeaseTable<u64> = LeaseTable::default();
        let status = |b: [u8; HEADER_LEN]| Header::decode(&b).unwrap().status;
        let enter = |tag| Header::new(FrameKind::Enter, tag, 1, 0);
        let leave = |tag| Header::new(FrameKind::Leave, tag, 1, 0);
        assert_eq!(status(t.handle_enter(&enter(5), |_| Some(5))), Status::Ok);
        assert_eq!(status(t.handle_enter(&enter(5), |_| panic!("no second mark"))), Status::Ok);
        assert_eq!(status(t.handle_enter(&enter(6), |_| Some(6))), Status::Ok);
        assert_eq!(t.handle_leave(&leave(5)).1, Some(5), "the mark named by the tag");
        let (again, cleared) = t.handle_leave(&leave(5));
        assert_eq!((status(again), cleared), (Status::Ok, None), "a duplicate clears nothing");
        assert_eq!(t.len(), 1);
        // A client that does not reuse the enter's tag clears one mark of the region.
        assert_eq!(t.handle_leave(&leave(9)).1, Some(6));
        let (unknown, cleared) = t.handle_leave(&leave(10));
        assert_eq!((status(unknown), cleared), (Status::BadRequest, None));
        assert!(t.is_empty());
    }
}
