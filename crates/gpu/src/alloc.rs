//! Transferable allocation: device memory with the best reach the topology proves (a VMM
//! allocation exportable as FABRIC and POSIX-FD when the fabric probe passed, else as POSIX-FD,
//! else `cuMemAlloc`), and pinned host memory. Allocations are kept in a process table, keyed
//! by pointer, that owns their memory (the RAII values of `memory.rs`), so the C-ABI
//! allocator (`tidewire_alloc` / `tidewire_free`) and the engine can free by pointer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use crate::device::Gpu;
use crate::ffi::MemAllocationProp;
use crate::memory::{
    AddressRange, DeviceAllocation, HandleKind, Mapping, PhysicalAllocation, PinnedHost,
};
use crate::topology::{driver, topology};
use crate::GpuError;

/// What kind of memory an allocation is, which decides how peers reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocKind {
    /// VMM, exportable as FABRIC (and POSIX-FD): reachable over the multi-node fabric.
    VmmFabric,
    /// VMM, exportable as a POSIX file descriptor: same-host peers.
    VmmPosixFd,
    /// `cuMemAlloc`: CUDA IPC, same-host peers.
    Malloc,
    /// Page-locked host memory (`cuMemHostAlloc`, portable and device-mapped).
    HostPinned,
}

impl AllocKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::VmmFabric => "vmm-fabric",
            Self::VmmPosixFd => "vmm-posix-fd",
            Self::Malloc => "cuda-malloc",
            Self::HostPinned => "host-pinned",
        }
    }
}

/// One live allocation.
#[derive(Debug, Clone, Copy)]
pub struct Allocation {
    pub ptr: u64,
    /// Bytes usable (the request rounded up to the granularity).
    pub len: u64,
    /// CUDA ordinal; `None` for host memory.
    pub device: Option<u32>,
    pub kind: AllocKind,
    /// Why this kind and not a better one.
    pub reason: &'static str,
}

/// The memory behind an [`Allocation`], freed when dropped.
#[derive(Debug)]
enum Memory {
    Vmm(Mapping),
    Malloc(DeviceAllocation),
    Host(PinnedHost),
}

impl Memory {
    /// Frees now, returning the first driver error.
    fn close(self) -> Result<(), GpuError> {
        match self {
            Self::Vmm(m) => m.close(),
            Self::Malloc(d) => d.close(),
            Self::Host(h) => h.close(),
        }
    }
}

/// A table entry: what the allocation is, and the memory it owns.
#[derive(Debug)]
struct Entry {
    info: Allocation,
    memory: Memory,
}

fn table() -> MutexGuard<'static, HashMap<u64, Entry>> {
    static T: OnceLock<Mutex<HashMap<u64, Entry>>> = OnceLock::new();
    // The map is changed only by single `insert` / `remove` calls, which a panic elsewhere
    // cannot leave half done: a poisoned lock is used as it is.
    T.get_or_init(Mutex::default).lock().unwrap_or_else(PoisonError::into_inner)
}

/// Puts a new allocation in the table, which owns its memory from here.
fn track(info: Allocation, memory: Memory) -> Allocation {
    let old = table().insert(info.ptr, Entry { info, memory });
    if let Some(old) = old {
        // The driver handed out an address the table still holds, so that allocation was
        // freed behind tidewire's back: freeing it again could free the new one. Forget it.
        log::error!(
            "{:#x} was allocated again while tidewire still tracked it; the old entry is \
             forgotten",
            info.ptr
        );
        std::mem::forget(old);
    }
    info
}

/// Which kind `alloc` will try first on `device`, given the topology.
fn preferred(device: u32) -> (AllocKind, &'static str) {
    let Ok(topo) = topology() else { return (AllocKind::Malloc, "no topology") };
    let Some(g) = topo.gpus.get(device as usize) else {
        return (AllocKind::Malloc, "unknown device");
    };
    if g.vmm && g.fabric_attr && g.fabric.local_verdict().is_ok() {
        (AllocKind::VmmFabric, "the fabric probe passed")
    } else if g.vmm && g.posix_fd {
        (AllocKind::VmmPosixFd, "no proven fabric; VMM with POSIX-FD handles is supported")
    } else {
        (AllocKind::Malloc, "VMM POSIX-FD handles are not supported on this GPU")
    }
}

/// Allocates `len` bytes on `device` with the best reach the topology proves (see
/// [`AllocKind`]); `kind` forces one (for tests and benchmarks).
pub fn alloc_device(
    len: u64,
    device: u32,
    kind: Option<AllocKind>,
) -> Result<Allocation, GpuError> {
    if len == 0 {
        return Err(GpuError::invalid("zero-length allocation"));
    }
    let gpu = Gpu::get(device)?;
    let (mut want, mut reason) = preferred(device);
    if let Some(k) = kind {
        (want, reason) = (k, "requested by the caller");
    }
    let (info, memory) = match want {
        AllocKind::VmmFabric => vmm(gpu, len, true, reason).or_else(|_| {
            vmm(gpu, len, false, "the FABRIC allocation failed; fell back to POSIX-FD")
        })?,
        AllocKind::VmmPosixFd => vmm(gpu, len, false, reason)?,
        AllocKind::Malloc => malloc(gpu, len, reason)?,
        AllocKind::HostPinned => return alloc_host(len),
    };
    Ok(track(info, memory))
}

fn malloc(
    gpu: &'static Gpu,
    len: u64,
    reason: &'static str,
) -> Result<(Allocation, Memory), GpuError> {
    let d = DeviceAllocation::new(gpu, len as usize)?;
    let info = Allocation {
        ptr: d.ptr(),
        len,
        device: Some(gpu.ordinal),
        kind: AllocKind::Malloc,
        reason,
    };
    Ok((info, Memory::Malloc(d)))
}

/// A VMM allocation of `len` bytes (rounded up to the recommended granularity), exportable as
/// a POSIX file descriptor and, with `fabric`, as a FABRIC handle, mapped read-write for
/// `gpu`. A failure part-way gives back what was made (see [`Mapping::map`]).
fn vmm(
    gpu: &'static Gpu,
    len: u64,
    fabric: bool,
    reason: &'static str,
) -> Result<(Allocation, Memory), GpuError> {
    let cuda = driver()?;
    let _ctx = gpu.enter()?;
    let fabric_bits = if fabric { HandleKind::Fabric.bits() } else { 0 };
    let prop = MemAllocationProp::device(gpu.dev, HandleKind::PosixFd.bits() | fabric_bits, true);
    let mut gran = 0usize;
    // SAFETY: valid prop and out-pointer; flag 1 = recommended granularity.
    cuda.check("cuMemGetAllocationGranularity", unsafe {
        (cuda.mem_granularity)(&mut gran, &prop, 1)
    })?;
    let size = (len as usize).next_multiple_of(gran.max(1));
    let alloc = Arc::new(PhysicalAllocation::create(gpu, &prop, size)?);
    // A failure from here drops what was made: the reservation, then the allocation.
    let range = AddressRange::reserve(gpu, size, gran)?;
    let mapping = Mapping::map(gpu, alloc, range)?;
    let info = Allocation {
        ptr: mapping.ptr(),
        len: size as u64,
        device: Some(gpu.ordinal),
        kind: if fabric { AllocKind::VmmFabric } else { AllocKind::VmmPosixFd },
        reason,
    };
    Ok((info, Memory::Vmm(mapping)))
}

/// Allocates `len` bytes of page-locked host memory, usable by every GPU.
pub fn alloc_host(len: u64) -> Result<Allocation, GpuError> {
    let host = PinnedHost::new(Gpu::get(0)?, len as usize)?;
    let info = Allocation {
        ptr: host.ptr(),
        len,
        device: None,
        kind: AllocKind::HostPinned,
        reason: "requested by the caller",
    };
    Ok(track(info, Memory::Host(host)))
}

/// The live allocation starting at `ptr`, if it came from this module.
pub fn lookup(ptr: u64) -> Option<Allocation> {
    table().get(&ptr).map(|e| e.info)
}

/// Frees an allocation made by [`alloc_device`] or [`alloc_host`]: every teardown step is
/// tried; the first driver error is returned. Freeing memory still registered with an engine
/// is the caller's error, as with any allocator.
pub fn free(ptr: u64) -> Result<(), GpuError> {
    let entry = table().remove(&ptr);
    let entry = entry
        .ok_or_else(|| GpuError::invalid(format!("{ptr:#x} was not allocated by tidewire")))?;
    // Out of the table and outside its lock: freed once, here.
    entry.memory.close()
}

/// Copies between any two addresses the driver knows (device, pinned or pageable host),
/// synchronously. For tests, not the data path.
///
/// # Safety
/// Both ranges must be valid for `len` bytes.
pub unsafe fn copy_sync(dst: u64, src: u64, len: u64) -> Result<(), GpuError> {
    // The context of the device end: VMM memory is accessible only where access was granted.
    let device = [dst, src]
        .into_iter()
        .find_map(|p| crate::topology::classify_pointer(p).device)
        .unwrap_or(0);
    // SAFETY: forwarded contract.
    unsafe { copy_sync_on(device, dst, src, len) }
}

/// As [`copy_sync`], in GPU `device`'s context: for memory mapped for that GPU only (a peer's
/// allocation imported for it), whose owner is another device.
///
/// # Safety
/// Both ranges must be valid for `len` bytes in `device`'s context.
pub unsafe fn copy_sync_on(device: u32, dst: u64, src: u64, len: u64) -> Result<(), GpuError> {
    let cuda = driver()?;
    let _ctx = Gpu::get(device)?.enter()?;
    // SAFETY: forwarded contract; unified addressing resolves both ends.
    cuda.check("cuMemcpy", unsafe { (cuda.memcpy)(dst, src, len as usize) })
}

/// Copies `src` into device memory at `dst` (owned by GPU `device`) and waits until the GPU
/// holds it (a copy from pageable memory may still be in flight when `cuMemcpy` returns): for
/// small tables that kernels read at every launch, written between launches.
///
/// # Safety
/// `dst` must be valid device memory for `src.len()` bytes in `device`'s context, read by no
/// kernel meanwhile.
pub unsafe fn write_device(device: u32, dst: u64, src: &[u8]) -> Result<(), GpuError> {
    // SAFETY: forwarded contract; `src` is valid host memory for its length.
    unsafe { copy_sync_on(device, dst, src.as_ptr() as u64, src.len() as u64) }?;
    let cuda = driver()?;
    let _ctx = Gpu::get(device)?.enter()?;
    // SAFETY: no arguments; waits for the context's work.
    cuda.check("cuCtxSynchronize", unsafe { (cuda.ctx_synchronize)() })
}

/// Puts the calling thread in CUDA's relaxed stream-capture mode (`CU_STREAM_CAPTURE_MODE_RELAXED`),
/// as torch's allocator does around its frees: in the default (global) mode a free, unmap or
/// host-memory release made while any thread captures a CUDA graph fails and invalidates that
/// capture. For threads that only release memory, at any time (a release on a thread of its
/// own). Logs and goes on if the driver refuses.
pub fn relax_capture_mode() {
    const RELAXED: std::ffi::c_int = 2;
    let Ok(cuda) = driver() else { return };
    let mut mode = RELAXED;
    // SAFETY: the call swaps the thread's mode with `mode` (a valid, writable c_int).
    let swapped = unsafe { (cuda.capture_mode)(&mut mode) };
    if let Err(e) = cuda.check("cuThreadExchangeStreamCaptureMode", swapped) {
        log::warn!("a releasing thread stays in the global capture mode: {e}");
    }
}

/// Sets `len` bytes of device memory at `ptr` (owned by GPU `device`) to zero; returns once
/// done.
///
/// # Safety
/// The range must be valid device memory for `len` bytes in `device`'s context, and nobody
/// may use it concurrently.
pub unsafe fn zero_device(device: u32, ptr: u64, len: u64) -> Result<(), GpuError> {
    let cuda = driver()?;
    let _ctx = Gpu::get(device)?.enter()?;
    // SAFETY: forwarded contract.
    cuda.check("cuMemsetD8", unsafe { (cuda.memset_d8)(ptr, 0, len as usize) })
}

/// `n` 32-bit words in pinned, device-mapped host memory that the host and kernels on any GPU
/// both read and write at their addresses (unified addressing, system-scope accesses), no
/// copy or synchronisation needed: counters kernels add to (`atomicAdd_system`) and the
/// metrics read. Freed when dropped.
pub struct HostWords {
    mem: PinnedHost,
    n: usize,
}

impl HostWords {
    /// `n` words at 0.
    pub fn new(n: usize) -> Result<Self, GpuError> {
        let mem = PinnedHost::new(Gpu::get(0)?, (n.max(1) * 4).next_multiple_of(64))?;
        let w = Self { mem, n };
        for i in 0..n {
            w.store(i, 0);
        }
        Ok(w)
    }

    /// The first word's address, valid on the host and on every GPU.
    pub fn addr(&self) -> u64 {
        self.mem.ptr()
    }

    fn word(&self, i: usize) -> &std::sync::atomic::AtomicU32 {
        assert!(i < self.n, "word {i} of {}", self.n);
        // SAFETY: `mem` is a live pinned allocation of at least `4 * n` bytes, page-aligned,
        // owned by `self`; an AtomicU32 over its `i`-th word (i < n) is valid while `self`
        // lives, and kernels only touch it with system-scope accesses.
        unsafe { &*((self.mem.ptr() + 4 * i as u64) as *const std::sync::atomic::AtomicU32) }
    }

    pub fn store(&self, i: usize, value: u32) {
        self.word(i).store(value, std::sync::atomic::Ordering::SeqCst);
    }

    /// Word `i` as kernels last left it.
    pub fn load(&self, i: usize) -> u32 {
        self.word(i).load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every word as kernels last left it.
    pub fn load_all(&self) -> Vec<u32> {
        (0..self.n).map(|i| self.load(i)).collect()
    }
}

/// One [`HostWords`] word: a liveness flag the host stores, a failure word kernels store.
pub struct HostFlag {
    word: HostWords,
}

impl HostFlag {
    /// A flag holding `value`.
    pub fn new(value: u32) -> Result<Self, GpuError> {
        let flag = Self { word: HostWords::new(1)? };
        flag.store(value);
        Ok(flag)
    }

    /// The word's address, valid on the host and on every GPU.
    pub fn addr(&self) -> u64 {
        self.word.addr()
    }

    pub fn store(&self, value: u32) {
        self.word.store(0, value);
    }

    /// The word as kernels last wrote it (they store to it at system scope).
    pub fn load(&self) -> u32 {
        self.word.load(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::tests::{allocation, mapping, recording};
    use crate::memory::Teardown;

    fn info(ptr: u64, kind: AllocKind) -> Allocation {
        Allocation { ptr, len: 64, device: Some(0), kind, reason: "test" }
    }

    fn host(ptr: u64) -> Memory {
        // SAFETY: a made-up pointer; the recorder intercepts its teardown.
        Memory::Host(unsafe { PinnedHost::from_raw(Gpu::fake(0), ptr) })
    }

    #[test]
    fn the_table_frees_an_allocation_once() {
        let ptr = 0x7e57_0000;
        let (calls, logged) = recording(&[], || {
            track(info(ptr, AllocKind::HostPinned), host(ptr));
            assert_eq!(lookup(ptr).map(|a| (a.ptr, a.len)), Some((ptr, 64)));
            assert_eq!(free(ptr), Ok(()));
            assert!(lookup(ptr).is_none());
            assert!(matches!(free(ptr), Err(GpuError::Invalid { .. })));
        });
        assert_eq!(calls, [(0, Teardown::FreeHost { ptr })]);
        assert!(logged.is_empty(), "{logged:?}");
    }

    #[test]
    fn a_vmm_allocation_is_unmapped_then_its_range_freed_then_released() {
        let gpu = Gpu::fake(0);
        let (calls, _) = recording(&["cuMemUnmap"], || {
            let m = mapping(gpu, allocation(gpu, 0x99), 0x7e58_0000);
            track(info(0x7e58_0000, AllocKind::VmmPosixFd), Memory::Vmm(m));
            let e = free(0x7e58_0000);
            assert_eq!(e.as_ref().err().and_then(GpuError::call), Some("cuMemUnmap"), "{e:?}");
        });
        assert_eq!(
            calls.iter().map(|c| c.1.call()).collect::<Vec<_>>(),
            ["cuMemUnmap", "cuMemAddressFree", "cuMemRelease"]
        );
    }

    #[test]
    fn an_address_handed_out_again_is_not_freed_twice() {
        let ptr = 0x7e59_0000;
        let (calls, logged) = recording(&[], || {
            track(info(ptr, AllocKind::HostPinned), host(ptr));
            track(info(ptr, AllocKind::HostPinned), host(ptr));
            assert_eq!(free(ptr), Ok(()));
        });
        assert_eq!(calls, [(0, Teardown::FreeHost { ptr })]);
        assert_eq!(logged.len(), 1, "{logged:?}");
        assert!(logged[0].contains("allocated again"), "{logged:?}");
    }
}
