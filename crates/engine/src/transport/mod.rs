//! Transports, behind one trait. Each moves bytes for the runs of requests the selection policy
//! (`tidewire_core::select`) assigned to it:
//!
//! - `local`: the peer is this engine; a copy within the process (`memory.rs`).
//! - `shm`: same host; the target's memfd is mapped once and copied into directly (`memory.rs`
//!   for the copies, `shm.rs` for the socket, the mappings and revocation).
//! - `nvlink` (and `mnnvl`): the peer's device memory imported and copied by our GPU;
//!   asynchronous, completed by the transport's GPU completion thread (`nvlink.rs`).
//! - `fabric`: memory registered with libfabric NICs (RDMA: verbs, efa; or a provider asked
//!   for by name), one-sided RMA completed by per-NIC completion threads (`fabric.rs`).
//! - `tcp`: pooled connections (lanes) to the peer's RPC/data port, served by the engine's
//!   readiness loop (`reactor.rs`, a fixed set of threads).
//!
//! The engine plans a batch (every request checked, a transport chosen per run of requests
//! between the same two regions) and hands each run to its transport's [`Submission`] as it
//! goes; nothing here imports the engine. Completions come back through one path: the batch
//! (`Batch::runs_done` / `fail_runs`). Submission never blocks on a peer: memory transports
//! copy (bounded CPU work), the others enqueue to threads they own.
//!
//! Adding a transport: one module here implementing [`Transport`], its registration in
//! `Engine::new`, one arm in the selection policy and, if peers need something to reach a
//! region, one `Reach` variant.

use std::sync::Arc;
use std::time::Instant;

use tidewire_core::paged::PageShape;
use tidewire_core::select::TransportKind;

use crate::batch::Batch;
use crate::error::Result;
use crate::request::{Op, Request, Step};

pub(crate) mod alive;
pub(crate) mod fabric;
pub(crate) mod lease;
pub(crate) mod memory;
pub(crate) mod nvlink;
pub(crate) mod shm;
pub(crate) mod tcp;

/// What every transport's share of a batch is told.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BatchCtx {
    /// A caller's CUstream whose queued work GPU copies must follow.
    pub(crate) after: Option<u64>,
    /// A caller's CUstream to order after the batch's copies.
    pub(crate) complete_on: Option<u64>,
}

/// One layer of a page transfer, as its index arrays: page `local_pages[i]` of the local
/// page array at `local` to or from page `remote_pages[i]` of the remote one at `remote`,
/// consecutive pairs coalesced (walked with `tidewire_core::paged::PageCursor`). Every index
/// was checked against its layout.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerPages<'a> {
    pub(crate) op: Op,
    pub(crate) local: u64,
    pub(crate) remote: u64,
    pub(crate) page_size: u64,
    pub(crate) local_pages: &'a [u64],
    pub(crate) remote_pages: &'a [u64],
    /// The arrays' runs (`shape.runs`: the requests the layer stands for).
    pub(crate) shape: &'a PageShape,
    /// Requests in the whole batch.
    pub(crate) total: usize,
}

/// One way of moving bytes. Implementations own their threads and per-engine state.
pub(crate) trait Transport: Send + Sync {
    /// The kinds of run it serves (nvlink and mnnvl share the GPU transport).
    fn serves(&self) -> &'static [TransportKind];

    /// Starts this transport's share of `batch`.
    fn begin<'a>(&'a self, batch: &'a Arc<Batch>, ctx: BatchCtx) -> Box<dyn Submission + 'a>;
}

/// A transport's share of one batch, filled while the batch is planned.
pub(crate) trait Submission {
    /// Takes the run of requests from `from` that `step` (planned for `requests[from]`)
    /// covers and returns where it ends. A failure of the run is reported in the batch; an
    /// `Err` fails the whole submission (then nothing of the batch may stay in flight).
    fn add(&mut self, step: Step, requests: &[Request], from: usize) -> Result<usize>;

    /// Takes one layer of a page transfer whose every page `step` covers (both page arrays
    /// lie inside its two regions), written straight from the index arrays: the layer stands
    /// for requests `from..from + pages.shape.runs`. Returns where it ends, or `None` when this
    /// transport takes only requests (the engine then builds them). An index outside its
    /// layout is an `Err` that fails the whole submission, as in `add`.
    fn add_pages(
        &mut self,
        _step: &Step,
        _pages: &LayerPages<'_>,
        _from: usize,
    ) -> Option<Result<usize>> {
        None
    }

    /// Every request is planned: move what was added (memory transports copy now; the others
    /// hand it to their threads).
    fn finish(self: Box<Self>, requests: &[Request]);

    /// The submission failed: wait (until `until`) for anything already started, move
    /// nothing more.
    fn abort(self: Box<Self>, until: Instant);
}

/// The transports of one engine.
#[derive(Default)]
pub(crate) struct Transports {
    all: Vec<Box<dyn Transport>>,
}

impl Transports {
    pub(crate) fn add(&mut self, t: Box<dyn Transport>) {
        self.all.push(t);
    }

    /// The transport serving `kind`, with its index (runs of one index share a submission).
    pub(crate) fn serving(&self, kind: TransportKind) -> Option<(usize, &dyn Transport)> {
        self.all
            .iter()
            .enumerate()
            .find(|(_, t)| t.serves().contains(&kind))
            .map(|(i, t)| (i, &**t))
    }
}
