//! GPU discovery: devices, peer access, NVLink counts, NVML fabric info, IMEX channels and a
//! real FABRIC allocate → export probe per GPU. Run once per process and cached.

use std::ffi::c_int;
use std::sync::OnceLock;

use tidewire_core::fabric::FabricEvidence;
use tidewire_core::memory::{Location, MemoryKind};

use crate::device::Gpu;
use crate::ffi::{self, Cuda, MemAllocationProp, Nvml, NvmlFabricInfoV2};
use crate::memory::{HandleKind, PhysicalAllocation};
use crate::GpuError;

/// One GPU as the driver describes it.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    /// `0000:18:00.0`.
    pub pci_bus_id: String,
    /// From sysfs; `None` when the platform does not say.
    pub numa_node: Option<i32>,
    /// CUDA VMM (`cuMemCreate`) supported.
    pub vmm: bool,
    /// VMM memory exportable as a POSIX file descriptor.
    pub posix_fd: bool,
    /// The FABRIC handle attribute. True on every Hopper GPU: never proof of a fabric.
    pub fabric_attr: bool,
    pub gpu_direct_rdma: bool,
    /// Active NVLinks (NVML), `None` when NVML could not say.
    pub nvlinks: Option<u32>,
    /// What NVML and the FABRIC probe said.
    pub fabric: FabricEvidence,
}

/// Every GPU of this host and how they connect.
#[derive(Debug, Clone)]
pub struct Topology {
    /// `cuDriverGetVersion` (13000 for CUDA 13.0).
    pub driver_version: i32,
    pub gpus: Vec<GpuInfo>,
    /// `peer_access[i][j]`: GPU i can map GPU j's memory.
    pub peer_access: Vec<Vec<bool>>,
    /// Why NVML was not available, if it was not.
    pub nvml_error: Option<String>,
}

/// The cached topology, or why there is none (always [`GpuError::Unavailable`]).
pub fn topology() -> Result<&'static Topology, GpuError> {
    static TOPO: OnceLock<Result<Topology, GpuError>> = OnceLock::new();
    TOPO.get_or_init(discover).as_ref().map_err(Clone::clone)
}

fn imex_channels() -> bool {
    std::fs::read_dir("/dev/nvidia-caps-imex-channels").is_ok_and(|mut d| d.next().is_some())
}

/// The CUDA driver, loaded and initialised once per process; [`GpuError::Unavailable`] when
/// there is none or `cuInit` fails (no GPU, driver/library mismatch).
pub(crate) fn driver() -> Result<&'static Cuda, GpuError> {
    static DRIVER: OnceLock<Result<Cuda, GpuError>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            let cuda = Cuda::load().map_err(GpuError::unavailable)?;
            // SAFETY: cuInit(0) is the documented first call; the library stays loaded.
            cuda.check("cuInit", unsafe { (cuda.init)(0) })
                .map_err(|e| GpuError::unavailable(e.to_string()))?;
            Ok(cuda)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Every failure is [`GpuError::Unavailable`], with the failing call's text as the reason.
fn discover() -> Result<Topology, GpuError> {
    let unavailable = |e: GpuError| GpuError::unavailable(e.to_string());
    let cuda = driver()?;
    let mut version = 0;
    // SAFETY: out-pointer to a local.
    cuda.check("cuDriverGetVersion", unsafe { (cuda.driver_version)(&mut version) })
        .map_err(unavailable)?;
    let mut count = 0;
    // SAFETY: out-pointer to a local.
    cuda.check("cuDeviceGetCount", unsafe { (cuda.device_count)(&mut count) })
        .map_err(unavailable)?;
    if count == 0 {
        return Err(GpuError::unavailable("the CUDA driver reports no GPU"));
    }
    let nvml = Nvml::load();
    let imex = imex_channels();
    let mut devices = Vec::new();
    for i in 0..count {
        let mut dev = 0;
        // SAFETY: out-pointer to a local; `i` is below the device count.
        cuda.check("cuDeviceGet", unsafe { (cuda.device_get)(&mut dev, i) })
            .map_err(unavailable)?;
        devices.push(dev);
    }
    let gpus = devices
        .iter()
        .enumerate()
        .map(|(i, &dev)| {
            describe(cuda, nvml.as_ref().ok(), nvml.as_ref().err(), i as u32, dev, imex)
        })
        .collect();
    let peer_access = devices
        .iter()
        .map(|&a| {
            devices
                .iter()
                .map(|&b| {
                    if a == b {
                        return true;
                    }
                    let mut can = 0;
                    // SAFETY: out-pointer to a local; both are valid device handles.
                    let r = unsafe { (cuda.can_access_peer)(&mut can, a, b) };
                    r == 0 && can == 1
                })
                .collect()
        })
        .collect();
    Ok(Topology { driver_version: version, gpus, peer_access, nvml_error: nvml.err() })
}

fn attr(cuda: &Cuda, dev: ffi::CuDevice, a: c_int) -> Option<c_int> {
    let mut v = 0;
    // SAFETY: out-pointer to a local; `dev` is a valid device handle.
    (unsafe { (cuda.device_attribute)(&mut v, a, dev) } == 0).then_some(v)
}

fn describe(
    cuda: &Cuda,
    nvml: Option<&Nvml>,
    nvml_err: Option<&String>,
    index: u32,
    dev: ffi::CuDevice,
    imex: bool,
) -> GpuInfo {
    let mut name = [0 as std::ffi::c_char; 256];
    // SAFETY: the buffer holds 256 bytes and its length is passed.
    let name = if unsafe { (cuda.device_name)(name.as_mut_ptr(), 256, dev) } == 0 {
        // SAFETY: on success the driver wrote a NUL-terminated string into the buffer.
        unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned()
    } else {
        "?".into()
    };
    let mut uuid = [0u8; 16];
    // SAFETY: out-pointer to a 16-byte CUuuid.
    let uuid = if unsafe { (cuda.device_uuid)(&mut uuid, dev) } == 0 {
        let h: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
        format!("GPU-{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
    } else {
        "?".into()
    };
    let pci = format!(
        "{:08x}:{:02x}:{:02x}.0",
        attr(cuda, dev, ffi::ATTR_PCI_DOMAIN_ID).unwrap_or(0),
        attr(cuda, dev, ffi::ATTR_PCI_BUS_ID).unwrap_or(0),
        attr(cuda, dev, ffi::ATTR_PCI_DEVICE_ID).unwrap_or(0)
    );
    let sys = format!("/sys/bus/pci/devices/{}/numa_node", &pci[4..]);
    let numa_node = std::fs::read_to_string(sys)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .or_else(|| attr(cuda, dev, ffi::ATTR_HOST_NUMA_ID))
        .filter(|n: &i32| *n >= 0);
    let flag = |a| attr(cuda, dev, a) == Some(1);
    let (nvlinks, fabric_nvml) = nvml_facts(nvml, nvml_err, &pci);
    let fabric = FabricEvidence {
        imex_channels: imex,
        probe: fabric_probe(cuda, index, dev),
        ..fabric_nvml
    };
    GpuInfo {
        index,
        name,
        uuid,
        pci_bus_id: pci,
        numa_node,
        vmm: flag(ffi::ATTR_VMM),
        posix_fd: flag(ffi::ATTR_POSIX_FD),
        fabric_attr: flag(ffi::ATTR_FABRIC),
        gpu_direct_rdma: flag(ffi::ATTR_GDR),
        nvlinks,
        fabric,
    }
}

fn nvml_facts(
    nvml: Option<&Nvml>,
    nvml_err: Option<&String>,
    pci: &str,
) -> (Option<u32>, FabricEvidence) {
    let mut ev = FabricEvidence {
        state: None,
        status: 0,
        cluster_uuid: [0; 16],
        clique_id: 0,
        nvml_error: nvml_err.cloned(),
        imex_channels: false,
        probe: Ok(()),
    };
    let Some(nvml) = nvml else { return (None, ev) };
    let Ok(cpci) = std::ffi::CString::new(pci) else { return (None, ev) };
    let mut h: ffi::NvmlDevice = std::ptr::null_mut();
    // SAFETY: NUL-terminated bus id and an out-pointer to a local handle.
    let r = unsafe { (nvml.by_pci)(cpci.as_ptr(), &mut h) };
    if r != 0 {
        ev.nvml_error = Some(format!("nvmlDeviceGetHandleByPciBusId({pci}): {}", nvml.message(r)));
        return (None, ev);
    }
    let nvlinks = nvml.nvlink_state.map(|f| {
        (0..18u32)
            .filter(|&link| {
                let mut active = 0;
                // SAFETY: valid handle, out-pointer to a local; links past the last fail.
                (unsafe { f(h, link, &mut active) }) == 0 && active == 1
            })
            .count() as u32
    });
    match nvml.fabric_info {
        None => ev.nvml_error = Some("nvmlDeviceGetGpuFabricInfoV missing (old driver)".into()),
        Some(f) => {
            let mut info = NvmlFabricInfoV2 {
                version: ffi::NVML_FABRIC_INFO_V2,
                cluster_uuid: [0; 16],
                status: 0,
                clique_id: 0,
                state: 0,
                health_mask: 0,
            };
            // SAFETY: valid handle and a v2 struct with its version set.
            let r = unsafe { f(h, &mut info) };
            if r == 0 {
                ev.state = Some(info.state);
                ev.status = info.status;
                ev.cluster_uuid = info.cluster_uuid;
                ev.clique_id = info.clique_id;
            } else {
                ev.nvml_error = Some(format!("nvmlDeviceGetGpuFabricInfoV: {}", nvml.message(r)));
            }
        }
    }
    (nvlinks, ev)
}

/// Allocates one granule with a FABRIC handle and exports it: the only real test of whether
/// this process may use the fabric (it fails with CUDA_ERROR_NOT_PERMITTED without IMEX). Runs
/// in GPU `index`'s primary context, pushed and popped, so the caller's context is untouched.
fn fabric_probe(cuda: &Cuda, index: u32, dev: ffi::CuDevice) -> Result<(), String> {
    fabric_probe_on(cuda, index, dev).map_err(|e| e.to_string())
}

fn fabric_probe_on(cuda: &Cuda, index: u32, dev: ffi::CuDevice) -> Result<(), GpuError> {
    let gpu = Gpu::get(index)?;
    let _ctx = gpu.enter()?;
    let prop = MemAllocationProp::device(dev, HandleKind::Fabric.bits(), false);
    let mut gran = 0usize;
    // SAFETY: valid prop and out-pointer; flag 0 = minimum granularity.
    cuda.check("cuMemGetAllocationGranularity(FABRIC)", unsafe {
        (cuda.mem_granularity)(&mut gran, &prop, 0)
    })?;
    // Released when `alloc` drops, whether the export succeeds or not.
    let alloc = PhysicalAllocation::create(gpu, &prop, gran.max(2 << 20))?;
    alloc.export_fabric().map(|_| ())
}

/// Classifies a pointer through the driver's pointer attributes (see `crate::classify`).
pub(crate) fn classify_pointer(addr: u64) -> Location {
    let host = Location { kind: MemoryKind::HostPageable, device: None };
    let Ok(cuda) = driver() else { return host };
    let query = |attr: c_int| -> Option<u32> {
        let mut v: u32 = 0;
        // SAFETY: every queried attribute is a 32-bit value written to a local; the driver
        // only reads the pointer value (any address) and fails for memory it does not know.
        let r = unsafe { (cuda.pointer_attribute)((&mut v as *mut u32).cast(), attr, addr) };
        (r == 0).then_some(v)
    };
    match query(ffi::POINTER_MEMORY_TYPE) {
        Some(ffi::MEMORYTYPE_DEVICE) => {
            let device = query(ffi::POINTER_DEVICE_ORDINAL);
            let kind = if query(ffi::POINTER_IS_MANAGED) == Some(1) {
                MemoryKind::Managed
            } else if query(ffi::POINTER_LEGACY_IPC) == Some(1) {
                MemoryKind::Device
            } else if crate::share::ptr_attr::<u64>(addr, ffi::POINTER_ALLOWED_HANDLES)
                .is_some_and(|t| t != 0)
            {
                MemoryKind::DeviceVmm
            } else {
                MemoryKind::Device
            };
            Location { kind, device }
        }
        Some(ffi::MEMORYTYPE_HOST) => Location { kind: MemoryKind::HostPinned, device: None },
        _ => host,
    }
}
