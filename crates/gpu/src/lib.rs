//! tidewire-gpu: the only crate with CUDA / NVML FFI.
//!
//! The CUDA driver and NVML are loaded at run time ([`ffi`]): the build needs no toolkit, and
//! without a driver every GPU feature reports `unavailable: <reason>` while the rest of the
//! engine works. [`topology`] discovers the GPUs, their peer access, NVLinks, NVML fabric state
//! and runs a real FABRIC allocate → export probe (fabric is proven, never assumed).
//!
//! Pointer classification lives here and only here: the engine asks [`classify`] at
//! registration. GPU pointers are not classified yet (the NVLink transports come next): every
//! pointer is treated as host memory, and the bindings refuse GPU tensors with that reason.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod ffi;
#[allow(unsafe_code)]
mod topology;

use tidewire_core::memory::{Location, MemoryKind};
pub use topology::{topology, GpuInfo, Topology};

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

/// Classifies `[addr, addr+len)`. Device, pinned and managed memory need the driver's pointer
/// attributes, which the NVLink transports will query; until then every pointer is treated as
/// host pageable memory.
pub fn classify(_addr: u64, _len: u64) -> Location {
    Location { kind: MemoryKind::HostPageable, device: None }
}
