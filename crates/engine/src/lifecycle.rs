//! The threads the engine owns, so shutdown can stop and join every one of them, and the
//! readiness loop (`reactor.rs`) that serves the engine's connections (RPC/data and shm).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::reactor::{self, Reactor};

#[derive(Default)]
pub(crate) struct Lifecycle {
    stopping: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Started on first use.
    reactor: Mutex<Option<Arc<Reactor>>>,
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

    /// Threads started and still running.
    pub(crate) fn thread_count(&self) -> usize {
        self.threads.lock().iter().filter(|t| !t.is_finished()).count()
    }

    /// The engine's readiness loop, started on first use (its threads are joined by
    /// [`Lifecycle::join_all`]).
    pub(crate) fn reactor(&self) -> Result<Arc<Reactor>> {
        let mut slot = self.reactor.lock();
        if let Some(r) = slot.as_ref() {
            return Ok(r.clone());
        }
        if self.stopping() {
            return Err(Error::ShuttingDown { who: "this engine".into() });
        }
        let r =
            Arc::new(Reactor::start(reactor::default_threads(), |name, f| self.spawn(name, f))?);
        *slot = Some(r.clone());
        Ok(r)
    }

    /// Marks the engine stopping and stops the readiness loop (which drops its connections).
    pub(crate) fn begin_stop(&self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(r) = self.reactor.lock().as_ref() {
            r.stop();
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
