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
//!
//! Every allocation and mapping is an owning value (`memory.rs`: a VMM mapping holds an `Arc`
//! of its physical allocation; dropping it unmaps, frees the address range, then releases);
//! a driver call that fails while giving memory back is logged with its name, never a panic.
//! Failures are one typed [`GpuError`] naming the failing call, its code and its name.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod alloc;
#[allow(unsafe_code)]
pub mod coll;
#[allow(unsafe_code)]
pub mod copy;
#[allow(unsafe_code)]
mod device;
#[allow(unsafe_code)]
pub mod ep;
#[allow(unsafe_code)]
mod ffi;
#[allow(unsafe_code)]
mod kernels;
#[allow(unsafe_code)]
mod memory;
#[allow(unsafe_code)]
pub mod share;
#[allow(unsafe_code)]
mod topology;

pub use device::Gpu;
use tidewire_core::memory::Location;
pub use topology::{topology, GpuInfo, Topology};

/// A failed GPU operation, by failure class, with its context in fields.
///
/// `Display` names the failing call, the driver's error name and code
/// (`cuMemMap returned CUDA_ERROR_OUT_OF_MEMORY (2)`); callers that only report an error read
/// it through `Display`, callers that decide on it match the variant or read [`GpuError::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    /// A CUDA driver call failed: the call, its `CUresult` and the driver's name for it
    /// (`cuGetErrorName`).
    #[error("{call} returned {name} ({code})")]
    Driver { call: &'static str, code: i32, name: &'static str },
    /// No usable CUDA driver (or NVML, or NVRTC): the library is missing, lacks a symbol, or
    /// did not initialise; or discovery found no GPU. The reason says which.
    #[error("unavailable: {reason}")]
    Unavailable { reason: String },
    /// The CUDA ordinal names no GPU of this process.
    #[error("cuda:{ordinal} does not exist ({count} GPUs)")]
    NoDevice { ordinal: u32, count: u32 },
    /// NVRTC failed to build a kernel: the call, its `nvrtcResult` and the compiler's log.
    #[error("{call} returned {code}{}", log_suffix(.log))]
    Nvrtc { call: &'static str, code: i32, log: String },
    /// The caller asked for something tidewire cannot do (a zero-length allocation, freeing a
    /// pointer tidewire did not allocate, ...).
    #[error("{what}")]
    Invalid { what: String },
    /// A state that cannot happen: a bug in tidewire.
    #[error("internal error (a bug in tidewire): {0}")]
    Internal(&'static str),
}

fn log_suffix(log: &str) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!(": {log}")
    }
}

impl GpuError {
    /// The failing call's result code (`CUresult` or `nvrtcResult`), when a call failed.
    pub fn code(&self) -> Option<i32> {
        match self {
            Self::Driver { code, .. } | Self::Nvrtc { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The name of the failing driver or NVRTC call (`cuMemMap`), when a call failed.
    pub fn call(&self) -> Option<&'static str> {
        match self {
            Self::Driver { call, .. } | Self::Nvrtc { call, .. } => Some(call),
            _ => None,
        }
    }

    /// The driver's name for the error (`CUDA_ERROR_NOT_PERMITTED`), for a failed driver call.
    pub fn name(&self) -> Option<&'static str> {
        match self {
            Self::Driver { name, .. } => Some(name),
            _ => None,
        }
    }

    /// Whether this is [`GpuError::Unavailable`]: no GPU support in this process at all.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }

    pub(crate) fn unavailable(reason: impl Into<String>) -> Self {
        Self::Unavailable { reason: reason.into() }
    }

    pub(crate) fn invalid(what: impl Into<String>) -> Self {
        Self::Invalid { what: what.into() }
    }
}

/// Classifies `[addr, addr+len)` from the pointer itself: the CUDA driver's pointer
/// attributes tell device, managed and pinned host memory apart; memory the driver does not
/// know (or any memory when there is no driver) is pageable host memory.
pub fn classify(addr: u64, _len: u64) -> Location {
    topology::classify_pointer(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver_error() -> GpuError {
        GpuError::Driver { call: "cuMemMap", code: 2, name: "CUDA_ERROR_OUT_OF_MEMORY" }
    }

    #[test]
    fn driver_error_names_call_name_and_code() {
        let e = driver_error();
        assert_eq!(e.to_string(), "cuMemMap returned CUDA_ERROR_OUT_OF_MEMORY (2)");
        assert_eq!(e.call(), Some("cuMemMap"));
        assert_eq!(e.code(), Some(2));
        assert_eq!(e.name(), Some("CUDA_ERROR_OUT_OF_MEMORY"));
        assert!(!e.is_unavailable());
    }

    #[test]
    fn nvrtc_error_carries_the_log() {
        let e = GpuError::Nvrtc {
            call: "nvrtcCompileProgram",
            code: 6,
            log: "tw_gather.cu(3): error: expected a \";\"".into(),
        };
        assert_eq!(
            e.to_string(),
            "nvrtcCompileProgram returned 6: tw_gather.cu(3): error: expected a \";\""
        );
        assert_eq!((e.call(), e.code(), e.name()), (Some("nvrtcCompileProgram"), Some(6), None));
        let bare = GpuError::Nvrtc { call: "nvrtcCreateProgram", code: 5, log: String::new() };
        assert_eq!(bare.to_string(), "nvrtcCreateProgram returned 5");
    }

    #[test]
    fn other_variants_read_well_and_have_no_call() {
        let cases = [
            (
                GpuError::unavailable("libcuda.so.1 not loadable: no such file"),
                "unavailable: libcuda.so.1 not loadable: no such file",
            ),
            (GpuError::NoDevice { ordinal: 3, count: 2 }, "cuda:3 does not exist (2 GPUs)"),
            (
                GpuError::invalid("0x1000 was not allocated by tidewire"),
                "0x1000 was not allocated by tidewire",
            ),
            (
                GpuError::Internal("allocation table poisoned"),
                "internal error (a bug in tidewire): allocation table poisoned",
            ),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
            assert_eq!((e.call(), e.code(), e.name()), (None, None, None), "{e}");
        }
        assert!(GpuError::unavailable("x").is_unavailable());
    }

    #[test]
    fn errors_are_std_errors_and_compare() {
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(driver_error());
        assert_eq!(boxed.to_string(), driver_error().to_string());
        assert_eq!(driver_error(), driver_error().clone());
        assert_ne!(driver_error(), GpuError::Internal("x"));
    }

    /// Without a CUDA driver (this crate's CI machines) every entry point reports
    /// `Unavailable` instead of panicking; on a GPU host there is nothing to check here.
    #[test]
    #[allow(unsafe_code)]
    fn without_a_driver_everything_is_unavailable() {
        if topology::driver().is_ok() {
            eprintln!("skipped: a CUDA driver is loaded on this machine");
            return;
        }
        let unavailable = |what: &str, r: Result<(), GpuError>| match r {
            Err(e) => assert!(
                e.is_unavailable() && e.to_string().starts_with("unavailable: "),
                "{what}: {e}"
            ),
            Ok(()) => panic!("{what} succeeded without a driver"),
        };
        unavailable("topology", topology().map(|_| ()));
        unavailable("Gpu::get", Gpu::get(0).map(|_| ()));
        unavailable("alloc_device", alloc::alloc_device(1 << 20, 0, None).map(|_| ()));
        for kind in [
            alloc::AllocKind::VmmFabric,
            alloc::AllocKind::VmmPosixFd,
            alloc::AllocKind::Malloc,
            alloc::AllocKind::HostPinned,
        ] {
            unavailable(kind.name(), alloc::alloc_device(4096, 0, Some(kind)).map(|_| ()));
        }
        unavailable("alloc_host", alloc::alloc_host(4096).map(|_| ()));
        unavailable("HostFlag::new", alloc::HostFlag::new(1).map(|_| ()));
        let (mut a, b) = (0u64, 7u64);
        let (dst, src) = (&mut a as *mut u64 as u64, &b as *const u64 as u64);
        // SAFETY: both are live 8-byte locals; without a driver nothing is copied.
        unavailable("copy_sync", unsafe { alloc::copy_sync(dst, src, 8) });
        // SAFETY: as above.
        unavailable("copy_sync_on", unsafe { alloc::copy_sync_on(0, dst, src, 8) });
        assert_eq!(classify(src, 8).kind, tidewire_core::memory::MemoryKind::HostPageable);
    }

    #[test]
    fn misuse_is_invalid_not_a_panic() {
        match alloc::alloc_device(0, 0, None) {
            Err(GpuError::Invalid { what }) => assert_eq!(what, "zero-length allocation"),
            other => panic!("{other:?}"),
        }
        match alloc::free(0xdead_0000) {
            Err(GpuError::Invalid { what }) => {
                assert_eq!(what, "0xdead0000 was not allocated by tidewire")
            }
            other => panic!("{other:?}"),
        }
        assert!(alloc::lookup(0xdead_0000).is_none());
    }
}
