//! The CUDA driver and NVML, loaded at run time (`libcuda.so.1`, `libnvidia-ml.so.1`): the
//! build needs no CUDA toolkit, and a machine without a driver gets a reason, not a crash.
//! Every symbol is looked up before use; a missing one is an error naming it.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use libloading::Library;

pub(crate) type CuResult = c_int;
pub(crate) type CuDevice = c_int;
pub(crate) type CuContext = *mut c_void;
pub(crate) type NvmlReturn = c_int;
pub(crate) type NvmlDevice = *mut c_void;

pub(crate) const ATTR_PCI_BUS_ID: c_int = 33;
pub(crate) const ATTR_PCI_DEVICE_ID: c_int = 34;
pub(crate) const ATTR_PCI_DOMAIN_ID: c_int = 50;
pub(crate) const ATTR_VMM: c_int = 102;
pub(crate) const ATTR_POSIX_FD: c_int = 103;
pub(crate) const ATTR_GDR: c_int = 116;
pub(crate) const ATTR_FABRIC: c_int = 128;
pub(crate) const ATTR_HOST_NUMA_ID: c_int = 134;

pub(crate) const HANDLE_FABRIC: c_int = 8;

pub(crate) const POINTER_MEMORY_TYPE: c_int = 2;
pub(crate) const POINTER_IS_MANAGED: c_int = 8;
pub(crate) const POINTER_DEVICE_ORDINAL: c_int = 9;
pub(crate) const MEMORYTYPE_HOST: c_uint = 1;
pub(crate) const MEMORYTYPE_DEVICE: c_uint = 2;

/// `CUmemAllocationProp`.
#[repr(C)]
pub(crate) struct MemAllocationProp {
    pub(crate) alloc_type: c_int,
    pub(crate) requested_handle_types: c_int,
    pub(crate) location_type: c_int,
    pub(crate) location_id: c_int,
    pub(crate) win32_metadata: *mut c_void,
    pub(crate) compression_type: u8,
    pub(crate) gpu_direct_rdma_capable: u8,
    pub(crate) usage: u16,
    pub(crate) reserved: [u8; 4],
}

/// `nvmlGpuFabricInfo_v2_t`.
#[repr(C)]
pub(crate) struct NvmlFabricInfoV2 {
    pub(crate) version: c_uint,
    pub(crate) cluster_uuid: [u8; 16],
    pub(crate) status: NvmlReturn,
    pub(crate) clique_id: c_uint,
    pub(crate) state: u8,
    pub(crate) health_mask: c_uint,
}
pub(crate) const NVML_FABRIC_INFO_V2: c_uint = 0x0200_0024;
const _: () = assert!(size_of::<NvmlFabricInfoV2>() == 36);
const _: () = assert!(size_of::<MemAllocationProp>() == 32);

/// Looks up `name` in `lib` as a function of type `T`.
///
/// # Safety
/// `T` must be the exact C signature of the symbol.
unsafe fn sym<T: Copy>(lib: &Library, name: &'static str) -> Result<T, String> {
    let cname = format!("{name}\0");
    // SAFETY: the caller guarantees `T` matches the symbol's signature.
    unsafe { lib.get::<T>(cname.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| format!("{name} missing: {e}"))
}

/// The driver entry points tidewire uses.
pub(crate) struct Cuda {
    _lib: Library,
    pub(crate) init: unsafe extern "C" fn(c_uint) -> CuResult,
    pub(crate) driver_version: unsafe extern "C" fn(*mut c_int) -> CuResult,
    pub(crate) device_count: unsafe extern "C" fn(*mut c_int) -> CuResult,
    pub(crate) device_get: unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult,
    pub(crate) device_name: unsafe extern "C" fn(*mut c_char, c_int, CuDevice) -> CuResult,
    pub(crate) device_uuid: unsafe extern "C" fn(*mut [u8; 16], CuDevice) -> CuResult,
    pub(crate) device_attribute: unsafe extern "C" fn(*mut c_int, c_int, CuDevice) -> CuResult,
    pub(crate) can_access_peer: unsafe extern "C" fn(*mut c_int, CuDevice, CuDevice) -> CuResult,
    pub(crate) primary_ctx_retain: unsafe extern "C" fn(*mut CuContext, CuDevice) -> CuResult,
    pub(crate) primary_ctx_release: unsafe extern "C" fn(CuDevice) -> CuResult,
    pub(crate) ctx_set_current: unsafe extern "C" fn(CuContext) -> CuResult,
    pub(crate) mem_granularity:
        unsafe extern "C" fn(*mut usize, *const MemAllocationProp, c_int) -> CuResult,
    pub(crate) mem_create:
        unsafe extern "C" fn(*mut u64, usize, *const MemAllocationProp, u64) -> CuResult,
    pub(crate) mem_release: unsafe extern "C" fn(u64) -> CuResult,
    pub(crate) mem_export: unsafe extern "C" fn(*mut c_void, u64, c_int, u64) -> CuResult,
    pub(crate) pointer_attribute: unsafe extern "C" fn(*mut c_void, c_int, u64) -> CuResult,
    error_name: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
}

impl Cuda {
    pub(crate) fn load() -> Result<Self, String> {
        // SAFETY: loading the system's CUDA driver library runs its initialisers, which is what
        // every CUDA program does.
        let lib = unsafe { Library::new("libcuda.so.1") }
            .map_err(|e| format!("libcuda.so.1 not loadable: {e}"))?;
        // SAFETY (every `sym` below): the types are the CUDA driver API's C signatures.
        unsafe {
            Ok(Self {
                init: sym(&lib, "cuInit")?,
                driver_version: sym(&lib, "cuDriverGetVersion")?,
                device_count: sym(&lib, "cuDeviceGetCount")?,
                device_get: sym(&lib, "cuDeviceGet")?,
                device_name: sym(&lib, "cuDeviceGetName")?,
                device_uuid: sym(&lib, "cuDeviceGetUuid_v2")
                    .or_else(|_| sym(&lib, "cuDeviceGetUuid"))?,
                device_attribute: sym(&lib, "cuDeviceGetAttribute")?,
                can_access_peer: sym(&lib, "cuDeviceCanAccessPeer")?,
                primary_ctx_retain: sym(&lib, "cuDevicePrimaryCtxRetain")?,
                primary_ctx_release: sym(&lib, "cuDevicePrimaryCtxRelease_v2")
                    .or_else(|_| sym(&lib, "cuDevicePrimaryCtxRelease"))?,
                ctx_set_current: sym(&lib, "cuCtxSetCurrent")?,
                mem_granularity: sym(&lib, "cuMemGetAllocationGranularity")?,
                mem_create: sym(&lib, "cuMemCreate")?,
                mem_release: sym(&lib, "cuMemRelease")?,
                mem_export: sym(&lib, "cuMemExportToShareableHandle")?,
                pointer_attribute: sym(&lib, "cuPointerGetAttribute")?,
                error_name: sym(&lib, "cuGetErrorName")?,
                _lib: lib,
            })
        }
    }

    /// The symbolic name of a CUDA error code (`CUDA_ERROR_NOT_PERMITTED`).
    pub(crate) fn name(&self, code: CuResult) -> String {
        let mut p: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorName writes a pointer to a static string or fails.
        let r = unsafe { (self.error_name)(code, &mut p) };
        if r != 0 || p.is_null() {
            return format!("CUDA error {code}");
        }
        // SAFETY: on success `p` points at a NUL-terminated static string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// `Ok` or "`call` returned NAME (code)".
    pub(crate) fn check(&self, call: &str, code: CuResult) -> Result<(), String> {
        if code == 0 {
            Ok(())
        } else {
            Err(format!("{call} returned {} ({code})", self.name(code)))
        }
    }
}

/// The NVML entry points tidewire uses.
pub(crate) struct Nvml {
    _lib: Library,
    pub(crate) by_pci: unsafe extern "C" fn(*const c_char, *mut NvmlDevice) -> NvmlReturn,
    pub(crate) fabric_info:
        Option<unsafe extern "C" fn(NvmlDevice, *mut NvmlFabricInfoV2) -> NvmlReturn>,
    pub(crate) nvlink_state:
        Option<unsafe extern "C" fn(NvmlDevice, c_uint, *mut c_int) -> NvmlReturn>,
    error_string: unsafe extern "C" fn(NvmlReturn) -> *const c_char,
}

impl Nvml {
    pub(crate) fn load() -> Result<Self, String> {
        // SAFETY: loading the system's NVML library, as nvidia-smi does.
        let lib = unsafe { Library::new("libnvidia-ml.so.1") }
            .map_err(|e| format!("libnvidia-ml.so.1 not loadable: {e}"))?;
        // SAFETY (every `sym` below): the types are NVML's C signatures.
        unsafe {
            let init: unsafe extern "C" fn() -> NvmlReturn = sym(&lib, "nvmlInit_v2")?;
            let r = init();
            if r != 0 {
                return Err(format!("nvmlInit_v2 returned {r}"));
            }
            Ok(Self {
                by_pci: sym(&lib, "nvmlDeviceGetHandleByPciBusId_v2")?,
                fabric_info: sym(&lib, "nvmlDeviceGetGpuFabricInfoV").ok(),
                nvlink_state: sym(&lib, "nvmlDeviceGetNvLinkState").ok(),
                error_string: sym(&lib, "nvmlErrorString")?,
                _lib: lib,
            })
        }
    }

    pub(crate) fn message(&self, r: NvmlReturn) -> String {
        // SAFETY: nvmlErrorString returns a static NUL-terminated string for any code.
        let p = unsafe { (self.error_string)(r) };
        if p.is_null() {
            return format!("NVML error {r}");
        }
        // SAFETY: non-null, NUL-terminated, static.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}
