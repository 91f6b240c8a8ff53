//! The in-process copy paths: `local` (the peer is this engine) and `shm` (the peer's memfd,
//! mapped once). Both complete inside `submit`: a copy is bounded CPU work with nothing to
//! wait for. Each takes a run of requests that share one plan, resolves what the run needs
//! once, and reports the run's completions under one lock.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use tidewire_core::select::TransportKind;

use crate::batch::{Batch, Mark};
use crate::config::EngineConfig;
use crate::error::{Error, PeerRef, Result};
use crate::mem;
use crate::peer::exited;
use crate::registry::Registry;
use crate::request::{Op, Request, Step};
use crate::transport::{BatchCtx, Submission, Transport};

/// Runs kept until every request of the batch is planned (a refused submission moves nothing).
struct Runs<'a, F: Fn(&Arc<Batch>, Range<usize>, &[Request], &Step)> {
    batch: &'a Arc<Batch>,
    runs: Vec<(Step, Range<usize>)>,
    copy: F,
}

impl<F: Fn(&Arc<Batch>, Range<usize>, &[Request], &Step)> Submission for Runs<'_, F> {
    fn add(&mut self, step: Step, requests: &[Request], from: usize) -> Result<usize> {
        let end = step.run_end(requests, from + 1);
        self.runs.push((step, from..end));
        Ok(end)
    }

    fn finish(self: Box<Self>, requests: &[Request]) {
        self.batch.mark(Mark::FirstByte);
        for (step, run) in &self.runs {
            (self.copy)(self.batch, run.clone(), requests, step);
        }
    }

    fn abort(self: Box<Self>, _until: Instant) {}
}

/// The `local` transport: the peer is this engine.
pub(crate) struct LocalTransport {
    registry: Arc<Registry>,
}

impl LocalTransport {
    pub(crate) fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

impl Transport for LocalTransport {
    fn serves(&self) -> &'static [TransportKind] {
        &[TransportKind::Local]
    }

    fn begin<'a>(&'a self, batch: &'a Arc<Batch>, _ctx: BatchCtx) -> Box<dyn Submission + 'a> {
        let copy = |b: &Arc<Batch>, run: Range<usize>, reqs: &[Request], step: &Step| {
            run_local(&self.registry, &step.conn.who(), b, run, reqs, step)
        };
        Box::new(Runs { batch, runs: Vec::new(), copy })
    }
}

/// The `shm` transport: a same-host peer's memfd, mapped once.
pub(crate) struct ShmTransport {
    config: EngineConfig,
}

impl ShmTransport {
    pub(crate) fn new(config: EngineConfig) -> Self {
        Self { config }
    }
}

impl Transport for ShmTransport {
    fn serves(&self) -> &'static [TransportKind] {
        &[TransportKind::Shm]
    }

    fn begin<'a>(&'a self, batch: &'a Arc<Batch>, _ctx: BatchCtx) -> Box<dyn Submission + 'a> {
        let copy = |b: &Arc<Batch>, run: Range<usize>, reqs: &[Request], step: &Step| {
            run_shm(&self.config, b, run, reqs, step)
        };
        Box::new(Runs { batch, runs: Vec::new(), copy })
    }
}

/// Copies a run of requests whose peer is this engine.
fn run_local(
    registry: &Registry,
    peer: &PeerRef,
    batch: &Arc<Batch>,
    run: Range<usize>,
    requests: &[Request],
    step: &Step,
) {
    for i in run.clone() {
        let r = &requests[i];
        let denied = || Error::RemoteAccessDenied {
            peer: peer.clone(),
            addr: r.remote,
            len: r.len,
            reason: "not inside a registered region of this engine".into(),
        };
        let Some(remote) = registry.find(r.remote, r.len) else {
            batch.fail_request(i, denied());
            continue;
        };
        let (Some(local), Some(remote)) =
            (step.local.pin(r.local, r.len), remote.pin(r.remote, r.len))
        else {
            batch.fail_request(i, denied());
            continue;
        };
        match r.op {
            Op::Write => mem::copy_pinned(&remote, &local),
            Op::Read => mem::copy_pinned(&local, &remote),
        }
    }
    // Requests that failed above are final already; the rest are done.
    batch.runs_done(std::slice::from_ref(&run));
}

/// Bytes of shm copies made under one pin and one in-flight mark (see `run_shm`).
const MARK_BYTES: u64 = 16 << 20;

/// Copies a run of requests through the peer's shared memory.
fn run_shm(
    config: &EngineConfig,
    batch: &Arc<Batch>,
    run: Range<usize>,
    requests: &[Request],
    step: &Step,
) {
    let denied = |r: &Request, reason: String| Error::RemoteAccessDenied {
        peer: step.conn.who(),
        addr: r.remote,
        len: r.len,
        reason,
    };
    let first = &requests[run.start];
    let mapped = step.conn.shm(config).and_then(|client| {
        let map = client.region(step.region.id).map_err(|e| match e {
            Error::RemoteAccessDenied { reason, .. } => {
                step.conn.mark_stale();
                denied(first, reason)
            }
            e => e,
        })?;
        Ok((client, map))
    });
    let (client, map) = match mapped {
        Ok(m) => m,
        Err(e) => return batch.fail_runs(std::slice::from_ref(&run), e),
    };
    if let Some(e) = step.conn.dead() {
        return batch.fail_runs(std::slice::from_ref(&run), e.clone());
    }
    // One pin of the local region and one in-flight mark in the peer's for up to
    // `MARK_BYTES` of copies (two locked operations for them all, not four per request), so
    // an unregistration on either side waits for at most that much copying.
    let fail_rest = |from: usize, why: &dyn Fn(&Request) -> Error| {
        for (j, r) in requests.iter().enumerate().take(run.end).skip(from) {
            batch.fail_request(j, why(r));
        }
    };
    let mut i = run.start;
    while i < run.end {
        let Some(local) = step.local.run_access() else {
            fail_rest(i, &|r| Error::NotRegistered { addr: r.local, len: r.len });
            break;
        };
        let Some(mark) = client.enter_run(&map) else {
            step.conn.mark_stale();
            fail_rest(i, &|r| denied(r, "the peer unregistered this shared region".into()));
            break;
        };
        let mut bytes = 0u64;
        while i < run.end && bytes < MARK_BYTES {
            let r = &requests[i];
            let copied = match local.pin(r.local, r.len) {
                Some(pinned) => mark.copy(r.remote - step.region.addr, &pinned, r.op == Op::Write),
                None => Err(Error::NotRegistered { addr: r.local, len: r.len }),
            };
            if let Err(e) = copied {
                batch.fail_request(i, e);
            }
            bytes += r.len;
            i += 1;
        }
    }
    // Done means visible: bytes copied into the memory of a process that has exited are
    // visible to nobody. Its liveness word (or its socket) tells.
    if !client.peer_alive() {
        let err = exited(&step.conn.who(), TransportKind::Shm, client.death_seen());
        step.conn.mark_dead(err.clone());
        return batch.fail_runs(std::slice::from_ref(&run), err);
    }
    batch.runs_done(std::slice::from_ref(&run));
}
