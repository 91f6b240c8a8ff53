//! The in-process copy paths: `local` (the peer is this engine) and `shm` (the peer's memfd,
//! mapped once). Both complete inside `submit`: a copy is bounded CPU work with nothing to
//! wait for.

use std::sync::Arc;

use crate::batch::Batch;
use crate::config::EngineConfig;
use crate::engine::{Inner, Op, Request, Step};
use crate::error::Error;
use crate::mem;

pub(crate) fn run_local(inner: &Inner, batch: &Arc<Batch>, i: usize, r: &Request, step: &Step) {
    let denied = || Error::RemoteAccessDenied {
        peer: inner.name.clone(),
        addr: r.remote,
        len: r.len,
        reason: "not inside a registered region of this engine".into(),
    };
    let Some(remote) = inner.registry.find(r.remote, r.len) else {
        return batch.fail_request(i, denied());
    };
    let (Some(local), Some(remote)) = (step.local.pin(r.local, r.len), remote.pin(r.remote, r.len))
    else {
        return batch.fail_request(i, denied());
    };
    match r.op {
        Op::Write => mem::copy_pinned(&remote, &local),
        Op::Read => mem::copy_pinned(&local, &remote),
    }
    batch.chunk_done(i);
}

pub(crate) fn run_shm(
    config: &EngineConfig,
    batch: &Arc<Batch>,
    i: usize,
    r: &Request,
    step: &Step,
) {
    let denied = |reason: String| Error::RemoteAccessDenied {
        peer: step.conn.name.clone(),
        addr: r.remote,
        len: r.len,
        reason,
    };
    let copied = step.conn.shm(config).and_then(|client| {
        let map = client.region(step.region.id).map_err(|e| match e {
            Error::RemoteAccessDenied { reason, .. } => denied(reason),
            e => e,
        })?;
        let local = step
            .local
            .pin(r.local, r.len)
            .ok_or(Error::NotRegistered { addr: r.local, len: r.len })?;
        client.copy(&map, r.remote - step.region.addr, &local, r.op == Op::Write)
    });
    match copied {
        Ok(true) => batch.chunk_done(i),
        Ok(false) => {
            batch.fail_request(i, denied("the peer unregistered this shared region".into()))
        }
        Err(e) => batch.fail_request(i, e),
    }
}
