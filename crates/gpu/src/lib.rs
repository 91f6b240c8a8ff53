//! tidewire-gpu: the only crate that will hold CUDA / NVML FFI.
//!
//! This build has no GPU support yet: [`probe`] reports `unavailable` with the reason, and
//! [`classify`] sees every pointer as host memory. The GPU issue replaces both with the CUDA
//! driver loaded at run time (the build never needs a CUDA toolkit).
//!
//! Pointer classification lives here and only here: the engine asks [`classify`] at
//! registration and never trusts a caller's location string over it.
#![forbid(unsafe_code)]

use tidewire_core::memory::{Location, MemoryKind};

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

/// What the GPU layer found on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuReport {
    pub devices: usize,
}

/// Looks for GPU support. In this build it always reports why there is none.
pub fn probe() -> Result<GpuReport, Unavailable> {
    Err(Unavailable { reason: "no GPU support in this build yet (host memory only)".into() })
}

/// Classifies `[addr, addr+len)`. Without the CUDA driver every pointer is host pageable
/// memory: pinned, device and managed memory can only be told apart by asking the driver.
pub fn classify(_addr: u64, _len: u64) -> Location {
    Location { kind: MemoryKind::HostPageable, device: None }
}
