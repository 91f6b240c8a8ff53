//! The copy path: large contiguous runs go to the copy engine (`cuMemcpyAsync`, unified
//! addressing resolves device, peer and pinned host ends); a batch of small or scattered runs
//! goes to one launch of an SM gather kernel over a device array of (src, dst, len) triples.
//! The kernel is compiled by NVRTC once per process; without NVRTC the copy engine serves
//! everything and [`kernel_status`] says why.
//!
//! A [`Job`] is one caller's work on one stream: ordered after the caller's stream through an
//! event (never a host sync), filled by one or more [`Job::push`] calls (a caller with many
//! descriptors pushes the first ones while it prepares the rest, so the GPU starts early), and
//! finished by an event the caller polls ([`Pending::is_done`]).

use std::ffi::{c_char, c_uint, c_void, CString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::device::Gpu;
use crate::ffi::{self, CuEvent, CuFunction, CuStream, Nvrtc};
use crate::memory::{DeviceAllocation, PinnedHost};
use crate::topology::driver;
use crate::GpuError;

/// One run to copy: `len` bytes from `src` to `dst` (addresses in this process).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

/// A tuning knob read once from the environment (benchmarks sweep these; unset or malformed:
/// `default`).
pub fn tuning(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

/// Gather-kernel shape: threads per block (0: 256 for pages up to 8 KiB, else 512) and blocks
/// per SM at most (`TIDEWIRE_GATHER_THREADS`, `TIDEWIRE_GATHER_BLOCKS_PER_SM`).
fn gather_shape() -> (u32, u32) {
    static SHAPE: OnceLock<(u32, u32)> = OnceLock::new();
    *SHAPE.get_or_init(|| {
        let threads = tuning("TIDEWIRE_GATHER_THREADS", 0);
        let threads =
            if matches!(threads, 32..=512) && threads.is_multiple_of(32) { threads } else { 0 };
        (threads, tuning("TIDEWIRE_GATHER_BLOCKS_PER_SM", 16).clamp(1, 64))
    })
}

/// Whether the gather kernel reads its descriptors straight from pinned host memory (the
/// default: measured 8–9 % faster on 16,384 scattered pages than a device copy first, which
/// puts one more copy in front of every launch; bench/NOTES.md §8).
/// `TIDEWIRE_DESCRIPTORS_IN_HOST=0` copies them to the device first.
fn descriptors_in_host() -> bool {
    static IN_HOST: OnceLock<bool> = OnceLock::new();
    *IN_HOST.get_or_init(|| tuning("TIDEWIRE_DESCRIPTORS_IN_HOST", 1) == 1)
}

/// Runs at least this long go to the copy engine.
pub const COPY_ENGINE_MIN: u64 = 1 << 20;

const KERNEL: &str = r#"
struct Seg { unsigned long long src, dst, len; };
extern "C" __global__ void __launch_bounds__(512)
tw_gather(const Seg* __restrict__ segs, unsigned int n) {
  for (unsigned int s = blockIdx.x; s < n; s += gridDim.x) {
    const Seg g = segs[s];
    const unsigned int t = threadIdx.x, bd = blockDim.x;
    if (((g.src | g.dst | g.len) & 15ull) == 0) {
      const uint4* __restrict__ a = (const uint4*)g.src;
      uint4* __restrict__ b = (uint4*)g.dst;
      const unsigned long long n16 = g.len >> 4;
      unsigned long long i = t;
      for (; i + 3ull * bd < n16; i += 4ull * bd) {
        uint4 x0 = a[i], x1 = a[i + bd], x2 = a[i + 2ull * bd], x3 = a[i + 3ull * bd];
        b[i] = x0; b[i + bd] = x1; b[i + 2ull * bd] = x2; b[i + 3ull * bd] = x3;
      }
      for (; i < n16; i += bd) b[i] = a[i];
    } else {
      const unsigned char* a = (const unsigned char*)g.src;
      unsigned char* b = (unsigned char*)g.dst;
      for (unsigned long long i = t; i < g.len; i += bd) b[i] = a[i];
    }
  }
}
"#;

/// The PTX of the gather kernel, compiled once per process, or why there is none.
fn ptx(cc: (i32, i32)) -> &'static Result<CString, GpuError> {
    static PTX: OnceLock<Result<CString, GpuError>> = OnceLock::new();
    PTX.get_or_init(|| compile(KERNEL, c"tw_gather.cu", cc))
}

/// An NVRTC result as [`GpuError::Nvrtc`] naming `call` (no log).
fn nvrtc_check(call: &'static str, code: std::ffi::c_int) -> Result<(), GpuError> {
    if code == 0 {
        Ok(())
    } else {
        Err(GpuError::Nvrtc { call, code, log: String::new() })
    }
}

/// Compiles CUDA `source` (named `name` in NVRTC's messages) to PTX for compute capability
/// `cc`.
pub(crate) fn compile(
    source: &str,
    name: &std::ffi::CStr,
    cc: (i32, i32),
) -> Result<CString, GpuError> {
    let nvrtc = Nvrtc::load().map_err(GpuError::unavailable)?;
    let src =
        CString::new(source).map_err(|_| GpuError::Internal("a kernel's source contains a NUL"))?;
    let mut prog: *mut c_void = std::ptr::null_mut();
    // SAFETY: NUL-terminated source and name; no headers.
    nvrtc_check("nvrtcCreateProgram", unsafe {
        (nvrtc.create)(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    })?;
    let result = (|| {
        let arch = CString::new(format!("--gpu-architecture=compute_{}{}", cc.0, cc.1))
            .map_err(|_| GpuError::Internal("an NVRTC option contains a NUL"))?;
        // Line information costs nothing at run time and lets a profiler (ncu) map stalls to
        // the kernels' source lines.
        let opts: [*const c_char; 3] =
            [arch.as_ptr(), c"-default-device".as_ptr(), c"-lineinfo".as_ptr()];
        // SAFETY: NUL-terminated options that outlive the call.
        let r = unsafe { (nvrtc.compile)(prog, opts.len() as i32, opts.as_ptr()) };
        if r != 0 {
            let mut n = 0usize;
            // SAFETY: out-pointer to a local; then a buffer of that size.
            unsafe { (nvrtc.log_size)(prog, &mut n) };
            let mut log = vec![0u8; n.max(1)];
            // SAFETY: `log` holds `n` bytes.
            unsafe { (nvrtc.log)(prog, log.as_mut_ptr().cast()) };
            let log = String::from_utf8_lossy(&log).trim_end_matches('\0').to_string();
            return Err(GpuError::Nvrtc { call: "nvrtcCompileProgram", code: r, log });
        }
        let mut n = 0usize;
        // SAFETY: out-pointer to a local.
        unsafe { (nvrtc.ptx_size)(prog, &mut n) };
        let mut buf = vec![0u8; n.max(1)];
        // SAFETY: `buf` holds the PTX size NVRTC reported (including the NUL).
        unsafe { (nvrtc.ptx)(prog, buf.as_mut_ptr().cast()) };
        if let Some(end) = buf.iter().position(|&b| b == 0) {
            buf.truncate(end);
        }
        // Cannot fail: `buf` was cut at its first NUL.
        CString::new(buf).map_err(|_| GpuError::Internal("PTX with a NUL after truncation"))
    })();
    // SAFETY: destroys the program created above, once.
    unsafe { (nvrtc.destroy)(&mut prog) };
    result
}

/// Whether the gather kernel is available on `gpu` (compiling and loading it on first use).
pub fn kernel_status(gpu: &'static Gpu) -> Result<(), GpuError> {
    kernel(gpu).map(|_| ())
}

pub(crate) struct Func(pub(crate) CuFunction);
// SAFETY: a CUfunction is an opaque handle valid in its context from any thread.
unsafe impl Send for Func {}
// SAFETY: as above; never mutated.
unsafe impl Sync for Func {}

fn kernel(gpu: &'static Gpu) -> Result<CuFunction, GpuError> {
    static FUNCS: OnceLock<Vec<OnceLock<Result<Func, GpuError>>>> = OnceLock::new();
    let all = FUNCS.get_or_init(|| (0..MAX_GPUS).map(|_| OnceLock::new()).collect());
    let slot = all.get(gpu.ordinal as usize).ok_or_else(|| too_many_gpus(gpu))?;
    slot.get_or_init(|| {
        let ptx = ptx(gpu.cc).as_ref().map_err(Clone::clone)?;
        let mut funcs = load_functions(gpu, ptx, &[c"tw_gather"])?;
        funcs.pop().ok_or(GpuError::Internal("the gather module without its function"))
    })
    .as_ref()
    .map(|f| f.0)
    .map_err(Clone::clone)
}

/// Loads `ptx` on `gpu` (for the life of the process) and returns its functions `names`.
pub(crate) fn load_functions(
    gpu: &Gpu,
    ptx: &std::ffi::CStr,
    names: &[&std::ffi::CStr],
) -> Result<Vec<Func>, GpuError> {
    let cuda = driver()?;
    let _ctx = gpu.enter()?;
    let mut module = std::ptr::null_mut();
    // SAFETY: NUL-terminated PTX; the module stays loaded for the process.
    cuda.check("cuModuleLoadData", unsafe {
        (cuda.module_load_data)(&mut module, ptx.as_ptr().cast())
    })?;
    let mut funcs = Vec::with_capacity(names.len());
    for name in names {
        let mut f = std::ptr::null_mut();
        // SAFETY: the module is loaded; the name is NUL-terminated.
        cuda.check("cuModuleGetFunction", unsafe {
            (cuda.module_function)(&mut f, module, name.as_ptr())
        })?;
        funcs.push(Func(f));
    }
    Ok(funcs)
}

/// GPUs per process the per-GPU caches (kernels, copiers) hold.
const MAX_GPUS: usize = 64;

fn too_many_gpus(gpu: &Gpu) -> GpuError {
    GpuError::invalid(format!(
        "cuda:{}: tidewire's copy path serves at most {MAX_GPUS} GPUs per process",
        gpu.ordinal
    ))
}

/// Pinned host (and, with `TIDEWIRE_DESCRIPTORS_IN_HOST=0`, device) staging for one launch's
/// descriptor array. Dropping it frees the buffers: staging the GPU may still read (a job or
/// pending copy that never completed) is [`Staging::leak`]ed instead.
struct Staging {
    host: PinnedHost,
    /// `None` when the kernel reads `host` directly.
    dev: Option<DeviceAllocation>,
    /// Descriptors the buffers hold.
    cap: usize,
}

impl Staging {
    fn host(&self) -> *mut Seg {
        self.host.ptr() as *mut Seg
    }

    /// Where the kernel reads the descriptors: the device copy when there is one, else the
    /// pinned, device-mapped host array (unified addressing: its host address is valid on
    /// the device).
    fn kernel_reads(&self) -> u64 {
        self.dev.as_ref().map_or(self.host.ptr(), DeviceAllocation::ptr)
    }

    /// Gives up the buffers without freeing them: the GPU may still read them, so they must
    /// be neither freed nor reused.
    fn leak(self) {
        std::mem::forget(self);
    }
}

/// One launch of the gather kernel over `n` descriptors at `descriptors` (device-readable),
/// moving `total` bytes, on `stream`.
///
/// # Safety
/// The descriptors must stay readable, and the ranges they name valid, until the work
/// enqueued on `stream` completes; `f` is the gather kernel of `gpu`, whose context is current.
unsafe fn launch_gather(
    cuda: &ffi::Cuda,
    gpu: &Gpu,
    f: CuFunction,
    stream: CuStream,
    descriptors: u64,
    n: usize,
    total: u64,
) -> Result<(), GpuError> {
    let avg = total / n.max(1) as u64;
    let (fixed, per_sm) = gather_shape();
    let threads: c_uint = match fixed {
        0 if avg <= 8192 => 256,
        0 => 512,
        t => t,
    };
    let grid = (n as u32).min(gpu.sm_count * per_sm).max(1);
    let mut dev_arg = descriptors;
    let mut n_arg = n as c_uint;
    let mut params: [*mut c_void; 2] =
        [(&mut dev_arg as *mut u64).cast(), (&mut n_arg as *mut c_uint).cast()];
    // SAFETY: the kernel's two parameters are (const Seg*, unsigned int); the caller vouches
    // for the descriptors and the ranges.
    cuda.check("cuLaunchKernel(tw_gather)", unsafe {
        (cuda.launch)(
            f,
            grid,
            1,
            1,
            threads,
            1,
            1,
            0,
            stream,
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    })
}

/// Streams, events and staging of one GPU.
pub struct Copier {
    gpu: &'static Gpu,
    streams: Vec<CuStream>,
    next: AtomicUsize,
    staging: Mutex<Vec<Staging>>,
    events: Mutex<Vec<CuEvent>>,
}

// SAFETY: stream and event handles are opaque driver tokens usable from any thread; the
// mutable pools are behind mutexes.
unsafe impl Send for Copier {}
// SAFETY: as above.
unsafe impl Sync for Copier {}

/// Work in flight on a [`Copier`]'s stream; poll it, then drop it.
pub struct Pending {
    copier: &'static Copier,
    event: CuEvent,
    staging: Vec<Staging>,
    /// Prepared descriptors the work reads, kept until it completed.
    prepared: Vec<Arc<Prepared>>,
}

/// Descriptors written once into pinned, device-mapped memory (a prepared plan's GPU part),
/// launched as often as needed without being written again. Read-only once made; each job
/// that launches it holds an `Arc` until its work completed, so it is freed only when no GPU
/// work can read it.
pub struct Prepared {
    copier: &'static Copier,
    /// Runs for the copy engine (at least [`COPY_ENGINE_MIN`] bytes, or a lone small one).
    big: Vec<Seg>,
    /// The gather kernel's descriptors, with their count and total bytes.
    small: Option<(Staging, usize, u64)>,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        // No job holds it any more: its buffers go back to the pool.
        if let (Some((st, _, _)), Ok(mut pool)) = (self.small.take(), self.copier.staging.lock()) {
            pool.push(st);
        }
    }
}

// SAFETY: the staging buffers are owned and read-only after `Copier::prepare`.
unsafe impl Send for Prepared {}
// SAFETY: as above: shared access only reads the addresses.
unsafe impl Sync for Prepared {}

/// Work being enqueued on one stream: push descriptors, then [`Job::finish`]. A job dropped
/// unfinished leaks its staging (the GPU may still read it) rather than reuse it.
pub struct Job {
    copier: &'static Copier,
    /// Launches alternate between these (1 or 2, `TIDEWIRE_JOB_STREAMS`): consecutive
    /// launches of one job copy disjoint pages, so the next may start while the last blocks
    /// of the previous one finish.
    streams: Vec<CuStream>,
    pushes: usize,
    staging: Vec<Staging>,
    prepared: Vec<Arc<Prepared>>,
}

// SAFETY: the stream is an opaque driver handle; staging is owned.
unsafe impl Send for Job {}

// SAFETY: the event is an opaque driver handle; staging is owned.
unsafe impl Send for Pending {}

/// Streams per GPU: enough for submitting threads not to serialise on one stream.
const STREAMS: usize = 4;

impl Copier {
    /// The process's copier for `gpu` (made on first use, kept for the process).
    pub fn get(gpu: &'static Gpu) -> Result<&'static Copier, GpuError> {
        static ALL: OnceLock<Vec<OnceLock<Result<Copier, GpuError>>>> = OnceLock::new();
        let all = ALL.get_or_init(|| (0..MAX_GPUS).map(|_| OnceLock::new()).collect());
        let slot = all.get(gpu.ordinal as usize).ok_or_else(|| too_many_gpus(gpu))?;
        slot.get_or_init(|| Copier::new(gpu, STREAMS)).as_ref().map_err(Clone::clone)
    }

    fn new(gpu: &'static Gpu, streams: usize) -> Result<Self, GpuError> {
        let cuda = driver()?;
        let _ctx = gpu.enter()?;
        let mut v = Vec::new();
        for _ in 0..streams.max(1) {
            let mut s: CuStream = std::ptr::null_mut();
            // SAFETY: out-pointer to a local; flag 1 = CU_STREAM_NON_BLOCKING.
            cuda.check("cuStreamCreate", unsafe { (cuda.stream_create)(&mut s, 1) })?;
            v.push(s);
        }
        Ok(Self {
            gpu,
            streams: v,
            next: AtomicUsize::new(0),
            staging: Mutex::default(),
            events: Mutex::default(),
        })
    }

    fn event(&self) -> Result<CuEvent, GpuError> {
        if let Some(e) = self.events.lock().ok().and_then(|mut v| v.pop()) {
            return Ok(e);
        }
        let cuda = driver()?;
        let mut e: CuEvent = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; flag 2 = CU_EVENT_DISABLE_TIMING.
        cuda.check("cuEventCreate", unsafe { (cuda.event_create)(&mut e, 2) })?;
        Ok(e)
    }

    fn staging(&self, n: usize) -> Result<Staging, GpuError> {
        if let Ok(mut pool) = self.staging.lock() {
            // Best fit: a job's launches of different sizes each find their own buffer again
            // (first fit let a small launch take the large buffer and the large one allocate).
            let fit =
                pool.iter().enumerate().filter(|(_, s)| s.cap >= n).min_by_key(|(_, s)| s.cap);
            if let Some(i) = fit.map(|(i, _)| i) {
                return Ok(pool.swap_remove(i));
            }
        }
        let cap = n.next_power_of_two().max(1024);
        let bytes = cap * size_of::<Seg>();
        let host = PinnedHost::new(self.gpu, bytes)?;
        // The device copy of the descriptors exists only when the kernel does not read them
        // from the pinned host buffer. If its allocation fails, `host` is freed on return.
        let dev = if descriptors_in_host() {
            None
        } else {
            Some(DeviceAllocation::new(self.gpu, bytes)?)
        };
        Ok(Staging { host, dev, cap })
    }

    /// Starts a job on the next of this GPU's streams, ordered after `after` (a caller's
    /// CUstream in the same context) when given.
    pub fn job(&'static self, after: Option<u64>) -> Result<Job, GpuError> {
        static WIDTH: OnceLock<usize> = OnceLock::new();
        let width = *WIDTH.get_or_init(|| tuning("TIDEWIRE_JOB_STREAMS", 2).clamp(1, 2) as usize);
        let cuda = driver()?;
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let streams: Vec<CuStream> =
            (0..width).map(|k| self.streams[(first + k) % self.streams.len()]).collect();
        if let Some(caller) = after {
            let _ctx = self.gpu.enter()?;
            let e = self.event()?;
            // SAFETY: records on the caller's stream (same primary context) and makes ours
            // wait on it; the event returns to the pool, re-recording later is allowed.
            let r = unsafe { (cuda.event_record)(e, caller as CuStream) };
            cuda.check("cuEventRecord(caller stream)", r)?;
            for &stream in &streams {
                // SAFETY: both handles are live.
                let r = unsafe { (cuda.stream_wait_event)(stream, e, 0) };
                cuda.check("cuStreamWaitEvent", r)?;
            }
            if let Ok(mut v) = self.events.lock() {
                v.push(e);
            }
        }
        Ok(Job { copier: self, streams, pushes: 0, staging: Vec::new(), prepared: Vec::new() })
    }

    /// Writes `segs` once into pinned memory for [`Job::push_prepared`]: runs of at least
    /// [`COPY_ENGINE_MIN`] bytes go to the copy engine, the rest to the gather kernel.
    pub fn prepare(&'static self, segs: &[Seg]) -> Result<Arc<Prepared>, GpuError> {
        let small: Vec<Seg> = segs.iter().filter(|s| s.len < COPY_ENGINE_MIN).copied().collect();
        let kernel_ok = small.len() >= 2 && kernel(self.gpu).is_ok();
        let big: Vec<Seg> =
            segs.iter().filter(|s| !kernel_ok || s.len >= COPY_ENGINE_MIN).copied().collect();
        if !kernel_ok {
            return Ok(Arc::new(Prepared { copier: self, big, small: None }));
        }
        let st = self.staging(small.len())?;
        let host = st.host();
        for (i, s) in small.iter().enumerate() {
            // SAFETY: `i < small.len() <= cap`; the pinned buffer holds `cap` descriptors and
            // nothing else uses it (fresh from the pool, not yet launched).
            unsafe { host.add(i).write(*s) };
        }
        if let Some(dev) = &st.dev {
            let cuda = driver()?;
            let _ctx = self.gpu.enter()?;
            let bytes = small.len() * size_of::<Seg>();
            // SAFETY: pinned host source and device destination of `bytes`, both owned by
            // `st`; synchronous, done before any launch reads it.
            cuda.check("cuMemcpy(prepared descriptors)", unsafe {
                (cuda.memcpy)(dev.ptr(), host as u64, bytes)
            })?;
        }
        let total = small.iter().map(|s| s.len).sum();
        Ok(Arc::new(Prepared { copier: self, big, small: Some((st, small.len(), total)) }))
    }
}

impl Job {
    /// The copier of the job's GPU (for [`Copier::prepare`]).
    pub fn copier(&self) -> &'static Copier {
        self.copier
    }

    /// Enqueues copies of `segs` on the job's stream, after everything pushed before: runs
    /// of at least [`COPY_ENGINE_MIN`] bytes on the copy engine, the rest (two or more) in one
    /// gather-kernel launch.
    ///
    /// # Safety
    /// Every segment's ranges must be valid for the GPU (device memory mapped in this GPU's
    /// context, or pinned host memory) until the finished job reports done.
    pub unsafe fn push(&mut self, segs: &[Seg]) -> Result<(), GpuError> {
        let cuda = driver()?;
        let copier = self.copier;
        let _ctx = copier.gpu.enter()?;
        let stream = self.streams[self.pushes % self.streams.len()];
        self.pushes += 1;
        let small: usize = segs.iter().filter(|s| s.len < COPY_ENGINE_MIN).count();
        let func = if small >= 2 { kernel(copier.gpu).ok() } else { None };
        for s in segs.iter().filter(|s| func.is_none() || s.len >= COPY_ENGINE_MIN) {
            // SAFETY: the caller guarantees both ranges; unified addressing resolves them.
            cuda.check("cuMemcpyAsync", unsafe {
                (cuda.memcpy_async)(s.dst, s.src, s.len as usize, stream)
            })?;
        }
        let Some(f) = func else { return Ok(()) };
        let st = copier.staging(small)?;
        let host = st.host();
        let descriptors = st.kernel_reads();
        // Owned by the job from here: the GPU may read it once the copy below is enqueued.
        self.staging.push(st);
        let mut n = 0usize;
        let mut total = 0u64;
        for s in segs.iter().filter(|s| s.len < COPY_ENGINE_MIN) {
            // SAFETY: `n < small <= cap`, and the pinned buffer (page-aligned) holds `cap`
            // descriptors; it is ours until the event fires.
            unsafe { host.add(n).write(*s) };
            n += 1;
            total += s.len;
        }
        if descriptors != host as u64 {
            let bytes = n * size_of::<Seg>();
            // SAFETY: pinned host source and device destination of `bytes`, both owned by the
            // job, which keeps them until its event completes.
            cuda.check("cuMemcpyAsync(descriptors)", unsafe {
                (cuda.memcpy_async)(descriptors, host as u64, bytes, stream)
            })?;
        }
        // SAFETY: the descriptors are written (or copied earlier on `stream`) and owned by
        // the job until its event completes; the caller vouches for the ranges they name.
        unsafe { launch_gather(cuda, copier.gpu, f, stream, descriptors, n, total) }
    }

    /// Enqueues a prepared set (see [`Copier::prepare`]) after everything pushed before: its
    /// copy-engine runs, then the gather kernel over its descriptors: one launch, or two
    /// halves on alternating job streams when there are at least 2,048 descriptors (with two
    /// streams, `TIDEWIRE_JOB_STREAMS`, the second starts while the first's last blocks finish).
    ///
    /// # Safety
    /// As for [`Job::push`], for every descriptor of the set.
    pub unsafe fn push_prepared(&mut self, set: &Arc<Prepared>) -> Result<(), GpuError> {
        let cuda = driver()?;
        let copier = self.copier;
        if !std::ptr::eq(set.copier, copier) {
            return Err(GpuError::invalid(format!(
                "a prepared set of cuda:{} pushed to a job on cuda:{}",
                set.copier.gpu.ordinal, copier.gpu.ordinal
            )));
        }
        let _ctx = copier.gpu.enter()?;
        // Held from here: the GPU may read the descriptors once a launch is enqueued.
        self.prepared.push(set.clone());
        let first = self.streams[self.pushes % self.streams.len()];
        for s in &set.big {
            // SAFETY: the caller guarantees both ranges; unified addressing resolves them.
            cuda.check("cuMemcpyAsync", unsafe {
                (cuda.memcpy_async)(s.dst, s.src, s.len as usize, first)
            })?;
        }
        let Some((st, n, total)) = &set.small else {
            self.pushes += 1;
            return Ok(());
        };
        let f = kernel(copier.gpu)?;
        let base = st.kernel_reads();
        let half = if *n >= 2 * 1024 { n / 2 } else { *n };
        for (from, count) in [(0, half), (half, n - half)] {
            if count == 0 {
                continue;
            }
            let stream = self.streams[self.pushes % self.streams.len()];
            self.pushes += 1;
            let at = base + (from * size_of::<Seg>()) as u64;
            let bytes = total / *n as u64 * count as u64;
            // SAFETY: `[from, from+count)` lies inside the set's `n` descriptors, which the
            // job holds (`prepared`) until its event completes; the caller vouches for the
            // ranges they name.
            unsafe { launch_gather(cuda, copier.gpu, f, stream, at, count, bytes) }?;
        }
        Ok(())
    }

    /// Records the completion event after everything pushed (on every stream used).
    pub fn finish(mut self) -> Result<Pending, GpuError> {
        let cuda = driver()?;
        let copier = self.copier;
        let _ctx = copier.gpu.enter()?;
        let last = self.streams[0];
        for &other in self.streams.iter().skip(1).take(self.pushes.saturating_sub(1)) {
            let join = copier.event()?;
            // SAFETY: live event and streams; the event returns to the pool after the wait is
            // enqueued (re-recording it later does not change this wait).
            cuda.check("cuEventRecord(join)", unsafe { (cuda.event_record)(join, other) })?;
            // SAFETY: as above; `last` waits for everything enqueued on `other` so far.
            let r = unsafe { (cuda.stream_wait_event)(last, join, 0) };
            cuda.check("cuStreamWaitEvent(join)", r)?;
            if let Ok(mut v) = copier.events.lock() {
                v.push(join);
            }
        }
        let event = copier.event()?;
        // SAFETY: live event and stream.
        cuda.check("cuEventRecord", unsafe { (cuda.event_record)(event, last) })?;
        Ok(Pending {
            copier,
            event,
            staging: std::mem::take(&mut self.staging),
            prepared: std::mem::take(&mut self.prepared),
        })
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // Unfinished (an enqueue failed): the GPU may still read the staging, so it is
        // leaked, never freed nor reused.
        self.staging.drain(..).for_each(Staging::leak);
        self.prepared.drain(..).for_each(std::mem::forget);
    }
}

impl Pending {
    /// Makes the caller's `stream` (a CUstream of a context on this GPU or a peer of it) wait
    /// for this work, without the host: work queued on it afterwards sees every byte copied.
    ///
    /// # Safety
    /// `stream` must be a live CUstream (it is handed to the driver as a pointer).
    pub unsafe fn complete_on(&self, stream: u64) -> Result<(), GpuError> {
        let cuda = driver()?;
        let _ctx = self.copier.gpu.enter()?;
        // SAFETY: the event was recorded on our stream by `Job::finish` and lives in the pool
        // for the process; the wait binds to that recording (a later re-record of the pooled
        // event does not change it). The caller vouches that `stream` is a live CUstream.
        let r = unsafe { (cuda.stream_wait_event)(stream as CuStream, self.event, 0) };
        cuda.check("cuStreamWaitEvent(caller stream)", r)
    }

    /// `Ok(true)` once the work completed; an error if it failed on the GPU.
    pub fn is_done(&self) -> Result<bool, GpuError> {
        let cuda = driver()?;
        // SAFETY: a live event recorded on our stream.
        match unsafe { (cuda.event_query)(self.event) } {
            0 => Ok(true),
            ffi::NOT_READY => Ok(false),
            r => cuda.check("cuEventQuery", r).map(|()| false),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // A pending value dropped before completion (a failed GPU) leaks its staging rather
        // than hand a buffer the GPU may still read to the next launch.
        if !matches!(self.is_done(), Ok(true)) {
            self.staging.drain(..).for_each(Staging::leak);
            self.prepared.drain(..).for_each(std::mem::forget);
            return;
        }
        if let Ok(mut v) = self.copier.events.lock() {
            v.push(self.event);
        }
        if let Ok(mut pool) = self.copier.staging.lock() {
            pool.append(&mut self.staging);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::tests::recording;
    use crate::memory::Teardown;

    #[test]
    fn leaked_staging_is_never_freed_and_dropped_staging_is() {
        let gpu = Gpu::fake(0);
        let staging = |p: u64| Staging {
            // SAFETY: made-up pointers; the recorder intercepts their teardown.
            host: unsafe { PinnedHost::from_raw(gpu, p) },
            // SAFETY: as above.
            dev: Some(unsafe { DeviceAllocation::from_raw(gpu, p + 1) }),
            cap: 1024,
        };
        let (calls, _) = recording(&[], || {
            staging(0xa000).leak();
            drop(staging(0xb000));
        });
        assert_eq!(
            calls.iter().map(|c| c.1).collect::<Vec<_>>(),
            [Teardown::FreeHost { ptr: 0xb000 }, Teardown::Free { ptr: 0xb001 }]
        );
    }
}
