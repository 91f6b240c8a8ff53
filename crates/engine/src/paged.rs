//! The paged KV API: a *layout* (a page array per layer, one page size) registered over this
//! engine's regions and published with its descriptor; pages moved between two layouts by
//! index arrays, consecutive pages coalesced into one request (`tidewire_core::paged`).

use std::borrow::Cow;
use std::time::Instant;

use tidewire_core::memory::range_within;

use tidewire_core::paged::{for_each_range, page_shape, LayoutDescriptor};
use tidewire_core::CoreError;

use crate::batch::BatchHandle;
use crate::engine::{BatchOptions, Engine};
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::request::{Op, Request};
use crate::transport::LayerPages;
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
        self.build_pages(t, &mut reqs)?;
        Ok(reqs)
    }

    /// Moves a page transfer's pages as one batch. A layer whose two page arrays lie inside
    /// the regions planned for its first run goes to its transport as index arrays when the
    /// transport takes them (nvlink writes its descriptors straight from the indices); the
    /// others are built into requests, as [`Engine::page_requests`] gives them.
    pub fn transfer_pages(&self, t: &PageTransfer<'_>, opts: BatchOptions) -> Result<BatchHandle> {
        let started = Instant::now();
        self.check_running()?;
        let (mine, theirs) = self.layouts(t.peer, t.local, t.remote)?;
        let shape = page_shape(&mine, &theirs, t.local_pages, t.remote_pages).map_err(invalid)?;
        let Some(shape) = shape else {
            return Err(Error::InvalidArgument { reason: "empty batch".into() });
        };
        let size = mine.page_size;
        let span = mine.layer_len().ok_or(Error::Internal("a validated layout overflows"))?;
        let layers = mine.layers.len();
        let (runs, first) = (shape.runs, shape.first);
        let too_big = || Error::InvalidArgument { reason: "the page transfer overflows".into() };
        let n = runs.checked_mul(layers).ok_or_else(too_big)?;
        let total = (t.local_pages.len() as u64)
            .checked_mul(size)
            .and_then(|b| b.checked_mul(layers as u64))
            .ok_or_else(too_big)?;
        // The first request of a layer, as `page_requests` builds it.
        let first_of = |layer: usize| Request {
            op: t.op,
            local: mine.layers[layer].wrapping_add(first.local.wrapping_mul(size)),
            len: first.count.wrapping_mul(size),
            peer: t.peer,
            remote: theirs.layers[layer].wrapping_add(first.remote.wrapping_mul(size)),
        };
        let step0 = self.plan(&first_of(0))?;
        let conn = step0.conn.clone();
        self.run_batch(n, total, &conn, opts, started, |feed| {
            // Built only if a layer's transport takes requests.
            let mut requests = Vec::new();
            let mut next = Some(step0);
            let mut i = 0;
            while i < n {
                let (layer, at_start) = (i / runs, i % runs == 0);
                let mut step = match next.take() {
                    Some(step) => step,
                    None if at_start => self.plan(&first_of(layer))?,
                    None => self.plan(&requests[i])?,
                };
                if at_start
                    && range_within(mine.layers[layer], span, step.local.addr, step.local.len)
                    && range_within(theirs.layers[layer], span, step.region.addr, step.region.len)
                {
                    // The whole layer lies inside the step's regions: one run.
                    step.known_end = Some(i + runs);
                    let pages = LayerPages {
                        op: t.op,
                        local: mine.layers[layer],
                        remote: theirs.layers[layer],
                        page_size: size,
                        local_pages: t.local_pages,
                        remote_pages: t.remote_pages,
                        shape: &shape,
                        total: n,
                    };
                    if let Some(end) = feed.add_pages(&step, &pages, i) {
                        i = end?;
                        continue;
                    }
                }
                if requests.is_empty() {
                    self.build_pages(t, &mut requests)?;
                }
                i = feed.add(step, &requests, i)?;
            }
            Ok(Cow::Owned(requests))
        })
    }

    /// Builds a page transfer's requests into `reqs`: every layer, consecutive pages as one
    /// request.
    fn build_pages(&self, t: &PageTransfer<'_>, reqs: &mut Vec<Request>) -> Result<()> {
        let (mine, theirs) = self.layouts(t.peer, t.local, t.remote)?;
        let (op, peer) = (t.op, t.peer);
        for_each_range(&mine, &theirs, t.local_pages, t.remote_pages, |_, l, r, len| {
            reqs.push(Request { op, local: l, len, peer, remote: r })
        })
        .map_err(invalid)
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
