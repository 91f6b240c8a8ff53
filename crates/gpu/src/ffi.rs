//! The CUDA driver and NVML, loaded at run time (`libcuda.so.1`, `libnvidia-ml.so.1`): the
//! build needs no CUDA toolkit, and a machine without a driver gets a reason, not a crash.
//! Every symbol is looked up before use; a missing one is an error naming it.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::mem::ManuallyDrop;

use libloading::Library;

use crate::GpuError;

pub(crate) type CuResult = c_int;
pub(crate) type CuDevice = c_int;
pub(crate) type CuContext = *mut c_void;
pub(crate) type CuStream = *mut c_void;
pub(crate) type CuEvent = *mut c_void;
pub(crate) type CuModule = *mut c_void;
pub(crate) type CuFunction = *mut c_void;
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

pub(crate) const ATTR_SM_COUNT: c_int = 16;
pub(crate) const ATTR_CC_MAJOR: c_int = 75;
pub(crate) const ATTR_CC_MINOR: c_int = 76;

pub(crate) const HANDLE_POSIX_FD: c_int = 1;
pub(crate) const HANDLE_FABRIC: c_int = 8;
pub(crate) const NOT_READY: CuResult = 600;

pub(crate) const POINTER_MEMORY_TYPE: c_int = 2;
pub(crate) const POINTER_IS_MANAGED: c_int = 8;
pub(crate) const POINTER_DEVICE_ORDINAL: c_int = 9;
pub(crate) const POINTER_LEGACY_IPC: c_int = 10;
pub(crate) const POINTER_RANGE_START: c_int = 11;
pub(crate) const POINTER_RANGE_SIZE: c_int = 12;
pub(crate) const POINTER_ALLOWED_HANDLES: c_int = 14;
pub(crate) const POINTER_MAPPING_SIZE: c_int = 18;
pub(crate) const POINTER_MAPPING_BASE: c_int = 19;
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

impl MemAllocationProp {
    /// Pinned device memory on `dev`, exportable as `handle_types`.
    pub(crate) fn device(dev: CuDevice, handle_types: c_int, gpu_direct_rdma: bool) -> Self {
        Self {
            alloc_type: 1,
            requested_handle_types: handle_types,
            location_type: 1,
            location_id: dev,
            win32_metadata: std::ptr::null_mut(),
            compression_type: 0,
            gpu_direct_rdma_capable: u8::from(gpu_direct_rdma),
            usage: 0,
            reserved: [0; 4],
        }
    }
}

/// `CUmemAccessDesc`.
#[repr(C)]
pub(crate) struct MemAccessDesc {
    pub(crate) location_type: c_int,
    pub(crate) location_id: c_int,
    pub(crate) flags: c_int,
}

/// `CUipcMemHandle`, passed by value to `cuIpcOpenMemHandle`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct IpcHandle {
    pub(crate) reserved: [u8; 64],
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
    /// Never unloaded, even when this value is dropped: the error names [`Cuda::name`] hands
    /// out as `&'static str` point into the library, and the driver is not meant to be
    /// unloaded from a process anyway.
    _lib: ManuallyDrop<Library>,
    pub(crate) init: unsafe extern "C" fn(c_uint) -> CuResult,
    pub(crate) driver_version: unsafe extern "C" fn(*mut c_int) -> CuResult,
    pub(crate) device_count: unsafe extern "C" fn(*mut c_int) -> CuResult,
    pub(crate) device_get: unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult,
    pub(crate) device_name: unsafe extern "C" fn(*mut c_char, c_int, CuDevice) -> CuResult,
    pub(crate) device_uuid: unsafe extern "C" fn(*mut [u8; 16], CuDevice) -> CuResult,
    pub(crate) device_attribute: unsafe extern "C" fn(*mut c_int, c_int, CuDevice) -> CuResult,
    pub(crate) can_access_peer: unsafe extern "C" fn(*mut c_int, CuDevice, CuDevice) -> CuResult,
    pub(crate) primary_ctx_retain: unsafe extern "C" fn(*mut CuContext, CuDevice) -> CuResult,
    pub(crate) mem_granularity:
        unsafe extern "C" fn(*mut usize, *const MemAllocationProp, c_int) -> CuResult,
    pub(crate) mem_create:
        unsafe extern "C" fn(*mut u64, usize, *const MemAllocationProp, u64) -> CuResult,
    pub(crate) mem_release: unsafe extern "C" fn(u64) -> CuResult,
    pub(crate) mem_export: unsafe extern "C" fn(*mut c_void, u64, c_int, u64) -> CuResult,
    pub(crate) pointer_attribute: unsafe extern "C" fn(*mut c_void, c_int, u64) -> CuResult,
    pub(crate) ctx_push: unsafe extern "C" fn(CuContext) -> CuResult,
    pub(crate) ctx_pop: unsafe extern "C" fn(*mut CuContext) -> CuResult,
    pub(crate) ctx_synchronize: unsafe extern "C" fn() -> CuResult,
    pub(crate) capture_mode: unsafe extern "C" fn(*mut c_int) -> CuResult,
    pub(crate) mem_alloc: unsafe extern "C" fn(*mut u64, usize) -> CuResult,
    pub(crate) mem_free: unsafe extern "C" fn(u64) -> CuResult,
    pub(crate) host_alloc: unsafe extern "C" fn(*mut *mut c_void, usize, c_uint) -> CuResult,
    pub(crate) host_free: unsafe extern "C" fn(*mut c_void) -> CuResult,
    pub(crate) address_range: unsafe extern "C" fn(*mut u64, *mut usize, u64) -> CuResult,
    pub(crate) ipc_get: unsafe extern "C" fn(*mut IpcHandle, u64) -> CuResult,
    pub(crate) ipc_open: unsafe extern "C" fn(*mut u64, IpcHandle, c_uint) -> CuResult,
    pub(crate) ipc_close: unsafe extern "C" fn(u64) -> CuResult,
    pub(crate) address_reserve: unsafe extern "C" fn(*mut u64, usize, usize, u64, u64) -> CuResult,
    pub(crate) address_free: unsafe extern "C" fn(u64, usize) -> CuResult,
    pub(crate) mem_map: unsafe extern "C" fn(u64, usize, usize, u64, u64) -> CuResult,
    pub(crate) mem_unmap: unsafe extern "C" fn(u64, usize) -> CuResult,
    pub(crate) set_access:
        unsafe extern "C" fn(u64, usize, *const MemAccessDesc, usize) -> CuResult,
    pub(crate) mem_import: unsafe extern "C" fn(*mut u64, *mut c_void, c_int) -> CuResult,
    pub(crate) retain_handle: unsafe extern "C" fn(*mut u64, *mut c_void) -> CuResult,
    pub(crate) stream_create: unsafe extern "C" fn(*mut CuStream, c_uint) -> CuResult,
    pub(crate) stream_wait_event: unsafe extern "C" fn(CuStream, CuEvent, c_uint) -> CuResult,
    pub(crate) event_create: unsafe extern "C" fn(*mut CuEvent, c_uint) -> CuResult,
    pub(crate) event_record: unsafe extern "C" fn(CuEvent, CuStream) -> CuResult,
    pub(crate) event_query: unsafe extern "C" fn(CuEvent) -> CuResult,
    pub(crate) memcpy_async: unsafe extern "C" fn(u64, u64, usize, CuStream) -> CuResult,
    pub(crate) memcpy: unsafe extern "C" fn(u64, u64, usize) -> CuResult,
    pub(crate) memset_d8: unsafe extern "C" fn(u64, u8, usize) -> CuResult,
    pub(crate) mem_get_info: unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult,
    pub(crate) module_load_data: unsafe extern "C" fn(*mut CuModule, *const c_void) -> CuResult,
    pub(crate) module_function:
        unsafe extern "C" fn(*mut CuFunction, CuModule, *const c_char) -> CuResult,
    #[allow(clippy::type_complexity)]
    pub(crate) launch: unsafe extern "C" fn(
        CuFunction,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        CuStream,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> CuResult,
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
                mem_granularity: sym(&lib, "cuMemGetAllocationGranularity")?,
                mem_create: sym(&lib, "cuMemCreate")?,
                mem_release: sym(&lib, "cuMemRelease")?,
                mem_export: sym(&lib, "cuMemExportToShareableHandle")?,
                pointer_attribute: sym(&lib, "cuPointerGetAttribute")?,
                ctx_push: sym(&lib, "cuCtxPushCurrent_v2")?,
                ctx_pop: sym(&lib, "cuCtxPopCurrent_v2")?,
                ctx_synchronize: sym(&lib, "cuCtxSynchronize")?,
                capture_mode: sym(&lib, "cuThreadExchangeStreamCaptureMode")?,
                mem_alloc: sym(&lib, "cuMemAlloc_v2")?,
                mem_free: sym(&lib, "cuMemFree_v2")?,
                host_alloc: sym(&lib, "cuMemHostAlloc")?,
                host_free: sym(&lib, "cuMemFreeHost")?,
                address_range: sym(&lib, "cuMemGetAddressRange_v2")?,
                ipc_get: sym(&lib, "cuIpcGetMemHandle")?,
                ipc_open: sym(&lib, "cuIpcOpenMemHandle_v2")?,
                ipc_close: sym(&lib, "cuIpcCloseMemHandle")?,
                address_reserve: sym(&lib, "cuMemAddressReserve")?,
                address_free: sym(&lib, "cuMemAddressFree")?,
                mem_map: sym(&lib, "cuMemMap")?,
                mem_unmap: sym(&lib, "cuMemUnmap")?,
                set_access: sym(&lib, "cuMemSetAccess")?,
                mem_import: sym(&lib, "cuMemImportFromShareableHandle")?,
                retain_handle: sym(&lib, "cuMemRetainAllocationHandle")?,
                stream_create: sym(&lib, "cuStreamCreate")?,
                stream_wait_event: sym(&lib, "cuStreamWaitEvent")?,
                event_create: sym(&lib, "cuEventCreate")?,
                event_record: sym(&lib, "cuEventRecord")?,
                event_query: sym(&lib, "cuEventQuery")?,
                memcpy_async: sym(&lib, "cuMemcpyAsync")?,
                memcpy: sym(&lib, "cuMemcpy")?,
                memset_d8: sym(&lib, "cuMemsetD8_v2")?,
                mem_get_info: sym(&lib, "cuMemGetInfo_v2")?,
                module_load_data: sym(&lib, "cuModuleLoadData")?,
                module_function: sym(&lib, "cuModuleGetFunction")?,
                launch: sym(&lib, "cuLaunchKernel")?,
                error_name: sym(&lib, "cuGetErrorName")?,
                _lib: ManuallyDrop::new(lib),
            })
        }
    }

    /// The symbolic name of a CUDA error code (`CUDA_ERROR_NOT_PERMITTED`).
    pub(crate) fn name(&self, code: CuResult) -> &'static str {
        const UNNAMED: &str = "an error the driver cannot name";
        let mut p: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorName writes a pointer to a static string or fails.
        let r = unsafe { (self.error_name)(code, &mut p) };
        if r != 0 || p.is_null() {
            return UNNAMED;
        }
        // SAFETY: on success `p` points at a NUL-terminated string in the driver library's
        // static data, which stays mapped for the process: the library is never unloaded
        // (`_lib` is `ManuallyDrop`).
        let name: &'static CStr = unsafe { CStr::from_ptr(p) };
        name.to_str().unwrap_or(UNNAMED)
    }

    /// `Ok` for success, else [`GpuError::Driver`] naming `call`.
    pub(crate) fn check(&self, call: &'static str, code: CuResult) -> Result<(), GpuError> {
        if code == 0 {
            Ok(())
        } else {
            Err(GpuError::Driver { call, code, name: self.name(code) })
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

type NvrtcProgram = *mut c_void;

/// NVRTC, loaded at run time to compile the gather kernel.
pub(crate) struct Nvrtc {
    _lib: Library,
    pub(crate) create: unsafe extern "C" fn(
        *mut NvrtcProgram,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    pub(crate) compile: unsafe extern "C" fn(NvrtcProgram, c_int, *const *const c_char) -> c_int,
    pub(crate) ptx_size: unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int,
    pub(crate) ptx: unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int,
    pub(crate) log_size: unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int,
    pub(crate) log: unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int,
    pub(crate) destroy: unsafe extern "C" fn(*mut NvrtcProgram) -> c_int,
}

/// Where NVRTC is looked for: `TIDEWIRE_NVRTC`, the loader's path, then the toolkit's usual
/// places.
fn nvrtc_candidates() -> Vec<String> {
    let mut v: Vec<String> = std::env::var("TIDEWIRE_NVRTC").into_iter().collect();
    for dir in ["", "/usr/local/cuda/lib64/", "/usr/local/cuda/targets/x86_64-linux/lib/"] {
        for name in ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"] {
            v.push(format!("{dir}{name}"));
        }
    }
    v
}

impl Nvrtc {
    pub(crate) fn load() -> Result<Self, String> {
        let mut tried = Vec::new();
        for path in nvrtc_candidates() {
            // SAFETY: loading NVRTC runs its initialisers, as any program using it does.
            match unsafe { Library::new(&path) } {
                Ok(lib) => {
                    // SAFETY (every `sym`): NVRTC's C signatures.
                    return unsafe {
                        Ok(Self {
                            create: sym(&lib, "nvrtcCreateProgram")?,
                            compile: sym(&lib, "nvrtcCompileProgram")?,
                            ptx_size: sym(&lib, "nvrtcGetPTXSize")?,
                            ptx: sym(&lib, "nvrtcGetPTX")?,
                            log_size: sym(&lib, "nvrtcGetProgramLogSize")?,
                            log: sym(&lib, "nvrtcGetProgramLog")?,
                            destroy: sym(&lib, "nvrtcDestroyProgram")?,
                            _lib: lib,
                        })
                    };
                }
                Err(e) => tried.push(format!("{path}: {e}")),
            }
        }
        Err(format!("NVRTC not found ({})", tried.first().map_or("", |s| s.as_str())))
    }
}
