//! Elastic membership carried between processes: the agreement of [`crate::membership`] over
//! UDP datagrams, with heartbeats as the failure detector for ranks that stop, and the
//! caller's own evidence (a rank the engine saw die, a collective that failed) fed in as
//! suspicions.
//!
//! Every rank of a group binds a socket ([`Elastic::bind`]) and publishes its address; then
//! [`Elastic::start`] runs a driver thread that receives datagrams, drives the member's
//! timers, sends heartbeats and suspects a member silent for the eviction timeout. The thread
//! touches no GPU. The view in force, and whether this rank was removed (fenced), are read at
//! any time; [`Elastic::wait_view`] waits for a change with a deadline.
//!
//! Frames: `TWMB` (4 bytes), the group's id (u64, from every rank's address: datagrams of
//! another group are dropped), the sender's rank (u32), a kind (0 heartbeat, 1 message) and the
//! body: a heartbeat carries the sender's epoch; a message is [`encode`]d. A heartbeat from a
//! rank behind our view that is not in it is answered with our view (it learns it was removed);
//! one from a rank ahead of us makes us ask it for its view.
//!
//! With a cluster secret in force (`TIDEWIRE_CLUSTER_SECRET`, as for the engine), every frame
//! is sealed: the kind's high bit set, then the sender's clock (unix milliseconds) and a
//! 16-byte HMAC tag over all of it ([`tidewire::ClusterSecret::tag`]). A receiver with the
//! secret drops frames without a valid tag or more than [`MAX_SKEW`] away from its clock (a
//! recorded frame replays for that long at most, and every message is idempotent: epochs and
//! ballots); one without a secret drops sealed frames. Either way the sender stays unheard,
//! so a rank with another secret (or none) never enters the agreement.
//!
//! Announcements (kind 2: the sender's epoch, a key and a value) let the members of a view
//! exchange small values without the store (which lives in one rank's process): what a rank
//! needs to re-form its rings over the survivors. A rank repeats its announcements of the
//! current epoch with every heartbeat, so a lost datagram is made good.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tidewire::ClusterSecret;

use crate::error::{Error, Result};
use crate::membership::{Ballot, Event, Member, Message, Rank, Settings, View};

const MAGIC: &[u8; 4] = b"TWMB";
const HEARTBEAT: u8 = 0;
const MESSAGE: u8 = 1;
const ANNOUNCE: u8 = 2;
/// Addresses learned for slots (of processes that joined): (slot u32, stamp u64, length u8,
/// "ip:port") repeated.
const ADDRS: u8 = 3;
/// To a process that sends in a member's slot from another address than the member's: another
/// process holds the slot (a replacement added while this one was stopped, with the commit
/// that removed it lost). Body: one ADDRS entry, the slot's rank, the epoch + 1 at which the
/// sender learned the holder's address (0: a founder's) and that address.
const REPLACED: u8 = 4;
/// The kind's bit that says the frame is sealed with the cluster secret.
const SEALED: u8 = 0x80;
/// Where the kind is in a frame (after the magic, the group's id and the sender's rank).
const KIND_AT: usize = 4 + 8 + 4;
/// What the tags of membership frames are for.
const TAG_DOMAIN: &[u8] = b"tidewire membership datagram";
/// How far a sealed frame's clock may be from the receiver's.
pub const MAX_SKEW: Duration = Duration::from_secs(30);
/// Bytes an announcement's key and value may have (one datagram).
pub const MAX_ANNOUNCE: usize = 1024;

/// The timeouts of elastic membership (every one a setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElasticSettings {
    /// How often every rank tells every member it lives.
    pub heartbeat: Duration,
    /// A member not heard from for this long is suspected (and removed).
    pub eviction: Duration,
    /// The agreement's reconciliation window and phase deadline.
    pub agreement: Settings,
    /// Whether a member silent for the eviction timeout is removed (else it is only shown as
    /// not heard, and the caller decides).
    pub evict: bool,
}

impl Default for ElasticSettings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(100),
            eviction: Duration::from_secs(5),
            agreement: Settings::default(),
            evict: true,
        }
    }
}

/// Appends `m` as bytes (little endian; sets as a count and the ranks).
pub fn encode(m: &Message, out: &mut Vec<u8>) {
    fn u64_(o: &mut Vec<u8>, v: u64) {
        o.extend_from_slice(&v.to_le_bytes());
    }
    fn set(o: &mut Vec<u8>, s: &BTreeSet<Rank>) {
        u64_(o, s.len() as u64);
        for &r in s {
            u64_(o, r as u64);
        }
    }
    fn ballot(o: &mut Vec<u8>, b: &Ballot) {
        u64_(o, b.round);
        u64_(o, b.leader as u64);
    }
    fn view(o: &mut Vec<u8>, v: &View) {
        u64_(o, v.epoch);
        set(o, &v.members);
    }
    match m {
        Message::Request { epoch, remove, add } => {
            out.push(0);
            u64_(out, *epoch);
            set(out, remove);
            set(out, add);
        }
        Message::Prepare { epoch, ballot: b } => {
            out.push(1);
            u64_(out, *epoch);
            ballot(out, b);
        }
        Message::Promise { epoch, ballot: b, accepted } => {
            out.push(2);
            u64_(out, *epoch);
            ballot(out, b);
            match accepted {
                None => out.push(0),
                Some((ab, v)) => {
                    out.push(1);
                    ballot(out, ab);
                    view(out, v);
                }
            }
        }
        Message::Accept { epoch, ballot: b, view: v } => {
            out.push(3);
            u64_(out, *epoch);
            ballot(out, b);
            view(out, v);
        }
        Message::Accepted { epoch, ballot: b } => {
            out.push(4);
            u64_(out, *epoch);
            ballot(out, b);
        }
        Message::Commit { epoch, view: v } => {
            out.push(5);
            u64_(out, *epoch);
            view(out, v);
        }
        Message::Stale { view: v } => {
            out.push(6);
            view(out, v);
        }
        Message::CatchUp { epoch } => {
            out.push(7);
            u64_(out, *epoch);
        }
    }
}

/// The largest epoch or ballot round a message may carry: no group gets near it, and a peer's
/// value past it (a bug, or a frame of a group without a secret) would overflow the next one.
const MAX_COUNT: u64 = 1 << 62;

/// Reads what [`encode`] wrote; `None` for anything else (a datagram is outside input).
pub fn decode(bytes: &[u8], max_rank: Rank) -> Option<Message> {
    struct R<'a>(&'a [u8]);
    impl R<'_> {
        fn u8_(&mut self) -> Option<u8> {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            Some(b)
        }
        fn u64_(&mut self) -> Option<u64> {
            let (head, rest) = self.0.split_at_checked(8)?;
            self.0 = rest;
            Some(u64::from_le_bytes(head.try_into().ok()?))
        }
        fn count(&mut self) -> Option<u64> {
            self.u64_().filter(|&v| v <= MAX_COUNT)
        }
        fn rank(&mut self, max: Rank) -> Option<Rank> {
            let r = usize::try_from(self.u64_()?).ok()?;
            (r <= max).then_some(r)
        }
        fn set(&mut self, max: Rank) -> Option<BTreeSet<Rank>> {
            let n = self.u64_()?;
            if n > max as u64 + 1 {
                return None;
            }
            (0..n).map(|_| self.rank(max)).collect()
        }
        fn ballot(&mut self, max: Rank) -> Option<Ballot> {
            Some(Ballot { round: self.count()?, leader: self.rank(max)? })
        }
        fn view(&mut self, max: Rank) -> Option<View> {
            Some(View { epoch: self.count()?, members: self.set(max)? })
        }
    }
    let mut r = R(bytes);
    let m = match r.u8_()? {
        0 => {
            Message::Request { epoch: r.count()?, remove: r.set(max_rank)?, add: r.set(max_rank)? }
        }
        1 => Message::Prepare { epoch: r.count()?, ballot: r.ballot(max_rank)? },
        2 => {
            let (epoch, ballot) = (r.count()?, r.ballot(max_rank)?);
            let accepted = match r.u8_()? {
                0 => None,
                1 => Some((r.ballot(max_rank)?, r.view(max_rank)?)),
                _ => return None,
            };
            Message::Promise { epoch, ballot, accepted }
        }
        3 => Message::Accept {
            epoch: r.count()?,
            ballot: r.ballot(max_rank)?,
            view: r.view(max_rank)?,
        },
        4 => Message::Accepted { epoch: r.count()?, ballot: r.ballot(max_rank)? },
        5 => Message::Commit { epoch: r.count()?, view: r.view(max_rank)? },
        6 => Message::Stale { view: r.view(max_rank)? },
        7 => Message::CatchUp { epoch: r.count()? },
        _ => return None,
    };
    r.0.is_empty().then_some(m)
}

/// Appends address entries (slot, stamp, address) as [`ADDRS`] frames carry them.
fn encode_addrs(entries: &[(Rank, u64, SocketAddr)], out: &mut Vec<u8>) {
    for (r, stamp, addr) in entries {
        let text = addr.to_string();
        out.extend_from_slice(&(*r as u32).to_le_bytes());
        out.extend_from_slice(&stamp.to_le_bytes());
        out.push(text.len() as u8);
        out.extend_from_slice(text.as_bytes());
    }
}

/// Reads what [`encode_addrs`] wrote; stops at the first malformed entry (outside input).
fn decode_addrs(mut body: &[u8]) -> Vec<(Rank, u64, SocketAddr)> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let Some((r, rest)) = body.split_at_checked(4) else { break };
        let Some((stamp, rest)) = rest.split_at_checked(8) else { break };
        let Some((&n, rest)) = rest.split_first() else { break };
        let Some((text, rest)) = rest.split_at_checked(usize::from(n)) else { break };
        let Some(addr) = std::str::from_utf8(text).ok().and_then(|t| t.parse().ok()) else { break };
        let (Ok(r), Ok(stamp)) = (<[u8; 4]>::try_from(r), <[u8; 8]>::try_from(stamp)) else {
            break;
        };
        out.push((u32::from_le_bytes(r) as Rank, u64::from_le_bytes(stamp), addr));
        body = rest;
    }
    out
}

/// This host's clock in microseconds since the epoch (0 before it).
fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The group's id: the same on every rank that was given the same addresses (a caller may
/// choose another, as long as every rank has the same).
pub fn group_id(addrs: &[SocketAddr]) -> u64 {
    // FNV-1a over the addresses' text: stable across processes (no random hasher keys).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for a in addrs {
        for b in a.to_string().bytes().chain([b';']) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

struct State {
    member: Member,
    /// Every rank slot's address (a slot outside the view takes the address its datagrams
    /// come from: a replacement process, or a joiner not known at creation), and how new
    /// each is: 0 as published by the founders, the epoch + 1 at which it was learned (members
    /// pass learned addresses on; the newer one wins).
    peers: Vec<SocketAddr>,
    stamped: Vec<u64>,
    /// The newest sealed frame's stamp from each slot (with a cluster secret: older or equal
    /// ones are replays, dropped).
    stamps: Vec<u64>,
    /// The members of the view when it last changed (a member newly added is given a fresh
    /// eviction period).
    last_members: BTreeSet<Rank>,
    /// Whether we wait to be added (told to every slot with our heartbeats), and which slots
    /// said so in their last heartbeat.
    ready: bool,
    ready_in: Vec<bool>,
    /// When each rank was last heard from.
    heard: Vec<Instant>,
    next_heartbeat: Instant,
    /// Our announcements: (epoch, key, value).
    mine: Vec<(u64, String, Vec<u8>)>,
    /// What each rank announced last under each key: (rank, key) -> (epoch, value).
    theirs: std::collections::HashMap<(Rank, String), (u64, Vec<u8>)>,
    /// The caller's host masks (an i32 per rank slot) written when the view changes.
    masks: Vec<(u64, usize)>,
}

/// Writes the view's members into every watched mask (1: active, 0: not).
fn write_masks(st: &State) {
    let members = &st.member.view().members;
    for &(addr, len) in &st.masks {
        for i in 0..len {
            let v = i32::from(members.contains(&i));
            // SAFETY: `Elastic::watch_mask`'s caller keeps `len` i32s at `addr` alive and
            // writable until the member is closed; a volatile store of an aligned i32.
            unsafe { std::ptr::write_volatile((addr as *mut i32).add(i), v) };
        }
    }
}

struct Shared {
    rank: Rank,
    id: u64,
    /// The group's slots (fixed).
    slots: usize,
    /// The cluster secret every frame is sealed with, when one is in force.
    secret: Option<ClusterSecret>,
    /// Frames dropped for their seal (none, a wrong one, a stale clock), for the logs.
    refused: AtomicU64,
    /// The stamp of the last sealed frame sent (microseconds since the epoch, strictly
    /// increasing even within one microsecond).
    last_stamp: AtomicU64,
    sock: UdpSocket,
    settings: ElasticSettings,
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    /// Tests: the driver stops while this is set, then drops what was queued meanwhile (a
    /// stopped process whose datagrams were lost: [`Elastic::stop_for_test`]).
    #[cfg(test)]
    stop_for_test: AtomicBool,
    /// The epoch of the view in force, readable without the lock (every call into a group
    /// looks at it).
    epoch: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn frame(&self, kind: u8) -> Vec<u8> {
        let mut f = Vec::with_capacity(64);
        f.extend_from_slice(MAGIC);
        f.extend_from_slice(&self.id.to_le_bytes());
        f.extend_from_slice(&(self.rank as u32).to_le_bytes());
        f.push(kind);
        f
    }

    fn announcement(&self, epoch: u64, key: &str, value: &[u8]) -> Vec<u8> {
        let mut f = self.frame(ANNOUNCE);
        f.extend_from_slice(&epoch.to_le_bytes());
        f.push(key.len() as u8);
        f.extend_from_slice(key.as_bytes());
        f.extend_from_slice(value);
        f
    }

    /// Sends our announcements of the current epoch to every other member.
    fn repeat_announcements(&self, st: &State) {
        let view = st.member.view();
        for (epoch, key, value) in &st.mine {
            if *epoch != view.epoch {
                continue;
            }
            let f = self.announcement(*epoch, key, value);
            for &r in &view.members {
                if r != self.rank {
                    self.send(st, r, &f);
                }
            }
        }
    }

    fn send(&self, st: &State, to: Rank, bytes: &[u8]) {
        let Some(&addr) = st.peers.get(to) else { return };
        if addr.port() == 0 {
            return; // a slot whose process we have not heard from yet
        }
        self.send_to(to, addr, bytes);
    }

    /// Sends `bytes` (sealed when a secret is in force) to `addr`, the address of a process in
    /// slot `to`.
    fn send_to(&self, to: Rank, addr: SocketAddr, bytes: &[u8]) {
        let sealed;
        let bytes = match &self.secret {
            None => bytes,
            Some(secret) => {
                let mut f = bytes.to_vec();
                if let Some(k) = f.get_mut(KIND_AT) {
                    *k |= SEALED;
                }
                f.extend_from_slice(&self.next_stamp().to_le_bytes());
                let tag = secret.tag(TAG_DOMAIN, &f);
                f.extend_from_slice(&tag);
                sealed = f;
                &sealed
            }
        };
        if let Err(e) = self.sock.send_to(bytes, addr) {
            // A lost datagram is a silent member to the protocol: it retries or suspects.
            log::debug!("elastic rank {}: sending to rank {to} at {addr}: {e}", self.rank);
        }
    }

    /// Sends the addresses learned for slots (not the founders') to every other member.
    fn send_addrs(&self, st: &State) {
        let learned: Vec<(Rank, u64, SocketAddr)> = (0..self.slots)
            .filter(|&r| st.stamped[r] > 0)
            .map(|r| (r, st.stamped[r], st.peers[r]))
            .collect();
        if learned.is_empty() {
            return;
        }
        let mut f = self.frame(ADDRS);
        encode_addrs(&learned, &mut f);
        for &r in &st.member.view().members {
            if r != self.rank {
                self.send(st, r, &f);
            }
        }
    }

    /// Sends what the member wants sent and publishes what it learned.
    fn flush(&self, st: &mut State) {
        let mut changed = false;
        while let Some((to, m)) = st.member.poll_transmit() {
            let mut f = self.frame(MESSAGE);
            encode(&m, &mut f);
            self.send(st, to, &f);
        }
        while let Some(ev) = st.member.poll_event() {
            match &ev {
                Event::Installed(v) => log::info!(
                    "elastic rank {}: epoch {} with ranks {:?}",
                    self.rank,
                    v.epoch,
                    v.members
                ),
                Event::Removed(v) => log::warn!(
                    "elastic rank {}: removed from the group at epoch {} (ranks {:?})",
                    self.rank,
                    v.epoch,
                    v.members
                ),
            }
            changed = true;
        }
        if changed {
            // Who waits to be added is said again by every joiner's next heartbeat: a slot's
            // old process (added, or gone) must not pass for a new one that waits.
            st.ready_in.iter_mut().for_each(|r| *r = false);
            // A member just added gets a whole eviction period from now.
            let members = st.member.view().members.clone();
            let now = Instant::now();
            for &r in members.difference(&st.last_members) {
                st.heard[r] = now;
            }
            st.last_members = members;
            write_masks(st);
            // A fenced rank (removed, or told it was replaced) keeps its last view: the epoch
            // callers compare then moves anyway (to u64::MAX), so that their next call looks
            // at the view and finds it fenced.
            let shown = if st.member.is_fenced() { u64::MAX } else { st.member.view().epoch };
            self.epoch.store(shown, Ordering::Release);
            if let Some(m) = tidewire::metrics::get() {
                m.coll_epoch.set(st.member.view().epoch as i64);
                m.coll_size.set(st.last_members.len() as i64);
            }
            self.changed.notify_all();
        }
    }

    fn receive(&self, buf: &[u8], src: SocketAddr, now: Instant) {
        let max = self.slots.saturating_sub(1);
        let Some(rest) = buf.strip_prefix(MAGIC) else { return };
        let Some((id, rest)) = rest.split_at_checked(8) else { return };
        if id != self.id.to_le_bytes() {
            return;
        }
        let Some((from, rest)) = rest.split_at_checked(4) else { return };
        let from = u32::from_le_bytes([from[0], from[1], from[2], from[3]]) as usize;
        let Some((&kind, body)) = rest.split_first() else { return };
        if from > max || from == self.rank {
            return;
        }
        let (body, stamp) = match (&self.secret, kind & SEALED != 0) {
            (None, false) => (body, None),
            (Some(secret), true) => match self.unseal(secret, buf, body) {
                Some((b, stamp)) => (b, Some(stamp)),
                None => return self.refuse(from, "a bad seal or a clock too far from ours"),
            },
            (Some(_), false) => return self.refuse(from, "no seal (no cluster secret there)"),
            (None, true) => return self.refuse(from, "a seal (a cluster secret there, none here)"),
        };
        let kind = kind & !SEALED;
        let mut st = self.lock();
        if st.peers[from] != src
            && st.member.view().members.contains(&from)
            && st.peers[from].port() != 0
        {
            // A member's address never changes by a datagram: this is another process in its
            // slot, not the member (its stamps are not the member's either). Either a
            // replacement not added yet (it waits to join and ignores the notice), or a process
            // that held the slot and was replaced while it was away: told so, it stops.
            // The holder's address and the epoch we learned it at: one ADDRS entry.
            let mut f = self.frame(REPLACED);
            encode_addrs(&[(from, st.stamped[from], st.peers[from])], &mut f);
            self.send_to(from, src, &f);
            return;
        }
        if let Some(stamp) = stamp {
            if stamp <= st.stamps[from] {
                drop(st);
                return self.refuse(from, "a replayed frame (not newer than its last)");
            }
            st.stamps[from] = stamp;
        }
        if st.peers[from] != src {
            // A process in a slot outside the view (a replacement, a joiner), or one whose
            // address we never knew: its address is where it sends from.
            log::info!("elastic rank {}: rank {from} is now at {src}", self.rank);
            st.peers[from] = src;
            st.stamped[from] = st.member.view().epoch + 1;
        }
        st.heard[from] = now;
        match kind {
            HEARTBEAT => {
                let Some((theirs, flags)) = body.split_at_checked(8) else { return };
                let Ok(theirs) = <[u8; 8]>::try_from(theirs).map(u64::from_le_bytes) else {
                    return;
                };
                st.ready_in[from] = flags.first().is_some_and(|f| f & 1 == 1);
                let view = st.member.view().clone();
                if theirs < view.epoch && !view.members.contains(&from) {
                    // A rank removed while it was away learns so; a joiner learns the view.
                    let mut f = self.frame(MESSAGE);
                    encode(&Message::Stale { view }, &mut f);
                    self.send(&st, from, &f);
                } else if theirs > view.epoch && !st.member.is_fenced() {
                    let mut f = self.frame(MESSAGE);
                    encode(&Message::CatchUp { epoch: view.epoch }, &mut f);
                    self.send(&st, from, &f);
                }
            }
            MESSAGE => {
                if let Some(m) = decode(body, max) {
                    st.member.handle_message(now, from, m);
                    self.flush(&mut st);
                }
            }
            ANNOUNCE => {
                let Some((epoch, rest)) = body.split_at_checked(8) else { return };
                let epoch = u64::from_le_bytes([
                    epoch[0], epoch[1], epoch[2], epoch[3], epoch[4], epoch[5], epoch[6], epoch[7],
                ]);
                let Some((&klen, rest)) = rest.split_first() else { return };
                let Some((key, value)) = rest.split_at_checked(usize::from(klen)) else { return };
                let Ok(key) = std::str::from_utf8(key) else { return };
                let slot = st.theirs.entry((from, key.to_string())).or_insert((0, Vec::new()));
                if epoch >= slot.0 {
                    *slot = (epoch, value.to_vec());
                    self.changed.notify_all();
                }
            }
            REPLACED if st.member.view().members.contains(&from) => {
                // From a member at its own address: another process holds our slot. A joiner
                // waits to be added (the holder is the member it replaces, not yet found dead).
                if st.member.is_joining() || st.member.is_fenced() {
                    return;
                }
                let Some(&(_, learned, holder)) = decode_addrs(body).first() else { return };
                // Only a holder learned after this process was added replaced it: a sender
                // that holds an older address for our slot (its commit that added us came
                // before it learned where we are) has a stale address, not a newer process.
                if learned <= st.member.added_at() {
                    return;
                }
                log::error!(
                    "elastic rank {}: another process (at {holder}) holds this rank's slot in the \
                     group (rank {from} says so): this process was replaced while it was away, \
                     and takes part in nothing more",
                    self.rank
                );
                st.member.fence();
                self.flush(&mut st);
            }
            ADDRS if st.member.view().members.contains(&from) => {
                // A member passes on the addresses it learned: newer ones replace ours (two
                // processes that joined learn each other's this way).
                for (r, stamp, addr) in decode_addrs(body) {
                    if r < self.slots && r != self.rank && stamp > st.stamped[r] {
                        st.peers[r] = addr;
                        st.stamped[r] = stamp;
                    }
                }
            }
            _ => {}
        }
    }

    /// The body of a sealed frame `buf` (its part after the kind is `body`) and its stamp, if
    /// its tag holds and its clock is within [`MAX_SKEW`] of ours.
    fn unseal<'a>(
        &self,
        secret: &ClusterSecret,
        buf: &[u8],
        body: &'a [u8],
    ) -> Option<(&'a [u8], u64)> {
        const TAIL: usize = 8 + tidewire::core::auth::TAG_LEN;
        let (signed, tag) =
            buf.split_at_checked(buf.len().checked_sub(tidewire::core::auth::TAG_LEN)?)?;
        if !secret.verify_tag(TAG_DOMAIN, signed, tag) {
            return None;
        }
        let (body, tail) = body.split_at_checked(body.len().checked_sub(TAIL)?)?;
        let sent = u64::from_le_bytes(tail[..8].try_into().ok()?);
        let skew = Duration::from_micros(unix_us().abs_diff(sent));
        (skew <= MAX_SKEW).then_some((body, sent))
    }

    /// A stamp for the next sealed frame: this host's clock in µs, above every earlier one.
    fn next_stamp(&self) -> u64 {
        let now = unix_us();
        let prev = self
            .last_stamp
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| Some(now.max(last + 1)))
            .unwrap_or(now);
        now.max(prev + 1)
    }

    fn refuse(&self, from: Rank, why: &str) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed);
        if n.is_power_of_two() || n == 0 {
            log::warn!(
                "elastic rank {}: dropped a frame from rank {from}: {why} ({} so far)",
                self.rank,
                n + 1
            );
        }
    }

    /// Timers: the member's, heartbeats out, silent members suspected.
    fn tick(&self, now: Instant) {
        let mut st = self.lock();
        if st.member.poll_timeout().is_some_and(|t| t <= now) {
            st.member.handle_timeout(now);
        }
        if now >= st.next_heartbeat {
            st.next_heartbeat = now + self.settings.heartbeat;
            let mut f = self.frame(HEARTBEAT);
            f.extend_from_slice(&st.member.view().epoch.to_le_bytes());
            f.push(u8::from(st.ready && st.member.is_joining()));
            if !st.member.is_fenced() {
                for r in 0..self.slots {
                    if r != self.rank {
                        self.send(&st, r, &f);
                    }
                }
                self.repeat_announcements(&st);
                self.send_addrs(&st);
                // What a round waits for goes again (a lost datagram would get a live member
                // suspected at the phase deadline).
                st.member.retransmit();
            }
        }
        let members: Vec<Rank> = st.member.view().members.iter().copied().collect();
        for r in members {
            if self.settings.evict
                && r != self.rank
                && now.duration_since(st.heard[r]) > self.settings.eviction
            {
                st.member.suspect(now, r);
            }
        }
        self.flush(&mut st);
    }
}

/// One rank's elastic membership of a group.
pub struct Elastic {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Elastic {
    /// Binds this rank's socket on `host` (port chosen by the OS): the socket and its address,
    /// to publish.
    pub fn bind(host: &str) -> Result<(UdpSocket, SocketAddr)> {
        let sock = UdpSocket::bind((host, 0)).map_err(|e| {
            Error::invalid(format!("elastic membership: binding a UDP socket on {host}: {e}"))
        })?;
        let addr = sock
            .local_addr()
            .map_err(|e| Error::invalid(format!("elastic membership: the bound address: {e}")))?;
        Ok((sock, addr))
    }

    /// Starts rank `rank`'s driver: `peers` are every rank slot's address as published (a
    /// port of 0 for a slot not known yet: it is learned from the slot's datagrams while the
    /// slot is outside the view), `id` the group's (every rank's the same: datagrams of other
    /// groups are dropped, see [`group_id`]), `view` the group's first view (a joiner, outside
    /// it, follows the views it learns until one adds it), `secret` the cluster secret every
    /// frame is sealed with (every rank must have the same, or none).
    pub fn start(
        sock: UdpSocket,
        rank: Rank,
        peers: Vec<SocketAddr>,
        id: u64,
        view: View,
        settings: ElasticSettings,
        secret: Option<ClusterSecret>,
    ) -> Result<Self> {
        if rank >= peers.len() || view.members.iter().any(|&r| r >= peers.len()) {
            return Err(Error::invalid(format!(
                "elastic membership: rank {rank} and view {:?} for {} slots",
                view.members,
                peers.len()
            )));
        }
        sock.set_read_timeout(Some(Duration::from_millis(1)))
            .map_err(|e| Error::invalid(format!("elastic membership: socket timeout: {e}")))?;
        let now = Instant::now();
        let first = view.epoch;
        let slots = peers.len();
        let state = State {
            last_members: view.members.clone(),
            member: Member::new(rank, view, settings.agreement),
            peers,
            stamped: vec![0; slots],
            stamps: vec![0; slots],
            ready: false,
            ready_in: vec![false; slots],
            heard: vec![now; slots],
            next_heartbeat: now,
            mine: Vec::new(),
            theirs: std::collections::HashMap::new(),
            masks: Vec::new(),
        };
        let shared = Arc::new(Shared {
            rank,
            id,
            slots,
            secret,
            refused: AtomicU64::new(0),
            last_stamp: AtomicU64::new(0),
            sock,
            settings,
            state: Mutex::new(state),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            #[cfg(test)]
            stop_for_test: AtomicBool::new(false),
            epoch: AtomicU64::new(first),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("tw-elastic-{rank}"))
            .spawn(move || drive(&s))
            .map_err(|e| Error::invalid(format!("elastic membership: starting its thread: {e}")))?;
        Ok(Self { shared, thread: Some(thread) })
    }

    /// Writes the view into `len` i32s at `addr` (1 for an active rank slot, 0 otherwise) now
    /// and whenever it changes, from the driver thread: the caller's mask is current without
    /// the caller calling in.
    ///
    /// # Safety
    /// `[addr, addr + 4·len)` is host memory, aligned for i32, that stays alive and may be
    /// written at any time until this member is closed (dropped).
    pub unsafe fn watch_mask(&self, addr: u64, len: usize) {
        let mut st = self.shared.lock();
        st.masks.push((addr, len));
        write_masks(&st);
    }

    /// The epoch of the view in force here, without taking the lock (it changes, with the
    /// view, when a change is installed), or `u64::MAX` once this rank is fenced (removed, or
    /// replaced while it was away).
    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    /// The view in force here.
    pub fn view(&self) -> View {
        self.shared.lock().member.view().clone()
    }

    /// Whether this rank was removed from the group (it then takes part in nothing).
    pub fn is_fenced(&self) -> bool {
        self.shared.lock().member.is_fenced()
    }

    /// Whether this rank waits to be added (it was never in a view).
    pub fn is_joining(&self) -> bool {
        self.shared.lock().member.is_joining()
    }

    /// Tells every slot, with our heartbeats (the next one now), that we wait to be added.
    pub fn set_ready(&self) {
        let mut st = self.shared.lock();
        st.ready = true;
        st.next_heartbeat = Instant::now();
    }

    /// Each slot as this rank knows it, without asking anyone: `(heard, ready)`, whether its
    /// process was heard from within the eviction timeout (ours: true), and whether it said
    /// it waits to be added.
    pub fn peer_states(&self) -> Vec<(bool, bool)> {
        let st = self.shared.lock();
        let now = Instant::now();
        (0..self.shared.slots)
            .map(|r| {
                if r == self.shared.rank {
                    return (true, st.ready && st.member.is_joining());
                }
                let heard = now.duration_since(st.heard[r]) <= self.shared.settings.eviction
                    && st.peers[r].port() != 0;
                (heard, heard && st.ready_in[r])
            })
            .collect()
    }

    /// Evidence that `ranks` failed (the engine saw them die, a collective timed out on them).
    pub fn suspect(&self, ranks: &[Rank]) -> Result<()> {
        self.check_ranks("suspect", ranks)?;
        let now = Instant::now();
        let mut st = self.shared.lock();
        for &r in ranks {
            st.member.suspect(now, r);
        }
        self.shared.flush(&mut st);
        Ok(())
    }

    /// Refuses ranks outside the group's slots (they would reach no member, or be committed
    /// into a view no rank can address).
    fn check_ranks(&self, what: &str, ranks: &[Rank]) -> Result<()> {
        let slots = self.shared.slots;
        match ranks.iter().find(|&&r| r >= slots) {
            Some(r) => Err(Error::invalid(format!(
                "elastic membership: {what} names rank {r} of a group of {slots} slots"
            ))),
            None => Ok(()),
        }
    }

    /// Asks for a change of view: `remove` (a planned shrink) and `add` (activation). Refused,
    /// saying why, from a rank that is not a member (removed, or not added yet: nobody would
    /// act on it) and for a change that leaves no member (no rank would lead it).
    pub fn request(&self, remove: &[Rank], add: &[Rank]) -> Result<()> {
        self.check_ranks("request", remove)?;
        self.check_ranks("request", add)?;
        let mut st = self.shared.lock();
        let me = self.shared.rank;
        let view = st.member.view();
        if st.member.is_fenced() {
            return Err(Error::invalid(format!(
                "elastic membership: rank {me} was removed from the group or replaced in it \
                 (epoch {}): its requests reach nobody",
                view.epoch
            )));
        }
        if st.member.is_joining() {
            return Err(Error::invalid(format!(
                "elastic membership: rank {me} has not been added to the group yet: a member \
                 asks for changes (join_group, then a member's activate_ranks)"
            )));
        }
        // (As `View::next` makes it: a rank both removed and added is removed.)
        if view.members.iter().chain(add).all(|r| remove.contains(r)) {
            return Err(Error::invalid(format!(
                "elastic membership: removing ranks {remove:?} leaves no member of {:?} (epoch {})",
                view.members, view.epoch
            )));
        }
        st.member.request(Instant::now(), remove, add);
        self.shared.flush(&mut st);
        Ok(())
    }

    /// Announces `value` under `key` to the members of the view in force (its epoch); repeated
    /// with every heartbeat while that view lasts.
    pub fn announce(&self, key: &str, value: &[u8]) -> Result<()> {
        self.announce_in(key, value, None)
    }

    /// As [`Elastic::announce`], for a value made for the view of `epoch`: refused (the view
    /// changed, nobody to blame) when the view in force is another. A value made for one view
    /// and announced at the next (the view moved between the two) would be taken by that
    /// view's members for theirs: a ring sized for other members, a region its owner frees
    /// when its own collect at the old epoch fails.
    pub fn announce_at(&self, key: &str, value: &[u8], epoch: u64) -> Result<()> {
        self.announce_in(key, value, Some(epoch))
    }

    fn announce_in(&self, key: &str, value: &[u8], made_for: Option<u64>) -> Result<()> {
        if key.len() > 255 || key.len() + value.len() > MAX_ANNOUNCE {
            return Err(Error::invalid(format!(
                "an announcement of {} + {} bytes (at most {MAX_ANNOUNCE})",
                key.len(),
                value.len()
            )));
        }
        let mut st = self.shared.lock();
        let epoch = st.member.view().epoch;
        if let Some(wanted) = made_for.filter(|&e| e != epoch) {
            return Err(Error::ViewChanged {
                op: format!("announcing {key} made for epoch {wanted}"),
                epoch,
            });
        }
        st.mine.retain(|(_, k, _)| k != key);
        st.mine.push((epoch, key.to_string(), value.to_vec()));
        self.shared.repeat_announcements(&st);
        let me = self.shared.rank;
        st.theirs.insert((me, key.to_string()), (epoch, value.to_vec()));
        Ok(())
    }

    /// Stops announcing `key` (a value whose use failed here: its memory is being freed).
    /// Members that took it already keep it; those that did not will not.
    pub fn withdraw(&self, key: &str) {
        let mut st = self.shared.lock();
        st.mine.retain(|(_, k, _)| k != key);
        let me = self.shared.rank;
        st.theirs.remove(&(me, key.to_string()));
    }

    /// What every rank of `ranks` announced under `key` at `epoch`, in that order; waits at most
    /// `timeout`. An error names the ranks still silent, or says the view moved on.
    pub fn collect(
        &self,
        key: &str,
        epoch: u64,
        ranks: &[Rank],
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>> {
        let end = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            let got: Vec<Option<Vec<u8>>> = ranks
                .iter()
                .map(|&r| match st.theirs.get(&(r, key.to_string())) {
                    Some((e, v)) if *e == epoch => Some(v.clone()),
                    _ => None,
                })
                .collect();
            if got.iter().all(Option::is_some) {
                return Ok(got.into_iter().flatten().collect());
            }
            let now = Instant::now();
            let moved = st.member.view().epoch != epoch || st.member.is_fenced();
            if moved || now >= end {
                let silent: Vec<Rank> =
                    ranks.iter().zip(&got).filter(|(_, g)| g.is_none()).map(|(&r, _)| r).collect();
                let op = format!("re-forming the group at epoch {epoch} ({key})");
                return Err(if moved {
                    // Nobody is to blame: the view changed again (the caller retries with it).
                    Error::ViewChanged { op, epoch: st.member.view().epoch }
                } else {
                    Error::Timeout { op, ranks: silent, after: timeout }
                });
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, (end - now).min(Duration::from_millis(50)))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Waits until the view's epoch passes `epoch` or this rank is fenced, at most `timeout`;
    /// returns the view then in force and whether it is fenced.
    pub fn wait_view(&self, epoch: u64, timeout: Duration) -> (View, bool) {
        let end = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if st.member.view().epoch > epoch || st.member.is_fenced() {
                break;
            }
            let now = Instant::now();
            if now >= end {
                break;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, end - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        (st.member.view().clone(), st.member.is_fenced())
    }

    /// Tests: this rank's driver stops (`true`: as a SIGSTOPped process would) or goes on,
    /// dropping every datagram that came meanwhile (lost, as they may be).
    #[cfg(test)]
    fn stop_for_test(&self, stopped: bool) {
        self.shared.stop_for_test.store(stopped, Ordering::Release);
    }

    /// Stops the driver (joins its thread; bounded by the socket's 1 ms read timeout).
    pub fn close(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Elastic {
    fn drop(&mut self) {
        self.close();
    }
}

fn drive(s: &Shared) {
    let mut buf = [0u8; 4096];
    while !s.stop.load(Ordering::Acquire) {
        #[cfg(test)]
        if s.stop_for_test.load(Ordering::Acquire) {
            while s.stop_for_test.load(Ordering::Acquire) && !s.stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            while s.sock.recv_from(&mut buf).is_ok() {}
        }
        // Every pass (at most the socket's 1 ms read timeout apart): timers set by a message or
        // a call since the last pass fire without waiting for an older due time.
        s.tick(Instant::now());
        match s.sock.recv_from(&mut buf) {
            Ok((n, src)) => s.receive(&buf[..n], src, Instant::now()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => log::debug!("elastic rank {}: receiving: {e}", s.rank),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(v: &[Rank]) -> BTreeSet<Rank> {
        v.iter().copied().collect()
    }

    /// One message of every kind.
    fn samples() -> Vec<Message> {
        let b = Ballot { round: 7, leader: 2 };
        let v = View { epoch: 3, members: set(&[0, 2, 5]) };
        vec![
            Message::Request { epoch: 1, remove: set(&[3]), add: set(&[]) },
            Message::Prepare { epoch: 1, ballot: b },
            Message::Promise { epoch: 1, ballot: b, accepted: None },
            Message::Promise { epoch: 1, ballot: b, accepted: Some((b, v.clone())) },
            Message::Accept { epoch: 2, ballot: b, view: v.clone() },
            Message::Accepted { epoch: 2, ballot: b },
            Message::Commit { epoch: 2, view: v.clone() },
            Message::Stale { view: v },
            Message::CatchUp { epoch: 9 },
        ]
    }

    #[test]
    fn every_message_survives_its_encoding() {
        for m in samples() {
            let mut bytes = Vec::new();
            encode(&m, &mut bytes);
            assert_eq!(decode(&bytes, 7), Some(m.clone()), "{m:?}");
            // A truncated or extended datagram is refused.
            assert_eq!(decode(&bytes[..bytes.len() - 1], 7), None);
            bytes.push(0);
            assert_eq!(decode(&bytes, 7), None);
        }
        // Ranks beyond the group's slots are refused.
        let mut bytes = Vec::new();
        encode(&Message::Prepare { epoch: 1, ballot: Ballot { round: 1, leader: 9 } }, &mut bytes);
        assert_eq!(decode(&bytes, 7), None);
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes, 63);
            let _ = decode_addrs(&bytes);
        }

        /// Valid encodings with one byte changed or cut short: decoded to a message whose
        /// ranks are all within the slots, or refused; never a panic.
        #[test]
        fn damaged_messages_decode_within_the_slots_or_are_refused(
            which in 0usize..9, at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<bool>()
        ) {
            let mut bytes = Vec::new();
            encode(&samples()[which], &mut bytes);
            let i = at.index(bytes.len());
            if cut { bytes.truncate(i) } else { bytes[i] = byte }
            if let Some(m) = decode(&bytes, 7) {
                let mut again = Vec::new();
                encode(&m, &mut again);
                prop_assert_eq!(decode(&again, 7), Some(m));
            }
        }
    }

    /// Heartbeats every 20 ms, a 10 ms window, and these eviction and phase timeouts (ms).
    fn fast(eviction_ms: u64, phase_ms: u64) -> ElasticSettings {
        ElasticSettings {
            heartbeat: Duration::from_millis(20),
            eviction: Duration::from_millis(eviction_ms),
            agreement: Settings {
                reconciliation_window: Duration::from_millis(10),
                phase_timeout: Duration::from_millis(phase_ms),
            },
            evict: true,
        }
    }

    fn group(n: usize, settings: ElasticSettings) -> Vec<Elastic> {
        let bound: Vec<(UdpSocket, SocketAddr)> =
            (0..n).map(|_| Elastic::bind("127.0.0.1").unwrap_or_else(|e| panic!("{e}"))).collect();
        let addrs: Vec<SocketAddr> = bound.iter().map(|b| b.1).collect();
        let view = View { epoch: 0, members: (0..n).collect() };
        bound
            .into_iter()
            .enumerate()
            .map(|(r, (s, _))| {
                Elastic::start(s, r, addrs.clone(), group_id(&addrs), view.clone(), settings, None)
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect()
    }

    #[test]
    fn a_silent_rank_rank_0_included_is_evicted_and_every_other_agrees() {
        // Heartbeats 100 times more often than the eviction: only the silent rank is evicted.
        let settings = ElasticSettings {
            heartbeat: Duration::from_millis(20),
            eviction: Duration::from_secs(2),
            agreement: Settings {
                reconciliation_window: Duration::from_millis(10),
                phase_timeout: Duration::from_millis(500),
            },
            evict: true,
        };
        let mut g = group(4, settings);
        // The caller's masks, written by the driver threads.
        let mut masks = vec![[7i32; 4]; 3];
        for (e, m) in g[1..].iter().zip(masks.iter_mut()) {
            // SAFETY: `masks` outlives the members (they are dropped at the end of the test,
            // before it) and nothing else writes it meanwhile.
            unsafe { e.watch_mask(m.as_mut_ptr() as u64, 4) };
        }
        // Rank 0 (the leader) goes silent: the others evict it by heartbeat and agree.
        let mut zero = g.remove(0);
        zero.close();
        for e in &g {
            let (v, fenced) = e.wait_view(0, Duration::from_secs(20));
            assert!(!fenced);
            assert_eq!(v, View { epoch: 1, members: set(&[1, 2, 3]) });
            assert_eq!(e.epoch(), 1);
        }
        drop(g);
        for m in &masks {
            assert_eq!(*m, [0, 1, 1, 1]);
        }
    }

    #[test]
    fn a_replacement_in_a_dead_ranks_slot_follows_the_view_and_is_added() {
        let settings = fast(500, 500);
        let bound: Vec<(UdpSocket, SocketAddr)> =
            (0..3).map(|_| Elastic::bind("127.0.0.1").unwrap_or_else(|e| panic!("{e}"))).collect();
        let addrs: Vec<SocketAddr> = bound.iter().map(|b| b.1).collect();
        let id = group_id(&addrs);
        let view = View { epoch: 0, members: set(&[0, 1, 2]) };
        let mut g: Vec<Elastic> = bound
            .into_iter()
            .enumerate()
            .map(|(r, (s, _))| {
                Elastic::start(s, r, addrs.clone(), id, view.clone(), settings, None)
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        g.pop(); // rank 2 dies
        for e in &g {
            let (v, _) = e.wait_view(0, Duration::from_secs(20));
            assert_eq!(v, View { epoch: 1, members: set(&[0, 1]) });
        }
        // A new process for slot 2 on a new port, knowing the founders' addresses and view
        // (without itself): it learns the group's view, is not fenced, and says it is ready.
        let (sock, _) = Elastic::bind("127.0.0.1").unwrap_or_else(|e| panic!("{e}"));
        let first = View { epoch: 0, members: set(&[0, 1]) };
        let joiner = Elastic::start(sock, 2, addrs.clone(), id, first, settings, None)
            .unwrap_or_else(|e| panic!("{e}"));
        let (v, fenced) = joiner.wait_view(0, Duration::from_secs(20));
        assert!(!fenced && joiner.is_joining());
        assert_eq!(v, View { epoch: 1, members: set(&[0, 1]) });
        joiner.set_ready();
        let end = Instant::now() + Duration::from_secs(20);
        while !g[0].peer_states()[2].1 {
            assert!(Instant::now() < end, "the members never saw the joiner ready");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Rank 0 only asks; every member and the joiner install the view with slot 2 again.
        g[0].request(&[], &[2]).unwrap_or_else(|e| panic!("{e}"));
        for e in g.iter().chain([&joiner]) {
            let (v, fenced) = e.wait_view(1, Duration::from_secs(20));
            assert!(!fenced);
            assert_eq!(v, View { epoch: 2, members: set(&[0, 1, 2]) });
        }
        assert!(!joiner.is_joining());
        // It stays: heartbeats reach it at its new address (nobody evicts it).
        std::thread::sleep(Duration::from_millis(1200));
        assert_eq!(g[1].view(), View { epoch: 2, members: set(&[0, 1, 2]) });
        assert_eq!(g[1].peer_states()[2], (true, false), "heard, and no longer waiting");
    }

    #[test]
    fn two_joiners_learn_each_others_address_and_stay() {
        // Founders 0 and 1 of four slots; 2 and 3 join knowing only the founders: the members
        // pass on the addresses they learned, so the two joiners hear each other and nobody
        // is evicted after they are added.
        let settings = fast(400, 300);
        let bind = || Elastic::bind("127.0.0.1").unwrap_or_else(|e| panic!("{e}"));
        let founders: Vec<(UdpSocket, SocketAddr)> = (0..2).map(|_| bind()).collect();
        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut addrs: Vec<SocketAddr> = founders.iter().map(|b| b.1).collect();
        addrs.extend([unknown, unknown]);
        let secret = Some(ClusterSecret::new(b"joiners").unwrap_or_else(|e| panic!("{e}")));
        let view = View { epoch: 0, members: set(&[0, 1]) };
        let mut g: Vec<Elastic> = founders
            .into_iter()
            .enumerate()
            .map(|(r, (s, _))| {
                Elastic::start(s, r, addrs.clone(), 9, view.clone(), settings, secret.clone())
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        for r in [2, 3] {
            let (s, _) = bind();
            let e = Elastic::start(s, r, addrs.clone(), 9, view.clone(), settings, secret.clone())
                .unwrap_or_else(|e| panic!("{e}"));
            e.set_ready();
            g.push(e);
        }
        let end = Instant::now() + Duration::from_secs(20);
        while !(g[0].peer_states()[2].1 && g[0].peer_states()[3].1) {
            assert!(Instant::now() < end, "the joiners never said they were ready");
            std::thread::sleep(Duration::from_millis(5));
        }
        g[1].request(&[], &[2, 3]).unwrap_or_else(|e| panic!("{e}"));
        for e in &g {
            let (v, fenced) = e.wait_view(0, Duration::from_secs(20));
            assert!(!fenced);
            assert_eq!(v, View { epoch: 1, members: set(&[0, 1, 2, 3]) });
        }
        std::thread::sleep(Duration::from_millis(1500));
        for e in &g {
            assert_eq!(
                e.view(),
                View { epoch: 1, members: set(&[0, 1, 2, 3]) },
                "someone was evicted"
            );
            assert!(e.peer_states().iter().all(|s| s.0), "{:?}", e.peer_states());
        }
    }

    #[test]
    fn a_replacement_is_not_taken_for_the_member_it_replaces() {
        // Rank 2 stops without a word; a new process for slot 2 sends before the others have
        // found 2 dead: its frames must not keep the dead member alive (they are dropped until
        // the slot leaves the view), and it is then learned and can be added.
        let settings = fast(500, 300);
        let (g, addrs, mut dead) = without_slot_2(settings);
        dead.close();
        let (joiner, _) = start_in_slot_2(&addrs, settings);
        slot_2_evicted(&g);
        add_slot_2(&g, &joiner);
    }

    /// A group of three with `settings`: members 0 and 1, every slot's address, and slot 2's
    /// process apart (for the test to close or stop).
    fn without_slot_2(settings: ElasticSettings) -> (Vec<Elastic>, Vec<SocketAddr>, Elastic) {
        let mut g = group(3, settings);
        let addrs: Vec<SocketAddr> =
            g.iter().map(|e| e.shared.lock().peers[e.shared.rank]).collect();
        let two = g.pop().unwrap_or_else(|| panic!("three members"));
        (g, addrs, two)
    }

    /// A new process in slot 2 knowing the founders' addresses and view (without itself),
    /// ready to be added; and its address.
    fn start_in_slot_2(addrs: &[SocketAddr], settings: ElasticSettings) -> (Elastic, SocketAddr) {
        let (sock, at) = Elastic::bind("127.0.0.1").unwrap_or_else(|e| panic!("{e}"));
        let first = View { epoch: 0, members: set(&[0, 1]) };
        let new = Elastic::start(sock, 2, addrs.to_vec(), group_id(addrs), first, settings, None)
            .unwrap_or_else(|e| panic!("{e}"));
        new.set_ready();
        (new, at)
    }

    /// Members 0 and 1 agree on a view without slot 2.
    fn slot_2_evicted(g: &[Elastic]) {
        for e in g {
            let (v, _) = e.wait_view(0, Duration::from_secs(20));
            assert_eq!(v, View { epoch: 1, members: set(&[0, 1]) }, "slot 2 is evicted");
        }
    }

    /// Members 0 and 1 hear `new` (in slot 2) ready and add it: epoch 2, seen by `new`.
    fn add_slot_2(g: &[Elastic], new: &Elastic) {
        let end = Instant::now() + Duration::from_secs(20);
        while !g[0].peer_states()[2].1 {
            assert!(Instant::now() < end, "the replacement is never heard");
            std::thread::sleep(Duration::from_millis(5));
        }
        g[0].request(&[], &[2]).unwrap_or_else(|e| panic!("{e}"));
        let (v, _) = new.wait_view(1, Duration::from_secs(20));
        assert_eq!(v, View { epoch: 2, members: set(&[0, 1, 2]) });
    }

    /// Slot 2 evicted from members 0 and 1, then a replacement started in it and added.
    fn replace_slot_2(
        g: &[Elastic],
        addrs: &[SocketAddr],
        settings: ElasticSettings,
    ) -> (Elastic, SocketAddr) {
        slot_2_evicted(g);
        let (new, at) = start_in_slot_2(addrs, settings);
        add_slot_2(g, &new);
        (new, at)
    }

    #[test]
    fn a_member_replaced_while_it_was_stopped_learns_so_and_stops() {
        // Rank 2 stops; the others evict it, a replacement joins slot 2 and is added. The
        // stopped process then resumes without the commits it missed (lost): it still thinks
        // itself a member of epoch 0. The members tell it that another process holds its
        // slot, and it stops (fenced) instead of evicting everyone and going on alone.
        let settings = fast(400, 300);
        let (g, addrs, old) = without_slot_2(settings);
        old.stop_for_test(true);
        let (new, _) = replace_slot_2(&g, &addrs, settings);
        assert_eq!(old.view().epoch, 0, "the stopped process saw nothing");
        old.stop_for_test(false);
        let end = Instant::now() + Duration::from_secs(20);
        while !old.is_fenced() {
            assert!(
                Instant::now() < end,
                "the replaced process never learned it: {:?}",
                old.view()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(old.epoch(), u64::MAX, "callers comparing epochs see the change");
        // Nobody else moved: the replacement stays a member.
        std::thread::sleep(Duration::from_millis(600));
        for e in g.iter().chain([&new]) {
            assert_eq!(e.view(), View { epoch: 2, members: set(&[0, 1, 2]) });
            assert!(!e.is_fenced());
        }
    }

    #[test]
    fn a_replacement_added_is_not_fenced_by_a_member_that_holds_an_older_address() {
        // A member whose address for slot 2 is older than the replacement's addition (it
        // learned it before, or holds the founder's) says "replaced" to the replacement: that is
        // a stale address, not a newer process. Only an address learned after the process was
        // added fences it.
        let settings = fast(500, 300);
        let (g, addrs, mut dead) = without_slot_2(settings);
        dead.close();
        let (new, at) = replace_slot_2(&g, &addrs, settings);
        let added = new.shared.lock().member.added_at();
        assert_eq!(added, 2);
        let replaced = |learned: u64| {
            let mut f = g[0].shared.frame(REPLACED);
            encode_addrs(&[(2, learned, addrs[2])], &mut f);
            g[0].shared.send_to(2, at, &f);
        };
        replaced(0); // the founder's address: older than the addition
        replaced(added); // learned in the epoch before it was added
        std::thread::sleep(Duration::from_millis(300));
        assert!(!new.is_fenced(), "a stale address fenced the process that holds the slot");
        replaced(added + 1);
        let end = Instant::now() + Duration::from_secs(20);
        while !new.is_fenced() {
            assert!(Instant::now() < end, "an address learned after its addition did not fence it");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn requests_from_a_rank_outside_the_view_or_leaving_no_member_are_refused() {
        let g = group(2, fast(2000, 500));
        let e = g[0].request(&[0, 1], &[]).expect_err("a change that leaves no member");
        assert!(e.to_string().contains("leaves no member"), "{e}");
        // A joiner (outside the view) asks nobody.
        let addrs: Vec<SocketAddr> =
            g.iter().map(|e| e.shared.lock().peers[e.shared.rank]).collect();
        let mut all = addrs.clone();
        all.push(SocketAddr::from(([0, 0, 0, 0], 0)));
        let (sock, _) = Elastic::bind("127.0.0.1").unwrap_or_else(|e| panic!("{e}"));
        let joiner = Elastic::start(
            sock,
            2,
            all,
            5,
            View { epoch: 0, members: set(&[0, 1]) },
            fast(2000, 500),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let e = joiner.request(&[], &[2]).expect_err("a request from a joiner");
        assert!(e.to_string().contains("has not been added"), "{e}");
    }

    #[test]
    fn a_value_made_for_an_older_view_is_not_announced_at_the_new_one() {
        // (The view here is epoch 0: a value made for any other epoch is refused, and leaves
        // the announcement in force as it was.)
        let g = group(2, fast(2000, 500));
        g[0].announce_at("k", b"v", 0).unwrap_or_else(|e| panic!("{e}"));
        let e = g[0].announce_at("k", b"w", 3).expect_err("made for another epoch");
        assert!(matches!(e, Error::ViewChanged { epoch: 0, .. }), "{e}");
        assert_eq!(
            g[1].collect("k", 0, &[0], Duration::from_secs(10)).unwrap_or_default(),
            vec![b"v".to_vec()]
        );
    }

    #[test]
    fn epochs_and_rounds_past_the_largest_are_refused() {
        let mut f = Vec::new();
        encode(
            &Message::Commit {
                epoch: u64::MAX,
                view: View { epoch: u64::MAX, members: set(&[0]) },
            },
            &mut f,
        );
        assert_eq!(decode(&f, 3), None);
        let mut f = Vec::new();
        encode(
            &Message::Prepare { epoch: 1, ballot: Ballot { round: u64::MAX, leader: 0 } },
            &mut f,
        );
        assert_eq!(decode(&f, 3), None);
    }

    #[test]
    fn sealed_frames_reach_holders_of_the_secret_only() {
        let settings = fast(400, 300);
        let secret =
            |s: &str| Some(ClusterSecret::new(s.as_bytes()).unwrap_or_else(|e| panic!("{e}")));
        let secrets = [secret("alpha"), secret("alpha"), secret("beta"), None];
        let bound: Vec<(UdpSocket, SocketAddr)> =
            (0..4).map(|_| Elastic::bind("127.0.0.1").unwrap_or_else(|e| panic!("{e}"))).collect();
        let addrs: Vec<SocketAddr> = bound.iter().map(|b| b.1).collect();
        let view = View { epoch: 0, members: set(&[0, 1, 2, 3]) };
        let g: Vec<Elastic> = bound
            .into_iter()
            .zip(secrets)
            .enumerate()
            .map(|(r, ((s, _), secret))| {
                Elastic::start(s, r, addrs.clone(), 7, view.clone(), settings, secret)
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        // Ranks 0 and 1 hear each other only: they evict 2 (another secret) and 3 (none).
        for e in &g[..2] {
            let (v, fenced) = e.wait_view(0, Duration::from_secs(20));
            assert!(!fenced);
            assert_eq!(v.members, set(&[0, 1]), "{v:?}");
        }
        assert!(g[0].shared.refused.load(Ordering::Relaxed) > 0);
        // A frame sealed with the secret but replayed from too long ago is refused.
        let s0 = &g[0].shared;
        let Some(secret) = &s0.secret else { panic!("rank 0 has a secret") };
        let mut f = s0.frame(HEARTBEAT);
        f[KIND_AT] |= SEALED;
        f.extend_from_slice(&0u64.to_le_bytes());
        f.extend_from_slice(&(unix_us() - 60_000_000).to_le_bytes());
        let tag = secret.tag(TAG_DOMAIN, &f);
        let body_at = KIND_AT + 1;
        assert!(s0
            .unseal(
                secret,
                &[f.clone(), tag.to_vec()].concat(),
                &[&f[body_at..], &tag[..]].concat()
            )
            .is_none());
        let mut fresh = s0.frame(HEARTBEAT);
        fresh[KIND_AT] |= SEALED;
        fresh.extend_from_slice(&0u64.to_le_bytes());
        let stamp = unix_us();
        fresh.extend_from_slice(&stamp.to_le_bytes());
        let tag = secret.tag(TAG_DOMAIN, &fresh);
        let whole = [fresh.clone(), tag.to_vec()].concat();
        assert_eq!(
            s0.unseal(secret, &whole, &whole[body_at..]),
            Some((&0u64.to_le_bytes()[..], stamp))
        );
        // The same frame from rank 1 twice: the second is a replay (its stamp is not newer).
        let mut from1 = s0.frame(HEARTBEAT);
        from1[12..16].copy_from_slice(&1u32.to_le_bytes());
        from1[KIND_AT] |= SEALED;
        from1.extend_from_slice(&[0u8; 9]);
        from1.extend_from_slice(&(unix_us() + 5_000_000).to_le_bytes());
        let tag = secret.tag(TAG_DOMAIN, &from1);
        let frame = [from1, tag.to_vec()].concat();
        let src = s0.lock().peers[1];
        let before = s0.refused.load(Ordering::Relaxed);
        s0.receive(&frame, src, Instant::now());
        s0.receive(&frame, src, Instant::now());
        assert_eq!(s0.refused.load(Ordering::Relaxed), before + 1, "the replay is refused");
    }

    #[test]
    fn announcements_reach_every_member_of_the_view() {
        let g = group(3, ElasticSettings::default());
        for (r, e) in g.iter().enumerate() {
            e.announce("region", format!("rank {r}").as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        }
        for e in &g {
            let got = e
                .collect("region", 0, &[0, 1, 2], Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got, vec![b"rank 0".to_vec(), b"rank 1".to_vec(), b"rank 2".to_vec()]);
        }
        // A rank that announced nothing is named.
        let err = g[0].collect("other", 0, &[1, 2], Duration::from_millis(100));
        assert!(matches!(err, Err(Error::Timeout { ranks, .. }) if ranks == vec![1, 2]));
        assert!(g[0].announce("k", &[0; MAX_ANNOUNCE]).is_err());
    }

    #[test]
    fn a_planned_shrink_needs_no_timeout_and_the_removed_rank_learns_it() {
        // Timeouts far beyond the waits below: the shrink can only finish without one.
        let hour = Duration::from_secs(3600);
        let settings = ElasticSettings {
            heartbeat: Duration::from_millis(20),
            eviction: hour,
            agreement: Settings {
                reconciliation_window: Duration::from_millis(10),
                phase_timeout: hour,
            },
            evict: true,
        };
        let g = group(3, settings);
        g[1].request(&[2], &[]).unwrap_or_else(|e| panic!("{e}"));
        // Ranks outside the slots are refused, not proposed.
        assert!(g[1].request(&[], &[3]).is_err());
        assert!(g[1].suspect(&[7]).is_err());
        for e in &g[..2] {
            let (v, fenced) = e.wait_view(0, Duration::from_secs(20));
            assert!(!fenced);
            assert_eq!(v, View { epoch: 1, members: set(&[0, 1]) });
        }
        let (_, fenced) = g[2].wait_view(0, Duration::from_secs(20));
        assert!(fenced, "the removed rank learns it was removed");
    }
}
