//! `tidewire._native.EpBuffer`: one rank's EP buffer, for `tidewire.ep.Buffer`.
//!
//! Tensors come as device addresses: `tidewire.ep` passes the data pointers of contiguous
//! tensors on the buffer's GPU, which it keeps alive with the returned handles and events
//! until the work on the caller's stream is done (PyTorch's caching allocator does not reuse
//! a tensor's memory before the stream work that used it completes).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use tidewire::metrics::{Metrics, Scrape};
use tidewire_ep::{Buffer, Call, CombineIo, DispatchOut, Layout, PeerBuffer};

use crate::errors;
use crate::{close, keep_for_process, or_free_ours, tensor_address, Home, PyEngine, PyRelease};

fn to_py(e: tidewire_ep::Error) -> PyErr {
    let msg = e.to_string();
    match e {
        tidewire_ep::Error::Shape(_) => errors::InvalidArgument::new_err(msg),
        tidewire_ep::Error::Gpu { .. } => errors::GpuError::new_err(msg),
        tidewire_ep::Error::Engine { source, .. } => {
            let err = errors::to_py(source);
            Python::attach(|py| {
                let _ = err.value(py).setattr("args", (msg,));
            });
            err
        }
        _ => errors::TidewireError::new_err(msg),
    }
}

/// One rank's EP buffer (see `tidewire.ep`).
#[pyclass(frozen, module = "tidewire._native", name = "EpBuffer")]
pub(crate) struct PyEpBuffer {
    buf: Mutex<Option<Buffer>>,
}

impl PyEpBuffer {
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Buffer) -> tidewire_ep::Result<T> + Send,
    ) -> PyResult<T> {
        py.detach(|| {
            let mut g = self.buf.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match g.as_mut() {
                Some(b) => f(b),
                None => Err(tidewire_ep::Error::Shape("the buffer was destroyed".into())),
            }
        })
        .map_err(to_py)
    }
}

/// A call's shape: `(max_tokens, hidden, ranks, experts, seq_at, num_tokens, topk,
/// timeout_ns, fp8)`, `seq_at` the device word holding the call's number.
type Shape = (usize, usize, usize, usize, u64, usize, usize, i64, bool);

/// A dispatch's outputs as `tidewire.ep` passes them: `(recv_x, scales, src_info,
/// layout_range, recv_count)`.
fn dispatch_out(o: (u64, u64, u64, u64, u64)) -> DispatchOut {
    let (recv_x, scales, src_info, layout_range, recv_count) = o;
    DispatchOut { recv_x, scales, src_info, layout_range, recv_count }
}

/// A combine's tensors as `tidewire.ep` passes them: `(y, src_info, layout_range, topk,
/// weights, out)`.
fn combine_io(io: (u64, u64, u64, u64, u64, u64)) -> CombineIo {
    let (y, src_info, layout_range, topk, weights, out) = io;
    CombineIo { y, src_info, layout_range, topk, weights, out }
}

fn call(s: Shape) -> PyResult<Call> {
    let (t, h, r, e, seq_at, num_tokens, topk, timeout_ns, fp8) = s;
    let layout = Layout::new(t, h, r, e).map_err(to_py)?;
    Ok(Call { layout, seq_at, num_tokens, topk, timeout_ns, fp8 })
}

#[pymethods]
impl PyEpBuffer {
    /// `get_ep_buffer_size_hint(T, H, R, E)`.
    #[staticmethod]
    fn size_hint(max_tokens: usize, hidden: usize, ranks: usize, experts: usize) -> PyResult<u64> {
        tidewire_ep::size_hint(max_tokens, hidden, ranks, experts).map_err(to_py)
    }

    /// Allocates a zeroed buffer of `bytes` on GPU `device`; returns `(address, length)`.
    #[staticmethod]
    fn allocate(
        py: Python<'_>,
        engine: &PyEngine,
        device: u32,
        bytes: u64,
    ) -> PyResult<(u64, u64)> {
        let engine = engine.engine()?;
        py.detach(move || Buffer::allocate(&engine, device, bytes)).map_err(to_py)
    }

    /// Bytes of the device table a buffer's kernels read every rank's buffer from.
    #[staticmethod]
    fn table_bytes() -> u64 {
        tidewire_gpu::ep::TABLE_BYTES
    }

    /// Maps every rank's buffer (`peers[r] = (engine name, address, length)`) for our GPU and
    /// writes them into `table` (a tensor of `table_bytes()` on `device`, kept for the
    /// process).
    #[new]
    fn new(
        py: Python<'_>,
        engine: &PyEngine,
        rank: usize,
        device: u32,
        peers: Vec<(String, u64, u64)>,
        table: Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let engine = engine.engine()?;
        let checked = tensor_address(
            &table,
            "the EP table",
            tidewire_gpu::ep::TABLE_BYTES,
            Home::Gpu(device),
        );
        let addr = or_free_ours(checked, &engine, &peers, rank)?;
        // A graph captured on this buffer reads it at every replay (zeroed as the buffer goes).
        keep_for_process([table.unbind()]);
        let peers: Vec<PeerBuffer> =
            peers.into_iter().map(|(name, addr, len)| PeerBuffer { name, addr, len }).collect();
        // SAFETY: the tensor holds `TABLE_BYTES` on `device` (checked) and is kept for the
        // process; `tidewire.ep` writes it nowhere else.
        let buf = py
            .detach(move || unsafe { Buffer::connect(engine, rank, device, &peers, addr) })
            .map_err(to_py)?;
        Ok(Self { buf: Mutex::new(Some(buf)) })
    }

    /// Per source rank, how often a kernel's wait marked it inactive (deadline passed or
    /// process died) since the buffer was made; read without waiting for the GPU.
    fn marks(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        self.with(py, |b| Ok(b.marks()))
    }

    /// Per source rank, how many of those marks were for a call of another shape (tokens per
    /// rank, hidden size, experts or fp8 differ from this rank's).
    fn shape_marks(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        self.with(py, |b| Ok(b.shape_marks()))
    }

    /// The ranks no GPU path reaches: `(rank, reason)`.
    fn unreached(&self, py: Python<'_>) -> PyResult<Vec<(usize, String)>> {
        self.with(py, |b| Ok(b.unreached()))
    }

    /// How each rank is reached.
    fn paths(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        self.with(py, |b| Ok(b.paths()))
    }

    /// A whole dispatch on `stream`: numbers it (`counter` into `shape`'s `seq_at`), the send
    /// phase, and the receive phase unless `recv_now` is false (the caller's hook launches it).
    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &self,
        py: Python<'_>,
        stream: u64,
        shape: Shape,
        counter: u64,
        x: u64,
        topk: u64,
        active: u64,
        out: (u64, u64, u64, u64, u64),
        recv_now: bool,
    ) -> PyResult<()> {
        let c = call(shape)?;
        let out = dispatch_out(out);
        // SAFETY: `tidewire.ep` passes live contiguous tensors of the documented shapes on the
        // buffer's GPU (the counter and sequence words its own), kept alive until the stream
        // work completes.
        count_ep("dispatch");
        self.with(py, |b| unsafe {
            b.dispatch(stream, &c, counter, x, topk, active, out, recv_now)
        })
    }

    /// The receive phase of a dispatch made with `recv_now` false (its hook), with the same
    /// shape and outputs.
    fn dispatch_recv(
        &self,
        py: Python<'_>,
        stream: u64,
        shape: Shape,
        out: (u64, u64, u64, u64, u64),
        active: u64,
    ) -> PyResult<()> {
        let c = call(shape)?;
        // SAFETY: as in `dispatch`.
        self.with(py, |b| unsafe { b.dispatch_recv(stream, &c, dispatch_out(out), active) })
    }

    /// A whole combine on `stream`: the send phase, and the receive phase unless `recv_now`
    /// is false (the caller's hook launches it). `io = (y, src_info, layout_range, topk,
    /// weights, out)`.
    fn combine(
        &self,
        py: Python<'_>,
        stream: u64,
        shape: Shape,
        io: (u64, u64, u64, u64, u64, u64),
        active: u64,
        recv_now: bool,
    ) -> PyResult<()> {
        let c = call(shape)?;
        let io = combine_io(io);
        // SAFETY: as in `dispatch`.
        count_ep("combine");
        self.with(py, |b| unsafe { b.combine(stream, &c, io, active, recv_now) })
    }

    /// The receive phase of a combine made with `recv_now` false (its hook), with the same
    /// shape and tensors.
    fn combine_recv(
        &self,
        py: Python<'_>,
        stream: u64,
        shape: Shape,
        io: (u64, u64, u64, u64, u64, u64),
        active: u64,
    ) -> PyResult<()> {
        let c = call(shape)?;
        // SAFETY: as in `dispatch`.
        self.with(py, |b| unsafe { b.combine_recv(stream, &c, combine_io(io), active) })
    }

    /// Unmaps the peers and frees the buffer (after the caller's stream work is done). The
    /// free waits for every process that mapped the buffer to release it (at most the
    /// engine's stall deadline; left allocated after that): with `background`, a thread of
    /// its own does it all, so that a stopped peer holds up nobody's next exchange.
    #[pyo3(signature = (background = false))]
    fn close(&self, py: Python<'_>, background: bool) -> Option<PyRelease> {
        close(py, "EP buffer", &self.buf, background, true, Buffer::retire)
    }
}

/// Counts an EP call in the process's metrics, when they are recorded.
/// The EP metrics of a buffer on the collective fallback (`tidewire.ep`; no kernels, so no
/// host-mapped marks): its calls, the source ranks its calls found failed (counted as timeouts:
/// dead, or silent past the group's timeout) and, while it lives, the ranks its caller's mask
/// holds active (the `ep_active_ranks` gauge of its rank).
#[pyclass(frozen, module = "tidewire._native", name = "EpFallbackMetrics")]
pub(crate) struct PyEpFallbackMetrics {
    watch: Arc<FallbackWatch>,
}

struct FallbackWatch {
    rank: usize,
    active: AtomicI64,
}

impl Scrape for FallbackWatch {
    fn scrape(&self, m: &Metrics) {
        let l = [("rank", self.rank.to_string())];
        m.ep_active_ranks.get_or_create(&l).set(self.active.load(Ordering::Relaxed));
    }
}

#[pymethods]
impl PyEpFallbackMetrics {
    /// For the buffer of `rank`, with `active` ranks to begin with.
    #[new]
    fn new(rank: usize, active: usize) -> Self {
        let watch = Arc::new(FallbackWatch { rank, active: AtomicI64::new(active as i64) });
        let w: Arc<dyn Scrape> = watch.clone();
        tidewire::metrics::watch(Arc::downgrade(&w));
        Self { watch }
    }

    /// One call (`op`: dispatch or combine), the ranks it found failed, and the ranks the
    /// caller's mask holds active after it.
    fn counted(&self, op: &str, failed: Vec<usize>, active: usize) -> PyResult<()> {
        let op = match op {
            "dispatch" => "dispatch",
            "combine" => "combine",
            other => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "an EP call is a dispatch or a combine, not {other:?}"
                )))
            }
        };
        count_ep(op);
        if let Some(m) = tidewire::metrics::get() {
            for r in failed {
                m.ep_rank_timeouts.get_or_create(&[("source_rank", r.to_string())]).inc();
            }
        }
        self.watch.active.store(active as i64, Ordering::Relaxed);
        Ok(())
    }
}

fn count_ep(op: &'static str) {
    if let Some(m) = tidewire::metrics::get() {
        m.ep_calls.get_or_create(&[("op", op.to_string())]).inc();
    }
}
