//! Every piece of CUDA memory tidewire makes or maps, as a value that owns it: dropping the
//! value gives the memory back to the driver, once, in the right order, and never panics.
//!
//! VMM memory is a graph, as in pplx-garden's `cumem.rs`: a [`Mapping`] (`cuMemMap` +
//! `cuMemSetAccess`) owns its [`AddressRange`] (`cuMemAddressReserve`) and holds an `Arc` of
//! its [`PhysicalAllocation`] (`cuMemCreate`, or an import of a peer's handle), so the memory
//! is released only after the last mapping of it is unmapped. Dropping a mapping unmaps, frees
//! the address range, then releases the allocation if no other mapping holds it. The flat
//! kinds are one value each: [`DeviceAllocation`] (`cuMemAlloc`), [`PinnedHost`]
//! (`cuMemHostAlloc`), [`IpcMapping`] (`cuIpcOpenMemHandle`).
//!
//! A constructor that fails part-way gives back exactly what it made, newest first. A driver
//! call that fails in `Drop` is logged with its name and the memory it concerned (it leaks);
//! the `close` methods do the same teardown and return the first error instead, for callers
//! that report it (`alloc::free`). Every teardown call runs in the context of the GPU the
//! memory was made on. Memory the GPU may still read (a copy that never completed) must not
//! be dropped: `std::mem::forget` it, as the copier does with its staging.

use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use crate::device::Gpu;
use crate::ffi::{self, IpcHandle, MemAccessDesc, MemAllocationProp};
use crate::share::Shareable;
use crate::topology::driver;
use crate::GpuError;

/// The kinds of handle a VMM physical allocation is known by (`CUmemAllocationHandleType`):
/// what it may be exported as when made, and what it was imported from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandleKind {
    /// Made (or retained) in this process; not imported.
    Local,
    /// A POSIX file descriptor: same-host peers.
    PosixFd,
    /// A 64-byte FABRIC handle: peers across the multi-node NVLink fabric (needs IMEX).
    Fabric,
}

impl HandleKind {
    /// The `CUmemAllocationHandleType` bit (`Local`: none).
    pub(crate) fn bits(self) -> c_int {
        match self {
            Self::Local => 0,
            Self::PosixFd => ffi::HANDLE_POSIX_FD,
            Self::Fabric => ffi::HANDLE_FABRIC,
        }
    }
}

/// One driver call that gives a resource back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Teardown {
    /// `cuMemUnmap` of a VMM mapping.
    Unmap { ptr: u64, size: usize },
    /// `cuMemAddressFree` of a reserved virtual address range.
    FreeRange { ptr: u64, size: usize },
    /// `cuMemRelease` of a physical allocation handle, of the kind it was made or imported
    /// as.
    Release { handle: u64, kind: HandleKind },
    /// `cuMemFree` of a `cuMemAlloc` allocation.
    Free { ptr: u64 },
    /// `cuMemFreeHost` of pinned host memory.
    FreeHost { ptr: u64 },
    /// `cuIpcCloseMemHandle` of a peer's CUDA IPC mapping.
    IpcClose { ptr: u64 },
}

impl Teardown {
    /// The driver call's name.
    pub(crate) fn call(self) -> &'static str {
        match self {
            Self::Unmap { .. } => "cuMemUnmap",
            Self::FreeRange { .. } => "cuMemAddressFree",
            Self::Release { .. } => "cuMemRelease",
            Self::Free { .. } => "cuMemFree",
            Self::FreeHost { .. } => "cuMemFreeHost",
            Self::IpcClose { .. } => "cuIpcCloseMemHandle",
        }
    }

    /// What is given back, for a log line.
    fn describe(self) -> String {
        match self {
            Self::Unmap { ptr, size } => format!("the VMM mapping at {ptr:#x} ({size} bytes)"),
            Self::FreeRange { ptr, size } => {
                format!("the address range at {ptr:#x} ({size} bytes)")
            }
            Self::Release { handle, kind } => {
                let from = match kind {
                    HandleKind::Local => "",
                    HandleKind::PosixFd => " imported from a POSIX file descriptor",
                    HandleKind::Fabric => " imported from a FABRIC handle",
                };
                format!("the physical allocation {handle:#x}{from}")
            }
            Self::Free { ptr } => format!("the device allocation at {ptr:#x}"),
            Self::FreeHost { ptr } => format!("the pinned host memory at {ptr:#x}"),
            Self::IpcClose { ptr } => format!("the CUDA IPC mapping at {ptr:#x}"),
        }
    }

    /// Makes the call in `gpu`'s context.
    ///
    /// # Safety
    /// The resource named is live, was made in `gpu`'s context (or, for pinned host memory,
    /// in any context), and is given back by this call only: no other owner gives it back,
    /// and nothing (the GPU included) uses it afterwards.
    unsafe fn run(self, gpu: &Gpu) -> Result<(), GpuError> {
        #[cfg(test)]
        if let Some(recorded) = tests::intercept(gpu, self) {
            return recorded;
        }
        let cuda = driver()?;
        let _ctx = gpu.enter()?;
        // SAFETY: the caller's contract: a live resource of this kind, given back once, in
        // the context it was made in (now current).
        let code = unsafe {
            match self {
                Self::Unmap { ptr, size } => (cuda.mem_unmap)(ptr, size),
                Self::FreeRange { ptr, size } => (cuda.address_free)(ptr, size),
                Self::Release { handle, .. } => (cuda.mem_release)(handle),
                Self::Free { ptr } => (cuda.mem_free)(ptr),
                Self::FreeHost { ptr } => (cuda.host_free)(ptr as *mut c_void),
                Self::IpcClose { ptr } => (cuda.ipc_close)(ptr),
            }
        };
        cuda.check(self.call(), code)
    }
}

/// One resource owned for giving back: the teardown call and the GPU whose context it runs
/// in. Given back when dropped (a failure is logged) or by [`Resource::give_back`] (a failure
/// is returned); never twice.
struct Resource {
    gpu: &'static Gpu,
    /// `None` once given back.
    teardown: Option<Teardown>,
}

impl Resource {
    /// # Safety
    /// `teardown` names a live resource made in `gpu`'s context that this value now owns:
    /// nothing else gives it back.
    unsafe fn new(gpu: &'static Gpu, teardown: Teardown) -> Self {
        Self { gpu, teardown: Some(teardown) }
    }

    fn give_back(&mut self) -> Result<(), GpuError> {
        let Some(teardown) = self.teardown.take() else { return Ok(()) };
        // SAFETY: `new`'s contract makes this value the resource's only owner, and `take`
        // above makes this the only call.
        unsafe { teardown.run(self.gpu) }
    }
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resource")
            .field("gpu", &self.gpu.ordinal)
            .field("teardown", &self.teardown)
            .finish()
    }
}

impl Drop for Resource {
    fn drop(&mut self) {
        let Some(teardown) = self.teardown else { return };
        if let Err(e) = self.give_back() {
            log::warn!(
                "giving back {} on cuda:{}: {e}; it leaks",
                teardown.describe(),
                self.gpu.ordinal
            );
        }
    }
}

/// The first error of steps that have all run already.
fn first_error(results: impl IntoIterator<Item = Result<(), GpuError>>) -> Result<(), GpuError> {
    results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
}

/// A VMM physical allocation handle (`cuMemCreate`, `cuMemImportFromShareableHandle` or
/// `cuMemRetainAllocationHandle`), released (`cuMemRelease`) when dropped. The memory itself
/// lives until the handle is released *and* every mapping of it is unmapped; a [`Mapping`]
/// holds an `Arc` of its allocation so this value outlives it.
#[derive(Debug)]
pub(crate) struct PhysicalAllocation {
    handle: u64,
    release: Resource,
}

impl PhysicalAllocation {
    /// Takes ownership of a handle.
    ///
    /// # Safety
    /// `handle` is a live allocation handle (one reference) made in `gpu`'s context that the
    /// caller gives up: nothing else releases that reference.
    pub(crate) unsafe fn from_raw(gpu: &'static Gpu, handle: u64, kind: HandleKind) -> Self {
        // SAFETY: forwarded contract.
        let release = unsafe { Resource::new(gpu, Teardown::Release { handle, kind }) };
        Self { handle, release }
    }

    /// `cuMemCreate` of `size` bytes (a multiple of `prop`'s granularity) on `gpu`.
    pub(crate) fn create(
        gpu: &'static Gpu,
        prop: &MemAllocationProp,
        size: usize,
    ) -> Result<Self, GpuError> {
        let call = if prop.requested_handle_types & ffi::HANDLE_FABRIC != 0 {
            "cuMemCreate(FABRIC)"
        } else {
            "cuMemCreate"
        };
        let cuda = driver()?;
        let _ctx = gpu.enter()?;
        let mut handle = 0u64;
        // SAFETY: a valid property struct and an out-pointer to a local.
        cuda.check(call, unsafe { (cuda.mem_create)(&mut handle, size, prop, 0) })?;
        // SAFETY: cuMemCreate succeeded: `handle` holds one reference, owned by nobody else.
        Ok(unsafe { Self::from_raw(gpu, handle, HandleKind::Local) })
    }

    /// Imports a peer's allocation from its shareable handle, in `gpu`'s context.
    pub(crate) fn import(gpu: &'static Gpu, handle: &Shareable<'_>) -> Result<Self, GpuError> {
        let (os_handle, kind, call): (*mut c_void, _, _) = match handle {
            Shareable::Fd(fd) => (
                fd.as_raw_fd() as usize as *mut c_void,
                HandleKind::PosixFd,
                "cuMemImportFromShareableHandle(POSIX_FD)",
            ),
            Shareable::Fabric(bytes) => (
                bytes.as_ptr() as *mut c_void,
                HandleKind::Fabric,
                "cuMemImportFromShareableHandle(FABRIC)",
            ),
        };
        let cuda = driver()?;
        let _ctx = gpu.enter()?;
        let mut h = 0u64;
        // SAFETY: for POSIX_FD the "pointer" is the descriptor's value (the driver's
        // convention), borrowed for the call; for FABRIC it points at the 64-byte handle,
        // alive for the call. `h` is an out-pointer to a local.
        cuda.check(call, unsafe { (cuda.mem_import)(&mut h, os_handle, kind.bits()) })?;
        // SAFETY: the import succeeded: `h` holds one reference, owned by nobody else.
        Ok(unsafe { Self::from_raw(gpu, h, kind) })
    }

    /// Takes a reference to the allocation mapped at `addr` in this process
    /// (`cuMemRetainAllocationHandle`), released when the value drops.
    pub(crate) fn retain(gpu: &'static Gpu, addr: u64) -> Result<Self, GpuError> {
        let cuda = driver()?;
        let _ctx = gpu.enter()?;
        let mut handle = 0u64;
        // SAFETY: out-pointer to a local; the driver only reads the address value and fails
        // for one that is not in a VMM mapping.
        cuda.check("cuMemRetainAllocationHandle", unsafe {
            (cuda.retain_handle)(&mut handle, addr as *mut c_void)
        })?;
        // SAFETY: the retain succeeded: `handle` holds one more reference, ours alone.
        Ok(unsafe { Self::from_raw(gpu, handle, HandleKind::Local) })
    }

    fn gpu(&self) -> &'static Gpu {
        self.release.gpu
    }

    /// Exports the allocation as a POSIX file descriptor (the allocation must have been made
    /// exportable as one).
    pub(crate) fn export_fd(&self) -> Result<OwnedFd, GpuError> {
        let mut fd: c_int = -1;
        // SAFETY: a POSIX_FD export writes one int.
        unsafe {
            self.export(
                "cuMemExportToShareableHandle(POSIX_FD)",
                HandleKind::PosixFd,
                (&mut fd as *mut c_int).cast(),
            )?
        };
        if fd < 0 {
            return Err(GpuError::Internal("the driver exported a negative file descriptor"));
        }
        // SAFETY: the driver created this open descriptor for us; we own it now.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Exports the allocation as a 64-byte FABRIC handle (fails with
    /// CUDA_ERROR_NOT_PERMITTED where no IMEX channel is granted).
    pub(crate) fn export_fabric(&self) -> Result<[u8; 64], GpuError> {
        let mut out = [0u8; 64];
        // SAFETY: a FABRIC export writes a 64-byte CUmemFabricHandle.
        unsafe {
            self.export(
                "cuMemExportToShareableHandle(FABRIC)",
                HandleKind::Fabric,
                out.as_mut_ptr().cast(),
            )?
        };
        Ok(out)
    }

    /// # Safety
    /// `out` points at writable storage of the size a `kind` export writes.
    unsafe fn export(
        &self,
        call: &'static str,
        kind: HandleKind,
        out: *mut c_void,
    ) -> Result<(), GpuError> {
        let cuda = driver()?;
        let _ctx = self.gpu().enter()?;
        // SAFETY: `out` fits what `kind` writes (the caller's contract); the handle is live
        // for as long as `self`.
        cuda.check(call, unsafe { (cuda.mem_export)(out, self.handle, kind.bits(), 0) })
    }

    /// Releases the handle now, returning the driver's error.
    pub(crate) fn close(mut self) -> Result<(), GpuError> {
        self.release.give_back()
    }
}

/// A reserved range of virtual addresses (`cuMemAddressReserve`), freed
/// (`cuMemAddressFree`) when dropped. Unmap what is mapped in it first: a [`Mapping`] owns
/// its range and does.
#[derive(Debug)]
pub(crate) struct AddressRange {
    ptr: u64,
    size: usize,
    free: Resource,
}

impl AddressRange {
    /// Takes ownership of a reservation.
    ///
    /// # Safety
    /// `[ptr, ptr+size)` is a live reservation made with `gpu`'s context current that the
    /// caller gives up: nothing else frees it.
    pub(crate) unsafe fn from_raw(gpu: &'static Gpu, ptr: u64, size: usize) -> Self {
        // SAFETY: forwarded contract.
        let free = unsafe { Resource::new(gpu, Teardown::FreeRange { ptr, size }) };
        Self { ptr, size, free }
    }

    /// Reserves `size` bytes aligned to `align` (0: the default granularity).
    pub(crate) fn reserve(gpu: &'static Gpu, size: usize, align: usize) -> Result<Self, GpuError> {
        let cuda = driver()?;
        let _ctx = gpu.enter()?;
        let mut ptr = 0u64;
        // SAFETY: out-pointer to a local; no fixed address, no flags.
        cuda.check("cuMemAddressReserve", unsafe {
            (cuda.address_reserve)(&mut ptr, size, align, 0, 0)
        })?;
        // SAFETY: the reservation succeeded and is ours alone.
        Ok(unsafe { Self::from_raw(gpu, ptr, size) })
    }

    /// Frees the range now, returning the driver's error.
    pub(crate) fn close(mut self) -> Result<(), GpuError> {
        self.free.give_back()
    }
}

/// A physical allocation mapped over a whole [`AddressRange`], read-write for one GPU.
///
/// Dropping it unmaps, frees the range, then drops its `Arc` of the allocation (releasing
/// the handle when this was the last holder): the fields drop in declaration order, which is
/// that order.
#[derive(Debug)]
pub(crate) struct Mapping {
    unmap: Resource,
    range: AddressRange,
    alloc: Arc<PhysicalAllocation>,
}

impl Mapping {
    /// Takes ownership of a mapping.
    ///
    /// # Safety
    /// `alloc` is mapped over the whole of `range` (with `gpu`'s context current), and
    /// nothing else unmaps it.
    pub(crate) unsafe fn from_raw(
        gpu: &'static Gpu,
        alloc: Arc<PhysicalAllocation>,
        range: AddressRange,
    ) -> Self {
        let teardown = Teardown::Unmap { ptr: range.ptr, size: range.size };
        // SAFETY: forwarded contract.
        let unmap = unsafe { Resource::new(gpu, teardown) };
        Self { unmap, range, alloc }
    }

    /// Maps `alloc` (at least as large as `range`) over `range` and grants `gpu`
    /// read-write access. On failure gives back the range, then `alloc`'s reference (and
    /// unmaps first if the map succeeded but the access grant failed).
    pub(crate) fn map(
        gpu: &'static Gpu,
        alloc: Arc<PhysicalAllocation>,
        range: AddressRange,
    ) -> Result<Self, GpuError> {
        let (ptr, size) = (range.ptr, range.size);
        let mapped = (|| {
            let cuda = driver()?;
            let _ctx = gpu.enter()?;
            // SAFETY: maps the live allocation at offset 0 over the whole fresh reservation;
            // the caller passes an allocation at least that large (the driver checks).
            cuda.check("cuMemMap", unsafe { (cuda.mem_map)(ptr, size, 0, alloc.handle, 0) })
        })();
        if let Err(e) = mapped {
            // Nothing is mapped: give back the reservation, then (when ours was the last
            // reference) the allocation — newest first.
            drop(range);
            drop(alloc);
            return Err(e);
        }
        // SAFETY: the map above succeeded over the whole range; from here dropping the
        // value unmaps, frees the range, then releases.
        let mapping = unsafe { Self::from_raw(gpu, alloc, range) };
        let cuda = driver()?;
        let _ctx = gpu.enter()?;
        let access = MemAccessDesc { location_type: 1, location_id: gpu.dev, flags: 3 };
        // SAFETY: `ptr` maps `size` bytes; one access descriptor (device `gpu`, READWRITE).
        cuda.check("cuMemSetAccess", unsafe { (cuda.set_access)(ptr, size, &access, 1) })?;
        Ok(mapping)
    }

    /// Where the mapping starts.
    pub(crate) fn ptr(&self) -> u64 {
        self.range.ptr
    }

    /// Unmaps, frees the range and releases the allocation (when no other mapping holds it)
    /// now: every step is tried; the first error is returned.
    pub(crate) fn close(self) -> Result<(), GpuError> {
        let Self { mut unmap, range, alloc } = self;
        let unmapped = unmap.give_back();
        let freed = range.close();
        let released = Arc::into_inner(alloc).map_or(Ok(()), PhysicalAllocation::close);
        first_error([unmapped, freed, released])
    }
}

/// Device memory from `cuMemAlloc`, freed (`cuMemFree`) when dropped.
#[derive(Debug)]
pub(crate) struct DeviceAllocation {
    ptr: u64,
    free: Resource,
}

impl DeviceAllocation {
    /// Takes ownership of an allocation.
    ///
    /// # Safety
    /// `ptr` is a live `cuMemAlloc` allocation made in `gpu`'s context that the caller gives
    /// up: nothing else frees it.
    pub(crate) unsafe fn from_raw(gpu: &'static Gpu, ptr: u64) -> Self {
        // SAFETY: forwarded contract.
        let free = unsafe { Resource::new(gpu, Teardown::Free { ptr }) };
        Self { ptr, free }
    }

    /// `cuMemAlloc` of `len` bytes on `gpu`.
    pub(crate) fn new(gpu: &'static Gpu, len: usize) -> Result<Self, GpuError> {
        let cuda = driver()?;
        let _ctx = gpu.enter()?;
        let mut ptr = 0u64;
        // SAFETY: out-pointer to a local.
        cuda.check("cuMemAlloc", unsafe { (cuda.mem_alloc)(&mut ptr, len) })?;
        // SAFETY: the allocation succeeded and is ours alone.
        Ok(unsafe { Self::from_raw(gpu, ptr) })
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Frees now, returning the driver's error.
    pub(crate) fn close(mut self) -> Result<(), GpuError> {
        self.free.give_back()
    }
}

/// Page-locked host memory from `cuMemHostAlloc` (portable, device-mapped: every GPU reads it
/// at its host address), freed (`cuMemFreeHost`) when dropped.
#[derive(Debug)]
pub(crate) struct PinnedHost {
    ptr: u64,
    free: Resource,
}

impl PinnedHost {
    /// Takes ownership of pinned memory.
    ///
    /// # Safety
    /// `ptr` is live `cuMemHostAlloc` memory, allocated with `gpu`'s context current, that
    /// the caller gives up: nothing else frees it.
    pub(crate) unsafe fn from_raw(gpu: &'static Gpu, ptr: u64) -> Self {
        // SAFETY: forwarded contract.
        let free = unsafe { Resource::new(gpu, Teardown::FreeHost { ptr }) };
        Self { ptr, free }
    }

    /// `cuMemHostAlloc` of `len` bytes, PORTABLE | DEVICEMAP, in `gpu`'s context.
    pub(crate) fn new(gpu: &'static Gpu, len: usize) -> Result<Self, GpuError> {
        let cuda = driver()?;
        let _ctx = gpu.enter()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: out-pointer to a local. Flags: PORTABLE (1) | DEVICEMAP (2).
        cuda.check("cuMemHostAlloc", unsafe { (cuda.host_alloc)(&mut p, len, 3) })?;
        // SAFETY: the allocation succeeded and is ours alone.
        Ok(unsafe { Self::from_raw(gpu, p as u64) })
    }

    /// The memory's address, valid on the host and (unified addressing) on every GPU.
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Frees now, returning the driver's error.
    pub(crate) fn close(mut self) -> Result<(), GpuError> {
        self.free.give_back()
    }
}

/// A peer's `cudaMalloc` allocation opened through its CUDA IPC handle
/// (`cuIpcOpenMemHandle`), closed (`cuIpcCloseMemHandle`) when dropped.
#[derive(Debug)]
pub(crate) struct IpcMapping {
    ptr: u64,
    /// Closes the mapping when dropped.
    _close: Resource,
}

impl IpcMapping {
    /// Opens `handle` in `gpu`'s context, with peer access enabled lazily.
    pub(crate) fn open(gpu: &'static Gpu, handle: &[u8; 64]) -> Result<Self, GpuError> {
        let cuda = driver()?;
        let _ctx = gpu.enter()?;
        let mut ptr = 0u64;
        // SAFETY: out-pointer to a local; the handle is 64 opaque bytes the driver validates.
        // Flag 1 = CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS.
        cuda.check("cuIpcOpenMemHandle", unsafe {
            (cuda.ipc_open)(&mut ptr, IpcHandle { reserved: *handle }, 1)
        })?;
        // SAFETY: the open succeeded in `gpu`'s context; the mapping is ours alone.
        let close = unsafe { Resource::new(gpu, Teardown::IpcClose { ptr }) };
        Ok(Self { ptr, _close: close })
    }

    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::RefCell;

    use super::*;

    #[derive(Default)]
    struct Recorder {
        calls: Vec<(u32, Teardown)>,
        fail: Vec<&'static str>,
    }

    thread_local! {
        static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
        static LOGGED: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    /// While a test records on this thread, teardown calls are recorded instead of made, and
    /// the calls named in `fail` fail.
    pub(super) fn intercept(gpu: &Gpu, teardown: Teardown) -> Option<Result<(), GpuError>> {
        RECORDER.with(|r| {
            let mut r = r.borrow_mut();
            let rec = r.as_mut()?;
            rec.calls.push((gpu.ordinal, teardown));
            Some(if rec.fail.contains(&teardown.call()) {
                Err(GpuError::Driver {
                    call: teardown.call(),
                    code: 1,
                    name: "CUDA_ERROR_INVALID_VALUE",
                })
            } else {
                Ok(())
            })
        })
    }

    /// Runs `f` recording teardown calls (failing those named in `fail`); returns the calls and
    /// the warnings logged on this thread.
    pub(crate) fn recording(
        fail: &[&'static str],
        f: impl FnOnce(),
    ) -> (Vec<(u32, Teardown)>, Vec<String>) {
        install_logger();
        LOGGED.with(|l| l.borrow_mut().clear());
        RECORDER.with(|r| {
            *r.borrow_mut() = Some(Recorder { fail: fail.to_vec(), ..Default::default() })
        });
        f();
        let calls = RECORDER.with(|r| r.borrow_mut().take().map(|r| r.calls).unwrap_or_default());
        (calls, LOGGED.with(|l| l.borrow_mut().drain(..).collect()))
    }

    /// Keeps warnings per thread, so parallel tests read their own.
    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, m: &log::Metadata<'_>) -> bool {
            m.level() <= log::Level::Warn
        }
        fn log(&self, record: &log::Record<'_>) {
            if self.enabled(record.metadata()) {
                LOGGED.with(|l| l.borrow_mut().push(record.args().to_string()));
            }
        }
        fn flush(&self) {}
    }

    fn install_logger() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            if log::set_logger(&Capture).is_ok() {
                log::set_max_level(log::LevelFilter::Warn);
            }
        });
    }

    // SAFETY (every `from_raw` in these tests): the handles are made up and never reach the
    // driver: the recorder intercepts every teardown.
    pub(crate) fn allocation(gpu: &'static Gpu, handle: u64) -> Arc<PhysicalAllocation> {
        // SAFETY: see above.
        Arc::new(unsafe { PhysicalAllocation::from_raw(gpu, handle, HandleKind::Local) })
    }

    pub(crate) fn range(gpu: &'static Gpu, ptr: u64, size: usize) -> AddressRange {
        // SAFETY: see above.
        unsafe { AddressRange::from_raw(gpu, ptr, size) }
    }

    pub(crate) fn mapping(gpu: &'static Gpu, alloc: Arc<PhysicalAllocation>, ptr: u64) -> Mapping {
        // SAFETY: see above.
        unsafe { Mapping::from_raw(gpu, alloc, range(gpu, ptr, 1 << 21)) }
    }

    const M: usize = 1 << 21;

    #[test]
    fn a_mapping_unmaps_then_frees_its_range_then_releases() {
        let gpu = Gpu::fake(3);
        let (calls, logged) = recording(&[], || drop(mapping(gpu, allocation(gpu, 0x11), 0x1000)));
        assert_eq!(
            calls,
            [
                (3, Teardown::Unmap { ptr: 0x1000, size: M }),
                (3, Teardown::FreeRange { ptr: 0x1000, size: M }),
                (3, Teardown::Release { handle: 0x11, kind: HandleKind::Local }),
            ]
        );
        assert!(logged.is_empty(), "{logged:?}");
    }

    #[test]
    fn the_allocation_is_released_after_its_last_mapping() {
        let gpu = Gpu::fake(0);
        let (calls, _) = recording(&[], || {
            let alloc = allocation(gpu, 0x22);
            let first = mapping(gpu, alloc.clone(), 0x1000);
            let second = mapping(gpu, alloc, 0x9000);
            drop(first);
            drop(second);
        });
        assert_eq!(
            calls.iter().map(|c| c.1).collect::<Vec<_>>(),
            [
                Teardown::Unmap { ptr: 0x1000, size: M },
                Teardown::FreeRange { ptr: 0x1000, size: M },
                Teardown::Unmap { ptr: 0x9000, size: M },
                Teardown::FreeRange { ptr: 0x9000, size: M },
                Teardown::Release { handle: 0x22, kind: HandleKind::Local },
            ]
        );
    }

    #[test]
    fn a_failed_teardown_call_is_logged_by_name_and_the_rest_still_runs() {
        let gpu = Gpu::fake(1);
        let (calls, logged) = recording(&["cuMemUnmap"], || {
            drop(mapping(gpu, allocation(gpu, 0x33), 0x2000));
        });
        assert_eq!(calls.len(), 3, "{calls:?}");
        assert_eq!(logged.len(), 1, "{logged:?}");
        assert_eq!(
            logged[0],
            "giving back the VMM mapping at 0x2000 (2097152 bytes) on cuda:1: cuMemUnmap \
             returned CUDA_ERROR_INVALID_VALUE (1); it leaks"
        );
    }

    #[test]
    fn close_runs_every_step_once_and_returns_the_first_error() {
        let gpu = Gpu::fake(0);
        let (calls, logged) = recording(&["cuMemAddressFree", "cuMemRelease"], || {
            let e = mapping(gpu, allocation(gpu, 0x44), 0x3000).close();
            assert_eq!(e.as_ref().err().and_then(GpuError::call), Some("cuMemAddressFree"));
        });
        assert_eq!(
            calls.iter().map(|c| c.1.call()).collect::<Vec<_>>(),
            ["cuMemUnmap", "cuMemAddressFree", "cuMemRelease"]
        );
        assert!(logged.is_empty(), "close reports instead of logging: {logged:?}");

        // A close that leaves another mapping's reference releases nothing.
        let (calls, _) = recording(&[], || {
            let alloc = allocation(gpu, 0x55);
            let keep = mapping(gpu, alloc.clone(), 0x4000);
            assert_eq!(mapping(gpu, alloc, 0x5000).close(), Ok(()));
            std::mem::forget(keep);
        });
        assert_eq!(
            calls.iter().map(|c| c.1.call()).collect::<Vec<_>>(),
            ["cuMemUnmap", "cuMemAddressFree"]
        );
    }

    #[test]
    fn a_failed_map_gives_back_the_range_then_the_allocation_and_unmaps_nothing() {
        if driver().is_ok() {
            eprintln!("skipped: needs a machine without a CUDA driver (the map must fail)");
            return;
        }
        let gpu = Gpu::fake(2);
        let (calls, _) = recording(&[], || {
            let r = Mapping::map(gpu, allocation(gpu, 0x66), range(gpu, 0x6000, M));
            assert!(r.is_err_and(|e| e.is_unavailable()));
        });
        assert_eq!(
            calls.iter().map(|c| c.1).collect::<Vec<_>>(),
            [
                Teardown::FreeRange { ptr: 0x6000, size: M },
                Teardown::Release { handle: 0x66, kind: HandleKind::Local }
            ]
        );
        // An allocation still held elsewhere is not released by the failed map.
        let (calls, _) = recording(&[], || {
            let alloc = allocation(gpu, 0x77);
            assert!(Mapping::map(gpu, alloc.clone(), range(gpu, 0x7000, M)).is_err());
            std::mem::forget(alloc);
        });
        assert_eq!(calls.iter().map(|c| c.1.call()).collect::<Vec<_>>(), ["cuMemAddressFree"]);
    }

    #[test]
    fn flat_kinds_give_back_once() {
        let gpu = Gpu::fake(0);
        let (calls, _) = recording(&[], || {
            // SAFETY: made-up values; the recorder intercepts the teardown.
            let dev = unsafe { DeviceAllocation::from_raw(gpu, 0xd000) };
            // SAFETY: as above.
            let host = unsafe { PinnedHost::from_raw(gpu, 0xb000) };
            assert_eq!((dev.ptr(), host.ptr()), (0xd000, 0xb000));
            assert_eq!(dev.close(), Ok(()));
            drop(host);
            // SAFETY: as above.
            let leaked = unsafe { PinnedHost::from_raw(gpu, 0xc000) };
            std::mem::forget(leaked);
        });
        assert_eq!(
            calls.iter().map(|c| c.1).collect::<Vec<_>>(),
            [Teardown::Free { ptr: 0xd000 }, Teardown::FreeHost { ptr: 0xb000 }]
        );
    }

    #[test]
    fn constructors_are_unavailable_without_a_driver() {
        if driver().is_ok() {
            eprintln!("skipped: a CUDA driver is loaded on this machine");
            return;
        }
        let gpu = Gpu::fake(0);
        let prop = MemAllocationProp::device(0, HandleKind::PosixFd.bits(), false);
        let (calls, _) = recording(&[], || {
            assert!(PhysicalAllocation::create(gpu, &prop, M).is_err_and(|e| e.is_unavailable()));
            assert!(PhysicalAllocation::retain(gpu, 0x1000).is_err_and(|e| e.is_unavailable()));
            let fabric = [0u8; 64];
            let r = PhysicalAllocation::import(gpu, &Shareable::Fabric(&fabric));
            assert!(r.is_err_and(|e| e.is_unavailable()));
            assert!(AddressRange::reserve(gpu, M, 0).is_err_and(|e| e.is_unavailable()));
            assert!(DeviceAllocation::new(gpu, 64).is_err_and(|e| e.is_unavailable()));
            assert!(PinnedHost::new(gpu, 64).is_err_and(|e| e.is_unavailable()));
            assert!(IpcMapping::open(gpu, &[0; 64]).is_err_and(|e| e.is_unavailable()));
        });
        assert!(calls.is_empty(), "nothing was made, nothing is given back: {calls:?}");
    }
}
