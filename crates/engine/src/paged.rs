//! The paged KV API: a *layout* (a page array per layer, one page size) registered over this
//! engine's regions and published with its descriptor; pages moved between two layouts by
//! index arrays, consecutive pages coalesced into one request (`tidewire_core::paged`).

use std::cell::RefCell;
use std::time::Instant;

use tidewire_core::memory::range_within;

use tidewire_core::paged::{for_each_range, LayoutDescriptor};
use tidewire_core::CoreError;

use crate::batch::BatchHandle;
use crate::engine::{BatchOptions, Engine};
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::request::{Op, Request, Step};
use tidewire_core::PeerId;

/// Pages to move between this engine's layout `local` and the peer's layout `remote`:
/// `local_pages[i]` to or from `remote_pages[i]`, in every layer.
#[derive(Debug, Clone, Copy)]
pub struct PageTransfer<'a> {
    pub peer: PeerId,
    pub op: Op,
    pub local: &'a str,
    pub remote: &'a str,
    pub local_pages: &'a [u64],
    pub remote_pages: &'a [u64],
}

thread_local! {
    /// Requests of the last page transfer made on this thread (reused for its capacity).
    static SCRATCH: RefCell<(Vec<Request>, Vec<usize>)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
}

impl Engine {
    /// Registers the layout `name`: `layers` page arrays (their base addresses) of `pages`
    /// pages of `page_size` bytes each, every one inside a region registered with this engine.
    /// Peers find it in this engine's descriptor by name.
    pub fn register_layout(
        &self,
        name: &str,
        layers: &[u64],
        pages: u64,
        page_size: u64,
    ) -> Result<()> {
        self.check_running()?;
        let layout =
            LayoutDescriptor { name: name.to_string(), page_size, pages, layers: layers.to_vec() };
        layout.validate().map_err(invalid)?;
        let len = layout.layer_len().ok_or(Error::Internal("a validated layout overflows"))?;
        for (i, &base) in layers.iter().enumerate() {
            if self.inner.registry.find(base, len).is_none() {
                return Err(Error::InvalidArgument {
                    reason: format!(
                        "layout {name:?}: layer {i} [{base:#x}, +{len}) is not inside one registered region"
                    ),
                });
            }
        }
        {
            let mut all = self.inner.layouts.lock();
            if all.iter().any(|l| l.name == name) {
                return Err(Error::InvalidArgument {
                    reason: format!("layout {name:?} is already registered"),
                });
            }
            all.push(layout);
        }
        self.publish()
    }

    /// Removes the layout `name` (its memory stays registered).
    pub fn unregister_layout(&self, name: &str) -> Result<()> {
        let removed = {
            let mut all = self.inner.layouts.lock();
            let before = all.len();
            all.retain(|l| l.name != name);
            before != all.len()
        };
        if !removed {
            return Err(Error::InvalidArgument { reason: format!("no layout {name:?}") });
        }
        self.publish()
    }

    /// The requests of a page transfer: every layer, consecutive pages as one request.
    pub fn page_requests(&self, t: &PageTransfer<'_>) -> Result<Vec<Request>> {
        let mut reqs = Vec::new();
        self.build_pages(t, &mut reqs, &mut Vec::new())?;
        Ok(reqs)
    }

    /// Moves a page transfer's pages as one batch.
    pub fn transfer_pages(&self, t: &PageTransfer<'_>, opts: BatchOptions) -> Result<BatchHandle> {
        let started = Instant::now();
        // The requests are built into this thread's scratch vectors, whose capacity stays
        // from one transfer to the next (a 16,384-page transfer allocates nothing).
        SCRATCH.with(|scratch| {
            let (mut reqs, mut starts) = scratch.take();
            let submitted =
                self.build_pages(t, &mut reqs, &mut starts).and_then(|(mine, theirs)| {
                    self.submit_layers(&reqs, &starts, &mine, &theirs, opts, started)
                });
            scratch.replace((reqs, starts));
            submitted
        })
    }

    /// Builds a page transfer's requests into `reqs` (cleared first), with `starts[k]` where
    /// layer `k` begins; returns the two layouts.
    fn build_pages(
        &self,
        t: &PageTransfer<'_>,
        reqs: &mut Vec<Request>,
        starts: &mut Vec<usize>,
    ) -> Result<(LayoutDescriptor, LayoutDescriptor)> {
        let (mine, theirs) = self.layouts(t.peer, t.local, t.remote)?;
        reqs.clear();
        starts.clear();
        let (op, peer) = (t.op, t.peer);
        for_each_range(&mine, &theirs, t.local_pages, t.remote_pages, |layer, l, r, len| {
            if starts.len() <= layer {
                starts.push(reqs.len());
            }
            reqs.push(Request { op, local: l, len, peer, remote: r })
        })
        .map_err(invalid)?;
        Ok((mine, theirs))
    }

    /// Submits the requests of a page transfer: `starts[k]` is where layer `k` begins. Each
    /// layer lies inside one local and one remote page array; once its first request is
    /// planned and both arrays are found inside the regions it chose, the whole layer is one
    /// run, with no per-request scan.
    fn submit_layers(
        &self,
        reqs: &[Request],
        starts: &[usize],
        mine: &LayoutDescriptor,
        theirs: &LayoutDescriptor,
        opts: BatchOptions,
        started: Instant,
    ) -> Result<BatchHandle> {
        self.check_batch(reqs, &opts)?;
        let span = mine.layer_len().ok_or(Error::Internal("a validated layout overflows"))?;
        let plan_at = |i: usize| -> Result<Step> {
            let mut step = self.plan(&reqs[i])?;
            if let Some(k) = starts.iter().position(|&s| s == i) {
                let end = starts.get(k + 1).copied().unwrap_or(reqs.len());
                let (lb, rb) = (mine.layers[k], theirs.layers[k]);
                let covers_local = range_within(lb, span, step.local.addr, step.local.len);
                let covers_remote = range_within(rb, span, step.region.addr, step.region.len);
                if covers_local && covers_remote {
                    step.known_end = Some(end);
                }
            }
            Ok(step)
        };
        let first = plan_at(0)?;
        self.dispatch(reqs, opts, started, first, plan_at)
    }

    /// As [`Engine::transfer_pages`], planned once for repeated execution.
    pub fn prepare_pages(&self, t: &PageTransfer<'_>) -> Result<Plan> {
        self.prepare(&self.page_requests(t)?)
    }

    /// This engine's layout `local` and the peer's layout `remote`.
    fn layouts(
        &self,
        peer: PeerId,
        local: &str,
        remote: &str,
    ) -> Result<(LayoutDescriptor, LayoutDescriptor)> {
        let mine = self.inner.layouts.lock().iter().find(|l| l.name == local).cloned();
        let mine = mine.ok_or_else(|| Error::InvalidArgument {
            reason: format!("no local layout {local:?} (register_layout first)"),
        })?;
        Ok((mine, self.peer_layout(peer, remote)?))
    }

    /// The peer's layout `name`, re-reading its descriptor once if the cached one lacks it.
    fn peer_layout(&self, peer: PeerId, name: &str) -> Result<LayoutDescriptor> {
        let conn = self.peer(peer)?;
        if let Some(l) = conn.descriptor().layout(name) {
            return Ok(l.clone());
        }
        let fresh = self.fetch_descriptor(&conn.name)?;
        let found = fresh.layout(name).cloned();
        if fresh.instance_id == conn.instance() {
            conn.set_descriptor(fresh);
        }
        found.ok_or_else(|| Error::InvalidArgument {
            reason: format!("peer {} has no layout {name:?}", conn.name),
        })
    }
}

/// A malformed layout or page array is the caller's error, not a decode failure.
fn invalid(e: CoreError) -> Error {
    Error::InvalidArgument { reason: e.to_string() }
}
