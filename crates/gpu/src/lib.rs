//! tidewire-gpu: the only crate with CUDA / NVML FFI.
//!
//! The CUDA driver and NVML are loaded at run time ([`ffi`]): the build needs no toolkit, and
//! without a driver every GPU feature reports `unavailable: <reason>` while the rest of the
//! engine works. [`topology`] discovers the GPUs, their peer access, NVLinks, NVML fabric state
//! and runs a real FABRIC allocate → export probe (fabric is proven, never assumed).
//!
//! Pointer classification lives here and only here: the engine asks [`classify`] at
//! registration. Device and managed memory are recognised (and advertised for no transport
//! until the NVLink transports land, so requests on them fail at submit with the reasons).
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod ffi;
#[allow(unsafe_code)]
mod topology;

use tidewire_core::memory::Location;
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

/// Classifies `[addr, addr+len)` from the pointer itself: the CUDA driver's pointer
/// attributes tell device, managed and pinned host memory apart; memory the driver does not
/// know (or any memory when there is no driver) is pageable host memory.
pub fn classify(addr: u64, _len: u64) -> Location {
    topology::classify_pointer(addr)
}
