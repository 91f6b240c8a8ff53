//! Agreement on a group's membership, without I/O and without a fixed coordinator.
//!
//! A group has fixed rank slots; a **view** is an epoch and the set of active slots. Every
//! change of view (ranks that failed, a planned shrink, ranks that join) goes through one round
//! of a single-decree consensus per epoch, led by the lowest active rank its members do not
//! suspect:
//!
//! 1. A member with a change to make (a rank it found dead, a `deactivate`/`activate` request)
//!    sends `Request` to the leader it sees.
//! 2. The leader waits the reconciliation window (so that the suspicions of one failure arrive
//!    together), then `Prepare`s a ballot to every member it does not suspect, and collects a
//!    `Promise` from each; a promise carries the view its sender already accepted for this
//!    epoch, if any, and the leader must propose that one (a view a previous leader may have
//!    committed to some members is never contradicted).
//! 3. The leader sends `Accept` with the view, collects `Accepted` from every member it does
//!    not suspect, then `Commit`s it to the new members and to the removed ones (a removed rank
//!    learns it was removed: it is fenced).
//!
//! A member that does not answer within the phase deadline is suspected and the round starts
//! again with it removed and a higher ballot; a leader that fails is suspected by the members,
//! and the next lowest rank takes over (its `Prepare` learns what the failed leader got
//! accepted). Every member of the new view therefore installs the same view at the same epoch.
//! Messages of another epoch than the receiver's are answered with `Stale` (the sender catches
//! up with the newer view or learns it was removed), never acted upon: a rank stopped and
//! resumed with an old epoch is fenced.
//!
//! Failures are crash-stop as far as this machine knows: a rank it suspects is removed, even if
//! it was only slow (it is then fenced when it comes back). A planned change costs no timeout:
//! every member answers at once.
//!
//! Call order for [`Member`]: inputs (`request`, `suspect`, `handle_message`, `handle_timeout`)
//! then `poll_transmit` and `poll_event` until they return `None`; `poll_timeout` says when
//! `handle_timeout` is next due.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// A rank slot.
pub type Rank = usize;

/// A group's membership: the epoch and the active ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub epoch: u64,
    pub members: BTreeSet<Rank>,
}

impl View {
    /// Where a change leads: `remove` taken out, `add` put in, the next epoch.
    fn next(&self, remove: &BTreeSet<Rank>, add: &BTreeSet<Rank>) -> View {
        let mut members: BTreeSet<Rank> = self.members.difference(remove).copied().collect();
        members.extend(add.iter().copied().filter(|r| !remove.contains(r)));
        View { epoch: self.epoch + 1, members }
    }
}

/// A ballot: compared by round, then by leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ballot {
    pub round: u64,
    pub leader: Rank,
}

/// What members tell each other. Every message names the epoch its sender is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Asks the leader to change the view after `epoch`.
    Request {
        epoch: u64,
        remove: BTreeSet<Rank>,
        add: BTreeSet<Rank>,
    },
    Prepare {
        epoch: u64,
        ballot: Ballot,
    },
    Promise {
        epoch: u64,
        ballot: Ballot,
        accepted: Option<(Ballot, View)>,
    },
    Accept {
        epoch: u64,
        ballot: Ballot,
        view: View,
    },
    Accepted {
        epoch: u64,
        ballot: Ballot,
    },
    /// The view after `epoch`, decided.
    Commit {
        epoch: u64,
        view: View,
    },
    /// The receiver is past the sender's epoch: here is its view.
    Stale {
        view: View,
    },
    /// The sender is behind the receiver (at `epoch`): asks for the receiver's view.
    CatchUp {
        epoch: u64,
    },
}

impl Message {
    fn epoch(&self) -> u64 {
        match self {
            Message::Request { epoch, .. }
            | Message::Prepare { epoch, .. }
            | Message::Promise { epoch, .. }
            | Message::Accept { epoch, .. }
            | Message::Accepted { epoch, .. }
            | Message::Commit { epoch, .. } => *epoch,
            Message::Stale { view } => view.epoch,
            Message::CatchUp { epoch } => *epoch,
        }
    }
}

/// What a member learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new view is in force here.
    Installed(View),
    /// This rank is not in the group's view any more (removed while it was away or slow).
    Removed(View),
}

/// The settings of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// How long a leader gathers requests before it proposes (the suspicions of one failure
    /// arrive within it).
    pub reconciliation_window: Duration,
    /// How long a leader waits for every member's answer in a phase before it suspects the
    /// silent ones; and how long a member waits for a leader's progress before it suspects it.
    pub phase_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            reconciliation_window: Duration::from_millis(20),
            phase_timeout: Duration::from_secs(2),
        }
    }
}

/// The leader's progress in one round.
#[derive(Debug, Clone)]
enum Lead {
    /// Gathering requests until the window ends.
    Gathering { until: Instant },
    /// Waiting for promises.
    Preparing { ballot: Ballot, from: BTreeSet<Rank>, best: Option<(Ballot, View)>, until: Instant },
    /// Waiting for acceptances of `view`.
    Accepting { ballot: Ballot, view: View, from: BTreeSet<Rank>, until: Instant },
}

/// One rank's side of the protocol.
#[derive(Debug)]
pub struct Member {
    me: Rank,
    settings: Settings,
    view: View,
    /// Removed from the group: nothing more is done.
    fenced: bool,
    /// Not in the view yet (a joiner waiting to be added): views without it are followed,
    /// not taken as its removal, and it asks for nothing.
    joining: bool,
    /// The epoch of the first view with this rank in it (0 for a founder).
    added_at: u64,
    /// Ranks this member found dead, or was asked to remove, not yet out of the view.
    remove: BTreeSet<Rank>,
    /// Ranks asked to join, not yet in the view.
    add: BTreeSet<Rank>,
    /// The highest ballot promised in this epoch, and the view accepted with it.
    promised: Option<Ballot>,
    accepted: Option<(Ballot, View)>,
    /// The highest round seen in this epoch (a new leader goes above it).
    round: u64,
    lead: Option<Lead>,
    /// A member waiting for a leader: when it suspects the leader if the view has not changed.
    waiting_since: Option<Instant>,
    out: Vec<(Rank, Message)>,
    events: Vec<Event>,
    /// Messages of a later epoch than ours, kept until we catch up with it.
    ahead: Vec<(Rank, Message)>,
}

impl Member {
    /// Rank `me` in `view` (`me` must be a member, or a joiner that waits to be added: it
    /// follows the views it learns until one includes it).
    pub fn new(me: Rank, view: View, settings: Settings) -> Self {
        Self {
            me,
            settings,
            joining: !view.members.contains(&me),
            added_at: view.epoch,
            view,
            fenced: false,
            remove: BTreeSet::new(),
            add: BTreeSet::new(),
            promised: None,
            accepted: None,
            round: 0,
            lead: None,
            waiting_since: None,
            out: Vec::new(),
            events: Vec::new(),
            ahead: Vec::new(),
        }
    }

    /// The view in force here.
    pub fn view(&self) -> &View {
        &self.view
    }

    /// Whether this rank was removed from the group.
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// The epoch of the first view with this rank in it (0 for a founder).
    pub fn added_at(&self) -> u64 {
        self.added_at
    }

    /// This rank learned that another process holds its slot (it was replaced while it was
    /// away, and the view that removed it never reached it): it takes part in nothing more.
    pub fn fence(&mut self) {
        if self.fenced || self.joining {
            return;
        }
        self.fenced = true;
        self.lead = None;
        self.events.push(Event::Removed(self.view.clone()));
    }

    /// Whether this rank waits to be added (it has never been in a view).
    pub fn is_joining(&self) -> bool {
        self.joining
    }

    /// Sends again what a round waits for (called at every heartbeat): a leader's prepare or
    /// accept to the live members that have not answered it, a member's request to the leader
    /// it sees. Datagrams get lost; a message sent once and lost would get a live member
    /// suspected at the phase deadline (or the leader, by a member that waited for it). Every
    /// handler takes a message again without harm.
    pub fn retransmit(&mut self) {
        if self.fenced || self.joining {
            return;
        }
        let epoch = self.view.epoch;
        match self.lead.clone() {
            Some(Lead::Preparing { ballot, from, .. }) => {
                for r in self.live().difference(&from).copied().collect::<Vec<_>>() {
                    self.send(r, Message::Prepare { epoch, ballot });
                }
            }
            Some(Lead::Accepting { ballot, view, from, .. }) => {
                for r in self.live().difference(&from).copied().collect::<Vec<_>>() {
                    self.send(r, Message::Accept { epoch, ballot, view: view.clone() });
                }
            }
            _ => {}
        }
        if self.waiting_since.is_some() && self.pending() {
            if let Some(l) = self.leader().filter(|&l| l != self.me) {
                self.ask(l);
            }
        }
    }

    /// Sends our pending changes to `leader`.
    fn ask(&mut self, leader: Rank) {
        let (remove, add) = (self.remove.clone(), self.add.clone());
        self.send(leader, Message::Request { epoch: self.view.epoch, remove, add });
    }

    /// The leader this member sees: the lowest member it does not suspect.
    pub fn leader(&self) -> Option<Rank> {
        self.view.members.iter().copied().find(|r| !self.remove.contains(r))
    }

    /// Asks for a change: `remove` (a planned shrink) and `add` (activation, recovery).
    pub fn request(&mut self, now: Instant, remove: &[Rank], add: &[Rank]) {
        if self.fenced || self.joining {
            return;
        }
        self.remove.extend(remove.iter().copied().filter(|r| self.view.members.contains(r)));
        self.add.extend(add.iter().copied().filter(|r| !self.view.members.contains(r)));
        self.progress(now);
    }

    /// The local failure detector found `rank` dead (or silent past its deadline).
    pub fn suspect(&mut self, now: Instant, rank: Rank) {
        if self.fenced || self.joining || rank == self.me || !self.view.members.contains(&rank) {
            return;
        }
        if self.remove.insert(rank) {
            self.progress(now);
        }
    }

    fn pending(&self) -> bool {
        !self.remove.is_empty() || !self.add.is_empty()
    }

    fn send(&mut self, to: Rank, m: Message) {
        if to != self.me {
            self.out.push((to, m));
        }
    }

    /// The members a leader needs answers from: the view's, less the suspected.
    fn live(&self) -> BTreeSet<Rank> {
        self.view.members.difference(&self.remove).copied().collect()
    }

    /// Moves on after any input: a leader starts or restarts its round, a member sends its
    /// request to the leader it sees.
    fn progress(&mut self, now: Instant) {
        if self.fenced || !self.pending() {
            return;
        }
        match self.leader() {
            Some(l) if l == self.me && self.lead.is_none() => {
                let until = now + self.settings.reconciliation_window;
                self.lead = Some(Lead::Gathering { until });
            }
            Some(l) if l == self.me => {}
            Some(l) => {
                self.ask(l);
                self.waiting_since.get_or_insert(now);
            }
            None => {}
        }
    }

    fn prepare(&mut self, now: Instant) {
        self.round += 1;
        let ballot = Ballot { round: self.round, leader: self.me };
        self.promised = Some(ballot);
        let from: BTreeSet<Rank> = [self.me].into_iter().collect();
        let best = self.accepted.clone();
        let until = now + self.settings.phase_timeout;
        self.lead = Some(Lead::Preparing { ballot, from, best, until });
        for r in self.live() {
            self.send(r, Message::Prepare { epoch: self.view.epoch, ballot });
        }
        self.check_phase(now);
    }

    /// Ends a phase when every live member answered.
    fn check_phase(&mut self, now: Instant) {
        let live = self.live();
        match self.lead.clone() {
            Some(Lead::Preparing { ballot, from, best, .. }) if live.is_subset(&from) => {
                // A view some member accepted is proposed again (a previous leader may have
                // committed it somewhere); otherwise ours.
                let view = match best {
                    Some((_, v)) => v,
                    None => self.view.next(&self.remove, &self.add),
                };
                self.accepted = Some((ballot, view.clone()));
                let from: BTreeSet<Rank> = [self.me].into_iter().collect();
                let until = now + self.settings.phase_timeout;
                self.lead = Some(Lead::Accepting { ballot, view: view.clone(), from, until });
                for r in live {
                    let epoch = self.view.epoch;
                    self.send(r, Message::Accept { epoch, ballot, view: view.clone() });
                }
                self.check_phase(now);
            }
            Some(Lead::Accepting { view, from, .. }) if live.is_subset(&from) => {
                let epoch = self.view.epoch;
                let told: BTreeSet<Rank> =
                    self.view.members.union(&view.members).copied().collect();
                for r in told {
                    self.send(r, Message::Commit { epoch, view: view.clone() });
                }
                self.install(now, view);
            }
            _ => {}
        }
    }

    fn install(&mut self, now: Instant, view: View) {
        if view.epoch <= self.view.epoch {
            return;
        }
        let removed = !view.members.contains(&self.me);
        if removed && self.joining {
            // Not added yet: the joiner follows the group's view (and answers nobody).
            self.view = view.clone();
            self.events.push(Event::Installed(view));
            return;
        }
        if self.joining {
            self.added_at = view.epoch;
        }
        self.joining = false;
        self.view = view.clone();
        self.remove.retain(|r| self.view.members.contains(r));
        self.add.retain(|r| !self.view.members.contains(r));
        self.promised = None;
        self.accepted = None;
        self.round = 0;
        self.lead = None;
        self.waiting_since = None;
        if removed {
            self.fenced = true;
            self.events.push(Event::Removed(view));
            return;
        }
        self.events.push(Event::Installed(view));
        // Messages that came ahead of us are for this epoch now (or later).
        let ahead = std::mem::take(&mut self.ahead);
        for (from, m) in ahead {
            self.handle_message(now, from, m);
        }
        // Changes that did not make it into this view go into the next.
        self.progress(now);
    }

    /// A message from `from` arrived.
    pub fn handle_message(&mut self, now: Instant, from: Rank, m: Message) {
        if self.fenced {
            return;
        }
        let epoch = self.view.epoch;
        if let Message::Stale { view } = &m {
            if view.epoch > epoch {
                self.install(now, view.clone());
            }
            return;
        }
        if let Message::Commit { epoch: e, view } = &m {
            if *e >= epoch {
                self.install(now, view.clone());
            }
            return;
        }
        if self.joining {
            // A joiner takes part in no round; a sender ahead of it tells it the view.
            if m.epoch() > epoch && !matches!(m, Message::CatchUp { .. }) {
                self.send(from, Message::CatchUp { epoch });
            }
            return;
        }
        if m.epoch() < epoch {
            // A sender behind us (stopped and resumed, or slow): it learns our view; nothing
            // it asks is done.
            let view = self.view.clone();
            self.send(from, Message::Stale { view });
            return;
        }
        if m.epoch() > epoch {
            // We are behind (a commit did not reach us): ask the sender for its view, and keep
            // the message for when we have it.
            if !matches!(m, Message::CatchUp { .. }) {
                self.send(from, Message::CatchUp { epoch });
                if self.ahead.len() < 64 {
                    self.ahead.push((from, m));
                }
            }
            return;
        }
        match m {
            Message::Request { remove, add, .. } => {
                // A removal of this very rank (a planned shrink) is kept: the next rank then
                // leads the change.
                self.remove.extend(remove.into_iter().filter(|r| self.view.members.contains(r)));
                self.add.extend(add.into_iter().filter(|r| !self.view.members.contains(r)));
                self.progress(now);
            }
            // A rank this member suspects leads nothing here (it is being removed).
            Message::Prepare { .. } | Message::Accept { .. } if self.remove.contains(&from) => {}
            Message::Prepare { ballot, .. } => {
                self.round = self.round.max(ballot.round);
                if self.promised.is_none_or(|p| ballot >= p) {
                    self.promised = Some(ballot);
                    let accepted = self.accepted.clone();
                    self.send(from, Message::Promise { epoch, ballot, accepted });
                    if from != self.me {
                        // A leader works on it: this member's own round (if any) gives way.
                        if !matches!(self.leader(), Some(l) if l == self.me) {
                            self.lead = None;
                        }
                        self.waiting_since = Some(now);
                    }
                }
            }
            Message::Accept { ballot, view, .. } => {
                self.round = self.round.max(ballot.round);
                if self.promised.is_none_or(|p| ballot >= p) {
                    self.promised = Some(ballot);
                    self.accepted = Some((ballot, view));
                    self.send(from, Message::Accepted { epoch, ballot });
                    self.waiting_since = Some(now);
                }
            }
            Message::Promise { ballot, accepted, .. } => {
                if let Some(Lead::Preparing { ballot: b, from: got, best, .. }) = self.lead.as_mut()
                {
                    if *b == ballot {
                        got.insert(from);
                        if let Some((ab, av)) = accepted {
                            if best.as_ref().is_none_or(|(bb, _)| ab > *bb) {
                                *best = Some((ab, av));
                            }
                        }
                        self.check_phase(now);
                    }
                }
            }
            Message::Accepted { ballot, .. } => {
                if let Some(Lead::Accepting { ballot: b, from: got, .. }) = self.lead.as_mut() {
                    if *b == ballot {
                        got.insert(from);
                        self.check_phase(now);
                    }
                }
            }
            Message::Commit { .. } | Message::Stale { .. } | Message::CatchUp { .. } => {}
        }
    }

    /// Time passed: a leader's window ended or a phase ran out (its silent members are
    /// suspected and the round starts again), or a member gave up on its leader.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.fenced {
            return;
        }
        match self.lead.clone() {
            Some(Lead::Gathering { until }) if now >= until => self.prepare(now),
            Some(Lead::Preparing { from, until, .. })
            | Some(Lead::Accepting { from, until, .. })
                if now >= until =>
            {
                let silent: Vec<Rank> = self.live().difference(&from).copied().collect();
                self.remove.extend(silent);
                self.prepare(now);
            }
            _ => {}
        }
        if let Some(since) = self.waiting_since {
            if now >= since + self.leader_patience() {
                // The leader made no progress: it is suspected, and the next one takes over.
                self.waiting_since = None;
                if let Some(l) = self.leader().filter(|l| *l != self.me) {
                    self.remove.insert(l);
                }
                self.progress(now);
            }
        }
    }

    /// How long a member waits for its leader's next step before it suspects the leader: two
    /// phase deadlines (a leader blocked on a dead member starts a new round after one) and
    /// the window.
    fn leader_patience(&self) -> Duration {
        2 * self.settings.phase_timeout + self.settings.reconciliation_window
    }

    /// When `handle_timeout` is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.fenced {
            return None;
        }
        let lead = match &self.lead {
            Some(Lead::Gathering { until })
            | Some(Lead::Preparing { until, .. })
            | Some(Lead::Accepting { until, .. }) => Some(*until),
            None => None,
        };
        let wait = self.waiting_since.map(|s| s + self.leader_patience());
        [lead, wait].into_iter().flatten().min()
    }

    /// The next message to send, with its destination.
    pub fn poll_transmit(&mut self) -> Option<(Rank, Message)> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.remove(0))
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        if self.events.is_empty() {
            None
        } else {
            Some(self.events.remove(0))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    /// A group of members on a simulated network: every message takes `latency`, a crashed
    /// rank sends and receives nothing, a stopped one receives nothing until it resumes (what
    /// was sent to it meanwhile is lost, as on a connection the others gave up).
    struct Net {
        t0: Instant,
        now: Instant,
        members: Vec<Member>,
        crashed: BTreeSet<Rank>,
        stopped: BTreeSet<Rank>,
        /// (delivery time, from, to, message)
        flying: Vec<(Instant, Rank, Rank, Message)>,
        /// (when, survivor, suspected): the survivors' failure detectors.
        detections: Vec<(Instant, Rank, Rank)>,
        /// A rank that crashes after sending this many more messages.
        crash_after: Option<(Rank, usize)>,
        latency: Duration,
        events: Vec<Vec<Event>>,
        /// (from, to): the next message from `from` to `to` is lost (once per entry).
        drop_once: Vec<(Rank, Rank)>,
        /// Every member's `retransmit` runs this often (its heartbeat), when set.
        retransmit_every: Option<Duration>,
    }

    impl Net {
        fn new(n: usize, members: &[Rank]) -> Self {
            let t0 = Instant::now();
            let view = View { epoch: 0, members: members.iter().copied().collect() };
            let settings = Settings { reconciliation_window: 5 * MS, phase_timeout: 100 * MS };
            let ms = (0..n)
                .map(|r| {
                    let v = if view.members.contains(&r) {
                        view.clone()
                    } else {
                        View { epoch: 0, members: BTreeSet::new() }
                    };
                    Member::new(r, v, settings)
                })
                .collect();
            Self {
                t0,
                now: t0,
                members: ms,
                crashed: BTreeSet::new(),
                stopped: BTreeSet::new(),
                flying: Vec::new(),
                detections: Vec::new(),
                crash_after: None,
                latency: MS,
                events: vec![Vec::new(); n],
                drop_once: Vec::new(),
                retransmit_every: None,
            }
        }

        /// `rank` crashes now; survivor `s` notices after `detect[s]` (None: never).
        fn crash(&mut self, rank: Rank, detect: &[Option<Duration>]) {
            self.crashed.insert(rank);
            for (s, d) in detect.iter().enumerate() {
                if let Some(d) = d {
                    self.detections.push((self.now + *d, s, rank));
                }
            }
        }

        fn pump(&mut self, r: Rank) {
            while let Some((to, m)) = self.members[r].poll_transmit() {
                if self.crashed.contains(&r) {
                    continue;
                }
                if let Some((c, left)) = self.crash_after.as_mut() {
                    if *c == r {
                        if *left == 0 {
                            self.crashed.insert(r);
                            continue;
                        }
                        *left -= 1;
                    }
                }
                if let Some(i) = self.drop_once.iter().position(|&(f, t)| f == r && t == to) {
                    self.drop_once.remove(i);
                    continue;
                }
                self.flying.push((self.now + self.latency, r, to, m));
            }
            while let Some(e) = self.members[r].poll_event() {
                self.events[r].push(e);
            }
        }

        /// Runs until nothing is left to happen, or `limit` of simulated time.
        fn run(&mut self, limit: Duration) {
            for r in 0..self.members.len() {
                self.pump(r);
            }
            let mut next_tick = self.retransmit_every.map(|d| self.now + d);
            loop {
                if let (Some(t), Some(every)) = (next_tick, self.retransmit_every) {
                    let first = [
                        self.flying.iter().map(|f| f.0).min(),
                        self.detections.iter().map(|d| d.0).min(),
                    ]
                    .into_iter()
                    .flatten()
                    .min();
                    if first.is_none_or(|f| t <= f) && t - self.t0 <= limit {
                        self.now = t.max(self.now);
                        for r in 0..self.members.len() {
                            if !self.crashed.contains(&r) && !self.stopped.contains(&r) {
                                if self.members[r].poll_timeout().is_some_and(|d| d <= t) {
                                    self.members[r].handle_timeout(t);
                                }
                                self.members[r].retransmit();
                                self.pump(r);
                            }
                        }
                        next_tick = Some(t + every);
                        continue;
                    }
                }
                let next_msg = self.flying.iter().map(|f| f.0).min();
                let next_det = self.detections.iter().map(|d| d.0).min();
                let next_timeout = (0..self.members.len())
                    .filter(|r| !self.crashed.contains(r) && !self.stopped.contains(r))
                    .filter_map(|r| self.members[r].poll_timeout())
                    .min();
                let Some(next) = [next_msg, next_det, next_timeout].into_iter().flatten().min()
                else {
                    return;
                };
                if next - self.t0 > limit {
                    return;
                }
                self.now = next.max(self.now);
                let now = self.now;
                if let Some(i) = self.flying.iter().position(|f| f.0 <= now) {
                    let (_, from, to, m) = self.flying.remove(i);
                    if !self.crashed.contains(&to) && !self.stopped.contains(&to) {
                        self.members[to].handle_message(now, from, m);
                        self.pump(to);
                    }
                    continue;
                }
                if let Some(i) = self.detections.iter().position(|d| d.0 <= now) {
                    let (_, s, bad) = self.detections.remove(i);
                    if !self.crashed.contains(&s) && !self.stopped.contains(&s) {
                        self.members[s].suspect(now, bad);
                        self.pump(s);
                    }
                    continue;
                }
                for r in 0..self.members.len() {
                    if self.crashed.contains(&r) || self.stopped.contains(&r) {
                        continue;
                    }
                    if self.members[r].poll_timeout().is_some_and(|t| t <= now) {
                        self.members[r].handle_timeout(now);
                        self.pump(r);
                    }
                }
            }
        }

        fn survivors(&self) -> Vec<Rank> {
            (0..self.members.len())
                .filter(|r| !self.crashed.contains(r) && !self.stopped.contains(r))
                .filter(|r| !self.members[*r].is_fenced())
                .filter(|r| !self.members[*r].view().members.is_empty())
                .collect()
        }

        /// Every survivor holds the same view; returns it.
        fn agreed(&self) -> View {
            let s = self.survivors();
            let v = self.members[s[0]].view().clone();
            for r in &s {
                assert_eq!(self.members[*r].view(), &v, "rank {r} disagrees with rank {}", s[0]);
            }
            v
        }
    }

    fn set(v: &[Rank]) -> BTreeSet<Rank> {
        v.iter().copied().collect()
    }

    fn all(d: Duration, n: usize) -> Vec<Option<Duration>> {
        vec![Some(d); n]
    }

    #[test]
    fn a_dead_rank_leaves_every_survivor_with_the_same_view() {
        let mut net = Net::new(4, &[0, 1, 2, 3]);
        net.crash(2, &all(10 * MS, 4));
        net.run(Duration::from_secs(10));
        assert_eq!(net.agreed(), View { epoch: 1, members: set(&[0, 1, 3]) });
        assert!(net.now - net.t0 < 50 * MS, "no timeout was needed: {:?}", net.now - net.t0);
    }

    #[test]
    fn lost_agreement_messages_are_sent_again_and_evict_nobody() {
        // Leader 0 removes rank 2 (a planned shrink). Its first prepare to rank 1 and rank 1's
        // first accepted are lost: sent again at the next heartbeat (20 ms, the phase deadline
        // 100 ms), rank 1 stays. Without the resends it was suspected at the deadline.
        for lost in [(0, 1), (1, 0)] {
            let mut net = Net::new(3, &[0, 1, 2]);
            net.retransmit_every = Some(20 * MS);
            net.drop_once = vec![lost];
            if lost == (1, 0) {
                // its promise, then the promise it sends again for the repeated prepare
                net.drop_once.push((1, 0));
            }
            let now = net.now;
            net.members[0].request(now, &[2], &[]);
            net.run(Duration::from_millis(600));
            for r in [0, 1] {
                assert_eq!(
                    net.members[r].view(),
                    &View { epoch: 1, members: set(&[0, 1]) },
                    "rank {r} with {lost:?} lost"
                );
            }
            assert!(net.drop_once.is_empty(), "the lost messages were sent: {:?}", net.drop_once);
        }
    }

    #[test]
    fn rank_0_may_die_too() {
        let mut net = Net::new(4, &[0, 1, 2, 3]);
        // Detected at different times by the survivors.
        net.crash(0, &[None, Some(3 * MS), Some(30 * MS), Some(60 * MS)]);
        net.run(Duration::from_secs(10));
        assert_eq!(net.agreed(), View { epoch: 1, members: set(&[1, 2, 3]) });
    }

    #[test]
    fn a_rank_nobody_detects_is_found_by_the_leaders_phase_deadline() {
        let mut net = Net::new(4, &[0, 1, 2]);
        net.crash(2, &[None, None, None, None]);
        // A planned change (rank 3 joins) starts a round; rank 2 does not answer and is removed
        // with it.
        let now = net.now;
        net.members[0].request(now, &[], &[3]);
        net.run(Duration::from_secs(10));
        let v = net.agreed();
        assert_eq!(v.members, set(&[0, 1, 3]), "{v:?}");
    }

    #[test]
    fn a_leader_that_dies_after_committing_to_some_members_is_not_contradicted() {
        // Rank 3 dies; leader 0 commits {0, 1, 2} to rank 1 only, then dies itself.
        let mut net = Net::new(4, &[0, 1, 2, 3]);
        net.crash(3, &all(2 * MS, 4));
        net.run(Duration::from_millis(2));
        // From now on rank 0 has this many messages left before it crashes: enough for its
        // prepare and accept rounds (2 each) and one commit.
        net.crash_after = Some((0, 5));
        net.detections.push((net.now + Duration::from_millis(30), 1, 0));
        net.detections.push((net.now + Duration::from_millis(40), 2, 0));
        net.run(Duration::from_secs(10));
        let v = net.agreed();
        assert_eq!(v.members, set(&[1, 2]), "{v:?}");
        assert!(
            net.events[1]
                .iter()
                .any(|e| matches!(e, Event::Installed(v) if v.members == set(&[0, 1, 2]))),
            "rank 1 had the first view committed: {:?}",
            net.events[1]
        );
    }

    #[test]
    fn a_planned_shrink_costs_no_timeout_and_the_removed_rank_learns_it() {
        let mut net = Net::new(4, &[0, 1, 2, 3]);
        let now = net.now;
        net.members[1].request(now, &[0, 3], &[]);
        net.run(Duration::from_secs(10));
        assert!(net.now - net.t0 < 20 * MS, "took {:?}", net.now - net.t0);
        assert_eq!(net.agreed(), View { epoch: 1, members: set(&[1, 2]) });
        for r in [0, 3] {
            assert!(net.members[r].is_fenced());
            assert!(matches!(net.events[r].last(), Some(Event::Removed(_))));
        }
    }

    #[test]
    fn a_joiner_is_added_and_learns_the_view() {
        let mut net = Net::new(3, &[0, 1]);
        let now = net.now;
        net.members[1].request(now, &[], &[2]);
        net.run(Duration::from_secs(10));
        assert_eq!(net.agreed(), View { epoch: 1, members: set(&[0, 1, 2]) });
        assert_eq!(net.members[2].view().members, set(&[0, 1, 2]));
    }

    /// Three ranks; rank 2 stops, the others detect it and agree on a view without it.
    fn rank_2_stopped_and_removed() -> Net {
        let mut net = Net::new(3, &[0, 1, 2]);
        net.stopped.insert(2);
        net.detections.push((net.now + 10 * MS, 0, 2));
        net.detections.push((net.now + 10 * MS, 1, 2));
        net.run(Duration::from_secs(1));
        assert_eq!(net.agreed(), View { epoch: 1, members: set(&[0, 1]) });
        net
    }

    #[test]
    fn a_joiner_behind_the_group_follows_its_views_and_is_added() {
        // Rank 2 dies, the others agree without it; a replacement starts knowing only the
        // founders' view (epoch 0): it learns the group's view without being fenced, and the
        // members add it.
        let mut net = rank_2_stopped_and_removed();
        let settings = Settings { reconciliation_window: 5 * MS, phase_timeout: 100 * MS };
        net.members[2] = Member::new(2, View { epoch: 0, members: set(&[0, 1]) }, settings);
        net.stopped.remove(&2);
        let now = net.now;
        // What a member answers to a heartbeat of a rank behind it and outside its view.
        let stale = Message::Stale { view: net.members[0].view().clone() };
        net.members[2].handle_message(now, 0, stale);
        assert!(!net.members[2].is_fenced() && net.members[2].is_joining());
        assert_eq!(net.members[2].view().epoch, 1);
        // Asking for anything, or suspecting anyone, does nothing while joining.
        net.members[2].request(now, &[0], &[]);
        net.members[2].suspect(now, 1);
        assert!(net.members[2].poll_transmit().is_none());
        net.members[1].request(now, &[], &[2]);
        net.run(Duration::from_secs(2));
        assert_eq!(net.agreed(), View { epoch: 2, members: set(&[0, 1, 2]) });
        assert_eq!(net.members[2].view(), &View { epoch: 2, members: set(&[0, 1, 2]) });
        assert!(!net.members[2].is_joining() && !net.members[2].is_fenced());
    }

    #[test]
    fn a_stopped_rank_that_comes_back_with_an_old_epoch_is_fenced() {
        let mut net = rank_2_stopped_and_removed();
        // Continued: it asks something at its old epoch and is told it was removed.
        net.stopped.remove(&2);
        let now = net.now;
        net.members[2].suspect(now, 1);
        net.pump(2);
        net.run(Duration::from_secs(2));
        assert!(net.members[2].is_fenced(), "{:?}", net.events[2]);
        assert!(matches!(net.events[2].last(), Some(Event::Removed(v)) if v.epoch >= 1));
        assert_eq!(
            net.agreed(),
            View { epoch: 1, members: set(&[0, 1]) },
            "nothing it asked was done"
        );
    }

    proptest! {
        /// Any ranks may crash (leaders included, some in the middle of sending), detected by
        /// each survivor at its own time or never: every survivor ends with the same view, and
        /// no crashed rank is in it.
        #[test]
        fn survivors_always_agree(
            n in 2usize..7,
            crashes in proptest::collection::vec((0usize..7, 0u64..200, proptest::option::of(0usize..6)), 1..4),
            delays in proptest::collection::vec(proptest::option::of(1u64..150), 7),
        ) {
            let mut net = Net::new(n, &(0..n).collect::<Vec<_>>());
            let mut plan: Vec<(u64, Rank, Option<usize>)> = crashes
                .into_iter()
                .filter(|(r, _, _)| *r < n)
                .map(|(r, at, partial)| (at, r, partial))
                .collect();
            plan.sort();
            plan.dedup_by_key(|p| p.1);
            // Leave at least one rank alive.
            plan.truncate(n - 1);
            let mut elapsed = 0;
            for (at, r, partial) in &plan {
                net.run(Duration::from_millis(*at.max(&elapsed)));
                elapsed = *at;
                match partial {
                    Some(k) if net.crash_after.is_none() => net.crash_after = Some((*r, *k)),
                    _ => {}
                }
                // Every survivor finds a crash in the end (the engine's liveness watch sees the
                // process's sockets close), each at its own time: soon, or late (300 ms).
                let detect: Vec<Option<Duration>> = (0..n)
                    .map(|s| Some(Duration::from_millis(delays[s].unwrap_or(300))))
                    .collect();
                net.crash(*r, &detect);
            }
            net.run(Duration::from_secs(120));
            let survivors = net.survivors();
            prop_assume!(!survivors.is_empty());
            let v = net.agreed();
            for (_, r, _) in &plan {
                prop_assert!(!v.members.contains(r), "crashed rank {} in {:?}", r, v);
            }
        }
    }
}
