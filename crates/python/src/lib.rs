//! tidewire-py: the PyO3 bindings, Python module `tidewire._native`.
//!
//! Every `#[pyclass]` lives here; the engine crates never depend on PyO3. The public Python
//! API is the `tidewire` package, which wraps this module. Every blocking call extracts and
//! owns its arguments, releases the GIL, and maps errors through [`errors::to_py`].
#![allow(unsafe_code)]

mod arrays;
pub mod capi;
mod collective;
mod ep;
mod errors;

use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tidewire::{
    BatchHandle, BatchOptions, Engine, EngineConfig, MetadataUri, Op, PageTransfer, PeerId,
    PeerState, Request, RequestStatus,
};

use arrays::{MemoryObject, U64Array};
use errors::to_py;

/// Runs `f` without the GIL (it must not touch Python objects).
fn detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> tidewire::Result<T> + Send,
) -> PyResult<T> {
    py.detach(f).map_err(to_py)
}

fn parse_op(op: &str) -> PyResult<Op> {
    match op.to_ascii_lowercase().as_str() {
        "write" | "w" => Ok(Op::Write),
        "read" | "r" => Ok(Op::Read),
        _ => Err(errors::invalid(format!("op must be \"read\" or \"write\", not {op:?}"))),
    }
}

/// One row of `Engine.peers()`: name, instance, state, reason, mappings held.
type PeerRow = (String, String, &'static str, Option<String>, usize);

/// Seconds given from Python, as a duration: negative, NaN or out of range is the caller's
/// error (`Duration::from_secs_f64` would panic).
fn seconds(what: &str, s: Option<f64>) -> PyResult<Option<Duration>> {
    s.map(|t| secs(what, t)).transpose()
}

/// `s` seconds as a duration; an invalid argument naming `what` for a negative or unbounded
/// number.
pub(crate) fn secs(what: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s).map_err(|e| errors::invalid(format!("{what} {s}: {e}")))
}

/// Objects kernels may read at any time for the rest of the process (a CUDA graph captured on
/// them may replay whenever its owner likes): never dropped.
static KEPT: std::sync::Mutex<Vec<Py<PyAny>>> = std::sync::Mutex::new(Vec::new());

/// Keeps `objects` for the process (see [`KEPT`]).
pub(crate) fn keep_for_process(objects: impl IntoIterator<Item = Py<PyAny>>) {
    KEPT.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(objects);
}

/// Our own buffer (`peers[rank]`, an allocation of `engine`) freed when `checked` failed:
/// the caller's until a native object owns it.
pub(crate) fn or_free_ours<T>(
    checked: PyResult<T>,
    engine: &Engine,
    peers: &[(String, u64, u64)],
    rank: usize,
) -> PyResult<T> {
    if checked.is_err() {
        if let Some(mine) = peers.get(rank) {
            let _ = engine.free_device(mine.1);
        }
    }
    checked
}

/// Takes a native object out of `slot` (waiting, without the GIL, for a call that holds it)
/// and drops it here, or with `background` on a thread of its own after `retire` (`gpu`: it
/// holds GPU memory, released in CUDA's relaxed capture mode).
pub(crate) fn close<T: Send + 'static>(
    py: Python<'_>,
    what: &str,
    slot: &std::sync::Mutex<Option<T>>,
    background: bool,
    gpu: bool,
    retire: fn(&mut T),
) -> Option<PyRelease> {
    py.detach(|| {
        let value = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        match value {
            Some(mut v) if background => {
                retire(&mut v);
                Some(PyRelease::start(what, v, gpu))
            }
            v => {
                drop(v);
                None
            }
        }
    })
}

/// A native object being released on a thread of its own (`close(background=True)`).
#[pyclass(frozen, module = "tidewire._native", name = "Release")]
pub(crate) struct PyRelease {
    what: String,
    /// Disconnected once the thread dropped what it releases (or never started: then the
    /// caller dropped it).
    done: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl PyRelease {
    fn start<T: Send + 'static>(what: &str, value: T, gpu: bool) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new().name("tw-release".into()).spawn(move || {
            if gpu {
                // Its frees may come while the caller captures a CUDA graph.
                tidewire_gpu::alloc::relax_capture_mode();
            }
            drop(value);
            drop(tx);
        });
        if let Err(e) = spawned {
            // The closure, and `value` with it, was dropped here: released by the caller.
            log::warn!("{what}: no thread to release it ({e}): released by the caller");
        }
        Self { what: what.to_string(), done: std::sync::Mutex::new(rx) }
    }
}

#[pymethods]
impl PyRelease {
    /// Waits up to `timeout_s` for the release to end: whether it did.
    fn wait(&self, py: Python<'_>, timeout_s: f64) -> PyResult<bool> {
        let timeout = secs("timeout", timeout_s)?;
        Ok(py.detach(|| {
            let rx = self.done.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            !matches!(rx.recv_timeout(timeout), Err(std::sync::mpsc::RecvTimeoutError::Timeout))
        }))
    }

    fn __repr__(&self) -> String {
        format!("<Release of a {}>", self.what)
    }
}

/// Where a tensor that kernels read or write must live.
pub(crate) enum Home {
    /// On `cuda:N`.
    Gpu(u32),
    /// In pinned host memory (which every GPU reaches at the same address).
    Pinned,
}

/// The address of the torch tensor `t` (`what`, in errors): contiguous, `min_bytes` at least,
/// where `home` says.
pub(crate) fn tensor_address(
    t: &Bound<'_, PyAny>,
    what: &str,
    min_bytes: u64,
    home: Home,
) -> PyResult<u64> {
    let bytes: u64 = t.getattr("nbytes")?.extract()?;
    let contiguous: bool = t.call_method0("is_contiguous")?.extract()?;
    let (there, want) = match home {
        Home::Gpu(device) => {
            let on: i64 = t.getattr("device")?.getattr("index")?.extract().unwrap_or(-1);
            (on == i64::from(device), format!("on cuda:{device}"))
        }
        Home::Pinned => (t.call_method0("is_pinned")?.extract()?, "in pinned host memory".into()),
    };
    if bytes < min_bytes || !there || !contiguous {
        let device = t.getattr("device")?.str()?.to_string();
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "{what} must be a contiguous tensor of at least {min_bytes} bytes {want}, not {bytes} \
             bytes on {device} (contiguous: {contiguous})"
        )));
    }
    t.call_method0("data_ptr")?.extract()
}

/// A transfer engine (one per process, or several in tests).
#[pyclass(frozen, module = "tidewire._native", name = "Engine")]
pub(crate) struct PyEngine {
    engine: std::mem::ManuallyDrop<Arc<Engine>>,
    /// The process that created the engine. A forked child has none of its threads: it must
    /// neither use nor shut down (join) the engine.
    pid: u32,
}

impl PyEngine {
    pub(crate) fn engine(&self) -> PyResult<Arc<Engine>> {
        if std::process::id() != self.pid {
            return Err(errors::TidewireError::new_err(
                "this engine was created in another process (before a fork); create a new Engine in this process",
            ));
        }
        Ok(Arc::clone(&self.engine))
    }
}

impl Drop for PyEngine {
    fn drop(&mut self) {
        if std::process::id() == self.pid {
            // SAFETY: `engine` is never used again after this point.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.engine) };
        }
        // In a forked child the engine's threads do not exist: leak it rather than join them.
    }
}

impl PyEngine {
    /// The requests of descriptor arrays (the peer opened by name).
    fn requests(
        &self,
        py: Python<'_>,
        peer: &str,
        op: &str,
        local: &U64Array,
        remote: &U64Array,
        lengths: &U64Array,
    ) -> PyResult<Vec<Request>> {
        let op = parse_op(op)?;
        let n = local.len();
        if remote.len() != n || !(lengths.len() == n || lengths.is_scalar()) {
            return Err(errors::invalid(format!(
                "descriptor arrays differ in length: local {n}, remote {}, lengths {}",
                remote.len(),
                lengths.len()
            )));
        }
        let engine = self.engine()?;
        let peer = peer.to_string();
        let peer_id = detached(py, move || engine.open_segment(&peer))?;
        let mut reqs = Vec::with_capacity(n);
        for i in 0..n {
            reqs.push(Request {
                op,
                local: local.get(i)?,
                len: lengths.get(i)?,
                peer: peer_id,
                remote: remote.get(i)?,
            });
        }
        Ok(reqs)
    }
}

#[pymethods]
impl PyEngine {
    /// Starts an engine. `metadata` is "p2p" (default) or "http://host:port/metadata".
    /// `transports` limits the transports ("tcp", "shm", "local"); `force_tcp` forces TCP.
    /// The `MC_*` environment variables apply on top. `cluster_secret` (bytes or str) or
    /// `cluster_secret_file` (a path) sets the secret every connection must prove, in place
    /// of `TIDEWIRE_CLUSTER_SECRET` / `TIDEWIRE_CLUSTER_SECRET_FILE`.
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (host="127.0.0.1", port=None, metadata="p2p", name=None, transports=None, force_tcp=false, tcp_lanes=4, cluster_secret=None, cluster_secret_file=None))]
    fn new(
        py: Python<'_>,
        host: &str,
        port: Option<u16>,
        metadata: &str,
        name: Option<String>,
        transports: Option<Vec<String>>,
        force_tcp: bool,
        tcp_lanes: usize,
        cluster_secret: Option<Vec<u8>>,
        cluster_secret_file: Option<String>,
    ) -> PyResult<Self> {
        let mut cfg = EngineConfig {
            host: host.to_string(),
            port,
            name,
            metadata: MetadataUri::parse(metadata).map_err(to_py)?,
            tcp_lanes,
            ..EngineConfig::default()
        }
        .from_env()
        .map_err(to_py)?;
        if let Some(list) = transports {
            let mut enabled = std::collections::BTreeSet::new();
            for t in &list {
                let kind = tidewire::core::select::TransportKind::parse(t)
                    .ok_or_else(|| errors::invalid(format!("unknown transport {t:?}")))?;
                enabled.insert(kind);
            }
            cfg.transports.enabled = enabled;
        }
        cfg.transports.force_tcp |= force_tcp;
        match (cluster_secret, cluster_secret_file) {
            (Some(_), Some(_)) => {
                return Err(errors::invalid(
                    "give cluster_secret or cluster_secret_file, not both".to_string(),
                ))
            }
            (Some(s), None) => {
                let secret = tidewire::ClusterSecret::new(&s)
                    .map_err(|e| errors::invalid(format!("cluster_secret: {e}")))?;
                cfg.cluster_secret = Some(secret);
            }
            (None, Some(path)) => {
                cfg.cluster_secret = Some(tidewire::secret_from_file(&path).map_err(to_py)?)
            }
            (None, None) => {}
        }
        let engine = detached(py, || Engine::new(cfg))?;
        Ok(Self { engine: std::mem::ManuallyDrop::new(Arc::new(engine)), pid: std::process::id() })
    }

    /// The segment name peers open this engine by (`host:port` in p2p mode).
    #[getter]
    fn name(&self) -> PyResult<String> {
        Ok(self.engine()?.name().to_string())
    }

    /// The fingerprint of the cluster secret in force, or None (no secret).
    #[getter]
    fn cluster_secret_fingerprint(&self) -> PyResult<Option<String>> {
        Ok(self.engine()?.cluster_secret_fingerprint())
    }

    /// Connections this engine refused (no or another cluster secret, another uid).
    #[getter]
    fn refused_connections(&self) -> PyResult<u64> {
        Ok(self.engine()?.refused_connections())
    }

    /// The bound RPC port.
    #[getter]
    fn rpc_port(&self) -> PyResult<u16> {
        Ok(self.engine()?.rpc_addr().port())
    }

    /// The bound RPC address (`ip:port`).
    #[getter]
    fn rpc_addr(&self) -> PyResult<String> {
        Ok(self.engine()?.rpc_addr().to_string())
    }

    /// This engine's descriptor as JSON.
    fn descriptor(&self) -> PyResult<String> {
        Ok(String::from_utf8_lossy(&self.engine()?.descriptor().to_json()).into_owned())
    }

    /// Registers raw memory `[addr, addr+length)`. The caller keeps it alive until
    /// `unregister` returns (prefer `register_object`).
    #[pyo3(signature = (addr, length, location="*"))]
    fn register(&self, py: Python<'_>, addr: u64, length: u64, location: &str) -> PyResult<u64> {
        let engine = self.engine()?;
        let location = location.to_string();
        // SAFETY: the Python caller vouches for the range (documented contract of this raw
        // form, as for Mooncake's register_memory).
        detached(py, move || unsafe { engine.register(addr, length, &location) }).map(|id| id.0)
    }

    /// Registers several raw ranges, all or none.
    #[pyo3(signature = (addrs, lengths, location="*"))]
    fn register_batch(
        &self,
        py: Python<'_>,
        addrs: U64Array,
        lengths: U64Array,
        location: &str,
    ) -> PyResult<Vec<u64>> {
        let n = addrs.len();
        let ranges: Vec<(u64, u64)> =
            (0..n).map(|i| Ok((addrs.get(i)?, lengths.get(i)?))).collect::<PyResult<_>>()?;
        let engine = self.engine()?;
        let location = location.to_string();
        // SAFETY: as for `register`.
        let ids = detached(py, move || unsafe { engine.register_batch(&ranges, &location) })?;
        Ok(ids.into_iter().map(|id| id.0).collect())
    }

    /// Registers the memory of an array: `__array_interface__` (numpy),
    /// `__cuda_array_interface__` or `__dlpack__` (CPU or GPU). The pointer decides the memory
    /// kind. The object is kept alive while registered. Returns `(addr, length)`.
    #[pyo3(signature = (obj, location="*"))]
    fn register_object(
        &self,
        py: Python<'_>,
        obj: MemoryObject,
        location: &str,
    ) -> PyResult<(u64, u64)> {
        if obj.cuda.is_some() {
            if let Err(u) = tidewire_gpu::topology() {
                return Err(errors::invalid(format!("CUDA memory cannot be registered: GPU {u}")));
            }
        }
        let hint = match (location, obj.cuda) {
            ("*" | "", Some(Some(dev))) => format!("cuda:{dev}"),
            _ => location.to_string(),
        };
        let (addr, len) = (obj.addr, obj.len);
        let owner: Arc<dyn Send + Sync> = Arc::new(obj.owner);
        let engine = self.engine()?;
        // SAFETY: `obj` exposes `len` writable bytes at `addr` (checked by `MemoryObject`) and
        // stays alive because the registry holds `owner` until unregistration.
        detached(py, move || unsafe { engine.register_with_owner(addr, len, &hint, owner) })?;
        Ok((addr, len))
    }

    /// Unregisters the region starting at `addr`; returns when no transfer touches it.
    fn unregister(&self, py: Python<'_>, addr: u64) -> PyResult<()> {
        let engine = self.engine()?;
        detached(py, move || engine.unregister(addr))
    }

    fn unregister_batch(&self, py: Python<'_>, addrs: U64Array) -> PyResult<()> {
        let addrs: Vec<u64> = (0..addrs.len()).map(|i| addrs.get(i)).collect::<PyResult<_>>()?;
        let engine = self.engine()?;
        detached(py, move || engine.unregister_batch(&addrs))
    }

    /// Allocates and registers `length` bytes of shareable host memory; returns its address.
    fn allocate_shared(&self, py: Python<'_>, length: u64) -> PyResult<u64> {
        let engine = self.engine()?;
        detached(py, move || engine.allocate_shared(length))
    }

    fn free_shared(&self, py: Python<'_>, addr: u64) -> PyResult<()> {
        let engine = self.engine()?;
        detached(py, move || engine.free_shared(addr))
    }

    /// Frees GPU memory this engine allocated (an EP or collective buffer whose group never
    /// formed).
    fn free_device(&self, py: Python<'_>, addr: u64) -> PyResult<()> {
        let engine = self.engine()?;
        detached(py, move || engine.free_device(addr))
    }

    /// Copies `data` into registered memory of this engine at `addr`.
    fn write_local(&self, addr: u64, data: &[u8]) -> PyResult<()> {
        self.engine()?.write_local(addr, data).map_err(to_py)
    }

    /// Reads `length` bytes of registered memory of this engine at `addr`.
    fn read_local<'py>(
        &self,
        py: Python<'py>,
        addr: u64,
        length: u64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let v = self.engine()?.read_local(addr, length).map_err(to_py)?;
        Ok(PyBytes::new(py, &v))
    }

    /// The first registered region of this engine as `(addr, length)`, or None.
    fn first_region(&self) -> PyResult<Option<(u64, u64)>> {
        Ok(self.engine()?.first_region())
    }

    /// Opens a peer segment (fetching its descriptor) and returns its descriptor as JSON.
    fn peer_descriptor(&self, py: Python<'_>, peer: &str) -> PyResult<String> {
        let engine = self.engine()?;
        let peer = peer.to_string();
        let d = detached(py, move || {
            let id = engine.open_segment(&peer)?;
            engine.peer_descriptor(id)
        })?;
        Ok(String::from_utf8_lossy(&d.to_json()).into_owned())
    }

    /// Submits a batch to `peer`: request i moves `lengths[i]` bytes between local `local[i]`
    /// and remote `remote[i]`. The arrays are lists of ints, numpy arrays or DLPack tensors of
    /// 64-bit integers; `lengths` may be one int for all.
    /// GPU copies start after the work already queued on `stream` (a `CUstream` as an int,
    /// e.g. `torch.cuda.current_stream().cuda_stream`), ordered by an event, not a host sync.
    /// `complete_on` (a CUstream): that stream waits for the batch's GPU copies, so work
    /// queued on it afterwards sees every byte, with no host round trip.
    #[pyo3(signature = (peer, op, local, remote, lengths, notify=None, timeout=None, stream=None, complete_on=None))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        peer: &str,
        op: &str,
        local: U64Array,
        remote: U64Array,
        lengths: U64Array,
        notify: Option<(String, String)>,
        timeout: Option<f64>,
        stream: Option<u64>,
        complete_on: Option<u64>,
    ) -> PyResult<PyBatch> {
        let reqs = self.requests(py, peer, op, &local, &remote, &lengths)?;
        let timeout = seconds("timeout", timeout)?;
        let opts = BatchOptions { notify, timeout, stream, complete_on };
        let engine = self.engine()?;
        let handle = detached(py, move || engine.submit(&reqs, opts))?;
        Ok(PyBatch { handle })
    }

    /// Registers the paged layout `name`: page arrays at `layers` (base addresses), `pages`
    /// pages of `page_size` bytes each, inside registered memory; peers find it by name.
    fn register_layout(
        &self,
        py: Python<'_>,
        name: &str,
        layers: U64Array,
        pages: u64,
        page_size: u64,
    ) -> PyResult<()> {
        let (engine, name, layers) = (self.engine()?, name.to_string(), layers.to_vec()?);
        detached(py, move || engine.register_layout(&name, &layers, pages, page_size))
    }

    fn unregister_layout(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        let (engine, name) = (self.engine()?, name.to_string());
        detached(py, move || engine.unregister_layout(&name))
    }

    /// Moves `local_pages[i]` of this engine's layout `local_layout` to or from
    /// `remote_pages[i]` of the peer's layout `remote_layout`, every layer, consecutive pages
    /// as one request; returns the batch.
    #[pyo3(signature = (peer, op, local_layout, remote_layout, local_pages, remote_pages, timeout=None, stream=None, complete_on=None))]
    #[allow(clippy::too_many_arguments)]
    fn transfer_pages(
        &self,
        py: Python<'_>,
        peer: &str,
        op: &str,
        local_layout: &str,
        remote_layout: &str,
        local_pages: U64Array,
        remote_pages: U64Array,
        timeout: Option<f64>,
        stream: Option<u64>,
        complete_on: Option<u64>,
    ) -> PyResult<PyBatch> {
        let pages = OwnedPages::new(op, local_layout, remote_layout, &local_pages, &remote_pages)?;
        let (engine, peer) = (self.engine()?, peer.to_string());
        let timeout = seconds("timeout", timeout)?;
        let opts = BatchOptions { notify: None, timeout, stream, complete_on };
        let handle = detached(py, move || {
            let id = engine.open_segment(&peer)?;
            engine.transfer_pages(&pages.of(id), opts)
        })?;
        Ok(PyBatch { handle })
    }

    /// Plans a batch of descriptors once, for `execute` (same arguments as `submit`).
    fn prepare(
        &self,
        py: Python<'_>,
        peer: &str,
        op: &str,
        local: U64Array,
        remote: U64Array,
        lengths: U64Array,
    ) -> PyResult<PyPlan> {
        let reqs = self.requests(py, peer, op, &local, &remote, &lengths)?;
        let engine = self.engine()?;
        let plan = detached(py, move || engine.prepare(&reqs))?;
        Ok(PyPlan { plan: Arc::new(plan) })
    }

    /// Plans a page transfer once, for `execute` (same arguments as `transfer_pages`).
    #[allow(clippy::too_many_arguments)]
    fn prepare_pages(
        &self,
        py: Python<'_>,
        peer: &str,
        op: &str,
        local_layout: &str,
        remote_layout: &str,
        local_pages: U64Array,
        remote_pages: U64Array,
    ) -> PyResult<PyPlan> {
        let pages = OwnedPages::new(op, local_layout, remote_layout, &local_pages, &remote_pages)?;
        let (engine, peer) = (self.engine()?, peer.to_string());
        let plan = detached(py, move || {
            let id = engine.open_segment(&peer)?;
            engine.prepare_pages(&pages.of(id))
        })?;
        Ok(PyPlan { plan: Arc::new(plan) })
    }

    /// Runs a prepared plan as one batch.
    #[pyo3(signature = (plan, notify=None, timeout=None, stream=None, complete_on=None))]
    fn execute(
        &self,
        py: Python<'_>,
        plan: &PyPlan,
        notify: Option<(String, String)>,
        timeout: Option<f64>,
        stream: Option<u64>,
        complete_on: Option<u64>,
    ) -> PyResult<PyBatch> {
        let (engine, plan) = (self.engine()?, plan.plan.clone());
        let timeout = seconds("timeout", timeout)?;
        let opts = BatchOptions { notify, timeout, stream, complete_on };
        let handle = detached(py, move || engine.execute(&plan, opts))?;
        Ok(PyBatch { handle })
    }

    /// Notifications received so far, oldest first, as `(from, name, message)`.
    fn take_notifications(&self) -> PyResult<Vec<(String, String, String)>> {
        Ok(self
            .engine()?
            .take_notifications()
            .into_iter()
            .map(|n| (n.from, n.name, n.message))
            .collect())
    }

    /// Checks a peer answers; returns the round trip in seconds.
    fn probe(&self, py: Python<'_>, peer: &str) -> PyResult<f64> {
        let engine = self.engine()?;
        let peer = peer.to_string();
        detached(py, move || {
            let id = engine.open_segment(&peer)?;
            engine.probe(id)
        })
        .map(|d| d.as_secs_f64())
    }

    /// Every peer opened by name: `(name, instance, state, reason, mappings)`, where state
    /// is "open" or "retired" (with the reason), and mappings counts the mappings of the
    /// peer's memory this process still holds.
    fn peers(&self) -> PyResult<Vec<PeerRow>> {
        Ok(self
            .engine()?
            .peers()
            .into_iter()
            .map(|p| {
                let (state, reason) = match p.state {
                    PeerState::Open => ("open", None),
                    PeerState::Retired(e) => ("retired", Some(e.to_string())),
                };
                (p.name, p.instance.to_string(), state, reason, p.mappings)
            })
            .collect())
    }

    /// Whether the shm transport serves, and why not: `(True, "")` or `(False, reason)`.
    fn shm_status(&self) -> PyResult<(bool, String)> {
        Ok(match self.engine()?.shm_status() {
            Ok(()) => (true, String::new()),
            Err(r) => (false, r),
        })
    }

    /// Unpublishes, fails in-flight requests, joins threads. Idempotent.
    fn shutdown(&self, py: Python<'_>) -> PyResult<()> {
        let engine = self.engine()?;
        detached(py, move || {
            engine.shutdown();
            Ok(())
        })
    }
}

/// The arguments of a page transfer, owned (to cross into a call without the GIL).
struct OwnedPages {
    op: Op,
    local: String,
    remote: String,
    local_pages: Vec<u64>,
    remote_pages: Vec<u64>,
}

impl OwnedPages {
    fn new(op: &str, local: &str, remote: &str, lp: &U64Array, rp: &U64Array) -> PyResult<Self> {
        Ok(Self {
            op: parse_op(op)?,
            local: local.into(),
            remote: remote.into(),
            local_pages: lp.to_vec()?,
            remote_pages: rp.to_vec()?,
        })
    }

    fn of(&self, peer: PeerId) -> PageTransfer<'_> {
        PageTransfer {
            peer,
            op: self.op,
            local: &self.local,
            remote: &self.remote,
            local_pages: &self.local_pages,
            remote_pages: &self.remote_pages,
        }
    }
}

/// A plan prepared by `Engine.prepare` / `Engine.prepare_pages`.
#[pyclass(frozen, module = "tidewire._native", name = "Plan")]
struct PyPlan {
    plan: Arc<tidewire::Plan>,
}

#[pymethods]
impl PyPlan {
    /// Requests in the plan (after coalescing, for page plans).
    fn __len__(&self) -> usize {
        self.plan.requests().len()
    }

    /// Runs of consecutive requests between the same two regions.
    #[getter]
    fn runs(&self) -> usize {
        self.plan.runs()
    }

    /// Bytes one execution moves.
    #[getter]
    fn bytes(&self) -> u64 {
        self.plan.bytes()
    }
}

/// A submitted batch.
#[pyclass(frozen, module = "tidewire._native", name = "Batch")]
struct PyBatch {
    handle: BatchHandle,
}

#[pymethods]
impl PyBatch {
    #[getter]
    fn id(&self) -> u64 {
        self.handle.id().0
    }

    /// Waits until the batch finishes (or `timeout` seconds pass: then returns False).
    /// Raises the batch's first failure. Ctrl-C interrupts the wait.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        // A negative timeout is an immediate check; an infinite one, or one too far away to
        // count, is no limit (the batch has its own deadline).
        let now = std::time::Instant::now();
        let finite = timeout.filter(|t| !t.is_infinite()).map(|t| t.max(0.0));
        let until = seconds("timeout", finite)?.and_then(|d| now.checked_add(d));
        loop {
            let step = Duration::from_millis(50);
            let step = until
                .map_or(step, |u| step.min(u.saturating_duration_since(std::time::Instant::now())));
            let handle = self.handle.clone();
            match py.detach(move || handle.wait_timeout(step)) {
                Some(Ok(())) => return Ok(true),
                Some(Err(e)) => return Err(to_py(e)),
                None => {}
            }
            py.check_signals()?;
            if until.is_some_and(|u| std::time::Instant::now() >= u) {
                return Ok(false);
            }
        }
    }

    /// None while running; True when done; raises the failure otherwise.
    fn poll(&self) -> PyResult<Option<bool>> {
        match self.handle.poll() {
            None => Ok(None),
            Some(Ok(())) => Ok(Some(true)),
            Some(Err(e)) => Err(to_py(e)),
        }
    }

    /// `"pending"`, `"done"`, `"failed"` or `"timeout"`, without raising.
    fn state(&self) -> &'static str {
        match self.handle.poll() {
            None => "pending",
            Some(Ok(())) => "done",
            Some(Err(tidewire::Error::Timeout { .. })) => "timeout",
            Some(Err(_)) => "failed",
        }
    }

    /// Fails every request still pending with Cancelled.
    fn cancel(&self) {
        self.handle.cancel();
    }

    /// Per request: `(state, error message or None)`.
    fn statuses(&self) -> Vec<(&'static str, Option<String>)> {
        self.handle
            .statuses()
            .into_iter()
            .map(|s| match s {
                RequestStatus::Pending => ("pending", None),
                RequestStatus::Done => ("done", None),
                RequestStatus::Failed(e) => ("failed", Some(e.to_string())),
            })
            .collect()
    }

    /// `(done, failed, pending)` request counts.
    fn counts(&self) -> (usize, usize, usize) {
        self.handle.counts()
    }
}

/// The HTTP metadata server, in this process. Stops when dropped or on `stop()`.
#[pyclass(module = "tidewire._native", name = "MetadataServer")]
struct PyMetadataServer {
    server: Option<tidewire::MetadataServer>,
    url: String,
}

#[pymethods]
impl PyMetadataServer {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (host="127.0.0.1", port=0))]
    fn new(host: &str, port: u16) -> PyResult<Self> {
        let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
        let server = tidewire::MetadataServer::start(&format!("{host}:{port}")).map_err(to_py)?;
        let url = server.url();
        Ok(Self { server: Some(server), url })
    }

    /// The URL engines pass as `metadata`.
    #[getter]
    fn url(&self) -> String {
        self.url.clone()
    }

    fn stop(&mut self, py: Python<'_>) {
        let server = self.server.take();
        py.detach(move || drop(server));
    }
}

/// Counts the descriptors of an array argument (used by benchmarks to time conversion).
#[pyfunction]
fn descriptor_count(values: U64Array) -> usize {
    values.len()
}

/// GPU support of this build: `(available, reason)`.
#[pyfunction]
fn gpu_status() -> (bool, String) {
    match tidewire_gpu::topology() {
        Ok(t) => (true, format!("{} device(s)", t.gpus.len())),
        Err(u) => (false, u.to_string()),
    }
}

/// Starts the process's Prometheus endpoint on `addr` (`host:port`, port 0 picks one) and
/// turns recording on; returns the bound `host:port` (as `TIDEWIRE_METRICS_ADDR` does).
#[pyfunction]
fn serve_metrics(py: Python<'_>, addr: &str) -> PyResult<String> {
    let a = addr.to_string();
    py.detach(move || tidewire::metrics::serve(&a)).map(|a| a.to_string()).map_err(to_py)
}

/// The process's metrics now, in the OpenMetrics text format (recording turned on by the first
/// call, so a first call shows no traffic).
#[pyfunction]
fn metrics_text(py: Python<'_>) -> String {
    py.detach(|| tidewire::metrics::enable().render())
}

/// The fabric transport's provider on this host: `(True, provider)`, or `(False, why none)`
/// (`TIDEWIRE_FABRIC_PROVIDER` / `FI_PROVIDER` name one; otherwise efa, then verbs).
#[pyfunction]
fn fabric_status() -> (bool, String) {
    match &tidewire::fabric::probe().chosen {
        Ok(p) => (true, p.clone()),
        Err(why) => (false, why.clone()),
    }
}

/// The allocation made by `tidewire_alloc` (or the engine) that starts at `ptr`, as a dict
/// `{ptr, len, device, kind, reason}`, or None when tidewire did not allocate it.
#[pyfunction]
fn allocation(py: Python<'_>, ptr: u64) -> PyResult<Option<Py<PyAny>>> {
    let Some(a) = tidewire_gpu::alloc::lookup(ptr) else { return Ok(None) };
    let d = pyo3::types::PyDict::new(py);
    d.set_item("ptr", a.ptr)?;
    d.set_item("len", a.len)?;
    d.set_item("device", a.device)?;
    d.set_item("kind", a.kind.name())?;
    d.set_item("reason", a.reason)?;
    Ok(Some(d.into_any().unbind()))
}

/// Why the most recent `tidewire_alloc` / `tidewire_free` call failed, if one did.
#[pyfunction]
fn last_allocation_failure() -> Option<String> {
    capi::last_failure()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEngine>()?;
    m.add_class::<PyBatch>()?;
    m.add_class::<PyPlan>()?;
    m.add_class::<PyMetadataServer>()?;
    m.add_class::<collective::PyComm>()?;
    m.add_class::<collective::PyCudaComm>()?;
    m.add_class::<PyRelease>()?;
    m.add_class::<collective::PyElastic>()?;
    m.add_class::<ep::PyEpBuffer>()?;
    m.add_class::<ep::PyEpFallbackMetrics>()?;
    m.add_function(wrap_pyfunction!(descriptor_count, m)?)?;
    m.add_function(wrap_pyfunction!(gpu_status, m)?)?;
    m.add_function(wrap_pyfunction!(fabric_status, m)?)?;
    m.add_function(wrap_pyfunction!(serve_metrics, m)?)?;
    m.add_function(wrap_pyfunction!(metrics_text, m)?)?;
    m.add_function(wrap_pyfunction!(allocation, m)?)?;
    m.add_function(wrap_pyfunction!(last_allocation_failure, m)?)?;
    errors::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
