//! Exporting device memory to other processes and importing theirs: CUDA IPC handles of a
//! `cudaMalloc` allocation base, and VMM allocations as POSIX file descriptors or FABRIC
//! handles. An import is a mapping into one of our GPUs' contexts, closed on drop.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;

use crate::device::Gpu;
use crate::ffi::{self, IpcHandle};
use crate::memory::{AddressRange, IpcMapping, Mapping, PhysicalAllocation};
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

/// Exports the VMM allocation mapped at `addr` as a POSIX file descriptor.
pub fn export_fd(gpu: &'static Gpu, addr: u64) -> Result<OwnedFd, GpuError> {
    // The retained reference is released when `alloc` drops, after the export.
    let alloc = PhysicalAllocation::retain(gpu, addr)?;
    alloc.export_fd()
}

/// Exports the VMM allocation mapped at `addr` as a 64-byte FABRIC handle (fails with
/// CUDA_ERROR_NOT_PERMITTED where no IMEX channel is granted).
pub fn export_fabric(gpu: &'static Gpu, addr: u64) -> Result<[u8; 64], GpuError> {
    let alloc = PhysicalAllocation::retain(gpu, addr)?;
    alloc.export_fabric()
}

/// A shareable handle received from a peer.
pub enum Shareable<'a> {
    Fd(BorrowedFd<'a>),
    Fabric(&'a [u8; 64]),
}

/// How an import is mapped; dropping it unmaps.
#[derive(Debug)]
enum Mapped {
    Ipc(IpcMapping),
    Vmm(Mapping),
}

/// A peer's memory mapped into one of our GPUs' contexts. Unmapped on drop (a VMM import:
/// unmapped, its address range freed, the imported handle released, in that order); drop it
/// only after the copies using it completed.
#[derive(Debug)]
pub struct Imported {
    mapped: Mapped,
}

impl Imported {
    /// Where the peer's allocation base appears in this process.
    pub fn ptr(&self) -> u64 {
        match &self.mapped {
            Mapped::Ipc(m) => m.ptr(),
            Mapped::Vmm(m) => m.ptr(),
        }
    }
}

/// Opens a peer's CUDA IPC handle in `gpu`'s context (the driver maps the whole allocation).
pub fn import_ipc(gpu: &'static Gpu, handle: &[u8; 64]) -> Result<Imported, GpuError> {
    Ok(Imported { mapped: Mapped::Ipc(IpcMapping::open(gpu, handle)?) })
}

/// Imports a peer's VMM allocation of `size` bytes and maps it read-write for `gpu`. A failure
/// part-way gives back what was made: the reservation, then the imported handle.
pub fn import_vmm(
    gpu: &'static Gpu,
    handle: Shareable<'_>,
    size: u64,
) -> Result<Imported, GpuError> {
    let alloc = Arc::new(PhysicalAllocation::import(gpu, &handle)?);
    // Alignment 0: the default granularity.
    let range = AddressRange::reserve(gpu, size as usize, 0)?;
    let mapping = Mapping::map(gpu, alloc, range)?;
    Ok(Imported { mapped: Mapped::Vmm(mapping) })
}
