//! The in-process copy paths: `local` (the peer is this engine) and `shm` (the peer's memfd,
//! mapped once). Both complete inside `submit`: a copy is bounded CPU work with nothing to
//! wait for. Each takes a run of requests that share one plan, resolves what the run needs
//! once, and reports the run's completions under one lock.

use std::ops::Range;
use std::sync::Arc;

use crate::batch::Batch;
use crate::config::EngineConfig;
use crate::engine::{Inner, Op, Request, Step};
use crate::error::{Error, Result};
use crate::mem;
use crate::peer::exited;
use tidewire_core::select::TransportKind;

/// Copies a run of requests whose peer is this engine.
pub(crate) fn run_local(
    inner: &Inner,
    batch: &Arc<Batch>,
    run: Range<usize>,
    requests: &[Request],
    step: &Step,
) {
    for i in run.clone() {
        let r = &requests[i];
        let denied = || Error::RemoteAccessDenied {
            peer: inner.name.clone(),
            addr: r.remote,
            len: r.len,
            reason: "not inside a registered region of this engine".into(),
        };
        let Some(remote) = inner.registry.find(r.remote, r.len) else {
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

/// Copies a run of requests through the peer's shared memory.
pub(crate) fn run_shm(
    config: &EngineConfig,
    batch: &Arc<Batch>,
    run: Range<usize>,
    requests: &[Request],
    step: &Step,
) {
    let denied = |r: &Request, reason: String| Error::RemoteAccessDenied {
        peer: step.conn.name.clone(),
        addr: r.remote,
        len: r.len,
        reason,
    };
    let first = &requests[run.start];
    let mapped = step.conn.shm(config).and_then(|client| {
        let map = client.region(step.region.id).map_err(|e| match e {
            Error::RemoteAccessDenied { reason, .. } => denied(first, reason),
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
    for i in run.clone() {
        let r = &requests[i];
        let copied: Result<bool> = step
            .local
            .pin(r.local, r.len)
            .ok_or(Error::NotRegistered { addr: r.local, len: r.len })
            .and_then(|local| {
                client.copy(&map, r.remote - step.region.addr, &local, r.op == Op::Write)
            });
        match copied {
            Ok(true) => {}
            Ok(false) => {
                batch.fail_request(i, denied(r, "the peer unregistered this shared region".into()))
            }
            Err(e) => batch.fail_request(i, e),
        }
    }
    // Done means visible: bytes copied into the memory of a process that has exited are
    // visible to nobody. Its socket tells (the kernel closed it when the process died).
    if !client.peer_alive() {
        let err = exited(&step.conn.name, TransportKind::Shm, TransportKind::Shm);
        step.conn.mark_dead(err.clone());
        return batch.fail_runs(std::slice::from_ref(&run), err);
    }
    batch.runs_done(std::slice::from_ref(&run));
}
