//! One thread per engine that notices what nobody is waiting for: a same-host peer's death and
//! a batch's deadline.
//!
//! Peer death. The kernel closes every socket of a process that exits, so our end of a peer's
//! shm socket (and of an RPC revocation channel) reports a hang-up the moment the peer dies,
//! killed or not. The watcher keeps those sockets in one epoll set (`EPOLLRDHUP`, one-shot) and
//! on a hang-up retires the peer: its requests fail with `PeerFailed` ("the peer process
//! exited") and every mapping of its memory is released once no copy uses it. A stopped peer
//! (SIGSTOP) keeps its sockets open, so nothing happens to it. The set does not grow threads:
//! one epoll wait serves every peer.
//!
//! Deadlines. A batch's deadline used to be checked only by a waiter; an async batch that
//! nobody waits on is now failed here at its deadline (to within [`TICK`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidewire_core::select::TransportKind;

use crate::batch::Batch;
use crate::engine::Inner;
use crate::epoll::Epoll;
use crate::error::{Error, Result};
use crate::peer::PeerConn;

/// The longest the watcher sleeps: the lateness of a deadline nobody waits on, and how soon
/// it sees the engine stop.
pub(crate) const TICK: Duration = Duration::from_millis(20);

/// A watched socket: whose it is and which channel it is.
struct Watched {
    conn: Weak<PeerConn>,
    /// The channel whose hang-up this is (for the error).
    channel: TransportKind,
}

/// A batch due at `at` (ordered by time, then by arrival).
type Due = Reverse<(Instant, u64)>;

#[derive(Default)]
struct Deadlines {
    heap: BinaryHeap<Due>,
    batches: HashMap<u64, Weak<Batch>>,
    /// The heap's size after the last prune; the next prune happens at twice that.
    pruned_at: usize,
}

pub(crate) struct Watch {
    epoll: Epoll,
    watched: Mutex<HashMap<u64, Watched>>,
    deadlines: Mutex<Deadlines>,
    next: AtomicU64,
}

/// A peer whose socket hung up.
pub(crate) struct HungUp {
    pub(crate) conn: Arc<PeerConn>,
    pub(crate) channel: TransportKind,
}

impl Watch {
    pub(crate) fn new() -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            epoll: Epoll::new("the peer watcher")?,
            watched: Mutex::default(),
            deadlines: Mutex::default(),
            next: AtomicU64::new(1),
        }))
    }

    /// Reports a hang-up of `fd` (a socket to `conn`'s process) once. The kernel drops the
    /// registration when the socket is closed, so closing it needs no call here.
    pub(crate) fn peer_socket(
        &self,
        fd: RawFd,
        conn: Weak<PeerConn>,
        channel: TransportKind,
    ) -> Result<()> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        self.watched.lock().insert(token, Watched { conn, channel });
        let events = libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLONESHOT;
        self.epoll.add(fd, events as u32, token).map_err(|e| {
            self.watched.lock().remove(&token);
            Error::io(format!("watching a {channel} socket for hang-ups"), &e)
        })
    }

    /// Fails `batch` at `at` if it has not finished by then, whether or not anybody waits.
    pub(crate) fn deadline(&self, batch: &Arc<Batch>, at: Instant) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let mut d = self.deadlines.lock();
        d.heap.push(Reverse((at, seq)));
        d.batches.insert(seq, Arc::downgrade(batch));
        if d.heap.len() > (2 * d.pruned_at).max(1024) {
            // Batches that finished early leave their entries behind; drop them in bulk so
            // the heap stays proportional to the batches in flight.
            let Deadlines { heap, batches, .. } = &mut *d;
            batches.retain(|_, b| b.upgrade().is_some_and(|b| !b.is_finished()));
            heap.retain(|Reverse((_, s))| batches.contains_key(s));
            d.pruned_at = d.heap.len();
        }
    }

    /// Waits up to `limit` (shortened to the next deadline) for hang-ups; fails the batches
    /// whose deadline passed; returns the peers that hung up.
    pub(crate) fn wait(&self, limit: Duration) -> Vec<HungUp> {
        let next = self.deadlines.lock().heap.peek().map(|Reverse((at, _))| *at);
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        let n = self.epoll.wait(&mut events, next, limit);
        let mut hung = Vec::new();
        if n > 0 {
            let mut watched = self.watched.lock();
            for ev in &events[..n] {
                let token = ev.u64;
                let Some(w) = watched.remove(&token) else { continue };
                if let Some(conn) = w.conn.upgrade() {
                    hung.push(HungUp { conn, channel: w.channel });
                }
            }
        } else {
            // Idle: forget sockets of peers that are gone without a hang-up (replaced).
            self.watched.lock().retain(|_, w| w.conn.strong_count() > 0);
        }
        self.expire(Instant::now());
        hung
    }

    /// Fails every batch whose deadline is at or before `now`.
    fn expire(&self, now: Instant) {
        let due: Vec<Arc<Batch>> = {
            let mut d = self.deadlines.lock();
            let mut due = Vec::new();
            while let Some(Reverse((at, seq))) = d.heap.peek().copied() {
                if at > now {
                    break;
                }
                d.heap.pop();
                if let Some(b) = d.batches.remove(&seq).and_then(|b| b.upgrade()) {
                    due.push(b);
                }
            }
            due
        };
        for b in due {
            b.expire(now);
        }
    }

    /// Sockets watched and deadlines pending (for tests and `info`).
    #[cfg(test)]
    fn sizes(&self) -> (usize, usize) {
        (self.watched.lock().len(), self.deadlines.lock().heap.len())
    }
}

/// The watcher thread: retires peers whose sockets hang up, fails overdue batches.
pub(crate) fn watch_loop(inner: &Inner) {
    while !inner.life.stopping() {
        for h in inner.watch.wait(TICK) {
            inner.on_hang_up(&h.conn, h.channel);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use tidewire_core::BatchId;

    #[test]
    fn a_closed_peer_socket_is_reported_once_and_an_open_one_never() {
        let w = Watch::new().unwrap();
        let conn = PeerConn::for_tests("p");
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (ours2, _theirs2) = UnixStream::pair().unwrap();
        w.peer_socket(ours.as_raw_fd(), Arc::downgrade(&conn), TransportKind::Shm).unwrap();
        w.peer_socket(ours2.as_raw_fd(), Arc::downgrade(&conn), TransportKind::Shm).unwrap();
        assert!(w.wait(Duration::from_millis(1)).is_empty());
        drop(theirs);
        let hung = w.wait(Duration::from_secs(5));
        assert_eq!(hung.len(), 1);
        assert!(Arc::ptr_eq(&hung[0].conn, &conn));
        assert_eq!(hung[0].channel, TransportKind::Shm);
        // One-shot: the still-closed socket is not reported again.
        assert!(w.wait(Duration::from_millis(1)).is_empty());
        assert_eq!(w.sizes().0, 1);
    }

    #[test]
    fn a_batch_nobody_waits_on_fails_at_its_deadline() {
        let w = Watch::new().unwrap();
        let now = Instant::now();
        let due = now + Duration::from_millis(30);
        let b = Batch::new(now, BatchId(1), 3, None, None, due);
        let later = Batch::new(now, BatchId(2), 1, None, None, now + Duration::from_secs(3600));
        w.deadline(&b, due);
        w.deadline(&later, now + Duration::from_secs(3600));
        let until = Instant::now() + Duration::from_secs(5);
        while !b.is_finished() && Instant::now() < until {
            w.wait(Duration::from_millis(50));
        }
        assert!(b.is_finished());
        assert!(!later.is_finished());
        assert_eq!(w.sizes().1, 1);
    }
}
