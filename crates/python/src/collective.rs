//! `tidewire._native.Communicator`: one rank of a collective group, for `tidewire.distributed`.
//!
//! Buffers come as raw addresses and byte lengths: the caller (`tidewire.distributed`) passes
//! the data pointers of contiguous CPU tensors it holds until the call (or, for `isend` /
//! `irecv`, the wait) returns. Every call releases the GIL.

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::prelude::*;
use tidewire::{Engine, PeerBuffer};
use tidewire_collective::elastic::{Elastic, ElasticSettings};
use tidewire_collective::membership::{Settings, View};
use tidewire_collective::{
    Comm, CudaComm, CudaOp, DType, Error, Gate, OpId, PeerInfo, ReduceOp, Region,
};

use crate::errors;
use crate::{
    close, keep_for_process, or_free_ours, secs, tensor_address, Home, PyEngine, PyRelease,
};

/// Maps a collective failure to its Python exception; `ranks` on it names the ranks involved.
fn to_py(e: Error) -> PyErr {
    let ranks = e.ranks();
    // The variant (`ViewChanged`: the caller may retry with the new view).
    let kind = e.kind();
    let msg = e.to_string();
    let err = match e {
        Error::Timeout { .. } => errors::Timeout::new_err(msg),
        Error::RankFailed { .. } | Error::Poisoned { .. } => errors::PeerFailed::new_err(msg),
        Error::InvalidArgument { .. } => errors::InvalidArgument::new_err(msg),
        Error::Engine { source, .. } => {
            let err = errors::to_py(source);
            Python::attach(|py| {
                let _ = err.value(py).setattr("args", (msg,));
            });
            err
        }
        _ => errors::TidewireError::new_err(msg),
    };
    Python::attach(|py| {
        let _ = err.value(py).setattr("ranks", ranks);
        let _ = err.value(py).setattr("kind", kind);
    });
    err
}

fn dtype(name: &str) -> PyResult<DType> {
    DType::parse(name).map_err(to_py)
}

fn reduce_op(name: &str) -> PyResult<ReduceOp> {
    ReduceOp::parse(name).map_err(to_py)
}

/// A byte slice of the caller's memory.
///
/// # Safety
/// `[addr, addr + len)` is memory the caller keeps alive, and does not touch, for the call.
unsafe fn bytes<'a>(addr: u64, len: u64) -> &'a mut [u8] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: as the function's contract says.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len as usize) }
}

/// One rank of a group (see `tidewire.distributed`).
#[pyclass(frozen, module = "tidewire._native", name = "Communicator")]
pub(crate) struct PyComm {
    comm: Mutex<Option<Comm>>,
}

impl PyComm {
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Comm) -> tidewire_collective::Result<T> + Send,
    ) -> PyResult<T> {
        with_live(py, &self.comm, f)
    }

    /// As `with`, counting the call as collective `op` of `bytes` in the metrics, labelled with
    /// the algorithm the call took (`Comm::algorithm`).
    fn op<T: Send>(
        &self,
        py: Python<'_>,
        op: &'static str,
        bytes: u64,
        f: impl FnOnce(&mut Comm) -> tidewire_collective::Result<T> + Send,
    ) -> PyResult<T> {
        with_live(py, &self.comm, |c| {
            let out = f(c);
            let algorithm = c.algorithm();
            tidewire_collective::record(op, algorithm, bytes, &out);
            if let Some(m) = tidewire::metrics::get() {
                m.coll_size.set((c.size() - c.dead_ranks().len()) as i64);
            }
            out
        })
    }
}

/// Runs `f` on the communicator in `slot`, without the GIL; an error once it was destroyed.
fn with_live<C: Send, T: Send>(
    py: Python<'_>,
    slot: &Mutex<Option<C>>,
    f: impl FnOnce(&mut C) -> tidewire_collective::Result<T> + Send,
) -> PyResult<T> {
    py.detach(|| {
        let mut guard: MutexGuard<'_, Option<C>> =
            slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match guard.as_mut() {
            Some(comm) => f(comm),
            None => Err(Error::InvalidArgument { reason: "the group was destroyed".into() }),
        }
    })
    .map_err(to_py)
}

#[pymethods]
impl PyComm {
    /// Allocates a rank's receive region for a group of `size` with rings of `ring_bytes`;
    /// returns `(address, length, ring bytes)`.
    #[staticmethod]
    fn allocate_region(
        py: Python<'_>,
        engine: &PyEngine,
        size: usize,
        ring_bytes: u64,
    ) -> PyResult<(u64, u64, u64)> {
        let engine = engine.engine()?;
        let region =
            py.detach(move || Region::allocate(&engine, size, ring_bytes)).map_err(to_py)?;
        Ok((region.addr, region.len, region.cap))
    }

    /// Connects rank `rank` to `peers` (every rank's `(engine name, region address, process
    /// id)`); the region is freed with the communicator (or now, if connecting fails).
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        engine: &PyEngine,
        rank: usize,
        region: (u64, u64, u64),
        peers: Vec<(String, u64, u32)>,
        timeout_s: f64,
    ) -> PyResult<Self> {
        let engine: Arc<Engine> = engine.engine()?;
        let timeout = secs("timeout", timeout_s)?;
        let (addr, len, cap) = region;
        let peers: Vec<PeerInfo> = peers
            .into_iter()
            .map(|(name, region, pid)| PeerInfo { name, region, pid: (pid != 0).then_some(pid) })
            .collect();
        // The communicator owns the region: freed with it, or by `connect` if that fails.
        let comm =
            py.detach(|| Comm::connect(engine, rank, Region { addr, len, cap }, &peers, timeout));
        Ok(Self { comm: Mutex::new(Some(comm.map_err(to_py)?)) })
    }

    fn all_reduce(
        &self,
        py: Python<'_>,
        addr: u64,
        len: u64,
        dtype_: &str,
        op: &str,
    ) -> PyResult<()> {
        let (dt, op) = (dtype(dtype_)?, reduce_op(op)?);
        // SAFETY: `tidewire.distributed` passes a contiguous tensor it holds for the call.
        self.op(py, "all_reduce", len, |c| c.all_reduce(unsafe { bytes(addr, len) }, dt, op))
    }

    fn broadcast(&self, py: Python<'_>, addr: u64, len: u64, root: usize) -> PyResult<()> {
        // SAFETY: as in `all_reduce`.
        self.op(py, "broadcast", len, |c| c.broadcast(unsafe { bytes(addr, len) }, root))
    }

    fn all_gather(&self, py: Python<'_>, out: (u64, u64), input: (u64, u64)) -> PyResult<()> {
        // SAFETY: as in `all_reduce`, for two distinct tensors.
        self.op(py, "all_gather", input.1, |c| {
            c.all_gather(unsafe { bytes(out.0, out.1) }, unsafe { bytes(input.0, input.1) })
        })
    }

    fn reduce_scatter(
        &self,
        py: Python<'_>,
        out: (u64, u64),
        input: (u64, u64),
        dtype_: &str,
        op: &str,
    ) -> PyResult<()> {
        let (dt, op) = (dtype(dtype_)?, reduce_op(op)?);
        // SAFETY: as in `all_gather`.
        self.op(py, "reduce_scatter", input.1, |c| {
            c.reduce_scatter(
                unsafe { bytes(out.0, out.1) },
                unsafe { bytes(input.0, input.1) },
                dt,
                op,
            )
        })
    }

    fn all_to_all(
        &self,
        py: Python<'_>,
        out: u64,
        out_splits: Vec<usize>,
        input: u64,
        in_splits: Vec<usize>,
    ) -> PyResult<()> {
        let (ol, il) =
            (out_splits.iter().sum::<usize>() as u64, in_splits.iter().sum::<usize>() as u64);
        // SAFETY: as in `all_gather`; the lengths are the splits' sums.
        self.op(py, "all_to_all", il, |c| {
            c.all_to_all(
                unsafe { bytes(out, ol) },
                &out_splits,
                unsafe { bytes(input, il) },
                &in_splits,
            )
        })
    }

    fn reduce(
        &self,
        py: Python<'_>,
        addr: u64,
        len: u64,
        dtype_: &str,
        op: &str,
        root: usize,
    ) -> PyResult<()> {
        let (dt, op) = (dtype(dtype_)?, reduce_op(op)?);
        // SAFETY: as in `all_reduce`.
        self.op(py, "reduce", len, |c| c.reduce(unsafe { bytes(addr, len) }, dt, op, root))
    }

    fn gather(
        &self,
        py: Python<'_>,
        out: (u64, u64),
        input: (u64, u64),
        root: usize,
    ) -> PyResult<()> {
        // SAFETY: as in `all_gather`.
        self.op(py, "gather", input.1, |c| {
            c.gather(unsafe { bytes(out.0, out.1) }, unsafe { bytes(input.0, input.1) }, root)
        })
    }

    fn scatter(
        &self,
        py: Python<'_>,
        out: (u64, u64),
        input: (u64, u64),
        root: usize,
    ) -> PyResult<()> {
        // SAFETY: as in `all_gather`.
        self.op(py, "scatter", input.1, |c| {
            c.scatter(unsafe { bytes(out.0, out.1) }, unsafe { bytes(input.0, input.1) }, root)
        })
    }

    fn barrier(&self, py: Python<'_>) -> PyResult<()> {
        self.op(py, "barrier", 0, Comm::barrier)
    }

    /// Starts sending; returns the operation's id for `wait` / `test`.
    /// Starts sending `len` bytes at `addr` to `peer` as a message with `tag` (its receive
    /// must name the same tag and length: checked when the message arrives).
    #[pyo3(signature = (peer, addr, len, tag = 0))]
    fn isend(&self, py: Python<'_>, peer: usize, addr: u64, len: u64, tag: i64) -> PyResult<u64> {
        // SAFETY: `tidewire.distributed` keeps the tensor alive in the operation's Work until
        // it is waited for, and the group (which holds the operation) until then.
        self.with(py, |c| unsafe { c.isend(peer, addr, len, tag as u64) }.map(|id| id.0))
    }

    #[pyo3(signature = (peer, addr, len, tag = 0))]
    fn irecv(&self, py: Python<'_>, peer: usize, addr: u64, len: u64, tag: i64) -> PyResult<u64> {
        // SAFETY: as in `isend`.
        self.with(py, |c| unsafe { c.irecv(peer, addr, len, tag as u64) }.map(|id| id.0))
    }

    /// Starts receiving a message of `len` bytes and `tag` from whichever rank sends one first
    /// (`take_source` then names it).
    #[pyo3(signature = (addr, len, tag = 0))]
    fn irecv_any(&self, py: Python<'_>, addr: u64, len: u64, tag: i64) -> PyResult<u64> {
        // SAFETY: as in `isend`.
        self.with(py, |c| unsafe { c.irecv_any(addr, len, tag as u64) }.map(|id| id.0))
    }

    /// The rank whose message the receive from any rank `op_id` took (once it is bound; told
    /// once).
    fn take_source(&self, py: Python<'_>, op_id: u64) -> PyResult<Option<usize>> {
        self.with(py, |c| Ok(c.take_source(OpId(op_id))))
    }

    #[pyo3(signature = (op_id, what = "wait"))]
    fn wait(&self, py: Python<'_>, op_id: u64, what: &str) -> PyResult<()> {
        self.with(py, |c| c.wait(OpId(op_id), what))
    }

    fn test(&self, py: Python<'_>, op_id: u64) -> PyResult<bool> {
        self.with(py, |c| Ok(c.test(OpId(op_id))))
    }

    /// Bounds each wait for `isend`/`irecv` by `timeout_s` seconds (`None`: the group's).
    #[pyo3(signature = (timeout_s=None))]
    fn set_p2p_timeout(&self, py: Python<'_>, timeout_s: Option<f64>) -> PyResult<()> {
        let timeout = timeout_s.map(|t| secs("p2p timeout", t)).transpose()?;
        self.with(py, |c| {
            c.set_p2p_timeout(timeout);
            Ok(())
        })
    }

    /// The ranks whose processes are known to be gone (local, no communication).
    fn dead_ranks(&self, py: Python<'_>) -> PyResult<Vec<usize>> {
        self.with(py, |c| Ok(c.dead_ranks()))
    }

    /// Why the group became unusable, if an operation failed (local, no communication).
    fn failure(&self, py: Python<'_>) -> PyResult<Option<String>> {
        self.with(py, |c| Ok(c.failure().map(str::to_string)))
    }

    /// Releases the rings and the receive region (pending operations are dropped). Freeing
    /// the region waits for every process that mapped it to release it (at most the engine's
    /// stall deadline): with `background`, a thread of its own does it and the `Release`
    /// returned says when it ended, so that a stopped peer holds up nobody's next call.
    #[pyo3(signature = (background = false))]
    fn close(&self, py: Python<'_>, background: bool) -> Option<PyRelease> {
        close(py, "communicator", &self.comm, background, false, |_| {})
    }
}

/// One rank's CUDA path of a group (see `tidewire.distributed`): collectives launched on the
/// caller's stream over the ranks' NVLink-mapped buffers.
#[pyclass(frozen, module = "tidewire._native", name = "CudaCommunicator")]
pub(crate) struct PyCudaComm {
    comm: Mutex<Option<CudaComm>>,
}

impl PyCudaComm {
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&CudaComm) -> tidewire_collective::Result<T> + Send,
    ) -> PyResult<T> {
        with_live(py, &self.comm, |c| f(c))
    }
}

#[pymethods]
impl PyCudaComm {
    /// Allocates this rank's buffer on GPU `device` for a group of `ranks`: `(address,
    /// length)`.
    #[staticmethod]
    fn allocate(
        py: Python<'_>,
        engine: &PyEngine,
        device: u32,
        ranks: usize,
    ) -> PyResult<(u64, u64)> {
        let engine = engine.engine()?;
        py.detach(move || CudaComm::allocate(&engine, device, ranks)).map_err(to_py)
    }

    /// Maps every rank's buffer (`peers`: `(engine name, address, length)` in rank order) and
    /// loads the kernels; our buffer is freed with the communicator (or now, if this fails).
    /// `gate` (a 32-bit tensor on `cuda:device`, nonzero) and `stale` (a 32-bit tensor in
    /// pinned host memory) are kept for the process: the caller zeroes `gate` when it closes
    /// the path, and a launch replayed from a CUDA graph after that moves nothing and adds 1
    /// to `stale`.
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        engine: &PyEngine,
        rank: usize,
        device: u32,
        peers: Vec<(String, u64, u64)>,
        timeout_s: f64,
        gate: Bound<'_, PyAny>,
        stale: Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let engine: Arc<Engine> = engine.engine()?;
        let words = secs("timeout", timeout_s).and_then(|t| {
            let g = tensor_address(&gate, "the CUDA path's gate", 4, Home::Gpu(device))?;
            let s = tensor_address(&stale, "the group's stale-launch word", 4, Home::Pinned)?;
            Ok((t, g, s))
        });
        let (timeout, gate_at, stale_at) = or_free_ours(words, &engine, &peers, rank)?;
        // A graph captured on this path reads them at every replay.
        keep_for_process([gate.unbind(), stale.unbind()]);
        let peers: Vec<PeerBuffer> =
            peers.into_iter().map(|(name, addr, len)| PeerBuffer { name, addr, len }).collect();
        // The communicator owns our buffer (`peers[rank]`): freed with it, or by `connect`.
        // SAFETY: both words were checked (4 bytes at least, where the kernels reach them) and
        // their tensors are kept for the process.
        let comm = py.detach(|| unsafe {
            CudaComm::connect(
                engine,
                rank,
                device,
                &peers,
                timeout,
                Gate { gate: gate_at, stale: stale_at },
            )
        });
        Ok(Self { comm: Mutex::new(Some(comm.map_err(to_py)?)) })
    }

    /// The ranks no GPU path reaches, with the reason.
    fn unreached(&self, py: Python<'_>) -> PyResult<Vec<(usize, String)>> {
        self.with(py, |c| Ok(c.unreached()))
    }

    /// How each rank is reached.
    fn paths(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        self.with(py, |c| Ok(c.paths()))
    }

    /// Raises the failure a kernel recorded (naming the operation, the rank and why), if any.
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |c| c.failure().map_or(Ok(()), Err))
    }

    /// Moves segments on `stream` (see `CudaComm::exchange`), counted in the metrics as one
    /// call of `op` by `algorithm` (empty: a later step of a call already counted).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (stream, op, send_base, send, recv_base, recv, algorithm = "nvlink_direct"))]
    fn exchange(
        &self,
        py: Python<'_>,
        stream: u64,
        op: &str,
        send_base: u64,
        send: Vec<(u64, u64)>,
        recv_base: u64,
        recv: Vec<(u64, u64)>,
        algorithm: &str,
    ) -> PyResult<()> {
        let op = CudaOp::parse(op).map_err(to_py)?;
        // SAFETY: `tidewire.distributed` passes segments of contiguous CUDA tensors of this
        // GPU that it keeps referenced until the stream work is done (PyTorch's caching
        // allocator does not reuse memory before the stream work that used it completes).
        let n = send.iter().map(|s| s.1).sum();
        self.with(py, |c| {
            let out = unsafe { c.exchange(stream, op, send_base, &send, recv_base, &recv) };
            tidewire_collective::record(op.name(), algorithm, n, &out);
            out
        })
    }

    /// Sends and receives on `stream` in one launch (see `CudaComm::p2p`): `(rank, address,
    /// bytes, tag)` each; counted in the metrics as one `send/recv` call.
    fn p2p(
        &self,
        py: Python<'_>,
        stream: u64,
        sends: Vec<(usize, u64, u64, u64)>,
        recvs: Vec<(usize, u64, u64, u64)>,
    ) -> PyResult<()> {
        // SAFETY: `tidewire.distributed` passes contiguous CUDA tensors of this GPU that it
        // keeps referenced until the stream work is done, and messages whose peers make the
        // matching calls in the same order (torch's point-to-point contract).
        let n = sends.iter().map(|s| s.2).sum();
        self.with(py, |c| {
            let out = unsafe { c.p2p(stream, &sends, &recvs) };
            tidewire_collective::record(CudaOp::P2p.name(), "nvlink_p2p", n, &out);
            out
        })
    }

    /// Reduces on `stream` (see `CudaComm::reduce`), counted as for `exchange`.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (stream, op, send_base, send, recv_base, recv, dtype_, redop, algorithm = "nvlink_direct"))]
    fn reduce(
        &self,
        py: Python<'_>,
        stream: u64,
        op: &str,
        send_base: u64,
        send: Vec<(u64, u64)>,
        recv_base: u64,
        recv: Vec<(u64, u64)>,
        dtype_: &str,
        redop: &str,
        algorithm: &str,
    ) -> PyResult<()> {
        let op = CudaOp::parse(op).map_err(to_py)?;
        let (dt, rop) = (dtype(dtype_)?, reduce_op(redop)?);
        // SAFETY: as for `exchange`.
        let n = send.iter().map(|s| s.1).sum();
        self.with(py, |c| {
            let out = unsafe { c.reduce(stream, op, send_base, &send, recv_base, &recv, dt, rop) };
            tidewire_collective::record(op.name(), algorithm, n, &out);
            out
        })
    }

    /// Unmaps the peers and frees the buffer (after the stream work that uses it is done:
    /// the caller synchronizes first). The free waits as `Communicator.close`'s does, and
    /// `background` does it on a thread of its own the same way.
    #[pyo3(signature = (background = false))]
    fn close(&self, py: Python<'_>, background: bool) -> Option<PyRelease> {
        close(py, "CUDA communicator", &self.comm, background, true, |_| {})
    }

    /// Leaves the buffer allocated and the peers mapped for the rest of the process, the
    /// communicator closed (for a path whose gate could not be closed: a CUDA graph captured
    /// on it may still replay into them, which must not find them freed).
    fn abandon(&self, py: Python<'_>) {
        py.detach(|| {
            let taken = self.comm.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            // Deliberately never dropped: see above.
            std::mem::forget(taken);
        })
    }
}

/// One rank's elastic membership of a group (see `tidewire.mooncake.pg`): bound at creation,
/// started once every rank's address is known.
#[pyclass(frozen, module = "tidewire._native", name = "ElasticMember")]
pub(crate) struct PyElastic {
    addr: String,
    /// The engine's cluster secret, sealing every membership frame when one is in force.
    secret: Option<tidewire::ClusterSecret>,
    sock: Mutex<Option<std::net::UdpSocket>>,
    /// Shared with the calls that wait (`wait_view`, `collect`), which hold no lock meanwhile.
    member: Mutex<Option<Arc<Elastic>>>,
}

impl PyElastic {
    fn with<T>(&self, f: impl FnOnce(&Elastic) -> T) -> PyResult<T> {
        let e = self.live()?;
        Ok(f(&e))
    }

    /// The running member (a clone of its handle: no lock is held while it is used).
    fn live(&self) -> PyResult<Arc<Elastic>> {
        let g = self.member.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        g.clone().ok_or_else(|| {
            errors::invalid("elastic membership is not started (or was closed)".into())
        })
    }
}

#[pymethods]
impl PyElastic {
    /// Binds a UDP socket on `host`; the membership's frames are sealed with `engine`'s
    /// cluster secret, if it has one.
    #[new]
    fn new(engine: &PyEngine, host: &str) -> PyResult<Self> {
        let secret = engine.engine()?.config().cluster_secret.clone();
        let (sock, addr) = Elastic::bind(host).map_err(to_py)?;
        Ok(Self {
            addr: addr.to_string(),
            secret,
            sock: Mutex::new(Some(sock)),
            member: Mutex::new(None),
        })
    }

    /// The bound address (`ip:port`), to publish.
    #[getter]
    fn address(&self) -> String {
        self.addr.clone()
    }

    /// Starts rank `rank` of the slots whose addresses are `peers` (`""` for a slot not known
    /// yet), in group `group_id` and the view `(epoch, members)` (a joiner: a view without
    /// itself), with the timeouts in seconds; `evict`: whether a silent member is removed.
    #[allow(clippy::too_many_arguments)]
    fn start(
        &self,
        rank: usize,
        peers: Vec<String>,
        group_id: u64,
        epoch: u64,
        members: Vec<usize>,
        heartbeat_s: f64,
        eviction_s: f64,
        window_s: f64,
        phase_s: f64,
        evict: bool,
    ) -> PyResult<()> {
        let unknown = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
        let peers = peers
            .iter()
            .map(|p| match p.as_str() {
                "" => Ok(unknown),
                _ => p.parse().map_err(|e| errors::invalid(format!("address {p:?}: {e}"))),
            })
            .collect::<PyResult<Vec<std::net::SocketAddr>>>()?;
        let settings = ElasticSettings {
            heartbeat: secs("heartbeat", heartbeat_s)?,
            eviction: secs("eviction timeout", eviction_s)?,
            agreement: Settings {
                reconciliation_window: secs("reconciliation window", window_s)?,
                phase_timeout: secs("phase timeout", phase_s)?,
            },
            evict,
        };
        let sock = self
            .sock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .ok_or_else(|| errors::invalid("elastic membership was started already".into()))?;
        let view = View { epoch, members: members.into_iter().collect() };
        let e = Elastic::start(sock, rank, peers, group_id, view, settings, self.secret.clone())
            .map_err(to_py)?;
        *self.member.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(e));
        Ok(())
    }

    /// Writes the view into the caller's host mask (`len` int32 at `addr`) now and whenever it
    /// changes, from the membership's thread.
    fn watch_mask(&self, addr: u64, len: usize) -> PyResult<()> {
        if addr == 0 || !addr.is_multiple_of(4) {
            return Err(errors::invalid(format!("a mask at {addr:#x}: not an int32 array")));
        }
        // SAFETY: `tidewire.mooncake.pg` passes the data of a contiguous CPU int32 tensor of
        // `len` elements that the group holds (`_active_ranks`) until it closes this member.
        self.with(|e| unsafe { e.watch_mask(addr, len) })
    }

    /// The epoch in force here (read without a lock: every call into a group looks at it).
    fn epoch(&self) -> PyResult<u64> {
        self.with(Elastic::epoch)
    }

    /// `(epoch, members, fenced)` in force here.
    fn view(&self) -> PyResult<(u64, Vec<usize>, bool)> {
        self.with(|e| {
            let v = e.view();
            (v.epoch, v.members.into_iter().collect(), e.is_fenced())
        })
    }

    /// Whether this rank waits to be added (it was never in a view).
    fn is_joining(&self) -> PyResult<bool> {
        self.with(Elastic::is_joining)
    }

    /// Tells every slot that this rank waits to be added.
    fn set_ready(&self) -> PyResult<()> {
        self.with(Elastic::set_ready)
    }

    /// Each slot as this rank knows it: `(heard, ready)` (see the Rust `peer_states`).
    fn peer_states(&self) -> PyResult<Vec<(bool, bool)>> {
        self.with(Elastic::peer_states)
    }

    /// Evidence that `ranks` failed.
    fn suspect(&self, ranks: Vec<usize>) -> PyResult<()> {
        self.with(|e| e.suspect(&ranks))?.map_err(to_py)
    }

    /// Asks for a change of view.
    fn request(&self, remove: Vec<usize>, add: Vec<usize>) -> PyResult<()> {
        self.with(|e| e.request(&remove, &add))?.map_err(to_py)
    }

    /// Waits (at most `timeout_s`) for a view after `epoch`; returns `(epoch, members,
    /// fenced)` then in force.
    fn wait_view(
        &self,
        py: Python<'_>,
        epoch: u64,
        timeout_s: f64,
    ) -> PyResult<(u64, Vec<usize>, bool)> {
        let timeout = secs("timeout", timeout_s)?;
        let e = self.live()?;
        let (v, fenced) = py.detach(|| e.wait_view(epoch, timeout));
        Ok((v.epoch, v.members.into_iter().collect(), fenced))
    }

    /// Announces `value` (text) under `key` to the members of the view in force; with
    /// `epoch`, a value made for that view, refused (`ViewChanged`) if the view moved on.
    #[pyo3(signature = (key, value, epoch=None))]
    fn announce(&self, key: &str, value: &str, epoch: Option<u64>) -> PyResult<()> {
        self.with(|e| match epoch {
            Some(at) => e.announce_at(key, value.as_bytes(), at),
            None => e.announce(key, value.as_bytes()),
        })?
        .map_err(to_py)
    }

    /// Stops announcing `key` (its value's use failed here).
    fn withdraw(&self, key: &str) -> PyResult<()> {
        self.with(|e| e.withdraw(key))
    }

    /// What `ranks` announced under `key` at `epoch` (waits at most `timeout_s`).
    fn collect(
        &self,
        py: Python<'_>,
        key: &str,
        epoch: u64,
        ranks: Vec<usize>,
        timeout_s: f64,
    ) -> PyResult<Vec<String>> {
        let timeout = secs("timeout", timeout_s)?;
        let e = self.live()?;
        let got = py.detach(|| e.collect(key, epoch, &ranks, timeout)).map_err(to_py)?;
        Ok(got.into_iter().map(|v| String::from_utf8_lossy(&v).into_owned()).collect())
    }

    /// Stops the driver thread.
    fn close(&self, py: Python<'_>) {
        let taken = self.member.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        py.detach(move || drop(taken));
    }
}
