//! tidewire-gpu: the only crate with CUDA / NVML FFI.
//!
//! The CUDA driver and NVML are loaded at run time ([`ffi`]): the build needs no toolkit, and
//! without a driver every GPU feature reports `unavailable: <reason>` while the rest of the
//! engine works. [`topology`] discovers the GPUs, their peer access, NVLinks, NVML fabric state
//! and runs a real FABRIC allocate → export probe (fabric is proven, never assumed).
//!
//! Pointer classification lives here and only here: the engine asks [`classify`] at
//! registration. [`share`] exports and imports device memory between processes (CUDA IPC,
//! VMM POSIX-FD, VMM FABRIC), [`alloc`] makes transferable memory, [`copy`] moves bytes with
//! the copy engine or one gather-kernel launch.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod alloc;
#[allow(unsafe_code)]
pub mod copy;
#[allow(unsafe_code)]
mod device;
#[allow(unsafe_code)]
mod ffi;
#[allow(unsafe_code)]
pub mod share;
#[allow(unsafe_code)]
mod topology;

pub use device::Gpu;
use tidewire_core::memory::Location;
pub use topology::{topology, GpuInfo, Topology};

/// A failed GPU operation: the driver call and its error name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuError(pub String);

impl std::fmt::Display for GpuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GpuError {}

/// Why GPU features are not available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    pub reason: String,
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unavailable: {}", self.reason)
    }
}

/// Classifies `[addr, addr+len)` from the pointer itself: the CUDA driver's pointer
/// attributes tell device, managed and pinned host memory apart; memory the driver does not
/// know (or any memory when there is no driver) is pageable host memory.
pub fn classify(addr: u64, _len: u64) -> Location {
    topology::classify_pointer(addr)
}
