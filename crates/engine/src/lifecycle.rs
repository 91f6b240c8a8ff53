//! Threads and sockets the engine owns, so shutdown can wake and join every one of them.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::error::{Error, Result};

/// A socket that shutdown must wake.
pub(crate) enum Wakeable {
    Tcp(TcpStream),
    Unix(UnixStream),
}

#[derive(Default)]
pub(crate) struct Lifecycle {
    stopping: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    sockets: Mutex<HashMap<u64, Wakeable>>,
    next_token: AtomicU64,
}

/// Untracks its socket when dropped.
pub(crate) struct Tracked<'a> {
    life: &'a Lifecycle,
    token: u64,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.life.sockets.lock().remove(&self.token);
    }
}

impl Lifecycle {
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Spawns a named thread that shutdown joins.
    pub(crate) fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) -> Result<()> {
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(f)
            .map_err(|e| Error::io(format!("spawning thread {name}"), &e))?;
        let mut threads = self.threads.lock();
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
        Ok(())
    }

    /// Tracks a socket so that shutdown wakes whoever blocks on it.
    pub(crate) fn track(&self, socket: Wakeable) -> Tracked<'_> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.sockets.lock().insert(token, socket);
        Tracked { life: self, token }
    }

    /// Marks the engine stopping and shuts every tracked socket down.
    pub(crate) fn begin_stop(&self) {
        self.stopping.store(true, Ordering::Release);
        for (_, s) in self.sockets.lock().drain() {
            let _ = match s {
                Wakeable::Tcp(s) => s.shutdown(Shutdown::Both),
                Wakeable::Unix(s) => s.shutdown(Shutdown::Both),
            };
        }
    }

    /// Joins every thread (except the calling one).
    pub(crate) fn join_all(&self) {
        let me = std::thread::current().id();
        loop {
            let batch: Vec<_> = std::mem::take(&mut *self.threads.lock());
            if batch.is_empty() {
                return;
            }
            for t in batch {
                if t.thread().id() != me {
                    let _ = t.join();
                }
            }
        }
    }
}
