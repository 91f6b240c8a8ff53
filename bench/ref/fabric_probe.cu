// What this host can prove about multi-node NVLink (MNNVL), checked the way tidewire checks
// it (crates/gpu/src/topology.rs, crates/core/src/fabric.rs), with nothing of tidewire's
// code: per GPU, the driver's handle-type attributes (the FABRIC attribute alone proves
// nothing: it is 1 on every Hopper GPU), NVML's fabric state, cluster UUID and clique, the
// IMEX channel devices, and a real allocate -> export of one granule with a FABRIC handle and
// with a POSIX file-descriptor handle. Then the peer-access matrix. The last line per GPU is
// the verdict: fabric proven only when NVML says the fabric is completed with success, the
// cluster UUID is not all zeros, an IMEX channel exists and the FABRIC export worked.
//
// Build and run (GPU host; no GPU work is queued, so there is nothing to wait for):
//   nvcc -O2 -std=c++17 -o fabric_probe fabric_probe.cu -lcuda -lnvidia-ml
//   ./fabric_probe
// Exit status: 0 the probe ran (whatever it found), 1 the CUDA driver could not be used.
#include <cuda.h>
#include <dirent.h>
#include <nvml.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

std::string cu_error(CUresult r) {
  const char* name = nullptr;
  const char* text = nullptr;
  if (cuGetErrorName(r, &name) != CUDA_SUCCESS) name = "?";
  if (cuGetErrorString(r, &text) != CUDA_SUCCESS) text = "?";
  return std::to_string(static_cast<int>(r)) + " " + name + " (" + text + ")";
}

// A driver call whose failure ends the probe.
void must(CUresult r, const char* call) {
  if (r != CUDA_SUCCESS) {
    std::printf("%s failed: %s\n", call, cu_error(r).c_str());
    std::exit(1);
  }
}

int attribute(CUdevice dev, CUdevice_attribute a, const char* name) {
  int v = -1;
  const CUresult r = cuDeviceGetAttribute(&v, a, dev);
  if (r != CUDA_SUCCESS) {
    std::printf("  cuDeviceGetAttribute(%s) failed: %s\n", name, cu_error(r).c_str());
    return -1;
  }
  return v;
}

// Allocates one granule of device memory that can be exported as `type`, exports it, and
// releases everything. Returns whether the export worked; prints each step's result.
bool try_export(int ordinal, CUmemAllocationHandleType type, const char* name) {
  CUmemAllocationProp prop;
  std::memset(&prop, 0, sizeof prop);
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = ordinal;
  prop.requestedHandleTypes = type;
  size_t granule = 0;
  CUresult r = cuMemGetAllocationGranularity(&granule, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
  if (r != CUDA_SUCCESS) {
    std::printf("  gpu %d %-8s cuMemGetAllocationGranularity: %s\n", ordinal, name,
                cu_error(r).c_str());
    return false;
  }
  CUmemGenericAllocationHandle handle = 0;
  r = cuMemCreate(&handle, granule, &prop, 0);
  if (r != CUDA_SUCCESS) {
    std::printf("  gpu %d %-8s cuMemCreate(%zu bytes): %s\n", ordinal, name, granule,
                cu_error(r).c_str());
    return false;
  }
  bool ok = false;
  if (type == CU_MEM_HANDLE_TYPE_FABRIC) {
    CUmemFabricHandle fabric;
    r = cuMemExportToShareableHandle(&fabric, handle, type, 0);
    ok = r == CUDA_SUCCESS;
  } else {
    int fd = -1;
    r = cuMemExportToShareableHandle(&fd, handle, type, 0);
    ok = r == CUDA_SUCCESS;
    if (fd >= 0) close(fd);
  }
  std::printf("  gpu %d %-8s create %zu bytes: ok; export: %s\n", ordinal, name, granule,
              ok ? "ok" : cu_error(r).c_str());
  const CUresult released = cuMemRelease(handle);
  if (released != CUDA_SUCCESS) {
    std::printf("  gpu %d %-8s cuMemRelease: %s\n", ordinal, name, cu_error(released).c_str());
  }
  return ok;
}

// Whether /dev/nvidia-caps-imex-channels holds at least one channel device.
bool imex_channels() {
  DIR* d = opendir("/dev/nvidia-caps-imex-channels");
  if (d == nullptr) return false;
  bool any = false;
  while (dirent* e = readdir(d)) {
    if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) any = true;
  }
  closedir(d);
  return any;
}

const char* fabric_state(unsigned state) {
  switch (state) {
    case NVML_GPU_FABRIC_STATE_NOT_SUPPORTED: return "not supported";
    case NVML_GPU_FABRIC_STATE_NOT_STARTED: return "not started";
    case NVML_GPU_FABRIC_STATE_IN_PROGRESS: return "in progress";
    case NVML_GPU_FABRIC_STATE_COMPLETED: return "completed";
    default: return "unknown";
  }
}

}  // namespace

int main() {
  must(cuInit(0), "cuInit");
  int driver = 0;
  must(cuDriverGetVersion(&driver), "cuDriverGetVersion");
  int count = 0;
  must(cuDeviceGetCount(&count), "cuDeviceGetCount");
  const bool imex = imex_channels();
  std::printf("driver API %d, %d GPU(s), IMEX channel devices: %s\n", driver, count,
              imex ? "present" : "none");
  const nvmlReturn_t nvml = nvmlInit_v2();
  if (nvml != NVML_SUCCESS) {
    std::printf("nvmlInit: %s; fabric state unknown\n", nvmlErrorString(nvml));
  }
  for (int i = 0; i < count; i++) {
    CUdevice dev;
    must(cuDeviceGet(&dev, i), "cuDeviceGet");
    char name[256] = {0};
    must(cuDeviceGetName(name, sizeof name, dev), "cuDeviceGetName");
    std::printf("gpu %d: %s\n", i, name);
    const int fabric_attr = attribute(dev, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED,
                                      "HANDLE_TYPE_FABRIC_SUPPORTED");
    const int posix_attr = attribute(
        dev, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
        "HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED");
    const int vmm = attribute(dev, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
                              "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED");
    const int gdr = attribute(dev, CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED,
                              "GPU_DIRECT_RDMA_SUPPORTED");
    std::printf("  attributes: fabric handle %d, posix fd handle %d, vmm %d, gpudirect rdma %d\n",
                fabric_attr, posix_attr, vmm, gdr);

    // NVML: the fabric manager's view of this GPU.
    bool nvml_ok = false;
    if (nvml == NVML_SUCCESS) {
      // By PCI bus id: NVML's indices need not follow CUDA's device order.
      char bus[64] = {0};
      must(cuDeviceGetPCIBusId(bus, sizeof bus, dev), "cuDeviceGetPCIBusId");
      nvmlDevice_t h;
      nvmlReturn_t r = nvmlDeviceGetHandleByPciBusId_v2(bus, &h);
      if (r != NVML_SUCCESS) {
        std::printf("  nvmlDeviceGetHandleByPciBusId(%s): %s\n", bus, nvmlErrorString(r));
      } else {
        nvmlGpuFabricInfoV_t info;
        std::memset(&info, 0, sizeof info);
        info.version = nvmlGpuFabricInfo_v2;
        r = nvmlDeviceGetGpuFabricInfoV(h, &info);
        if (r != NVML_SUCCESS) {
          std::printf("  nvmlDeviceGetGpuFabricInfoV: %s\n", nvmlErrorString(r));
        } else {
          bool uuid_zero = true;
          char uuid[2 * NVML_GPU_FABRIC_UUID_LEN + 1] = {0};
          for (int k = 0; k < NVML_GPU_FABRIC_UUID_LEN; k++) {
            uuid_zero &= info.clusterUuid[k] == 0;
            std::snprintf(uuid + 2 * k, 3, "%02x", info.clusterUuid[k]);
          }
          std::printf("  nvml fabric: state %s, status %s, cluster %s, clique %u\n",
                      fabric_state(info.state), nvmlErrorString(info.status), uuid,
                      info.cliqueId);
          nvml_ok = info.state == NVML_GPU_FABRIC_STATE_COMPLETED &&
                    info.status == NVML_SUCCESS && !uuid_zero;
        }
      }
    }

    // The real test: allocate and export, in this GPU's primary context.
    CUcontext ctx;
    must(cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    must(cuCtxPushCurrent(ctx), "cuCtxPushCurrent");
    const bool fabric_export = try_export(i, CU_MEM_HANDLE_TYPE_FABRIC, "FABRIC");
    const bool fd_export = try_export(i, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, "POSIX_FD");
    CUcontext popped;
    must(cuCtxPopCurrent(&popped), "cuCtxPopCurrent");
    must(cuDevicePrimaryCtxRelease(dev), "cuDevicePrimaryCtxRelease");

    // The same rule as tidewire's: every piece of evidence, none assumed.
    const bool proven = nvml_ok && fabric_export && imex;
    std::string why;
    if (!nvml_ok) why += " NVML does not show a completed fabric with a cluster UUID;";
    if (!fabric_export) why += " the FABRIC export failed;";
    if (!imex) why += " no IMEX channel;";
    std::printf("  verdict: fabric %s;%s posix-fd export %s\n", proven ? "PROVEN" : "not proven",
                why.c_str(), fd_export ? "works" : "fails");
  }
  if (count > 1) {
    std::printf("peer access (row can map column):\n     ");
    for (int j = 0; j < count; j++) std::printf(" %3d", j);
    std::printf("\n");
    for (int i = 0; i < count; i++) {
      CUdevice a;
      must(cuDeviceGet(&a, i), "cuDeviceGet");
      std::printf("  %3d", i);
      for (int j = 0; j < count; j++) {
        CUdevice b;
        must(cuDeviceGet(&b, j), "cuDeviceGet");
        int can = 0;
        if (i == j) {
          can = 1;
        } else {
          must(cuDeviceCanAccessPeer(&can, a, b), "cuDeviceCanAccessPeer");
        }
        std::printf(" %3s", can ? "yes" : "no");
      }
      std::printf("\n");
    }
  }
  if (nvml == NVML_SUCCESS) {
    const nvmlReturn_t r = nvmlShutdown();
    if (r != NVML_SUCCESS) std::printf("nvmlShutdown: %s\n", nvmlErrorString(r));
  }
  return 0;
}
