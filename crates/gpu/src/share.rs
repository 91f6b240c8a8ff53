//! Exporting device memory to other processes and importing theirs: CUDA IPC handles of a
//! `cudaMalloc` allocation base, and VMM allocations as POSIX file descriptors or FABRIC
//! handles. An import is a mapping into one of our GPUs' contexts, closed on drop.

use std::ffi::c_void;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::device::Gpu;
use crate::ffi::{self, IpcHandle, MemAccessDesc};
use crate::topology::driver;
use crate::GpuError;

/// How a device allocation can be shared, as found from its pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exportable {
    /// A `cudaMalloc` allocation: the IPC handle of its base.
    Ipc { handle: [u8; 64], base: u64, size: u64 },
    /// A VMM allocation mapped at `[base, base+size)`, exportable as the listed handle kinds.
    Vmm { base: u64, size: u64, posix_fd: bool, fabric: bool },
    /// Neither (managed memory, a VMM allocation without shareable handle types, ...).
    None { reason: String },
}

pub(crate) fn ptr_attr<T: Default>(addr: u64, attr: std::ffi::c_int) -> Option<T> {
    let cuda = driver().ok()?;
    let mut v = T::default();
    // SAFETY: `T` matches the attribute's size (the callers ask u32 for 32-bit attributes and
    // u64 for address/size attributes); the driver fails for memory it does not know.
    let r = unsafe { (cuda.pointer_attribute)((&mut v as *mut T).cast(), attr, addr) };
    (r == 0).then_some(v)
}

/// How the device memory at `addr` (on `gpu`) can be shared.
pub fn exportable(gpu: &Gpu, addr: u64) -> Result<Exportable, GpuError> {
    let cuda = driver()?;
    let _ctx = gpu.enter()?;
    if ptr_attr::<u32>(addr, ffi::POINTER_LEGACY_IPC) == Some(1) {
        let (mut base, mut size) = (0u64, 0usize);
        // SAFETY: out-pointers to locals.
        cuda.check("cuMemGetAddressRange", unsafe {
            (cuda.address_range)(&mut base, &mut size, addr)
        })?;
        let mut h = IpcHandle { reserved: [0; 64] };
        // SAFETY: out-pointer to a 64-byte handle; `base` is a live allocation base.
        cuda.check("cuIpcGetMemHandle", unsafe { (cuda.ipc_get)(&mut h, base) })?;
        return Ok(Exportable::Ipc { handle: h.reserved, base, size: size as u64 });
    }
    let types = ptr_attr::<u64>(addr, ffi::POINTER_ALLOWED_HANDLES).unwrap_or(0);
    let posix_fd = types & ffi::HANDLE_POSIX_FD as u64 != 0;
    let fabric = types & ffi::HANDLE_FABRIC as u64 != 0;
    if !posix_fd && !fabric {
        return Ok(Exportable::None {
            reason: format!(
                "not a cudaMalloc allocation and its VMM handle types ({types:#x}) include \
                 neither POSIX_FD nor FABRIC"
            ),
        });
    }
    let base = ptr_attr::<u64>(addr, ffi::POINTER_MAPPING_BASE)
        .or_else(|| ptr_attr::<u64>(addr, ffi::POINTER_RANGE_START));
    let size = ptr_attr::<u64>(addr, ffi::POINTER_MAPPING_SIZE)
        .or_else(|| ptr_attr::<u64>(addr, ffi::POINTER_RANGE_SIZE));
    match (base, size) {
        (Some(base), Some(size)) if size > 0 => {
            Ok(Exportable::Vmm { base, size, posix_fd, fabric })
        }
        _ => Ok(Exportable::None {
            reason: "the driver did not give the VMM mapping's range".into(),
        }),
    }
}

/// Exports the VMM allocation mapped at `addr` as a shareable handle of type `kind`, written
/// to `out` (an int for POSIX_FD, 64 bytes for FABRIC).
///
/// # Safety
/// `out` must point at writable storage of the size `kind` writes.
unsafe fn export(
    gpu: &Gpu,
    addr: u64,
    kind: std::ffi::c_int,
    out: *mut c_void,
) -> Result<(), GpuError> {
    let cuda = driver()?;
    let _ctx = gpu.enter()?;
    let mut handle = 0u64;
    // SAFETY: out-pointer to a local; `addr` lies in a VMM mapping (checked by the callers'
    // callers through `exportable`), so the driver returns its allocation handle with a
    // reference.
    cuda.check("cuMemRetainAllocationHandle", unsafe {
        (cuda.retain_handle)(&mut handle, addr as *mut c_void)
    })?;
    // SAFETY: `out` fits what `kind` writes (the caller's contract); `handle` is live.
    let r = unsafe { (cuda.mem_export)(out, handle, kind, 0) };
    // SAFETY: drops the reference taken by cuMemRetainAllocationHandle.
    unsafe { (cuda.mem_release)(handle) };
    let call = if kind == ffi::HANDLE_FABRIC {
        "cuMemExportToShareableHandle(FABRIC)"
    } else {
        "cuMemExportToShareableHandle(POSIX_FD)"
    };
    cuda.check(call, r)
}

/// Exports the VMM allocation mapped at `addr` as a POSIX file descriptor.
pub fn export_fd(gpu: &Gpu, addr: u64) -> Result<OwnedFd, GpuError> {
    let mut fd: i32 = -1;
    // SAFETY: a POSIX_FD export writes one int.
    unsafe { export(gpu, addr, ffi::HANDLE_POSIX_FD, (&mut fd as *mut i32).cast())? };
    // SAFETY: the driver created this descriptor for us; we own it now.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Exports the VMM allocation mapped at `addr` as a 64-byte FABRIC handle (fails with
/// CUDA_ERROR_NOT_PERMITTED where no IMEX channel is granted).
pub fn export_fabric(gpu: &Gpu, addr: u64) -> Result<[u8; 64], GpuError> {
    let mut out = [0u8; 64];
    // SAFETY: a FABRIC export writes a 64-byte CUmemFabricHandle.
    unsafe { export(gpu, addr, ffi::HANDLE_FABRIC, out.as_mut_ptr().cast())? };
    Ok(out)
}

/// A shareable handle received from a peer.
pub enum Shareable<'a> {
    Fd(BorrowedFd<'a>),
    Fabric(&'a [u8; 64]),
}

enum Mapped {
    Ipc,
    Vmm,
}

/// A peer's memory mapped into one of our GPUs' contexts. Unmapped on drop.
pub struct Imported {
    ptr: u64,
    size: u64,
    how: Mapped,
    gpu: &'static Gpu,
}

impl Imported {
    /// Where the peer's allocation base appears in this process.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

/// Opens a peer's CUDA IPC handle in `gpu`'s context.
pub fn import_ipc(gpu: &'static Gpu, handle: &[u8; 64], size: u64) -> Result<Imported, GpuError> {
    let cuda = driver()?;
    let _ctx = gpu.enter()?;
    let mut ptr = 0u64;
    // SAFETY: out-pointer to a local; the handle is 64 opaque bytes the driver validates.
    // Flag 1 = CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS.
    cuda.check("cuIpcOpenMemHandle", unsafe {
        (cuda.ipc_open)(&mut ptr, IpcHandle { reserved: *handle }, 1)
    })?;
    Ok(Imported { ptr, size, how: Mapped::Ipc, gpu })
}

/// Imports a peer's VMM allocation of `size` bytes and maps it read-write for `gpu`.
pub fn import_vmm(
    gpu: &'static Gpu,
    handle: Shareable<'_>,
    size: u64,
) -> Result<Imported, GpuError> {
    let cuda = driver()?;
    let _ctx = gpu.enter()?;
    let mut h = 0u64;
    let (os_handle, kind, what): (*mut c_void, _, _) = match &handle {
        Shareable::Fd(fd) => (
            fd.as_raw_fd() as usize as *mut c_void,
            ffi::HANDLE_POSIX_FD,
            "cuMemImportFromShareableHandle(POSIX_FD)",
        ),
        Shareable::Fabric(bytes) => (
            bytes.as_ptr() as *mut c_void,
            ffi::HANDLE_FABRIC,
            "cuMemImportFromShareableHandle(FABRIC)",
        ),
    };
    // SAFETY: for POSIX_FD the "pointer" is the descriptor's value (the driver's convention);
    // for FABRIC it points at the 64-byte handle, alive for the call.
    cuda.check(what, unsafe { (cuda.mem_import)(&mut h, os_handle, kind) })?;
    let size_us = size as usize;
    let mut ptr = 0u64;
    let mapped = (|| {
        // SAFETY: out-pointer to a local; alignment 0 = the default granularity.
        cuda.check("cuMemAddressReserve", unsafe {
            (cuda.address_reserve)(&mut ptr, size_us, 0, 0, 0)
        })?;
        // SAFETY: maps the whole imported allocation at the reserved range.
        if let Err(e) = cuda.check("cuMemMap", unsafe { (cuda.mem_map)(ptr, size_us, 0, h, 0) }) {
            // SAFETY: frees the reservation made above.
            unsafe { (cuda.address_free)(ptr, size_us) };
            return Err(e);
        }
        let access = MemAccessDesc { location_type: 1, location_id: gpu.dev, flags: 3 };
        // SAFETY: `ptr` maps `size` bytes; one access descriptor.
        if let Err(e) =
            cuda.check("cuMemSetAccess", unsafe { (cuda.set_access)(ptr, size_us, &access, 1) })
        {
            // SAFETY: undoes the map and reservation above.
            unsafe {
                (cuda.mem_unmap)(ptr, size_us);
                (cuda.address_free)(ptr, size_us);
            }
            return Err(e);
        }
        Ok(())
    })();
    // SAFETY: the mapping (if made) holds its own reference to the allocation.
    unsafe { (cuda.mem_release)(h) };
    mapped?;
    Ok(Imported { ptr, size, how: Mapped::Vmm, gpu })
}

impl Drop for Imported {
    fn drop(&mut self) {
        let Ok(cuda) = driver() else { return };
        let Ok(_ctx) = self.gpu.enter() else { return };
        // SAFETY: the mapping was made by `import_*` in this GPU's context and is closed once;
        // callers drop an import only after the copies using it completed.
        unsafe {
            match self.how {
                Mapped::Ipc => {
                    (cuda.ipc_close)(self.ptr);
                }
                Mapped::Vmm => {
                    (cuda.mem_unmap)(self.ptr, self.size as usize);
                    (cuda.address_free)(self.ptr, self.size as usize);
                }
            }
        }
    }
}
