//! Prepared plans: a set of transfers checked and planned once (every request's local region,
//! peer, remote region and transport decided, runs found), then executed many times without
//! planning again. A KV cache or a collective moves the same layout step after step.
//!
//! A plan holds its decisions, not the peers' memory: executing it checks, per run, that the
//! peer is still the instance it was planned for and the local regions still registered, and
//! fails with [`Error::StalePlan`] (nothing moved) when not; prepare it again then.

use std::sync::Arc;
use std::time::Instant;

use tidewire_core::InstanceId;

use crate::batch::BatchHandle;
use crate::engine::{BatchOptions, Engine};
use crate::error::{Error, Result};
use crate::request::{Request, Step};
use crate::transport::nvlink::PreparedRun;

/// Transfers planned once by [`Engine::prepare`], run by [`Engine::execute`].
pub struct Plan {
    /// The engine that planned it (its decisions mean nothing to another).
    engine: InstanceId,
    requests: Vec<Request>,
    /// Each run's first request and its decision, in request order.
    runs: Vec<(usize, Step)>,
}

impl Plan {
    /// The planned requests.
    pub fn requests(&self) -> &[Request] {
        &self.requests
    }

    /// How many runs (consecutive requests between the same two regions) the plan has.
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    /// Total bytes moved by one execution.
    pub fn bytes(&self) -> u64 {
        self.requests.iter().map(|r| r.len).sum()
    }
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("requests", &self.requests.len())
            .field("runs", &self.runs.len())
            .field("transports", &self.runs.iter().map(|(_, s)| s.transport).collect::<Vec<_>>())
            .finish()
    }
}

impl Engine {
    /// Checks and plans `requests` once (as `submit` would, moving nothing): every request
    /// must be servable now. Execute the plan with [`Engine::execute`] as often as needed.
    pub fn prepare(&self, requests: &[Request]) -> Result<Plan> {
        self.check_batch(requests, &BatchOptions::default())?;
        let mut runs = Vec::new();
        let mut i = 0;
        while i < requests.len() {
            let mut step = self.plan(&requests[i])?;
            let end = step.run_end(requests, i + 1);
            if step.gpu.is_some() {
                // Its descriptors are written once, on the first execution.
                step.prepared = Some(Arc::new(PreparedRun::new(end)));
            }
            runs.push((i, step));
            i = end;
        }
        Ok(Plan { engine: self.instance_id(), requests: requests.to_vec(), runs })
    }

    /// Runs a prepared plan as one batch. Fails with [`Error::StalePlan`] (nothing moved) when
    /// a peer of the plan restarted, died or was re-opened, or a local region of it was
    /// unregistered since it was prepared.
    pub fn execute(&self, plan: &Plan, opts: BatchOptions) -> Result<BatchHandle> {
        let started = Instant::now();
        if plan.engine != self.instance_id() {
            return Err(Error::InvalidArgument {
                reason: "the plan was prepared by another engine".into(),
            });
        }
        self.check_batch(&plan.requests, &opts)?;
        for (start, step) in &plan.runs {
            self.still_valid(*start, step)?;
        }
        let (first, runs) = match plan.runs.split_first() {
            Some(((_, first), rest)) => (first.clone(), rest),
            None => return Err(Error::Internal("a prepared plan without runs")),
        };
        let mut next = 0;
        let step_at = |i: usize| {
            // Runs are visited in order; the transports end each where the plan did.
            while runs.get(next).is_some_and(|(start, _)| *start < i) {
                next += 1;
            }
            match runs.get(next) {
                Some((start, step)) if *start == i => Ok(step.clone()),
                _ => Err(Error::Internal("a prepared plan's runs out of step")),
            }
        };
        self.dispatch(&plan.requests, opts, started, first, step_at)
    }

    /// The run planned at `start` may still execute: its peer is the connection it was planned
    /// on, alive, and its local region is still registered.
    fn still_valid(&self, start: usize, step: &Step) -> Result<()> {
        let stale = |reason: String| Error::StalePlan { reason };
        let current = self.current_peer(step.peer);
        let same = current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &step.conn));
        if !same || step.conn.is_broken() {
            let why = match step.conn.dead() {
                Some(e) => e.to_string(),
                None => format!("peer {} was re-opened (restarted or reconnected)", step.conn.name),
            };
            return Err(stale(format!("request {start}: {why}; prepare the plan again")));
        }
        let registered = self
            .inner
            .registry
            .find(step.local.addr, 1)
            .is_some_and(|e| Arc::ptr_eq(&e, &step.local) && e.access().is_some());
        if !registered {
            return Err(stale(format!(
                "request {start}: the local region at {:#x} was unregistered; prepare the plan again",
                step.local.addr
            )));
        }
        Ok(())
    }
}
