//! Transferable allocation: device memory with the best reach the topology proves (a VMM
//! allocation exportable as FABRIC and POSIX-FD when the fabric probe passed, else as POSIX-FD,
//! else `cuMemAlloc`), and pinned host memory. Allocations are kept in a process table so the
//! C-ABI allocator (`tidewire_alloc` / `tidewire_free`) can free by pointer.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::device::Gpu;
use crate::ffi::{self, MemAccessDesc, MemAllocationProp};
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
    handle: u64,
}

fn table() -> &'static Mutex<HashMap<u64, Allocation>> {
    static T: OnceLock<Mutex<HashMap<u64, Allocation>>> = OnceLock::new();
    T.get_or_init(Mutex::default)
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
    let a = match want {
        AllocKind::VmmFabric => vmm(gpu, len, true, reason).or_else(|_| {
            vmm(gpu, len, false, "the FABRIC allocation failed; fell back to POSIX-FD")
        })?,
        AllocKind::VmmPosixFd => vmm(gpu, len, false, reason)?,
        AllocKind::Malloc => malloc(gpu, len, reason)?,
        AllocKind::HostPinned => return alloc_host(len),
    };
    if let Ok(mut t) = table().lock() {
        t.insert(a.ptr, a);
    }
    Ok(a)
}

fn malloc(gpu: &Gpu, len: u64, reason: &'static str) -> Result<Allocation, GpuError> {
    let cuda = driver()?;
    let _ctx = gpu.enter()?;
    let mut ptr = 0u64;
    // SAFETY: out-pointer to a local.
    cuda.check("cuMemAlloc", unsafe { (cuda.mem_alloc)(&mut ptr, len as usize) })?;
    Ok(Allocation {
        ptr,
        len,
        device: Some(gpu.ordinal),
        kind: AllocKind::Malloc,
        reason,
        handle: 0,
    })
}

fn vmm(gpu: &Gpu, len: u64, fabric: bool, reason: &'static str) -> Result<Allocation, GpuError> {
    let cuda = driver()?;
    let _ctx = gpu.enter()?;
    let types = ffi::HANDLE_POSIX_FD | if fabric { ffi::HANDLE_FABRIC } else { 0 };
    let prop = MemAllocationProp::device(gpu.dev, types, true);
    let mut gran = 0usize;
    // SAFETY: valid prop and out-pointer; flag 1 = recommended granularity.
    cuda.check("cuMemGetAllocationGranularity", unsafe {
        (cuda.mem_granularity)(&mut gran, &prop, 1)
    })?;
    let size = (len as usize).next_multiple_of(gran.max(1));
    let mut handle = 0u64;
    // SAFETY: valid prop and out-pointer; released on every failure path below.
    cuda.check("cuMemCreate", unsafe { (cuda.mem_create)(&mut handle, size, &prop, 0) })?;
    let mut ptr = 0u64;
    let mapped = (|| {
        // SAFETY: out-pointer to a local.
        cuda.check("cuMemAddressReserve", unsafe {
            (cuda.address_reserve)(&mut ptr, size, gran, 0, 0)
        })?;
        // SAFETY: maps the whole allocation at the fresh reservation.
        cuda.check("cuMemMap", unsafe { (cuda.mem_map)(ptr, size, 0, handle, 0) })?;
        let access = MemAccessDesc { location_type: 1, location_id: gpu.dev, flags: 3 };
        // SAFETY: `ptr` maps `size` bytes; one access descriptor.
        cuda.check("cuMemSetAccess", unsafe { (cuda.set_access)(ptr, size, &access, 1) })
    })();
    if let Err(e) = mapped {
        // SAFETY: undo whatever of reserve/map succeeded; unmapping an unmapped range and
        // freeing a zero reservation fail harmlessly.
        unsafe {
            if ptr != 0 {
                (cuda.mem_unmap)(ptr, size);
                (cuda.address_free)(ptr, size);
            }
            (cuda.mem_release)(handle);
        }
        return Err(e);
    }
    Ok(Allocation {
        ptr,
        len: size as u64,
        device: Some(gpu.ordinal),
        kind: if fabric { AllocKind::VmmFabric } else { AllocKind::VmmPosixFd },
        reason,
        handle,
    })
}

/// Allocates `len` bytes of page-locked host memory, usable by every GPU.
pub fn alloc_host(len: u64) -> Result<Allocation, GpuError> {
    let cuda = driver()?;
    let _ctx = Gpu::get(0)?.enter()?;
    let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
    // SAFETY: out-pointer to a local. Flags: PORTABLE (1) | DEVICEMAP (2).
    cuda.check("cuMemHostAlloc", unsafe { (cuda.host_alloc)(&mut p, len as usize, 3) })?;
    let a = Allocation {
        ptr: p as u64,
        len,
        device: None,
        kind: AllocKind::HostPinned,
        reason: "requested by the caller",
        handle: 0,
    };
    if let Ok(mut t) = table().lock() {
        t.insert(a.ptr, a);
    }
    Ok(a)
}

/// The live allocation starting at `ptr`, if it came from this module.
pub fn lookup(ptr: u64) -> Option<Allocation> {
    table().lock().ok()?.get(&ptr).copied()
}

/// Frees an allocation made by [`alloc_device`] or [`alloc_host`]. Freeing memory still
/// registered with an engine is the caller's error, as with any allocator.
pub fn free(ptr: u64) -> Result<(), GpuError> {
    let a = table()
        .lock()
        .map_err(|_| GpuError::Internal("allocation table poisoned"))?
        .remove(&ptr)
        .ok_or_else(|| GpuError::invalid(format!("{ptr:#x} was not allocated by tidewire")))?;
    let cuda = driver()?;
    let gpu = Gpu::get(a.device.unwrap_or(0))?;
    let _ctx = gpu.enter()?;
    // SAFETY: `a` was made by this module and removed from the table, so it is freed once.
    unsafe {
        match a.kind {
            AllocKind::Malloc => cuda.check("cuMemFree", (cuda.mem_free)(a.ptr)),
            AllocKind::HostPinned => {
                cuda.check("cuMemFreeHost", (cuda.host_free)(a.ptr as *mut std::ffi::c_void))
            }
            AllocKind::VmmFabric | AllocKind::VmmPosixFd => {
                (cuda.mem_unmap)(a.ptr, a.len as usize);
                (cuda.address_free)(a.ptr, a.len as usize);
                cuda.check("cuMemRelease", (cuda.mem_release)(a.handle))
            }
        }
    }
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

/// A 32-bit word in pinned, device-mapped host memory: the host stores it, and kernels on any
/// GPU read it at its address (unified addressing) with a system-scope load, no copy needed.
/// Freed when dropped.
pub struct HostFlag {
    ptr: u64,
}

impl HostFlag {
    /// A flag holding `value`.
    pub fn new(value: u32) -> Result<Self, GpuError> {
        let a = alloc_host(64)?;
        let flag = Self { ptr: a.ptr };
        flag.store(value);
        Ok(flag)
    }

    /// The word's address, valid on the host and on every GPU.
    pub fn addr(&self) -> u64 {
        self.ptr
    }

    fn word(&self) -> &std::sync::atomic::AtomicU32 {
        // SAFETY: `ptr` is a live, 64-byte, page-aligned pinned allocation owned by `self`;
        // an AtomicU32 over its first word is valid for as long as `self` lives.
        unsafe { &*(self.ptr as *const std::sync::atomic::AtomicU32) }
    }

    pub fn store(&self, value: u32) {
        self.word().store(value, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn load(&self) -> u32 {
        self.word().load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for HostFlag {
    fn drop(&mut self) {
        if let Err(e) = free(self.ptr) {
            log::warn!("freeing a host flag at {:#x}: {e}", self.ptr);
        }
    }
}
