//! Requests and their plans: what a caller asks for, and what the engine decided for a run of
//! requests (the transport, the local region, the peer and its remote region). Transports take
//! runs of planned requests; they never see the engine itself.

use std::sync::Arc;

use tidewire_core::memory::range_within;
use tidewire_core::select::TransportKind;
use tidewire_core::{PeerId, RegionId};

use crate::peer::PeerConn;
use crate::registry::RegionEntry;
use crate::transport::nvlink::{GpuRoute, PreparedRun};

/// READ copies remote bytes into local memory; WRITE copies local bytes to the remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write,
}

/// One request of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// Start of the local range (inside a region registered with this engine).
    pub local: u64,
    pub len: u64,
    /// The peer segment, from [`crate::Engine::open_segment`].
    pub peer: PeerId,
    /// Start of the remote range (inside a region the peer registered).
    pub remote: u64,
}

/// A request whose transport and ends are resolved.
#[derive(Clone)]
pub(crate) struct Step {
    pub(crate) transport: TransportKind,
    /// For nvlink and mnnvl: the remote reach and the GPU that copies.
    pub(crate) gpu: Option<GpuRoute>,
    pub(crate) local: Arc<RegionEntry>,
    pub(crate) conn: Arc<PeerConn>,
    pub(crate) peer: PeerId,
    pub(crate) region: RemoteRegion,
    /// Set by `Engine::prepare` for GPU runs: the run's end and its descriptors once written.
    pub(crate) prepared: Option<Arc<PreparedRun>>,
    /// Where the run ends, when the caller knows every request up to it lies inside the same
    /// two regions (a layer of a page transfer: checked once for the whole layer), so the
    /// per-request scan is skipped.
    pub(crate) known_end: Option<usize>,
}

/// The remote region a request lies in (what the transports need of its descriptor).
#[derive(Clone, Copy)]
pub(crate) struct RemoteRegion {
    pub(crate) id: RegionId,
    pub(crate) addr: u64,
    pub(crate) len: u64,
}

impl Step {
    /// The end of the run of requests from `from` on that have the same ends as this step
    /// (same peer, inside the same local and remote regions), so the same choice holds.
    /// One branch-free check per request: a 100,000-page batch is scanned in microseconds.
    pub(crate) fn run_end(&self, requests: &[Request], from: usize) -> usize {
        if let Some(end) = self.known_end {
            return end.min(requests.len()).max(from);
        }
        let (l0, ll) = (self.local.addr, self.local.len);
        let (r0, rl) = (self.region.addr, self.region.len);
        let rest = requests.get(from..).unwrap_or_default();
        let outside = rest.iter().position(|r| {
            let inside = (r.peer == self.peer)
                & range_within(r.local, r.len, l0, ll)
                & range_within(r.remote, r.len, r0, rl);
            !inside
        });
        from + outside.unwrap_or(rest.len())
    }
}
