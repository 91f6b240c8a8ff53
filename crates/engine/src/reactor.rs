//! The readiness loop: a fixed set of threads per engine that serves every TCP connection of
//! the RPC/data port (inbound connections in `rpc.rs`, tcp lanes in `transport/tcp.rs`),
//! whatever the number of peers.
//!
//! Each loop thread owns an epoll set and the connections ([`Source`]s) assigned to it. A
//! connection is registered edge-triggered for reading and writing; on any event (or a wake
//! from another thread, or its deadline) the loop calls the source, which does all the I/O the
//! socket allows without blocking and returns. Deadlines come from the sources' sans-io state
//! machines (`tidewire_core::handshake`, `tidewire_core::stall`): the loop feeds them the clock
//! and sweeps every source at least every [`SWEEP`], calling back those whose deadline
//! passed, and wakes at the earliest deadline the sweep saw. A deadline set between sweeps (by
//! the loop or by a submitting thread) is seen by the next one: deadlines are kept to within
//! [`SWEEP`], and nothing is paid per event.
//!
//! Shutdown: the lifecycle stops the reactor; each loop calls `on_stop` on its sources, drops
//! them (closing their sockets) and returns, and shutdown joins it.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::epoll::Epoll;
use crate::error::{Error, Result};

/// The longest a loop sleeps without looking at its sources' deadlines.
pub(crate) const SWEEP: Duration = Duration::from_millis(100);

/// The token of a loop's own wake-up descriptor.
const WAKE: u64 = 0;

/// What a source wants after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Wait for the next event.
    Continue,
    /// More work is ready now (a budget ran out): call again without waiting for an event.
    Again,
    /// Done: the loop drops the source (closing its socket).
    Close,
}

/// A connection served by a loop. Every method runs on the loop's thread and must not block.
pub(crate) trait Source: Send {
    fn fd(&self) -> RawFd;
    /// The socket is ready, or the source was woken: do the I/O possible now.
    fn on_ready(&mut self, now: Instant) -> Flow;
    /// When `on_timeout` is next due.
    fn poll_timeout(&mut self, now: Instant) -> Option<Instant>;
    /// A deadline may have passed (a no-op when called early).
    fn on_timeout(&mut self, now: Instant) -> Flow;
    /// The engine stops: fail what is pending. The source is dropped right after.
    fn on_stop(&mut self);
}

#[derive(Default)]
struct Inbox {
    added: Vec<(u64, Box<dyn Source>)>,
    woken: Vec<u64>,
    /// The wake descriptor was written since the loop last took the inbox.
    signalled: bool,
    /// The loop has exited: nothing more is taken.
    closed: bool,
}

struct Loop {
    epoll: Epoll,
    wake: OwnedFd,
    inbox: Mutex<Inbox>,
    stop: AtomicBool,
    next_token: AtomicU64,
}

impl Loop {
    fn new() -> Result<Self> {
        let epoll = Epoll::new("an I/O loop")?;
        // SAFETY: plain syscall; the result is checked before use.
        let ev = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if ev < 0 {
            return Err(Error::io("creating an I/O loop's wake descriptor", &last_error()));
        }
        // SAFETY: `ev` is a fresh descriptor nothing else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(ev) };
        let lp = Self {
            epoll,
            wake,
            inbox: Mutex::default(),
            stop: AtomicBool::new(false),
            next_token: AtomicU64::new(WAKE + 1),
        };
        lp.epoll
            .add(lp.wake.as_raw_fd(), libc::EPOLLIN as u32, WAKE)
            .map_err(|e| Error::io("watching an I/O loop's wake descriptor", &e))?;
        Ok(lp)
    }

    /// Writes the wake descriptor unless it is already signalled (call with the inbox locked).
    fn signal(&self, inbox: &mut Inbox) {
        if inbox.signalled {
            return;
        }
        inbox.signalled = true;
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. A full counter (EAGAIN) still
        // leaves the descriptor readable, which is all a wake needs.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn drain_wake(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd.
        unsafe { libc::read(self.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// A source's place on a loop, usable from any thread: attach the source, then wake it.
#[derive(Clone)]
pub(crate) struct Waker {
    lp: Arc<Loop>,
    token: u64,
}

impl Waker {
    /// Hands `source` to the loop, which calls `on_ready` on it once it is registered. When
    /// the loop has stopped, the source is stopped and dropped here and the error says so.
    pub(crate) fn attach(&self, mut source: Box<dyn Source>) -> Result<()> {
        let mut inbox = self.lp.inbox.lock();
        if inbox.closed || self.lp.stop.load(Ordering::Acquire) {
            drop(inbox);
            source.on_stop();
            return Err(Error::ShuttingDown { who: "this engine's I/O loop".into() });
        }
        inbox.added.push((self.token, source));
        self.lp.signal(&mut inbox);
        Ok(())
    }

    /// Asks the loop to call the source's `on_ready` soon.
    pub(crate) fn wake(&self) {
        let mut inbox = self.lp.inbox.lock();
        if inbox.closed {
            return;
        }
        inbox.woken.push(self.token);
        self.lp.signal(&mut inbox);
    }
}

/// The loops of one engine.
pub(crate) struct Reactor {
    loops: Vec<Arc<Loop>>,
    next: AtomicUsize,
}

/// Loop threads per engine: `TIDEWIRE_IO_THREADS`, else the cores available, at most 4.
pub(crate) fn default_threads() -> usize {
    if let Some(n) = std::env::var("TIDEWIRE_IO_THREADS").ok().and_then(|v| v.parse::<usize>().ok())
    {
        return n.clamp(1, 64);
    }
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4)
}

impl Reactor {
    /// Makes `threads` loops; `spawn` starts each loop's thread (the lifecycle's, so that
    /// shutdown joins it).
    pub(crate) fn start(
        threads: usize,
        spawn: impl Fn(String, Box<dyn FnOnce() + Send>) -> Result<()>,
    ) -> Result<Self> {
        let mut started = Self { loops: Vec::with_capacity(threads), next: AtomicUsize::new(0) };
        for i in 0..threads.max(1) {
            let made = Loop::new().map(Arc::new).and_then(|lp| {
                let l2 = lp.clone();
                spawn(format!("tw-io-{i}"), Box::new(move || run(&l2))).map(|()| lp)
            });
            match made {
                Ok(lp) => started.loops.push(lp),
                Err(e) => {
                    // The loops already running would never be told to stop, and shutdown
                    // would wait for them forever.
                    started.stop();
                    return Err(e);
                }
            }
        }
        Ok(started)
    }

    /// A place for a new source on the next loop (round robin).
    pub(crate) fn slot(&self) -> Waker {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.loops.len();
        let lp = self.loops[i].clone();
        let token = lp.next_token.fetch_add(1, Ordering::Relaxed);
        Waker { lp, token }
    }

    /// Asks every loop to stop its sources and return.
    pub(crate) fn stop(&self) {
        for lp in &self.loops {
            lp.stop.store(true, Ordering::Release);
            let mut inbox = lp.inbox.lock();
            inbox.signalled = false;
            lp.signal(&mut inbox);
        }
    }
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// One loop thread.
fn run(lp: &Loop) {
    let mut sources: HashMap<u64, Box<dyn Source>> = HashMap::new();
    let mut ready: Vec<u64> = Vec::new();
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut next_sweep = Instant::now() + SWEEP;
    // The earliest deadline the last sweep saw (a deadline set since is seen by the next).
    let mut earliest: Option<Instant> = None;
    let edge = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
    loop {
        if lp.stop.load(Ordering::Acquire) {
            break;
        }
        // Sources ready to run again: just look for new events.
        let until = if ready.is_empty() {
            earliest.map_or(next_sweep, |e| e.min(next_sweep))
        } else {
            Instant::now()
        };
        let n = lp.epoll.wait(&mut events, Some(until), SWEEP);
        for ev in &events[..n] {
            if ev.u64 == WAKE {
                lp.drain_wake();
            } else {
                ready.push(ev.u64);
            }
        }
        let (added, woken) = {
            let mut inbox = lp.inbox.lock();
            inbox.signalled = false;
            (std::mem::take(&mut inbox.added), std::mem::take(&mut inbox.woken))
        };
        for (token, source) in added {
            if let Err(e) = lp.epoll.add(source.fd(), edge, token) {
                log::warn!("registering a connection with an I/O loop: {e}");
                let mut source = source;
                source.on_stop();
                continue;
            }
            sources.insert(token, source);
            ready.push(token);
        }
        ready.extend(woken);
        if ready.len() > 1 {
            ready.sort_unstable();
            ready.dedup();
        }
        let now = Instant::now();
        for token in std::mem::take(&mut ready) {
            let Some(source) = sources.get_mut(&token) else { continue };
            match source.on_ready(now) {
                Flow::Continue => {}
                Flow::Again => ready.push(token),
                Flow::Close => close(lp, &mut sources, token),
            }
        }
        let now = Instant::now();
        if now >= next_sweep || earliest.is_some_and(|e| now >= e) {
            earliest = None;
            next_sweep = now + SWEEP;
            let tokens: Vec<u64> = sources.keys().copied().collect();
            for token in tokens {
                let Some(source) = sources.get_mut(&token) else { continue };
                let due = source.poll_timeout(now);
                if due.is_some_and(|t| t <= now) {
                    match source.on_timeout(now) {
                        Flow::Close => {
                            close(lp, &mut sources, token);
                            continue;
                        }
                        Flow::Again => ready.push(token),
                        Flow::Continue => {}
                    }
                }
                if let Some(t) = sources.get_mut(&token).and_then(|s| s.poll_timeout(now)) {
                    earliest = Some(earliest.map_or(t, |e| e.min(t)));
                }
            }
        }
    }
    let late = {
        let mut inbox = lp.inbox.lock();
        inbox.closed = true;
        std::mem::take(&mut inbox.added)
    };
    for (_, mut source) in late {
        source.on_stop();
    }
    for (_, mut source) in sources.drain() {
        source.on_stop();
        // Dropped right after: an error only means the descriptor already left the set.
        let _ = lp.epoll.delete(source.fd());
    }
}

fn close(lp: &Loop, sources: &mut HashMap<u64, Box<dyn Source>>, token: u64) {
    if let Some(source) = sources.remove(&token) {
        // Dropped right after: an error only means the descriptor already left the set.
        let _ = lp.epoll.delete(source.fd());
    }
}
